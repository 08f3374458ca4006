//! Starting the real processes a benchmark measures (release builds of fanout-api and
//! fanout-ws, nats-server; the launchers are the test kit's, [`fanout_testkit`]), and what
//! only the benchmark reads of them: how far the baseline's routes carried interest, and
//! nats-server's own counters.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

pub use fanout_testkit::{
    NatsCluster, NatsServer, Process, Supercluster,
    nats::ClusterOptions,
    process::{cpu_seconds, rss_kib},
};
use fanout_testkit::{binary, nats::nats_server_bin};

/// The binaries a benchmark runs, checked once: where they are.
pub struct Paths {
    pub bin: PathBuf,
}

impl Paths {
    pub fn find() -> Paths {
        let nats_server = nats_server_bin();
        assert!(
            nats_server.exists(),
            "{} is missing: run `make bench`",
            nats_server.display()
        );
        let api = binary("fanout-api");
        binary("fanout-ws");
        Paths {
            bin: api.parent().expect("a folder").to_path_buf(),
        }
    }
}

/// Starts a fanout binary with `env`, as `name` on a free port, and waits for the address it
/// logs. Its log goes to `target/bench/logs/<name>.log`, for a look after the run.
pub fn start_fanout(paths: &Paths, binary: &str, name: &str, env: &[(String, String)]) -> Process {
    start_fanout_at(paths, binary, name, env, "127.0.0.1:0")
}

/// [`start_fanout`] listening on `listen` (a fixed port: a restart keeps it).
pub fn start_fanout_at(
    paths: &Paths,
    binary: &str,
    name: &str,
    env: &[(String, String)],
    listen: &str,
) -> Process {
    let logs = paths.bin.join("../bench/logs");
    let _ = std::fs::create_dir_all(&logs);
    Process::launch(binary)
        .env("RUST_LOG", "warn,fanout_api=info,fanout_ws=info")
        .envs(env.iter().cloned())
        .env("FANOUT_NODE_ID", name)
        .env("FANOUT_LISTEN", listen)
        .log_to(logs.join(format!("{name}.log")))
        .start()
}

/// Until `addr`'s `/readyz` answers 200.
pub async fn wait_ready(addr: &str) {
    fanout_testkit::http::wait_ready(addr, Duration::from_secs(60)).await
}

/// The JSON of `GET http://127.0.0.1:<port><path>` (`Null` when none).
fn http_get(port: u16, path: &str) -> serde_json::Value {
    fanout_testkit::http::get_blocking(&format!("127.0.0.1:{port}"), path)
        .map(|a| a.json())
        .unwrap_or_default()
}

/// Waits until node 0 of a [`NatsCluster`] has heard, over its routes,
/// of every subject subscribed on the other nodes (`wanted[r]`: node r's subjects). Interest
/// travels between servers asynchronously: a client's `PONG` proves only that its own server
/// has its subscription, so a publisher on node 0 that starts before the routes carried it
/// loses the first events of every client elsewhere (the `missing` the baseline once showed).
/// Returns how long it waited.
pub fn wait_route_interest(
    monitor: &[u16],
    wanted: &[std::collections::HashSet<String>],
) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let routes = http_get(monitor[0], "/routez?subs=1");
        let mut heard: Vec<std::collections::HashSet<&str>> =
            vec![Default::default(); wanted.len()];
        for route in routes["routes"].as_array().into_iter().flatten() {
            let Some(r) = route["remote_name"]
                .as_str()
                .and_then(|name| name.strip_prefix('n'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|r| *r < wanted.len())
            else {
                continue;
            };
            for subject in route["subscriptions_list"].as_array().into_iter().flatten() {
                if let Some(subject) = subject.as_str() {
                    heard[r].insert(subject);
                }
            }
        }
        let complete = wanted
            .iter()
            .zip(&heard)
            .skip(1)
            .all(|(want, got)| want.iter().all(|s| got.contains(s.as_str())));
        if complete {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never heard every subscription"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nats-server's own counters (`/varz`) that explain lost deliveries.
pub fn nats_counters(monitor: &[u16]) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = monitor
        .iter()
        .map(|port| {
            let v = http_get(*port, "/varz");
            serde_json::json!({"slow_consumers": v["slow_consumers"], "in_msgs": v["in_msgs"],
                "out_msgs": v["out_msgs"], "connections": v["connections"]})
        })
        .collect();
    serde_json::Value::Array(nodes)
}

/// Sockets in TIME_WAIT here (`/proc/net/sockstat`), if it can be read.
fn time_wait() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let tcp = stat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = tcp.split_whitespace();
    words.find(|w| *w == "tw")?;
    words.next()?.parse().ok()
}

/// Waits (at most 90 s) until earlier runs' connections have left TIME_WAIT. A connect storm
/// started while the kernel still holds up to 131,072 of them binds its source ports slowly:
/// one run measured 420 connections/s where a drained machine gives about 18,000. Returns
/// how long it waited.
pub async fn wait_time_wait_drained() -> Duration {
    let started = Instant::now();
    while time_wait().is_some_and(|n| n > 1000) && started.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started.elapsed()
}
