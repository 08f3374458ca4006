//! Server-directed reconnects: a draining node tells each client when to come back
//! (`reconnect_after_ms`, jittered, spread at `FANOUT_DRAIN_RATE`) and where (the emptiest
//! other nodes), in the WebSocket close reason and in SSE's `disconnect`; so does the app's
//! kick (and an overload: `disconnect.rs`'s unit tests).

use crate::common;

use std::collections::HashSet;

use common::*;
use serde_json::json;

/// The nodes `node` has heard from (`/v1/debug/state`'s `peers`).
async fn peers(node: &Server) -> Vec<String> {
    let (_, state) = get_json(node, "/v1/debug/state").await;
    let peers = state["peers"].as_array().cloned().unwrap_or_default();
    peers
        .iter()
        .filter_map(|p| p.as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_each_client_to_another_node_and_says_when() {
    let nats = NatsServer::start();
    let draining = start_ws(&nats, "ws-1", |c| c.drain_window_ms = 400).await;
    let two = start_ws(&nats, "ws-2", |_| {}).await;
    let three = start_ws(&nats, "ws-3", |_| {}).await;
    eventually("ws-1 to hear of ws-2 and ws-3", || async {
        peers(&draining).await.len() == 2
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Client::connect(&draining).await);
    }
    let mut stream = SseClient::connect(&draining, "user=ada", None)
        .await
        .unwrap();

    let stopping = tokio::spawn(draining.stop());
    let others: HashSet<String> = [&two, &three]
        .iter()
        .map(|node| format!("ws://{{host}}:{}/ws", node.addr.port()))
        .collect();
    let mut sent_to = HashSet::new();
    for client in &mut clients {
        let (closed, said) = client.closed().await.directed();
        assert_eq!(
            closed,
            Closed::Code(1001, "server shutting down: reconnect elsewhere".into())
        );
        // 7 clients over 400 ms: each waits within its turn (57 ms) at most.
        assert!(said["reconnect_after_ms"].as_u64().unwrap() < 100, "{said}");
        let node = said["nodes"][0].as_str().unwrap().to_string();
        assert!(others.contains(&node), "{node} is not one of {others:?}");
        sent_to.insert(node);
    }
    // Both nodes were empty: the clients are shared between them, not all sent to one.
    assert_eq!(sent_to, others);
    let ended = stream.ended().await.expect("a disconnect event");
    assert_eq!(ended["code"], 1001);
    assert!(ended["reconnect_after_ms"].is_u64(), "{ended}");
    assert!(
        others.contains(ended["nodes"][0].as_str().unwrap()),
        "{ended}"
    );
    within("ws-1 to stop", stopping).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_kick_says_when_to_come_back() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let node = start_ws(&nats, "ws-1", |_| {}).await;
    let mut ada = Client::connect_url(&format!("{}?user=ada", node.ws_url())).await;
    let (status, answer) = post_raw(&api, "/v1/users/ada/disconnect", "").await;
    assert_eq!(
        (status, answer["disconnected"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    let (closed, said) = ada.closed().await.directed();
    assert_eq!(
        closed,
        Closed::Code(4005, "disconnected by the server".into())
    );
    assert!(
        said["reconnect_after_ms"].as_u64().unwrap() < 1_000,
        "{said}"
    );
    assert!(said.get("nodes").is_none(), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_read_the_stream_a_few_at_a_time_and_every_one_recovers() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    // One stream read at a time, and no recent events in memory: every resume queues.
    let node = start_ws(&nats, "ws-1", |c| {
        c.replay_concurrency = 1;
        c.recent_events = 0;
    })
    .await;
    let first = publish(&api, "storm", &json!(0)).await;
    for i in 1..=3 {
        publish(&api, "storm", &json!(i)).await;
    }
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(Client::connect(&node).await);
    }
    // All at once: they wait their turn, and each gets exactly what it missed.
    let resumes = clients.iter_mut().map(|client| async move {
        let reply = client
            .request(json!({"op": "subscribe", "channel": "storm", "id": 1, "since": first}))
            .await;
        assert_eq!(reply["recovered"], true, "{reply}");
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(within("the replay", client.event()).await["data"].clone());
        }
        assert_eq!(got, [json!(1), json!(2), json!(3)]);
    });
    within("every resume", futures_util::future::join_all(resumes)).await;
    // Each resume read the stream, in turn (the canary's reads count too).
    let waits = metric(&node, "fanout_ws_replay_wait_seconds_count").await;
    assert!(waits.is_some_and(|n| n >= 12.0), "{waits:?}");
}
