//! The NATS bus: the only code that imports `async_nats`.
//!
//! - this file: **the connection** (reconnects forever with capped, jittered backoff; its state
//!   is readable at any time for `/readyz` and for failing fast with [`BusError::Unavailable`]),
//!   **subjects** (every subject is built here: the API publishes to `<prefix>.in.<channel>`,
//!   the stream republishes each stored event to `<prefix>.out.<channel>`, which ws nodes
//!   subscribe to; compare centrifugo's `natsbroker`), and a channel's live events
//!   ([`Subscription`]).
//! - [`stream`]: the JetStream stream (`<PREFIX>`): created or updated by whichever process
//!   starts first and re-applied after every (re)connect; publishing into it, its epoch, and
//!   reading its history back (replay, gap repair).
//! - [`presence`]: presence changes on NATS, and the scatter-gather presence query.
//! - [`discovery`]: ws nodes' announcements.
//!
//! It does not know about HTTP, WebSocket clients or which channels anyone wants: callers
//! say what to publish and what to subscribe to.

mod acks;
mod discovery;
mod link;
mod presence;
mod stats;
mod stream;

pub use presence::PresenceChanges;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{ConnectOptions, HeaderMap, connection::State, jetstream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    Channel, Common,
    envelope::{Envelope, HEADER_ID, HEADER_TS},
    time::now_ms,
};

// Header names JetStream reads or writes.
const NATS_MESSAGE_ID: &str = "Nats-Msg-Id";
const NATS_SEQUENCE: &str = "Nats-Sequence";
const NATS_LAST_SEQUENCE: &str = "Nats-Last-Sequence";
const NATS_STREAM: &str = "Nats-Stream";

/// How long JetStream remembers a `Nats-Msg-Id` to drop a repeated publish. NATS requires
/// it to be no longer than the history window, so a shorter history shortens it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

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

/// The stream's answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The event id (for a duplicate: the id of the event first stored under that key).
    pub id: String,
    /// Stream sequence of the stored event.
    pub seq: u64,
    /// True when the `Idempotency-Key` was seen within the duplicate window and nothing new was
    /// stored.
    pub duplicate: bool,
}

/// Subject and stream names, all derived from the prefix and the regions.
///
/// One region (no regions configured): `<prefix>.in.<channel>` into the stream `<PREFIX>`,
/// republished to `<prefix>.out.<channel>`.
///
/// With regions, each region `r` publishes to `<prefix>.in.<r>.<channel>`, captured by its
/// own stream `<PREFIX>_<R>` placed in its cluster, and keeps a mirror of every other region
/// `o`'s stream, `<PREFIX>_<O>_AT_<R>` (a mirror keeps the origin's sequences and subjects).
/// Every stream in region `r`, its own and its mirrors, republishes to
/// `<prefix>.out.<r>.<channel>`, which only `r`'s ws nodes subscribe to: a node gets every
/// region's events from streams in its own region, so live delivery, replay and gap repair
/// all read one local copy, and nothing but the mirrors crosses the gateways (one copy of
/// each event per region, whoever subscribes). The republished copy's `Nats-Stream` header
/// names the stream, and so the event's origin region.
#[derive(Debug, Clone)]
struct Subjects {
    prefix: String,
    /// Every region, in the configured order (empty: one region).
    regions: Vec<String>,
    /// This process's region: an index into `regions` (0 with one region).
    own: u8,
}

