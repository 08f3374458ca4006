//! Lifecycle events and their webhooks (`FANOUT_WEBHOOK_URL`): every API process runs the
//! three loops, and NATS makes them one for the tier ([`fanout::lifecycle`] has the design):
//!
//! - the **decider** folds the nodes' deltas into each channel's state, one delta at a time
//!   across every API process (one durable consumer holding one message), and records the
//!   events they decide;
//! - the **checker** holds each scheduled check (a debounce) back until its time, many at
//!   once, then reports it to the decider;
//! - the **sweeper** reports node instances discovery has forgotten (kill -9), so that the
//!   decider releases what they held;
//! - the **sender** delivers the recorded events in batches, signed, retrying with
//!   exponential backoff and jitter until `FANOUT_WEBHOOK_RETRY_SECS`, then dead-letters the
//!   batch. One API process delivers at a time (a lease in a key-value bucket); another takes
//!   over within the lease's 10 s when it dies, and what it held is delivered again (the
//!   receiver dedupes by event id).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use fanout::{
    Bus,
    bus::{Batch, Incoming, LEASE, Lifecycle},
    discovery::Directory,
    lifecycle::{Delta, Event, State, signature},
    time::now_ms,
};
use futures_util::StreamExt;
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;

use crate::Config;
use fanout::post::Poster;

/// What the loops need of the settings.
#[derive(Debug, Clone)]
struct Settings {
    url: String,
    secrets: Vec<String>,
    batch_max: usize,
    batch_wait: Duration,
    retry: Duration,
    debounce: u64,
}

/// The webhooks of this API process: its settings, its HTTP client, the bus.
#[derive(Debug)]
pub struct Webhooks {
    settings: Settings,
    client: Poster,
    bus: Bus,
}

impl Webhooks {
    /// `None` unless `FANOUT_WEBHOOK_URL` is set (`config` validated: the URL and the CA
    /// file are checked there).
    pub fn new(config: &Config, bus: Bus) -> Option<Arc<Webhooks>> {
        if config.common.webhook_url.is_empty() {
            return None;
        }
        let settings = settings(config);
        let client = config.webhook_poster().ok()?;
        Some(Arc::new(Webhooks {
            settings,
            client,
            bus,
        }))
    }

    /// POSTs `events` as one signed webhook (`id`: `X-Fanout-Webhook-Id`); the body sent and
    /// the receiver's status (0: no answer in time).
    async fn post(&self, id: &str, events: &[Event]) -> (Bytes, u16) {
        let body: Bytes = serde_json::to_vec(&serde_json::json!({
            "time_ms": now_ms(),
            "events": events,
        }))
        .expect("events are JSON")
        .into();
        let t = now_ms() / 1000;
        let headers = [
            ("content-type", "application/json".to_string()),
            ("x-fanout-webhook-id", id.to_string()),
            (
                "x-fanout-signature",
                signature(&self.settings.secrets, t, &body),
            ),
        ];
        let status = match self.client.post(&headers, body.clone()).await {
            Ok(status) => status,
            Err(why) => {
                tracing::debug!(%id, why, "webhook not answered");
                0
            }
        };
        (body, status)
    }

    /// The last `limit` dead letters.
    pub async fn dead(
        &self,
        limit: usize,
    ) -> Result<Vec<(u64, serde_json::Value)>, fanout::BusError> {
        self.bus.lifecycle().dead(limit).await
    }

