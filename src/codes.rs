//! Every error code fanout puts on the wire, in one table (as `disconnect.rs` is for close
//! codes): the `code` of an HTTP error body (`{"error":{"code","message"}}`) and of an error
//! frame (`{"op":"error","code",...}`). Clients branch on these names: they never change.
//!
//! | code | where | what |
//! |---|---|---|
//! | `invalid_json` | frame, HTTP | not JSON, or not a JSON object |
//! | `invalid_request` | frame, HTTP | a request of the wrong shape (docs/protocol.md) |
//! | `unknown_op` | frame | an `op` the node does not know |
//! | `unsupported_op` | `POST /request` | an op that needs a live connection |
//! | `unsupported_frame` | frame | a binary WebSocket frame |
//! | `invalid_channel` | frame, HTTP | a channel name that breaks the rules |
//! | `reserved_channel` | frame, HTTP | `broadcast` where it cannot be, or fanout's own `_fanout.*` |
//! | `too_many_subscriptions` | frame | over `FANOUT_MAX_SUBSCRIPTIONS` |
//! | `info_too_large` | frame | presence info over 2 KiB |
//! | `too_many_requests` | frame | a fifth presence query in flight |
//! | `rate_limited` | frame, HTTP 429 | over `FANOUT_PUBLISH_RATE_PER_SEC` |
//! | `forbidden` | frame, HTTP 403 | the token or key does not allow it |
//! | `forbidden_origin` | HTTP 403 | a browser origin not in `FANOUT_ALLOWED_ORIGINS` |
//! | `too_many_connections` | HTTP 429 | over `FANOUT_MAX_CONNECTIONS_PER_IP` |
//! | `over_capacity` | HTTP 503 | the node holds `FANOUT_MAX_CONNECTIONS` or is over `FANOUT_ACCEPT_RATE` |
//! | `region_evacuated`, `unknown_region` | HTTP 503, 404 | the region is evacuated (connect or publish elsewhere); no such region |
//! | `unauthorized` | HTTP 401 | no API key where one is needed |
//! | `missing_token`, `invalid_token`, `invalid_signature`, `wrong_algorithm`, `token_expired`, `invalid_user` | HTTP 401, frame | who the client is could not be told |
//! | `invalid_session`, `unknown_session` | HTTP 401, 404 | a session request without its secret, or for no live session |
//! | `invalid_body`, `invalid_query`, `invalid_cursor`, `invalid_idempotency_key`, `invalid_event`, `invalid_batch` | HTTP 400 | an HTTP request's part that cannot be read |
//! | `payload_too_large`, `batch_too_large` | HTTP 413 | over the size limits |
//! | `websocket_required` | HTTP 400, 405, 426 | `/ws` without a WebSocket upgrade |
//! | `not_found`, `method_not_allowed` | HTTP 404, 405 | no such endpoint, or the wrong method |
//! | `bus_unavailable` | frame, HTTP 503 | NATS did not take or answer it: try again |
//! | `timeout` | HTTP 504 | a session request got no reply in time |
//! | `profiling_off` | HTTP 404 | `/debug/pprof/profile` without `FANOUT_PROFILING=true` |
//! | `profiling_busy` | HTTP 409 | a CPU profile is already being taken (`/debug/pprof/profile`) |
//! | `webhooks_off` | HTTP 404 | `/v1/webhooks/*` without `FANOUT_WEBHOOK_URL` |
//! | `user_blocked` | HTTP 403 | the user is blocked (`POST /v1/users/{user}/block`) |
//! | `token_revoked` | HTTP 401, frame | the token was revoked (`POST /v1/tokens/revoke`) |
//! | `proxy_unavailable` | frame, HTTP 502 | the app's backend (a `FANOUT_PROXY_*_URL`) could not be reached, or answered what is not an answer |
//! | `proxy_timeout` | frame, HTTP 504 | the app's backend did not answer within `FANOUT_PROXY_TIMEOUT_MS` |
//! | `internal` | frame, HTTP 500 | a bug: never expected |

use serde::Serialize;

/// One error code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidJson,
    InvalidRequest,
    UnknownOp,
    UnsupportedOp,
    UnsupportedFrame,
    InvalidChannel,
    ReservedChannel,
    TooManySubscriptions,
    InfoTooLarge,
    TooManyRequests,
    RateLimited,
    Forbidden,
    ForbiddenOrigin,
    TooManyConnections,
    /// The node takes no more connections now (`FANOUT_MAX_CONNECTIONS`, `FANOUT_ACCEPT_RATE`):
    /// 503 with `Retry-After`; try again then, or another node.
    OverCapacity,
    /// The region is evacuated (`POST /v1/regions/{region}/evacuate`): its ws nodes take no
    /// new connections and its APIs no publishes, 503 with the regions to go to instead.
    RegionEvacuated,
    /// A region that is not one of the tier's (`FANOUT_REGIONS`).
    UnknownRegion,
    Unauthorized,
    MissingToken,
    InvalidToken,
    InvalidSignature,
    WrongAlgorithm,
    TokenExpired,
    InvalidUser,
    InvalidSession,
    UnknownSession,
    InvalidBody,
    InvalidQuery,
    InvalidCursor,
    InvalidIdempotencyKey,
    InvalidEvent,
    InvalidBatch,
    PayloadTooLarge,
    BatchTooLarge,
    WebsocketRequired,
    NotFound,
    MethodNotAllowed,
    BusUnavailable,
    Timeout,
    ProfilingOff,
    ProfilingBusy,
    WebhooksOff,
    UserBlocked,
    TokenRevoked,
    ProxyUnavailable,
    ProxyTimeout,
    Internal,
}