impl Subjects {
    fn new(prefix: &str, regions: Vec<String>, own: &str) -> Subjects {
        let own = regions.iter().position(|r| r == own).unwrap_or(0) as u8;
        Subjects {
            prefix: prefix.to_string(),
            regions,
            own,
        }
    }
    /// `<prefix>.in.` and, with regions, this process's region.
    fn inbound_base(&self, region: u8) -> String {
        match self.regions.get(region as usize) {
            Some(name) => format!("{}.in.{name}", self.prefix),
            None => format!("{}.in", self.prefix),
        }
    }
    fn inbound(&self, channel: &Channel) -> String {
        self.inbound_in(self.own, channel)
    }
    /// Where region `region` publishes `channel`'s events.
    fn inbound_in(&self, region: u8, channel: &Channel) -> String {
        // Once per published event: one allocation, no formatting.
        let region = self.regions.get(region as usize);
        let mut subject = String::with_capacity(
            self.prefix.len() + 5 + region.map_or(0, |r| r.len() + 1) + channel.as_str().len(),
        );
        subject.push_str(&self.prefix);
        subject.push_str(".in.");
        if let Some(region) = region {
            subject.push_str(region);
            subject.push('.');
        }
        subject.push_str(channel.as_str());
        subject
    }
    /// Where this process's region's streams republish, and its ws nodes subscribe.
    fn outbound_base(&self) -> String {
        match self.regions.get(self.own as usize) {
            Some(name) => format!("{}.out.{name}", self.prefix),
            None => format!("{}.out", self.prefix),
        }
    }
    fn outbound(&self, channel: &Channel) -> String {
        format!("{}.{channel}", self.outbound_base())
    }
    /// What this process's region's stream captures.
    fn inbound_all(&self) -> String {
        format!("{}.>", self.inbound_base(self.own))
    }
    fn outbound_all(&self) -> String {
        format!("{}.>", self.outbound_base())
    }
    /// What region `region`'s stream captures.
    fn inbound_all_in(&self, region: u8) -> String {
        format!("{}.>", self.inbound_base(region))
    }
    /// Nobody answers here: a request to it comes back at once as "no responders", which
    /// proves the server has processed everything this connection sent before.
    fn sync(&self) -> String {
        format!("{}.sync", self.prefix)
    }
    /// ws nodes announce themselves here (core NATS, not stored).
    fn nodes(&self) -> String {
        format!("{}.nodes", self.prefix)
    }
    /// Presence changes of one channel (core NATS): the frames clients receive.
    fn presence(&self, channel: &Channel) -> String {
        format!("{}.presence.{channel}", self.prefix)
    }
    /// Presence queries, answered by every ws node (no queue group).
    fn presence_query(&self) -> String {
        format!("{}.presence_query", self.prefix)
    }
    /// Stats queries (`GET /v1/stats`), answered by every ws node (no queue group).
    fn stats_query(&self) -> String {
        format!("{}.stats_query", self.prefix)
    }
    fn stream_base(&self) -> String {
        self.prefix.replace('.', "_").to_ascii_uppercase()
    }
    /// This process's region's stream.
    fn stream_name(&self) -> String {
        self.origin_stream(self.own)
    }
    /// The stream region `region` publishes into.
    fn origin_stream(&self, region: u8) -> String {
        match self.regions.get(region as usize) {
            Some(name) => format!("{}_{}", self.stream_base(), name.to_ascii_uppercase()),
            None => self.stream_base(),
        }
    }
    /// Where this process reads region `region`'s events: its own stream, or its region's
    /// mirror of another's.
    fn local_copy(&self, region: u8) -> String {
        if region == self.own {
            return self.origin_stream(region);
        }
        let here = self.regions[self.own as usize].to_ascii_uppercase();
        format!("{}_AT_{here}", self.origin_stream(region))
    }
    /// How many regions there are (1 without regions).
    fn count(&self) -> u8 {
        self.regions.len().max(1) as u8
    }
    /// The region whose events the stream named `stream` holds (this region's own stream or
    /// its mirror of another's; always 0 with one region).
    fn region_of_stream(&self, stream: Option<&str>) -> Option<u8> {
        if self.regions.is_empty() {
            return Some(0);
        }
        let stream = stream?;
        (0..self.count()).find(|&r| self.local_copy(r) == stream)
    }
}

/// A handle on the NATS connection and the stream. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: async_nats::Client,
    /// Where batched publishes are acknowledged; made with the first batch.
    acks: tokio::sync::OnceCell<Arc<acks::Acks>>,
    js: jetstream::Context,
    subjects: Subjects,
    stream: jetstream::stream::Config,
    /// Per region (one entry with one region): where this process reads its events; this
    /// region's entry is its own stream.
    copies: Vec<stream::Copy>,
    /// Region names as frames carry them (none with one region).
    region_names: Vec<Arc<str>>,
    /// Per region, how this region's copy of its events is doing (see [`Bus::regions_state`]).
    mirror_states: std::sync::Mutex<Vec<&'static str>>,
    publish_timeout: Duration,
    /// Set once the stream is known to exist with our settings; cleared when a publish finds
    /// it missing. A std atomic: read on every publish and every `/readyz`.
    stream_ready: AtomicBool,
    /// Wakes the stream keeper: after a (re)connect, or when the stream went missing.
    check_stream: Arc<Notify>,
    /// The stream's identity: its creation time. Changes when the stream is recreated (and
    /// sequences restart), which makes every client's `since` meaningless. With regions,
    /// one per region (its origin stream's creation time), combined by [`Bus::epoch`].
    epochs: std::sync::RwLock<Vec<String>>,

    /// Counts (re)connections to NATS; subscribers catch up on each change.
    connections: Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts [`Bus::resync`]s: subscribers subscribe afresh and catch up on each change.
    resyncs: tokio::sync::watch::Sender<u64>,
    closed: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

