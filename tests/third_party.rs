//! A real third-party WebSocket client library doing the whole protocol against a live
//! tier: Python's `websockets` (PyPI; `make test` installs it into .tools/py), driven by
//! tests/clients/websockets_client.py: welcome, subscribe with presence, an HTTP publish
//! delivered, a client publish, presence, pings (op and WebSocket), a fragmented request, an
//! error frame, unsubscribe, a normal close, and a resume with `since`; and the
//! `fanout.msgpack` subprotocol with Python's `msgpack` (tests/clients/msgpack_client.py).

mod common;

use common::*;
use serde_json::json;

/// Runs `script` (tests/clients/) with .tools/py's packages against a one-node tier; asserts
/// it holds every step, and returns what it printed.
async fn python(script: &str, package: &str) -> String {
    let tier = Tier::start(1).await;
    let py_tools = workspace().join(".tools/py");
    assert!(
        py_tools.join(package).exists(),
        "{} has no {package}: `make test` installs it (make py-tools)",
        py_tools.display()
    );
    let script = workspace().join("tests/clients").join(script);
    let ws = format!("ws://{}", tier.nodes[0].addr);
    let api = format!("http://{}", tier.api.addr);
    // The script bounds each of its own steps (15 s).
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg(&script)
            .arg(&ws)
            .arg(&api)
            .env("PYTHONPATH", &py_tools)
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("every step held"), "{stdout}");
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_does_the_whole_protocol() {
    python("websockets_client.py", "websockets").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_msgpack_speaks_the_binary_subprotocol() {
    python("msgpack_client.py", "msgpack").await;
}

/// Pusher's own server library (npm `pusher`, `make test` installs it into .tools/npm)
/// publishes through fanout's Pusher API, signed as it signs; a fanout client on the channel
/// gets each event with its name; a wrong secret and an unknown app are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushers_server_library_publishes_to_fanout_clients() {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| {
        c.common.pusher_apps = "42:app-key:app-secret-1234".into();
    })
    .await;
    let node = start_ws(&nats, "ws-1", |_| {}).await;
    let mut client = Client::connect(&node).await;
    client.subscribe("orders").await;
    let npm = workspace().join(".tools/npm");
    assert!(
        npm.join("node_modules/pusher").exists(),
        "{} has no pusher: `make test` installs it",
        npm.display()
    );
    let script = workspace().join("tests/clients/pusher_server.mjs");
    let base = format!("http://{}", api.addr);
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(&script)
            .args([base.as_str(), "42", "app-key", "app-secret-1234"])
            .env("NPM_PREFIX", &npm)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    for step in ["trigger", "many", "batch", "channels", "channel"] {
        assert_eq!(seen[step]["status"], 200, "{step}: {seen}");
    }
    assert_eq!(
        seen["channels"]["body"],
        serde_json::json!({"channels": {"orders": {}}})
    );
    assert_eq!(
        seen["channel"]["body"],
        serde_json::json!({"occupied": true, "subscription_count": 1})
    );
    assert_eq!(seen["wrongSecret"]["status"], 401, "{seen}");
    assert_eq!(seen["unknownApp"]["status"], 404, "{seen}");
    assert_eq!(seen["stale"]["status"], 401, "{seen}");
    assert!(
        seen["stale"]["body"]
            .to_string()
            .contains("timestamp expired"),
        "{seen}"
    );
    assert_eq!(seen["badSocketId"]["status"], 400, "{seen}");
    assert_eq!(seen["users"]["status"], 200, "{seen}");
    assert_eq!(seen["users"]["body"], json!({"users": []}), "{seen}");
    let mut got = Vec::new();
    for _ in 0..3 {
        let event = client.event().await;
        got.push((event["name"].clone(), event["data"].clone()));
    }
    assert_eq!(
        got,
        [
            (
                serde_json::json!("order-placed"),
                serde_json::json!("{\"id\":1}")
            ),
            (serde_json::json!("note"), serde_json::json!("plain text")),
            (serde_json::json!("batched"), serde_json::json!("{\"n\":2}")),
        ]
    );
}

/// The Pusher app of the Pusher tests (`FANOUT_PUSHER_APPS`).
const PUSHER_APP: (&str, &str, &str) = ("42", "app-key", "app-secret-1234");

