//! `fanout-ws`: a WebSocket node. It holds browser connections, subscribes in NATS only to
//! the channels its clients want, and fans every event out to its local clients.
//!
//! # Layout (one idea per file, after centrifuge)
//!
//! The event path, NATS to socket, is three files: [`reader`] (a channel's events, in order,
//! encoded once), [`hub`] (who gets them) and [`sink`] (how the bytes reach each connection).
//!
//! - [`session`]: transport-neutral: a connection's state in the protocol, one handler per op,
//!   the publish budget.
//! - [`transport`]: the HTTP front and the transports that adapt a connection to a session
//!   (WebSocket); knows the wire, not NATS.
//! - [`hub`]: this node's connections and their channels, holding sinks; reports first/last
//!   local subscriber.
//! - [`sink`]: how bytes reach a connection: written straight into its socket, queued (and
//!   bounded) only when the socket is full.
//! - [`reader`]: NATS channel readers: order, gap repair, one encoding per event.
//! - [`recent`]: each channel's recent events, for resumes answered from memory.
//! - [`node`]: wiring, admission, announcement, drain.
//! - [`presence`]: publishing this node's membership changes, answering presence queries,
//!   following other nodes' changes (and their crashes) for local clients.
//! - [`protocol`]: the JSON frames.
//! - [`cursor`]: where an HTTP stream is, on every channel (SSE ids, long-poll cursors).
//! - [`disconnect`]: the close codes and what they ask of a client.
//! - [`canary`]: the node's probe of its own delivery path, behind `/readyz`.
//! - [`budget`]: the node-wide budget of bytes held on behalf of clients.
//! - [`auth`]: who a connection is (JWT or anonymous) and what it may do.
//! - [`config`]: this binary's settings.

pub mod auth;
pub mod budget;
pub mod canary;
pub mod config;
pub mod cursor;
pub mod disconnect;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod mark;
pub mod node;
pub mod presence;
pub mod protocol;
pub mod reader;
pub mod recent;
pub mod session;
pub mod sink;
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
    let app = transport::router(node.clone(), tasks.clone(), shutdown.clone());
    let limits = transport::http::Limits {
        header_read_timeout: Duration::from_millis(node.config().handshake_timeout_ms),
    };
    transport::http::serve(listener, app, limits, shutdown.clone(), shutdown_timeout).await?;
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
