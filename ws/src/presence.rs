//! Presence on a ws node: publishing its members' changes, answering queries about them, and
//! following other nodes' changes for the local clients that asked.
//!
//! - [`publish_changes`] turns the hub's [`Membership`] reports into `join` / `leave` /
//!   `update` frames on NATS, in order. A node that shuts down reports a `leave` as each
//!   client goes.
//! - [`answer`] answers presence queries from the hub: this node's members of a channel, or
//!   their count (one map lookup).
//! - [`watch`] follows one channel's changes while a local client asked for them, and keeps a
//!   [`Replica`] of the channel's members on other nodes, seeded by a query. It is what makes
//!   crashed nodes' members leave: when discovery forgets a node, the watcher tells its own
//!   clients that the node's members left. Every watching node does so for its own clients,
//!   so nobody needs to speak for the dead node. Bound: [`FORGET_AFTER`] after the node's last
//!   announcement plus one [`SWEEP_EVERY`], at most 7 s after a crash.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use fanout::{
    Bus, Channel,
    discovery::{Directory, FORGET_AFTER},
    presence::{self, Change, ChangeOp, Member, Presence},
};
use metrics::counter;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::{
    hub::{Hub, LocalMember, Membership},
    position::channel_key,
    protocol::{self, PresenceChange},
    sink::{Outgoing, Recipients, offer_all},
};