/// A tier with the Pusher app: its API and `nodes` ws nodes.
async fn pusher_tier(nats: &NatsServer, nodes: usize) -> (Server, Vec<Server>) {
    let (id, key, secret) = PUSHER_APP;
    let apps = format!("{id}:{key}:{secret}");
    let api = start_api_with(nats, |c| c.common.pusher_apps = apps.as_str().into()).await;
    let mut ws = Vec::new();
    for n in 1..=nodes {
        ws.push(
            start_ws(nats, &format!("ws-{n}"), |c| {
                c.common.pusher_apps = apps.as_str().into()
            })
            .await,
        );
    }
    (api, ws)
}

/// Runs Node `script` (tests/clients/, with .tools/npm's packages) against `nodes` and
/// `api`: what it saw (one JSON line), which names no failed step.
async fn pusher_script(script: &str, nodes: &[Server], api: &Server) -> serde_json::Value {
    let npm = workspace().join(".tools/npm");
    assert!(
        npm.join("node_modules/pusher-js").exists(),
        "{} has no pusher-js: `make test` installs it",
        npm.display()
    );
    let (id, key, secret) = PUSHER_APP;
    let ws: Vec<String> = nodes.iter().map(|n| n.addr.to_string()).collect();
    // The script bounds each of its own steps (15 s).
    let mut node = tokio::process::Command::new("node");
    node.arg(workspace().join("tests/clients").join(script))
        .args([
            &ws.join(","),
            &format!("http://{}", api.addr),
            id,
            key,
            secret,
        ])
        .env("NPM_PREFIX", &npm);
    node_json(node).await
}

/// What a Node script printed (one JSON line), which names no failed step.
async fn node_json(mut command: tokio::process::Command) -> serde_json::Value {
    let output = command
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    assert!(seen.get("error").is_none(), "{seen}");
    seen
}

/// pusher-js (npm, its Node build) on three fanout nodes' Pusher endpoints
/// (tests/clients/pusher_js.mjs): a public and a private channel (signed by Pusher's own
/// server library), events published through fanout's Pusher API received with their names
/// and data, client events (not echoed), `socket_id` leaving a connection out, a presence
/// channel's members across the three nodes (by user: a second connection of a user is not a
/// second member), and a reconnect after fanout closes the connection. A fanout client on
/// the same public channel gets the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pusher_js_on_three_nodes_with_pushers_server_library() {
    let nats = NatsServer::start();
    let (api, nodes) = pusher_tier(&nats, 3).await;
    let mut fanout_client = Client::connect(&nodes[1]).await;
    fanout_client.subscribe("orders").await;
    let seen = pusher_script("pusher_js.mjs", &nodes, &api).await;
    assert_eq!(
        seen["events"],
        json!([{"id": 1}, "psst", {"id": 2}]),
        "{seen}"
    );
    assert_eq!(seen["clientEvent"], json!({"who": "ada"}), "{seen}");
    assert_eq!(
        seen["adaBeforeMarker"],
        json!([]),
        "ada's client event came back: {seen}"
    );
    assert_eq!(seen["boSkip"], "not for ada", "{seen}");
    assert_eq!(
        seen["adaBeforeSkipMarker"],
        json!([]),
        "socket_id did not leave ada out: {seen}"
    );
    assert_eq!(seen["alone"], 1, "{seen}");
    assert_eq!(seen["added"], json!(["bo", "cy"]), "{seen}");
    assert_eq!(seen["boSees"], json!(["ada", "bo"]), "{seen}");
    assert_eq!(seen["cySees"], json!(["ada", "bo", "cy"]), "{seen}");
    assert_eq!(seen["cyMe"], "cy", "{seen}");
    assert_eq!(
        seen["bo2Count"], 3,
        "bo's second connection is not a member: {seen}"
    );
    assert_eq!(seen["removed"], json!(["cy", "bo"]), "{seen}");
    assert_eq!(seen["adaCount"], 1, "{seen}");
    assert_eq!(seen["disconnectStatus"], 200, "{seen}");
    assert_eq!(seen["newSocketId"], true, "{seen}");
    assert_eq!(seen["notice"], json!({"hello": "ada"}), "{seen}");
    assert_eq!(seen["terminate"], 200, "{seen}");
    assert_ne!(seen["stateAfterTerminate"], "connecting", "{seen}");
    // The fanout client on the same channel: the same events, with their names (Pusher's
    // data is a string: the server library sent JSON text).
    for id in [1, 2] {
        let event = fanout_client.event().await;
        assert_eq!(event["name"], "order-placed", "{event}");
        assert_eq!(event["data"], json!({"id": id}).to_string(), "{event}");
    }
}

