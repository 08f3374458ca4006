//! The event log: the stream, per region. Publishing into it (acknowledged writes, one event
//! or a batch), its epoch, and reading a channel's history back (replay, gap repair), from
//! this region's copy of each region's events (its own stream, or its mirror of another's).
//! The stream is made and kept by the [provisioner](super::provisioner); this handle only
//! reads what the provisioner found ([`StreamState`]) and wakes it when a publish finds the
//! stream missing.

use std::{
    future::IntoFuture,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{
    HeaderMap,
    connection::State,
    jetstream::{
        self,
        context::{PublishError, PublishErrorKind},
        stream::{self, DirectGetErrorKind, RawMessageErrorKind},
    },
};
use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{Instrument, field::Empty};

use super::{
    acks::Acks,
    error::BusError,
    subscription::{NATS_MESSAGE_ID, envelope},
    topology::Topology,
};
use crate::{
    Channel, Envelope,
    envelope::{BINARY, Data, HEADER_ENCODING, HEADER_EVENT, HEADER_EXCLUDE, HEADER_ID, HEADER_TS},
    stats::StreamStats,
    telemetry,
    time::now_ms,
};

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

/// What the provisioner finds and the log reads: whether the stream is there with our
/// settings, each region's epoch, how each region's copy is doing; and how to wake the
/// provisioner.
#[derive(Debug)]
pub(super) struct StreamState {
    /// Set once the stream is known to exist with our settings; cleared when a publish finds
    /// it missing. A std atomic: read on every publish and every `/readyz`.
    pub ready: AtomicBool,
    /// The stream's identity: its creation time. Changes when the stream is recreated (and
    /// sequences restart), which makes every client's `since` meaningless. With regions,
    /// one per region (its origin stream's creation time), combined by [`EventLog::epoch`].
    pub epochs: RwLock<Vec<String>>,
    /// Per region, how this region's copy of its events is doing (see
    /// [`EventLog::regions_state`]).
    pub mirrors: Mutex<Vec<&'static str>>,
    /// Wakes the provisioner: after a (re)connect, or when the stream went missing.
    pub check: Arc<Notify>,
}

/// Where a process reads one region's events: its own region's stream, or its region's
/// mirror of another region's stream (which keeps the origin's sequences).
#[derive(Debug)]
pub(super) struct Copy {
    /// Direct gets on the copy.
    pub handle: stream::Stream<()>,
    /// The origin stream (over the gateway for another region): its info says its epoch.
    pub origin: stream::Stream<()>,
    pub origin_name: String,
}

/// Stream metadata key: on a mirror, its origin's epoch (so that it is known while the
/// origin's region is unreachable).
pub(super) const ORIGIN_EPOCH: &str = "fanout_origin_epoch";

/// How long a process waits for another region's stream's info.
const MIRROR_WAIT: Duration = Duration::from_secs(2);

/// A handle on the stream. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventLog {
    inner: Arc<Log>,
}

#[derive(Debug)]
struct Log {
    client: async_nats::Client,
    js: jetstream::Context,
    topology: Topology,
    /// Per region (one entry with one region): where this process reads its events; this
    /// region's entry is its own stream.
    copies: Vec<Copy>,
    stream_name: String,
    publish_timeout: Duration,
    /// Where batched publishes are acknowledged; made with the first batch.
    acks: tokio::sync::OnceCell<Arc<Acks>>,
    state: Arc<StreamState>,
}

