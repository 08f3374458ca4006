//! WebTransport (`FANOUT_WEBTRANSPORT_LISTEN`): a session at `https://<node>/wt`, found through
//! discovery (`GET /v1/nodes`: its URL and its self-signed certificate's hash), carries the
//! protocol's frames, each preceded by its length as a QUIC varint, on one bidirectional
//! stream; the same event bytes as WebSocket; resumes like every transport; closes with the
//! protocol's close codes, which the client reads (CLOSE_WEBTRANSPORT_SESSION); volatile
//! events come as datagrams (on the stream when too large for one); the `fanout.msgpack`
//! subprotocol carries MessagePack frames and bytes as bin. The client is
//! web-transport-quinn's (the browser test drives Chromium's).

use crate::common;

use bytes::{Buf, BufMut, BytesMut};
use common::*;
use serde_json::{Value, json};
use web_transport_quinn::{ClientBuilder, RecvStream, SendStream, Session};

/// Where a node takes sessions, as discovery says: its URL and its certificate's hashes.
async fn discovered(api: &Server, node: &str) -> (url::Url, Vec<Vec<u8>>) {
    let (url, hashes) = webtransport_of(api, node).await;
    let bytes = |h: &str| -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    (
        url.parse().unwrap(),
        hashes.iter().map(|h| bytes(h)).collect(),
    )
}

/// A tier of one node with WebTransport on (and `configure`'s settings), its listener as
/// discovery announces it.
struct WtTier {
    _nats: NatsServer,
    api: Server,
    node: Server,
    url: url::Url,
    hashes: Vec<Vec<u8>>,
}

async fn wt_tier(configure: impl FnOnce(&mut fanout_ws::Config)) -> WtTier {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let node = start_ws(&nats, "ws-1", |c| {
        c.webtransport_listen = "127.0.0.1:0".into();
        configure(c);
    })
    .await;
    let (url, hashes) = discovered(&api, "ws-1").await;
    WtTier {
        _nats: nats,
        api,
        node,
        url,
        hashes,
    }
}

/// A client of the protocol over one WebTransport session.
struct WtClient {
    session: Session,
    send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
    welcome: Value,
}

impl WtClient {
    async fn connect(url: &url::Url, hashes: &[Vec<u8>], query: &str) -> WtClient {
        WtClient::offering(url, hashes, query, &[]).await
    }

