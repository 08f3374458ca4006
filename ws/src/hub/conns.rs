//! This node's connections: each one's sink, who it is, and which channels it is in, and
//! each user's connections (for server-side control: `POST /v1/users/{user}/...`). Sharded
//! (64 shards, as centrifuge's `hub.go`; users by a hash of their id): each shard a std mutex
//! held for a few map operations, never while another lock is taken or a socket is written.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::BuildHasher,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

use smallvec::SmallVec;
use tokio::sync::Notify;

use fanout::Channel;
use metrics::gauge;
use serde_json::value::RawValue;

use super::{
    observer::Profile,
    shard::{SHARDS, lock, shards},
};
use crate::position::ConnId;
use crate::sink::{Kick, Sink};

#[derive(Debug)]
pub struct Conns {
    shards: Box<[Mutex<HashMap<ConnId, Conn>>]>,
    /// Each user's connections, sharded by a hash of the user id.
    users: Box<[Mutex<Users>]>,
    hasher: std::hash::RandomState,
    /// Connections, without locking every shard to count them.
    count: AtomicUsize,
}

#[derive(Debug)]
pub(super) struct Conn {
    pub sink: Arc<dyn Sink>,
    pub channels: HashSet<Channel>,
    pub profile: Arc<Profile>,
    /// Not a member for presence (a long-poll, which is there only while it waits).
    pub hidden: bool,
    pub about: About,
}

/// One shard of the users' connections: most users have one or two (inline, no allocation
/// of their own); a user with thousands costs a scan of them when one leaves.
type Users = HashMap<Arc<str>, SmallVec<[ConnId; 1]>>;

/// What server-side control needs to know of a connection.
#[derive(Debug, Default)]
pub struct About {
    /// Whose it is (a long-poll's too, though it is nobody's member).
    pub user: Arc<str>,
    /// `websocket`, `sse`, `webtransport` or `long_poll`.
    pub transport: &'static str,
    /// When it connected (unix ms).
    pub since: u64,
    /// Its token's `jti` and `iat`, if it has a token (they change with a `refresh`).
    pub jti: Option<Box<str>>,
    pub issued_at: Option<u64>,
    /// Where server-side orders reach its task (none: a long-poll, which has no task of its
    /// own between polls).
    pub mailbox: Option<Arc<Mailbox>>,
}

/// An order from the app's backend to one connection, carried out by the connection's own
/// task (every change of a connection's memberships comes from its task, one at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Order {
    Subscribe(Channel),
    Unsubscribe(Channel),
}

/// A connection's orders, waiting for its task. Bounded: beyond [`Mailbox::CAPACITY`] an
/// order is refused (the answer counts only those taken).
#[derive(Debug, Default)]
pub struct Mailbox {
    orders: Mutex<VecDeque<Order>>,
    ready: Notify,
}

impl Mailbox {
    pub const CAPACITY: usize = 64;

    /// Leaves `order` for the connection's task; false when its mailbox is full.
    pub fn post(&self, order: Order) -> bool {
        let mut orders = lock(&self.orders);
        if orders.len() >= Self::CAPACITY {
            return false;
        }
        orders.push_back(order);
        drop(orders);
        self.ready.notify_one();
        true
    }

    /// Waits until an order may be waiting.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Takes every waiting order, oldest first.
    pub fn take(&self) -> Vec<Order> {
        lock(&self.orders).drain(..).collect()
    }
}

/// What a connection brings to a channel it joins.
#[derive(Debug)]
pub(super) struct Joining {
    pub sink: Arc<dyn Sink>,
    pub profile: Arc<Profile>,
    pub hidden: bool,
    /// Not in the channel before: a join (else only its presence wish may change).
    pub new: bool,
}

/// Why a connection cannot join a channel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("this connection is in {0} channels already, the limit")]
    TooMany(usize),
    #[error("unknown connection")]
    UnknownConn,
}

impl Conns {
    pub(super) fn new() -> Conns {
        Conns {
            shards: shards(),
            users: shards(),
            hasher: std::hash::RandomState::new(),
            count: AtomicUsize::new(0),
        }
    }

