//! The stats query on NATS: every ws node answers with its [`NodeStats`] (scatter-gather, no
//! queue group, as presence queries), and the API gathers them (see [`crate::stats`]).
use std::collections::HashMap;

use bytes::Bytes;
use futures_util::StreamExt;

use super::{error::BusError, rpc::Rpc};
use crate::{discovery::Directory, stats::NodeStats};

impl Rpc {
    /// Answers every stats query with `answer()` (none when it is `None`), until the bus
    /// closes.
    pub async fn answer_stats<F>(&self, answer: F) -> Result<(), BusError>
    where
        F: Fn() -> Option<NodeStats> + Send + 'static,
    {
        let mut queries = self.client.subscribe(self.topology.stats_query()).await?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(message) = queries.next().await {
                let Some(reply) = message.reply else { continue };
                let Some(stats) = answer() else { continue };
                let payload: Bytes = serde_json::to_vec(&stats).expect("stats serialize").into();
                if let Err(err) = client.publish(reply, payload).await {
                    tracing::debug!(%err, "stats answer not sent");
                }
            }
        });
        Ok(())
    }

    /// Asks every ws node for its stats: the answers of those that answered within
    /// [`crate::stats::QUERY_TIMEOUT`], and whether one the directory knows of (or may not know of yet)
    /// is missing.
    pub async fn stats(&self, directory: &Directory) -> Result<(Vec<NodeStats>, bool), BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS"));
        }
        let mut nodes: HashMap<String, NodeStats> = HashMap::new();
        let partial = self
            .scatter_gather(
                self.topology.stats_query(),
                Bytes::new(),
                "cannot send the stats query",
                |answer| {
                    if let Some(answer) = answer {
                        match serde_json::from_slice::<NodeStats>(answer) {
                            Ok(stats) => {
                                nodes.insert(stats.id.clone(), stats);
                            }
                            Err(err) => tracing::debug!(%err, "ignoring a malformed stats answer"),
                        }
                    }
                    directory.is_complete()
                        && directory
                            .live()
                            .iter()
                            .all(|node| nodes.contains_key(&node.id))
                },
            )
            .await?;
        Ok((nodes.into_values().collect(), partial))
    }
}
