//! `fanout-bench geo`: two regions on loopback (per region a 3-server NATS cluster with
//! JetStream, an API and a ws node; the gateways through in-process delay proxies, the WAN)
//! and three figures:
//!
//! - cross-region delivery latency: events published through eu's API, received by clients
//!   of us's ws node (publisher's send time to client's receive time, one clock);
//! - in-region publish acknowledgement latency through eu's API, with the WAN delay on and
//!   off (the same processes: the proxies' delay is switched);
//! - the bytes crossing the gateways per event, for a channel with subscribers in eu only
//!   and for one with subscribers in both regions (idle gateway traffic subtracted).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    hist::Histogram,
    proxy,
    tier::{Paths, Supercluster, start_fanout, wait_ready},
};

const REGIONS: [&str; 2] = ["eu", "us"];

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The supercluster (the test kit's: 3 servers per region), its gateways behind in-process
/// delay proxies that count the bytes crossing them.
struct Geo {
    servers: Supercluster,
    delay: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

async fn supercluster(delay_ms: u64) -> Geo {
    let delay = Arc::new(AtomicU64::new(delay_ms));
    let bytes = Arc::new(AtomicU64::new(0));
    let servers = Supercluster::start(&REGIONS);
    for (front, gateway) in servers.fronts() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", *front))
            .await
            .expect("a proxy's port");
        let target = format!("127.0.0.1:{gateway}").parse().expect("an address");
        tokio::spawn(proxy::serve(listener, target, delay.clone(), bytes.clone()));
    }
    servers.wait_ready(Duration::from_secs(60)).await;
    Geo {
        servers,
        delay,
        bytes,
    }
}

fn env(cluster: &Geo, region: usize, replicas: usize) -> Vec<(String, String)> {
    [
        ("FANOUT_NATS_URL", cluster.servers.regions[region].urls(0)),
        ("FANOUT_REGION", REGIONS[region].to_string()),
        ("FANOUT_REGIONS", REGIONS.join(",")),
        ("FANOUT_HISTORY_REPLICAS", replicas.to_string()),
        ("FANOUT_HISTORY_STORAGE", "memory".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Waits until `addr`'s `/readyz` says every other region's mirror is current.
async fn wait_regions_current(addr: &str) {
    let url = format!("http://{addr}/readyz");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(response) = reqwest::get(&url).await
            && let Ok(text) = response.text().await
            && let Ok(body) = serde_json::from_str::<Value>(&text)
            && body["regions"]
                .as_object()
                .is_some_and(|r| r.values().all(|s| s == "local" || s == "current"))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}: regions never current");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebSocket client of `channel` on `ws` (a node's address) that records each event's
/// latency (its data's `t`, the publisher's send time in µs, to now).
async fn subscriber(
    ws: &str,
    channel: &str,
    latencies: Arc<Mutex<Histogram>>,
) -> tokio::task::JoinHandle<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{ws}/ws"))
        .await
        .expect("connect");
    let subscribe = json!({"op": "subscribe", "channel": channel, "id": 1}).to_string();
    socket.send(Message::Text(subscribe.into())).await.unwrap();
    loop {
        let Some(Ok(Message::Text(text))) = socket.next().await else {
            panic!("the node closed the connection");
        };
        if text.contains("\"subscribed\"") {
            break;
        }
    }
    tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let now = now_us();
            let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if let Some(t) = frame["data"]["t"].as_u64() {
                latencies.lock().unwrap().record(now.saturating_sub(t));
            }
        }
    })
}

