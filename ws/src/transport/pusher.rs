//! The Pusher protocol as a dialect over the WebSocket transport (`GET /app/{key}`), for
//! pusher-js and Laravel Echo. WORK IN PROGRESS (issue 29): public, private and presence
//! channels (members across nodes: the member's info is Pusher's `{user_id, user_info}`, as
//! the app signed it), events, pings; client events and `socket_id` exclusion are not there
//! yet, and members are added and removed per connection, not per user.
//!
//! Its requests are translated into the session's (a `pusher:subscribe` is a `subscribe`,
//! once a private channel's signature holds), and what the node sends is framed Pusher's way:
//! an event is `{"event","channel","data"}` (`data` a string: a JSON string as is, any other
//! JSON as its text), made once per event for every Pusher connection.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{ConnectInfo, Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use fanout::{Code, pusher::App};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{
    admit::error,
    connection::{Connection, End, Transport},
    frame::Incoming,
    http::Takeover,
    websocket::{Socket, accept_key, close, handshake, pong, text, text_bytes},
};
use crate::{
    auth::{Identity, Patterns},
    node::Node,
    position::ChannelKey,
    session::ReplyTo,
    sink::{Framing, Outbox, Outgoing, Parts},
};

/// Pusher framing: each frame one text frame in Pusher's shape.
#[derive(Debug, Default)]
pub struct WebSocketPusher;

impl WebSocketPusher {
    /// Its slot in [`Outgoing::framed`].
    const SLOT: usize = 5;
}

/// A socket id as Pusher's libraries expect it (`<digits>.<digits>`), from a connection id.
pub(crate) fn socket_id(conn: &Uuid) -> String {
    let n = conn.as_u128();
    format!(
        "{}.{}",
        (n >> 64) as u64 % 1_000_000_000_000,
        n as u64 % 1_000_000_000_000
    )
}

/// Pusher's frame of a fanout frame's JSON (an event, a reply), or nothing to send.
fn translate(json: &[u8]) -> Option<String> {
    let frame: Value = serde_json::from_slice(json).ok()?;
    let channel = frame.get("channel").cloned();
    let event = match frame["op"].as_str()? {
        "event" => {
            let data = match &frame["data"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let name = frame["name"].as_str().unwrap_or("message");
            let mut out = json!({"event": name, "channel": channel, "data": data});
            // What fanout needs to resume, for a client that knows it.
            if let Some(seq) = frame.get("seq") {
                out["seq"] = seq.clone();
            }
            return Some(out.to_string());
        }
        "welcome" => {
            let conn: Uuid = frame["conn"].as_str()?.parse().ok()?;
            let data = json!({"socket_id": socket_id(&conn), "activity_timeout": 120});
            return Some(
                json!({"event": "pusher:connection_established", "data": data.to_string()})
                    .to_string(),
            );
        }
        op @ ("join" | "leave") => {
            // A presence channel's member: its info is Pusher's `{user_id, user_info}`.
            let info = &frame["info"];
            let user_id = info.get("user_id")?;
            let data = match op {
                "join" => json!({"user_id": user_id, "user_info": info["user_info"]}),
                _ => json!({"user_id": user_id}),
            };
            let event = match op {
                "join" => "pusher_internal:member_added",
                _ => "pusher_internal:member_removed",
            };
            return Some(
                json!({"event": event, "channel": channel, "data": data.to_string()}).to_string(),
            );
        }
        "subscribed" => "pusher_internal:subscription_succeeded",
        "pong" => return Some(json!({"event": "pusher:pong", "data": "{}"}).to_string()),
        "error" => {
            let data = json!({"code": null, "message": frame["message"]});
            return Some(json!({"event": "pusher:error", "data": data}).to_string());
        }
        _ => return None,
    };
    Some(json!({"event": event, "channel": channel, "data": "{}"}).to_string())
}

impl Framing for WebSocketPusher {
    fn shared(frame: &Outgoing) -> Bytes {
        frame
            .framed(Self::SLOT, |_, json| match translate(json) {
                Some(pusher) => text(&pusher),
                None => Bytes::new(),
            })
            .clone()
    }

    fn write(&mut self, _: ChannelKey, _: u64, shared: Bytes, out: &mut Parts) {
        if !shared.is_empty() {
            out.push(shared);
        }
    }

    fn own(&mut self, _: &str, json: &str) -> Bytes {
        match translate(json.as_bytes()) {
            Some(pusher) => text(&pusher),
            None => Bytes::new(),
        }
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
            let socket = Socket::new(&taken.read_ahead);
            let connection = Connection::open(node, conn, identity, taken.stream, WebSocketPusher);
            let transport = PusherFrames {
                socket,
                app,
                socket_id: socket_id(&conn),
            };
            connection.run(transport, None).await;
        }
    }));
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(&accept))
        .body(axum::body::Body::empty())
        .expect("a valid response")
        .into_response()
}

