//! How a node sends its clients away (a shutdown's drain, a region's evacuation) without a
//! storm: when each client is closed, when it is told to come back, and where.
//!
//! The closes are spread over `FANOUT_DRAIN_WINDOW_MS`, so the node's exit stays within its
//! grace period whatever it holds. The arrivals elsewhere are spread over
//! `max(window, clients / FANOUT_DRAIN_RATE)`: a node with more clients than the window
//! carries at the drain rate tells each one (`reconnect_after_ms`, already jittered) to wait
//! for its turn, so the nodes that take them see at most `FANOUT_DRAIN_RATE` connects (and
//! resumes) a second from it. A client that waits misses nothing: it resumes from its
//! position.
//!
//! Each client is sent to the live node of its region holding the fewest connections,
//! counting the ones sent there already, instead of every client of the node trying the same
//! next URL of its list; but no node takes more than twice its even share of the drain's
//! clients: a node that just restarted (empty) would otherwise take them all, and every one's
//! resume (read from the stream: it holds no channel yet) with them. In an evacuation, the
//! clients go to the other regions (the client picks the nearest).

use std::{cmp::Reverse, collections::BinaryHeap, time::Duration};

use fanout::discovery::NodeInfo;

use crate::disconnect::{self, Disconnect};

/// The longest jitter within a client's turn: clients closed together do not come back
/// together, and one client alone does not wait long for nothing.
const MAX_JITTER_MS: u64 = 500;

/// When each of `clients` is closed and told to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    clients: u64,
    /// The closes are spread over this (milliseconds).
    window: u64,
    /// The arrivals are spread over this (milliseconds), at least `window`.
    arrivals: u64,
}

impl Plan {
    /// `clients` closed over `window`, arriving elsewhere at most `rate` a second.
    pub fn new(clients: usize, window: Duration, rate: u64) -> Plan {
        let clients = clients as u64;
        let window = window.as_millis() as u64;
        let arrivals = window.max(clients.saturating_mul(1000) / rate.max(1));
        Plan {
            clients,
            window,
            arrivals,
        }
    }

    /// How long after the start client `i` is closed.
    pub fn close_at(&self, i: usize) -> Duration {
        Duration::from_millis(self.window * i as u64 / self.clients.max(1))
    }

    /// How long client `i` waits before it reconnects: the rest of the way to its turn among
    /// the arrivals, plus a jitter within its turn.
    pub fn wait(&self, i: usize) -> u64 {
        let n = self.clients.max(1);
        let i = i as u64;
        let behind = (self.arrivals - self.window) * i / n;
        let turn = (self.arrivals / n).clamp(1, MAX_JITTER_MS);
        behind + disconnect::jitter(0, turn)
    }

    /// How long the arrivals take (milliseconds).
    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }
}

/// Where a drain sends its clients: the nodes of its region, fewest connections first.
#[derive(Debug, Default)]
pub struct Targets {
    /// (connections, counting those sent, its order, its URL, how many sent), the fewest on
    /// top.
    heap: BinaryHeap<Reverse<(usize, usize, String, usize)>>,
    /// The most clients of this drain one node takes: twice its even share.
    cap: usize,
    /// The nodes that took their cap, for when every node has.
    full: Vec<Reverse<(usize, usize, String, usize)>>,
}

impl Targets {
    /// The nodes of `live` that the `clients` of node `me` (in `region`) may go to: live,
    /// not leaving, in its region.
    pub fn new(live: Vec<NodeInfo>, me: &str, region: Option<&str>, clients: usize) -> Targets {
        let heap: BinaryHeap<_> = live
            .into_iter()
            .filter(|node| node.id != me && !node.leaving && node.region.as_deref() == region)
            .enumerate()
            .map(|(order, node)| Reverse((node.connections, order, node.url, 0)))
            .collect();
        let cap = (2 * clients).div_ceil(heap.len().max(1)).max(1);
        Targets {
            heap,
            cap,
            full: Vec::new(),
        }
    }

