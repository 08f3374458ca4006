//! How bytes reach a connection.
//!
//! - [`Sink`]: what the hub holds for each connection and offers live frames to. Offering
//!   never blocks and never fails: a connection that cannot keep up is cut off ([`Kick`],
//!   tokio-console's `Watch::update` drops full watchers the same way).
//! - [`Conduit`]: what a session needs of its connection besides: a way out for its replies,
//!   for replayed events, holding live frames back while it subscribes, and which channels it
//!   is in (a frame of a channel the connection has left is never written).
//! - [`Outgoing`]: one frame for every kind of connection. Its JSON is made once; each
//!   transport's framing of it is made the first time a connection of that kind needs it, and
//!   then shared by every connection of that kind.
//! - [`Outbox`]: the conduit over a socket, whatever the [`Framing`] (WebSocket frames, SSE
//!   events). Whoever offers a frame writes it straight into the socket (one `writev` for
//!   frames that arrive together, no task woken, nothing copied per recipient); only what the
//!   socket does not take waits in a backlog that the connection's task writes out, several
//!   frames per system call, when the socket is writable. Frames and bytes waiting are
//!   bounded: beyond either, the client is cut off as a slow consumer (4001).
//!
//! Every write to one socket goes through one lock, so frames never interleave. While the
//! connection replays history for a resuming subscribe, live frames are held and then
//! released behind the replay, without those the replay already covered.
//!
//! It knows neither NATS nor the hub: frames are bytes, channels are [`ChannelKey`]s.

use std::{
    cell::OnceCell,
    collections::VecDeque,
    fmt,
    io::{self, IoSlice},
    sync::{Arc, LazyLock, Mutex, OnceLock},
};

use bytes::Bytes;
use smallvec::SmallVec;
use tokio::{net::TcpStream, sync::Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    budget::Charge,
    disconnect::{self, Disconnect},
    position::{ChannelKey, Mark, Position, mark},
};

/// `broadcast` reaches every connection without subscribing.
static BROADCAST: LazyLock<ChannelKey> =
    LazyLock::new(|| crate::position::channel_key(fanout::channel::BROADCAST));

/// Most slices one system call writes.
const MAX_IOV: usize = 64;

/// Asks a connection to close with a given code. The connection's task watches the token.
#[derive(Debug, Clone)]
pub struct Kick {
    token: CancellationToken,
    reason: Arc<OnceLock<Disconnect>>,
}

impl Kick {
    pub fn new(token: CancellationToken) -> Self {
        Kick {
            token,
            reason: Arc::new(OnceLock::new()),
        }
    }

    /// Records `reason` and cancels the token. Returns false if the connection was already
    /// kicked (the first reason wins).
    pub fn kick(&self, reason: Disconnect) -> bool {
        let first = self.reason.set(reason).is_ok();
        self.token.cancel();
        first
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Why the token was cancelled: a kick's reason, else the node is shutting down.
    pub fn reason(&self) -> Disconnect {
        self.reason.get().cloned().unwrap_or(disconnect::GOING_AWAY)
    }
}

/// What happened to frames offered to a channel's subscribers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Frames written (or queued), over all connections.
    pub delivered: usize,
    /// Connections that got them.
    pub recipients: usize,
    /// Bytes of those frames.
    pub bytes: usize,
    /// This many connections were cut off as slow consumers.
    pub slow: usize,
}

/// How many framings of a frame can be shared between connections ([`Outgoing::framed`]):
/// one slot per transport whose connections all write the same bytes for a frame
/// (WebSocket's text frame, SSE's `event:`/`data:` lines, WebTransport's length-prefixed
/// frame, WebSocket's MessagePack binary frame, WebTransport's length-prefixed MessagePack,
/// Pusher's text frame, and the three WebSocket ones compressed: permessage-deflate; then
/// WebSocket's JSON and MessagePack, plain and compressed, with their deltas).
pub const SLOTS: usize = 13;

/// What a client that takes a channel's deltas (`"delta":"fossil"`) gets instead of an
/// event's frame: its data as a string, and, when the channel's event before it is known,
/// the fossil delta from that one's data. Made once per event by the channel's reader.
#[derive(Debug)]
pub struct Deltas {
    /// The frame with `"delta":false` and the data as published, as a JSON string.
    pub whole: Bytes,
    /// The frame with `"delta":true` and the delta as a JSON string.
    pub delta: Option<Bytes>,
}

