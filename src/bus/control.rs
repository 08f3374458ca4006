//! Server-side control on NATS ([`crate::control`] says what the commands and rules are):
//! commands to every ws node (scatter-gather, no queue group, as presence and stats queries),
//! and the rules' key-value bucket (`<PREFIX>_CONTROL`, with regions in the first region's
//! cluster, which every region reaches through the gateways), written by the API and followed
//! by every node from its first entry on: a node started after a block knows it before it is
//! ready.
//!
//! A rule with an end (`until`) is stored with a per-message TTL (JetStream 2.11's
//! `Nats-TTL`), so the bucket forgets it by itself; readers also ignore one past its end.

use std::{collections::HashMap, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, kv},
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::{error::BusError, rpc::Rpc, topology::Topology};
use crate::{
    control::{Answer, Command, Rule},
    discovery::Directory,
    time::now_ms,
};

/// How long the bucket keeps the marker of an expired rule (for watchers that were away).
const MARKER_TTL: Duration = Duration::from_secs(60);

impl Rpc {
    /// Carries out every command with `answer` (no answer when it gives none), until the bus
    /// closes.
    pub async fn answer_control<F>(&self, answer: F) -> Result<(), BusError>
    where
        F: Fn(Command) -> Option<Answer> + Send + 'static,
    {
        let mut commands = self.client.subscribe(self.topology.control()).await?;
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(message) = commands.next().await {
                let command = match serde_json::from_slice::<Command>(&message.payload) {
                    Ok(command) => command,
                    Err(err) => {
                        tracing::debug!(%err, "ignoring a command this node does not know");
                        continue;
                    }
                };
                let Some(answer) = answer(command) else {
                    continue;
                };
                let Some(reply) = message.reply else { continue };
                let payload: Bytes = serde_json::to_vec(&answer)
                    .expect("an answer serializes")
                    .into();
                if let Err(err) = client.publish(reply, payload).await {
                    tracing::debug!(%err, "control answer not sent");
                }
            }
        });
        Ok(())
    }

    /// Sends `command` to every ws node: the answers of those that answered within
    /// [`crate::control::QUERY_TIMEOUT`], and whether one the directory knows of (or may not
    /// know of yet) is missing.
    pub async fn control(
        &self,
        command: &Command,
        directory: &Directory,
    ) -> Result<(Vec<Answer>, bool), BusError> {
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS"));
        }
        let payload: Bytes = serde_json::to_vec(command)
            .expect("a command serializes")
            .into();
        let mut nodes: HashMap<String, Answer> = HashMap::new();
        let partial = self
            .scatter_gather(
                self.topology.control(),
                payload,
                "cannot send the command",
                |answer| {
                    if let Some(answer) = answer {
                        match serde_json::from_slice::<Answer>(answer) {
                            Ok(answer) => {
                                nodes.insert(answer.node.clone(), answer);
                            }
                            Err(err) => tracing::debug!(%err, "ignoring a malformed answer"),
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

/// The rules' bucket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Rules {
    js: jetstream::Context,
    topology: Topology,
    bucket: std::sync::Arc<OnceCell<kv::Store>>,
}

/// A change to the rules, as a follower sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleChange {
    /// A rule made (or replaced).
    Set(Rule),
    /// The rule with this key was lifted, or expired.
    Gone(String),
    /// Every rule stored when following began has been seen.
    Loaded,
}

fn unavailable<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BusError {
    move |err| {
        tracing::debug!(%err, what, "control rules");
        BusError::Unavailable(what)
    }
}

impl Rules {
    pub(super) fn new(js: jetstream::Context, topology: Topology) -> Rules {
        Rules {
            js,
            topology,
            bucket: std::sync::Arc::default(),
        }
    }

    /// The bucket, made if it does not exist yet.
    async fn bucket(&self) -> Result<&kv::Store, BusError> {
        self.bucket
            .get_or_try_init(|| async {
                let name = self.topology.life_name("CONTROL");
                if let Ok(store) = self.js.get_key_value(&name).await {
                    return Ok(store);
                }
                let placement =
                    self.topology
                        .life_home()
                        .map(|home| jetstream::stream::Placement {
                            cluster: Some(home.to_string()),
                            ..Default::default()
                        });
                self.js
                    .create_key_value(kv::Config {
                        bucket: name,
                        history: 1,
                        placement,
                        limit_markers: Some(MARKER_TTL),
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable("cannot make the control bucket"))
            })
            .await
    }

    /// Stores `rule` (replacing the one with its key); with an end, the bucket forgets it
    /// then. Returns once the bucket has it.
    pub async fn set(&self, rule: &Rule) -> Result<(), BusError> {
        self.bucket().await?;
        let payload: Bytes = serde_json::to_vec(rule).expect("a rule is JSON").into();
        let mut headers = HeaderMap::new();
        if let Some(until) = rule.until() {
            let left = until.saturating_sub(now_ms() / 1000).max(1);
            headers.insert("Nats-TTL", left.to_string().as_str());
        }
        let name = self.topology.life_name("CONTROL");
        self.js
            .publish_with_headers(format!("$KV.{name}.{}", rule.key()), headers, payload)
            .await
            .map_err(unavailable("rule not sent"))?
            .await
            .map_err(unavailable("rule not stored"))?;
        Ok(())
    }

    /// Lifts the rule stored under `key`.
    pub async fn lift(&self, key: &str) -> Result<(), BusError> {
        self.bucket()
            .await?
            .delete(key)
            .await
            .map_err(unavailable("rule not lifted"))
    }

    /// Follows the rules: every stored one, then [`RuleChange::Loaded`], then every change,
    /// until the bucket cannot be followed (then the caller follows again).
    pub async fn follow(
        &self,
    ) -> Result<impl futures_util::Stream<Item = RuleChange> + Send + use<>, BusError> {
        let bucket = self.bucket().await?.clone();
        let stored = bucket
            .status()
            .await
            .map_err(unavailable("no control bucket status"))?
            .values();
        let watch = bucket
            .watch_with_history(">")
            .await
            .map_err(unavailable("cannot follow the control bucket"))?;
        let loaded = futures_util::stream::iter((stored == 0).then_some(RuleChange::Loaded));
        let changes = watch
            .filter_map(|entry| async move {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(err) => {
                        tracing::debug!(%err, "control bucket watch");
                        return None;
                    }
                };
                let change = match entry.operation {
                    kv::Operation::Put => match serde_json::from_slice::<Rule>(&entry.value) {
                        Ok(rule) => RuleChange::Set(rule),
                        Err(err) => {
                            tracing::warn!(%err, key = entry.key, "ignoring a malformed rule");
                            RuleChange::Gone(entry.key.clone())
                        }
                    },
                    kv::Operation::Delete | kv::Operation::Purge => {
                        RuleChange::Gone(entry.key.clone())
                    }
                };
                Some(futures_util::stream::iter(
                    std::iter::once(change).chain((entry.delta == 0).then_some(RuleChange::Loaded)),
                ))
            })
            .flatten();
        Ok(loaded.chain(changes))
    }
}