    fn user_shard(&self, user: &str) -> MutexGuard<'_, Users> {
        lock(&self.users[self.hasher.hash_one(user) as usize % SHARDS])
    }

    fn shard(&self, id: &ConnId) -> MutexGuard<'_, HashMap<ConnId, Conn>> {
        lock(&self.shards[id.as_u128() as usize % SHARDS])
    }

    pub(super) fn insert(&self, id: ConnId, conn: Conn) {
        gauge!("fanout_ws_connections").increment(1.0);
        self.count.fetch_add(1, Ordering::Relaxed);
        let user = conn.about.user.clone();
        self.shard(&id).insert(id, conn);
        self.user_shard(&user).entry(user).or_default().push(id);
    }

    pub(super) fn remove(&self, id: ConnId) -> Option<Conn> {
        let conn = self.shard(&id).remove(&id)?;
        let user = &conn.about.user;
        let mut users = self.user_shard(user);
        if let Some(conns) = users.get_mut(user) {
            conns.retain(|c| *c != id);
            if conns.is_empty() {
                users.remove(user);
            }
        }
        drop(users);
        gauge!("fanout_ws_connections").decrement(1.0);
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(conn)
    }

    /// The connections of `user`.
    pub fn of_user(&self, user: &str) -> Vec<ConnId> {
        self.user_shard(user)
            .get(user)
            .map(|conns| conns.to_vec())
            .unwrap_or_default()
    }

    /// Runs `f` on connection `id`'s sink and what is known about it, if it is here.
    pub fn with<T>(
        &self,
        id: ConnId,
        f: impl FnOnce(&Arc<dyn Sink>, &About, &HashSet<Channel>) -> T,
    ) -> Option<T> {
        let conns = self.shard(&id);
        let conn = conns.get(&id)?;
        Some(f(&conn.sink, &conn.about, &conn.channels))
    }

    /// Every connection that `pick` picks (by what is known about it), with its sink.
    pub fn picked(&self, mut pick: impl FnMut(&About) -> bool) -> Vec<Arc<dyn Sink>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(
                lock(shard)
                    .values()
                    .filter(|c| pick(&c.about))
                    .map(|c| c.sink.clone()),
            );
        }
        out
    }

    /// Connection `id` is `user`'s from now on (a Pusher connection's sign-in): found by
    /// `user` ([`Conns::of_user`]) and a member as `user` of the channels it joins next.
    pub fn set_user(&self, id: ConnId, user: &str) {
        let user: Arc<str> = user.into();
        let old = {
            let mut conns = self.shard(&id);
            let Some(conn) = conns.get_mut(&id) else {
                return;
            };
            conn.profile = Arc::new(Profile {
                user: user.clone(),
                info: conn.profile.info.clone(),
            });
            std::mem::replace(&mut conn.about.user, user.clone())
        };
        if old == user {
            return;
        }
        {
            let mut users = self.user_shard(&old);
            if let Some(conns) = users.get_mut(&old) {
                conns.retain(|c| *c != id);
                if conns.is_empty() {
                    users.remove(&old);
                }
            }
        }
        self.user_shard(&user).entry(user).or_default().push(id);
    }

    /// Records connection `id`'s new token (a `refresh`).
    pub fn set_token(&self, id: ConnId, jti: Option<&str>, issued_at: Option<u64>) {
        if let Some(conn) = self.shard(&id).get_mut(&id) {
            conn.about.jti = jti.map(Into::into);
            conn.about.issued_at = issued_at;
        }
    }

    /// Puts `channel` in connection `id`'s channels, unless that would pass `max`.
    pub(super) fn join(
        &self,
        id: ConnId,
        channel: &Channel,
        max: usize,
    ) -> Result<Joining, SubscribeError> {
        let mut conns = self.shard(&id);
        let conn = conns.get_mut(&id).ok_or(SubscribeError::UnknownConn)?;
        let new = !conn.channels.contains(channel);
        if new {
            if conn.channels.len() >= max {
                return Err(SubscribeError::TooMany(max));
            }
            conn.channels.insert(channel.clone());
            gauge!("fanout_ws_subscriptions").increment(1.0);
        }
        Ok(Joining {
            sink: conn.sink.clone(),
            profile: conn.profile.clone(),
            hidden: conn.hidden,
            new,
        })
    }

    /// Takes `channel` out of connection `id`'s channels: its sink, if it was in.
    pub(super) fn leave(&self, id: ConnId, channel: &Channel) -> Option<Arc<dyn Sink>> {
        let mut conns = self.shard(&id);
        let conn = conns.get_mut(&id)?;
        if !conn.channels.remove(channel) {
            return None;
        }
        gauge!("fanout_ws_subscriptions").decrement(1.0);
        Some(conn.sink.clone())
    }

    /// Replaces connection `id`'s presence info: its new profile and its channels.
    pub(super) fn set_info(
        &self,
        id: ConnId,
        info: Option<Box<RawValue>>,
    ) -> Option<(Arc<Profile>, Vec<Channel>)> {
        let mut conns = self.shard(&id);
        let conn = conns.get_mut(&id)?;
        conn.profile = Arc::new(Profile {
            user: conn.profile.user.clone(),
            info,
        });
        Some((
            conn.profile.clone(),
            conn.channels.iter().cloned().collect(),
        ))
    }

    /// Copies every connection's sink into `out`.
    pub fn sinks(&self, out: &mut Vec<Arc<dyn Sink>>) {
        for shard in self.shards.iter() {
            out.extend(lock(shard).values().map(|c| c.sink.clone()));
        }
    }

    /// Every connection's cut-off switch (for draining).
    pub(super) fn kicks(&self) -> Vec<Kick> {
        self.shards
            .iter()
            .flat_map(|shard| {
                lock(shard)
                    .values()
                    .map(|c| c.sink.kick().clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}
