//! Lifecycle events, decided once for the tier: a channel occupied or vacated, a member added
//! or removed, a client's event. Pure types and the decision itself; the bus moves them.
//!
//! How the tier agrees who is first and last, on NATS alone:
//!
//! 1. Each ws node reports its own transitions as [`Delta`]s into a JetStream stream, in
//!    order: the channel's first and last local subscriber (`sub` / `unsub`), a user's first and
//!    last local connection in it (`join` / `leave`), a client's publish (`client_event`). A
//!    node speaks only for itself (its instance: id and start time), so no two writers ever
//!    race on one fact.
//! 2. One consumer of that stream, shared by every API process and holding one message at a
//!    time, folds each delta into the channel's [`State`] (a JetStream key-value entry, written
//!    with the revision it read: compare-and-set) and records what follows from it as
//!    [`Event`]s in a second stream, each with a stable id (the channel and the event's `seq`
//!    there), which JetStream de-duplicates if the fold is repeated after a crash.
//!
//! With regions, the streams and buckets live in the first region's cluster and every
//! region's nodes and API processes reach them through the gateways: one decision for the
//! tier. A region cut off from it keeps its nodes' reports (each node retries in order) and
//! they are decided when it is back; its nodes are not taken for dead meanwhile (the sweep
//! skips the instances of a region whose stream this region cannot reach).
//! 3. A vacated channel or a removed member waits `FANOUT_WEBHOOK_DEBOUNCE_MS`: the fold
//!    records when it is due and schedules a `check` in a stream of its own, whose consumer
//!    (many messages at a time) holds it back with a delayed negative acknowledgement and then
//!    reports it to the decider, which is never held up. A join before it cancels the pending
//!    removal: a move between nodes, or a reconnect, emits nothing.
//! 4. A node that dies (kill -9) stops announcing itself; once discovery forgets it, an API
//!    process reports `node_gone` for its instance, and the fold removes everything that
//!    instance held, exactly once (the report is de-duplicated by the instance, and the fold is
//!    serial).
//!
//! Neither a broker nor a consensus of fanout's own: JetStream orders, stores and
//! de-duplicates; the key-value store's revisions make every write conditional.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a node reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Delta {
    /// The node's first subscriber of `channel`.
    Sub { channel: String, node: String },
    /// The node's last subscriber of `channel` left.
    Unsub { channel: String, node: String },
    /// `user`'s first (visible) connection in `channel` on the node.
    Join {
        channel: String,
        node: String,
        user: String,
    },
    /// `user`'s last connection in `channel` on the node left.
    Leave {
        channel: String,
        node: String,
        user: String,
    },
    /// A client's publish on a channel that `FANOUT_WEBHOOK_CLIENT_EVENTS` names.
    ClientEvent {
        channel: String,
        node: String,
        user: String,
        /// Its data (bytes: a base64 string). A `Value`: a raw one cannot sit in a tagged enum.
        data: Value,
    },
    /// Pending removals of `channel` may be due (a debounce ended).
    Check { channel: String },
    /// Node instance `node` is gone (discovery forgot it): what it held is released.
    NodeGone { node: String },
}

impl Delta {
    /// The channel it concerns (none for `node_gone`).
    pub fn channel(&self) -> Option<&str> {
        match self {
            Delta::Sub { channel, .. }
            | Delta::Unsub { channel, .. }
            | Delta::Join { channel, .. }
            | Delta::Leave { channel, .. }
            | Delta::ClientEvent { channel, .. }
            | Delta::Check { channel } => Some(channel),
            Delta::NodeGone { .. } => None,
        }
    }
}

/// What a lifecycle event is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Name {
    ChannelOccupied,
    ChannelVacated,
    MemberAdded,
    MemberRemoved,
    ClientEvent,
}

/// One lifecycle event, as webhooks carry it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Stable across retries and replays.
    pub id: String,
    pub name: Name,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    pub time_ms: u64,
    /// Per channel: 1, 2, 3, ...
    pub seq: u64,
}

/// What the tier knows of one channel, kept between deltas.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// Node instances with a subscriber.
    #[serde(default)]
    pub nodes: BTreeSet<String>,
    /// Each member's node instances.
    #[serde(default)]
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// `channel_occupied` was said, `channel_vacated` not since.
    #[serde(default)]
    pub occupied: bool,
    /// Users `member_added` was said of, without `member_removed` since.
    #[serde(default)]
    pub members: BTreeSet<String>,
    /// When `channel_vacated` is due (unix ms), if the channel is empty and occupied.
    #[serde(default)]
    pub vacate_at: Option<u64>,
    /// When each absent member's `member_removed` is due.
    #[serde(default)]
    pub remove_at: BTreeMap<String, u64>,
    /// The last event's `seq`.
    #[serde(default)]
    pub seq: u64,
}

