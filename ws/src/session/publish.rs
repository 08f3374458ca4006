//! `publish`: a client's event, through the same acknowledged JetStream path as the HTTP API,
//! or, volatile, straight to the nodes as `POST /v1/channels/{channel}/volatile` does.

use fanout::{Channel, Code};
use metrics::counter;

use super::state::{ReplyTo, Session};
use crate::protocol::{self, RequestId};

pub(super) async fn publish(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
    data: fanout::Data,
    volatile: bool,
) {
    if !session.identity.may_publish(&channel) {
        let message = format!("your token does not allow publishing to {channel:?}");
        return session.reject(to, id, "publish", Code::Forbidden, message);
    }
    if !session.requests.take() {
        return session.rate_limited(to, id, "publish");
    }
    let region = session.node.bus().topology().region().cloned();
    let reported = data.clone();
    let published = if volatile {
        session
            .node
            .bus()
            .publish_volatile(&channel, data)
            .await
            .map(|event| (None, event))
    } else {
        session
            .node
            .publish(&channel, data)
            .await
            .map(|published| (Some(published.seq), published.id))
    };
    match published {
        Ok((seq, event)) => {
            counter!("fanout_ws_client_publishes_total").increment(1);
            session
                .node
                .client_event(&channel, &session.identity.user, &reported);
            let reply = protocol::published(&channel, seq, region.as_deref(), &event, id.as_ref());
            session.send(to, reply);
        }
        Err(err) => session.reject(to, id, "publish", Code::BusUnavailable, err.to_string()),
    }
}
