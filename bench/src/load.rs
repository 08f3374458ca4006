//! The coordinator's side of the load: worker processes holding the clients, and the
//! publishers (HTTP to fanout's API, or core NATS for the baseline).

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use crate::{
    hist::Histogram,
    http1::Http1,
    tier,
    worker::{Job, Mode, Out, Report, Stop, Target, now_us},
};

/// Most clients one worker process holds (the open-file limit is 20,000 per process).
const PER_WORKER: usize = 15_000;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Out>,
    received: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The load generator's worker processes.
pub struct Workers {
    workers: Vec<Worker>,
    /// (client index, the index of the URL it connected to), every client.
    placement: Vec<(usize, usize)>,
    /// Clients that connected (and subscribed).
    pub connected: usize,
}

/// What the workers saw, merged.
#[derive(Debug, Default)]
pub struct Seen {
    pub received: u64,
    pub duplicates: u64,
    pub missing: u64,
    pub lost: usize,
    pub hist: Histogram,
}

impl Workers {
    /// Starts enough workers for `clients` (at least `min_workers`), each from its own
    /// source address in 127.0.0.0/8 (fresh ones each run: closed connections leave their
    /// ports in TIME_WAIT), and waits until every client is connected (and subscribed).
    /// Returns them with the slowest worker's connect time.
    pub fn start(
        target: Target,
        mode: Mode,
        urls: &[String],
        clients: usize,
        shared: usize,
        min_workers: usize,
        concurrency: usize,
    ) -> (Workers, f64) {
        let count = clients.div_ceil(PER_WORKER).max(min_workers).max(1);
        let mut workers = Vec::new();
        let mut placement = Vec::with_capacity(clients);
        let mut first = 0;
        // 127.<a>.<b>.<10+w>, <a>.<b> from the clock: a new range each run.
        let salt = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 60_000) as u32;
        let (a, b) = (1 + salt / 250 % 250, salt % 250);
        for w in 0..count {
            let share = clients / count + usize::from(w < clients % count);
            let job = Job {
                target,
                mode,
                urls: urls.to_vec(),
                source: format!("127.{a}.{b}.{}", 10 + w).parse().unwrap(),
                first,
                clients: share,
                shared,
                concurrency,
            };
            // The worker connects its i-th client to urls[i % urls.len()] (worker::connect).
            placement.extend((0..share).map(|i| (first + i, i % urls.len().max(1))));
            first += share;
            let mut child = Command::new(std::env::current_exe().unwrap())
                .arg("worker")
                .arg(serde_json::to_string(&job).unwrap())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start a worker");
            let stdin = child.stdin.take().unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(out) = serde_json::from_str(&line)
                        && tx.send(out).is_err()
                    {
                        break;
                    }
                }
            });
            workers.push(Worker {
                child,
                stdin,
                lines,
                received: 0,
            });
        }
        let mut slowest: f64 = 0.0;
        let (mut ok, mut failed) = (0, 0);
        for worker in &mut workers {
            loop {
                match worker.lines.recv_timeout(Duration::from_secs(300)) {
                    Ok(Out::Ready {
                        ok: o,
                        failed: f,
                        secs,
                    }) => {
                        ok += o;
                        failed += f;
                        slowest = slowest.max(secs);
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => panic!("a worker did not get ready"),
                }
            }
        }
        if failed > 0 {
            eprintln!("  {failed} of {} connections failed", ok + failed);
        }
        (
            Workers {
                workers,
                placement,
                connected: ok,
            },
            slowest,
        )
    }

    /// Which URL each client connected to: (client index, URL index).
    pub fn placement(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.placement.iter().copied()
    }

    /// Deliveries so far (from the workers' progress reports).
    pub fn received(&mut self) -> u64 {
        for worker in &mut self.workers {
            while let Ok(out) = worker.lines.try_recv() {
                if let Out::Progress { received } = out {
                    worker.received = received;
                }
            }
        }
        self.workers.iter().map(|w| w.received).sum()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().map(tier::cpu_seconds).sum()
    }

    /// Waits until `expected` deliveries arrived, or none for `quiet`; returns when the
    /// last one arrived.
    pub async fn settle(&mut self, expected: u64, quiet: Duration) -> Instant {
        let (mut last, mut at) = (self.received(), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.received();
            if now != last {
                (last, at) = (now, Instant::now());
            }
            if now >= expected || at.elapsed() > quiet {
                return at;
            }
        }
    }

    /// Tells the workers what was published, and merges their reports.
    pub fn stop(mut self, published: &HashMap<String, u64>) -> Seen {
        let line = serde_json::to_string(&Stop {
            published: published.clone(),
        })
        .unwrap();
        for worker in &mut self.workers {
            let _ = writeln!(worker.stdin, "{line}");
        }
        let mut seen = Seen::default();
        for worker in &mut self.workers {
            let report: Report = loop {
                match worker.lines.recv_timeout(Duration::from_secs(60)) {
                    Ok(Out::Done(report)) => break report,
                    Ok(_) => {}
                    Err(_) => panic!("a worker did not report"),
                }
            };
            seen.received += report.received;
            seen.duplicates += report.duplicates;
            seen.missing += report.missing;
            seen.lost += report.lost;
            seen.hist
                .merge(&Histogram::from_sparse(&report.buckets, report.max));
        }
        seen
    }
}

