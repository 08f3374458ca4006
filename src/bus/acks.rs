//! The acknowledgements of batched publishes ([`EventLog::publish_many`](super::EventLog::publish_many)):
//! all on one subscription of this process, `<inbox>.<batch>.<index>`, routed to the batch
//! that waits for them.
//!
//! async-nats answers each JetStream publish through a request of its own (an inbox, a map
//! entry, a oneshot and a timer per message, and the answer parsed through an untagged
//! enum): for a batch that was a fifth of the API's instructions per event (callgrind,
//! 26,814 → 21,038 per event in batches of 100). A subscription per batch saved the same in
//! the API but cost nats-server a SUB and an UNSUB per request, measurable at small batches
//! (many-channels scenario: nats-server 1.4 → 1.8 s of CPU for the same events), so there is
//! one subscription, made with the first batch and kept.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use async_nats::{Client, Message, SubscribeError};
use futures_util::StreamExt;
use tokio::sync::mpsc;

#[derive(Debug)]
pub(super) struct Acks {
    /// `<inbox>.`: every reply subject starts with it.
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
}

/// One batch's claim on its acknowledgements; dropping it stops their delivery.
pub(super) struct Batch {
    id: u64,
    acks: Arc<Acks>,
    /// The batch's acknowledgements, in the order they came.
    pub(super) received: mpsc::UnboundedReceiver<Message>,
}

impl Acks {
    /// Subscribes (before any batch is sent on the same connection, so the server has the
    /// subscription before the first acknowledgement) and starts routing.
    pub(super) async fn start(client: &Client) -> Result<Arc<Acks>, SubscribeError> {
        let inbox = client.new_inbox();
        let mut subscription = client.subscribe(format!("{inbox}.>")).await?;
        let acks = Arc::new(Acks {
            prefix: format!("{inbox}."),
            next: AtomicU64::new(0),
            waiting: Mutex::default(),
        });
        let routing: Weak<Acks> = Arc::downgrade(&acks);
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(acks) = routing.upgrade() else { break };
                acks.route(message);
            }
        });
        Ok(acks)
    }

    fn route(&self, message: Message) {
        let batch = message
            .subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.split('.').next())
            .and_then(|id| id.parse::<u64>().ok());
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(batch) = batch.and_then(|id| waiting.get(&id)) {
            let _ = batch.send(message);
        }
    }

    /// A new batch: its reply subjects are `<prefix><id>.<index>`.
    pub(super) fn batch(self: &Arc<Self>) -> Batch {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (sender, received) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, sender);
        Batch {
            id,
            acks: self.clone(),
            received,
        }
    }
}

impl Batch {
    /// Where event `index` of this batch is acknowledged.
    pub(super) fn reply(&self, index: usize) -> String {
        format!("{}{}.{index}", self.acks.prefix, self.id)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.acks
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}
