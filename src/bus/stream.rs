//! The stream (`<PREFIX>`): it captures `<prefix>.in.>`, keeps the history window and
//! RePublishes every stored message to `<prefix>.out.<channel>` with `Nats-Sequence` /
//! `Nats-Last-Sequence` headers. Whichever process starts first creates it; every process
//! re-applies its settings after each (re)connect, so a NATS server that lost its state is
//! repaired without a restart. Here too: publishing into it (acknowledged writes), its epoch,
//! and reading a channel's history back (replay, gap repair).
use std::{sync::atomic::Ordering, time::Duration};

use async_nats::{
    HeaderMap,
    connection::State,
    jetstream::{
        context::PublishErrorKind,
        stream::{self, DirectGetErrorKind, RawMessageErrorKind, Republish, StorageType},
    },
};
use bytes::Bytes;
use tracing::{Instrument, field::Empty};

use super::{
    Bus, BusError, DUPLICATE_WINDOW, Inner, NATS_MESSAGE_ID, Published, Subjects, envelope,
};
use crate::{
    Channel, Common, Envelope,
    envelope::{HEADER_ID, HEADER_TS},
    telemetry,
    time::now_ms,
};

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
        let inner = &self.inner;
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected"));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let subject = inner.subjects.inbound(channel);
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, id.as_str());
        headers.insert(HEADER_TS, now_ms().to_string().as_str());
        headers.insert(NATS_MESSAGE_ID, idempotency_key.unwrap_or(&id));
        let span = if telemetry::tracing_enabled() {
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
        let acknowledged = async {
            inner
                .js
                .publish_with_headers(subject, headers, data)
                .await
                .map_err(|err| self.publish_error(err))?
                .await
                .map_err(|err| self.publish_error(err))
        }
        .instrument(span.clone())
        .await;
        let ack = match acknowledged {
            Ok(ack) => {
                span.record("fanout.seq", ack.sequence);
                ack
            }
            Err(err) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", err.kind());
                return Err(err);
            }
        };
        let id = if ack.duplicate {
            self.stored_id(ack.sequence).await.unwrap_or(id)
        } else {
            id
        };
        Ok(Published {
            id,
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
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
        let message = self.inner.stream_handle.direct_get(seq).await.ok()?;
        Some(message.headers.get(HEADER_ID)?.as_str().to_string())
    }

    /// The stream's identity (empty until the stream is known). A client's `since` is only
    /// meaningful within one epoch.
    pub fn epoch(&self) -> String {
        self.inner
            .epoch
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the stream's identity again (after a sequence anomaly) and returns it.
    pub async fn refresh_epoch(&self) -> String {
        if let Ok(info) = self.inner.stream_handle.get_info().await {
            self.inner.set_epoch(epoch_of(&info));
        }
        self.epoch()
    }

    /// The stored events of `channel` with `after < seq <= until` (no upper bound if `until`
    /// is `None`), in order. One direct get per event, so it is meant for the bounded ranges
    /// a replay or a gap repair needs (at most the per-channel history limit).
    pub async fn history(
        &self,
        channel: &Channel,
        after: u64,
        until: Option<u64>,
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.subjects.inbound(channel);
        read_range(channel, after, until, |next| {
            let subject = subject.clone();
            async move {
                match self
                    .inner
                    .stream_handle
                    .direct_get_next_for_subject(subject, Some(next))
                    .await
                {
                    Ok(message) => Ok(Some((message.sequence, message.headers, message.payload))),
                    Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(None),
                    Err(err) => Err(BusError::History(err)),
                }
            }
        })
        .await
    }

    /// [`Bus::history`], reaching at least sequence `reach` (an event of the channel this
    /// node has seen republished, so stored). Direct gets are answered by any replica, and a
    /// replica may lag the leader by a moment: while the answer falls short of `reach`, it
    /// asks again, then asks the leader.
    pub async fn history_reaching(
        &self,
        channel: &Channel,
        after: u64,
        until: Option<u64>,
        reach: u64,
    ) -> Result<Vec<Envelope>, BusError> {
        let mut events = self.history(channel, after, until).await?;
        let mut pause = Duration::from_millis(1);
        for _ in 0..6 {
            let last = events.last().map_or(after, |e| e.seq);
            if last >= reach {
                return Ok(events);
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            events.extend(self.history(channel, last, until).await?);
        }
        let last = events.last().map_or(after, |e| e.seq);
        if last < reach {
            tracing::debug!(%channel, last, reach, "a replica lags: reading from the leader");
            events.extend(self.leader_history(channel, last, until).await?);
        }
        Ok(events)
    }

    /// [`Bus::history`], read from the stream's leader (the JetStream API rather than direct
    /// gets): what it has acknowledged, it has.
    async fn leader_history(
        &self,
        channel: &Channel,
        after: u64,
        until: Option<u64>,
    ) -> Result<Vec<Envelope>, BusError> {
        let subject = self.inner.subjects.inbound(channel);
        read_range(channel, after, until, |next| {
            let subject = subject.clone();
            async move {
                let found = self
                    .inner
                    .stream_handle
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
    }

    /// Whether the event at `seq` on `channel` is still stored. Limits remove the oldest
    /// events first, so if it is, every later event of the channel is too.
    pub async fn is_stored(&self, channel: &Channel, seq: u64) -> Result<bool, BusError> {
        match self.inner.stream_handle.direct_get(seq).await {
            Ok(message) => Ok(message.subject.as_str() == self.inner.subjects.inbound(channel)),
            Err(err) if err.kind() == DirectGetErrorKind::NotFound => Ok(false),
            Err(err) => Err(BusError::History(err)),
        }
    }

    /// The stream's first stored sequence (1 while nothing has ever been removed).
    pub async fn first_sequence(&self) -> Result<u64, BusError> {
        Ok(self.sequences().await?.0)
    }

    /// The stream's first stored and last assigned sequences: where history starts, and
    /// "now" (every event stored from here on has a higher sequence).
    pub async fn sequences(&self) -> Result<(u64, u64), BusError> {
        let info = self
            .inner
            .stream_handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))?;
        Ok((info.state.first_sequence, info.state.last_sequence))
    }
}

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
    let info = inner
        .js
        .create_or_update_stream(inner.stream.clone())
        .await
        .map_err(|source| BusError::Stream {
            stream: inner.stream.name.clone(),
            source,
        })?;
    inner.set_epoch(epoch_of(&info));
    inner.stream_ready.store(true, Ordering::Release);
    Ok(())
}

/// A stream's identity: its creation time in nanoseconds, as hex.
fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

impl Inner {
    fn set_epoch(&self, epoch: String) {
        let mut current = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        if !current.is_empty() && *current != epoch {
            tracing::warn!(stream = %self.stream.name, "the stream was recreated: sequences restarted");
        }
        *current = epoch;
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
