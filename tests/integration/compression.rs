//! permessage-deflate (RFC 7692) on the ws node, with a hand-made client: every negotiation
//! rule (what is accepted, what is declined, what the node answers), events compressed at
//! and above `FANOUT_COMPRESSION_MIN_BYTES` only, a small `server_max_window_bits` honoured,
//! the client's compressed messages inflated, and what breaks the extension's rules closed
//! with its code (a deflate bomb 1009, data that does not inflate 1007, RSV1 where it does not
//! belong 1002). Python's `websockets` and Chromium negotiate it in their own tests.

use std::io::Write;

use crate::common;

use common::{raw::*, *};
use serde_json::{Value, json};

/// The upgrade request with `extensions` offered (none: no header).
fn offering(extensions: Option<&str>) -> String {
    let mut request = upgrade("x", "/ws?user=zip");
    if let Some(offer) = extensions {
        request.truncate(request.len() - 2);
        request.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n\r\n"));
    }
    request
}

/// The `Sec-WebSocket-Extensions` of an answer's head, if any.
fn extension_of(head: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_string())
    })
}

/// A client message compressed as RFC 7692 says (raw deflate, the sync flush's tail off).
fn deflated(message: &[u8]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(message).unwrap();
    encoder.flush().unwrap();
    let mut out = encoder.get_ref().clone();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A compressed frame's message, inflated.
fn inflated(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut decoder = flate2::write::DeflateDecoder::new(&mut out);
    decoder.write_all(&input).unwrap();
    decoder.flush().unwrap();
    drop(decoder);
    out
}

/// The next event frame: whether it came compressed, and its JSON.
async fn event(conn: &mut Conn) -> (bool, Value) {
    loop {
        let frame = conn.until(TEXT).await;
        let text = match frame.rsv1 {
            true => inflated(&frame.payload),
            false => frame.payload.clone(),
        };
        let value: Value = serde_json::from_slice(&text).unwrap();
        if value["op"] == "event" {
            return (frame.rsv1, value);
        }
    }
}

/// A connection that negotiated `offer`, subscribed to `channel`.
async fn subscribed(ws: &Server, offer: &str, channel: &str) -> Conn {
    let (mut conn, head) = Conn::upgraded(ws.addr, &offering(Some(offer))).await;
    assert!(extension_of(&head).is_some(), "{head}");
    conn.until(TEXT).await; // welcome
    let subscribe = json!({"op": "subscribe", "channel": channel, "id": 1}).to_string();
    conn.send(&frame(true, TEXT, subscribe.as_bytes(), true))
        .await;
    loop {
        let frame = conn.until(TEXT).await;
        if frame.text().contains("subscribed") {
            return conn;
        }
    }
}

/// An event's data of about `bytes` bytes of JSON, compressible.
fn data_of(bytes: usize) -> Value {
    let rows: Vec<Value> = (0..bytes / 32)
        .map(|i| json!({"i": i, "name": format!("row {i}")}))
        .collect();
    json!({ "rows": rows })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_as_rfc_7692_says() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let off = start_ws(&nats, "ws-2", |c| {
        c.compression = fanout_ws::config::Compression::Off;
    })
    .await;
    let api = start_api(&nats).await;
    let base = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    // Negotiation: what each offer gets.
    let cases: [(Option<&str>, Option<String>); 9] = [
        (None, None),
        (Some("permessage-deflate"), Some(base.into())),
        (
            Some("permessage-deflate; client_max_window_bits"),
            Some(base.into()),
        ),
        (
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            Some(base.into()),
        ),
        (
            Some("permessage-deflate; server_max_window_bits=10"),
            Some(format!("{base}; server_max_window_bits=10")),
        ),
        // The first offer breaks a rule: the second is taken.
        (
            Some("permessage-deflate; foo=1, permessage-deflate"),
            Some(base.into()),
        ),
        (Some("permessage-deflate; server_max_window_bits=16"), None),
        (
            Some("permessage-deflate; client_no_context_takeover=yes"),
            None,
        ),
        (Some("x-webkit-deflate-frame"), None),
    ];
    for (offer, answer) in &cases {
        let (_, head) = Conn::upgraded(ws.addr, &offering(*offer)).await;
        assert_eq!(extension_of(&head), *answer, "{offer:?}: {head}");
    }
    let (_, head) = Conn::upgraded(off.addr, &offering(Some("permessage-deflate"))).await;
    assert_eq!(extension_of(&head), None, "FANOUT_COMPRESSION=off: {head}");

    // Events: under FANOUT_COMPRESSION_MIN_BYTES (256) as they are, above it compressed.
    let mut conn = subscribed(&ws, "permessage-deflate", "zip").await;
    let mut narrow = subscribed(&ws, "permessage-deflate; server_max_window_bits=10", "zip").await;
    for (bytes, compressed, narrowly) in
        [(20, false, false), (600, true, true), (4000, true, false)]
    {
        let data = data_of(bytes);
        publish(&api, "zip", &data).await;
        let (rsv1, got) = event(&mut conn).await;
        assert_eq!(got["data"], data, "{bytes} bytes");
        assert_eq!(rsv1, compressed, "{bytes} bytes");
        // A 1,024-byte window: a longer message goes uncompressed.
        let (rsv1, got) = event(&mut narrow).await;
        assert_eq!(got["data"], data, "{bytes} bytes, window 10");
        assert_eq!(rsv1, narrowly, "{bytes} bytes, window 10");
    }

    // The client's compressed messages are inflated, fragmented or not.
    let ping = br#"{"op":"ping","id":7}"#;
    conn.send(&frame_with(0xC1, &deflated(ping), Some(MASK)))
        .await;
    assert!(conn.until(TEXT).await.text().contains(r#""id":7"#));
    let big = json!({"op": "ping", "id": 8, "pad": "x".repeat(5000)}).to_string();
    let packed = deflated(big.as_bytes());
    let (first, rest) = packed.split_at(packed.len() / 2);
    conn.send(&frame_with(0x41, first, Some(MASK))).await;
    conn.send(&frame_with(0x80, rest, Some(MASK))).await;
    assert!(conn.until(TEXT).await.text().contains(r#""id":8"#));

    // Broken: each on a connection of its own, closed with its code.
    let bomb = deflated(&vec![b' '; 10 << 20]);
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("a deflate bomb", frame_with(0xC1, &bomb, Some(MASK)), 1009),
        (
            "data that does not inflate",
            frame_with(0xC1, b"\xff\xfe\xfd", Some(MASK)),
            1007,
        ),
        (
            "RSV1 on a continuation",
            [
                frame_with(0x41, &deflated(b"{"), Some(MASK)),
                frame_with(0xC0, b"x", Some(MASK)),
            ]
            .concat(),
            1002,
        ),
        ("RSV1 on a ping", frame_with(0xC9, b"", Some(MASK)), 1002),
        ("RSV2", frame_with(0xA1, b"{}", Some(MASK)), 1002),
    ];
    for (name, bytes, code) in cases {
        let (mut conn, _) = Conn::upgraded(ws.addr, &offering(Some("permessage-deflate"))).await;
        conn.until(TEXT).await;
        conn.send(&bytes).await;
        assert_eq!(conn.closed().await, Some(code), "{name}");
    }
    // Without the extension, RSV1 is a protocol error.
    let (mut plain, _) = Conn::upgraded(ws.addr, &offering(None)).await;
    plain.until(TEXT).await;
    plain
        .send(&frame_with(0xC1, &deflated(ping), Some(MASK)))
        .await;
    assert_eq!(
        plain.closed().await,
        Some(1002),
        "RSV1 without the extension"
    );
}

/// The football-match state of Centrifugo's test, re-created: a state object that changes a
/// few fields per message.
fn match_state(minute: u64) -> Value {
    let players = |side: &str| -> Vec<Value> {
        (1..=11)
            .map(|n| json!({"name": format!("{side} player {n}"), "number": n, "goals": 0, "cards": []}))
            .collect()
    };
    json!({
        "id": 42, "minute": minute, "score": {"home": minute / 30, "away": minute / 45},
        "home": {"name": "Home United", "players": players("Home")},
        "away": {"name": "Away City", "players": players("Away")},
    })
}

/// Deltas (`"delta":"fossil"`) where `FANOUT_DELTA_CHANNELS` allows them: the reply says so;
/// the first event comes whole (its data as published, as a string), the next as fossil
/// deltas of the one before, which the fossil-delta crate applies back to each event's data;
/// a resume starts whole again; a channel that does not allow deltas gets plain events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fossil_deltas_where_the_channel_allows_them() {
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.delta_channels = "scores:*".into()).await;
    let api = start_api(&nats).await;
    let mut client = Client::connect(&ws).await;
    let reply = client
        .request(json!({"op": "subscribe", "channel": "scores:final", "delta": "fossil", "id": 1}))
        .await;
    assert_eq!(reply["delta"], "fossil", "{reply}");
    let reply = client
        .request(json!({"op": "subscribe", "channel": "chat", "delta": "fossil", "id": 2}))
        .await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    assert!(reply.get("delta").is_none(), "{reply}");
    let bad = client
        .request(json!({"op": "subscribe", "channel": "scores:x", "delta": "xdelta", "id": 3}))
        .await;
    assert_eq!(bad["code"], "invalid_request", "{bad}");

    let mut base: Vec<u8> = Vec::new();
    let mut last = 0;
    for minute in 0..6 {
        let data = match_state(minute * 10);
        let seq = publish(&api, "scores:final", &data).await;
        let event = client.event().await;
        assert_eq!(event["seq"], seq, "{event}");
        let text = event["data"]
            .as_str()
            .expect("a string")
            .as_bytes()
            .to_vec();
        base = match event["delta"].as_bool() {
            Some(false) => {
                assert_eq!(minute, 0, "only the first is whole: {event}");
                text
            }
            Some(true) => {
                assert!(
                    text.len() < serde_json::to_vec(&data).unwrap().len() / 4,
                    "{event}"
                );
                fossil_delta::apply(&base, &text).expect("a fossil delta")
            }
            None => panic!("no \"delta\": {event}"),
        };
        assert_eq!(serde_json::from_slice::<Value>(&base).unwrap(), data);
        last = seq;
    }
    // A channel without deltas: plain events.
    publish(&api, "chat", &json!({"hi": 1})).await;
    let event = client.event().await;
    assert_eq!(event["data"], json!({"hi": 1}), "{event}");
    assert!(event.get("delta").is_none(), "{event}");

    // A resume: the replayed event whole, then deltas from it.
    let mut again = Client::connect(&ws).await;
    let missed = publish(&api, "scores:final", &match_state(70)).await;
    let reply = again
        .request(
            json!({"op": "subscribe", "channel": "scores:final", "delta": "fossil",
            "since": last, "id": 1}),
        )
        .await;
    assert_eq!(reply["delta"], "fossil", "{reply}");
    // The missed event comes by the replay (a plain frame) or, racing the subscribe, live
    // (whole): never as a delta. Every event rebuilds; a delta follows at the latest after
    // one whole event.
    let mut base: Option<Vec<u8>> = None;
    let mut kinds = Vec::new();
    for (minute, published) in [(70, Some(missed)), (80, None), (90, None)] {
        if published.is_none() {
            publish(&api, "scores:final", &match_state(minute)).await;
        }
        let event = again.event().await;
        let data = match event["delta"].as_bool() {
            None => {
                base = None;
                event["data"].clone()
            }
            Some(delta) => {
                let text = event["data"].as_str().expect("a string").as_bytes();
                let bytes = match delta {
                    false => text.to_vec(),
                    true => fossil_delta::apply(base.as_ref().expect("a base"), text)
                        .expect("a fossil delta"),
                };
                base = Some(bytes.clone());
                serde_json::from_slice(&bytes).unwrap()
            }
        };
        assert_eq!(data, match_state(minute), "{event}");
        kinds.push(event["delta"].clone());
    }
    assert_ne!(
        kinds[0], true,
        "the first after a resume is not a delta: {kinds:?}"
    );
    assert_eq!(kinds[2], true, "{kinds:?}");
}

/// A long-poll's answer honours `Accept-Encoding`: gzip when asked, as it is when not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answer_is_compressed_when_the_client_accepts_it() {
    use std::io::Read;
    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |_| {}).await;
    let api = start_api(&nats).await;
    let (_, first) = poll(&ws, "channel=zip&timeout=0").await;
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let data = data_of(4000);
    publish(&api, "zip", &data).await;
    // The same cursor twice: a poll is stateless, both answers hold the event.
    let url = ws.url(&format!("/poll?channel=zip&cursor={cursor}&timeout=5"));
    let get = |encoding: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut request = reqwest::Client::new().get(url);
            if let Some(encoding) = encoding {
                request = request.header("accept-encoding", encoding);
            }
            let answer = request.send().await.unwrap();
            let encoding = answer
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap().to_string());
            (
                answer.status().as_u16(),
                encoding,
                answer.bytes().await.unwrap(),
            )
        }
    };
    let (status, encoding, plain) = get(None).await;
    assert_eq!((status, encoding), (200, None));
    let (status, encoding, gzipped) = get(Some("gzip")).await;
    assert_eq!((status, encoding.as_deref()), (200, Some("gzip")));
    assert!(
        gzipped.len() < plain.len() / 3,
        "{} of {}",
        gzipped.len(),
        plain.len()
    );
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_end(&mut text)
        .unwrap();
    let plain: Value = serde_json::from_slice(&plain).unwrap();
    let unzipped: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(plain["events"], unzipped["events"]);
    assert_eq!(unzipped["events"][0]["data"], data, "{unzipped}");
}
