//! The WebSocket transport: `GET /ws`, the upgrade, its framing, and its part of a
//! connection ([`super::connection`]): reading frames, pings and pongs, the close frame.
//!
//! The upgrade is done here rather than by a WebSocket library, so that the connection's
//! socket can be shared: fan-out writes events into it directly ([`Outbox`]), and the
//! connection's task only reads, answers, and writes out what the socket could not take at
//! once. An idle connection is its task, its socket and a few hub entries: no read or write
//! buffers are kept while nothing is in flight.

use bytes::{Bytes, BytesMut};
use fanout::Code;
use std::{collections::HashMap, fmt, net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, Query, Request, State, rejection::QueryRejection},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    admit::{Admitted, admit, error},
    connection::{Connection, End, Transport, connection_span},
    deflate::{self, Deflate},
    frame::{
        Decoder, FIN, FrameError, Incoming, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RSV1,
        may_send,
    },
    http::{Taken, Takeover},
};
use crate::{
    auth::Identity,
    budget::Budget,
    disconnect,
    hub::ConnId,
    msgpack,
    node::Node,
    position::ChannelKey,
    protocol::Rejection,
    session::ReplyTo,
    sink::{Conduit, Framing, Outbox, Outgoing, Parts},
};

/// permessage-deflate as one connection has it: what it negotiated, and how small a frame
/// goes uncompressed (`FANOUT_COMPRESSION_MIN_BYTES`, the same for every connection of the
/// node, so one compressed framing serves them all).
#[derive(Debug, Clone, Copy)]
pub struct Compressing {
    pub deflate: Deflate,
    pub min_bytes: usize,
}

impl Compressing {
    /// One frame of `payload`, compressed (RSV1 set) when it is at least `min_bytes` and
    /// compressing makes it smaller.
    pub fn frame(&self, opcode: u8, payload: &[u8]) -> Bytes {
        match (payload.len() >= self.min_bytes)
            .then(|| deflate::compress(payload))
            .flatten()
        {
            Some(compressed) => encode(RSV1 | opcode, &compressed),
            None => encode(opcode, payload),
        }
    }

    /// A shared frame as this connection may receive it: a compressed one whose message is
    /// longer than the window it asked for (`server_max_window_bits`) goes uncompressed.
    /// (Only clients that ask for a smaller window pay this, per delivery.)
    pub fn fit(&self, shared: Bytes) -> Bytes {
        if self.deflate.server_max_window_bits >= 15 || shared.first().is_none_or(|b| b & RSV1 == 0)
        {
            return shared;
        }
        let Some((opcode, payload)) = payload_of(&shared) else {
            return shared;
        };
        match deflate::inflate(payload, 16 << 20, |_| true) {
            Ok(message) if !self.deflate.fits(message.len()) => encode(opcode & 0x0F, &message),
            _ => shared,
        }
    }
}

/// A frame the node made: its first byte (FIN, RSV1, opcode) and its payload.
fn payload_of(frame: &[u8]) -> Option<(u8, &[u8])> {
    let start = match frame.get(1)? & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    Some((frame[0], frame.get(start..)?))
}

/// Most channels one connection takes as deltas.
const MAX_DELTA_CHANNELS: usize = 1024;

/// The first byte of a shared part that holds an event's three frames for a connection that
/// takes deltas (no WebSocket frame starts with it): [`DeltaChannels::combined`].
const COMBINED: u8 = 0x00;

/// The channels a connection takes as deltas (`"delta":"fossil"`), each with the seq of its
/// last event written in a form a delta can build on (0: none: the next one goes whole).
#[derive(Debug, Default)]
struct DeltaChannels(Vec<(ChannelKey, u64)>);

impl DeltaChannels {
    fn add(&mut self, key: ChannelKey) -> bool {
        if self.0.iter().any(|(k, _)| *k == key) {
            return true;
        }
        if self.0.len() >= MAX_DELTA_CHANNELS {
            return false;
        }
        self.0.push((key, 0));
        true
    }

