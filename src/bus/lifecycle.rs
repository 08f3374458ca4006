//! Lifecycle events on NATS ([`crate::lifecycle`] says how the tier decides them): the nodes'
//! deltas (a work-queue stream, one consumer shared by every API process and holding one
//! message at a time), each channel's state (a key-value bucket, written compare-and-set),
//! the decided events (a stream, de-duplicated by event id), the batches no receiver took
//! (a dead-letter stream), and the lease that lets one API process deliver at a time.
//!
//! Everything is made on first use by [`Lifecycle::ensure`]; nothing exists while webhooks
//! are off.

use std::{sync::Arc, time::Duration};

use tokio::sync::OnceCell;

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, consumer, kv, stream},
};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{error::BusError, topology::Topology};
use crate::lifecycle::{Delta, Event, State};

/// The decider's durable consumer, shared by every API process.
const DECIDER: &str = "decider";
/// The webhook sender's durable consumer, shared by every API process.
const SENDER: &str = "webhooks";
/// The checks' durable consumer, shared by every API process: it holds each check back until
/// its time, many at once.
const CHECKER: &str = "checker";
/// Header of a check: when it is due (unix ms).
const DUE: &str = "Fanout-Due";
/// How long a delivered, unacknowledged message stays with one process before another gets
/// it (a process that died mid-fold or mid-delivery).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long the lease of the webhook sender lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(10);
/// The key of the node instances the decider has seen (a channel's key is its name in hex,
/// which never spells this).
const INSTANCES: &str = "instances";

/// The lifecycle's handles. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    js: jetstream::Context,
    topology: Topology,
    /// The buckets, looked up once (each lookup is a request to the server): the states, the
    /// lease.
    buckets: Arc<[OnceCell<kv::Store>; 2]>,
}

/// A delta as the decider receives it: held (by this process) until acknowledged.
#[derive(Debug)]
pub struct Incoming {
    pub delta: Delta,
    /// Its stream sequence.
    pub seq: u64,
    /// A check's time (unix ms).
    pub due: Option<u64>,
    message: jetstream::Message,
}

impl Incoming {
    /// Done with: the next delta comes.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.message
            .ack()
            .await
            .map_err(|_| BusError::Unavailable("ack lost"))
    }

    /// Not yet: delivered again after `delay` (a check before its time, a delta that failed).
    pub async fn later(&self, delay: Duration) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|_| BusError::Unavailable("ack lost"))
    }
}

/// The decided events, as the sender takes them.
#[derive(Debug)]
pub struct Events(consumer::PullConsumer);