/// One frame on its way to every connection that should get it: its JSON, and each
/// transport's framing of it, made on first use. Not shared across threads: the task that
/// offers it (a channel's reader) is the only one that frames it.
#[derive(Debug)]
pub struct Outgoing {
    /// The event's stream sequence; 0 for a frame that is not an event (a presence change).
    pub seq: u64,
    /// The seq of the channel's event before this one, when known (0: none, or not known).
    pub prev: u64,
    /// What the frame is (`event`, `join`, ...): SSE's `event:` field.
    name: &'static str,
    /// A volatile event: a transport with datagrams sends it as one ([`Datagrams`]).
    volatile: bool,
    /// The connection that does not get it (a Pusher `socket_id`), for the framings that
    /// act on it.
    exclude: Option<uuid::Uuid>,
    /// What clients that take the channel's deltas get instead, where the channel keeps them.
    deltas: Option<Box<Deltas>>,
    json: Bytes,
    framed: [OnceCell<Bytes>; SLOTS],
}

impl Outgoing {
    /// An `event` frame: `json` is the event frame's JSON text.
    pub fn event(seq: u64, json: impl Into<Bytes>) -> Outgoing {
        Outgoing::new(seq, "event", json.into())
    }

    /// A frame that is not an event (`name`: the op, e.g. `join`).
    pub fn other(name: &'static str, json: impl Into<Bytes>) -> Outgoing {
        Outgoing::new(0, name, json.into())
    }

    /// A volatile event's frame: no seq, and a datagram where the transport has them.
    pub fn volatile(json: impl Into<Bytes>) -> Outgoing {
        Outgoing {
            volatile: true,
            ..Outgoing::new(0, "event", json.into())
        }
    }

    fn new(seq: u64, name: &'static str, json: Bytes) -> Outgoing {
        Outgoing {
            seq,
            prev: 0,
            name,
            volatile: false,
            exclude: None,
            deltas: None,
            json,
            framed: Default::default(),
        }
    }

    /// The same frame, with what clients that take deltas get instead.
    pub fn with_deltas(mut self, deltas: Deltas) -> Outgoing {
        self.deltas = Some(Box::new(deltas));
        self
    }

    /// What clients that take deltas get instead, if the channel keeps them.
    pub fn deltas(&self) -> Option<&Deltas> {
        self.deltas.as_deref()
    }

    /// The same frame, not for connection `conn` ([`fanout::envelope::HEADER_EXCLUDE`]).
    pub fn excluding(mut self, conn: Option<uuid::Uuid>) -> Outgoing {
        self.exclude = conn;
        self
    }

    /// The connection that does not get it.
    pub fn exclude(&self) -> Option<uuid::Uuid> {
        self.exclude
    }

    /// The same frame, known to follow the channel's event `prev`.
    pub fn after(mut self, prev: u64) -> Outgoing {
        self.prev = prev;
        self
    }

    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// What the frame is (`event`, `join`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The framing in `slot` (one of [`SLOTS`], a transport's own), made by `make` from the
    /// frame's name and JSON the first time it is asked for: the same bytes for every
    /// connection of that transport.
    pub fn framed(&self, slot: usize, make: impl FnOnce(&str, &[u8]) -> Bytes) -> &Bytes {
        self.framed[slot].get_or_init(|| make(self.name, &self.json))
    }
}

/// The sinks a fan-out pass writes to, copied out of the hub (kept by a reader between
/// passes, so that a pass allocates nothing).
pub type Recipients = Vec<std::sync::Arc<dyn Sink>>;

/// Offers `frames` of channel `key` to every sink in `recipients` (emptied), outside every
/// lock: what happened to them.
pub fn offer_all(key: ChannelKey, frames: &[Outgoing], recipients: &mut Recipients) -> Delivery {
    let mut outcome = Delivery::default();
    for sink in recipients.drain(..) {
        sink.offer(key, frames, &mut outcome);
    }
    outcome
}

/// What the hub holds for a connection.
pub trait Sink: Send + Sync + fmt::Debug {
    /// Offers live frames of channel `key`, in order (consecutive events, or presence
    /// changes): written now if the socket takes them, else queued; a connection whose queue
    /// would pass its bounds is cut off. Frames of a channel the connection is not in, and
    /// events it already has, are dropped.
    fn offer(&self, key: ChannelKey, frames: &[Outgoing], outcome: &mut Delivery);

    /// The connection's cut-off switch.
    fn kick(&self) -> &Kick;

    /// The connection is now in channel `key` (`name`): its live frames are taken.
    fn enter(&self, key: ChannelKey, name: &str);

    /// The connection left channel `key`: no frame of it is written from now on.
    fn leave(&self, key: ChannelKey);
}

/// What a session needs of its connection.
pub trait Conduit: Sink {
    /// One of the connection's own frames (a reply; `name` is its op): never held or
    /// filtered, in order with everything else written.
    fn send(&self, name: &'static str, json: &str);

    /// A replayed event of channel `key`: never held, counted against the bounds.
    fn replay(&self, key: ChannelKey, frame: &Outgoing);

    /// Holds live frames back (for a subscribe) until a release.
    fn hold(&self);

    /// Records that the connection has channel `key`'s events up to `upto` (a replay, or
    /// what it had before it resumed; a mark per region, none: nothing known) and lets the
    /// held frames go, without those covered.
    fn release(&self, key: ChannelKey, upto: &[Mark]);

    /// Lets the held frames go and changes nothing else.
    fn release_held(&self);

    /// Whether the connection's stream carries positions (an SSE cursor): then the session
    /// tells it where each channel it joins starts ([`Conduit::position`]).
    fn tracks_positions(&self) -> bool {
        false
    }

    /// The connection's transport ([`Framing::TRANSPORT`]).
    fn transport(&self) -> &'static str {
        "websocket"
    }

