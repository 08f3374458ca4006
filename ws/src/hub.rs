//! The hub owns this node's connections and which channels each one is in.
//!
//! It reports interest changes, in order, as [`Interest`] messages: `Add` when a channel gets
//! its first local subscriber and `Remove` when its last one leaves (centrifuge
//! `hub.addSub`), so the node holds a NATS subscription only where a local client wants it.
//!
//! It is also where presence starts: every subscriber of a channel is a member of it; the hub
//! reports each membership change ([`Membership`]) in order, and `Watch` / `Unwatch` interest
//! when a channel gets its first / loses its last local client that asked for presence
//! changes.
//!
//! **Locks.** Connections and channels live in shards (64 each, as centrifuge's `hub.go`),
//! each a std mutex held for a few map operations and never while another lock is taken or a
//! socket is written, so that one busy channel cannot stall the others. Reports about one
//! channel are sent under its shard's lock, which keeps them in the order the hub saw them.
//! A fan-out pass copies the channel's sinks out of its shard and writes outside every lock:
//! a join, a connect or a subscription elsewhere never waits for it. (A member that leaves
//! during a pass may still be offered that pass's frames; its sink drops them, see
//! [`Sink::leave`].)
//!
//! All changes of one connection's memberships come from that connection's own task, one at
//! a time.
//!
//! It knows neither NATS nor any transport: a connection is a [`Sink`].

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use fanout::{Channel, presence::ChangeOp, time::now_ms};
use metrics::gauge;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::{
    position::{ChannelKey, Marks, channel_key, mark},
    recent::{self, Recent},
    sink::{Delivery, Kick, Outgoing, Sink},
};

/// Where a fan-out pass's events come from: the reader of one generation of a channel's
/// interest (0 for `broadcast`'s), in one stream epoch. Its events are kept as the channel's
/// recent ones only while that generation lasts.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub generation: u64,
    pub epoch: &'a str,
}

/// A connection's id: the `conn` of its `welcome` frame.
pub type ConnId = Uuid;

/// How many shards the connections, and the channels, are spread over.
const SHARDS: usize = 64;

/// A change of this node's interest in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// The channel got its first local subscriber. `generation` identifies this stretch of
    /// interest; pass it back to [`Hub::set_live`] once the upstream subscription is in place.
    Add { channel: Channel, generation: u64 },
    /// The channel's last local subscriber left.
    Remove { channel: Channel },
    /// A local client asked for the channel's presence changes, the first one to. Pass
    /// `generation` to [`Hub::set_watch_live`] once the changes are followed.
    Watch { channel: Channel, generation: u64 },
    /// The channel's last local client that asked for presence changes stopped.
    Unwatch { channel: Channel },
}

/// Who a connection is, as presence shows it.
#[derive(Debug)]
pub struct Profile {
    pub user: Arc<str>,
    pub info: Option<Box<RawValue>>,
}

/// A membership change, reported in the order the hub saw it.
#[derive(Debug)]
pub enum Membership {
    Changed {
        change: ChangeOp,
        channel: Channel,
        conn: ConnId,
        profile: Arc<Profile>,
        joined_at: u64,
    },
    /// Every change before this one has been handled (for shutdown).
    Flush(oneshot::Sender<()>),
}

/// One local member, as a presence answer lists it.
#[derive(Debug)]
pub struct LocalMember {
    pub conn: ConnId,
    pub profile: Arc<Profile>,
    pub joined_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("this connection is in {0} channels already, the limit")]
    TooMany(usize),
    #[error("unknown connection")]
    UnknownConn,
}

/// The sinks a fan-out pass writes to, copied out of the hub (kept by a reader between
/// passes, so that a pass allocates nothing).
pub type Recipients = Vec<Arc<dyn Sink>>;

#[derive(Debug)]
pub struct Hub {
    conns: Box<[Mutex<HashMap<ConnId, ConnEntry>>]>,
    channels: Box<[Mutex<HashMap<Channel, ChannelEntry>>]>,
    /// [`ChannelEntry::delivered`] for `broadcast`, whose recipients are every connection:
    /// stored before a pass copies them, read after a connection is added.
    broadcast_delivered: Mutex<Marks>,
    /// `broadcast`'s recent events (its watermark is updated under this lock too).
    broadcast_recent: Mutex<Recent>,
    recent_limits: recent::Limits,
    /// Connections, without locking every shard to count them.
    connections: AtomicUsize,
    interest: mpsc::UnboundedSender<Interest>,
    membership: mpsc::UnboundedSender<Membership>,
    next_generation: AtomicU64,
    max_subscriptions: usize,
    /// What `GET /v1/stats` reports of this node (the Prometheus counters cannot be read back).
    totals: Counts,
}

