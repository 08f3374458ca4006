//! The hub owns this node's connections and which channels each one is in.
//!
//! It reports interest changes, in order, as [`Interest`] messages: `Add` when a channel gets
//! its first local subscriber and `Remove` when its last one leaves (centrifuge
//! `hub.addSub`), so the node holds a NATS subscription only where a local client wants it.
//! The messages are sent while the hub's lock is held, so `Add` and `Remove` of a channel
//! always alternate in the order the hub saw them.
//!
//! Delivery never waits: each connection has a bounded queue, and a connection whose queue is
//! full is cut off as a slow consumer (tokio-console's `Watch::update` drops full watchers)
//! instead of slowing the node or the other clients.
//!
//! It knows neither NATS nor WebSocket: frames are opaque shared bytes.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use fanout::Channel;
use metrics::gauge;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    disconnect::{self, Disconnect},
    protocol::Frame,
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
}

/// An event frame waiting in a connection's queue, with what the connection needs to skip
/// events it already got from a replay.
#[derive(Debug, Clone)]
pub struct Queued {
    pub channel: Channel,
    pub seq: u64,
    pub frame: Frame,
}

/// How the hub reaches one connection: its queue and its cut-off switch.
#[derive(Debug, Clone)]
pub struct Recipient {
    queue: mpsc::Sender<Queued>,
    kick: Kick,
}

impl Recipient {
    pub fn new(queue: mpsc::Sender<Queued>, kick: Kick) -> Self {
        Recipient { queue, kick }
    }

    /// Queues `frame` without waiting; a full queue cuts the connection off.
    fn offer(&self, channel: &Channel, seq: u64, frame: &Frame, outcome: &mut Delivery) {
        let queued = Queued {
            channel: channel.clone(),
            seq,
            frame: frame.clone(),
        };
        match self.queue.try_send(queued) {
            Ok(()) => outcome.delivered += 1,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.kick.kick(disconnect::SLOW_CONSUMER) {
                    outcome.slow += 1;
                }
            }
            // The connection is on its way out; the hub hears of it next.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
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
    /// Queued for this many connections.
    pub delivered: usize,
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
    recipient: Recipient,
    channels: HashSet<Channel>,
}

#[derive(Debug)]
struct ChannelEntry {
    subscribers: HashMap<ConnId, Recipient>,
    generation: u64,
    /// True once the upstream subscription for this generation is in place.
    live: watch::Sender<bool>,
}

impl Hub {
    pub fn new(max_subscriptions: usize, interest: mpsc::UnboundedSender<Interest>) -> Self {
        Hub {
            state: Mutex::default(),
            interest,
            next_generation: AtomicU64::new(1),
            max_subscriptions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing every connection would, so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_conn(&self, id: ConnId, recipient: Recipient) {
        gauge!("fanout_ws_connections").increment(1.0);
        self.lock().conns.insert(
            id,
            ConnEntry {
                recipient,
                channels: HashSet::new(),
            },
        );
    }

    /// Forgets a connection and leaves all its channels.
    pub fn remove_conn(&self, id: ConnId) {
        let mut state = self.lock();
        let Some(conn) = state.conns.remove(&id) else {
            return;
        };
        gauge!("fanout_ws_connections").decrement(1.0);
        for channel in conn.channels {
            self.leave(&mut state, id, &channel);
        }
    }

    /// Adds `id` to `channel`. Idempotent. The returned receiver turns `true` once the node
    /// receives the channel's events.
    pub fn subscribe(
        &self,
        id: ConnId,
        channel: &Channel,
    ) -> Result<watch::Receiver<bool>, SubscribeError> {
        let mut state = self.lock();
        let State { conns, channels } = &mut *state;
        let conn = conns.get_mut(&id).ok_or(SubscribeError::UnknownConn)?;
        if !conn.channels.contains(channel) {
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
                subscribers: HashMap::new(),
                generation,
                live: watch::Sender::new(false),
            }
        });
        entry.subscribers.insert(id, conn.recipient.clone());
        Ok(entry.live.subscribe())
    }

    /// Removes `id` from `channel`. Returns whether it was subscribed.
    pub fn unsubscribe(&self, id: ConnId, channel: &Channel) -> bool {
        let mut state = self.lock();
        let was = state
            .conns
            .get_mut(&id)
            .is_some_and(|conn| conn.channels.remove(channel));
        if was {
            self.leave(&mut state, id, channel);
        }
        was
    }

