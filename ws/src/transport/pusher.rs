//! The Pusher protocol as a dialect over the WebSocket transport (`GET /app/{key}`), for
//! pusher-js and Laravel Echo: public, private and presence channels (members across nodes,
//! by user: the member's info is Pusher's `{user_id, user_info}`, as the app signed it),
//! client events (`client-*` on the private and presence channels it signed into, within the
//! publish rate, never echoed), events that leave a `socket_id` out, the user sign-in
//! (`pusher:signin`, then `#server-to-user-<id>`), pings, and Pusher's close codes.
//!
//! Its requests are translated into the session's (a `pusher:subscribe` is a `subscribe`,
//! once a private channel's signature holds), and what the node sends is framed Pusher's way:
//! an event is `{"event","channel","data"}` (`data` a string: a JSON string as is, any other
//! JSON as its text), made once per event for every Pusher connection; what differs per
//! connection (left out, a member's first or last connection, an app's prefix) is decided as
//! each connection writes it ([`WebSocketPusher`]).
//!
//! Beyond the dialect it needs of the rest: an event's name and the connection it leaves out
//! (`Fanout-Event`, `Fanout-Exclude` on the NATS message, [`crate::sink::Outgoing::exclude`]),
//! [`crate::session::Session::join_as`], `client_event` and `sign_in` (a member's info that
//! is not the token's, a publish that is not the token's to allow, a user that is not the
//! token's), and [`crate::hub::Conns::set_user`].

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
};

