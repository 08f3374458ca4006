//! Long runs (`fanout-bench soak-churn`, `make soak-churn`): nats-server, an API and 3 ws
//! nodes for `minutes`; steady WebSocket clients that must get every event; churning clients
//! that connect, subscribe, unsubscribe and disconnect all the time over WebSocket, SSE and
//! long-poll; presence queries; about `rate` events/s published. Every `sample` seconds the
//! RSS and open descriptors of every process are read; the report gives them per minute,
//! the RSS growth after the warm-up, the descriptors after the churn against before it, and
//! the steady clients' missing, duplicate and out-of-order events.
//!
//! Also here: `fanout-bench hostile`, the memory a node holds for connections that each
//! start a large frame and never finish it, with the node's limits and without them.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::tier::{self, Paths};

const CHANNELS: usize = 10;
const STEADY_PER_NODE: usize = 10;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// What one steady client got, per channel: the sequences, in arrival order.
type Got = Arc<Mutex<HashMap<String, Vec<u64>>>>;

async fn steady_client(addr: String, channels: Vec<String>, got: Got, ready: Arc<AtomicU64>) {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?user=steady"))
        .await
        .expect("a steady client connects");
    for channel in &channels {
        let subscribe = json!({"op": "subscribe", "channel": channel}).to_string();
        socket.send(Message::Text(subscribe.into())).await.unwrap();
    }
    let mut subscribed = 0;
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap_or_default();
        match frame["op"].as_str() {
            Some("subscribed") => {
                subscribed += 1;
                if subscribed == channels.len() {
                    ready.fetch_add(1, Ordering::SeqCst);
                }
            }
            Some("event") => {
                let channel = frame["channel"].as_str().unwrap_or_default().to_string();
                let seq = frame["seq"].as_u64().unwrap_or(0);
                got.lock().unwrap().entry(channel).or_default().push(seq);
            }
            _ => {}
        }
    }
    panic!("a steady client was disconnected");
}

/// One churning client's life on `addr`, over transport `kind` (0 WebSocket, 1 SSE, 2
/// long-poll): connect, subscribe, take what comes for a moment, leave.
async fn churn_once(http: &reqwest::Client, addr: &str, kind: u64, n: u64) -> bool {
    let channel = if n.is_multiple_of(2) {
        format!("soak.{}", n % CHANNELS as u64)
    } else {
        // A channel of its own: the node subscribes in NATS and unsubscribes again.
        format!("churn.{n}")
    };
    let hold = Duration::from_millis(100 + n % 300);
    match kind {
        0 => {
            let url = format!("ws://{addr}/ws?user=churn{n}");
            let Ok((mut socket, _)) = tokio_tungstenite::connect_async(url).await else {
                return false;
            };
            let subscribe =
                json!({"op": "subscribe", "channel": channel, "presence": n.is_multiple_of(3)});
            if socket
                .send(Message::Text(subscribe.to_string().into()))
                .await
                .is_err()
            {
                return false;
            }
            let _ =
                tokio::time::timeout(hold, async { while socket.next().await.is_some() {} }).await;
            let unsubscribe = json!({"op": "unsubscribe", "channel": channel});
            let _ = socket
                .send(Message::Text(unsubscribe.to_string().into()))
                .await;
            let _ = socket.close(None).await;
            true
        }
        1 => {
            let url = format!("http://{addr}/sse?channel={channel}&user=churn{n}");
            let Ok(mut response) = http.get(url).send().await else {
                return false;
            };
            let _ = tokio::time::timeout(hold, async {
                while let Ok(Some(_)) = response.chunk().await {}
            })
            .await;
            true
        }
        _ => {
            let url = format!("http://{addr}/poll?channel={channel}&user=churn{n}&timeout=0");
            let Ok(response) = http.get(&url).send().await else {
                return false;
            };
            let Ok(answer) = response
                .text()
                .await
                .map(|t| serde_json::from_str::<Value>(&t))
            else {
                return false;
            };
            let answer = answer.unwrap_or_default();
            let cursor = answer["cursor"].as_str().unwrap_or_default();
            let again = format!("{url}&cursor={cursor}");
            http.get(again).send().await.is_ok()
        }
    }
}

