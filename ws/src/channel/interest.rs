//! The node's NATS subscriptions follow its clients' interest: the hub's [`Interest`] reports,
//! applied in order. `Add` starts a task for the channel that subscribes in NATS and then
//! reads (its [`reader`](super::reader)); `Remove` stops it (which unsubscribes). `Watch` /
//! `Unwatch` do the same for a channel's presence changes.
//!
//! Each channel's subscribe runs in its own task, concurrently with every other channel's:
//! a subscribe waits for the server (a round trip, up to 2 s when NATS is slow), and one slow
//! subscribe must not hold back the others' adds and removes. Reports about one channel stay
//! in order: a `Remove` stops the task its `Add` started, whether it is still subscribing or
//! already reading.

use std::{collections::HashMap, future::Future, sync::Arc, time::Duration};

use fanout::{Bus, Channel};
use metrics::gauge;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    log::{Log, Logs},
    reader::{self, Target, Totals},
};
use crate::{
    hub::{Hub, Interest, Membership, Observer},
    lifecycle::{self, Report as Lifecycle},
};

/// An interest report, with the log of the stretch an `Add` begins.
pub type Report = (Interest, Option<Arc<Log>>);

/// The hub's observer on this node: opens and closes the channels' logs as the hub reports
/// their first and last subscriber (under the hub's lock, so that a connection that joined a
/// channel finds its current log), and hands every report on: interest to [`follow`],
/// membership to presence.
#[derive(Debug)]
pub struct Reports {
    pub logs: Arc<Logs>,
    pub interest: mpsc::UnboundedSender<Report>,
    pub membership: mpsc::UnboundedSender<Membership>,
    /// With lifecycle events on: the first and last subscribers and members, reported.
    pub lifecycle: Option<mpsc::UnboundedSender<Lifecycle>>,
}

impl Observer for Reports {
    fn interest(&self, interest: Interest) {
        let log = match &interest {
            Interest::Add {
                channel,
                generation,
            } => Some(self.logs.open(channel, *generation)),
            Interest::Remove { channel } => {
                self.logs.close(channel);
                None
            }
            Interest::Watch { .. } | Interest::Unwatch { .. } => None,
        };
        if let Some(lifecycle) = &self.lifecycle {
            let report = match &interest {
                Interest::Add { channel, .. } if lifecycle::reported(channel) => {
                    Some(Lifecycle::Sub(channel.clone()))
                }
                Interest::Remove { channel } if lifecycle::reported(channel) => {
                    Some(Lifecycle::Unsub(channel.clone()))
                }
                _ => None,
            };
            if let Some(report) = report {
                let _ = lifecycle.send(report);
            }
        }
        let _ = self.interest.send((interest, log));
    }

    fn membership(&self, membership: Membership) {
        if let (
            Some(lifecycle),
            Membership::Changed {
                change,
                channel,
                profile,
                ..
            },
        ) = (&self.lifecycle, &membership)
            && lifecycle::reported(channel)
        {
            let user = profile.user.clone();
            let report = match change {
                fanout::presence::ChangeOp::Join => Some(Lifecycle::Joined(channel.clone(), user)),
                fanout::presence::ChangeOp::Leave => Some(Lifecycle::Left(channel.clone(), user)),
                fanout::presence::ChangeOp::Update => None,
            };
            if let Some(report) = report {
                let _ = lifecycle.send(report);
            }
        }
        let _ = self.membership.send(membership);
    }
}

/// What a channel's reader needs besides its channel.
#[derive(Debug, Clone)]
pub struct Readers {
    pub bus: Bus,
    pub hub: Arc<Hub>,
    pub totals: Arc<Totals>,
    pub with_trace: bool,
    pub coalesce: Duration,
    /// The channels that keep deltas (`FANOUT_DELTA_CHANNELS`).
    pub deltas: Arc<crate::auth::Patterns>,
}

/// Applies the hub's interest reports until `shutdown` (or until the hub is gone). `watch`
/// starts following a channel's presence changes (`Watch`, with its generation); the task it
/// returns is stopped on `Unwatch`.
pub async fn follow<W, F>(
    readers: Readers,
    mut reports: mpsc::UnboundedReceiver<Report>,
    shutdown: CancellationToken,
    watch: W,
) where
    W: Fn(Channel, u64) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut subscribed: HashMap<Channel, JoinHandle<()>> = HashMap::new();
    let mut watching: HashMap<Channel, JoinHandle<()>> = HashMap::new();
    loop {
        let report = tokio::select! {
            report = reports.recv() => report,
            _ = shutdown.cancelled() => None,
        };
        match report {
            Some((
                Interest::Add {
                    channel,
                    generation,
                },
                Some(log),
            )) => {
                let target = Target {
                    hub: readers.hub.clone(),
                    log,
                    generation,
                    totals: readers.totals.clone(),
                    deltas: readers.deltas.allows(&channel),
                };
                let task = tokio::spawn(
                    subscribe(readers.clone(), channel.clone(), target).in_current_span(),
                );
                match subscribed.insert(channel, task) {
                    Some(stale) => stale.abort(),
                    None => gauge!("fanout_ws_nats_subscriptions").increment(1.0),
                }
            }
            Some((Interest::Remove { channel }, _)) => {
                if let Some(task) = subscribed.remove(&channel) {
                    tracing::debug!(%channel, "unsubscribed in NATS");
                    task.abort();
                    gauge!("fanout_ws_nats_subscriptions").decrement(1.0);
                }
            }
            Some((
                Interest::Watch {
                    channel,
                    generation,
                },
                _,
            )) => {
                let task = tokio::spawn(watch(channel.clone(), generation).in_current_span());
                if let Some(stale) = watching.insert(channel, task) {
                    stale.abort();
                }
            }
            Some((Interest::Unwatch { channel }, _)) => {
                if let Some(task) = watching.remove(&channel) {
                    task.abort();
                }
            }
            // An `Add` always comes with its log.
            Some((Interest::Add { .. }, None)) => {}
            None => break,
        }
    }
    for task in watching.into_values() {
        task.abort();
    }
    for task in subscribed.into_values() {
        task.abort();
        gauge!("fanout_ws_nats_subscriptions").decrement(1.0);
    }
}

/// Subscribes to `channel` in NATS, marks its stretch of interest live, and reads it until
/// the task is stopped.
async fn subscribe(readers: Readers, channel: Channel, target: Target) {
    let subscription = match readers.bus.subscribe(&channel).await {
        Ok(subscription) => Some(subscription),
        Err(err) => {
            tracing::error!(%channel, %err, "cannot subscribe in NATS");
            None
        }
    };
    // Live even when the subscribe failed: the subscribe is answered rather than left waiting
    // (the log above says why the channel's events will not come).
    readers.hub.set_live(&channel, target.generation);
    let Some(subscription) = subscription else {
        return;
    };
    tracing::debug!(%channel, "subscribed in NATS");
    reader::read(
        subscription,
        target,
        readers.bus,
        readers.with_trace,
        readers.coalesce,
    )
    .await;
}
