//! Which connections are in each channel: the members a fan-out pass copies, presence's
//! members and watchers, and each channel's stretch of interest (its generation, whether its
//! NATS subscription is in place). Sharded like the connections; reports about a
//! channel go to the observer under its shard's lock, which keeps them in order.
//!
//! `broadcast` is a channel like any other but for its members: every connection, without
//! joining (its entry says so, and its reader copies the connections, [`Conns::sinks`],
//! instead); it is never vacated.
//!
//! [`Conns::sinks`]: super::conns::Conns::sinks

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use fanout::{Channel, presence::ChangeOp, time::now_ms};
use metrics::gauge;
use tokio::sync::watch;

use super::{
    conns::Joining,
    observer::{Interest, Membership, Observer, Profile},
    shard::{SHARDS, lock, shards},
};
use crate::{
    position::{ChannelKey, ConnId, channel_key},
    sink::Sink,
};

/// `broadcast`'s one stretch of interest: the node's own, from start to end.
pub const BROADCAST_GENERATION: u64 = 0;

#[derive(Debug)]
pub struct Subs {
    shards: Box<[Mutex<HashMap<Channel, Entry>>]>,
    next_generation: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    members: HashMap<ConnId, Member>,
    /// Every connection is a member, without joining (`broadcast`).
    everyone: bool,
    /// Members that are hidden (long-polls), so that a count stays one subtraction.
    hidden: usize,
    /// This stretch of interest.
    generation: u64,
    /// True once the upstream subscription for this generation is in place.
    live: watch::Sender<bool>,
    /// Members that asked for presence changes.
    watchers: usize,
    watch_generation: u64,
    /// True once the presence changes of this watch generation are followed.
    watch_live: watch::Sender<bool>,
}

#[derive(Debug)]
struct Member {
    sink: Arc<dyn Sink>,
    profile: Arc<Profile>,
    joined_at: u64,
    /// Wants the channel's presence changes.
    watching: bool,
    /// Not a member for presence.
    hidden: bool,
}

/// One local member, as a presence answer lists it.
#[derive(Debug)]
pub struct LocalMember {
    pub conn: ConnId,
    pub profile: Arc<Profile>,
    pub joined_at: u64,
}

/// What a subscribe hands back to wait on.
#[derive(Debug)]
pub struct Subscribed {
    /// Turns `true` once the node receives the channel's events.
    pub live: watch::Receiver<bool>,
    /// With presence: turns `true` once the node follows the channel's presence changes.
    pub watch_live: Option<watch::Receiver<bool>>,
}

fn report(
    observer: &dyn Observer,
    change: ChangeOp,
    channel: &Channel,
    conn: ConnId,
    member: &Member,
) {
    observer.membership(Membership::Changed {
        change,
        channel: channel.clone(),
        conn,
        profile: member.profile.clone(),
        joined_at: member.joined_at,
    });
}

impl Subs {
    pub(super) fn new() -> Subs {
        let subs = Subs {
            shards: shards(),
            next_generation: AtomicU64::new(BROADCAST_GENERATION + 1),
        };
        let broadcast = Channel::broadcast();
        let mut entry = subs.entry(BROADCAST_GENERATION);
        entry.everyone = true;
        subs.shard(channel_key(broadcast.as_str()))
            .insert(broadcast, entry);
        subs
    }

    fn entry(&self, generation: u64) -> Entry {
        Entry {
            members: HashMap::new(),
            everyone: false,
            hidden: 0,
            generation,
            live: watch::Sender::new(false),
            watchers: 0,
            watch_generation: 0,
            watch_live: watch::Sender::new(false),
        }
    }