use axum::{
    extract::{ConnectInfo, Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use fanout::{
    Code,
    pusher::{App, socket_id},
};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{
    admit::{error, gate},
    connection::{Connection, End},
    frame::{Incoming, OP_TEXT},
    http::Takeover,
    websocket::{
        Compressing, Dialect, OverSocket, Socket, accept_key, close, compression, handshake, pong,
        text, text_bytes,
    },
};
use crate::{
    auth::{Identity, Patterns},
    node::Node,
    position::{ChannelKey, channel_key},
    session::ReplyTo,
    sink::{Conduit, Framing, Outgoing, Parts},
};

/// Pusher framing: each frame one text frame in Pusher's shape. An event's frame is made once
/// for every Pusher connection; what differs between connections is decided as each writes
/// it: whether the event leaves it out (`socket_id`), whether a member's connection coming or
/// going adds or removes a user, and, for an app with a prefix, the channel's name.
#[derive(Debug)]
pub struct WebSocketPusher {
    conn: Uuid,
    /// The app's channel prefix (empty: none).
    prefix: Arc<str>,
    /// permessage-deflate, when negotiated (and the app has no prefix: a prefixed app's
    /// frames are made again per connection, and go uncompressed).
    compressing: Option<Compressing>,
    /// Its presence channels' members.
    rooms: Vec<Room>,
}

/// A presence channel's members as one connection knows them: each member connection's
/// user, so that a user is added with their first connection and removed with their last
/// (Pusher's members are users).
#[derive(Debug)]
struct Room {
    key: ChannelKey,
    conns: HashMap<Box<str>, Box<str>>,
    /// Until the channel's members arrive (the subscription's answer): what changed
    /// meanwhile, which the answer may or may not have seen.
    waiting: Option<Waiting>,
}

#[derive(Debug, Default)]
struct Waiting {
    left: Vec<Box<str>>,
    infos: HashMap<Box<str>, Value>,
}

/// A shared frame that a connection acts on before writing it (a WebSocket text frame starts
/// with 0x81, never with these): `EXCLUDE`, a 16-byte connection id, the frame.
const EXCLUDE: u8 = 0x01;
/// `MEMBER`, then fanout's `join` or `leave` JSON.
const MEMBER: u8 = 0x02;

/// The name of the frame that carries a presence channel's members to the framing.
const MEMBERS: &str = "pusher_members";

impl WebSocketPusher {
    /// Its slots in [`Outgoing::framed`]: plain, compressed.
    const SLOT: usize = 5;
    const DEFLATE_SLOT: usize = 8;

    pub(crate) fn new(
        conn: Uuid,
        prefix: &str,
        compressing: Option<Compressing>,
    ) -> WebSocketPusher {
        WebSocketPusher {
            conn,
            prefix: prefix.into(),
            compressing: compressing.filter(|_| prefix.is_empty()),
            rooms: Vec::new(),
        }
    }

    /// Writes a frame whose channel is named as fanout names it, as this app names it.
    fn put(&self, frame: Bytes, out: &mut Parts) {
        if frame.is_empty() {
            return;
        }
        if let Some(c) = &self.compressing {
            return out.push(c.fit(frame));
        }
        if self.prefix.is_empty() {
            return out.push(frame);
        }
        out.push(without_prefix(&frame, &self.prefix));
    }

    /// A member's connection came or went (fanout's `join` / `leave`): Pusher's
    /// `member_added` for a user's first connection, `member_removed` for their last.
    fn member(&mut self, key: ChannelKey, json: &[u8]) -> Option<Bytes> {
        let change: Value = serde_json::from_slice(json).ok()?;
        let conn = change["conn"].as_str()?;
        let info = &change["info"];
        let user = user_id(&info["user_id"])?;
        let room = self.rooms.iter_mut().find(|room| room.key == key)?;
        let joined = change["op"] == "join";
        if let Some(waiting) = &mut room.waiting {
            match joined {
                true => {
                    waiting
                        .infos
                        .insert(user.clone().into(), info["user_info"].clone());
                    room.conns.insert(conn.into(), user.into());
                }
                false => {
                    room.conns.remove(conn);
                    waiting.left.push(conn.into());
                }
            }
            return None;
        }
        let others = |conns: &HashMap<Box<str>, Box<str>>| {
            conns.iter().any(|(c, u)| **u == *user && **c != *conn)
        };
        let data = match joined {
            true => {
                let known = room
                    .conns
                    .insert(conn.into(), user.clone().into())
                    .is_some();
                if known || others(&room.conns) {
                    return None;
                }
                json!({"user_id": user, "user_info": info["user_info"]})
            }
            false => {
                room.conns.remove(conn)?;
                if others(&room.conns) {
                    return None;
                }
                json!({"user_id": user})
            }
        };
        let event = match joined {
            true => "pusher_internal:member_added",
            false => "pusher_internal:member_removed",
        };
        let channel = change["channel"].as_str()?;
        let channel = channel.strip_prefix(&*self.prefix).unwrap_or(channel);
        let frame = json!({"event": event, "channel": channel, "data": data.to_string()});
        Some(text(&frame.to_string()))
    }

    /// A presence channel's members, as the subscription found them across the nodes, and
    /// the connection's own: `pusher_internal:subscription_succeeded` with them, by user.
    fn members(&mut self, json: &str) -> Option<Bytes> {
        let answer: Value = serde_json::from_str(json).ok()?;
        let name = answer["channel"].as_str()?;
        let key = channel_key(&format!("{}{name}", self.prefix));
        let room = self.rooms.iter_mut().find(|room| room.key == key)?;
        let waiting = room.waiting.take().unwrap_or_default();
        let mut hash = serde_json::Map::new();
        for member in answer["members"].as_array()? {
            let (Some(conn), Some(user)) = (member["conn"].as_str(), user_id(&member["user_id"]))
            else {
                continue;
            };
            if !waiting.left.iter().any(|left| **left == *conn) {
                room.conns.entry(conn.into()).or_insert(user.clone().into());
                hash.insert(user, member["user_info"].clone());
            }
        }
        for (user, info) in waiting.infos {
            if room.conns.values().any(|u| *u == user) {
                hash.entry(String::from(user)).or_insert(info);
            }
        }
        let ids: Vec<&String> = hash.keys().collect();
        let data = json!({"presence": {"ids": ids, "hash": hash, "count": hash.len()}});
        let frame = json!({"event": "pusher_internal:subscription_succeeded",
            "channel": name, "data": data.to_string()});
        Some(text(&frame.to_string()))
    }
}

/// A member's `user_id`, a string or a number as the app signed it.
fn user_id(value: &Value) -> Option<String> {
    match value {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// A text frame whose `"channel":"<prefix>…"` loses the prefix, made again.
fn without_prefix(frame: &Bytes, prefix: &str) -> Bytes {
    let start = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return frame.clone(),
    };
    let Some(payload) = frame.get(start..) else {
        return frame.clone();
    };
    let needle = format!("\"channel\":\"{prefix}");
    let Some(at) = payload
        .windows(needle.len())
        .position(|window| window == needle.as_bytes())
    else {
        return frame.clone();
    };
    let mut unprefixed = Vec::with_capacity(payload.len());
    unprefixed.extend_from_slice(&payload[..at]);
    unprefixed.extend_from_slice(b"\"channel\":\"");
    unprefixed.extend_from_slice(&payload[at + needle.len()..]);
    text_bytes(&unprefixed)
}

/// Pusher's frame of a fanout event, the same for every Pusher connection.
fn event(json: &[u8]) -> Option<String> {
    let frame: Value = serde_json::from_slice(json).ok()?;
    let data = match &frame["data"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let name = frame["name"].as_str().unwrap_or("message");
    // A user's channel, as Pusher names it (after the app's prefix, which each connection
    // takes off).
    let channel = match frame["channel"].as_str()? {
        c if c.contains(fanout::pusher::FANOUT_USER_CHANNEL) => Value::from(c.replacen(
            fanout::pusher::FANOUT_USER_CHANNEL,
            fanout::pusher::USER_CHANNEL,
            1,
        )),
        c => Value::from(c),
    };
    let mut out = json!({"event": name, "channel": channel, "data": data});
    // What fanout needs to resume, for a client that knows it.
    if let Some(seq) = frame.get("seq") {
        out["seq"] = seq.clone();
    }
    Some(out.to_string())
}

/// The Pusher error code of a fanout refusal, where Pusher has one.
fn pusher_code(code: &str) -> Option<u16> {
    match code {
        "rate_limited" => Some(4301),
        _ => None,
    }
}

/// Pusher's frame of one of the connection's own fanout frames (a reply), or nothing to send.
fn own_frame(json: &str) -> Option<String> {
    let frame: Value = serde_json::from_str(json).ok()?;
    let channel = frame.get("channel").cloned();
    match frame["op"].as_str()? {
        "welcome" => {
            let conn: Uuid = frame["conn"].as_str()?.parse().ok()?;
            let data = json!({"socket_id": socket_id(&conn), "activity_timeout": ACTIVITY_TIMEOUT});
            let frame = json!({"event": "pusher:connection_established", "data": data.to_string()});
            Some(frame.to_string())
        }
        // Its request's id is the channel's Pusher name (a user's channel's differs).
        "subscribed" => Some(
            json!({"event": "pusher_internal:subscription_succeeded",
                "channel": frame.get("id").filter(|id| id.is_string()).or(channel.as_ref()),
                "data": "{}"})
            .to_string(),
        ),
        "pong" => Some(json!({"event": "pusher:pong", "data": "{}"}).to_string()),
        // A subscription refused: its request's id is the channel's (Pusher) name.
        "error" if frame["ref"] == "subscribe" && frame["id"].is_string() => {
            let status = match frame["code"].as_str() {
                Some("forbidden" | "user_blocked") => 403,
                Some("rate_limited") => 429,
                Some("bus_unavailable" | "proxy_unavailable" | "proxy_timeout") => 503,
                _ => 400,
            };
            Some(subscription_error(
                frame["id"].as_str()?,
                frame["code"].as_str().unwrap_or("SubscriptionError"),
                frame["message"].as_str().unwrap_or_default(),
                status,
            ))
        }
        "error" => Some(pusher_error(
            frame["code"].as_str().and_then(pusher_code),
            frame["message"].as_str().unwrap_or_default(),
        )),
        _ => None,
    }
}

/// `pusher:error`.
fn pusher_error(code: Option<u16>, message: &str) -> String {
    json!({"event": "pusher:error", "data": {"code": code, "message": message}}).to_string()
}

/// `pusher:subscription_error` on `channel` (pusher-js gives it to the channel's handlers).
fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> String {
    json!({"event": "pusher:subscription_error", "channel": channel,
        "data": {"type": kind, "error": message, "status": status}})
    .to_string()
}

/// What `pusher:connection_established` asks of the client: a `pusher:ping` after this many
/// seconds without a message (fanout's own heartbeat pings the socket meanwhile).
const ACTIVITY_TIMEOUT: u64 = 120;

impl Framing for WebSocketPusher {
    fn shared(&self, frame: &Outgoing) -> Bytes {
        let exclude = frame.exclude();
        let compressing = self.compressing;
        let slot = match compressing {
            Some(_) => Self::DEFLATE_SLOT,
            None => Self::SLOT,
        };
        let framed = |pusher: &str| match &compressing {
            Some(c) => c.frame(OP_TEXT, pusher.as_bytes()),
            None => text(pusher),
        };
        frame
            .framed(slot, |name, json| match name {
                "event" => match (event(json), exclude) {
                    (None, _) => Bytes::new(),
                    (Some(pusher), None) => framed(&pusher),
                    (Some(pusher), Some(conn)) => {
                        let framed = framed(&pusher);
                        let mut marked = Vec::with_capacity(17 + framed.len());
                        marked.push(EXCLUDE);
                        marked.extend_from_slice(conn.as_bytes());
                        marked.extend_from_slice(&framed);
                        Bytes::from(marked)
                    }
                },
                "join" | "leave" => {
                    let mut marked = Vec::with_capacity(1 + json.len());
                    marked.push(MEMBER);
                    marked.extend_from_slice(json);
                    Bytes::from(marked)
                }
                _ => Bytes::new(),
            })
            .clone()
    }

    fn write(&mut self, key: ChannelKey, _: u64, shared: Bytes, out: &mut Parts) {
        match shared.first() {
            None => {}
            // Every Pusher connection but the one the event leaves out.
            Some(&EXCLUDE) if shared.get(1..17) == Some(self.conn.as_bytes().as_slice()) => {}
            Some(&EXCLUDE) => self.put(shared.slice(17..), out),
            Some(&MEMBER) => {
                if let Some(frame) = self.member(key, &shared[1..]) {
                    out.push(frame);
                }
            }
            Some(_) => self.put(shared, out),
        }
    }

    fn own(&mut self, name: &str, json: &str) -> Bytes {
        if name == MEMBERS {
            return self.members(json).unwrap_or_default();
        }
        match own_frame(json) {
            Some(pusher) => {
                let mut parts = Parts::new();
                self.put(text(&pusher), &mut parts);
                parts.pop().unwrap_or_default()
            }
            None => Bytes::new(),
        }
    }

    fn enter(&mut self, key: ChannelKey, name: &str) {
        let pusher = name.strip_prefix(&*self.prefix).unwrap_or(name);
        if pusher.starts_with("presence-") && !self.rooms.iter().any(|room| room.key == key) {
            self.rooms.push(Room {
                key,
                conns: HashMap::new(),
                waiting: Some(Waiting::default()),
            });
        }
    }

    fn leave(&mut self, key: ChannelKey) {
        self.rooms.retain(|room| room.key != key);
    }
}

/// `GET /app/{key}`: a Pusher client's WebSocket.
pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    State(sockets): State<TaskTracker>,
    ConnectInfo(_peer): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let accept = match handshake(request.method(), &headers) {
        Ok(key) => key,
        Err((status, message)) => return error(status, Code::WebsocketRequired, message),
    };
    if let Err(refusal) = gate(&node) {
        return refusal.into_response();
    }
    let Some(app) = node.pusher_apps().iter().find(|a| a.key == key).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "no Pusher app with this key (FANOUT_PUSHER_APPS)",
        );
    };
    let Some(takeover) = request.extensions().get::<Takeover>() else {
        return error(
            StatusCode::UPGRADE_REQUIRED,
            Code::WebsocketRequired,
            "this connection cannot be upgraded",
        );
    };
    let socket = takeover.claim();
    let conn = Uuid::new_v4();
    let (compressing, extension) = compression(&node, &headers).unzip();
    let identity = Identity {
        user: format!("pusher-{}", socket_id(&conn)),
        info: None,
        subscribe: Patterns::all(),
        publish: Patterns::none(),
        expires_at: None,
        jti: None,
        issued_at: None,
        channels: Vec::new(),
    };
    tokio::spawn(sockets.track_future(async move {
        if let Ok(taken) = socket.await {
            let socket = Socket::new(&taken.read_ahead, compressing.is_some());
            let framing = WebSocketPusher::new(conn, &app.prefix, compressing);
            let connection = Connection::open(node, conn, identity, taken.stream, framing);
            let transport = PusherFrames {
                app,
                socket_id: socket_id(&conn),
                channels: HashSet::new(),
                user: None,
            };
            connection
                .run(OverSocket::new(socket, transport), None)
                .await;
        }
    }));
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(&accept));
    if let Some(extension) = extension {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, extension);
    }
    response
        .body(axum::body::Body::empty())
        .expect("a valid response")
        .into_response()
}