impl Code {
    /// Every code, in the table's order.
    pub const ALL: [Code; 47] = [
        Code::InvalidJson,
        Code::InvalidRequest,
        Code::UnknownOp,
        Code::UnsupportedOp,
        Code::UnsupportedFrame,
        Code::InvalidChannel,
        Code::ReservedChannel,
        Code::TooManySubscriptions,
        Code::InfoTooLarge,
        Code::TooManyRequests,
        Code::RateLimited,
        Code::Forbidden,
        Code::ForbiddenOrigin,
        Code::TooManyConnections,
        Code::OverCapacity,
        Code::RegionEvacuated,
        Code::UnknownRegion,
        Code::Unauthorized,
        Code::MissingToken,
        Code::InvalidToken,
        Code::InvalidSignature,
        Code::WrongAlgorithm,
        Code::TokenExpired,
        Code::InvalidUser,
        Code::InvalidSession,
        Code::UnknownSession,
        Code::InvalidBody,
        Code::InvalidQuery,
        Code::InvalidCursor,
        Code::InvalidIdempotencyKey,
        Code::InvalidEvent,
        Code::InvalidBatch,
        Code::PayloadTooLarge,
        Code::BatchTooLarge,
        Code::WebsocketRequired,
        Code::NotFound,
        Code::MethodNotAllowed,
        Code::BusUnavailable,
        Code::Timeout,
        Code::ProfilingOff,
        Code::ProfilingBusy,
        Code::WebhooksOff,
        Code::UserBlocked,
        Code::TokenRevoked,
        Code::ProxyUnavailable,
        Code::ProxyTimeout,
        Code::Internal,
    ];

    /// The code's name on the wire (and in metric labels).
    pub const fn as_str(self) -> &'static str {
        match self {
            Code::InvalidJson => "invalid_json",
            Code::InvalidRequest => "invalid_request",
            Code::UnknownOp => "unknown_op",
            Code::UnsupportedOp => "unsupported_op",
            Code::UnsupportedFrame => "unsupported_frame",
            Code::InvalidChannel => "invalid_channel",
            Code::ReservedChannel => "reserved_channel",
            Code::TooManySubscriptions => "too_many_subscriptions",
            Code::InfoTooLarge => "info_too_large",
            Code::TooManyRequests => "too_many_requests",
            Code::RateLimited => "rate_limited",
            Code::Forbidden => "forbidden",
            Code::ForbiddenOrigin => "forbidden_origin",
            Code::TooManyConnections => "too_many_connections",
            Code::OverCapacity => "over_capacity",
            Code::RegionEvacuated => "region_evacuated",
            Code::UnknownRegion => "unknown_region",
            Code::Unauthorized => "unauthorized",
            Code::MissingToken => "missing_token",
            Code::InvalidToken => "invalid_token",
            Code::InvalidSignature => "invalid_signature",
            Code::WrongAlgorithm => "wrong_algorithm",
            Code::TokenExpired => "token_expired",
            Code::InvalidUser => "invalid_user",
            Code::InvalidSession => "invalid_session",
            Code::UnknownSession => "unknown_session",
            Code::InvalidBody => "invalid_body",
            Code::InvalidQuery => "invalid_query",
            Code::InvalidCursor => "invalid_cursor",
            Code::InvalidIdempotencyKey => "invalid_idempotency_key",
            Code::InvalidEvent => "invalid_event",
            Code::InvalidBatch => "invalid_batch",
            Code::PayloadTooLarge => "payload_too_large",
            Code::BatchTooLarge => "batch_too_large",
            Code::WebsocketRequired => "websocket_required",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::BusUnavailable => "bus_unavailable",
            Code::Timeout => "timeout",
            Code::ProfilingOff => "profiling_off",
            Code::ProfilingBusy => "profiling_busy",
            Code::WebhooksOff => "webhooks_off",
            Code::UserBlocked => "user_blocked",
            Code::TokenRevoked => "token_revoked",
            Code::ProxyUnavailable => "proxy_unavailable",
            Code::ProxyTimeout => "proxy_timeout",
            Code::Internal => "internal",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serialized_ones_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in Code::ALL {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
            assert!(seen.insert(code.as_str()), "{code} twice");
        }
    }
}
