//! `fanout-bench storm`: a node's worth of clients thrown at the rest of the tier at once.
//!
//! `clients` WebSocket clients (100,000 by default) over `nodes` ws nodes, held by worker
//! processes (`storm-worker`, each from source addresses of its own in 127.0.0.0/8, within the open-file
//! limit), each client in a channel of its own (`c<i>`) and one of `shared` shared ones; the
//! coordinator publishes `rate` events a second through the API, half to shared channels, half
//! to clients' own. Then:
//! 1. quiet: the latency every client sees;
//! 2. `kill -9` of the node holding the most clients: how long until every one of its clients
//!    is connected elsewhere and resumed, and the latency of the clients that stayed
//!    (bystanders) meanwhile;
//! 3. the killed node restarted, then a rolling restart of every node (SIGTERM: each drains,
//!    telling its clients when and where to go), the same figures.
//!
//! The clients behave as fanout.js does: a close the server decided is obeyed (its
//! `reconnect_after_ms`, its node); a connection that just dies is retried after a jittered
//! backoff on another node, chosen at random as a load balancer would (fanout.js's own list
//! would send every client of a node to the same next node); each channel resumes from the
//! last `seq` received. At the end every client counts what it missed (`missing`, target 0),
//! what it got twice, and every `recovered: false`. Every node's RSS is sampled throughout and
//! set against its budget (see [`budget_kib`]).

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    process::{ChildStdin, Command, Stdio},
    rc::Rc,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{io::AsyncBufReadExt, sync::watch};

use crate::{
    hist::Histogram,
    http1::Http1,
    load,
    outcome::Quantiles,
    tier::{self, NatsServer, Paths, Process},
    worker::{self, Seen, Socket, contains, fanout_event, now_us, number_after},
};

/// Most clients one worker holds (the open-file limit is 20,000 per process).
const PER_WORKER: usize = 15_000;
/// The phases whose latencies are kept apart.
const QUIET: usize = 0;
const KILL: usize = 1;
const BETWEEN: usize = 2;
const ROLLING: usize = 3;
const TAIL: usize = 4;
const PHASES: usize = 5;

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    #[arg(long, default_value_t = 100_000)]
    pub clients: usize,
    #[arg(long, default_value_t = 8)]
    pub nodes: usize,
    /// Events per second, half to shared channels, half to clients' own.
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Shared channels (each client is in one).
    #[arg(long, default_value_t = 1000)]
    pub shared: usize,
    /// Seconds of the quiet phase.
    #[arg(long, default_value_t = 20)]
    pub quiet: u64,
    /// Skip the rolling restart.
    #[arg(long)]
    pub no_rolling: bool,
    /// `FANOUT_ACCEPT_RATE` of every ws node (0: none).
    #[arg(long, default_value_t = 0)]
    pub accept_rate: u32,
}

/// One worker's job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub urls: Vec<String>,
    /// Source addresses, used in turn: a reconnect storm leaves ports in TIME_WAIT, and one
    /// address has ~28,000.
    pub sources: Vec<IpAddr>,
    pub first: usize,
    pub clients: usize,
    pub shared: usize,
}

/// The coordinator's orders, a line each.
#[derive(Debug, Serialize, Deserialize)]
enum Order {
    Phase(usize),
    Stop(HashMap<String, u64>),
}

/// A worker's lines.
#[derive(Debug, Serialize, Deserialize)]
enum Said {
    Ready { ok: usize, failed: usize },
    Progress { live: usize },
    Done(Report),
}

/// What one worker's clients saw.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    received: u64,
    missing: u64,
    duplicates: u64,
    unrecovered: u64,
    /// Per phase: reconnects, the bystanders' and the movers' latencies, the outages.
    phases: Vec<PhaseReport>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct PhaseReport {
    reconnects: u64,
    bystanders: (Vec<(u32, u64)>, u64),
    movers: (Vec<(u32, u64)>, u64),
    outages: (Vec<(u32, u64)>, u64),
}

