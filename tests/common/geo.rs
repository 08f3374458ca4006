//! Regions on one machine: a NATS supercluster (per region a 3-server cluster with
//! JetStream, the clusters joined by gateways) whose gateway links pass through a delay proxy
//! (`fanout-bench delay-proxy`, the WAN), and per region an API and ws nodes as processes.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tempfile::TempDir;

use super::{Process, WAIT, nats_server_bin};

/// A free port below the ephemeral range (32768 and up on Linux), never the same twice in one
/// test binary: a port taken from the ephemeral range and released can be taken again, as the
/// source port of one of the many connections opened before its server binds it (a killed
/// region's servers must get theirs back on restart, too).
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(12_000);
    loop {
        let port = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(port < 32_000, "no free port left below the ephemeral range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One region's NATS cluster.
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

    fn spawn(&mut self, dir: &std::path::Path) {
        for (i, conf) in self.confs.iter().enumerate() {
            if self.servers[i].is_some() {
                continue;
            }
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{}-{i}.log", self.name)))
                .unwrap();
            self.servers[i] = Some(
                Command::new(nats_server_bin())
                    .arg("-c")
                    .arg(conf)
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap(),
            );
        }
    }

    /// SIGKILL every server of the region.
    pub fn kill(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// At most two superclusters (6 nats-servers and their fanout processes each) run at once in
/// a test binary, so that the tests of a file running in parallel do not starve each other on
/// a two-core machine.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The supercluster and the delay proxy in front of every gateway.
pub struct Supercluster {
    pub regions: Vec<Region>,
    pub delay: Duration,
    proxy: Process,
    dir: TempDir,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl Supercluster {
    /// `names.len()` regions of 3 servers each, gateways delayed by `delay` each way (once
    /// one of the [`SLOTS`] is free).
    pub async fn start(names: &[&str], delay: Duration) -> Supercluster {
        let slot = SLOTS.acquire().await.expect("never closed");
        let dir = tempfile::tempdir().unwrap();
        struct Ports {
            client: u16,
            monitor: u16,
            route: u16,
            gateway: u16,
            proxy: u16,
        }
        let ports: Vec<Vec<Ports>> = names
            .iter()
            .map(|_| {
                (0..3)
                    .map(|_| Ports {
                        client: free_port(),
                        monitor: free_port(),
                        route: free_port(),
                        gateway: free_port(),
                        proxy: free_port(),
                    })
                    .collect()
            })
            .collect();
        // Every gateway connection goes through the proxy: servers advertise its port.
        let gateways = names
            .iter()
            .zip(&ports)
            .map(|(name, ports)| {
                let urls = ports
                    .iter()
                    .map(|p| format!("\"nats://127.0.0.1:{}\"", p.proxy))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("{{ name: {name}, urls: [{urls}] }}")
            })
            .collect::<Vec<_>>()
            .join(",\n    ");
        let pairs = ports
            .iter()
            .flatten()
            .map(|p| format!("127.0.0.1:{}=127.0.0.1:{}", p.proxy, p.gateway))
            .collect::<Vec<_>>()
            .join(",");
        let proxy = Process::start_with_args(
            "fanout-bench",
            &[],
            &[
                "delay-proxy",
                "--delay-ms",
                &delay.as_millis().to_string(),
                "--pairs",
                &pairs,
            ],
        );
        let mut regions = Vec::new();
        for (name, ports) in names.iter().zip(&ports) {
            let routes = ports
                .iter()
                .map(|p| format!("\"nats://127.0.0.1:{}\"", p.route))
                .collect::<Vec<_>>()
                .join(", ");
            let mut confs = Vec::new();
            for (i, p) in ports.iter().enumerate() {
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
  advertise: "127.0.0.1:{proxy}"
  gateways: [
    {gateways}
  ]
}}
"#,
                        client = p.client,
                        monitor = p.monitor,
                        route = p.route,
                        gateway = p.gateway,
                        proxy = p.proxy,
                        store = store.display(),
                    ),
                )
                .unwrap();
                confs.push(conf);
            }
            let mut region = Region {
                name: name.to_string(),
                servers: (0..3).map(|_| None).collect(),
                client_ports: ports.iter().map(|p| p.client).collect(),
                monitor_ports: ports.iter().map(|p| p.monitor).collect(),
                confs,
            };
            region.spawn(dir.path());
            regions.push(region);
        }
        Supercluster {
            regions,
            delay,
            proxy,
            dir,
            _slot: slot,
        }
    }

    /// Waits until every server of every live region has JetStream and a gateway to every
    /// other region.
    pub async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let others = self.regions.len() - 1;
        super::eventually_within(WAIT * 4, "the supercluster to form", || async {
            for region in self.regions.iter() {
                if region.servers.iter().all(Option::is_none) {
                    continue;
                }
                for port in &region.monitor_ports {
                    let get = |path: &str| {
                        let url = format!("http://127.0.0.1:{port}{path}");
                        let http = http.clone();
                        async move {
                            let response = http.get(url).send().await.ok()?;
                            response.json::<Value>().await.ok()
                        }
                    };
                    let Some(health) = get("/healthz").await else {
                        return false;
                    };
                    if health["status"] != "ok" {
                        return false;
                    }
                    // The JetStream meta group (it spans every region) has a leader.
                    let Some(jsz) = get("/jsz").await else {
                        return false;
                    };
                    if jsz["meta_cluster"]["leader"]
                        .as_str()
                        .is_none_or(str::is_empty)
                    {
                        return false;
                    }
                    let Some(gateways) = get("/gatewayz").await else {
                        return false;
                    };
                    let outbound = gateways["outbound_gateways"]
                        .as_object()
                        .map_or(0, |o| o.len());
                    let live_others = self
                        .regions
                        .iter()
                        .filter(|r| r.name != region.name)
                        .filter(|r| r.servers.iter().any(Option::is_some))
                        .count();
                    if outbound < live_others.min(others) {
                        return false;
                    }
                }
            }
            true
        })
        .await;
    }

    pub fn region(&mut self, name: &str) -> &mut Region {
        self.regions.iter_mut().find(|r| r.name == name).unwrap()
    }

    /// Starts the servers of region `name` again, with their storage.
    pub fn restart(&mut self, name: &str) {
        let dir = self.dir.path().to_path_buf();
        self.region(name).spawn(&dir);
    }

    pub fn names(&self) -> String {
        self.regions
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The environment of a process in region `name`.
    pub fn env(&self, name: &str, node: &str) -> Vec<(&'static str, String)> {
        let region = self.regions.iter().find(|r| r.name == name).unwrap();
        vec![
            ("FANOUT_NATS_URL", region.urls(0)),
            ("FANOUT_NODE_ID", node.to_string()),
            ("FANOUT_LISTEN", "127.0.0.1:0".to_string()),
            ("FANOUT_REGION", name.to_string()),
            ("FANOUT_REGIONS", self.names()),
            ("FANOUT_HISTORY_REPLICAS", "3".to_string()),
            ("FANOUT_HISTORY_MAX_AGE_SECS", "120".to_string()),
            ("FANOUT_PUBLISH_TIMEOUT_MS", "5000".to_string()),
            ("FANOUT_DRAIN_WINDOW_MS", "0".to_string()),
        ]
    }
}

