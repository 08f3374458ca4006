//! A channel's live events: what the stream republishes, decoded into [`Envelope`]s.

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{error::DecodeError, topology::Topology};
use crate::{
    Channel,
    envelope::{
        BINARY, Envelope, HEADER_ENCODING, HEADER_EVENT, HEADER_EXCLUDE, HEADER_ID, HEADER_REGION,
        HEADER_TS, HEADER_VOLATILE,
    },
    time::now_ms,
};

// Header names JetStream reads or writes.
pub(super) const NATS_MESSAGE_ID: &str = "Nats-Msg-Id";
const NATS_SEQUENCE: &str = "Nats-Sequence";
const NATS_LAST_SEQUENCE: &str = "Nats-Last-Sequence";
const NATS_STREAM: &str = "Nats-Stream";

/// Events of one channel, in stream order, decoded into [`Envelope`]s.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pub(super) channel: Channel,
    pub(super) subject: String,
    pub(super) subscriber: async_nats::Subscriber,
    pub(super) topology: Topology,
}

impl Subscription {
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The NATS subject it listens on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The next event; `None` once the subscription is closed (drain or shutdown).
    pub async fn next(&mut self) -> Option<Result<Envelope, DecodeError>> {
        let message = self.subscriber.next().await?;
        Some(self.decode(message))
    }

    fn decode(&self, message: async_nats::Message) -> Result<Envelope, DecodeError> {
        let headers = message.headers.as_ref();
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        if header(HEADER_VOLATILE).is_some() {
            return self.decode_volatile(message);
        }
        let stream = header(NATS_STREAM);
        let region = self
            .topology
            .region_of_stream(stream)
            .ok_or_else(|| DecodeError::UnknownStream(stream.unwrap_or_default().to_string()))?;
        let mut envelope = decode(&self.channel, message)?;
        envelope.region = region;
        envelope.region_name = self.topology.regions().get(region as usize).cloned();
        Ok(envelope)
    }

    /// A volatile event: published straight to this subject, its region in a header.
    fn decode_volatile(&self, message: async_nats::Message) -> Result<Envelope, DecodeError> {
        let headers = message.headers.unwrap_or_default();
        let region = match headers.get(HEADER_REGION).map(|v| v.as_str()) {
            None if self.topology.count() <= 1 => 0,
            named => named
                .and_then(|name| self.topology.index(name))
                .ok_or_else(|| DecodeError::UnknownRegion(named.unwrap_or_default().to_string()))?,
        };
        let mut envelope = envelope(&self.channel, 0, 0, &headers, message.payload);
        envelope.volatile = true;
        envelope.region = region;
        envelope.region_name = self.topology.regions().get(region as usize).cloned();
        Ok(envelope)
    }
}

fn decode(channel: &Channel, message: async_nats::Message) -> Result<Envelope, DecodeError> {
    let headers = message.headers.unwrap_or_default();
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.as_str().parse::<u64>().ok())
    };
    let seq = number(NATS_SEQUENCE).ok_or(DecodeError::NoSequence)?;
    let last_seq = number(NATS_LAST_SEQUENCE).unwrap_or(0);
    Ok(envelope(channel, seq, last_seq, &headers, message.payload))
}

/// An envelope from a message's headers: live (republished) or read back from the stream.
pub(super) fn envelope(
    channel: &Channel,
    seq: u64,
    last_seq: u64,
    headers: &HeaderMap,
    data: Bytes,
) -> Envelope {
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    Envelope {
        channel: channel.clone(),
        volatile: false,
        seq,
        last_seq,
        id: header(HEADER_ID)
            .or_else(|| header(NATS_MESSAGE_ID))
            .unwrap_or_default()
            .to_string(),
        ts: header(HEADER_TS)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(now_ms),
        region: 0,
        region_name: None,
        traceparent: header("traceparent").map(String::from),
        tracestate: header("tracestate").map(String::from),
        data,
        binary: header(HEADER_ENCODING) == Some(BINARY),
        name: header(HEADER_EVENT).map(String::from),
        exclude: header(HEADER_EXCLUDE).and_then(|v| v.parse().ok()),
    }
}
