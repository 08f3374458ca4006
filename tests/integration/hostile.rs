//! Clients that try to make a ws node hold memory or sockets: frames started and never
//! finished (`FANOUT_FRAME_TIMEOUT_MS`, 1008), many such connections together
//! (`FANOUT_MAX_BUFFERED_BYTES`, 1013 to the one asking for more, never to the others), and
//! HTTP requests whose head never ends (`FANOUT_HANDSHAKE_TIMEOUT_MS`).

use crate::common;

use common::{raw::*, *};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The start of a text frame announcing `len` bytes, with `sent` of them.
fn unfinished(len: usize, sent: usize) -> Vec<u8> {
    let mut bytes = frame(true, TEXT, &vec![b'x'; len], true);
    let header = bytes.len() - len;
    bytes.truncate(header + sent);
    bytes
}

async fn buffered_bytes(ws: &Server) -> u64 {
    metric(ws, "fanout_ws_buffered_bytes")
        .await
        .expect("fanout_ws_buffered_bytes in /metrics") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_started_and_never_finished_is_closed_with_1008() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.frame_timeout_ms = 300).await;
    // A header and a part of the payload; then nothing.
    let mut stalled = Conn::open(ws.addr).await;
    stalled.send(&unfinished(1000, 10)).await;
    // Only a header.
    let mut header_only = Conn::open(ws.addr).await;
    header_only.send(&unfinished(60_000, 0)[..4]).await;
    // A fragmented message whose frames each complete, but never its last, with pings in
    // between that answer promptly: the message as a whole must finish in time.
    let mut fragments = Conn::open(ws.addr).await;
    fragments.send(&frame(false, TEXT, b"{\"op\":", true)).await;
    fragments.send(&frame(true, PING, b"", true)).await;
    fragments.until(PONG).await;
    for conn in [&mut stalled, &mut header_only, &mut fragments] {
        assert_eq!(conn.closed().await, Some(1008));
    }
    // Whole messages, however many, are no stall.
    let mut busy = Conn::open(ws.addr).await;
    for id in 0..20 {
        let ping = format!(r#"{{"op":"ping","id":{id}}}"#);
        let bytes = frame(true, TEXT, ping.as_bytes(), true);
        // Split every request across two writes.
        busy.send(&bytes[..5]).await;
        busy.send(&bytes[5..]).await;
        assert!(busy.until(TEXT).await.text().contains("pong"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_holding_memory_are_refused_past_the_budget_and_others_go_on() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    const BUDGET: usize = 1 << 20;
    let ws = start_ws(&nats, "ws-1", |c| {
        c.max_buffered_bytes = BUDGET;
        // Long enough that only the budget closes anyone here.
        c.frame_timeout_ms = 600_000;
    })
    .await;
    let mut bystander = Client::connect(&ws).await;
    bystander.subscribe("news").await;

    // Each holds an almost complete 60,000-byte frame: 17 fit in 1 MiB.
    let mut hostile = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        let before = buffered_bytes(&ws).await;
        let mut conn = Conn::open(ws.addr).await;
        conn.send(&unfinished(60_000, 59_000)).await;
        // Either the node holds this one's bytes too, or it closed it for asking.
        let held = async {
            while buffered_bytes(&ws).await < before + 59_000 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            _ = within("the node to hold the bytes", held) => hostile.push(conn),
            frame = conn.next() => {
                let frame = frame.expect("a close frame before the socket closes");
                assert_eq!((frame.opcode, frame.close_code()), (CLOSE, 1013), "{}", frame.text());
                refused += 1;
            }
        }
        assert!(buffered_bytes(&ws).await <= BUDGET as u64);
    }
    println!(
        "held: {} connections, refused with 1013: {refused}",
        hostile.len()
    );
    assert!((10..=17).contains(&hostile.len()), "{} held", hostile.len());
    assert_eq!(refused, 40 - hostile.len());

    // Nobody else is touched: the bystander gets events, and a new client gets in and works.
    publish(&api, "news", &json!("still here")).await;
    assert_eq!(bystander.event().await["data"], "still here");
    let mut newcomer = Client::connect(&ws).await;
    assert_eq!(
        newcomer.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
    // When they go, so does what they held.
    drop(hostile);
    eventually("the budget to be given back", || async {
        buffered_bytes(&ws).await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_whose_head_never_ends_is_dropped() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.handshake_timeout_ms = 300).await;
    for sent in [
        &b""[..],
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(ws.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let mut rest = Vec::new();
        // The node closes the socket (an answer, if any, is a 408).
        within(
            "the node to drop the connection",
            stream.read_to_end(&mut rest),
        )
        .await
        .ok();
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }
    // A prompt client is served.
    let mut client = Client::connect(&ws).await;
    assert_eq!(
        client.request(json!({"op": "ping", "id": 1})).await["op"],
        "pong"
    );
}
