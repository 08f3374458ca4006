//! Regions on one machine: a NATS supercluster (per region a 3-server cluster with
//! JetStream, the clusters joined by gateways) whose gateway links pass through a delay proxy
//! (`fanout-bench delay-proxy`, the WAN), and per region an API and ws nodes as processes.

use std::time::Duration;

use serde_json::Value;

use super::{Process, WAIT};

/// At most two superclusters (6 nats-servers and their fanout processes each) run at once in
/// a test binary, so that the tests running in parallel do not starve each other on a
/// two-core machine.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The supercluster ([`fanout_testkit::Supercluster`]) and the delay proxy in front of every
/// gateway.
pub struct Supercluster {
    servers: fanout_testkit::Supercluster,
    pub delay: Duration,
    _proxy: Process,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

impl std::ops::Deref for Supercluster {
    type Target = fanout_testkit::Supercluster;
    fn deref(&self) -> &Self::Target {
        &self.servers
    }
}

impl std::ops::DerefMut for Supercluster {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.servers
    }
}

impl Supercluster {
    /// `names.len()` regions of 3 servers each, gateways delayed by `delay` each way (once
    /// one of the [`SLOTS`] is free).
    pub async fn start(names: &[&str], delay: Duration) -> Supercluster {
        let slot = SLOTS.acquire().await.expect("never closed");
        let servers = fanout_testkit::Supercluster::start(names);
        let pairs = servers
            .fronts()
            .iter()
            .map(|(front, gateway)| format!("127.0.0.1:{front}=127.0.0.1:{gateway}"))
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
        Supercluster {
            servers,
            delay,
            _proxy: proxy,
            _slot: slot,
        }
    }

    /// Waits until every server of every live region has JetStream and a gateway to every
    /// other live region.
    pub async fn wait_ready(&self) {
        self.servers.wait_ready(WAIT * 4).await
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
        Tier::start_with(cluster, name, nodes, &[]).await
    }

    /// [`Tier::start`] with `extra` settings for every process.
    pub async fn start_with(
        cluster: &Supercluster,
        name: &str,
        nodes: usize,
        extra: &[(&'static str, String)],
    ) -> Tier {
        let env = |node: String| {
            let mut env = cluster.env(name, &node);
            env.extend(extra.iter().cloned());
            env
        };
        let api = Process::start("fanout-api", &env(format!("api-{name}")));
        let ws = (0..nodes)
            .map(|i| Process::start("fanout-ws", &env(format!("ws-{name}-{i}"))))
            .collect::<Vec<_>>();
        let tier = Tier { api, ws };
        tier.wait_ready().await;
        tier
    }

    pub async fn wait_ready(&self) {
        for process in std::iter::once(&self.api).chain(&self.ws) {
            super::wait_ready_for(&super::ProcessExt::server(process), WAIT * 4).await;
        }
    }

    /// Waits until every process has every other region's mirror in touch with its origin
    /// (what another region publishes reaches this one).
    pub async fn wait_regions_current(&self) {
        for process in std::iter::once(&self.api).chain(&self.ws) {
            let url = super::ProcessExt::server(process).url("/readyz");
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