    fn leave(&self, state: &mut State, id: ConnId, channel: &Channel) {
        gauge!("fanout_ws_subscriptions").decrement(1.0);
        if let Some(entry) = state.channels.get_mut(channel) {
            entry.subscribers.remove(&id);
            if entry.subscribers.is_empty() {
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

    /// Offers event `seq`'s `frame` to every subscriber of `channel`; for `broadcast`, to
    /// every connection.
    pub fn deliver(&self, channel: &Channel, seq: u64, frame: &Frame) -> Delivery {
        let mut outcome = Delivery::default();
        let state = self.lock();
        if channel.is_broadcast() {
            for conn in state.conns.values() {
                conn.recipient.offer(channel, seq, frame, &mut outcome);
            }
        } else if let Some(entry) = state.channels.get(channel) {
            for recipient in entry.subscribers.values() {
                recipient.offer(channel, seq, frame, &mut outcome);
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
            .map(|c| c.recipient.kick.clone())
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
            .map(|(channel, entry)| (channel.clone(), entry.subscribers.len()))
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
    }

    fn fixture(max_subscriptions: usize) -> Fixture {
        let (tx, interest) = mpsc::unbounded_channel();
        Fixture {
            hub: Hub::new(max_subscriptions, tx),
            interest,
        }
    }

    fn conn(hub: &Hub, queue: usize) -> (ConnId, mpsc::Receiver<Queued>, Kick) {
        let id = Uuid::new_v4();
        let (tx, rx) = mpsc::channel(queue);
        let kick = Kick::new(CancellationToken::new());
        hub.add_conn(id, Recipient::new(tx, kick.clone()));
        (id, rx, kick)
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

    #[test]
    fn reports_first_and_last_local_subscriber() {
        let mut f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4);
        let (b, _rb, _) = conn(&f.hub, 4);
        f.hub.subscribe(a, &ch("x")).unwrap();
        f.hub.subscribe(b, &ch("x")).unwrap();
        f.hub.subscribe(a, &ch("x")).unwrap(); // idempotent
        assert_eq!(drain(&mut f.interest), [add("x", 1)]);
        assert!(f.hub.unsubscribe(a, &ch("x")));
        assert!(!f.hub.unsubscribe(a, &ch("x")));
        assert_eq!(drain(&mut f.interest), []);
        f.hub.remove_conn(b);
        assert_eq!(drain(&mut f.interest), [remove("x")]);
        f.hub.subscribe(a, &ch("x")).unwrap();
        assert_eq!(drain(&mut f.interest), [add("x", 2)]);
        assert_eq!(f.hub.channels(), [(ch("x"), 1)]);
    }

    #[test]
    fn live_only_for_the_current_generation() {
        let f = fixture(10);
        let (a, _ra, _) = conn(&f.hub, 4);
        let first = f.hub.subscribe(a, &ch("x")).unwrap();
        f.hub.unsubscribe(a, &ch("x"));
        let second = f.hub.subscribe(a, &ch("x")).unwrap();
        f.hub.set_live(&ch("x"), 1); // the ended stretch: no effect
        assert!(!*second.borrow());
        f.hub.set_live(&ch("x"), 2);
        assert!(*second.borrow());
        assert!(!*first.borrow());
    }

    #[test]
    fn limits_subscriptions_per_connection() {
        let f = fixture(2);
        let (a, _ra, _) = conn(&f.hub, 4);
        f.hub.subscribe(a, &ch("x")).unwrap();
        f.hub.subscribe(a, &ch("y")).unwrap();
        assert_eq!(
            f.hub.subscribe(a, &ch("z")).unwrap_err(),
            SubscribeError::TooMany(2)
        );
        f.hub.subscribe(a, &ch("y")).unwrap(); // re-subscribing is not a new one
        assert_eq!(
            f.hub.subscribe(Uuid::new_v4(), &ch("x")).unwrap_err(),
            SubscribeError::UnknownConn
        );
    }

    #[test]
    fn delivers_to_subscribers_only_and_broadcasts_to_all() {
        let f = fixture(10);
        let (a, mut ra, _) = conn(&f.hub, 4);
        let (_b, mut rb, _) = conn(&f.hub, 4);
        f.hub.subscribe(a, &ch("x")).unwrap();
        let frame = Frame::from("e1");
        assert_eq!(f.hub.deliver(&ch("x"), 1, &frame).delivered, 1);
        assert_eq!(f.hub.deliver(&ch("y"), 2, &frame).delivered, 0);
        let queued = ra.try_recv().unwrap();
        assert_eq!((queued.frame.as_str(), queued.seq), ("e1", 1));
        assert_eq!(queued.channel, ch("x"));
        assert!(rb.try_recv().is_err());
        let b1 = Frame::from("b1");
        assert_eq!(f.hub.deliver(&Channel::broadcast(), 3, &b1).delivered, 2);
        assert_eq!(ra.try_recv().unwrap().frame, "b1");
        assert_eq!(rb.try_recv().unwrap().frame, "b1");
    }

    #[test]
    fn a_full_queue_cuts_off_only_that_connection() {
        let f = fixture(10);
        let (slow, _keep_open, slow_kick) = conn(&f.hub, 2);
        let (fast, mut fast_rx, fast_kick) = conn(&f.hub, 2);
        f.hub.subscribe(slow, &ch("x")).unwrap();
        f.hub.subscribe(fast, &ch("x")).unwrap();
        let mut slow_count = 0;
        for i in 0..5 {
            let outcome = f.hub.deliver(&ch("x"), i, &Frame::from(format!("e{i}")));
            slow_count += outcome.slow;
            assert_eq!(fast_rx.try_recv().unwrap().frame, format!("e{i}").as_str());
        }
        assert_eq!(slow_count, 1, "kicked once, however many frames overflow");
        assert!(slow_kick.token().is_cancelled());
        assert_eq!(slow_kick.reason(), disconnect::SLOW_CONSUMER);
        assert!(!fast_kick.token().is_cancelled());
    }
}
