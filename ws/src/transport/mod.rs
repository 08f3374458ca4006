//! The node's HTTP surface and the transports that carry the protocol to clients.
//!
//! - [`http`]: the accept loop: hyper serves every connection, until a handler takes its
//!   socket over ([`http::Takeover`]).
//! - [`websocket`]: `GET /ws`, the upgrade and the per-socket loop.
//! - [`frame`]: reading clients' WebSocket frames.
//! - [`sse`]: `GET /sse`, server-sent events, with a cursor in every event's id.
//! - [`http_session`]: `POST /session/{conn}`, the requests of an SSE stream.
//! - [`poll`]: `GET /poll`, long-polling, stateless between polls, and `POST /request`, the
//!   requests of a client without a live stream.
//! - [`admit`]: the checks every transport makes before it answers (origin, identity, per-IP
//!   limit), and its JSON refusals.
//! - [`webtransport`]: WebTransport sessions (HTTP/3 over QUIC, `FANOUT_WEBTRANSPORT_LISTEN`):
//!   length-prefixed frames on one stream, the listener and its certificate.
//! - [`connection`]: a connection's life, whatever its transport.
//! - this file: the router and the operational endpoints (`/healthz`, `/readyz`, `/metrics`,
//!   `/v1/debug/state`, `/debug/pprof/profile`).
//!
//! A transport adapts a connection to the transport-neutral [`crate::session::Session`]; it
//! touches no other module.

pub mod admit;
pub mod connection;
pub mod deflate;
pub mod frame;
pub mod http;
pub mod http_session;
pub mod poll;
pub mod pusher;
pub mod sse;
pub mod websocket;
pub mod webtransport;

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{FromRef, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use fanout::{Code, telemetry};
use metrics::gauge;
use serde_json::json;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::node::Node;
use admit::error;

/// What the handlers share; each extracts only the parts it uses (`State<Arc<Node>>`, ...).
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub node: Arc<Node>,
    /// Taken-over connections: invisible to the HTTP server's graceful shutdown, so the node
    /// waits for them here.
    pub sockets: TaskTracker,
    /// The live SSE streams, for their `POST /session/{conn}` requests.
    pub sessions: http_session::Sessions,
    /// The request rates of clients without a live stream (`POST /request`).
    pub rates: poll::RequestRates,
    /// Cancelled when the node begins to shut down: long-polls answer at once.
    pub shutdown: CancellationToken,
}

impl FromRef<AppState> for Arc<Node> {
    fn from_ref(state: &AppState) -> Self {
        state.node.clone()
    }
}

impl FromRef<AppState> for TaskTracker {
    fn from_ref(state: &AppState) -> Self {
        state.sockets.clone()
    }
}

impl FromRef<AppState> for http_session::Sessions {
    fn from_ref(state: &AppState) -> Self {
        state.sessions.clone()
    }
}

impl FromRef<AppState> for poll::RequestRates {
    fn from_ref(state: &AppState) -> Self {
        state.rates.clone()
    }
}

impl FromRef<AppState> for CancellationToken {
    fn from_ref(state: &AppState) -> Self {
        state.shutdown.clone()
    }
}

/// This node's OpenAPI 3.1 document (`ws/openapi.json`; checked against the routes and the
/// live answers in tests/contract.rs).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The node's HTTP surface: `/ws`, `/sse`, `/poll`, `/session/{conn}`, `/request`, `/healthz`,
/// `/readyz`, `/metrics`, `/v1/debug/state`, `/debug/pprof/profile`, `/openapi.json`.
pub fn router(node: Arc<Node>, sockets: TaskTracker, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/ws", get(websocket::upgrade))
        .route("/app/{key}", get(pusher::upgrade))
        .route("/sse", get(sse::stream))
        // A poll's answer honours `Accept-Encoding` (gzip, br): one answer, compressed once.
        .route(
            "/poll",
            get(poll::poll).layer(tower_http::compression::CompressionLayer::new()),
        )
        .route("/session/{conn}", post(http_session::request))
        .route("/request", post(poll::request))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/debug/state", get(debug_state))
        .route("/debug/pprof/profile", get(profile))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, Code::NotFound, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::MethodNotAllowed,
                "wrong method for this endpoint",
            )
        })
        .layer(cors(&node))
        .with_state(AppState {
            node,
            sockets,
            sessions: http_session::Sessions::default(),
            rates: poll::RequestRates::default(),
            shutdown,
        })
}

/// Browsers may read the HTTP transports' answers from the pages of the allowed origins
/// (`FANOUT_ALLOWED_ORIGINS`, any when empty): `/sse` and `/poll` are cross-origin requests
/// from a page served elsewhere, and `POST /session` is preceded by a preflight.
fn cors(node: &Node) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins: Vec<_> = node
        .config()
        .origins()
        .iter()
        .filter_map(|origin| origin.parse().ok())
        .collect();
    let allow = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("last-event-id"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let held = node.hub().connections();
    // A full node is not ready for more: balancers send new clients elsewhere.
    let ready = node.is_ready() && !node.admission().full(held);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "node": node.id(),
        "nats": node.nats_state(),
        "canary": match node.canary_failure() {
            None => json!({"ok": true}),
            Some(reason) => json!({"ok": false, "reason": reason}),
        },
        "control": {"rules_loaded": node.rules().is_loaded()},
        "admission": node.admission().report(held),
    });
    if let Some(proxy) = node.proxy().report() {
        body["proxy"] = proxy;
    }
    if let Some(regions) = node.bus().log().regions_report() {
        body["region"] = json!(node.bus().topology().region().map(|r| &**r));
        body["regions"] = regions;
    }
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    gauge!("fanout_ws_buffered_bytes").set(state.node.budget().used() as f64);
    gauge!("fanout_nats_connected").set(if state.node.bus().is_connected() {
        1.0
    } else {
        0.0
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render_metrics(),
    )
        .into_response()
}

/// A CPU profile of the node, in pprof's format, when `FANOUT_PROFILING` allows it.
async fn profile(State(node): State<Arc<Node>>, uri: axum::http::Uri) -> Response {
    match fanout::profiling::serve(node.config().common.profiling, uri.query()).await {
        Ok(profile) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            profile,
        )
            .into_response(),
        Err(err) => {
            let (status, code) = err.status_and_code();
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(status, code, &err.to_string())
        }
    }
}

/// What an operator looks at instead of attaching a debugger.
async fn debug_state(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let channels: Vec<_> = node
        .hub()
        .channels()
        .into_iter()
        .map(|(channel, subscribers)| json!({"channel": channel, "subscribers": subscribers}))
        .collect();
    Json(json!({
        "node": node.id(),
        "uptime_secs": node.uptime().as_secs(),
        "connections": node.hub().connections(),
        "peers": node.peers(),
        "evacuating": node.evacuating(),
        "buffered_bytes": node.budget().used(),
        "max_buffered_bytes": node.budget().limit(),
        "channels": channels,
        "nats": {
            "state": node.nats_state(),
            "stream": node.bus().log().stream_name(),
            "stream_ready": node.bus().log().stream_ready(),
        },
    }))
    .into_response()
}