/// Laravel Echo (npm, its Pusher connector over pusher-js) as a Laravel app uses it
/// (tests/clients/laravel_echo.mjs): an event named as Laravel names it, private channels
/// signed by an auth endpoint made with Pusher's server library, whispers, and a presence
/// channel's here / joining / leaving, with two clients on two nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn laravel_echo_with_its_pusher_connector() {
    let nats = NatsServer::start();
    let (api, nodes) = pusher_tier(&nats, 2).await;
    let seen = pusher_script("laravel_echo.mjs", &nodes, &api).await;
    assert_eq!(seen["shipped"], json!({"order": {"id": 3}}), "{seen}");
    assert_eq!(seen["whisper"], json!({"name": "bo"}), "{seen}");
    assert_eq!(seen["roomUpdated"], json!({"topic": "fanout"}), "{seen}");
    assert_eq!(seen["adaHere"], json!(["ada"]), "{seen}");
    assert_eq!(seen["joining"], "bo", "{seen}");
    assert_eq!(seen["boHere"], json!(["ada", "bo"]), "{seen}");
    assert_eq!(seen["leaving"], "bo", "{seen}");
    // ada's and bo's private channel, and each one's presence channel.
    assert_eq!(seen["authRequests"], 4, "{seen}");
}

/// Fossil deltas checked across three implementations: what the node makes (the
/// fossil-delta crate) applies with fanout.js's `applyDelta` and with npm's fossil-delta
/// (dchest's port of Fossil's delta.c), and npm's deltas apply with the crate; fanout.js in
/// Node takes a channel's events as deltas from a live node and gets each one whole
/// (tests/clients/fossil_deltas.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fossil_deltas_agree_across_the_node_fanout_js_and_npm() {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let state = |minute: u32| {
        json!({"minute": minute, "score": [minute / 30, minute / 45], "note": "é ∆ 中".repeat(minute as usize % 5),
            "players": (0..22).map(|n| json!({"n": n, "name": format!("player {n}")})).collect::<Vec<_>>()})
        .to_string()
    };
    let pairs: Vec<(String, String)> = vec![
        (state(0), state(1)),
        (state(10), state(55)),
        ("short".into(), "shorter still".into()),
        (String::new(), "from nothing".into()),
        (
            "x".repeat(5000),
            format!("{}y{}", "x".repeat(2500), "x".repeat(2499)),
        ),
        (state(3), state(3)),
    ];
    let cases: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(base, target)| {
            let delta = fossil_delta::delta(target, base);
            json!({"base": b64(base.as_bytes()), "target": b64(target.as_bytes()), "delta": b64(&delta)})
        })
        .collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&cases).unwrap()).unwrap();

    let nats = NatsServer::start();
    let ws = start_ws(&nats, "ws-1", |c| c.delta_channels = "match:*".into()).await;
    let api = start_api(&nats).await;
    let mut node = tokio::process::Command::new("node");
    node.arg("--experimental-websocket")
        .arg(workspace().join("tests/clients/fossil_deltas.mjs"))
        .arg(file.path())
        .args([
            &format!("ws://{}", ws.addr),
            &format!("http://{}", api.addr),
        ])
        .args(["match:final", "12"])
        .env("NPM_PREFIX", workspace().join(".tools/npm"))
        .env("FANOUT_JS", workspace().join("clients/js/fanout.js"));
    let seen = node_json(node).await;
    assert_eq!(seen["cases"], pairs.len(), "{seen}");
    assert_eq!(
        seen["fanoutJs"],
        pairs.len(),
        "fanout.js applies the node's deltas: {seen}"
    );
    assert_eq!(
        seen["npm"],
        pairs.len(),
        "npm's fossil-delta applies them: {seen}"
    );
    assert_eq!(seen["wrongBase"], "refused", "{seen}");
    for ((base, target), delta) in pairs.iter().zip(seen["npmDeltas"].as_array().unwrap()) {
        let delta = base64::engine::general_purpose::STANDARD
            .decode(delta.as_str().unwrap())
            .unwrap();
        let applied = fossil_delta::apply(base, &delta).expect("npm's delta applies");
        assert_eq!(applied, target.as_bytes(), "the crate applies npm's delta");
    }
    assert_eq!(seen["reply"], "fossil", "{seen}");
    assert_eq!(
        seen["same"], true,
        "fanout.js got every event whole: {seen}"
    );
}