/// A worker's histograms, per phase.
#[derive(Default)]
struct Hists {
    bystanders: Histogram,
    movers: Histogram,
    /// From losing a connection to being resumed elsewhere (µs).
    outages: Histogram,
    reconnects: u64,
}

struct State {
    phases: Vec<Hists>,
    live: usize,
    report: Report,
}

/// How a connection ended.
enum Ended {
    Stop,
    /// The server closed it: come back after this long, to this node (by port) if it said.
    Directed(u64, Option<u16>),
    /// It died (the node was killed) or could not be made.
    Died,
}

/// The port of a directed close's first node (`ws://{host}:<port>/ws`) and its wait.
fn directive(reason: &[u8]) -> (u64, Option<u16>) {
    let after = number_after(reason, b"\"reconnect_after_ms\":", 0).map_or(0, |(n, _)| n);
    let port = (|| {
        let at = reason.windows(8).position(|w| w == b"\"nodes\":")?;
        let host = at + reason[at..].windows(7).position(|w| w == b"{host}:")? + 7;
        let digits = reason[host..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        std::str::from_utf8(&reason[host..host + digits])
            .ok()?
            .parse()
            .ok()
    })();
    (after, port)
}

/// A random number in `0..n` (the clock's low bits, mixed: enough for jitter).
fn random(n: u64) -> u64 {
    let mut x = now_us() ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % n.max(1)
}

/// One client: connected, resumed, moved when its node goes, until the stop.
#[allow(clippy::too_many_arguments)]
async fn client(
    i: usize,
    job: Rc<Job>,
    state: Rc<RefCell<State>>,
    phase: Rc<Cell<usize>>,
    mut stop: watch::Receiver<Option<Rc<HashMap<String, u64>>>>,
    ready: Rc<Cell<(usize, usize)>>,
) {
    let global = job.first + i;
    let channels = worker::channels_of(global, job.shared);
    let mut seen = Seen::new(channels.clone());
    let mut last = vec![0u64; channels.len()];
    let mut subscribed_once = false;
    let mut node = global % job.urls.len();
    let mut lost_at: Option<Instant> = None;
    let mut disturbed: Option<usize> = None;
    let mut attempt = 0u32;
    let mut first = true;
    let mut reconnects = 0usize;
    loop {
        if stop.borrow().is_some() {
            break;
        }
        let source = job.sources[(global + reconnects) % job.sources.len()];
        reconnects += 1;
        let ended = match connect(&job.urls[node], source, &channels, &last, subscribed_once).await
        {
            Err(_) => {
                if first {
                    let (ok, failed) = ready.get();
                    ready.set((ok, failed + 1));
                    break;
                }
                Ended::Died
            }
            Ok(mut ws) => {
                let mut pending = channels.len();
                let mut resumed = false;
                let ended = loop {
                    tokio::select! {
                        more = ws.fill() => {
                            if !more {
                                break Ended::Died;
                            }
                            let now = now_us();
                            let mut ping = false;
                            let mut closed = None;
                            let mut unrecovered = 0;
                            let mut refused = false;
                            {
                                let mut state = state.borrow_mut();
                                let p = phase.get();
                                let bystander = disturbed != Some(p);
                                ws.frames(|(opcode, data)| match opcode {
                                    0x9 => ping = true,
                                    0x8 => closed = Some(directive(data.get(2..).unwrap_or(b""))),
                                    _ => {
                                        if let Some((channel, t, n)) = fanout_event(data) {
                                            if let Some(k) = channels.iter().position(|c| c.as_bytes() == channel)
                                                && let Some((seq, _)) = number_after(data, b"\"seq\":", 0)
                                            {
                                                last[k] = last[k].max(seq);
                                            }
                                            seen.saw(channel, n);
                                            let hists = &mut state.phases[p];
                                            let latency = now.saturating_sub(t);
                                            if bystander {
                                                hists.bystanders.record(latency);
                                            } else {
                                                hists.movers.record(latency);
                                            }
                                        } else if contains(data, b"\"op\":\"error\"") {
                                            // A resume refused (the history not readable now):
                                            // reconnect and resume again, as fanout.js asks again.
                                            refused = true;
                                        } else if contains(data, b"\"subscribed\"") {
                                            pending = pending.saturating_sub(1);
                                            if contains(data, b"\"recovered\":false") {
                                                unrecovered += 1;
                                            }
                                        }
                                    }
                                });
                                state.report.unrecovered += unrecovered;
                                if pending == 0 && !resumed {
                                    resumed = true;
                                    state.live += 1;
                                    if let Some(at) = lost_at.take() {
                                        let hists = &mut state.phases[p];
                                        hists.outages.record(at.elapsed().as_micros() as u64);
                                        hists.reconnects += 1;
                                    }
                                    if first {
                                        let (ok, failed) = ready.get();
                                        ready.set((ok + 1, failed));
                                        first = false;
                                    }
                                }
                            }
                            if ping {
                                let _ = ws.send(0xA, b"").await;
                            }
                            if let Some((after, port)) = closed {
                                break Ended::Directed(after, port);
                            }
                            if refused {
                                break Ended::Died;
                            }
                        }
                        _ = stop.changed() => break Ended::Stop,
                    }
                };
                if resumed {
                    state.borrow_mut().live -= 1;
                    subscribed_once = true;
                    attempt = 0;
                }
                ended
            }
        };
        let wait = match ended {
            Ended::Stop => break,
            Ended::Directed(after, port) => {
                node = port
                    .and_then(|port| {
                        job.urls
                            .iter()
                            .position(|url| url.contains(&format!(":{port}/")))
                    })
                    .unwrap_or_else(|| other(node, job.urls.len()));
                after
            }
            Ended::Died => {
                attempt += 1;
                node = other(node, job.urls.len());
                // fanout.js's backoff: 500 ms doubling, capped at 15 s, in its upper half.
                let ceiling = (500u64 << (attempt - 1).min(5)).min(15_000);
                ceiling / 2 + random(ceiling / 2)
            }
        };
        if lost_at.is_none() {
            lost_at = Some(Instant::now());
            disturbed = Some(phase.get());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = stop.changed() => break,
        }
    }
    // Account, once the stop says what was published.
    let published = loop {
        if let Some(stop) = stop.borrow().clone() {
            break stop;
        }
        if stop.changed().await.is_err() {
            return;
        }
    };
    let (distinct, duplicates) = seen.counts();
    let mut state = state.borrow_mut();
    let report = &mut state.report;
    report.duplicates += duplicates;
    for (channel, got) in distinct {
        report.received += got;
        report.missing += published
            .get(channel)
            .copied()
            .unwrap_or(0)
            .saturating_sub(got);
    }
}

/// Another node than `node`, at random.
fn other(node: usize, nodes: usize) -> usize {
    if nodes < 2 {
        return node;
    }
    (node + 1 + random(nodes as u64 - 1) as usize) % nodes
}

/// A WebSocket to `url`, welcomed, its subscribes sent (with `since` once it was
/// subscribed before: the last `seq` of each channel).
async fn connect(
    url: &str,
    source: IpAddr,
    channels: &[String],
    last: &[u64],
    resume: bool,
) -> Result<Socket, String> {
    let mut ws = worker::open(url, source, false).await?;
    ws.until(|f| contains(f, b"\"welcome\"")).await?;
    for (channel, since) in channels.iter().zip(last) {
        let request = match resume {
            true => format!(r#"{{"op":"subscribe","channel":"{channel}","since":{since}}}"#),
            false => format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#),
        };
        ws.send(0x1, request.as_bytes()).await?;
    }
    Ok(ws)
}

/// Runs one worker (the `storm-worker` command).
pub fn work(job: Job) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, work_async(job));
}

