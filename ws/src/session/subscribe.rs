//! `subscribe` and `unsubscribe`, and [`join`], what every transport subscribes with.
//!
//! A subscribe holds the connection's live frames back from the moment it starts until its
//! reply (and, when resuming, the replayed events) is written: `subscribed` comes before any
//! frame of the channel (docs/protocol.md, "Ordering"). When resuming, the node subscribes
//! live first, then replays the stored events after the client's position, then lets the
//! held live events go, without those the replay covered: no gap, no duplicate.

use fanout::{Channel, Code};
use serde_json::value::RawValue;

use super::state::{ReplyTo, Session};
use crate::{
    channel::Replay,
    hub::SubscribeError,
    position::{Position, Spots, channel_key, mark},
    protocol::{self, RequestId, Resumed, Since},
    proxy::{Hook, ProxyError, SubscribeAnswer, SubscribeRequest},
};

/// A `subscribe` request.
#[derive(Debug)]
pub struct Subscribe {
    pub id: Option<RequestId>,
    pub channel: Channel,
    /// Resume: the last seq the client has of the channel (per region, with regions).
    pub since: Option<Since>,
    /// The stream epoch `since` belongs to.
    pub epoch: Option<String>,
    /// Also receive the channel's presence changes.
    pub presence: bool,
    /// Events as fossil deltas, if the channel allows it.
    pub delta: bool,
}

/// Where a joining client resumes from.
#[derive(Debug, Clone)]
pub struct Resume {
    /// A position per region (a region without one is followed from now on).
    pub from: Spots,
    /// The epoch `from` belongs to, if the client knows it.
    pub epoch: Option<String>,
    /// When the client was known to have every event up to `from` (a cursor's time).
    pub at: Option<u64>,
}

