//! Admission control: a node that holds `FANOUT_MAX_CONNECTIONS` answers new connections
//! (WebSocket, SSE, a poll) with 503 `over_capacity` and `Retry-After` before any other check,
//! and `/readyz` says it is full; one that takes new connections faster than
//! `FANOUT_ACCEPT_RATE` refuses the excess the same way, saying when the next one is taken.

use crate::common;

use common::*;
use serde_json::Value;

/// An upgrade's refusal: its status, `Retry-After` and body.
async fn refusal(url: &str) -> Option<(u16, Option<String>, Value)> {
    match within("an upgrade's answer", tokio_tungstenite::connect_async(url)).await {
        Ok((socket, _)) => {
            drop(socket);
            None
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let retry = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body = response.body().clone().unwrap_or_default();
            Some((
                response.status().as_u16(),
                retry,
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(other) => panic!("expected an HTTP answer, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_answers_503_with_retry_after_until_a_connection_leaves() {
    let nats = NatsServer::start();
    let node = start_ws(&nats, "ws-1", |c| c.max_connections = 2).await;
    let first = Client::connect(&node).await;
    let _second = Client::connect(&node).await;
    // Even without a token a full node answers 503 first: nothing else is checked.
    let (status, retry, body) = refusal(&node.ws_url()).await.expect("refused");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "over_capacity", "{body}");
    assert!(
        body["error"]["retry_after_ms"].as_u64().unwrap() > 0,
        "{body}"
    );
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    let (status, ready) = get_json(&node, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["admission"]["full"], true, "{ready}");
    assert_eq!(ready["admission"]["max_connections"], 2, "{ready}");
    // SSE and a poll too.
    for path in ["/sse?channel=x", "/poll?channel=x&timeout=0"] {
        let answer = reqwest::get(node.url(path)).await.unwrap();
        assert_eq!(answer.status().as_u16(), 503, "{path}");
        assert!(answer.headers().contains_key("retry-after"), "{path}");
    }
    // One leaves: the next is taken.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match refusal(&node.ws_url()).await {
            None => break,
            Some(_) => {
                assert!(tokio::time::Instant::now() < deadline, "still full");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_beyond_the_accept_rate_wait_their_turn() {
    let nats = NatsServer::start();
    let node = start_ws(&nats, "ws-1", |c| {
        c.accept_rate = 1;
        c.accept_burst = 2;
    })
    .await;
    // Connecting as fast as it can, a client soon finds the bucket empty (one a second).
    let mut held = Vec::new();
    let refused = loop {
        match refusal(&node.ws_url()).await {
            Some(refused) => break refused,
            None => held.push(()),
        }
        assert!(held.len() < 50, "never refused");
    };
    let (status, retry, body) = refused;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "over_capacity", "{body}");
    assert!(
        body["error"]["retry_after_ms"].as_u64().unwrap() <= 1000,
        "{body}"
    );
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(held.len() >= 2, "the burst is taken first: {}", held.len());
}