    /// The node the next client goes to (counted as one more there), if there is one.
    pub fn take(&mut self) -> Option<String> {
        if self.heap.is_empty() {
            // (Never with `clients` right: the caps add up to twice as many.)
            self.heap.extend(self.full.drain(..));
        }
        let Reverse((connections, order, url, sent)) = self.heap.pop()?;
        let next = Reverse((connections + 1, order, url.clone(), sent + 1));
        match sent + 1 >= self.cap {
            true => self.full.push(next),
            false => self.heap.push(next),
        }
        Some(url)
    }
}

/// The close of client `i` of a drain: 1001, when to come back and where.
pub fn going_away(plan: &Plan, i: usize, targets: &mut Targets) -> Disconnect {
    let nodes = targets.take().into_iter().collect();
    disconnect::GOING_AWAY.directing(plan.wait(i), nodes, Vec::new())
}

/// The close of client `i` of an evacuation: 1001 towards `regions`.
pub fn evacuated(plan: &Plan, i: usize, regions: &[String]) -> Disconnect {
    Disconnect {
        reason: "region evacuated: reconnect to another region".into(),
        name: "evacuated",
        ..disconnect::GOING_AWAY
    }
    .directing(plan.wait(i), Vec::new(), regions.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_nodes_close_over_the_window_and_large_ones_spread_the_arrivals() {
        let small = Plan::new(100, Duration::from_secs(3), 2000);
        assert_eq!(small.arrivals(), 3000);
        assert_eq!(small.close_at(50), Duration::from_millis(1500));
        // Within the client's turn (30 ms): no wait beyond it.
        assert!((0..30).contains(&small.wait(50)));

        // 100,000 clients at 2,000/s: closed within 3 s, arriving over 50 s.
        let large = Plan::new(100_000, Duration::from_secs(3), 2000);
        assert_eq!(large.arrivals(), 50_000);
        assert_eq!(large.close_at(99_999), Duration::from_millis(2999));
        let last = large.wait(99_999);
        assert!((46_900..47_000).contains(&last), "{last}");
        assert_eq!(large.wait(0), 0);

        // One client: it is told to come back within half a second.
        assert!(Plan::new(1, Duration::from_secs(3), 2000).wait(0) < 500);
        // No window: everyone at once, arrivals still at the rate.
        let now = Plan::new(10_000, Duration::ZERO, 2000);
        assert_eq!(now.close_at(9_999), Duration::ZERO);
        assert!(now.wait(9_999) >= 4_999);
    }

    fn node(id: &str, connections: usize, region: Option<&str>, leaving: bool) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            url: format!("ws://{{host}}/{id}"),
            connections,
            started_at: 0,
            region: region.map(Into::into),
            leaving,
            webtransport: None,
        }
    }

    #[test]
    fn clients_go_to_the_emptiest_nodes_of_the_region() {
        let live = vec![
            node("me", 100, None, false),
            node("a", 10, None, false),
            node("b", 13, None, false),
            node("gone", 0, None, true),
            node("far", 0, Some("us"), false),
        ];
        let mut targets = Targets::new(live.clone(), "me", None, 7);
        let sent: Vec<String> = (0..7).map(|_| targets.take().unwrap()).collect();
        let to = |sent: &[String], id: &str| sent.iter().filter(|url| url.ends_with(id)).count();
        // a fills up to b's 13, then they take turns: 10+5 and 13+2.
        assert_eq!((to(&sent, "/a"), to(&sent, "/b")), (5, 2));
        assert_eq!(Targets::new(vec![], "me", None, 1).take(), None);

        // A just-restarted node (empty) beside full ones takes at most twice its even share
        // of a large drain, not all of it.
        let live = vec![
            node("a", 10_000, None, false),
            node("b", 13_000, None, false),
            node("new", 0, None, false),
        ];
        let mut targets = Targets::new(live, "me", None, 3000);
        let sent: Vec<String> = (0..3000).map(|_| targets.take().unwrap()).collect();
        assert_eq!(to(&sent, "/new"), 2000);
        assert_eq!(to(&sent, "/a") + to(&sent, "/b"), 1000);
    }
}
