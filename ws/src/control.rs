//! Server-side control on this node ([`fanout::control`] says what the commands and rules
//! are): carrying out a command on this node's connections, and the rules this node follows
//! (a user's block, revoked tokens, removed histories), checked on connect and refresh and
//! enforced on the connections present when a rule arrives.
//!
//! Rules come from the tier's bucket, which the node follows from its first entry on
//! ([`follow`]); a node is not ready until it has read every stored rule, so that a node
//! started after a block honours it. A command's `apply` brings a new rule at once too, so
//! that the API can answer with the connections it closed.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use fanout::{
    Bus, Channel, Code,
    control::{Answer, Command, ConnectionInfo, MAX_LISTED, Rule, key},
    time::now_ms,
};

use crate::{
    auth::Identity,
    disconnect::{self, Disconnect},
    hub::{Hub, Order},
    sink::Sink,
};

/// The rules this node knows, by their keys.
#[derive(Debug, Default)]
pub struct Rules {
    rules: RwLock<HashMap<String, Rule>>,
    /// Every rule stored when the node started following has been read.
    loaded: AtomicBool,
    /// The last rules applied, with the connections each closed: a rule comes both from the
    /// bucket and from the API's command, in either order, and the command's answer counts
    /// what the rule closed, whichever came first.
    applied: std::sync::Mutex<std::collections::VecDeque<(Rule, usize)>>,
    /// The evacuated regions, as the rules say.
    evacuated: tokio::sync::watch::Sender<BTreeSet<String>>,
}

/// Rules whose closes are remembered.
const APPLIED: usize = 256;

/// Why a rule refuses a connection: its error code and message (on connect) and its close
/// (for a connection present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: Code,
    pub message: &'static str,
    pub close: Disconnect,
}

impl Rules {
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Rule>> {
        self.rules.read().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, rule: Rule) {
        let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
        rules.insert(rule.key(), rule);
        // Forget the rules whose time is over (the bucket forgets them too).
        let now = now_ms() / 1000;
        rules.retain(|_, rule| rule.until().is_none_or(|until| until > now));
        self.evacuated_now(&rules);
    }

    /// Tells the evacuations' followers what `rules` evacuate, when it changed.
    fn evacuated_now(&self, rules: &HashMap<String, Rule>) {
        let regions: BTreeSet<String> = rules
            .values()
            .filter_map(|rule| match rule {
                Rule::Evacuate { region, .. } => Some(region.clone()),
                _ => None,
            })
            .collect();
        self.evacuated.send_if_modified(|now| {
            let changed = *now != regions;
            *now = regions;
            changed
        });
    }

    /// The evacuated regions, followed.
    pub fn evacuations(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.evacuated.subscribe()
    }

    fn lift(&self, key: &str) {
        {
            let mut rules = self.rules.write().unwrap_or_else(|e| e.into_inner());
            rules.remove(key);
            self.evacuated_now(&rules);
        }
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(rule, _)| rule.key() != key);
    }

    /// Counts `closed` connections to `rule`: every connection it closed so far.
    fn count(&self, rule: &Rule, closed: usize) -> usize {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, count)) = applied.iter_mut().find(|(r, _)| r == rule) {
            *count += closed;
            return *count;
        }
        if applied.len() >= APPLIED {
            applied.pop_front();
        }
        applied.push_back((rule.clone(), closed));
        closed
    }

    /// Whether a rule refuses a connection of `identity`.
    pub fn refuses(&self, identity: &Identity) -> Option<Refused> {
        let rules = self.read();
        if rules.is_empty() {
            return None;
        }
        let now = now_ms() / 1000;
        let live = |rule: &&Rule| rule.until().is_none_or(|until| until > now);
        if rules
            .get(&key("block", &identity.user))
            .filter(live)
            .is_some()
        {
            return Some(Refused {
                code: Code::UserBlocked,
                message: "this user is blocked",
                close: disconnect::BLOCKED,
            });
        }
        let revoked = Refused {
            code: Code::TokenRevoked,
            message: "this token was revoked",
            close: disconnect::TOKEN_REVOKED,
        };
        if let Some(jti) = &identity.jti
            && rules.get(&key("jti", jti)).filter(live).is_some()
        {
            return Some(revoked);
        }
        if identity.expires_at.is_some()
            && let Some(Rule::RevokeUser { issued_before, .. }) =
                rules.get(&key("user", &identity.user)).filter(live)
            && identity.issued_at.unwrap_or(0) < *issued_before
        {
            return Some(revoked);
        }
        None
    }

    /// The point each region's stream had reached when `channel`'s history was last removed,
    /// if it was.
    pub fn removed(&self, channel: &Channel) -> Option<Vec<u64>> {
        let rules = self.read();
        match rules.get(&key("removed", channel.as_str())) {
            Some(Rule::Removed { last, .. }) => Some(last.clone()),
            _ => None,
        }
    }
}

