//! Bad input, over HTTP and WebSocket: every case gets a clear error, and nothing else is
//! disturbed.

use crate::common;

use common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn error_code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_gets_json_errors() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;

    for channel in ["a%20b", "a*", "a..b", ".a", "%C3%A9", &"x".repeat(129)] {
        let (status, body) = post_raw(&api, &format!("/v1/channels/{channel}/events"), "1").await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_channel"),
            "{channel}: {body}"
        );
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    for bad in ["{nope", "", "1 2", "{\"a\":}"] {
        let (status, body) = post_raw(&api, "/v1/channels/maths/events", bad).await;
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_json"),
            "{bad:?}: {body}"
        );
    }
    let too_big = format!("\"{}\"", "x".repeat(64 * 1024));
    let (status, body) = post_raw(&api, "/v1/channels/maths/events", too_big).await;
    assert_eq!(
        (status, error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );
    // fanout's own channels (the canaries' probes) are no one else's.
    let (status, body) = post_raw(&api, "/v1/channels/_fanout.canary.ws-1/events", "1").await;
    assert_eq!(
        (status, error_code(&body)),
        (400, "reserved_channel"),
        "{body}"
    );
    let (status, body) = post_raw(&api, "/v1/broadcast", "{").await;
    assert_eq!((status, error_code(&body)), (400, "invalid_json"));

    let (status, body) = post_raw(&api, "/v1/nothing", "1").await;
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let response = reqwest::get(api.url("/v1/broadcast")).await.unwrap();
    assert_eq!(response.status(), 405);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "method_not_allowed");

    let health: Value = reqwest::get(api.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let ready: Value = reqwest::get(api.url("/readyz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["nats"].as_str()),
        (Some("ready"), Some("connected"))
    );

    // After all that, a good publish still works: exactly at the size limit.
    let exactly = format!("\"{}\"", "x".repeat(64 * 1024 - 2));
    let (status, body) = post_raw(&api, "/v1/channels/maths/events", exactly).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["channel"], "maths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_stores_once() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let http = reqwest::Client::new();
    let post = |key: &str| {
        http.post(api.url("/v1/channels/orders/events"))
            .header("Idempotency-Key", key)
            .body(r#"{"order":1}"#)
            .send()
    };
    let first: Value = post("order-1").await.unwrap().json().await.unwrap();
    let again = post("order-1").await.unwrap();
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(
        again["id"], first["id"],
        "a duplicate answers the original event's id"
    );
    assert_eq!(again["duplicate"], true);
    assert!(first.get("duplicate").is_none(), "{first}");
    let other: Value = post("order-2").await.unwrap().json().await.unwrap();
    assert_ne!(other["seq"], first["seq"]);

    let response = post(&"k".repeat(129)).await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "invalid_idempotency_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bad_input_gets_error_frames_and_the_connection_stays() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.max_subscriptions = 2).await;
    let mut bystander = Client::connect(&ws).await;
    bystander.subscribe("maths").await;
    let mut client = Client::connect(&ws).await;

    let cases: [(&str, &str, Value); 11] = [
        ("{nope", "invalid_json", Value::Null),
        ("[1,2]", "invalid_json", Value::Null),
        (r#"{"op":"dance","id":1}"#, "unknown_op", json!("dance")),
        (r#"{"channel":"x"}"#, "invalid_request", Value::Null),
        (
            r#"{"op":"subscribe"}"#,
            "invalid_request",
            json!("subscribe"),
        ),
        (
            r#"{"op":"subscribe","channel":"a b"}"#,
            "invalid_channel",
            json!("subscribe"),
        ),
        (
            r#"{"op":"subscribe","channel":"fanout.>"}"#,
            "invalid_channel",
            json!("subscribe"),
        ),
        (
            r#"{"op":"unsubscribe","channel":""}"#,
            "invalid_channel",
            json!("unsubscribe"),
        ),
        (
            r#"{"op":"unsubscribe","channel":"broadcast"}"#,
            "reserved_channel",
            json!("unsubscribe"),
        ),
        // fanout's own channels: the canaries' probes.
        (
            r#"{"op":"subscribe","channel":"_fanout.canary.ws-1"}"#,
            "forbidden",
            json!("subscribe"),
        ),
        (
            r#"{"op":"publish","channel":"_fanout.canary.ws-1","data":{"probe":1}}"#,
            "forbidden",
            json!("publish"),
        ),
    ];
    for (request, code, reference) in cases {
        client
            .socket
            .send(Message::Text(request.into()))
            .await
            .unwrap();
        let reply = client.recv().await;
        assert_eq!(reply["op"], "error", "{request}: {reply}");
        assert_eq!(reply["code"], code, "{request}: {reply}");
        assert_eq!(reply["ref"], reference, "{request}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty());
    }
    let reply = client.request(json!({"op": "dance", "id": "req-9"})).await;
    assert_eq!(reply["id"], "req-9");

    client
        .socket
        .send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(client.recv().await["code"], "unsupported_frame");

    client.subscribe("a").await;
    client.subscribe("b").await;
    client.subscribe("a").await; // already in: not a new subscription
    client.subscribe("broadcast").await; // everyone is in broadcast: not counted
    let reply = client
        .request(json!({"op": "subscribe", "channel": "c", "id": 3}))
        .await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str(), &reply["id"]),
        (Some("too_many_subscriptions"), Some("subscribe"), &json!(3))
    );

    // Still open and served; the bystander saw none of it.
    assert_eq!(
        client.request(json!({"op": "ping", "id": 5})).await,
        json!({"op": "pong", "id": 5})
    );
    let seq = publish(&api, "a", &json!("for a")).await;
    assert_eq!(client.event().await["seq"], seq);
    let seq = publish(&api, "maths", &json!("for maths")).await;
    assert_eq!(bystander.event().await["seq"], seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_closes_with_1009_only_that_connection() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let ws = start_ws(&nats, "ws-1", |c| c.max_message_bytes = 1024).await;
    let mut bystander = Client::connect(&ws).await;
    let mut client = Client::connect(&ws).await;
    let big = json!({"op": "ping", "pad": "x".repeat(2000)}).to_string();
    client.socket.send(Message::Text(big.into())).await.unwrap();
    assert!(matches!(client.closed().await, Closed::Code(1009, _)));

    post_raw(&api, "/v1/broadcast", "\"still here\"").await;
    assert_eq!(bystander.event().await["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_answering_pings_is_closed() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.heartbeat_secs = 1).await;
    // A hand-made client that reads everything and answers nothing: pinged, then closed.
    let mut silent = raw::Conn::with_early(ws.addr, &[]).await;
    let welcome = silent.until(raw::TEXT).await;
    assert!(welcome.text().contains(r#""heartbeat":1"#));
    silent.until(raw::PING).await;
    let close = silent.until(raw::CLOSE).await;
    assert_eq!(
        (close.close_code(), &close.payload[2..]),
        (4002, &b"heartbeat timeout"[..])
    );

    // A client that reads (and so answers pings) stays connected past several heartbeats.
    let mut live = Client::connect(&ws).await;
    let mut pings = 0;
    while pings < 3 {
        match within("a ping", futures_util::StreamExt::next(&mut live.socket)).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    assert_eq!(
        live.request(json!({"op": "ping"})).await,
        json!({"op": "pong"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_on_the_websocket_endpoint_is_refused_clearly() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let response = reqwest::get(ws.url("/ws")).await.unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    let body: Value = response.json().await.unwrap();
    assert_eq!(error_code(&body), "websocket_required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_is_checked() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let ping = br#"{"op":"ping","id":1}"#;

    // Frames sent together with the handshake, and a request in two fragments, are read.
    let mut early = raw::frame(true, 0x1, ping, true);
    early.extend(raw::frame(false, 0x1, &ping[..5], true));
    early.extend(raw::frame(true, 0x0, &ping[5..], true));
    let mut conn = raw::Conn::with_early(ws.addr, &early).await;
    let welcome = conn.until(raw::TEXT).await;
    assert!(welcome.text().contains("welcome"));
    for _ in 0..2 {
        let pong = conn.until(raw::TEXT).await;
        assert_eq!(pong.payload, br#"{"op":"pong","id":1}"#);
    }
    // A WebSocket ping gets its pong.
    conn.send(&raw::frame(true, raw::PING, b"hi", true)).await;
    assert_eq!(conn.until(raw::PONG).await.payload, b"hi");

    // Broken frames close with the protocol's codes.
    for (bad, code) in [
        (raw::frame(true, 0x1, ping, false), 1002u16), // not masked
        (raw::frame(true, 0x1, &[0xff, 0xfe], true), 1007), // not UTF-8
        (raw::frame(true, 0x0, b"x", true), 1002),     // a continuation of nothing
    ] {
        let mut conn = raw::Conn::open(ws.addr).await;
        conn.send(&bad).await;
        assert_eq!(conn.until(raw::CLOSE).await.close_code(), code);
    }
}
