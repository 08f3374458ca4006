//! The tier's live numbers for operators (`GET /v1/stats`, the `/admin` page): every ws node
//! answers a stats query with a [`NodeStats`] (scatter-gather over NATS, as presence does),
//! and the API adds them up into a [`Stats`].
//!
//! Rates are per second over the node's last [`RATE_WINDOW`] (sampled every second), so two
//! answers a second apart agree and a page polling every few seconds sees smooth figures.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How long an API waits for the nodes' answers: the presence query's bound.
pub const QUERY_TIMEOUT: Duration = crate::presence::QUERY_TIMEOUT;
/// The span rates are computed over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Channels each node reports (its busiest); the API keeps the busiest [`TOP_CHANNELS`].
pub const NODE_TOP_CHANNELS: usize = 50;
pub const TOP_CHANNELS: usize = 20;

/// Counters a ws node keeps since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub events_received: u64,
    pub frames_delivered: u64,
    pub bytes_out: u64,
    pub slow_consumer_disconnects: u64,
}

/// [`Totals`] per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub events_received_per_sec: f64,
    pub frames_delivered_per_sec: f64,
    pub bytes_out_per_sec: f64,
    pub slow_consumer_disconnects_per_sec: f64,
}

/// A channel and its subscribers (on one node, or across the tier).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLoad {
    pub channel: String,
    pub subscribers: usize,
    /// Nodes with a subscriber (in the tier's list only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
}

/// The NATS side of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatsHealth {
    /// `connected`, `disconnected` or `pending` (async-nats's state).
    pub state: String,
    pub stream: String,
    pub stream_ready: bool,
}

/// What one ws node answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub url: String,
    /// `ready`, `not_ready` (NATS, the stream or the canary is not right) or `draining`.
    pub state: String,
    /// Why it is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub started_at: u64,
    pub uptime_secs: u64,
    pub connections: usize,
    pub subscriptions: usize,
    pub channels: usize,
    pub buffered_bytes: usize,
    pub nats: NatsHealth,
    pub totals: Totals,
    pub rates: Rates,
    /// Its busiest channels, at most [`NODE_TOP_CHANNELS`], busiest first.
    pub top_channels: Vec<ChannelLoad>,
}

/// One region's share of the tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionStats {
    pub region: String,
    pub nodes: usize,
    pub connections: usize,
    pub frames_delivered_per_sec: f64,
}

/// The tier as `GET /v1/stats` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Unix milliseconds.
    pub generated_at: u64,
    /// Every node that answered, by id.
    pub nodes: Vec<NodeStats>,
    /// The busiest channels across the nodes (from each node's own busiest), busiest first.
    pub channels: Vec<ChannelLoad>,
    /// Per region (empty with one region).
    pub regions: Vec<RegionStats>,
    pub totals: TierTotals,
    /// The answering API and its view of the stream.
    pub api: ApiStats,
    /// True when a node the API knows of did not answer within [`QUERY_TIMEOUT`], or the API
    /// started too recently to know every node.
    pub partial: bool,
}

/// Sums over the nodes, and the stream's intake.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TierTotals {
    pub nodes: usize,
    pub connections: usize,
    pub subscriptions: usize,
    /// Events stored per second in this region's stream (every API's, not only this one's);
    /// `null` until the API has two samples a second apart.
    pub events_in_per_sec: Option<f64>,
    pub frames_delivered_per_sec: f64,
    pub slow_consumer_disconnects_per_sec: f64,
    pub slow_consumer_disconnects: u64,
}

/// The answering API process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiStats {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub nats: NatsHealth,
    /// The stream's figures, `null` when its info cannot be read now.
    pub stream: Option<StreamStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// A node's samples of its [`Totals`], one a second, for [`Rates`].
#[derive(Debug, Default)]
pub struct Sampler {
    samples: VecDeque<(Instant, Totals)>,
}

impl Sampler {
    /// Records `totals` as of now, forgetting samples older than [`RATE_WINDOW`].
    pub fn sample(&mut self, totals: Totals) {
        self.sample_at(Instant::now(), totals);
    }

