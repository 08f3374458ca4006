//! The event as it travels from the API through NATS to the WebSocket nodes.
//!
//! The stored NATS message carries the event's data (the JSON the publisher posted, byte for
//! byte) as its payload and everything else in headers, so the payload is never re-encoded:
//!
//! | header | set by | meaning |
//! |---|---|---|
//! | `Fanout-Id` | API | event id (UUID v4) |
//! | `Fanout-Ts` | API | unix milliseconds at publish |
//! | `Nats-Msg-Id` | API | the `Idempotency-Key`, when the publisher gave one; JetStream de-duplicates on it |
//! | `Nats-Sequence` | JetStream RePublish | the event's stream sequence (`seq`) |
//! | `Nats-Last-Sequence` | JetStream RePublish | previous sequence on the same channel, or 0 |
//! | `Nats-Stream` | JetStream RePublish | the stream that stored it: with regions, its origin region's |
//! | `traceparent`, `tracestate` | API, when tracing | W3C trace context of the API's `publish` span |
//! | `Fanout-Volatile` | publisher of a volatile event | `1`: not stored, no sequence, published straight to the ws nodes' subject |
//! | `Fanout-Region` | publisher of a volatile event | the region it was published in (with regions) |
//! | `Fanout-Encoding` | publisher of binary data | `binary`: the payload is bytes, not JSON |
//! | `Fanout-Event` | publisher of a named event (Pusher's) | the event's name |
//! | `Fanout-Exclude` | publisher (Pusher's `socket_id`, a client event) | the id of the connection that does not get it (only Pusher connections act on it) |
//!
//! This module defines the names and the decoded form; [`crate::bus`] does the decoding.
//! What a WebSocket client sees (the `event` frame) is `fanout-ws`'s business.

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::Channel;

/// Header carrying the event id.
pub const HEADER_ID: &str = "Fanout-Id";
/// Header carrying the publish time, unix milliseconds.
pub const HEADER_TS: &str = "Fanout-Ts";
/// Header marking a volatile event (never stored): `1`.
pub const HEADER_VOLATILE: &str = "Fanout-Volatile";
/// Header naming a volatile event's region (a stored one's is its stream's).
pub const HEADER_REGION: &str = "Fanout-Region";

/// Header naming the event (a Pusher event's `name`; none for fanout's own publishes).
pub const HEADER_EVENT: &str = "Fanout-Event";

/// Header naming the connection (its id) that does not get the event: Pusher's `socket_id`
/// of a publish, a Pusher client's own client event. Only Pusher connections act on it.
pub const HEADER_EXCLUDE: &str = "Fanout-Exclude";

/// Header marking binary data: `binary` (absent: the payload is JSON).
pub const HEADER_ENCODING: &str = "Fanout-Encoding";
/// [`HEADER_ENCODING`]'s value for bytes.
pub const BINARY: &str = "binary";

/// An event's data as published: JSON text (checked by the publisher, stored as sent), or
/// bytes (`Content-Type: application/octet-stream`, a MessagePack client's bin, a JSON
/// client's base64), which JSON clients receive as base64 and MessagePack clients as bin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub bytes: Bytes,
    pub binary: bool,
    /// The event's name (a Pusher event's), carried in [`HEADER_EVENT`].
    pub name: Option<std::sync::Arc<str>>,
    /// The connection that does not get it, carried in [`HEADER_EXCLUDE`].
    pub exclude: Option<uuid::Uuid>,
}

impl Data {
    /// Bytes, not JSON.
    pub fn binary(bytes: impl Into<Bytes>) -> Data {
        Data {
            bytes: bytes.into(),
            binary: true,
            name: None,
            exclude: None,
        }
    }

    /// The same data, as the event `name`.
    pub fn named(self, name: &str) -> Data {
        Data {
            name: Some(name.into()),
            ..self
        }
    }

    /// The same data, for every connection but `conn`.
    pub fn excluding(self, conn: uuid::Uuid) -> Data {
        Data {
            exclude: Some(conn),
            ..self
        }
    }
}