/// A Pusher connection's own part: the messages it sends, translated.
struct PusherFrames {
    app: App,
    socket_id: String,
    /// The private and presence channels it asked for with a valid signature (Pusher names):
    /// where its client events may go.
    channels: HashSet<String>,
    /// Who signed in on it (`pusher:signin`), if anyone did.
    user: Option<String>,
}

/// The fanout channel of app's Pusher channel `name` (letters, digits and `-_=@,.;` as
/// Pusher has them, or a user's channel; none of fanout's own names with a `:`).
fn channel_of(app: &App, name: &str) -> Result<fanout::Channel, String> {
    let pusher = name
        .strip_prefix(fanout::pusher::USER_CHANNEL)
        .unwrap_or(name);
    if let Some(c) = pusher
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !"-_=@,.;".contains(*c))
    {
        return Err(format!("{name:?}: {c:?} is not in Pusher's channel names"));
    }
    let fanout = fanout::pusher::fanout_name(name);
    fanout::Channel::parse(&format!("{}{fanout}", app.prefix)).map_err(|e| format!("{name:?}: {e}"))
}

/// What one Pusher message asks of the session.
enum Action {
    /// A fanout request (JSON), answered in the stream.
    Request(String),
    /// Join a presence channel (Pusher name) as the member the app signed.
    Presence(String, Value),
    /// A client event.
    ClientEvent(fanout::Channel, fanout::Data),
    /// A user signed in (their id, and `user_data` as the app signed it).
    SignIn(String, String),
    /// Nothing to do.
    Nothing,
}

