//! The NATS bus: the only module that imports `async_nats`.
//!
//! It owns three things:
//! - **subjects**: every subject is built here. The API publishes to `<prefix>.in.<channel>`;
//!   the stream republishes each stored event to `<prefix>.out.<channel>`, which ws nodes
//!   subscribe to (compare centrifugo's `natsbroker`, which names `prefix.client.<ch>` in one
//!   place).
//! - **the stream** (`<PREFIX>`): captures `<prefix>.in.>`, keeps the history window and
//!   RePublishes every stored message with `Nats-Sequence` / `Nats-Last-Sequence` headers.
//!   Whichever process starts first creates it; every process re-applies its settings after
//!   each (re)connect, so a NATS server that lost its state is repaired without a restart.
//! - **the connection**: reconnects forever with capped, jittered backoff; the state is
//!   readable at any time for `/readyz` and for failing fast with [`BusError::Unavailable`].
//!
//! It does not know about HTTP, WebSocket clients or which channels anyone wants: callers
//! say what to publish and what to subscribe to.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{
    ConnectOptions, HeaderMap, ServerAddr,
    connection::State,
    jetstream::{
        self,
        context::PublishErrorKind,
        stream::{self, DirectGetErrorKind, Republish, StorageType},
    },
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use tracing::{Instrument, field::Empty};

use crate::{
    Channel, Common,
    discovery::Directory,
    envelope::{Envelope, HEADER_ID, HEADER_TS},
    presence, telemetry,
    time::now_ms,
};

// Header names JetStream reads or writes.
const NATS_MESSAGE_ID: &str = "Nats-Msg-Id";
const NATS_SEQUENCE: &str = "Nats-Sequence";
const NATS_LAST_SEQUENCE: &str = "Nats-Last-Sequence";

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
            BusError::Connect(_) => "connect",
            BusError::Unavailable(_) => "unavailable",
            BusError::Timeout(_) => "timeout",
            BusError::Publish(_) => "publish",
            BusError::Subscribe(_) => "subscribe",
            BusError::History(_) => "history",
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

/// Subject names, all derived from the prefix.
#[derive(Debug, Clone)]
struct Subjects {
    prefix: String,
}

