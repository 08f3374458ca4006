//! What fanout's integration tests (`tests/`) and its benchmark (`bench/`) share, so that each
//! exists once: the launchers of real processes ([`nats`]: one nats-server, a cluster, a
//! supercluster of regions; [`process`]: the workspace's binaries), free ports ([`port`]),
//! bounded waits ([`wait`]), plain HTTP for monitoring endpoints ([`http`]) and one WebSocket
//! client written by hand ([`raw`]).
//!
//! Layers, each using only those above it in this list: `port`, `wait`, `http`, `raw`,
//! `process`, `nats`. Nothing here panics on its own account but a launcher that cannot launch
//! (a test has nothing to do then), and every wait is bounded.

pub mod http;
pub mod nats;
pub mod port;
pub mod process;
pub mod raw;
pub mod wait;

pub use nats::{NatsCluster, NatsServer, Supercluster};
pub use port::free_port;
pub use process::{Process, binary, cpu_seconds, rss_kib};
pub use wait::{WAIT, eventually, eventually_within, within};