fn say(said: &Said) {
    println!("{}", serde_json::to_string(said).expect("JSON"));
}

async fn work_async(job: Job) {
    let job = Rc::new(job);
    let state = Rc::new(RefCell::new(State {
        phases: (0..PHASES).map(|_| Hists::default()).collect(),
        live: 0,
        report: Report::default(),
    }));
    let phase = Rc::new(Cell::new(QUIET));
    let ready = Rc::new(Cell::new((0, 0)));
    let (stop_tx, stop_rx) = watch::channel(None);
    let mut tasks = Vec::new();
    // At most 512 connects in flight while the clients start.
    for i in 0..job.clients {
        while i - ready.get().0 - ready.get().1 >= 512 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tasks.push(tokio::task::spawn_local(client(
            i,
            job.clone(),
            state.clone(),
            phase.clone(),
            stop_rx.clone(),
            ready.clone(),
        )));
    }
    while ready.get().0 + ready.get().1 < job.clients {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, failed) = ready.get();
    say(&Said::Ready { ok, failed });
    let progress = {
        let state = state.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let live = state.borrow().live;
                say(&Said::Progress { live });
            }
        })
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Order>(&line) {
            Ok(Order::Phase(p)) => phase.set(p.min(PHASES - 1)),
            Ok(Order::Stop(published)) => {
                let _ = stop_tx.send(Some(Rc::new(published)));
                break;
            }
            Err(err) => eprintln!("storm-worker: {err}"),
        }
    }
    progress.abort();
    for task in tasks {
        let _ = task.await;
    }
    let mut state = state.borrow_mut();
    let phases = state
        .phases
        .iter()
        .map(|h| PhaseReport {
            reconnects: h.reconnects,
            bystanders: (h.bystanders.sparse(), h.bystanders.max),
            movers: (h.movers.sparse(), h.movers.max),
            outages: (h.outages.sparse(), h.outages.max),
        })
        .collect();
    let mut report = std::mem::take(&mut state.report);
    report.phases = phases;
    say(&Said::Done(report));
}