    /// Sends again the recorded events from `since` (unix ms) or after event `after`, in
    /// batches, in the background; returns how many.
    pub async fn replay(
        self: &Arc<Self>,
        since_ms: u64,
        after: Option<&str>,
    ) -> Result<usize, fanout::BusError> {
        let mut events = self.bus.lifecycle().history(since_ms, 100_000).await?;
        if let Some(after) = after {
            match events.iter().position(|e| e.id == after) {
                Some(i) => {
                    events.drain(..=i);
                }
                None => events.clear(),
            }
        }
        let count = events.len();
        let webhooks = self.clone();
        tokio::spawn(async move {
            for chunk in events.chunks(webhooks.settings.batch_max) {
                let id = format!("replay-{}", chunk[0].id);
                let mut attempt = 0;
                loop {
                    let (_, status) = webhooks.post(&id, chunk).await;
                    if (200..300).contains(&status) {
                        counter!("fanout_webhook_deliveries_total", "outcome" => "delivered")
                            .increment(1);
                        break;
                    }
                    counter!("fanout_webhook_deliveries_total", "outcome" => "failed").increment(1);
                    attempt += 1;
                    if attempt > 10 {
                        tracing::warn!(%id, status, "replayed webhook refused; replay stopped");
                        return;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        });
        Ok(count)
    }
}

fn settings(config: &Config) -> Settings {
    Settings {
        url: config.common.webhook_url.clone(),
        secrets: config.webhook_secrets(),
        batch_max: config.webhook_batch_max,
        batch_wait: Duration::from_millis(config.webhook_batch_ms),
        retry: Duration::from_secs(config.webhook_retry_secs),
        debounce: config.common.webhook_debounce_ms,
    }
}

/// Starts the loops; they end with `shutdown`.
pub fn start(webhooks: Arc<Webhooks>, directory: Arc<Directory>, shutdown: CancellationToken) {
    let settings = webhooks.settings.clone();
    tokio::spawn(async move {
        let lifecycle = webhooks.bus.lifecycle().clone();
        let mut wait = Duration::from_millis(200);
        while let Err(err) = lifecycle.ensure(settings.retry, settings.batch_max).await {
            tracing::warn!(%err, "lifecycle streams not ready; retrying");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        tracing::info!(url = %settings.url, "lifecycle webhooks on");
        tokio::spawn(until(
            shutdown.clone(),
            decide(lifecycle.clone(), settings.clone()),
        ));
        tokio::spawn(until(shutdown.clone(), check(lifecycle.clone())));
        tokio::spawn(until(
            shutdown.clone(),
            sweep(webhooks.bus.clone(), directory),
        ));
        tokio::spawn(until(shutdown, send(lifecycle, webhooks)));
    });
}

async fn until(shutdown: CancellationToken, work: impl Future<Output = ()>) {
    tokio::select! {
        _ = work => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Folds deltas, one at a time, forever.
async fn decide(lifecycle: Lifecycle, settings: Settings) {
    // The node instances this process has seen recorded: each one's first report is enough.
    let mut known = std::collections::HashSet::new();
    loop {
        match lifecycle.deltas().await {
            Ok(deltas) => {
                let mut deltas = std::pin::pin!(deltas);
                while let Some(incoming) = deltas.next().await {
                    if let Err(err) = fold(&lifecycle, &settings, &incoming, &mut known).await {
                        tracing::warn!(%err, seq = incoming.seq, "lifecycle delta not folded; again in 1 s");
                        let _ = incoming.later(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "lifecycle deltas not followed"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One delta: the states it changes, the events it decides (recorded before the state is
/// written, so a repeat after a crash records the same ids, which JetStream drops), then its
/// acknowledgement, or a later delivery for a check before its time.
async fn fold(
    lifecycle: &Lifecycle,
    settings: &Settings,
    incoming: &Incoming,
    known: &mut std::collections::HashSet<String>,
) -> Result<(), fanout::BusError> {
    let now = now_ms();
    let delta = &incoming.delta;
    if let Delta::Sub { node, .. } | Delta::Join { node, .. } = delta
        && !known.contains(node)
    {
        let (mut instances, revision) = lifecycle.instances().await?;
        if instances.insert(node.clone()) {
            lifecycle.save_instances(&instances, revision).await?;
        }
        known.insert(node.clone());
    }
    let mut next_check: Option<(String, u64)> = None;
    match delta {
        Delta::NodeGone { node } => {
            for channel in lifecycle.channels().await? {
                let (state, revision) = lifecycle.state(&channel).await?;
                let holds = state.nodes.contains(node)
                    || state.users.values().any(|nodes| nodes.contains(node));
                if !holds {
                    continue;
                }
                if let Some(due) =
                    apply(lifecycle, settings, &channel, state, revision, delta, now).await?
                {
                    lifecycle.schedule_check(&channel, due).await?;
                }
            }
            let (mut instances, revision) = lifecycle.instances().await?;
            if instances.remove(node) {
                lifecycle.save_instances(&instances, revision).await?;
            }
            known.remove(node);
        }
        _ => {
            let channel = delta.channel().unwrap_or_default().to_string();
            let (state, revision) = lifecycle.state(&channel).await?;
            let due = apply(lifecycle, settings, &channel, state, revision, delta, now).await?;
            next_check = due.map(|due| (channel, due));
        }
    }
    if let Some((channel, due)) = next_check {
        lifecycle.schedule_check(&channel, due).await?;
    }
    incoming.ack().await
}

/// Holds each scheduled check back until its time (many at once, apart from the decider),
/// then reports it to the decider.
async fn check(lifecycle: Lifecycle) {
    loop {
        match lifecycle.checks().await {
            Ok(checks) => {
                let mut checks = std::pin::pin!(checks);
                while let Some(check) = checks.next().await {
                    let wait = check.due.unwrap_or(0).saturating_sub(now_ms());
                    let done = match wait {
                        0 => match lifecycle.report(&check.delta, None).await {
                            Ok(()) => check.ack().await,
                            Err(err) => Err(err),
                        },
                        wait => check.later(Duration::from_millis(wait)).await,
                    };
                    if let Err(err) = done {
                        tracing::warn!(%err, "lifecycle check not handled; again in 1 s");
                        let _ = check.later(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "lifecycle checks not followed"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Folds `delta` into `channel`'s `state`, records what it decides, writes the state back;
/// returns when to check the channel again.
async fn apply(
    lifecycle: &Lifecycle,
    settings: &Settings,
    channel: &str,
    mut state: State,
    revision: Option<u64>,
    delta: &Delta,
    now: u64,
) -> Result<Option<u64>, fanout::BusError> {
    let decision = state.apply(delta, now, settings.debounce);
    let due = decision.next_check;
    tracing::debug!(
        ?delta,
        events = decision.events.len(),
        ?due,
        now,
        "lifecycle fold"
    );
    let events = state.stamp(decision, channel, now);
    lifecycle.record(&events).await?;
    for event in &events {
        counter!("fanout_webhook_events_decided_total", "name" => name(event)).increment(1);
    }
    lifecycle.save(channel, &state, revision).await?;
    Ok(due)
}

fn name(event: &Event) -> &'static str {
    match event.name {
        fanout::lifecycle::Name::ChannelOccupied => "channel_occupied",
        fanout::lifecycle::Name::ChannelVacated => "channel_vacated",
        fanout::lifecycle::Name::MemberAdded => "member_added",
        fanout::lifecycle::Name::MemberRemoved => "member_removed",
        fanout::lifecycle::Name::ClientEvent => "client_event",
    }
}

/// Reports the node instances discovery has forgotten, every second: instances
/// `<id>@<start ms>[@<region>]`. A region this one cannot reach (its stream's copy here is
/// behind) is cut off, not dead: its instances wait.
async fn sweep(bus: Bus, directory: Arc<Directory>) {
    let lifecycle = bus.lifecycle();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        if !directory.is_complete() {
            continue;
        }
        let Ok((instances, _)) = lifecycle.instances().await else {
            continue;
        };
        let regions = bus.log().regions_state();
        let reachable = |region: Option<&str>| {
            region.is_none_or(|region| {
                regions
                    .iter()
                    .any(|(name, state)| &**name == region && matches!(*state, "local" | "current"))
            })
        };
        for instance in instances {
            let mut parts = instance.splitn(3, '@');
            let (id, started, region) = (parts.next(), parts.next(), parts.next());
            let alive = match (id, started.and_then(|s| s.parse::<u64>().ok())) {
                (Some(id), Some(started)) => directory.instance_alive(id, started),
                _ => false,
            };
            if alive || !reachable(region) {
                continue;
            }
            tracing::info!(%instance, "a ws node is gone: releasing its members");
            let gone = Delta::NodeGone {
                node: instance.clone(),
            };
            let once = format!("gone-{instance}");
            if let Err(err) = lifecycle.report(&gone, Some(&once)).await {
                tracing::warn!(%err, %instance, "node_gone not reported; again in 1 s");
            }
        }
    }
}

/// Delivers recorded events while this process holds the lease.
async fn send(lifecycle: Lifecycle, webhooks: Arc<Webhooks>) {
    let holder = uuid::Uuid::new_v4().to_string();
    let settings = &webhooks.settings;
    let mut events = None;
    loop {
        if !lifecycle.lease(&holder).await {
            tokio::time::sleep(LEASE / 4).await;
            continue;
        }
        if events.is_none() {
            match lifecycle.events().await {
                Ok(consumer) => events = Some(consumer),
                Err(err) => {
                    tracing::warn!(%err, "webhook events not followed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(consumer) = &events else { continue };
        // Waits up to FANOUT_WEBHOOK_BATCH_MS for a batch to fill: one request per wait while
        // idle.
        let batch = match consumer
            .batch(settings.batch_max, settings.batch_wait)
            .await
        {
            Ok(batch) if batch.events.is_empty() => {
                gauge!("fanout_webhook_lag_seconds").set(0.0);
                continue;
            }
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(%err, "webhook events not fetched");
                events = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        deliver(&lifecycle, &webhooks, &holder, batch).await;
    }
}

/// One batch, until a receiver takes it or the retry window ends.
async fn deliver(lifecycle: &Lifecycle, webhooks: &Webhooks, holder: &str, batch: Batch) {
    let settings = &webhooks.settings;
    let id = batch.id();
    let started = tokio::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        let oldest = batch.events.iter().map(|e| e.time_ms).min().unwrap_or(0);
        gauge!("fanout_webhook_lag_seconds").set(now_ms().saturating_sub(oldest) as f64 / 1000.0);
        let (body, status) = webhooks.post(&id, &batch.events).await;
        if (200..300).contains(&status) {
            counter!("fanout_webhook_deliveries_total", "outcome" => "delivered").increment(1);
            if let Err(err) = batch.done().await {
                tracing::warn!(%err, %id, "delivered webhook not acknowledged: it may come again");
            }
            return;
        }
        counter!("fanout_webhook_deliveries_total", "outcome" => "failed").increment(1);
        if started.elapsed() >= settings.retry {
            tracing::error!(%id, status, "webhook not taken within the retry window: dead-lettered");
            counter!("fanout_webhook_deliveries_total", "outcome" => "dead").increment(1);
            match lifecycle.dead_letter(&id, body).await {
                Ok(()) => {
                    let _ = batch.done().await;
                }
                Err(err) => tracing::warn!(%err, %id, "dead letter not stored"),
            }
            return;
        }
        attempt += 1;
        let delay = backoff(attempt);
        tracing::debug!(%id, status, attempt, ?delay, "webhook refused; retrying");
        // Keep the lease and the messages while waiting.
        let mut left = delay;
        while !left.is_zero() {
            let step = left.min(LEASE / 4);
            tokio::time::sleep(step).await;
            left -= step;
            lifecycle.lease(holder).await;
            batch.progress().await;
        }
    }
}

/// The wait before retry `attempt` (1, 2, ...): 250 ms doubling to at most 60 s, jittered
/// over its upper half.
fn backoff(attempt: u32) -> Duration {
    let full = Duration::from_millis(250).saturating_mul(1 << attempt.min(8));
    let full = full.min(Duration::from_secs(60));
    let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    full.mul_f64(0.5 + jitter / 2.0)
}
