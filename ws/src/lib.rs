//! `fanout-ws`: a WebSocket node. It holds browser connections, subscribes in NATS only to
//! the channels its clients want, and fans every event out to its local clients.
//!
//! # Layout (one idea per file, after centrifuge), in layers
//!
//! The modules form layers, listed here roughly from the top down: no file and no top-level
//! module uses one that uses it (`tests/integration/layers.rs` checks it).
//!
//! One event's path, NATS to socket, five files: [`channel::reader`] (a channel's events, in
//! order, gaps repaired, encoded once) → [`channel::log`] (recorded for resumes) →
//! `hub/subs.rs` (who gets them: the members' sinks, copied; `broadcast`'s reader takes every
//! connection's from `hub/conns.rs` instead) → [`sink`] (into each socket, queued only when it
//! is full) → the transport, which frames it ([`transport::websocket`], [`transport::sse`],
//! [`transport::poll`], [`transport::webtransport`]: its outbox is a queue its connection
//! writes into the QUIC stream, through `transport/connection.rs`).
//!
//! - [`node`]: wiring, admission, announcement, drain.
//! - [`transport`]: the HTTP front; [`transport::connection`], one connection lifecycle for
//!   every transport (outbox, registration, heartbeat, expiry and stall timers, kicks,
//!   counters, goodbye); each transport keeps how it reads, writes and closes.
//! - [`session`]: transport-neutral: a connection's state in the protocol, one handler per op,
//!   its request rate.
//! - [`presence`]: publishing this node's membership changes, answering presence queries,
//!   following other nodes' changes (and their crashes) for local clients.
//! - [`channel`]: each channel's interest (NATS subscriptions, concurrently per channel), its
//!   reader and its recent log, and recovery: the resume decision as pure functions
//!   ([`channel::recovery`]) and the reads it asks for ([`channel::replay`]).
//! - [`hub`]: this node's connections (`hub/conns.rs`) and memberships (`hub/subs.rs`),
//!   holding sinks; one observer for first/last member and presence changes.
//! - [`sink`]: how bytes reach a connection: written straight into its socket, queued (and
//!   bounded) only when the socket is full.
//! - [`control`]: server-side control on this node: the app's commands carried out on its
//!   connections, and the rules it follows (blocks, revoked tokens, removed histories).
//! - [`proxy`]: the app's proxy hooks (connect, subscribe, publish, refresh, rpc) over HTTP,
//!   with their timeouts and breakers.
//! - [`lifecycle`]: this node's reports to the tier's lifecycle decider (webhooks).
//! - [`canary`]: the node's probe of its own delivery path, behind `/readyz`.
//! - [`cursor`]: where an HTTP stream is, on every channel (SSE ids, long-poll cursors).
//! - [`protocol`]: the JSON frames; [`msgpack`]: the same frames as MessagePack.
//! - [`position`]: channel keys, marks and positions, the vocabulary every layer shares.
//! - [`disconnect`]: the close codes and what they ask of a client.
//! - [`budget`]: the node-wide budget of bytes held on behalf of clients.
//! - [`auth`]: who a connection is (JWT or anonymous) and what it may do.
//! - [`config`]: this binary's settings.

pub mod admission;
pub mod auth;
pub mod budget;
pub mod canary;
pub mod channel;
pub mod config;
pub mod control;
pub mod cursor;
pub mod disconnect;
pub mod drain;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod lifecycle;
pub mod msgpack;
pub mod node;
pub mod position;
pub mod presence;
pub mod protocol;
pub mod proxy;
pub mod session;
pub mod sink;
pub mod transport;

pub use config::Config;

use std::time::Duration;

use fanout::{
    Bus, BusError,
    telemetry::{Kind, Metric},
};
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
    #[error("WebTransport: {0}")]
    WebTransport(String),
}

