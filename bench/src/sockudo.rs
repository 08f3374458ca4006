//! Sockudo, a Pusher-protocol server, as the benchmarks' other Pusher tier: `nodes` Sockudo
//! processes clustered over one nats-server (its NATS adapter), each with the benchmark's
//! Pusher app ([`crate::load::PUSHER_APP`]). Its binary: `FANOUT_BENCH_SOCKUDO`, else
//! `sockudo` on the PATH (`cargo install sockudo --version 5.2.0 --features nats`).

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::tier::NatsServer;

use crate::load::PUSHER_APP;

/// Sockudo's processes and their nats-server.
pub struct SockudoTier {
    pub nats: NatsServer,
    nodes: Vec<(Child, u16)>,
}

impl Drop for SockudoTier {
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Sockudo binary.
fn binary() -> PathBuf {
    std::env::var_os("FANOUT_BENCH_SOCKUDO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("sockudo"))
}

/// Whether the Sockudo binary is there.
pub fn available() -> bool {
    Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl SockudoTier {
    /// Starts `nodes` Sockudo processes and waits until each accepts connections.
    pub async fn start(nodes: usize) -> SockudoTier {
        let nats = NatsServer::start();
        let (id, key, secret) = PUSHER_APP;
        let nodes: Vec<(Child, u16)> = (0..nodes)
            .map(|_| {
                let port = free_port();
                let child = Command::new(binary())
                    .env_clear()
                    .env("RUST_LOG", "warn")
                    .env("HOST", "127.0.0.1")
                    .env("PORT", port.to_string())
                    .env("ADAPTER_DRIVER", "nats")
                    .env("NATS_SERVERS", nats.url())
                    .env("SOCKUDO_DEFAULT_APP_ID", id)
                    .env("SOCKUDO_DEFAULT_APP_KEY", key)
                    .env("SOCKUDO_DEFAULT_APP_SECRET", secret)
                    .env("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", "1000000")
                    .env(
                        "SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND",
                        "1000000",
                    )
                    .env("METRICS_ENABLED", "false")
                    .env("RATE_LIMITER_ENABLED", "false")
                    .env("IDEMPOTENCY_ENABLED", "false")
                    .env("SOCKUDO_ABLY_COMPAT_ENABLED", "false")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot start Sockudo ({}): {e}; install it with `cargo install \
                             sockudo --version 5.2.0 --features nats` or set FANOUT_BENCH_SOCKUDO",
                            binary().display()
                        )
                    });
                (child, port)
            })
            .collect();
        for (_, port) in &nodes {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_err()
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "Sockudo does not listen on {port}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        SockudoTier { nats, nodes }
    }

    /// Where Pusher clients connect, one URL per process.
    pub fn urls(&self) -> Vec<String> {
        let key = PUSHER_APP.1;
        self.nodes
            .iter()
            .map(|(_, port)| {
                format!("ws://127.0.0.1:{port}/app/{key}?protocol=7&client=fanout-bench&version=1")
            })
            .collect()
    }

    /// The first process's HTTP API (`POST /apps/{id}/events`).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.nodes[0].1)
    }

    /// The process ids of the Sockudo processes and nats-server.
    pub fn servers(&self) -> Vec<u32> {
        let nodes = self.nodes.iter().map(|(child, _)| child.id());
        nodes.chain([self.nats.pid()]).collect()
    }
}
