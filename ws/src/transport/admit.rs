//! What every transport checks before it answers (the browser origin, who the client is,
//! the per-IP limit), and the JSON errors it answers with when it refuses.

use std::{net::SocketAddr, time::Duration};

use axum::{
    Json,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use fanout::Code;
use metrics::counter;
use serde_json::json;

use crate::{
    auth::{Identity, Patterns, Verifier},
    node::{IpPermit, Node},
    proxy::{ConnectAnswer, ConnectRequest, Hook, ProxyError},
};
use fanout::Channel;

/// A JSON error answer: `{"error":{"code","message"}}`.
pub(crate) fn error(status: StatusCode, code: Code, message: &str) -> Response {
    error_with(status, code.as_str(), message)
}

/// [`error`] with any code (the app's own).
fn error_with(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// A refusal before a stream starts: a JSON error answer.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    /// One of [`Code`]'s, or the app's own (a proxy hook's refusal).
    pub code: String,
    pub message: String,
    /// When to try again (`Retry-After`, and `retry_after_ms` in the body).
    pub retry_after: Option<std::time::Duration>,
}

impl Refusal {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code: code.as_str().to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// The refusal of a proxy hook's failure: the app's status, code and message.
    pub fn proxy(err: ProxyError) -> Refusal {
        Refusal {
            status: StatusCode::from_u16(err.status()).unwrap_or(StatusCode::FORBIDDEN),
            code: err.code().to_string(),
            message: err.to_string(),
            retry_after: None,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Some(after) = self.retry_after else {
            return error_with(self.status, &self.code, &self.message);
        };
        let body = json!({"error": {"code": self.code, "message": self.message,
            "retry_after_ms": after.as_millis() as u64}});
        // Whole seconds, rounded up: never sooner than the node said.
        let seconds = after.as_millis().div_ceil(1000).max(1).to_string();
        (self.status, [(header::RETRY_AFTER, seconds)], Json(body)).into_response()
    }
}

/// How long a client refused by an evacuated region is told to wait (it tries another node
/// meanwhile): an evacuation lasts minutes.
const EVACUATED_RETRY: Duration = Duration::from_secs(30);

/// Admission control, before any other work: 503 with `Retry-After` when the node holds
/// `FANOUT_MAX_CONNECTIONS` or takes new connections faster than `FANOUT_ACCEPT_RATE`.
pub(crate) fn gate(node: &Node) -> Result<(), Refusal> {
    if node.evacuating() {
        let common = &node.config().common;
        let others: Vec<&str> = common
            .regions
            .iter()
            .map(|region| &**region)
            .filter(|region| *region != common.region.trim())
            .collect();
        return Err(Refusal {
            retry_after: Some(EVACUATED_RETRY),
            ..Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::RegionEvacuated,
                format!(
                    "region {} is evacuated: connect to another region ({})",
                    common.region.trim(),
                    others.join(", ")
                ),
            )
        });
    }
    node.admission()
        .take(node.hub().connections())
        .map_err(|refused| Refusal {
            retry_after: Some(refused.retry_after()),
            ..Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::OverCapacity,
                format!(
                    "{}: try again after Retry-After, or another node",
                    refused.reason()
                ),
            )
        })
}

/// A client that may connect: who it is, and its slot in the per-IP count.
pub(crate) struct Admitted {
    pub identity: Identity,
    pub permit: IpPermit,
}

