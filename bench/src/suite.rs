//! The scenarios' runs, each against fanout and (fan-out, idle, storm) against nats-server's
//! native WebSocket port: the tiers they start and what each measures ([`crate::outcome`]).
//! The suite that `make bench` runs is [`crate::scenarios`].

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};

use crate::{
    hist::Histogram,
    load::{self, Workers},
    outcome::{Idle, JoinStorm, Phase, Publish, Quantiles, Storm},
    sockudo::SockudoTier,
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
        let nats = NatsServer::start_with(&gomaxprocs(threads));
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

    /// What the nodes' event frames came to so far: (frames, bytes), summed over the nodes'
    /// `fanout_ws_frames_delivered_total` and `fanout_ws_bytes_out_total` (each frame as
    /// written: its transport's framing included).
    pub async fn frames_out(&self) -> (u64, u64) {
        let (mut frames, mut bytes) = (0, 0);
        for node in &self.nodes {
            let metrics = fanout_testkit::http::get(&node.addr.to_string(), "/metrics")
                .await
                .map(|a| a.body)
                .unwrap_or_default();
            let counter = |name: &str| {
                metrics
                    .lines()
                    .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0) as u64
            };
            frames += counter("fanout_ws_frames_delivered_total");
            bytes += counter("fanout_ws_bytes_out_total");
        }
        (frames, bytes)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api.addr)
    }

    /// Each node's WebTransport URL, its certificate's hash as the fragment
    /// (`https://127.0.0.1:<port>/wt#<hash>`), from discovery once every node has announced.
    pub async fn wt_urls(&self) -> Vec<String> {
        let ids: Vec<String> = (1..=self.nodes.len()).map(|i| format!("ws-{i}")).collect();
        loop {
            let answer = fanout_testkit::http::get(&self.api.addr, "/v1/nodes").await;
            if let Some(body) = answer.map(|a| a.json()) {
                let urls: Option<Vec<String>> = ids
                    .iter()
                    .map(|id| {
                        let node = body["nodes"]
                            .as_array()?
                            .iter()
                            .find(|n| n["id"] == id.as_str())?;
                        let wt = node.get("webtransport")?;
                        Some(format!(
                            "{}#{}",
                            wt["url"].as_str()?.replace("{host}", "127.0.0.1"),
                            wt["cert_hashes"][0].as_str()?
                        ))
                    })
                    .collect();
                if let Some(urls) = urls {
                    return urls;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The URLs clients of `target` connect to.
    pub async fn urls(&self, target: Target) -> Vec<String> {
        match target {
            Target::FanoutWt => self.wt_urls().await,
            Target::FanoutPusher => {
                let key = load::PUSHER_APP.1;
                self.nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "ws://{}/app/{key}?protocol=7&client=fanout-bench&version=1",
                            n.addr
                        )
                    })
                    .collect()
            }
            _ => self.ws_urls(),
        }
    }
}

/// The settings a tier for `target` needs besides the defaults (WebTransport on).
pub fn target_env(target: Target) -> Vec<(String, String)> {
    match target {
        Target::FanoutWt => vec![(
            "FANOUT_WEBTRANSPORT_LISTEN".to_string(),
            "127.0.0.1:0".to_string(),
        )],
        Target::FanoutPusher => {
            let (id, key, secret) = load::PUSHER_APP;
            vec![(
                "FANOUT_PUSHER_APPS".to_string(),
                format!("{id}:{key}:{secret}"),
            )]
        }
        _ => Vec::new(),
    }
}

/// nats-server's environment for `threads` runtime threads (0: its default).
fn gomaxprocs(threads: usize) -> Vec<(String, String)> {
    if threads == 0 {
        return Vec::new();
    }
    vec![("GOMAXPROCS".into(), threads.to_string())]
}

