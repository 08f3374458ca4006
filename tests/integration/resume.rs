//! Resuming: `subscribe` with `since` replays what the client missed, then continues live,
//! with no gap and no duplicate; and says so when it cannot.

use crate::common;

use common::*;
use serde_json::{Value, json};

async fn resume(client: &mut Client, channel: &str, since: u64, epoch: Option<&str>) -> Value {
    let mut request = json!({"op": "subscribe", "channel": channel, "since": since});
    if let Some(epoch) = epoch {
        request["epoch"] = json!(epoch);
    }
    let reply = client.request(request).await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_what_was_missed_then_continues_live() {
    let tier = Tier::start(1).await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(publish(&tier.api, "r", &json!({"i": i})).await);
    }
    let mut client = tier.client(0).await;
    let epoch = client.welcome["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    let reply = resume(&mut client, "r", seqs[1], Some(&epoch)).await;
    assert_eq!(reply["recovered"], true);
    assert_eq!(reply["replayed"], 3);
    assert_eq!(reply["epoch"], epoch.as_str());
    for (i, seq) in seqs.iter().enumerate().skip(2) {
        let event = client.event().await;
        assert_eq!(
            (event["seq"].as_u64(), &event["data"]),
            (Some(*seq), &json!({"i": i}))
        );
    }
    let live = publish(&tier.api, "r", &json!("live")).await;
    assert_eq!(client.event().await["seq"], live);
    // since = the last seq: nothing to replay, recovered.
    let reply = resume(&mut client, "r", live, None).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["replayed"].as_u64()),
        (Some(true), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_mid_stream_has_no_gap_and_no_duplicate() {
    let tier = Tier::start(2).await;
    let mut steady = tier.client(0).await;
    steady.subscribe("flow").await;
    let api = Server::external(tier.api.addr);
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = tokio::spawn(async move {
        for i in 0..400 {
            acked_tx
                .send(publish(&api, "flow", &json!({"n": i})).await)
                .unwrap();
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 100 {
        acked.push(within("acks", acked_rx.recv()).await.unwrap());
    }
    // A client that saw events up to acked[49] resumes on the other node while events flow.
    let mut resumed = tier.client(1).await;
    let reply = resume(&mut resumed, "flow", acked[49], None).await;
    assert_eq!(reply["recovered"], true);
    within("the publisher", publisher).await.unwrap();
    while let Ok(seq) = acked_rx.try_recv() {
        acked.push(seq);
    }
    assert_eq!(acked.len(), 400);
    let mut got = Vec::new();
    while got.len() < 350 {
        got.push(resumed.event().await["seq"].as_u64().unwrap());
    }
    assert_eq!(
        got,
        acked[50..],
        "exactly the events after since, in order, once"
    );
    let mut all = Vec::new();
    while all.len() < 400 {
        all.push(steady.event().await["seq"].as_u64().unwrap());
    }
    assert_eq!(all, acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_that_no_longer_reaches_since_is_not_recovered() {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| c.common.history_max_messages = 3).await;
    let ws = start_ws(&nats, "ws-1", |c| c.common.history_max_messages = 3).await;
    let mut seqs = Vec::new();
    for i in 0..6 {
        seqs.push(publish(&api, "short", &json!(i)).await);
    }
    let mut client = Client::connect(&ws).await;
    let reply = resume(&mut client, "short", seqs[0], None).await;
    assert_eq!(
        reply["recovered"], false,
        "seqs[0] was dropped by the per-channel limit"
    );
    assert_eq!(reply["replayed"], 3);
    for seq in &seqs[3..] {
        assert_eq!(client.event().await["seq"], *seq);
    }
    // A since from another stream (epoch) means nothing: not recovered, nothing replayed.
    let reply = resume(&mut client, "short", seqs[4], Some("not-this-stream")).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["replayed"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(reply["epoch"], client.welcome["epoch"]);
    // Still subscribed: live events arrive.
    let live = publish(&api, "short", &json!("live")).await;
    assert_eq!(client.event().await["seq"], live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_resumes_too() {
    let tier = Tier::start(1).await;
    // Every connection gets live broadcasts: the resuming client connects only once the node
    // has delivered these three (a witness on the node has the last), so that what it gets
    // is the replay, not live copies still on their way.
    let mut witness = tier.client(0).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        let (status, body) =
            post_raw(&tier.api, "/v1/broadcast", json!({"b": i}).to_string()).await;
        assert_eq!(status, 202);
        seqs.push(body["seq"].as_u64().unwrap());
    }
    for seq in &seqs {
        assert_eq!(witness.event().await["seq"], *seq);
    }
    let mut client = tier.client(0).await;
    let reply = resume(&mut client, "broadcast", seqs[0], None).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["replayed"].as_u64()),
        (Some(true), Some(2))
    );
    assert_eq!(client.event().await["seq"], seqs[1]);
    assert_eq!(client.event().await["seq"], seqs[2]);
    let (_, body) = post_raw(&tier.api, "/v1/broadcast", "\"live\"").await;
    assert_eq!(client.event().await["seq"], body["seq"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_is_followed_and_old_sequences_are_not_recovered() {
    let tier = Tier::start(1).await;
    let mut client = tier.client(0).await;
    client.subscribe("re").await;
    let old_epoch = client.welcome["epoch"].as_str().unwrap().to_string();
    let mut last = 0;
    for i in 0..3 {
        last = publish(&tier.api, "re", &json!(i)).await;
        assert_eq!(client.event().await["seq"], last);
    }

    // Someone deletes the stream; the next publish recreates it and sequences restart.
    let nats = async_nats::connect(tier.nats.url()).await.unwrap();
    async_nats::jetstream::new(nats)
        .delete_stream("FANOUT")
        .await
        .unwrap();
    // Retried until the API has found the stream gone and made it again; one key, so that an
    // attempt that was stored but not acknowledged in time is not stored twice.
    let http = reqwest::Client::new();
    let url = tier.api.url("/v1/channels/re/events");
    let first = within("a publish into the recreated stream", async {
        loop {
            let sent = http
                .post(&url)
                .header("Idempotency-Key", "the-new-event")
                .body("\"new\"")
                .send()
                .await
                .unwrap();
            if sent.status() == 202 {
                let body: Value = sent.json().await.unwrap();
                return body["seq"].as_u64().unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(first < last, "sequences restarted: {first} after {last}");
    // The node follows the new stream instead of taking its events for duplicates.
    let event = client.event().await;
    assert_eq!(
        (event["seq"].as_u64(), &event["data"]),
        (Some(first), &json!("new"))
    );

    // A client resuming with a since from the old stream is told it cannot be recovered.
    let mut late = tier.client(0).await;
    let new_epoch = late.welcome["epoch"].as_str().unwrap().to_string();
    assert_ne!(new_epoch, old_epoch);
    let reply = resume(&mut late, "re", last, Some(&old_epoch)).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["replayed"].as_u64()),
        (Some(false), Some(0))
    );
    assert_eq!(reply["epoch"], new_epoch.as_str());
}

/// Forges the live copy of a stored event, as JetStream's RePublish would send it.
async fn forge(nats: &async_nats::Client, channel: &str, seq: u64, last_seq: u64, data: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Sequence", seq.to_string().as_str());
    headers.insert("Nats-Last-Sequence", last_seq.to_string().as_str());
    headers.insert("Fanout-Id", format!("forged-{seq}").as_str());
    let subject = format!("fanout.out.{channel}");
    nats.publish_with_headers(subject, headers, data.to_string().into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_live_delivery_is_repaired_from_the_stream() {
    let tier = Tier::start(1).await;
    // Three events stored while nobody listened.
    let mut seqs = Vec::new();
    for data in ["e1", "e2", "e3"] {
        seqs.push(publish(&tier.api, "gap", &json!(data)).await);
    }
    let mut client = tier.client(0).await;
    client.subscribe("gap").await;
    let nats = async_nats::connect(tier.nats.url()).await.unwrap();
    // The node gets E1 live, then E3 whose previous event (E2) it never got: a gap.
    forge(&nats, "gap", seqs[0], 0, "\"e1\"").await;
    forge(&nats, "gap", seqs[2], seqs[1], "\"e3\"").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let event = client.event().await;
        got.push((event["seq"].as_u64().unwrap(), event["data"].clone()));
    }
    assert_eq!(
        got,
        [
            (seqs[0], json!("e1")),
            (seqs[1], json!("e2")),
            (seqs[2], json!("e3"))
        ],
        "E2 was fetched from the stream and delivered in order"
    );
    // A duplicate of what was delivered is dropped, not sent again.
    forge(&nats, "gap", seqs[1], seqs[0], "\"e2 again\"").await;
    let marker = publish(&tier.api, "gap", &json!("next")).await;
    assert_eq!(client.event().await["seq"], marker);
}
