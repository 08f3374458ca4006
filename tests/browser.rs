//! The demo page in real headless Chromium (Debian's `chromium`, driven over WebDriver by
//! Debian's `chromedriver`) against a real tier: nats-server, the API, two ws node processes.
//!
//! Tab A is pinned to node 1, tab B to node 2. "Call API" in tab A reaches every tab. Then
//! node 2 is killed: tab B, pinned with `?node=2`, fails over to node 1 and says so; tabs C
//! and E, bound to node 2's URL alone (`?ws=`), show it reconnecting, and an event published
//! meanwhile is replayed to them when node 2 is back on its port (they resume); the next one
//! arrives live everywhere. Screenshots go to `target/screenshots/`.

mod common;

use std::time::Duration;

use common::{browser::*, *};
use fantoccini::Locator;
use serde_json::{Value, json};

/// The newest broadcast seq the API stored, read back from a fresh test client: the event
/// that "Call API" produced.
async fn newest_broadcast(listener: &mut Client) -> u64 {
    let event = listener.event().await;
    assert_eq!(event["channel"], "broadcast");
    event["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tabs_on_two_nodes_see_one_post_and_survive_a_node_restart() {
    let nats = NatsServer::start();
    let ws_env = |node: &str, listen: &str| {
        vec![
            ("FANOUT_NATS_URL", nats.url()),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", listen.to_string()),
            ("FANOUT_HISTORY_MAX_AGE_SECS", "60".to_string()),
        ]
    };
    let ws1 = Process::start("fanout-ws", &ws_env("ws-1", "127.0.0.1:0"));
    let mut ws2 = Process::start("fanout-ws", &ws_env("ws-2", "127.0.0.1:0"));
    let ws2_addr = ws2.addr.clone();
    wait_ready(&ws1.server()).await;
    wait_ready(&ws2.server()).await;
    let ws_urls = format!("ws-1=ws://{}/ws,ws-2=ws://{}/ws", ws1.addr, ws2.addr);
    let api = start_api_with(&nats, |c| c.ws_urls = ws_urls).await;
    // Reads each broadcast as it is stored, to know which seq the page should show.
    let mut listener = Client::connect(&ws1.server()).await;

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let page = api.url("/");
    let a = Tab::first(&browser, "A", &format!("{page}?node=1")).await;
    let b = Tab::open(&browser, "B", &format!("{page}?node=2")).await;
    // The HTTP transports: tab C follows node 2 (its URL alone) over server-sent events, tab D
    // polls node 1.
    let ws2_url = format!("ws://{ws2_addr}/ws");
    let c = Tab::open(
        &browser,
        "C (SSE)",
        &format!("{page}?ws={ws2_url}&transport=sse"),
    )
    .await;
    let d = Tab::open(
        &browser,
        "D (long-polling)",
        &format!("{page}?node=1&transport=poll"),
    )
    .await;

    a.wait_for("open", Some("ws-1")).await;
    b.wait_for("open", Some("ws-2")).await;
    c.wait_for("open", Some("ws-2")).await;
    d.wait_for("open", Some("stateless polls")).await;
    // Tab E: node 2's URL alone, over WebSocket.
    let e = Tab::open(&browser, "E", &format!("{page}?ws={ws2_url}")).await;
    e.wait_for("open", Some("ws-2")).await;
    // Beside the node, the tab says what it is pinned to.
    assert_eq!(a.pin().await, ("ws-1".to_string(), false));
    assert_eq!(b.pin().await, ("ws-2".to_string(), false));
    for (tab, transport) in [(&a, "websocket"), (&c, "sse"), (&d, "poll")] {
        let shown = tab
            .eval("return document.getElementById('transport').dataset.transport")
            .await;
        assert_eq!(shown, transport, "tab {} shows its transport", tab.name);
    }

    // One click in tab A reaches both tabs, through two different nodes.
    a.click("call-api").await;
    let first = newest_broadcast(&mut listener).await;
    for tab in [&a, &b, &c, &d, &e] {
        tab.wait_for_event(first).await;
        assert_eq!(tab.events().await, [("broadcast".to_string(), first)]);
    }

    // Presence: each tab lists the tabs with a live connection (A, B and E over WebSocket, C
    // over SSE; a long-poll is no member), across the two nodes; a name set in tab A shows
    // in tab B.
    for tab in [&a, &b, &c, &d, &e] {
        tab.until(WAIT, "the four live tabs in the member list", || async {
            let members = tab.members().await;
            members.len() == 4
                && members.iter().filter(|m| m.ends_with("· ws-1")).count() == 1
                && members.iter().filter(|m| m.ends_with("· ws-2")).count() == 3
        })
        .await;
    }
    a.focus().await;
    let name = browser.find(Locator::Id("name")).await.unwrap();
    name.send_keys("Ada").await.unwrap();
    browser
        .find(Locator::Css("#name-form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.until(WAIT, "tab A's name", || async {
        b.members().await.contains(&"Ada · ws-1".to_string())
    })
    .await;
    a.screenshot("tab-a-ws-1.png").await;
    b.screenshot("tab-b-ws-2.png").await;

    // Node 2 dies. Tab B, pinned to it, fails over to node 1 and says so beside the node;
    // tabs C and E, which have node 2's URL alone, say they are reconnecting.
    ws2.signal("-KILL");
    ws2.exit_code().await;
    e.wait_for("reconnecting", None).await;
    c.wait_for("reconnecting", None).await;
    e.screenshot("tab-e-reconnecting.png").await;
    b.wait_for_within(RECONNECT_BOUND, "open", Some("ws-1"))
        .await;
    assert_eq!(b.pin().await, ("ws-2".to_string(), true));
    b.screenshot("tab-b-failed-over.png").await;

    // While node 2 is down, tab A calls the API again: tabs C and E miss that event...
    a.click("call-api").await;
    let missed = newest_broadcast(&mut listener).await;
    for tab in [&a, &b, &d] {
        tab.wait_for_event(missed).await;
    }

    // ...until node 2 comes back on its port: they reconnect, resume, and get the missed
    // event replayed, then the next one live.
    let ws2 = Process::start("fanout-ws", &ws_env("ws-2", &ws2_addr));
    wait_ready(&ws2.server()).await;
    // A tab retries with backoff (fanout.js: at most 15 s between attempts, however long
    // node 2 was away), so its next attempt may come up to that long after node 2 is back.
    // Tab C resumes from its last event's cursor the same way.
    for tab in [&e, &c] {
        tab.wait_for_within(RECONNECT_BOUND, "open", Some("ws-2"))
            .await;
        tab.wait_for_event(missed).await;
    }
    let shown = e
        .eval("return document.getElementById('result').textContent")
        .await;
    assert_eq!(shown, "resumed broadcast, 1 replayed");
    a.click("call-api").await;
    let second = newest_broadcast(&mut listener).await;
    for tab in [&a, &b, &c, &d, &e] {
        tab.wait_for_event(second).await;
        let seqs: Vec<u64> = tab.events().await.iter().map(|(_, seq)| *seq).collect();
        assert_eq!(
            seqs,
            [second, missed, first],
            "tab {} has every event, once, newest first",
            tab.name
        );
    }
    e.screenshot("tab-e-after-restart.png").await;
    c.screenshot("tab-c-sse.png").await;
    d.screenshot("tab-d-poll.png").await;

    // A 375 px phone: nothing sticks out sideways.
    a.focus().await;
    browser.set_window_size(375, 812).await.unwrap();
    let widths = a
        .eval("return [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        .await;
    assert!(
        widths[0].as_u64() <= widths[1].as_u64(),
        "horizontal overflow at 375 px: {widths}"
    );
    assert!(
        widths[1].as_u64().unwrap() <= 400,
        "the window did not shrink: {widths}"
    );
    a.screenshot("tab-a-phone.png").await;

    browser.close().await.unwrap();
}

/// The operators' page: with API keys set it asks for one, then shows both nodes, their
/// connections and the busiest channels from `GET /v1/stats`, refreshing by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_the_live_tier_behind_the_api_key() {
    let nats = NatsServer::start();
    let ws1 = start_ws(&nats, "ws-1", |_| {}).await;
    let ws2 = start_ws(&nats, "ws-2", |_| {}).await;
    let api = start_api_with(&nats, |c| c.api_keys = "admin-key".into()).await;
    let mut clients = Vec::new();
    for (server, channels) in [
        (&ws1, &["maths"][..]),
        (&ws2, &["maths", "art"][..]),
        (&ws2, &["maths"][..]),
    ] {
        let mut client = Client::connect(server).await;
        for channel in channels {
            client.subscribe(channel).await;
        }
        clients.push(client);
    }

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let tab = Tab::first(&browser, "admin", &api.url("/admin")).await;
    let shows = |script: &'static str| {
        let tab = &tab;
        async move { tab.eval(script).await }
    };
    let page = "return {state: document.getElementById('state').textContent, \
                nodes: [...document.querySelectorAll('#nodes tbody tr')].map(tr => \
                  [...tr.cells].map(td => td.textContent)), \
                channels: [...document.querySelectorAll('#channels tbody tr')].map(tr => \
                  [...tr.cells].map(td => td.textContent)), \
                connections: document.getElementById('t-connections').textContent, \
                delivered: document.getElementById('t-delivered').textContent, \
                keyForm: !document.getElementById('key-form').hidden}";
    let until = |what: &'static str, check: fn(&Value) -> bool| async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = shows(page).await;
            if check(&now) {
                return now;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; the page shows {now}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // Without the key, /v1/stats refuses: the page asks for one and shows nothing.
    let asked = until("the key form", |p| p["keyForm"] == true).await;
    assert_eq!(asked["nodes"], json!([]), "{asked}");
    assert_eq!(asked["state"], "needs an API key");
    tab.eval(
        "document.getElementById('key').value = 'admin-key'; \
         document.getElementById('key-form').requestSubmit(); return true",
    )
    .await;

    // Both nodes with their connections, the busiest channel first; "live" once every node
    // the API knows of has answered.
    let live = until("both nodes, live", |p| {
        p["state"] == "live"
            && p["nodes"].as_array().is_some_and(|n| n.len() == 2)
            && p["channels"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    let nodes = live["nodes"].as_array().unwrap();
    assert_eq!(nodes[0][0], "ws-1", "{live}");
    assert_eq!(nodes[0][2], "ready", "{live}");
    assert_eq!(nodes[0][3], "1", "{live}");
    assert_eq!(nodes[1][0], "ws-2", "{live}");
    assert_eq!(nodes[1][3], "2", "{live}");
    assert_eq!(live["channels"][0], json!(["maths", "3", "2"]), "{live}");
    assert_eq!(live["channels"][1], json!(["art", "1", "1"]), "{live}");
    assert_eq!(live["connections"], "3");
    assert_eq!(live["keyForm"], false);

    // It refreshes by itself: a client leaving ws-1 shows without a reload.
    drop(clients.remove(0));
    until("ws-1 at 0 connections", |p| {
        p["nodes"][0][3] == "0" && p["channels"][0] == json!(["maths", "2", "1"])
    })
    .await;
    // Events through the tier show as deliveries per second.
    for n in 0..30 {
        publish_with_key(&api, "maths", n).await;
    }
    until("deliveries per second", |p| {
        p["delivered"] != "0" && p["delivered"] != "—"
    })
    .await;
    tab.screenshot("admin.png").await;
    browser.close().await.unwrap();
}

/// Publishes `{"n": n}` to `channel` with the API key of the admin test.
async fn publish_with_key(api: &Server, channel: &str, n: u64) {
    let response = reqwest::Client::new()
        .post(api.url(&format!("/v1/channels/{channel}/events")))
        .bearer_auth("admin-key")
        .json(&json!({ "n": n }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// pusher-js's web build in headless Chromium (tests/clients/pusher_page.mjs serves the page
/// and signs its channels with Pusher's server library): connected to a fanout node, a
/// public, a private and a presence channel, and the events Pusher's server library
/// publishes through fanout's API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_in_chromium() {
    use tokio::io::AsyncBufReadExt;
    let nats = NatsServer::start();
    let apps = "42:app-key:app-secret-1234";
    let api = start_api_with(&nats, |c| c.common.pusher_apps = apps.into()).await;
    let node = start_ws(&nats, "ws-1", |c| c.common.pusher_apps = apps.into()).await;
    let mut app = tokio::process::Command::new("node")
        .arg(workspace().join("tests/clients/pusher_page.mjs"))
        .args([&node.addr.to_string(), &format!("http://{}", api.addr)])
        .args(["42", "app-key", "app-secret-1234"])
        .env("NPM_PREFIX", workspace().join(".tools/npm"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = tokio::io::BufReader::new(app.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the page's server starts")
        .unwrap()
        .expect("it prints its URL");

    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let tab = Tab::first(&browser, "pusher-js", &url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let seen = loop {
        let seen = tab.eval("return window.seen ?? null").await;
        if seen["done"] == true || !seen["errors"].as_array().is_none_or(Vec::is_empty) {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: the page saw {seen}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen["errors"], json!([]), "{seen}");
    let mut events = seen["events"].as_array().unwrap().clone();
    events.sort_by_key(|e| e["name"].as_str().unwrap_or_default().to_string());
    assert_eq!(
        events,
        vec![
            json!({"name": "order-placed", "data": {"id": 7}}),
            json!({"name": "whisper", "data": "from the server"}),
        ],
        "{seen}"
    );
    assert_eq!(
        seen["me"],
        json!({"id": "chromium", "info": {"browser": true}}),
        "{seen}"
    );
    assert_eq!(seen["count"], 1, "{seen}");
    browser.close().await.unwrap();
}

/// Chromium's own WebSocket negotiates permessage-deflate with a node (`ws.extensions`) and
/// decodes a large event that comes compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_negotiates_permessage_deflate() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let node = start_ws(&nats, "ws-1", |_| {}).await;
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let tab = Tab::first(&browser, "deflate", &node.url("/healthz")).await;
    let script = format!(
        "window.seen = {{}}; const ws = new WebSocket('ws://{}/ws?user=chromium'); \
         ws.onmessage = (m) => {{ const f = JSON.parse(m.data); \
           if (f.op === 'welcome') ws.send(JSON.stringify({{op: 'subscribe', channel: 'zip', id: 1}})); \
           if (f.op === 'subscribed') window.seen.subscribed = ws.extensions; \
           if (f.op === 'event') window.seen.data = f.data; }}; return true;",
        node.addr
    );
    tab.eval(&script).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let wait = |key: &'static str| {
        let tab = &tab;
        async move {
            loop {
                let seen = tab.eval("return window.seen").await;
                if !seen[key].is_null() {
                    return seen;
                }
                assert!(tokio::time::Instant::now() < deadline, "timed out: {seen}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let seen = wait("subscribed").await;
    assert!(
        seen["subscribed"]
            .as_str()
            .unwrap()
            .contains("permessage-deflate"),
        "{seen}"
    );
    let rows: Vec<Value> = (0..200)
        .map(|i| json!({"i": i, "name": format!("row {i}")}))
        .collect();
    let data = json!({ "rows": rows });
    publish(&api, "zip", &data).await;
    let seen = wait("data").await;
    assert_eq!(seen["data"], data);
    browser.close().await.unwrap();
}
