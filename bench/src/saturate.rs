//! Saturation runs (closed-loop publishers), used to compare tracing on and off:
//!
//! ```text
//! fanout-bench saturate [--clients 200] [--nodes 2] [--publishers 16] [--duration 5] [--payload 100] [--tracing]
//! fanout-bench tracing  [same options]   # twice, tracing off then on (sampling 1.0), and the ratio
//! ```
//!
//! Fan-out: `clients` WebSocket clients spread over `nodes` ws nodes all subscribe to one
//! channel; `publishers` HTTP loops POST events to the API as fast as it acknowledges them for
//! `duration` seconds. Each event carries its send time, so every delivery gives an end-to-end
//! latency (HTTP POST → client). Reported: deliveries/s, latency percentiles, missing and
//! duplicate deliveries, and the servers' CPU time per delivery (from /proc), the figure that
//! holds best on a machine the load generator shares with the servers.

use crate::{tier, worker::now_us};

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// WebSocket clients, spread over the nodes, all in one channel.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// ws nodes.
    #[arg(long, default_value_t = 2, value_parser = positive)]
    nodes: usize,
    /// Closed-loop publishers, each POSTing one event at a time.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    publishers: usize,
    /// Seconds of publishing.
    #[arg(long = "duration", value_name = "SECONDS", default_value = "5", value_parser = seconds)]
    duration: Duration,
    /// Bytes of payload per event.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Tracing on (OTLP export to a receiver in this process, sampling 1.0).
    #[arg(long)]
    tracing: bool,
}

fn positive(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(0) | Err(_) => Err(format!("{text} is not a whole number of at least 1")),
        Ok(n) => Ok(n),
    }
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse()
        .map(Duration::from_secs)
        .map_err(|_| format!("{text} is not a whole number of seconds"))
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    acked: usize,
    deliveries: usize,
    missing: usize,
    duplicates: usize,
    seconds: f64,
    latencies_us: Vec<u64>,
    server_cpu: f64,
    spans: usize,
}

