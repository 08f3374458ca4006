//! The scenarios, each run against fanout and (fan-out, idle, storm) against nats-server's
//! native WebSocket port, and the suite that `make bench` runs.

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};

use crate::{
    hist::Histogram,
    load::{self, Workers},
    tier::{self, NatsCluster, NatsServer, Paths, Process},
    worker::{Mode, Target},
};

/// fanout's processes: nats-server (JetStream), the API, the ws nodes.
pub struct FanoutTier {
    pub nats: NatsServer,
    pub api: Process,
    pub nodes: Vec<Process>,
}

impl FanoutTier {
    pub async fn start(paths: &Paths, nodes: usize) -> FanoutTier {
        Self::start_with(paths, nodes, &[]).await
    }

    /// With extra settings for fanout's processes.
    pub async fn start_with(paths: &Paths, nodes: usize, extra: &[(String, String)]) -> FanoutTier {
        Self::start_threads(paths, nodes, extra, 0).await
    }

    /// `threads` > 0: that many runtime threads in every process, nats-server's included
    /// (`FANOUT_WORKER_THREADS`, `GOMAXPROCS`).
    pub async fn start_threads(
        paths: &Paths,
        nodes: usize,
        extra: &[(String, String)],
        threads: usize,
    ) -> FanoutTier {
        let nats = tier::start_nats(&gomaxprocs(threads));
        let mut env = vec![
            ("FANOUT_NATS_URL".to_string(), nats.url()),
            ("FANOUT_HISTORY_MAX_AGE_SECS".to_string(), "120".to_string()),
        ];
        env.extend(extra.iter().cloned());
        if threads > 0 {
            env.push(("FANOUT_WORKER_THREADS".into(), threads.to_string()));
        }
        // Settings to try: FANOUT_BENCH_ENV="FANOUT_QUEUE_CAPACITY=4096,FANOUT_HISTORY_STORAGE=memory".
        if let Ok(extra) = std::env::var("FANOUT_BENCH_ENV") {
            env.extend(extra.split(',').filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_string(), v.trim().to_string()))
            }));
        }
        let api = tier::start_fanout(paths, "fanout-api", "api-1", &env);
        let nodes: Vec<Process> = (1..=nodes)
            .map(|i| tier::start_fanout(paths, "fanout-ws", &format!("ws-{i}"), &env))
            .collect();
        tier::wait_ready(&api.addr).await;
        for node in &nodes {
            tier::wait_ready(&node.addr).await;
        }
        FanoutTier { nats, api, nodes }
    }

    /// The process ids of the ws nodes, the API and nats-server, in that order.
    pub fn servers(&self) -> Vec<u32> {
        let nodes = self.nodes.iter().map(|n| n.child.id());
        nodes
            .chain([self.api.child.id(), self.nats.pid()])
            .collect()
    }

    pub fn ws_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("ws://{}/ws", n.addr))
            .collect()
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api.addr)
    }
}

/// The baseline: nats-server nodes in a cluster, each with a WebSocket port.
pub struct NatsTier {
    pub cluster: NatsCluster,
    pub clients: Vec<String>,
    pub ws: Vec<String>,
    pub monitor: Vec<u16>,
}

/// nats-server's environment for `threads` runtime threads (0: its default).
fn gomaxprocs(threads: usize) -> Vec<(String, String)> {
    if threads == 0 {
        return Vec::new();
    }
    vec![("GOMAXPROCS".into(), threads.to_string())]
}

impl NatsTier {
    pub fn start(nodes: usize) -> NatsTier {
        Self::start_threads(nodes, 0)
    }

    pub fn start_threads(nodes: usize, threads: usize) -> NatsTier {
        let cluster = NatsCluster::start_with(
            nodes,
            tier::ClusterOptions {
                websocket: true,
                env: gomaxprocs(threads),
                ..Default::default()
            },
        );
        NatsTier {
            clients: cluster.client_urls(),
            ws: cluster.ws_urls(),
            monitor: cluster.monitor_ports.clone(),
            cluster,
        }
    }
}

fn cpu(pids: &[u32]) -> f64 {
    pids.iter().copied().map(tier::cpu_seconds).sum()
}

fn self_cpu() -> f64 {
    tier::cpu_seconds(std::process::id())
}

