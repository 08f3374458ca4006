//! The hub owns this node's connections and which channels each one is in.
//!
//! It reports interest changes, in order, as [`Interest`] messages: `Add` when a channel gets
//! its first local subscriber and `Remove` when its last one leaves (centrifuge
//! `hub.addSub`), so the node holds a NATS subscription only where a local client wants it.
//! The messages are sent while the hub's lock is held, so `Add` and `Remove` of a channel
//! always alternate in the order the hub saw them.
//!
//! Delivery never waits: each event frame is written straight into each subscriber's socket
//! ([`Outbox`]), queued only when the socket is full, and a connection whose queue is full is
//! cut off as a slow consumer (tokio-console's `Watch::update` drops full watchers) instead of
//! slowing the node or the other clients. Each channel's members have their own lock, so
//! writing one channel's event does not hold up the rest of the hub.
//!
//! It is also where presence starts: every subscriber of a channel is a member of it; the hub
//! reports each membership change ([`Membership`]) in order, and `Watch` / `Unwatch` interest
//! when a channel gets its first / loses its last local client that asked for presence
//! changes.
//!
//! It knows neither NATS nor the WebSocket protocol: frames are opaque shared bytes.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use fanout::{Channel, presence::ChangeOp, time::now_ms};
use metrics::gauge;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    disconnect::{self, Disconnect},
    outbox::{ChannelKey, NOT_AN_EVENT, Outbox},
};

/// A connection's id: the `conn` of its `welcome` frame.
pub type ConnId = Uuid;

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

/// Asks a connection to close with a given code. The connection's task watches the token.
#[derive(Debug, Clone)]
pub struct Kick {
    token: CancellationToken,
    reason: Arc<OnceLock<Disconnect>>,
}

impl Kick {
    pub fn new(token: CancellationToken) -> Self {
        Kick {
            token,
            reason: Arc::new(OnceLock::new()),
        }
    }

    /// Records `reason` and cancels the token. Returns false if the connection was already
    /// kicked (the first reason wins).
    pub fn kick(&self, reason: Disconnect) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why the token was cancelled: a kick's reason, else the node is shutting down.
    pub fn reason(&self) -> Disconnect {
        self.reason.get().copied().unwrap_or(disconnect::GOING_AWAY)
    }
}

/// What happened to one frame offered to a channel's subscribers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Frames written (or queued), over all connections.
    pub delivered: usize,
    /// Connections that got them.
    pub recipients: usize,
    /// Bytes of those frames.
    pub bytes: usize,
    /// This many connections were cut off as slow consumers.
    pub slow: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("this connection is in {0} channels already, the limit")]
    TooMany(usize),
    #[error("unknown connection")]
    UnknownConn,
}

#[derive(Debug)]
pub struct Hub {
    /// A std mutex: it is never held across an `.await`, and every critical section is a few
    /// map operations or a loop of non-blocking `try_send`s (mini-redis `db.rs` reasoning).
    state: Mutex<State>,
    interest: mpsc::UnboundedSender<Interest>,
    membership: mpsc::UnboundedSender<Membership>,
    next_generation: AtomicU64,
    max_subscriptions: usize,
}

#[derive(Debug, Default)]
struct State {
    conns: HashMap<ConnId, ConnEntry>,
    channels: HashMap<Channel, ChannelEntry>,
}

#[derive(Debug)]
struct ConnEntry {
    outbox: Arc<Outbox>,
    channels: HashSet<Channel>,
    profile: Arc<Profile>,
}

/// A channel's local subscribers, under their own lock (taken after the hub's, never before).
type Members = Arc<Mutex<HashMap<ConnId, Subscriber>>>;

fn lock_members(members: &Members) -> std::sync::MutexGuard<'_, HashMap<ConnId, Subscriber>> {
    members.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct ChannelEntry {
    subscribers: Members,
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
    outbox: Arc<Outbox>,
    joined_at: u64,
    /// Wants the channel's presence changes.
    watching: bool,
}

/// What [`Hub::subscribe`] hands back to wait on.
#[derive(Debug)]
pub struct Subscribed {
    /// Turns `true` once the node receives the channel's events.
    pub live: watch::Receiver<bool>,
    /// With presence: turns `true` once the node follows the channel's presence changes.
    pub watch_live: Option<watch::Receiver<bool>>,
}

