//! What every transport checks before it answers (the browser origin, who the client is,
//! the per-IP limit), and the JSON errors it answers with when it refuses.

use std::net::SocketAddr;

use axum::{
    Json,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use fanout::Code;
use metrics::counter;
use serde_json::json;

use crate::{
    auth::Identity,
    node::{IpPermit, Node},
};

/// A JSON error answer: `{"error":{"code","message"}}`.
pub(crate) fn error(status: StatusCode, code: Code, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// A refusal before a stream starts: a JSON error answer.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Refusal {
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
                Code::ForbiddenOrigin,
                format!("origin {origin:?} may not connect (FANOUT_ALLOWED_ORIGINS)"),
            ));
        }
    }
    let identity = node.verifier().identify(token, user).map_err(|err| {
        counter!("fanout_ws_auth_failures_total", "code" => err.code.as_str()).increment(1);
        Refusal::new(StatusCode::UNAUTHORIZED, err.code, err.message)
    })?;
    if let Some(refused) = node.rules().refuses(&identity) {
        counter!("fanout_ws_auth_failures_total", "code" => refused.code.as_str()).increment(1);
        let status = match refused.code {
            Code::UserBlocked => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        return Err(Refusal::new(status, refused.code, refused.message));
    }
    let Some(permit) = node.admit(peer.ip()) else {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyConnections,
            format!(
                "{} already holds {} connections (FANOUT_MAX_CONNECTIONS_PER_IP)",
                peer.ip(),
                node.config().max_connections_per_ip
            ),
        ));
    };
    Ok(Admitted { identity, permit })
}
