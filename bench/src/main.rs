//! `fanout-bench`: measures a real fanout tier (release builds of nats-server, fanout-api and
//! fanout-ws, all on loopback) from the outside, side by side with nats-server's native
//! WebSocket port. `fanout-bench --help` lists the commands, `fanout-bench <command> --help`
//! their options and defaults; `make bench` runs `fanout-bench suite`.
//!
//! Clients live in worker processes (`fanout-bench worker`, see [`worker`]), several when
//! needed, each from its own 127.0.0.x source address; the coordinator publishes and reads
//! CPU time from `/proc`. Results go to `target/bench/<command>.json` (and `suite.md`), or to
//! `--out FILE`.

mod bytes;
mod chaos;
mod control;
mod durability;
mod geo;
mod hist;
mod http1;
mod jetstream;
mod lifecycle;
mod load;
mod outcome;
mod presence;
mod proxy;
mod saturate;
mod scenarios;
mod soak;
mod sockudo;
mod storm;
mod suite;
mod tier;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use worker::Target;

#[derive(Parser)]
#[command(
    name = "fanout-bench",
    about = "Benchmarks a real fanout tier on loopback, side by side with nats-server's WebSocket port"
)]
struct Cli {
    /// Write the results to FILE instead of target/bench/<command>.json.
    #[arg(long, global = true, value_name = "FILE")]
    out: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Which servers a scenario runs against.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Targets {
    /// fanout over WebSocket.
    Fanout,
    /// nats-server's native WebSocket port.
    Nats,
    /// fanout, then nats-server.
    Both,
    /// fanout over server-sent events.
    Sse,
    /// fanout over long-polling.
    Poll,
    /// fanout over WebSocket, then over SSE.
    Transports,
    /// fanout over WebTransport.
    Wt,
    /// fanout over WebSocket with MessagePack frames (`fanout.msgpack`).
    Msgpack,
    /// fanout over WebSocket with JSON frames, then with MessagePack ones.
    Encodings,
    /// fanout over WebSocket in Pusher's protocol (`/app/{key}`).
    Pusher,
    /// fanout over WebSocket with JSON frames, then with permessage-deflate negotiated.
    Deflate,
    /// fanout's own protocol, then Pusher's, then Sockudo (5.2, Pusher's protocol) with the
    /// same Pusher clients.
    Dialects,
}

impl Targets {
    fn each(self) -> Vec<Target> {
        match self {
            Targets::Fanout => vec![Target::Fanout],
            Targets::Nats => vec![Target::Nats],
            Targets::Both => vec![Target::Fanout, Target::Nats],
            Targets::Sse => vec![Target::FanoutSse],
            Targets::Poll => vec![Target::FanoutPoll],
            Targets::Transports => vec![Target::Fanout, Target::FanoutSse],
            Targets::Wt => vec![Target::FanoutWt],
            Targets::Msgpack => vec![Target::FanoutMsgpack],
            Targets::Encodings => vec![Target::Fanout, Target::FanoutMsgpack],
            Targets::Pusher => vec![Target::FanoutPusher],
            Targets::Deflate => vec![Target::Fanout, Target::FanoutDeflate],
            Targets::Dialects => vec![Target::Fanout, Target::FanoutPusher, Target::Sockudo],
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// What `make bench` runs: every scenario, the table (suite.md) and the JSON (suite.json).
    Suite {
        /// Shorter runs (a smoke test of the suite).
        #[arg(long)]
        quick: bool,
        /// Only these scenarios (comma-separated; all when not given).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<scenarios::Scenario>,
    },
    /// Fan-out: clients over nodes, `rate` events/s for `duration` seconds.
    Fanout {
        #[arg(long, default_value_t = 300)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Events per second, spread over the channels.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Bytes of payload per event.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Many channels: each client in a channel of its own plus one of N shared ones (0: one
        /// channel for all).
        #[arg(long, default_value_t = 0)]
        shared: usize,
        /// The ws nodes coalesce a channel's events for this many milliseconds
        /// (`FANOUT_COALESCE_MS`; 0: none).
        #[arg(long = "coalesce", default_value_t = 0)]
        coalesce_ms: u64,
        /// Publish in ticks of this many milliseconds (0: one event at a time).
        #[arg(long, default_value_t = 0)]
        tick_ms: u64,
        /// Runtime threads in every server process, nats-server's included (0: their default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// fanout's events are volatile (`/volatile`: not stored; datagrams over WebTransport).
        #[arg(long)]
        volatile: bool,
        #[arg(long, value_enum, default_value_t = Targets::Both)]
        target: Targets,
    },
    /// Idle memory: RSS growth per held connection on each node.
    Idle {
        #[arg(long, default_value_t = 45_000)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, value_enum, default_value_t = Targets::Both)]
        target: Targets,
    },
    /// A node's clients thrown at the rest of the tier: `kill -9` of the busiest node, then a
    /// rolling restart, with 100,000 clients by default; time until every client is back and
    /// resumed, events missed, bystanders' latency, every node's RSS.
    Storm(storm::Params),
    /// A tier in network namespaces (3 NATS R3, 2 APIs, 4 ws nodes) under a seeded random
    /// schedule of kills, pauses, partitions and restarts; a checker of every acknowledged
    /// event, presence and memory. Needs root.
    Chaos(chaos::Params),
    /// Connect storm: clients connecting as fast as they can.
    ConnectStorm {
        #[arg(long, default_value_t = 15_000)]
        clients: usize,
        #[arg(long, value_enum, default_value_t = Targets::Both)]
        target: Targets,
    },
    /// Join storm: `storm` clients joining channels of their own while `clients` receive.
    Joinstorm {
        #[arg(long, default_value_t = 300)]
        clients: usize,
        #[arg(long, default_value_t = 12_000)]
        storm: usize,
        #[arg(long, default_value_t = 100)]
        rate: u64,
    },
    /// The API alone: acknowledged events/s with closed-loop publishers.
    Publish {
        #[arg(long, default_value_t = 16)]
        publishers: usize,
        /// Events per `/v1/batch` (0: one POST per event).
        #[arg(long, default_value_t = 0)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        duration: u64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Pusher's publish path: `POST /apps/{id}/events`, signed, `publishers` connections one
    /// event at a time, against fanout's API (acknowledged when stored) and Sockudo's.
    PusherPublish {
        #[arg(long, default_value_t = 16)]
        publishers: usize,
        #[arg(long, default_value_t = 5)]
        duration: u64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// fanout, sockudo, or both (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [String::from("fanout"), String::from("sockudo")])]
        target: Vec<String>,
    },
    /// Bytes on the wire per delivery, measured on the socket: JSON and MessagePack, each
    /// with permessage-deflate, fossil deltas and both; the football-match workload
    /// (re-created) and the usual payload, beside Centrifugo's published percentages.
    Bytes {
        /// Events per workload and mode.
        #[arg(long, default_value_t = 30)]
        messages: usize,
    },
    /// What an acknowledgement costs on disk: the API's publish rate and latency with
    /// nats-server's `sync_interval` default and `always`, R1 and R3, single and batched.
    Durability {
        /// Seconds per measurement (three per configuration, four configurations).
        #[arg(long, default_value_t = 5)]
        duration: u64,
    },
    /// JetStream alone: acknowledged publishes/s on one NATS connection (the API's ceiling).
    Jetstream {
        #[arg(long, default_value_t = 16)]
        publishers: usize,
        /// Publishes each publisher keeps in flight.
        #[arg(long, default_value_t = 256)]
        window: usize,
        #[arg(long, default_value_t = 5)]
        duration: u64,
        #[arg(long, default_value_t = 100)]
        payload: usize,
    },
    /// Lifecycle webhooks end to end: joins as fast as they come, then paced leaves; events
    /// delivered per second and the time from a leave to its `channel_vacated` webhook.
    Lifecycle {
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Leaves per second.
        #[arg(long, default_value_t = 200)]
        leave_rate: u64,
    },
    /// The app's backend in the loop: connect p50/p99 with the connect hook off and on, rpc
    /// round trips, and one user's connections over the nodes disconnected at once.
    Control {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Connects measured (one after another) each way.
        #[arg(long, default_value_t = 2000)]
        connects: usize,
        #[arg(long, default_value_t = 5000)]
        rpcs: usize,
        /// Connections of the user disconnected.
        #[arg(long, default_value_t = 1000)]
        users: usize,
    },
    /// Presence queries over a channel with many members.
    Presence {
        #[arg(long, default_value_t = 100_000)]
        members: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Closed-loop saturation of the fan-out.
    Saturate(saturate::Params),
    /// Saturation twice, tracing off then on (OTLP export, sampling 1.0), and the ratio.
    Tracing(saturate::Params),
    /// Two regions on loopback, the gateways through delay proxies.
    Geo {
        /// The WAN's delay each way.
        #[arg(long, default_value_t = 40)]
        delay_ms: u64,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// The streams' replicas.
        #[arg(long, default_value_t = 3)]
        replicas: usize,
    },
    /// A WAN link on loopback: each LISTEN port forwarded to TARGET with a delay.
    DelayProxy {
        #[arg(long, default_value_t = 40)]
        delay_ms: u64,
        /// LISTEN=TARGET pairs, comma-separated (ports or host:port).
        #[arg(long, value_name = "LISTEN=TARGET,...")]
        pairs: String,
    },
    /// Hours of churn in minutes: steady clients, churning ones, memory and descriptors.
    SoakChurn {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 30)]
        churners: usize,
        /// Draw RSS over time into this SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<String>,
    },
    /// Hostile clients: frames announced and never finished, against the node's budget.
    Hostile {
        #[arg(long, default_value_t = 3000)]
        connections: usize,
        /// The length each frame announces.
        #[arg(long, default_value_t = 64_000)]
        announce: usize,
    },
    /// A worker process holding clients (started by the coordinator with its job as JSON).
    #[command(hide = true)]
    Worker { job: String },
    /// A worker of `storm`: clients that reconnect and resume (its job as JSON).
    #[command(hide = true)]
    StormWorker { job: String },
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Suite { .. } => "suite",
            Command::Fanout { .. } => "fanout",
            Command::Idle { .. } => "idle",
            Command::Storm(_) => "storm",
            Command::Chaos(_) => "chaos",
            Command::ConnectStorm { .. } => "connect-storm",
            Command::StormWorker { .. } => "storm-worker",
            Command::Joinstorm { .. } => "joinstorm",
            Command::Publish { .. } => "publish",
            Command::PusherPublish { .. } => "pusher-publish",
            Command::Bytes { .. } => "bytes",
            Command::Jetstream { .. } => "jetstream",
            Command::Durability { .. } => "durability",
            Command::Presence { .. } => "presence",
            Command::Lifecycle { .. } => "lifecycle",
            Command::Control { .. } => "control",
            Command::Saturate(_) => "saturate",
            Command::Tracing(_) => "tracing",
            Command::Geo { .. } => "geo",
            Command::DelayProxy { .. } => "delay-proxy",
            Command::SoakChurn { .. } => "soak-churn",
            Command::Hostile { .. } => "hostile",
            Command::Worker { .. } => "worker",
        }
    }
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker { job } => {
            let job = serde_json::from_str(&job).expect("a worker needs its job as JSON");
            worker::run(job);
        }
        Command::StormWorker { job } => {
            let job = serde_json::from_str(&job).expect("a worker needs its job as JSON");
            storm::work(job);
        }
        command => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(coordinate(command, cli.out));
        }
    }
}

