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

use std::{collections::HashSet, net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use fanout::{Channel, Code, time::now_ms};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    admit::{Admitted, Refusal, admit},
    connection::{self, Connection, End, Start, Transport, connection_span},
    http::{Taken, Takeover},
    http_session::{self, Sessions},
};
use crate::{
    auth::Identity,
    cursor::{Cursor, Positions},
    disconnect,
    hub::ConnId,
    node::Node,
    position::{ChannelKey, Position, Spots},
    session::{ReplyTo, Resume},
    sink::{Conduit, Framing, Outbox, Outgoing, Parts},
};

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
    const TRANSPORT: &'static str = "sse";

    /// The part of an SSE event that every stream shares: its `event:` and `data:` lines
    /// (the `id:` line and the blank line that ends the event are the stream's own).
    fn shared(&self, frame: &Outgoing) -> Bytes {
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
            Err(err) => {
                return bad(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidCursor,
                    err.to_string(),
                );
            }
        },
    };
    let mut wanted: Vec<Channel> = Vec::new();
    for name in named {
        match Channel::parse(name) {
            Ok(channel) => wanted.push(channel),
            Err(err) => {
                let message = format!("channel {name:?}: {err}");
                return bad(StatusCode::BAD_REQUEST, Code::InvalidChannel, message);
            }
        }
    }
    if let Some(cursor) = cursor.as_ref().filter(|_| with_cursor_channels) {
        wanted.extend(cursor.positions.keys().cloned());
    }
    let mut seen = HashSet::new();
    wanted.retain(|channel| !channel.is_broadcast() && seen.insert(channel.clone()));
    // With the app's subscribe hook on, the hook decides as the stream joins each.
    let hooked = node.proxy().has(crate::proxy::Hook::Subscribe);
    for channel in &wanted {
        let allowed = match hooked {
            true => !channel.is_internal(),
            false => identity.may_subscribe(channel),
        };
        if !allowed {
            let message = format!("your token does not allow subscribing to {channel:?}");
            return bad(StatusCode::FORBIDDEN, Code::Forbidden, message);
        }
    }
    let limit = node.config().max_subscriptions;
    if wanted.len() > limit {
        let message = format!(
            "{} channels; a stream may follow at most {limit} (FANOUT_MAX_SUBSCRIPTIONS)",
            wanted.len()
        );
        return bad(StatusCode::BAD_REQUEST, Code::TooManySubscriptions, message);
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
        "sse",
    )
    .await
    {
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
            Code::BusUnavailable,
            "this node has not reached the stream yet: try again",
        )
        .into_response();
    }
    let Some(takeover) = request.extensions().get::<Takeover>() else {
        return Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Internal,
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

/// A stream's life on the node, from the socket hyper handed over.
async fn serve(
    taken: Taken,
    node: Arc<Node>,
    sessions: Sessions,
    conn: ConnId,
    identity: Identity,
    channels: Vec<(Channel, Option<Resume>)>,
) {
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
    let connection = Connection::open(node, conn, identity, stream, framing);
    let secret = http_session::secret();
    let requests = sessions.insert(conn, &secret);
    let transport = Events {
        channels: Some(channels),
        requests,
    };
    connection.run(transport, Some(&secret)).await;
    sessions.remove(&conn);
}

/// The SSE transport's own part of a connection: its channels joined after `welcome`, its
/// session requests (`POST /session/{conn}`), the heartbeat that carries its cursor, the
/// `disconnect` event.
struct Events {
    /// Joined at the start.
    channels: Option<Vec<Start>>,
    requests: Arc<http_session::Inbox>,
}

/// What a stream's task wakes up for besides its own events.
enum Input {
    Request(http_session::Request),
    Readable(std::io::Result<()>),
}

impl Transport for Events {
    type Framing = Sse;
    type Input = Input;

    /// The stream's channels, resumed where the cursor says.
    async fn start(&mut self, conn: &mut Connection<Sse>) -> Result<(), End> {
        let channels = self.channels.take().unwrap_or_default();
        let outbox = conn.outbox.clone();
        let joined = conn
            .join_all(channels, |channel, recovered, replayed| {
                let resumed = connection::resumed(channel, recovered, replayed);
                outbox.send("resumed", &resumed.to_string());
            })
            .await;
        match joined {
            Ok(()) => Ok(()),
            // Closed, so that the client comes back with the same cursor: nothing it missed is
            // skipped.
            Err(err) => {
                tracing::warn!(%err, "cannot resume a stream's channel");
                Err(End::Close(disconnect::UNAVAILABLE))
            }
        }
    }

    async fn input(&mut self, outbox: &Outbox<Sse>) -> Input {
        let Some(stream) = outbox.stream() else {
            return Input::Readable(Err(std::io::ErrorKind::NotConnected.into()));
        };
        tokio::select! {
            request = self.requests.next() => Input::Request(request),
            readable = stream.readable() => Input::Readable(readable),
        }
    }

    async fn act(&mut self, input: Input, conn: &mut Connection<Sse>) -> Result<(), End> {
        match input {
            Input::Request((text, reply)) => {
                Box::pin(conn.session.handle(&text, ReplyTo::Caller(reply))).await;
                Ok(())
            }
            Input::Readable(Err(_)) => Err(End::Gone),
            // A client sends nothing on an event stream; whatever comes is dropped, and the end
            // of what it sends is the end of the stream.
            Input::Readable(Ok(())) => {
                let Some(stream) = conn.outbox.stream() else {
                    return Err(End::Gone);
                };
                let mut chunk = [0u8; 1024];
                match stream.try_read(&mut chunk) {
                    Ok(0) => Err(End::Gone),
                    Ok(_) => Ok(()),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                    Err(_) => Err(End::Gone),
                }
            }
        }
    }

    /// A comment line: keeps proxies from timing the stream out, and finds a dead client by
    /// the write failing. Its id vouches for the positions only while this node receives
    /// events (so: while NATS is connected).
    fn heartbeat(&mut self, conn: &Connection<Sse>) -> Result<(), End> {
        let vouch = conn.node.bus().is_connected();
        conn.outbox.send_framed(|sse| sse.heartbeat(vouch));
        Ok(())
    }

    fn goodbye(&self, end: &End, outbox: &Outbox<Sse>) {
        if let End::Close(disconnect) = end {
            let data = disconnect.json().to_string();
            outbox.send("disconnect", &data);
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
        sse.write(maths, 41, sse.shared(&frame), &mut parts);
        assert_eq!(
            sse.shared(&frame).as_ptr(),
            sse.shared(&frame).as_ptr(),
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
