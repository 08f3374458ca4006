//! This node's part of the lifecycle events (`FANOUT_WEBHOOK_URL` set): it reports its own
//! transitions to the tier's decider ([`fanout::lifecycle`]), in the order the hub saw them:
//! a channel's first and last local subscriber, a user's first and last local connection in a
//! channel (presence's members: visible subscribers), and the clients' publishes on channels
//! `FANOUT_WEBHOOK_CLIENT_EVENTS` names. It speaks for this instance only (its id and start
//! time), so that a restarted node's reports never mix with its previous life's.
//!
//! Each report is stored in JetStream before the next is sent (retried until it is), so they
//! reach the decider in order; the queue in between is unbounded while NATS is away.

use std::{collections::HashMap, sync::Arc, time::Duration};

use fanout::{Bus, Channel, lifecycle::Delta};
use tokio::sync::mpsc;

/// What the hub (or a session) tells the reporter.
#[derive(Debug)]
pub enum Report {
    /// The channel's first local subscriber.
    Sub(Channel),
    /// Its last local subscriber left.
    Unsub(Channel),
    /// A (visible) connection of `user` joined the channel.
    Joined(Channel, Arc<str>),
    /// A connection of `user` left it.
    Left(Channel, Arc<str>),
    /// A client's publish.
    ClientEvent(Channel, Arc<str>, serde_json::Value),
}

/// Whether `channel` has lifecycle events (not `broadcast`, not fanout's own).
pub fn reported(channel: &Channel) -> bool {
    !channel.is_internal() && *channel != Channel::broadcast()
}

/// Reports until every sender is gone.
pub async fn report(bus: Bus, instance: String, mut reports: mpsc::UnboundedReceiver<Report>) {
    // Each user's local connections per channel: the first and the last are what count.
    let mut connections: HashMap<(Channel, Arc<str>), usize> = HashMap::new();
    while let Some(report) = reports.recv().await {
        let node = instance.clone();
        let delta = match report {
            Report::Sub(channel) => Delta::Sub {
                channel: channel.to_string(),
                node,
            },
            Report::Unsub(channel) => Delta::Unsub {
                channel: channel.to_string(),
                node,
            },
            Report::Joined(channel, user) => {
                let count = connections
                    .entry((channel.clone(), user.clone()))
                    .or_default();
                *count += 1;
                if *count > 1 {
                    continue;
                }
                Delta::Join {
                    channel: channel.to_string(),
                    node,
                    user: user.to_string(),
                }
            }
            Report::Left(channel, user) => {
                let key = (channel.clone(), user.clone());
                match connections.get_mut(&key) {
                    Some(count) if *count > 1 => {
                        *count -= 1;
                        continue;
                    }
                    Some(_) => {
                        connections.remove(&key);
                    }
                    None => continue,
                }
                Delta::Leave {
                    channel: channel.to_string(),
                    node,
                    user: user.to_string(),
                }
            }
            Report::ClientEvent(channel, user, data) => Delta::ClientEvent {
                channel: channel.to_string(),
                node,
                user: user.to_string(),
                data,
            },
        };
        let mut wait = Duration::from_millis(100);
        while let Err(err) = bus.lifecycle().report(&delta, None).await {
            tracing::warn!(%err, "lifecycle report not stored; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}
