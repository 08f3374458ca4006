//! The tier's regions, and every NATS subject and stream name, derived in one place from the
//! prefix and the regions (compare centrifugo's `natsbroker`: `prefix.client.<ch>`).

use std::sync::Arc;

use crate::Channel;

/// Subject and stream names, all derived from the prefix and the regions.
///
/// One region (no regions configured): `<prefix>.in.<channel>` into the stream `<PREFIX>`,
/// republished to `<prefix>.out.<channel>`.
///
/// With regions, each region `r` publishes to `<prefix>.in.<r>.<channel>`, captured by its
/// own stream `<PREFIX>_<R>` placed in its cluster, and keeps a mirror of every other region
/// `o`'s stream, `<PREFIX>_<O>_AT_<R>` (a mirror keeps the origin's sequences and subjects).
/// Every stream in region `r`, its own and its mirrors, republishes to
/// `<prefix>.out.<r>.<channel>`, which only `r`'s ws nodes subscribe to: a node gets every
/// region's events from streams in its own region, so live delivery, replay and gap repair
/// all read one local copy, and nothing but the mirrors crosses the gateways (one copy of
/// each event per region, whoever subscribes). The republished copy's `Nats-Stream` header
/// names the stream, and so the event's origin region.
///
/// One value, cheap to clone (an `Arc`): every handle and every subscription holds it.
#[derive(Debug, Clone)]
pub struct Topology(Arc<Shape>);

#[derive(Debug)]
struct Shape {
    prefix: String,
    /// Every region, in the configured order (empty: one region).
    regions: Vec<String>,
    /// The same, as frames carry them.
    names: Vec<Arc<str>>,
    /// This process's region: an index into `regions` (0 with one region).
    own: u8,
}

impl Topology {
    pub fn new(prefix: &str, regions: Vec<String>, own: &str) -> Topology {
        let own = regions.iter().position(|r| r == own).unwrap_or(0) as u8;
        let names = regions.iter().map(|r| Arc::from(r.as_str())).collect();
        Topology(Arc::new(Shape {
            prefix: prefix.to_string(),
            regions,
            names,
            own,
        }))
    }

    /// This process's region (`None` with one region).
    pub fn region(&self) -> Option<&Arc<str>> {
        self.0.names.get(self.0.own as usize)
    }

    /// Every region's name, by index (empty with one region).
    pub fn regions(&self) -> &[Arc<str>] {
        &self.0.names
    }

    /// The index of this process's region (0 with one region).
    pub fn own(&self) -> u8 {
        self.0.own
    }

