//! `publish`: a client's event, through the same acknowledged JetStream path as the HTTP API,
//! or, volatile, straight to the nodes as `POST /v1/channels/{channel}/volatile` does.

use fanout::{Channel, Code, Data};
use metrics::counter;
use serde_json::Value;

use super::state::{ReplyTo, Session};
use crate::{
    protocol::{self, RequestId},
    proxy::{Hook, ProxyError, PublishAnswer, PublishRequest},
};

/// Asks the app's publish hook: the data to publish (the client's, or the hook's instead).
async fn ask(session: &Session, channel: &Channel, data: Data) -> Result<Data, ProxyError> {
    use base64::Engine;
    let (value, encoding) = match data.binary {
        true => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&data.bytes)),
            Some("base64"),
        ),
        false => match serde_json::from_slice(&data.bytes) {
            Ok(value) => (value, None),
            Err(err) => {
                return Err(ProxyError::Unavailable(format!(
                    "the event's data cannot go to the publish hook: {err}"
                )));
            }
        },
    };
    let request = PublishRequest {
        client: session.conn.to_string(),
        user: &session.identity.user,
        channel: channel.as_str(),
        data: value,
        encoding,
    };
    let answer: PublishAnswer = session.node.proxy().call(Hook::Publish, &request).await?;
    Ok(match answer.data {
        Some(replaced) => Data::from(bytes::Bytes::from(
            serde_json::to_vec(&replaced).expect("JSON serializes"),
        )),
        None => data,
    })
}

pub(super) async fn publish(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
    data: fanout::Data,
    volatile: bool,
) {
    let proxy = session.node.proxy();
    let hooked = proxy.has(Hook::Publish);
    let allowed = match hooked {
        // The app's hook decides (fanout's own channels are no one's).
        true => !channel.is_internal(),
        false => session.identity.may_publish(&channel),
    };
    if !allowed {
        let message = format!("your token does not allow publishing to {channel:?}");
        return session.reject(to, id, "publish", Code::Forbidden, message);
    }
    if !session.requests.take() {
        return session.rate_limited(to, id, "publish");
    }
    let data = match hooked {
        true => match ask(session, &channel, data).await {
            Ok(data) => data,
            Err(err) => return session.refuse(to, id, "publish", err),
        },
        false => data,
    };
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

/// A Pusher client event (`client-*`), which the dialect has checked (a private or presence
/// channel the connection is in): stored as any publish, within the same request rate, named,
/// and for every connection but its sender. Nothing answers a success; a refusal is an error
/// frame.
pub(super) async fn client_event(session: &mut Session, channel: Channel, data: Data) {
    if !session.requests.take() {
        return session.rate_limited(ReplyTo::Stream, None, "publish");
    }
    let reported = data.clone();
    match session
        .node
        .publish(&channel, data.excluding(session.conn))
        .await
    {
        Ok(_) => {
            counter!("fanout_ws_client_publishes_total").increment(1);
            session
                .node
                .client_event(&channel, &session.identity.user, &reported);
        }
        Err(err) => session.reject(
            ReplyTo::Stream,
            None,
            "publish",
            Code::BusUnavailable,
            err.to_string(),
        ),
    }
}
