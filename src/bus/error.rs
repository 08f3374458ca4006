//! What can go wrong at the NATS boundary. Callers map it to their own answers (the API:
//! 503).

use std::time::Duration;

/// Errors at the NATS boundary. Callers map them to their own answers (the API: 503).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid NATS server URL {url:?}: {source}")]
    InvalidUrl {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the NATS client: {0}")]
    Connect(#[from] async_nats::ConnectError),
    #[error("NATS refused this process: {0}")]
    Refused(String),
    #[error("invalid NATS link setting {setting}: {message}")]
    Link {
        setting: &'static str,
        message: String,
    },
    #[error("NATS is not available: {0}")]
    Unavailable(&'static str),
    #[error("no acknowledgement from the stream within {0:?}")]
    Timeout(Duration),
    #[error("publish failed: {0}")]
    Publish(#[source] async_nats::jetstream::context::PublishError),
    #[error("subscribe failed: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot read the stream's history: {0}")]
    History(#[source] async_nats::jetstream::stream::DirectGetError),
    #[error("cannot read the stream's history from its leader: {0}")]
    Leader(#[source] async_nats::jetstream::stream::RawMessageError),
    #[error("cannot create or update stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
}

impl BusError {
    /// A short, stable name for metrics labels and span attributes.
    pub fn kind(&self) -> &'static str {
        match self {
            BusError::InvalidUrl { .. } => "invalid_url",
            BusError::Connect(_) | BusError::Refused(_) | BusError::Link { .. } => "connect",
            BusError::Unavailable(_) => "unavailable",
            BusError::Timeout(_) => "timeout",
            BusError::Publish(_) => "publish",
            BusError::Subscribe(_) => "subscribe",
            BusError::History(_) | BusError::Leader(_) => "history",
            BusError::Stream { .. } => "stream",
        }
    }
}

/// A message on an event subject that is not a well-formed stored event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no valid Nats-Sequence header: not a message republished by the stream")]
    NoSequence,
    #[error("republished by stream {0:?}, which is no region's")]
    UnknownStream(String),
    #[error("a volatile event from region {0:?}, which is not one of this tier's")]
    UnknownRegion(String),
}