/// JSON text.
impl From<Bytes> for Data {
    fn from(bytes: Bytes) -> Data {
        Data {
            bytes,
            binary: false,
            name: None,
            exclude: None,
        }
    }
}

/// One event, as a ws node receives it: stored, or volatile.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub channel: Channel,
    /// Not stored: at most once, never replayed; `seq` and `last_seq` are 0.
    pub volatile: bool,
    /// Stream sequence: increases across the whole stream, so per channel it increases with gaps.
    pub seq: u64,
    /// The previous sequence stored on the same channel, or 0 for the first one.
    pub last_seq: u64,
    /// The region it was published in (an index into the tier's regions; 0 with one region):
    /// `seq` and `last_seq` count in that region's stream.
    pub region: u8,
    /// That region's name (`None` with one region).
    pub region_name: Option<std::sync::Arc<str>>,
    pub id: String,
    /// Unix milliseconds at publish.
    pub ts: u64,
    /// W3C trace context of the publish, when the publisher traced it.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// The event's data as published. The API accepts JSON or, marked [`Envelope::binary`],
    /// bytes; the ws node checks JSON again when it embeds it in the `event` frame, since
    /// anyone with NATS access can publish.
    pub data: Bytes,
    /// `data` is bytes, not JSON ([`HEADER_ENCODING`]).
    pub binary: bool,
    /// The event's name, when it has one ([`HEADER_EVENT`]).
    pub name: Option<String>,
    /// The connection that does not get it ([`HEADER_EXCLUDE`]).
    pub exclude: Option<uuid::Uuid>,
}

impl Envelope {
    /// An event's `event` frame: its JSON, encoded once for every recipient, `data` embedded as
    /// published, without re-encoding, or, when it is bytes, as base64 with
    /// `"encoding":"base64"`. A volatile event's has `"volatile": true` and no `seq`. With
    /// `with_trace`, a traced event also carries `"trace": "<trace id>"`. Fails when the event's
    /// data should be JSON and is not.
    pub fn frame_json(&self, with_trace: bool) -> Result<String, serde_json::Error> {
        self.frame(with_trace, None)
    }

    /// The `event` frame of a client that takes deltas (`"delta":"fossil"`): `data` is
    /// `text`, a JSON string, with `"delta"`: whether it is a fossil delta of the channel's
    /// event before this one, or (false) the event's data itself as published.
    pub fn delta_frame_json(&self, with_trace: bool, text: &str, delta: bool) -> String {
        self.frame(with_trace, Some((text, delta)))
            .expect("a string is JSON")
    }

    fn frame(
        &self,
        with_trace: bool,
        text: Option<(&str, bool)>,
    ) -> Result<String, serde_json::Error> {
        let envelope = self;
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Data<'a> {
            Json(&'a RawValue),
            Base64(String),
            Text(&'a str),
        }
        #[derive(Serialize)]
        struct Event<'a> {
            op: &'static str,
            channel: &'a Channel,
            #[serde(skip_serializing_if = "Option::is_none")]
            seq: Option<u64>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            volatile: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            region: Option<&'a str>,
            id: &'a str,
            ts: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            trace: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            delta: Option<bool>,
            data: Data<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            encoding: Option<&'static str>,
        }
        let data = match text {
            Some((text, _)) => Data::Text(text),
            None if envelope.binary => {
                use base64::Engine;
                Data::Base64(base64::engine::general_purpose::STANDARD.encode(&envelope.data))
            }
            None => Data::Json(serde_json::from_slice(&envelope.data)?),
        };
        let trace = with_trace
            .then(|| {
                envelope
                    .traceparent
                    .as_deref()
                    .and_then(crate::telemetry::trace_id_of)
            })
            .flatten();
        serde_json::to_string(&Event {
            op: "event",
            channel: &envelope.channel,
            seq: (!envelope.volatile).then_some(envelope.seq),
            volatile: envelope.volatile,
            region: envelope.region_name.as_deref(),
            id: &envelope.id,
            ts: envelope.ts,
            trace,
            name: envelope.name.as_deref(),
            delta: text.map(|(_, delta)| delta),
            data,
            encoding: (envelope.binary && text.is_none()).then_some("base64"),
        })
    }
}