/// A Pusher connection's own part: the frames it sends, translated.
struct PusherFrames {
    socket: Socket,
    app: App,
    socket_id: String,
}

impl PusherFrames {
    /// A presence channel's subscription: the member's info from its signed `channel_data`,
    /// if the message is one.
    fn presence(&self, text: &str) -> Option<(String, Value)> {
        let message: Value = serde_json::from_str(text).ok()?;
        if message["event"] != "pusher:subscribe" {
            return None;
        }
        let data = match &message["data"] {
            Value::String(s) => serde_json::from_str(s).ok()?,
            other => other.clone(),
        };
        let channel = data["channel"].as_str()?;
        if !channel.starts_with("presence-") {
            return None;
        }
        let channel_data: Value = serde_json::from_str(data["channel_data"].as_str()?).ok()?;
        let user_id = match &channel_data["user_id"] {
            Value::String(id) => id.clone(),
            Value::Number(id) => id.to_string(),
            _ => return None,
        };
        let info = json!({"user_id": user_id, "user_info": channel_data["user_info"]});
        Some((channel.to_string(), info))
    }

    /// Joins a presence channel as the member the app signed, then answers with every member
    /// across the nodes (Pusher's `{"presence":{"ids","hash","count"}}`).
    async fn join_presence(
        &self,
        conn: &mut Connection<WebSocketPusher>,
        name: &str,
        info: Value,
    ) -> Result<(), String> {
        let channel = fanout::Channel::parse(&format!("{}{name}", self.app.prefix))
            .map_err(|e| e.to_string())?;
        let raw = serde_json::value::to_raw_value(&info).map_err(|e| e.to_string())?;
        Box::pin(conn.session.join_as(&channel, raw))
            .await
            .map_err(|e| e.to_string())?;
        let members = Box::pin(conn.node.presence(&channel, false))
            .await
            .map_err(|e| e.to_string())?;
        let mut hash = serde_json::Map::new();
        for member in members.members.into_iter().flatten() {
            let Some(info) = member
                .info
                .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
            else {
                continue;
            };
            if let Some(id) = info["user_id"].as_str() {
                hash.insert(id.to_string(), info["user_info"].clone());
            }
        }
        let ids: Vec<&String> = hash.keys().collect();
        let data = json!({"presence": {"ids": ids, "hash": hash, "count": hash.len()}});
        let frame = json!({"event": "pusher_internal:subscription_succeeded",
            "channel": name, "data": data.to_string()});
        conn.outbox
            .send_raw(text_bytes(frame.to_string().as_bytes()));
        Ok(())
    }

