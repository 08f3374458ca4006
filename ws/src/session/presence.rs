//! `presence` (who is in a channel, across every node) and `info` (what others see of this
//! connection).
//!
//! A query may wait for a slow node (up to the query timeout), so it is answered off the
//! connection's task, at most [`MAX_QUERIES`] in flight per connection: events and other
//! requests keep flowing meanwhile.

use std::sync::Arc;

use fanout::{Channel, Code};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::state::{ReplyTo, Session};

/// Most presence queries one connection may have in flight.
const MAX_QUERIES: usize = 4;
use crate::protocol::{self, Rejection, RequestId};

pub(super) fn query(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
    count_only: bool,
) {
    if channel.is_broadcast() {
        let message = "\"broadcast\" reaches every connection; it has no presence";
        return session.reject(to, id, "presence", Code::ReservedChannel, message);
    }
    if !session.identity.may_subscribe(&channel) {
        let message = format!("your token does not allow subscribing to {channel:?}");
        return session.reject(to, id, "presence", Code::Forbidden, message);
    }
    if !session.requests.take() {
        return session.rate_limited(to, id, "presence");
    }
    let in_flight = session
        .queries
        .get_or_insert_with(|| Arc::new(Semaphore::new(MAX_QUERIES)));
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        let message = format!("at most {MAX_QUERIES} presence queries in flight per connection");
        return session.reject(to, id, "presence", Code::TooManyRequests, message);
    };
    let (node, conduit) = (session.node.clone(), session.conduit.clone());
    tokio::spawn(
        async move {
            let reply = match node.presence(&channel, count_only).await {
                Ok(answer) => protocol::presence(&answer, id.as_ref()),
                Err(err) => {
                    let mut rejection = Rejection::new(Code::BusUnavailable, err.to_string());
                    rejection.op = Some("presence".into());
                    rejection.id = id;
                    rejection.encode()
                }
            };
            // In order with whatever else is written to the connection by then.
            match to {
                ReplyTo::Stream => conduit.send("reply", &reply),
                ReplyTo::Caller(caller) => {
                    let _ = caller.send(reply);
                }
            }
            drop(permit);
        }
        .in_current_span(),
    );
}

pub(super) fn info(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    info: Option<String>,
) {
    if !session.requests.take() {
        return session.rate_limited(to, id, "info");
    }
    let info = info.and_then(|info| RawValue::from_string(info).ok());
    let reply = protocol::info_updated(info.as_deref(), id.as_ref());
    session.node.set_info(session.conn, info);
    session.send(to, reply);
}