    fn remove(&mut self, key: ChannelKey) {
        self.0.retain(|(k, _)| *k != key);
    }

    /// The shared part for this connection: `plain` (the framing's own), or, when the
    /// connection takes deltas and the event has them, the event's three frames in one
    /// piece (in `slot`, made once for every such connection): `COMBINED`, the seq of the
    /// channel's event before it (8 bytes), the plain frame, the whole one (each after its
    /// length, 4 bytes), the delta (the rest; none: empty).
    fn combined(
        &self,
        frame: &Outgoing,
        plain: Bytes,
        slot: usize,
        make: impl Fn(&[u8]) -> Bytes,
    ) -> Bytes {
        let Some(deltas) = frame.deltas().filter(|_| !self.0.is_empty()) else {
            return plain;
        };
        frame
            .framed(slot, |_, _| {
                let whole = make(&deltas.whole);
                let delta = deltas.delta.as_deref().map(&make).unwrap_or_default();
                let mut out = BytesMut::with_capacity(17 + plain.len() + whole.len() + delta.len());
                out.extend_from_slice(&[COMBINED]);
                out.extend_from_slice(&frame.prev.to_be_bytes());
                out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
                out.extend_from_slice(&plain);
                out.extend_from_slice(&(whole.len() as u32).to_be_bytes());
                out.extend_from_slice(&whole);
                out.extend_from_slice(&delta);
                out.freeze()
            })
            .clone()
    }

    /// What this connection writes of a shared part for channel `key`'s event `seq`: the
    /// plain frame for a channel it does not take as deltas; for one it does, the delta when
    /// it has the event the delta is from, else the whole frame.
    fn pick(&mut self, key: ChannelKey, seq: u64, shared: Bytes) -> Bytes {
        let entry = self.0.iter_mut().find(|(k, _)| *k == key);
        if shared.first() != Some(&COMBINED) {
            // A frame without deltas (a replay, a volatile event): the next one goes whole.
            if let Some(entry) = entry {
                entry.1 = 0;
            }
            return shared;
        }
        let number = |at: usize, len: usize| {
            shared
                .get(at..at + len)
                .map_or(0, |b| b.iter().fold(0u64, |n, b| n << 8 | u64::from(*b)))
        };
        let prev = number(1, 8);
        let plain_len = number(9, 4) as usize;
        let plain = shared.slice(13..13 + plain_len);
        let whole_at = 13 + plain_len;
        let whole_len = number(whole_at, 4) as usize;
        let whole = shared.slice(whole_at + 4..whole_at + 4 + whole_len);
        let delta = shared.slice(whole_at + 4 + whole_len..);
        let Some(entry) = entry else {
            return plain;
        };
        let builds = entry.1 != 0 && entry.1 == prev && !delta.is_empty();
        entry.1 = seq;
        match builds {
            true => delta,
            false => whole,
        }
    }
}

/// What a WebSocket connection of fanout's protocol (JSON or MessagePack) does per
/// connection with what is shared: the channels it takes as deltas, and the deflate it
/// negotiated.
#[derive(Debug, Default)]
struct Wire {
    compressing: Option<Compressing>,
    deltas: DeltaChannels,
}

impl Wire {
    fn new(compressing: Option<Compressing>) -> Wire {
        Wire {
            compressing,
            deltas: DeltaChannels::default(),
        }
    }

    /// The shared part: `plain` (made in `slot`, or `deflate_slot` when compressing), or
    /// the event's frames with deltas (in `delta_slot` or `deflate_delta_slot`); `encode`
    /// frames one JSON text (opcode, payload bytes).
    fn shared(
        &self,
        frame: &Outgoing,
        slots: [usize; 4],
        opcode: u8,
        encode: impl Fn(&[u8]) -> Vec<u8>,
    ) -> Bytes {
        let [slot, deflate_slot, delta_slot, deflate_delta_slot] = slots;
        let make = |json: &[u8]| match &self.compressing {
            Some(c) => c.frame(opcode, &encode(json)),
            None => self::encode(opcode, &encode(json)),
        };
        let (plain, delta_slot) = match &self.compressing {
            None => (frame.framed(slot, |_, json| make(json)).clone(), delta_slot),
            Some(_) => (
                frame.framed(deflate_slot, |_, json| make(json)).clone(),
                deflate_delta_slot,
            ),
        };
        self.deltas.combined(frame, plain, delta_slot, make)
    }

