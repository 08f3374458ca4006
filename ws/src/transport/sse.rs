//! Server-sent events: `GET /sse`, one event stream per client over plain HTTP, for networks
//! that break WebSocket upgrades and for clients that only speak HTTP (curl, scripts,
//! server-side consumers). The same protocol: `welcome`, each `event` frame as an SSE event,
//! presence changes, `resumed` per channel, `disconnect` before the node closes the stream;
//! requests go the other way as `POST /session/{conn}` ([`super::http_session`]).
//!
//! Every event carries `id: <cursor>`, where the stream is on every channel so far
//! ([`Cursor`]): a reconnect to any node with `Last-Event-ID` (what `EventSource` sends by
//! itself) or `?last_event_id=` replays what was missed on each channel, then goes live.
//!
//! The stream is written like a WebSocket: hyper answers the request head (`HTTP/1.0 200`,
//! a body delimited by the connection's end) and hands the socket over; fan-out then writes
//! events straight into it ([`Outbox`] with the [`Sse`] framing), so an idle stream costs
//! what an idle WebSocket does.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ConnectInfo, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use fanout::{Channel, time::now_ms};
use metrics::counter;
use serde_json::json;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    admit::{Admitted, Refusal, admit},
    connection::connection_span,
    http::{Taken, Takeover},
    http_session::{self, Sessions},
};
use crate::{
    auth::Identity,
    cursor::{Cursor, Positions},
    disconnect::{self, Disconnect},
    hub::{ConnId, Profile},
    node::Node,
    position::{ChannelKey, Position, Spots},
    protocol,
    session::{self, JoinError, ReplyTo, Resume, Session},
    sink::{Bounds, Conduit, Framing, Kick, Outbox, Outgoing, Parts, Sink},
};

/// How long the closing `disconnect` event may take to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// SSE framing: each frame is an event (`event:` and `data:` lines, shared by every stream),
/// and each `event` frame also carries `id: <cursor>`, the stream's position on every channel,
/// this stream's own.
#[derive(Debug)]
pub struct Sse {
    positions: Positions,
}

impl Sse {
    /// A stream in `epoch` on `channels`, each from where it starts (`broadcast` among them:
    /// every connection gets it). Every position is there before the first event is written,
    /// so that every id names every channel.
    pub fn new(epoch: String, channels: &[(Channel, Spots)], regions: &[Arc<str>]) -> Sse {
        Sse {
            positions: Positions::new(epoch, channels, regions),
        }
    }
}

impl Sse {
    /// A heartbeat: a comment line, and, when `vouch`, an `id:` with the stream's cursor,
    /// renewing its time (browsers take the id without dispatching an event): a client that
    /// was connected but saw no event for a while still resumes as within the window.
    pub fn heartbeat(&mut self, vouch: bool) -> Bytes {
        if !vouch {
            return Bytes::from_static(b":\n\n");
        }
        let cursor = self.positions.encode(now_ms());
        Bytes::from(format!(":\nid: {cursor}\n\n"))
    }
}

