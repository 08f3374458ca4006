//! The node wires the NATS bus, the hub and the channels together, and does nothing else:
//! the hub's reports go to the channels' interest follower ([`crate::channel::interest`]) and
//! to presence; it admits connections (the per-IP limit), announces the node, answers stats,
//! and drains it.

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
    discovery::{ANNOUNCE_EVERY, Directory, NodeInfo, WebTransportInfo},
    telemetry,
    time::now_ms,
};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    Config,
    auth::Verifier,
    budget::Budget,
    canary,
    channel::{
        Limits, Logs, Replay, Replayer, Totals,
        interest::{self, Readers, Reports},
        reader::{self, Target},
        recovery,
    },
    control, drain,
    hub::{BROADCAST_GENERATION, ConnId, Hub, Membership, SubscribeError},
    lifecycle,
    position::{Position, Spots},
    presence,
};

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
    /// Its region is evacuated (`POST /v1/regions/{region}/evacuate`).
    evacuating: AtomicBool,
    verifier: Verifier,
    /// What this node announces for discovery, once it knows its address.
    announcement: std::sync::Mutex<Option<NodeInfo>>,
    /// Open connections per IP address, for `max_connections_per_ip`.
    per_ip: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    /// The live ws nodes: who must answer a presence query, whose members are gone.
    directory: Arc<Directory>,
    /// Where the hub reports membership changes (kept to flush them at shutdown).
    membership: mpsc::UnboundedSender<Membership>,
    /// What the readers counted, for `GET /v1/stats`.
    totals: Arc<Totals>,
    /// Every channel's current log, for resumes.
    logs: Arc<Logs>,
    /// Reads what resuming clients missed.
    replayer: Replayer,
    /// Bytes held on behalf of clients, all connections together (`max_buffered_bytes`).
    budget: Arc<Budget>,
    /// What the canary last found of the delivery path.
    canary: Arc<canary::Health>,
    /// When this instance started (unix ms): in its announcements and lifecycle reports.
    started_at: u64,
    /// With lifecycle events on (`FANOUT_WEBHOOK_URL`): where the hub and the sessions
    /// report to.
    lifecycle: Option<mpsc::UnboundedSender<lifecycle::Report>>,
    /// The hub's totals, sampled every second, for the rates of `GET /v1/stats`.
    sampler: std::sync::Mutex<fanout::stats::Sampler>,
    /// The tier's rules: blocks, revoked tokens, removed histories.
    rules: Arc<control::Rules>,
    /// The app's proxy hooks.
    proxy: crate::proxy::Proxy,
    /// The Pusher protocol's apps (`FANOUT_PUSHER_APPS`).
    pusher_apps: Vec<fanout::pusher::App>,
    /// The channels that keep deltas (`FANOUT_DELTA_CHANNELS`).
    deltas: Arc<crate::auth::Patterns>,
    /// How many connections it holds and how fast it takes new ones.
    admission: crate::admission::Admission,
}