    fn write(&mut self, key: ChannelKey, seq: u64, shared: Bytes, out: &mut Parts) {
        let shared = self.deltas.pick(key, seq, shared);
        out.push(match &self.compressing {
            Some(c) => c.fit(shared),
            None => shared,
        });
    }
}

/// How fanout's protocol is encoded on a WebSocket: [`Json`] text frames, or [`Msgpack`]
/// binary ones (the `fanout.msgpack` subprotocol).
pub trait Encoding: Send + fmt::Debug + 'static {
    /// Its slots in [`Outgoing::framed`]: plain, compressed, with deltas, compressed with
    /// deltas.
    const SLOTS: [usize; 4];
    /// Its frames' opcode.
    const OPCODE: u8;

    /// A frame's payload from the frame's JSON.
    fn encode(json: &[u8]) -> Vec<u8>;

    /// A binary message as the protocol's JSON text, or why it cannot be read.
    fn binary(payload: &[u8]) -> Result<String, Rejection>;
}

/// Text frames of JSON.
#[derive(Debug)]
pub struct Json;

impl Encoding for Json {
    const SLOTS: [usize; 4] = [0, 6, 9, 10];
    const OPCODE: u8 = OP_TEXT;

    fn encode(json: &[u8]) -> Vec<u8> {
        json.to_vec()
    }

    fn binary(_: &[u8]) -> Result<String, Rejection> {
        Err(Rejection::new(
            Code::UnsupportedFrame,
            "binary frames need the fanout.msgpack subprotocol; send JSON text frames",
        ))
    }
}

/// Binary frames holding the JSON frame's MessagePack (the same ops and fields).
#[derive(Debug)]
pub struct Msgpack;

impl Encoding for Msgpack {
    const SLOTS: [usize; 4] = [3, 7, 11, 12];
    const OPCODE: u8 = OP_BINARY;

    fn encode(json: &[u8]) -> Vec<u8> {
        msgpack::from_json(json)
    }

    fn binary(payload: &[u8]) -> Result<String, Rejection> {
        msgpack::to_json(payload)
    }
}

/// fanout's WebSocket framing in encoding `E`: each frame one WebSocket frame, the same bytes
/// for every connection (compressed once for every connection that negotiated
/// permessage-deflate; a channel's deltas once for every connection that takes them).
#[derive(Debug)]
pub struct Framed<E>(Wire, std::marker::PhantomData<E>);

impl<E> Default for Framed<E> {
    fn default() -> Self {
        Framed(Wire::default(), std::marker::PhantomData)
    }
}

/// JSON text frames.
pub type WebSocket = Framed<Json>;

/// The subprotocol of MessagePack frames (`Sec-WebSocket-Protocol: fanout.msgpack`).
pub const MSGPACK: &str = "fanout.msgpack";

/// MessagePack binary frames (`fanout.msgpack`).
pub type WebSocketMsgpack = Framed<Msgpack>;

impl<E: Encoding> Framing for Framed<E> {
    fn shared(&self, frame: &Outgoing) -> Bytes {
        self.0.shared(frame, E::SLOTS, E::OPCODE, E::encode)
    }

    fn write(&mut self, key: ChannelKey, seq: u64, shared: Bytes, out: &mut Parts) {
        self.0.write(key, seq, shared, out);
    }

    fn delta(&mut self, key: ChannelKey) -> bool {
        self.0.deltas.add(key)
    }

    fn leave(&mut self, key: ChannelKey) {
        self.0.deltas.remove(key);
    }

    fn own(&mut self, _: &str, json: &str) -> Bytes {
        encode(E::OPCODE, &E::encode(json.as_bytes()))
    }
}