/// How often a watcher looks for members of nodes discovery has forgotten.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Publishes the hub's membership changes until the hub is gone.
pub async fn publish_changes(
    bus: Bus,
    node: Arc<str>,
    mut changes: mpsc::UnboundedReceiver<Membership>,
) {
    let published = counter!("fanout_ws_presence_changes_total");
    while let Some(membership) = changes.recv().await {
        match membership {
            Membership::Changed {
                change,
                channel,
                conn,
                profile,
                joined_at,
            } => {
                let change = presence::Change {
                    v: presence::CHANGE_VERSION,
                    op: change,
                    channel: channel.to_string(),
                    user: profile.user.to_string(),
                    conn: conn.to_string(),
                    node: node.to_string(),
                    region: bus.topology().region().map(|r| r.to_string()),
                    info: profile.info.clone(),
                    joined_at,
                };
                bus.rpc().publish_presence(&channel, &change).await;
                published.increment(1);
            }
            Membership::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// A local member as a presence answer lists it.
#[derive(Serialize)]
struct Listed<'a> {
    user: &'a str,
    conn: String,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    info: Option<&'a RawValue>,
    joined_at: u64,
}

/// This node's part of the answer to `query`.
pub fn answer(hub: &Hub, node: &str, region: Option<&str>, query: presence::Query) -> Vec<Bytes> {
    let Ok(channel) = Channel::parse(&query.channel) else {
        return presence::encode_answer::<Listed>(node, 0, &[]);
    };
    if query.count_only {
        return presence::encode_answer::<Listed>(node, hub.member_count(&channel), &[]);
    }
    let members: Vec<LocalMember> = hub.members(&channel);
    let listed: Vec<Listed> = members
        .iter()
        .map(|member| Listed {
            user: &member.profile.user,
            conn: member.conn.to_string(),
            node,
            region,
            info: member.profile.info.as_deref(),
            joined_at: member.joined_at,
        })
        .collect();
    presence::encode_answer(node, listed.len(), &listed)
}

/// What a watching node knows of a channel's members on every node: enough to say they left
/// if their node dies.
#[derive(Debug, Default)]
pub struct Replica {
    nodes: HashMap<String, Group>,
    /// False until seeded by a complete answer: until then a `leave` for a member it does not
    /// know may still be news.
    complete: bool,
}

#[derive(Debug)]
struct Group {
    /// When this node first appeared here: a node discovery has never heard of is given
    /// [`FORGET_AFTER`] from then to announce itself.
    since: Instant,
    members: HashMap<String, Known>,
}

#[derive(Debug)]
struct Known {
    user: String,
    region: Option<String>,
    info: Option<Box<RawValue>>,
    joined_at: u64,
}

impl Replica {
    fn group(&mut self, node: &str) -> &mut Group {
        self.nodes.entry(node.to_string()).or_insert_with(|| Group {
            since: Instant::now(),
            members: HashMap::new(),
        })
    }

    /// Applies one change from another node (or this one). Returns whether watchers should
    /// see it: not a `leave` of a member already said to have left.
    pub fn apply(&mut self, change: &Change) -> bool {
        match change.op {
            ChangeOp::Join
                if self
                    .nodes
                    .get(&change.node)
                    .and_then(|group| group.members.get(&change.conn))
                    .is_some_and(|known| known.joined_at == change.joined_at) =>
            {
                // Known already (a seed found it, and told it): not told twice.
                false
            }
            ChangeOp::Join | ChangeOp::Update => {
                self.group(&change.node).members.insert(
                    change.conn.clone(),
                    Known {
                        user: change.user.clone(),
                        region: change.region.clone(),
                        info: change.info.clone(),
                        joined_at: change.joined_at,
                    },
                );
                true
            }
            ChangeOp::Leave => {
                let known = self
                    .nodes
                    .get_mut(&change.node)
                    .and_then(|group| group.members.remove(&change.conn))
                    .is_some();
                known || !self.complete
            }
        }
    }

    /// Replaces what is known of the nodes that answered `answer` with their answer; with
    /// `tell`, returns the changes that makes (after a NATS outage, when changes were lost).
    ///
    /// With `joined_since` (unix ms), the members it finds that joined since then are told
    /// as joins even when `tell` is false: with regions, a watch's interest takes a round
    /// trip to reach another region, and a join published there meanwhile is not carried
    /// (the answer has it). Clocks of different regions bound how exact that is.
    pub fn seed(
        &mut self,
        channel: &Channel,
        answer: Presence,
        tell: bool,
        joined_since: Option<u64>,
    ) -> Vec<Outgoing> {
        let mut fresh: HashMap<String, HashMap<String, Known>> = HashMap::new();
        for node in &answer.nodes {
            fresh.entry(node.clone()).or_default();
        }
        for Member {
            user,
            conn,
            node,
            region,
            info,
            joined_at,
        } in answer.members.unwrap_or_default()
        {
            if let Some(members) = fresh.get_mut(&node) {
                members.insert(
                    conn,
                    Known {
                        user,
                        region,
                        info,
                        joined_at,
                    },
                );
            }
        }
        let mut frames = Vec::new();
        for (node, members) in fresh {
            let group = self.group(&node);
            let old = std::mem::replace(&mut group.members, members);
            if tell {
                for (conn, known) in &old {
                    if !group.members.contains_key(conn) {
                        frames.push(change_frame("leave", channel, &node, conn, known));
                    }
                }
                for (conn, known) in &group.members {
                    if !old.contains_key(conn) {
                        frames.push(change_frame("join", channel, &node, conn, known));
                    }
                }
            } else if let Some(since) = joined_since {
                for (conn, known) in &group.members {
                    if !old.contains_key(conn) && known.joined_at >= since {
                        frames.push(change_frame("join", channel, &node, conn, known));
                    }
                }
            }
        }
        self.complete = !answer.partial;
        frames
    }

    /// Forgets the members of nodes that discovery no longer hears from (besides `this`
    /// node, which is alive by definition) and returns their `leave` frames.
    pub fn sweep(&mut self, channel: &Channel, directory: &Directory, this: &str) -> Vec<Outgoing> {
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(node, group)| {
                node.as_str() != this
                    && group.since.elapsed() >= FORGET_AFTER
                    && !directory.alive(node)
            })
            .map(|(node, _)| node.clone())
            .collect();
        let mut frames = Vec::new();
        for node in gone {
            let group = self.nodes.remove(&node).expect("listed above");
            for (conn, known) in &group.members {
                frames.push(change_frame("leave", channel, &node, conn, known));
            }
        }
        frames
    }
}

/// The frame watching clients get for a change from a node.
fn client_frame(change: &Change) -> Outgoing {
    let op = change.op.as_str();
    let json = protocol::presence_change(&PresenceChange {
        op: change.op.as_str(),
        channel: &change.channel,
        user: &change.user,
        conn: &change.conn,
        node: &change.node,
        region: change.region.as_deref(),
        info: change.info.as_deref(),
        joined_at: change.joined_at,
    });
    Outgoing::other(op, json)
}

fn change_frame(
    op: &'static str,
    channel: &Channel,
    node: &str,
    conn: &str,
    known: &Known,
) -> Outgoing {
    let json = protocol::presence_change(&PresenceChange {
        op,
        channel: channel.as_str(),
        user: &known.user,
        conn,
        node,
        region: known.region.as_deref(),
        info: known.info.as_deref(),
        joined_at: known.joined_at,
    });
    Outgoing::other(op, json)
}

/// Follows `channel`'s presence changes for the local clients that asked, until aborted:
/// forwards each change, seeds the [`Replica`] with a query (and again after every NATS
/// reconnect), and says `leave` for the members of nodes that died.
pub async fn watch(
    bus: Bus,
    hub: Arc<Hub>,
    directory: Arc<Directory>,
    node: Arc<str>,
    channel: Channel,
    generation: u64,
) {
    let mut changes = match bus.rpc().subscribe_presence(&channel).await {
        Ok(changes) => changes,
        Err(err) => {
            tracing::error!(%channel, %err, "cannot follow presence changes");
            return;
        }
    };
    hub.set_watch_live(&channel, generation);
    let ghosts = counter!("fanout_ws_presence_ghost_leaves_total");
    let mut recipients = Recipients::new();
    let key = channel_key(channel.as_str());
    let mut deliver = |frame: &Outgoing| {
        hub.watchers(&channel, &mut recipients);
        offer_all(key, std::slice::from_ref(frame), &mut recipients);
    };
    let dropped = counter!("fanout_ws_presence_changes_dropped_total");
    let mut replica = Replica::default();
    let mut connections = bus.connections();
    connections.borrow_and_update();
    let query = || {
        let (bus, directory, channel) = (bus.clone(), directory.clone(), channel.clone());
        Box::pin(async move { bus.rpc().presence(&channel, false, &directory).await })
    };
    // Changes that arrive while a seeding query runs wait for its answer, then apply on top.
    let mut seeding = Some((query(), false));
    let joined_since = (bus.topology().count() > 1).then(fanout::time::now_ms);
    let mut waiting: Vec<Change> = Vec::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            change = changes.next() => {
                let change = match change {
                    None => break,
                    Some(Ok(change)) => change,
                    Some(Err(err)) => {
                        dropped.increment(1);
                        tracing::debug!(%channel, %err, "dropping a presence change");
                        continue;
                    }
                };
                if seeding.is_some() {
                    waiting.push(change);
                } else if replica.apply(&change) {
                    deliver(&client_frame(&change));
                }
            }
            answer = async { (&mut seeding.as_mut().expect("guarded").0).await }, if seeding.is_some() => {
                let tell = seeding.take().expect("guarded").1;
                match answer {
                    Ok(answer) => {
                        for frame in &replica.seed(&channel, answer, tell, joined_since) {
                            deliver(frame);
                        }
                    }
                    Err(err) => tracing::warn!(%channel, %err, "cannot seed presence"),
                }
                for change in waiting.drain(..) {
                    if replica.apply(&change) {
                        deliver(&client_frame(&change));
                    }
                }
            }
            changed = connections.changed() => {
                if changed.is_err() {
                    break;
                }
                // Changes published while NATS was unreachable are lost: ask again and tell
                // the difference.
                seeding = Some((query(), true));
            }
            _ = sweep.tick() => {
                let frames = replica.sweep(&channel, &directory, &node);
                if !frames.is_empty() {
                    tracing::info!(%channel, leaves = frames.len(), "members of a node that is gone left");
                    ghosts.increment(frames.len() as u64);
                }
                for frame in &frames {
                    deliver(frame);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change as it comes off the wire.
    fn change(op: &str, node: &str, conn: &str) -> Change {
        Change::decode(
            format!(
                r#"{{"v":1,"op":"{op}","channel":"x","user":"u-{conn}","conn":"{conn}","node":"{node}","info":null,"joined_at":1}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_leave_is_told_once() {
        let mut replica = Replica {
            complete: true,
            ..Replica::default()
        };
        assert!(replica.apply(&change("join", "ws-1", "a")));
        assert!(replica.apply(&change("leave", "ws-1", "a")));
        assert!(
            !replica.apply(&change("leave", "ws-1", "a")),
            "already left"
        );
    }

    #[test]
    fn changes_are_versioned_and_tolerant_of_new_fields() {
        let newer = br#"{"v":1,"op":"join","channel":"x","user":"u","conn":"c","node":"n","joined_at":1,"region":"eu"}"#;
        let change = Change::decode(newer).unwrap();
        assert_eq!((change.op, change.info.is_none()), (ChangeOp::Join, true));
        let incompatible =
            br#"{"v":2,"op":"join","channel":"x","user":"u","conn":"c","node":"n","joined_at":1}"#;
        assert!(matches!(
            Change::decode(incompatible),
            Err(presence::ChangeError::Version(2))
        ));
        assert!(Change::decode(b"not json").is_err());
        // The client frame is built from it, not sent as is.
        let frame: serde_json::Value =
            serde_json::from_slice(client_frame(&change).json()).unwrap();
        assert_eq!(frame["op"], "join");
        assert!(frame.get("v").is_none());
    }

    #[test]
    fn members_of_forgotten_nodes_leave() {
        let channel = Channel::parse("x").unwrap();
        let mut replica = Replica::default();
        replica.apply(&change("join", "ws-1", "a"));
        replica.apply(&change("join", "ws-2", "b"));
        replica.apply(&change("join", "ws-2", "c"));
        for group in replica.nodes.values_mut() {
            group.since -= FORGET_AFTER;
        }
        let directory = Directory::default();
        let frames = replica.sweep(&channel, &directory, "ws-1");
        assert_eq!(frames.len(), 2, "ws-1 is this node: alive");
        assert!(
            frames
                .iter()
                .map(|f| String::from_utf8(f.json().to_vec()).unwrap())
                .all(|f| f.contains(r#""op":"leave""#) && f.contains("ws-2"))
        );
        assert!(replica.sweep(&channel, &directory, "ws-1").is_empty());
    }
}