impl Node {
    /// Creates the hub and starts the node's background tasks on `tracker`: the interest
    /// loop and the `broadcast` reader. They end when [`Node::drain`] has finished.
    pub fn start(config: Config, bus: Bus, verifier: Verifier, tracker: &TaskTracker) -> Arc<Node> {
        let shutdown = CancellationToken::new();
        // With regions the windows are off: a replay reads each region's stream.
        let logs = Arc::new(Logs::new(Limits::new(
            match bus.topology().count() {
                1 => config.recent_events,
                _ => 0,
            },
            config.recent_max_bytes,
        )));
        let broadcast_log = logs.open(&Channel::broadcast(), BROADCAST_GENERATION);
        let (interest, interest_rx) = mpsc::unbounded_channel();
        let (membership, changes) = mpsc::unbounded_channel();
        let started_at = now_ms();
        let (lifecycle, lifecycle_rx) = match config.common.webhook_url.is_empty() {
            true => (None, None),
            false => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
        };
        let reports = Reports {
            logs: logs.clone(),
            interest,
            membership: membership.clone(),
            lifecycle: lifecycle.clone(),
        };
        let hub = Arc::new(Hub::new(config.max_subscriptions, Arc::new(reports)));
        let directory = Arc::new(Directory::default());
        let totals = Arc::new(Totals::default());
        let rules = Arc::new(control::Rules::default());
        let replayer = Replayer::new(
            bus.clone(),
            rules.clone(),
            recovery::Limits {
                window: Duration::from_secs(config.common.history_max_age_secs),
                per_channel: config.common.history_max_messages.max(0) as u64,
            },
            config.event_trace_id,
            config.replay_concurrency,
        );
        let config_budget = config.max_buffered_bytes;
        let proxy = crate::proxy::Proxy::from_config(&config)
            .expect("the proxy settings were validated with the rest");
        let deltas = Arc::new(crate::auth::Patterns::list(&config.delta_channels));
        let admission = crate::admission::Admission::new(&config);
        let pusher_apps =
            fanout::pusher::apps(config.common.pusher_apps.expose()).unwrap_or_default();
        let node = Arc::new(Node {
            config,
            hub: hub.clone(),
            bus: bus.clone(),
            started: Instant::now(),
            closing: shutdown.clone(),
            draining: AtomicBool::new(false),
            evacuating: AtomicBool::new(false),
            verifier,
            announcement: std::sync::Mutex::new(None),
            per_ip: Arc::default(),
            directory: directory.clone(),
            membership,
            totals: totals.clone(),
            logs,
            replayer,
            budget: Budget::new(config_budget),
            canary: Arc::default(),
            sampler: std::sync::Mutex::default(),
            started_at,
            lifecycle,
            rules: rules.clone(),
            proxy,
            pusher_apps,
            deltas,
            admission,
        });
        let span =
            tracing::info_span!(target: telemetry::LOG_CONTEXT, "node", node_id = %node.id());
        let node_id: Arc<str> = node.id().into();
        // Not on `tracker`: these end with the bus (or the hub), after the connections' leaves.
        if let Some(reports) = lifecycle_rx {
            let instance = match bus.topology().region() {
                Some(region) => format!("{}@{started_at}@{region}", node.id()),
                None => format!("{}@{started_at}", node.id()),
            };
            tokio::spawn(
                lifecycle::report(bus.clone(), instance, reports).instrument(span.clone()),
            );
        }
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
        tokio::spawn(
            control::follow(bus.clone(), Arc::downgrade(&hub), rules.clone())
                .instrument(span.clone()),
        );
        tracker.spawn(node.clone().evacuations().instrument(span.clone()));
        tokio::spawn({
            let (bus, hub, rules, node_id) =
                (bus.clone(), Arc::downgrade(&hub), rules, node_id.clone());
            async move {
                let region = bus.topology().region().cloned();
                let answer = move |command| {
                    let hub = hub.upgrade()?;
                    Some(control::answer(
                        &hub,
                        &rules,
                        &node_id,
                        region.as_deref(),
                        command,
                    ))
                };
                if let Err(err) = bus.rpc().answer_control(answer).await {
                    tracing::error!(%err, "cannot answer control commands");
                }
            }
            .instrument(span.clone())
        });
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
        let readers = Readers {
            bus: bus.clone(),
            hub: hub.clone(),
            totals,
            with_trace: node.config.event_trace_id,
            coalesce: Duration::from_millis(node.config.coalesce_ms),
            deltas: node.deltas.clone(),
        };
        let watch = {
            let (bus, hub, directory) = (bus.clone(), hub.clone(), directory);
            move |channel, generation| {
                presence::watch(
                    bus.clone(),
                    hub.clone(),
                    directory.clone(),
                    node_id.clone(),
                    channel,
                    generation,
                )
            }
        };
        tracker.spawn(
            interest::follow(readers.clone(), interest_rx, shutdown.clone(), watch)
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
        // `broadcast`: the node's own interest, from start to end.
        tracker.spawn(
            async move {
                let channel = Channel::broadcast();
                let subscription = match bus.subscribe(&channel).await {
                    Ok(subscription) => subscription,
                    Err(err) => return tracing::error!(%err, "cannot subscribe to broadcast"),
                };
                readers.hub.set_live(&channel, BROADCAST_GENERATION);
                metrics::gauge!("fanout_ws_nats_subscriptions").increment(1.0);
                let target = Target {
                    hub: readers.hub.clone(),
                    log: broadcast_log,
                    generation: BROADCAST_GENERATION,
                    totals: readers.totals.clone(),
                    deltas: false,
                };
                tokio::select! {
                    _ = reader::read(subscription, target, bus, readers.with_trace, readers.coalesce) => {}
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
        let plan = drain::Plan::new(kicks.len(), window, self.config.drain_rate);
        let region = self.config.common.region.trim();
        let region = (!region.is_empty()).then_some(region);
        let mut targets =
            drain::Targets::new(self.directory.live(), self.id(), region, kicks.len());
        tracing::info!(
            connections = kicks.len(),
            ?window,
            arrivals_ms = plan.arrivals(),
            "draining"
        );
        let start = tokio::time::Instant::now();
        for (i, kick) in kicks.into_iter().enumerate() {
            tokio::time::sleep_until(start + plan.close_at(i)).await;
            kick.kick(drain::going_away(&plan, i, &mut targets));
        }
        self.closing.cancel();
    }

    /// Whether this node's region is evacuated: it sends its clients to the other regions
    /// and takes no new ones.
    pub fn evacuating(&self) -> bool {
        self.evacuating.load(Ordering::Acquire)
    }

    /// Follows the evacuations of this node's region: while one lasts, closes every client
    /// towards the other regions (spread as a drain is) and refuses new ones.
    async fn evacuations(self: Arc<Self>) {
        let region = self.config.common.region.trim().to_string();
        if region.is_empty() {
            return;
        }
        let others: Vec<String> = self
            .config
            .common
            .regions
            .iter()
            .filter(|other| **other != region)
            .map(ToString::to_string)
            .collect();
        let mut evacuated = self.rules.evacuations();
        loop {
            let now = evacuated.borrow_and_update().contains(&region);
            if now != self.evacuating.swap(now, Ordering::AcqRel) {
                tracing::info!(%region, evacuated = now, "region evacuation");
            }
            if now {
                let window = Duration::from_millis(self.config.drain_window_ms);
                let kicks = self.hub.kicks();
                let plan = drain::Plan::new(kicks.len(), window, self.config.drain_rate);
                let start = tokio::time::Instant::now();
                let mut changed = false;
                for (i, kick) in kicks.into_iter().enumerate() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(start + plan.close_at(i)) => {}
                        // Lifted (the rest stay), or another region's changed: look again.
                        result = evacuated.changed() => {
                            if result.is_err() { return }
                            changed = true;
                            break;
                        }
                        _ = self.closing.cancelled() => return,
                    }
                    kick.kick(drain::evacuated(&plan, i, &others));
                }
                if changed {
                    continue;
                }
            }
            tokio::select! {
                changed = evacuated.changed() => if changed.is_err() { return },
                _ = self.closing.cancelled() => return,
            }
        }
    }

    /// The other live nodes this node has heard from (where a drain sends its clients).
    pub fn peers(&self) -> Vec<String> {
        self.directory
            .live()
            .into_iter()
            .map(|node| node.id)
            .filter(|id| id != self.id())
            .collect()
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
    /// coming back, every stored control rule read, and not draining.
    pub fn is_ready(&self) -> bool {
        self.bus.is_ready()
            && self.hub.is_live(&Channel::broadcast())
            && self.canary.is_ok()
            && self.rules.is_loaded()
            && !self.draining.load(Ordering::Acquire)
            && !self.evacuating()
    }

    /// The Pusher protocol's apps.
    pub fn admission(&self) -> &crate::admission::Admission {
        &self.admission
    }

    /// Whether clients may take `channel`'s events as deltas (`FANOUT_DELTA_CHANNELS`).
    pub fn deltas_allowed(&self, channel: &Channel) -> bool {
        !channel.is_broadcast() && self.deltas.allows(channel)
    }

    pub fn pusher_apps(&self) -> &[fanout::pusher::App] {
        &self.pusher_apps
    }

    /// The app's proxy hooks.
    pub fn proxy(&self) -> &crate::proxy::Proxy {
        &self.proxy
    }

    /// The tier's rules (blocks, revoked tokens, removed histories) as this node knows them.
    pub fn rules(&self) -> &control::Rules {
        &self.rules
    }

    /// Why the canary finds the delivery path broken, while it does.
    pub fn canary_failure(&self) -> Option<String> {
        self.canary.reason()
    }

    /// What this node answers a stats query with (`GET /v1/stats` on the API).
    pub fn stats(&self) -> fanout::stats::NodeStats {
        use fanout::stats::{NODE_TOP_CHANNELS, NatsHealth, NodeStats, busiest};
        let totals = self.totals.get();
        let rates = self
            .sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rates(Instant::now(), totals);
        let channels = self.hub.channels();
        let (state, reason) = if self.draining.load(Ordering::Acquire) {
            ("draining", None)
        } else if self.evacuating() {
            ("evacuating", None)
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
    /// too; with `info`, a member with that info in it) and returns once the node receives them (or after [`LIVE_TIMEOUT`]).
    /// `broadcast` needs no subscription.
    pub async fn subscribe(
        &self,
        conn: ConnId,
        channel: &Channel,
        presence: bool,
        info: Option<Box<RawValue>>,
    ) -> Result<(), SubscribeError> {
        if channel.is_broadcast() {
            return Ok(());
        }
        let mut subscribed = self.hub.subscribe_as(conn, channel, presence, info)?;
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
    pub fn announce(
        self: &Arc<Self>,
        url: String,
        webtransport: Option<Box<dyn Fn() -> WebTransportInfo + Send + Sync>>,
        tracker: &TaskTracker,
    ) {
        let info = NodeInfo {
            id: self.id().to_string(),
            url,
            connections: 0,
            started_at: self.started_at,
            region: self.bus.topology().region().map(|r| r.to_string()),
            leaving: false,
            webtransport: webtransport.as_ref().map(|info| info()),
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
                    webtransport: webtransport.as_ref().map(|info| info()),
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

    /// With lifecycle events on, tells the decider of a client's publish on a channel
    /// `FANOUT_WEBHOOK_CLIENT_EVENTS` names (bytes as a base64 string).
    pub fn client_event(&self, channel: &Channel, user: &str, data: &fanout::Data) {
        let Some(lifecycle) = &self.lifecycle else {
            return;
        };
        if !fanout::lifecycle::matches(&self.config.common.webhook_client_events, channel.as_str())
        {
            return;
        }
        let value = match data.binary {
            true => {
                use base64::Engine;
                Some(
                    base64::engine::general_purpose::STANDARD
                        .encode(&data.bytes)
                        .into(),
                )
            }
            false => serde_json::from_slice(&data.bytes).ok(),
        };
        if let Some(value) = value {
            let _ = lifecycle.send(lifecycle::Report::ClientEvent(
                channel.clone(),
                user.into(),
                value,
            ));
        }
    }

    /// Publishes `data` to `channel` from a client, through the same JetStream path as the API.
    pub async fn publish(
        &self,
        channel: &Channel,
        data: fanout::Data,
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

    /// The stored events of `channel` after `from` (a position per region), for a resuming
    /// client whose positions belong to `epoch` and were vouched for at `at` (see
    /// [`Replayer::replay`]). Call it once the connection is in the channel.
    pub async fn replay(
        &self,
        channel: &Channel,
        from: &[Position],
        epoch: Option<&str>,
        at: Option<u64>,
    ) -> Result<Replay, fanout::BusError> {
        let local = (self.logs.get(channel), self.hub.is_live(channel));
        self.replayer.replay(channel, local, from, epoch, at).await
    }

    /// Every region's stream's last sequence: "now", for a stream that starts following a
    /// channel (a position per region).
    pub async fn now(&self) -> Result<Spots, fanout::BusError> {
        self.replayer.now().await
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

/// Samples the hub's totals every second while the node runs (for [`Node::stats`]).
async fn sample_totals(node: std::sync::Weak<Node>, closing: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = closing.cancelled() => return,
        }
        let Some(node) = node.upgrade() else { return };
        let totals = node.totals.get();
        node.sampler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(totals);
    }
}
