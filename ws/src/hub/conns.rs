//! This node's connections: each one's sink, who it is, and which channels it is in. Sharded
//! (64 shards, as centrifuge's `hub.go`): each shard a std mutex held for a few map
//! operations, never while another lock is taken or a socket is written.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
};

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
            count: AtomicUsize::new(0),
        }
    }

    fn shard(&self, id: &ConnId) -> MutexGuard<'_, HashMap<ConnId, Conn>> {
        lock(&self.shards[id.as_u128() as usize % SHARDS])
    }

    pub(super) fn insert(&self, id: ConnId, conn: Conn) {
        gauge!("fanout_ws_connections").increment(1.0);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.shard(&id).insert(id, conn);
    }

    pub(super) fn remove(&self, id: ConnId) -> Option<Conn> {
        let conn = self.shard(&id).remove(&id)?;
        gauge!("fanout_ws_connections").decrement(1.0);
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(conn)
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