impl Subjects {
    fn inbound(&self, channel: &Channel) -> String {
        format!("{}.in.{channel}", self.prefix)
    }
    fn outbound(&self, channel: &Channel) -> String {
        format!("{}.out.{channel}", self.prefix)
    }
    fn inbound_all(&self) -> String {
        format!("{}.in.>", self.prefix)
    }
    fn outbound_all(&self) -> String {
        format!("{}.out.>", self.prefix)
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
    fn stream_name(&self) -> String {
        self.prefix.replace('.', "_").to_ascii_uppercase()
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
    js: jetstream::Context,
    subjects: Subjects,
    stream: stream::Config,
    /// Handle for direct gets on the stream (history, duplicates).
    stream_handle: stream::Stream<()>,
    publish_timeout: Duration,
    /// Set once the stream is known to exist with our settings; cleared when a publish finds
    /// it missing. A std atomic: read on every publish and every `/readyz`.
    stream_ready: AtomicBool,
    /// Wakes the stream keeper: after a (re)connect, or when the stream went missing.
    check_stream: Arc<Notify>,
    /// The stream's identity: its creation time. Changes when the stream is recreated (and
    /// sequences restart), which makes every client's `since` meaningless.
    epoch: std::sync::RwLock<String>,
    /// Counts (re)connections to NATS; subscribers catch up on each change.
    connections: Arc<tokio::sync::watch::Sender<u64>>,
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
        let servers = common
            .nats_servers()
            .into_iter()
            .map(|url| {
                url.parse::<ServerAddr>()
                    .map_err(|source| BusError::InvalidUrl { url, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let check_stream = Arc::new(Notify::new());
        let on_event = check_stream.clone();
        let connections = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let on_connect = connections.clone();
        let node = common.node_id.clone();
        let options = ConnectOptions::new()
            .name(&common.node_id)
            .retry_on_initial_connect()
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
        let client = async_nats::connect_with_options(servers, options).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(common.publish_timeout());

        let subjects = Subjects {
            prefix: common.prefix.clone(),
        };
        let stream = stream::Config {
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
            duplicate_window: DUPLICATE_WINDOW
                .min(Duration::from_secs(common.history_max_age_secs)),
            ..Default::default()
        };
        let stream_handle = js
            .get_stream_no_info(&stream.name)
            .await
            .expect("the stream name is derived from a validated prefix");
        let bus = Bus {
            inner: Arc::new(Inner {
                client,
                js,
                subjects,
                stream,
                stream_handle,
                publish_timeout: common.publish_timeout(),
                stream_ready: AtomicBool::new(false),
                check_stream,
                epoch: std::sync::RwLock::new(String::new()),
                connections,
                closed: CancellationToken::new(),
            }),
        };
        tokio::spawn(keep_stream(Arc::downgrade(&bus.inner)));
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

    /// Changes on every (re)connection to NATS: what was published meanwhile must be fetched
    /// from the stream.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.connections.subscribe()
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
        let mut events = Vec::new();
        let mut next = after + 1;
        while until.is_none_or(|until| next <= until) {
            let found = self
                .inner
                .stream_handle
                .direct_get_next_for_subject(subject.clone(), Some(next))
                .await;
            let message = match found {
                Ok(message) => message,
                Err(err) if err.kind() == DirectGetErrorKind::NotFound => break,
                Err(err) => return Err(BusError::History(err)),
            };
            if until.is_some_and(|until| message.sequence > until) {
                break;
            }
            next = message.sequence + 1;
            events.push(envelope(
                channel,
                message.sequence,
                0,
                &message.headers,
                message.payload,
            ));
        }
        Ok(events)
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
        let info = self
            .inner
            .stream_handle
            .get_info()
            .await
            .map_err(|_| BusError::Unavailable("no stream info"))?;
        Ok(info.state.first_sequence)
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
        })
    }

    /// Announces a ws node (fire and forget; the next announcement repeats it).
    pub async fn announce(&self, node: &crate::discovery::NodeInfo) {
        let payload = serde_json::to_vec(node).expect("a node announcement serializes");
        if let Err(err) = self
            .inner
            .client
            .publish(self.inner.subjects.nodes(), payload.into())
            .await
        {
            tracing::debug!(%err, "node announcement not sent");
        }
    }

    /// Follows the nodes' announcements into `directory` until the bus closes.
    pub async fn follow_nodes(
        &self,
        directory: std::sync::Arc<crate::discovery::Directory>,
    ) -> Result<(), BusError> {
        let mut announcements = self
            .inner
            .client
            .subscribe(self.inner.subjects.nodes())
            .await?;
        tokio::spawn(async move {
            while let Some(message) = announcements.next().await {
                match serde_json::from_slice(&message.payload) {
                    Ok(node) => directory.heard(node),
                    Err(err) => tracing::debug!(%err, "ignoring a malformed node announcement"),
                }
            }
        });
        Ok(())
    }

    /// Publishes a presence change of `channel` (fire and forget: core NATS, not stored).
    pub async fn publish_presence(&self, channel: &Channel, frame: Bytes) {
        let subject = self.inner.subjects.presence(channel);
        if let Err(err) = self.inner.client.publish(subject, frame).await {
            tracing::debug!(%channel, %err, "presence change not sent");
        }
    }

    /// Follows the presence changes of `channel`. Returns once the server has registered the
    /// interest (like [`Bus::subscribe`]).
    pub async fn subscribe_presence(&self, channel: &Channel) -> Result<PresenceChanges, BusError> {
        let inner = &self.inner;
        let subscriber = inner
            .client
            .subscribe(inner.subjects.presence(channel))
            .await?;
        self.sync().await;
        Ok(PresenceChanges { subscriber })
    }

    /// Answers every presence query with `answer(query)`, the parts of this node's answer,
    /// until the bus closes.
    pub async fn answer_presence<F>(&self, answer: F) -> Result<(), BusError>
    where
        F: Fn(presence::Query) -> Vec<Bytes> + Send + 'static,
    {
        let mut queries = self
            .inner
            .client
            .subscribe(self.inner.subjects.presence_query())
            .await?;
        let client = self.inner.client.clone();
        tokio::spawn(async move {
            while let Some(message) = queries.next().await {
                let Some(reply) = message.reply else { continue };
                let query = match serde_json::from_slice(&message.payload) {
                    Ok(query) => query,
                    Err(err) => {
                        tracing::debug!(%err, "ignoring a malformed presence query");
                        continue;
                    }
                };
                for part in answer(query) {
                    if let Err(err) = client.publish(reply.clone(), part).await {
                        tracing::debug!(%err, "presence answer not sent");
                        break;
                    }
                }
            }
        });
        Ok(())
    }

    /// Asks every ws node who is in `channel` (or only how many) and gathers the answers:
    /// until every node in `directory` has answered, or [`presence::QUERY_TIMEOUT`] (then
    /// the answer is partial). One request whatever the number of members.
    pub async fn presence(
        &self,
        channel: &Channel,
        count_only: bool,
        directory: &Directory,
    ) -> Result<presence::Presence, BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS"));
        }
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await?;
        let query = presence::Query {
            channel: channel.to_string(),
            count_only,
        };
        let payload = serde_json::to_vec(&query).expect("a query serializes");
        client
            .publish_with_reply(self.inner.subjects.presence_query(), inbox, payload.into())
            .await
            .map_err(|_| BusError::Unavailable("cannot send the presence query"))?;
        let deadline = tokio::time::Instant::now() + presence::QUERY_TIMEOUT;
        // Per node: its count, and whether its last part came.
        let mut nodes: HashMap<String, (usize, bool)> = HashMap::new();
        let mut members = Vec::new();
        let complete = |nodes: &HashMap<String, (usize, bool)>| {
            directory.is_complete()
                && directory
                    .live()
                    .iter()
                    .all(|node| nodes.get(&node.id).is_some_and(|(_, done)| *done))
                && nodes.values().all(|(_, done)| *done)
        };
        let partial = loop {
            if complete(&nodes) {
                break false;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break true;
            }
            // Wake now and then: discovery may forget a crashed node meanwhile.
            let wait = (deadline - now).min(Duration::from_millis(100));
            let Ok(Some(message)) = tokio::time::timeout(wait, answers.next()).await else {
                continue;
            };
            match serde_json::from_slice::<presence::Part>(&message.payload) {
                Ok(part) => {
                    let entry = nodes.entry(part.node).or_default();
                    *entry = (part.count, part.last);
                    if !count_only {
                        members.extend(part.members);
                    }
                }
                Err(err) => tracing::debug!(%err, "ignoring a malformed presence answer"),
            }
        };
        Ok(presence::Presence {
            channel: channel.clone(),
            count: nodes.values().map(|(count, _)| count).sum(),
            members: (!count_only).then_some(members),
            partial,
            nodes: nodes
                .into_iter()
                .filter_map(|(node, (_, done))| done.then_some(node))
                .collect(),
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
async fn keep_stream(inner: std::sync::Weak<Inner>) {
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

/// The presence changes of one channel, as encoded frames. Dropping it unsubscribes.
#[derive(Debug)]
pub struct PresenceChanges {
    subscriber: async_nats::Subscriber,
}

impl PresenceChanges {
    pub async fn next(&mut self) -> Option<Bytes> {
        self.subscriber.next().await.map(|message| message.payload)
    }
}

/// Events of one channel, in stream order, decoded into [`Envelope`]s.
/// Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    channel: Channel,
    subject: String,
    subscriber: async_nats::Subscriber,
}

/// A message on an event subject that is not a well-formed stored event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no valid Nats-Sequence header: not a message republished by the stream")]
    NoSequence,
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
        Some(decode(&self.channel, message))
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
        traceparent: header("traceparent").map(String::from),
        tracestate: header("tracestate").map(String::from),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_come_from_the_prefix() {
        let s = Subjects {
            prefix: "acme.rt".into(),
        };
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
