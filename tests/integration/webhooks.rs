//! Lifecycle events as webhooks (`FANOUT_WEBHOOK_URL`), decided once for the tier: a real
//! HTTP receiver in the test gets `channel_occupied` / `channel_vacated` and `member_added` /
//! `member_removed` from clients on three nodes, in every order; a user with two devices is
//! one member; a move within the debounce says nothing; a node killed with SIGKILL releases its
//! members once; a receiver that refuses for a while gets everything afterwards, in order per
//! channel; the signature checks out with Python's `hmac`.
//!
//! The receiver dedupes by event id, as the README tells receivers to.

use crate::common;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use common::*;
use serde_json::{Value, json};

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Accepted requests' headers and bodies (as sent), in arrival order.
    accepted: Vec<(HeaderMap, String)>,
    /// Every event id accepted so far (the receiver's dedup).
    ids: HashSet<String>,
    /// The events, each once, in the order first accepted.
    events: Vec<Value>,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Seen>>,
    /// Answer 500 while set.
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

async fn take(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    if r.failing.load(Ordering::SeqCst) {
        r.refused.fetch_add(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let parsed: Value = serde_json::from_str(&body).unwrap();
    let mut seen = r.seen.lock().unwrap();
    for event in parsed["events"].as_array().unwrap() {
        if seen.ids.insert(event["id"].as_str().unwrap().to_string()) {
            seen.events.push(event.clone());
        }
    }
    seen.accepted.push((headers, body));
    StatusCode::OK
}

impl Receiver {
    /// Serves on a free port; returns the URL to give `FANOUT_WEBHOOK_URL`.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hooks", post(take))
            .with_state(self.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// `channel`'s events so far, by `seq`: `(name, user)`.
    fn of(&self, channel: &str) -> Vec<(String, Option<String>)> {
        let seen = self.seen.lock().unwrap();
        let mut events: Vec<&Value> = seen
            .events
            .iter()
            .filter(|e| e["channel"] == channel)
            .collect();
        events.sort_by_key(|e| e["seq"].as_u64());
        events
            .into_iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["user"].as_str().map(String::from),
                )
            })
            .collect()
    }

    /// The time (unix ms) of `channel`'s event `name`.
    fn time_of(&self, channel: &str, name: &str) -> u64 {
        let seen = self.seen.lock().unwrap();
        seen.events
            .iter()
            .find(|e| e["channel"] == channel && e["name"] == name)
            .and_then(|e| e["time_ms"].as_u64())
            .unwrap()
    }

    /// Waits until `channel` has had `count` events of `name`.
    async fn until(&self, channel: &str, name: &str, count: usize) {
        let what = format!("{count} × {name} on {channel}");
        until(&what, || async {
            self.of(channel).iter().filter(|(n, _)| n == name).count() >= count
        })
        .await;
    }
}

/// Polls `check` until it holds (bounded by the suite's wait).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A tier of one API and three ws nodes with webhooks to `url`, debouncing `debounce_ms`.
async fn tier(url: &str, debounce_ms: u64) -> (NatsServer, Server, Vec<Server>) {
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| {
        c.common.webhook_url = url.to_string();
        c.common.webhook_debounce_ms = debounce_ms;
        c.webhook_secret = "s3cret,0ld-s3cret".into();
        c.webhook_batch_ms = 50;
    })
    .await;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(
            start_ws(&nats, &format!("ws-{i}"), |c| {
                c.common.webhook_url = url.to_string();
                c.common.webhook_client_events = fanout::config::List::parse("chat.*");
            })
            .await,
        );
    }
    (nats, api, nodes)
}

async fn member(node: &Server, user: &str, channel: &str) -> Client {
    let mut client = Client::connect_url(&format!("{}?user={user}", node.ws_url())).await;
    client.subscribe(channel).await;
    client
}

