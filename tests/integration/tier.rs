//! The tier end to end: real nats-server, the API and ws nodes over real sockets.

use crate::common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

/// The scaling-ws scenario: one API, two ws nodes, a client on each. One `POST /ping`
/// reaches both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ping_reaches_clients_on_every_node() {
    let tier = Tier::start(2).await;
    let api = &tier.api;
    let mut a = tier.client(0).await;
    let mut b = tier.client(1).await;
    assert_eq!(a.welcome["node"], "ws-1");
    assert_eq!(b.welcome["node"], "ws-2");
    assert_eq!(a.welcome["heartbeat"], 25);
    assert_ne!(a.welcome["conn"], b.welcome["conn"]);

    let (status, body) = post_raw(api, "/ping", "").await;
    assert_eq!((status, body), (200, json!({"message": "pong"})));

    for client in [&mut a, &mut b] {
        let event = client.event().await;
        assert_eq!(event["channel"], "broadcast");
        let send_time = event["data"]["sendTime"].as_str().unwrap();
        // Go's time.ANSIC: "Sat Nov 21 21:10:00 2026"
        assert_eq!(send_time.len(), 24, "{send_time}");
        assert!(event["seq"].as_u64().unwrap() >= 1);
        assert!(event["ts"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(event["id"].as_str().unwrap().len(), 36);
    }
}

/// A channel event reaches subscribers on every node, and only them; `POST /v1/broadcast`
/// reaches everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_isolated_across_nodes() {
    let tier = Tier::start(2).await;
    let api = &tier.api;
    let mut maths1 = tier.client(0).await;
    let mut maths2 = tier.client(1).await;
    let mut art1 = tier.client(0).await;
    let mut idle1 = tier.client(0).await;
    maths1.subscribe("maths").await;
    maths2.subscribe("maths").await;
    art1.subscribe("art").await;

    let seq = publish(api, "maths", &json!({"q": "2+2"})).await;
    for client in [&mut maths1, &mut maths2] {
        let event = client.event().await;
        assert_eq!(
            (&event["channel"], &event["seq"], &event["data"]),
            (&json!("maths"), &json!(seq), &json!({"q": "2+2"}))
        );
    }
    let art_seq = publish(api, "art", &json!("monet")).await;
    assert_eq!(art1.event().await["seq"], art_seq);

    // The maths event was fanned out on ws-1 (maths1 got it) before this broadcast was even
    // published, so had it been queued for art1 or idle1 it would come before the marker.
    let (status, _) = post_raw(api, "/v1/broadcast", r#"{"marker":1}"#).await;
    assert_eq!(status, 202);
    for client in [&mut art1, &mut idle1, &mut maths1, &mut maths2] {
        let event = client.event().await;
        assert_eq!(event["channel"], "broadcast", "{event}");
        assert_eq!(event["data"], json!({"marker": 1}));
    }

    // After unsubscribing, maths1 no longer gets maths events; maths2 still does.
    let reply = maths1
        .request(json!({"op": "unsubscribe", "channel": "maths", "id": "u1"}))
        .await;
    assert_eq!(
        reply,
        json!({"op": "unsubscribed", "channel": "maths", "id": "u1"})
    );
    let seq = publish(api, "maths", &json!(2)).await;
    assert_eq!(maths2.event().await["seq"], seq);
    post_raw(api, "/v1/broadcast", "2").await;
    assert_eq!(maths1.event().await["channel"], "broadcast");
}

/// 1,000 events published one after another arrive in `seq` order with no gap: exactly the
/// sequences the API acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_arrives_in_order_without_gaps() {
    let tier = Tier::start(2).await;
    let mut a = tier.client(0).await;
    let mut b = tier.client(1).await;
    a.subscribe("orders").await;
    b.subscribe("orders").await;

    let api = Server::external(tier.api.addr);
    let publisher = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..1000 {
            acked.push(publish(&api, "orders", &json!({"n": i})).await);
        }
        acked
    });
    let mut received = [Vec::new(), Vec::new()];
    for (client, seqs) in [&mut a, &mut b].into_iter().zip(received.iter_mut()) {
        for i in 0..1000 {
            let event = client.event().await;
            assert_eq!(event["data"]["n"], i, "{event}");
            seqs.push(event["seq"].as_u64().unwrap());
        }
    }
    let acked = within("the publisher", publisher).await.unwrap();
    for seqs in received {
        assert_eq!(seqs, acked, "every acknowledged event, in order, once");
    }
    assert!(acked.windows(2).all(|w| w[0] < w[1]));
}

/// With `coalesce_ms`, events are written together, still all of them, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_writes_keep_every_event_in_order() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.coalesce_ms = 50).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("ticks").await;
    let mut acked = Vec::new();
    for i in 0..200 {
        acked.push(publish(&api, "ticks", &json!({"n": i})).await);
    }
    for (i, seq) in acked.iter().enumerate() {
        let event = client.event().await;
        assert_eq!(
            (event["data"]["n"].as_u64(), event["seq"].as_u64()),
            (Some(i as u64), Some(*seq))
        );
    }
}

