//! `fanout-bench chaos`: a tier of its own in network namespaces, faults on a seeded random
//! schedule, and a checker in the spirit of Jepsen's.
//!
//! The run makes a bridge and one namespace per host (3 NATS servers with an R3 stream, 2 APIs,
//! 4 ws nodes), each with its own address on the bridge; the bench itself stays in the root
//! namespace. Publishers (one per API) send `rate` events a second with idempotency keys and
//! retry until acknowledged (a 503, a timeout, an API down: the other API, the same key);
//! continuous subscribers on WebSocket, SSE and long-polling follow every channel, and the
//! WebSocket ones are present in a presence channel. For `--minutes` a schedule of faults,
//! from `--seed` (printed: a run is replayed with the same seed), each held then healed:
//! - `kill -9` of a NATS server, an API or a ws node, restarted after 1–5 s;
//! - SIGSTOP of one for 5–30 s, then SIGCONT;
//! - a partition (iptables inside the namespaces) of a NATS server from another, of a ws node
//!   from every NATS server, or of an API from every NATS server, for 5–30 s;
//! - a NATS server restarted (SIGTERM);
//! - a rolling restart of the ws nodes (SIGTERM: each drains its clients).
//!
//! After each fault heals, the checker waits (bounded) for every subscriber to be connected
//! again and for the presence channel to list exactly the WebSocket subscribers' connections:
//! a member left behind by a dead connection is a ghost, counted if it outlives the bound.
//! At the end every acknowledged event must have reached every subscriber exactly once, in
//! order per channel, with no `recovered: false`; every process's RSS within its budget.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::tier::{self, Paths};

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// How long faults are injected.
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// The schedule's seed (a random one when not given; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Events per second from each of the two publishers.
    #[arg(long, default_value_t = 20)]
    pub rate: u64,
    /// Channels every subscriber follows.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Holds (pauses, partitions) last 2–6 s instead of 5–30 s: for a short run in the tests.
    #[arg(long)]
    pub short: bool,
}

/// A small deterministic generator (SplitMix64): the schedule from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

/// A host of the tier: its namespace, its address, what runs there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Nats(usize),
    Api(usize),
    Ws(usize),
}

impl Role {
    fn all() -> Vec<Role> {
        let mut all: Vec<Role> = (0..3).map(Role::Nats).collect();
        all.extend((0..2).map(Role::Api));
        all.extend((0..4).map(Role::Ws));
        all
    }

    fn name(self) -> String {
        match self {
            Role::Nats(i) => format!("nats{}", i + 1),
            Role::Api(i) => format!("api{}", i + 1),
            Role::Ws(i) => format!("ws{}", i + 1),
        }
    }

    fn octet(self) -> usize {
        match self {
            Role::Nats(i) => 11 + i,
            Role::Api(i) => 21 + i,
            Role::Ws(i) => 31 + i,
        }
    }

    /// Its memory budget (KiB).
    fn budget_kib(self) -> u64 {
        match self {
            Role::Nats(_) => 1024 * 1024,
            Role::Api(_) | Role::Ws(_) => 256 * 1024,
        }
    }
}

/// A fault, as the schedule says it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
enum Fault {
    Kill {
        host: String,
        down_secs: u64,
    },
    Pause {
        host: String,
        secs: u64,
    },
    Partition {
        hosts: Vec<String>,
        from: Vec<String>,
        secs: u64,
    },
    NatsRestart {
        host: String,
    },
    WsRolling,
}

fn schedule(rng: &mut Rng, short: bool) -> Fault {
    let hold = |rng: &mut Rng| match short {
        true => rng.between(2, 6),
        false => rng.between(5, 30),
    };
    let any = |rng: &mut Rng| {
        let all = Role::all();
        all[rng.below(all.len() as u64) as usize]
    };
    let nats_names = |skip: Option<usize>| -> Vec<String> {
        (0..3)
            .filter(|i| Some(*i) != skip)
            .map(|i| Role::Nats(i).name())
            .collect()
    };
    match rng.below(7) {
        0 | 1 => Fault::Kill {
            host: any(rng).name(),
            down_secs: rng.between(1, 5),
        },
        2 => Fault::Pause {
            host: any(rng).name(),
            secs: hold(rng),
        },
        3 => {
            let a = rng.below(3) as usize;
            let b = (a + 1 + rng.below(2) as usize) % 3;
            Fault::Partition {
                hosts: vec![Role::Nats(a).name()],
                from: vec![Role::Nats(b).name()],
                secs: hold(rng),
            }
        }
        4 => {
            let host = match rng.below(2) {
                0 => Role::Ws(rng.below(4) as usize).name(),
                _ => Role::Api(rng.below(2) as usize).name(),
            };
            Fault::Partition {
                hosts: vec![host],
                from: nats_names(None),
                secs: hold(rng),
            }
        }
        5 => Fault::NatsRestart {
            host: Role::Nats(rng.below(3) as usize).name(),
        },
        _ => Fault::WsRolling,
    }
}

