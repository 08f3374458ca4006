//! `fanout-ws`: a WebSocket node. It holds browser connections, subscribes in NATS only to
//! the channels its clients want, and fans every event out to its local clients.
//!
//! # Layout (one idea per file, after centrifuge)
//! - [`transport`]: the upgrade and the per-socket loop. Knows WebSocket, not NATS.
//! - [`outbox`]: a connection's socket, written directly by fan-out; a backlog only when full.
//! - [`frame`]: WebSocket framing: encoding the node's frames, decoding the clients'.
//! - [`hub`]: this node's connections and their channels; reports first/last local subscriber.
//! - [`node`]: wires the bus and the hub together; only events cross between them.
//! - [`presence`]: publishing this node's membership changes, answering presence queries,
//!   following other nodes' changes (and their crashes) for local clients.
//! - [`protocol`]: the JSON frames.
//! - [`disconnect`]: the close codes and what they ask of a client.
//! - [`auth`]: who a connection is (JWT or anonymous) and what it may do.
//! - [`config`]: this binary's settings.

pub mod auth;
pub mod config;
pub mod disconnect;
pub mod frame;
pub mod hub;
pub mod node;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod transport;

pub use config::Config;

use std::time::Duration;

use fanout::{Bus, BusError};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] fanout::ConfigError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves `/ws` on `listener` until `shutdown` is cancelled; then stops accepting, drains
/// (closes every client with 1001, spread over `drain_window_ms`), waits for the connections
/// (bounded) and drains NATS.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    fanout::telemetry::init_metrics();
    let verifier = auth::Verifier::from_config(&config)?;
    let bus = Bus::connect(&config.common).await?;
    let shutdown_timeout = Duration::from_secs(config.shutdown_timeout_secs);
    let tasks = TaskTracker::new();
    let drain_window = Duration::from_millis(config.drain_window_ms);
    let node = node::Node::start(config, bus.clone(), verifier, &tasks);
    let addr = listener.local_addr()?;
    tracing::info!(%addr, node_id = %node.id(), "fanout-ws listening");
    let public_url = match node.config().public_url.trim() {
        "" => format!("ws://{{host}}:{}/ws", addr.port()),
        url => url.to_string(),
    };
    node.announce(public_url, &tasks);
    let app = transport::router(node.clone(), tasks.clone());
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<transport::Peer>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await?;
    node.drain(drain_window).await;
    tasks.close();
    if tokio::time::timeout(shutdown_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = node.hub().connections(),
            "connections still open after {shutdown_timeout:?}; exiting anyway"
        );
    }
    // The closed connections' leaves, then everything else, reach NATS before we go.
    node.flush_presence().await;
    bus.drain().await;
    tracing::info!("fanout-ws stopped");
    Ok(())
}