/// Every metric a ws node exposes besides [`fanout::telemetry::COMMON_METRICS`] (the
/// README's table; `deploy/grafana` and `deploy/prometheus` query these).
pub const METRICS: &[Metric] = &[
    Metric {
        name: "fanout_ws_connections",
        kind: Kind::Gauge,
        help: "Open client connections (WebSocket and SSE).",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_connections_opened_total",
        kind: Kind::Counter,
        help: "Connections accepted.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_connections_closed_total",
        kind: Kind::Counter,
        help: "Connections closed, by reason (client, shutdown, slow_consumer, heartbeat_timeout, message_too_big, protocol_error, invalid_data, frame_timeout, try_again_later, ...).",
        zero: &[&[("reason", "client")], &[("reason", "slow_consumer")]],
    },
    Metric {
        name: "fanout_ws_subscriptions",
        kind: Kind::Gauge,
        help: "(connection, channel) subscriptions.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_channels",
        kind: Kind::Gauge,
        help: "Channels with at least one local subscriber.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_nats_subscriptions",
        kind: Kind::Gauge,
        help: "NATS subscriptions held (channels and broadcast).",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_events_received_total",
        kind: Kind::Counter,
        help: "Events received from NATS.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_events_malformed_total",
        kind: Kind::Counter,
        help: "NATS messages dropped: not a stored event, or data not JSON.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_frames_delivered_total",
        kind: Kind::Counter,
        help: "Event frames queued to clients.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_bytes_out_total",
        kind: Kind::Counter,
        help: "Bytes of event frames queued to clients.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_slow_consumer_disconnects_total",
        kind: Kind::Counter,
        help: "Clients cut off because they did not read fast enough (close code 4001).",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_gap_repairs_total",
        kind: Kind::Counter,
        help: "Gaps (or NATS reconnects) filled from the stream.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_events_repaired_total",
        kind: Kind::Counter,
        help: "Events delivered by gap repairs.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_gap_closes_total",
        kind: Kind::Counter,
        help: "Connections closed with 4003 because a gap in their channel could not be repaired from the stream (they resume instead).",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_replayed_events_total",
        kind: Kind::Counter,
        help: "Events replayed to resuming clients.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_replay_wait_seconds",
        kind: Kind::Histogram,
        help: "How long a resume's replay waited for a stream read (FANOUT_REPLAY_CONCURRENCY at once).",
        zero: &[],
    },
    Metric {
        name: "fanout_ws_event_latency_seconds",
        kind: Kind::Histogram,
        help: "From an event's publish (its ts) to its arrival at this node.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_presence_changes_total",
        kind: Kind::Counter,
        help: "Presence join, leave and update changes this node published.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_presence_changes_dropped_total",
        kind: Kind::Counter,
        help: "Presence changes dropped because the queue to NATS was full.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_presence_ghost_leaves_total",
        kind: Kind::Counter,
        help: "Leaves sent for the members of nodes that died.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_auth_failures_total",
        kind: Kind::Counter,
        help: "Refused identities, by code (missing_token, invalid_token, token_expired, invalid_user, ...).",
        zero: &[&[("code", fanout::Code::InvalidToken.as_str())]],
    },
    Metric {
        name: "fanout_ws_client_publishes_total",
        kind: Kind::Counter,
        help: "Events clients published through the protocol.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_buffered_bytes",
        kind: Kind::Gauge,
        help: "Bytes held for clients against FANOUT_MAX_BUFFERED_BYTES (set at each scrape).",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_recent_bytes",
        kind: Kind::Gauge,
        help: "Bytes of recent events kept in memory for resumes.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_canary_ok",
        kind: Kind::Gauge,
        help: "1 while the canary's probes come back, 0 once two in a row did not (absent with the canary off).",
        zero: &[],
    },
    Metric {
        name: "fanout_ws_canary_failures_total",
        kind: Kind::Counter,
        help: "Times the canary found the delivery path broken.",
        zero: &[&[]],
    },
    Metric {
        name: "fanout_ws_proxy_duration_seconds",
        kind: Kind::Histogram,
        help: "How long the app's backend took to answer a proxy hook, by hook (connect, subscribe, publish, refresh, rpc).",
        zero: &[],
    },
    Metric {
        name: "fanout_ws_proxy_requests_total",
        kind: Kind::Counter,
        help: "Proxy hook calls, by hook and outcome (ok, refused, timeout, unavailable, breaker_open).",
        zero: &[],
    },
    Metric {
        name: "fanout_ws_proxy_breaker_open",
        kind: Kind::Gauge,
        help: "1 while a hook's breaker is open (its backend failed 5 times in a row): calls fail at once for 5 s.",
        zero: &[],
    },
];

/// Serves `/ws` on `listener` until `shutdown` is cancelled; then stops accepting, drains
/// (closes every client with 1001, spread over `drain_window_ms`), waits for the connections
/// (bounded) and drains NATS.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    fanout::telemetry::init_metrics(
        &config.common,
        &[fanout::telemetry::COMMON_METRICS, METRICS],
    );
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
        url => url.replace("{node}", node.id()),
    };
    let webtransport = transport::webtransport::start(&node, &tasks, &shutdown)?;
    node.announce(public_url, webtransport, &tasks);
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