fn names(events: &[(String, Option<String>)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupied_and_vacated_once_for_the_tier_in_every_order() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let (_nats, _api, nodes) = tier(&url, 0).await;
    let users = ["ada", "bo", "cy"];
    for (k, (joins, leaves)) in [
        ([0, 1, 2], [0, 1, 2]),
        ([2, 0, 1], [1, 2, 0]),
        ([1, 2, 0], [2, 0, 1]),
    ]
    .into_iter()
    .enumerate()
    {
        let channel = format!("room{k}");
        let mut clients: Vec<Option<Client>> = vec![None, None, None];
        for (n, &i) in joins.iter().enumerate() {
            clients[i] = Some(member(&nodes[i], users[i], &channel).await);
            if n == 0 {
                receiver.until(&channel, "channel_occupied", 1).await;
            }
        }
        receiver.until(&channel, "member_added", 3).await;
        let mut last_left = 0;
        for &i in &leaves {
            last_left = fanout::time::now_ms();
            drop(clients[i].take());
        }
        receiver.until(&channel, "channel_vacated", 1).await;
        receiver.until(&channel, "member_removed", 3).await;
        let events = receiver.of(&channel);
        let mut sorted = names(&events);
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "channel_occupied",
                "channel_vacated",
                "member_added",
                "member_added",
                "member_added",
                "member_removed",
                "member_removed",
                "member_removed"
            ],
            "{channel}: {events:?}"
        );
        assert_eq!(events[0].0, "channel_occupied", "{events:?}");
        assert_eq!(events.last().unwrap().0, "channel_vacated", "{events:?}");
        // Never vacated while anyone remained on any node (Soketi #616).
        assert!(receiver.time_of(&channel, "channel_vacated") >= last_left);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_are_one_member_and_a_move_within_the_debounce_says_nothing() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // Long enough that the moves below always fit in it, even on a loaded machine.
    let (_nats, _api, nodes) = tier(&url, 5000).await;

    // Two devices on two nodes: one member.
    let phone = member(&nodes[0], "ada", "devices").await;
    let laptop = member(&nodes[1], "ada", "devices").await;
    receiver.until("devices", "member_added", 1).await;
    drop(phone);
    let last = fanout::time::now_ms();
    drop(laptop);
    receiver.until("devices", "channel_vacated", 1).await;
    assert_eq!(
        receiver.of("devices"),
        [
            ("channel_occupied".to_string(), None),
            ("member_added".to_string(), Some("ada".to_string())),
            ("member_removed".to_string(), Some("ada".to_string())),
            ("channel_vacated".to_string(), None),
        ]
    );
    assert!(receiver.time_of("devices", "member_removed") >= last + 5000);

    // A move from node 1 to node 2 within the debounce: nothing; then gone for good.
    let before = member(&nodes[0], "bo", "moves").await;
    receiver.until("moves", "member_added", 1).await;
    let left = tokio::time::Instant::now();
    drop(before);
    let after = member(&nodes[1], "bo", "moves").await;
    assert!(
        left.elapsed() < Duration::from_millis(5000),
        "the move took too long to test"
    );
    drop(after);
    receiver.until("moves", "channel_vacated", 1).await;
    // Beyond the debounce: removed, then added again.
    let back = member(&nodes[2], "bo", "moves").await;
    receiver.until("moves", "member_added", 2).await;
    drop(back);
    assert_eq!(
        names(&receiver.of("moves")),
        [
            "channel_occupied",
            "member_added",
            "member_removed",
            "channel_vacated",
            "channel_occupied",
            "member_added"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_releases_its_members_once() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let nats = NatsServer::start();
    let _api = start_api_with(&nats, |c| {
        c.common.webhook_url = url.clone();
        c.common.webhook_debounce_ms = 0;
        c.webhook_batch_ms = 50;
    })
    .await;
    let mut env = ws_process_env(&nats.url(), "ws-doomed", 0);
    env.push(("FANOUT_WEBHOOK_URL", url.clone()));
    let doomed = Process::start("fanout-ws", &env);
    wait_ready(&doomed.server()).await;
    let client = member(&doomed.server(), "ada", "last").await;
    receiver.until("last", "member_added", 1).await;
    doomed.signal("-KILL");
    receiver.until("last", "channel_vacated", 1).await;
    assert_eq!(
        names(&receiver.of("last")),
        [
            "channel_occupied",
            "member_added",
            "member_removed",
            "channel_vacated"
        ]
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_receiver_gets_everything_in_order_and_signed() {
    let receiver = Receiver::default();
    receiver.failing.store(true, Ordering::SeqCst);
    let url = receiver.start().await;
    let (_nats, _api, nodes) = tier(&url, 0).await;
    let mut clients = Vec::new();
    for (i, channel) in ["chat.a", "chat.b", "chat.c"].iter().enumerate() {
        let mut client = member(&nodes[i], "ada", channel).await;
        client
            .request(json!({"op": "publish", "channel": channel, "data": {"n": i}, "id": 1}))
            .await;
        clients.push(client);
    }
    until("three refusals", || async {
        receiver.refused.load(Ordering::SeqCst) >= 3
    })
    .await;
    receiver.failing.store(false, Ordering::SeqCst);
    for channel in ["chat.a", "chat.b", "chat.c"] {
        receiver.until(channel, "client_event", 1).await;
        let events = receiver.of(channel);
        assert_eq!(
            names(&events),
            ["channel_occupied", "member_added", "client_event"],
            "{channel}"
        );
    }
    // In order per channel as accepted: each channel's seqs arrive increasing.
    let (headers, body) = {
        let seen = receiver.seen.lock().unwrap();
        for channel in ["chat.a", "chat.b", "chat.c"] {
            let seqs: Vec<u64> = seen
                .events
                .iter()
                .filter(|e| e["channel"] == channel)
                .map(|e| e["seq"].as_u64().unwrap())
                .collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{channel}: {seqs:?}");
        }
        let client_event = seen
            .events
            .iter()
            .find(|e| e["name"] == "client_event")
            .unwrap();
        assert_eq!(client_event["user"], "ada");
        assert!(client_event["data"]["n"].is_u64(), "{client_event}");

        seen.accepted.last().unwrap().clone()
    };
    // The signature, checked by Python's hmac: one v1 per secret, over "<t>.<body>".
    assert!(!headers["x-fanout-webhook-id"].is_empty());
    let signature = headers["x-fanout-signature"].to_str().unwrap().to_string();
    let script = r#"
import hashlib, hmac, sys
fields = sys.argv[1].split(",")
t = fields[0].removeprefix("t=")
v1 = [f.removeprefix("v1=") for f in fields[1:]]
body = sys.stdin.buffer.read()
for secret, got in zip(["s3cret", "0ld-s3cret"], v1, strict=True):
    want = hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(want, got), (secret, want, got)
print("signature ok")
"#;
    let output = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&signature)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_no_receiver_takes_are_dead_lettered_and_can_be_replayed() {
    let receiver = Receiver::default();
    receiver.failing.store(true, Ordering::SeqCst);
    let url = receiver.start().await;
    let nats = NatsServer::start();
    let api = start_api_with(&nats, |c| {
        c.common.webhook_url = url.clone();
        c.common.webhook_debounce_ms = 0;
        c.webhook_batch_ms = 50;
        c.webhook_retry_secs = 1;
    })
    .await;
    let node = start_ws(&nats, "ws-1", |c| c.common.webhook_url = url.clone()).await;
    let client = member(&node, "ada", "lost").await;
    // Refused for the whole retry window: dead-lettered.
    let dead = loop {
        let (status, body) = get_json(&api, "/v1/webhooks/dead").await;
        assert_eq!(status, 200, "{body}");
        if body["dead"].as_array().is_some_and(|d| !d.is_empty()) {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let events = dead["dead"][0]["events"].as_array().unwrap();
    assert_eq!(events[0]["name"], "channel_occupied", "{dead}");
    assert!(receiver.of("lost").is_empty());
    // Replayed from the start once the receiver is back.
    receiver.failing.store(false, Ordering::SeqCst);
    let (status, answer) = post_raw(&api, "/v1/webhooks/replay", r#"{"since":0}"#).await;
    assert_eq!(status, 202, "{answer}");
    receiver.until("lost", "member_added", 1).await;
    assert_eq!(
        names(&receiver.of("lost")),
        ["channel_occupied", "member_added"]
    );
    let (status, error) = post_raw(&api, "/v1/webhooks/replay", r#"{"from":1}"#).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["error"]["code"], "invalid_body");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_endpoints_say_when_webhooks_are_off() {
    let nats = NatsServer::start();
    let api = start_api(&nats).await;
    let (status, error) = get_json(&api, "/v1/webhooks/dead").await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(error["error"]["code"], "webhooks_off");
    let (status, error) = post_raw(&api, "/v1/webhooks/replay", r#"{"since":0}"#).await;
    assert_eq!(status, 404, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_receiver_in_python_verifies_every_signature() {
    // A certificate from a throwaway CA (scripts/certs.sh), which the API trusts through
    // FANOUT_WEBHOOK_CA.
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    test_certs(&certs, "receiver");
    let mut python = tokio::process::Command::new("python3")
        .arg(workspace().join("tests/clients/webhook_receiver.py"))
        .arg(certs.join("receiver.pem"))
        .arg(certs.join("receiver.key"))
        .arg("s3cret,0ld-s3cret")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut lines = tokio::io::BufReader::new(python.stdout.take().unwrap()).lines();
    use tokio::io::AsyncBufReadExt;
    let first: Value = serde_json::from_str(
        &within("the receiver's port", lines.next_line())
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let url = format!("https://localhost:{}/hooks", first["port"]);

    let nats = NatsServer::start();
    let ca = certs.join("ca.pem").display().to_string();
    let _api = start_api_with(&nats, |c| {
        c.common.webhook_url = url.clone();
        c.common.webhook_debounce_ms = 0;
        c.webhook_secret = "s3cret,0ld-s3cret".into();
        c.webhook_ca = ca;
        c.webhook_batch_ms = 50;
    })
    .await;
    let node = start_ws(&nats, "ws-1", |c| c.common.webhook_url = url.clone()).await;
    let client = member(&node, "ada", "secure").await;
    let mut names = Vec::new();
    while names.len() < 2 {
        let line = within("a webhook over HTTPS", lines.next_line())
            .await
            .unwrap()
            .expect("the receiver runs");
        let request: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(request["valid"], true, "{request}");
        for event in request["events"].as_array().unwrap() {
            names.push(event["name"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(names, ["channel_occupied", "member_added"]);
    drop(client);
    python.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_process_killed_mid_delivery_leaves_the_batch_to_another() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let nats = NatsServer::start();
    // API A, a process: it takes the lease (it is the only one), then dies mid-delivery.
    let env = |node: &str| {
        vec![
            ("FANOUT_NATS_URL", nats.url()),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
            ("FANOUT_WEBHOOK_URL", url.clone()),
            ("FANOUT_WEBHOOK_DEBOUNCE_MS", "0".to_string()),
            ("FANOUT_WEBHOOK_BATCH_MS", "50".to_string()),
        ]
    };
    let a = Process::start("fanout-api", &env("api-a"));
    wait_ready(&a.server()).await;
    let node = start_ws(&nats, "ws-1", |c| c.common.webhook_url = url.clone()).await;
    let first = member(&node, "ada", "handover").await;
    receiver.until("handover", "member_added", 1).await;
    // API B joins; A keeps the lease while it lives.
    let _b = start_api_with(&nats, |c| {
        c.common.webhook_url = url.clone();
        c.common.webhook_debounce_ms = 0;
        c.webhook_batch_ms = 50;
    })
    .await;
    receiver.failing.store(true, Ordering::SeqCst);
    let refused = receiver.refused.load(Ordering::SeqCst);
    let second = member(&node, "bo", "handover").await;
    until("A to be refused", || async {
        receiver.refused.load(Ordering::SeqCst) > refused
    })
    .await;
    a.signal("-KILL");
    receiver.failing.store(false, Ordering::SeqCst);
    // B takes over (the lease and the batch A held), and delivers it.
    receiver.until("handover", "member_added", 2).await;
    assert_eq!(
        receiver.of("handover"),
        [
            ("channel_occupied".to_string(), None),
            ("member_added".to_string(), Some("ada".to_string())),
            ("member_added".to_string(), Some("bo".to_string())),
        ]
    );
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_occupied_in_two_regions_is_vacated_once() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    let cluster = common::geo::Supercluster::start(&["eu", "us"], Duration::from_millis(20)).await;
    cluster.wait_ready().await;
    let extra = [
        ("FANOUT_WEBHOOK_URL", url.clone()),
        ("FANOUT_WEBHOOK_DEBOUNCE_MS", "0".to_string()),
        ("FANOUT_WEBHOOK_BATCH_MS", "50".to_string()),
    ];
    let eu = common::geo::Tier::start_with(&cluster, "eu", 1, &extra).await;
    let us = common::geo::Tier::start_with(&cluster, "us", 1, &extra).await;
    eu.wait_regions_current().await;
    us.wait_regions_current().await;

    let alice = member(&eu.ws[0].server(), "alice", "global").await;
    receiver.until("global", "channel_occupied", 1).await;
    let bob = member(&us.ws[0].server(), "bob", "global").await;
    receiver.until("global", "member_added", 2).await;
    drop(alice);
    receiver.until("global", "member_removed", 1).await;
    let last = fanout::time::now_ms();
    drop(bob);
    receiver.until("global", "channel_vacated", 1).await;
    receiver.until("global", "member_removed", 2).await;
    let events = receiver.of("global");
    assert_eq!(
        names(&events),
        [
            "channel_occupied",
            "member_added",
            "member_added",
            "member_removed",
            "member_removed",
            "channel_vacated"
        ],
        "{events:?}"
    );
    assert!(receiver.time_of("global", "channel_vacated") >= last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_debounce_is_not_held_behind_its_check() {
    let receiver = Receiver::default();
    let url = receiver.start().await;
    // One node: its leave is folded before its rejoin, so a check is pending meanwhile, and
    // the rejoin must be folded before the check's time.
    let (_nats, _api, nodes) = tier(&url, 5000).await;
    let first = member(&nodes[0], "cy", "again").await;
    receiver.until("again", "member_added", 1).await;
    let left = tokio::time::Instant::now();
    drop(first);
    let second = member(&nodes[0], "cy", "again").await;
    assert!(
        left.elapsed() < Duration::from_millis(5000),
        "the reconnect took too long to test"
    );
    drop(second);
    receiver.until("again", "channel_vacated", 1).await;
    assert_eq!(
        names(&receiver.of("again")),
        [
            "channel_occupied",
            "member_added",
            "member_removed",
            "channel_vacated"
        ]
    );
}