impl PusherFrames {
    /// The fanout channel of a Pusher channel name.
    fn channel(&self, name: &str) -> Result<fanout::Channel, String> {
        channel_of(&self.app, name)
    }

    /// A private or presence channel's signature, checked.
    fn signed(&self, channel: &str, data: &Value) -> Result<(), String> {
        let auth = data["auth"].as_str().unwrap_or_default();
        let channel_data = data["channel_data"].as_str();
        match self
            .app
            .verify_channel_auth(auth, &self.socket_id, channel, channel_data)
        {
            true => Ok(()),
            false => Err(format!(
                "Invalid signature: expected HMAC SHA256 hex digest of {}:{channel}{}",
                self.socket_id,
                channel_data.map(|d| format!(":{d}")).unwrap_or_default()
            )),
        }
    }

    /// Remembers a signed channel for client events (within the subscription limit).
    fn remember(&mut self, channel: &str, max: usize) {
        if self.channels.len() < max {
            self.channels.insert(channel.to_string());
        }
    }

    /// One Pusher message as what the session should do, or Pusher's error frame to send.
    fn action(&mut self, text: &str, max_channels: usize) -> Result<Action, String> {
        let message: Value = serde_json::from_str(text)
            .map_err(|e| pusher_error(None, &format!("not a JSON message: {e}")))?;
        let event = message["event"].as_str().unwrap_or_default();
        // pusher-js sends `data` as an object; some clients as a JSON string.
        let data = match &message["data"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        };
        let error = |message: &str| pusher_error(None, message);
        match event {
            "pusher:ping" => Ok(Action::Request(json!({"op": "ping"}).to_string())),
            "pusher:pong" => Ok(Action::Nothing),
            "pusher:subscribe" => {
                let name = data["channel"]
                    .as_str()
                    .ok_or_else(|| error("pusher:subscribe without a channel"))?;
                let refused =
                    |message: String| subscription_error(name, "AuthError", &message, 401);
                let channel = self
                    .channel(name)
                    .map_err(|e| subscription_error(name, "SubscriptionError", &e, 400))?;
                if !name.starts_with("private-") && !name.starts_with("presence-") {
                    let request =
                        json!({"op": "subscribe", "channel": channel.as_str(), "id": name});
                    return Ok(Action::Request(request.to_string()));
                }
                if name.starts_with("private-encrypted-") {
                    let message = "encrypted channels (private-encrypted-) are not offered here";
                    return Err(subscription_error(name, "SubscriptionError", message, 400));
                }
                self.signed(name, &data).map_err(refused)?;
                self.remember(name, max_channels);
                if !name.starts_with("presence-") {
                    let request =
                        json!({"op": "subscribe", "channel": channel.as_str(), "id": name});
                    return Ok(Action::Request(request.to_string()));
                }
                let member = data["channel_data"]
                    .as_str()
                    .and_then(|d| serde_json::from_str::<Value>(d).ok());
                let user = member.as_ref().and_then(|m| user_id(&m["user_id"]));
                let (Some(member), Some(user)) = (member, user) else {
                    let message = "a presence channel's channel_data is JSON with a user_id".into();
                    return Err(refused(message));
                };
                let info = json!({"user_id": user, "user_info": member["user_info"]});
                Ok(Action::Presence(name.to_string(), info))
            }
            "pusher:unsubscribe" => {
                let name = data["channel"]
                    .as_str()
                    .ok_or_else(|| error("pusher:unsubscribe without a channel"))?;
                self.channels.remove(name);
                let channel = self.channel(name).map_err(|e| error(&e))?;
                let request = json!({"op": "unsubscribe", "channel": channel.as_str()});
                Ok(Action::Request(request.to_string()))
            }
            "pusher:signin" => {
                if self.user.is_some() {
                    return Err(error("this connection is signed in already"));
                }
                let auth = data["auth"].as_str().unwrap_or_default();
                let user_data = data["user_data"]
                    .as_str()
                    .ok_or_else(|| error("pusher:signin without user_data"))?;
                if !self.app.verify_user_auth(auth, &self.socket_id, user_data) {
                    return Err(pusher_error(
                        Some(4009),
                        &format!(
                            "Invalid signature: expected HMAC SHA256 hex digest of \
                             {}::user::{user_data}",
                            self.socket_id
                        ),
                    ));
                }
                let user = serde_json::from_str::<Value>(user_data)
                    .ok()
                    .and_then(|d| d["id"].as_str().map(String::from))
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| error("user_data is JSON with an \"id\" string"))?;
                let channel = format!("{}{user}", fanout::pusher::USER_CHANNEL);
                self.channel(&channel)
                    .map_err(|e| error(&format!("the user id cannot name a channel: {e}")))?;
                Ok(Action::SignIn(user, user_data.to_string()))
            }
            name if name.starts_with("client-") => {
                let channel = message["channel"]
                    .as_str()
                    .ok_or_else(|| error("a client event names its channel"))?;
                if !channel.starts_with("private-") && !channel.starts_with("presence-") {
                    return Err(error(
                        "Client event rejected - only supported on private and presence channels",
                    ));
                }
                if !self.channels.contains(channel) {
                    return Err(error(&format!(
                        "Client event rejected - not subscribed to {channel}"
                    )));
                }
                let bytes = serde_json::to_vec(&message["data"]).expect("JSON serializes");
                let data = fanout::Data::from(Bytes::from(bytes)).named(name);
                Ok(Action::ClientEvent(
                    self.channel(channel).map_err(|e| error(&e))?,
                    data,
                ))
            }
            other => Err(error(&format!("{other:?} is not an event a client sends"))),
        }
    }

    /// Joins a presence channel as the member the app signed, then answers with every member
    /// across the nodes (Pusher's `{"presence":{"ids","hash","count"}}`, by user).
    async fn join_presence(
        &self,
        conn: &mut Connection<WebSocketPusher>,
        name: &str,
        info: Value,
    ) -> Result<(), String> {
        let channel = self.channel(name)?;
        let raw = serde_json::value::to_raw_value(&info).map_err(|e| e.to_string())?;
        Box::pin(conn.session.join_as(&channel, raw))
            .await
            .map_err(|e| e.to_string())?;
        let presence = Box::pin(conn.node.presence(&channel, false))
            .await
            .map_err(|e| e.to_string())?;
        let mut members = vec![json!({"conn": conn.session.conn().to_string(),
            "user_id": info["user_id"], "user_info": info["user_info"]})];
        for member in presence.members.into_iter().flatten() {
            let Some(info) = member
                .info
                .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            else {
                continue;
            };
            members.push(json!({"conn": member.conn, "user_id": info["user_id"],
                "user_info": info["user_info"]}));
        }
        let answer = json!({"channel": name, "members": members});
        Conduit::send(&*conn.outbox, MEMBERS, &answer.to_string());
        Ok(())
    }

    async fn messages(
        &mut self,
        socket: &mut Socket,
        conn: &mut Connection<WebSocketPusher>,
    ) -> Result<(), End> {
        let config = conn.node.config();
        let (max, max_channels) = (config.max_message_bytes, config.max_subscriptions);
        while let Some(message) = socket.next(max, conn.node.budget())? {
            match message {
                Incoming::Text(message) => match self.action(&message, max_channels) {
                    Ok(Action::Request(request)) => {
                        Box::pin(conn.session.handle(&request, ReplyTo::Stream)).await
                    }
                    Ok(Action::Presence(name, info)) => {
                        if let Err(message) = self.join_presence(conn, &name, info).await {
                            let refused =
                                subscription_error(&name, "SubscriptionError", &message, 400);
                            conn.outbox.send_raw(text(&refused));
                        }
                    }
                    Ok(Action::ClientEvent(channel, data)) => {
                        Box::pin(conn.session.client_event(channel, data)).await
                    }
                    Ok(Action::SignIn(user, user_data)) => {
                        conn.session.sign_in(&user);
                        self.user = Some(user);
                        let data = json!({"user_data": user_data}).to_string();
                        let success = json!({"event": "pusher:signin_success", "data": data});
                        conn.outbox.send_raw(text(&success.to_string()));
                    }
                    Ok(Action::Nothing) => {}
                    Err(refused) => conn.outbox.send_raw(text(&refused)),
                },
                Incoming::Binary(_) => {
                    let refused = pusher_error(None, "Pusher's messages are text frames");
                    conn.outbox.send_raw(text(&refused));
                }
                Incoming::Ping(payload) => conn.outbox.send_raw(pong(&payload)),
                Incoming::Pong => {}
                Incoming::Close(code) => return Err(End::ClientClosed(code)),
            }
            conn.written().await?;
        }
        Ok(())
    }
}