/// One sample of every process.
#[derive(Debug, Clone)]
struct Sample {
    at: f64,
    rss_kib: Vec<u64>,
    fds: Vec<usize>,
}

fn sample(procs: &[(&str, u32)], start: Instant) -> Sample {
    Sample {
        at: start.elapsed().as_secs_f64(),
        rss_kib: procs.iter().map(|(_, pid)| tier::rss_kib(*pid)).collect(),
        fds: procs.iter().map(|(_, pid)| fds(*pid)).collect(),
    }
}

pub async fn churn(
    paths: &Paths,
    minutes: f64,
    rate: u64,
    churners: usize,
    plot: Option<&str>,
) -> Value {
    let nats = tier::NatsServer::start();
    let env = vec![
        ("FANOUT_NATS_URL".to_string(), nats.url()),
        ("FANOUT_HISTORY_MAX_AGE_SECS".to_string(), "120".to_string()),
    ];
    let api = tier::start_fanout(paths, "fanout-api", "soak-api", &env);
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(tier::start_fanout(
            paths,
            "fanout-ws",
            &format!("soak-ws-{i}"),
            &env,
        ));
    }
    tier::wait_ready(&api.addr).await;
    for node in &nodes {
        tier::wait_ready(&node.addr).await;
    }
    let names = ["nats-server", "fanout-api", "ws-1", "ws-2", "ws-3"];
    let pids = [nats.pid(), api.child.id()]
        .into_iter()
        .chain(nodes.iter().map(|n| n.child.id()));
    let procs: Vec<(&str, u32)> = names.iter().copied().zip(pids).collect();

    // Steady clients: on every node, each in 3 of the channels.
    let ready = Arc::new(AtomicU64::new(0));
    let mut steady = Vec::new();
    let mut tasks = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..STEADY_PER_NODE {
            let channels: Vec<String> = (0..3)
                .map(|k| format!("soak.{}", (n * STEADY_PER_NODE + i + k * 3) % CHANNELS))
                .collect();
            let got: Got = Arc::default();
            steady.push((channels.clone(), got.clone()));
            tasks.push(tokio::spawn(steady_client(
                node.addr.clone(),
                channels,
                got,
                ready.clone(),
            )));
        }
    }
    let total = (3 * STEADY_PER_NODE) as u64;
    while ready.load(Ordering::SeqCst) < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = Instant::now();
    let before = sample(&procs, start);
    let stop = Arc::new(AtomicBool::new(false));
    let http = reqwest::Client::new();

    // Publishing, about `rate` events/s, round-robin over the channels; acknowledged
    // sequences kept per channel.
    let acked: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let publisher = tokio::spawn({
        let (stop, acked, http, api) =
            (stop.clone(), acked.clone(), http.clone(), api.addr.clone());
        async move {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let mut n = 0u64;
            let mut errors = 0u64;
            while !stop.load(Ordering::SeqCst) {
                ticker.tick().await;
                let channel = format!("soak.{}", n % CHANNELS as u64);
                let url = format!("http://{api}/v1/channels/{channel}/events");
                let sent = http
                    .post(url)
                    .header("Idempotency-Key", format!("soak-{n}"))
                    .body(format!("{{\"n\":{n}}}"))
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 202 => {
                        let text = response.text().await.unwrap_or_default();
                        let body: Value = serde_json::from_str(&text).unwrap_or_default();
                        if let Some(seq) = body["seq"].as_u64() {
                            acked.lock().unwrap().entry(channel).or_default().push(seq);
                        }
                    }
                    _ => errors += 1,
                }
                n += 1;
            }
            errors
        }
    });

    // Churn: `churners` clients at a time, each one life after another.
    let lives = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut churning = Vec::new();
    for c in 0..churners {
        let (stop, lives, failed, http) =
            (stop.clone(), lives.clone(), failed.clone(), http.clone());
        let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
        churning.push(tokio::spawn(async move {
            let mut n = c as u64;
            while !stop.load(Ordering::SeqCst) {
                let addr = &addrs[(n % 3) as usize];
                if !churn_once(&http, addr, (n / 3) % 3, n).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                lives.fetch_add(1, Ordering::Relaxed);
                n += churners as u64;
            }
        }));
    }
    // Presence queries, 10 a second.
    let presence = tokio::spawn({
        let (stop, http, api) = (stop.clone(), http.clone(), api.addr.clone());
        async move {
            let mut n = 0u64;
            let mut answered = 0u64;
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let url = format!(
                    "http://{api}/v1/channels/soak.{}/presence",
                    n % CHANNELS as u64
                );
                if let Ok(r) = http.get(url).send().await
                    && r.status() == 200
                {
                    answered += 1;
                }
                n += 1;
            }
            answered
        }
    });

    let mut samples = vec![before.clone()];
    let every = Duration::from_secs(10).min(Duration::from_secs_f64(minutes * 60.0 / 6.0));
    let end = start + Duration::from_secs_f64(minutes * 60.0);
    let mut next_minute = 1.0;
    while Instant::now() < end {
        tokio::time::sleep(every.min(end.saturating_duration_since(Instant::now()))).await;
        let s = sample(&procs, start);
        if s.at / 60.0 >= next_minute - 1e-6 || Instant::now() >= end {
            println!(
                "minute {:>5.1}: RSS MiB {}  fds {}  lives {}",
                s.at / 60.0,
                names
                    .iter()
                    .zip(&s.rss_kib)
                    .map(|(n, r)| format!("{n} {:.1}", *r as f64 / 1024.0))
                    .collect::<Vec<_>>()
                    .join(", "),
                s.fds
                    .iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                lives.load(Ordering::Relaxed)
            );
            next_minute = (s.at / 60.0).floor() + 1.0;
        }
        samples.push(s);
    }
    stop.store(true, Ordering::SeqCst);
    let errors = publisher.await.unwrap();
    for task in churning {
        task.await.unwrap();
    }
    let answered = presence.await.unwrap();
    // Let the last events reach the steady clients and the churners' sockets close: wait
    // until every acknowledged event arrived (bounded), then for descriptors to settle.
    let acked = acked.lock().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    let missing = |steady: &[(Vec<String>, Got)]| -> (usize, usize, usize) {
        let (mut missing, mut duplicates, mut disorder) = (0, 0, 0);
        for (channels, got) in steady {
            let got = got.lock().unwrap();
            for channel in channels {
                let seqs = got.get(channel).cloned().unwrap_or_default();
                let set: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
                duplicates += seqs.len() - set.len();
                disorder += seqs.windows(2).filter(|w| w[1] < w[0]).count();
                for seq in acked.get(channel).into_iter().flatten() {
                    if !set.contains(seq) {
                        missing += 1;
                    }
                }
            }
        }
        (missing, duplicates, disorder)
    };
    while missing(&steady).0 > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (missed, duplicates, disorder) = missing(&steady);
    // The benchmark's own keep-alive connections to the API go too.
    drop(http);
    let settle = Instant::now() + Duration::from_secs(15);
    let mut after = sample(&procs, start);
    while after.fds.iter().zip(&before.fds).any(|(a, b)| a > b) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = sample(&procs, start);
    }
    for task in tasks {
        task.abort();
    }
    let acknowledged: usize = acked.values().map(Vec::len).sum();
    let delivered: usize = steady
        .iter()
        .map(|(_, got)| got.lock().unwrap().values().map(Vec::len).sum::<usize>())
        .sum();

    // RSS growth after the warm-up (the first 5 minutes, or the first half of a short run):
    // the mean over the last window of the run against the mean over the window right after
    // the warm-up, per process (windows of a tenth of the run, at least a minute; a mean,
    // since a garbage-collected process such as nats-server saws up and down by 20%).
    let run = minutes * 60.0;
    let warm = (run / 2.0).min(300.0);
    let window = (run / 10.0).max(60.0).min(run - warm);
    let mean = |from: f64, to: f64, i: usize| {
        let inside: Vec<f64> = samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .map(|s| s.rss_kib[i] as f64)
            .collect();
        inside.iter().sum::<f64>() / inside.len().max(1) as f64
    };
    let at_warm = samples
        .iter()
        .find(|s| s.at >= warm)
        .unwrap_or(&before)
        .clone();
    let last = samples.last().unwrap().clone();
    let mut processes = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let early = mean(warm, warm + window, i);
        let late = mean(last.at - window, last.at, i);
        let growth = late / early.max(1.0) - 1.0;
        processes.insert(
            name.to_string(),
            json!({
                "rss_mib_start": before.rss_kib[i] as f64 / 1024.0,
                "rss_mib_after_warmup": at_warm.rss_kib[i] as f64 / 1024.0,
                "rss_mib_end": last.rss_kib[i] as f64 / 1024.0,
                "rss_mib_mean_after_warmup": early / 1024.0,
                "rss_mib_mean_at_end": late / 1024.0,
                "rss_growth_after_warmup_pct": (growth * 1000.0).round() / 10.0,
                "fds_before": before.fds[i],
                "fds_peak": samples.iter().map(|s| s.fds[i]).max(),
                "fds_after": after.fds[i],
            }),
        );
    }
    let report = json!({
        "minutes": minutes,
        "rate": rate,
        "churners": churners,
        "acknowledged": acknowledged,
        "publish_errors": errors,
        "steady_clients": steady.len(),
        "steady_delivered": delivered,
        "steady_missing": missed,
        "steady_duplicates": duplicates,
        "steady_out_of_order": disorder,
        "churn_lives": lives.load(Ordering::Relaxed),
        "churn_failed": failed.load(Ordering::Relaxed),
        "presence_answered": answered,
        "processes": processes,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    if let Some(path) = plot {
        std::fs::write(path, svg(&names, &samples, minutes)).unwrap();
        println!("plot: {path}");
    }
    report
}

/// RSS over time, one line per process, as an SVG.
fn svg(names: &[&str], samples: &[Sample], minutes: f64) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 360.0, 60.0, 40.0, 20.0, 130.0);
    let max_mib = samples
        .iter()
        .flat_map(|s| s.rss_kib.iter())
        .map(|r| *r as f64 / 1024.0)
        .fold(1.0, f64::max);
    let y_max = (max_mib / 10.0).ceil() * 10.0;
    let x = |at: f64| left + (at / (minutes * 60.0)) * (w - left - right);
    let y = |mib: f64| h - bottom - (mib / y_max) * (h - bottom - top);
    let colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"];
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{left}" y="14">RSS over a {minutes}-minute soak-churn run (make soak-churn)</text>
<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>
"#,
        h - bottom,
        w - right,
        h - bottom,
        h - bottom
    );
    for i in 0..=5 {
        let mib = y_max * i as f64 / 5.0;
        let (label_x, label_y, line_y, line_end) = (left - 4.0, y(mib) + 4.0, y(mib), w - right);
        out += &format!(
            r##"<text x="{label_x}" y="{label_y}" text-anchor="end">{mib:.0} MiB</text><line x1="{left}" y1="{line_y}" x2="{line_end}" y2="{line_y}" stroke="#ddd"/>
"##
        );
    }
    let step = (minutes / 6.0).max(1.0 / 6.0);
    let mut m = 0.0;
    while m <= minutes + 1e-9 {
        out += &format!(
            r#"<text x="{}" y="{}" text-anchor="middle">{m:.0} min</text>
"#,
            x(m * 60.0),
            h - bottom + 16.0
        );
        m += step;
    }
    for (i, name) in names.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.at), y(s.rss_kib[i] as f64 / 1024.0)))
            .collect();
        let color = colors[i % colors.len()];
        out += &format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{color}">{name}</text>
