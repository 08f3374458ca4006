//! The node wires the NATS bus and the hub together: it turns the hub's [`Interest`] reports
//! into NATS subscriptions, each with a channel reader ([`crate::reader`]) that feeds the
//! hub; it admits connections (the per-IP limit), announces the node, and drains it.
//!
//! Only [`fanout::Envelope`] crosses from the bus to the hub, as an encoded frame: one
//! encoding per event, whatever the number of recipients. One reader task per subscribed
//! channel keeps each channel's events in stream order.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fanout::{
    Bus, Channel,
    discovery::{ANNOUNCE_EVERY, Directory, NodeInfo},
    telemetry,
    time::now_ms,
};
use metrics::{counter, gauge};
use serde_json::value::RawValue;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    Config,
    auth::Verifier,
    budget::Budget,
    canary,
    hub::{ConnId, Hub, Interest, Membership, SubscribeError},
    position::{Mark, Marks, Position, Spots, mark},
    presence, protocol,
    reader::read,
    sink::Outgoing,
};

/// How much younger than the history window a cursor's time must be for a node to vouch
/// that nothing after its positions expired: clocks of different nodes, and delivery.
const VOUCH_MARGIN: Duration = Duration::from_secs(5);

/// How long an HTTP stream or poll waits for a just-started node to read the stream.
const EPOCH_WAIT: Duration = Duration::from_secs(5);

/// How long a `subscribe` waits for the NATS subscription before answering anyway (it is
/// registered and becomes live when NATS allows).
const LIVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Node {
    config: Config,
    hub: Arc<Hub>,
    bus: Bus,
    started: Instant,
    /// Cancelled when the node has finished draining: its tasks stop and any connection
    /// still open is closed at once.
    closing: CancellationToken,
    /// Set while draining: `/readyz` answers 503 so load balancers move on.
    draining: AtomicBool,
    verifier: Verifier,
    /// What this node announces for discovery, once it knows its address.
    announcement: std::sync::Mutex<Option<NodeInfo>>,
    /// Open connections per IP address, for `max_connections_per_ip`.
    per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    /// True once the always-on `broadcast` subscription is in place.
    broadcast_live: Arc<AtomicBool>,
    /// The live ws nodes: who must answer a presence query, whose members are gone.
    directory: Arc<Directory>,
    /// Where the hub reports membership changes (kept to flush them at shutdown).
    membership: mpsc::UnboundedSender<Membership>,
    /// Bytes held on behalf of clients, all connections together (`max_buffered_bytes`).
    budget: Arc<Budget>,
    /// What the canary last found of the delivery path.
    canary: Arc<canary::Health>,
    /// The hub's totals, sampled every second, for the rates of `GET /v1/stats`.
    sampler: std::sync::Mutex<fanout::stats::Sampler>,
}

