//! The connection to NATS, and the handle every other one comes from ([`Bus`]): it reconnects
//! forever with capped, jittered backoff, and its state is readable at any time for
//! `/readyz` and for failing fast with [`BusError::Unavailable`].

use std::{sync::Arc, time::Duration};

use async_nats::{ConnectOptions, HeaderMap, connection::State, jetstream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    control::Rules,
    error::BusError,
    lifecycle::Lifecycle,
    link,
    log::EventLog,
    provisioner::Provisioner,
    rpc::{self, Rpc},
    subscription::Subscription,
    topology::Topology,
};
use crate::{
    Channel, Common,
    envelope::{
        BINARY, Data, HEADER_ENCODING, HEADER_EVENT, HEADER_EXCLUDE, HEADER_ID, HEADER_REGION,
        HEADER_TS, HEADER_VOLATILE,
    },
    telemetry,
    time::now_ms,
};

/// A handle on the NATS connection, and through it the event log ([`Bus::log`]), the
/// messages between processes ([`Bus::rpc`]) and the tier's regions ([`Bus::topology`]).
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Bus {
    inner: Arc<Client>,
}

#[derive(Debug)]
struct Client {
    client: async_nats::Client,
    topology: Topology,
    log: EventLog,
    rpc: Rpc,
    lifecycle: Lifecycle,
    rules: Rules,
    /// Counts (re)connections to NATS; subscribers catch up on each change.
    connections: Arc<tokio::sync::watch::Sender<u64>>,
    /// Counts [`Bus::resync`]s: subscribers subscribe afresh and catch up on each change.
    resyncs: tokio::sync::watch::Sender<u64>,
    /// Ends the provisioner's tasks.
    closed: CancellationToken,
}

impl Drop for Client {
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
        let lifecycle = Lifecycle::new(
            js.clone(),
            Topology::new(&common.prefix, common.regions.to_vec(), &common.region),
        );
        let topology = Topology::new(&common.prefix, common.regions.to_vec(), &common.region);
        let rules = Rules::new(js.clone(), topology.clone());
        let log = EventLog::new(
            client.clone(),
            js,
            topology.clone(),
            common.publish_timeout(),
            check_stream.clone(),
        )
        .await;
        let closed = CancellationToken::new();
        Provisioner::start(
            common,
            topology.clone(),
            log.clone(),
            client.clone(),
            closed.clone(),
        );
        // `retry_on_initial_connect` may have connected before the callback was in place.
        check_stream.notify_one();
        Ok(Bus {
            inner: Arc::new(Client {
                rpc: Rpc {
                    client: client.clone(),
                    topology: topology.clone(),
                },
                client,
                topology,
                log,
                lifecycle,
                rules,
                connections,
                resyncs: tokio::sync::watch::Sender::new(0),
                closed,
            }),
        })
    }

    /// The stream: publishing, history, the epoch.
    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// Fanout's messages between processes: presence, stats, discovery.
    /// Lifecycle events: deltas, states, decided events, their delivery.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.inner.lifecycle
    }

    /// Server-side control's rules: blocks, revoked tokens, removed histories.
    pub fn rules(&self) -> &Rules {
        &self.inner.rules
    }

    pub fn rpc(&self) -> &Rpc {
        &self.inner.rpc
    }

    /// The tier's regions, and this process's.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Connected, and the stream exists with our settings.
    pub fn is_ready(&self) -> bool {
        self.is_connected() && self.inner.log.stream_ready()
    }

    /// Rebuilds the delivery path after it was found broken (the ws node's canary): the
    /// provisioner checks the stream against our settings (and restores them), and every
    /// [`Bus::resyncs`] watcher subscribes afresh and fetches what it missed.
    pub fn resync(&self) {
        self.inner.log.check_stream();
        self.inner.resyncs.send_modify(|n| *n += 1);
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// `connected`, `disconnected` or `connecting`, for health and debug output.
    pub fn state(&self) -> &'static str {
        match self.inner.client.connection_state() {
            State::Connected => "connected",
            State::Disconnected => "disconnected",
            State::Pending => "connecting",
        }
    }

    /// Changes on every (re)connection to NATS: what was published meanwhile must be fetched
    /// from the stream.
    pub fn connections(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.connections.subscribe()
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
        let subject = inner.topology.outbound(channel);
        let subscriber = inner.client.subscribe(subject.clone()).await?;
        rpc::sync(&inner.client, &inner.topology).await;
        Ok(Subscription {
            channel: channel.clone(),
            subject,
            subscriber,
            topology: inner.topology.clone(),
        })
    }

    /// Publishes a volatile event on `channel` (`data`: what clients get, JSON or bytes): core NATS,
    /// not stored, no sequence, at most once, straight to the subject every region's ws nodes
    /// get `channel`'s events on. Returns its id once the connection has taken it: nothing
    /// acknowledges it, as nothing stores it.
    pub async fn publish_volatile(
        &self,
        channel: &Channel,
        data: impl Into<Data>,
    ) -> Result<String, BusError> {
        let Data {
            bytes: data,
            binary,
            name,
            exclude,
        } = data.into();
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected"));
        }
        let inner = &self.inner;
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_ID, id.as_str());
        headers.insert(HEADER_TS, now_ms().to_string().as_str());
        headers.insert(HEADER_VOLATILE, "1");
        if binary {
            headers.insert(HEADER_ENCODING, BINARY);
        }
        if let Some(name) = &name {
            headers.insert(HEADER_EVENT, &**name);
        }
        if let Some(conn) = exclude {
            headers.insert(HEADER_EXCLUDE, conn.to_string().as_str());
        }
        if let Some(region) = inner.topology.region() {
            headers.insert(HEADER_REGION, &**region);
        }
        if telemetry::tracing_enabled() {
            telemetry::inject(&tracing::Span::current(), |name, value| {
                headers.insert(name, value.as_str())
            });
        }
        for region in 0..inner.topology.count() {
            inner
                .client
                .publish_with_headers(
                    inner.topology.outbound_in(region, channel),
                    headers.clone(),
                    data.clone(),
                )
                .await
                .map_err(|_| BusError::Unavailable("connection lost"))?;
        }
        Ok(id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_is_capped_and_jittered() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        for attempts in 2..50 {
            let d = reconnect_delay(attempts);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(2_500));
        }
    }
}