    /// One Pusher message as the session's request, or a `pusher:error` to send.
    fn request(&self, text: &str) -> Result<Option<String>, String> {
        let message: Value =
            serde_json::from_str(text).map_err(|e| format!("not a JSON message: {e}"))?;
        let event = message["event"].as_str().unwrap_or_default();
        // pusher-js sends `data` as an object; some clients as a JSON string.
        let data = match &message["data"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::Null),
            other => other.clone(),
        };
        match event {
            "pusher:ping" => Ok(Some(json!({"op": "ping"}).to_string())),
            "pusher:subscribe" => {
                let channel = data["channel"].as_str().ok_or("no channel")?;
                if channel.starts_with("private-") || channel.starts_with("presence-") {
                    let auth = data["auth"].as_str().unwrap_or_default();
                    let channel_data = data["channel_data"].as_str();
                    if !self
                        .app
                        .verify_channel_auth(auth, &self.socket_id, channel, channel_data)
                    {
                        return Err(format!("invalid signature for {channel}"));
                    }
                }
                let channel = format!("{}{channel}", self.app.prefix);
                Ok(Some(
                    json!({"op": "subscribe", "channel": channel}).to_string(),
                ))
            }
            "pusher:unsubscribe" => {
                let channel = data["channel"].as_str().ok_or("no channel")?;
                let channel = format!("{}{channel}", self.app.prefix);
                Ok(Some(
                    json!({"op": "unsubscribe", "channel": channel}).to_string(),
                ))
            }
            "pusher:pong" => Ok(None),
            other => Err(format!("{other:?} is not supported here yet")),
        }
    }

    async fn messages(&mut self, conn: &mut Connection<WebSocketPusher>) -> Result<(), End> {
        let max = conn.node.config().max_message_bytes;
        while let Some(message) = self.socket.next(max)? {
            match message {
                Incoming::Text(text) if self.presence(&text).is_some() => {
                    let (name, info) = self.presence(&text).expect("checked");
                    // The signature first, as for a private channel.
                    let joined = match self.request(&text) {
                        Ok(_) => self.join_presence(conn, &name, info).await,
                        Err(why) => Err(why),
                    };
                    if let Err(message) = joined {
                        let error = json!({"event": "pusher:error",
                            "data": {"code": null, "message": message}});
                        conn.outbox
                            .send_raw(text_bytes(error.to_string().as_bytes()));
                    }
                }
                Incoming::Text(text) => match self.request(&text) {
                    Ok(Some(request)) => {
                        Box::pin(conn.session.handle(&request, ReplyTo::Stream)).await
                    }
                    Ok(None) => {}
                    Err(message) => {
                        let error = json!({"event": "pusher:error",
                            "data": {"code": null, "message": message}});
                        conn.outbox
                            .send_raw(text_bytes(error.to_string().as_bytes()));
                    }
                },
                Incoming::Binary(_) => {}
                Incoming::Ping(payload) => conn.outbox.send_raw(pong(&payload)),
                Incoming::Pong => {}
                Incoming::Close(code) => return Err(End::ClientClosed(code)),
            }
            conn.written().await?;
        }
        Ok(())
    }
}

impl Transport for PusherFrames {
    type Framing = WebSocketPusher;
    type Input = std::io::Result<()>;

    async fn start(&mut self, conn: &mut Connection<WebSocketPusher>) -> Result<(), End> {
        self.messages(conn).await
    }

    async fn input(&mut self, outbox: &Outbox<WebSocketPusher>) -> std::io::Result<()> {
        Socket::readable(outbox).await
    }

    async fn act(
        &mut self,
        readable: std::io::Result<()>,
        conn: &mut Connection<WebSocketPusher>,
    ) -> Result<(), End> {
        if self.socket.read(readable, &conn.outbox)? {
            self.messages(conn).await?;
        }
        Ok(())
    }

    fn pending(&self) -> Option<u64> {
        self.socket.pending()
    }

    fn held(&self) -> usize {
        self.socket.held()
    }

    fn heartbeat(&mut self, conn: &Connection<WebSocketPusher>) -> Result<(), End> {
        self.socket.heartbeat(&conn.outbox)
    }

    /// Pusher's close codes: 4200 (reconnect at once) for a draining node, 4100 (reconnect
    /// after a pause) for what fanout asks to reconnect from, 4009 for what it does not.
    fn goodbye(&self, end: &End, outbox: &Outbox<WebSocketPusher>) {
        let (code, reason): (u16, &str) = match end {
            End::Gone => return,
            End::ClientClosed(_) => (1000, ""),
            End::Close(d) if d.code == 1001 => (4200, &d.reason),
            End::Close(d) if d.reconnect() => (4100, &d.reason),
            End::Close(d) => (4009, &d.reason),
        };
        outbox.send_raw(close(code, reason));
    }
}
