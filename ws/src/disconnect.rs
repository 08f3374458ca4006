//! WebSocket close codes fanout sends, in one place (compare centrifuge's `disconnect.go`).
//!
//! | code | name | client should |
//! |---|---|---|
//! | 1000 | normal | not reconnect (the client asked to close) |
//! | 1001 | going away | reconnect elsewhere now, and resume (the node is draining) |
//! | 1002 | protocol error | fix the client: its frames break the WebSocket protocol |
//! | 1007 | invalid data | fix the client: a text message (or close reason) that is not UTF-8 |
//! | 1008 | policy violation | a frame (or fragmented message) was started and not finished within `FANOUT_FRAME_TIMEOUT_MS`; reconnect |
//! | 1009 | message too big | fix the client: a frame exceeded the size limit; reconnect |
//! | 1011 | internal error | reconnect with backoff |
//! | 1013 | try again later | the node holds as many client bytes as it may (`FANOUT_MAX_BUFFERED_BYTES`): reconnect with backoff, elsewhere if you can |
//! | 4000–4499 | fanout, transient | reconnect with backoff (and resume) |
//! | 4001 | slow consumer | the client did not read fast enough and its queue overflowed |
//! | 4002 | heartbeat timeout | the client did not answer a ping within one heartbeat |
//! | 4003 | unavailable | the stream's history could not be read to resume the client: reconnect and resume |
//! | 4004 | token expired | get a new token (and reconnect with it); send `refresh` before `exp` to avoid this |
//! | 4005 | disconnected | the app's backend closed it (`POST /v1/users/{user}/disconnect` with `"reconnect": true`): reconnect with backoff |
//! | 4000–4499, other | the app's | a code the app's backend chose with `"reconnect": true`: reconnect with backoff |
//! | 4500–4999 | fanout, terminal | not reconnect without changing something |
//! | 4500 | disconnected, do not reconnect | the app's backend closed it (`"reconnect": false`) |
//! | 4501 | blocked | the user is blocked (`POST /v1/users/{user}/block`); connects are refused with HTTP 403 `user_blocked` until it is lifted |
//! | 4502 | token revoked | the connection's token was revoked (`POST /v1/tokens/revoke`): get a new token first |
//! | 4503 | refused | the app's backend refused the connection's refresh (`FANOUT_PROXY_REFRESH_URL`) |
//! | 4500–4999, other | the app's | a code the app's backend chose with `"reconnect": false` |

use std::borrow::Cow;

/// A close code with its reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    /// At most [`MAX_REASON`] bytes: it must fit in a WebSocket close frame.
    pub reason: Cow<'static, str>,
    /// Label for `fanout_ws_connections_closed_total{reason}`.
    pub name: &'static str,
}

pub const NORMAL: Disconnect = Disconnect {
    code: 1000,
    reason: Cow::Borrowed("normal closure"),
    name: "normal",
};
pub const GOING_AWAY: Disconnect = Disconnect {
    code: 1001,
    reason: Cow::Borrowed("server shutting down: reconnect elsewhere"),
    name: "shutdown",
};
pub const PROTOCOL_ERROR: Disconnect = Disconnect {
    code: 1002,
    reason: Cow::Borrowed("WebSocket protocol error"),
    name: "protocol_error",
};
pub const INVALID_DATA: Disconnect = Disconnect {
    code: 1007,
    reason: Cow::Borrowed("text is not UTF-8"),
    name: "invalid_data",
};
pub const FRAME_TIMEOUT: Disconnect = Disconnect {
    code: 1008,
    reason: Cow::Borrowed("frame not completed in time"),
    name: "frame_timeout",
};
pub const TRY_AGAIN_LATER: Disconnect = Disconnect {
    code: 1013,
    reason: Cow::Borrowed("server busy: try again later"),
    name: "try_again_later",
};
pub const MESSAGE_TOO_BIG: Disconnect = Disconnect {
    code: 1009,
    reason: Cow::Borrowed("frame larger than the size limit"),
    name: "message_too_big",
};
pub const INTERNAL: Disconnect = Disconnect {
    code: 1011,
    reason: Cow::Borrowed("internal error"),
    name: "internal",
};
pub const SLOW_CONSUMER: Disconnect = Disconnect {
    code: 4001,
    reason: Cow::Borrowed("slow consumer"),
    name: "slow_consumer",
};
pub const UNAVAILABLE: Disconnect = Disconnect {
    code: 4003,
    reason: Cow::Borrowed("history unavailable: reconnect and resume"),
    name: "unavailable",
};
pub const TOKEN_EXPIRED: Disconnect = Disconnect {
    code: 4004,
    reason: Cow::Borrowed("token expired"),
    name: "token_expired",
};
pub const HEARTBEAT_TIMEOUT: Disconnect = Disconnect {
    code: 4002,
    reason: Cow::Borrowed("heartbeat timeout"),
    name: "heartbeat_timeout",
};

pub const DISCONNECTED: Disconnect = Disconnect {
    code: 4005,
    reason: Cow::Borrowed("disconnected by the server"),
    name: "server",
};
pub const DISCONNECTED_FOR_GOOD: Disconnect = Disconnect {
    code: 4500,
    reason: Cow::Borrowed("disconnected by the server: do not reconnect"),
    name: "server",
};
pub const BLOCKED: Disconnect = Disconnect {
    code: 4501,
    reason: Cow::Borrowed("user blocked"),
    name: "blocked",
};
pub const TOKEN_REVOKED: Disconnect = Disconnect {
    code: 4502,
    reason: Cow::Borrowed("token revoked"),
    name: "token_revoked",
};
pub const REFRESH_REFUSED: Disconnect = Disconnect {
    code: 4503,
    reason: Cow::Borrowed("refresh refused"),
    name: "refresh_refused",
};

/// Longest reason a close frame carries (125 bytes of payload, less the code's 2).
pub const MAX_REASON: usize = 123;

impl Disconnect {
    /// The app's close (`POST /v1/users/{user}/disconnect`): `code` in 4000–4999, `reason` at
    /// most [`MAX_REASON`] bytes (the caller checks both).
    pub fn app(code: u16, reason: String) -> Disconnect {
        Disconnect {
            code,
            reason: Cow::Owned(reason),
            name: "server",
        }
    }

    /// Whether a client should reconnect after this close.
    pub fn reconnect(&self) -> bool {
        !matches!(self.code, 1000 | 4500..=4999)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_say_whether_to_reconnect() {
        assert!(SLOW_CONSUMER.reconnect());
        assert!(HEARTBEAT_TIMEOUT.reconnect());
        assert!(GOING_AWAY.reconnect());
        assert!(!NORMAL.reconnect());
        assert!(
            !Disconnect {
                code: 4500,
                reason: Cow::Borrowed(""),
                name: "",
            }
            .reconnect()
        );
    }
}
