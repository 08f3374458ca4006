//! `docker compose up` for real: both compose files on a real Docker engine (Debian's dockerd
//! and docker-compose 1.29), with the images made here (`make images`; no registry can be
//! pulled from) and `docker-compose build` of the real Dockerfile.
//!
//! `docker-compose.yml`, 3 ws replicas behind the edge:
//! - headless Chromium opens three tabs through the page's node buttons: three distinct node
//!   ids, each the one its button names; **Call API** in one tab reaches every tab;
//! - one replica is killed (`docker kill`) while 20 events go out at 10/s: its tab fails over
//!   to another replica and has every event, none twice, as have the others;
//! - the NATS server that leads the stream is stopped: publishing goes on once the other two
//!   elect a leader (3 stream replicas), and every event reaches every tab;
//! - `--scale ws=5`: five distinct nodes on the page, each reachable through its own URL.
//!
//! `docker-compose.geo.yml`, TLS on every NATS link (scripts/certs.sh): an event published
//! through the eu API reaches a client on a us replica.
//!
//! Jaeger is the one service not started: no registry here holds its image. Traffic goes only
//! between the project's containers, on the networks the files create, and to the ports they
//! publish on this host. The projects are taken down (containers, networks, volumes) also when
//! a test fails; a dockerd the test started is stopped. Each phase's time goes to
//! `target/compose/<file>-timings.json`, the containers' logs to `target/compose/<project>.log`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use common::{browser::*, docker::*, *};
use fantoccini::Locator;
use serde_json::{Value, json};

/// The two tests share the engine and the host ports: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Host ports `docker-compose.yml` publishes (API, edge, NATS client and monitoring).
const PORTS: [u16; 4] = [8080, 8081, 4222, 8222];
/// Host ports `docker-compose.geo.yml` publishes (API and edge per region).
const GEO_PORTS: [u16; 4] = [8080, 8180, 8081, 8181];

/// Containers starting on a cold engine, a NATS cluster electing its leaders.
const UP: Duration = Duration::from_secs(180);

fn the_api() -> Server {
    Server::external("127.0.0.1:8080".parse().unwrap())
}

/// A compose file under test: its project (taken down before the engine is stopped), the
/// services started, and the clock of its phases.
struct Run {
    phases: Phases,
    project: Project,
    /// Every service but Jaeger, whose image no registry here holds.
    services: Vec<String>,
    _engine: Engine,
}

impl Run {
    /// The engine, the base images, `file` built as project `name` (the phase "images"),
    /// then, once the host ports it publishes are free, every service but Jaeger started.
    fn start(name: &str, file: &str, ports: &[u16]) -> Run {
        let mut phases = Phases::new(file.trim_end_matches(".yml"));
        let engine = Engine::start();
        make_base_images();
        let project = Project::new(name, file);
        project.build();
        phases.lap("images");
        assert_ports_free(ports);
        let services: Vec<String> = project
            .services()
            .into_iter()
            .filter(|s| s != "jaeger")
            .collect();
        eprintln!(
            "{name}: starting {} (not jaeger: no registry here holds its image)",
            services.join(", ")
        );
        let run = Run {
            phases,
            project,
            services,
            _engine: engine,
        };
        run.up(&[]);
        run
    }

    /// `docker-compose up -d <extra> <every service but Jaeger>`.
    fn up(&self, extra: &[&str]) {
        let mut args = vec!["up", "-d"];
        args.extend_from_slice(extra);
        args.extend(self.services.iter().map(String::as_str));
        self.project.compose(&args);
    }

    /// Takes the project down: the last phase.
    fn finish(self) {
        let Run {
            mut phases,
            project,
            _engine,
            ..
        } = self;
        project.finish();
        phases.lap("down");
    }
}