/// What folding a delta into a channel's state decided.
#[derive(Debug, Default)]
pub struct Decision {
    /// The events, in order (without id, seq or time: [`State::stamp`] adds them).
    pub events: Vec<(Name, Option<String>, Option<Value>)>,
    /// The earliest pending removal, if any is left: when to check again.
    pub next_check: Option<u64>,
}

impl State {
    /// Whether nothing is left to remember: no subscriber, nothing said, nothing pending.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.users.is_empty()
            && !self.occupied
            && self.members.is_empty()
            && self.vacate_at.is_none()
            && self.remove_at.is_empty()
    }

    /// Folds `delta` in at `now` (unix ms), with removals `debounce` ms after the last leave.
    pub fn apply(&mut self, delta: &Delta, now: u64, debounce: u64) -> Decision {
        let mut decision = Decision::default();
        match delta {
            Delta::Sub { node, .. } => {
                self.nodes.insert(node.clone());
                self.vacate_at = None;
                if !self.occupied {
                    self.occupied = true;
                    decision.events.push((Name::ChannelOccupied, None, None));
                }
            }
            Delta::Unsub { node, .. } => {
                self.nodes.remove(node);
                self.settle_channel(now, debounce);
            }
            Delta::Join { node, user, .. } => {
                self.users
                    .entry(user.clone())
                    .or_default()
                    .insert(node.clone());
                self.remove_at.remove(user);
                if self.members.insert(user.clone()) {
                    decision
                        .events
                        .push((Name::MemberAdded, Some(user.clone()), None));
                }
            }
            Delta::Leave { node, user, .. } => {
                self.leave(user, node);
                self.settle_user(user, now, debounce);
            }
            Delta::ClientEvent { user, data, .. } => {
                decision
                    .events
                    .push((Name::ClientEvent, Some(user.clone()), Some(data.clone())));
            }
            Delta::NodeGone { node } => {
                self.nodes.remove(node);
                let users: Vec<String> = self.users.keys().cloned().collect();
                for user in users {
                    self.leave(&user, node);
                    self.settle_user(&user, now, debounce);
                }
                self.settle_channel(now, debounce);
            }
            Delta::Check { .. } => {}
        }
        self.due(now, &mut decision);
        decision
    }

    fn leave(&mut self, user: &str, node: &str) {
        if let Some(nodes) = self.users.get_mut(user) {
            nodes.remove(node);
            if nodes.is_empty() {
                self.users.remove(user);
            }
        }
    }

    /// An empty, occupied channel's vacating becomes due.
    fn settle_channel(&mut self, now: u64, debounce: u64) {
        if self.nodes.is_empty() && self.occupied && self.vacate_at.is_none() {
            self.vacate_at = Some(now + debounce);
        }
    }

    /// An absent member's removal becomes due.
    fn settle_user(&mut self, user: &str, now: u64, debounce: u64) {
        if !self.users.contains_key(user) && self.members.contains(user) {
            self.remove_at
                .entry(user.to_string())
                .or_insert(now + debounce);
        }
    }

    /// Says what is due at `now` (members first, then the channel), and when to look again.
    fn due(&mut self, now: u64, decision: &mut Decision) {
        let due: Vec<String> = self
            .remove_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(user, _)| user.clone())
            .collect();
        for user in due {
            self.remove_at.remove(&user);
            if self.members.remove(&user) {
                decision
                    .events
                    .push((Name::MemberRemoved, Some(user), None));
            }
        }
        if let Some(at) = self.vacate_at
            && at <= now
        {
            self.vacate_at = None;
            if self.nodes.is_empty() && self.occupied {
                self.occupied = false;
                decision.events.push((Name::ChannelVacated, None, None));
            }
        }
        decision.next_check = self.remove_at.values().copied().chain(self.vacate_at).min();
    }

    /// `decision`'s events as they are recorded: each with the channel's next `seq`, its id
    /// (`<channel>:<seq>`: a fold repeated after a crash, by any API process, from the state it
    /// read, makes the same ids, which JetStream then drops), and the time.
    pub fn stamp(&mut self, decision: Decision, channel: &str, now: u64) -> Vec<Event> {
        decision
            .events
            .into_iter()
            .map(|(name, user, data)| {
                self.seq += 1;
                Event {
                    id: format!("{channel}:{}", self.seq),
                    name,
                    channel: channel.to_string(),
                    user,
                    data,
                    time_ms: now,
                    seq: self.seq,
                }
            })
            .collect()
    }
}

/// Whether `channel` matches one of `patterns` (`*` matches any run of characters; an empty
/// list matches nothing).
pub fn matches(patterns: &[String], channel: &str) -> bool {
    patterns
        .iter()
        .any(|p| glob(p.as_bytes(), channel.as_bytes()))
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|i| glob(rest, &text[i..])),
        Some((c, rest)) => text.first() == Some(c) && glob(rest, &text[1..]),
    }
}