/// `event: <name>\ndata: <json>\n` (the JSON has no newline: one `data:` line).
pub fn fields(name: &str, json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(json.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n");
    out.freeze()
}

/// Its slot in [`Outgoing::framed`].
const SLOT: usize = 1;

/// The blank line that ends an SSE event.
static END: Bytes = Bytes::from_static(b"\n");

impl Framing for Sse {
    const TRACKS_POSITIONS: bool = true;

    /// The part of an SSE event that every stream shares: its `event:` and `data:` lines
    /// (the `id:` line and the blank line that ends the event are the stream's own).
    fn shared(frame: &Outgoing) -> Bytes {
        frame.framed(SLOT, fields).clone()
    }

    fn write(&mut self, key: ChannelKey, seq: u64, shared: Bytes, out: &mut Parts) {
        out.push(shared);
        if seq == 0 {
            out.push(END.clone());
            return;
        }
        self.positions.advance(key, seq);
        let mut id = BytesMut::with_capacity(64);
        id.extend_from_slice(b"id: ");
        id.extend_from_slice(self.positions.encode(now_ms()).as_bytes());
        id.extend_from_slice(b"\n\n");
        out.push(id.freeze());
    }

    fn own(&mut self, name: &str, json: &str) -> Bytes {
        let mut out = BytesMut::from(&fields(name, json.as_bytes())[..]);
        out.extend_from_slice(b"\n");
        out.freeze()
    }

    fn enter(&mut self, key: ChannelKey, name: &str) {
        self.positions.enter(key, name);
    }

    fn leave(&mut self, key: ChannelKey) {
        self.positions.leave(key);
    }

    fn position(&mut self, key: ChannelKey, position: Position) {
        self.positions.set(key, position);
    }
}

/// What a stream's query asks for.
#[derive(Debug, Default)]
pub(crate) struct Query {
    pub channels: Vec<String>,
    pub user: Option<String>,
    pub token: Option<String>,
    pub last_event_id: Option<String>,
    pub cursor: Option<String>,
    pub timeout: Option<String>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        let mut query = Query::default();
        for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let value = value.into_owned();
            match &*key {
                "channel" => query.channels.push(value),
                "user" => query.user = Some(value),
                "token" => query.token = Some(value),
                "last_event_id" => query.last_event_id = Some(value),
                "cursor" => query.cursor = Some(value),
                "timeout" => query.timeout = Some(value),
                _ => {}
            }
        }
        query
    }
}

/// The channels a stream follows and where it resumes each: `broadcast` first, those its
/// query names, and (`with_cursor_channels`) those its cursor carries (channels subscribed
/// later, through `POST /session`, come back on a reconnect that way). Checked as a
/// subscribe would be.
pub(crate) fn channels(
    node: &Node,
    identity: &Identity,
    named: &[String],
    cursor: Option<&str>,
    with_cursor_channels: bool,
) -> Result<Vec<(Channel, Option<Resume>)>, Refusal> {
    let bad = |status, code, message: String| Err(Refusal::new(status, code, message));
    let cursor = match cursor.filter(|c| !c.trim().is_empty()) {
        None => None,
        Some(text) => match Cursor::decode(text, node.bus().topology().regions()) {
            Ok(cursor) => Some(cursor),
            Err(err) => return bad(StatusCode::BAD_REQUEST, "invalid_cursor", err.to_string()),
        },
    };
    let mut wanted: Vec<Channel> = Vec::new();
    for name in named {
        match Channel::parse(name) {
            Ok(channel) => wanted.push(channel),
            Err(err) => {
                let message = format!("channel {name:?}: {err}");
                return bad(StatusCode::BAD_REQUEST, "invalid_channel", message);
            }
        }
    }
    if let Some(cursor) = cursor.as_ref().filter(|_| with_cursor_channels) {
        wanted.extend(cursor.positions.keys().cloned());
    }
    let mut seen = HashSet::new();
    wanted.retain(|channel| !channel.is_broadcast() && seen.insert(channel.clone()));
    for channel in &wanted {
        if !identity.may_subscribe(channel) {
            let message = format!("your token does not allow subscribing to {channel:?}");
            return bad(StatusCode::FORBIDDEN, "forbidden", message);
        }
    }
    let limit = node.config().max_subscriptions;
    if wanted.len() > limit {
        let message = format!(
            "{} channels; a stream may follow at most {limit} (FANOUT_MAX_SUBSCRIPTIONS)",
            wanted.len()
        );
        return bad(StatusCode::BAD_REQUEST, "too_many_subscriptions", message);
    }
    Ok(std::iter::once(Channel::broadcast())
        .chain(wanted)
        .map(|channel| {
            let resume = cursor.as_ref().and_then(|cursor| {
                Some(Resume {
                    from: cursor.positions.get(&channel)?.clone(),
                    epoch: Some(cursor.epoch.clone()),
                    at: Some(cursor.at),
                })
            });
            (channel, resume)
        })
        .collect())
}