    fn sample_at(&mut self, at: Instant, totals: Totals) {
        self.samples.push_back((at, totals));
        while self
            .samples
            .front()
            .is_some_and(|(then, _)| at.duration_since(*then) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Per second from the oldest sample to `now` (zero with no older sample).
    pub fn rates(&self, now: Instant, totals: Totals) -> Rates {
        let Some((then, old)) = self.samples.front() else {
            return Rates::default();
        };
        let secs = now.duration_since(*then).as_secs_f64();
        if secs < 0.5 {
            return Rates::default();
        }
        let per_sec = |new: u64, old: u64| new.saturating_sub(old) as f64 / secs;
        Rates {
            events_received_per_sec: per_sec(totals.events_received, old.events_received),
            frames_delivered_per_sec: per_sec(totals.frames_delivered, old.frames_delivered),
            bytes_out_per_sec: per_sec(totals.bytes_out, old.bytes_out),
            slow_consumer_disconnects_per_sec: per_sec(
                totals.slow_consumer_disconnects,
                old.slow_consumer_disconnects,
            ),
        }
    }
}

/// A node's busiest `limit` channels from `(channel, subscribers)`, busiest first (ties by
/// name). Only those `limit` become strings: a node may have 100,000 channels.
pub fn busiest<C: AsRef<str>>(mut channels: Vec<(C, usize)>, limit: usize) -> Vec<ChannelLoad> {
    let order =
        |a: &(C, usize), b: &(C, usize)| b.1.cmp(&a.1).then_with(|| a.0.as_ref().cmp(b.0.as_ref()));
    if limit == 0 {
        return Vec::new();
    }
    if channels.len() > limit {
        channels.select_nth_unstable_by(limit - 1, order);
        channels.truncate(limit);
    }
    channels.sort_by(order);
    channels
        .into_iter()
        .map(|(channel, subscribers)| ChannelLoad {
            channel: channel.as_ref().to_string(),
            subscribers,
            nodes: None,
        })
        .collect()
}

/// Sorts by subscribers, most first (ties by name), and keeps the first `limit`.
fn busiest_first(loads: &mut Vec<ChannelLoad>, limit: usize) {
    loads.sort_by(|a, b| {
        b.subscribers
            .cmp(&a.subscribers)
            .then_with(|| a.channel.cmp(&b.channel))
    });
    loads.truncate(limit);
}

/// The tier's figures from the nodes' answers (any order).
pub fn aggregate(
    mut nodes: Vec<NodeStats>,
) -> (
    Vec<NodeStats>,
    Vec<ChannelLoad>,
    Vec<RegionStats>,
    TierTotals,
) {
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let mut channels: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut regions: HashMap<&str, RegionStats> = HashMap::new();
    let mut totals = TierTotals {
        nodes: nodes.len(),
        ..TierTotals::default()
    };
    for node in &nodes {
        totals.connections += node.connections;
        totals.subscriptions += node.subscriptions;
        totals.frames_delivered_per_sec += node.rates.frames_delivered_per_sec;
        totals.slow_consumer_disconnects_per_sec += node.rates.slow_consumer_disconnects_per_sec;
        totals.slow_consumer_disconnects += node.totals.slow_consumer_disconnects;
        for load in &node.top_channels {
            let entry = channels.entry(&load.channel).or_default();
            entry.0 += load.subscribers;
            entry.1 += 1;
        }
        if let Some(region) = &node.region {
            let entry = regions.entry(region).or_insert_with(|| RegionStats {
                region: region.clone(),
                nodes: 0,
                connections: 0,
                frames_delivered_per_sec: 0.0,
            });
            entry.nodes += 1;
            entry.connections += node.connections;
            entry.frames_delivered_per_sec += node.rates.frames_delivered_per_sec;
        }
    }
    let mut top: Vec<ChannelLoad> = channels
        .into_iter()
        .map(|(channel, (subscribers, on))| ChannelLoad {
            channel: channel.to_string(),
            subscribers,
            nodes: Some(on),
        })
        .collect();
    busiest_first(&mut top, TOP_CHANNELS);
    let mut regions: Vec<RegionStats> = regions.into_values().collect();
    regions.sort_by(|a, b| a.region.cmp(&b.region));
    (nodes, top, regions, totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_over_the_window() {
        let start = Instant::now();
        let mut sampler = Sampler::default();
        let at = |n: u64| Totals {
            frames_delivered: n,
            ..Totals::default()
        };
        assert_eq!(sampler.rates(start, at(5)), Rates::default());
        sampler.sample_at(start, at(0));
        for s in 1..=20 {
            sampler.sample_at(start + Duration::from_secs(s), at(100 * s));
        }
        let now = start + Duration::from_secs(20);
        // The oldest kept sample is 10 s old: 1,000 frames since.
        assert_eq!(sampler.rates(now, at(2000)).frames_delivered_per_sec, 100.0);
    }

    #[test]
    fn a_node_reports_its_busiest_channels_first() {
        let channels: Vec<(String, usize)> =
            (0..1000).map(|i| (format!("c{i:04}"), i % 7)).collect();
        let top = busiest(channels, 5);
        let names: Vec<&str> = top.iter().map(|c| c.channel.as_str()).collect();
        // Six subscribers: c0006, c0013, ... by name.
        assert_eq!(names, ["c0006", "c0013", "c0020", "c0027", "c0034"]);
        assert!(top.iter().all(|c| c.subscribers == 6));
        assert!(busiest(vec![("a", 1)], 0).is_empty());
        assert_eq!(busiest(vec![("b", 1), ("a", 2)], 5)[0].channel, "a");
    }

    #[test]
    fn the_tier_adds_up_its_nodes() {
        let node = |id: &str, region: &str, conns: usize, channels: &[(&str, usize)]| NodeStats {
            id: id.into(),
            region: Some(region.into()),
            url: String::new(),
            state: "ready".into(),
            reason: None,
            started_at: 0,
            uptime_secs: 1,
            connections: conns,
            subscriptions: channels.iter().map(|(_, n)| n).sum(),
            channels: channels.len(),
            buffered_bytes: 0,
            nats: NatsHealth {
                state: "connected".into(),
                stream: "FANOUT".into(),
                stream_ready: true,
            },
            totals: Totals::default(),
            rates: Rates {
                frames_delivered_per_sec: 10.0,
                ..Rates::default()
            },
            top_channels: busiest(channels.to_vec(), 50),
        };
        let (nodes, channels, regions, totals) = aggregate(vec![
            node("b", "us", 3, &[("maths", 2), ("art", 1)]),
            node("a", "eu", 5, &[("maths", 4)]),
        ]);
        assert_eq!(nodes[0].id, "a");
        assert_eq!(channels[0].channel, "maths");
        assert_eq!((channels[0].subscribers, channels[0].nodes), (6, Some(2)));
        assert_eq!(channels[1].channel, "art");
        assert_eq!(regions.len(), 2);
        assert_eq!((totals.nodes, totals.connections), (2, 8));
        assert_eq!(totals.frames_delivered_per_sec, 20.0);
    }
}
