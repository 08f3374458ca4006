//! What the hub tells the rest of the node, in the order it saw it: a channel's first and
//! last local subscriber ([`Interest`]: the node subscribes in NATS only where a local client
//! wants it, centrifuge's `hub.addSub`), the first and last local client watching a channel's
//! presence, and every membership change ([`Membership`]: presence's joins, leaves and
//! updates). One [`Observer`] hears it all: the hook for the lifecycle events (a channel
//! occupied or vacated, a member added or removed) that the node reports elsewhere.
//!
//! The hub calls the observer under the lock of the channel concerned, so that reports about
//! one channel keep their order: an observer only hands them on (a channel send), never
//! waits.

use std::sync::Arc;

use fanout::{Channel, presence::ChangeOp};
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::position::ConnId;

/// A change of this node's interest in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// The channel got its first local subscriber. `generation` identifies this stretch of
    /// interest; pass it back to [`super::Hub::set_live`] once the upstream subscription is
    /// in place.
    Add { channel: Channel, generation: u64 },
    /// The channel's last local subscriber left.
    Remove { channel: Channel },
    /// A local client asked for the channel's presence changes, the first one to. Pass
    /// `generation` to [`super::Hub::set_watch_live`] once the changes are followed.
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

/// Hears what the hub reports. Called under a hub lock: hand the report on, never wait.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn interest(&self, interest: Interest);
    fn membership(&self, membership: Membership);
}
