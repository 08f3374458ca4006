//! A connection's state in the protocol, and how a request is answered: what every op's
//! handler works on.

use std::{sync::Arc, time::Duration};

use fanout::Code;
use tokio::sync::{Semaphore, oneshot};

use crate::{
    auth::Identity,
    hub::ConnId,
    node::Node,
    protocol::{Rejection, RequestId},
    sink::Conduit,
};

/// A connection's state in the protocol.
#[derive(Debug)]
pub struct Session {
    pub(super) conn: ConnId,
    pub(super) node: Arc<Node>,
    pub(super) conduit: Arc<dyn Conduit>,
    pub(super) identity: Identity,
    /// Publishes, info updates and presence queries, per second.
    pub(super) requests: Bucket,
    /// Presence queries in flight; created on the first one.
    pub(super) queries: Option<Arc<Semaphore>>,
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
            requests: Bucket::new(rate),
            queries: None,
        }
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sends one reply.
    pub(super) fn send(&self, to: ReplyTo, json: String) {
        match to {
            ReplyTo::Stream => self.conduit.send("reply", &json),
            ReplyTo::Caller(caller) => {
                let _ = caller.send(json);
            }
        }
    }

    /// Refuses a request (`op`) with an error frame; the connection stays.
    pub(super) fn reject(
        &self,
        to: ReplyTo,
        id: Option<RequestId>,
        op: &str,
        code: Code,
        message: impl Into<String>,
    ) {
        let mut rejection = Rejection::new(code, message);
        rejection.op = Some(op.to_string());
        rejection.id = id;
        self.send(to, rejection.encode());
    }

    /// Refuses `op` for the app's hook's reason: its code and message.
    pub(super) fn refuse(
        &self,
        to: ReplyTo,
        id: Option<RequestId>,
        op: &str,
        err: crate::proxy::ProxyError,
    ) {
        let mut rejection = Rejection::app(err.code(), err.to_string());
        rejection.op = Some(op.to_string());
        rejection.id = id;
        self.send(to, rejection.encode());
    }

    /// Refuses `op`: the request rate is spent.
    pub(super) fn rate_limited(&self, to: ReplyTo, id: Option<RequestId>, op: &str) {
        let rate = self.node.config().publish_rate_per_sec;
        self.reject(
            to,
            id,
            op,
            Code::RateLimited,
            format!(
                "at most {rate} publishes, info updates, presence queries and rpcs per second \
                 (FANOUT_PUBLISH_RATE_PER_SEC)"
            ),
        );
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
    async fn the_request_rate_is_a_burst_then_a_rate() {
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
