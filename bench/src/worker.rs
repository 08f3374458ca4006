//! A load-generator worker: a child process (`fanout-bench worker '<job>'`) that holds its
//! share of the WebSocket clients, from its own source address (one address gives ~28,000
//! ephemeral ports, one process ~20,000 open files on this machine).
//!
//! Talks to the coordinator with JSON lines: it prints `Ready` once its clients are connected
//! (and subscribed), then `Progress` every 250 ms; a line on stdin (the [`Stop`]: how many
//! events were published on each channel) makes it print `Done` with its counts and latency
//! histogram, and exit.
//!
//! Clients speak either fanout's protocol or, for the baseline, NATS's own protocol over
//! nats-server's WebSocket port (`CONNECT`, `SUB`, `PING`; events arrive as `MSG`, several
//! per frame when the server has them). Both over the same hand-rolled WebSocket client, so
//! the load generator does the same, small, work per frame for both.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
};

use fanout_testkit::raw;

use crate::hist::Histogram;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// fanout over WebSocket.
    Fanout,
    /// fanout over server-sent events (`GET /sse`, channels in the URL).
    FanoutSse,
    /// fanout over long-polling (`GET /poll` with the cursor, one keep-alive connection each).
    FanoutPoll,
    /// nats-server's WebSocket port.
    Nats,
    /// fanout over WebTransport (`https://<node>/wt#<certificate hash>`).
    FanoutWt,
    /// fanout over WebSocket with the `fanout.msgpack` subprotocol (MessagePack frames).
    FanoutMsgpack,
    /// fanout over WebSocket in Pusher's protocol (`/app/{key}`), publishing through
    /// `POST /apps/{id}/events`.
    FanoutPusher,
    /// Sockudo (a Pusher-protocol server), the same clients and publishes as
    /// [`Target::FanoutPusher`].
    Sockudo,
    /// fanout over WebSocket with JSON frames and permessage-deflate negotiated.
    FanoutDeflate,
}