/// The `X-Fanout-Signature` header for `body` sent at `t` (unix seconds): `t=<t>,v1=<hex>`,
/// one `v1` per secret (HMAC-SHA256 of `"<t>.<body>"`).
pub fn signature(secrets: &[String], t: u64, body: &[u8]) -> String {
    let mut header = format!("t={t}");
    for secret in secrets {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut mac = ring::hmac::Context::with_key(&key);
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        header.push_str(",v1=");
        for byte in mac.sign().as_ref() {
            header.push_str(&format!("{byte:02x}"));
        }
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(node: &str) -> Delta {
        Delta::Sub {
            channel: "c".into(),
            node: node.into(),
        }
    }
    fn unsub(node: &str) -> Delta {
        Delta::Unsub {
            channel: "c".into(),
            node: node.into(),
        }
    }
    fn join(node: &str, user: &str) -> Delta {
        Delta::Join {
            channel: "c".into(),
            node: node.into(),
            user: user.into(),
        }
    }
    fn leave(node: &str, user: &str) -> Delta {
        Delta::Leave {
            channel: "c".into(),
            node: node.into(),
            user: user.into(),
        }
    }
    fn names(d: &Decision) -> Vec<Name> {
        d.events.iter().map(|(n, _, _)| *n).collect()
    }

    #[test]
    fn occupied_once_vacated_once_whatever_the_order_across_nodes() {
        let mut s = State::default();
        assert_eq!(names(&s.apply(&sub("a"), 0, 0)), [Name::ChannelOccupied]);
        assert_eq!(names(&s.apply(&sub("b"), 1, 0)), []);
        assert_eq!(names(&s.apply(&unsub("a"), 2, 0)), []);
        assert_eq!(names(&s.apply(&sub("c"), 3, 0)), []);
        assert_eq!(names(&s.apply(&unsub("c"), 4, 0)), []);
        assert_eq!(names(&s.apply(&unsub("b"), 5, 0)), [Name::ChannelVacated]);
        assert!(s.is_empty());
    }

    #[test]
    fn a_move_within_the_debounce_says_nothing_beyond_it_says_both() {
        let mut s = State::default();
        s.apply(&sub("a"), 0, 3000);
        s.apply(&join("a", "ada"), 0, 3000);
        let d = s.apply(&leave("a", "ada"), 100, 3000);
        assert_eq!(d.next_check, Some(3100));
        s.apply(&unsub("a"), 100, 3000);
        s.apply(&sub("b"), 900, 3000);
        assert_eq!(names(&s.apply(&join("b", "ada"), 900, 3000)), []);
        assert_eq!(
            names(&s.apply(
                &Delta::Check {
                    channel: "c".into()
                },
                3100,
                3000
            )),
            []
        );
        // Gone for good: removed, then vacated, once the debounce ends.
        s.apply(&leave("b", "ada"), 4000, 3000);
        let d = s.apply(&unsub("b"), 4000, 3000);
        assert_eq!(names(&d), []);
        assert_eq!(d.next_check, Some(7000));
        let d = s.apply(
            &Delta::Check {
                channel: "c".into(),
            },
            7000,
            3000,
        );
        assert_eq!(names(&d), [Name::MemberRemoved, Name::ChannelVacated]);
        assert_eq!(d.next_check, None);
        assert!(s.is_empty());
    }

    #[test]
    fn two_devices_one_member_and_a_dead_node_releases_everything_once() {
        let mut s = State::default();
        s.apply(&sub("a"), 0, 0);
        s.apply(&sub("b"), 0, 0);
        assert_eq!(
            names(&s.apply(&join("a", "ada"), 0, 0)),
            [Name::MemberAdded]
        );
        assert_eq!(names(&s.apply(&join("b", "ada"), 0, 0)), []);
        assert_eq!(names(&s.apply(&leave("a", "ada"), 1, 0)), []);
        s.apply(&unsub("a"), 1, 0);
        let gone = Delta::NodeGone { node: "b".into() };
        assert_eq!(
            names(&s.apply(&gone, 2, 0)),
            [Name::MemberRemoved, Name::ChannelVacated]
        );
        assert_eq!(
            names(&s.apply(&gone, 3, 0)),
            [],
            "a second report changes nothing"
        );
        let decision = s.apply(&sub("c"), 4, 0);
        let events = s.stamp(decision, "c", 4);
        assert_eq!(events[0].id, "c:1");
        assert_eq!(events[0].seq, 1);
    }

    #[test]
    fn patterns_and_signatures() {
        let patterns = vec!["chat.*".to_string(), "exact".to_string()];
        assert!(matches(&patterns, "chat.room1"));
        assert!(matches(&patterns, "exact"));
        assert!(!matches(&patterns, "exactly"));
        assert!(!matches(&[], "chat.room1"));
        // RFC 4231 test case 2 shape: HMAC-SHA256("Jefe", "what do ya want for nothing?")
        // over "<t>.<body>" with t = 0 is checked against Python's hmac in the webhook test;
        // here: one v1 per secret.
        let header = signature(&["a".into(), "b".into()], 1700000000, b"{}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(header.matches(",v1=").count(), 2);
    }
}
