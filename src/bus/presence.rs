//! Presence on NATS: each channel's changes on a subject of their own, and the query every ws
//! node answers (scatter-gather, [`Rpc::scatter_gather`]; see [`crate::presence`]).
use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;

use super::{
    error::BusError,
    rpc::{Rpc, sync},
};
use crate::{Channel, discovery::Directory, presence};

impl Rpc {
    /// Publishes a presence change of `channel` (fire and forget: core NATS, not stored).
    pub async fn publish_presence(&self, channel: &Channel, change: &presence::Change) {
        let subject = self.topology.presence(channel);
        if let Err(err) = self.client.publish(subject, change.encode()).await {
            tracing::debug!(%channel, %err, "presence change not sent");
        }
    }

    /// Follows the presence changes of `channel`. Returns once the server has registered the
    /// interest (like [`Bus::subscribe`](super::Bus::subscribe)).
    pub async fn subscribe_presence(&self, channel: &Channel) -> Result<PresenceChanges, BusError> {
        let subscriber = self
            .client
            .subscribe(self.topology.presence(channel))
            .await?;
        sync(&self.client, &self.topology).await;
        Ok(PresenceChanges { subscriber })
    }

    /// Answers every presence query with `answer(query)`, the parts of this node's answer,
    /// until the bus closes.
    pub async fn answer_presence<F>(&self, answer: F) -> Result<(), BusError>
    where
        F: Fn(presence::Query) -> Vec<Bytes> + Send + 'static,
    {
        let mut queries = self
            .client
            .subscribe(self.topology.presence_query())
            .await?;
        let client = self.client.clone();
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
        let query = presence::Query {
            channel: channel.to_string(),
            count_only,
        };
        let payload = serde_json::to_vec(&query).expect("a query serializes");
        // Per node: its count, and whether its last part came.
        let mut nodes: HashMap<String, (usize, bool)> = HashMap::new();
        let mut members = Vec::new();
        let partial = self
            .scatter_gather(
                self.topology.presence_query(),
                payload.into(),
                "cannot send the presence query",
                |answer| {
                    if let Some(answer) = answer {
                        match serde_json::from_slice::<presence::Part>(answer) {
                            Ok(part) => {
                                let entry = nodes.entry(part.node).or_default();
                                *entry = (part.count, part.last);
                                if !count_only {
                                    members.extend(part.members);
                                }
                            }
                            Err(err) => {
                                tracing::debug!(%err, "ignoring a malformed presence answer")
                            }
                        }
                    }
                    directory.is_complete()
                        && directory
                            .live()
                            .iter()
                            .all(|node| nodes.get(&node.id).is_some_and(|(_, done)| *done))
                        && nodes.values().all(|(_, done)| *done)
                },
            )
            .await?;
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
}

/// The presence changes of one channel. Dropping it unsubscribes.
#[derive(Debug)]
pub struct PresenceChanges {
    subscriber: async_nats::Subscriber,
}

impl PresenceChanges {
    /// The next change; `None` once the subscription is closed. A change that cannot be read
    /// (malformed, or of a newer version) comes as an error, to be counted and dropped.
    pub async fn next(&mut self) -> Option<Result<presence::Change, presence::ChangeError>> {
        let message = self.subscriber.next().await?;
        Some(presence::Change::decode(&message.payload))
    }
}