impl Target {
    /// Speaks Pusher's protocol.
    pub fn is_pusher(self) -> bool {
        matches!(self, Target::FanoutPusher | Target::Sockudo)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Subscribe and record every event.
    Record,
    /// Subscribe and hold the connection.
    Idle,
    /// Connect as fast as possible (handshake + first frame) and hold.
    Storm,
    /// Connect, subscribe to a channel of its own (`j<i>`) and hold: a join storm.
    Join,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub target: Target,
    pub mode: Mode,
    pub urls: Vec<String>,
    pub source: IpAddr,
    /// Global index of this worker's first client (channels depend on it).
    pub first: usize,
    pub clients: usize,
    /// 0: every client in `bench`. Otherwise each client in its own channel `c<i>` and in
    /// one of `shared` shared channels `s<i % shared>`.
    pub shared: usize,
    /// Connection attempts in flight.
    pub concurrency: usize,
}

/// The channels of client `i`.
pub fn channels_of(i: usize, shared: usize) -> Vec<String> {
    if shared == 0 {
        vec!["bench".to_string()]
    } else {
        vec![format!("c{i}"), format!("s{}", i % shared)]
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Out {
    Ready { ok: usize, failed: usize, secs: f64 },
    Progress { received: u64 },
    Done(Report),
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub received: u64,
    pub duplicates: u64,
    pub missing: u64,
    /// Connections the server closed (slow consumer, ...) or that failed.
    pub lost: usize,
    pub buckets: Vec<(u32, u64)>,
    pub max: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stop {
    pub published: HashMap<String, u64>,
}

fn say(out: &Out) {
    println!("{}", serde_json::to_string(out).unwrap());
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// What one client saw, per channel.
#[derive(Default)]
pub(crate) struct Seen {
    channels: Vec<(String, Vec<u64>, u64)>, // name, bitset of n, distinct
    received: u64,
    duplicates: u64,
}

impl Seen {
    pub(crate) fn new(channels: Vec<String>) -> Seen {
        Seen {
            channels: channels.into_iter().map(|c| (c, Vec::new(), 0)).collect(),
            ..Seen::default()
        }
    }

    /// Each channel with the distinct events seen on it, and the duplicates over all.
    pub(crate) fn counts(&self) -> (Vec<(&str, u64)>, u64) {
        let distinct = self
            .channels
            .iter()
            .map(|(name, _, distinct)| (name.as_str(), *distinct))
            .collect();
        (distinct, self.duplicates)
    }

    pub(crate) fn saw(&mut self, channel: &[u8], n: u64) {
        self.received += 1;
        let Some((_, bits, distinct)) = self
            .channels
            .iter_mut()
            .find(|(name, _, _)| name.as_bytes() == channel)
        else {
            return;
        };
        let (word, bit) = ((n / 64) as usize, n % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
        } else {
            bits[word] |= 1 << bit;
            *distinct += 1;
        }
    }
}

struct Shared {
    hist: Histogram,
    received: u64,
    report: Report,
}

/// Finds `key` (e.g. `"n":`) in `text` from `from` and parses the number after it.
pub(crate) fn number_after(text: &[u8], key: &[u8], from: usize) -> Option<(u64, usize)> {
    let at = from + text[from..].windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()?;
    Some((n, at + digits))
}

/// `{"t":<send µs>,"n":<index>,...}`: the payload every benchmark event carries.
fn payload(text: &[u8], from: usize) -> Option<(u64, u64)> {
    let (t, at) = number_after(text, b"{\"t\":", from)?;
    let (n, _) = number_after(text, b"\"n\":", at)?;
    Some((t, n))
}

/// A fanout event frame: (channel, t, n). Fast path: no JSON parse.
pub(crate) fn fanout_event(text: &[u8]) -> Option<(&[u8], u64, u64)> {
    if !text.starts_with(br#"{"op":"event","channel":""#) {
        return None;
    }
    let start = br#"{"op":"event","channel":""#.len();
    let end = start + text[start..].iter().position(|&b| b == b'"')?;
    let data = end + text[end..].windows(8).position(|w| w == b"\"data\":{")? + 7;
    let (t, n) = payload(text, data)?;
    Some((&text[start..end], t, n))
}

/// A Pusher event frame (fanout's or Sockudo's): (channel, t, n), the payload a JSON string
/// in `data`. Fast path: no JSON parse.
fn pusher_event(text: &[u8]) -> Option<(&[u8], u64, u64)> {
    let find = |key: &[u8]| text.windows(key.len()).position(|w| w == key);
    let start = find(br#""channel":""#)? + br#""channel":""#.len();
    let end = start + text[start..].iter().position(|&b| b == b'"')?;
    let data = find(br#""data":""#)?;
    let (t, at) = number_after(text, br#"{\"t\":"#, data)?;
    let (n, _) = number_after(text, br#"\"n\":"#, at)?;
    Some((&text[start..end], t, n))
}

/// A fanout event frame in MessagePack: (channel, t, n) (decoded: the load generator's cost,
/// not the servers').
fn msgpack_event(frame: &[u8]) -> Option<(Vec<u8>, u64, u64)> {
    let value = rmpv::decode::read_value(&mut &frame[..]).ok()?;
    let field = |map: &rmpv::Value, name: &str| -> Option<rmpv::Value> {
        map.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v.clone())
    };
    if field(&value, "op")?.as_str()? != "event" {
        return None;
    }
    let channel = field(&value, "channel")?.as_str()?.as_bytes().to_vec();
    let data = field(&value, "data")?;
    Some((
        channel,
        field(&data, "t")?.as_u64()?,
        field(&data, "n")?.as_u64()?,
    ))
}

/// A request as a MessagePack map of strings.
fn msgpack_request(fields: &[(&str, &str)]) -> Vec<u8> {
    let map = fields
        .iter()
        .map(|(k, v)| (rmpv::Value::from(*k), rmpv::Value::from(*v)))
        .collect();
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &rmpv::Value::Map(map)).expect("a Vec takes it");
    out
}

/// A client's socket after the WebSocket handshake, read and written without a WebSocket
/// library: the load generator shares the cores with the servers, and parsing unmasked server
/// frames by hand costs a fraction of a general-purpose stream's per-message work.
pub(crate) struct Socket {
    stream: TcpStream,
    /// Bytes read and not yet parsed.
    buf: Vec<u8>,
    /// What the bytes are: WebSocket frames, or an SSE stream (whose events [`Socket::frames`]
    /// hands out as text frames: the `data` of each, opcode 0x8 for `disconnect`).
    sse: bool,
}

/// A compressed message (RFC 7692: raw deflate, its sync flush's tail taken off), inflated
/// with one inflater per thread, reset for each message (no context takeover).
fn inflate(payload: &[u8]) -> Vec<u8> {
    thread_local! {
        static INFLATER: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
    }
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(false);
        let mut input = Vec::with_capacity(payload.len() + 4);
        input.extend_from_slice(payload);
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(payload.len() * 8 + 64);
        loop {
            let at = inflater.total_in() as usize;
            let status =
                inflater.decompress_vec(&input[at..], &mut out, flate2::FlushDecompress::Sync);
            let done = inflater.total_in() as usize == input.len() && out.len() < out.capacity();
            if status.is_err() || done {
                return out;
            }
            out.reserve(out.capacity());
        }
    })
}

/// A frame from the server: (opcode, payload).
type ServerFrame<'a> = (u8, &'a [u8]);

impl Socket {
    /// Sends one masked client frame (the mask is all zeros: allowed, and free to apply).
    pub(crate) async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let frame = raw::frame_with(0x80 | opcode, payload, Some([0; 4]));
        self.stream
            .write_all(&frame)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads more bytes; false when the connection ended.
    pub(crate) async fn fill(&mut self) -> bool {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// Calls `on` for each complete frame in the buffer, then drops them from it.
    pub(crate) fn frames(&mut self, mut on: impl FnMut(ServerFrame<'_>)) {
        if self.sse {
            return self.sse_events(on);
        }
        let buf = &self.buf[..];
        let mut at = 0;
        // A malformed frame (a masked one) ends the parse: the rest never completes.
        while let Ok(Some(frame)) = raw::parse(&buf[at..]) {
            let payload = &buf[at..][frame.payload];
            match frame.rsv1 {
                // Compressed (permessage-deflate): inflated, the load generator's cost.
                true => on((frame.opcode, &inflate(payload))),
                false => on((frame.opcode, payload)),
            }
            at += frame.len;
        }
        self.buf.drain(..at);
    }

    /// SSE: each complete event (a block ending with an empty line) as a frame.
    fn sse_events(&mut self, mut on: impl FnMut(ServerFrame<'_>)) {
        let buf = &self.buf[..];
        let mut at = 0;
        while let Some(end) = buf[at..].windows(2).position(|w| w == b"\n\n") {
            let block = &buf[at..at + end];
            let mut data: &[u8] = b"";
            let mut disconnect = false;
            for line in block.split(|&b| b == b'\n') {
                if let Some(rest) = line.strip_prefix(b"data: ") {
                    data = rest;
                } else if line == b"event: disconnect" {
                    disconnect = true;
                }
            }
            if disconnect {
                on((0x8, data));
            } else if !data.is_empty() {
                on((0x1, data));
            }
            at += end + 2;
        }
        self.buf.drain(..at);
    }

    /// Sends a WebSocket frame (nothing: an SSE stream carries nothing the other way).
    async fn answer(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        if self.sse {
            return Ok(());
        }
        self.send(opcode, payload).await
    }

    /// Reads until `done` accepts a frame's payload (answering pings meanwhile).
    pub(crate) async fn until(
        &mut self,
        mut done: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), String> {
        loop {
            let mut found = false;
            let mut ping = false;
            self.frames(|(opcode, payload)| match opcode {
                0x9 => ping = true,
                _ => found |= done(payload),
            });
            if ping {
                self.answer(0xA, b"").await?;
            }
            if found {
                return Ok(());
            }
            if !self.fill().await {
                return Err("the connection ended".into());
            }
        }
    }
}

/// A TCP connection to the node of `url` (`ws://host:port/...`) from `source`; returns it
/// with the node's authority.
async fn dial(url: &str, source: IpAddr) -> Result<(Socket, String), String> {
    let rest = url.trim_start_matches("ws://");
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a).to_string();
    let addr: SocketAddr = authority.parse().map_err(|e| format!("{url}: {e}"))?;
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| e.to_string())?;
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let socket = Socket {
        stream,
        buf: Vec::new(),
        sse: false,
    };
    Ok((socket, authority))
}

impl Socket {
    /// Sends `request` and reads the answer's head (up to the empty line), which must start
    /// with `status`; returns the head.
    async fn head(&mut self, request: &str, status: &str) -> Result<String, String> {
        raw::read_head(&mut self.stream, &mut self.buf, request.as_bytes(), status).await
    }
}

pub(crate) async fn open(url: &str, source: IpAddr, msgpack: bool) -> Result<Socket, String> {
    open_with(url, source, msgpack, false).await
}

/// [`open`], offering permessage-deflate when `deflate`.
async fn open_with(
    url: &str,
    source: IpAddr,
    msgpack: bool,
    deflate: bool,
) -> Result<Socket, String> {
    let (mut socket, authority) = dial(url, source).await?;
    let path = url
        .trim_start_matches("ws://")
        .split_once('/')
        .map_or("", |(_, p)| p);
    let mut request = raw::upgrade(&authority, &format!("/{path}"));
    if msgpack {
        request.truncate(request.len() - 2);
        request.push_str("Sec-WebSocket-Protocol: fanout.msgpack\r\n\r\n");
    }
    if deflate {
        request.truncate(request.len() - 2);
        request.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n");
    }
    socket.head(&request, "HTTP/1.1 101").await?;
    Ok(socket)
}

/// `?channel=a&channel=b`.
fn channel_query(channels: &[String]) -> String {
    channels
        .iter()
        .map(|c| format!("channel={c}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// An SSE stream on `channels`, read up to its `welcome`.
async fn open_sse(url: &str, source: IpAddr, channels: &[String]) -> Result<Socket, String> {
    let (mut socket, authority) = dial(url, source).await?;
    let request = format!(
        "GET /sse?{} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n",
        channel_query(channels)
    );
    socket.head(&request, "HTTP/1.0 200").await?;
    socket.sse = true;
    socket.until(|f| contains(f, b"\"welcome\"")).await?;
    Ok(socket)
}

/// A long-polling client: its keep-alive connection, what it follows and its cursor.
struct Poller {
    socket: Socket,
    authority: String,
    channels: String,
    cursor: String,
}

/// A poll's answer: the events as they are, and the cursor.
#[derive(Deserialize)]
struct PollAnswer<'a> {
    #[serde(borrow)]
    events: Vec<&'a serde_json::value::RawValue>,
    cursor: String,
}

impl Poller {
    /// The first poll (`timeout=0`): where the client starts from.
    async fn start(url: &str, source: IpAddr, channels: &[String]) -> Result<Poller, String> {
        let (socket, authority) = dial(url, source).await?;
        let mut poller = Poller {
            socket,
            authority,
            channels: channel_query(channels),
            cursor: String::new(),
        };
        poller.poll(0, |_| {}).await?;
        Ok(poller)
    }

    /// One poll: calls `on` with each event's JSON, moves the cursor on.
    async fn poll(&mut self, timeout: u32, mut on: impl FnMut(&[u8])) -> Result<(), String> {
        let cursor = match self.cursor.is_empty() {
            true => String::new(),
            false => format!("&cursor={}", self.cursor),
        };
        let request = format!(
            "GET /poll?{}{cursor}&timeout={timeout} HTTP/1.1\r\nHost: {}\r\n\r\n",
            self.channels, self.authority
        );
        let head = self.socket.head(&request, "HTTP/1.1 200").await?;
        let length =
            crate::http1::content_length(&head).ok_or("a poll answer without Content-Length")?;
        while self.socket.buf.len() < length {
            if !self.socket.fill().await {
                return Err("the connection ended".into());
            }
        }
        let body: Vec<u8> = self.socket.buf.drain(..length).collect();
        let answer: PollAnswer = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        for event in &answer.events {
            on(event.get().as_bytes());
        }
        self.cursor = answer.cursor;
        Ok(())
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A connected client.
enum Conn {
    Socket(Socket),
    Poller(Poller),
    Wt(Box<Wt>),
}

/// A WebTransport client: its session, and the stream the protocol's frames travel on, each
/// after its length as a QUIC varint; volatile events come as datagrams too.
struct Wt {
    session: web_transport_quinn::Session,
    send: web_transport_quinn::SendStream,
    recv: web_transport_quinn::RecvStream,
    buf: Vec<u8>,
}

impl Wt {
    async fn open(url: &str, channels: &[String]) -> Result<Wt, String> {
        let mut url: url::Url = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let hash = url.fragment().unwrap_or_default().to_string();
        url.set_fragment(None);
        let hash: Vec<u8> = (0..hash.len())
            .step_by(2)
            .filter_map(|i| u8::from_str_radix(hash.get(i..i + 2)?, 16).ok())
            .collect();
        let client = web_transport_quinn::ClientBuilder::new()
            .with_server_certificate_hashes(vec![hash])
            .map_err(|e| e.to_string())?;
        let session = client.connect(url).await.map_err(|e| e.to_string())?;
        let (send, recv) = session.open_bi().await.map_err(|e| e.to_string())?;
        let mut wt = Wt {
            session,
            send,
            recv,
            buf: Vec::new(),
        };
        let mut out = vec![0u8]; // the stream reaches the node with its first bytes
        for channel in channels {
            let request = format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#);
            out.extend(varint(request.len()));
            out.extend_from_slice(request.as_bytes());
        }
        wt.send.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut left = channels.len();
        while left > 0 {
            if !wt.fill().await {
                return Err("the session ended".into());
            }
            wt.frames(|f| {
                if contains(f, b"\"subscribed\"") {
                    left -= 1;
                }
            });
        }
        Ok(wt)
    }

    async fn fill(&mut self) -> bool {
        match self.recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                self.buf.extend_from_slice(&chunk.bytes);
                true
            }
            _ => false,
        }
    }

    /// Calls `on` with each whole frame read, and drops it.
    fn frames(&mut self, mut on: impl FnMut(&[u8])) {
        let mut at = 0;
        while let Some((len, header)) =
            fanout_ws::transport::webtransport::read_varint(&self.buf[at..])
        {
            let end = at + header + len as usize;
            if end > self.buf.len() {
                break;
            }
            on(&self.buf[at + header..end]);
            at = end;
        }
        self.buf.drain(..at);
    }
}

fn varint(n: usize) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    fanout_ws::transport::webtransport::put_varint(&mut out, n as u64);
    out.to_vec()
}

/// The channels client `i` of `job` follows.
fn job_channels(job: &Job, i: usize) -> Vec<String> {
    match job.mode {
        Mode::Join => vec![format!("j{}", job.first + i)],
        Mode::Storm => Vec::new(),
        _ => channels_of(job.first + i, job.shared),
    }
}

/// Connects one client and gets it to the point the mode asks for.
async fn connect(job: &Job, i: usize) -> Result<Conn, String> {
    let url = &job.urls[i % job.urls.len()];
    match job.target {
        Target::FanoutSse => {
            let channels = job_channels(job, i);
            return Ok(Conn::Socket(open_sse(url, job.source, &channels).await?));
        }
        Target::FanoutPoll => {
            let channels = job_channels(job, i);
            return Ok(Conn::Poller(
                Poller::start(url, job.source, &channels).await?,
            ));
        }
        Target::FanoutWt => {
            let channels = match job.mode {
                Mode::Storm => Vec::new(),
                _ => job_channels(job, i),
            };
            return Ok(Conn::Wt(Box::new(Wt::open(url, &channels).await?)));
        }
        Target::Fanout | Target::FanoutMsgpack | Target::Nats | Target::FanoutDeflate => {}
        Target::FanoutPusher | Target::Sockudo => {
            let mut ws = open(url, job.source, false).await?;
            ws.until(|f| contains(f, b"pusher:connection_established"))
                .await?;
            if job.mode != Mode::Storm {
                let requests = job_channels(job, i).into_iter().map(|channel| {
                    format!(r#"{{"event":"pusher:subscribe","data":{{"channel":"{channel}"}}}}"#)
                });
                subscribe_all(&mut ws, requests, b"subscription_succeeded").await?;
            }
            return Ok(Conn::Socket(ws));
        }
    }
    let mut ws = open_with(
        url,
        job.source,
        job.target == Target::FanoutMsgpack,
        job.target == Target::FanoutDeflate,
    )
    .await?;
    let subscribe = job.mode != Mode::Storm;
    match job.target {
        Target::FanoutSse
        | Target::FanoutPoll
        | Target::FanoutWt
        | Target::FanoutPusher
        | Target::Sockudo => unreachable!(),
        Target::FanoutMsgpack => {
            // MessagePack strings are their UTF-8 bytes: the ops show as they are.
            ws.until(|f| contains(f, b"welcome")).await?;
            if subscribe {
                let channels = job_channels(job, i);
                for channel in &channels {
                    let request = msgpack_request(&[("op", "subscribe"), ("channel", channel)]);
                    ws.send(0x2, &request).await?;
                }
                let mut left = channels.len();
                ws.until(|f| {
                    if contains(f, b"subscribed") {
                        left -= 1;
                    }
                    left == 0
                })
                .await?;
            }
        }
        Target::Fanout | Target::FanoutDeflate => {
            ws.until(|f| contains(f, b"\"welcome\"")).await?;
            if subscribe {
                let requests = job_channels(job, i)
                    .into_iter()
                    .map(|channel| format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#));
                subscribe_all(&mut ws, requests, b"\"subscribed\"").await?;
            }
        }
        Target::Nats => {
            ws.until(|f| f.starts_with(b"INFO")).await?;
            let mut hello = String::from(
                "CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false,\"name\":\"bench\",\"lang\":\"rust\",\"version\":\"0\"}\r\n",
            );
            if subscribe {
                for (sid, channel) in channels_of(job.first + i, job.shared).iter().enumerate() {
                    hello.push_str(&format!("SUB {channel} {}\r\n", sid + 1));
                }
            }
            hello.push_str("PING\r\n");
            ws.send(0x2, hello.as_bytes()).await?;
            // The PONG proves the server processed the SUBs.
            ws.until(|f| contains(f, b"PONG")).await?;
        }
    }
    Ok(Conn::Socket(ws))
}

/// Sends each text request (a subscribe) and waits for as many frames holding `answered`.
async fn subscribe_all(
    ws: &mut Socket,
    requests: impl Iterator<Item = String>,
    answered: &[u8],
) -> Result<(), String> {
    let mut left = 0;
    for request in requests {
        ws.send(0x1, request.as_bytes()).await?;
        left += 1;
    }
    if left == 0 {
        return Ok(());
    }
    ws.until(|f| {
        if contains(f, answered) {
            left -= 1;
        }
        left == 0
    })
    .await
}

/// Counts the frames `ws` has read: latency, deliveries and the sequences seen. Returns
/// whether the server pinged and whether it closed. (A function of its own so that the
/// `RefCell` borrow visibly ends before the caller awaits.)
fn count(
    ws: &mut Socket,
    target: Target,
    seen: &mut Seen,
    shared: &RefCell<Shared>,
    pending: &mut Vec<u8>,
) -> (bool, bool) {
    let now = now_us();
    let mut shared = shared.borrow_mut();
    let mut pong = false;
    let mut closed = false;
    ws.frames(|(opcode, data)| match (opcode, target) {
        (0x9, _) => pong = true,
        (0x8, _) => closed = true,
        (
            _,
            Target::Fanout
            | Target::FanoutSse
            | Target::FanoutPoll
            | Target::FanoutWt
            | Target::FanoutDeflate,
        ) => {
            if let Some((channel, t, n)) = fanout_event(data) {
                shared.hist.record(now.saturating_sub(t));
                shared.received += 1;
                seen.saw(channel, n);
            }
        }
        (_, Target::FanoutPusher | Target::Sockudo) => {
            if let Some((channel, t, n)) = pusher_event(data) {
                shared.hist.record(now.saturating_sub(t));
                shared.received += 1;
                seen.saw(channel, n);
            }
        }
        (_, Target::FanoutMsgpack) => {
            if let Some((channel, t, n)) = msgpack_event(data) {
                shared.hist.record(now.saturating_sub(t));
                shared.received += 1;
                seen.saw(&channel, n);
            }
        }
        (_, Target::Nats) => pending.extend_from_slice(data),
    });
    if target == Target::Nats && !pending.is_empty() {
        let used = nats_messages(pending, |subject, payload_bytes| match payload_bytes {
            Some(p) => {
                if let Some((t, n)) = payload(p, 0) {
                    shared.hist.record(now.saturating_sub(t));
                    shared.received += 1;
                    seen.saw(subject, n);
                }
            }
            None => pong = true,
        });
        pending.drain(..used);
    }
    (pong, closed)
}

/// Records events until `stop`.
async fn record(
    mut ws: Socket,
    target: Target,
    mut seen: Seen,
    shared: Rc<RefCell<Shared>>,
    mut stop: watch::Receiver<Option<Rc<Stop>>>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut lost = false;
    loop {
        tokio::select! {
            more = ws.fill() => {
                if !more {
                    lost = true;
                    break;
                }
                let (pong, closed) = count(&mut ws, target, &mut seen, &shared, &mut pending);
                if closed {
                    lost = true;
                    break;
                }
                if pong {
                    let answer: &[u8] = if target == Target::Nats { b"PONG\r\n" } else { b"" };
                    let opcode = if target == Target::Nats { 0x2 } else { 0xA };
                    let _ = ws.answer(opcode, answer).await;
                }
            }
            _ = stop.changed() => break,
        }
    }
    account(seen, lost, &shared, stop).await;
}

/// Records a WebTransport client's events until `stop`: frames on its stream and datagrams.
async fn record_wt(
    mut wt: Wt,
    mut seen: Seen,
    shared: Rc<RefCell<Shared>>,
    mut stop: watch::Receiver<Option<Rc<Stop>>>,
) {
    let mut lost = false;
    let session = wt.session.clone();
    let on = |event: &[u8], seen: &mut Seen| {
        if let Some((channel, t, n)) = fanout_event(event) {
            let mut shared = shared.borrow_mut();
            shared.hist.record(now_us().saturating_sub(t));
            shared.received += 1;
            seen.saw(channel, n);
        }
    };
    loop {
        tokio::select! {
            more = wt.fill() => {
                if !more {
                    lost = true;
                    break;
                }
                let seen = &mut seen;
                wt.frames(|frame| on(frame, seen));
            }
            datagram = session.read_datagram() => match datagram {
                Ok(datagram) => on(&datagram, &mut seen),
                Err(_) => {
                    lost = true;
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    account(seen, lost, &shared, stop).await;
}

/// Records a long-polling client's events until `stop`: poll after poll, with the cursor.
async fn record_poll(
    mut poller: Poller,
    mut seen: Seen,
    shared: Rc<RefCell<Shared>>,
    mut stop: watch::Receiver<Option<Rc<Stop>>>,
) {
    let mut lost = false;
    loop {
        let polled = {
            let (seen, shared) = (&mut seen, &shared);
            poller.poll(25, move |event| {
                if let Some((channel, t, n)) = fanout_event(event) {
                    let mut shared = shared.borrow_mut();
                    shared.hist.record(now_us().saturating_sub(t));
                    shared.received += 1;
                    seen.saw(channel, n);
                }
            })
        };
        tokio::select! {
            result = polled => {
                if result.is_err() {
                    lost = true;
                    break;
                }
            }
            _ = stop.changed() => break,
        }
    }
    account(seen, lost, &shared, stop).await;
}

/// Adds what one client saw to the worker's report, once the stop says what was published.
async fn account(
    seen: Seen,
    lost: bool,
    shared: &Rc<RefCell<Shared>>,
    mut stop: watch::Receiver<Option<Rc<Stop>>>,
) {
    // Wait for the stop (if the connection was lost first), then account.
    let stop = loop {
        if let Some(stop) = stop.borrow().clone() {
            break stop;
        }
        if stop.changed().await.is_err() {
            return;
        }
    };
    let mut shared = shared.borrow_mut();
    let report = &mut shared.report;
    report.received += seen.received;
    report.duplicates += seen.duplicates;
    report.lost += usize::from(lost);
    for (channel, _, distinct) in &seen.channels {
        let published = stop.published.get(channel).copied().unwrap_or(0);
        report.missing += published.saturating_sub(*distinct);
    }
}

/// Parses complete NATS protocol lines in `buf`: calls `on` with (subject, Some(payload)) for
/// each `MSG` and (b"", None) for each `PING`. Returns the bytes consumed.
fn nats_messages<F: FnMut(&[u8], Option<&[u8]>)>(buf: &[u8], mut on: F) -> usize {
    let mut at = 0;
    while let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[at..at + end];
        if let Some(rest) = line.strip_prefix(b"MSG ") {
            let fields: Vec<&[u8]> = rest.split(|&b| b == b' ').collect();
            let size: usize = std::str::from_utf8(fields.last().copied().unwrap_or(b"0"))
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let body = at + end + 2;
            if buf.len() < body + size + 2 {
                return at; // the payload is not all here yet
            }
            on(fields[0], Some(&buf[body..body + size]));
            at = body + size + 2;
        } else {
            if line == b"PING" {
                on(b"", None);
            }
            at += end + 2;
        }
    }
    at
}

/// Runs one job (the `worker` command).
pub fn run(job: Job) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, work(job));
}

async fn work(job: Job) {
    let shared = Rc::new(RefCell::new(Shared {
        hist: Histogram::default(),
        received: 0,
        report: Report::default(),
    }));
    let (stop_tx, stop_rx) = watch::channel::<Option<Rc<Stop>>>(None);
    let started = Instant::now();
    let mut held = Vec::new();
    let mut held_wt = Vec::new();
    let mut failed = 0;
    let mut next = 0;
    let mut connecting = futures_util::stream::FuturesUnordered::new();
    let job = Rc::new(job);
    let mut tasks = Vec::new();
    while next < job.clients || !connecting.is_empty() {
        while next < job.clients && connecting.len() < job.concurrency {
            let (job, i) = (job.clone(), next);
            connecting.push(async move { (i, connect(&job, i).await) });
            next += 1;
        }
        match connecting.next().await {
            Some((i, Ok(conn))) => {
                let seen = Seen::new(channels_of(job.first + i, job.shared));
                let (shared, stop) = (shared.clone(), stop_rx.clone());
                match (job.mode, conn) {
                    (Mode::Record, Conn::Socket(ws)) => tasks.push(tokio::task::spawn_local(
                        record(ws, job.target, seen, shared, stop),
                    )),
                    (Mode::Record, Conn::Poller(poller)) => tasks.push(tokio::task::spawn_local(
                        record_poll(poller, seen, shared, stop),
                    )),
                    (Mode::Record, Conn::Wt(wt)) => {
                        tasks.push(tokio::task::spawn_local(record_wt(*wt, seen, shared, stop)))
                    }
                    (_, Conn::Wt(wt)) => held_wt.push(wt),
                    (_, Conn::Socket(ws)) => held.push(ws),
                    // An idle poller is a poll that waits: held like a socket.
                    (_, Conn::Poller(poller)) => held.push(poller.socket),
                }
            }
            Some((_, Err(err))) => {
                if failed < 3 {
                    eprintln!("worker: {err}");
                }
                failed += 1;
            }
            None => {}
        }
    }
    say(&Out::Ready {
        ok: held.len() + held_wt.len() + tasks.len(),
        failed,
        secs: started.elapsed().as_secs_f64(),
    });
    // Held connections: answered only if the server pings (NATS, every 2 minutes).
    let target = job.target;
    for mut ws in held {
        let stop = stop_rx.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut stop = stop;
            loop {
                tokio::select! {
                    more = ws.fill() => {
                        if !more {
                            break;
                        }
                        let mut ping = false;
                        ws.frames(|(opcode, data)| ping |= opcode == 0x9 || contains(data, b"PING\r\n"));
                        ws.buf = Vec::new();
                        if ping {
                            let (opcode, answer): (u8, &[u8]) = if target == Target::Nats { (0x2, b"PONG\r\n") } else { (0xA, b"") };
                            let _ = ws.answer(opcode, answer).await;
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        }));
    }
    // Held sessions: read (nothing comes) until the stop, so that QUIC keeps them open.
    for mut wt in held_wt {
        let mut stop = stop_rx.clone();
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                tokio::select! {
                    more = wt.fill() => if !more { break } else { wt.buf.clear() },
                    _ = stop.changed() => break,
                }
            }
        }));
    }
    let progress = {
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let received = shared.borrow().received;
                say(&Out::Progress { received });
            }
        })
    };
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let _ = stdin.read_line(&mut line).await;
    let stop: Stop = serde_json::from_str(&line).unwrap_or(Stop {
        published: HashMap::new(),
    });
    progress.abort();
    let _ = stop_tx.send(Some(Rc::new(stop)));
    for task in tasks {
        let _ = task.await;
    }
    let mut shared = shared.borrow_mut();
    let hist = std::mem::take(&mut shared.hist);
    let mut report = std::mem::take(&mut shared.report);
    report.buckets = hist.sparse();
    report.max = hist.max;
    say(&Out::Done(report));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_without_json() {
        let frame = br#"{"op":"event","channel":"c7","seq":12,"id":"x","ts":1,"data":{"t":1700000000000000,"n":42,"p":"xx"}}"#;
        assert_eq!(
            fanout_event(frame),
            Some((&b"c7"[..], 1_700_000_000_000_000, 42))
        );
        assert_eq!(fanout_event(br#"{"op":"subscribed","channel":"c7"}"#), None);
        let stream =
            b"MSG bench 1 19\r\n{\"t\":5,\"n\":7,\"p\":1}\r\nPING\r\nMSG bench 1 18\r\n{\"t\":6,";
        let mut seen = Vec::new();
        let used = nats_messages(stream, |s, p| {
            seen.push((s.to_vec(), p.and_then(|p| payload(p, 0))))
        });
        assert_eq!(
            seen,
            [(b"bench".to_vec(), Some((5, 7))), (Vec::new(), None)]
        );
        assert_eq!(&stream[used..], b"MSG bench 1 18\r\n{\"t\":6,");
    }
}
