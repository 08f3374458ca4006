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
//! | 4003 | unavailable | the stream's history could not be read to resume the client, or to fill a gap in one of its channels: reconnect and resume |
//! | 4004 | token expired | get a new token (and reconnect with it); send `refresh` before `exp` to avoid this |
//! | 4005 | disconnected | the app's backend closed it (`POST /v1/users/{user}/disconnect` with `"reconnect": true`): reconnect with backoff |
//! | 4000–4499, other | the app's | a code the app's backend chose with `"reconnect": true`: reconnect with backoff |
//! | 4500–4999 | fanout, terminal | not reconnect without changing something |
//! | 4500 | disconnected, do not reconnect | the app's backend closed it (`"reconnect": false`) |
//! | 4501 | blocked | the user is blocked (`POST /v1/users/{user}/block`); connects are refused with HTTP 403 `user_blocked` until it is lifted |
//! | 4502 | token revoked | the connection's token was revoked (`POST /v1/tokens/revoke`): get a new token first |
//! | 4503 | refused | the app's backend refused the connection's refresh (`FANOUT_PROXY_REFRESH_URL`) |
//! | 4500–4999, other | the app's | a code the app's backend chose with `"reconnect": false` |
//!
//! The closes the server decides and after which the client should come back say when (and
//! a drain or an evacuation where): [`Disconnect::directed`], [`Disconnect::close_reason`].

use std::borrow::Cow;

/// A close code with its reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    /// At most [`MAX_REASON`] bytes: it must fit in a WebSocket close frame.
    pub reason: Cow<'static, str>,
    /// Label for `fanout_ws_connections_closed_total{reason}`.
    pub name: &'static str,
    /// When the client should come back, and where: set for the closes the server decides
    /// ([`Disconnect::directed`]), written into the close (see [`Disconnect::close_reason`]).
    pub reconnect: Option<Box<Reconnect>>,
}

/// A server-directed reconnect: how long the client waits (already jittered: it obeys as
/// it is) and, optionally, where it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconnect {
    pub after_ms: u64,
    /// Nodes to go to (their announced URLs, `{host}` standing for the host the client
    /// reached), best first.
    pub nodes: Vec<String>,
    /// Regions to go to (the client picks the nearest of them), when its own is evacuated.
    pub regions: Vec<String>,
}

pub const NORMAL: Disconnect = Disconnect {
    code: 1000,
    reason: Cow::Borrowed("normal closure"),
    name: "normal",
    reconnect: None,
};
pub const GOING_AWAY: Disconnect = Disconnect {
    code: 1001,
    reason: Cow::Borrowed("server shutting down: reconnect elsewhere"),
    name: "shutdown",
    reconnect: None,
};
pub const PROTOCOL_ERROR: Disconnect = Disconnect {
    code: 1002,
    reason: Cow::Borrowed("WebSocket protocol error"),
    name: "protocol_error",
    reconnect: None,
};
pub const INVALID_DATA: Disconnect = Disconnect {
    code: 1007,
    reason: Cow::Borrowed("text is not UTF-8"),
    name: "invalid_data",
    reconnect: None,
};
pub const FRAME_TIMEOUT: Disconnect = Disconnect {
    code: 1008,
    reason: Cow::Borrowed("frame not completed in time"),
    name: "frame_timeout",
    reconnect: None,
};
pub const TRY_AGAIN_LATER: Disconnect = Disconnect {
    code: 1013,
    reason: Cow::Borrowed("server busy: try again later"),
    name: "try_again_later",
    reconnect: None,
};
pub const MESSAGE_TOO_BIG: Disconnect = Disconnect {
    code: 1009,
    reason: Cow::Borrowed("frame larger than the size limit"),
    name: "message_too_big",
    reconnect: None,
};
pub const INTERNAL: Disconnect = Disconnect {
    code: 1011,
    reason: Cow::Borrowed("internal error"),
    name: "internal",
    reconnect: None,
};
pub const SLOW_CONSUMER: Disconnect = Disconnect {
    code: 4001,
    reason: Cow::Borrowed("slow consumer"),
    name: "slow_consumer",
    reconnect: None,
};
pub const UNAVAILABLE: Disconnect = Disconnect {
    code: 4003,
    reason: Cow::Borrowed("history unavailable: reconnect and resume"),
    name: "unavailable",
    reconnect: None,
};
pub const TOKEN_EXPIRED: Disconnect = Disconnect {
    code: 4004,
    reason: Cow::Borrowed("token expired"),
    name: "token_expired",
    reconnect: None,
};
pub const HEARTBEAT_TIMEOUT: Disconnect = Disconnect {
    code: 4002,
    reason: Cow::Borrowed("heartbeat timeout"),
    name: "heartbeat_timeout",
    reconnect: None,
};

pub const DISCONNECTED: Disconnect = Disconnect {
    code: 4005,
    reason: Cow::Borrowed("disconnected by the server"),
    name: "server",
    reconnect: None,
};
pub const DISCONNECTED_FOR_GOOD: Disconnect = Disconnect {
    code: 4500,
    reason: Cow::Borrowed("disconnected by the server: do not reconnect"),
    name: "server",
    reconnect: None,
};
pub const BLOCKED: Disconnect = Disconnect {
    code: 4501,
    reason: Cow::Borrowed("user blocked"),
    name: "blocked",
    reconnect: None,
};
pub const TOKEN_REVOKED: Disconnect = Disconnect {
    code: 4502,
    reason: Cow::Borrowed("token revoked"),
    name: "token_revoked",
    reconnect: None,
};
pub const REFRESH_REFUSED: Disconnect = Disconnect {
    code: 4503,
    reason: Cow::Borrowed("refresh refused"),
    name: "refresh_refused",
    reconnect: None,
};