/// A fan-out run: `clients` over `nodes`, `rate` events/s for `secs`.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub clients: usize,
    pub nodes: usize,
    pub rate: u64,
    pub secs: u64,
    pub payload: usize,
    /// 0: one channel. Otherwise each client in its own channel plus one of `shared`.
    pub shared: usize,
    /// fanout's `FANOUT_COALESCE_MS`.
    pub coalesce_ms: u64,
    /// Runtime threads per server process, on both sides (0: each one's default).
    pub threads: usize,
    /// 0: fanout's publisher POSTs each event on its own, NATS's publishes each. N: both
    /// release what came due every N ms, together (fanout: one `/v1/batch`; NATS: the
    /// publishes, then one flush).
    pub tick_ms: u64,
}

#[derive(Debug, Default)]
pub struct FanOut {
    pub published: u64,
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub lost: usize,
    pub seconds: f64,
    pub server_cpu: f64,
    pub loadgen_cpu: f64,
    pub latency: Histogram,
    /// fanout only: HTTP acknowledgement times.
    pub acks: Option<Histogram>,
    /// NATS only: nats-server's own counters after the run, and how long the routes took
    /// to carry every subscription to the publisher's server.
    pub nats: Option<Value>,
    /// Server CPU seconds per process (fanout: the ws nodes, the API, nats-server; NATS: its
    /// nodes).
    pub by_process: Vec<f64>,
}

impl FanOut {
    pub fn per_second(&self) -> f64 {
        self.received as f64 / self.seconds
    }
    /// Server CPU time per delivery, µs.
    pub fn cpu_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.received.max(1) as f64
    }
    pub fn json(&self) -> Value {
        let l = &self.latency;
        json!({
            "published": self.published, "expected_deliveries": self.expected,
            "deliveries": self.received, "deliveries_per_sec": self.per_second(),
            "missing": self.missing, "duplicates": self.duplicates, "connections_lost": self.lost,
            "latency_ms": {"p50": l.quantile_ms(0.5), "p90": l.quantile_ms(0.9), "p99": l.quantile_ms(0.99),
                "p999": l.quantile_ms(0.999), "max": l.quantile_ms(1.0)},
            "server_cpu_seconds": self.server_cpu,
            "server_cpu_seconds_per_million_deliveries": self.cpu_us(),
            "server_cpu_us_per_delivery": self.cpu_us(),
            "loadgen_cpu_seconds": self.loadgen_cpu,
            "seconds": self.seconds,
            "ack_ms": self.acks.as_ref().map(|a| json!({"p50": a.quantile_ms(0.5), "p99": a.quantile_ms(0.99)})),
            "nats_server": self.nats,
            "server_cpu_seconds_by_process": self.by_process,
        })
    }
}

/// The channels the publisher goes round. With shared channels, they are spread evenly
/// through the own channels, so that their fan-outs come at a steady pace, not in one
/// burst per round.
fn channels(spec: &Spec) -> Vec<String> {
    if spec.shared == 0 {
        return vec!["bench".to_string()];
    }
    let every = (spec.clients / spec.shared).max(1);
    let mut out = Vec::with_capacity(spec.clients + spec.shared);
    for i in 0..spec.clients {
        if i % every == 0 && i / every < spec.shared {
            out.push(format!("s{}", i / every));
        }
        out.push(format!("c{i}"));
    }
    out.extend((spec.clients.div_ceil(every)..spec.shared).map(|j| format!("s{j}")));
    out
}

fn expected(spec: &Spec, published: &HashMap<String, u64>) -> u64 {
    (0..spec.clients)
        .flat_map(|i| crate::worker::channels_of(i, spec.shared))
        .map(|c| published.get(&c).copied().unwrap_or(0))
        .sum()
}

