//! nats-server as the tests and the benchmark run it, always on loopback and free ports, each
//! with its own temporary storage, killed when dropped: one server with JetStream
//! ([`NatsServer`]), a cluster of servers joined by routes ([`NatsCluster`]) and a supercluster
//! of regions joined by gateways ([`Supercluster`]).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{free_port, http, process::workspace, wait::blocking_until};

/// How long a server or a cluster may take to start on a loaded machine.
const START: Duration = Duration::from_secs(60);

/// nats-server: `$NATS_SERVER_BIN`, else `.tools/bin/nats-server` (what `make test` and
/// `make bench` install), else `nats-server` on PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = workspace().join(".tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// Starts nats-server with `args` and `env`, its log in `log`.
fn spawn(args: &[&str], env: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("nats-server's log file");
    Command::new(nats_server_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; run `make test` (it installs nats-server) or set NATS_SERVER_BIN",
                nats_server_bin().display()
            )
        })
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A nats-server with JetStream, on dynamic ports, with its own temp directory.
pub struct NatsServer {
    pub child: Option<Child>,
    dir: TempDir,
    env: Vec<(String, String)>,
    /// Settings in a configuration file beside the flags (`jetstream { sync_interval: always }`).
    conf: Option<String>,
    pub port: u16,
    pub monitor_port: u16,
}

impl NatsServer {
    pub fn start() -> Self {
        NatsServer::start_with(&[])
    }

    /// With extra environment (`GOMAXPROCS`).
    pub fn start_with(env: &[(String, String)]) -> Self {
        NatsServer::start_conf(env, None)
    }

    /// With extra environment and settings `conf` in a configuration file (the flags that
    /// set ports and the store win over it).
    pub fn start_conf(env: &[(String, String)], conf: Option<&str>) -> Self {
        let mut server = NatsServer {
            child: None,
            dir: tempfile::tempdir().expect("a temp dir"),
            env: env.to_vec(),
            conf: conf.map(str::to_string),
            port: 0,
            monitor_port: 0,
        };
        server.spawn("-1", "-1");
        server
    }

    fn spawn(&mut self, port: &str, monitor: &str) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("the ports dir");
        let store = self.dir.path().join("js");
        let conf = self.dir.path().join("nats.conf");
        let mut args = Vec::new();
        if let Some(text) = &self.conf {
            std::fs::write(&conf, text).expect("a config file");
            args.extend(["-c", conf.to_str().expect("a UTF-8 temp dir")]);
        }
        args.extend([
            "-a",
            "127.0.0.1",
            "-p",
            port,
            "-m",
            monitor,
            "-js",
            "-sd",
            store.to_str().expect("a UTF-8 temp dir"),
            "--ports_file_dir",
            ports_dir.to_str().expect("a UTF-8 temp dir"),
        ]);
        self.child = Some(spawn(&args, &self.env, &self.dir.path().join("nats.log")));
        // nats-server writes its ports to a file once it listens.
        let mut ports = Value::Null;
        blocking_until(START, "nats-server to start", || {
            ports = std::fs::read_dir(&ports_dir)
                .into_iter()
                .flatten()
                .flatten()
                .next()
                .and_then(|entry| std::fs::read_to_string(entry.path()).ok())
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default();
            !ports.is_null()
        });
        self.port = port_of(&ports["nats"][0]);
        self.monitor_port = port_of(&ports["monitoring"][0]);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.monitor_port)
    }

    /// The server's process id (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// User + system CPU seconds so far.
    pub fn cpu_seconds(&self) -> f64 {
        crate::cpu_seconds(self.pid())
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the server again on the same ports with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let (port, monitor) = (self.port.to_string(), self.monitor_port.to_string());
        self.spawn(&port, &monitor);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn port_of(url: &Value) -> u16 {
    url.as_str()
        .and_then(|url| url.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("not a URL with a port: {url}"))
}

/// What the servers of a [`NatsCluster`] have.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// JetStream, each server with its own store.
    pub jetstream: bool,
    /// A WebSocket port without TLS (the benchmark's baseline: nats-server's own WebSocket).
    pub websocket: bool,
    /// Extra environment (`GOMAXPROCS`).
    pub env: Vec<(String, String)>,
    /// Extra settings inside each server's `jetstream { }` block (`sync_interval: always`).
    pub jetstream_extra: String,
}

/// nats-servers clustered over loopback routes, started and formed (every server routes to
/// every other and takes clients).
pub struct NatsCluster {
    pub servers: Vec<Option<Child>>,
    /// Client ports.
    pub ports: Vec<u16>,
    pub monitor_ports: Vec<u16>,
    /// WebSocket ports (with [`ClusterOptions::websocket`]).
    pub ws_ports: Vec<u16>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Three servers with JetStream.
    pub fn start() -> NatsCluster {
        NatsCluster::start_with(
            3,
            ClusterOptions {
                jetstream: true,
                ..ClusterOptions::default()
            },
        )
    }

