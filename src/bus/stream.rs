//! The stream (`<PREFIX>`): it captures `<prefix>.in.>`, keeps the history window and
//! RePublishes every stored message to `<prefix>.out.<channel>` with `Nats-Sequence` /
//! `Nats-Last-Sequence` headers. Whichever process starts first creates it; every process
//! re-applies its settings after each (re)connect, so a NATS server that lost its state is
//! repaired without a restart. Here too: publishing into it (acknowledged writes), its epoch,
//! and reading a channel's history back (replay, gap repair).
use std::{future::IntoFuture, sync::atomic::Ordering, time::Duration};

use async_nats::{
    HeaderMap,
    connection::State,
    jetstream::{
        context::{PublishError, PublishErrorKind},
        stream::{self, DirectGetErrorKind, RawMessageErrorKind, Republish, StorageType},
    },
};
use bytes::Bytes;
use tracing::{Instrument, field::Empty};

use super::{
    Bus, BusError, DUPLICATE_WINDOW, Inner, NATS_MESSAGE_ID, Published, Subjects, envelope,
};
// (`Copy` below is this module's struct, not the trait.)
use crate::{
    Channel, Common, Envelope,
    envelope::{HEADER_ID, HEADER_TS},
    telemetry,
    time::now_ms,
};

/// Where a process reads one region's events: its own region's stream, or its region's
/// mirror of another region's stream (which keeps the origin's sequences).
#[derive(Debug)]
pub(super) struct Copy {
    /// `None` for this process's own stream (its settings are [`Inner::stream`]).
    mirror: Option<stream::Config>,
    /// Direct gets on the copy.
    handle: stream::Stream<()>,
    /// The origin stream (over the gateway for another region): its info says its epoch.
    origin: stream::Stream<()>,
    origin_name: String,
}

/// Stream metadata key: on a mirror, its origin's epoch (so that it is known while the
/// origin's region is unreachable).
const ORIGIN_EPOCH: &str = "fanout_origin_epoch";

impl Copy {
    pub(super) async fn new(
        js: &async_nats::jetstream::Context,
        common: &Common,
        subjects: &Subjects,
        region: u8,
    ) -> Copy {
        let name = subjects.local_copy(region);
        let origin_name = subjects.origin_stream(region);
        // A mirror republishes too, to this region's nodes: that is how they get the other
        // region's events.
        let mirror = (region != subjects.own).then(|| stream::Config {
            name: name.clone(),
            mirror: Some(stream::Source {
                name: origin_name.clone(),
                ..Default::default()
            }),
            republish: Some(Republish {
                source: subjects.inbound_all_in(region),
                destination: subjects.outbound_all(),
                headers_only: false,
            }),
            placement: placement(subjects),
            ..limits(common)
        });
        let handle = |name: String| async move {
            js.get_stream_no_info(&name)
                .await
                .expect("stream names are derived from a validated prefix and regions")
        };
        Copy {
            mirror,
            handle: handle(name).await,
            origin: handle(origin_name.clone()).await,
            origin_name,
        }
    }
}

/// With regions: the stream lives in this process's region's cluster.
fn placement(subjects: &Subjects) -> Option<stream::Placement> {
    let region = subjects.regions.get(subjects.own as usize)?;
    Some(stream::Placement {
        cluster: Some(region.clone()),
        ..Default::default()
    })
}

/// The history settings every copy of a region's events shares.
fn limits(common: &Common) -> stream::Config {
    stream::Config {
        max_age: Duration::from_secs(common.history_max_age_secs),
        max_messages_per_subject: common.history_max_messages,
        storage: match common.history_storage.as_str() {
            "memory" => StorageType::Memory,
            _ => StorageType::File,
        },
        num_replicas: common.history_replicas,
        allow_direct: true,
        duplicate_window: DUPLICATE_WINDOW.min(Duration::from_secs(common.history_max_age_secs)),
        ..Default::default()
    }
}

/// The stream's settings, from the history settings every process shares.
pub(super) fn config(common: &Common, subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: subjects.stream_name(),
        subjects: vec![subjects.inbound_all()],
        republish: Some(Republish {
            source: subjects.inbound_all(),
            destination: subjects.outbound_all(),
            headers_only: false,
        }),
        placement: placement(subjects),
        ..limits(common)
    }
}