pub async fn fan_out(paths: &Paths, spec: Spec, target: Target) -> FanOut {
    let (fanout, nats) = match target {
        Target::Fanout | Target::FanoutSse | Target::FanoutPoll => {
            let extra = [(
                "FANOUT_COALESCE_MS".to_string(),
                spec.coalesce_ms.to_string(),
            )];
            (
                Some(FanoutTier::start_threads(paths, spec.nodes, &extra, spec.threads).await),
                None,
            )
        }
        Target::Nats => (
            None,
            Some(NatsTier::start_threads(spec.nodes, spec.threads)),
        ),
    };
    let urls = match (&fanout, &nats) {
        (Some(t), _) => t.ws_urls(),
        (_, Some(n)) => n.ws.clone(),
        _ => unreachable!(),
    };
    let servers: Vec<u32> = match (&fanout, &nats) {
        (Some(t), _) => t.servers(),
        (_, Some(n)) => n.cluster.pids(),
        _ => unreachable!(),
    };
    let (mut workers, _) = Workers::start(
        target,
        Mode::Record,
        &urls,
        spec.clients,
        spec.shared,
        2,
        200,
    );
    let interest_wait = nats.as_ref().map(|n| {
        let mut wanted = vec![std::collections::HashSet::new(); n.monitor.len()];
        for (client, node) in workers.placement() {
            wanted[node].extend(crate::worker::channels_of(client, spec.shared));
        }
        tier::wait_route_interest(&n.monitor, &wanted)
    });
    let channels = channels(&spec);
    let duration = Duration::from_secs(spec.secs);
    let (server_before, loadgen_before) = (cpu(&servers), workers.cpu_seconds() + self_cpu());
    let each_before: Vec<f64> = servers.iter().copied().map(tier::cpu_seconds).collect();
    let started = std::time::Instant::now();
    let (published, acks) = match (&fanout, &nats) {
        (Some(t), _) if spec.tick_ms > 0 => {
            let (p, a) = load::publish_http_ticked(
                &t.api_url(),
                &channels,
                spec.rate,
                duration,
                spec.payload,
                Duration::from_millis(spec.tick_ms),
            )
            .await;
            (p, Some(a))
        }
        (Some(t), _) => {
            let (p, a) =
                load::publish_http(&t.api_url(), &channels, spec.rate, duration, spec.payload)
                    .await;
            (p, Some(a))
        }
        (_, Some(n)) if spec.tick_ms > 0 => (
            load::publish_nats_ticked(
                &n.clients[0],
                &channels,
                spec.rate,
                duration,
                spec.payload,
                Duration::from_millis(spec.tick_ms),
            )
            .await,
            None,
        ),
        (_, Some(n)) => (
            load::publish_nats(&n.clients[0], &channels, spec.rate, duration, spec.payload).await,
            None,
        ),
        _ => unreachable!(),
    };
    let expected = expected(&spec, &published);
    let last = workers.settle(expected, Duration::from_secs(2)).await;
    let seconds = last.duration_since(started).as_secs_f64();
    let server_cpu = cpu(&servers) - server_before;
    // Per process, in the order of `servers` (fanout: the ws nodes, the API, nats-server).
    let by_process: Vec<f64> = servers
        .iter()
        .zip(&each_before)
        .map(|(pid, before)| tier::cpu_seconds(*pid) - before)
        .collect();
    let loadgen_cpu = workers.cpu_seconds() + self_cpu() - loadgen_before;
    let seen = workers.stop(&published);
    let counters = nats.as_ref().map(|n| {
        json!({"nodes": tier::nats_counters(&n.monitor),
            "route_interest_wait_ms": interest_wait.map_or(0.0, |d| d.as_secs_f64() * 1e3)})
    });
    FanOut {
        by_process,
        nats: counters,
        published: published.values().sum(),
        expected,
        received: seen.received,
        missing: seen.missing,
        duplicates: seen.duplicates,
        lost: seen.lost,
        seconds,
        server_cpu,
        loadgen_cpu,
        latency: seen.hist,
        acks,
    }
}

/// Idle memory: RSS growth per connection on each node.
pub async fn idle(paths: &Paths, target: Target, connections: usize, nodes: usize) -> Value {
    let (fanout, nats) = match target {
        Target::Fanout | Target::FanoutSse | Target::FanoutPoll => {
            (Some(FanoutTier::start(paths, nodes).await), None)
        }
        Target::Nats => (None, Some(NatsTier::start(nodes))),
    };
    let (holders, urls): (Vec<u32>, Vec<String>) = match (&fanout, &nats) {
        (Some(t), _) => (t.nodes.iter().map(|n| n.child.id()).collect(), t.ws_urls()),
        (_, Some(n)) => (n.cluster.pids(), n.ws.clone()),
        _ => unreachable!(),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<u64> = holders.iter().copied().map(tier::rss_kib).collect();
    let concurrency = 500;
    let (workers, secs) = Workers::start(target, Mode::Idle, &urls, connections, 0, 1, concurrency);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<u64> = holders.iter().copied().map(tier::rss_kib).collect();
    // Per connection actually held (clients spread evenly over the nodes).
    let per_node = workers.connected as f64 / nodes as f64;
    let kib: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / per_node)
        .collect();
    let connected = workers.connected;
    drop(workers.stop(&HashMap::new()));
    json!({
        "connections": connections, "connected": connected, "nodes": nodes, "connect_seconds": secs,
        "kib_per_connection": kib,
        "kib_per_connection_mean": kib.iter().sum::<f64>() / kib.len() as f64,
        "rss_before_kib": before, "rss_after_kib": after,
    })
}