impl Node {
    /// Creates the hub and starts the node's background tasks on `tracker`: the interest
    /// loop and the `broadcast` reader. They end when [`Node::drain`] has finished.
    pub fn start(config: Config, bus: Bus, verifier: Verifier, tracker: &TaskTracker) -> Arc<Node> {
        let shutdown = CancellationToken::new();
        let (interest_tx, interest_rx) = mpsc::unbounded_channel();
        let (membership, changes) = mpsc::unbounded_channel();
        let hub = Arc::new(Hub::new(
            config.max_subscriptions,
            // With regions the windows are off: a replay reads each region's stream.
            crate::recent::Limits::new(
                match bus.topology().count() {
                    1 => config.recent_events,
                    _ => 0,
                },
                config.recent_max_bytes,
            ),
            interest_tx,
            membership.clone(),
        ));
        let directory = Arc::new(Directory::default());
        let config_budget = config.max_buffered_bytes;
        let node = Arc::new(Node {
            config,
            hub: hub.clone(),
            bus: bus.clone(),
            started: Instant::now(),
            closing: shutdown.clone(),
            draining: AtomicBool::new(false),
            verifier,
            announcement: std::sync::Mutex::new(None),
            per_ip: Arc::default(),
            broadcast_live: Arc::new(AtomicBool::new(false)),
            directory: directory.clone(),
            membership,
            budget: Budget::new(config_budget),
            canary: Arc::default(),
            sampler: std::sync::Mutex::default(),
        });
        let span =
            tracing::info_span!(target: telemetry::LOG_CONTEXT, "node", node_id = %node.id());
        let node_id: Arc<str> = node.id().into();
        // Not on `tracker`: these end with the bus (or the hub), after the connections' leaves.
        tokio::spawn(
            presence::publish_changes(bus.clone(), node_id.clone(), changes)
                .instrument(span.clone()),
        );
        tokio::spawn({
            let (bus, hub, directory, node_id) =
                (bus.clone(), hub.clone(), directory.clone(), node_id.clone());
            async move {
                if let Err(err) = bus.rpc().follow_nodes(directory).await {
                    tracing::error!(%err, "cannot follow node announcements");
                }
                let region = bus.topology().region().cloned();
                let answer =
                    move |query| presence::answer(&hub, &node_id, region.as_deref(), query);
                if let Err(err) = bus.rpc().answer_presence(answer).await {
                    tracing::error!(%err, "cannot answer presence queries");
                }
            }
            .instrument(span.clone())
        });
        tracker.spawn(sample_totals(Arc::downgrade(&node), shutdown.clone()));
        tokio::spawn({
            let (bus, node) = (bus.clone(), Arc::downgrade(&node));
            async move {
                // Nothing to say once the node is gone (a query racing its shutdown).
                let answer = move || node.upgrade().map(|node| node.stats());
                if let Err(err) = bus.rpc().answer_stats(answer).await {
                    tracing::error!(%err, "cannot answer stats queries");
                }
            }
            .instrument(span.clone())
        });
        tracker.spawn(
            follow_interest(
                Watching {
                    bus: bus.clone(),
                    hub: hub.clone(),
                    directory,
                    node: node_id,
                },
                interest_rx,
                shutdown.clone(),
                node.config.event_trace_id,
                Duration::from_millis(node.config.coalesce_ms),
            )
            .instrument(span.clone()),
        );
        if node.config.canary_interval_ms > 0 {
            tracker.spawn(
                canary::run(
                    bus.clone(),
                    node.id().into(),
                    Duration::from_millis(node.config.canary_interval_ms),
                    node.canary.clone(),
                    shutdown.clone(),
                )
                .instrument(span.clone()),
            );
        }
        let live = node.broadcast_live.clone();
        let with_trace = node.config.event_trace_id;
        let coalesce = Duration::from_millis(node.config.coalesce_ms);
        tracker.spawn(
            async move {
                let subscription = match bus.subscribe(&Channel::broadcast()).await {
                    Ok(subscription) => subscription,
                    Err(err) => return tracing::error!(%err, "cannot subscribe to broadcast"),
                };
                live.store(true, Ordering::Release);
                gauge!("fanout_ws_nats_subscriptions").increment(1.0);
                tokio::select! {
                    _ = read(subscription, hub, bus, with_trace, coalesce, 0) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            .instrument(span),
        );
        node
    }

    pub fn id(&self) -> &str {
        &self.config.common.node_id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The budget every connection charges what it holds to.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The token every connection's own token descends from.
    pub fn closing_token(&self) -> &CancellationToken {
        &self.closing
    }

    /// Closes every connection with 1001 ("reconnect elsewhere"), spread evenly over
    /// `window` so that the clients do not all land on the other nodes at the same instant,
    /// then stops the node's tasks. Events keep flowing to connections not yet closed.
    pub async fn drain(&self, window: Duration) {
        self.draining.store(true, Ordering::Release);
        // Clone out first: the lock must not be held across the await.
        let announcement = self
            .announcement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(mut info) = announcement {
            info.leaving = true;
            self.bus.rpc().announce(&info).await;
        }
        let kicks = self.hub.kicks();
        tracing::info!(connections = kicks.len(), ?window, "draining");
        let start = tokio::time::Instant::now();
        let count = kicks.len() as u32;
        for (i, kick) in kicks.into_iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / count.max(1)).await;
            kick.kick(crate::disconnect::GOING_AWAY);
        }
        self.closing.cancel();
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn nats_state(&self) -> &'static str {
        self.bus.state()
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// NATS connected, the stream present, `broadcast` subscribed, the canary's probes
    /// coming back, and not draining.
    pub fn is_ready(&self) -> bool {
        self.bus.is_ready()
            && self.broadcast_live.load(Ordering::Acquire)
            && self.canary.is_ok()
            && !self.draining.load(Ordering::Acquire)
    }

    /// Why the canary finds the delivery path broken, while it does.
    pub fn canary_failure(&self) -> Option<String> {
        self.canary.reason()
    }

    /// What this node answers a stats query with (`GET /v1/stats` on the API).
    pub fn stats(&self) -> fanout::stats::NodeStats {
        use fanout::stats::{NODE_TOP_CHANNELS, NatsHealth, NodeStats, busiest};
        let totals = self.hub.totals();
        let rates = self
            .sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rates(Instant::now(), totals);
        let channels = self.hub.channels();
        let (state, reason) = if self.draining.load(Ordering::Acquire) {
            ("draining", None)
        } else if self.is_ready() {
            ("ready", None)
        } else {
            let reason = self.canary_failure().or_else(|| {
                Some(
                    if self.bus.is_ready() {
                        "broadcast is not subscribed yet"
                    } else {
                        "NATS or the stream is not ready"
                    }
                    .to_string(),
                )
            });
            ("not_ready", reason)
        };
        let announced = self
            .announcement
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        NodeStats {
            id: self.id().to_string(),
            region: self.bus.topology().region().map(|r| r.to_string()),
            url: announced
                .as_ref()
                .map_or_else(String::new, |a| a.url.clone()),
            state: state.to_string(),
            reason,
            started_at: announced.map_or(0, |a| a.started_at),
            uptime_secs: self.uptime().as_secs(),
            connections: self.hub.connections(),
            subscriptions: channels.iter().map(|(_, n)| n).sum(),
            channels: channels.len(),
            buffered_bytes: self.budget.used(),
            nats: NatsHealth {
                state: self.nats_state().to_string(),
                stream: self.bus.log().stream_name().to_string(),
                stream_ready: self.bus.log().stream_ready(),
            },
            totals,
            rates,
            top_channels: busiest(channels, NODE_TOP_CHANNELS),
        }
    }

    /// Subscribes connection `conn` to `channel` (with `presence`, to its presence changes
    /// too) and returns once the node receives them (or after [`LIVE_TIMEOUT`]).
    /// `broadcast` needs no subscription.
    pub async fn subscribe(
        &self,
        conn: ConnId,
        channel: &Channel,
        presence: bool,
    ) -> Result<(), SubscribeError> {
        if channel.is_broadcast() {
            return Ok(());
        }
        let mut subscribed = self.hub.subscribe(conn, channel, presence)?;
        // An error means the interest ended meanwhile: nothing to wait for.
        let _ = tokio::time::timeout(LIVE_TIMEOUT, async {
            let _ = subscribed.live.wait_for(|live| *live).await;
            if let Some(watch_live) = &mut subscribed.watch_live {
                let _ = watch_live.wait_for(|live| *live).await;
            }
        })
        .await;
        Ok(())
    }

    /// Who is in `channel` across every node, or only how many.
    pub async fn presence(
        &self,
        channel: &Channel,
        count_only: bool,
    ) -> Result<fanout::presence::Presence, fanout::BusError> {
        self.bus
            .rpc()
            .presence(channel, count_only, &self.directory)
            .await
    }

    /// Replaces connection `conn`'s presence info; its channels' watchers are told.
    pub fn set_info(&self, conn: ConnId, info: Option<Box<RawValue>>) {
        self.hub.set_info(conn, info);
    }

    /// Waits until every membership change so far (the leaves of closed connections
    /// included) has been handed to NATS.
    pub async fn flush_presence(&self) {
        let (done, flushed) = tokio::sync::oneshot::channel();
        if self.membership.send(Membership::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    /// Announces this node every [`ANNOUNCE_EVERY`] (on `tracker`) until it drains, as
    /// reachable at `url`.
    pub fn announce(self: &Arc<Self>, url: String, tracker: &TaskTracker) {
        let info = NodeInfo {
            id: self.id().to_string(),
            url,
            connections: 0,
            started_at: now_ms(),
            region: self.bus.topology().region().map(|r| r.to_string()),
            leaving: false,
        };
        *self.announcement.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
        let node = self.clone();
        tracker.spawn(async move {
            let mut every = tokio::time::interval(ANNOUNCE_EVERY);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = node.closing.cancelled() => return,
                }
                if node.draining.load(Ordering::Acquire) {
                    return;
                }
                let info = NodeInfo {
                    connections: node.hub.connections(),
                    ..info.clone()
                };
                node.bus.rpc().announce(&info).await;
            }
        });
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Counts a connection from `ip`, unless it already holds `max_connections_per_ip`.
    /// The permit gives the slot back when dropped.
    pub fn admit(&self, ip: IpAddr) -> Option<IpPermit> {
        let limit = self.config.max_connections_per_ip;
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if limit > 0 && *count >= limit {
            return None;
        }
        *count += 1;
        Some(IpPermit {
            ip,
            per_ip: self.per_ip.clone(),
        })
    }

    /// Publishes `data` to `channel` from a client, through the same JetStream path as the API.
    pub async fn publish(
        &self,
        channel: &Channel,
        data: bytes::Bytes,
    ) -> Result<fanout::Published, fanout::BusError> {
        self.bus.log().publish(channel, data, None).await
    }

    /// The stream epoch clients' sequences belong to (empty until the node has read the
    /// stream).
    pub fn epoch(&self) -> String {
        self.bus.log().epoch()
    }

    /// The stream epoch, once the node has read the stream; `None` if that takes longer
    /// than `EPOCH_WAIT` (NATS unreachable): a stream's positions cannot be written without it.
    pub async fn known_epoch(&self) -> Option<String> {
        let deadline = tokio::time::Instant::now() + EPOCH_WAIT;
        loop {
            let epoch = self.bus.log().epoch();
            if !epoch.is_empty() {
                return Some(epoch);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The stored events of `channel` after `from` (a position per region; a region without
    /// one is followed from now on), for a resuming client whose positions belong to `epoch`
    /// (and were vouched for at `at`, unix ms), and whether they are all of them.
    ///
    /// Call it once the connection is in the channel: the replay then reaches everything this
    /// node delivered before the connection joined (a replica that lags is waited for). A
    /// stream that cannot be read is tried again for about a second (a NATS cluster electing
    /// a leader), then the error is the caller's: it must not tell the client anything it
    /// cannot know.
    pub async fn replay(
        &self,
        channel: &Channel,
        from: &[Position],
        epoch: Option<&str>,
        at: Option<u64>,
    ) -> Result<Replay, fanout::BusError> {
        let mut pause = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match self.try_replay(channel, from, epoch, at).await {
                Ok(replay) => return Ok(replay),
                Err(err) if attempt < 2 => {
                    tracing::debug!(%channel, %err, "cannot replay yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                Err(err) => {
                    tracing::warn!(%channel, %err, "cannot replay");
                    return Err(err);
                }
            }
        }
    }

    async fn try_replay(
        &self,
        channel: &Channel,
        from: &[Position],
        epoch: Option<&str>,
        at: Option<u64>,
    ) -> Result<Replay, fanout::BusError> {
        let current = self.bus.log().epoch();
        if current.is_empty() {
            // A node that has not read the stream yet (just started, NATS not reached): it
            // cannot tell one epoch from another.
            return Err(fanout::BusError::Unavailable("the stream is not known yet"));
        }
        if epoch.is_some_and(|epoch| epoch != current) {
            // The stream was recreated: the position counts in sequences that no longer exist.
            return Ok(Replay::lost(current));
        }
        let mut replay = Replay {
            events: Vec::new(),
            recovered: true,
            epoch: current,
            skip_upto: Marks::new(),
        };
        for &position in from {
            if position.region() >= self.bus.topology().count() {
                continue;
            }
            let (events, recovered, skip) = self
                .replay_region(channel, position, at, &replay.epoch)
                .await?;
            replay.events.extend(events);
            replay.recovered &= recovered;
            replay.skip_upto.push(skip);
        }
        Ok(replay)
    }

    /// [`Node::replay`] of one region's events: the events, whether they are all, and the
    /// mark up to which live events are covered.
    async fn replay_region(
        &self,
        channel: &Channel,
        from: Position,
        at: Option<u64>,
        current: &str,
    ) -> Result<(Vec<Outgoing>, bool, Mark), fanout::BusError> {
        let region = from.region();
        let after = from.seq();
        let one_region = self.bus.topology().count() == 1;
        // Recent events first: a window that reaches back to the position holds every event
        // after it (up to what was delivered; the rest comes live). (With regions, the
        // windows are off: their sequences are per region.)
        if one_region && let Some(events) = self.hub.recent(channel, after, current) {
            counter!("fanout_ws_replayed_events_total", "from" => "memory")
                .increment(events.len() as u64);
            let skip = events.last().map_or(after, |e| e.seq.max(after));
            return Ok((events, true, skip));
        }
        // Once the channel's subscription is in place, every event after the stream's last
        // sequence is delivered live: the read stops there (it would otherwise chase the end
        // of a busy stream, one direct get per event), and that sequence tells the recent
        // events where they start.
        let live = match channel.is_broadcast() {
            true => self.broadcast_live.load(Ordering::Acquire),
            false => self.hub.is_live(channel),
        };
        let sequences = match live {
            true => self.bus.log().sequences(region).await.ok(),
            false => None,
        };
        let reach = self.hub.delivered(channel, region);
        let until = sequences.map(|(_, last)| last.max(reach));
        let events = self
            .bus
            .log()
            .history_reaching(channel, region, after, until, reach)
            .await;
        // Nothing the per-channel limit removed since: that would have left the channel
        // at the limit.
        let limit = self.config.common.history_max_messages;
        let below_limit = events.as_ref().is_ok_and(|e| (e.len() as i64) < limit);
        // Nothing age removed since: whatever came after `after` is younger than `at`, and
        // `at` is within the history window (with a margin for clocks and delivery).
        let window = self.config.common.history_max_age_secs * 1000;
        let margin = VOUCH_MARGIN.as_millis() as u64;
        let young = at.is_some_and(|at| now_ms() + margin < at + window);
        let first = match sequences {
            Some((first, _)) => Ok(first),
            None => self.bus.log().first_sequence(region).await,
        };
        let recovered = match from {
            // The event the client has is still stored: every later one is too (limits
            // remove the oldest first).
            Position::Event(_) if after > 0 => {
                match self.bus.log().is_stored(channel, region, after).await {
                    Ok(true) => Ok(true),
                    // Another region's copy that has not reached the client's position yet
                    // (a mirror lags its origin, where the client saw the event): nothing
                    // after it can be gone from the copy; it arrives there in order.
                    Ok(false) if self.is_mirror(region) => match sequences {
                        Some((_, last)) => Ok(last < after || (young && below_limit)),
                        None => self
                            .bus
                            .log()
                            .sequences(region)
                            .await
                            .map(|(_, last)| last < after || (young && below_limit)),
                    },
                    Ok(false) => Ok(young && below_limit),
                    Err(err) => Err(err),
                }
            }
            // Nothing of the channel seen: complete if nothing after `after` was removed, by
            // age (the stream still starts right after it, or `at` says it is young) or by
            // the limit.
            _ => first.map(|first| (first <= after + 1 || young) && below_limit),
        };
        let (recovered, events) = (recovered?, events?);
        if one_region && let Some((_, last)) = sequences {
            self.hub.seed_recent(channel, last, current, live);
        }
        counter!("fanout_ws_replayed_events_total", "from" => "stream")
            .increment(events.len() as u64);
        let with_trace = self.config.event_trace_id;
        let skip = mark::pack(region, events.last().map_or(after, |e| e.seq));
        let events: Vec<Outgoing> = events
            .iter()
            .filter_map(|event| {
                let json = protocol::event(event, with_trace).ok()?;
                Some(Outgoing::event(mark::pack(region, event.seq), json))
            })
            .collect();
        Ok((events, recovered, skip))
    }

    /// Whether this node reads region `region`'s events from a mirror (another region's).
    fn is_mirror(&self, region: u8) -> bool {
        self.bus.topology().count() > 1
            && self
                .bus
                .topology()
                .region()
                .and_then(|own| self.bus.topology().index(own))
                != Some(region)
    }

    /// Every region's stream's last sequence: "now", for a stream that starts following a
    /// channel (a position per region).
    pub async fn now(&self) -> Result<Spots, fanout::BusError> {
        let mut now = Spots::new();
        for region in 0..self.bus.topology().count() {
            let last = self.bus.log().sequences(region).await?.1;
            now.push(Position::After(mark::pack(region, last)));
        }
        Ok(now)
    }

    pub fn unsubscribe(&self, conn: ConnId, channel: &Channel) {
        self.hub.unsubscribe(conn, channel);
    }
}

/// A connection's slot in the per-IP count.
#[derive(Debug)]
pub struct IpPermit {
    ip: IpAddr,
    per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// What [`Node::replay`] found.
#[derive(Debug)]
pub struct Replay {
    /// The events, encoded.
    pub events: Vec<Outgoing>,
    pub recovered: bool,
    pub epoch: String,
    /// Live events of the channel up to these marks (one per region) were replayed (or seen
    /// by the client before): the connection skips them. Empty when `since` meant nothing.
    pub skip_upto: Marks,
}

impl Replay {
    fn lost(epoch: String) -> Replay {
        Replay {
            events: Vec::new(),
            recovered: false,
            epoch,
            skip_upto: Marks::new(),
        }
    }
}

/// What a presence watcher needs.
struct Watching {
    bus: Bus,
    hub: Arc<Hub>,
    directory: Arc<Directory>,
    node: Arc<str>,
}

/// Applies the hub's interest reports in order: subscribe in NATS on `Add`, drop the
/// subscription (which unsubscribes) on `Remove`; follow presence changes from `Watch` to
/// `Unwatch`.
async fn follow_interest(
    watching: Watching,
    mut reports: mpsc::UnboundedReceiver<Interest>,
    shutdown: CancellationToken,
    with_trace: bool,
    coalesce: Duration,
) {
    let Watching { bus, hub, .. } = &watching;
    let (bus, hub) = (bus.clone(), hub.clone());
    let mut readers: HashMap<Channel, JoinHandle<()>> = HashMap::new();
    let mut watchers: HashMap<Channel, JoinHandle<()>> = HashMap::new();
    loop {
        let report = tokio::select! {
            report = reports.recv() => report,
            _ = shutdown.cancelled() => None,
        };
        match report {
            Some(Interest::Add {
                channel,
                generation,
            }) => {
                match bus.subscribe(&channel).await {
                    Ok(subscription) => {
                        tracing::debug!(%channel, "subscribed in NATS");
                        let reader = tokio::spawn(
                            read(
                                subscription,
                                hub.clone(),
                                bus.clone(),
                                with_trace,
                                coalesce,
                                generation,
                            )
                            .in_current_span(),
                        );
                        match readers.insert(channel.clone(), reader) {
                            Some(stale) => stale.abort(),
                            None => gauge!("fanout_ws_nats_subscriptions").increment(1.0),
                        }
                    }
                    Err(err) => tracing::error!(%channel, %err, "cannot subscribe in NATS"),
                }
                hub.set_live(&channel, generation);
            }
            Some(Interest::Remove { channel }) => {
                if let Some(reader) = readers.remove(&channel) {
                    tracing::debug!(%channel, "unsubscribed in NATS");
                    reader.abort();
                    gauge!("fanout_ws_nats_subscriptions").decrement(1.0);
                }
            }
            Some(Interest::Watch {
                channel,
                generation,
            }) => {
                let watcher = tokio::spawn(
                    presence::watch(
                        bus.clone(),
                        hub.clone(),
                        watching.directory.clone(),
                        watching.node.clone(),
                        channel.clone(),
                        generation,
                    )
                    .in_current_span(),
                );
                if let Some(stale) = watchers.insert(channel, watcher) {
                    stale.abort();
                }
            }
            Some(Interest::Unwatch { channel }) => {
                if let Some(watcher) = watchers.remove(&channel) {
                    watcher.abort();
                }
            }
            None => break,
        }
    }
    for watcher in watchers.into_values() {
        watcher.abort();
    }
    for reader in readers.into_values() {
        reader.abort();
        gauge!("fanout_ws_nats_subscriptions").decrement(1.0);
    }
}

/// Samples the hub's totals every second while the node runs (for [`Node::stats`]).
async fn sample_totals(node: std::sync::Weak<Node>, closing: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = closing.cancelled() => return,
        }
        let Some(node) = node.upgrade() else { return };
        let totals = node.hub.totals();
        node.sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(totals);
    }
}
