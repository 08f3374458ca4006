//! The node's HTTP surface and the transports that carry the protocol to clients.
//!
//! - [`http`]: the accept loop: hyper serves every connection, until a handler takes its
//!   socket over ([`http::Takeover`]).
//! - [`websocket`]: `GET /ws`, the upgrade and the per-socket loop.
//! - [`frame`]: WebSocket framing.
//! - [`sse`]: `GET /sse`, server-sent events, with a cursor in every event's id.
//! - [`http_session`]: `POST /session/{conn}`, the requests of an SSE stream.
//! - [`poll`]: `GET /poll`, long-polling, stateless between polls, and `POST /request`, the
//!   requests of a client without a live stream.
//! - this file: the router, the refusals every transport shares (origin, identity, per-IP
//!   limit), and the operational endpoints (`/healthz`, `/readyz`, `/metrics`,
//!   `/v1/debug/state`).
//!
//! A transport adapts a connection to the transport-neutral [`crate::session::Session`]; it
//! touches no other module.

pub mod frame;
pub mod http;
pub mod http_session;
pub mod poll;
pub mod sse;
pub mod websocket;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use fanout::telemetry;
use metrics::{counter, gauge};
use serde_json::json;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    auth::Identity,
    node::{IpPermit, Node},
};

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub node: Arc<Node>,
    /// Taken-over connections: invisible to the HTTP server's graceful shutdown, so the node
    /// waits for them here.
    pub sockets: TaskTracker,
    /// The live SSE streams, for their `POST /session/{conn}` requests.
    pub sessions: http_session::Sessions,
    /// The request budgets of clients without a live stream (`POST /request`).
    pub budgets: poll::Budgets,
    /// Cancelled when the node begins to shut down: long-polls answer at once.
    pub shutdown: CancellationToken,
}

/// This node's OpenAPI 3.1 document (`ws/openapi.json`; checked against the routes and the
/// live answers in tests/contract.rs).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The node's HTTP surface: `/ws`, `/sse`, `/poll`, `/session/{conn}`, `/request`, `/healthz`,
/// `/readyz`, `/metrics`, `/v1/debug/state`, `/openapi.json`.
pub fn router(node: Arc<Node>, sockets: TaskTracker, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/ws", get(websocket::upgrade))
        .route("/sse", get(sse::stream))
        .route("/poll", get(poll::poll))
        .route("/session/{conn}", post(http_session::request))
        .route("/request", post(poll::request))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/debug/state", get(debug_state))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong method for this endpoint",
            )
        })
        .layer(cors(&node))
        .with_state(AppState {
            node,
            sockets,
            sessions: http_session::Sessions::default(),
            budgets: poll::Budgets::default(),
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

/// A JSON error answer: `{"error":{"code","message"}}`.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// A refusal before a stream starts: a JSON error answer.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.status, self.code, &self.message)
    }
}

/// A client that may connect: who it is, and its slot in the per-IP count.
pub(crate) struct Admitted {
    pub identity: Identity,
    pub permit: IpPermit,
}

/// The checks every streaming transport makes before it answers: the browser origin is
/// allowed, the token (or `?user=`) identifies someone, and the peer's IP has a connection
/// to spare. Refusals are JSON errors.
pub(crate) fn admit(
    node: &Node,
    peer: SocketAddr,
    headers: &HeaderMap,
    token: Option<&str>,
    user: Option<&str>,
) -> Result<Admitted, Refusal> {
    let origins = node.config().origins();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
        if !origins.is_empty() && !origins.iter().any(|allowed| allowed == origin) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!("origin {origin:?} may not connect (FANOUT_ALLOWED_ORIGINS)"),
            ));
        }
    }
    let identity = node.verifier().identify(token, user).map_err(|err| {
        counter!("fanout_ws_auth_failures_total", "code" => err.code).increment(1);
        Refusal::new(StatusCode::UNAUTHORIZED, err.code, err.message)
    })?;
    let Some(permit) = node.admit(peer.ip()) else {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "{} already holds {} connections (FANOUT_MAX_CONNECTIONS_PER_IP)",
                peer.ip(),
                node.config().max_connections_per_ip
            ),
        ));
    };
    Ok(Admitted { identity, permit })
}

/// The span of a connection's task: it logs only at debug level, so the span (entered on
/// every poll) exists only when those logs are on.
pub(crate) fn connection_span(node: &Node, conn: &uuid::Uuid, user: &str) -> tracing::Span {
    if tracing::enabled!(target: "fanout_ws", tracing::Level::DEBUG) {
        tracing::info_span!(target: telemetry::LOG_CONTEXT, "conn", node_id = %node.id(), %conn, %user)
    } else {
        tracing::Span::none()
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    let node = &state.node;
    let ready = node.is_ready();
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
    });
    if let Some(regions) = node.bus().regions_report() {
        body["region"] = json!(node.bus().region().map(|r| &**r));
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
        "buffered_bytes": node.budget().used(),
        "max_buffered_bytes": node.budget().limit(),
        "channels": channels,
        "nats": {
            "state": node.nats_state(),
            "stream": node.bus().stream_name(),
            "stream_ready": node.bus().stream_ready(),
        },
    }))
    .into_response()
}