    /// `n` servers named `n0`, `n1`, … with `options`.
    pub fn start_with(n: usize, options: ClusterOptions) -> NatsCluster {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ports: Vec<[u16; 4]> = (0..n)
            .map(|_| [free_port(), free_port(), free_port(), free_port()])
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, [client, monitor, route, ws])| {
                let routes: Vec<String> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("\"nats-route://127.0.0.1:{}\"", p[2]))
                    .collect();
                let mut conf = format!(
                    "server_name: \"n{i}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
                     cluster {{ name: \"cluster\", listen: \"127.0.0.1:{route}\", routes: [{}] }}\n",
                    routes.join(", ")
                );
                if options.websocket {
                    conf.push_str(&format!(
                        "websocket {{ listen: \"127.0.0.1:{ws}\", no_tls: true }}\n"
                    ));
                }
                if options.jetstream {
                    let store = dir.path().join(format!("js-{i}"));
                    conf.push_str(&format!(
                        "jetstream {{ store_dir: \"{}\", {} }}\n",
                        store.display(),
                        options.jetstream_extra
                    ));
                }
                let file = dir.path().join(format!("n{i}.conf"));
                std::fs::write(&file, conf).expect("a config file");
                let args = ["-c", file.to_str().expect("a UTF-8 temp dir")];
                Some(spawn(&args, &options.env, &dir.path().join(format!("n{i}.log"))))
            })
            .collect();
        let cluster = NatsCluster {
            servers,
            ports: ports.iter().map(|p| p[0]).collect(),
            monitor_ports: ports.iter().map(|p| p[1]).collect(),
            ws_ports: if options.websocket {
                ports.iter().map(|p| p[3]).collect()
            } else {
                Vec::new()
            },
            _dir: dir,
        };
        cluster.wait_formed();
        cluster
    }

    /// Until every server routes to every other and accepts clients (on every port).
    fn wait_formed(&self) {
        let n = self.ports.len();
        blocking_until(START, "the NATS cluster to form", || {
            self.monitor_ports.iter().all(|port| {
                http::get_blocking(&format!("127.0.0.1:{port}"), "/routez")
                    .and_then(|a| a.json()["num_routes"].as_u64())
                    .is_some_and(|routes| routes as usize >= n - 1)
            }) && self
                .ports
                .iter()
                .chain(&self.ws_ports)
                .all(|port| std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok())
        });
    }

    /// Client URLs, starting with server `first`.
    pub fn urls(&self, first: usize) -> String {
        let n = self.ports.len();
        (0..n)
            .map(|i| format!("nats://127.0.0.1:{}", self.ports[(first + i) % n]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Each server's client URL.
    pub fn client_urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect()
    }

    /// Each server's WebSocket URL.
    pub fn ws_urls(&self) -> Vec<String> {
        self.ws_ports
            .iter()
            .map(|p| format!("ws://127.0.0.1:{p}"))
            .collect()
    }

    /// The live servers' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.servers.iter().flatten().map(Child::id).collect()
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        kill(&mut self.servers[i]);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            kill(server);
        }
    }
}

/// One region of a [`Supercluster`]: a cluster of three servers with JetStream.
pub struct Region {
    pub name: String,
    servers: Vec<Option<Child>>,
    pub client_ports: Vec<u16>,
    pub monitor_ports: Vec<u16>,
    confs: Vec<PathBuf>,
}