impl Events {
    /// The next batch: up to `max` events, or what came within `wait` (none: nothing came).
    pub async fn batch(&self, max: usize, wait: Duration) -> Result<Batch, BusError> {
        let mut fetched = self
            .0
            .batch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
            .map_err(unavailable("events not fetched"))?;
        let mut batch = Batch {
            events: Vec::new(),
            messages: Vec::new(),
        };
        while let Some(message) = fetched.next().await {
            let Ok(message) = message else { break };
            match serde_json::from_slice::<Event>(&message.payload) {
                Ok(event) => {
                    batch.events.push(event);
                    batch.messages.push(message);
                }
                Err(_) => {
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        Ok(batch)
    }
}

/// A batch of decided events held for delivery, until [`Batch::done`].
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    messages: Vec<jetstream::Message>,
}

impl Batch {
    /// The first and last event's stream sequence: the batch's id, the same at each retry.
    pub fn id(&self) -> String {
        let seq = |m: &jetstream::Message| m.info().map(|i| i.stream_sequence).unwrap_or(0);
        match (self.messages.first(), self.messages.last()) {
            (Some(first), Some(last)) => format!("{}-{}", seq(first), seq(last)),
            _ => String::new(),
        }
    }

    /// Still working on it: keeps the messages from going to another process.
    pub async fn progress(&self) {
        for message in &self.messages {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// Delivered (or dead-lettered): acknowledged, never sent again.
    pub async fn done(&self) -> Result<(), BusError> {
        for message in &self.messages {
            message
                .double_ack()
                .await
                .map_err(|_| BusError::Unavailable("ack lost"))?;
        }
        Ok(())
    }
}

fn unavailable<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BusError {
    move |err| {
        tracing::debug!(%err, what, "lifecycle");
        BusError::Unavailable(what)
    }
}

impl Lifecycle {
    /// Makes the streams, buckets and consumers (idempotent). `retry` is how long a batch may
    /// be retried; decided events are kept at least that long, for replays.
    pub async fn ensure(&self, retry: Duration, batch_max: usize) -> Result<(), BusError> {
        let t = &self.topology;
        let keep = retry.max(Duration::from_secs(86_400));
        // With regions, everything lives in the home region's cluster.
        let placement = t.life_home().map(|home| stream::Placement {
            cluster: Some(home.to_string()),
            ..Default::default()
        });
        let streams = [
            stream::Config {
                name: t.life_name("LIFE"),
                subjects: vec![t.life()],
                retention: stream::RetentionPolicy::WorkQueue,
                duplicate_window: Duration::from_secs(120),
                placement: placement.clone(),
                ..Default::default()
            },
            stream::Config {
                name: t.life_name("LIFE_CHECKS"),
                subjects: vec![t.life_checks()],
                retention: stream::RetentionPolicy::WorkQueue,
                placement: placement.clone(),
                ..Default::default()
            },
            stream::Config {
                name: t.life_name("HOOKS"),
                subjects: vec![t.hooks()],
                max_age: keep,
                duplicate_window: Duration::from_secs(120),
                placement: placement.clone(),
                ..Default::default()
            },
            stream::Config {
                name: t.life_name("HOOKS_DEAD"),
                subjects: vec![t.hooks_dead()],
                max_age: Duration::from_secs(30 * 86_400),
                placement: placement.clone(),
                ..Default::default()
            },
        ];
        for config in streams {
            self.js
                .get_or_create_stream(config)
                .await
                .map_err(unavailable("cannot make a lifecycle stream"))?;
        }
        for (bucket, max_age) in [
            (t.life_name("LIFE_STATE"), Duration::ZERO),
            (t.life_name("LIFE_LEASE"), LEASE),
        ] {
            if self.js.get_key_value(&bucket).await.is_err() {
                self.js
                    .create_key_value(kv::Config {
                        bucket,
                        history: 1,
                        max_age,
                        placement: placement.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable("cannot make a lifecycle bucket"))?;
            }
        }
        let consumers = [
            (t.life_name("LIFE"), DECIDER, 1),
            (t.life_name("LIFE_CHECKS"), CHECKER, 100_000),
            (t.life_name("HOOKS"), SENDER, batch_max as i64),
        ];
        for (stream, name, pending) in consumers {
            let stream = self
                .js
                .get_stream(&stream)
                .await
                .map_err(unavailable("no lifecycle stream"))?;
            stream
                .get_or_create_consumer(
                    name,
                    consumer::pull::Config {
                        durable_name: Some(name.to_string()),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        max_ack_pending: pending,
                        ..Default::default()
                    },
                )
                .await
                .map_err(unavailable("cannot make a lifecycle consumer"))?;
        }
        Ok(())
    }

    /// Records `delta` (a node's, or a check): returns once the stream has it. `once`: an id
    /// that makes a repeat within two minutes a no-op (a `node_gone` several API processes
    /// report).
    pub async fn report(&self, delta: &Delta, once: Option<&str>) -> Result<(), BusError> {
        let payload = serde_json::to_vec(delta).expect("a delta is JSON").into();
        self.store(self.topology.life(), once, payload).await
    }

    /// Publishes `payload` to `subject` (`id`: its `Nats-Msg-Id`, which JetStream
    /// de-duplicates) and waits until the stream has it.
    async fn store(
        &self,
        subject: String,
        id: Option<&str>,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        if let Some(id) = id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(unavailable("not sent"))?
            .await
            .map_err(unavailable("not stored"))?;
        Ok(())
    }

    /// A check of `channel` at `due` (unix ms), held back until then by [`Lifecycle::checks`]
    /// and then reported to the decider.
    pub async fn schedule_check(&self, channel: &str, due: u64) -> Result<(), BusError> {
        let check = Delta::Check {
            channel: channel.to_string(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(DUE, due.to_string().as_str());
        let payload: Bytes = serde_json::to_vec(&check).expect("a delta is JSON").into();
        self.js
            .publish_with_headers(self.topology.life_checks(), headers, payload)
            .await
            .map_err(unavailable("check not sent"))?
            .await
            .map_err(unavailable("check not stored"))?;
        Ok(())
    }

    /// The deltas, one at a time, for the decider (shared by every API process).
    pub async fn deltas(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Incoming> + use<>, BusError> {
        self.follow("LIFE", DECIDER).await
    }

    /// The scheduled checks, many at a time (shared by every API process).
    pub async fn checks(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Incoming> + use<>, BusError> {
        self.follow("LIFE_CHECKS", CHECKER).await
    }

    async fn follow(
        &self,
        what: &str,
        name: &str,
    ) -> Result<impl futures_util::Stream<Item = Incoming> + use<>, BusError> {
        let stream = self
            .js
            .get_stream(self.topology.life_name(what))
            .await
            .map_err(unavailable("no lifecycle stream"))?;
        let consumer: consumer::PullConsumer = stream
            .get_consumer(name)
            .await
            .map_err(unavailable("no lifecycle consumer"))?;
        let messages = consumer
            .messages()
            .await
            .map_err(unavailable("decider not following"))?;
        Ok(messages.filter_map(|message| async move {
            let message = message.ok()?;
            let seq = message.info().ok()?.stream_sequence;
            let due = message
                .headers
                .as_ref()
                .and_then(|h| h.get(DUE))
                .and_then(|v| v.as_str().parse().ok());
            match serde_json::from_slice::<Delta>(&message.payload) {
                Ok(delta) => Some(Incoming {
                    delta,
                    seq,
                    due,
                    message,
                }),
                Err(err) => {
                    tracing::warn!(%err, seq, "a lifecycle delta that is not one: dropped");
                    let _ = message.ack_with(AckKind::Term).await;
                    None
                }
            }
        }))
    }

    pub(super) fn new(js: jetstream::Context, topology: Topology) -> Lifecycle {
        Lifecycle {
            js,
            topology,
            buckets: Arc::default(),
        }
    }

    /// Bucket `what` (`LIFE_STATE` or `LIFE_LEASE`), looked up on first use.
    async fn bucket(&self, what: &str) -> Result<&kv::Store, BusError> {
        let slot = match what {
            "LIFE_STATE" => &self.buckets[0],
            _ => &self.buckets[1],
        };
        slot.get_or_try_init(|| async {
            self.js
                .get_key_value(self.topology.life_name(what))
                .await
                .map_err(unavailable("no lifecycle bucket"))
        })
        .await
    }

    /// `channel`'s state and the revision it was read at (none: not stored).
    pub async fn state(&self, channel: &str) -> Result<(State, Option<u64>), BusError> {
        self.read(&hex(channel)).await
    }

    async fn read<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: &str,
    ) -> Result<(T, Option<u64>), BusError> {
        let store = self.bucket("LIFE_STATE").await?;
        match store
            .entry(key)
            .await
            .map_err(unavailable("state not read"))?
        {
            Some(entry) if entry.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            )),
            Some(entry) => Ok((T::default(), Some(entry.revision))),
            None => Ok((T::default(), None)),
        }
    }

    /// Writes `channel`'s state if it is still at `revision` (compare-and-set).
    pub async fn save(
        &self,
        channel: &str,
        state: &State,
        revision: Option<u64>,
    ) -> Result<(), BusError> {
        self.write(&hex(channel), state, revision).await
    }

    async fn write<T: serde::Serialize>(
        &self,
        key: &str,
        value: &T,
        revision: Option<u64>,
    ) -> Result<(), BusError> {
        let store = self.bucket("LIFE_STATE").await?;
        let value: Bytes = serde_json::to_vec(value).expect("state is JSON").into();
        match revision {
            Some(revision) => store
                .update(key, value, revision)
                .await
                .map(drop)
                .map_err(unavailable("state changed meanwhile (another decider?)")),
            None => store
                .create(key, value)
                .await
                .map(drop)
                .map_err(unavailable("state created meanwhile (another decider?)")),
        }
    }

    /// The node instances the decider has seen, and the revision.
    pub async fn instances(
        &self,
    ) -> Result<(std::collections::BTreeSet<String>, Option<u64>), BusError> {
        self.read(INSTANCES).await
    }

    pub async fn save_instances(
        &self,
        instances: &std::collections::BTreeSet<String>,
        revision: Option<u64>,
    ) -> Result<(), BusError> {
        self.write(INSTANCES, instances, revision).await
    }

    /// Every channel with a state.
    pub async fn channels(&self) -> Result<Vec<String>, BusError> {
        let store = self.bucket("LIFE_STATE").await?;
        let keys = store.keys().await.map_err(unavailable("keys not read"))?;
        Ok(keys
            .filter_map(|key| async move { unhex(&key.ok()?) })
            .collect()
            .await)
    }

    /// Records decided events (each de-duplicated by its id), in order.
    pub async fn record(&self, events: &[Event]) -> Result<(), BusError> {
        for event in events {
            let payload = serde_json::to_vec(event).expect("an event is JSON").into();
            self.store(self.topology.hooks(), Some(&event.id), payload)
                .await?;
        }
        Ok(())
    }

    /// Takes or renews the sender's lease as `holder`: true while it is this process's.
    pub async fn lease(&self, holder: &str) -> bool {
        let Ok(store) = self.bucket("LIFE_LEASE").await else {
            return false;
        };
        let value = Bytes::from(holder.to_string());
        match store.entry("sender").await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                entry.value == holder.as_bytes()
                    && store.update("sender", value, entry.revision).await.is_ok()
            }
            Ok(Some(entry)) => store.update("sender", value, entry.revision).await.is_ok(),
            Ok(None) => store.create("sender", value).await.is_ok(),
            Err(_) => false,
        }
    }

    /// The decided events' consumer, for the sender.
    pub async fn events(&self) -> Result<Events, BusError> {
        let stream = self
            .js
            .get_stream(self.topology.life_name("HOOKS"))
            .await
            .map_err(unavailable("no events stream"))?;
        let consumer = stream
            .get_consumer(SENDER)
            .await
            .map_err(unavailable("no sender"))?;
        Ok(Events(consumer))
    }

    /// Keeps a batch no receiver took (its JSON body) in the dead-letter stream.
    pub async fn dead_letter(&self, id: &str, body: Bytes) -> Result<(), BusError> {
        let id = format!("dead-{id}");
        self.store(self.topology.hooks_dead(), Some(&id), body)
            .await
    }
}

impl Lifecycle {
    /// The last `limit` dead letters, oldest first: each batch's stream sequence and body.
    pub async fn dead(&self, limit: usize) -> Result<Vec<(u64, serde_json::Value)>, BusError> {
        let mut stream = self
            .js
            .get_stream(self.topology.life_name("HOOKS_DEAD"))
            .await
            .map_err(unavailable("no dead-letter stream"))?;
        let info = stream
            .info()
            .await
            .map_err(unavailable("dead letters not read"))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        let from = last.saturating_sub(limit as u64 - 1).max(first);
        for seq in from..=last {
            if let Ok(message) = stream.get_raw_message(seq).await {
                let body = serde_json::from_slice(&message.payload).unwrap_or_default();
                out.push((seq, body));
            }
        }
        Ok(out)
    }

    /// The recorded events from `since_ms` (unix ms; 0: the oldest kept), in order, up to
    /// `limit`.
    pub async fn history(&self, since_ms: u64, limit: usize) -> Result<Vec<Event>, BusError> {
        let stream = self
            .js
            .get_stream(self.topology.life_name("HOOKS"))
            .await
            .map_err(unavailable("no events stream"))?;
        let deliver_policy = match since_ms {
            0 => consumer::DeliverPolicy::All,
            ms => consumer::DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(ms) * 1_000_000,
                )
                .map_err(unavailable("a time out of range"))?,
            },
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(unavailable("events not read"))?;
        let mut events = Vec::new();
        if stream.cached_info().state.messages == 0 {
            return Ok(events);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(unavailable("events not read"))?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
            let Ok(Some(Ok(message))) = next else { break };
            let pending = message.info().map(|i| i.pending).unwrap_or(0);
            if let Ok(event) = serde_json::from_slice::<Event>(&message.payload) {
                events.push(event);
            }
            if pending == 0 || events.len() >= limit {
                break;
            }
        }
        Ok(events)
    }
}

/// A channel name as a key (`[0-9a-f]+`: key-value keys take fewer characters than channels).
fn hex(channel: &str) -> String {
    channel.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(key: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(key.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}