/// A worker process, as the coordinator holds it.
struct Worker {
    child: std::process::Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Said>,
    live: usize,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn order(&mut self, order: &Order) {
        let _ = writeln!(
            self.stdin,
            "{}",
            serde_json::to_string(order).expect("JSON")
        );
    }
}

/// The live clients (connected and resumed) over every worker.
fn live(workers: &mut [Worker]) -> usize {
    for worker in workers.iter_mut() {
        while let Ok(said) = worker.lines.try_recv() {
            if let Said::Progress { live } = said {
                worker.live = live;
            }
        }
    }
    workers.iter().map(|w| w.live).sum()
}

/// A phase's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    /// From the fault to every client connected and resumed (seconds).
    pub recovery_secs: f64,
    pub reconnects: u64,
    pub outage_ms: Quantiles,
    pub bystanders_ms: Quantiles,
    pub movers_ms: Quantiles,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    pub clients: usize,
    pub nodes: usize,
    pub rate: u64,
    /// Every node's `FANOUT_ACCEPT_RATE` (0: none).
    pub accept_rate: u32,
    pub connect_secs: f64,
    pub published: u64,
    /// The probes' latency (the bystanders' reference), and every client's.
    pub quiet_ms: Quantiles,
    pub quiet_all_ms: Quantiles,
    /// Per node at the end of the quiet phase: RSS (KiB) and connections.
    pub quiet_rss: Vec<(u64, usize)>,
    pub kill: Phase,
    pub rolling: Option<Phase>,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unrecovered: u64,
    /// Per node: the most RSS seen (KiB), the most connections it held, its budget (KiB).
    pub rss: Vec<(u64, usize, u64)>,
}

