//! Live node discovery: ws nodes announce themselves on NATS every [`ANNOUNCE_EVERY`]; the
//! API keeps a [`Directory`] of the nodes heard from within [`FORGET_AFTER`]. A node that
//! drains announces that it is leaving and drops out at once; one that crashes drops out
//! within [`FORGET_AFTER`].
//!
//! The bus carries the announcements; this module defines them and the directory.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How often a ws node announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// A node not heard from for this long is gone: three missed announcements.
pub const FORGET_AFTER: Duration = Duration::from_secs(6);

/// What a ws node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where browsers connect, e.g. `ws://{host}:8081/ws` (`{host}`: the page's host).
    pub url: String,
    pub connections: usize,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Sent once when the node starts draining.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

/// The live nodes, as heard from their announcements.
#[derive(Debug, Default)]
pub struct Directory {
    nodes: Mutex<HashMap<String, (NodeInfo, Instant)>>,
}

impl Directory {
    pub fn heard(&self, info: NodeInfo) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if info.leaving {
            nodes.remove(&info.id);
        } else {
            nodes.insert(info.id.clone(), (info, Instant::now()));
        }
    }

    /// The nodes heard from within [`FORGET_AFTER`], by id.
    pub fn live(&self) -> Vec<NodeInfo> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, (_, seen)| seen.elapsed() < FORGET_AFTER);
        let mut live: Vec<NodeInfo> = nodes.values().map(|(info, _)| info.clone()).collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, leaving: bool) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            url: format!("ws://{id}/ws"),
            connections: 0,
            started_at: 0,
            leaving,
        }
    }

    #[test]
    fn leaving_nodes_drop_out_at_once() {
        let directory = Directory::default();
        directory.heard(node("b", false));
        directory.heard(node("a", false));
        let ids: Vec<String> = directory.live().into_iter().map(|n| n.id).collect();
        assert_eq!(ids, ["a", "b"]);
        directory.heard(node("a", true));
        assert_eq!(directory.live(), [node("b", false)]);
    }
}