    /// Channel `key` starts at `position` in the connection's stream.
    fn position(&self, _key: ChannelKey, _position: Position) {}

    /// The connection takes channel `key`'s events as deltas (before it joins it): whether
    /// its transport can ([`Framing::delta`]).
    fn delta(&self, _key: ChannelKey) -> bool {
        false
    }
}

/// How a socket transport puts frames on the wire.
pub trait Framing: Send + fmt::Debug + 'static {
    /// The part of `frame` that every connection of this kind shares (a cheap clone).
    fn shared(&self, frame: &Outgoing) -> Bytes;

    /// Appends what this connection writes for a live or replayed frame of channel `key`
    /// (`shared` as [`Framing::shared`] made it), updating what the connection has seen.
    fn write(&mut self, key: ChannelKey, seq: u64, shared: Bytes, out: &mut Parts);

    /// One of the connection's own frames: a reply, or a frame only it gets.
    fn own(&mut self, name: &str, json: &str) -> Bytes;

    /// The connection is now in channel `key`, called `name`.
    fn enter(&mut self, _key: ChannelKey, _name: &str) {}

    /// The connection takes channel `key`'s events as deltas from now on: whether this
    /// framing can (none but WebSocket's can).
    fn delta(&mut self, _key: ChannelKey) -> bool {
        false
    }

    /// The connection left channel `key`.
    fn leave(&mut self, _key: ChannelKey) {}

    /// Whether this framing writes positions (see [`Conduit::tracks_positions`]).
    const TRACKS_POSITIONS: bool = false;

    /// The transport's name, as `GET /v1/users/{user}/connections` lists it.
    const TRANSPORT: &'static str = "websocket";

    /// What a datagram carries for a volatile `frame` ([`Datagrams`]): one frame, unframed.
    fn datagram(frame: &Outgoing) -> Bytes {
        frame.json.clone()
    }

    /// Channel `key` starts at `position`.
    fn position(&mut self, _key: ChannelKey, _position: Position) {}
}

/// The byte slices of one frame, as a framing writes it (one or two).
pub type Parts = SmallVec<[Bytes; 4]>;

/// What one write carries: byte slices, each marked when it is the last of a frame (the
/// frames bound counts frames, whatever the slices per frame).
#[derive(Debug, Default)]
struct Batch(SmallVec<[(Bytes, bool); 4]>);

impl Batch {
    /// One frame of one slice.
    fn one(bytes: Bytes) -> Batch {
        let mut batch = Batch::default();
        batch.0.push((bytes, true));
        batch
    }

    /// Appends a frame's slices.
    fn frame(&mut self, parts: Parts) {
        let last = parts.len().saturating_sub(1);
        self.0.extend(
            parts
                .into_iter()
                .enumerate()
                .map(|(i, part)| (part, i == last)),
        );
    }
}

/// How much may wait for one connection's socket.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub frames: usize,
    pub bytes: usize,
}

impl Bounds {
    /// No bound (benchmark sinks).
    pub const NONE: Bounds = Bounds {
        frames: usize::MAX,
        bytes: usize::MAX,
    };
}

/// Sends one frame ([`Framing::datagram`]: its JSON, or its MessagePack) as a datagram
/// (WebTransport's): true once sent, false when it cannot go so (too large for one), and the
/// frame then takes the stream.
pub type Datagrams = Box<dyn Fn(Bytes) -> bool + Send + Sync>;

/// A connection's way out over its socket. Shared by its task, the hub and every reader that
/// offers it frames.
pub struct Outbox<F: Framing> {
    out: Out,
    /// Where volatile events go when the transport has datagrams.
    datagrams: Option<Datagrams>,
    state: Mutex<State<F>>,
    /// Wakes the connection's task when frames wait for the socket.
    waiting: Notify,
    kick: Kick,
    bounds: Bounds,
}

impl<F: Framing> fmt::Debug for Outbox<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("out", &self.out)
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

/// Where an outbox's bytes go.
#[derive(Debug)]
enum Out {
    /// Into a socket.
    Socket(TcpStream),
    /// Nowhere (benchmarks register such members).
    Discard,
    /// Into the backlog, for whoever takes them ([`Outbox::take`], a long-poll): its bounds
    /// stop the taking instead of cutting the client off.
    Collect,
    /// Into the backlog, which the connection's task writes out itself ([`Outbox::drain`]):
    /// a transport whose stream is not a socket (WebTransport's QUIC stream). Bounded as a
    /// socket's backlog is: beyond the bounds the client is cut off.
    Queue,
}