/// Connect storm: connections per second one node accepts (handshake + first frame).
pub async fn storm(paths: &Paths, target: Target, connections: usize) -> Value {
    let (fanout, nats) = match target {
        Target::Fanout | Target::FanoutSse | Target::FanoutPoll => {
            (Some(FanoutTier::start(paths, 1).await), None)
        }
        Target::Nats => (None, Some(NatsTier::start(1))),
    };
    let urls = match (&fanout, &nats) {
        (Some(t), _) => t.ws_urls(),
        (_, Some(n)) => n.ws.clone(),
        _ => unreachable!(),
    };
    let (workers, secs) = Workers::start(target, Mode::Storm, &urls, connections, 0, 2, 256);
    let connected = workers.connected;
    drop(workers.stop(&HashMap::new()));
    json!({"connections": connections, "connected": connected, "seconds": secs,
        "per_second": connected as f64 / secs})
}

/// Join storm: the latency of `clients` in one channel at `rate` events/s on one node, first
/// quiet (10 s), then while `storm` connections connect and each subscribes to a channel of
/// its own (publishing until the last of them is subscribed).
pub async fn join_storm(paths: &Paths, clients: usize, storm: usize, rate: u64) -> Value {
    let tier = FanoutTier::start(paths, 1).await;
    let urls = tier.ws_urls();
    let channels = vec!["bench".to_string()];
    let mut results = serde_json::Map::new();
    for phase in ["quiet", "storm"] {
        let (mut workers, _) =
            Workers::start(Target::Fanout, Mode::Record, &urls, clients, 0, 2, 200);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let storming = (phase == "storm").then(|| {
            let urls = urls.clone();
            std::thread::spawn(move || {
                let joined = Workers::start(Target::Fanout, Mode::Join, &urls, storm, 0, 1, 256);
                let _ = stop.send(true);
                joined
            })
        });
        let duration = Duration::from_secs(if storming.is_some() { 120 } else { 10 });
        let started = std::time::Instant::now();
        let (published, _) = load::publish_http_until(
            &tier.api_url(),
            &channels,
            rate,
            duration,
            storming.is_some().then_some(stopped),
            100,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let expected = published.values().sum::<u64>() * clients as u64;
        workers.settle(expected, Duration::from_secs(2)).await;
        let seen = workers.stop(&published);
        let l = &seen.hist;
        let mut phase_result = json!({
            "seconds": secs, "published": published.values().sum::<u64>(),
            "deliveries": seen.received, "missing": seen.missing,
            "latency_ms": {"p50": l.quantile_ms(0.5), "p99": l.quantile_ms(0.99), "max": l.quantile_ms(1.0)},
        });
        if let Some(storming) = storming {
            let (joined, join_secs) = storming.join().expect("the storm's workers");
            phase_result["storm"] = json!({"connections": storm, "subscribed": joined.connected,
                "seconds": join_secs, "per_second": joined.connected as f64 / join_secs});
            drop(joined.stop(&HashMap::new()));
        }
        println!("  {phase}: {phase_result}");
        results.insert(phase.into(), phase_result);
    }
    Value::Object(results)
}

/// The API alone: acknowledged events/s with `publishers` closed-loop publishers, each
/// POSTing one event at a time (`batch` 0) or one `/v1/batch` of `batch` events.
pub async fn publish(
    paths: &Paths,
    publishers: usize,
    batch: usize,
    secs: u64,
    payload: usize,
) -> Value {
    let tier = FanoutTier::start(paths, 1).await;
    let servers = [tier.api.child.id(), tier.nats.pid()];
    let (before, api_before, loadgen_before) = (cpu(&servers), tier.api.cpu_seconds(), self_cpu());
    let (acked, errors, hist) = load::publish_closed_loop(
        &tier.api_url(),
        publishers,
        batch,
        Duration::from_secs(secs),
        payload,
    )
    .await;
    let used = cpu(&servers) - before;
    let api = tier.api.cpu_seconds() - api_before;
    let per_event = |cpu: f64| cpu * 1e6 / acked.max(1) as f64;
    json!({
        "publishers": publishers, "batch": batch, "seconds": secs, "acked": acked, "errors": errors,
        "acked_per_sec": acked as f64 / secs as f64,
        "request_ms": {"p50": hist.quantile_ms(0.5), "p99": hist.quantile_ms(0.99), "max": hist.quantile_ms(1.0)},
        "server_cpu_us_per_event": per_event(used),
        "api_cpu_us_per_event": per_event(api),
        "nats_cpu_us_per_event": per_event(used - api),
        "loadgen_cpu_us_per_event": per_event(self_cpu() - loadgen_before),
    })
}

pub fn describe(label: &str, o: &FanOut) {
    if let Some(acks) = &o.acks {
        println!(
            "  {label:<7} HTTP acknowledgements: p50 {:.2} p99 {:.2} ms",
            acks.quantile_ms(0.5),
            acks.quantile_ms(0.99)
        );
    }
    let l = &o.latency;
    println!(
        "  {label:<7} {:>9.0} deliveries/s  p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms  \
         missing {} dup {} lost {}  server CPU {:.2} µs/delivery {:.1?} s  loadgen CPU {:.1} s",
        o.per_second(),
        l.quantile_ms(0.5),
        l.quantile_ms(0.9),
        l.quantile_ms(0.99),
        l.quantile_ms(0.999),
        l.quantile_ms(1.0),
        o.missing,
        o.duplicates,
        o.lost,
        o.cpu_us(),
        o.by_process,
        o.loadgen_cpu,
    );
}

/// `make bench`: every scenario, the table, the JSON.
pub async fn run(paths: &Paths, quick: bool) -> (Value, String) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let scale = |n: usize| if quick { n / 10 } else { n };
    let mut rows: Vec<[String; 6]> = Vec::new();
    let mut results = serde_json::Map::new();
    let row = |rows: &mut Vec<[String; 6]>, cells: [&str; 6]| {
        rows.push(cells.map(String::from));
    };

    println!("publish: 16 closed-loop publishers through the API, one event per request");
    let p = publish(paths, 16, 0, 5, 100).await;
    println!("  {p}");
    println!("publish: 16 closed-loop publishers, /v1/batch of 100 events");
    let b = publish(paths, 16, 100, 5, 100).await;
    println!("  {b}");
    println!(
        "raw JetStream: 16 publishers on one NATS connection, 256 acknowledgements in flight each"
    );
    let raw = crate::jetstream::baseline(16, 256, 5, 100).await;
    println!("  {raw}");
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    // events/s; CPU µs per event (API + nats-server)
    let publish_cell = |v: &Value| {
        format!(
            "{:.0}; {:.1} ({:.1} + {:.1})",
            f(v, "acked_per_sec"),
            f(v, "server_cpu_us_per_event"),
            f(v, "api_cpu_us_per_event"),
            f(v, "nats_cpu_us_per_event")
        )
    };
    row(
        &mut rows,
        [
            "publish, 16 publishers, one event per request",
            "acknowledged events/s; server CPU µs per event (API + nats-server)",
            &publish_cell(&p),
            "",
            "",
            "≥ 40,000/s; ≤ 30 µs",
        ],
    );
    row(
        &mut rows,
        [
            "publish, 16 publishers, `/v1/batch` of 100",
            "acknowledged events/s; server CPU µs per event (API + nats-server)",
            &publish_cell(&b),
            &format!(
                "raw JetStream {:.0}; {:.1}",
                f(&raw, "acked_per_sec"),
                f(&raw, "server_cpu_us_per_event")
            ),
            &format!(
                "CPU {:.2}× raw",
                f(&b, "server_cpu_us_per_event") / f(&raw, "server_cpu_us_per_event")
            ),
            "≥ 100,000/s; ≤ 1.5× raw",
        ],
    );
    results.insert("publish".into(), p);
    results.insert("publish_batch".into(), b);
    results.insert("raw_jetstream".into(), raw);

    let specs = [
        (
            "latency",
            Spec {
                clients: 300,
                nodes: 3,
                rate: 100,
                secs: 10,
                payload: 100,
                shared: 0,
                coalesce_ms: 0,
                tick_ms: 0,
                threads: 0,
            },
        ),
        (
            "cpu",
            Spec {
                clients: scale(3000),
                nodes: 3,
                rate: 100,
                secs: 10,
                payload: 100,
                shared: 0,
                coalesce_ms: 0,
                tick_ms: 0,
                threads: 0,
            },
        ),
        (
            "throughput",
            Spec {
                clients: scale(3000),
                nodes: 3,
                rate: 1000,
                secs: 5,
                payload: 100,
                shared: 0,
                coalesce_ms: 0,
                tick_ms: 0,
                threads: 0,
            },
        ),
    ];
    let mut fan = HashMap::new();
    for (name, spec) in specs {
        println!(
            "fan-out ({name}): {} clients on {} nodes, {} events/s for {} s",
            spec.clients, spec.nodes, spec.rate, spec.secs
        );
        let f = fan_out(paths, spec, Target::Fanout).await;
        describe("fanout", &f);
        let n = fan_out(paths, spec, Target::Nats).await;
        describe("NATS", &n);
        results.insert(
            format!("fanout_{name}"),
            json!({"spec": format!("{spec:?}"), "fanout": f.json(), "nats": n.json()}),
        );
        fan.insert(name, (spec, f, n));
    }
    let (spec, f, n) = &fan["latency"];
    row(
        &mut rows,
        [
            &format!("fan-out {}×{} ev/s", spec.clients, spec.rate),
            "p50 / p99 / p99.9 latency, ms",
            &format!(
                "{:.2} / {:.2} / {:.2}",
                f.latency.quantile_ms(0.5),
                f.latency.quantile_ms(0.99),
                f.latency.quantile_ms(0.999)
            ),
            &format!(
                "{:.2} / {:.2} / {:.2}",
                n.latency.quantile_ms(0.5),
                n.latency.quantile_ms(0.99),
                n.latency.quantile_ms(0.999)
            ),
            &format!(
                "{:.2}",
                f.latency.quantile_ms(0.99) / n.latency.quantile_ms(0.99)
            ),
            "p99 ≤ 2 ms",
        ],
    );
    let (spec, f, n) = &fan["cpu"];
    row(
        &mut rows,
        [
            &format!("fan-out {}×{} ev/s", spec.clients, spec.rate),
            "server CPU µs per delivery",
            &format!("{:.2}", f.cpu_us()),
            &format!("{:.2}", n.cpu_us()),
            &format!("{:.2}", f.cpu_us() / n.cpu_us()),
            "≤ 0.5×",
        ],
    );
    row(
        &mut rows,
        [
            "",
            "p99 latency, ms",
            &format!("{:.2}", f.latency.quantile_ms(0.99)),
            &format!("{:.2}", n.latency.quantile_ms(0.99)),
            "",
            "",
        ],
    );
    // The same with fanout writing each channel's events at most every 20 ms, together.
    let coalesced = Spec {
        coalesce_ms: 20,
        ..*spec
    };
    println!("fan-out (cpu) again with FANOUT_COALESCE_MS=20");
    let c = fan_out(paths, coalesced, Target::Fanout).await;
    describe("fanout", &c);
    row(
        &mut rows,
        [
            "  with `FANOUT_COALESCE_MS=20`",
            "server CPU µs per delivery; p99 ms",
            &format!("{:.2}; {:.2}", c.cpu_us(), c.latency.quantile_ms(0.99)),
            &format!("{:.2}; {:.2}", n.cpu_us(), n.latency.quantile_ms(0.99)),
            &format!("{:.2}", c.cpu_us() / n.cpu_us()),
            "",
        ],
    );
    results.insert(
        "fanout_cpu_coalesce_20ms".into(),
        json!({"spec": format!("{coalesced:?}"), "fanout": c.json()}),
    );
    let (spec, f, n) = &fan["throughput"];
    row(
        &mut rows,
        [
            &format!("fan-out {}×{} ev/s", spec.clients, spec.rate),
            "deliveries/s (missing)",
            &format!("{:.0} ({})", f.per_second(), f.missing),
            &format!("{:.0} ({})", n.per_second(), n.missing),
            &format!("{:.2}", f.per_second() / n.per_second()),
            "≥ 1×, 0 missing",
        ],
    );
    row(
        &mut rows,
        [
            "",
            "server CPU µs per delivery",
            &format!("{:.2}", f.cpu_us()),
            &format!("{:.2}", n.cpu_us()),
            &format!("{:.2}", f.cpu_us() / n.cpu_us()),
            "",
        ],
    );

    // The HTTP transports: SSE against WebSocket in the same run (the "cpu" scenario), and
    // 1,000 long-polling clients.
    let (spec, f, _) = &fan["cpu"];
    println!(
        "fan-out over SSE: {} clients on {} nodes, {} events/s for {} s",
        spec.clients, spec.nodes, spec.rate, spec.secs
    );
    let sse = fan_out(paths, *spec, Target::FanoutSse).await;
    describe("SSE", &sse);
    row(
        &mut rows,
        [
            &format!("SSE fan-out {}×{} ev/s", spec.clients, spec.rate),
            "server CPU µs per delivery (vs WebSocket); p99 ms",
            &format!("{:.2}; {:.2}", sse.cpu_us(), sse.latency.quantile_ms(0.99)),
            &format!(
                "WebSocket {:.2}; {:.2}",
                f.cpu_us(),
                f.latency.quantile_ms(0.99)
            ),
            &format!("SSE / WS {:.2}", sse.cpu_us() / f.cpu_us()),
            "≤ 1.3× WebSocket",
        ],
    );
    results.insert(
        "sse_fanout_cpu".into(),
        json!({"spec": format!("{spec:?}"), "sse": sse.json(), "websocket": f.json()}),
    );
    let polling = Spec {
        clients: scale(1000),
        nodes: 3,
        rate: 100,
        secs: 10,
        payload: 100,
        shared: 0,
        coalesce_ms: 0,
        tick_ms: 0,
        threads: 0,
    };
    println!(
        "long-polling: {} clients on {} nodes, {} events/s for {} s",
        polling.clients, polling.nodes, polling.rate, polling.secs
    );
    let poll = fan_out(paths, polling, Target::FanoutPoll).await;
    describe("poll", &poll);
    row(
        &mut rows,
        [
            &format!(
                "long-poll, {} clients × {} ev/s",
                polling.clients, polling.rate
            ),
            "deliveries/s, p50 / p99 ms (missing); CPU µs/delivery",
            &format!(
                "{:.0}, {:.2} / {:.2} ({}); {:.2}",
                poll.per_second(),
                poll.latency.quantile_ms(0.5),
                poll.latency.quantile_ms(0.99),
                poll.missing,
                poll.cpu_us()
            ),
            "",
            "",
            "0 missing",
        ],
    );
    results.insert(
        "long_poll".into(),
        json!({"spec": format!("{polling:?}"), "fanout": poll.json()}),
    );

    // Many small channels: every client in a channel of its own and one of 10 shared; both
    // publishers release what came due every 5 ms (fanout: one `/v1/batch`).
    let spec = Spec {
        clients: scale(10_000),
        nodes: 3,
        rate: 2000,
        secs: 10,
        payload: 100,
        shared: 10,
        coalesce_ms: 0,
        tick_ms: 5,
        threads: 1,
    };
    println!(
        "many channels: {} clients, each in its own channel and one of {} shared, {} events/s in {} ms ticks",
        spec.clients, spec.shared, spec.rate, spec.tick_ms
    );
    let f = fan_out(paths, spec, Target::Fanout).await;
    describe("fanout", &f);
    let n = fan_out(paths, spec, Target::Nats).await;
    describe("NATS", &n);
    row(
        &mut rows,
        [
            &format!(
                "many channels ({} own + {} shared), {} ev/s",
                spec.clients, spec.shared, spec.rate
            ),
            "server CPU µs per delivery; p99 ms (missing)",
            &format!(
                "{:.1}; {:.2} ({})",
                f.cpu_us(),
                f.latency.quantile_ms(0.99),
                f.missing
            ),
            &format!(
                "{:.1}; {:.2} ({})",
                n.cpu_us(),
                n.latency.quantile_ms(0.99),
                n.missing
            ),
            &format!("{:.2}", f.cpu_us() / n.cpu_us()),
            "≤ 20 µs, ≤ NATS; p99 ≤ 10 ms; 0 missing",
        ],
    );
    results.insert(
        "many_channels".into(),
        json!({"spec": format!("{spec:?}"), "fanout": f.json(), "nats": n.json()}),
    );

    let idle_conns = scale(45_000);
    println!("idle: {idle_conns} connections on 3 nodes");
    let f = idle(paths, Target::Fanout, idle_conns, 3).await;
    println!("  fanout {f}");
    let n = idle(paths, Target::Nats, idle_conns, 3).await;
    println!("  NATS   {n}");
    let (fk, nk) = (
        f["kib_per_connection_mean"].as_f64().unwrap(),
        n["kib_per_connection_mean"].as_f64().unwrap(),
    );
    row(
        &mut rows,
        [
            &format!("idle, 3 × {}", idle_conns / 3),
            "RSS KiB per connection",
            &format!("{fk:.2}"),
            &format!("{nk:.2}"),
            &format!("{:.2}", fk / nk),
            "≤ 6 KiB",
        ],
    );
    results.insert("idle".into(), json!({"fanout": f, "nats": n}));
    println!("idle SSE: {idle_conns} streams on 3 nodes");
    let sse = idle(paths, Target::FanoutSse, idle_conns, 3).await;
    println!("  SSE    {sse}");
    let sk = sse["kib_per_connection_mean"].as_f64().unwrap();
    row(
        &mut rows,
        [
            &format!("idle SSE, 3 × {}", idle_conns / 3),
            "RSS KiB per stream (vs WebSocket)",
            &format!("{sk:.2}"),
            &format!("WebSocket {fk:.2}"),
            &format!("SSE / WS {:.2}", sk / fk),
            "≤ 8 KiB",
        ],
    );
    results.insert("idle_sse".into(), sse);

    let storm_conns = scale(15_000);
    println!("connect storm: {storm_conns} connections to one node");
    let f = storm(paths, Target::Fanout, storm_conns).await;
    println!("  fanout {f}");
    let n = storm(paths, Target::Nats, storm_conns).await;
    println!("  NATS   {n}");
    let (fs, ns) = (
        f["per_second"].as_f64().unwrap(),
        n["per_second"].as_f64().unwrap(),
    );
    row(
        &mut rows,
        [
            &format!("connect storm, {storm_conns} to one node"),
            "connections/s",
            &format!("{fs:.0}"),
            &format!("{ns:.0}"),
            &format!("{:.2}", fs / ns),
            "≥ 10,000/s",
        ],
    );
    results.insert("storm".into(), json!({"fanout": f, "nats": n}));

    let joiners = scale(12_000);
    println!(
        "join storm: 300 clients × 100 events/s on one node, quiet, then while {joiners} connect and subscribe"
    );
    let j = join_storm(paths, 300, joiners, 100).await;
    let p99 = |phase: &str| j[phase]["latency_ms"]["p99"].as_f64().unwrap_or(f64::NAN);
    row(
        &mut rows,
        [
            &format!("join storm, 300 × 100 ev/s while {joiners} join"),
            "p99 latency quiet / storm (max), ms",
            &format!(
                "{:.2} / {:.2} ({:.1})",
                p99("quiet"),
                p99("storm"),
                j["storm"]["latency_ms"]["max"].as_f64().unwrap_or(f64::NAN)
            ),
            "",
            "",
            "storm close to quiet",
        ],
    );
    results.insert("join_storm".into(), j);

    let members = if quick { 10_000 } else { 100_000 };
    println!("presence: {members} members on 3 nodes");
    let p = crate::presence::run(members, 3).await;
    row(
        &mut rows,
        [
            &format!("presence, {members} members"),
            "count-only query, median ms",
            &format!("{:.2}", p["count_only_ms"]["median"].as_f64().unwrap()),
            "",
            "",
            "milliseconds",
        ],
    );
    results.insert("presence".into(), p);

    let header = [
        "scenario",
        "figure",
        "fanout",
        "NATS WebSocket",
        "fanout / NATS",
        "target",
    ];
    let mut table = String::new();
    table.push_str(&format!("| {} |\n", header.join(" | ")));
    table.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for r in &rows {
        table.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    let machine = format!(
        "{cores} cores, {} (load generator on the same cores)",
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
            .unwrap_or_default()
    );
    results.insert("machine".into(), json!(machine));
    (Value::Object(results), format!("{machine}\n\n{table}"))
}