pub(crate) async fn stream(
    State(node): State<Arc<Node>>,
    State(sockets): State<TaskTracker>,
    State(sessions): State<Sessions>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    request: Request,
) -> Response {
    let query = Query::parse(raw.as_deref());
    let Admitted { identity, permit } = match admit(
        &node,
        peer,
        &headers,
        query.token.as_deref(),
        query.user.as_deref(),
    ) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    // What `EventSource` sends by itself wins over what the URL was opened with.
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(query.last_event_id);
    let channels = match channels(
        &node,
        &identity,
        &query.channels,
        last_event_id.as_deref(),
        true,
    ) {
        Ok(channels) => channels,
        Err(refusal) => return refusal.into_response(),
    };
    // Positions count in one epoch: a node that has not read the stream yet cannot write
    // (or judge) a cursor.
    if node.known_epoch().await.is_none() {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            "this node has not reached the stream yet: try again",
        )
        .into_response();
    }
    let Some(takeover) = request.extensions().get::<Takeover>() else {
        return Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "this connection cannot be streamed",
        )
        .into_response();
    };
    let socket = takeover.claim();
    let conn = Uuid::new_v4();
    let span = connection_span(&node, &conn, &identity.user);
    tokio::spawn(
        sockets.track_future(
            async move {
                if let Ok(taken) = socket.await {
                    serve(taken, node, sessions, conn, identity, channels).await;
                }
                drop(permit);
            }
            .instrument(span),
        ),
    );
    // An HTTP/1.0 answer: its body runs until the connection closes, so hyper writes the
    // head, ends its part, and hands the socket over; the events that follow are ours.
    let mut response = Response::new(Body::from_stream(futures_util::stream::empty::<
        Result<Bytes, std::io::Error>,
    >()));
    *response.version_mut() = Version::HTTP_10;
    let head = response.headers_mut();
    head.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    head.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    head.insert(header::CONNECTION, HeaderValue::from_static("close"));
    // Proxies that buffer responses (nginx) pass this one through as it comes.
    head.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// Where a stream starts on one of its channels.
#[derive(Debug)]
pub(crate) struct Start {
    pub channel: Channel,
    /// Where it resumes: the cursor's position, else "now" (the stream's last sequence when
    /// it opened), so that nothing published between opening and subscribing is missed.
    pub resume: Option<Resume>,
    /// The cursor had a position for it: a `resumed` event says what came of it.
    pub resuming: bool,
}

/// Where a stream starts on each channel (one look at the stream's sequence, for the
/// channels the cursor does not cover).
pub(crate) async fn starts(node: &Node, channels: Vec<(Channel, Option<Resume>)>) -> Vec<Start> {
    let now = if channels.iter().any(|(_, resume)| resume.is_none()) {
        match node.now().await {
            Ok(now) => Some(now),
            Err(err) => {
                tracing::warn!(%err, "cannot read the stream's sequence: new channels start live");
                None
            }
        }
    } else {
        None
    };
    let epoch = node.epoch();
    channels
        .into_iter()
        .map(|(channel, resume)| {
            let resuming = resume.is_some();
            let resume = resume.or_else(|| {
                Some(Resume {
                    from: now.clone()?,
                    epoch: Some(epoch.clone()),
                    at: Some(now_ms()),
                })
            });
            Start {
                channel,
                resume,
                resuming,
            }
        })
        .collect()
}

/// How a stream ended.
#[derive(Debug)]
enum End {
    /// The socket failed or the client went away.
    Gone,
    /// The node closes it, saying why.
    Close(Disconnect),
}

