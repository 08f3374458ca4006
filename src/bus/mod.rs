//! The NATS bus: the only code that imports `async_nats`. A handle for each job, as
//! async-nats hands out `Client` → `jetstream::Context` → `Stream`:
//!
//! - [`Bus`] (`client.rs`): the connection (it reconnects forever; its state is readable at
//!   any time), a channel's live events ([`Subscription`], `subscription.rs`), and the
//!   handles below;
//! - [`EventLog`] (`log.rs`): the stream, per region: publishing into it (one event, or a
//!   batch acknowledged on one subscription: `acks.rs`), its epoch, and reading a channel's
//!   history back (replay, gap repair);
//! - the provisioner (`provisioner.rs`): a task that makes the stream and, with regions,
//!   the mirrors of the other regions' with our settings after every (re)connect, and watches
//!   the mirrors;
//! - [`Rpc`] (`rpc.rs`): fanout's messages between processes, not stored: presence changes
//!   and queries (`presence.rs`), stats queries (`stats.rs`), node announcements
//!   (`discovery.rs`);
//! - [`Lifecycle`] (`lifecycle.rs`): lifecycle events (the nodes' deltas, each channel's
//!   state, the decided events, their delivery's lease and dead letters);
//! - [`Rules`] (`control.rs`): server-side control: commands to every ws node
//!   (`Rpc::control`) and the rules that outlive them (blocks, revoked tokens, removed
//!   histories) in a key-value bucket every node follows;
//! - [`Topology`] (`topology.rs`): the tier's regions, and every subject and stream name,
//!   derived in one place from the prefix and the regions;
//! - `link.rs`: how this process reaches NATS (TLS, credentials); `error.rs`: [`BusError`].
//!
//! It does not know about HTTP, WebSocket clients or which channels anyone wants: callers
//! say what to publish and what to subscribe to.

mod acks;
mod client;
mod control;
mod discovery;
mod error;
mod lifecycle;
mod link;
mod log;
mod presence;
mod provisioner;
mod rpc;
mod stats;
mod subscription;
mod topology;

pub use client::Bus;
pub use control::{RuleChange, Rules};
pub use error::{BusError, DecodeError};
pub use lifecycle::{Batch, Events, Incoming, LEASE, Lifecycle};
pub use log::{EventLog, Published};
pub use presence::PresenceChanges;
pub use provisioner::DUPLICATE_WINDOW;
pub use rpc::Rpc;
pub use subscription::Subscription;
pub use topology::Topology;
