//! Starting the real processes a benchmark measures: nats-server, fanout-api and fanout-ws
//! nodes (release builds), on loopback, each killed when dropped; and reading their CPU time.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A child process that is killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// User + system CPU seconds so far, from /proc/<pid>/stat.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 3-node (`n`-node) nats-server cluster with a WebSocket port on each node
/// (`websocket { no_tls: true }`): the baseline. Returns the nodes, their client URLs,
/// their WebSocket URLs and their monitoring ports.
pub fn start_nats_ws_cluster(
    paths: &Paths,
    dir: &Path,
    n: usize,
    env: &[(String, String)],
) -> (Vec<Proc>, Vec<String>, Vec<String>, Vec<u16>) {
    let ports: Vec<(u16, u16, u16, u16)> = (0..n)
        .map(|_| (free_port(), free_port(), free_port(), free_port()))
        .collect();
    let mut procs = Vec::new();
    for (i, (client, ws, cluster, http)) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, p)| format!("\"nats-route://127.0.0.1:{}\"", p.2))
            .collect();
        let conf = format!(
            "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{http}\"\n\
             websocket {{ listen: \"127.0.0.1:{ws}\", no_tls: true }}\n\
             cluster {{ name: \"bench\", listen: \"127.0.0.1:{cluster}\", routes: [{}] }}\n",
            routes.join(", ")
        );
        let file = dir.join(format!("n{i}.conf"));
        std::fs::write(&file, conf).unwrap();
        let child = Command::new(&paths.nats_server)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        procs.push(Proc {
            child,
            addr: format!("nats://127.0.0.1:{client}"),
        });
    }
    // Ready when every node routes to every other.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (_, _, _, http) in &ports {
        loop {
            let routes = http_get(*http, "/routez")
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|v| v["num_routes"].as_u64())
                .unwrap_or(0);
            if routes as usize >= n - 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the NATS cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // And every node accepts clients on both ports.
    for (client, ws, _, _) in &ports {
        for port in [client, ws] {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "a NATS node did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let clients = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{}", p.0))
        .collect();
    let ws = ports
        .iter()
        .map(|p| format!("ws://127.0.0.1:{}", p.1))
        .collect();
    let monitor = ports.iter().map(|p| p.3).collect();
    (procs, clients, ws, monitor)
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15 (1-based).
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

/// Where the workspace's release binaries and tools are.
pub struct Paths {
    pub bin: PathBuf,
    pub nats_server: PathBuf,
}

impl Paths {
    pub fn find() -> Paths {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = std::env::var_os("FANOUT_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release"));
        let nats_server = std::env::var_os("NATS_SERVER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".tools/bin/nats-server"));
        for path in [
            &bin.join("fanout-api"),
            &bin.join("fanout-ws"),
            &nats_server,
        ] {
            assert!(
                path.exists(),
                "{} is missing: run `make bench`",
                path.display()
            );
        }
        Paths { bin, nats_server }
    }
}

pub fn start_nats(paths: &Paths, dir: &Path) -> Proc {
    start_nats_with(paths, dir, &[])
}

/// [`start_nats`] with extra environment (`GOMAXPROCS`).
pub fn start_nats_with(paths: &Paths, dir: &Path, env: &[(String, String)]) -> Proc {
    let ports = dir.join("ports");
    std::fs::create_dir_all(&ports).unwrap();
    let child = Command::new(&paths.nats_server)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.join("js"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let file = std::fs::read_dir(&ports).unwrap().flatten().next();
        if let Some(text) = file.and_then(|f| std::fs::read_to_string(f.path()).ok())
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            break v["nats"][0].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    Proc { child, addr }
}

/// Starts a fanout binary with `env` and waits for the address it logs.
pub fn start_fanout(paths: &Paths, binary: &str, name: &str, env: &[(String, String)]) -> Proc {
    let mut child = Command::new(paths.bin.join(binary))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("FANOUT_NODE_ID", name)
        .env("FANOUT_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn,fanout_api=info,fanout_ws=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {binary}: {e}"));
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the process exited").unwrap();
        if line.contains("listening")
            && let Some(addr) = line.split("addr=").nth(1)
        {
            break addr.split_whitespace().next().unwrap().to_string();
        }
    };
    // The rest of its log, for a look after the run: target/bench/logs/<name>-<pid>.log.
    let dir = paths.bin.join("../bench/logs");
    let _ = std::fs::create_dir_all(&dir);
    let file = std::fs::File::create(dir.join(format!("{name}-{}.log", child.id())));
    std::thread::spawn(move || {
        let mut file = file.ok().map(std::io::BufWriter::new);
        for line in lines.map_while(Result::ok) {
            if let Some(file) = file.as_mut() {
                let _ = writeln!(file, "{line}");
            }
        }
    });
    Proc { child, addr }
}

pub async fn wait_ready(addr: &str) {
    let url = format!("http://{addr}/readyz");
    for _ in 0..500 {
        if let Ok(response) = reqwest::get(&url).await
            && response.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{url} never became ready");
}

/// The body of `GET http://127.0.0.1:<port><path>` (HTTP/1.0, blocking), if any.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// Waits until node 0 of a cluster from [`start_nats_ws_cluster`] has heard, over its routes,
/// of every subject subscribed on the other nodes (`wanted[r]`: node r's subjects). Interest
/// travels between servers asynchronously: a client's `PONG` proves only that its own server
/// has its subscription, so a publisher on node 0 that starts before the routes carried it
/// loses the first events of every client elsewhere (the `missing` the baseline once showed).
/// Returns how long it waited.
pub fn wait_route_interest(
    monitor: &[u16],
    wanted: &[std::collections::HashSet<String>],
) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let routes = http_get(monitor[0], "/routez?subs=1")
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .unwrap_or_default();
        let mut heard: Vec<std::collections::HashSet<&str>> =
            vec![Default::default(); wanted.len()];
        for route in routes["routes"].as_array().into_iter().flatten() {
            let Some(r) = route["remote_name"]
                .as_str()
                .and_then(|name| name.strip_prefix('n'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|r| *r < wanted.len())
            else {
                continue;
            };
            for subject in route["subscriptions_list"].as_array().into_iter().flatten() {
                if let Some(subject) = subject.as_str() {
                    heard[r].insert(subject);
                }
            }
        }
        let complete = wanted
            .iter()
            .zip(&heard)
            .skip(1)
            .all(|(want, got)| want.iter().all(|s| got.contains(s.as_str())));
        if complete {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never heard every subscription"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nats-server's own counters (`/varz`) that explain lost deliveries.
pub fn nats_counters(monitor: &[u16]) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = monitor
        .iter()
        .map(|port| {
            let v = http_get(*port, "/varz")
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .unwrap_or_default();
            serde_json::json!({"slow_consumers": v["slow_consumers"], "in_msgs": v["in_msgs"],
                "out_msgs": v["out_msgs"], "connections": v["connections"]})
        })
        .collect();
    serde_json::Value::Array(nodes)
}