#[derive(Debug)]
struct State<F> {
    framing: F,
    /// Bytes not yet (fully) written, in order; each marked when it ends a frame.
    backlog: VecDeque<(Bytes, bool)>,
    backlog_bytes: usize,
    /// Frames in the backlog (its entries that end one).
    backlog_frames: usize,
    /// Bytes of the first backlog entry already written.
    written: usize,
    /// Live frames held during a subscribe: (channel, seq, shared part).
    held: Option<VecDeque<(ChannelKey, u64, Bytes)>>,
    held_bytes: usize,
    /// The channels the connection is in, each with the mark up to which it already has the
    /// channel's events (a replay, or before it resumed), if known. With regions, a channel
    /// may have one entry per region.
    channels: Vec<(ChannelKey, Option<Mark>)>,
    /// The socket failed: nothing more is written.
    broken: bool,
    /// A frame was dropped at the bounds (the client is cut off, or a collecting outbox is
    /// full): no frame is taken after it, which would leave a gap behind the client's back.
    stopped: bool,
    /// What the backlog and the held frames take of the node's budget (socket outboxes).
    charge: Option<Charge>,
}

impl<F> State<F> {
    fn entered(&self, key: ChannelKey) -> bool {
        key == *BROADCAST || self.channels.iter().any(|(k, _)| *k == key)
    }

    /// Whether the connection already has event `seq` (a mark) of channel `key` (0: not an
    /// event).
    fn covered(&self, key: ChannelKey, seq: Mark) -> bool {
        seq != 0
            && self.channels.iter().any(|&(k, upto)| {
                k == key && upto.is_some_and(|upto| mark::same_region(seq, upto) && seq <= upto)
            })
    }

    /// Whether any event of channel `key` may be covered.
    fn has_upto(&self, key: ChannelKey) -> bool {
        self.channels
            .iter()
            .any(|&(k, upto)| k == key && upto.is_some())
    }

    fn waiting(&self) -> (usize, usize) {
        let held = self.held.as_ref().map_or(0, VecDeque::len);
        (
            self.backlog_frames + held,
            self.backlog_bytes + self.held_bytes,
        )
    }
}

impl<F: Framing> Outbox<F> {
    pub fn new(stream: TcpStream, framing: F, kick: Kick, bounds: Bounds) -> Outbox<F> {
        Outbox::build(Out::Socket(stream), framing, kick, bounds)
    }

    /// An outbox that takes every frame and sends it nowhere.
    pub fn discarding(framing: F, kick: Kick) -> Outbox<F> {
        Outbox::build(Out::Discard, framing, kick, Bounds::NONE)
    }

    /// An outbox that keeps what it is given, up to `bounds`, for [`Outbox::take`].
    pub fn collecting(framing: F, kick: Kick, bounds: Bounds) -> Outbox<F> {
        Outbox::build(Out::Collect, framing, kick, bounds)
    }

    /// An outbox whose connection writes it out itself ([`Outbox::drain`]), within `bounds`;
    /// volatile events go to `datagrams`, when given, if they fit in one.
    pub fn queued(
        framing: F,
        kick: Kick,
        bounds: Bounds,
        datagrams: Option<Datagrams>,
    ) -> Outbox<F> {
        Outbox {
            datagrams,
            ..Outbox::build(Out::Queue, framing, kick, bounds)
        }
    }

    fn build(out: Out, framing: F, kick: Kick, bounds: Bounds) -> Outbox<F> {
        Outbox {
            out,
            datagrams: None,
            state: Mutex::new(State {
                framing,
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                backlog_frames: 0,
                written: 0,
                held: None,
                held_bytes: 0,
                channels: Vec::new(),
                broken: false,
                stopped: false,
                charge: None,
            }),
            waiting: Notify::new(),
            kick,
            bounds,
        }
    }

    /// Charges what this outbox keeps (its backlog, held frames) to the node's budget: when
    /// the budget cannot take more, the client is closed with 1013 instead.
    pub fn charged(self, charge: Charge) -> Outbox<F> {
        self.lock().charge = Some(charge);
        self
    }