/// How a connection's messages are encoded: JSON text, or (`fanout.msgpack`) MessagePack.
trait Codec: Framing + Send + 'static {
    /// The framing of a connection, compressing or not.
    fn with(compressing: Option<Compressing>) -> Self;

    /// A binary message as the protocol's JSON text, or why it cannot be read.
    fn binary(payload: &[u8]) -> Result<String, Rejection>;
}

impl<E: Encoding> Codec for Framed<E> {
    fn with(compressing: Option<Compressing>) -> Self {
        Framed(Wire::new(compressing), std::marker::PhantomData)
    }

    fn binary(payload: &[u8]) -> Result<String, Rejection> {
        E::binary(payload)
    }
}

// The frames the node sends (RFC 6455), unmasked: one encoded event frame is the same bytes
// for every recipient and is written as is.

/// One unfragmented, unmasked frame.
fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.extend_from_slice(&[FIN | opcode]);
    if len < 126 {
        out.extend_from_slice(&[len as u8]);
    } else if len <= u16::MAX as usize {
        out.extend_from_slice(&[126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A text frame.
pub(crate) fn text(payload: &str) -> Bytes {
    encode(OP_TEXT, payload.as_bytes())
}

/// A text frame of `payload`, UTF-8 already (the node's own JSON).
pub(crate) fn text_bytes(payload: &[u8]) -> Bytes {
    encode(OP_TEXT, payload)
}

pub(crate) fn ping() -> Bytes {
    encode(OP_PING, &[])
}

pub(crate) fn pong(payload: &[u8]) -> Bytes {
    encode(OP_PONG, &payload[..payload.len().min(125)])
}

/// A close frame with `code` and `reason` (cut to fit the 125-byte control frame limit).
pub(crate) fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// Bytes read per system call.
const READ_CHUNK: usize = 4096;

pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    State(sockets): State<TaskTracker>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    request: Request,
) -> Response {
    let params = match params {
        Ok(Query(params)) => params,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                Code::InvalidQuery,
                &rejection.body_text(),
            );
        }
    };
    let key = match handshake(request.method(), &headers) {
        Ok(key) => key,
        Err((status, message)) => return error(status, Code::WebsocketRequired, message),
    };
    let token = params.get("token").map(String::as_str);
    let user = params.get("user").map(String::as_str);
    let Admitted { identity, permit } =
        match admit(&node, peer, &headers, token, user, "websocket").await {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal.into_response(),
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
    let span = connection_span(&node, &conn, &identity.user);
    let msgpack = offers_msgpack(&headers);
    let (compressing, extension) = compression(&node, &headers).unzip();
    // Taken-over sockets are invisible to the HTTP server's graceful shutdown: the tracker is
    // how shutdown waits for them.
    tokio::spawn(
        sockets.track_future(
            async move {
                if let Ok(taken) = socket.await {
                    match msgpack {
                        true => {
                            serve::<WebSocketMsgpack>(taken, node, conn, identity, compressing)
                                .await
                        }
                        false => serve::<WebSocket>(taken, node, conn, identity, compressing).await,
                    }
                }
                drop(permit);
            }
            .instrument(span),
        ),
    );
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept_key(&key));
    if msgpack {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, MSGPACK);
    }
    if let Some(extension) = extension {
        response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, extension);
    }
    response.body(Body::empty()).expect("a valid response")
}

/// permessage-deflate for an upgrade, when the node allows it and the client offers it in a
/// way fanout accepts: how the connection compresses, and the `Sec-WebSocket-Extensions`
/// answer.
pub(crate) fn compression(node: &Node, headers: &HeaderMap) -> Option<(Compressing, String)> {
    let config = node.config();
    if config.compression == crate::config::Compression::Off {
        return None;
    }
    let offers = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let (deflate, answer) = deflate::negotiate(offers)?;
    let compressing = Compressing {
        deflate,
        min_bytes: config.compression_min_bytes,
    };
    Some((compressing, answer))
}