/// The ws nodes `api` lists (`GET /v1/nodes`), once it lists `count` and is not partial.
async fn nodes_listed(api: &Server, count: usize) -> Vec<Value> {
    let url = api.url("/v1/nodes");
    let deadline = Instant::now() + UP;
    loop {
        let body = match reqwest::get(&url).await {
            Ok(answer) => answer.json::<Value>().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() == count && body["partial"] == false {
            return nodes;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {UP:?} waiting for {count} ws nodes in {url}; it answers {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A node's announced URL as this host reaches it.
fn reachable(url: &str) -> String {
    url.replace("{host}", "127.0.0.1")
}

/// POSTs `data` to the API's `/v1/broadcast` with `key` as its Idempotency-Key: the status and
/// the answer.
async fn broadcast(api: &Server, data: &Value, key: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(api.url("/v1/broadcast"))
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(data.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        // The API itself did not answer in time: a test failure, said by the caller.
        Err(err) => (0, json!({ "error": err.to_string() })),
    }
}

/// How many times each broadcast seq shows in the tab's log.
async fn seq_counts(tab: &Tab<'_>) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for (channel, seq) in tab.events().await {
        if channel == "broadcast" {
            *counts.entry(seq).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until the tab shows every one of `seqs`, then checks each shows exactly once.
async fn has_each_once(tab: &Tab<'_>, seqs: &[u64], bound: Duration) {
    tab.until(bound, &format!("{} events", seqs.len()), || async {
        let counts = seq_counts(tab).await;
        seqs.iter().all(|seq| counts.contains_key(seq))
    })
    .await;
    let counts = seq_counts(tab).await;
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "tab {} shows events twice: {twice:?}",
        tab.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_up_pins_tabs_to_replicas_and_loses_nothing_when_one_dies() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::start("fanoutcompose", "docker-compose.yml", &PORTS);
    let project = &run.project;
    let api = the_api();
    wait_ready_for(&api, UP).await;
    let nodes = nodes_listed(&api, 3).await;
    for node in &nodes {
        let id = node["id"].as_str().unwrap();
        assert_eq!(
            node["url"],
            format!("ws://{{host}}:8081/node/{id}/ws"),
            "each replica announces its own URL through the edge"
        );
    }
    run.phases.lap("up");

    // The edge: each replica through its own URL; a JSON error for a node it cannot reach
    // and for what is no node id (it proxies to nothing else).
    for node in &nodes {
        let health = reachable(node["url"].as_str().unwrap())
            .replace("ws://", "http://")
            .replace("/ws", "/readyz");
        let ready: Value = reqwest::get(&health).await.unwrap().json().await.unwrap();
        assert_eq!(ready["node"], node["id"], "{health}");
    }
    for (path, status, code) in [
        ("/node/0123456789ab/readyz", 502, "node_unreachable"),
        ("/node/example.com/readyz", 404, "unknown_node"),
    ] {
        let answer = reqwest::get(format!("http://127.0.0.1:8081{path}"))
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{path}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }

    // Three tabs, each through one of the page's node buttons.
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = driver.browser(profile.path()).await;
    let page = api.url("/");
    let mut handles = vec![browser.window().await.unwrap()];
    for _ in 1..3 {
        handles.push(browser.new_window(true).await.unwrap().handle);
    }
    let names = ["1", "2", "3"];
    let tabs: Vec<Tab> = handles
        .into_iter()
        .zip(names)
        .map(|(handle, name)| Tab {
            browser: &browser,
            handle,
            name,
        })
        .collect();
    let mut pinned = Vec::new();
    for (i, tab) in tabs.iter().enumerate() {
        tab.focus().await;
        browser.goto(&page).await.unwrap();
        let buttons_script = "return [...document.querySelectorAll('#nodes a.node-button')]\
                              .map(a => a.textContent)";
        tab.until(WAIT, "the page's node buttons", || async {
            tab.eval(buttons_script).await.as_array().unwrap().len() == 4
        })
        .await;
        let buttons = tab.eval(buttons_script).await;
        let name = buttons[i + 1].as_str().unwrap().to_string();
        tab.focus().await;
        browser
            .find(Locator::LinkText(&name))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        tab.wait_for_within(UP, "open", Some(&name)).await;
        assert_eq!(tab.pin().await, (name.clone(), false), "tab {}", tab.name);
        pinned.push(name);
    }
    let distinct: BTreeSet<&String> = pinned.iter().collect();
    assert_eq!(
        distinct.len(),
        3,
        "three tabs on three replicas: {pinned:?}"
    );
    tabs[0].screenshot("compose-tab-1.png").await;

    // Call API in tab 1: every tab shows the event.
    tabs[0].click("call-api").await;
    tabs[0]
        .until(WAIT, "the ping's event", || async {
            !tabs[0].events().await.is_empty()
        })
        .await;
    let ping = tabs[0].events().await[0].1;
    for tab in &tabs {
        has_each_once(tab, &[ping], WAIT).await;
    }
    run.phases.lap("checks: three tabs on three replicas");

    // Tab 1's replica is killed while 20 events go out at 10/s.
    let victim = pinned[0].clone();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut seqs = Vec::new();
            for n in 0..20u64 {
                tokio::time::sleep_until(start + Duration::from_millis(100 * n)).await;
                let (status, answer) =
                    broadcast(&the_api(), &json!({ "kill": n }), &format!("kill-{n}")).await;
                assert_eq!(status, 202, "event {n} during the kill: {answer}");
                seqs.push(answer["seq"].as_u64().unwrap());
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            seqs
        })
    };
    eventually("5 of the 20 events out", || async {
        sent.load(std::sync::atomic::Ordering::SeqCst) >= 5
    })
    .await;
    let killed = std::process::Command::new("docker")
        .args(["kill", &victim])
        .output()
        .unwrap();
    assert!(
        killed.status.success(),
        "docker kill {victim}: {}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let seqs = publisher.await.unwrap();
    tabs[0]
        .until(RECONNECT_BOUND, "tab 1 open on another replica", || async {
            let (state, node) = tabs[0].state().await;
            state == "open" && node != victim && pinned.contains(&node)
        })
        .await;
    assert_eq!(tabs[0].pin().await, (victim.clone(), true));
    for tab in &tabs {
        has_each_once(tab, &seqs, RECONNECT_BOUND).await;
    }
    tabs[0].screenshot("compose-tab-1-failed-over.png").await;
    run.phases.lap("checks: a replica killed");

    // The NATS server that leads the stream stops, then the next leader crashes: each time
    // the other two go on, and every event reaches every tab.
    for (how, verb) in [("stopped", "stop"), ("killed", "kill")] {
        let leader = stream_leader(project);
        let began = Instant::now();
        project.compose(&[verb, &leader]);
        let (seqs, first, refused) = publish_while_nats_is_down(&api, how, &began).await;
        eprintln!(
            "{leader} (the stream's leader) {how}: the first event accepted {:.1} s after, \
             {refused} refusals (503 bus_unavailable) meanwhile",
            first.as_secs_f64()
        );
        for tab in &tabs {
            has_each_once(tab, &seqs, WAIT).await;
        }
        project.compose(&["start", &leader]);
        poll_until(UP, &format!("{leader} healthy again"), || {
            project.healthy(&leader)
        });
    }
    run.phases.lap("checks: a NATS server stopped, one killed");

    // Five replicas: five distinct nodes on the page, each reachable through its URL.
    run.up(&["--scale", "ws=5"]);
    let nodes = nodes_listed(&api, 5).await;
    let ids: BTreeSet<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "{nodes:?}");
    for node in &nodes {
        let url = reachable(node["url"].as_str().unwrap());
        let client = Client::connect_url(&url).await;
        assert_eq!(client.welcome["node"], node["id"], "{url}");
    }
    let tab = &tabs[1];
    tab.focus().await;
    browser.goto(&page).await.unwrap();
    tab.until(WAIT, "five node buttons", || async {
        let shown = tab
            .eval(
                "return [...document.querySelectorAll('#nodes a.node-button')]\
                 .map(a => a.textContent).slice(1)",
            )
            .await;
        let shown: BTreeSet<&str> = shown
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        shown == ids
    })
    .await;
    tab.screenshot("compose-five-nodes.png").await;
    run.phases.lap("checks: five replicas");

    browser.close().await.unwrap();
    run.finish();
}

/// Publishes 10 broadcasts while a NATS server is `how` (stopped or killed): each until it is
/// accepted (the same Idempotency-Key each time, so a retry cannot store it twice); meanwhile
/// the API may only refuse with 503 `bus_unavailable`. The seqs, how long after `since` the
/// first was accepted, and the refusals.
async fn publish_while_nats_is_down(
    api: &Server,
    how: &str,
    since: &Instant,
) -> (Vec<u64>, Duration, usize) {
    let mut refused = 0;
    let mut first = None;
    let mut seqs = Vec::new();
    for n in 0..10u64 {
        let key = format!("nats-{how}-{n}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, answer) = broadcast(api, &json!({ "nats": how, "n": n }), &key).await;
            if status == 202 {
                first.get_or_insert_with(|| since.elapsed());
                seqs.push(answer["seq"].as_u64().unwrap());
                break;
            }
            assert_eq!(status, 503, "event {n} with a NATS server {how}: {answer}");
            assert_eq!(answer["error"]["code"], "bus_unavailable", "{answer}");
            refused += 1;
            assert!(
                Instant::now() < deadline,
                "no leader took event {n} within 60 s (a NATS server {how})"
            );
            // A publisher's own retry pace, as a publisher would.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    (seqs, first.unwrap(), refused)
}

/// The server that leads the stream's raft group, as nats-1 sees it.
fn stream_leader(project: &Project) -> String {
    let mut leader = String::new();
    poll_until(UP, "the stream's leader", || {
        let Ok(jsz) = project.try_exec(
            "nats-1",
            &["wget", "-qO-", "http://127.0.0.1:8222/jsz?streams=true"],
        ) else {
            return false;
        };
        let jsz: Value = serde_json::from_str(&jsz).unwrap_or(Value::Null);
        let found = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|account| account["stream_detail"].as_array().into_iter().flatten())
            .find(|stream| stream["name"] == "FANOUT")
            .and_then(|stream| stream["cluster"]["leader"].as_str().map(String::from));
        match found {
            Some(name) => {
                leader = name;
                true
            }
            None => false,
        }
    });
    assert!(
        project.services().contains(&leader),
        "the leader {leader} is a service of the file"
    );
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_geo_delivers_across_regions_over_tls() {
    let _serial = SERIAL.lock().await;
    geo_certificates();
    let mut run = Run::start("fanoutgeo", "docker-compose.geo.yml", &GEO_PORTS);
    let project = &run.project;
    let eu = the_api();
    let us = Server::external("127.0.0.1:8180".parse().unwrap());
    wait_ready_for(&eu, UP).await;
    wait_ready_for(&us, UP).await;
    let nodes = nodes_listed(&eu, 4).await;
    run.phases.lap("up");

    // TLS on every link: every server requires it of clients, routes and gateways, and every
    // client connection (a region's API and two replicas, each on one server of its three)
    // has it.
    for region in ["eu", "us"] {
        let mut clients = 0;
        for i in 1..=3 {
            let server = format!("nats-{region}-{i}");
            let monitor = |path: &str| -> Value {
                let url = format!("http://127.0.0.1:8222{path}");
                serde_json::from_str(&project.exec(&server, &["wget", "-qO-", &url])).unwrap()
            };
            let varz = monitor("/varz");
            assert_eq!(varz["tls_required"], true, "{server}: clients");
            assert_eq!(varz["cluster"]["tls_required"], true, "{server}: routes");
            assert_eq!(varz["gateway"]["tls_required"], true, "{server}: gateways");
            let connz = monitor("/connz");
            for connection in connz["connections"].as_array().unwrap() {
                assert!(
                    connection["tls_version"]
                        .as_str()
                        .is_some_and(|v| !v.is_empty()),
                    "{server}: a client without TLS: {connection}"
                );
                clients += 1;
            }
        }
        assert!(clients >= 3, "{region}: {clients} client connections");
    }

    // A client on a us replica, through the us edge, gets what the eu API stored.
    let us_node = nodes
        .iter()
        .find(|n| n["region"] == "us")
        .unwrap_or_else(|| panic!("no us node in {nodes:?}"));
    let url = reachable(us_node["url"].as_str().unwrap());
    assert!(url.starts_with("ws://127.0.0.1:8181/node/"), "{url}");
    let mut client = Client::connect_url(&url).await;
    assert_eq!(client.welcome["node"], us_node["id"]);
    assert_eq!(client.welcome["region"], "us");
    client.subscribe("geo-compose").await;
    let stored = publish_json(&eu, "geo-compose", &json!({ "from": "eu" })).await;
    assert_eq!(stored["region"], "eu", "{stored}");
    let event = within("the eu event on the us replica", client.event()).await;
    assert_eq!(event["channel"], "geo-compose");
    assert_eq!(event["region"], "eu");
    assert_eq!(event["seq"], stored["seq"]);
    assert_eq!(event["data"], json!({ "from": "eu" }));
    run.phases.lap("checks: eu to us over TLS");

    run.finish();
}

/// The certificates `docker-compose.geo.yml` mounts (`deploy/geo/certs`), made as its header
/// says; a CA that expires within a day is made again.
fn geo_certificates() {
    let dir = workspace().join("deploy/geo/certs");
    let ca = dir.join("ca.pem");
    let fresh = ca.exists()
        && std::process::Command::new("openssl")
            .args(["x509", "-checkend", "86400", "-noout", "-in"])
            .arg(&ca)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !fresh {
        let _ = std::fs::remove_dir_all(&dir);
    }
    succeeds(
        std::process::Command::new(workspace().join("scripts/certs.sh"))
            .arg(&dir)
            .arg("nats")
            .env(
                "EXTRA_SANS",
                "nats-eu-1,nats-eu-2,nats-eu-3,nats-us-1,nats-us-2,nats-us-3",
            ),
    );
}
