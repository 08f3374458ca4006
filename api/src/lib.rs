//! `fanout-api`: the stateless HTTP front door. It validates events and publishes them to
//! NATS JetStream, answering only once the stream has stored them.
//!
//! # Layout
//! - [`config`]: this binary's settings.
//! - [`error`]: [`ApiError`], the one JSON error answer.
//! - [`routes`]: the HTTP endpoints.
//! - [`pusher`]: the Pusher protocol's HTTP API, for Pusher's server libraries.
//! - [`control`]: server-side control of users and connections, and the history API.
//! - [`web`]: the demo page and the JavaScript client, compiled in.
//!
//! It holds no state of its own beyond the NATS connection: run as many as you like.

pub mod config;
pub mod control;
pub mod error;
pub mod pusher;
pub mod routes;
pub mod web;
pub mod webhooks;

pub use config::Config;
pub use error::ApiError;

use fanout::{
    Bus, BusError,
    telemetry::{Kind, Metric},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Every metric the API exposes besides [`fanout::telemetry::COMMON_METRICS`] (the README's
/// table; `deploy/grafana` and `deploy/prometheus` query these).
pub const METRICS: &[Metric] = &[
    Metric {
        name: "fanout_api_events_accepted_total",
        kind: Kind::Counter,
        help: "Events stored and acknowledged, by class (channel, broadcast, ping) and duplicate (a repeated Idempotency-Key).",
        zero: &[
            &[("class", "channel"), ("duplicate", "false")],
            &[("class", "broadcast"), ("duplicate", "false")],
            &[("class", "ping"), ("duplicate", "false")],
        ],
    },
    Metric {
        name: "fanout_api_publish_duration_seconds",
        kind: Kind::Histogram,
        help: "From the JetStream publish to its acknowledgement.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_api_errors_total",
        kind: Kind::Counter,
        help: "Error answers, by their code (bus_unavailable: NATS or the stream could not take the event).",
        zero: &[&[("code", fanout::Code::BusUnavailable.as_str())]],
    },
    Metric {
        name: "fanout_webhook_events_decided_total",
        kind: Kind::Counter,
        help: "Lifecycle events this API process decided (FANOUT_WEBHOOK_URL), by name.",
        zero: &[],
    },
    Metric {
        name: "fanout_webhook_deliveries_total",
        kind: Kind::Counter,
        help: "Webhook attempts by outcome: delivered (a 2xx), failed (retried), dead (dead-lettered after FANOUT_WEBHOOK_RETRY_SECS).",
        zero: &[],
    },
    Metric {
        name: "fanout_webhook_lag_seconds",
        kind: Kind::Gauge,
        help: "Age of the oldest event in the webhook batch being delivered (0 when none waits).",
        zero: &[],
    },
    Metric {
        name: "fanout_region_mirror_behind",
        kind: Kind::Gauge,
        help: "1 while this region's mirror of another region's stream is behind (that region unreachable), by region.",
        zero: &[],
    },
];

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes in-flight
/// requests and drains the NATS connection.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    fanout::telemetry::init_metrics(
        &config.common,
        &[fanout::telemetry::COMMON_METRICS, METRICS],
    );
    let bus = Bus::connect(&config.common).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = %config.common.node_id, "fanout-api listening");
    let webhooks = webhooks::Webhooks::new(&config, bus.clone());
    let state = routes::AppState::new(bus.clone(), &config, webhooks.clone());
    bus.rpc().follow_nodes(state.directory()).await?;
    if let Some(webhooks) = webhooks {
        webhooks::start(webhooks, state.directory(), shutdown.clone());
    }
    tokio::spawn(control::follow_evacuations(state.clone(), shutdown.clone()));
    let app = routes::router(state, control::router().merge(pusher::router()));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    bus.drain().await;
    tracing::info!("fanout-api stopped");
    Ok(())
}