"#,
            points.join(" "),
            w - right + 8.0,
            top + 16.0 * (i as f64 + 1.0)
        );
    }
    out + "</svg>\n"
}

/// `connections` clients on one ws node, each sending a frame header announcing `announce`
/// bytes and then all but the last 16 of them: the node's RSS before, while they are held,
/// and how they ended, once with the given node settings and once with the limits off.
pub async fn hostile(paths: &Paths, connections: usize, announce: usize) -> Value {
    let mut results = serde_json::Map::new();
    for (label, limits) in [
        (
            "limits off",
            vec![
                ("FANOUT_MAX_BUFFERED_BYTES", (1u64 << 40).to_string()),
                ("FANOUT_FRAME_TIMEOUT_MS", "3600000".to_string()),
            ],
        ),
        ("defaults", vec![]),
    ] {
        let nats = tier::NatsServer::start();
        let mut env = vec![
            ("FANOUT_NATS_URL".to_string(), nats.url()),
            (
                "FANOUT_MAX_MESSAGE_BYTES".to_string(),
                (announce + 1024).to_string(),
            ),
        ];
        env.extend(limits.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let ws = tier::start_fanout(paths, "fanout-ws", "hostile-ws", &env);
        tier::wait_ready(&ws.addr).await;
        let base = ws.rss_kib();
        let started = Instant::now();
        let closes: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
        let mut held = Vec::new();
        let mut frame = vec![0x81u8, 0x80 | 127];
        frame.extend_from_slice(&(announce as u64).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.resize(frame.len() + announce - 16, b'x');
        let frame = Arc::new(frame);
        for i in 0..connections {
            let url = format!("ws://{}/ws?user=h{i}", ws.addr);
            let Ok((socket, _)) = tokio_tungstenite::connect_async(url).await else {
                *closes.lock().unwrap().entry("refused".into()).or_default() += 1;
                continue;
            };
            let (frame, closes) = (frame.clone(), closes.clone());
            held.push(tokio::spawn(async move {
                let mut stream = socket.into_inner();
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let tokio_tungstenite::MaybeTlsStream::Plain(ref mut tcp) = stream else {
                    return;
                };
                if tcp.write_all(&frame).await.is_err() {
                    return;
                }
                // Read until the node closes: its close frame's code, if any.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let code = buf
                    .windows(2)
                    .rposition(|w| w[0] == 0x88)
                    .and_then(|at| buf.get(at + 2..at + 4))
                    .map_or("no close frame".to_string(), |c| {
                        u16::from_be_bytes([c[0], c[1]]).to_string()
                    });
                *closes.lock().unwrap().entry(code).or_default() += 1;
            }));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let peak = ws.rss_kib();
        let sent_in = started.elapsed();
        // How long until they are all closed (bounded at 60 s).
        let waited = tokio::time::timeout(Duration::from_secs(60), async {
            for task in held {
                let _ = task.await;
            }
        })
        .await;
        let closed_after = waited.is_ok().then(|| started.elapsed().as_secs_f64());
        let r = json!({
            "connections": connections,
            "rss_mib_before": base as f64 / 1024.0,
            "rss_mib_held": peak as f64 / 1024.0,
            "held_mib": (peak.saturating_sub(base)) as f64 / 1024.0,
            "connected_in_secs": sent_in.as_secs_f64(),
            "all_closed_after_secs": closed_after,
            "closes": *closes.lock().unwrap(),
        });
        println!("hostile, {label}: {r}");
        results.insert(label.into(), r);
    }
    Value::Object(results)
}