/// The run's network: a bridge in the root namespace, a namespace per host. Removed on drop
/// (also when the run fails).
struct Net {
    bridge: String,
    prefix: String,
    subnet: String,
    namespaces: Vec<String>,
    forward_rule: bool,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Net {
    fn new() -> Result<Net, String> {
        let run = std::process::id() % 10_000;
        let mut net = Net {
            bridge: format!("fcbr{run}"),
            prefix: format!("fc{run}"),
            subnet: format!("10.213.{}", run % 250),
            namespaces: Vec::new(),
            forward_rule: false,
        };
        let bridge = net.bridge.clone();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", net.subnet),
            "dev",
            &bridge,
        ])?;
        sh(&["ip", "link", "set", &bridge, "up"])?;
        // Docker's FORWARD policy drops bridged traffic when br_netfilter is loaded.
        if sh(&[
            "iptables", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
        ])
        .is_ok()
        {
            net.forward_rule = true;
        }
        for role in Role::all() {
            let ns = net.ns(role);
            sh(&["ip", "netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let (inner, outer) = (
                format!("{}i{}", net.prefix, role.octet()),
                format!("{}o{}", net.prefix, role.octet()),
            );
            sh(&[
                "ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            sh(&["ip", "link", "set", &inner, "netns", &ns])?;
            sh(&["ip", "link", "set", &outer, "master", &bridge])?;
            sh(&["ip", "link", "set", &outer, "up"])?;
            let exec = |args: &[&str]| {
                let mut all = vec!["ip", "netns", "exec", &ns];
                all.extend_from_slice(args);
                sh(&all)
            };
            exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", net.addr(role)),
                "dev",
                &inner,
            ])?;
            exec(&["ip", "link", "set", &inner, "up"])?;
            exec(&["ip", "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, role: Role) -> String {
        format!("{}-{}", self.prefix, role.name())
    }

    fn addr(&self, role: Role) -> String {
        format!("{}.{}", self.subnet, role.octet())
    }

    /// Cuts `host` off from `from` (both ways: its own INPUT and OUTPUT).
    fn partition(&self, host: Role, from: &[Role]) {
        let ns = self.ns(host);
        for peer in from {
            let peer = self.addr(*peer);
            let _ = sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "INPUT", "-s", &peer, "-j", "DROP",
            ]);
            let _ = sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-A", "OUTPUT", "-d", &peer, "-j", "DROP",
            ]);
        }
    }

    fn heal(&self, host: Role) {
        let _ = sh(&["ip", "netns", "exec", &self.ns(host), "iptables", "-F"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        if self.forward_rule {
            let _ = sh(&[
                "iptables",
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ]);
        }
        let _ = sh(&["ip", "link", "del", &self.bridge]);
    }
}

/// The processes of the tier, by host; every one started by this run, stopped on drop.
struct Tier {
    net: Net,
    dir: PathBuf,
    bin: PathBuf,
    procs: Mutex<HashMap<Role, Child>>,
    /// Processes SIGSTOPped now (continued before anything else is done to them).
    stopped: Mutex<HashSet<Role>>,
}

impl Drop for Tier {
    fn drop(&mut self) {
        for (_, mut child) in self.procs.lock().unwrap().drain() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Tier {
    fn nats_urls(&self) -> String {
        (0..3)
            .map(|i| format!("nats://{}:4222", self.net.addr(Role::Nats(i))))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn ws_url(&self, i: usize) -> String {
        format!("ws://{}:8081/ws", self.net.addr(Role::Ws(i)))
    }

    fn http(&self, role: Role) -> String {
        match role {
            Role::Ws(_) => format!("http://{}:8081", self.net.addr(role)),
            Role::Api(_) => format!("http://{}:8080", self.net.addr(role)),
            Role::Nats(_) => format!("http://{}:8222", self.net.addr(role)),
        }
    }

    fn start(&self, role: Role) {
        let ns = self.net.ns(role);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", role.name())))
            .expect("a log file");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &ns]);
        match role {
            Role::Nats(i) => {
                let conf = self.dir.join(format!("{}.conf", role.name()));
                let me = self.net.addr(role);
                let routes: Vec<String> = (0..3)
                    .map(|j| format!("nats-route://{}:6222", self.net.addr(Role::Nats(j))))
                    .collect();
                let text = format!(
                    "server_name: n{}\nlisten: \"{me}:4222\"\nhttp: \"{me}:8222\"\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                     cluster {{ name: chaos, listen: \"{me}:6222\", routes: [{}] }}\n",
                    i + 1,
                    self.dir.join(format!("js-{}", i + 1)).display(),
                    routes.join(", ")
                );
                std::fs::write(&conf, text).expect("a NATS config");
                command
                    .arg(fanout_testkit::nats::nats_server_bin())
                    .arg("-c")
                    .arg(&conf);
            }
            Role::Api(_) | Role::Ws(_) => {
                let (binary, port) = match role {
                    Role::Api(_) => ("fanout-api", 8080),
                    _ => ("fanout-ws", 8081),
                };
                command
                    .arg(self.bin.join(binary))
                    .env("FANOUT_NATS_URL", self.nats_urls())
                    .env("FANOUT_NODE_ID", role.name())
                    .env("FANOUT_LISTEN", format!("{}:{port}", self.net.addr(role)))
                    .env(
                        "FANOUT_PUBLIC_URL",
                        format!("ws://{}:8081/ws", self.net.addr(role)),
                    )
                    .env("FANOUT_HISTORY_REPLICAS", "3")
                    .env("FANOUT_HISTORY_MAX_AGE_SECS", "7200")
                    .env("FANOUT_DRAIN_WINDOW_MS", "1000")
                    .env("RUST_LOG", "warn,fanout_api=info,fanout_ws=info");
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("a log file"))
            .stderr(log)
            .spawn()
            .expect("start a process in its namespace");
        self.procs.lock().unwrap().insert(role, child);
    }

    fn pid(&self, role: Role) -> Option<u32> {
        self.procs.lock().unwrap().get(&role).map(Child::id)
    }

    fn signal(&self, role: Role, signal: &str) {
        if let Some(pid) = self.pid(role) {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    fn kill(&self, role: Role) {
        self.cont(role);
        if let Some(mut child) = self.procs.lock().unwrap().remove(&role) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&self, role: Role) {
        self.signal(role, "-STOP");
        self.stopped.lock().unwrap().insert(role);
    }

    fn cont(&self, role: Role) {
        if self.stopped.lock().unwrap().remove(&role) {
            self.signal(role, "-CONT");
        }
    }

    /// SIGTERM, and waits (at most 30 s) for the exit.
    fn terminate(&self, role: Role) {
        self.cont(role);
        let child = self.procs.lock().unwrap().remove(&role);
        if let Some(mut child) = child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn ready(&self, role: Role) -> bool {
        let path = match role {
            Role::Nats(_) => "/healthz?js-enabled-only=true",
            _ => "/readyz",
        };
        matches!(
            reqwest::Client::new()
                .get(format!("{}{path}", self.http(role)))
                .timeout(Duration::from_secs(2))
                .send()
                .await,
            Ok(r) if r.status().is_success()
        )
    }

    /// Until every host answers ready (at most `bound`).
    async fn all_ready(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            let mut ready = true;
            for role in Role::all() {
                ready &= self.ready(role).await;
            }
            if ready {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }
}

/// What one subscriber received, per channel, in order; its `recovered: false` answers.
#[derive(Debug, Default)]
struct Received {
    seqs: HashMap<String, Vec<u64>>,
    unrecovered: u64,
    /// The connection it holds now (WebSocket subscribers, for presence).
    conn: Option<String>,
    live: bool,
}

/// A subscriber, shared with the checker.
struct Subscriber {
    name: String,
    transport: &'static str,
    received: Mutex<Received>,
}

/// The positions a subscriber resumes from: the last seq per channel.
fn positions(received: &Received, channels: &[String]) -> Vec<u64> {
    channels
        .iter()
        .map(|c| {
            received
                .seqs
                .get(c)
                .and_then(|s| s.last())
                .copied()
                .unwrap_or(0)
        })
        .collect()
}

/// What a directed close says: when, and the node (an index of `urls`).
fn directed(reason: &str, urls: &[String]) -> (u64, Option<usize>) {
    let said: Value = serde_json::from_str(reason).unwrap_or(Value::Null);
    let after = said["reconnect_after_ms"].as_u64().unwrap_or(500);
    let node = said["nodes"][0]
        .as_str()
        .and_then(|url| urls.iter().position(|u| u == url));
    (after, node)
}

/// A WebSocket subscriber: resumes every channel from its last seq after every reconnect,
/// obeys directed closes, tries another node when one fails; present in `room`.
async fn websocket(
    sub: Arc<Subscriber>,
    urls: Vec<String>,
    channels: Vec<String>,
    running: Arc<AtomicBool>,
    start: usize,
) {
    let mut node = start;
    let mut first = true;
    let mut attempt = 0u32;
    while running.load(Ordering::Relaxed) {
        let url = format!("{}?user={}", urls[node], sub.name);
        let wait = match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        {
            Ok(Ok((mut socket, _))) => {
                let since = positions(&sub.received.lock().unwrap(), &channels);
                let mut ok = true;
                for (channel, since) in channels.iter().zip(&since) {
                    let mut request = json!({"op": "subscribe", "channel": channel});
                    if !first {
                        request["since"] = json!(since);
                    }
                    ok &= socket
                        .send(Message::text(request.to_string()))
                        .await
                        .is_ok();
                }
                ok &= socket
                    .send(Message::text(
                        json!({"op": "subscribe", "channel": "room", "presence": true}).to_string(),
                    ))
                    .await
                    .is_ok();
                let mut pending = channels.len() + 1;
                let mut result = (500, None);
                while ok && running.load(Ordering::Relaxed) {
                    let message = tokio::select! {
                        m = socket.next() => m,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    };
                    let Some(Ok(message)) = message else { break };
                    match message {
                        Message::Text(text) => {
                            let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                            let mut received = sub.received.lock().unwrap();
                            match frame["op"].as_str() {
                                Some("welcome") => {
                                    received.conn = frame["conn"].as_str().map(String::from)
                                }
                                Some("event") => {
                                    if let (Some(channel), Some(seq)) =
                                        (frame["channel"].as_str(), frame["seq"].as_u64())
                                    {
                                        received
                                            .seqs
                                            .entry(channel.to_string())
                                            .or_default()
                                            .push(seq);
                                    }
                                }
                                Some("subscribed") => {
                                    if frame["recovered"] == false {
                                        received.unrecovered += 1;
                                    }
                                    pending = pending.saturating_sub(1);
                                    if pending == 0 {
                                        received.live = true;
                                        first = false;
                                        attempt = 0;
                                    }
                                }
                                // A resume refused (history unreadable now): reconnect, resume again.
                                Some("error") => break,
                                _ => {}
                            }
                        }
                        Message::Close(frame) => {
                            if let Some(frame) = frame {
                                result = directed(&frame.reason, &urls);
                            }
                            break;
                        }
                        _ => {}
                    }
                }
                sub.received.lock().unwrap().live = false;
                let _ = socket.close(None).await;
                if !running.load(Ordering::Relaxed) {
                    return;
                }
                match result {
                    (after, Some(to)) => {
                        node = to;
                        after
                    }
                    (after, None) => {
                        node = (node + 1) % urls.len();
                        attempt += 1;
                        after.max(250 * u64::from(attempt.min(8)))
                    }
                }
            }
            _ => {
                node = (node + 1) % urls.len();
                attempt += 1;
                250 * u64::from(attempt.min(8))
            }
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// An SSE subscriber: resumes from the stream's last event id (one cursor for every channel).
async fn sse(
    sub: Arc<Subscriber>,
    bases: Vec<String>,
    channels: Vec<String>,
    running: Arc<AtomicBool>,
    start: usize,
) {
    let http = reqwest::Client::new();
    let mut node = start;
    let mut cursor: Option<String> = None;
    let mut attempt = 0u32;
    let query: String = channels.iter().map(|c| format!("channel={c}&")).collect();
    while running.load(Ordering::Relaxed) {
        let mut url = format!("{}/sse?{query}user={}", bases[node], sub.name);
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&last_event_id={cursor}"));
        }
        let mut wait = 250 * u64::from(attempt.min(8) + 1);
        let mut next = (node + 1) % bases.len();
        if let Ok(mut response) = http
            .get(&url)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            && response.status().is_success()
        {
            let mut buf = String::new();
            'read: while running.load(Ordering::Relaxed) {
                let chunk = tokio::select! {
                    c = response.chunk() => c,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                };
                let Ok(Some(chunk)) = chunk else { break };
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let (mut event, mut data, mut id) = ("message", String::new(), None);
                    for line in block.lines() {
                        if let Some(rest) = line.strip_prefix("event: ") {
                            event = if rest == "event" {
                                "event"
                            } else if rest == "resumed" {
                                "resumed"
                            } else if rest == "disconnect" {
                                "disconnect"
                            } else if rest == "welcome" {
                                "welcome"
                            } else {
                                "other"
                            };
                        } else if let Some(rest) = line.strip_prefix("data: ") {
                            data = rest.to_string();
                        } else if let Some(rest) = line.strip_prefix("id: ") {
                            id = Some(rest.to_string());
                        }
                    }
                    let frame: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                    let mut received = sub.received.lock().unwrap();
                    if frame["op"] == "event" {
                        if let (Some(channel), Some(seq)) =
                            (frame["channel"].as_str(), frame["seq"].as_u64())
                        {
                            received
                                .seqs
                                .entry(channel.to_string())
                                .or_default()
                                .push(seq);
                        }
                    } else if event == "welcome" || frame["op"] == "welcome" {
                        received.live = true;
                        attempt = 0;
                    } else if event == "resumed" && frame["recovered"] == false {
                        received.unrecovered += 1;
                    } else if event == "disconnect" {
                        let (after, to) = directed(
                            &data,
                            &bases
                                .iter()
                                .map(|b| format!("{}/ws", b.replace("http://", "ws://")))
                                .collect::<Vec<_>>(),
                        );
                        wait = after;
                        if let Some(to) = to {
                            next = to;
                        }
                        received.live = false;
                        break 'read;
                    }
                    if let Some(id) = id {
                        cursor = Some(id);
                    }
                }
            }
        }
        sub.received.lock().unwrap().live = false;
        attempt += 1;
        node = next;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// A long-polling subscriber: every poll carries the cursor; any node answers.
async fn poll(
    sub: Arc<Subscriber>,
    bases: Vec<String>,
    channels: Vec<String>,
    running: Arc<AtomicBool>,
    start: usize,
) {
    let http = reqwest::Client::new();
    let mut node = start;
    let mut cursor: Option<String> = None;
    let query: String = channels.iter().map(|c| format!("channel={c}&")).collect();
    while running.load(Ordering::Relaxed) {
        let mut url = format!("{}/poll?{query}user={}&timeout=2", bases[node], sub.name);
        if let Some(cursor) = &cursor {
            url.push_str(&format!("&cursor={cursor}"));
        }
        let answer = async {
            let response = http
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            serde_json::from_slice::<Value>(&response.bytes().await.ok()?).ok()
        }
        .await;
        let Some(answer) = answer else {
            sub.received.lock().unwrap().live = false;
            node = (node + 1) % bases.len();
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        let mut received = sub.received.lock().unwrap();
        received.live = true;
        for event in answer["events"].as_array().into_iter().flatten() {
            if let (Some(channel), Some(seq)) = (event["channel"].as_str(), event["seq"].as_u64()) {
                received
                    .seqs
                    .entry(channel.to_string())
                    .or_default()
                    .push(seq);
            }
        }
        for resumed in answer["resumed"].as_array().into_iter().flatten() {
            if resumed["recovered"] == false {
                received.unrecovered += 1;
            }
        }
        if let Some(next) = answer["cursor"].as_str() {
            cursor = Some(next.to_string());
        }
    }
}

/// Acknowledged events: (channel, seq).
type Acked = Arc<Mutex<Vec<(String, u64)>>>;

/// A publisher: `rate` events a second to the channels in turn through `apis[first]`, each
/// retried with its idempotency key (on the other API when this one fails) until stored.
async fn publisher(
    id: usize,
    apis: Vec<String>,
    channels: Vec<String>,
    rate: u64,
    running: Arc<AtomicBool>,
    acked: Acked,
    retries: Arc<AtomicU64>,
) {
    let http = reqwest::Client::new();
    let tick = Duration::from_micros(1_000_000 / rate.max(1));
    let mut next = tokio::time::Instant::now();
    let mut n = 0u64;
    let mut api = id % apis.len();
    while running.load(Ordering::Relaxed) {
        next += tick;
        tokio::time::sleep_until(next).await;
        n += 1;
        let channel = &channels[n as usize % channels.len()];
        let key = format!("p{id}-{n}");
        let body = json!({"p": id, "n": n}).to_string();
        loop {
            let sent = http
                .post(format!("{}/v1/channels/{channel}/events", apis[api]))
                .header("content-type", "application/json")
                .header("idempotency-key", &key)
                .body(body.clone())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            if let Ok(response) = sent
                && response.status().as_u16() == 202
                && let Ok(bytes) = response.bytes().await
                && let Ok(answer) = serde_json::from_slice::<Value>(&bytes)
                && let Some(seq) = answer["seq"].as_u64()
            {
                acked.lock().unwrap().push((channel.clone(), seq));
                break;
            }
            retries.fetch_add(1, Ordering::Relaxed);
            api = (api + 1) % apis.len();
            // Retried until stored, also once publishing stops: no event is left unknown.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The checker's table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Chaos {
    pub seed: u64,
    pub minutes: f64,
    pub faults: usize,
    pub acknowledged: usize,
    pub subscribers: usize,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub unrecovered: u64,
    pub presence_errors: u64,
    /// The longest a ghost (or a missing member) lasted after a fault healed, ms.
    pub presence_settle_ms: u64,
    pub over_budget: Vec<String>,
    pub publish_retries: u64,
    /// Per fault kind, how many.
    pub kinds: BTreeMap<String, usize>,
    /// Per subscriber: (name, events lost, received, live at the end).
    pub per_subscriber: Vec<(String, u64, usize, bool)>,
    /// Of a sample of the lost events: how many another subscriber got (this one missed
    /// them) and how many none did (lost before delivery: by the store, or by every node).
    pub lost_in_stream: u64,
    pub lost_from_stream: u64,
}

/// The presence channel's members' connections, from an API that answers.
async fn members(tier: &Tier) -> Option<(HashSet<String>, bool)> {
    for i in 0..2 {
        let url = format!("{}/v1/channels/room/presence", tier.http(Role::Api(i)));
        if let Ok(response) = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            && response.status().is_success()
            && let Ok(bytes) = response.bytes().await
            && let Ok(answer) = serde_json::from_slice::<Value>(&bytes)
        {
            let conns = answer["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["conn"].as_str().map(String::from))
                .collect();
            return Some((conns, answer["partial"] == true));
        }
    }
    None
}

fn role_of(name: &str) -> Role {
    Role::all()
        .into_iter()
        .find(|r| r.name() == name)
        .expect("a host of the schedule")
}

pub async fn run(paths: &Paths, params: Params) -> Chaos {
    let seed = params
        .seed
        .unwrap_or_else(|| crate::worker::now_us() % 1_000_000);
    println!(
        "chaos: seed {seed} (replay with --seed {seed}), {} minutes",
        params.minutes
    );
    let net = Net::new().unwrap_or_else(|e| panic!("chaos needs root and ip netns: {e}"));
    let dir = tempdir();
    let tier = Arc::new(Tier {
        net,
        dir: dir.clone(),
        bin: paths.bin.clone(),
        procs: Mutex::default(),
        stopped: Mutex::default(),
    });
    for i in 0..3 {
        tier.start(Role::Nats(i));
    }
    for role in Role::all()
        .into_iter()
        .filter(|r| !matches!(r, Role::Nats(_)))
    {
        tier.start(role);
    }
    assert!(
        tier.all_ready(Duration::from_secs(120)).await,
        "the tier did not get ready: logs in {}",
        dir.display()
    );
    println!("chaos: tier ready (logs in {})", dir.display());

    let channels: Vec<String> = (0..params.channels).map(|i| format!("ch{i}")).collect();
    let running = Arc::new(AtomicBool::new(true));
    let ws_urls: Vec<String> = (0..4).map(|i| tier.ws_url(i)).collect();
    let ws_bases: Vec<String> = (0..4).map(|i| tier.http(Role::Ws(i))).collect();
    let mut subscribers = Vec::new();
    let mut tasks = Vec::new();
    for (k, transport) in [
        "websocket",
        "websocket",
        "websocket",
        "websocket",
        "sse",
        "sse",
        "poll",
    ]
    .into_iter()
    .enumerate()
    {
        let sub = Arc::new(Subscriber {
            name: format!("{transport}-{k}"),
            transport,
            received: Mutex::default(),
        });
        subscribers.push(sub.clone());
        let (c, r) = (channels.clone(), running.clone());
        tasks.push(match transport {
            "websocket" => tokio::spawn(websocket(sub, ws_urls.clone(), c, r, k % 4)),
            "sse" => tokio::spawn(sse(sub, ws_bases.clone(), c, r, k % 4)),
            _ => tokio::spawn(poll(sub, ws_bases.clone(), c, r, k % 4)),
        });
    }
    let live = |subscribers: &Vec<Arc<Subscriber>>| {
        subscribers.iter().all(|s| s.received.lock().unwrap().live)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !live(&subscribers) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked: Acked = Arc::default();
    let retries = Arc::new(AtomicU64::new(0));
    let apis: Vec<String> = (0..2).map(|i| tier.http(Role::Api(i))).collect();
    let publishing = Arc::new(AtomicBool::new(true));
    let publishers: Vec<_> = (0..2)
        .map(|id| {
            tokio::spawn(publisher(
                id,
                apis.clone(),
                channels.clone(),
                params.rate,
                publishing.clone(),
                acked.clone(),
                retries.clone(),
            ))
        })
        .collect();

    // RSS, every second.
    let over: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (tier, over, sampling) = (tier.clone(), over.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                for role in Role::all() {
                    if let Some(pid) = tier.pid(role) {
                        let kib = tier::rss_kib(pid);
                        if kib > role.budget_kib() {
                            over.lock().unwrap().insert(format!(
                                "{} ({} MiB)",
                                role.name(),
                                kib / 1024
                            ));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let mut rng = Rng(seed);
    let mut result = Chaos {
        seed,
        minutes: params.minutes,
        subscribers: subscribers.len(),
        ..Chaos::default()
    };
    let end = Instant::now() + Duration::from_secs_f64(params.minutes * 60.0);
    while Instant::now() < end {
        let fault = schedule(&mut rng, params.short);
        println!("chaos: {}", serde_json::to_string(&fault).expect("JSON"));
        result.faults += 1;
        let kind = match &fault {
            Fault::Kill { .. } => "kill -9",
            Fault::Pause { .. } => "SIGSTOP",
            Fault::Partition { .. } => "partition",
            Fault::NatsRestart { .. } => "NATS restart",
            Fault::WsRolling => "ws rolling restart",
        };
        *result.kinds.entry(kind.into()).or_default() += 1;
        match fault {
            Fault::Kill { host, down_secs } => {
                let role = role_of(&host);
                tier.kill(role);
                tokio::time::sleep(Duration::from_secs(down_secs)).await;
                tier.start(role);
            }
            Fault::Pause { host, secs } => {
                let role = role_of(&host);
                tier.stop(role);
                tokio::time::sleep(Duration::from_secs(secs)).await;
                tier.cont(role);
            }
            Fault::Partition { hosts, from, secs } => {
                let from: Vec<Role> = from.iter().map(|n| role_of(n)).collect();
                for host in &hosts {
                    tier.net.partition(role_of(host), &from);
                }
                tokio::time::sleep(Duration::from_secs(secs)).await;
                for host in &hosts {
                    tier.net.heal(role_of(host));
                }
            }
            Fault::NatsRestart { host } => {
                let role = role_of(&host);
                let t = tier.clone();
                tokio::task::spawn_blocking(move || t.terminate(role))
                    .await
                    .expect("terminate");
                tier.start(role);
            }
            Fault::WsRolling => {
                for i in 0..4 {
                    let t = tier.clone();
                    tokio::task::spawn_blocking(move || t.terminate(Role::Ws(i)))
                        .await
                        .expect("terminate");
                    tier.start(Role::Ws(i));
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !tier.ready(Role::Ws(i)).await && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        // Healed: every host ready, every subscriber back, presence exact, within bounds.
        if !tier.all_ready(Duration::from_secs(120)).await {
            println!("chaos: the tier did not get ready within 120 s after the fault");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !live(&subscribers) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let healed = Instant::now();
        let presence_bound = Duration::from_secs(30);
        loop {
            let expected: HashSet<String> = subscribers
                .iter()
                .filter(|s| s.transport == "websocket")
                .filter_map(|s| {
                    let r = s.received.lock().unwrap();
                    r.live.then(|| r.conn.clone()).flatten()
                })
                .collect();
            let all_live = expected.len() == 4;
            if let Some((members, partial)) = members(&tier).await
                && !partial
                && all_live
                && members == expected
            {
                result.presence_settle_ms = result
                    .presence_settle_ms
                    .max(healed.elapsed().as_millis() as u64);
                break;
            }
            if healed.elapsed() > presence_bound {
                println!("chaos: presence not exact {presence_bound:?} after the fault healed");
                result.presence_errors += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // The end: stop publishing (every event in flight retried until stored), let the
    // subscribers catch up (bounded), then check.
    publishing.store(false, Ordering::Relaxed);
    for publisher in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(120), publisher).await;
    }
    let acked = acked.lock().unwrap().clone();
    result.acknowledged = acked.len();
    result.publish_retries = retries.load(Ordering::Relaxed);
    let expected: HashMap<&str, HashSet<u64>> = channels
        .iter()
        .map(|c| {
            (
                c.as_str(),
                acked
                    .iter()
                    .filter(|(ch, _)| ch == c)
                    .map(|(_, s)| *s)
                    .collect(),
            )
        })
        .collect();
    let caught_up = |subscribers: &Vec<Arc<Subscriber>>| {
        subscribers.iter().all(|s| {
            let r = s.received.lock().unwrap();
            expected.iter().all(|(c, seqs)| {
                let got: HashSet<u64> = r
                    .seqs
                    .get(*c)
                    .map(|v| v.iter().copied().collect())
                    .unwrap_or_default();
                seqs.is_subset(&got)
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !caught_up(&subscribers) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    running.store(false, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.await;
    let mut samples: Vec<(String, u64)> = Vec::new();
    for sub in &subscribers {
        let r = sub.received.lock().unwrap();
        result.unrecovered += r.unrecovered;
        let mut lost = 0;
        let mut received = 0;
        for (channel, seqs) in &expected {
            let got = r.seqs.get(*channel).cloned().unwrap_or_default();
            let distinct: HashSet<u64> = got.iter().copied().collect();
            let mut missing: Vec<u64> = seqs.difference(&distinct).copied().collect();
            missing.sort_unstable();
            lost += missing.len() as u64;
            received += got.len();
            for seq in missing.iter().step_by((missing.len() / 8).max(1)).take(8) {
                samples.push((channel.to_string(), *seq));
            }
            result.duplicated += (got.len() - distinct.len()) as u64;
            result.reordered += got.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        }
        result.lost += lost;
        result
            .per_subscriber
            .push((sub.name.clone(), lost, received, r.live));
    }
    // Lost where? An acknowledged event that no subscriber got was lost by the store (or
    // never delivered anywhere); one that others got was missed by its subscriber.
    let everyone: HashMap<&str, HashSet<u64>> = channels
        .iter()
        .map(|c| {
            let got = subscribers
                .iter()
                .flat_map(|s| {
                    s.received
                        .lock()
                        .unwrap()
                        .seqs
                        .get(c)
                        .cloned()
                        .unwrap_or_default()
                })
                .collect();
            (c.as_str(), got)
        })
        .collect();
    for (channel, seq) in &samples {
        match everyone
            .get(channel.as_str())
            .is_some_and(|got| got.contains(seq))
        {
            true => result.lost_in_stream += 1,
            false => result.lost_from_stream += 1,
        }
    }
    result.over_budget = over.lock().unwrap().iter().cloned().collect();
    print_table(&result);
    drop(tier);
    let clean = result.lost
        + result.duplicated
        + result.reordered
        + result.unrecovered
        + result.presence_errors
        == 0;
    match clean {
        true => {
            let _ = std::fs::remove_dir_all(&dir);
        }
        false => println!("chaos: the processes' logs are kept in {}", dir.display()),
    }
    result
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fanout-chaos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temp dir");
    dir
}

fn print_table(r: &Chaos) {
    println!(
        "seed {}: {} minutes, faults by kind: {:?}",
        r.seed, r.minutes, r.kinds
    );
    println!(
        "| faults injected | events acknowledged | subscribers | lost | duplicated | reordered | unrecovered | presence errors | over memory budget |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.faults,
        r.acknowledged,
        r.subscribers,
        r.lost,
        r.duplicated,
        r.reordered,
        r.unrecovered,
        r.presence_errors,
        if r.over_budget.is_empty() {
            "none".to_string()
        } else {
            r.over_budget.join(", ")
        }
    );
    println!(
        "publish retries {}; presence exact at most {} ms after a fault healed",
        r.publish_retries, r.presence_settle_ms
    );
    if r.lost > 0 {
        println!(
            "lost per subscriber (name, lost, received, live): {:?}; of a sample of the lost, {} reached other subscribers (missed by this one), {} reached none",
            r.per_subscriber, r.lost_in_stream, r.lost_from_stream
        );
    }
}