/// A node's memory budget (KiB) for `connections`: what a connection costs it in the quiet
/// phase (`per_connection`, KiB, everything in: its own RSS over its connections), and the
/// client bytes it may buffer on top (`FANOUT_MAX_BUFFERED_BYTES`, 64 MiB): a storm may fill
/// the buffers, not grow what each connection holds.
pub fn budget_kib(connections: usize, per_connection: f64) -> u64 {
    (per_connection * connections as f64) as u64 + 64 * 1024
}

/// A ws node of the run: its process and its fixed port (a restart keeps it).
struct Node {
    name: String,
    port: u16,
    process: Option<Process>,
}

fn start_node(paths: &Paths, env: &[(String, String)], name: &str, port: u16) -> Process {
    tier::start_fanout_at(paths, "fanout-ws", name, env, &format!("127.0.0.1:{port}"))
}

/// Connections a node holds (`/v1/debug/state`), 0 when it does not answer.
fn connections(port: u16) -> usize {
    fanout_testkit::http::get_blocking(&format!("127.0.0.1:{port}"), "/v1/debug/state")
        .and_then(|a| a.json()["connections"].as_u64())
        .unwrap_or(0) as usize
}

/// Waits until the workers have seen the fault (fewer than `clients` live, or 10 s), then
/// until `clients` are live again; how long it took from `started` (None: not within
/// `bound`).
async fn until_live(
    workers: &mut [Worker],
    clients: usize,
    started: Instant,
    bound: Duration,
) -> Option<f64> {
    while started.elapsed() < Duration::from_secs(10) && live(workers) >= clients {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while started.elapsed() < bound {
        if live(workers) >= clients {
            return Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub async fn run(paths: &Paths, params: Params) -> Storm {
    let Params {
        clients,
        nodes,
        rate,
        shared,
        quiet,
        no_rolling,
        accept_rate,
    } = params;
    let nats = NatsServer::start();
    let env = vec![
        ("FANOUT_NATS_URL".to_string(), nats.url()),
        ("FANOUT_HISTORY_MAX_AGE_SECS".to_string(), "600".to_string()),
    ];
    let api = tier::start_fanout(paths, "fanout-api", "api-storm", &env);
    tier::wait_ready(&api.addr).await;
    let mut env = env;
    if accept_rate > 0 {
        env.push(("FANOUT_ACCEPT_RATE".into(), accept_rate.to_string()));
    }
    let mut ws: Vec<Node> = (0..nodes)
        .map(|k| {
            let port = fanout_testkit::free_port();
            let name = format!("ws-{}", k + 1);
            Node {
                process: Some(start_node(paths, &env, &name, port)),
                name,
                port,
            }
        })
        .collect();
    for node in &ws {
        tier::wait_ready(&format!("127.0.0.1:{}", node.port)).await;
    }
    let urls: Vec<String> = ws
        .iter()
        .map(|n| format!("ws://127.0.0.1:{}/ws", n.port))
        .collect();

    // RSS, sampled until the end.
    let sampling = Arc::new(AtomicBool::new(true));
    let rss: Arc<Mutex<Vec<(u64, usize)>>> = Arc::new(Mutex::new(vec![(0, 0); nodes]));
    let pids: Arc<Mutex<Vec<Option<u32>>>> = Arc::new(Mutex::new(
        ws.iter()
            .map(|n| n.process.as_ref().map(|p| p.child.id()))
            .collect(),
    ));
    let sampler = {
        let (sampling, rss, pids, ports) = (
            sampling.clone(),
            rss.clone(),
            pids.clone(),
            ws.iter().map(|n| n.port).collect::<Vec<_>>(),
        );
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let now: Vec<Option<u32>> = pids.lock().unwrap().clone();
                for (k, pid) in now.iter().enumerate() {
                    if let Some(pid) = pid {
                        let kib = tier::rss_kib(*pid);
                        let held = connections(ports[k]);
                        let mut rss = rss.lock().unwrap();
                        rss[k].0 = rss[k].0.max(kib);
                        rss[k].1 = rss[k].1.max(held);
                    }
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        })
    };

    // The workers. The first holds the probes: a few clients of their own, whose latencies
    // are the bystanders' (a worker busy reconnecting thousands of clients would delay the
    // events it times).
    let probes = (clients / 50).clamp(1, 2000);
    let rest = clients - probes;
    let count = rest.div_ceil(PER_WORKER).max(1);
    let shares: Vec<usize> = std::iter::once(probes)
        .chain((0..count).map(|w| rest / count + usize::from(w < rest % count)))
        .collect();
    let salt = (now_us() / 1000 % 60_000) as u32;
    let (a, b) = (1 + salt / 250 % 250, salt % 250);
    let mut workers = Vec::new();
    let mut first = 0;
    let started = Instant::now();
    for (w, &share) in shares.iter().enumerate() {
        let job = Job {
            urls: urls.clone(),
            sources: (0..4)
                .map(|k| {
                    format!("127.{a}.{b}.{}", 10 + 4 * w + k)
                        .parse()
                        .expect("an address")
                })
                .collect(),
            first,
            clients: share,
            shared,
        };
        first += share;
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .arg("storm-worker")
            .arg(serde_json::to_string(&job).expect("JSON"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(said) = serde_json::from_str(&line)
                    && tx.send(said).is_err()
                {
                    break;
                }
            }
        });
        workers.push(Worker {
            child,
            stdin,
            lines,
            live: 0,
        });
    }
    let mut connected = 0;
    for worker in &mut workers {
        loop {
            match worker.lines.recv_timeout(Duration::from_secs(600)) {
                Ok(Said::Ready { ok, failed }) => {
                    connected += ok;
                    if failed > 0 {
                        eprintln!("storm: {failed} clients of a worker did not connect");
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => panic!("a storm worker did not get ready"),
            }
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!("storm: {connected} clients connected in {connect_secs:.1} s");

    // The publisher: `rate` events a second, alternately to a shared channel and to a
    // client's own; retried with its idempotency key until stored.
    let publishing = Arc::new(AtomicBool::new(true));
    let published: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let publisher = {
        let (publishing, published) = (publishing.clone(), published.clone());
        let api = format!("http://{}", api.addr);
        tokio::spawn(async move {
            let mut http = Http1::connect(&api).await.expect("the API");
            let tick = Duration::from_micros(1_000_000 / rate.max(1));
            let mut next = tokio::time::Instant::now();
            let mut k = 0u64;
            while publishing.load(Ordering::Relaxed) {
                next += tick;
                tokio::time::sleep_until(next).await;
                k += 1;
                let channel = match k % 2 {
                    0 => format!("s{}", random(shared as u64)),
                    _ => format!("c{}", random(clients as u64)),
                };
                let n = published
                    .lock()
                    .unwrap()
                    .get(&channel)
                    .copied()
                    .unwrap_or(0);
                let body = load::body(n, 100);
                let path = format!("/v1/channels/{channel}/events");
                loop {
                    match http.post(&path, body.as_bytes()).await {
                        Ok((202, _)) => break,
                        Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        Err(_) => {
                            if let Ok(again) = Http1::connect(&api).await {
                                http = again;
                            }
                        }
                    }
                }
                *published.lock().unwrap().entry(channel).or_default() += 1;
            }
        })
    };

    // 1. Quiet.
    tokio::time::sleep(Duration::from_secs(quiet)).await;
    let quiet_rss: Vec<(u64, usize)> = ws
        .iter()
        .map(|n| {
            let pid = n.process.as_ref().map_or(0, |p| p.child.id());
            (tier::rss_kib(pid), connections(n.port))
        })
        .collect();

    // 2. kill -9 of the busiest node.
    let busiest = (0..nodes)
        .max_by_key(|&k| connections(ws[k].port))
        .expect("nodes");
    let held = connections(ws[busiest].port);
    eprintln!("storm: kill -9 {} ({held} clients)", ws[busiest].name);
    for worker in &mut workers {
        worker.order(&Order::Phase(KILL));
    }
    pids.lock().unwrap()[busiest] = None;
    let killed = Instant::now();
    if let Some(mut process) = ws[busiest].process.take() {
        let _ = process.child.kill();
        let _ = process.child.wait();
    }
    let kill_secs = until_live(&mut workers, connected, killed, Duration::from_secs(600))
        .await
        .unwrap_or(f64::NAN);
    eprintln!("storm: every client resumed after {kill_secs:.2} s");
    // Bystanders' latencies while it lasted, then on.
    for worker in &mut workers {
        worker.order(&Order::Phase(BETWEEN));
    }
    let process = start_node(paths, &env, &ws[busiest].name, ws[busiest].port);
    pids.lock().unwrap()[busiest] = Some(process.child.id());
    ws[busiest].process = Some(process);
    tier::wait_ready(&format!("127.0.0.1:{}", ws[busiest].port)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 3. A rolling restart: each node drained (SIGTERM), restarted, ready, then the next.
    let mut rolling_secs = None;
    if !no_rolling {
        for worker in &mut workers {
            worker.order(&Order::Phase(ROLLING));
        }
        let started = Instant::now();
        #[allow(clippy::needless_range_loop)] // `ws[k]` is replaced in the loop
        for k in 0..nodes {
            eprintln!("storm: rolling {}", ws[k].name);
            if let Some(mut process) = ws[k].process.take() {
                process.signal("-TERM");
                let _ = process.child.wait();
            }
            pids.lock().unwrap()[k] = None;
            let process = start_node(paths, &env, &ws[k].name, ws[k].port);
            pids.lock().unwrap()[k] = Some(process.child.id());
            ws[k].process = Some(process);
            tier::wait_ready(&format!("127.0.0.1:{}", ws[k].port)).await;
        }
        until_live(
            &mut workers,
            connected,
            Instant::now(),
            Duration::from_secs(600),
        )
        .await;
        rolling_secs = Some(started.elapsed().as_secs_f64());
        eprintln!(
            "storm: rolling restart done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for worker in &mut workers {
            worker.order(&Order::Phase(TAIL));
        }
    }

    // The end: what was published, and what every client got.
    tokio::time::sleep(Duration::from_secs(3)).await;
    publishing.store(false, Ordering::Relaxed);
    let _ = publisher.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let published = published.lock().unwrap().clone();
    let total: u64 = published.values().sum();
    for worker in &mut workers {
        worker.order(&Order::Stop(published.clone()));
    }
    let mut merged: Vec<[Histogram; 3]> = (0..PHASES)
        .map(|_| {
            [
                Histogram::default(),
                Histogram::default(),
                Histogram::default(),
            ]
        })
        .collect();
    let mut reconnects = [0u64; PHASES];
    let (mut received, mut missing, mut duplicates, mut unrecovered) = (0, 0, 0, 0);
    let mut probed: Vec<Histogram> = (0..PHASES).map(|_| Histogram::default()).collect();
    for (w, worker) in workers.iter_mut().enumerate() {
        let report = loop {
            match worker.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(Said::Done(report)) => break report,
                Ok(_) => {}
                Err(_) => panic!("a storm worker did not report"),
            }
        };
        received += report.received;
        missing += report.missing;
        duplicates += report.duplicates;
        unrecovered += report.unrecovered;
        for (p, phase) in report.phases.iter().enumerate() {
            reconnects[p] += phase.reconnects;
            if w == 0 {
                let (buckets, max) = &phase.bystanders;
                probed[p].merge(&Histogram::from_sparse(buckets, *max));
            }
            for (h, (buckets, max)) in [&phase.bystanders, &phase.movers, &phase.outages]
                .into_iter()
                .enumerate()
            {
                merged[p][h].merge(&Histogram::from_sparse(buckets, *max));
            }
        }
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let phase = |p: usize, name: &'static str, secs: f64| Phase {
        name,
        recovery_secs: secs,
        reconnects: reconnects[p],
        bystanders_ms: Quantiles::of(&probed[p]),
        movers_ms: Quantiles::of(&merged[p][1]),
        outage_ms: Quantiles::of(&merged[p][2]),
    };
    let mut quiet_all = merged[QUIET][0].clone();
    quiet_all.merge(&merged[QUIET][1]);
    let storm = Storm {
        accept_rate,
        quiet_all_ms: Quantiles::of(&quiet_all),
        quiet_rss: quiet_rss.clone(),
        clients: connected,
        nodes,
        rate,
        connect_secs,
        published: total,
        quiet_ms: Quantiles::of(&probed[QUIET]),
        kill: phase(KILL, "kill -9 of the busiest node", kill_secs),
        rolling: rolling_secs.map(|secs| phase(ROLLING, "rolling restart", secs)),
        received,
        missing,
        duplicates,
        unrecovered,
        rss: rss
            .lock()
            .unwrap()
            .iter()
            .zip(&quiet_rss)
            .map(|(&(kib, held), &(quiet_kib, quiet_held))| {
                (
                    kib,
                    held,
                    budget_kib(held, quiet_kib as f64 / quiet_held.max(1) as f64),
                )
            })
            .collect(),
    };
    print_table(&storm);
    drop(workers);
    drop(ws);
    drop(api);
    drop(nats);
    storm
}

fn print_table(s: &Storm) {
    println!(
        "{} clients over {} nodes, {} events/s (half shared, half per user), connected in {:.1} s",
        s.clients, s.nodes, s.rate, s.connect_secs
    );
    println!(
        "quiet: the probes' p50 / p99 {:.2} / {:.2} ms (every client's {:.2} / {:.2} ms)",
        s.quiet_ms.p50, s.quiet_ms.p99, s.quiet_all_ms.p50, s.quiet_all_ms.p99
    );
    for (k, (kib, held)) in s.quiet_rss.iter().enumerate() {
        println!(
            "ws-{} quiet: {:.0} MiB with {held} connections ({:.1} KiB each, all in)",
            k + 1,
            *kib as f64 / 1024.0,
            *kib as f64 / (*held).max(1) as f64
        );
    }
    println!(
        "| fault | every client back and resumed | reconnects | outage p50 / p99 / max | bystanders p50 / p99 (target: p99 ≤ 2× quiet) | moved clients' events p99 |"
    );
    println!("|---|---|---|---|---|---|");
    for phase in std::iter::once(&s.kill).chain(&s.rolling) {
        println!(
            "| {} | {:.2} s | {} | {:.0} / {:.0} / {:.0} ms | {:.2} / {:.2} ms ({:.1}× quiet) | {:.0} ms |",
            phase.name,
            phase.recovery_secs,
            phase.reconnects,
            phase.outage_ms.p50,
            phase.outage_ms.p99,
            phase.outage_ms.max,
            phase.bystanders_ms.p50,
            phase.bystanders_ms.p99,
            phase.bystanders_ms.p99 / s.quiet_ms.p99,
            phase.movers_ms.p99,
        );
    }
    println!(
        "published {}, deliveries {}, missed {}, duplicated {}, recovered:false {}",
        s.published, s.received, s.missing, s.duplicates, s.unrecovered
    );
    for (k, (kib, held, budget)) in s.rss.iter().enumerate() {
        println!(
            "ws-{}: RSS max {:.0} MiB with up to {} connections, budget {:.0} MiB{}",
            k + 1,
            *kib as f64 / 1024.0,
            held,
            *budget as f64 / 1024.0,
            if kib <= budget { "" } else { " OVER" }
        );
    }
}
