//! `publish`: a client's event, through the same acknowledged JetStream path as the HTTP API.

use fanout::{Channel, Code};
use metrics::counter;
use serde_json::Value;

use super::state::{ReplyTo, Session};
use crate::protocol::{self, RequestId};

pub(super) async fn publish(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
    data: Value,
) {
    if !session.identity.may_publish(&channel) {
        let message = format!("your token does not allow publishing to {channel:?}");
        return session.reject(to, id, "publish", Code::Forbidden, message);
    }
    if !session.requests.take() {
        return session.rate_limited(to, id, "publish");
    }
    let data = serde_json::to_vec(&data).expect("a JSON value serializes");
    match session.node.publish(&channel, data.into()).await {
        Ok(published) => {
            counter!("fanout_ws_client_publishes_total").increment(1);
            let reply = protocol::published(
                &channel,
                published.seq,
                session.node.bus().topology().region().map(|r| &**r),
                &published.id,
                id.as_ref(),
            );
            session.send(to, reply);
        }
        Err(err) => session.reject(to, id, "publish", Code::BusUnavailable, err.to_string()),
    }
}
