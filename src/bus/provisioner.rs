//! The provisioner: the task that makes the stream (`<PREFIX>`) and, with regions, this
//! region's mirrors of the others', with our settings, and keeps them so. The stream captures
//! `<prefix>.in.>`, keeps the history window and RePublishes every stored message to
//! `<prefix>.out.<channel>` with `Nats-Sequence` / `Nats-Last-Sequence` headers. Whichever
//! process starts first creates it; every process re-applies its settings after each
//! (re)connect, so a NATS server that lost its state is repaired without a restart. What it
//! finds goes into the [event log](super::log)'s [`StreamState`].

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use async_nats::{
    connection::State,
    jetstream::stream::{self, Republish, StorageType},
};
use tokio_util::sync::CancellationToken;

use super::{
    error::BusError,
    log::{EventLog, ORIGIN_EPOCH, StreamState, epoch_of},
    topology::Topology,
};
use crate::{Common, config::Storage};

/// How long JetStream remembers a `Nats-Msg-Id` to drop a repeated publish. NATS requires
/// it to be no longer than the history window, so a shorter history shortens it.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// With regions: the stream lives in this process's region's cluster.
fn placement(topology: &Topology) -> Option<stream::Placement> {
    let region = topology.region()?;
    Some(stream::Placement {
        cluster: Some(region.to_string()),
        ..Default::default()
    })
}

/// The history settings every copy of a region's events shares.
fn limits(common: &Common) -> stream::Config {
    stream::Config {
        max_age: Duration::from_secs(common.history_max_age_secs),
        max_messages_per_subject: common.history_max_messages,
        storage: match common.history_storage {
            Storage::Memory => StorageType::Memory,
            Storage::File => StorageType::File,
        },
        num_replicas: common.history_replicas,
        allow_direct: true,
        duplicate_window: DUPLICATE_WINDOW.min(Duration::from_secs(common.history_max_age_secs)),
        ..Default::default()
    }
}

/// The stream's settings, from the history settings every process shares.
fn config(common: &Common, topology: &Topology) -> stream::Config {
    stream::Config {
        name: topology.stream_name(),
        subjects: vec![topology.inbound_all()],
        republish: Some(Republish {
            source: topology.inbound_all(),
            destination: topology.outbound_all(),
            headers_only: false,
        }),
        placement: placement(topology),
        ..limits(common)
    }
}

/// This region's mirror of region `region`'s stream (`None` for this region's own). A mirror
/// republishes too, to this region's nodes: that is how they get the other region's events.
fn mirror(common: &Common, topology: &Topology, region: u8) -> Option<stream::Config> {
    (region != topology.own()).then(|| stream::Config {
        name: topology.local_copy(region),
        mirror: Some(stream::Source {
            name: topology.origin_stream(region),
            ..Default::default()
        }),
        republish: Some(Republish {
            source: topology.inbound_all_in(region),
            destination: topology.outbound_all(),
            headers_only: false,
        }),
        placement: placement(topology),
        ..limits(common)
    })
}

/// The provisioner's settings and handles; its tasks end when `closed` is cancelled.
#[derive(Debug)]
pub(super) struct Provisioner {
    log: EventLog,
    client: async_nats::Client,
    topology: Topology,
    stream: stream::Config,
    /// Per region: this region's mirror of it (`None` for this region's own stream).
    mirrors: Vec<Option<stream::Config>>,
    closed: CancellationToken,
}

impl Provisioner {
    /// Starts keeping the stream (and, with regions, watching the mirrors) until `closed`.
    pub(super) fn start(
        common: &Common,
        topology: Topology,
        log: EventLog,
        client: async_nats::Client,
        closed: CancellationToken,
    ) {
        let provisioner = Arc::new(Provisioner {
            stream: config(common, &topology),
            mirrors: (0..topology.count())
                .map(|region| mirror(common, &topology, region))
                .collect(),
            log,
            client,
            topology,
            closed,
        });
        if provisioner.mirrors.len() > 1 {
            tokio::spawn(provisioner.clone().watch_mirrors());
        }
        tokio::spawn(provisioner.keep_stream());
    }