/// [`fanout::stats::Totals`], counted as the metrics are.
#[derive(Debug, Default)]
struct Counts {
    events_received: AtomicU64,
    frames_delivered: AtomicU64,
    bytes_out: AtomicU64,
    slow_consumer_disconnects: AtomicU64,
}

#[derive(Debug)]
struct ConnEntry {
    sink: Arc<dyn Sink>,
    channels: HashSet<Channel>,
    profile: Arc<Profile>,
    /// Not a member for presence (a long-poll, which is there only while it waits).
    hidden: bool,
}

#[derive(Debug)]
struct ChannelEntry {
    members: HashMap<ConnId, Subscriber>,
    /// The highest seq a fan-out pass has offered the channel's members, recorded in the
    /// pass's own critical section: a member that joins later was not in that pass, but sees
    /// this, and must get everything up to it from history ([`Hub::delivered`]).
    delivered: Marks,
    /// Members that are hidden (long-polls), so that a count stays one subtraction.
    hidden: usize,
    /// The channel's recent events, as this generation's reader delivered them.
    recent: Recent,
    generation: u64,
    /// True once the upstream subscription for this generation is in place.
    live: watch::Sender<bool>,
    /// Subscribers that asked for presence changes.
    watchers: usize,
    watch_generation: u64,
    /// True once the presence changes of this watch generation are followed.
    watch_live: watch::Sender<bool>,
}

#[derive(Debug)]
struct Subscriber {
    sink: Arc<dyn Sink>,
    profile: Arc<Profile>,
    joined_at: u64,
    /// Wants the channel's presence changes.
    watching: bool,
    /// Not a member for presence.
    hidden: bool,
}

/// What [`Hub::subscribe`] hands back to wait on.
#[derive(Debug)]
pub struct Subscribed {
    /// Turns `true` once the node receives the channel's events.
    pub live: watch::Receiver<bool>,
    /// With presence: turns `true` once the node follows the channel's presence changes.
    pub watch_live: Option<watch::Receiver<bool>>,
}

/// A panic while holding a shard cannot leave its maps half-updated in a way that matters
/// more than losing every connection would, so keep serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SHARDS).map(|_| Mutex::default()).collect()
}

impl Hub {
    pub fn new(
        max_subscriptions: usize,
        recent_limits: recent::Limits,
        interest: mpsc::UnboundedSender<Interest>,
        membership: mpsc::UnboundedSender<Membership>,
    ) -> Self {
        Hub {
            conns: shards(),
            channels: shards(),
            broadcast_delivered: Mutex::new(Marks::new()),
            broadcast_recent: Mutex::new(Recent::new(&recent_limits)),
            recent_limits,
            connections: AtomicUsize::new(0),
            totals: Counts::default(),
            interest,
            membership,
            next_generation: AtomicU64::new(1),
            max_subscriptions,
        }
    }

