//! `subscribe` and `unsubscribe`.
//!
//! A subscribe holds the connection's live frames back from the moment it starts until its
//! reply (and, when resuming, the replayed events) is written: `subscribed` comes before any
//! frame of the channel (docs/protocol.md, "Ordering"). With `since`, the node subscribes live
//! first, then replays the stored events after `since`, then lets the held live events go,
//! without those the replay covered: no gap, no duplicate.

use fanout::Channel;

use super::{ReplyTo, Session};
use crate::{
    hub::SubscribeError,
    protocol::{self, RequestId, Resumed},
    sink::{Outgoing, channel_key},
};

/// A `subscribe` request.
#[derive(Debug)]
pub struct Subscribe {
    pub id: Option<RequestId>,
    pub channel: Channel,
    /// Resume: the last seq the client has of the channel.
    pub since: Option<u64>,
    /// The stream epoch `since` belongs to.
    pub epoch: Option<String>,
    /// Also receive the channel's presence changes.
    pub presence: bool,
}

pub(super) async fn subscribe(session: &mut Session, to: ReplyTo, request: Subscribe) {
    let Subscribe {
        id,
        channel,
        since,
        epoch,
        presence,
    } = request;
    if !session.identity.may_subscribe(&channel) {
        let message = format!("your token does not allow subscribing to {channel:?}");
        return session.reject(to, id, "subscribe", "forbidden", message);
    }
    if presence && channel.is_broadcast() {
        let message = "\"broadcast\" reaches every connection; it has no presence";
        return session.reject(to, id, "subscribe", "reserved_channel", message);
    }
    let conduit = session.conduit.clone();
    conduit.hold();
    if let Err(err) = session
        .node
        .subscribe(session.conn, &channel, presence)
        .await
    {
        conduit.release_held();
        let code = match err {
            SubscribeError::TooMany(_) => "too_many_subscriptions",
            SubscribeError::UnknownConn => "internal",
        };
        return session.reject(to, id, "subscribe", code, err.to_string());
    }
    let Some(since) = since else {
        session.send(to, protocol::subscribed(&channel, id.as_ref(), None));
        conduit.release_held();
        return;
    };
    let replay = session.node.replay(&channel, since, epoch.as_deref()).await;
    let resumed = Resumed {
        recovered: replay.recovered,
        replayed: replay.events.len(),
        epoch: &replay.epoch,
    };
    session.send(
        to,
        protocol::subscribed(&channel, id.as_ref(), Some(resumed)),
    );
    let key = channel_key(channel.as_str());
    let with_trace = session.node.config().event_trace_id;
    for event in &replay.events {
        if let Ok(json) = protocol::event(event, with_trace) {
            conduit.replay(key, &Outgoing::event(event.seq, json));
        }
    }
    // The held live events follow, without those the replay (or the client) has.
    conduit.release(key, replay.skip_upto);
}

pub(super) fn unsubscribe(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
) {
    if channel.is_broadcast() {
        let message = "every connection receives \"broadcast\"; it cannot be unsubscribed";
        return session.reject(to, id, "unsubscribe", "reserved_channel", message);
    }
    // The hub has the connection's sink leave the channel: nothing of it comes after the reply.
    session.node.unsubscribe(session.conn, &channel);
    session.send(to, protocol::unsubscribed(&channel, id.as_ref()));
}