    fn state(&self) -> &StreamState {
        self.log.state()
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    async fn ensure_stream(&self) -> Result<(), BusError> {
        let info = self.apply(self.stream.clone()).await?;
        self.log.set_epoch(self.topology.own(), epoch_of(&info));
        for region in 0..self.topology.count() {
            self.ensure_mirror(region).await?;
        }
        self.state().ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates or updates this region's mirror of region `region`'s stream, and learns that
    /// stream's epoch. A mirror is only created once its origin exists: a mirror that cannot
    /// find its origin retries ever more slowly (up to every 2 minutes). Returns whether the
    /// mirror exists.
    async fn ensure_mirror(&self, region: u8) -> Result<bool, BusError> {
        let Some(mirror) = &self.mirrors[region as usize] else {
            return Ok(true);
        };
        let copy = self.log.copy(region);
        let mut mirror = mirror.clone();
        let existing = copy.handle.get_info().await.ok();
        // The origin's epoch, kept on the mirror for when the origin cannot be reached.
        match self.log.origin_epoch(region).await {
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
        self.apply(mirror).await?;
        Ok(true)
    }

    /// Creates or updates a stream. When that cannot be done (with regions: the JetStream
    /// meta group has lost its quorum because a region is down) but the stream exists, it is
    /// used as it is: publishing and reading need only the stream's own servers.
    async fn apply(&self, config: stream::Config) -> Result<stream::Info, BusError> {
        let js = self.log.js();
        match js.create_or_update_stream(config.clone()).await {
            Ok(info) => Ok(info),
            Err(source) => {
                if let Ok(stream) = js.get_stream_no_info(&config.name).await
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

    /// Background task (with regions): learns the other regions' epochs, and watches this
    /// region's mirrors of them. A mirror that has not heard from its origin for a while is behind
    /// (the region, or the link to it, is down): said in the log and in
    /// `fanout_region_mirror_behind{region}`. Once it is current again it republishes what it
    /// missed, so this region's nodes get it live.
    async fn watch_mirrors(self: Arc<Self>) {
        const EVERY: Duration = Duration::from_secs(1);
        const SILENT: Duration = Duration::from_secs(3);
        let count = self.mirrors.len();
        let mut behind = vec![false; count];
        let mut exists = vec![false; count];
        loop {
            for region in 0..count {
                if self.mirrors[region].is_none() {
                    continue;
                }
                let copy = self.log.copy(region as u8);
                let known = !self
                    .state()
                    .epochs
                    .read()
                    .unwrap_or_else(|e| e.into_inner())[region]
                    .is_empty();
                if !known || !exists[region] {
                    // Until its epoch is known, this node cannot judge positions in it; until its
                    // origin exists, the mirror is not made.
                    if self.is_connected() {
                        exists[region] = self.ensure_mirror(region as u8).await.unwrap_or(false);
                    }
                }
                let Ok(info) = copy.handle.get_info().await else {
                    continue;
                };
                let Some(source) = info.mirror else { continue };
                let silent = source.active.is_none_or(|active| active > SILENT);
                let name = self.topology.regions()[region].to_string();
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
                self.state()
                    .mirrors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())[region] = match behind[region] {
                    true => "behind",
                    false => "current",
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = self.closed.cancelled() => return,
            }
        }
    }

    /// Background task: after every (re)connect, or when asked, makes sure the stream exists
    /// with our settings, retrying until it does. Ends when the bus is dropped or drained.
    async fn keep_stream(self: Arc<Self>) {
        let check = self.state().check.clone();
        loop {
            tokio::select! {
                _ = check.notified() => {}
                _ = self.closed.cancelled() => return,
            }
            let mut delay = Duration::from_millis(100);
            loop {
                if !self.is_connected() {
                    break; // the next Connected event wakes us again
                }
                match self.ensure_stream().await {
                    Ok(()) => {
                        tracing::info!(stream = %self.stream.name, "stream ready");
                        break;
                    }
                    Err(err) => tracing::warn!(%err, "retrying in {delay:?}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.closed.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