impl Outcome {
    fn per_second(&self) -> f64 {
        self.deliveries as f64 / self.seconds
    }
    fn cpu_us_per_delivery(&self) -> f64 {
        self.server_cpu * 1e6 / self.deliveries.max(1) as f64
    }
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

#[derive(Deserialize)]
struct Frame {
    op: String,
    seq: Option<u64>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    t: u64,
}

/// A WebSocket client: subscribes, then records every event until told to stop.
async fn client(
    url: String,
    subscribed: Arc<AtomicUsize>,
    received: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> (Vec<u64>, Vec<u64>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    ws.send(Message::Text(
        r#"{"op":"subscribe","channel":"bench"}"#.into(),
    ))
    .await
    .unwrap();
    let (mut seqs, mut latencies) = (Vec::new(), Vec::new());
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let Ok(frame) = serde_json::from_str::<Frame>(&text) else { continue };
                    match frame.op.as_str() {
                        "subscribed" => { subscribed.fetch_add(1, Ordering::SeqCst); }
                        "event" => {
                            if let (Some(seq), Some(data)) = (frame.seq, frame.data) {
                                seqs.push(seq);
                                latencies.push(now_us().saturating_sub(data.t));
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
            _ = stop.changed() => break,
        }
    }
    (seqs, latencies)
}

/// An OTLP/HTTP sink that counts the spans it is sent.
async fn otlp_sink() -> (String, Arc<AtomicUsize>) {
    use axum::{Router, body::Bytes, extract::State, routing::post};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let spans = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/v1/traces",
            post(
                |State(spans): State<Arc<AtomicUsize>>, body: Bytes| async move {
                    if let Ok(request) = ExportTraceServiceRequest::decode(body) {
                        let n: usize = request
                            .resource_spans
                            .iter()
                            .flat_map(|r| &r.scope_spans)
                            .map(|s| s.spans.len())
                            .sum();
                        spans.fetch_add(n, Ordering::Relaxed);
                    }
                    ""
                },
            ),
        )
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

async fn fanout(paths: &tier::Paths, params: &Params) -> Outcome {
    let nats = tier::NatsServer::start();
    let mut env = vec![
        ("FANOUT_NATS_URL".to_string(), nats.url()),
        ("FANOUT_HISTORY_MAX_AGE_SECS".to_string(), "120".to_string()),
        ("FANOUT_HISTORY_STORAGE".to_string(), "memory".to_string()),
        ("FANOUT_QUEUE_CAPACITY".to_string(), "4096".to_string()),
    ];
    let mut spans = None;
    if params.tracing {
        let (endpoint, counter) = otlp_sink().await;
        env.push(("FANOUT_OTLP_ENDPOINT".into(), endpoint));
        env.push(("OTEL_TRACES_SAMPLER".into(), "always_on".into()));
        spans = Some(counter);
    }
    let api = tier::start_fanout(paths, "fanout-api", "api-1", &env);
    let nodes: Vec<_> = (1..=params.nodes)
        .map(|i| tier::start_fanout(paths, "fanout-ws", &format!("ws-{i}"), &env))
        .collect();
    tier::wait_ready(&api.addr).await;
    for node in &nodes {
        tier::wait_ready(&node.addr).await;
    }

    let subscribed = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let clients: Vec<_> = (0..params.clients)
        .map(|i| {
            let url = format!("ws://{}/ws", nodes[i % nodes.len()].addr);
            tokio::spawn(client(
                url,
                subscribed.clone(),
                received.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    while subscribed.load(Ordering::SeqCst) < params.clients {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let servers: Vec<u32> = nodes.iter().chain([&api]).map(|p| p.child.id()).collect();
    let servers = [servers, vec![nats.pid()]].concat();
    let cpu = |pids: &[u32]| pids.iter().copied().map(tier::cpu_seconds).sum::<f64>();
    let cpu_before = cpu(&servers);
    let started = Instant::now();
    let deadline = started + params.duration;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/channels/bench/events", api.addr);
    let pad = "x".repeat(params.payload.saturating_sub(40));
    let publishers: Vec<_> = (0..params.publishers)
        .map(|_| {
            let (http, url, pad) = (http.clone(), url.clone(), pad.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                while Instant::now() < deadline {
                    let body = format!(r#"{{"t":{},"pad":"{pad}"}}"#, now_us());
                    if let Ok(response) = http.post(&url).body(body).send().await
                        && response.status() == 202
                        && let Ok(bytes) = response.bytes().await
                        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes)
                    {
                        acked.push(v["seq"].as_u64().unwrap());
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for publisher in publishers {
        acked.extend(publisher.await.unwrap());
    }
    // Let the backlog drain: stop once every delivery arrived, or none arrived for 2 s.
    let expected = acked.len() * params.clients;
    let (mut last, mut since) = (usize::MAX, Instant::now());
    loop {
        let now = received.load(Ordering::Relaxed);
        if now >= expected || since.elapsed() > Duration::from_secs(2) {
            break;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let server_cpu = cpu(&servers) - cpu_before;
    let _ = stop_tx.send(true);
    let acked_set: HashSet<u64> = acked.iter().copied().collect();
    let mut outcome = Outcome {
        acked: acked.len(),
        seconds,
        server_cpu,
        ..Outcome::default()
    };
    for client in clients {
        let (seqs, latencies) = client.await.unwrap();
        let unique: HashSet<u64> = seqs.iter().copied().collect();
        outcome.deliveries += seqs.len();
        outcome.duplicates += seqs.len() - unique.len();
        outcome.missing += acked_set.difference(&unique).count();
        outcome.latencies_us.extend(latencies);
    }
    outcome.latencies_us.sort_unstable();
    if let Some(spans) = spans {
        // The exporter sends its batch every 5 s; wait for the last one (bounded).
        let expected = outcome.acked * (2 + params.nodes);
        for _ in 0..100 {
            if spans.load(Ordering::Relaxed) >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        outcome.spans = spans.load(Ordering::Relaxed);
    }
    outcome
}

fn report(label: &str, params: &Params, o: &Outcome) {
    println!(
        "{label:<12} {:>6} ev acked  {:>9} deliveries  {:>9.0} deliveries/s  p50 {:>6.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  missing {}  dup {}  server CPU {:.2} s = {:.2} µs/delivery{}",
        o.acked,
        o.deliveries,
        o.per_second(),
        o.percentile(0.50),
        o.percentile(0.99),
        o.percentile(1.0),
        o.missing,
        o.duplicates,
        o.server_cpu,
        o.cpu_us_per_delivery(),
        if params.tracing {
            format!(
                "  spans exported {} of {}",
                o.spans,
                o.acked * (2 + params.nodes)
            )
        } else {
            String::new()
        }
    );
}

fn json(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "acked": o.acked, "deliveries": o.deliveries, "deliveries_per_sec": o.per_second(),
        "p50_ms": o.percentile(0.5), "p90_ms": o.percentile(0.9), "p99_ms": o.percentile(0.99),
        "p999_ms": o.percentile(0.999), "max_ms": o.percentile(1.0),
        "missing": o.missing, "duplicates": o.duplicates,
        "server_cpu_seconds": o.server_cpu, "server_cpu_us_per_delivery": o.cpu_us_per_delivery(),
        "spans_exported": o.spans,
    })
}

/// Runs `saturate` or `tracing`; returns the JSON results.
pub async fn run(paths: &tier::Paths, command: &str, params: Params) -> serde_json::Value {
    println!(
        "fan-out: {} clients on {} nodes, {} publishers for {:?}, {}-byte events, {} cores",
        params.clients,
        params.nodes,
        params.publishers,
        params.duration,
        params.payload,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    match command {
        "saturate" => {
            let o = fanout(paths, &params).await;
            report(
                if params.tracing {
                    "tracing on"
                } else {
                    "fan-out"
                },
                &params,
                &o,
            );
            serde_json::json!({"params": format!("{params:?}"), "fanout": json(&o)})
        }
        "tracing" => {
            let off = fanout(
                paths,
                &Params {
                    tracing: false,
                    ..params.clone()
                },
            )
            .await;
            report(
                "tracing off",
                &Params {
                    tracing: false,
                    ..params.clone()
                },
                &off,
            );
            let on = fanout(
                paths,
                &Params {
                    tracing: true,
                    ..params.clone()
                },
            )
            .await;
            report(
                "tracing on",
                &Params {
                    tracing: true,
                    ..params.clone()
                },
                &on,
            );
            let throughput = on.per_second() / off.per_second();
            let cpu = on.cpu_us_per_delivery() / off.cpu_us_per_delivery();
            println!(
                "tracing on / off: throughput {throughput:.2}x, server CPU per delivery {cpu:.2}x"
            );
            serde_json::json!({"params": format!("{params:?}"), "off": json(&off), "on": json(&on),
                "throughput_ratio": throughput, "cpu_per_delivery_ratio": cpu})
        }
        other => unreachable!("not a saturation command: {other}"),
    }
}