/// Why a connection could not join a channel.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// The stream could not be read to replay what the client missed: it is not in the
    /// channel (it can try again), and nothing is said of what it missed.
    #[error("cannot replay from the stream now: {0}")]
    Replay(#[from] fanout::BusError),
    /// The app's subscribe hook did not allow it.
    #[error("{0}")]
    Refused(#[from] ProxyError),
}

/// Asks the app's subscribe hook (when it is on) whether the session may join `channel`:
/// the member's info in it, if the hook gives one. `broadcast` needs no one's leave.
pub(crate) async fn ask(
    session: &Session,
    channel: &Channel,
) -> Result<Option<Box<RawValue>>, ProxyError> {
    let proxy = session.node.proxy();
    if channel.is_broadcast() || !proxy.has(Hook::Subscribe) {
        return Ok(None);
    }
    let request = SubscribeRequest {
        client: session.conn.to_string(),
        user: &session.identity.user,
        channel: channel.as_str(),
        transport: session.conduit.transport(),
        node: session.node.id(),
    };
    let answer: SubscribeAnswer = proxy.call(Hook::Subscribe, &request).await?;
    Ok(answer
        .info
        .filter(|info| !info.is_null())
        .and_then(|info| serde_json::value::to_raw_value(&info).ok()))
}

/// Subscribes the session's connection to `channel` (with `presence`, to its presence
/// changes too), its live frames held back meanwhile. With `resume`, the stored events after
/// the client's position are replayed. `announce` runs once the connection receives the
/// channel, with what a replay found, and writes whatever must come first (a reply); then the
/// replayed events are written, then the held live frames, without those they covered.
pub(crate) async fn join(
    session: &Session,
    channel: &Channel,
    presence: bool,
    info: Option<Box<RawValue>>,
    resume: Option<Resume>,
    announce: impl FnOnce(Option<&Replay>),
) -> Result<(), JoinError> {
    let conduit = &session.conduit;
    let node = &session.node;
    conduit.hold();
    if let Err(err) = node.subscribe(session.conn, channel, presence, info).await {
        conduit.release_held();
        return Err(err.into());
    }
    let key = channel_key(channel.as_str());
    let Some(Resume { from, epoch, at }) = resume else {
        if conduit.tracks_positions() {
            // Its stream follows the channel from now on, and says so in its positions, so
            // that a reconnect replays what it missed even before its first event here.
            match node.now().await {
                Ok(now) => {
                    for position in now {
                        conduit.position(key, position);
                    }
                }
                Err(err) => tracing::warn!(%channel, %err, "cannot read the stream's sequence"),
            }
        }
        announce(None);
        conduit.release_held();
        return Ok(());
    };
    let replay = match node.replay(channel, &from, epoch.as_deref(), at).await {
        Ok(replay) => replay,
        Err(err) => {
            // Out again, the held frames of the channel dropped with it.
            node.unsubscribe(session.conn, channel);
            conduit.release_held();
            return Err(err.into());
        }
    };
    if conduit.tracks_positions() {
        // Once a stream has been told that history no longer reaches back, it follows the
        // channel from now on: the next resume is not told so again.
        let from = match replay.recovered {
            true => Some(from),
            false => node.now().await.ok(),
        };
        for position in from.into_iter().flatten() {
            conduit.position(key, position);
        }
    }
    announce(Some(&replay));
    for event in &replay.events {
        conduit.replay(key, event);
    }
    // The held live events follow, without those the replay (or the client) has.
    conduit.release(key, &replay.skip_upto);
    Ok(())
}

/// The `subscribed` reply, with what a replay found.
pub(crate) fn subscribed(
    channel: &Channel,
    id: Option<&RequestId>,
    replay: Option<&Replay>,
) -> String {
    let resumed = replay.map(|replay| Resumed {
        recovered: replay.recovered,
        replayed: replay.events.len(),
        epoch: &replay.epoch,
    });
    protocol::subscribed(channel, id, resumed)
}

pub(super) async fn subscribe(session: &mut Session, to: ReplyTo, request: Subscribe) {
    let Subscribe {
        id,
        channel,
        since,
        epoch,
        presence,
        delta,
    } = request;
    let hooked = session.node.proxy().has(Hook::Subscribe);
    let allowed = match hooked {
        // The app's hook decides (fanout's own channels are no one's).
        true => channel.is_broadcast() || !channel.is_internal(),
        false => session.identity.may_subscribe(&channel),
    };
    if !allowed {
        let message = format!("your token does not allow subscribing to {channel:?}");
        return session.reject(to, id, "subscribe", Code::Forbidden, message);
    }
    if presence && channel.is_broadcast() {
        let message = "\"broadcast\" reaches every connection; it has no presence";
        return session.reject(to, id, "subscribe", Code::ReservedChannel, message);
    }
    let from = match since.map(|since| positions(session, since)).transpose() {
        Ok(from) => from,
        Err(message) => return session.reject(to, id, "subscribe", Code::InvalidRequest, message),
    };
    let resume = from.map(|from| Resume {
        from,
        epoch,
        at: None,
    });
    let info = match ask(session, &channel).await {
        Ok(info) => info,
        Err(err) => return session.refuse(to, id, "subscribe", err),
    };
    // Deltas where the channel keeps them and the transport can take them: set before the
    // join, so that the channel's first frame already counts. The reply says whether.
    let delta = delta
        && session.node.deltas_allowed(&channel)
        && session.conduit.delta(channel_key(channel.as_str()));
    let mut to = Some(to);
    let joined = join(session, &channel, presence, info, resume, |replay| {
        let to = to.take().expect("announced once");
        let mut reply = subscribed(&channel, id.as_ref(), replay);
        if delta && reply.ends_with('}') {
            reply.truncate(reply.len() - 1);
            reply.push_str(r#","delta":"fossil"}"#);
        }
        session.send(to, reply);
    })
    .await;
    if let Err(err) = joined {
        let code = match err {
            JoinError::Subscribe(SubscribeError::TooMany(_)) => Code::TooManySubscriptions,
            JoinError::Subscribe(SubscribeError::UnknownConn) => Code::Internal,
            JoinError::Replay(_) => Code::BusUnavailable,
            JoinError::Refused(_) => Code::Forbidden,
        };
        let to = to.expect("not announced on failure");
        session.reject(to, id, "subscribe", code, err.to_string());
    }
}

/// A `since` as positions: a number with one region, an object of seqs by region with
/// regions (a region it does not name is followed from now on).
fn positions(session: &Session, since: Since) -> Result<Spots, String> {
    let bus = session.node.bus();
    match since {
        Since::Seq(seq) if bus.topology().regions().is_empty() => {
            Ok([Position::Event(mark::pack(0, seq))].into())
        }
        Since::Seq(_) => Err(format!(
            "this tier has regions ({}): \"since\" must be an object of seqs by region, e.g. {{\"{}\": 41}}",
            bus.topology().regions().join(","),
            bus.topology().regions()[0],
        )),
        Since::Regions(_) if bus.topology().regions().is_empty() => {
            Err("this tier has one region: \"since\" must be a number (a seq)".into())
        }
        Since::Regions(seqs) => seqs
            .into_iter()
            .map(|(region, seq)| match bus.topology().index(&region) {
                Some(index) => Ok(Position::Event(mark::pack(index, seq))),
                None => Err(format!(
                    "\"since\" names region {region:?}, which is not one of this tier's ({})",
                    bus.topology().regions().join(",")
                )),
            })
            .collect(),
    }
}

pub(super) fn unsubscribe(
    session: &mut Session,
    to: ReplyTo,
    id: Option<RequestId>,
    channel: Channel,
) {
    if channel.is_broadcast() {
        let message = "every connection receives \"broadcast\"; it cannot be unsubscribed";
        return session.reject(to, id, "unsubscribe", Code::ReservedChannel, message);
    }
    // The hub has the connection's sink leave the channel: nothing of it comes after the reply.
    session.node.unsubscribe(session.conn, &channel);
    session.send(to, protocol::unsubscribed(&channel, id.as_ref()));
}
