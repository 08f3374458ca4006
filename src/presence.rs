//! Presence: who is in a channel, across every ws node.
//!
//! Each ws node is the only authority on its own members; nobody keeps a cluster-wide copy
//! that could go stale. A query is one NATS request that every ws node answers with its own
//! members of the channel (in [`CHUNK_BYTES`] parts) or only their count: one round trip
//! whatever the number of members, and count-only answers are a few bytes per node. The asker
//! ([`crate::bus::Rpc::presence`]) knows from the discovery [`crate::discovery::Directory`] which
//! nodes must answer: until all have, the answer is `partial`, never a wrong complete one. A
//! crashed node answers nothing, so its members vanish from answers at once (the answer is
//! partial until discovery forgets the node, within [`crate::discovery::FORGET_AFTER`]).
//!
//! Changes (join, leave, info update) travel on a per-channel subject as a [`Change`], a wire
//! type of their own (never the client frame, so that the client protocol and the nodes'
//! protocol can change apart, and two versions of fanout can run side by side during a
//! rolling upgrade); they are followed only by nodes with a client that asked for them.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Channel;

/// How long a query waits for the nodes' answers before calling its answer partial.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest part of a node's answer, in bytes of members: well under NATS's default 1 MiB
/// `max_payload`, however many members a channel has.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The version of [`Change`] this build speaks. Fields may be added without changing it
/// (readers ignore fields they do not know); a change that older readers would misread gets a
/// new version, and a node drops changes of a version newer than its own.
pub const CHANGE_VERSION: u32 = 1;

/// What happened to a membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    Join,
    Leave,
    /// The member's info changed.
    Update,
}

impl ChangeOp {
    /// The `op` of the client frame that tells watchers.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Join => "join",
            ChangeOp::Leave => "leave",
            ChangeOp::Update => "update",
        }
    }
}

/// One membership change, as ws nodes tell each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    /// [`CHANGE_VERSION`] of the node that sent it.
    pub v: u32,
    pub op: ChangeOp,
    pub channel: String,
    pub user: String,
    pub conn: String,
    pub node: String,
    /// The node's region (none with one region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub info: Option<Box<RawValue>>,
    /// When the member joined the channel, unix milliseconds.
    pub joined_at: u64,
}

/// Why a change from another node was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("not a presence change: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("presence change version {0} is newer than this node's ({CHANGE_VERSION})")]
    Version(u32),
}

impl Change {
    pub fn encode(&self) -> Bytes {
        serde_json::to_vec(self)
            .expect("a presence change serializes")
            .into()
    }

    pub fn decode(bytes: &[u8]) -> Result<Change, ChangeError> {
        let change: Change = serde_json::from_slice(bytes)?;
        if change.v > CHANGE_VERSION {
            return Err(ChangeError::Version(change.v));
        }
        Ok(change)
    }
}

/// A presence question, sent to every ws node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Query {
    pub channel: String,
    #[serde(default)]
    pub count_only: bool,
}

/// One member: a connection in a channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub user: String,
    pub conn: String,
    pub node: String,
    /// The node's region (none with one region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub info: Option<Box<RawValue>>,
    /// When the connection joined the channel, unix milliseconds.
    pub joined_at: u64,
}

/// One message of a node's answer. A node answers in one or more parts; the last says so.
#[derive(Debug, Deserialize)]
pub struct Part {
    pub node: String,
    /// The node's member count (the same in every part).
    pub count: usize,
    #[serde(default)]
    pub members: Vec<Member>,
    pub last: bool,
}

/// Encodes a node's answer: its `count`, and, unless the query was count-only, `members`
/// (anything that serializes like [`Member`]) split in parts of at most [`CHUNK_BYTES`].
pub fn encode_answer<M: Serialize>(node: &str, count: usize, members: &[M]) -> Vec<Bytes> {
    let node = serde_json::to_string(node).expect("a string serializes");
    let part = |members: &[u8], last: bool| {
        let mut out = Vec::with_capacity(members.len() + node.len() + 64);
        out.extend_from_slice(b"{\"node\":");
        out.extend_from_slice(node.as_bytes());
        out.extend_from_slice(
            format!(",\"count\":{count},\"last\":{last},\"members\":[").as_bytes(),
        );
        out.extend_from_slice(members);
        out.extend_from_slice(b"]}");
        Bytes::from(out)
    };
    let mut parts = Vec::new();
    let mut chunk = Vec::new();
    for member in members {
        if chunk.len() >= CHUNK_BYTES {
            parts.push(part(&chunk, false));
            chunk.clear();
        }
        if !chunk.is_empty() {
            chunk.push(b',');
        }
        serde_json::to_writer(&mut chunk, member).expect("a member serializes");
    }
    parts.push(part(&chunk, true));
    parts
}

/// The answer to a presence query.
#[derive(Debug, Serialize)]
pub struct Presence {
    pub channel: Channel,
    /// Connections in the channel, on the nodes that answered.
    pub count: usize,
    /// `None` for a count-only query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    /// True when a node that should have answered did not (in full) within
    /// [`QUERY_TIMEOUT`]: members may be missing.
    pub partial: bool,
    /// The nodes that answered in full.
    #[serde(skip)]
    pub nodes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct M {
        user: String,
    }

    #[test]
    fn answers_are_split_into_bounded_parts() {
        let members: Vec<M> = (0..30_000)
            .map(|i| M {
                user: format!("user-{i:05}"),
            })
            .collect();
        let parts = encode_answer("ws-1", members.len(), &members);
        assert!(parts.len() > 1, "{} parts", parts.len());
        let mut seen = 0;
        for (i, bytes) in parts.iter().enumerate() {
            assert!(bytes.len() < CHUNK_BYTES + 1024);
            let value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(value["node"], "ws-1");
            assert_eq!(value["count"], 30_000);
            assert_eq!(value["last"], i == parts.len() - 1);
            seen += value["members"].as_array().unwrap().len();
        }
        assert_eq!(seen, 30_000);
        let empty = encode_answer::<M>("ws-1", 7, &[]);
        let part: Part = serde_json::from_slice(&empty[0]).unwrap();
        assert_eq!((part.count, part.members.len(), part.last), (7, 0, true));
    }
}
