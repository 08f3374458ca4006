//! A channel on this node, from NATS to the hub's members, and back for a client that
//! resumes:
//!
//! - [`interest`]: the node's NATS subscriptions follow its clients' interest, each channel's
//!   subscribe concurrently with the others';
//! - [`reader`]: a channel's events, in order, gaps repaired, encoded once, recorded in its
//!   log and offered to its members;
//! - [`log`]: each channel's recent events and delivered marks, kept by its reader, and the
//!   current log of every channel;
//! - [`recovery`]: the resume decision, a function of values;
//! - [`replay`]: what a resuming client missed, read from the log or the stream.

pub mod interest;
pub mod log;
pub mod reader;
pub mod recovery;
pub mod replay;

pub use log::{Limits, Log, Logs};
pub use reader::Totals;
pub use replay::{Replay, Replayer};
