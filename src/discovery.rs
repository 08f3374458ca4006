//! Live node discovery: ws nodes announce themselves on NATS every [`ANNOUNCE_EVERY`]; the
//! API and the ws nodes keep a [`Directory`] of the nodes heard from within [`FORGET_AFTER`].
//! A node that drains announces that it is leaving and drops out of [`Directory::live`] at
//! once (no new clients), but stays [`Directory::alive`] (its clients are still leaving)
//! until it has not been heard from for [`FORGET_AFTER`]; one that crashes drops out within
//! [`FORGET_AFTER`].
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
    /// The node's region (none with one region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Sent once when the node starts draining.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// Its WebTransport listener, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webtransport: Option<WebTransportInfo>,
}

/// Where a node takes WebTransport sessions, and the certificates a page may pin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WebTransportInfo {
    /// e.g. `https://{host}:8443/wt` (`{host}`: the page's host).
    pub url: String,
    /// SHA-256 of each certificate it may present, lowercase hex, newest first: what
    /// browsers' `serverCertificateHashes` take (as bytes) for a self-signed certificate.
    /// Empty with a certificate from `FANOUT_TLS_CERT` (browsers check it as usual).
    pub cert_hashes: Vec<String>,
}

/// The live nodes, as heard from their announcements.
#[derive(Debug)]
pub struct Directory {
    nodes: Mutex<HashMap<String, (NodeInfo, Instant)>>,
    /// When following began: until every node had a chance to announce itself, the
    /// directory may not know them all.
    since: Instant,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            nodes: Mutex::default(),
            since: Instant::now(),
        }
    }
}

impl Directory {
    pub fn heard(&self, info: NodeInfo) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.insert(info.id.clone(), (info, Instant::now()));
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, (NodeInfo, Instant)>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, (_, seen)| seen.elapsed() < FORGET_AFTER);
        nodes
    }

    /// The nodes heard from within [`FORGET_AFTER`] and not leaving, by id: where new
    /// clients may connect, and who must answer a presence query.
    pub fn live(&self) -> Vec<NodeInfo> {
        let mut live: Vec<NodeInfo> = self
            .nodes()
            .values()
            .filter(|(info, _)| !info.leaving)
            .map(|(info, _)| info.clone())
            .collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        live
    }

    /// Whether node `id` was heard from within [`FORGET_AFTER`], leaving or not: its
    /// clients may still be connected.
    pub fn alive(&self, id: &str) -> bool {
        self.nodes().contains_key(id)
    }

    /// Whether node `id`'s instance that started at `started_at` (unix ms) was heard from
    /// within [`FORGET_AFTER`]: a restart under the same id is another instance.
    pub fn instance_alive(&self, id: &str, started_at: u64) -> bool {
        self.nodes()
            .get(id)
            .is_some_and(|(info, _)| info.started_at == started_at)
    }

    /// True once following has lasted long enough for every running node to have announced
    /// itself at least once.
    pub fn is_complete(&self) -> bool {
        self.since.elapsed() >= ANNOUNCE_EVERY + ANNOUNCE_EVERY / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, leaving: bool) -> NodeInfo {
        NodeInfo {
            webtransport: None,
            id: id.into(),
            url: format!("ws://{id}/ws"),
            connections: 0,
            started_at: 0,
            region: None,
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
        assert!(
            directory.alive("a"),
            "a leaving node's clients are still leaving"
        );
        assert!(!directory.alive("c"));
    }
}