/// Whether the client offers the `fanout.msgpack` subprotocol (RFC 6455 4.2.2: the server
/// picks one of those offered, or none: JSON text frames).
fn offers_msgpack(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .any(|p| p.trim() == MSGPACK)
}

/// The `Sec-WebSocket-Accept` answer to a `Sec-WebSocket-Key` (RFC 6455 4.2.2): the base64
/// of the SHA-1 of the key and the protocol's GUID.
pub(crate) fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    use sha1::{Digest, Sha1};
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = Sha1::new()
        .chain_update(key.as_bytes())
        .chain_update(GUID)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// Checks an upgrade request (RFC 6455 4.2.1); returns its `Sec-WebSocket-Key`.
pub(crate) fn handshake(
    method: &Method,
    headers: &HeaderMap,
) -> Result<String, (StatusCode, &'static str)> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .unwrap_or_default()
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    };
    if method != Method::GET {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade must be a GET",
        ));
    }
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::BAD_REQUEST,
            "this endpoint speaks WebSocket: send Connection: upgrade and Upgrade: websocket",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"));
    }
    match headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(key) if !key.is_empty() => Ok(key.to_string()),
        _ => Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing")),
    }
}

/// A WebSocket connection's life on the node, from the socket hyper handed over, its frames
/// encoded by `C` (JSON text, or MessagePack).
async fn serve<C: Codec>(
    taken: Taken,
    node: Arc<Node>,
    conn: ConnId,
    identity: Identity,
    compressing: Option<Compressing>,
) {
    let Taken { stream, read_ahead } = taken;
    // Copied out: these bytes keep the HTTP server's whole read buffer (8 KiB) alive.
    let socket = Socket::new(&read_ahead, compressing.is_some());
    drop(read_ahead);
    let connection = Connection::open(node, conn, identity, stream, C::with(compressing));
    let transport = Frames::<C>(std::marker::PhantomData);
    connection
        .run(OverSocket::new(socket, transport), None)
        .await;
}

/// fanout's protocol as a WebSocket dialect: the messages the client sends, in encoding `C`;
/// pings and pongs; the close frame.
struct Frames<C>(std::marker::PhantomData<fn() -> C>);

impl<C: Codec> Frames<C> {
    /// Acts on every whole message the socket holds.
    async fn messages(&mut self, socket: &mut Socket, conn: &mut Connection<C>) -> Result<(), End> {
        let max = conn.node.config().max_message_bytes;
        while let Some(message) = socket.next(max, conn.node.budget())? {
            let outbox = &conn.outbox;
            match message {
                Incoming::Text(text) => {
                    // Boxed: answering may await a publish or a replay, whose futures are
                    // large; inline they would sit in every idle connection's task.
                    Box::pin(conn.session.handle(&text, ReplyTo::Stream)).await;
                }
                Incoming::Binary(payload) => match C::binary(&payload) {
                    Ok(text) => Box::pin(conn.session.handle(&text, ReplyTo::Stream)).await,
                    Err(rejection) => outbox.send("error", &rejection.encode()),
                },
                Incoming::Ping(payload) => outbox.send_raw(pong(&payload)),
                Incoming::Pong => {}
                Incoming::Close(code) => return Err(End::ClientClosed(code)),
            }
            conn.written().await?;
        }
        Ok(())
    }
}

impl<C: Codec> Dialect for Frames<C> {
    type Framing = C;

    fn messages(
        &mut self,
        socket: &mut Socket,
        conn: &mut Connection<C>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send {
        Frames::messages(self, socket, conn)
    }

    fn close_frame(&self, end: &End) -> Option<Bytes> {
        match end {
            End::Gone => None,
            // Echo the client's code when it is one that may be sent (RFC 6455 7.4).
            End::ClientClosed(code) => {
                Some(close(code.filter(|&c| may_send(c)).unwrap_or(1000), ""))
            }
            End::Close(reason) => Some(close(reason.code, &reason.close_reason())),
        }
    }
}

/// A WebSocket dialect (fanout's protocol, Pusher's): how it reads its messages from a
/// [`Socket`] and says goodbye; the rest of a WebSocket connection is the same for all
/// ([`OverSocket`]).
pub(crate) trait Dialect: Send {
    type Framing: Framing;