    /// Brings the charge up to date with what is kept. Growth past the budget cuts the
    /// client off (1013) and nothing more is taken; the bytes already kept stay until the
    /// connection ends, a moment later.
    fn recharge(&self, state: &mut State<F>) {
        let kept = state.backlog_bytes + state.held_bytes;
        let Some(charge) = &mut state.charge else {
            return;
        };
        if charge.set(kept).is_err() && !state.stopped {
            state.stopped = true;
            self.kick.kick(disconnect::TRY_AGAIN_LATER);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<F>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket (none for a sink).
    pub fn stream(&self) -> Option<&TcpStream> {
        match &self.out {
            Out::Socket(stream) => Some(stream),
            Out::Discard | Out::Collect | Out::Queue => None,
        }
    }

    /// What a collecting outbox kept so far, taken, and `read` of its framing at that moment
    /// (what it kept is exactly what the framing has seen).
    pub fn take<R>(&self, read: impl FnOnce(&F) -> R) -> (Vec<Bytes>, R) {
        let mut state = self.lock();
        let kept = std::mem::take(&mut state.backlog)
            .into_iter()
            .map(|(bytes, _)| bytes)
            .collect();
        state.backlog_bytes = 0;
        state.backlog_frames = 0;
        self.recharge(&mut state);
        state.stopped = true; // nothing more: the taker answers with what it has
        (kept, read(&state.framing))
    }

    /// What waits in a queued outbox, taken for its connection to write out (at most
    /// `max_bytes`, whole parts, at least one); empty when nothing waits.
    pub fn drain(&self, max_bytes: usize) -> Vec<Bytes> {
        let mut state = self.lock();
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Some((part, ends)) = state.backlog.pop_front() {
            bytes += part.len();
            state.backlog_bytes -= part.len();
            state.backlog_frames -= usize::from(ends);
            taken.push(part);
            if bytes >= max_bytes {
                break;
            }
        }
        if state.backlog.is_empty() && state.backlog.capacity() > 0 {
            // Give the memory back: an idle connection keeps no queue.
            state.backlog = VecDeque::new();
        }
        self.recharge(&mut state);
        taken
    }

    /// Whether the outbox is written out by its connection ([`Outbox::queued`]).
    pub fn is_queued(&self) -> bool {
        matches!(self.out, Out::Queue)
    }

    /// Whether a collecting outbox has kept anything.
    pub fn has_kept(&self) -> bool {
        !self.lock().backlog.is_empty()
    }

    /// Writes raw bytes of the transport's own (a ping, a close frame, a heartbeat): never
    /// held or filtered. Follow with [`Outbox::flush`] to wait until they are written.
    pub fn send_raw(&self, bytes: Bytes) {
        let mut state = self.lock();
        if !state.broken {
            self.write_or_queue(&mut state, Batch::one(bytes));
        }
    }

    /// Writes bytes of the transport's own that its framing makes (an SSE heartbeat that
    /// carries the stream's cursor): never held or filtered.
    pub fn send_framed(&self, make: impl FnOnce(&mut F) -> Bytes) {
        let mut state = self.lock();
        if !state.broken {
            let bytes = make(&mut state.framing);
            self.write_or_queue(&mut state, Batch::one(bytes));
        }
    }

    /// Whether the frames would pass the bounds. If so, a socket's client is cut off; a
    /// collecting outbox stops taking (and the frames are not taken).
    fn over(
        &self,
        state: &mut State<F>,
        frames: usize,
        bytes: usize,
        outcome: &mut Delivery,
    ) -> bool {
        if state.stopped {
            return true;
        }
        let (waiting, waiting_bytes) = state.waiting();
        if waiting + frames <= self.bounds.frames && waiting_bytes + bytes <= self.bounds.bytes {
            return false;
        }
        state.stopped = true;
        if let Out::Collect = self.out {
            self.waiting.notify_one();
        } else if self.kick.kick(disconnect::SLOW_CONSUMER) {
            outcome.slow += 1;
        }
        true
    }

    /// Writes `batch` with one system call if nothing is waiting before it and the socket
    /// takes it; whatever it does not take is queued for the connection's task.
    fn write_or_queue(&self, state: &mut State<F>, batch: Batch) {
        let parts = batch.0;
        let stream = match &self.out {
            Out::Socket(stream) => stream,
            Out::Discard => return,
            Out::Collect | Out::Queue => {
                if !parts.is_empty() {
                    self.queue(state, parts.into_iter());
                    self.waiting.notify_one();
                }
                return;
            }
        };
        let mut done = 0; // parts fully written
        if state.backlog.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = parts.len().min(MAX_IOV);
            for (slice, (part, _)) in slices.iter_mut().zip(&parts) {
                *slice = IoSlice::new(part);
            }
            let mut written = 0; // bytes of the first part not fully written
            match stream.try_write_vectored(&slices[..n]) {
                Ok(mut left) => {
                    for (part, _) in &parts[..n] {
                        if left < part.len() {
                            break;
                        }
                        left -= part.len();
                        done += 1;
                    }
                    written = left;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    state.broken = true;
                    self.waiting.notify_one();
                    return;
                }
            }
            state.written = written;
        }
        if done < parts.len() {
            self.queue(state, parts.into_iter().skip(done));
            self.waiting.notify_one();
        }
    }

    fn queue(&self, state: &mut State<F>, parts: impl Iterator<Item = (Bytes, bool)>) {
        for (part, ends) in parts {
            state.backlog_bytes += part.len();
            state.backlog_frames += usize::from(ends);
            state.backlog.push_back((part, ends));
        }
        self.recharge(state);
    }

    /// True when nothing waits to be written.
    pub fn is_written(&self) -> bool {
        let state = self.lock();
        state.backlog.is_empty() && !state.broken
    }

    /// Resolves when frames wait for the socket (the connection's task then calls
    /// [`Outbox::flush`]).
    pub async fn waiting(&self) {
        self.waiting.notified().await;
    }

    /// Writes the backlog out, waiting for the socket as needed. Fails when the socket does.
    pub async fn flush(&self) -> io::Result<()> {
        loop {
            match self.write_backlog() {
                Ok(true) => return Ok(()),
                Ok(false) => match self.stream() {
                    Some(stream) => stream.writable().await?,
                    None => return Ok(()),
                },
                Err(err) => return Err(err),
            }
        }
    }

    /// Writes as much of the backlog as the socket takes. Ok(true): all written.
    fn write_backlog(&self) -> io::Result<bool> {
        let mut state = self.lock();
        loop {
            if state.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if state.backlog.is_empty() {
                // Give the memory back: an idle connection keeps no queue.
                if state.backlog.capacity() > 0 {
                    state.backlog = VecDeque::new();
                }
                return Ok(true);
            }
            let Some(stream) = self.stream() else {
                return Ok(true);
            };
            let written = state.written;
            let slices: SmallVec<[IoSlice<'_>; MAX_IOV]> = state
                .backlog
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(i, (part, _))| IoSlice::new(if i == 0 { &part[written..] } else { part }))
                .collect();
            let result = stream.try_write_vectored(&slices);
            drop(slices);
            match result {
                Ok(mut n) => {
                    n += state.written;
                    while let Some((len, ends)) = state
                        .backlog
                        .front()
                        .map(|(front, ends)| (front.len(), *ends))
                    {
                        if n < len {
                            break;
                        }
                        n -= len;
                        state.backlog_bytes -= len;
                        state.backlog_frames -= usize::from(ends);
                        state.backlog.pop_front();
                    }
                    state.written = n;
                    self.recharge(&mut state);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => {
                    state.broken = true;
                    return Err(err);
                }
            }
        }
    }

    /// Lets the held frames go (those of channels still entered and not covered), framed now,
    /// in order.
    fn let_go(&self, state: &mut State<F>) {
        let Some(held) = state.held.take() else {
            return;
        };
        state.held_bytes = 0;
        self.recharge(state);
        if state.broken || state.stopped {
            return;
        }
        let mut batch = Batch::default();
        for (key, seq, shared) in held {
            if state.entered(key) && !state.covered(key, seq) {
                let mut parts = Parts::new();
                state.framing.write(key, seq, shared, &mut parts);
                batch.frame(parts);
            }
        }
        self.write_or_queue(state, batch);
    }
}

impl<F: Framing> Sink for Outbox<F> {
    fn offer(&self, key: ChannelKey, frames: &[Outgoing], outcome: &mut Delivery) {
        let mut state = self.lock();
        if state.broken || state.stopped || !state.entered(key) {
            return;
        }
        if !state.has_upto(key) {
            return self.offer_run(&mut state, key, frames, outcome);
        }
        // Events the connection already has (it resumed) are a prefix of each region's (seqs
        // ascend within a region; regions interleave): the runs between them go out.
        let mut start = 0;
        while start < frames.len() {
            if state.covered(key, frames[start].seq) {
                start += 1;
                continue;
            }
            let end = frames[start..]
                .iter()
                .position(|frame| state.covered(key, frame.seq))
                .map_or(frames.len(), |n| start + n);
            self.offer_run(&mut state, key, &frames[start..end], outcome);
            start = end;
        }
    }

    fn kick(&self) -> &Kick {
        &self.kick
    }

    fn enter(&self, key: ChannelKey, name: &str) {
        let mut state = self.lock();
        if !state.channels.iter().any(|(k, _)| *k == key) {
            state.channels.push((key, None));
        }
        state.framing.enter(key, name);
    }

    fn leave(&self, key: ChannelKey) {
        let mut state = self.lock();
        state.channels.retain(|(k, _)| *k != key);
        if state.channels.is_empty() {
            state.channels = Vec::new();
        }
        state.framing.leave(key);
    }
}

impl<F: Framing> Outbox<F> {
    /// [`Sink::offer`] of frames none of which the connection has.
    fn offer_run(
        &self,
        state: &mut std::sync::MutexGuard<'_, State<F>>,
        key: ChannelKey,
        frames: &[Outgoing],
        outcome: &mut Delivery,
    ) {
        if state.broken || state.stopped || frames.is_empty() {
            return;
        }
        if let Some(datagrams) = &self.datagrams
            && state.held.is_none()
            && frames.iter().any(|frame| frame.volatile)
        {
            // Volatile events as datagrams (unordered, at most once, as they are); the rest,
            // and any too large for a datagram, on the stream.
            let (mut run, mut sent) = (0, false);
            for (i, frame) in frames.iter().enumerate() {
                let datagram = frame.volatile.then(|| F::datagram(frame));
                if let Some(datagram) = datagram
                    && let len = datagram.len()
                    && datagrams(datagram)
                {
                    self.offer_run_stream(state, key, &frames[run..i], outcome);
                    outcome.delivered += 1;
                    outcome.bytes += len;
                    (run, sent) = (i + 1, true);
                }
            }
            if sent {
                if run == frames.len() {
                    outcome.recipients += 1;
                }
                return self.offer_run_stream(state, key, &frames[run..], outcome);
            }
        }
        self.offer_run_stream(state, key, frames, outcome);
    }

    /// [`Outbox::offer_run`] on the connection's stream.
    fn offer_run_stream(
        &self,
        state: &mut std::sync::MutexGuard<'_, State<F>>,
        key: ChannelKey,
        frames: &[Outgoing],
        outcome: &mut Delivery,
    ) {
        if state.broken || state.stopped || frames.is_empty() {
            return;
        }
        let shared: Parts = frames.iter().map(|f| state.framing.shared(f)).collect();
        let bytes = shared.iter().map(Bytes::len).sum::<usize>();
        if self.over(state, frames.len(), bytes, outcome) {
            return;
        }
        outcome.recipients += 1;
        outcome.delivered += frames.len();
        let state = &mut **state;
        if let Some(held) = &mut state.held {
            outcome.bytes += bytes;
            held.extend(
                frames
                    .iter()
                    .zip(shared)
                    .map(|(frame, shared)| (key, frame.seq, shared)),
            );
            state.held_bytes += bytes;
            self.recharge(state);
            return;
        }
        let mut batch = Batch::default();
        for (frame, shared) in frames.iter().zip(shared) {
            let mut parts = Parts::new();
            state.framing.write(key, frame.seq, shared, &mut parts);
            // What the connection writes (a framing may pick a part of what is shared).
            outcome.bytes += parts.iter().map(Bytes::len).sum::<usize>();
            batch.frame(parts);
        }
        self.write_or_queue(state, batch);
    }
}

impl<F: Framing> Conduit for Outbox<F> {
    fn send(&self, name: &'static str, json: &str) {
        let mut state = self.lock();
        if !state.broken {
            let own = state.framing.own(name, json);
            self.write_or_queue(&mut state, Batch::one(own));
        }
    }

    fn replay(&self, key: ChannelKey, frame: &Outgoing) {
        let mut state = self.lock();
        if state.broken || state.stopped {
            return;
        }
        let shared = state.framing.shared(frame);
        if self.over(&mut state, 1, shared.len(), &mut Delivery::default()) {
            return;
        }
        let mut parts = Parts::new();
        state.framing.write(key, frame.seq, shared, &mut parts);
        let mut batch = Batch::default();
        batch.frame(parts);
        self.write_or_queue(&mut state, batch);
    }

    fn hold(&self) {
        let mut state = self.lock();
        state.held.get_or_insert_with(VecDeque::new);
    }

    fn release(&self, key: ChannelKey, upto: &[Mark]) {
        let mut state = self.lock();
        if state.channels.iter().any(|(k, _)| *k == key) {
            state.channels.retain(|(k, _)| *k != key);
            match upto {
                [] => state.channels.push((key, None)),
                marks => state.channels.extend(marks.iter().map(|&m| (key, Some(m)))),
            }
        }
        self.let_go(&mut state);
    }

    fn release_held(&self) {
        let mut state = self.lock();
        self.let_go(&mut state);
    }

    fn tracks_positions(&self) -> bool {
        F::TRACKS_POSITIONS
    }

    fn transport(&self) -> &'static str {
        F::TRANSPORT
    }

    fn position(&self, key: ChannelKey, position: Position) {
        self.lock().framing.position(key, position);
    }

    fn delta(&self, key: ChannelKey) -> bool {
        self.lock().framing.delta(key)
    }
}

/// A framing for tests: frames go out as their JSON, unframed, to be read back as text.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Plain;

#[cfg(test)]
impl Framing for Plain {
    fn shared(&self, frame: &Outgoing) -> Bytes {
        frame.json().clone()
    }
    fn write(&mut self, _: ChannelKey, _: u64, shared: Bytes, out: &mut Parts) {
        out.push(shared);
    }
    fn own(&mut self, _: &str, json: &str) -> Bytes {
        Bytes::copy_from_slice(json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::channel_key;
    use tokio::io::AsyncReadExt;

    async fn pair(bounds: Bounds) -> (Outbox<Plain>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let kick = Kick::new(CancellationToken::new());
        (Outbox::new(server, Plain, kick, bounds), client)
    }

    async fn read(client: &mut TcpStream, n: usize) -> String {
        let mut buf = vec![0; n];
        client.read_exact(&mut buf).await.unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn event(seq: u64, text: &'static str) -> [Outgoing; 1] {
        [Outgoing::event(seq, text)]
    }

    const FEW: Bounds = Bounds {
        frames: 8,
        bytes: 1 << 20,
    };

    #[tokio::test]
    async fn writes_in_order_and_filters_what_a_replay_covered() {
        let (outbox, mut client) = pair(FEW).await;
        let key = channel_key("x");
        let mut outcome = Delivery::default();
        outbox.enter(key, "x");
        outbox.offer(key, &event(1, "e1;"), &mut outcome);
        outbox.hold();
        outbox.offer(key, &event(2, "e2;"), &mut outcome);
        outbox.offer(key, &event(3, "e3;"), &mut outcome);
        outbox.offer(key, &[Outgoing::other("join", "p;")], &mut outcome);
        outbox.send("subscribed", "r;"); // the reply, before the held frames
        outbox.replay(key, &event(2, "r2;")[0]);
        outbox.release(key, &[2]);
        outbox.offer(key, &event(2, "e2;"), &mut outcome); // late duplicate
        outbox.flush().await.unwrap();
        assert_eq!(read(&mut client, 13).await, "e1;r;r2;e3;p;");
    }

    #[tokio::test]
    async fn only_the_channels_entered_and_broadcast_get_through() {
        let (outbox, mut client) = pair(FEW).await;
        let (x, y) = (channel_key("x"), channel_key("y"));
        let mut outcome = Delivery::default();
        outbox.offer(x, &event(1, "no;"), &mut outcome);
        outbox.offer(*BROADCAST, &event(2, "b;"), &mut outcome);
        outbox.enter(x, "x");
        outbox.enter(y, "y");
        outbox.offer(x, &event(3, "x;"), &mut outcome);
        outbox.leave(x);
        outbox.send("unsubscribed", "u;");
        outbox.offer(x, &event(4, "late;"), &mut outcome); // after `unsubscribed`: never
        outbox.offer(y, &event(5, "y;"), &mut outcome);
        outbox.flush().await.unwrap();
        assert_eq!(read(&mut client, 8).await, "b;x;u;y;");
        assert_eq!(outcome.delivered, 3);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_by_frames_or_bytes() {
        let frame = Outgoing::event(1, vec![b'x'; 64 * 1024]);
        for bounds in [
            Bounds {
                frames: 4,
                bytes: usize::MAX,
            },
            Bounds {
                frames: usize::MAX,
                bytes: 256 * 1024,
            },
        ] {
            let (outbox, _client) = pair(bounds).await;
            let key = channel_key("x");
            outbox.enter(key, "x");
            let mut outcome = Delivery::default();
            for _ in 0..200 {
                outbox.offer(key, std::slice::from_ref(&frame), &mut outcome);
            }
            assert_eq!(outcome.slow, 1, "{bounds:?}");
            assert!(outbox.kick().token().is_cancelled());
            assert_eq!(outbox.kick().reason(), disconnect::SLOW_CONSUMER);
            let (frames, bytes) = outbox.lock().waiting();
            assert!(
                frames <= bounds.frames && bytes <= bounds.bytes,
                "{frames} frames, {bytes} bytes wait"
            );
        }
    }

    #[tokio::test]
    async fn nothing_is_written_behind_a_dropped_frame() {
        let bounds = Bounds {
            frames: 2,
            bytes: usize::MAX,
        };
        let (outbox, mut client) = pair(bounds).await;
        let key = channel_key("x");
        outbox.enter(key, "x");
        let mut outcome = Delivery::default();
        outbox.hold();
        outbox.offer(key, &event(5, "live5;"), &mut outcome); // held
        // A replay bigger than the bounds: the queue fills (the socket is not read)...
        let big = "r".repeat(4 << 20);
        outbox.replay(key, &Outgoing::event(1, big.clone()));
        outbox.replay(key, &Outgoing::event(2, big.clone()));
        outbox.replay(key, &Outgoing::event(3, big.clone()));
        outbox.replay(key, &Outgoing::event(4, "r4;"));
        // ...so the client is cut off, and the held live frame is not let go after the gap.
        outbox.release(key, &[4]);
        outbox.offer(key, &event(6, "live6;"), &mut outcome);
        assert!(outbox.kick().token().is_cancelled());
        // What the connection's task does once kicked: write out what waits (then close).
        let outbox = std::sync::Arc::new(outbox);
        let flushing = outbox.clone();
        tokio::spawn(async move { flushing.flush().await });
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1500), async {
            let mut buf = vec![0; 1 << 16];
            loop {
                let n = client.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let seen = String::from_utf8_lossy(&seen);
        assert!(!seen.contains("live"), "a live frame after the gap");
        assert!(!seen.contains("r4;"), "a replayed frame after the gap");
    }
}