/// The baseline: `nodes` nats-servers in a cluster, each with a WebSocket port, with
/// `threads` runtime threads each (0: their default).
fn nats_tier(nodes: usize, threads: usize) -> NatsCluster {
    NatsCluster::start_with(
        nodes,
        tier::ClusterOptions {
            websocket: true,
            env: gomaxprocs(threads),
            ..Default::default()
        },
    )
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
    /// fanout's publisher posts volatile events (`/v1/channels/{channel}/volatile`): not
    /// stored, datagrams to WebTransport clients.
    pub volatile: bool,
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
    /// fanout only: bytes the nodes wrote per event frame, framing included.
    pub bytes_per_delivery: Option<f64>,
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
            "bytes_per_delivery": self.bytes_per_delivery,
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
    let sockudo = match target {
        Target::Sockudo => Some(SockudoTier::start(spec.nodes).await),
        _ => None,
    };
    let (fanout, nats) = match target {
        Target::Sockudo => (None, None),
        Target::Fanout
        | Target::FanoutSse
        | Target::FanoutPoll
        | Target::FanoutWt
        | Target::FanoutMsgpack
        | Target::FanoutDeflate
        | Target::FanoutPusher => {
            let mut extra = vec![(
                "FANOUT_COALESCE_MS".to_string(),
                spec.coalesce_ms.to_string(),
            )];
            extra.extend(target_env(target));
            (
                Some(FanoutTier::start_threads(paths, spec.nodes, &extra, spec.threads).await),
                None,
            )
        }
        Target::Nats => (None, Some(nats_tier(spec.nodes, spec.threads))),
    };
    let urls = match (&fanout, &nats, &sockudo) {
        (Some(t), _, _) => t.urls(target).await,
        (_, Some(n), _) => n.ws_urls(),
        (_, _, Some(s)) => s.urls(),
        _ => unreachable!(),
    };
    let servers: Vec<u32> = match (&fanout, &nats, &sockudo) {
        (Some(t), _, _) => t.servers(),
        (_, Some(n), _) => n.pids(),
        (_, _, Some(s)) => s.servers(),
        _ => unreachable!(),
    };
    // Pusher's clients are published to through `POST /apps/{id}/events`, signed.
    let pusher = target.is_pusher().then(load::pusher_app);
    let pusher_api = match (&fanout, &sockudo) {
        (Some(t), _) => t.api_url(),
        (_, Some(s)) => s.api_url(),
        _ => String::new(),
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
        let mut wanted = vec![std::collections::HashSet::new(); n.monitor_ports.len()];
        for (client, node) in workers.placement() {
            wanted[node].extend(crate::worker::channels_of(client, spec.shared));
        }
        tier::wait_route_interest(&n.monitor_ports, &wanted)
    });
    let channels = channels(&spec);
    let duration = Duration::from_secs(spec.secs);
    let out_before = match &fanout {
        Some(t) => Some(t.frames_out().await),
        None => None,
    };
    // FANOUT_BENCH_SETTLE_SECS: a pause between the clients' joins and the measured run, so
    // that what the joins set off (lifecycle webhooks, say) is over before it.
    if let Some(secs) = std::env::var("FANOUT_BENCH_SETTLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let (server_before, loadgen_before) = (cpu(&servers), workers.cpu_seconds() + self_cpu());
    let each_before: Vec<f64> = servers.iter().copied().map(tier::cpu_seconds).collect();
    let started = std::time::Instant::now();
    let (published, acks) = match (&fanout, &nats) {
        _ if pusher.is_some() => {
            let (p, a) = load::publish_http_until(
                &pusher_api,
                &channels,
                spec.rate,
                duration,
                None,
                spec.payload,
                false,
                pusher.as_ref(),
            )
            .await;
            (p, Some(a))
        }
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
            let (p, a) = load::publish_http_until(
                &t.api_url(),
                &channels,
                spec.rate,
                duration,
                None,
                spec.payload,
                spec.volatile,
                None,
            )
            .await;
            (p, Some(a))
        }
        (_, Some(n)) if spec.tick_ms > 0 => (
            load::publish_nats_ticked(
                &n.client_urls()[0],
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
            load::publish_nats(
                &n.client_urls()[0],
                &channels,
                spec.rate,
                duration,
                spec.payload,
            )
            .await,
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
    let bytes_per_delivery = match (&fanout, out_before) {
        (Some(t), Some((frames, bytes))) => {
            let (f, b) = t.frames_out().await;
            Some((b - bytes) as f64 / (f - frames).max(1) as f64)
        }
        _ => None,
    };
    let seen = workers.stop(&published);
    let counters = nats.as_ref().map(|n| {
        json!({"nodes": tier::nats_counters(&n.monitor_ports),
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
        bytes_per_delivery,
    }
}

/// Idle memory: RSS growth per connection on each node.
pub async fn idle(paths: &Paths, target: Target, connections: usize, nodes: usize) -> Idle {
    let (fanout, nats) = match target {
        Target::Fanout
        | Target::FanoutSse
        | Target::FanoutPoll
        | Target::FanoutWt
        | Target::FanoutMsgpack
        | Target::FanoutDeflate
        | Target::FanoutPusher => (
            Some(FanoutTier::start_with(paths, nodes, &target_env(target)).await),
            None,
        ),
        Target::Sockudo => panic!("Sockudo is measured in fan-out and pusher-publish only"),
        Target::Nats => (None, Some(nats_tier(nodes, 0))),
    };
    let (holders, urls): (Vec<u32>, Vec<String>) = match (&fanout, &nats) {
        (Some(t), _) => (
            t.nodes.iter().map(|n| n.child.id()).collect(),
            t.urls(target).await,
        ),
        (_, Some(n)) => (n.pids(), n.ws_urls()),
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
    Idle {
        connections,
        connected,
        nodes,
        connect_seconds: secs,
        kib_per_connection_mean: kib.iter().sum::<f64>() / kib.len() as f64,
        kib_per_connection: kib,
        rss_before_kib: before,
        rss_after_kib: after,
    }
}

/// Connect storm: connections per second one node accepts (handshake + first frame).
pub async fn storm(paths: &Paths, target: Target, connections: usize) -> Storm {
    let (fanout, nats) = match target {
        Target::Fanout
        | Target::FanoutSse
        | Target::FanoutPoll
        | Target::FanoutWt
        | Target::FanoutMsgpack
        | Target::FanoutDeflate
        | Target::FanoutPusher => (
            Some(FanoutTier::start_with(paths, 1, &target_env(target)).await),
            None,
        ),
        Target::Sockudo => panic!("Sockudo is measured in fan-out and pusher-publish only"),
        Target::Nats => (None, Some(nats_tier(1, 0))),
    };
    let urls = match (&fanout, &nats) {
        (Some(t), _) => t.urls(target).await,
        (_, Some(n)) => n.ws_urls(),
        _ => unreachable!(),
    };
    let waited = tier::wait_time_wait_drained().await;
    if waited > Duration::from_secs(1) {
        println!("  waited {waited:.0?} for earlier connections to leave TIME_WAIT");
    }
    let (workers, secs) = Workers::start(target, Mode::Storm, &urls, connections, 0, 2, 256);
    let connected = workers.connected;
    drop(workers.stop(&HashMap::new()));
    Storm {
        connections,
        connected,
        seconds: secs,
        per_second: connected as f64 / secs,
    }
}

/// Join storm: the latency of `clients` in one channel at `rate` events/s on one node, first
/// quiet (10 s), then while `storm` connections connect and each subscribes to a channel of
/// its own (publishing until the last of them is subscribed).
pub async fn join_storm(paths: &Paths, clients: usize, storm: usize, rate: u64) -> JoinStorm {
    let tier = FanoutTier::start(paths, 1).await;
    let urls = tier.ws_urls();
    let channels = vec!["bench".to_string()];
    let mut phases = Vec::new();
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
            false,
            None,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let expected = published.values().sum::<u64>() * clients as u64;
        workers.settle(expected, Duration::from_secs(2)).await;
        let seen = workers.stop(&published);
        let mut result = Phase {
            seconds: secs,
            published: published.values().sum::<u64>(),
            deliveries: seen.received,
            missing: seen.missing,
            latency_ms: Quantiles::of(&seen.hist),
            storm: None,
        };
        if let Some(storming) = storming {
            let (joined, join_secs) = storming.join().expect("the storm's workers");
            result.storm = Some(Storm {
                connections: storm,
                connected: joined.connected,
                seconds: join_secs,
                per_second: joined.connected as f64 / join_secs,
            });
            drop(joined.stop(&HashMap::new()));
        }
        println!("  {phase}: {result:?}");
        phases.push(result);
    }
    let storm = phases.pop().expect("the storm phase");
    let quiet = phases.pop().expect("the quiet phase");
    JoinStorm { quiet, storm }
}

/// The API alone: acknowledged events/s with `publishers` closed-loop publishers, each
/// POSTing one event at a time (`batch` 0) or one `/v1/batch` of `batch` events.
pub async fn publish(
    paths: &Paths,
    publishers: usize,
    batch: usize,
    secs: u64,
    payload: usize,
) -> Publish {
    let tier = FanoutTier::start(paths, 1).await;
    let servers = [tier.api.child.id(), tier.nats.pid()];
    let url = tier.api_url();
    let publishing =
        load::publish_closed_loop(&url, publishers, batch, Duration::from_secs(secs), payload);
    measured(&servers, publishers, batch, secs, publishing).await
}

/// What `publishing` (closed-loop publishers: events acknowledged, errors, request times)
/// got and cost `servers` (the front first: the API, or Sockudo; the rest is counted as
/// nats-server's) and the load generator.
async fn measured(
    servers: &[u32],
    publishers: usize,
    batch: usize,
    secs: u64,
    publishing: impl std::future::Future<Output = (u64, u64, Histogram)>,
) -> Publish {
    let front = servers[0];
    let (before, front_before, loadgen_before) =
        (cpu(servers), tier::cpu_seconds(front), self_cpu());
    let (acked, errors, hist) = publishing.await;
    let used = cpu(servers) - before;
    let api = tier::cpu_seconds(front) - front_before;
    let per_event = |cpu: f64| cpu * 1e6 / acked.max(1) as f64;
    Publish {
        publishers,
        batch,
        seconds: secs,
        acked,
        errors,
        acked_per_sec: acked as f64 / secs as f64,
        request_ms: Quantiles::of(&hist),
        server_cpu_us_per_event: per_event(used),
        api_cpu_us_per_event: per_event(api),
        nats_cpu_us_per_event: per_event(used - api),
        loadgen_cpu_us_per_event: per_event(self_cpu() - loadgen_before),
    }
}

/// Pusher's publish path, closed loop: `publishers` connections each POST one signed event at
/// a time to `/apps/{id}/events` of fanout's API (one ws node behind it), or of one Sockudo
/// process. The server CPU is the API's and nats-server's, or Sockudo's and nats-server's.
pub async fn pusher_publish(
    paths: &Paths,
    sockudo: bool,
    publishers: usize,
    secs: u64,
    payload: usize,
) -> Publish {
    let (fanout, other) = match sockudo {
        false => (
            Some(FanoutTier::start_with(paths, 1, &target_env(Target::FanoutPusher)).await),
            None,
        ),
        true => (None, Some(SockudoTier::start(1).await)),
    };
    let (url, servers) = match (&fanout, &other) {
        (Some(t), _) => (t.api_url(), vec![t.api.child.id(), t.nats.pid()]),
        (_, Some(s)) => (s.api_url(), s.servers()),
        _ => unreachable!(),
    };
    let publishing = load::publish_closed_loop_to(
        &url,
        publishers,
        0,
        Duration::from_secs(secs),
        payload,
        Some(load::pusher_app()),
    );
    measured(&servers, publishers, 0, secs, publishing).await
}

pub fn describe(label: &str, o: &FanOut) {
    if let Some(acks) = &o.acks {
        println!(
            "  {label:<7} HTTP acknowledgements: p50 {:.2} p99 {:.2} ms",
            acks.quantile_ms(0.5),
            acks.quantile_ms(0.99)
        );
    }
    if let Some(bytes) = o.bytes_per_delivery {
        println!("  {label:<7} {bytes:.1} bytes per delivery (as written, framing included)");
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
