//! WebTransport in real headless Chromium (Debian's, over WebDriver), with the browser's own
//! `WebTransport` API: a page connects to a ws node process with the certificate hash the node
//! announces (`serverCertificateHashes`), gets byte for byte the event frame a raw WebSocket
//! client gets, receives volatile events as datagrams, survives `kill -9` of its node by
//! resuming on the other node with nothing missed, and reads a close code and reason from
//! `WebTransport.closed`. Then the demo page, whose fanout.js takes WebTransport first where the
//! node offers it, connects over it and shows the events the API publishes.

mod common;

use std::time::Duration;

use common::{browser::*, *};
use fanout_testkit::raw;
use serde_json::{Value, json};

/// The page's WebTransport client: `window.wt.open(name, url, hashHex)` connects, opens the
/// stream, keeps every frame's text in `window.wt.frames[name]`; `send(name, frame)` writes
/// one; `closed[name]` says how the session ended.
const CLIENT: &str = r#"
window.wt = window.wt ?? {
  frames: {}, datagrams: {}, closed: {}, sessions: {}, writers: {},
  varint(n) {
    if (n < 64) return [n];
    if (n < 16384) return [0x40 | (n >> 8), n & 0xff];
    return [0x80 | (n >>> 24), (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff];
  },
  async open(name, url, hashHex) {
    const value = new Uint8Array(hashHex.match(/../g).map((h) => parseInt(h, 16)));
    const session = new WebTransport(url, { serverCertificateHashes: [{ algorithm: "sha-256", value }] });
    this.sessions[name] = session;
    this.frames[name] = [];
    session.closed.then(
      (info) => { this.closed[name] = { code: info.closeCode, reason: info.reason }; },
      (error) => { this.closed[name] = { error: String(error) }; });
    await session.ready;
    this.datagrams[name] = [];
    const datagrams = session.datagrams.readable.getReader();
    (async () => {
      for (;;) {
        const { value, done } = await datagrams.read();
        if (done) return;
        this.datagrams[name].push(new TextDecoder().decode(value));
      }
    })().catch(() => {});
    const stream = await session.createBidirectionalStream();
    this.writers[name] = stream.writable.getWriter();
    await this.writers[name].write(new Uint8Array([0])); // the stream reaches the node with its first bytes
    const reader = stream.readable.getReader();
    (async () => {
      let buf = new Uint8Array(0);
      const decoder = new TextDecoder();
      for (;;) {
        const { value: chunk, done } = await reader.read();
        if (done) return;
        const joined = new Uint8Array(buf.length + chunk.length);
        joined.set(buf); joined.set(chunk, buf.length); buf = joined;
        for (;;) {
          if (buf.length === 0) break;
          const len = 1 << (buf[0] >> 6);
          if (buf.length < len) break;
          let n = buf[0] & 0x3f;
          for (let i = 1; i < len; i++) n = n * 256 + buf[i];
          if (buf.length < len + n) break;
          this.frames[name].push(decoder.decode(buf.subarray(len, len + n)));
          buf = buf.slice(len + n);
        }
      }
    })().catch(() => {});
  },
  async send(name, frame) {
    const bytes = new TextEncoder().encode(JSON.stringify(frame));
    await this.writers[name].write(new Uint8Array([...this.varint(bytes.length), ...bytes]));
  },
};
"#;

/// The frames tab has received on `name`, as text.
async fn frames(tab: &Tab<'_>, name: &str) -> Vec<String> {
    let v = tab
        .eval(&format!("return window.wt.frames[{name:?}] ?? []"))
        .await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

/// Waits until a frame on `name` satisfies `check`; returns it.
async fn frame_where(
    tab: &Tab<'_>,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = frames(tab, name)
            .await
            .into_iter()
            .find(|f| check(&serde_json::from_str(f).unwrap()));
        if let Some(found) = found {
            return found;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what} on {name}; frames: {:?}, closed: {}",
                frames(tab, name).await,
                tab.eval("return window.wt.closed").await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(tab: &Tab<'_>, script: &str) {
    tab.focus().await;
    let result = tab
        .browser
        .execute_async(
            &format!("const done = arguments[arguments.length - 1]; {script}.then(() => done('ok'), (e) => done('error: ' + e))"),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(result, "ok", "{script}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_on_webtransport_gets_websockets_bytes_and_resumes_after_kill_9() {
    let nats = NatsServer::start();
    let env = |node: &str| {
        let mut env = ws_process_env(&nats.url(), node, 0);
        env.push(("FANOUT_WEBTRANSPORT_LISTEN", "127.0.0.1:0".to_string()));
        env.push(("FANOUT_MAX_MESSAGE_BYTES", "1024".to_string()));
        env
    };
    let ws1 = Process::start("fanout-ws", &env("ws-1"));
    let ws2 = Process::start("fanout-ws", &env("ws-2"));
    wait_ready(&ws1.server()).await;
    wait_ready(&ws2.server()).await;
    let api = start_api(&nats).await;
    let (url1, hashes1) = webtransport_of(&api, "ws-1").await;
    let (url2, hashes2) = webtransport_of(&api, "ws-2").await;
    let (hash1, hash2) = (&hashes1[0], &hashes2[0]);

    // A raw WebSocket client on node 2: the bytes of each event frame as they travel.
    let mut raw_ws = raw::Conn::open(ws2.server().addr).await;
    raw_ws
        .send(&raw::frame(
            true,
            1,
            br#"{"op":"subscribe","channel":"news"}"#,
            true,
        ))
        .await;
    loop {
        let frame = within("subscribed", raw_ws.next()).await.unwrap();
        if frame.text().contains("subscribed") {
            break;
        }
    }

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let tab = Tab::first(&browser, "WT", &api.url("/")).await;
    tab.eval(&format!("{CLIENT}; return true")).await;
    run(&tab, &format!("window.wt.open('a', {url1:?}, {hash1:?})")).await;
    frame_where(&tab, "a", "welcome", |f| {
        f["op"] == "welcome" && f["node"] == "ws-1"
    })
    .await;
    run(
        &tab,
        r#"window.wt.send('a', {op: "subscribe", channel: "news", id: 1})"#,
    )
    .await;
    frame_where(&tab, "a", "subscribed", |f| f["op"] == "subscribed").await;

    // Byte for byte what WebSocket gets.
    let seq = publish(
        &api,
        "news",
        &json!({"text": "héllo", "n": [1, 2.50, null]}),
    )
    .await;
    let over_wt = frame_where(&tab, "a", "the event", |f| f["seq"] == seq).await;
    let over_ws = within("the WebSocket event", async {
        loop {
            let frame = raw_ws.next().await.unwrap();
            if frame.text().contains("\"event\"") {
                return frame.text();
            }
        }
    })
    .await;
    assert_eq!(over_wt, over_ws, "the same frame, byte for byte");

    // A volatile event: a datagram, holding the frame's JSON.
    let (status, answer) = post_raw(
        &api,
        "/v1/channels/news/volatile",
        r#"{"x":10,"y":20}"#.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let datagram = within("the datagram", async {
        loop {
            let got = tab.eval("return window.wt.datagrams['a']").await;
            if let Some(first) = got.as_array().and_then(|d| d.first()) {
                return first.as_str().unwrap().to_string();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let datagram: Value = serde_json::from_str(&datagram).unwrap();
    assert_eq!(datagram["volatile"], true, "{datagram}");
    assert_eq!(datagram["id"], answer["id"]);
    assert_eq!(datagram["data"], json!({"x": 10, "y": 20}));

    // Node 1 is killed: the session ends; an event published meanwhile is replayed when the
    // page resumes on node 2.
    ws1.signal("-KILL");
    tab.until(WAIT, "the session to end", || async {
        !tab.eval("return window.wt.closed['a'] ?? null")
            .await
            .is_null()
    })
    .await;
    let missed = publish(&api, "news", &json!("while away")).await;
    run(&tab, &format!("window.wt.open('b', {url2:?}, {hash2:?})")).await;
    frame_where(&tab, "b", "welcome", |f| f["op"] == "welcome").await;
    let epoch =
        serde_json::from_str::<Value>(&frames(&tab, "b").await[0]).unwrap()["epoch"].clone();
    run(
        &tab,
        &format!(
            r#"window.wt.send('b', {{op: "subscribe", channel: "news", since: {seq}, epoch: {epoch}, id: 1}})"#
        ),
    )
    .await;
    let reply = frame_where(&tab, "b", "the resume", |f| f["op"] == "subscribed").await;
    assert!(reply.contains("\"recovered\":true"), "{reply}");
    frame_where(&tab, "b", "the missed event", |f| f["seq"] == missed).await;

    // A frame over FANOUT_MAX_MESSAGE_BYTES: the browser reads the close code and reason.
    run(
        &tab,
        r#"window.wt.writers['b'].write(new Uint8Array([0x40 | 0x10, 0x00]))"#,
    )
    .await;
    tab.until(Duration::from_secs(15), "the close", || async {
        !tab.eval("return window.wt.closed['b'] ?? null")
            .await
            .is_null()
    })
    .await;
    let closed = tab.eval("return window.wt.closed['b']").await;
    assert_eq!(closed["code"], 1009, "{closed}");
    assert!(
        !closed["reason"].as_str().unwrap_or_default().is_empty(),
        "{closed}"
    );

    // The page: fanout.js over WebTransport by default, to the node that is left.
    let page = Tab::open(&browser, "page", &api.url("/")).await;
    page.wait_for("open", Some("ws-2")).await;
    let transport = page
        .eval("return document.getElementById('transport').dataset.transport")
        .await;
    assert_eq!(transport, "webtransport", "{}", page.dump().await);
    let seq = publish(&api, "broadcast", &json!({"over": "webtransport"})).await;
    page.wait_for_event(seq).await;

    // Moving cursors: a second tab draws where the first one's pointer is, from volatile
    // events in the lobby (datagrams over WebTransport).
    let other = Tab::open(&browser, "other", &api.url("/")).await;
    other.wait_for("open", Some("ws-2")).await;
    let conn = page.eval("return window.fanoutClient?.conn ?? null").await;
    let conn = match conn.as_str() {
        Some(conn) => conn.to_string(),
        None => panic!("the page exposes no client: {}", page.dump().await),
    };
    other
        .until(WAIT, "the first tab's cursor", || async {
            // Moved again on every check: a volatile event may be lost, the next one comes.
            page.eval(
                "document.dispatchEvent(new MouseEvent('mousemove', {clientX: 120, clientY: 80})); return true",
            )
            .await;
            other.focus().await;
            !other
                .eval(&format!(
                    "return document.querySelector('#cursors [data-conn=\"{conn}\"]')?.style.left ?? null"
                ))
                .await
                .is_null()
        })
        .await;
}

/// What a page's clients received, by name: each event's data (bytes as an array of numbers,
/// marked), as `window.got` keeps it.
async fn got(tab: &Tab<'_>, name: &str) -> Vec<Value> {
    tab.eval(&format!("return window.got?.[{name:?}] ?? []"))
        .await
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_speaks_msgpack_on_websocket_and_webtransport_and_gets_bytes_everywhere() {
    let nats = NatsServer::start();
    let mut env = ws_process_env(&nats.url(), "ws-1", 0);
    env.push(("FANOUT_WEBTRANSPORT_LISTEN", "127.0.0.1:0".to_string()));
    let ws = Process::start("fanout-ws", &env);
    wait_ready(&ws.server()).await;
    let api = start_api(&nats).await;
    let (wt_url, hashes) = webtransport_of(&api, "ws-1").await;
    let node = format!("ws://{}/ws", ws.server().addr);

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let tab = Tab::first(&browser, "msgpack", &api.url("/")).await;
    // fanout.js as the page serves it: MessagePack over WebTransport and WebSocket, JSON over
    // SSE, each subscribed to `bin`.
    let webtransport = json!({ node.clone(): {"url": wt_url, "cert_hashes": hashes} });
    run(
        &tab,
        &format!(
            r#"import('/fanout.js').then((m) => {{
              window.got = {{}};
              window.clients = {{}};
              for (const [name, transport, protocol] of [["wt", "webtransport", "msgpack"], ["ws", "websocket", "msgpack"], ["sse", "sse", "json"]]) {{
                const client = new m.FanoutClient([{node:?}], {{ transports: [transport], protocol, webtransport: {webtransport} }});
                window.got[name] = [];
                client.subscribe("bin", (e) => window.got[name].push({{
                  bytes: e.data instanceof Uint8Array,
                  data: e.data instanceof Uint8Array ? [...e.data] : e.data,
                  volatile: !!e.volatile,
                }}));
                client.connect();
                window.clients[name] = client;
              }}
            }})"#
        ),
    )
    .await;
    let names = ["wt", "ws", "sse"];
    // Every client follows `bin` once a JSON event reaches it (published until one does).
    let mut n = 0;
    tab.until(WAIT, "every client to follow bin", || {
        n += 1;
        let api = &api;
        let tab = &tab;
        async move {
            publish(api, "bin", &json!({"warm": n})).await;
            let mut all = true;
            for name in names {
                all &= !got(tab, name).await.is_empty();
            }
            all
        }
    })
    .await;
    // Negotiated: MessagePack on the WebSocket and on the WebTransport session.
    let negotiated = tab
        .eval(
            "return [window.clients.ws._socket.socket.protocol, window.clients.wt._socket.packed]",
        )
        .await;
    assert_eq!(
        negotiated,
        json!(["fanout.msgpack", true]),
        "{}",
        tab.dump().await
    );

    // Bytes from the API, stored and volatile: a Uint8Array for every client.
    let bytes: Vec<u8> = (0..=255).rev().collect();
    let (status, _) = post_bytes(&api, "/v1/channels/bin/events", bytes.clone()).await;
    assert_eq!(status, 202);
    let (status, _) = post_bytes(&api, "/v1/channels/bin/volatile", vec![1u8, 2, 3]).await;
    assert_eq!(status, 202);
    // From a MessagePack client over WebTransport: a Uint8Array published.
    run(
        &tab,
        "window.clients.wt.publish('bin', new Uint8Array([7, 0, 255]))",
    )
    .await;
    for name in names {
        for (what, expected, volatile) in [
            ("the API's bytes", &bytes[..], false),
            ("the volatile bytes", &[1u8, 2, 3][..], true),
            ("the client's bytes", &[7u8, 0, 255][..], false),
        ] {
            tab.until(WAIT, &format!("{what} on {name}"), || async {
                got(&tab, name).await.iter().any(|e| {
                    e["bytes"] == true && e["volatile"] == volatile && e["data"] == json!(expected)
                })
            })
            .await;
        }
        let json_events = got(&tab, name).await;
        assert!(
            json_events
                .iter()
                .filter(|e| e["bytes"] == false)
                .all(|e| e["data"]["warm"].is_u64()),
            "{name}: JSON data stays objects: {json_events:?}"
        );
    }

    // The demo page with ?protocol=msgpack.
    let page = Tab::open(
        &browser,
        "page",
        &api.url("/?protocol=msgpack&transport=websocket"),
    )
    .await;
    page.wait_for("open", Some("ws-1")).await;
    let seq = publish(&api, "broadcast", &json!({"over": "msgpack"})).await;
    page.wait_for_event(seq).await;
    let protocol = page
        .eval("return window.fanoutClient._socket.socket.protocol")
        .await;
    assert_eq!(protocol, "fanout.msgpack");
}