impl EventLog {
    pub(super) async fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        topology: Topology,
        publish_timeout: Duration,
        check: Arc<Notify>,
    ) -> EventLog {
        let mut copies = Vec::new();
        for region in 0..topology.count() {
            let handle = |name: String| {
                let js = &js;
                async move {
                    js.get_stream_no_info(&name)
                        .await
                        .expect("stream names are derived from a validated prefix and regions")
                }
            };
            let origin_name = topology.origin_stream(region);
            copies.push(Copy {
                handle: handle(topology.local_copy(region)).await,
                origin: handle(origin_name.clone()).await,
                origin_name,
            });
        }
        let count = topology.count();
        let own = topology.own();
        let state = Arc::new(StreamState {
            ready: AtomicBool::new(false),
            epochs: RwLock::new(vec![String::new(); count as usize]),
            mirrors: Mutex::new(
                (0..count)
                    .map(|r| if r == own { "local" } else { "waiting" })
                    .collect(),
            ),
            check,
        });
        EventLog {
            inner: Arc::new(Log {
                client,
                js,
                stream_name: topology.stream_name(),
                topology,
                copies,
                publish_timeout,
                acks: tokio::sync::OnceCell::new(),
                state,
            }),
        }
    }

    pub(super) fn state(&self) -> &Arc<StreamState> {
        &self.inner.state
    }

    pub(super) fn js(&self) -> &jetstream::Context {
        &self.inner.js
    }

    fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// The stream was found (or made) with our settings since the last (re)connect.
    pub fn stream_ready(&self) -> bool {
        self.inner.state.ready.load(Ordering::Acquire)
    }

    /// This process's region's stream.
    pub fn stream_name(&self) -> &str {
        &self.inner.stream_name
    }

    /// Asks the provisioner to check the stream against our settings (and restore them).
    pub fn check_stream(&self) {
        self.inner.state.check.notify_one();
    }

    /// Every region with the state of this region's copy of its events: `local` (this
    /// region), `current` (a mirror in touch with its origin), `behind` (a mirror that cannot
    /// reach its origin: the region, or the link to it, is down) or `waiting` (the other
    /// region's stream does not exist yet). Empty with one region.
    pub fn regions_state(&self) -> Vec<(Arc<str>, &'static str)> {
        let states = self
            .inner
            .state
            .mirrors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.inner
            .topology
            .regions()
            .iter()
            .cloned()
            .zip(states.iter().copied())
            .collect()
    }

    /// [`EventLog::regions_state`] as a JSON object (`{"eu":"local","us":"current"}`), for
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

    /// This process's region's stream: how much it holds and its sequences.
    pub async fn stream_stats(&self) -> Result<StreamStats, BusError> {
        let info = self.own_stream_info().await?;
        Ok(StreamStats {
            messages: info.state.messages,
            bytes: info.state.bytes,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
        })
    }

    pub(super) fn set_epoch(&self, region: u8, epoch: String) {
        let mut epochs = self
            .inner
            .state
            .epochs
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let current = &mut epochs[region as usize];
        if !current.is_empty() && *current != epoch {
            let stream = self.inner.topology.origin_stream(region);
            tracing::warn!(%stream, "the stream was recreated: sequences restarted");
        }
        *current = epoch;
    }

    /// Reads region `region`'s origin stream's epoch (over the gateway), or else the one its
    /// mirror here recorded, and keeps it.
    pub(super) async fn origin_epoch(&self, region: u8) -> Option<String> {
        let copy = self.copy(region);
        let origin = tokio::time::timeout(MIRROR_WAIT, copy.origin.get_info()).await;
        let epoch = match origin {
            Ok(Ok(info)) => Some(epoch_of(&info)),
            _ => {
                tracing::debug!(stream = %copy.origin_name, "cannot reach another region's stream");
                let mirror = copy.handle.get_info().await.ok()?;
                mirror.config.metadata.get(ORIGIN_EPOCH).cloned()
            }
        };
        if let Some(epoch) = &epoch {
            self.set_epoch(region, epoch.clone());
        }
        epoch
    }

    /// Stores `data` (valid JSON, or bytes marked binary) on `channel` and waits for the
    /// stream's acknowledgement.
    ///
    /// `idempotency_key` becomes `Nats-Msg-Id`: a repeat within [`DUPLICATE_WINDOW`](super::DUPLICATE_WINDOW) stores
    /// nothing and answers the first event's id and sequence with `duplicate: true`.
    pub async fn publish(
        &self,
        channel: &Channel,
        data: impl Into<Data>,
        idempotency_key: Option<&str>,
    ) -> Result<Published, BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected"));
        }
        self.send(channel, data.into(), idempotency_key, now_ms())
            .await?
            .acknowledged(self)
            .await
    }

    /// Stores every event, all in flight on the one NATS connection at once (each is sent
    /// without waiting for the previous one's acknowledgement), and answers each in the
    /// order given. Events on one channel are stored in that order. One event's failure
    /// fails that event alone.
    ///
    /// The acknowledgements come back on this process's one subscription for batches, each
    /// to a reply subject naming the batch and the event's index (`acks.rs`), instead
    /// of through async-nats's request per message.
    pub async fn publish_many<'a>(
        &self,
        events: Vec<(&'a Channel, Data, Option<&'a str>)>,
    ) -> Vec<Result<Published, BusError>> {
        let unavailable = |why| {
            (0..events.len())
                .map(|_| Err(BusError::Unavailable(why)))
                .collect()
        };
        if !self.is_connected() {
            return unavailable("not connected");
        }
        if events.is_empty() {
            return Vec::new();
        }
        let inner = &self.inner;
        let client = &inner.client;
        let acks = inner.acks.get_or_try_init(|| Acks::start(client)).await;
        let Ok(acks) = acks else {
            return unavailable("connection lost");
        };
        let mut batch = acks.batch();
        let ts = now_ms();
        let mut pending: Vec<Option<Batched>> = Vec::with_capacity(events.len());
        let mut answers: Vec<Option<Result<Published, BusError>>> =
            (0..events.len()).map(|_| None).collect();
        let mut waiting = 0;
        for (i, (channel, data, key)) in events.into_iter().enumerate() {
            let (id, headers, span) = self.headers(channel, key, ts, &data);
            let reply = batch.reply(i);
            let sent = client
                .publish_with_reply_and_headers(
                    inner.topology.inbound(channel),
                    reply,
                    headers,
                    data.bytes,
                )
                .await;
            match sent {
                Ok(()) => {
                    pending.push(Some(Batched { id, span }));
                    waiting += 1;
                }
                Err(_) => {
                    answers[i] = Some(Err(failed(&span, BusError::Unavailable("connection lost"))));
                    pending.push(None);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + inner.publish_timeout;
        while waiting > 0 {
            let message = match tokio::time::timeout_at(deadline, batch.received.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => break,
            };
            let Some(i) = message
                .subject
                .rsplit('.')
                .next()
                .and_then(|i| i.parse::<usize>().ok())
            else {
                continue;
            };
            let Some(Batched { id, span }) = pending.get_mut(i).and_then(Option::take) else {
                continue;
            };
            waiting -= 1;
            answers[i] = Some(match self.read_ack(&message) {
                Ok(ack) => Ok(self.published(id, &span, ack.seq, ack.duplicate).await),
                Err(err) => Err(failed(&span, err)),
            });
        }
        // No answer within the publish timeout (or the connection went): each may or may
        // not be stored, as for a single publish.
        for (answer, batched) in answers.iter_mut().zip(pending) {
            if let Some(Batched { span, .. }) = batched {
                *answer = Some(Err(failed(&span, BusError::Timeout(inner.publish_timeout))));
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.expect("every event answered"))
            .collect()
    }

    /// The answer for a stored event; for a duplicate, with the id of the event first stored
    /// under its key.
    async fn published(
        &self,
        id: String,
        span: &tracing::Span,
        seq: u64,
        duplicate: bool,
    ) -> Published {
        span.record("fanout.seq", seq);
        let id = if duplicate {
            self.stored_id(seq).await.unwrap_or(id)
        } else {
            id
        };
        Published { id, seq, duplicate }
    }

    /// What one acknowledgement of [`EventLog::publish_many`] says.
    fn read_ack(&self, message: &async_nats::Message) -> Result<Ack, BusError> {
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(self.publish_error(PublishError::new(PublishErrorKind::StreamNotFound)));
        }
        match serde_json::from_slice::<AckBody>(&message.payload) {
            Ok(AckBody {
                seq: Some(seq),
                duplicate,
                error: None,
            }) => Ok(Ack {
                seq,
                duplicate: duplicate.unwrap_or(false),
            }),
            Ok(AckBody {
                error: Some(error), ..
            }) => Err(self.publish_error(PublishError::with_source(
                PublishErrorKind::Other,
                format!("{} (error {})", error.description, error.err_code),
            ))),
            _ => Err(self.publish_error(PublishError::with_source(
                PublishErrorKind::Other,
                "the stream's acknowledgement is not one",
            ))),
        }
    }

    /// An event's headers (id, timestamp, the key as `Nats-Msg-Id`, binary data's mark, the
    /// trace context) and its `publish` span (none with tracing off).
    fn headers(
        &self,
        channel: &Channel,
        idempotency_key: Option<&str>,
        ts: u64,
        data: &Data,
    ) -> (String, HeaderMap, tracing::Span) {
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, id.as_str());
        headers.insert(HEADER_TS, ts.to_string().as_str());
        if data.binary {
            headers.insert(HEADER_ENCODING, BINARY);
        }
        if let Some(name) = &data.name {
            headers.insert(HEADER_EVENT, &**name);
        }
        if let Some(conn) = data.exclude {
            headers.insert(HEADER_EXCLUDE, conn.to_string().as_str());
        }
        // Only a key the publisher gave: JetStream remembers every `Nats-Msg-Id` for the
        // duplicate window, which costs nats-server ~2.5 µs and memory per event (measured
        // with `fanout-bench jetstream`), and a fresh random id can never repeat.
        if let Some(key) = idempotency_key {
            headers.insert(NATS_MESSAGE_ID, key);
        }
        let span = if telemetry::tracing_enabled() {
            let subject = self.inner.topology.inbound(channel);
            let span = tracing::info_span!(
                "publish",
                otel.name = %format_args!("publish {subject}"),
                otel.kind = "producer",
                otel.status_code = Empty,
                messaging.system = "nats",
                // Semantic conventions: the operation type is `send` (formerly `publish`); its
                // name, and so the span's, stays `publish`.
                messaging.operation.type = "send",
                messaging.operation.name = "publish",
                messaging.destination.name = %subject,
                messaging.message.id = %id,
                fanout.channel = %channel,
                fanout.seq = Empty,
                error.type = Empty,
                trace_id = Empty,
            );
            // The stored message, and so the republished copy, carries the context.
            telemetry::inject(&span, |name, value| headers.insert(name, value.as_str()));
            telemetry::record_trace_id(&span);
            span
        } else {
            tracing::Span::none()
        };
        (id, headers, span)
    }

    /// Hands one event to the NATS connection; its acknowledgement comes later.
    async fn send(
        &self,
        channel: &Channel,
        data: Data,
        idempotency_key: Option<&str>,
        ts: u64,
    ) -> Result<Pending, BusError> {
        let inner = &self.inner;
        let (id, headers, span) = self.headers(channel, idempotency_key, ts, &data);
        let data = data.bytes;
        let subject = inner.topology.inbound(channel);
        let publish = inner.js.publish_with_headers(subject, headers, data);
        // No span, no wrapper: with tracing off this runs once per event for nothing.
        let ack = if span.is_none() {
            publish.await
        } else {
            publish.instrument(span.clone()).await
        }
        .map_err(|err| self.publish_error(err));
        match ack {
            Ok(ack) => Ok(Pending { id, span, ack }),
            Err(err) => Err(failed(&span, err)),
        }
    }

    fn publish_error(&self, err: async_nats::jetstream::context::PublishError) -> BusError {
        match err.kind() {
            PublishErrorKind::StreamNotFound => {
                self.inner.state.ready.store(false, Ordering::Release);
                self.inner.state.check.notify_one();
                BusError::Unavailable("the stream does not exist (yet)")
            }
            PublishErrorKind::TimedOut => BusError::Timeout(self.inner.publish_timeout),
            PublishErrorKind::BrokenPipe => BusError::Unavailable("connection lost"),
            _ => BusError::Publish(err),
        }
    }

    /// The event id stored at `seq` (for answering a duplicate publish).
    async fn stored_id(&self, seq: u64) -> Option<String> {
        let message = self.own().handle.direct_get(seq).await.ok()?;
        Some(message.headers.get(HEADER_ID)?.as_str().to_string())
    }

    /// The stream's identity (empty until the stream is known). A client's `since` is only
    /// meaningful within one epoch.
    ///
    /// With regions: every region's stream's identity, combined (empty until all are known):
    /// positions in any region's stream mean nothing once it was recreated.
    pub fn epoch(&self) -> String {
        let epochs = self
            .inner
            .state
            .epochs
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if self.inner.topology.regions().is_empty() {
            return epochs[0].clone();
        }
        if epochs.iter().any(String::is_empty) {
            return String::new();
        }
        let parts: Vec<String> = self
            .inner
            .topology
            .regions()
            .iter()
            .zip(epochs.iter())
            .map(|(region, epoch)| format!("{region}-{epoch}"))
            .collect();
        parts.join(".")
    }

    /// Reads the streams' identities again (after a sequence anomaly) and returns the epoch.
    pub async fn refresh_epoch(&self) -> String {
        if let Ok(info) = self.own().handle.get_info().await {
            self.set_epoch(self.inner.topology.own(), epoch_of(&info));
        }
        for region in 0..self.inner.topology.count() {
            if region != self.inner.topology.own() {
                self.origin_epoch(region).await;
            }
        }
        self.epoch()
    }

    /// The stored events of `channel` with `after < seq <= until` (no upper bound if `until`
    /// is `None`), in order. One direct get per event, so it is meant for the bounded ranges
    /// a replay or a gap repair needs (at most the per-channel history limit).
    ///
    /// With regions, the events region `region` published, read from this region's copy of
    /// them (its own stream, or its mirror of the other region's).
    pub async fn history(
        &self,
        channel: &Channel,
        region: u8,
        after: u64,
        until: Option<u64>,
    ) -> Result<Vec<Envelope>, BusError> {
        let copy = &self.copy(region).handle;
        self.read(copy, channel, region, after, until, usize::MAX)
            .await
    }

    /// At most `limit` stored events of `channel` (of `region`) after `after`, in order: a
    /// page of `GET /v1/channels/{channel}/history`.
    pub async fn page(
        &self,
        channel: &Channel,
        region: u8,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, BusError> {
        let copy = &self.copy(region).handle;
        self.read(copy, channel, region, after, None, limit).await
    }

    /// The seq of `channel`'s last stored event of `region` here, if it has one.
    pub async fn last_of(&self, channel: &Channel, region: u8) -> Result<Option<u64>, BusError> {
        let subject = self.inner.topology.inbound_in(region, channel);
        match self
            .copy(region)
            .handle
            .direct_get_last_for_subject(subject)
            .await
        {
            Ok(message) => Ok(Some(message.sequence)),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(err) => Err(BusError::History(err)),
        }
    }

    /// Removes `channel`'s stored events from every copy of every region's stream (each
    /// region's own stream and its mirrors of the others': a mirror does not follow its
    /// origin's purges). Returns each region's last sequence here afterwards: a position
    /// before it may have lost events to the removal.
    pub async fn remove(&self, channel: &Channel) -> Result<Vec<u64>, BusError> {
        let topology = &self.inner.topology;
        for origin in 0..topology.count() {
            let subject = topology.inbound_in(origin, channel);
            for at in 0..topology.count() {
                let name = topology.copy_in(origin, at);
                let stream = self
                    .inner
                    .js
                    .get_stream_no_info(&name)
                    .await
                    .map_err(|_| BusError::Unavailable("no stream to remove from"))?;
                stream
                    .purge()
                    .filter(subject.clone())
                    .await
                    .map_err(|err| {
                        tracing::warn!(%err, stream = name, "cannot remove a channel's history");
                        BusError::Unavailable("the stream did not remove the history")
                    })?;
            }
        }
        let mut last = Vec::new();
        for region in 0..topology.count() {
            last.push(self.sequences(region).await?.1);
        }
        Ok(last)
    }

    /// The info of this process's region's stream.
    async fn own_stream_info(&self) -> Result<async_nats::jetstream::stream::Info, BusError> {
        self.own()
            .handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))
    }

    /// This process's own region's stream.
    fn own(&self) -> &Copy {
        self.copy(self.inner.topology.own())
    }

    pub(super) fn copy(&self, region: u8) -> &Copy {
        &self.inner.copies[(region as usize).min(self.inner.copies.len() - 1)]
    }

    /// Direct gets of `channel`'s events of `region` on `stream`.
    async fn read(
        &self,
        stream: &stream::Stream<()>,
        channel: &Channel,
        region: u8,
        after: u64,
        until: Option<u64>,
        max: usize,
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.topology.inbound_in(region, channel);
        let mut events = read_range(channel, after, until, max, |next| {
            let subject = subject.clone();
            async move {
                match stream
                    .direct_get_next_for_subject(subject, Some(next))
                    .await
                {
                    Ok(message) => Ok(Some((message.sequence, message.headers, message.payload))),
                    Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
                    Err(err) => Err(BusError::History(err)),
                }
            }
        })
        .await?;
        self.mark(&mut events, region);
        Ok(events)
    }

    fn mark(&self, events: &mut [Envelope], region: u8) {
        let name = self.inner.topology.regions().get(region as usize);
        for event in events {
            event.region = region;
            event.region_name = name.cloned();
        }
    }

    /// [`EventLog::history`], reaching at least sequence `reach` (an event of the channel this
    /// node has seen republished, so stored). Direct gets are answered by any replica, and a
    /// replica (or a mirror) may lag by a moment: while the answer falls short of `reach`,
    /// it asks again, then asks the leader (for another region: the origin stream).
    pub async fn history_reaching(
        &self,
        channel: &Channel,
        region: u8,
        after: u64,
        until: Option<u64>,
        reach: u64,
    ) -> Result<Vec<Envelope>, BusError> {
        let mut events = self.history(channel, region, after, until).await?;
        let mut pause = Duration::from_millis(1);
        for _ in 0..6 {
            let last = events.last().map_or(after, |e| e.seq);
            if last >= reach {
                return Ok(events);
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            events.extend(self.history(channel, region, last, until).await?);
        }
        let last = events.last().map_or(after, |e| e.seq);
        if last < reach {
            tracing::debug!(%channel, last, reach, "a replica lags: reading from the leader");
            events.extend(self.leader_history(channel, region, last, until).await?);
        }
        Ok(events)
    }

    /// [`EventLog::history`], read from the copy's leader (the JetStream API rather than direct
    /// gets): what it has acknowledged (or republished), it has.
    async fn leader_history(
        &self,
        channel: &Channel,
        region: u8,
        after: u64,
        until: Option<u64>,
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.topology.inbound_in(region, channel);
        let copy = &self.copy(region).handle;
        read_range(channel, after, until, usize::MAX, |next| {
            let subject = subject.clone();
            async move {
                let found = copy
                    .raw_message_builder()
                    .sequence(next)
                    .next_by_subject(subject)
                    .send()
                    .await;
                match found {
                    Ok(message) => Ok(Some((message.sequence, message.headers, message.payload))),
                    Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
                    Err(err) => Err(BusError::Leader(err)),
                }
            }
        })
        .await
        .map(|mut events| {
            self.mark(&mut events, region);
            events
        })
    }

    /// Whether the event at `seq` on `channel` (of `region`) is still stored. Limits remove
    /// the oldest events first, so if it is, every later event of the channel is too.
    pub async fn is_stored(
        &self,
        channel: &Channel,
        region: u8,
        seq: u64,
    ) -> Result<bool, BusError> {
        match self.copy(region).handle.direct_get(seq).await {
            Ok(message) => {
                Ok(message.subject.as_str() == self.inner.topology.inbound_in(region, channel))
            }
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(false),
            Err(err) => Err(BusError::History(err)),
        }
    }

    /// The first stored sequence of `region`'s events here (1 while nothing has ever been
    /// removed).
    pub async fn first_sequence(&self, region: u8) -> Result<u64, BusError> {
        let info = self
            .copy(region)
            .handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))?;
        Ok(info.state.first_sequence)
    }

    /// The first stored and last sequences of region `region`'s events here (this region's
    /// stream, or its mirror of another's): where history starts, and "now" (every event the
    /// copy stores from here on has a higher sequence, and is republished to this region's
    /// nodes).
    pub async fn sequences(&self, region: u8) -> Result<(u64, u64), BusError> {
        let info = self
            .copy(region)
            .handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }
}