    /// A session whose CONNECT offers `protocols` (`WT-Available-Protocols`).
    async fn offering(
        url: &url::Url,
        hashes: &[Vec<u8>],
        query: &str,
        protocols: &[&str],
    ) -> WtClient {
        let client = ClientBuilder::new()
            .with_server_certificate_hashes(hashes.to_vec())
            .unwrap();
        let mut url = url.clone();
        url.set_query(Some(query));
        let request = web_transport_quinn::proto::ConnectRequest::new(url)
            .with_protocols(protocols.iter().map(|p| p.to_string()));
        let session = within("a WebTransport session", client.connect(request))
            .await
            .unwrap();
        let (send, recv) = session.open_bi().await.unwrap();
        let mut client = WtClient {
            session,
            send,
            recv,
            buf: BytesMut::new(),
            welcome: Value::Null,
        };
        // A QUIC stream exists for the server once bytes travel on it: an empty frame.
        client.send.write_all(&[0]).await.unwrap();
        if !protocols.is_empty() {
            return client;
        }
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["op"], "welcome", "{}", client.welcome);
        client
    }

    async fn send(&mut self, frame: Value) {
        self.send_bytes(frame.to_string().as_bytes()).await;
    }

    /// One frame of `payload` (JSON text or MessagePack).
    async fn send_bytes(&mut self, payload: &[u8]) {
        let mut out = BytesMut::new();
        fanout_ws::transport::webtransport::put_varint(&mut out, payload.len() as u64);
        out.put_slice(payload);
        self.send.write_all(&out).await.unwrap();
    }

    /// The next frame's JSON text, as sent.
    async fn recv_text(&mut self) -> String {
        String::from_utf8(self.recv_frame().await).unwrap()
    }

    /// The next frame's payload, as sent.
    async fn recv_frame(&mut self) -> Vec<u8> {
        within("a WebTransport frame", async {
            loop {
                if let Some((len, header)) =
                    fanout_ws::transport::webtransport::read_varint(&self.buf)
                    && self.buf.len() >= header + len as usize
                {
                    self.buf.advance(header);
                    return self.buf.split_to(len as usize).to_vec();
                }
                let chunk = self.recv.read_chunk(4096, true).await.unwrap();
                self.buf
                    .extend_from_slice(&chunk.expect("the stream ended").bytes);
            }
        })
        .await
    }

    async fn recv(&mut self) -> Value {
        serde_json::from_str(&self.recv_text().await).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webtransport_session_gets_what_websocket_gets_and_resumes_anywhere() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let wt = |c: &mut fanout_ws::Config| c.webtransport_listen = "127.0.0.1:0".into();
    let ws1 = start_ws(&nats, "ws-1", wt).await;
    let ws2 = start_ws(&nats, "ws-2", wt).await;
    let (url, hashes) = discovered(&api, "ws-1").await;
    assert_eq!(url.path(), "/wt");
    assert_eq!(hashes.len(), 1);
    assert_eq!(hashes[0].len(), 32, "a SHA-256");

    let mut wt_client = WtClient::connect(&url, &hashes, "user=ada").await;
    assert_eq!(wt_client.welcome["user"], "ada");
    assert_eq!(wt_client.welcome["node"], "ws-1");
    wt_client
        .send(json!({"op": "subscribe", "channel": "news", "id": 1}))
        .await;
    let reply = wt_client.recv().await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    let mut ws_client = Client::connect(&ws2).await;
    ws_client.subscribe("news").await;

    // The same event, byte for byte, on both transports.
    let seq = publish(
        &api,
        "news",
        &json!({"headline": "WebTransport", "n": [1, 2.5]}),
    )
    .await;
    let over_wt = wt_client.recv_text().await;
    let over_ws = ws_client.event().await;
    assert_eq!(serde_json::from_str::<Value>(&over_wt).unwrap(), over_ws);
    assert_eq!(over_ws["seq"], seq);

    // Requests and their replies.
    wt_client.send(json!({"op": "ping", "id": 2})).await;
    assert_eq!(wt_client.recv().await["op"], "pong");

    // Resumed on another node and transport: nothing missed.
    drop(wt_client);
    let missed = publish(&api, "news", &json!("while away")).await;
    let mut back = Client::connect(&ws2).await;
    let reply = back
        .request(
            json!({"op": "subscribe", "channel": "news", "since": seq, "id": 1,
                        "epoch": back.welcome["epoch"].clone()}),
        )
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(back.event().await["seq"], missed);

    // And from WebSocket back to WebTransport, on the other node.
    let later = publish(&api, "news", &json!("later")).await;
    let (url2, hashes2) = discovered(&api, "ws-2").await;
    let mut again = WtClient::connect(&url2, &hashes2, "user=ada").await;
    again
        .send(
            json!({"op": "subscribe", "channel": "news", "since": missed, "id": 1,
                     "epoch": again.welcome["epoch"].clone()}),
        )
        .await;
    let reply = again.recv().await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(again.recv().await["seq"], later);
    drop(ws1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_the_session_with_a_code_and_reason() {
    let tier = wt_tier(|c| c.max_message_bytes = 1024).await;
    let (url, hashes) = (tier.url.clone(), tier.hashes.clone());

    // Malformed JSON: an error frame, and the session goes on.
    let mut client = WtClient::connect(&url, &hashes, "user=ada").await;
    let mut out = BytesMut::new();
    fanout_ws::transport::webtransport::put_varint(&mut out, 5);
    out.put_slice(b"nope!");
    client.send.write_all(&out).await.unwrap();
    let error = client.recv().await;
    assert_eq!(error["op"], "error", "{error}");
    assert_eq!(error["code"], "invalid_json", "{error}");

    // A frame over FANOUT_MAX_MESSAGE_BYTES: closed with 1009 and its reason.
    let mut out = BytesMut::new();
    fanout_ws::transport::webtransport::put_varint(&mut out, 4096);
    client.send.write_all(&out).await.unwrap();
    let closed = within("the session to close", client.session.closed()).await;
    match closed {
        web_transport_quinn::SessionError::WebTransportError(
            web_transport_quinn::WebTransportError::Closed(code, reason),
        ) => {
            assert_eq!(code, 1009);
            assert!(!reason.is_empty());
        }
        other => panic!("closed without a code: {other:?}"),
    }

    // Another path: refused (404) before any session.
    let mut elsewhere = url.clone();
    elsewhere.set_path("/ws");
    let client = ClientBuilder::new()
        .with_server_certificate_hashes(hashes.clone())
        .unwrap();
    assert!(
        within("a refusal", client.connect(elsewhere))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volatile_events_come_as_datagrams_and_on_the_stream_when_too_large() {
    let tier = wt_tier(|_| {}).await;
    let (url, hashes) = (tier.url.clone(), tier.hashes.clone());
    let mut client = WtClient::connect(&url, &hashes, "user=ada").await;
    client
        .send(json!({"op": "subscribe", "channel": "lobby", "id": 1}))
        .await;
    assert_eq!(client.recv().await["op"], "subscribed");

    let position = json!({"x": 10, "y": 20});
    let (status, answer) = post_raw(
        &tier.api,
        "/v1/channels/lobby/volatile",
        position.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let datagram = within("a datagram", client.session.read_datagram())
        .await
        .unwrap();
    let frame: Value = serde_json::from_slice(&datagram).unwrap();
    assert_eq!(frame["volatile"], true, "{frame}");
    assert_eq!(frame["data"], position);
    assert_eq!(frame["id"], answer["id"]);

    // Larger than a datagram: the same frame on the stream.
    let big = json!({"blob": "x".repeat(4000)});
    let (status, answer) =
        post_raw(&tier.api, "/v1/channels/lobby/volatile", big.to_string()).await;
    assert_eq!(status, 202, "{answer}");
    let frame = client.recv().await;
    assert_eq!(frame["volatile"], true);
    assert_eq!(frame["data"], big);
    assert_eq!(frame["id"], answer["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_closes_its_sessions_with_1001() {
    let WtTier {
        _nats,
        api: _api,
        node: ws,
        url,
        hashes,
    } = wt_tier(|c| c.drain_window_ms = 0).await;
    let client = WtClient::connect(&url, &hashes, "user=ada").await;
    // SIGTERM's path: the node drains, closing every connection with 1001.
    let stopping = tokio::spawn(ws.stop());
    match within("the session to close", client.session.closed()).await {
        web_transport_quinn::SessionError::WebTransportError(
            web_transport_quinn::WebTransportError::Closed(code, reason),
        ) => {
            assert_eq!(code, 1001);
            assert!(!reason.is_empty());
        }
        other => panic!("closed without a code: {other:?}"),
    }
    within("the node to stop", stopping).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_refused_as_websockets_are() {
    let tier = wt_tier(|c| {
        c.auth = fanout_ws::config::AuthMode::Jwt;
        c.jwt_secret = "a-secret-of-at-least-32-bytes-long!!".into();
        c.allowed_origins = "https://app.example".into();
    })
    .await;
    let (url, hashes) = (tier.url.clone(), tier.hashes.clone());
    let client = ClientBuilder::new()
        .with_server_certificate_hashes(hashes.clone())
        .unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "ada", "exp": 4_000_000_000u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"a-secret-of-at-least-32-bytes-long!!"),
    )
    .unwrap();
    let request = |query: &str, origin: &str| {
        let mut url = url.clone();
        url.set_query(Some(query));
        let mut request = web_transport_quinn::proto::ConnectRequest::new(url);
        request.headers.insert("origin", origin.parse().unwrap());
        request
    };
    // A valid token from an allowed origin: a session.
    let good = format!("token={token}");
    let session = within(
        "a session",
        client.connect(request(&good, "https://app.example")),
    )
    .await
    .expect("a valid token from an allowed origin is accepted");
    drop(session);
    // No token (401), a bad one (401), a foreign origin (403): no session.
    for (query, origin) in [
        ("user=ada", "https://app.example"),
        ("token=not-a-jwt", "https://app.example"),
        (good.as_str(), "https://evil.example"),
    ] {
        let refused = within("a refusal", client.connect(request(query, origin))).await;
        assert!(refused.is_err(), "{query} from {origin}: a session");
    }
}

/// A MessagePack frame (rmpv's), decoded.
fn unpack(payload: &[u8]) -> rmpv::Value {
    let mut rest = payload;
    let value = rmpv::decode::read_value(&mut rest).unwrap();
    assert!(rest.is_empty(), "one value per frame");
    value
}

/// A field of a MessagePack map.
fn field<'a>(map: &'a rmpv::Value, name: &str) -> Option<&'a rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

fn pack(value: rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &value).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_sessions_get_bytes_as_bin_on_the_stream_and_in_datagrams() {
    let tier = wt_tier(|_| {}).await;
    let (url, hashes) = (tier.url.clone(), tier.hashes.clone());
    let mut packed =
        WtClient::offering(&url, &hashes, "user=ada", &["x-other", "fanout.msgpack"]).await;
    assert_eq!(packed.session.protocol(), Some("fanout.msgpack"));
    let welcome = unpack(&packed.recv_frame().await);
    assert_eq!(
        field(&welcome, "op").and_then(|v| v.as_str()),
        Some("welcome")
    );
    let subscribe = |id: u64| {
        pack(rmpv::Value::Map(vec![
            ("op".into(), "subscribe".into()),
            ("channel".into(), "bin".into()),
            ("id".into(), id.into()),
        ]))
    };
    packed.send_bytes(&subscribe(1)).await;
    let reply = unpack(&packed.recv_frame().await);
    assert_eq!(
        field(&reply, "op").and_then(|v| v.as_str()),
        Some("subscribed")
    );
    // A JSON session on the same channel, and one that offers a protocol the node lacks.
    let mut json_client = WtClient::connect(&url, &hashes, "user=bo").await;
    json_client
        .send(json!({"op": "subscribe", "channel": "bin", "id": 1}))
        .await;
    assert_eq!(json_client.recv().await["op"], "subscribed");
    let other = WtClient::offering(&url, &hashes, "user=cy", &["x-other"]).await;
    assert_eq!(other.session.protocol(), None);

    // Stored bytes: bin for MessagePack, base64 for JSON.
    let bytes: Vec<u8> = (0..=255).collect();
    let (status, answer) = post_bytes(&tier.api, "/v1/channels/bin/events", bytes.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let event = unpack(&packed.recv_frame().await);
    assert_eq!(
        field(&event, "data").and_then(|v| v.as_slice()),
        Some(&bytes[..])
    );
    assert_eq!(field(&event, "encoding"), None);
    assert_eq!(
        field(&event, "seq").and_then(|v| v.as_u64()),
        answer["seq"].as_u64()
    );
    let event = json_client.recv().await;
    assert_eq!(event["encoding"], "base64", "{event}");
    assert_eq!(event["seq"], answer["seq"]);
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(event["data"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, bytes);

    // Volatile bytes: a datagram holding one MessagePack frame.
    let (status, answer) =
        post_bytes(&tier.api, "/v1/channels/bin/volatile", vec![7u8, 0, 7]).await;
    assert_eq!(status, 202, "{answer}");
    let datagram = within("a datagram", packed.session.read_datagram())
        .await
        .unwrap();
    let event = unpack(&datagram);
    assert_eq!(
        field(&event, "volatile").and_then(|v| v.as_bool()),
        Some(true)
    );
    assert_eq!(
        field(&event, "data").and_then(|v| v.as_slice()),
        Some(&[7u8, 0, 7][..])
    );
    assert_eq!(
        field(&event, "id").and_then(|v| v.as_str()),
        answer["id"].as_str()
    );

    // A MessagePack client publishes bin; the JSON client gets base64.
    packed
        .send_bytes(&pack(rmpv::Value::Map(vec![
            ("op".into(), "publish".into()),
            ("channel".into(), "bin".into()),
            ("data".into(), rmpv::Value::Binary(vec![1, 2, 3])),
        ])))
        .await;
    let event = loop {
        let frame = json_client.recv().await;
        if frame["op"] == "event" && frame["volatile"].is_null() {
            break frame;
        }
    };
    assert_eq!(event["data"], "AQID", "{event}");

    // A frame that is not MessagePack: an error frame, and the session goes on.
    packed.send_bytes(b"\xc1").await;
    let error = loop {
        let frame = unpack(&packed.recv_frame().await);
        if field(&frame, "op").and_then(|v| v.as_str()) == Some("error") {
            break frame;
        }
    };
    assert_eq!(
        field(&error, "code").and_then(|v| v.as_str()),
        Some("invalid_json")
    );
    packed.send_bytes(&subscribe(9)).await;
    loop {
        let frame = unpack(&packed.recv_frame().await);
        if field(&frame, "id").and_then(|v| v.as_u64()) == Some(9) {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_subscribes_and_disconnects_a_webtransport_session() {
    use crate::control::{call, until_complete};
    let WtTier {
        _nats,
        api,
        node: _node,
        url,
        hashes,
    } = wt_tier(|_| {}).await;
    let mut client = WtClient::connect(&url, &hashes, "user=ada").await;
    until_complete(&api).await;
    let (_, listed) = call(&api, "GET", "/v1/users/ada/connections", None).await;
    assert_eq!(
        listed["connections"][0]["transport"], "webtransport",
        "{listed}"
    );
    let (_, answer) = call(
        &api,
        "POST",
        "/v1/users/ada/subscribe",
        Some(json!({"channel": "news"})),
    )
    .await;
    assert_eq!(answer["subscribed"], 1, "{answer}");
    let frame = client.recv().await;
    assert_eq!(
        (frame["op"].as_str(), frame["channel"].as_str()),
        (Some("subscribed"), Some("news"))
    );
    let seq = publish(&api, "news", &json!({"n": 1})).await;
    let event = client.recv().await;
    assert_eq!(event["seq"], seq, "{event}");
    call(
        &api,
        "POST",
        "/v1/users/ada/disconnect",
        Some(json!({"reconnect": false, "reason": "bye"})),
    )
    .await;
    match within("the session to close", client.session.closed()).await {
        web_transport_quinn::SessionError::WebTransportError(
            web_transport_quinn::WebTransportError::Closed(code, reason),
        ) => assert_eq!((code, reason.as_str()), (4500, "bye")),
        other => panic!("closed without a code: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_hooks_answer_a_webtransport_session() {
    use crate::proxy::{Backend, hooks};
    let backend = Backend::default();
    let base = backend.start().await;
    let tier = wt_tier(hooks(&base)).await;
    let mut client = WtClient::connect(&tier.url, &tier.hashes, "user=ada").await;
    assert_eq!(client.welcome["user"], "ada");
    assert_eq!(backend.asked("connect")[0]["transport"], "webtransport");
    let frame = client.recv().await;
    assert_eq!(
        (frame["op"].as_str(), frame["channel"].as_str()),
        (Some("subscribed"), Some("inbox:ada"))
    );
    client
        .send(json!({"op": "rpc", "method": "echo", "data": [1, 2], "id": 1}))
        .await;
    let reply = client.recv().await;
    assert_eq!(
        reply,
        json!({"op": "rpc", "id": 1, "result": {"echo": [1, 2], "user": "ada"}})
    );
    // Refused by the app: no session.
    let refused = within(
        "a refusal",
        ClientBuilder::new()
            .with_server_certificate_hashes(tier.hashes.clone())
            .unwrap()
            .connect({
                let mut url = tier.url.clone();
                url.set_query(Some("user=refused"));
                web_transport_quinn::proto::ConnectRequest::new(url)
            }),
    )
    .await;
    assert!(refused.is_err(), "the app refused, yet a session");
}
