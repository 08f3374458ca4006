//! What an acknowledgement costs on disk: the API's publish rate and latency with
//! nats-server's `sync_interval` at its default (the store is fsynced every 2 minutes; an
//! acknowledged write may sit in the page cache until then) and at `always` (fsynced before
//! every acknowledgement), for one replica on one server and three replicas on a three-server
//! cluster; one event per request (one publisher: the latency alone; 16: the rate) and
//! `/v1/batch` of 100.
//!
//! Everything runs on this machine's disk: the figures say what `always` costs relative to the
//! default here, not what a given production disk does.

use std::time::Duration;

use serde::Serialize;

use crate::{
    load,
    outcome::Quantiles,
    tier::{self, ClusterOptions, NatsCluster, NatsServer, Paths},
};

/// One configuration's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Durability {
    /// `default` (every 2 minutes) or `always`.
    pub sync: &'static str,
    pub replicas: usize,
    /// One publisher, one event per request: what one acknowledgement takes.
    pub single_ms: Quantiles,
    pub single_per_sec: f64,
    /// 16 publishers, one event per request.
    pub concurrent_per_sec: f64,
    pub concurrent_ms: Quantiles,
    /// 4 publishers, `/v1/batch` of 100 events.
    pub batched_per_sec: f64,
    pub batch_ms: Quantiles,
    pub errors: u64,
}

/// NATS as the configuration has it: one server or a cluster of three.
enum Nats {
    One(NatsServer),
    Three(NatsCluster),
}

impl Nats {
    fn start(replicas: usize, always: bool) -> Nats {
        let sync = if always { "sync_interval: always" } else { "" };
        match replicas {
            1 => Nats::One(NatsServer::start_conf(
                &[],
                always.then_some("jetstream { sync_interval: always }\n"),
            )),
            _ => Nats::Three(NatsCluster::start_with(
                3,
                ClusterOptions {
                    jetstream: true,
                    jetstream_extra: sync.to_string(),
                    ..ClusterOptions::default()
                },
            )),
        }
    }

    fn url(&self) -> String {
        match self {
            Nats::One(server) => server.url(),
            Nats::Three(cluster) => cluster.urls(0),
        }
    }
}

/// Every configuration, `secs` seconds per measurement.
pub async fn run(paths: &Paths, secs: u64) -> Vec<Durability> {
    let mut results = Vec::new();
    for replicas in [1, 3] {
        for always in [false, true] {
            let result = one(paths, replicas, always, secs).await;
            eprintln!("{result:?}");
            results.push(result);
        }
    }
    print_table(&results);
    results
}

async fn one(paths: &Paths, replicas: usize, always: bool, secs: u64) -> Durability {
    let nats = Nats::start(replicas, always);
    let env = [
        ("FANOUT_NATS_URL".to_string(), nats.url()),
        ("FANOUT_HISTORY_REPLICAS".to_string(), replicas.to_string()),
        ("FANOUT_HISTORY_MAX_AGE_SECS".to_string(), "120".to_string()),
    ];
    let api = tier::start_fanout(paths, "fanout-api", "api-durability", &env);
    let url = format!("http://{}", api.addr);
    tier::wait_ready(&api.addr).await;
    let duration = Duration::from_secs(secs);
    // Warm the stream (its leader elected, its files made) before measuring.
    load::publish_closed_loop(&url, 1, 0, Duration::from_secs(1), 100).await;
    let (single, e1, single_hist) = load::publish_closed_loop(&url, 1, 0, duration, 100).await;
    let (concurrent, e2, concurrent_hist) =
        load::publish_closed_loop(&url, 16, 0, duration, 100).await;
    let (batched, e3, batch_hist) = load::publish_closed_loop(&url, 4, 100, duration, 100).await;
    drop(api);
    drop(nats);
    let rate = |n: u64| n as f64 / secs as f64;
    Durability {
        sync: if always { "always" } else { "default" },
        replicas,
        single_ms: Quantiles::of(&single_hist),
        single_per_sec: rate(single),
        concurrent_per_sec: rate(concurrent),
        concurrent_ms: Quantiles::of(&concurrent_hist),
        batched_per_sec: rate(batched),
        batch_ms: Quantiles::of(&batch_hist),
        errors: e1 + e2 + e3,
    }
}

fn print_table(results: &[Durability]) {
    println!(
        "| replicas | sync_interval | 1 publisher: ev/s, p50 / p99 ms | 16 publishers: ev/s, p50 / p99 ms | batches of 100 (4 publishers): ev/s, p50 / p99 ms per batch | errors |"
    );
    println!("|---|---|---|---|---|---|");
    for r in results {
        println!(
            "| R{} | {} | {:.0}, {:.2} / {:.2} | {:.0}, {:.2} / {:.2} | {:.0}, {:.2} / {:.2} | {} |",
            r.replicas,
            r.sync,
            r.single_per_sec,
            r.single_ms.p50,
            r.single_ms.p99,
            r.concurrent_per_sec,
            r.concurrent_ms.p50,
            r.concurrent_ms.p99,
            r.batched_per_sec,
            r.batch_ms.p50,
            r.batch_ms.p99,
            r.errors
        );
    }
}
