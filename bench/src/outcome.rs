//! What each scenario measured, as types: the suite's table reads these fields, and the JSON
//! results are their serialization (the fan-out's is [`crate::suite::FanOut`]).

use serde::Serialize;

use crate::hist::Histogram;

/// Latency quantiles, ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(hist: &Histogram) -> Quantiles {
        Quantiles {
            p50: hist.quantile_ms(0.5),
            p99: hist.quantile_ms(0.99),
            max: hist.quantile_ms(1.0),
        }
    }
}

/// The middle and the worst of some timings, ms.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MedianMax {
    pub median: f64,
    pub max: f64,
}

/// Idle memory: RSS growth per held connection on each node.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub connections: usize,
    pub connected: usize,
    pub nodes: usize,
    pub connect_seconds: f64,
    pub kib_per_connection: Vec<f64>,
    pub kib_per_connection_mean: f64,
    pub rss_before_kib: Vec<u64>,
    pub rss_after_kib: Vec<u64>,
}

/// Connect storm: connections one node accepts per second.
#[derive(Debug, Clone, Serialize)]
pub struct Storm {
    pub connections: usize,
    pub connected: usize,
    pub seconds: f64,
    pub per_second: f64,
}

/// One phase of the join storm: the steady clients' deliveries and latency.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub seconds: f64,
    pub published: u64,
    pub deliveries: u64,
    pub missing: u64,
    pub latency_ms: Quantiles,
    /// The storm phase: how the joiners fared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storm: Option<Storm>,
}

/// Join storm: the same steady clients, quiet, then while others join.
#[derive(Debug, Clone, Serialize)]
pub struct JoinStorm {
    pub quiet: Phase,
    pub storm: Phase,
}

/// The API alone: closed-loop publishers.
#[derive(Debug, Clone, Serialize)]
pub struct Publish {
    pub publishers: usize,
    pub batch: usize,
    pub seconds: u64,
    pub acked: u64,
    pub errors: u64,
    pub acked_per_sec: f64,
    pub request_ms: Quantiles,
    pub server_cpu_us_per_event: f64,
    pub api_cpu_us_per_event: f64,
    pub nats_cpu_us_per_event: f64,
    pub loadgen_cpu_us_per_event: f64,
}

/// JetStream alone, from a plain NATS client: the floor under the publish path.
#[derive(Debug, Clone, Serialize)]
pub struct JetStream {
    pub publishers: usize,
    pub window: usize,
    pub seconds: u64,
    pub acked: u64,
    pub errors: u64,
    pub acked_per_sec: f64,
    pub server_cpu_us_per_event: f64,
}

/// Presence queries over one channel with many members.
#[derive(Debug, Clone, Serialize)]
pub struct Presence {
    pub members: usize,
    pub nodes: usize,
    pub count_only_ms: MedianMax,
    pub full_ms: MedianMax,
    pub full_bytes: usize,
}