impl Hub {
    pub fn new(
        max_subscriptions: usize,
        interest: mpsc::UnboundedSender<Interest>,
        membership: mpsc::UnboundedSender<Membership>,
    ) -> Self {
        Hub {
            state: Mutex::default(),
            interest,
            membership,
            next_generation: AtomicU64::new(1),
            max_subscriptions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing every connection would, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_conn(&self, id: ConnId, outbox: Arc<Outbox>, profile: Profile) {
        gauge!("fanout_ws_connections").increment(1.0);
        self.lock().conns.insert(
            id,
            ConnEntry {
                outbox,
                channels: HashSet::new(),
                profile: Arc::new(profile),
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
        let mut state = self.lock();
        let Some(conn) = state.conns.remove(&id) else {
            return;
        };
        gauge!("fanout_ws_connections").decrement(1.0);
        for channel in conn.channels {
            self.leave(&mut state, id, &channel, &conn.profile);
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
        let mut state = self.lock();
        let State { conns, channels } = &mut *state;
        let conn = conns.get_mut(&id).ok_or(SubscribeError::UnknownConn)?;
        let joins = !conn.channels.contains(channel);
        if joins {
            if conn.channels.len() >= self.max_subscriptions {
                return Err(SubscribeError::TooMany(self.max_subscriptions));
            }
            conn.channels.insert(channel.clone());
            gauge!("fanout_ws_subscriptions").increment(1.0);
        }
        let entry = channels.entry(channel.clone()).or_insert_with(|| {
            gauge!("fanout_ws_channels").increment(1.0);
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            let _ = self.interest.send(Interest::Add {
                channel: channel.clone(),
                generation,
            });
            ChannelEntry {
                subscribers: Members::default(),
                generation,
                live: watch::Sender::new(false),
                watchers: 0,
                watch_generation: 0,
                watch_live: watch::Sender::new(false),
            }
        });
        let mut members = lock_members(&entry.subscribers);
        let subscriber = members.entry(id).or_insert_with(|| Subscriber {
            outbox: conn.outbox.clone(),
            joined_at: now_ms(),
            watching: false,
        });
        if joins {
            self.report(
                ChangeOp::Join,
                channel,
                id,
                &conn.profile,
                subscriber.joined_at,
            );
        }
        let flip = subscriber.watching != presence;
        subscriber.watching = presence;
        drop(members);
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
        let mut state = self.lock();
        let Some(conn) = state.conns.get_mut(&id) else {
            return false;
        };
        if !conn.channels.remove(channel) {
            return false;
        }
        let profile = conn.profile.clone();
        self.leave(&mut state, id, channel, &profile);
        true
    }

    fn leave(&self, state: &mut State, id: ConnId, channel: &Channel, profile: &Arc<Profile>) {
        gauge!("fanout_ws_subscriptions").decrement(1.0);
        if let Some(entry) = state.channels.get_mut(channel) {
            let (left, empty) = {
                let mut members = lock_members(&entry.subscribers);
                let left = members.remove(&id);
                (left, members.is_empty())
            };
            if let Some(subscriber) = left {
                self.report(ChangeOp::Leave, channel, id, profile, subscriber.joined_at);
                if subscriber.watching {
                    self.unwatch(entry, channel);
                }
            }
            if empty {
                state.channels.remove(channel);
                gauge!("fanout_ws_channels").decrement(1.0);
                let _ = self.interest.send(Interest::Remove {
                    channel: channel.clone(),
                });
            }
        }
    }

    /// Marks `channel` as receiving events, if its interest is still the stretch that
    /// `generation` named (it may have ended, and begun again, in the meantime).
    pub fn set_live(&self, channel: &Channel, generation: u64) {
        let state = self.lock();
        if let Some(entry) = state.channels.get(channel)
            && entry.generation == generation
        {
            entry.live.send_replace(true);
        }
    }

    /// Marks `channel`'s presence changes as followed, if `generation` is still the current
    /// stretch of watching.
    pub fn set_watch_live(&self, channel: &Channel, generation: u64) {
        let state = self.lock();
        if let Some(entry) = state.channels.get(channel)
            && entry.watchers > 0
            && entry.watch_generation == generation
        {
            entry.watch_live.send_replace(true);
        }
    }

    /// Replaces connection `id`'s presence info and reports an update in each of its
    /// channels. Returns false for an unknown connection.
    pub fn set_info(&self, id: ConnId, info: Option<Box<RawValue>>) -> bool {
        let mut state = self.lock();
        let State { conns, channels } = &mut *state;
        let Some(conn) = conns.get_mut(&id) else {
            return false;
        };
        conn.profile = Arc::new(Profile {
            user: conn.profile.user.clone(),
            info,
        });
        for channel in &conn.channels {
            let joined_at = channels
                .get(channel)
                .and_then(|e| lock_members(&e.subscribers).get(&id).map(|s| s.joined_at));
            if let Some(joined_at) = joined_at {
                self.report(ChangeOp::Update, channel, id, &conn.profile, joined_at);
            }
        }
        true
    }

    /// This node's members of `channel`.
    pub fn members(&self, channel: &Channel) -> Vec<LocalMember> {
        let state = self.lock();
        let Some(entry) = state.channels.get(channel) else {
            return Vec::new();
        };
        lock_members(&entry.subscribers)
            .iter()
            .filter_map(|(conn, subscriber)| {
                Some(LocalMember {
                    conn: *conn,
                    profile: state.conns.get(conn)?.profile.clone(),
                    joined_at: subscriber.joined_at,
                })
            })
            .collect()
    }

    /// How many members `channel` has on this node.
    pub fn member_count(&self, channel: &Channel) -> usize {
        self.lock()
            .channels
            .get(channel)
            .map_or(0, |entry| lock_members(&entry.subscribers).len())
    }

    /// Offers a presence change's `frame` to the subscribers of `channel` that asked for
    /// presence changes.
    pub fn deliver_presence(&self, channel: &Channel, frame: &Bytes) -> Delivery {
        let mut outcome = Delivery::default();
        let Some(members) = self.members_of(channel) else {
            return outcome;
        };
        for subscriber in lock_members(&members).values().filter(|s| s.watching) {
            subscriber
                .outbox
                .offer(NOT_AN_EVENT, 0, frame, &mut outcome);
        }
        outcome
    }

    fn members_of(&self, channel: &Channel) -> Option<Members> {
        let state = self.lock();
        state.channels.get(channel).map(|e| e.subscribers.clone())
    }

    /// Offers consecutive events of `channel`, as (seq, encoded frame), to every subscriber
    /// (for `broadcast`, every connection): each gets them with one write. Only the channel's
    /// own lock is held while writing.
    pub fn deliver_batch(
        &self,
        channel: &Channel,
        key: ChannelKey,
        frames: &[(u64, Bytes)],
    ) -> Delivery {
        let mut outcome = Delivery::default();
        if channel.is_broadcast() {
            let everyone: Vec<Arc<Outbox>> = self
                .lock()
                .conns
                .values()
                .map(|c| c.outbox.clone())
                .collect();
            for outbox in everyone {
                outbox.offer_batch(key, frames, &mut outcome);
            }
        } else if let Some(members) = self.members_of(channel) {
            for subscriber in lock_members(&members).values() {
                subscriber.outbox.offer_batch(key, frames, &mut outcome);
            }
        }
        outcome
    }

    /// Every connection's cut-off switch (for draining).
    pub fn kicks(&self) -> Vec<Kick> {
        let state = self.lock();
        state
            .conns
            .values()
            .map(|c| c.outbox.kick().clone())
            .collect()
    }

    /// Number of connections.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Channels with at least one local subscriber, with their subscriber counts.
    pub fn channels(&self) -> Vec<(Channel, usize)> {
        let state = self.lock();
        let mut channels: Vec<_> = state
            .channels
            .iter()
            .map(|(channel, entry)| (channel.clone(), lock_members(&entry.subscribers).len()))
            .collect();
        channels.sort();
        channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        hub: Hub,
        interest: mpsc::UnboundedReceiver<Interest>,
        membership: mpsc::UnboundedReceiver<Membership>,
    }

    fn fixture(max_subscriptions: usize) -> Fixture {
        let (tx, interest) = mpsc::unbounded_channel();
        let (members_tx, membership) = mpsc::unbounded_channel();
        Fixture {
            hub: Hub::new(max_subscriptions, tx, members_tx),
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
    ) -> (ConnId, tokio::net::TcpStream, Kick, Arc<Outbox>) {
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
        let outbox = Arc::new(Outbox::new(server, kick.clone(), capacity));
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

    fn bytes(text: &str) -> Bytes {
        Bytes::copy_from_slice(text.as_bytes())
    }

    const KEY: ChannelKey = 7;

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
        let frame = bytes("e1;");
        assert_eq!(
            f.hub
                .deliver_batch(&ch("x"), KEY, &[(1, frame.clone())])
                .delivered,
            1
        );
        assert_eq!(
            f.hub
                .deliver_batch(&ch("y"), KEY, &[(2, frame.clone())])
                .delivered,
            0
        );
        let b1 = bytes("b1;");
        assert_eq!(
            f.hub
                .deliver_batch(&Channel::broadcast(), KEY, &[(3, b1.clone())])
                .delivered,
            2
        );
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
        let frame = Bytes::from(vec![b'x'; 64 * 1024]);
        let rounds = 200;
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0; rounds * 64 * 1024];
            fast_rx.read_exact(&mut buf).await.unwrap();
        });
        let mut slow_count = 0;
        for seq in 1..=rounds as u64 {
            slow_count += f
                .hub
                .deliver_batch(&ch("x"), KEY, &[(seq, frame.clone())])
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
        let frame = bytes("join;");
        assert_eq!(f.hub.deliver_presence(&ch("x"), &frame).delivered, 1);
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
}