/// A stream's life on the node, from the socket hyper handed over.
async fn serve(
    taken: Taken,
    node: Arc<Node>,
    sessions: Sessions,
    conn: ConnId,
    identity: Identity,
    channels: Vec<(Channel, Option<Resume>)>,
) {
    let config = node.config();
    let kick = Kick::new(node.closing_token().child_token());
    let bounds = Bounds {
        frames: config.queue_capacity,
        bytes: config.queue_max_bytes,
    };
    let Taken { stream, read_ahead } = taken;
    drop(read_ahead); // a client sends nothing on an event stream
    // Boxed, as every rare step's future: an idle stream's task keeps only the loop's state.
    let channels = Box::pin(starts(&node, channels)).await;
    let positions: Vec<_> = channels
        .iter()
        .map(|start| {
            let from = start.resume.as_ref().map(|r| r.from.clone());
            (start.channel.clone(), from.unwrap_or_default())
        })
        .collect();
    let framing = Sse::new(node.epoch(), &positions, node.bus().topology().regions());
    let outbox =
        Arc::new(Outbox::new(stream, framing, kick, bounds).charged(node.budget().charge()));
    let profile = Profile {
        user: identity.user.as_str().into(),
        info: identity
            .info
            .as_ref()
            .and_then(|info| serde_json::value::to_raw_value(info).ok()),
    };
    node.hub().add_conn(conn, outbox.clone(), profile);
    counter!("fanout_ws_connections_opened_total").increment(1);
    let secret = http_session::secret();
    let requests = sessions.insert(conn, &secret);
    let mut session = Session::new(conn, node.clone(), outbox.clone(), identity);
    let end = run(&outbox, &node, &mut session, channels, &secret, &requests).await;
    sessions.remove(&conn);
    node.hub().remove_conn(conn);
    let reason = match &end {
        End::Gone => "client",
        End::Close(disconnect) => disconnect.name,
    };
    counter!("fanout_ws_connections_closed_total", "reason" => reason).increment(1);
    if let End::Close(disconnect) = end {
        let data = json!({"code": disconnect.code, "reason": disconnect.reason}).to_string();
        outbox.send("disconnect", &data);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, outbox.flush()).await;
    }
    if let Some(stream) = outbox.stream() {
        let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
    }
}

/// Waits until what was sent is written, unless the stream is cut off first.
async fn written(outbox: &Outbox<Sse>) -> Result<(), End> {
    if outbox.is_written() {
        return Ok(());
    }
    Box::pin(flush(outbox)).await
}

async fn flush(outbox: &Outbox<Sse>) -> Result<(), End> {
    let kick = outbox.kick();
    tokio::select! {
        biased;
        written = outbox.flush() => written.map_err(|_| End::Gone),
        _ = kick.token().cancelled() => Err(End::Close(kick.reason())),
    }
}

/// What woke a stream's task.
enum Wake {
    Kicked,
    Expired,
    Backlog,
    Readable(std::io::Result<()>),
    Request(http_session::Request),
    Tick,
}