fn directed_json(reason: &str, reconnect: &Reconnect) -> serde_json::Value {
    let mut json = serde_json::json!({"reason": reason, "reconnect_after_ms": reconnect.after_ms});
    if !reconnect.nodes.is_empty() {
        json["nodes"] = reconnect.nodes.clone().into();
    }
    if !reconnect.regions.is_empty() {
        json["regions"] = reconnect.regions.clone().into();
    }
    json
}

/// A random number of milliseconds in `low..high`.
pub fn jitter(low: u64, high: u64) -> u64 {
    let random = uuid::Uuid::new_v4().as_u64_pair().0;
    low + random % (high - low).max(1)
}

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
            reconnect: None,
        }
    }

    /// This close told to come back after `after_ms`, to `nodes` or `regions` if any.
    pub fn directing(mut self, after_ms: u64, nodes: Vec<String>, regions: Vec<String>) -> Self {
        self.reconnect = Some(Box::new(Reconnect {
            after_ms,
            nodes,
            regions,
        }));
        self
    }

    /// A close the server decided (a kick, overload, the node going away), with a jittered
    /// `reconnect_after_ms` unless it already has one; the others (the client's faults, an
    /// expired token, closes that say not to reconnect) as they are.
    ///
    /// The waits, so that clients closed together do not come back together: going away and
    /// the app's closes 0–1 s; a slow consumer 0.5–2.5 s; the node overloaded or its history
    /// unavailable, or an internal error, 1–5 s.
    pub fn directed(self) -> Disconnect {
        if self.reconnect.is_some() || !self.reconnect() {
            return self;
        }
        let (low, high) = match (self.name, self.code) {
            // The app's closes (4005 or its own code) and the node going away.
            ("server", _) | (_, 1001) => (0, 1_000),
            (_, 4001) => (500, 2_500),
            (_, 1011 | 1013 | 4003) => (1_000, 5_000),
            // The client's faults (1002, 1007–1009, 4002) and an expired token (4004).
            _ => return self,
        };
        let after = jitter(low, high);
        self.directing(after, Vec::new(), Vec::new())
    }

    /// The reason a close frame carries: the text, or with a directed reconnect JSON
    /// (`{"reason", "reconnect_after_ms", "nodes"?, "regions"?}`) within [`MAX_REASON`]
    /// bytes: the last nodes (or regions) are left out, then the text shortened, to fit.
    pub fn close_reason(&self) -> Cow<'_, str> {
        let Some(reconnect) = &self.reconnect else {
            return Cow::Borrowed(&self.reason);
        };
        let mut reconnect = (**reconnect).clone();
        let mut text: &str = &self.reason;
        loop {
            let json = directed_json(text, &reconnect).to_string();
            if json.len() <= MAX_REASON {
                return Cow::Owned(json);
            }
            if reconnect.nodes.pop().is_none() && reconnect.regions.pop().is_none() {
                if text.is_empty() {
                    // Not even the wait fits: never, with a u64 (at most 20 digits).
                    return Cow::Owned(String::new());
                }
                let mut end = text.len() - 1;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text = &text[..end];
            }
        }
    }

    /// How SSE's `disconnect` event and a poll's `disconnect` say it:
    /// `{"code", "reason", "reconnect_after_ms"?, "nodes"?, "regions"?}`.
    pub fn json(&self) -> serde_json::Value {
        let mut json = match &self.reconnect {
            Some(reconnect) => directed_json(&self.reason, reconnect),
            None => serde_json::json!({"reason": self.reason}),
        };
        json["code"] = self.code.into();
        json
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
    fn directed_closes_say_when_and_where_within_a_close_frame() {
        // The client's faults and terminal closes are not directed.
        assert_eq!(PROTOCOL_ERROR.directed().reconnect, None);
        assert_eq!(DISCONNECTED_FOR_GOOD.directed().reconnect, None);
        assert_eq!(TOKEN_EXPIRED.directed().close_reason(), "token expired");
        let overload = TRY_AGAIN_LATER.directed();
        let after = overload.reconnect.as_ref().unwrap().after_ms;
        assert!((1_000..5_000).contains(&after), "{after}");
        let reason: serde_json::Value = serde_json::from_str(&overload.close_reason()).unwrap();
        assert_eq!(reason["reconnect_after_ms"], after);
        assert_eq!(reason["reason"], "server busy: try again later");

        // Too many nodes for 123 bytes: the last are left out, the rest kept.
        let nodes: Vec<String> = (0..9).map(|i| format!("ws://{{host}}:808{i}/ws")).collect();
        let drain = GOING_AWAY.directing(1234, nodes, Vec::new());
        let reason = drain.close_reason();
        assert!(reason.len() <= MAX_REASON, "{reason}");
        let reason: serde_json::Value = serde_json::from_str(&reason).unwrap();
        assert_eq!(reason["nodes"][0], "ws://{host}:8080/ws");
        assert_eq!(reason["reconnect_after_ms"], 1234);
        // SSE's event has no such bound: everything, with the code.
        let json = drain.json();
        assert_eq!(json["nodes"].as_array().unwrap().len(), 9);
        assert_eq!(json["code"], 1001);

        // An app's long reason is shortened (on a character boundary) to fit.
        let long = Disconnect::app(4010, "é".repeat(61)).directed();
        let reason = long.close_reason();
        assert!(reason.len() <= MAX_REASON);
        let reason: serde_json::Value = serde_json::from_str(&reason).unwrap();
        assert!(reason["reconnect_after_ms"].as_u64().unwrap() < 1_000);
    }

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
                reconnect: None,
            }
            .reconnect()
        );
    }
}
