//! The app's backend in the loop (`fanout-bench control`), over loopback, with a backend in
//! this process (axum) that allows everything at once:
//!
//! - connect: `connects` WebSocket connects one after another (upgrade to `welcome`) to one
//!   node, with the connect hook off and then on: p50 / p99 of each, and the difference;
//! - rpc: `rpcs` round trips one after another on one connection (request to `rpc` reply);
//! - disconnect: `users` connections of one user spread over the nodes, then
//!   `POST /v1/users/{user}/disconnect`: the time until the API answers, and until the last
//!   connection has its close frame.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{Json, Router, routing::post};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{suite::FanoutTier, tier::Paths};

#[derive(Debug, Serialize)]
pub struct Control {
    pub nodes: usize,
    pub connects: usize,
    pub connect_ms_p50_off: f64,
    pub connect_ms_p99_off: f64,
    pub connect_ms_p50_on: f64,
    pub connect_ms_p99_on: f64,
    /// p99 with the hook on, less p99 with it off.
    pub connect_ms_p99_added: f64,
    pub rpcs: usize,
    pub rpc_ms_p50: f64,
    pub rpc_ms_p99: f64,
    /// Connections of one user, over the nodes.
    pub disconnected: usize,
    /// From `POST .../disconnect` to its answer.
    pub disconnect_answer_ms: f64,
    /// From `POST .../disconnect` to the last connection's close frame.
    pub disconnect_last_closed_ms: f64,
}

fn quantiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let q = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (q(0.5), q(0.99))
}

/// The backend: connect names the user the client gave; rpc echoes.
async fn backend() -> String {
    async fn connect(Json(body): Json<Value>) -> Json<Value> {
        Json(json!({"user": body["user"].as_str().unwrap_or("anyone")}))
    }
    async fn rpc(Json(body): Json<Value>) -> Json<Value> {
        Json(json!({"result": body["data"]}))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/connect", post(connect))
        .route("/rpc", post(rpc));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// `count` connects to `url` one after another: each one's time to `welcome`, ms.
async fn connects(url: &str, count: usize) -> Vec<f64> {
    let mut ms = Vec::with_capacity(count);
    for i in 0..count {
        let url = format!("{url}?user=c{i}");
        let started = Instant::now();
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("a client connects");
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => break,
                Some(Ok(_)) => continue,
                other => panic!("no welcome: {other:?}"),
            }
        }
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let _ = socket.close(None).await;
    }
    ms
}

async fn get(api: &str, path: &str) -> Value {
    fanout_testkit::http::get(api, path)
        .await
        .expect("the API answers")
        .json()
}

pub async fn run(paths: &Paths, nodes: usize, count: usize, rpcs: usize, users: usize) -> Control {
    let base = backend().await;
    // Warm-up connects first (each process's first connections set up what later ones reuse).
    let tier = FanoutTier::start(paths, nodes).await;
    let url = tier.ws_urls()[0].clone();
    connects(&url, 50).await;
    let (off50, off99) = quantiles(connects(&url, count).await);
    drop(tier);
    let env = [
        (
            "FANOUT_PROXY_CONNECT_URL".to_string(),
            format!("{base}/connect"),
        ),
        ("FANOUT_PROXY_RPC_URL".to_string(), format!("{base}/rpc")),
        // One connection's round trips one after another, not a client's fair share.
        (
            "FANOUT_PUBLISH_RATE_PER_SEC".to_string(),
            "1000000".to_string(),
        ),
    ];
    let tier = FanoutTier::start_with(paths, nodes, &env).await;
    let urls = tier.ws_urls();
    connects(&urls[0], 50).await;
    let (on50, on99) = quantiles(connects(&urls[0], count).await);
    println!(
        "  connect p50/p99: {off50:.2}/{off99:.2} ms without the hook, {on50:.2}/{on99:.2} ms with it"
    );

    // rpc round trips on one connection.
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{}?user=rpc", urls[0]))
        .await
        .unwrap();
    let mut times = Vec::with_capacity(rpcs);
    for i in 0..rpcs + 50 {
        let started = Instant::now();
        let request = json!({"op": "rpc", "method": "echo", "data": i, "id": i});
        socket
            .send(Message::Text(request.to_string().into()))
            .await
            .unwrap();
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"op\":\"rpc\"") => break,
                Some(Ok(Message::Text(text))) if text.contains("\"error\"") => {
                    panic!("rpc refused: {text}")
                }
                Some(Ok(_)) => continue,
                other => panic!("no rpc reply: {other:?}"),
            }
        }
        if i >= 50 {
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (rpc50, rpc99) = quantiles(times);
    println!("  rpc round trip p50/p99: {rpc50:.2}/{rpc99:.2} ms");

    // One user's connections over the nodes, then one disconnect.
    let api = tier.api.addr.clone();
    let mut sockets = Vec::with_capacity(users);
    for wave in (0..users).collect::<Vec<_>>().chunks(100) {
        let opened = wave.iter().map(|&i| {
            let url = format!("{}?user=big", urls[i % urls.len()]);
            async move {
                tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .expect("a client connects")
                    .0
            }
        });
        sockets.extend(futures_util::future::join_all(opened).await);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = get(&api, "/v1/users/big/connections").await;
        if listed["partial"] == false
            && listed["connections"].as_array().map(Vec::len) == Some(users)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API never listed {users} connections: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = Arc::new(std::sync::Mutex::new(Vec::with_capacity(users)));
    let mut readers = Vec::with_capacity(users);
    for mut socket in sockets {
        let closed = closed.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Close(frame) = message {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(0);
                    closed.lock().unwrap().push((Instant::now(), code));
                    return;
                }
            }
        }));
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let answer = http
        .post(format!("http://{api}/v1/users/big/disconnect"))
        .body("{}")
        .send()
        .await
        .expect("the API answers");
    let answered = started.elapsed().as_secs_f64() * 1000.0;
    let body: Value =
        serde_json::from_str(&answer.text().await.unwrap_or_default()).unwrap_or(Value::Null);
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(30), reader).await;
    }
    let closed = closed.lock().unwrap();
    assert_eq!(
        closed.len(),
        users,
        "not every connection was closed: {body}"
    );
    assert!(
        closed.iter().all(|(_, code)| *code == 4005),
        "another close code"
    );
    let last = closed.iter().map(|(at, _)| *at).max().unwrap();
    let last_ms = last.duration_since(started).as_secs_f64() * 1000.0;
    println!(
        "  disconnect of {users} connections over {nodes} nodes: answered in {answered:.1} ms ({body}), last closed at {last_ms:.1} ms"
    );
    drop(tier);
    Control {
        nodes,
        connects: count,
        connect_ms_p50_off: off50,
        connect_ms_p99_off: off99,
        connect_ms_p50_on: on50,
        connect_ms_p99_on: on99,
        connect_ms_p99_added: on99 - off99,
        rpcs,
        rpc_ms_p50: rpc50,
        rpc_ms_p99: rpc99,
        disconnected: users,
        disconnect_answer_ms: answered,
        disconnect_last_closed_ms: last_ms,
    }
}