/// The stream's life: welcome, its channels (resumed where the cursor says), then requests
/// and heartbeats until one side ends it. Events do not pass through here: fan-out writes
/// them.
async fn run(
    outbox: &Arc<Outbox<Sse>>,
    node: &Arc<Node>,
    session: &mut Session,
    channels: Vec<Start>,
    secret: &str,
    requests: &http_session::Inbox,
) -> End {
    let config = node.config();
    let kick = outbox.kick().clone();
    let Some(stream) = outbox.stream() else {
        return End::Gone;
    };
    let welcome = protocol::welcome(&protocol::Welcome {
        node: node.id(),
        conn: &session.conn().to_string(),
        user: &session.identity().user,
        heartbeat: config.heartbeat_secs,
        epoch: &node.epoch(),
        region: node.bus().topology().region().map(|r| &**r),
        session: Some(secret),
    });
    outbox.send("welcome", &welcome);
    for Start {
        channel,
        resume,
        resuming,
    } in channels
    {
        let joined = Box::pin(session.join(&channel, resume, |replay| {
            if let Some(replay) = replay.filter(|_| resuming) {
                let resumed = json!({
                    "channel": channel,
                    "recovered": replay.recovered,
                    "replayed": replay.events.len(),
                });
                outbox.send("resumed", &resumed.to_string());
            }
        }))
        .await;
        match joined {
            Ok(()) => {}
            // Closed, so that the client comes back with the same cursor: nothing it missed is
            // skipped.
            Err(JoinError::Replay(err)) => {
                tracing::warn!(%channel, %err, "cannot resume a stream's channel");
                return End::Close(disconnect::UNAVAILABLE);
            }
            Err(err) => tracing::warn!(%channel, %err, "cannot follow a stream's channel"),
        }
    }
    if let Err(end) = written(outbox).await {
        return end;
    }
    let heartbeat = config.heartbeat();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cancelled = kick.token().cancelled();
    tokio::pin!(cancelled);
    let mut expires_at = session.identity().expires_at;
    let mut expiry = expires_at.map(|at| Box::pin(tokio::time::sleep_until(session::deadline(at))));
    loop {
        let wake = tokio::select! {
            biased;
            _ = &mut cancelled => Wake::Kicked,
            _ = async { expiry.as_mut().unwrap().await }, if expiry.is_some() => Wake::Expired,
            _ = outbox.waiting() => Wake::Backlog,
            request = requests.next() => Wake::Request(request),
            readable = stream.readable() => Wake::Readable(readable),
            _ = ticker.tick() => Wake::Tick,
        };
        let step = match wake {
            Wake::Kicked => Err(End::Close(kick.reason())),
            Wake::Expired => Err(End::Close(disconnect::TOKEN_EXPIRED)),
            Wake::Backlog => Box::pin(flush(outbox)).await,
            Wake::Request((text, reply)) => {
                Box::pin(session.handle(&text, ReplyTo::Caller(reply))).await;
                if session.identity().expires_at != expires_at {
                    expires_at = session.identity().expires_at;
                    expiry = expires_at
                        .map(|at| Box::pin(tokio::time::sleep_until(session::deadline(at))));
                }
                Ok(())
            }
            Wake::Readable(Err(_)) => Err(End::Gone),
            // A client sends nothing on an event stream; whatever comes is dropped, and the end
            // of what it sends is the end of the stream.
            Wake::Readable(Ok(())) => {
                let mut chunk = [0u8; 1024];
                match stream.try_read(&mut chunk) {
                    Ok(0) => Err(End::Gone),
                    Ok(_) => Ok(()),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                    Err(_) => Err(End::Gone),
                }
            }
            Wake::Tick => {
                // A comment line: keeps proxies from timing the stream out, and finds a dead
                // client by the write failing. Its id vouches for the positions only while
                // this node receives events (so: while NATS is connected).
                let vouch = node.bus().is_connected();
                outbox.send_framed(|sse| sse.heartbeat(vouch));
                written(outbox).await
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_streams_cursor() {
        let ch = |name| Channel::parse(name).unwrap();
        let mut sse = Sse::new(
            "e1".into(),
            &[(ch("art"), [Position::After(40)].into())],
            &[],
        );
        let (maths, art) = (
            crate::position::channel_key("maths"),
            crate::position::channel_key("art"),
        );
        sse.enter(maths, "maths");
        sse.enter(art, "art"); // already in: keeps its position
        let frame = Outgoing::event(41, r#"{"op":"event"}"#);
        let mut parts = Parts::new();
        sse.write(maths, 41, Sse::shared(&frame), &mut parts);
        assert_eq!(
            Sse::shared(&frame).as_ptr(),
            Sse::shared(&frame).as_ptr(),
            "the fields are made once for every stream"
        );
        let text: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
        let text = String::from_utf8(text).unwrap();
        let (fields, id) = text.split_once("id: ").unwrap();
        assert_eq!(fields, "event: event\ndata: {\"op\":\"event\"}\n");
        let cursor = Cursor::decode(id.trim_end(), &[] as &[&str]).unwrap();
        assert!(id.ends_with("\n\n"));
        assert_eq!(cursor.epoch, "e1");
        assert_eq!(
            cursor.positions.into_iter().collect::<Vec<_>>(),
            [
                (Channel::parse("art").unwrap(), [Position::After(40)].into()),
                (
                    Channel::parse("maths").unwrap(),
                    [Position::Event(41)].into()
                ),
            ]
        );
        let mut parts = Parts::new();
        sse.write(
            maths,
            0,
            Bytes::from_static(b"event: join\ndata: {}\n"),
            &mut parts,
        );
        assert_eq!(&parts[1][..], b"\n", "presence changes carry no id");
        assert_eq!(
            &sse.own("welcome", "{}")[..],
            b"event: welcome\ndata: {}\n\n"
        );
    }
}