    /// Acts on every whole message `socket` holds.
    fn messages(
        &mut self,
        socket: &mut Socket,
        conn: &mut Connection<Self::Framing>,
    ) -> impl std::future::Future<Output = Result<(), End>> + Send;

    /// The close frame that ends the connection, if any.
    fn close_frame(&self, end: &End) -> Option<Bytes>;
}

/// A dialect's connection over its socket: reading when the socket is readable, the pending
/// message, what it holds, the heartbeat, the close frame.
pub(crate) struct OverSocket<D> {
    socket: Socket,
    dialect: D,
}

impl<D> OverSocket<D> {
    pub fn new(socket: Socket, dialect: D) -> OverSocket<D> {
        OverSocket { socket, dialect }
    }
}

impl<D: Dialect> Transport for OverSocket<D> {
    type Framing = D::Framing;
    type Input = std::io::Result<()>;

    /// What came with the upgrade request, if anything.
    async fn start(&mut self, conn: &mut Connection<D::Framing>) -> Result<(), End> {
        self.dialect.messages(&mut self.socket, conn).await
    }

    async fn input(&mut self, outbox: &Outbox<D::Framing>) -> std::io::Result<()> {
        Socket::readable(outbox).await
    }

    async fn act(
        &mut self,
        readable: std::io::Result<()>,
        conn: &mut Connection<D::Framing>,
    ) -> Result<(), End> {
        if self.socket.read(readable, &conn.outbox)? {
            self.dialect.messages(&mut self.socket, conn).await?;
        }
        Ok(())
    }

    fn pending(&self) -> Option<u64> {
        self.socket.pending()
    }

    fn held(&self) -> usize {
        self.socket.held()
    }

    fn heartbeat(&mut self, conn: &Connection<D::Framing>) -> Result<(), End> {
        self.socket.heartbeat(&conn.outbox)
    }

    fn goodbye(&self, end: &End, outbox: &Outbox<D::Framing>) {
        if let Some(frame) = self.dialect.close_frame(end) {
            outbox.send_raw(frame);
        }
    }
}

/// What every WebSocket dialect (fanout's, Pusher's) does the same way with the socket: the
/// frames the client sends, decoded as they come; which message is pending; pings.
pub(crate) struct Socket {
    decoder: Decoder,
    /// A ping went out and nothing came back since.
    awaiting_pong: bool,
    /// Whole messages so far (which one a pending frame belongs to).
    messages: u64,
}

impl Socket {
    /// A socket whose first bytes came with the upgrade request; `deflate`: it negotiated
    /// permessage-deflate.
    pub fn new(read_ahead: &[u8], deflate: bool) -> Socket {
        let mut decoder = Decoder::default();
        decoder.deflate = deflate;
        decoder.buf.extend_from_slice(read_ahead);
        Socket {
            decoder,
            awaiting_pong: false,
            messages: 0,
        }
    }

    /// The next whole message the decoder holds (anything counts as an answer to a ping), or
    /// the end a broken frame calls for. A compressed message is charged to `budget` while
    /// it inflates.
    pub fn next(&mut self, max: usize, budget: &Arc<Budget>) -> Result<Option<Incoming>, End> {
        let mut charge = None;
        let grow = |bytes: usize| {
            charge
                .get_or_insert_with(|| budget.charge())
                .set(bytes)
                .is_ok()
        };
        let message = match self.decoder.next_within(max, grow) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(FrameError::TooBig(_)) => return Err(End::Close(disconnect::MESSAGE_TOO_BIG)),
            Err(FrameError::OverBudget) => return Err(End::Close(disconnect::TRY_AGAIN_LATER)),
            Err(FrameError::InvalidUtf8 | FrameError::BadDeflate) => {
                return Err(End::Close(disconnect::INVALID_DATA));
            }
            Err(FrameError::Protocol(why)) => {
                tracing::debug!(why, "protocol error");
                return Err(End::Close(disconnect::PROTOCOL_ERROR));
            }
        };
        self.awaiting_pong = false;
        if matches!(message, Incoming::Text(_) | Incoming::Binary(_)) {
            // A whole message is progress: the next pending one gets its own time.
            self.messages += 1;
        }
        Ok(Some(message))
    }

