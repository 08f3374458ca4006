//! `fanout-bench`: measures a real fanout tier (release builds of nats-server, fanout-api and
//! fanout-ws, all on loopback) from the outside, side by side with nats-server's native
//! WebSocket port.
//!
//! ```text
//! fanout-bench suite [--quick]           # what `make bench` runs: every scenario, a table, JSON
//! fanout-bench fanout   [--clients 300] [--nodes 3] [--rate 100] [--duration 10] [--payload 100] [--shared 0] [--coalesce 0] [--target both]
//! fanout-bench idle     [--clients 45000] [--nodes 3] [--target both]
//! fanout-bench storm    [--clients 15000] [--target both]
//! fanout-bench joinstorm [--clients 300] [--storm 12000] [--rate 100]
//! fanout-bench publish  [--publishers 16] [--batch 0] [--duration 5] [--payload 100]
//! fanout-bench jetstream [--publishers 16] [--window 256] [--duration 5] [--payload 100]
//! fanout-bench presence [--members 100000] [--nodes 3]
//! fanout-bench saturate | tracing [...]   # closed-loop saturation, tracing off vs on
//! fanout-bench geo      [--delay-ms 40] [--clients 50] [--rate 100] [--duration 10] [--replicas 3]
//! fanout-bench delay-proxy --delay-ms 40 --pairs LISTEN=TARGET,...   # a WAN link on loopback
//! fanout-bench soak-churn [--minutes 30] [--rate 200] [--churners 30] [--plot FILE.svg] [--out FILE.json]
//! fanout-bench hostile  [--connections 3000] [--announce 64000]
//! ```
//!
//! `--shared N` turns fan-out into "many channels": each client in its own channel plus one
//! of N shared ones. `--target` is `fanout`, `nats`, `both`, `sse` (fanout over server-sent
//! events), `poll` (fanout over long-polling) or `transports` (fanout over WebSocket, then SSE).
//!
//! Clients live in worker processes (`fanout-bench worker`, see [`worker`]), several when
//! needed, each from its own 127.0.0.x source address; the coordinator publishes and reads
//! CPU time from `/proc`. Results go to `target/bench/<command>.json` (and `suite.md`).

mod geo;
mod hist;
mod http1;
mod jetstream;
mod load;
mod presence;
mod proxy;
mod saturate;
mod soak;
mod suite;
mod tier;
mod worker;

use std::collections::HashMap;

use serde_json::{Value, json};
use worker::Target;

const USAGE: &str = "usage: fanout-bench suite [--quick] | fanout | idle | storm | joinstorm | publish | jetstream | presence | saturate | tracing | geo | delay-proxy | soak-churn | hostile [options]; see bench/src/main.rs";

/// `--name value` options, as numbers, with `--target` and flags kept as text.
struct Options(HashMap<String, String>);

impl Options {
    fn parse(args: &[String]) -> Options {
        let mut map = HashMap::new();
        let mut i = 0;
        while i < args.len() {
            let key = args[i].trim_start_matches("--").to_string();
            match args.get(i + 1) {
                Some(value) if !value.starts_with("--") => {
                    map.insert(key, value.clone());
                    i += 2;
                }
                _ => {
                    map.insert(key, "true".into());
                    i += 1;
                }
            }
        }
        Options(map)
    }