impl Dialect for PusherFrames {
    type Framing = WebSocketPusher;

    fn messages(
        &mut self,
        socket: &mut Socket,
        conn: &mut Connection<WebSocketPusher>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send {
        PusherFrames::messages(self, socket, conn)
    }

    /// Pusher's close codes: 4200 (reconnect at once) for a draining node, 4100 (reconnect
    /// after a pause) for what fanout asks to reconnect from, 4009 for what it does not.
    fn close_frame(&self, end: &End) -> Option<Bytes> {
        let (code, reason): (u16, &str) = match end {
            End::Gone => return None,
            End::ClientClosed(_) => (1000, ""),
            End::Close(d) if d.code == 1001 => (4200, &d.reason),
            End::Close(d) if d.reconnect() => (4100, &d.reason),
            End::Close(d) => (4009, &d.reason),
        };
        Some(close(code, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text frame's payload.
    fn payload(frame: &[u8]) -> &[u8] {
        match frame[1] & 0x7f {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    /// What `framing` writes for `frame` of channel `name`, as text.
    fn written(framing: &mut WebSocketPusher, name: &str, frame: &Outgoing) -> Vec<String> {
        let mut parts = Parts::new();
        let shared = framing.shared(frame);
        framing.write(channel_key(name), frame.seq, shared, &mut parts);
        parts
            .iter()
            .map(|part| String::from_utf8_lossy(payload(part)).into_owned())
            .collect()
    }

    fn change(op: &str, conn: &str, user: &str) -> Outgoing {
        let json = json!({"op": op, "channel": "presence-lobby", "user": "x", "conn": conn,
            "info": {"user_id": user, "user_info": {"name": user}}});
        Outgoing::other(
            if op == "join" { "join" } else { "leave" },
            json.to_string(),
        )
    }

    #[test]
    fn pusher_names_are_fanout_channels_and_no_other() {
        let app = fanout::pusher::apps("1:key:secret-one:acme.")
            .unwrap()
            .remove(0);
        assert_eq!(
            channel_of(&app, "private-room").unwrap().as_str(),
            "acme.private-room"
        );
        assert_eq!(
            channel_of(&app, "#server-to-user-ada").unwrap().as_str(),
            "acme.server-to-user:ada"
        );
        // A user's channel in fanout's name, a fanout channel Pusher cannot name.
        assert!(channel_of(&app, "server-to-user:ada").is_err());
        assert!(channel_of(&app, "room:maths").is_err());
        assert!(channel_of(&app, "#server-to-user-a:b").is_err());
    }

    #[test]
    fn a_users_channel_is_named_as_pusher_names_it() {
        let frame = Outgoing::event(
            1,
            r#"{"op":"event","channel":"acme.server-to-user:ada","seq":1,"name":"notice","data":"x"}"#,
        );
        let mut framing = WebSocketPusher::new(Uuid::new_v4(), "acme.", None);
        let seen = written(&mut framing, "acme.server-to-user:ada", &frame);
        assert!(
            seen[0].contains(r##""channel":"#server-to-user-ada""##),
            "{seen:?}"
        );
    }

    #[test]
    fn an_event_leaves_out_the_connection_it_names_and_only_it() {
        let (me, other) = (Uuid::new_v4(), Uuid::new_v4());
        let frame = Outgoing::event(7, r#"{"op":"event","channel":"private-room","seq":7,"name":"client-typing","data":{"a":1}}"#)
            .excluding(Some(me));
        assert!(
            written(
                &mut WebSocketPusher::new(me, "", None),
                "private-room",
                &frame
            )
            .is_empty()
        );
        let theirs = written(
            &mut WebSocketPusher::new(other, "", None),
            "private-room",
            &frame,
        );
        let theirs: Value = serde_json::from_str(&theirs[0]).unwrap();
        assert_eq!(
            theirs,
            json!({"event": "client-typing", "channel": "private-room", "data": r#"{"a":1}"#, "seq": 7})
        );
    }

    #[test]
    fn an_apps_prefix_is_not_in_the_channels_it_sees() {
        let frame = Outgoing::event(
            1,
            r#"{"op":"event","channel":"acme.orders","seq":1,"data":"x"}"#,
        );
        let mut framing = WebSocketPusher::new(Uuid::new_v4(), "acme.", None);
        let seen = written(&mut framing, "acme.orders", &frame);
        let seen: Value = serde_json::from_str(&seen[0]).unwrap();
        assert_eq!(seen["channel"], "orders");
        let reply = framing.own("reply", r#"{"op":"subscribed","channel":"acme.orders"}"#);
        assert!(String::from_utf8_lossy(&reply).contains(r#""channel":"orders""#));
    }

    #[test]
    fn members_are_users_added_with_their_first_connection_removed_with_their_last() {
        let me = Uuid::new_v4();
        let mut framing = WebSocketPusher::new(me, "", None);
        framing.enter(channel_key("presence-lobby"), "presence-lobby");
        // While the subscription waits for the members: bo comes, cy comes and goes.
        for frame in [
            change("join", "b1", "bo"),
            change("join", "c1", "cy"),
            change("leave", "c1", "cy"),
        ] {
            assert!(written(&mut framing, "presence-lobby", &frame).is_empty());
        }
        // The answer saw cy (and not bo), and ada's two connections; cy left since.
        let answer = json!({"channel": "presence-lobby", "members": [
            {"conn": me.to_string(), "user_id": "ada", "user_info": {"name": "ada"}},
            {"conn": "a2", "user_id": "ada", "user_info": {"name": "ada"}},
            {"conn": "c1", "user_id": "cy", "user_info": {"name": "cy"}},
        ]});
        let succeeded = framing.own(MEMBERS, &answer.to_string());
        let succeeded: Value = serde_json::from_slice(payload(&succeeded)).unwrap();
        let data: Value = serde_json::from_str(succeeded["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["presence"]["count"], 2, "{data}");
        assert_eq!(data["presence"]["ids"], json!(["ada", "bo"]), "{data}");
        // Ada's own join, late: nothing. Her second connection going: nothing; bo's: removed.
        let mut see = |op: &str, conn: &str, user: &str| {
            written(&mut framing, "presence-lobby", &change(op, conn, user))
        };
        assert!(see("join", &me.to_string(), "ada").is_empty());
        assert!(see("leave", "a2", "ada").is_empty());
        let removed = see("leave", "b1", "bo");
        assert!(removed[0].contains("member_removed"), "{removed:?}");
        // Dan's first connection adds him, his second does not; his last removes him.
        let added = see("join", "d1", "dan");
        assert!(added[0].contains("member_added"), "{added:?}");
        assert!(see("join", "d2", "dan").is_empty());
        assert!(see("leave", "d1", "dan").is_empty());
        let removed = see("leave", "d2", "dan");
        assert!(removed[0].contains("member_removed"), "{removed:?}");
    }
}