/// Publishes `count` events on `channel` through `api` at `rate` per second (open loop,
/// each carrying its send time); returns the acknowledgement latencies.
async fn publish(api: &str, channel: &str, count: usize, rate: u64, pad: usize) -> Histogram {
    let http = reqwest::Client::new();
    let url = format!("http://{api}/v1/channels/{channel}/events");
    let pad = "x".repeat(pad);
    let start = tokio::time::Instant::now();
    let acks = Arc::new(Mutex::new(Histogram::default()));
    let mut tasks = Vec::new();
    for i in 0..count as u64 {
        tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
        let (http, url, acks) = (http.clone(), url.clone(), acks.clone());
        let body = format!("{{\"t\":{},\"pad\":\"{pad}\"}}", now_us());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = http.post(&url).body(body).send().await.expect("publish");
            assert_eq!(response.status(), 202, "publish refused");
            acks.lock()
                .unwrap()
                .record(sent.elapsed().as_micros() as u64);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    acks.lock().unwrap().clone()
}

/// Gateway bytes per event while `count` events of `pad` bytes go to `channel` through
/// `api`, idle traffic (measured over as long, just before) subtracted.
async fn bytes_per_event(cluster: &Geo, api: &str, channel: &str, count: usize) -> f64 {
    let rate = 200;
    let window = Duration::from_millis(count as u64 * 1000 / rate);
    let before = cluster.bytes.load(Ordering::Relaxed);
    tokio::time::sleep(window + Duration::from_secs(1)).await;
    let idle = cluster.bytes.load(Ordering::Relaxed) - before;
    let before = cluster.bytes.load(Ordering::Relaxed);
    publish(api, channel, count, rate, 100).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // the last events cross
    let busy = cluster.bytes.load(Ordering::Relaxed) - before;
    (busy.saturating_sub(idle)) as f64 / count as f64
}

pub async fn run(
    paths: &Paths,
    delay_ms: u64,
    clients: usize,
    rate: u64,
    secs: u64,
    replicas: usize,
) -> Value {
    println!("geo: 2 regions x 3 NATS servers, streams R{replicas}, WAN {delay_ms} ms each way");
    let cluster = supercluster(delay_ms).await;
    let mut apis = Vec::new();
    let mut nodes = Vec::new();
    for (i, name) in REGIONS.iter().enumerate() {
        let env = env(&cluster, i, replicas);
        apis.push(start_fanout(
            paths,
            "fanout-api",
            &format!("api-{name}"),
            &env,
        ));
        nodes.push(start_fanout(
            paths,
            "fanout-ws",
            &format!("ws-{name}"),
            &env,
        ));
    }
    for process in apis.iter().chain(&nodes) {
        wait_ready(&process.addr).await;
    }
    for process in apis.iter().chain(&nodes) {
        wait_regions_current(&process.addr).await;
    }
    let (eu_api, us_ws, eu_ws) = (&apis[0].addr, &nodes[1].addr, &nodes[0].addr);

    // Cross-region delivery.
    let latencies = Arc::new(Mutex::new(Histogram::default()));
    let mut readers = Vec::new();
    for _ in 0..clients {
        readers.push(subscriber(us_ws, "geo", latencies.clone()).await);
    }
    publish(eu_api, "geo", 100, 100, 100).await; // warm-up
    *latencies.lock().unwrap() = Histogram::default();
    let count = (rate * secs) as usize;
    publish(eu_api, "geo", count, rate, 100).await;
    let expected = (count * clients) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().total < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cross = latencies.lock().unwrap().clone();
    for reader in readers {
        reader.abort();
    }

    // In-region acknowledgements, WAN delay on, then off.
    let acks_on = publish(eu_api, "acks", 1000, 200, 100).await;
    cluster.delay.store(0, Ordering::Relaxed);
    let acks_off = publish(eu_api, "acks", 1000, 200, 100).await;
    cluster.delay.store(delay_ms, Ordering::Relaxed);

    // Gateway bytes: subscribers in eu only, then in both regions.
    let quiet = Arc::new(Mutex::new(Histogram::default()));
    let _eu_only = subscriber(eu_ws, "eu-only", quiet.clone()).await;
    let one_region = bytes_per_event(&cluster, eu_api, "eu-only", 1000).await;
    let _both_eu = subscriber(eu_ws, "both", quiet.clone()).await;
    let _both_us = subscriber(us_ws, "both", quiet.clone()).await;
    let two_regions = bytes_per_event(&cluster, eu_api, "both", 1000).await;

    let ms = |h: &Histogram, q: f64| (h.quantile_ms(q) * 100.0).round() / 100.0;
    let result = json!({
        "wan_delay_ms": delay_ms,
        "replicas": replicas,
        "cross_region": {
            "clients": clients, "events": count, "delivered": cross.total, "expected": expected,
            "p50_ms": ms(&cross, 0.5), "p99_ms": ms(&cross, 0.99),
            "target_p99_ms": delay_ms + 5,
        },
        "publish_ack_ms": {
            "wan_on": {"p50": ms(&acks_on, 0.5), "p99": ms(&acks_on, 0.99)},
            "wan_off": {"p50": ms(&acks_off, 0.5), "p99": ms(&acks_off, 0.99)},
        },
        "gateway_bytes_per_event": {
            "subscribers_in_one_region": one_region.round(),
            "subscribers_in_both_regions": two_regions.round(),
            "payload_bytes": 100,
        },
    });
    println!(
        "geo: cross-region delivery p50 {} ms, p99 {} ms (target p99 <= {} ms), {}/{} delivered",
        ms(&cross, 0.5),
        ms(&cross, 0.99),
        delay_ms + 5,
        cross.total,
        expected
    );
    println!(
        "geo: publish ack in eu p50/p99: WAN on {}/{} ms, WAN off {}/{} ms",
        ms(&acks_on, 0.5),
        ms(&acks_on, 0.99),
        ms(&acks_off, 0.5),
        ms(&acks_off, 0.99)
    );
    println!(
        "geo: gateway bytes per 100-byte event: subscribers in eu only {one_region:.0}, in both regions {two_regions:.0}"
    );
    result
}
