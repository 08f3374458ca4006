//! Bad input, over HTTP and WebSocket: every case gets a clear error, and nothing else is
//! disturbed.

mod common;

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

    let cases: [(&str, &str, Value); 9] = [
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
    let (mut silent, mut buf) = raw::connect(ws.addr, &[]).await;
    let welcome = raw::until(&mut silent, &mut buf, 0x1).await;
    assert!(String::from_utf8_lossy(&welcome).contains(r#""heartbeat":1"#));
    raw::until(&mut silent, &mut buf, 0x9).await;
    let close = raw::until(&mut silent, &mut buf, 0x8).await;
    assert_eq!(
        (u16::from_be_bytes([close[0], close[1]]), &close[2..]),
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

/// A WebSocket client by hand, to send what a library would refuse to.
mod raw {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    pub const HANDSHAKE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// A client frame, masked (or not).
    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [7, 1, 9, 3];
        let mut out = vec![if fin { 0x80 | opcode } else { opcode }];
        out.push(if masked { 0x80 } else { 0 } | payload.len() as u8);
        if masked {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// Reads server frames until one of `opcode` arrives (bounded by `WAIT`); returns its
    /// payload. Frames of other opcodes are skipped.
    pub async fn until(stream: &mut TcpStream, buf: &mut Vec<u8>, opcode: u8) -> Vec<u8> {
        super::within(&format!("a frame with opcode {opcode:#x}"), async {
            loop {
                while buf.len() >= 2 {
                    let (len, header) = match buf[1] {
                        126 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                        n => (n as usize, 2),
                    };
                    if buf.len() < header + len {
                        break;
                    }
                    let (op, payload) = (buf[0] & 0x0F, buf[header..header + len].to_vec());
                    buf.drain(..header + len);
                    if op == opcode {
                        return payload;
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before a frame with opcode {opcode}");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
    }

    /// Connects, sending `after` in the same write as the handshake; returns the socket and
    /// what came after the 101 response.
    pub async fn connect(addr: std::net::SocketAddr, after: &[u8]) -> (TcpStream, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = HANDSHAKE.as_bytes().to_vec();
        request.extend_from_slice(after);
        stream.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = super::within("the handshake's answer", stream.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "closed before answering the handshake: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(buf.starts_with(b"HTTP/1.1 101"));
                buf.drain(..end + 4);
                return (stream, buf);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_is_checked() {
    use tokio::io::AsyncWriteExt;
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let ping = br#"{"op":"ping","id":1}"#;

    // Frames sent together with the handshake, and a request in two fragments, are read.
    let mut early = raw::frame(true, 0x1, ping, true);
    early.extend(raw::frame(false, 0x1, &ping[..5], true));
    early.extend(raw::frame(true, 0x0, &ping[5..], true));
    let (mut stream, mut buf) = raw::connect(ws.addr, &early).await;
    let welcome = raw::until(&mut stream, &mut buf, 0x1).await;
    assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
    for _ in 0..2 {
        let pong = raw::until(&mut stream, &mut buf, 0x1).await;
        assert_eq!(pong, br#"{"op":"pong","id":1}"#);
    }
    // A WebSocket ping gets its pong.
    stream
        .write_all(&raw::frame(true, 0x9, b"hi", true))
        .await
        .unwrap();
    assert_eq!(raw::until(&mut stream, &mut buf, 0xA).await, b"hi");

    // Broken frames close with the protocol's codes.
    for (bad, code) in [
        (raw::frame(true, 0x1, ping, false), 1002u16), // not masked
        (raw::frame(true, 0x1, &[0xff, 0xfe], true), 1007), // not UTF-8
        (raw::frame(true, 0x0, b"x", true), 1002),     // a continuation of nothing
    ] {
        let (mut stream, mut buf) = raw::connect(ws.addr, &[]).await;
        raw::until(&mut stream, &mut buf, 0x1).await; // welcome
        stream.write_all(&bad).await.unwrap();
        let close = raw::until(&mut stream, &mut buf, 0x8).await;
        assert_eq!(u16::from_be_bytes([close[0], close[1]]), code);
    }
}