/// A node holds a NATS subscription for a channel only while a local client is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_subscriptions_follow_local_interest() {
    let nats = NatsServer::start();
    let ws1 = start_ws(&nats, "ws-1", |_| {}).await;
    // Kept alive (not `_`): ws-2 must be running for "ws-2 holds no subscription" to mean anything.
    let _ws2 = start_ws(&nats, "ws-2", |_| {}).await;
    let subject = "fanout.out.room:7";
    let has = |node: &'static str| {
        let nats = &nats;
        async move {
            node_subjects(nats, node)
                .await
                .contains(&subject.to_string())
        }
    };
    // Every node always holds broadcast.
    for node in ["ws-1", "ws-2"] {
        let subjects = node_subjects(&nats, node).await;
        assert!(
            subjects.contains(&"fanout.out.broadcast".to_string()),
            "{subjects:?}"
        );
        assert!(!subjects.contains(&subject.to_string()), "{subjects:?}");
    }

    let mut a = Client::connect(&ws1).await;
    let mut b = Client::connect(&ws1).await;
    a.subscribe("room:7").await;
    // `subscribed` is only sent once the server has the subscription.
    assert!(has("ws-1").await);
    assert!(!has("ws-2").await, "ws-2 has no client in room:7");
    b.subscribe("room:7").await;
    a.request(json!({"op": "unsubscribe", "channel": "room:7"}))
        .await;
    assert!(has("ws-1").await, "b is still in room:7");
    // The last local subscriber leaving (here: disconnecting) drops the subscription.
    drop(b);
    eventually("ws-1 to unsubscribe room:7", || async {
        !has("ws-1").await
    })
    .await;
    let subjects = node_subjects(&nats, "ws-1").await;
    assert_eq!(subjects.iter().filter(|s| s.contains("room:7")).count(), 0);
}

/// A client that stops reading is cut off; a normal client on the same node gets every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_without_hurting_others() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.queue_capacity = 16).await;
    let mut slow = Client::connect(&ws).await;
    let mut fast = Client::connect(&ws).await;
    slow.subscribe("feed").await;
    fast.subscribe("feed").await;

    // 400 events of 16 KiB (6.4 MB) overflow the socket buffers and the slow client's
    // 16-frame queue: `slow` reads nothing until the end.
    let blob = "x".repeat(16 * 1024);
    let total = 400;
    let mut acked = HashSet::new();
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for _ in 0..total {
            seqs.push(fast.event().await["seq"].as_u64().unwrap());
        }
        seqs
    });
    for i in 0..total {
        acked.insert(publish(&api, "feed", &json!({"i": i, "blob": blob})).await);
    }
    let fast_seqs = within("the fast client", reader).await.unwrap();
    assert_eq!(fast_seqs.iter().copied().collect::<HashSet<_>>(), acked);
    assert!(fast_seqs.windows(2).all(|w| w[0] < w[1]));

    // The slow client finds, after what was buffered, that it was closed with 4001, told
    // when to come back (or the socket was dropped when the close frame could not be written
    // in time).
    match slow.closed().await {
        Closed::Reset => eprintln!("slow client: reset"),
        closed => {
            eprintln!("slow client: {closed:?}");
            let (closed, said) = closed.directed();
            assert_eq!(closed, Closed::Code(4001, "slow consumer".into()));
            let after = said["reconnect_after_ms"].as_u64().unwrap();
            assert!((500..2_500).contains(&after), "{said}");
        }
    }
}

/// `subscribed` comes before any frame of its channel (docs/protocol.md, "Ordering"): the
/// channel's events and the subscriber's own presence join, here while the channel carries
/// about 20,000 events a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribed_comes_before_the_channels_frames() {
    use futures_util::StreamExt;
    let nats = NatsServer::start();
    // Queues deep enough for the flood held back while each probe subscribes: this is about
    // order, not slow consumers.
    let node = start_ws(&nats, "ws-1", |c| {
        c.queue_capacity = 1 << 20;
        c.queue_max_bytes = 1 << 30;
    })
    .await;
    // A reader that keeps the channel subscribed on the node, and drains what it gets.
    let mut busy = Client::connect(&node).await;
    busy.subscribe("busy").await;
    let draining = tokio::spawn(async move { while busy.socket.next().await.is_some() {} });
    // Live copies of stored events as the stream would republish them (nothing is stored:
    // this is about the node, not JetStream). Bounded in count and rate.
    let nats = async_nats::connect(nats.url()).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let forger = tokio::spawn({
        let stop = stop.clone();
        async move {
            for seq in 1..=2_000_000u64 {
                if stop.is_cancelled() {
                    break;
                }
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Sequence", seq.to_string().as_str());
                headers.insert("Nats-Last-Sequence", (seq - 1).to_string().as_str());
                nats.publish_with_headers("fanout.out.busy", headers, "1".into())
                    .await
                    .unwrap();
                // 20 events a millisecond: a steady flood, leaving the machine room for the
                // rest of the suite.
                if seq % 20 == 0 {
                    nats.flush().await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    });
    for i in 0..100 {
        let mut client = Client::connect(&node).await;
        let presence = i % 2 == 0;
        client
            .send(json!({"op": "subscribe", "channel": "busy", "presence": presence, "id": i}))
            .await;
        let first = client.recv().await;
        assert_eq!(
            (first["op"].as_str(), &first["id"]),
            (Some("subscribed"), &json!(i)),
            "subscribe {i}: the first frame after the request"
        );
        // And the channel's frames do come after it.
        assert!(is_push(&client.recv().await));
    }
    stop.cancel();
    within("the forger to stop", forger).await.unwrap();
    draining.abort();
}
