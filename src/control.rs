//! Server-side control of users and connections, as the API and the ws nodes say it to each
//! other: the commands every ws node carries out on its own connections (a scatter-gather
//! over NATS, as presence and stats queries), what each node answers, and the rules that
//! outlive a command ([`Rule`]: a user's block, a revoked token, a channel's removed history),
//! kept in a JetStream key-value bucket that every node, present and future, follows.
//!
//! The commands are a wire type of their own (never the HTTP bodies), so that the API and
//! the nodes can change apart; readers ignore fields they do not know.
//!
//! It does not decide who may do what: the API checks its requests, the nodes check their
//! connections against the rules.

use serde::{Deserialize, Serialize};

/// How long the API waits for the nodes' answers: the presence query's bound.
pub const QUERY_TIMEOUT: std::time::Duration = crate::presence::QUERY_TIMEOUT;
/// Most connections of one user a node lists in one answer.
pub const MAX_LISTED: usize = 5_000;
/// Most channels `GET /v1/channels` lists.
pub const MAX_CHANNELS: usize = 1_000;

/// One command to every ws node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Close every connection of `user` with `code` and `reason`.
    Disconnect {
        user: String,
        code: u16,
        reason: String,
    },
    /// Subscribe every present connection of `user` to `channel` (a server-side
    /// subscription: the client is told with a `subscribed` frame it did not ask for).
    Subscribe { user: String, channel: String },
    /// Take every connection of `user` out of `channel`.
    Unsubscribe { user: String, channel: String },
    /// List `user`'s connections.
    Connections { user: String },
    /// List the channels with subscribers whose names start with `prefix`: the first
    /// `limit` by name.
    Channels { prefix: String, limit: usize },
    /// A rule takes effect now (it is stored already): close the connections it refuses.
    Apply { rule: Rule },
}

/// A rule the tier keeps until it expires (`until`, unix seconds; none: until lifted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// `user` may not connect; their connections are closed.
    Block {
        user: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
    /// The token with this `jti` is refused on connect and refresh.
    RevokeToken {
        jti: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
    /// `user`'s tokens issued before `issued_before` (unix seconds, their `iat`) are refused.
    RevokeUser {
        user: String,
        issued_before: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
    /// `channel`'s stored events were removed at `at` (unix ms), when each region's stream
    /// had reached `last` (by region index): a resume from before that point is not
    /// recovered.
    Removed {
        channel: String,
        at: u64,
        last: Vec<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
    /// `region` is evacuated (since `at`, unix ms): its ws nodes send their clients to the
    /// other regions and take no new ones, its APIs refuse publishes, until it is lifted.
    Evacuate {
        region: String,
        at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
    },
}

impl Rule {
    /// Its key in the bucket: the kind, and the name it is about in hex (keys allow few
    /// characters; user ids and channel names allow many).
    pub fn key(&self) -> String {
        match self {
            Rule::Block { user, .. } => key("block", user),
            Rule::RevokeToken { jti, .. } => key("jti", jti),
            Rule::RevokeUser { user, .. } => key("user", user),
            Rule::Removed { channel, .. } => key("removed", channel),
            Rule::Evacuate { region, .. } => key("evacuate", region),
        }
    }

    /// When it expires (unix seconds), if ever.
    pub fn until(&self) -> Option<u64> {
        match self {
            Rule::Block { until, .. }
            | Rule::RevokeToken { until, .. }
            | Rule::RevokeUser { until, .. }
            | Rule::Removed { until, .. }
            | Rule::Evacuate { until, .. } => *until,
        }
    }
}

/// A rule's key: `<kind>.<name in hex>`.
pub fn key(kind: &str, name: &str) -> String {
    let mut key = String::with_capacity(kind.len() + 1 + name.len() * 2);
    key.push_str(kind);
    key.push('.');
    for byte in name.as_bytes() {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

/// One connection, as `GET /v1/users/{user}/connections` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub id: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `websocket`, `sse`, `webtransport` or `long_poll`.
    pub transport: String,
    pub channels: Vec<String>,
    /// Unix milliseconds.
    pub connected_since: u64,
}

/// What one ws node answers to a [`Command`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Connections the command reached (closed, subscribed, unsubscribed).
    #[serde(default)]
    pub affected: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<ConnectionInfo>,
    /// Channels and their subscribers on this node, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<(String, usize)>,
    /// The node had more to list than it answered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spell_names_in_hex() {
        let rule = Rule::Block {
            user: "a.b*".into(),
            until: None,
        };
        assert_eq!(rule.key(), "block.612e622a");
    }

    #[test]
    fn commands_are_tagged_json() {
        let command = Command::Apply {
            rule: Rule::RevokeUser {
                user: "u".into(),
                issued_before: 5,
                until: None,
            },
        };
        let json = serde_json::to_string(&command).unwrap();
        assert_eq!(
            json,
            r#"{"op":"apply","rule":{"kind":"revoke_user","user":"u","issued_before":5}}"#
        );
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), command);
    }
}