impl Bus {
    /// Starts the NATS client. Returns at once, even when no server is reachable yet: the
    /// client keeps trying forever and [`Bus::is_ready`] says when it got there.
    pub async fn connect(common: &Common) -> Result<Bus, BusError> {
        let link = link::Link::from_common(common)?;
        let check_stream = Arc::new(Notify::new());
        let connections = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let options = |retry: bool| {
            let on_event = check_stream.clone();
            let on_connect = connections.clone();
            let node = common.node_id.clone();
            let options = link
                .options(ConnectOptions::new())
                .name(&common.node_id)
                .max_reconnects(None)
                .connection_timeout(Duration::from_secs(2))
                .reconnect_delay_callback(reconnect_delay)
                .event_callback(move |event| {
                    let on_event = on_event.clone();
                    let on_connect = on_connect.clone();
                    let node = node.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => {
                                tracing::info!(%node, "NATS connected");
                                on_event.notify_one();
                                on_connect.send_modify(|n| *n += 1);
                            }
                            async_nats::Event::Disconnected => {
                                tracing::warn!(%node, "NATS disconnected; reconnecting")
                            }
                            event @ (async_nats::Event::ClientError(_)
                            | async_nats::Event::ServerError(_)
                            | async_nats::Event::SlowConsumer(_)) => {
                                tracing::warn!(%node, "NATS: {event}")
                            }
                            other => tracing::info!(%node, "NATS: {other}"),
                        }
                    }
                });
            match retry {
                true => options.retry_on_initial_connect(),
                false => options,
            }
        };
        // One attempt first: a certificate the server refuses, or credentials it rejects,
        // stop start-up with a clear message; a server that is not there yet does not.
        let client = match async_nats::connect_with_options(link.servers.clone(), options(false))
            .await
        {
            Ok(client) => client,
            Err(err) if link::is_fatal(&err) => return Err(BusError::Refused(link::explain(&err))),
            Err(err) => {
                tracing::warn!(%err, "NATS not reachable yet; retrying in the background");
                async_nats::connect_with_options(link.servers.clone(), options(true)).await?
            }
        };
        let mut js = jetstream::new(client.clone());
        js.set_timeout(common.publish_timeout());

        let subjects = Subjects::new(&common.prefix, common.regions(), &common.region);
        let stream = stream::config(common, &subjects);
        let mut copies = Vec::new();
        for region in 0..subjects.count() {
            copies.push(stream::Copy::new(&js, common, &subjects, region).await);
        }
        let region_names = subjects
            .regions
            .iter()
            .map(|r| Arc::from(r.as_str()))
            .collect();
        let mirror_states = (0..subjects.count())
            .map(|r| {
                if r == subjects.own {
                    "local"
                } else {
                    "waiting"
                }
            })
            .collect();
        let bus = Bus {
            inner: Arc::new(Inner {
                client,
                acks: tokio::sync::OnceCell::new(),
                js,
                subjects,
                stream,
                mirror_states: std::sync::Mutex::new(mirror_states),
                copies,
                region_names,
                publish_timeout: common.publish_timeout(),
                stream_ready: AtomicBool::new(false),
                check_stream,
                epochs: std::sync::RwLock::new(vec![String::new(); subjects_count(common)]),
                connections,
                resyncs: tokio::sync::watch::Sender::new(0),
                closed: CancellationToken::new(),
            }),
        };
        tokio::spawn(stream::keep_stream(Arc::downgrade(&bus.inner)));
        if bus.inner.copies.len() > 1 {
            tokio::spawn(stream::watch_mirrors(Arc::downgrade(&bus.inner)));
        }
        // `retry_on_initial_connect` may have connected before the callback was in place.
        bus.inner.check_stream.notify_one();
        Ok(bus)
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// The stream was found (or made) with our settings since the last (re)connect.
    pub fn stream_ready(&self) -> bool {
        self.inner.stream_ready.load(Ordering::Acquire)
    }

    /// Connected, and the stream exists with our settings.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.stream_ready()
    }

    /// `connected`, `disconnected` or `connecting`, for health and debug output.
    pub fn state(&self) -> &'static str {
        match self.inner.client.connection_state() {
            State::Connected => "connected",
            State::Disconnected => "disconnected",
            State::Pending => "connecting",
        }
    }

    pub fn stream_name(&self) -> &str {
        &self.inner.stream.name
    }

    /// This process's region (`None` with one region).
    pub fn region(&self) -> Option<&Arc<str>> {
        self.inner
            .region_names
            .get(self.inner.subjects.own as usize)
    }

    /// Every region's name, by index (empty with one region).
    pub fn regions(&self) -> &[Arc<str>] {
        &self.inner.region_names
    }

    /// Every region with the state of this region's copy of its events: `local` (this
    /// region), `current` (a mirror in touch with its origin), `behind` (a mirror that cannot
    /// reach its origin: the region, or the link to it, is down) or `waiting` (the other
    /// region's stream does not exist yet). Empty with one region.
    pub fn regions_state(&self) -> Vec<(Arc<str>, &'static str)> {
        let states = self
            .inner
            .mirror_states
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner
            .region_names
            .iter()
            .cloned()
            .zip(states.iter().copied())
            .collect()
    }

    /// [`Bus::regions_state`] as a JSON object (`{"eu":"local","us":"current"}`), for
    /// health output; `None` with one region.
    pub fn regions_report(&self) -> Option<serde_json::Value> {
        let states = self.regions_state();
        (!states.is_empty()).then(|| {
            states
                .into_iter()
                .map(|(name, state)| (name.to_string(), serde_json::Value::from(state)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        })
    }

    /// How many regions' events a channel has (1 with one region).
    pub fn region_count(&self) -> u8 {
        self.inner.subjects.count()
    }

    /// The index of region `name` (`None`: not one of this tier's).
    pub fn region_index(&self, name: &str) -> Option<u8> {
        self.inner
            .region_names
            .iter()
            .position(|r| &**r == name)
            .map(|i| i as u8)
    }

    /// Changes on every (re)connection to NATS: what was published meanwhile must be fetched
    /// from the stream.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.connections.subscribe()
    }

    /// Rebuilds the delivery path after it was found broken (the ws node's canary): the
    /// stream keeper checks the stream against our settings (and restores them), and every
    /// [`Bus::resyncs`] watcher subscribes afresh and fetches what it missed.
    pub fn resync(&self) {
        self.inner.check_stream.notify_one();
        self.inner.resyncs.send_modify(|n| *n += 1);
    }

    /// Asks the stream keeper to check the stream against our settings (and restore them).
    pub fn check_stream(&self) {
        self.inner.check_stream.notify_one();
    }

    /// Changes on every [`Bus::resync`].
    pub fn resyncs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.resyncs.subscribe()
    }

    /// Subscribes to the events of `channel` (core NATS, no consumer state on the server).
    ///
    /// Returns once the server has registered the interest, so an event stored after this
    /// returns is delivered. When NATS is down it returns at once; the client re-subscribes
    /// on reconnect.
    pub async fn subscribe(&self, channel: &Channel) -> Result<Subscription, BusError> {
        let inner = &self.inner;
        let subscriber = inner
            .client
            .subscribe(inner.subjects.outbound(channel))
            .await?;
        self.sync().await;
        Ok(Subscription {
            channel: channel.clone(),
            subject: inner.subjects.outbound(channel),
            subscriber,
            subjects: inner.subjects.clone(),
            names: inner.region_names.clone(),
        })
    }

    /// Waits until the server has processed everything this connection sent so far.
    async fn sync(&self) {
        if self.is_connected() {
            // Any answer (normally "no responders") proves the server got here.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.inner
                    .client
                    .request(self.inner.subjects.sync(), Bytes::new()),
            )
            .await;
        }
    }

    /// Publishes `payload` to `subject` with a fresh inbox for the answers, and hands each
    /// answer to `take` until `take` says everything has come (it is also asked with `None`
    /// first, and now and then meanwhile) or [`crate::presence::QUERY_TIMEOUT`] passes: then the
    /// answer is partial (`true`). The query of presence and of stats (scatter-gather, no
    /// queue group: every ws node answers).
    pub(super) async fn scatter_gather(
        &self,
        subject: String,
        payload: Bytes,
        unsent: &'static str,
        mut take: impl FnMut(Option<&[u8]>) -> bool,
    ) -> Result<bool, BusError> {
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(subject, inbox, payload)
            .await
            .map_err(|_| BusError::Unavailable(unsent))?;
        let deadline = tokio::time::Instant::now() + crate::presence::QUERY_TIMEOUT;
        let mut complete = take(None);
        while !complete {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(true);
            }
            // Wake now and then: discovery may forget a crashed node meanwhile.
            let wait = (deadline - now).min(Duration::from_millis(100));
            complete = match tokio::time::timeout(wait, answers.next()).await {
                Ok(Some(message)) => take(Some(&message.payload)),
                // The connection closed: nothing more will come.
                Ok(None) => return Ok(true),
                Err(_) => take(None),
            };
        }
        Ok(false)
    }

    /// Stops the stream keeper, finishes in-flight publishes and closes the connection.
    pub async fn drain(&self) {
        self.inner.closed.cancel();
        if self.is_connected() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.client.flush()).await;
        }
        if let Err(err) = self.inner.client.drain().await {
            tracing::debug!(%err, "NATS drain");
        }
    }
}