    fn shard(&self, key: ChannelKey) -> MutexGuard<'_, HashMap<Channel, Entry>> {
        lock(&self.shards[key as usize % SHARDS])
    }

    fn shard_of(&self, channel: &Channel) -> MutexGuard<'_, HashMap<Channel, Entry>> {
        self.shard(channel_key(channel.as_str()))
    }

    fn generation(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes connection `id` (`joining`) a member of `channel` (`key`) and, with `presence`,
    /// a watcher of its presence changes.
    pub(super) fn add(
        &self,
        channel: &Channel,
        key: ChannelKey,
        id: ConnId,
        joining: Joining,
        presence: bool,
        observer: &dyn Observer,
    ) -> Subscribed {
        let mut channels = self.shard(key);
        let entry = channels.entry(channel.clone()).or_insert_with(|| {
            gauge!("fanout_ws_channels").increment(1.0);
            let entry = self.entry(self.generation());
            observer.interest(Interest::Add {
                channel: channel.clone(),
                generation: entry.generation,
            });
            entry
        });
        let Joining {
            sink,
            profile,
            hidden,
            new,
        } = joining;
        let member = entry.members.entry(id).or_insert_with(|| {
            entry.hidden += usize::from(hidden);
            Member {
                sink,
                profile,
                joined_at: now_ms(),
                watching: false,
                hidden,
            }
        });
        if new && !hidden {
            report(observer, ChangeOp::Join, channel, id, member);
        }
        let flip = member.watching != presence;
        member.watching = presence;
        if flip {
            if presence {
                entry.watchers += 1;
                if entry.watchers == 1 {
                    entry.watch_generation = self.generation();
                    entry.watch_live = watch::Sender::new(false);
                    observer.interest(Interest::Watch {
                        channel: channel.clone(),
                        generation: entry.watch_generation,
                    });
                }
            } else {
                unwatch(entry, channel, observer);
            }
        }
        Subscribed {
            live: entry.live.subscribe(),
            watch_live: presence.then(|| entry.watch_live.subscribe()),
        }
    }

    /// Takes connection `id` out of `channel` (`key`).
    pub(super) fn remove(
        &self,
        channel: &Channel,
        key: ChannelKey,
        id: ConnId,
        observer: &dyn Observer,
    ) {
        let mut channels = self.shard(key);
        let Some(entry) = channels.get_mut(channel) else {
            return;
        };
        let Some(member) = entry.members.remove(&id) else {
            return;
        };
        if member.hidden {
            entry.hidden -= 1;
        } else {
            report(observer, ChangeOp::Leave, channel, id, &member);
            if member.watching {
                unwatch(entry, channel, observer);
            }
        }
        if entry.members.is_empty() && !entry.everyone {
            channels.remove(channel);
            gauge!("fanout_ws_channels").decrement(1.0);
            observer.interest(Interest::Remove {
                channel: channel.clone(),
            });
        }
    }

    /// Gives member `id` of `channel` its new profile, and reports the update.
    pub(super) fn update(
        &self,
        channel: &Channel,
        id: ConnId,
        profile: &Arc<Profile>,
        observer: &dyn Observer,
    ) {
        let mut shard = self.shard_of(channel);
        if let Some(member) = shard
            .get_mut(channel)
            .and_then(|entry| entry.members.get_mut(&id))
        {
            member.profile = profile.clone();
            report(observer, ChangeOp::Update, channel, id, member);
        }
    }

    /// Marks `channel` as receiving events, if its interest is still the stretch that
    /// `generation` named (it may have ended, and begun again, in the meantime).
    pub(super) fn set_live(&self, channel: &Channel, generation: u64) {
        if let Some(entry) = self.shard_of(channel).get(channel)
            && entry.generation == generation
        {
            entry.live.send_replace(true);
        }
    }

    /// Marks `channel`'s presence changes as followed, if `generation` is still the current
    /// stretch of watching.
    pub(super) fn set_watch_live(&self, channel: &Channel, generation: u64) {
        if let Some(entry) = self.shard_of(channel).get(channel)
            && entry.watchers > 0
            && entry.watch_generation == generation
        {
            entry.watch_live.send_replace(true);
        }
    }

    /// Whether `channel`'s subscription is in place (for its current stretch of interest).
    pub(super) fn is_live(&self, channel: &Channel) -> bool {
        self.shard_of(channel)
            .get(channel)
            .is_some_and(|entry| *entry.live.borrow())
    }

    /// Copies the sinks of `channel`'s members into `out`, for a pass of stretch
    /// `generation`. False when that stretch of interest has ended (the pass's reader is
    /// being stopped): nothing is copied. (`broadcast` has no members to copy: its reader
    /// takes every connection's sink.)
    pub fn recipients(
        &self,
        channel: &Channel,
        key: ChannelKey,
        generation: u64,
        out: &mut Vec<Arc<dyn Sink>>,
    ) -> bool {
        match self.shard(key).get(channel) {
            Some(entry) if entry.generation == generation => {
                out.extend(entry.members.values().map(|m| m.sink.clone()));
                true
            }
            _ => false,
        }
    }

    /// Copies the sinks of `channel`'s members that watch its presence into `out`.
    pub(super) fn watchers(
        &self,
        channel: &Channel,
        key: ChannelKey,
        out: &mut Vec<Arc<dyn Sink>>,
    ) {
        if let Some(entry) = self.shard(key).get(channel) {
            out.extend(
                entry
                    .members
                    .values()
                    .filter(|m| m.watching)
                    .map(|m| m.sink.clone()),
            );
        }
    }

    /// This node's members of `channel`.
    pub(super) fn members(&self, channel: &Channel) -> Vec<LocalMember> {
        let shard = self.shard_of(channel);
        let Some(entry) = shard.get(channel) else {
            return Vec::new();
        };
        entry
            .members
            .iter()
            .filter(|(_, member)| !member.hidden)
            .map(|(conn, member)| LocalMember {
                conn: *conn,
                profile: member.profile.clone(),
                joined_at: member.joined_at,
            })
            .collect()
    }

    /// How many members `channel` has on this node.
    pub(super) fn member_count(&self, channel: &Channel) -> usize {
        self.shard_of(channel)
            .get(channel)
            .map_or(0, |entry| entry.members.len() - entry.hidden)
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub(super) fn channels(&self) -> Vec<(Channel, usize)> {
        let mut channels: Vec<_> = self
            .shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .iter()
                    .filter(|(_, entry)| !entry.everyone)
                    .map(|(channel, entry)| (channel.clone(), entry.members.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        channels.sort();
        channels
    }
}

fn unwatch(entry: &mut Entry, channel: &Channel, observer: &dyn Observer) {
    entry.watchers -= 1;
    if entry.watchers == 0 {
        observer.interest(Interest::Unwatch {
            channel: channel.clone(),
        });
    }
}