    fn conn_shard(&self, id: &ConnId) -> MutexGuard<'_, HashMap<ConnId, ConnEntry>> {
        lock(&self.conns[id.as_u128() as usize % SHARDS])
    }

    fn channel_shard(&self, channel: &Channel) -> MutexGuard<'_, HashMap<Channel, ChannelEntry>> {
        self.channel_shard_of(channel_key(channel.as_str()))
    }

    fn channel_shard_of(&self, key: ChannelKey) -> MutexGuard<'_, HashMap<Channel, ChannelEntry>> {
        lock(&self.channels[key as usize % SHARDS])
    }

    pub fn add_conn(&self, id: ConnId, sink: Arc<dyn Sink>, profile: Profile) {
        self.insert_conn(id, sink, profile, false);
    }

    /// Adds a connection that gets its channels' events but is nobody's member: no presence
    /// change reports it, no presence answer lists it (a long-poll, there only while it
    /// waits).
    pub fn add_hidden_conn(&self, id: ConnId, sink: Arc<dyn Sink>) {
        let profile = Profile {
            user: "".into(),
            info: None,
        };
        self.insert_conn(id, sink, profile, true);
    }

    fn insert_conn(&self, id: ConnId, sink: Arc<dyn Sink>, profile: Profile, hidden: bool) {
        gauge!("fanout_ws_connections").increment(1.0);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.conn_shard(&id).insert(
            id,
            ConnEntry {
                sink,
                channels: HashSet::new(),
                profile: Arc::new(profile),
                hidden,
            },
        );
    }

    fn report(
        &self,
        change: ChangeOp,
        channel: &Channel,
        conn: ConnId,
        profile: &Arc<Profile>,
        joined_at: u64,
    ) {
        let _ = self.membership.send(Membership::Changed {
            change,
            channel: channel.clone(),
            conn,
            profile: profile.clone(),
            joined_at,
        });
    }

    /// Forgets a connection and leaves all its channels.
    pub fn remove_conn(&self, id: ConnId) {
        let Some(conn) = self.conn_shard(&id).remove(&id) else {
            return;
        };
        gauge!("fanout_ws_connections").decrement(1.0);
        self.connections.fetch_sub(1, Ordering::Relaxed);
        for channel in conn.channels {
            self.leave(id, &channel, &conn.sink);
        }
    }

    /// Adds `id` to `channel` (a join) and, with `presence`, has it receive the channel's
    /// presence changes; subscribing again only changes `presence`.
    pub fn subscribe(
        &self,
        id: ConnId,
        channel: &Channel,
        presence: bool,
    ) -> Result<Subscribed, SubscribeError> {
        let (sink, profile, joins, hidden) = {
            let mut conns = self.conn_shard(&id);
            let conn = conns.get_mut(&id).ok_or(SubscribeError::UnknownConn)?;
            let joins = !conn.channels.contains(channel);
            if joins {
                if conn.channels.len() >= self.max_subscriptions {
                    return Err(SubscribeError::TooMany(self.max_subscriptions));
                }
                conn.channels.insert(channel.clone());
                gauge!("fanout_ws_subscriptions").increment(1.0);
            }
            (conn.sink.clone(), conn.profile.clone(), joins, conn.hidden)
        };
        let key = channel_key(channel.as_str());
        if joins {
            // Before it is a member: from its first frame on, the sink takes the channel's.
            sink.enter(key, channel.as_str());
        }
        let mut channels = self.channel_shard_of(key);
        let entry = channels.entry(channel.clone()).or_insert_with(|| {
            gauge!("fanout_ws_channels").increment(1.0);
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            let _ = self.interest.send(Interest::Add {
                channel: channel.clone(),
                generation,
            });
            ChannelEntry {
                members: HashMap::new(),
                delivered: Marks::new(),
                hidden: 0,
                recent: Recent::new(&self.recent_limits),
                generation,
                live: watch::Sender::new(false),
                watchers: 0,
                watch_generation: 0,
                watch_live: watch::Sender::new(false),
            }
        });
        let subscriber = entry.members.entry(id).or_insert_with(|| {
            entry.hidden += usize::from(hidden);
            Subscriber {
                sink,
                profile,
                joined_at: now_ms(),
                watching: false,
                hidden,
            }
        });
        if joins && !hidden {
            self.report(
                ChangeOp::Join,
                channel,
                id,
                &subscriber.profile,
                subscriber.joined_at,
            );
        }
        let flip = subscriber.watching != presence;
        subscriber.watching = presence;
        if flip {
            if presence {
                entry.watchers += 1;
                if entry.watchers == 1 {
                    entry.watch_generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    entry.watch_live = watch::Sender::new(false);
                    let _ = self.interest.send(Interest::Watch {
                        channel: channel.clone(),
                        generation: entry.watch_generation,
                    });
                }
            } else {
                self.unwatch(entry, channel);
            }
        }
        Ok(Subscribed {
            live: entry.live.subscribe(),
            watch_live: presence.then(|| entry.watch_live.subscribe()),
        })
    }

    fn unwatch(&self, entry: &mut ChannelEntry, channel: &Channel) {
        entry.watchers -= 1;
        if entry.watchers == 0 {
            let _ = self.interest.send(Interest::Unwatch {
                channel: channel.clone(),
            });
        }
    }

    /// Removes `id` from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, id: ConnId, channel: &Channel) -> bool {
        let sink = {
            let mut conns = self.conn_shard(&id);
            let Some(conn) = conns.get_mut(&id) else {
                return false;
            };
            if !conn.channels.remove(channel) {
                return false;
            }
            conn.sink.clone()
        };
        self.leave(id, channel, &sink);
        true
    }

    fn leave(&self, id: ConnId, channel: &Channel, sink: &Arc<dyn Sink>) {
        gauge!("fanout_ws_subscriptions").decrement(1.0);
        let key = channel_key(channel.as_str());
        {
            let mut channels = self.channel_shard_of(key);
            if let Some(entry) = channels.get_mut(channel) {
                let left = entry.members.remove(&id);
                if left.as_ref().is_some_and(|s| s.hidden) {
                    entry.hidden -= 1;
                }
                if let Some(subscriber) = left.filter(|s| !s.hidden) {
                    self.report(
                        ChangeOp::Leave,
                        channel,
                        id,
                        &subscriber.profile,
                        subscriber.joined_at,
                    );
                    if subscriber.watching {
                        self.unwatch(entry, channel);
                    }
                }
                if entry.members.is_empty() {
                    channels.remove(channel);
                    gauge!("fanout_ws_channels").decrement(1.0);
                    let _ = self.interest.send(Interest::Remove {
                        channel: channel.clone(),
                    });
                }
            }
        }
        // No longer a member: nothing of the channel reaches it from now on.
        sink.leave(key);
    }

    /// Marks `channel` as receiving events, if its interest is still the stretch that
    /// `generation` named (it may have ended, and begun again, in the meantime).
    pub fn set_live(&self, channel: &Channel, generation: u64) {
        if let Some(entry) = self.channel_shard(channel).get(channel)
            && entry.generation == generation
        {
            entry.live.send_replace(true);
        }
    }

    /// Marks `channel`'s presence changes as followed, if `generation` is still the current
    /// stretch of watching.
    pub fn set_watch_live(&self, channel: &Channel, generation: u64) {
        if let Some(entry) = self.channel_shard(channel).get(channel)
            && entry.watchers > 0
            && entry.watch_generation == generation
        {
            entry.watch_live.send_replace(true);
        }
    }

    /// Replaces connection `id`'s presence info and reports an update in each of its
    /// channels. Returns false for an unknown connection.
    pub fn set_info(&self, id: ConnId, info: Option<Box<RawValue>>) -> bool {
        let (profile, channels) = {
            let mut conns = self.conn_shard(&id);
            let Some(conn) = conns.get_mut(&id) else {
                return false;
            };
            conn.profile = Arc::new(Profile {
                user: conn.profile.user.clone(),
                info,
            });
            (
                conn.profile.clone(),
                conn.channels.iter().cloned().collect::<Vec<_>>(),
            )
        };
        for channel in channels {
            let mut shard = self.channel_shard(&channel);
            if let Some(subscriber) = shard
                .get_mut(&channel)
                .and_then(|entry| entry.members.get_mut(&id))
            {
                subscriber.profile = profile.clone();
                let joined_at = subscriber.joined_at;
                self.report(ChangeOp::Update, &channel, id, &profile, joined_at);
            }
        }
        true
    }

    /// This node's members of `channel`.
    pub fn members(&self, channel: &Channel) -> Vec<LocalMember> {
        let shard = self.channel_shard(channel);
        let Some(entry) = shard.get(channel) else {
            return Vec::new();
        };
        entry
            .members
            .iter()
            .filter(|(_, subscriber)| !subscriber.hidden)
            .map(|(conn, subscriber)| LocalMember {
                conn: *conn,
                profile: subscriber.profile.clone(),
                joined_at: subscriber.joined_at,
            })
            .collect()
    }

    /// How many members `channel` has on this node.
    pub fn member_count(&self, channel: &Channel) -> usize {
        self.channel_shard(channel)
            .get(channel)
            .map_or(0, |entry| entry.members.len() - entry.hidden)
    }

    /// Offers a presence change of `channel` to its subscribers that asked for presence
    /// changes.
    pub fn deliver_presence(
        &self,
        channel: &Channel,
        frame: &Outgoing,
        recipients: &mut Recipients,
    ) -> Delivery {
        let key = channel_key(channel.as_str());
        if let Some(entry) = self.channel_shard_of(key).get(channel) {
            recipients.extend(
                entry
                    .members
                    .values()
                    .filter(|s| s.watching)
                    .map(|s| s.sink.clone()),
            );
        }
        Self::offer_all(key, std::slice::from_ref(frame), recipients)
    }

    /// Offers consecutive events of `channel` (channel `key`) to every subscriber (for
    /// `broadcast`, every connection): each gets them with one write. No lock is held while
    /// writing: the recipients are copied into `recipients` first (emptied again after).
    pub fn deliver(
        &self,
        channel: &Channel,
        key: ChannelKey,
        frames: &[Outgoing],
        source: Source<'_>,
        recipients: &mut Recipients,
    ) -> Delivery {
        let raise = |delivered: &mut Marks| {
            for frame in frames.iter().filter(|f| f.seq != 0) {
                mark::raise(delivered, frame.seq);
            }
        };
        if channel.is_broadcast() {
            {
                let mut recent = lock(&self.broadcast_recent);
                for frame in frames {
                    recent.push(frame, source.epoch);
                }
                raise(&mut lock(&self.broadcast_delivered));
            }
            for shard in self.conns.iter() {
                recipients.extend(lock(shard).values().map(|c| c.sink.clone()));
            }
        } else if let Some(entry) = self.channel_shard_of(key).get_mut(channel) {
            if entry.generation == source.generation {
                for frame in frames {
                    entry.recent.push(frame, source.epoch);
                }
            }
            raise(&mut entry.delivered);
            recipients.extend(entry.members.values().map(|s| s.sink.clone()));
        }
        Self::offer_all(key, frames, recipients)
    }

    /// Every event of `channel` after `after` (in stream epoch `epoch`) from its recent
    /// events, if they reach back to it and include everything delivered so far; else
    /// `None` (ask the stream). For a connection in the channel: what it does not get here
    /// it gets live.
    pub fn recent(&self, channel: &Channel, after: u64, epoch: &str) -> Option<Vec<Outgoing>> {
        if channel.is_broadcast() {
            let recent = lock(&self.broadcast_recent);
            let delivered = mark::seq_of(&lock(&self.broadcast_delivered), 0);
            return recent.after(after, delivered, epoch);
        }
        let channels = self.channel_shard(channel);
        let entry = channels.get(channel)?;
        entry
            .recent
            .after(after, mark::seq_of(&entry.delivered, 0), epoch)
    }

    /// Whether `channel`'s subscription is in place (for this generation of its interest).
    pub fn is_live(&self, channel: &Channel) -> bool {
        self.channel_shard(channel)
            .get(channel)
            .is_some_and(|entry| *entry.live.borrow())
    }

    /// Whether `channel`'s recent events know where they start (else a stream read can
    /// tell them: [`Hub::seed_recent`]).
    pub fn recent_seeded(&self, channel: &Channel, epoch: &str) -> bool {
        if channel.is_broadcast() {
            return lock(&self.broadcast_recent).is_seeded(epoch);
        }
        self.channel_shard(channel)
            .get(channel)
            .is_none_or(|entry| entry.recent.is_seeded(epoch))
    }

    /// Tells `channel`'s recent events, if they know nothing yet, that every event after
    /// stream sequence `last` is delivered from now on: `last` was read once the channel's
    /// subscription was in place (`broadcast_live`: `broadcast`'s is; for other channels the
    /// hub knows).
    pub fn seed_recent(&self, channel: &Channel, last: u64, epoch: &str, broadcast_live: bool) {
        if channel.is_broadcast() {
            if broadcast_live {
                lock(&self.broadcast_recent).seed(last, epoch);
            }
            return;
        }
        if let Some(entry) = self.channel_shard(channel).get_mut(channel)
            && *entry.live.borrow()
        {
            entry.recent.seed(last, epoch);
        }
    }

    fn offer_all(key: ChannelKey, frames: &[Outgoing], recipients: &mut Recipients) -> Delivery {
        let mut outcome = Delivery::default();
        for sink in recipients.drain(..) {
            sink.offer(key, frames, &mut outcome);
        }
        outcome
    }

    /// The highest seq of `channel` (of region `region`'s) this node has offered its members
    /// so far. A connection that joined the channel before calling this gets, live, every
    /// event above it; those up to it it may have missed (they came before it joined) and
    /// must replay.
    pub fn delivered(&self, channel: &Channel, region: u8) -> u64 {
        if channel.is_broadcast() {
            return mark::seq_of(&lock(&self.broadcast_delivered), region);
        }
        self.channel_shard(channel)
            .get(channel)
            .map_or(0, |entry| mark::seq_of(&entry.delivered, region))
    }

    /// Every connection's cut-off switch (for draining).
    pub fn kicks(&self) -> Vec<Kick> {
        self.conns
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .values()
                    .map(|c| c.sink.kick().clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts `events` received from NATS, and the frames and bytes one fan-out pass queued
    /// and the slow consumers it cut off.
    pub fn count(&self, events: u64, frames: u64, bytes: u64, slow: u64) {
        let totals = &self.totals;
        for (counter, n) in [
            (&totals.events_received, events),
            (&totals.frames_delivered, frames),
            (&totals.bytes_out, bytes),
            (&totals.slow_consumer_disconnects, slow),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Everything [`Hub::count`] counted since the node started.
    pub fn totals(&self) -> fanout::stats::Totals {
        let totals = &self.totals;
        fanout::stats::Totals {
            events_received: totals.events_received.load(Ordering::Relaxed),
            frames_delivered: totals.frames_delivered.load(Ordering::Relaxed),
            bytes_out: totals.bytes_out.load(Ordering::Relaxed),
            slow_consumer_disconnects: totals.slow_consumer_disconnects.load(Ordering::Relaxed),
        }
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(Channel, usize)> {
        let mut channels: Vec<_> = self
            .channels
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .iter()
                    .map(|(channel, entry)| (channel.clone(), entry.members.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        channels.sort();
        channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        disconnect,
        sink::{Bounds, Outbox, Plain},
    };
    use tokio_util::sync::CancellationToken;

    /// Events from a reader of no current generation: none kept as recent.
    const SOURCE: Source<'static> = Source {
        generation: 0,
        epoch: "E",
    };

    struct Fixture {
        hub: Hub,
        interest: mpsc::UnboundedReceiver<Interest>,
        membership: mpsc::UnboundedReceiver<Membership>,
    }

    fn fixture(max_subscriptions: usize) -> Fixture {
        let (tx, interest) = mpsc::unbounded_channel();
        let (members_tx, membership) = mpsc::unbounded_channel();
        Fixture {
            hub: Hub::new(
                max_subscriptions,
                recent::Limits::new(64, 1 << 20),
                tx,
                members_tx,
            ),
            interest,
            membership,
        }
    }

    /// A connection over a real loopback socket; the client end reads what it gets.
    async fn conn(hub: &Hub, capacity: usize) -> (ConnId, tokio::net::TcpStream, Kick) {
        let (id, client, kick, _) = conn_with_outbox(hub, capacity).await;
        (id, client, kick)
    }

    async fn conn_with_outbox(
        hub: &Hub,
        capacity: usize,
    ) -> (ConnId, tokio::net::TcpStream, Kick, Arc<Outbox<Plain>>) {
        let id = Uuid::new_v4();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let kick = Kick::new(CancellationToken::new());
        let profile = Profile {
            user: format!("user-{id}").into(),
            info: None,
        };
        let bounds = Bounds {
            frames: capacity,
            bytes: usize::MAX,
        };
        let outbox = Arc::new(Outbox::new(server, Plain, kick.clone(), bounds));
        hub.add_conn(id, outbox.clone(), profile);
        (id, client, kick, outbox)
    }

    /// The next `n` bytes the client end receives (one write or several).
    async fn received(client: &mut tokio::net::TcpStream, n: usize) -> String {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0; n];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut buf),
        )
        .await
        .expect("the bytes to arrive")
        .unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn event(seq: u64, text: &str) -> [Outgoing; 1] {
        [Outgoing::event(seq, text.to_string())]
    }

    fn key(name: &str) -> ChannelKey {
        channel_key(name)
    }

    /// The membership changes reported so far, as (change, channel, conn).
    fn changes(rx: &mut mpsc::UnboundedReceiver<Membership>) -> Vec<(ChangeOp, String, ConnId)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| match m {
                Membership::Changed {
                    change,
                    channel,
                    conn,
                    ..
                } => Some((change, channel.to_string(), conn)),
                Membership::Flush(_) => None,
            })
            .collect()
    }

    fn ch(name: &str) -> Channel {
        Channel::parse(name).unwrap()
    }

    fn add(name: &str, generation: u64) -> Interest {
        Interest::Add {
            channel: ch(name),
            generation,
        }
    }

    fn remove(name: &str) -> Interest {
        Interest::Remove { channel: ch(name) }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Interest>) -> Vec<Interest> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn reports_first_and_last_local_subscriber() {
        let mut f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let (b, _rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        f.hub.subscribe(b, &ch("x"), false).unwrap();
        f.hub.subscribe(a, &ch("x"), false).unwrap(); // idempotent
        assert_eq!(drain(&mut f.interest), [add("x", 1)]);
        assert!(f.hub.unsubscribe(a, &ch("x")));
        assert!(!f.hub.unsubscribe(a, &ch("x")));
        assert_eq!(drain(&mut f.interest), []);
        f.hub.remove_conn(b);
        assert_eq!(drain(&mut f.interest), [remove("x")]);
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        assert_eq!(drain(&mut f.interest), [add("x", 2)]);
        assert_eq!(f.hub.channels(), [(ch("x"), 1)]);
    }

    #[tokio::test]
    async fn live_only_for_the_current_generation() {
        let f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let first = f.hub.subscribe(a, &ch("x"), false).unwrap().live;
        f.hub.unsubscribe(a, &ch("x"));
        let second = f.hub.subscribe(a, &ch("x"), false).unwrap().live;
        f.hub.set_live(&ch("x"), 1); // the ended stretch: no effect
        assert!(!*second.borrow());
        f.hub.set_live(&ch("x"), 2);
        assert!(*second.borrow());
        assert!(!*first.borrow());
    }

    #[tokio::test]
    async fn limits_subscriptions_per_connection() {
        let f = fixture(2);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        f.hub.subscribe(a, &ch("y"), false).unwrap();
        assert_eq!(
            f.hub.subscribe(a, &ch("z"), false).unwrap_err(),
            SubscribeError::TooMany(2)
        );
        f.hub.subscribe(a, &ch("y"), false).unwrap(); // re-subscribing is not a new one
        assert_eq!(
            f.hub
                .subscribe(Uuid::new_v4(), &ch("x"), false)
                .unwrap_err(),
            SubscribeError::UnknownConn
        );
    }

    #[tokio::test]
    async fn delivers_to_subscribers_only_and_broadcasts_to_all() {
        let f = fixture(10);
        let (a, mut ra, _) = conn(&f.hub, 4).await;
        let (_b, mut rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        let mut recipients = Recipients::new();
        let mut deliver = |channel: &str, seq, text| {
            f.hub
                .deliver(
                    &ch(channel),
                    key(channel),
                    &event(seq, text),
                    SOURCE,
                    &mut recipients,
                )
                .delivered
        };
        assert_eq!(deliver("x", 1, "e1;"), 1);
        assert_eq!(deliver("y", 2, "e2;"), 0);
        assert_eq!(deliver("broadcast", 3, "b1;"), 2);
        assert!(recipients.is_empty(), "no sink kept after a pass");
        assert_eq!(received(&mut ra, 6).await, "e1;b1;");
        assert_eq!(received(&mut rb, 3).await, "b1;");
    }

    #[tokio::test]
    async fn a_full_queue_cuts_off_only_that_connection() {
        let f = fixture(10);
        let (slow, _never_reads, slow_kick) = conn(&f.hub, 2).await;
        let (fast, mut fast_rx, fast_kick, fast_outbox) = conn_with_outbox(&f.hub, 64).await;
        f.hub.subscribe(slow, &ch("x"), false).unwrap();
        f.hub.subscribe(fast, &ch("x"), false).unwrap();
        // What the fast connection's task would do: write out what waits.
        tokio::spawn(async move {
            loop {
                fast_outbox.waiting().await;
                let _ = fast_outbox.flush().await;
            }
        });
        let blob = "x".repeat(64 * 1024);
        let rounds = 200;
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0; rounds * 64 * 1024];
            fast_rx.read_exact(&mut buf).await.unwrap();
        });
        let mut slow_count = 0;
        let mut recipients = Recipients::new();
        for seq in 1..=rounds as u64 {
            slow_count += f
                .hub
                .deliver(
                    &ch("x"),
                    key("x"),
                    &event(seq, &blob),
                    SOURCE,
                    &mut recipients,
                )
                .slow;
            tokio::task::yield_now().await;
        }
        reader.await.unwrap();
        assert_eq!(slow_count, 1, "kicked once, however many frames overflow");
        assert!(slow_kick.token().is_cancelled());
        assert_eq!(slow_kick.reason(), disconnect::SLOW_CONSUMER);
        assert!(!fast_kick.token().is_cancelled());
    }

    #[tokio::test]
    async fn reports_joins_leaves_and_watch_interest() {
        let mut f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4).await;
        let (b, mut rb, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(a, &ch("x"), false).unwrap();
        let watching = f.hub.subscribe(b, &ch("x"), true).unwrap();
        f.hub.subscribe(b, &ch("x"), true).unwrap(); // no second join, no second watch
        assert_eq!(
            changes(&mut f.membership),
            [
                (ChangeOp::Join, "x".into(), a),
                (ChangeOp::Join, "x".into(), b)
            ]
        );
        assert_eq!(
            drain(&mut f.interest),
            [
                add("x", 1),
                Interest::Watch {
                    channel: ch("x"),
                    generation: 2
                }
            ]
        );
        let watch_live = watching.watch_live.unwrap();
        f.hub.set_watch_live(&ch("x"), 2);
        assert!(*watch_live.borrow());
        assert_eq!(f.hub.member_count(&ch("x")), 2);
        assert_eq!(f.hub.members(&ch("x")).len(), 2);

        // Presence changes reach only the watching subscriber, never skipped as replayed.
        let frame = Outgoing::other("join", "join;");
        let mut recipients = Recipients::new();
        assert_eq!(
            f.hub
                .deliver_presence(&ch("x"), &frame, &mut recipients)
                .delivered,
            1
        );
        assert_eq!(received(&mut rb, 5).await, "join;");

        assert!(
            f.hub
                .set_info(a, Some(RawValue::from_string("{\"n\":1}".into()).unwrap()))
        );
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Update, "x".into(), a)]
        );
        let info = f
            .hub
            .members(&ch("x"))
            .into_iter()
            .find(|m| m.conn == a)
            .unwrap();
        assert_eq!(info.profile.info.as_ref().unwrap().get(), "{\"n\":1}");

        f.hub.remove_conn(b);
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Leave, "x".into(), b)]
        );
        assert_eq!(
            drain(&mut f.interest),
            [Interest::Unwatch { channel: ch("x") }]
        );
        f.hub.unsubscribe(a, &ch("x"));
        assert_eq!(
            changes(&mut f.membership),
            [(ChangeOp::Leave, "x".into(), a)]
        );
        assert_eq!(drain(&mut f.interest), [remove("x")]);
    }

    /// A fan-out pass writes outside every lock: a connection that subscribes elsewhere, or
    /// connects, while a pass over a big channel is writing is not held up by it. (Here the
    /// "pass" is a sink that blocks inside `offer` until the subscribe went through.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fan_out_pass_holds_no_lock_while_writing() {
        #[derive(Debug)]
        struct Blocking {
            kick: Kick,
            entered: std::sync::mpsc::SyncSender<()>,
            go: Mutex<std::sync::mpsc::Receiver<()>>,
        }
        impl Sink for Blocking {
            fn offer(&self, _: ChannelKey, _: &[Outgoing], _: &mut Delivery) {
                let _ = self.entered.send(());
                let _ = lock(&self.go).recv();
            }
            fn kick(&self) -> &Kick {
                &self.kick
            }
            fn enter(&self, _: ChannelKey, _: &str) {}
            fn leave(&self, _: ChannelKey) {}
        }
        let f = Arc::new(fixture(10));
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (go, go_rx) = std::sync::mpsc::channel();
        let blocking = Uuid::new_v4();
        let profile = || Profile {
            user: "u".into(),
            info: None,
        };
        f.hub.add_conn(
            blocking,
            Arc::new(Blocking {
                kick: Kick::new(CancellationToken::new()),
                entered: entered_tx,
                go: Mutex::new(go_rx),
            }),
            profile(),
        );
        f.hub.subscribe(blocking, &ch("big"), false).unwrap();
        let pass = {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut recipients = Recipients::new();
                f.hub.deliver(
                    &ch("big"),
                    key("big"),
                    &event(1, "e"),
                    SOURCE,
                    &mut recipients,
                )
            })
        };
        entered.recv().unwrap(); // the pass is writing
        let (other, _client, _) = conn(&f.hub, 4).await;
        f.hub.subscribe(other, &ch("elsewhere"), false).unwrap();
        f.hub.subscribe(other, &ch("big"), false).unwrap();
        assert_eq!(f.hub.connections(), 2);
        assert_eq!(f.hub.member_count(&ch("big")), 2);
        go.send(()).unwrap();
        assert_eq!(pass.join().unwrap().recipients, 0);
    }
}
