//! Silent failures: the delivery path breaks behind fanout's back while every connection
//! stays up. The ws node's canary finds it (`/readyz` 503 with the reason,
//! `fanout_ws_canary_ok` 0), rebuilds the path, is ready again, and its clients get what was
//! published meanwhile; the API's `/readyz` says whether the stream takes writes.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const INTERVAL_MS: u64 = 300;

async fn readyz(server: &Server) -> (u16, Value) {
    let response = reqwest::get(server.url("/readyz")).await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn metric(server: &Server, name: &str) -> Option<f64> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .map(|v| v.trim().parse().unwrap())
}

async fn stream(nats: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_republishing_is_found_and_repaired() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.canary_interval_ms = INTERVAL_MS).await;
    let mut client = Client::connect(&ws).await;
    client.subscribe("news").await;
    let first = publish(&api, "news", &json!("before")).await;
    assert_eq!(client.event().await["seq"], first);
    eventually("the canary's first verdict", || async {
        metric(&ws, "fanout_ws_canary_ok").await == Some(1.0)
    })
    .await;

    // Behind fanout's back: the stream stops republishing, and is kept that way (the node
    // restores it once it notices) until the test has seen the node unready. Nothing
    // disconnects.
    let js = stream(&nats).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let breaker = tokio::spawn({
        let (js, stop) = (js.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                let mut config = js
                    .get_stream("FANOUT")
                    .await
                    .unwrap()
                    .cached_info()
                    .config
                    .clone();
                if config.republish.take().is_some() {
                    js.update_stream(&config).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    eventually("RePublish to be gone", || async {
        js.get_stream("FANOUT")
            .await
            .unwrap()
            .cached_info()
            .config
            .republish
            .is_none()
    })
    .await;
    let broken = Instant::now();
    let mut missed = Vec::new();
    for i in 0..5 {
        missed.push(publish(&api, "news", &json!(format!("during {i}"))).await);
    }

    // Found: not ready, with the reason, and the gauge says so.
    let reason = within("the node to find its delivery path broken", async {
        loop {
            let (status, body) = readyz(&ws).await;
            if status == 503 {
                return body["canary"]["reason"].as_str().unwrap_or("").to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let found = broken.elapsed();
    stop.cancel();
    breaker.await.unwrap();
    let repairing = Instant::now();
    assert!(reason.contains("did not come back"), "{reason}");
    let failures = metric(&ws, "fanout_ws_canary_failures_total").await;
    assert!(failures >= Some(1.0), "{failures:?}");

    // Repaired by the node itself (it restores the stream's settings), ready again, and the
    // client gets what it missed, in order, then live events.
    eventually("the node to be ready again", || async {
        readyz(&ws).await.0 == 200
    })
    .await;
    let repaired = repairing.elapsed();
    let republish = js
        .get_stream("FANOUT")
        .await
        .unwrap()
        .cached_info()
        .config
        .republish
        .clone();
    assert!(republish.is_some(), "the node restored RePublish");
    for seq in &missed {
        assert_eq!(client.event().await["seq"], *seq);
    }
    let after = publish(&api, "news", &json!("after")).await;
    assert_eq!(client.event().await["seq"], after);
    eventually("the gauge to say the path works", || async {
        metric(&ws, "fanout_ws_canary_ok").await == Some(1.0)
    })
    .await;
    let intervals = |d: Duration| d.as_millis() as f64 / INTERVAL_MS as f64;
    println!(
        "found broken after {:.1} intervals, ready again {:.1} intervals after the breaking \
         stopped (interval {INTERVAL_MS} ms)",
        intervals(found),
        intervals(repaired)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_unready_while_the_stream_takes_no_writes() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let (status, body) = readyz(&api).await;
    assert_eq!(
        (status, &body["stream_writable"]),
        (200, &json!(true)),
        "{body}"
    );

    // The stream refuses writes (sealed streams take none), the connection stays up.
    let js = stream(&nats).await;
    let mut config = js
        .get_stream("FANOUT")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    config.sealed = true;
    js.update_stream(&config).await.unwrap();
    eventually("the API to say the stream takes no writes", || async {
        let (status, body) = readyz(&api).await;
        status == 503
            && body["stream_writable"] == json!(false)
            && body["reason"].as_str().is_some_and(|r| !r.is_empty())
    })
    .await;
    assert_eq!(readyz(&api).await.1["nats"], "connected");
}