impl Bus {
    /// Creates the stream, or brings an existing one to our settings. Idempotent.
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        ensure_stream(&self.inner).await
    }

    /// Stores `data` (valid JSON) on `channel` and waits for the stream's acknowledgement.
    ///
    /// `idempotency_key` becomes `Nats-Msg-Id`: a repeat within [`DUPLICATE_WINDOW`] stores
    /// nothing and answers the first event's id and sequence with `duplicate: true`.
    pub async fn publish(
        &self,
        channel: &Channel,
        data: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<Published, BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected"));
        }
        self.send(channel, data, idempotency_key, now_ms())
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
    /// to a reply subject naming the batch and the event's index ([`super::acks`]), instead
    /// of through async-nats's request per message.
    pub async fn publish_many<'a>(
        &self,
        events: Vec<(&'a Channel, Bytes, Option<&'a str>)>,
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
        let acks = inner
            .acks
            .get_or_try_init(|| super::acks::Acks::start(client))
            .await;
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
            let (id, headers, span) = self.headers(channel, key, ts);
            let reply = batch.reply(i);
            let sent = client
                .publish_with_reply_and_headers(
                    inner.subjects.inbound(channel),
                    reply,
                    headers,
                    data,
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

    /// What one acknowledgement of [`Bus::publish_many`] says.
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

    /// An event's headers (id, timestamp, the key as `Nats-Msg-Id`, the trace context) and
    /// its `publish` span (none with tracing off).
    fn headers(
        &self,
        channel: &Channel,
        idempotency_key: Option<&str>,
        ts: u64,
    ) -> (String, HeaderMap, tracing::Span) {
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, id.as_str());
        headers.insert(HEADER_TS, ts.to_string().as_str());
        // Only a key the publisher gave: JetStream remembers every `Nats-Msg-Id` for the
        // duplicate window, which costs nats-server ~2.5 µs and memory per event (measured
        // with `fanout-bench jetstream`), and a fresh random id can never repeat.
        if let Some(key) = idempotency_key {
            headers.insert(NATS_MESSAGE_ID, key);
        }
        let span = if telemetry::tracing_enabled() {
            let subject = self.inner.subjects.inbound(channel);
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
        data: Bytes,
        idempotency_key: Option<&str>,
        ts: u64,
    ) -> Result<Pending, BusError> {
        let inner = &self.inner;
        let (id, headers, span) = self.headers(channel, idempotency_key, ts);
        let subject = inner.subjects.inbound(channel);
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
                self.inner.stream_ready.store(false, Ordering::Release);
                self.inner.check_stream.notify_one();
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
        let epochs = self.inner.epochs.read().unwrap_or_else(|e| e.into_inner());
        if self.inner.region_names.is_empty() {
            return epochs[0].clone();
        }
        if epochs.iter().any(String::is_empty) {
            return String::new();
        }
        let parts: Vec<String> = self
            .inner
            .region_names
            .iter()
            .zip(epochs.iter())
            .map(|(region, epoch)| format!("{region}-{epoch}"))
            .collect();
        parts.join(".")
    }

    /// Reads the streams' identities again (after a sequence anomaly) and returns the epoch.
    pub async fn refresh_epoch(&self) -> String {
        if let Ok(info) = self.own().handle.get_info().await {
            self.inner
                .set_epoch(self.inner.subjects.own, epoch_of(&info));
        }
        for (region, copy) in self.inner.copies.iter().enumerate() {
            if copy.mirror.is_some() {
                origin_epoch(&self.inner, region as u8, copy).await;
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
        self.read(copy, channel, region, after, until).await
    }

    /// The info of this process's region's stream.
    pub(super) async fn own_stream_info(
        &self,
    ) -> Result<async_nats::jetstream::stream::Info, BusError> {
        self.own()
            .handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))
    }

    /// This process's own region's stream.
    fn own(&self) -> &Copy {
        self.copy(self.inner.subjects.own)
    }

    fn copy(&self, region: u8) -> &Copy {
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
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.subjects.inbound_in(region, channel);
        let mut events = read_range(channel, after, until, |next| {
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
        let name = self.inner.region_names.get(region as usize);
        for event in events {
            event.region = region;
            event.region_name = name.cloned();
        }
    }

    /// [`Bus::history`], reaching at least sequence `reach` (an event of the channel this
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

    /// [`Bus::history`], read from the copy's leader (the JetStream API rather than direct
    /// gets): what it has acknowledged (or republished), it has.
    async fn leader_history(
        &self,
        channel: &Channel,
        region: u8,
        after: u64,
        until: Option<u64>,
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.subjects.inbound_in(region, channel);
        let copy = &self.copy(region).handle;
        read_range(channel, after, until, |next| {
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
                Ok(message.subject.as_str() == self.inner.subjects.inbound_in(region, channel))
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

/// How long a process waits for another region's stream's info.
const MIRROR_WAIT: Duration = Duration::from_secs(2);

/// The events of `channel` with `after < seq <= until` (no bound if `until` is `None`), one
/// `fetch(next)` at a time: the first stored event of the channel at `next` or later, as
/// (seq, headers, payload), or `None` past the last.
async fn read_range<F, Fut>(
    channel: &Channel,
    after: u64,
    until: Option<u64>,
    mut fetch: F,
) -> Result<Vec<Envelope>, BusError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<Option<(u64, HeaderMap, Bytes)>, BusError>>,
{
    let mut events = Vec::new();
    let mut next = after + 1;
    while until.is_none_or(|until| next <= until) {
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

async fn ensure_stream(inner: &Inner) -> Result<(), BusError> {
    let info = apply(inner, inner.stream.clone()).await?;
    inner.set_epoch(inner.subjects.own, epoch_of(&info));
    for (region, copy) in inner.copies.iter().enumerate() {
        if copy.mirror.is_some() {
            ensure_mirror(inner, region as u8, copy).await?;
        }
    }
    inner.stream_ready.store(true, Ordering::Release);
    Ok(())
}

/// Creates or updates this region's mirror of region `region`'s stream, and learns that
/// stream's epoch. A mirror is only created once its origin exists: a mirror that cannot
/// find its origin retries ever more slowly (up to every 2 minutes). Returns whether the
/// mirror exists.
async fn ensure_mirror(inner: &Inner, region: u8, copy: &Copy) -> Result<bool, BusError> {
    let Some(mirror) = &copy.mirror else {
        return Ok(true);
    };
    let mut mirror = mirror.clone();
    let existing = copy.handle.get_info().await.ok();
    // The origin's epoch, kept on the mirror for when the origin cannot be reached.
    match origin_epoch(inner, region, copy).await {
        Some(epoch) => {
            mirror.metadata.insert(ORIGIN_EPOCH.into(), epoch);
        }
        None => match &existing {
            Some(info) => {
                if let Some(epoch) = info.config.metadata.get(ORIGIN_EPOCH) {
                    mirror.metadata.insert(ORIGIN_EPOCH.into(), epoch.clone());
                }
            }
            None => {
                tracing::info!(stream = %copy.origin_name, "another region's stream does not exist yet: its mirror waits for it");
                return Ok(false);
            }
        },
    }
    apply(inner, mirror).await?;
    Ok(true)
}

/// Creates or updates a stream. When that cannot be done (with regions: the JetStream meta
/// group has lost its quorum because a region is down) but the stream exists, it is used as
/// it is: publishing and reading need only the stream's own servers.
async fn apply(inner: &Inner, config: stream::Config) -> Result<stream::Info, BusError> {
    match inner.js.create_or_update_stream(config.clone()).await {
        Ok(info) => Ok(info),
        Err(source) => {
            if let Ok(stream) = inner.js.get_stream_no_info(&config.name).await
                && let Ok(info) = stream.get_info().await
            {
                tracing::warn!(stream = %config.name, err = %source, "cannot apply the stream's settings; using it as it is");
                return Ok(info);
            }
            Err(BusError::Stream {
                stream: config.name,
                source,
            })
        }
    }
}

/// Reads region `region`'s origin stream's epoch (over the gateway), or else the one its
/// mirror here recorded, and keeps it.
async fn origin_epoch(inner: &Inner, region: u8, copy: &Copy) -> Option<String> {
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
        inner.set_epoch(region, epoch.clone());
    }
    epoch
}

/// A stream's identity: its creation time in nanoseconds, as hex.
fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

impl Inner {
    fn set_epoch(&self, region: u8, epoch: String) {
        let mut epochs = self.epochs.write().unwrap_or_else(|e| e.into_inner());
        let current = &mut epochs[region as usize];
        if !current.is_empty() && *current != epoch {
            let stream = self.subjects.origin_stream(region);
            tracing::warn!(%stream, "the stream was recreated: sequences restarted");
        }
        *current = epoch;
    }
}

/// Background task (with regions): learns the other regions' epochs, and watches this
/// region's mirrors of them. A mirror that has not heard from its origin for a while is behind
/// (the region, or the link to it, is down): said in the log and in
/// `fanout_region_mirror_behind{region}`. Once it is current again it republishes what it
/// missed, so this region's nodes get it live.
pub(super) async fn watch_mirrors(inner: std::sync::Weak<Inner>) {
    const EVERY: Duration = Duration::from_secs(1);
    const SILENT: Duration = Duration::from_secs(3);
    let mut behind: Vec<bool> = Vec::new();
    let mut exists: Vec<bool> = Vec::new();
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let closed = strong.closed.clone();
        behind.resize(strong.copies.len(), false);
        exists.resize(strong.copies.len(), false);
        for (region, copy) in strong.copies.iter().enumerate() {
            if copy.mirror.is_none() {
                continue;
            }
            let known = !strong.epochs.read().unwrap_or_else(|e| e.into_inner())[region].is_empty();
            if !known || !exists[region] {
                // Until its epoch is known, this node cannot judge positions in it; until its
                // origin exists, the mirror is not made.
                if strong.client.connection_state() == State::Connected {
                    exists[region] = ensure_mirror(&strong, region as u8, copy)
                        .await
                        .unwrap_or(false);
                }
            }
            let Ok(info) = copy.handle.get_info().await else {
                continue;
            };
            let Some(source) = info.mirror else { continue };
            let silent = source.active.is_none_or(|active| active > SILENT);
            let name = strong.region_names[region].to_string();
            if silent {
                if !behind[region] {
                    tracing::warn!(stream = %copy.origin_name, "the mirror of another region is behind: it cannot reach it");
                }
                behind[region] = true;
            } else if behind[region] && source.lag == 0 {
                behind[region] = false;
                tracing::info!(stream = %copy.origin_name, "the mirror of another region caught up");
            }
            metrics::gauge!("fanout_region_mirror_behind", "region" => name)
                .set(if behind[region] { 1.0 } else { 0.0 });
            strong
                .mirror_states
                .lock()
                .unwrap_or_else(|e| e.into_inner())[region] = match behind[region] {
                true => "behind",
                false => "current",
            };
        }
        drop(strong);
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = closed.cancelled() => return,
        }
    }
}

/// Background task: after every (re)connect, or when asked, makes sure the stream exists
/// with our settings, retrying until it does. Ends when the bus is dropped or drained.
pub(super) async fn keep_stream(inner: std::sync::Weak<Inner>) {
    let Some((notify, closed)) = inner
        .upgrade()
        .map(|i| (i.check_stream.clone(), i.closed.clone()))
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = notify.notified() => {}
            _ = closed.cancelled() => return,
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let Some(inner) = inner.upgrade() else { return };
            if inner.client.connection_state() != State::Connected {
                break; // the next Connected event wakes us again
            }
            match ensure_stream(&inner).await {
                Ok(()) => {
                    tracing::info!(stream = %inner.stream.name, "stream ready");
                    break;
                }
                Err(err) => tracing::warn!(%err, "retrying in {delay:?}"),
            }
            drop(inner);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closed.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

/// One event of [`Bus::publish_many`] waiting for its acknowledgement.
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
    async fn acknowledged(self, bus: &Bus) -> Result<Published, BusError> {
        let Pending { id, span, ack } = self;
        let ack = if span.is_none() {
            ack.await
        } else {
            ack.into_future().instrument(span.clone()).await
        };
        let ack = match ack.map_err(|err| bus.publish_error(err)) {
            Ok(ack) => ack,
            Err(err) => return Err(failed(&span, err)),
        };
        Ok(bus.published(id, &span, ack.sequence, ack.duplicate).await)
    }
}

/// Marks a publish's span failed.
fn failed(span: &tracing::Span, err: BusError) -> BusError {
    span.record("otel.status_code", "ERROR");
    span.record("error.type", err.kind());
    err
}