/// A stream's identity: its creation time in nanoseconds, as hex.
pub(super) fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

/// The events of `channel` with `after < seq <= until` (no bound if `until` is `None`), one
/// `fetch(next)` at a time: the first stored event of the channel at `next` or later, as
/// (seq, headers, payload), or `None` past the last.
async fn read_range<F, Fut>(
    channel: &Channel,
    after: u64,
    until: Option<u64>,
    max: usize,
    mut fetch: F,
) -> Result<Vec<Envelope>, BusError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Option<(u64, HeaderMap, Bytes)>, BusError>>,
{
    let mut events = Vec::new();
    let mut next = after + 1;
    while events.len() < max && until.is_none_or(|until| next <= until) {
        let Some((seq, headers, payload)) = fetch(next).await? else {
            break;
        };
        if until.is_some_and(|until| seq > until) {
            break;
        }
        next = seq + 1;
        events.push(envelope(channel, seq, 0, &headers, payload));
    }
    Ok(events)
}

/// One event of [`EventLog::publish_many`] waiting for its acknowledgement.
struct Batched {
    id: String,
    span: tracing::Span,
}

/// A JetStream publish acknowledgement, or its error.
#[derive(serde::Deserialize)]
struct AckBody {
    seq: Option<u64>,
    duplicate: Option<bool>,
    error: Option<AckError>,
}

#[derive(serde::Deserialize)]
struct AckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

struct Ack {
    seq: u64,
    duplicate: bool,
}

/// One event handed to NATS, waiting for the stream's acknowledgement.
struct Pending {
    id: String,
    span: tracing::Span,
    ack: async_nats::jetstream::context::PublishAckFuture,
}

impl Pending {
    async fn acknowledged(self, log: &EventLog) -> Result<Published, BusError> {
        let Pending { id, span, ack } = self;
        let ack = if span.is_none() {
            ack.await
        } else {
            ack.into_future().instrument(span.clone()).await
        };
        let ack = match ack.map_err(|err| log.publish_error(err)) {
            Ok(ack) => ack,
            Err(err) => return Err(failed(&span, err)),
        };
        Ok(log.published(id, &span, ack.sequence, ack.duplicate).await)
    }
}

/// Marks a publish's span failed.
fn failed(span: &tracing::Span, err: BusError) -> BusError {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", err.kind());
    err
}
