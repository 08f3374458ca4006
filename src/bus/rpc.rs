//! Core NATS between fanout's processes: request/reply and fire-and-forget subjects, not
//! stored. The scatter-gather every ws node answers (presence and stats queries), and
//! [`sync`], which proves the server has processed what this connection sent. The jobs
//! themselves: `presence.rs`, `stats.rs`, `discovery.rs`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::{error::BusError, topology::Topology};

/// A handle for fanout's own messages between processes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Rpc {
    pub(super) client: async_nats::Client,
    pub(super) topology: Topology,
}

/// Waits until the server has processed everything `client` sent so far (at most 2 s).
pub(super) async fn sync(client: &async_nats::Client, topology: &Topology) {
    if client.connection_state() == async_nats::connection::State::Connected {
        // Any answer (normally "no responders") proves the server got here.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(topology.sync(), Bytes::new()),
        )
        .await;
    }
}

impl Rpc {
    pub(super) fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `payload` to `subject` with a fresh inbox for the answers, and hands each
    /// answer to `take` until `take` says everything has come (it is also asked with `None`
    /// first, and now and then meanwhile) or [`crate::presence::QUERY_TIMEOUT`] passes: then the
    /// answer is partial (`true`). The query of presence and of stats (scatter-gather, no
    /// queue group: every ws node answers).
    pub(super) async fn scatter_gather(
        &self,
        subject: String,
        payload: Bytes,
        unsent: &'static str,
        mut take: impl FnMut(Option<&[u8]>) -> bool,
    ) -> Result<bool, BusError> {
        let client = &self.client;
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await?;
        client
            .publish_with_reply(subject, inbox, payload)
            .await
            .map_err(|_| BusError::Unavailable(unsent))?;
        let deadline = tokio::time::Instant::now() + crate::presence::QUERY_TIMEOUT;
        let mut complete = take(None);
        while !complete {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(true);
            }
            // Wake now and then: discovery may forget a crashed node meanwhile.
            let wait = (deadline - now).min(Duration::from_millis(100));
            complete = match tokio::time::timeout(wait, answers.next()).await {
                Ok(Some(message)) => take(Some(&message.payload)),
                // The connection closed: nothing more will come.
                Ok(None) => return Ok(true),
                Err(_) => take(None),
            };
        }
        Ok(false)
    }
}
