//! `fanout-api`: the stateless HTTP front door. It validates events and publishes them to
//! NATS JetStream, answering only once the stream has stored them.
//!
//! # Layout
//! - [`config`]: this binary's settings.
//! - [`error`]: [`ApiError`], the one JSON error answer.
//! - [`routes`]: the HTTP endpoints.
//! - [`web`]: the demo page and the JavaScript client, compiled in.
//!
//! It holds no state of its own beyond the NATS connection: run as many as you like.

pub mod config;
pub mod error;
pub mod routes;
pub mod web;

pub use config::Config;
pub use error::ApiError;

use fanout::{Bus, BusError};
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

/// Serves the API on `listener` until `shutdown` is cancelled, then finishes in-flight
/// requests and drains the NATS connection.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    fanout::telemetry::init_metrics();
    let bus = Bus::connect(&config.common).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node = %config.common.node_id, "fanout-api listening");
    let state = routes::AppState::new(bus.clone(), &config);
    bus.follow_nodes(state.directory()).await?;
    let app = routes::router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    bus.drain().await;
    tracing::info!("fanout-api stopped");
    Ok(())
}