impl Drop for Supercluster {
    fn drop(&mut self) {
        for region in &mut self.regions {
            region.kill();
        }
        let _ = &self.proxy;
    }
}

/// One region's fanout processes: an API and ws nodes.
pub struct Tier {
    pub api: Process,
    pub ws: Vec<Process>,
}

impl Drop for Tier {
    fn drop(&mut self) {
        // A failing test shows what the processes said (the harness shows a failing test's
        // output only).
        if std::thread::panicking() {
            for process in std::iter::once(&self.api).chain(&self.ws) {
                eprintln!("---- {} log:", process.addr);
                for line in process.log() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

impl Tier {
    /// Starts an API and `nodes` ws nodes in region `name`, and waits until they are ready.
    pub async fn start(cluster: &Supercluster, name: &str, nodes: usize) -> Tier {
        let api = Process::start("fanout-api", &cluster.env(name, &format!("api-{name}")));
        let ws = (0..nodes)
            .map(|i| Process::start("fanout-ws", &cluster.env(name, &format!("ws-{name}-{i}"))))
            .collect::<Vec<_>>();
        let tier = Tier { api, ws };
        tier.wait_ready().await;
        tier
    }

    pub async fn wait_ready(&self) {
        for process in std::iter::once(&self.api).chain(&self.ws) {
            super::wait_ready_for(&process.server(), WAIT * 4).await;
        }
    }

    /// Waits until every process has every other region's mirror in touch with its origin
    /// (what another region publishes reaches this one).
    pub async fn wait_regions_current(&self) {
        for process in std::iter::once(&self.api).chain(&self.ws) {
            let url = process.server().url("/readyz");
            super::eventually_within(WAIT * 4, "every region's mirror to be current", || {
                let url = url.clone();
                async move {
                    let Ok(response) = reqwest::get(&url).await else {
                        return false;
                    };
                    let body: Value = response.json().await.unwrap_or_default();
                    body["regions"]
                        .as_object()
                        .is_some_and(|r| r.values().all(|s| s == "local" || s == "current"))
                }
            })
            .await;
        }
    }

    /// SIGKILL every process.
    pub fn kill(&mut self) {
        for process in std::iter::once(&mut self.api).chain(&mut self.ws) {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}
