//! Discovery on NATS: ws nodes announce themselves, every process follows the announcements
//! (see [`crate::discovery`]).
use futures_util::StreamExt;

use super::{error::BusError, rpc::Rpc};

impl Rpc {
    /// Announces a ws node (fire and forget; the next announcement repeats it).
    pub async fn announce(&self, node: &crate::discovery::NodeInfo) {
        let payload = serde_json::to_vec(node).expect("a node announcement serializes");
        if let Err(err) = self
            .client
            .publish(self.topology.nodes(), payload.into())
            .await
        {
            tracing::debug!(%err, "node announcement not sent");
        }
    }

    /// Follows the nodes' announcements into `directory` until the bus closes.
    pub async fn follow_nodes(
        &self,
        directory: std::sync::Arc<crate::discovery::Directory>,
    ) -> Result<(), BusError> {
        let mut announcements = self.client.subscribe(self.topology.nodes()).await?;
        tokio::spawn(async move {
            while let Some(message) = announcements.next().await {
                match serde_json::from_slice(&message.payload) {
                    Ok(node) => directory.heard(node),
                    Err(err) => tracing::debug!(%err, "ignoring a malformed node announcement"),
                }
            }
        });
        Ok(())
    }
}