    /// The index of region `name` (`None`: not one of this tier's).
    pub fn index(&self, name: &str) -> Option<u8> {
        self.0
            .names
            .iter()
            .position(|r| &**r == name)
            .map(|i| i as u8)
    }
    /// `<prefix>.in.` and, with regions, this process's region.
    pub(super) fn inbound_base(&self, region: u8) -> String {
        match self.0.regions.get(region as usize) {
            Some(name) => format!("{}.in.{name}", self.0.prefix),
            None => format!("{}.in", self.0.prefix),
        }
    }
    pub(super) fn inbound(&self, channel: &Channel) -> String {
        self.inbound_in(self.0.own, channel)
    }
    /// Where region `region` publishes `channel`'s events.
    pub(super) fn inbound_in(&self, region: u8, channel: &Channel) -> String {
        // Once per published event: one allocation, no formatting.
        let region = self.0.regions.get(region as usize);
        let mut subject = String::with_capacity(
            self.0.prefix.len() + 5 + region.map_or(0, |r| r.len() + 1) + channel.as_str().len(),
        );
        subject.push_str(&self.0.prefix);
        subject.push_str(".in.");
        if let Some(region) = region {
            subject.push_str(region);
            subject.push('.');
        }
        subject.push_str(channel.as_str());
        subject
    }
    /// Where this process's region's streams republish, and its ws nodes subscribe.
    pub(super) fn outbound_base(&self) -> String {
        self.outbound_base_in(self.0.own)
    }
    fn outbound_base_in(&self, region: u8) -> String {
        match self.0.regions.get(region as usize) {
            Some(name) => format!("{}.out.{name}", self.0.prefix),
            None => format!("{}.out", self.0.prefix),
        }
    }
    pub(super) fn outbound(&self, channel: &Channel) -> String {
        format!("{}.{channel}", self.outbound_base())
    }
    /// Where region `region`'s ws nodes get `channel`'s events (a volatile event is published
    /// to every region's).
    pub(super) fn outbound_in(&self, region: u8, channel: &Channel) -> String {
        format!("{}.{channel}", self.outbound_base_in(region))
    }
    /// What this process's region's stream captures.
    pub(super) fn inbound_all(&self) -> String {
        format!("{}.>", self.inbound_base(self.0.own))
    }
    pub(super) fn outbound_all(&self) -> String {
        format!("{}.>", self.outbound_base())
    }
    /// What region `region`'s stream captures.
    pub(super) fn inbound_all_in(&self, region: u8) -> String {
        format!("{}.>", self.inbound_base(region))
    }
    /// Nobody answers here: a request to it comes back at once as "no responders", which
    /// proves the server has processed everything this connection sent before.
    pub(super) fn sync(&self) -> String {
        format!("{}.sync", self.0.prefix)
    }
    /// ws nodes announce themselves here (core NATS, not stored).
    pub(super) fn nodes(&self) -> String {
        format!("{}.nodes", self.0.prefix)
    }
    /// Presence changes of one channel (core NATS): the frames clients receive.
    pub(super) fn presence(&self, channel: &Channel) -> String {
        format!("{}.presence.{channel}", self.0.prefix)
    }
    /// Presence queries, answered by every ws node (no queue group).
    pub(super) fn presence_query(&self) -> String {
        format!("{}.presence_query", self.0.prefix)
    }
    /// Stats queries (`GET /v1/stats`), answered by every ws node (no queue group).
    pub(super) fn stats_query(&self) -> String {
        format!("{}.stats_query", self.0.prefix)
    }
    /// Server-side control commands (`POST /v1/users/...`), carried out by every ws node (no
    /// queue group).
    pub(super) fn control(&self) -> String {
        format!("{}.control", self.0.prefix)
    }
    /// Lifecycle: the nodes' deltas (and the deciders' checks) into the stream
    /// [`Topology::life_stream`], per region.
    /// One for the whole tier, whatever the regions: the decision is the tier's.
    pub(super) fn life(&self) -> String {
        format!("{}.life", self.0.prefix)
    }
    /// With regions: the region whose cluster holds the lifecycle's streams and buckets (the
    /// first one), which every region reaches through the gateways.
    pub(super) fn life_home(&self) -> Option<&str> {
        self.0.regions.first().map(String::as_str)
    }
    /// The decided lifecycle events, and the batches no receiver took.
    pub(super) fn hooks(&self) -> String {
        format!("{}.events", self.life())
    }
    pub(super) fn hooks_dead(&self) -> String {
        format!("{}.dead", self.life())
    }
    /// Checks waiting for their time (a debounce), apart from the deltas: held back there,
    /// they never hold up the decider.
    pub(super) fn life_checks(&self) -> String {
        format!("{}.checks", self.life())
    }
    /// A lifecycle name (stream or key-value bucket): `<PREFIX>_<what>`, one for the tier.
    pub(super) fn life_name(&self, what: &str) -> String {
        format!("{}_{what}", self.stream_base())
    }
    pub(super) fn stream_base(&self) -> String {
        self.0.prefix.replace('.', "_").to_ascii_uppercase()
    }
    /// This process's region's stream.
    pub fn stream_name(&self) -> String {
        self.origin_stream(self.0.own)
    }
    /// The stream region `region` publishes into.
    pub(super) fn origin_stream(&self, region: u8) -> String {
        match self.0.regions.get(region as usize) {
            Some(name) => format!("{}_{}", self.stream_base(), name.to_ascii_uppercase()),
            None => self.stream_base(),
        }
    }
    /// Where this process reads region `region`'s events: its own stream, or its region's
    /// mirror of another's.
    pub(super) fn local_copy(&self, region: u8) -> String {
        if region == self.0.own {
            return self.origin_stream(region);
        }
        let here = self.0.regions[self.0.own as usize].to_ascii_uppercase();
        format!("{}_AT_{here}", self.origin_stream(region))
    }
    /// Where region `at` keeps region `origin`'s events: `origin`'s stream, or `at`'s mirror
    /// of it.
    pub(super) fn copy_in(&self, origin: u8, at: u8) -> String {
        if origin == at || self.0.regions.is_empty() {
            return self.origin_stream(origin);
        }
        let at = self.0.regions[at as usize].to_ascii_uppercase();
        format!("{}_AT_{at}", self.origin_stream(origin))
    }
    /// How many regions' events a channel has (1 with one region).
    pub fn count(&self) -> u8 {
        self.0.regions.len().max(1) as u8
    }
    /// The region whose events the stream named `stream` holds (this region's own stream or
    /// its mirror of another's; always 0 with one region).
    pub(super) fn region_of_stream(&self, stream: Option<&str>) -> Option<u8> {
        if self.0.regions.is_empty() {
            return Some(0);
        }
        let stream = stream?;
        (0..self.count()).find(|&r| self.local_copy(r) == stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_have_their_own_subjects_and_streams() {
        let s = Topology::new("fanout", vec!["eu".into(), "us".into()], "us");
        let ch = Channel::parse("room").unwrap();
        assert_eq!(s.inbound(&ch), "fanout.in.us.room");
        assert_eq!(s.inbound_in(0, &ch), "fanout.in.eu.room");
        assert_eq!(s.inbound_all(), "fanout.in.us.>");
        assert_eq!(s.outbound(&ch), "fanout.out.us.room");
        assert_eq!(s.outbound_all(), "fanout.out.us.>");
        assert_eq!(s.inbound_all_in(0), "fanout.in.eu.>");
        assert_eq!(s.stream_name(), "FANOUT_US");
        assert_eq!(s.local_copy(0), "FANOUT_EU_AT_US");
        assert_eq!(s.local_copy(1), "FANOUT_US");
        assert_eq!(s.copy_in(0, 1), "FANOUT_EU_AT_US");
        assert_eq!(s.copy_in(1, 0), "FANOUT_US_AT_EU");
        assert_eq!(s.copy_in(1, 1), "FANOUT_US");
        assert_eq!(s.region_of_stream(Some("FANOUT_EU_AT_US")), Some(0));
        assert_eq!(s.region_of_stream(Some("FANOUT_US")), Some(1));
        assert_eq!(s.region_of_stream(Some("FANOUT_EU")), None);
        assert_eq!(s.region_of_stream(None), None);
        let ch = Channel::parse("a").unwrap();
        assert_eq!(s.outbound(&ch), "fanout.out.us.a");
        assert_eq!(s.outbound_in(0, &ch), "fanout.out.eu.a");
        let one = Topology::new("fanout", vec![], "");
        assert_eq!(one.region_of_stream(None), Some(0));
        assert_eq!(one.local_copy(0), "FANOUT");
    }

    #[test]
    fn subjects_come_from_the_prefix() {
        let s = Topology::new("acme.rt", vec![], "");
        let ch = Channel::parse("room:1.a").unwrap();
        assert_eq!(s.inbound(&ch), "acme.rt.in.room:1.a");
        assert_eq!(s.outbound(&ch), "acme.rt.out.room:1.a");
        assert_eq!(s.outbound_in(0, &ch), "acme.rt.out.room:1.a");
        assert_eq!(s.inbound_all(), "acme.rt.in.>");
        assert_eq!(s.outbound_all(), "acme.rt.out.>");
        assert_eq!(s.stream_name(), "ACME_RT");
    }
}