impl Region {
    /// The region's client URLs, starting with server `first`.
    pub fn urls(&self, first: usize) -> String {
        let n = self.client_ports.len();
        (0..n)
            .map(|i| format!("nats://127.0.0.1:{}", self.client_ports[(first + i) % n]))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether any of its servers runs.
    pub fn is_up(&self) -> bool {
        self.servers.iter().any(Option::is_some)
    }

    fn spawn(&mut self, dir: &Path) {
        for (i, conf) in self.confs.iter().enumerate() {
            if self.servers[i].is_none() {
                let args = ["-c", conf.to_str().expect("a UTF-8 temp dir")];
                let log = dir.join(format!("{}-{i}.log", self.name));
                self.servers[i] = Some(spawn(&args, &[], &log));
            }
        }
    }

    /// SIGKILL every server of the region.
    pub fn kill(&mut self) {
        for server in &mut self.servers {
            kill(server);
        }
    }
}

/// Regions of three servers each, joined by gateways that every server reaches through a
/// front port of its own ([`Supercluster::fronts`]): the caller forwards each front to its
/// gateway port, through a delay proxy (the WAN). Servers advertise their front, so the
/// gateways connect once the proxy is up.
pub struct Supercluster {
    pub regions: Vec<Region>,
    fronts: Vec<(u16, u16)>,
    dir: TempDir,
}

impl Supercluster {
    /// Starts the servers of `names.len()` regions.
    pub fn start(names: &[&str]) -> Supercluster {
        let dir = tempfile::tempdir().expect("a temp dir");
        // Per region, per server: client, monitor, route, gateway, front.
        let ports: Vec<Vec<[u16; 5]>> = names
            .iter()
            .map(|_| {
                (0..3)
                    .map(|_| {
                        [
                            free_port(),
                            free_port(),
                            free_port(),
                            free_port(),
                            free_port(),
                        ]
                    })
                    .collect()
            })
            .collect();
        let gateways = names
            .iter()
            .zip(&ports)
            .map(|(name, ports)| {
                let urls = ports
                    .iter()
                    .map(|p| format!("\"nats://127.0.0.1:{}\"", p[4]))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{{ name: {name}, urls: [{urls}] }}")
            })
            .collect::<Vec<_>>()
            .join(",\n    ");
        let mut regions = Vec::new();
        for (name, ports) in names.iter().zip(&ports) {
            let routes = ports
                .iter()
                .map(|p| format!("\"nats://127.0.0.1:{}\"", p[2]))
                .collect::<Vec<_>>()
                .join(", ");
            let confs = ports
                .iter()
                .enumerate()
                .map(|(i, [client, monitor, route, gateway, front])| {
                    let conf = dir.path().join(format!("{name}-{i}.conf"));
                    let store = dir.path().join(format!("js-{name}-{i}"));
                    std::fs::write(
                        &conf,
                        format!(
                            r#"server_name: {name}-{i}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
jetstream {{ store_dir: "{store}" }}
cluster {{
  name: {name}
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
gateway {{
  name: {name}
  listen: 127.0.0.1:{gateway}
  advertise: "127.0.0.1:{front}"
  gateways: [
    {gateways}
  ]
}}
"#,
                            store = store.display(),
                        ),
                    )
                    .expect("a config file");
                    conf
                })
                .collect();
            let mut region = Region {
                name: name.to_string(),
                servers: (0..3).map(|_| None).collect(),
                client_ports: ports.iter().map(|p| p[0]).collect(),
                monitor_ports: ports.iter().map(|p| p[1]).collect(),
                confs,
            };
            region.spawn(dir.path());
            regions.push(region);
        }
        Supercluster {
            regions,
            fronts: ports.iter().flatten().map(|p| (p[4], p[3])).collect(),
            dir,
        }
    }

    /// Every (front, gateway) pair the caller forwards.
    pub fn fronts(&self) -> &[(u16, u16)] {
        &self.fronts
    }

    /// Waits (at most `bound`) until every server of every live region is healthy, the
    /// JetStream meta group has a leader, and each has a gateway to every other live region.
    pub async fn wait_ready(&self, bound: Duration) {
        crate::eventually_within(bound, "the supercluster to form", || async {
            for region in self.regions.iter().filter(|r| r.is_up()) {
                let live_others = self
                    .regions
                    .iter()
                    .filter(|r| r.name != region.name && r.is_up())
                    .count();
                for port in &region.monitor_ports {
                    let authority = format!("127.0.0.1:{port}");
                    let get = |path| http::get(&authority, path);
                    let Some(health) = get("/healthz").await else {
                        return false;
                    };
                    if health.json()["status"] != "ok" {
                        return false;
                    }
                    // The JetStream meta group (it spans every region) has a leader.
                    let Some(jsz) = get("/jsz").await else {
                        return false;
                    };
                    if jsz.json()["meta_cluster"]["leader"]
                        .as_str()
                        .is_none_or(str::is_empty)
                    {
                        return false;
                    }
                    let Some(gateways) = get("/gatewayz").await else {
                        return false;
                    };
                    let outbound = gateways.json()["outbound_gateways"]
                        .as_object()
                        .map_or(0, |o| o.len());
                    if outbound < live_others {
                        return false;
                    }
                }
            }
            true
        })
        .await
    }

    pub fn region(&mut self, name: &str) -> &mut Region {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    /// Starts the servers of region `name` again, with their storage.
    pub fn restart(&mut self, name: &str) {
        let dir = self.dir.path().to_path_buf();
        self.region(name).spawn(&dir);
    }

    /// The regions' names, comma-separated (`FANOUT_REGIONS`).
    pub fn names(&self) -> String {
        self.regions
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every server's monitoring port.
    pub fn monitor_ports(&self) -> Vec<u16> {
        self.regions
            .iter()
            .flat_map(|r| r.monitor_ports.iter().copied())
            .collect()
    }
}

impl Drop for Supercluster {
    fn drop(&mut self) {
        for region in &mut self.regions {
            region.kill();
        }
    }
}