    /// Waits until the outbox's socket has something to read.
    pub async fn readable<F: Framing>(outbox: &Outbox<F>) -> std::io::Result<()> {
        match outbox.stream() {
            Some(stream) => stream.readable().await,
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Reads what the socket has: whether anything came (then the messages are read).
    pub fn read<F: Framing>(
        &mut self,
        readable: std::io::Result<()>,
        outbox: &Outbox<F>,
    ) -> Result<bool, End> {
        let Some(stream) = outbox.stream() else {
            return Err(End::Gone);
        };
        readable.map_err(|_| End::Gone)?;
        match read_into(stream, &mut self.decoder) {
            Ok(0) => Err(End::Gone),
            Ok(_) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(End::Gone),
        }
    }

    pub fn pending(&self) -> Option<u64> {
        (!self.decoder.is_idle()).then_some(self.messages)
    }

    pub fn held(&self) -> usize {
        self.decoder.held()
    }

    /// Pings the client, or ends the connection when the last ping went unanswered.
    pub fn heartbeat<F: Framing>(&mut self, outbox: &Outbox<F>) -> Result<(), End> {
        if self.awaiting_pong {
            return Err(End::Close(disconnect::HEARTBEAT_TIMEOUT));
        }
        self.awaiting_pong = true;
        outbox.send_raw(ping());
        Ok(())
    }
}

/// Reads what the socket has into the decoder, through a buffer on the stack: an idle
/// connection keeps no read buffer (a 4 KiB one per connection, reserved for a read that
/// found nothing, was half of an idle connection's memory).
fn read_into(stream: &TcpStream, decoder: &mut Decoder) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = stream.try_read(&mut chunk)?;
    decoder.buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_server_frames() {
        assert_eq!(&text("hi")[..], b"\x81\x02hi");
        let long = text(&"x".repeat(300));
        assert_eq!(&long[..4], &[0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
        assert_eq!(&close(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
        assert_eq!(close(1000, &"é".repeat(100)).len(), 2 + 2 + 122);
    }

    #[test]
    fn msgpack_frames_are_binary_maps_made_once() {
        let event = Outgoing::event(7, r#"{"op":"event","seq":7,"data":{"x":[1,2.5]}}"#);
        let a = WebSocketMsgpack::default().shared(&event);
        assert_eq!(
            a.as_ptr(),
            WebSocketMsgpack::default().shared(&event).as_ptr()
        );
        assert_eq!(a[0], 0x80 | OP_BINARY);
        let header = if a[1] < 126 { 2 } else { 4 };
        let value: serde_json::Value =
            serde_json::from_str(&crate::msgpack::to_json(&a[header..]).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"op": "event", "seq": 7, "data": {"x": [1, 2.5]}})
        );
        // Text frames are JSON connections' own: a separate framing.
        assert_ne!(WebSocket::default().shared(&event)[0], a[0]);
        assert!(
            WebSocketMsgpack::binary(&a[header..])
                .unwrap()
                .contains(r#""seq":7"#)
        );
        assert!(WebSocketMsgpack::binary(b"\xc1").is_err());
        assert!(WebSocket::binary(&a[header..]).is_err());
    }

    #[test]
    fn an_event_is_framed_once_for_every_connection() {
        let event = Outgoing::event(7, r#"{"op":"event"}"#);
        let a = WebSocket::default().shared(&event);
        let b = WebSocket::default().shared(&event);
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "one text frame for every connection"
        );
        assert_eq!(&a[..2], &[0x81, 14]);
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
