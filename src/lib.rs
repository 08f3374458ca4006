//! fanout's core library: the pieces both servers share.
//!
//! # Layout
//!
//! - [`config`]: loading settings (defaults < TOML file < `FANOUT_*` environment) and the
//!   settings both binaries share ([`config::Common`]).
//! - [`channel`]: what a channel name may be ([`Channel`]), and the reserved `broadcast`.
//! - [`codes`]: every error code on the wire ([`Code`]).
//! - [`envelope`]: the event as it travels through NATS ([`Envelope`]) and the header names
//!   that carry its id and timestamp.
//! - [`bus`]: the only module that talks to NATS. It builds every subject, owns the
//!   JetStream stream, publishes events and subscribes to channels ([`Bus`]).
//! - [`control`]: server-side control of users and connections: the commands every ws node
//!   carries out, and the rules (blocks, revoked tokens, removed histories) that outlive them.
//! - [`discovery`]: what ws nodes announce about themselves, and the directory of them.
//! - [`post`]: the HTTP client of calls to the app's backend (webhooks, proxy hooks).
//! - [`pusher`]: the Pusher protocol's apps and signatures (`FANOUT_PUSHER_APPS`).
//! - [`presence`]: who is in a channel across nodes: the query, the answers, their parts.
//! - [`stats`]: the tier's live numbers for operators (`GET /v1/stats`): what each node
//!   answers and how the API adds them up.
//! - [`time`]: wall-clock helpers (unix milliseconds, Go's `time.ANSIC` layout).
//! - [`secret`]: secrets in the settings, masked by type; constant-time comparison.
//! - [`shutdown`]: ctrl-c / SIGTERM as a cancellation token.
//! - [`process`]: the `main` both binaries share (settings, socket, signals, exit code).
//! - [`telemetry`]: log output set-up.
//! - [`profiling`]: CPU profiles on demand, in pprof's format.
//!
//! The HTTP API (`fanout-api`) and the WebSocket node (`fanout-ws`) are crates of their own
//! that build on this one.

pub mod bus;
pub mod channel;
pub mod codes;
pub mod config;
pub mod control;
pub mod discovery;
pub mod envelope;
pub mod lifecycle;
pub mod post;
pub mod presence;
pub mod process;
pub mod profiling;
pub mod pusher;
pub mod secret;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod time;

pub use bus::{Bus, BusError, PresenceChanges, Published, Subscription};
pub use channel::{Channel, ChannelError};
pub use codes::Code;
pub use config::{Common, ConfigError};
pub use envelope::{Data, Envelope};