fn label(target: Target) -> &'static str {
    match target {
        Target::Fanout => "fanout",
        Target::FanoutSse => "fanout SSE",
        Target::FanoutWt => "fanout WT",
        Target::FanoutMsgpack => "fanout msgpack",
        Target::FanoutPusher => "fanout Pusher",
        Target::FanoutDeflate => "fanout deflate",
        Target::Sockudo => "Sockudo",
        Target::FanoutPoll => "fanout long-poll",
        Target::Nats => "NATS",
    }
}

async fn coordinate(command: Command, out: Option<PathBuf>) {
    let name = command.name();
    if let Command::DelayProxy { delay_ms, pairs } = &command {
        return proxy::run(pairs, std::time::Duration::from_millis(*delay_ms)).await;
    }
    let paths = tier::Paths::find();
    let results: Value = match command {
        Command::Suite { quick, only } => {
            let (results, table) = scenarios::run(&paths, quick, &only).await;
            println!("\n{table}");
            write("suite.md", &table);
            results
        }
        Command::Fanout {
            clients,
            nodes,
            rate,
            duration,
            payload,
            shared,
            coalesce_ms,
            tick_ms,
            threads,
            volatile,
            target,
        } => {
            let spec = suite::Spec {
                clients,
                nodes,
                rate,
                secs: duration,
                payload,
                shared,
                coalesce_ms,
                tick_ms,
                threads,
                volatile,
            };
            println!("fan-out: {spec:?}");
            let mut results = serde_json::Map::new();
            for target in target.each() {
                let run = suite::fan_out(&paths, spec, target).await;
                suite::describe(label(target), &run);
                results.insert(label(target).into(), run.json());
            }
            Value::Object(results)
        }
        Command::Idle {
            clients,
            nodes,
            target,
        } => {
            let mut results = serde_json::Map::new();
            for target in target.each() {
                let r = suite::idle(&paths, target, clients, nodes).await;
                println!("{} {r:?}", label(target));
                results.insert(label(target).into(), json!(r));
            }
            Value::Object(results)
        }
        Command::Storm(params) => json!(storm::run(&paths, params).await),
        Command::Chaos(params) => json!(chaos::run(&paths, params).await),
        Command::ConnectStorm { clients, target } => {
            let mut results = serde_json::Map::new();
            for target in target.each() {
                let r = suite::storm(&paths, target, clients).await;
                println!("{} {r:?}", label(target));
                results.insert(label(target).into(), json!(r));
            }
            Value::Object(results)
        }
        Command::Joinstorm {
            clients,
            storm,
            rate,
        } => json!(suite::join_storm(&paths, clients, storm, rate).await),
        Command::Publish {
            publishers,
            batch,
            duration,
            payload,
        } => {
            let r = suite::publish(&paths, publishers, batch, duration, payload).await;
            println!("{r:?}");
            json!(r)
        }
        Command::Bytes { messages } => json!(bytes::run(&paths, messages).await),
        Command::PusherPublish {
            publishers,
            duration,
            payload,
            target,
        } => {
            let mut rows = serde_json::Map::new();
            for server in &target {
                let sockudo = match server.as_str() {
                    "fanout" => false,
                    "sockudo" => true,
                    other => panic!("--target is fanout or sockudo, not {other:?}"),
                };
                let r = suite::pusher_publish(&paths, sockudo, publishers, duration, payload).await;
                println!(
                    "  {server:<8} {:>8.0} events/s acknowledged ({} errors)  p50 {:.2} p99 {:.2} ms  \
                     server CPU {:.1} µs/event",
                    r.acked_per_sec,
                    r.errors,
                    r.request_ms.p50,
                    r.request_ms.p99,
                    r.server_cpu_us_per_event
                );
                rows.insert(server.clone(), json!(r));
            }
            Value::Object(rows)
        }
        Command::Jetstream {
            publishers,
            window,
            duration,
            payload,
        } => {
            let r = jetstream::baseline(publishers, window, duration, payload).await;
            println!("{r:?}");
            json!(r)
        }
        Command::Presence { members, nodes } => json!(presence::run(members, nodes).await),
        Command::Durability { duration } => json!(durability::run(&paths, duration).await),
        Command::Control {
            nodes,
            connects,
            rpcs,
            users,
        } => {
            let r = control::run(&paths, nodes, connects, rpcs, users).await;
            println!("{r:?}");
            json!(r)
        }
        Command::Lifecycle {
            clients,
            nodes,
            leave_rate,
        } => {
            let r = lifecycle::run(&paths, clients, nodes, leave_rate).await;
            println!("{r:?}");
            json!(r)
        }
        Command::Geo {
            delay_ms,
            clients,
            rate,
            duration,
            replicas,
        } => geo::run(&paths, delay_ms, clients, rate, duration, replicas).await,
        Command::Saturate(params) => saturate::run(&paths, "saturate", params).await,
        Command::Tracing(params) => saturate::run(&paths, "tracing", params).await,
        Command::SoakChurn {
            minutes,
            rate,
            churners,
            plot,
        } => soak::churn(&paths, minutes, rate, churners, plot.as_deref()).await,
        Command::Hostile {
            connections,
            announce,
        } => soak::hostile(&paths, connections, announce).await,
        Command::DelayProxy { .. } | Command::Worker { .. } | Command::StormWorker { .. } => {
            unreachable!("handled above")
        }
    };
    let text = serde_json::to_string_pretty(&json!(results)).expect("JSON");
    let file = match out {
        Some(path) => {
            std::fs::write(&path, &text).expect("the --out file");
            path
        }
        None => write(&format!("{name}.json"), &text),
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