/// The checks every streaming transport makes before it answers: the browser origin is
/// allowed, the token (or `?user=`) identifies someone, or the app's connect hook does (a
/// token is checked first), no rule refuses them, and the peer's IP has a connection to
/// spare. Refusals are JSON errors.
pub(crate) async fn admit(
    node: &Node,
    peer: SocketAddr,
    headers: &HeaderMap,
    token: Option<&str>,
    user: Option<&str>,
    transport: &'static str,
) -> Result<Admitted, Refusal> {
    gate(node)?;
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
    let identity = if node.proxy().has(Hook::Connect) {
        connect_hook(node, peer, headers, token, user, transport).await?
    } else {
        node.verifier()
            .identify(token, user)
            .map_err(unauthorized)?
    };
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

/// The refusal of who the client says it is (401), counted.
fn unauthorized(err: crate::auth::AuthError) -> Refusal {
    counter!("fanout_ws_auth_failures_total", "code" => err.code.as_str()).increment(1);
    Refusal::new(StatusCode::UNAUTHORIZED, err.code, err.message)
}

/// Who the connect hook says the client is. A token, when there is one, is checked first
/// (and names the user); without one the hook must name the user. Without a token such an
/// identity may subscribe to any channel that is not fanout's own, and publish only where the
/// publish hook allows (with `FANOUT_AUTH=none`: anywhere), as an anonymous one may.
async fn connect_hook(
    node: &Node,
    peer: SocketAddr,
    headers: &HeaderMap,
    token: Option<&str>,
    user: Option<&str>,
    transport: &'static str,
) -> Result<Identity, Refusal> {
    let token = token.filter(|t| !t.is_empty());
    let verified = match (node.verifier(), token) {
        (Verifier::Jwt { .. }, None) => None,
        (verifier, token) => Some(verifier.identify(token, user).map_err(unauthorized)?),
    };
    let named = match (&verified, token, user) {
        (Some(identity), Some(_), _) => Some(identity.user.as_str()),
        (_, _, user) => user,
    };
    let proxy = node.proxy();
    let request = ConnectRequest {
        transport,
        remote_addr: peer.to_string(),
        node: node.id(),
        region: node.bus().topology().region().map(|r| &**r),
        headers: proxy.forwarded(headers),
        user: named,
    };
    let answer: ConnectAnswer = proxy
        .call(Hook::Connect, &request)
        .await
        .map_err(Refusal::proxy)?;
    let unusable = |why: String| {
        Refusal::proxy(ProxyError::Unavailable(format!(
            "the connect hook's answer cannot be used: {why}"
        )))
    };
    let by_token = token.is_some() && verified.is_some();
    let user = match (answer.user, by_token) {
        (Some(user), true) if Some(user.as_str()) != named => {
            return Err(unusable(format!(
                "it names {user:?}, the token {:?}",
                named.unwrap_or_default()
            )));
        }
        (_, true) => named.unwrap_or_default().to_string(),
        (Some(user), false) if crate::auth::valid_user(&user) => user,
        (Some(_), false) => {
            return Err(unusable(
                "\"user\" must be 1-128 printable characters".into(),
            ));
        }
        (None, false) => return Err(unusable("it has no \"user\"".into())),
    };
    let channels = answer
        .channels
        .iter()
        .map(|name| match Channel::parse(name) {
            Ok(channel) if !channel.is_internal() && !channel.is_broadcast() => Ok(channel),
            _ => Err(unusable(format!(
                "{name:?} is not a channel a client may be in"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut identity = match verified {
        Some(identity) if by_token => identity,
        _ => Identity {
            user: String::new(),
            info: None,
            subscribe: Patterns::all(),
            publish: match node.verifier() {
                Verifier::Anonymous => Patterns::all(),
                Verifier::Jwt { .. } => Patterns::none(),
            },
            expires_at: None,
            jti: None,
            issued_at: None,
            channels: Vec::new(),
        },
    };
    identity.user = user;
    if answer.info.is_some() {
        identity.info = answer.info;
    }
    if let Some(expire_at) = answer.expire_at {
        if !crate::proxy::ahead(expire_at) {
            return Err(unusable("\"expire_at\" has passed".into()));
        }
        identity.expires_at = Some(
            identity
                .expires_at
                .map_or(expire_at, |exp| exp.min(expire_at)),
        );
    }
    identity.channels = channels;
    Ok(identity)
}