/// Follows the tier's rules into `rules`, closing the connections a new one refuses, until
/// the node closes; follows again after a failure (NATS away, the bucket not made yet).
pub async fn follow(bus: Bus, hub: std::sync::Weak<Hub>, rules: Arc<Rules>) {
    use futures_util::StreamExt;
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match bus.rules().follow().await {
            Ok(changes) => {
                futures_util::pin_mut!(changes);
                while let Some(change) = changes.next().await {
                    pause = std::time::Duration::from_millis(100);
                    match change {
                        fanout::bus::RuleChange::Set(rule) => {
                            let Some(hub) = hub.upgrade() else { return };
                            apply(&hub, &rules, rule);
                        }
                        fanout::bus::RuleChange::Gone(key) => rules.lift(&key),
                        fanout::bus::RuleChange::Loaded => {
                            if !rules.loaded.swap(true, Ordering::AcqRel) {
                                tracing::debug!("control rules loaded");
                            }
                        }
                    }
                }
            }
            Err(err) => tracing::debug!(%err, "cannot follow the control rules yet"),
        }
        if hub.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// Takes `rule` in and closes the connections it refuses: how many.
fn apply(hub: &Hub, rules: &Rules, rule: Rule) -> usize {
    let now = now_ms() / 1000;
    if rule.until().is_some_and(|until| until <= now) {
        return 0;
    }
    let kicks = match &rule {
        Rule::Block { user, .. } => kick_user(hub, user, |_| true, &disconnect::BLOCKED),
        Rule::RevokeUser {
            user,
            issued_before,
            ..
        } => kick_user(
            hub,
            user,
            |about| about.issued_at.is_some_and(|iat| iat < *issued_before),
            &disconnect::TOKEN_REVOKED,
        ),
        Rule::RevokeToken { jti, .. } => hub
            .conns()
            .picked(|about| about.jti.as_deref() == Some(jti.as_str()))
            .iter()
            .filter(|sink| sink.kick().kick(disconnect::TOKEN_REVOKED))
            .count(),
        // The node follows evacuations itself (`Node::evacuations`), spread over its window.
        Rule::Removed { .. } | Rule::Evacuate { .. } => 0,
    };
    let closed = rules.count(&rule, kicks);
    rules.set(rule);
    closed
}

/// Closes the connections of `user` that `pick` picks with `close`: how many.
fn kick_user(
    hub: &Hub,
    user: &str,
    mut pick: impl FnMut(&crate::hub::About) -> bool,
    close: &Disconnect,
) -> usize {
    each_of(hub, user, |sink, about, _| {
        pick(about) && sink.kick().kick(close.clone())
    })
}

/// How many of `user`'s connections `act` acts on (says true for).
fn each_of(
    hub: &Hub,
    user: &str,
    mut act: impl FnMut(&Arc<dyn Sink>, &crate::hub::About, &HashSet<Channel>) -> bool,
) -> usize {
    hub.conns()
        .of_user(user)
        .into_iter()
        .filter(|&id| hub.conns().with(id, &mut act).unwrap_or(false))
        .count()
}

/// Carries out `command` on this node's connections.
pub fn answer(
    hub: &Hub,
    rules: &Rules,
    node: &str,
    region: Option<&str>,
    command: Command,
) -> Answer {
    let mut answer = Answer {
        node: node.to_string(),
        region: region.map(str::to_string),
        ..Answer::default()
    };
    match command {
        Command::Disconnect { user, code, reason } => {
            answer.affected = kick_user(hub, &user, |_| true, &Disconnect::app(code, reason));
        }
        Command::Subscribe { user, channel } | Command::Unsubscribe { user, channel }
            if Channel::parse(&channel).is_err() =>
        {
            tracing::debug!(%user, channel, "ignoring an order for an invalid channel");
        }
        Command::Subscribe { user, channel } => {
            let channel = Channel::parse(&channel).expect("checked above");
            answer.affected = order(hub, &user, |channels| {
                (!channels.contains(&channel)).then(|| Order::Subscribe(channel.clone()))
            });
        }
        Command::Unsubscribe { user, channel } => {
            let channel = Channel::parse(&channel).expect("checked above");
            answer.affected = order(hub, &user, |channels| {
                channels
                    .contains(&channel)
                    .then(|| Order::Unsubscribe(channel.clone()))
            });
        }
        Command::Connections { user } => {
            let ids = hub.conns().of_user(&user);
            answer.truncated = ids.len() > MAX_LISTED;
            for id in ids.into_iter().take(MAX_LISTED) {
                let listed = hub.conns().with(id, |_, about, channels| {
                    let mut channels: Vec<String> =
                        channels.iter().map(|c| c.as_str().to_string()).collect();
                    channels.sort();
                    ConnectionInfo {
                        id: id.to_string(),
                        node: node.to_string(),
                        region: region.map(str::to_string),
                        transport: about.transport.to_string(),
                        channels,
                        connected_since: about.since,
                    }
                });
                answer.connections.extend(listed);
            }
            answer.affected = answer.connections.len();
        }
        Command::Channels { prefix, limit } => {
            let mut channels: Vec<(String, usize)> = hub
                .channels()
                .into_iter()
                .filter(|(channel, _)| {
                    !channel.is_internal() && channel.as_str().starts_with(prefix.as_str())
                })
                .map(|(channel, count)| (channel.as_str().to_string(), count))
                .collect();
            channels.sort();
            answer.truncated = channels.len() > limit;
            channels.truncate(limit);
            answer.channels = channels;
        }
        Command::Apply { rule } => answer.affected = apply(hub, rules, rule),
    }
    answer
}

/// Posts the order `make` makes for each of `user`'s connections with a mailbox (given the
/// channels it is in): how many took one.
fn order(hub: &Hub, user: &str, mut make: impl FnMut(&HashSet<Channel>) -> Option<Order>) -> usize {
    each_of(hub, user, |_, about, channels| {
        match (about.mailbox.as_ref(), make(channels)) {
            (Some(mailbox), Some(order)) => mailbox.post(order),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Patterns;

    fn identity(user: &str, jti: Option<&str>, iat: Option<u64>) -> Identity {
        Identity {
            user: user.into(),
            info: None,
            subscribe: Patterns::all(),
            publish: Patterns::all(),
            expires_at: Some(u64::MAX),
            jti: jti.map(Into::into),
            issued_at: iat,
            channels: Vec::new(),
        }
    }

    #[test]
    fn rules_refuse_blocked_users_and_revoked_tokens_until_they_end() {
        let rules = Rules::default();
        let now = now_ms() / 1000;
        assert_eq!(rules.refuses(&identity("ada", None, None)), None);
        rules.set(Rule::Block {
            user: "ada".into(),
            until: Some(now + 60),
        });
        assert_eq!(
            rules.refuses(&identity("ada", None, None)).unwrap().code,
            Code::UserBlocked
        );
        assert_eq!(rules.refuses(&identity("bob", None, None)), None);
        rules.set(Rule::Block {
            user: "old".into(),
            until: Some(now - 1),
        });
        assert_eq!(rules.refuses(&identity("old", None, None)), None);
        rules.set(Rule::RevokeToken {
            jti: "t1".into(),
            until: None,
        });
        assert_eq!(
            rules
                .refuses(&identity("bob", Some("t1"), None))
                .unwrap()
                .close,
            disconnect::TOKEN_REVOKED
        );
        assert_eq!(rules.refuses(&identity("bob", Some("t2"), None)), None);
        rules.set(Rule::RevokeUser {
            user: "cy".into(),
            issued_before: 100,
            until: None,
        });
        assert!(rules.refuses(&identity("cy", None, Some(99))).is_some());
        assert!(rules.refuses(&identity("cy", None, None)).is_some());
        assert_eq!(rules.refuses(&identity("cy", None, Some(100))), None);
        rules.lift(&key("block", "ada"));
        assert_eq!(rules.refuses(&identity("ada", None, None)), None);
    }
}
