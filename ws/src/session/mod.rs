//! A connection's life in the protocol, whatever carries its bytes: who it is, what it may
//! do, and one handler per request op (the shape of mini-redis's `cmd/`, and of centrifuge's
//! transport-neutral `client.go`).
//!
//! A transport reads requests its own way (WebSocket frames; `POST /session/{conn}` for an SSE
//! stream) and hands each to [`Session::handle`]; the session answers through [`ReplyTo`] and
//! reaches its connection through a [`Conduit`] (events, replays, holding live frames back
//! while it subscribes). Nothing here knows a byte of any wire format beyond the protocol's
//! JSON.
//!
//! - this file: the session, dispatch, `ping`, `refresh`, the publish budget;
//! - [`subscribe`] handles `subscribe` (with resume) and `unsubscribe`;
//! - [`publish`] handles `publish`;
//! - [`presence`] handles `presence` queries and `info`.

mod presence;
mod publish;
mod subscribe;

pub use subscribe::{JoinError, Resume};

use std::{sync::Arc, time::Duration};

use fanout::Channel;
use tokio::sync::{Semaphore, oneshot};

use crate::{
    auth::Identity,
    hub::ConnId,
    node::Node,
    protocol::{self, Op, Rejection, Request, RequestId},
    sink::Conduit,
};

/// Most presence queries one connection may have in flight.
const MAX_QUERIES: usize = 4;

/// A connection's state in the protocol.
#[derive(Debug)]
pub struct Session {
    conn: ConnId,
    node: Arc<Node>,
    conduit: Arc<dyn Conduit>,
    identity: Identity,
    /// Publishes, info updates and presence queries, per second.
    budget: Bucket,
    /// Presence queries in flight; created on the first one.
    queries: Option<Arc<Semaphore>>,
}

/// Where a request's reply goes.
#[derive(Debug)]
pub enum ReplyTo {
    /// Into the connection's own stream, in order with everything written to it (WebSocket).
    Stream,
    /// To whoever asked, apart from the stream (an HTTP request, for SSE sessions).
    Caller(oneshot::Sender<String>),
}

impl Session {
    pub fn new(
        conn: ConnId,
        node: Arc<Node>,
        conduit: Arc<dyn Conduit>,
        identity: Identity,
    ) -> Session {
        let rate = node.config().publish_rate_per_sec;
        Session {
            conn,
            node,
            conduit,
            identity,
            budget: Bucket::new(rate),
            queries: None,
        }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Joins `channel` outside any request (an HTTP stream's channels, as its URL names
    /// them), resuming from `resume`; `announce` runs with what a replay found, before the
    /// replayed events are written.
    pub async fn join(
        &self,
        channel: &Channel,
        resume: Option<Resume>,
        announce: impl FnOnce(Option<&crate::node::Replay>),
    ) -> Result<(), JoinError> {
        subscribe::join(self, channel, false, resume, announce).await
    }

    /// Acts on one request (the JSON text of one protocol message) and sends its reply to
    /// `to`. A resuming `subscribe` sends its reply, then writes the replayed events, ahead of
    /// the live events it held back meanwhile.
    pub async fn handle(&mut self, text: &str, to: ReplyTo) {
        match protocol::parse(text) {
            Ok(request) => self.act(request, to).await,
            Err(rejection) => self.send(to, rejection.encode()),
        }
    }

    /// Acts on one parsed request and sends its reply to `to`.
    pub async fn act(&mut self, request: Request, to: ReplyTo) {
        let Request { id, op } = request;
        match op {
            Op::Ping => self.send(to, protocol::pong(id.as_ref())),
            Op::Subscribe {
                channel,
                since,
                epoch,
                presence,
            } => {
                let request = subscribe::Subscribe {
                    id,
                    channel,
                    since,
                    epoch,
                    presence,
                };
                subscribe::subscribe(self, to, request).await;
            }
            Op::Unsubscribe(channel) => subscribe::unsubscribe(self, to, id, channel),
            Op::Publish { channel, data } => publish::publish(self, to, id, channel, data).await,
            Op::Presence {
                channel,
                count_only,
            } => presence::query(self, to, id, channel, count_only),
            Op::Info { info } => presence::info(self, to, id, info),
            Op::Refresh { token } => self.refresh(to, id, &token),
        }
    }

    /// Sends one reply.
    fn send(&self, to: ReplyTo, json: String) {
        match to {
            ReplyTo::Stream => self.conduit.send("reply", &json),
            ReplyTo::Caller(caller) => {
                let _ = caller.send(json);
            }
        }
    }

    /// Refuses a request (`op`) with an error frame; the connection stays.
    fn reject(
        &self,
        to: ReplyTo,
        id: Option<RequestId>,
        op: &str,
        code: &'static str,
        message: impl Into<String>,
    ) {
        let mut rejection = Rejection::new(code, message);
        rejection.op = Some(op.to_string());
        rejection.id = id;
        self.send(to, rejection.encode());
    }

    /// Refuses `op` for want of publish budget.
    fn rate_limited(&self, to: ReplyTo, id: Option<RequestId>, op: &str) {
        let rate = self.node.config().publish_rate_per_sec;
        self.reject(
            to,
            id,
            op,
            "rate_limited",
            format!(
                "at most {rate} publishes, info updates and presence queries per second \
                 (FANOUT_PUBLISH_RATE_PER_SEC)"
            ),
        );
    }

    /// `refresh`: a fresh token for the same user; the connection then runs on it (its new
    /// expiry and permissions).
    fn refresh(&mut self, to: ReplyTo, id: Option<RequestId>, token: &str) {
        match self.node.verifier().identify(Some(token), None) {
            Ok(fresh) if fresh.user == self.identity.user => {
                self.identity = fresh;
                self.send(
                    to,
                    protocol::refreshed(self.identity.expires_at, id.as_ref()),
                );
            }
            Ok(_) => self.reject(
                to,
                id,
                "refresh",
                "invalid_token",
                "the new token is for another user",
            ),
            Err(err) => self.reject(to, id, "refresh", err.code, err.message),
        }
    }
}

/// A token bucket: `rate` per second, bursts up to `rate`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    pub fn new(rate: u32) -> Bucket {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: tokio::time::Instant::now(),
        }
    }

    pub fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Bucket {
    /// Whether it has refilled completely: its client has been idle for a second at least.
    pub fn is_full(&self) -> bool {
        let refill = self.at.elapsed().as_secs_f64() * self.rate;
        self.tokens + refill >= self.rate
    }
}

/// The instant a unix time (seconds) falls at.
pub fn deadline(unix_secs: u64) -> tokio::time::Instant {
    let left = unix_secs.saturating_sub(fanout::time::now_ms() / 1000);
    tokio::time::Instant::now() + Duration::from_secs(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_publish_budget_is_a_burst_then_a_rate() {
        let mut bucket = Bucket::new(3);
        assert!((0..3).all(|_| bucket.take()), "a full burst");
        assert!(!bucket.take());
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(!bucket.take(), "0.9 of a token");
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(bucket.take(), "one token per third of a second");
        assert!(!bucket.take());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            (0..5).filter(|_| bucket.take()).count(),
            3,
            "never more than a burst"
        );
    }
}