fn subjects_count(common: &Common) -> usize {
    common.regions().len().max(1)
}

fn reconnect_delay(attempts: usize) -> Duration {
    // 0, 100, 200, 400, 800 ms, then 2 s, each with up to 25% jitter, so that a fleet of
    // nodes does not reconnect in lockstep after a NATS restart.
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let base = (100u64 << (attempts - 2).min(5)).min(2_000);
    let jitter = (uuid::Uuid::new_v4().as_u128() % (base as u128 / 4 + 1)) as u64;
    Duration::from_millis(base + jitter)
}

/// Events of one channel, in stream order, decoded into [`Envelope`]s.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    channel: Channel,
    subject: String,
    subscriber: async_nats::Subscriber,
    subjects: Subjects,
    names: Vec<Arc<str>>,
}

/// A message on an event subject that is not a well-formed stored event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no valid Nats-Sequence header: not a message republished by the stream")]
    NoSequence,
    #[error("republished by stream {0:?}, which is no region's")]
    UnknownStream(String),
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
        let stream = headers.and_then(|h| h.get(NATS_STREAM)).map(|v| v.as_str());
        let region = self
            .subjects
            .region_of_stream(stream)
            .ok_or_else(|| DecodeError::UnknownStream(stream.unwrap_or_default().to_string()))?;
        let mut envelope = decode(&self.channel, message)?;
        envelope.region = region;
        envelope.region_name = self.names.get(region as usize).cloned();
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
fn envelope(
    channel: &Channel,
    seq: u64,
    last_seq: u64,
    headers: &HeaderMap,
    data: Bytes,
) -> Envelope {
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    Envelope {
        channel: channel.clone(),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_have_their_own_subjects_and_streams() {
        let s = Subjects::new("fanout", vec!["eu".into(), "us".into()], "us");
        let ch = Channel::parse("room").unwrap();
        assert_eq!(s.inbound(&ch), "fanout.in.us.room");
        assert_eq!(s.inbound_in(0, &ch), "fanout.in.eu.room");
        assert_eq!(s.inbound_all(), "fanout.in.us.>");
        assert_eq!(s.outbound(&ch), "fanout.out.us.room");
        assert_eq!(s.outbound_all(), "fanout.out.us.>");
        assert_eq!(s.inbound_all_in(0), "fanout.in.eu.>");
        assert_eq!(s.stream_name(), "FANOUT_US");
        assert_eq!(s.local_copy(0), "FANOUT_EU_AT_US");
        assert_eq!(s.local_copy(1), "FANOUT_US");
        assert_eq!(s.region_of_stream(Some("FANOUT_EU_AT_US")), Some(0));
        assert_eq!(s.region_of_stream(Some("FANOUT_US")), Some(1));
        assert_eq!(s.region_of_stream(Some("FANOUT_EU")), None);
        assert_eq!(s.region_of_stream(None), None);
        let one = Subjects::new("fanout", vec![], "");
        assert_eq!(one.region_of_stream(None), Some(0));
        assert_eq!(one.local_copy(0), "FANOUT");
    }

    #[test]
    fn subjects_come_from_the_prefix() {
        let s = Subjects::new("acme.rt", vec![], "");
        let ch = Channel::parse("room:1.a").unwrap();
        assert_eq!(s.inbound(&ch), "acme.rt.in.room:1.a");
        assert_eq!(s.outbound(&ch), "acme.rt.out.room:1.a");
        assert_eq!(s.inbound_all(), "acme.rt.in.>");
        assert_eq!(s.outbound_all(), "acme.rt.out.>");
        assert_eq!(s.stream_name(), "ACME_RT");
    }

    #[test]
    fn reconnect_delay_is_capped_and_jittered() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        for attempts in 2..50 {
            let d = reconnect_delay(attempts);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(2_500));
        }
    }
}