/// The payload of event `n`: send time, index, padding to `size` bytes.
pub fn body(n: u64, size: usize) -> String {
    body_at(n, size, now_us())
}

/// [`body`] with the send time `t` (µs) given.
fn body_at(n: u64, size: usize, t: u64) -> String {
    let head = format!(r#"{{"t":{t},"n":{n},"p":""#);
    let pad = size.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

/// Counts per channel.
pub type Published = HashMap<String, u64>;

/// The Pusher app of the Pusher benchmarks, as fanout and Sockudo are given it.
pub const PUSHER_APP: (&str, &str, &str) = ("bench", "bench-key", "bench-secret-0000");

/// [`PUSHER_APP`], to sign requests with.
pub fn pusher_app() -> fanout::pusher::App {
    let (id, key, secret) = PUSHER_APP;
    fanout::pusher::apps(&format!("{id}:{key}:{secret}"))
        .expect("a valid app")
        .remove(0)
}

/// One event as `POST /apps/{id}/events` takes it (its data a string, as Pusher's libraries
/// send it), and the signed path to post it to.
pub fn pusher_request(app: &fanout::pusher::App, channel: &str, payload: &str) -> (String, String) {
    let body =
        serde_json::json!({"name": "bench", "channel": channel, "data": payload}).to_string();
    let path = format!("/apps/{}/events", app.id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let query = app.sign_request("POST", &path, body.as_bytes(), now);
    (format!("{path}?{query}"), body)
}

/// Publishes `rate` events per second for `duration`, round-robin over `channels`, through
/// fanout's HTTP API (open loop: sends on schedule whatever the answers), stopping early once
/// `stop` turns true; `volatile`: volatile events (`/volatile`) instead of stored ones; with
/// `pusher`, through `POST /apps/{id}/events` (fanout's or another Pusher server's), signed.
/// Returns how many were acknowledged per channel, and the acknowledgement latency.
#[allow(clippy::too_many_arguments)]
pub async fn publish_http_until(
    api: &str,
    channels: &[String],
    rate: u64,
    duration: Duration,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
    size: usize,
    volatile: bool,
    pusher: Option<&fanout::pusher::App>,
) -> (Published, Histogram) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let total = rate * duration.as_secs();
    let counters: Arc<Vec<AtomicU64>> =
        Arc::new(channels.iter().map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new(channels.iter().map(|_| AtomicU64::new(0)).collect());
    let acks = Arc::new(Mutex::new(Histogram::default()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for k in 0..total {
        tokio::time::sleep_until(start + period * k as u32).await;
        if stop.as_ref().is_some_and(|stop| *stop.borrow()) {
            break;
        }
        let c = (k as usize) % channels.len();
        let n = counters[c].fetch_add(1, Ordering::Relaxed);
        let kind = if volatile { "volatile" } else { "events" };
        let (url, payload, ok) = match pusher {
            Some(app) => {
                let (path, request) = pusher_request(app, &channels[c], &body(n, size));
                (format!("{api}{path}"), request, 200)
            }
            None => (
                format!("{api}/v1/channels/{}/{kind}", channels[c]),
                body(n, size),
                202,
            ),
        };
        let (http, acked, acks) = (http.clone(), acked.clone(), acks.clone());
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            if let Ok(response) = http
                .post(url)
                .header("content-type", "application/json")
                .body(payload)
                .send()
                .await
                && response.status() == ok
            {
                acked[c].fetch_add(1, Ordering::Relaxed);
                acks.lock()
                    .unwrap()
                    .record(sent.elapsed().as_micros() as u64);
            }
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let published = channels
        .iter()
        .zip(acked.iter())
        .map(|(c, n)| (c.clone(), n.load(Ordering::Relaxed)))
        .collect();
    let acks = acks.lock().unwrap().clone();
    (published, acks)
}

/// The same schedule published over core NATS (the baseline).
pub async fn publish_nats(
    url: &str,
    channels: &[String],
    rate: u64,
    duration: Duration,
    size: usize,
) -> Published {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let total = rate * duration.as_secs();
    let mut counters = vec![0u64; channels.len()];
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(start + period * k as u32).await;
        let c = (k as usize) % channels.len();
        let payload = body(counters[c], size);
        counters[c] += 1;
        client
            .publish(channels[c].clone(), payload.into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    channels.iter().cloned().zip(counters).collect()
}

/// Closed loop: `publishers` connections each POST one event at a time for `duration`
/// (`batch` 0), or one `/v1/batch` of `batch` events at a time. Returns (acknowledged events,
/// errors, acknowledgement latency per request).
pub async fn publish_closed_loop(
    api: &str,
    publishers: usize,
    batch: usize,
    duration: Duration,
    size: usize,
) -> (u64, u64, Histogram) {
    publish_closed_loop_to(api, publishers, batch, duration, size, None).await
}

/// [`publish_closed_loop`], or, with `pusher`, one signed `POST /apps/{id}/events` at a time
/// (fanout's, or another Pusher server's).
pub async fn publish_closed_loop_to(
    api: &str,
    publishers: usize,
    batch: usize,
    duration: Duration,
    size: usize,
    pusher: Option<fanout::pusher::App>,
) -> (u64, u64, Histogram) {
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let api = api.to_string();
            let pusher = pusher.clone();
            tokio::spawn(async move {
                let (mut acked, mut errors, mut hist) = (0, 0, Histogram::default());
                let mut http = Http1::connect(&api).await.expect("connect to the API");
                let (path, channel) = if batch == 0 {
                    (format!("/v1/channels/pub{p}/events"), String::new())
                } else {
                    ("/v1/batch".to_string(), format!("pub{p}"))
                };
                let mut n = 0;
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if let Some(app) = &pusher {
                        n += 1;
                        let (path, request) =
                            pusher_request(app, &format!("pub{p}"), &body(n, size));
                        match http.post(&path, request.as_bytes()).await {
                            Ok((200, _)) => {
                                acked += 1;
                                hist.record(sent.elapsed().as_micros() as u64);
                            }
                            Ok((status, answer)) => {
                                if errors == 0 && p == 0 {
                                    let answer = String::from_utf8_lossy(&answer);
                                    eprintln!("  the first refusal: {status} {answer}");
                                }
                                errors += 1;
                            }
                            Err(_) => {
                                errors += 1;
                                http = Http1::connect(&api).await.expect("reconnect to the API");
                            }
                        }
                        continue;
                    }
                    let request = if batch == 0 {
                        n += 1;
                        body(n, size)
                    } else {
                        let events: Vec<(&str, String)> = (0..batch)
                            .map(|_| {
                                n += 1;
                                (channel.as_str(), body(n, size))
                            })
                            .collect();
                        batch_body(&events)
                    };
                    match http.post(&path, request.as_bytes()).await {
                        Ok((202, answer)) => {
                            let stored = if batch == 0 {
                                1
                            } else {
                                stored(&answer).len() as u64
                            };
                            acked += stored;
                            errors += batch.max(1) as u64 - stored;
                            hist.record(sent.elapsed().as_micros() as u64);
                        }
                        Ok(_) => errors += batch.max(1) as u64,
                        Err(_) => {
                            errors += batch.max(1) as u64;
                            http = Http1::connect(&api).await.expect("reconnect to the API");
                        }
                    }
                }
                (acked, errors, hist)
            })
        })
        .collect();
    let (mut acked, mut errors, mut hist) = (0, 0, Histogram::default());
    for task in tasks {
        let (a, e, h) = task.await.unwrap();
        acked += a;
        errors += e;
        hist.merge(&h);
    }
    (acked, errors, hist)
}

/// A `/v1/batch` body; each payload is a JSON object already.
fn batch_body(events: &[(&str, String)]) -> String {
    let mut out = String::from(r#"{"events":["#);
    for (i, (channel, data)) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(r#"{{"channel":"{channel}","data":{data}}}"#));
    }
    out.push_str("]}");
    out
}

/// Which events of a `/v1/batch` answer were stored (their positions).
fn stored(answer: &[u8]) -> Vec<usize> {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return Vec::new();
    };
    answer["results"]
        .as_array()
        .map(|results| {
            results
                .iter()
                .enumerate()
                .filter(|(_, r)| r["seq"].is_u64())
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default()
}

/// [`publish_http_until`]'s schedule released in ticks of `tick`, as a busy backend sends: every
/// `tick`, the events that came due go out together, in one `/v1/batch` (one connection,
/// one request at a time: a slow answer makes the next batch larger). Each event carries
/// its due time, so the wait for its tick is in the latency.
pub async fn publish_http_ticked(
    api: &str,
    channels: &[String],
    rate: u64,
    duration: Duration,
    size: usize,
    tick: Duration,
) -> (Published, Histogram) {
    let mut http = Http1::connect(api).await.expect("connect to the API");
    let mut acked = vec![0u64; channels.len()];
    let mut acks = Histogram::default();
    let mut schedule = Ticks::new(channels.len(), rate, duration, tick);
    while let Some(due) = schedule.next(size).await {
        let events: Vec<(&str, String)> = due
            .iter()
            .map(|(c, data, _)| (channels[*c].as_str(), data.clone()))
            .collect();
        let Ok((202, answer)) = http.post("/v1/batch", batch_body(&events).as_bytes()).await else {
            http = Http1::connect(api).await.expect("reconnect to the API");
            continue;
        };
        let now = now_us();
        for i in stored(&answer) {
            let (c, _, at) = &due[i];
            acked[*c] += 1;
            acks.record(now.saturating_sub(*at));
        }
    }
    let published = channels.iter().cloned().zip(acked).collect();
    (published, acks)
}

/// The same ticks over core NATS: each tick's events published, then one flush.
pub async fn publish_nats_ticked(
    url: &str,
    channels: &[String],
    rate: u64,
    duration: Duration,
    size: usize,
    tick: Duration,
) -> Published {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let mut counts = vec![0u64; channels.len()];
    let mut schedule = Ticks::new(channels.len(), rate, duration, tick);
    while let Some(due) = schedule.next(size).await {
        for (c, data, _) in due {
            client
                .publish(channels[c].clone(), data.into())
                .await
                .unwrap();
            counts[c] += 1;
        }
        client.flush().await.unwrap();
    }
    channels.iter().cloned().zip(counts).collect()
}

/// A round-robin schedule of `rate` events/s over `channels` channels, handed out in ticks.
struct Ticks {
    channels: usize,
    period: Duration,
    total: u64,
    next: u64,
    counters: Vec<u64>,
    start: tokio::time::Instant,
    start_us: u64,
    tick: Duration,
}

impl Ticks {
    fn new(channels: usize, rate: u64, duration: Duration, tick: Duration) -> Ticks {
        Ticks {
            channels,
            period: Duration::from_secs_f64(1.0 / rate as f64),
            total: rate * duration.as_secs(),
            next: 0,
            counters: vec![0; channels],
            start: tokio::time::Instant::now(),
            start_us: now_us(),
            tick,
        }
    }

    /// Waits for the next tick; returns the events due by then: (channel, payload, due
    /// time in µs), or `None` when the schedule is done.
    async fn next(&mut self, size: usize) -> Option<Vec<(usize, String, u64)>> {
        if self.next >= self.total {
            return None;
        }
        let first_due = self.period * self.next as u32;
        let elapsed = self.start.elapsed();
        let at = if elapsed < first_due {
            // The tick boundary at or after the next event's due time.
            let ticks = first_due.as_nanos().div_ceil(self.tick.as_nanos()) as u32;
            self.tick * ticks
        } else {
            elapsed
        };
        tokio::time::sleep_until(self.start + at).await;
        let now = self.start.elapsed();
        let mut due = Vec::new();
        while self.next < self.total && self.period * self.next as u32 <= now {
            let c = (self.next as usize) % self.channels;
            let due_us = self.start_us + (self.period * self.next as u32).as_micros() as u64;
            due.push((c, body_at(self.counters[c], size, due_us), due_us));
            self.counters[c] += 1;
            self.next += 1;
        }
        Some(due)
    }
}