    fn num(&self, key: &str, default: usize) -> usize {
        self.0.get(key).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("fanout-bench: --{key} needs a number\n{USAGE}");
                std::process::exit(2)
            })
        })
    }

    fn targets(&self) -> Vec<Target> {
        match self.0.get("target").map(String::as_str) {
            None | Some("both") => vec![Target::Fanout, Target::Nats],
            Some("fanout") => vec![Target::Fanout],
            Some("nats") => vec![Target::Nats],
            Some("sse") => vec![Target::FanoutSse],
            Some("poll") => vec![Target::FanoutPoll],
            Some("transports") => vec![Target::Fanout, Target::FanoutSse],
            Some(other) => {
                eprintln!("fanout-bench: unknown target {other}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    if command == "worker" {
        let job = serde_json::from_str(rest.first().map_or("", String::as_str))
            .expect("a worker needs its job as JSON");
        worker::run(job);
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if command == "delay-proxy" {
        let o = Options::parse(rest);
        let pairs = o.0.get("pairs").cloned().unwrap_or_default();
        let delay = std::time::Duration::from_millis(o.num("delay-ms", 40) as u64);
        runtime.block_on(proxy::run(&pairs, delay));
        return;
    }
    runtime.block_on(coordinate(command, rest));
}

async fn coordinate(command: &str, rest: &[String]) {
    let paths = tier::Paths::find();
    let o = Options::parse(rest);
    let label = |t: Target| match t {
        Target::Fanout => "fanout",
        Target::FanoutSse => "fanout SSE",
        Target::FanoutPoll => "fanout long-poll",
        Target::Nats => "NATS",
    };
    let results: Value = match command {
        "suite" => {
            let (results, table) = suite::run(&paths, o.0.contains_key("quick")).await;
            println!("\n{table}");
            write("suite.md", &table);
            results
        }
        "fanout" => {
            let spec = suite::Spec {
                clients: o.num("clients", 300),
                nodes: o.num("nodes", 3),
                rate: o.num("rate", 100) as u64,
                secs: o.num("duration", 10) as u64,
                payload: o.num("payload", 100),
                shared: o.num("shared", 0),
                coalesce_ms: o.num("coalesce", 0) as u64,
                tick_ms: o.num("tick-ms", 0) as u64,
                threads: o.num("threads", 0),
            };
            println!("fan-out: {spec:?}");
            let mut results = serde_json::Map::new();
            for target in o.targets() {
                let run = suite::fan_out(&paths, spec, target).await;
                suite::describe(label(target), &run);
                results.insert(label(target).into(), run.json());
            }
            Value::Object(results)
        }
        "idle" => {
            let mut results = serde_json::Map::new();
            for target in o.targets() {
                let r =
                    suite::idle(&paths, target, o.num("clients", 45_000), o.num("nodes", 3)).await;
                println!("{} {r}", label(target));
                results.insert(label(target).into(), r);
            }
            Value::Object(results)
        }
        "storm" => {
            let mut results = serde_json::Map::new();
            for target in o.targets() {
                let r = suite::storm(&paths, target, o.num("clients", 15_000)).await;
                println!("{} {r}", label(target));
                results.insert(label(target).into(), r);
            }
            Value::Object(results)
        }
        "joinstorm" => {
            suite::join_storm(
                &paths,
                o.num("clients", 300),
                o.num("storm", 12_000),
                o.num("rate", 100) as u64,
            )
            .await
        }
        "publish" => {
            let r = suite::publish(
                &paths,
                o.num("publishers", 16),
                o.num("batch", 0),
                o.num("duration", 5) as u64,
                o.num("payload", 100),
            )
            .await;
            println!("{r}");
            r
        }
        "jetstream" => {
            let r = jetstream::baseline(
                o.num("publishers", 16),
                o.num("window", 256),
                o.num("duration", 5) as u64,
                o.num("payload", 100),
            )
            .await;
            println!("{r}");
            r
        }
        "presence" => presence::run(o.num("members", 100_000), o.num("nodes", 3)).await,
        "geo" => {
            geo::run(
                &paths,
                o.num("delay-ms", 40) as u64,
                o.num("clients", 50),
                o.num("rate", 100) as u64,
                o.num("duration", 10) as u64,
                o.num("replicas", 3),
            )
            .await
        }
        "saturate" | "tracing" => saturate::run(&paths, command, rest).await,
        "soak-churn" => {
            let minutes = o.0.get("minutes").map_or(30.0, |m| {
                m.parse().unwrap_or_else(|_| {
                    eprintln!("fanout-bench: --minutes needs a number\n{USAGE}");
                    std::process::exit(2)
                })
            });
            soak::churn(
                &paths,
                minutes,
                o.num("rate", 200) as u64,
                o.num("churners", 30),
                o.0.get("plot").map(String::as_str),
            )
            .await
        }
        "hostile" => {
            soak::hostile(
                &paths,
                o.num("connections", 3000),
                o.num("announce", 64_000),
            )
            .await
        }
        other => {
            eprintln!("fanout-bench: unknown command {other}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let text = serde_json::to_string_pretty(&json!(results)).unwrap();
    // `--out FILE`: the results there instead (a test's own copy).
    let file = match o.0.get("out") {
        Some(path) => {
            std::fs::write(path, &text).unwrap();
            std::path::PathBuf::from(path)
        }
        None => write(&format!("{command}.json"), &text),
    };
    println!("results: {}", file.display());
}

/// Writes `target/bench/<name>`.
fn write(name: &str, contents: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join(name);
    std::fs::write(&file, contents).unwrap();
    file
}
