//! A connection's way out: its socket, shared by whoever writes to it.
//!
//! Fan-out writes each event's encoded frame straight into the socket from the channel's
//! reader task (one `send` per recipient, no task woken, nothing copied or counted per
//! recipient). Only when the socket cannot take it all (the client reads slowly) do frames
//! wait in the backlog, and the connection's task is woken to write them out, several per
//! system call, when the socket is writable again. A backlog beyond `capacity` frames cuts
//! the client off as a slow consumer.
//!
//! Every write goes through one lock, so frames never interleave. While the connection
//! replays history for a resuming subscribe, live frames are held and then released behind
//! the replay, without those the replay already covered.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    sync::Mutex,
};

use bytes::Bytes;
use tokio::{net::TcpStream, sync::Notify};

use crate::{
    disconnect,
    hub::{Delivery, Kick},
};

/// Identifies a channel in the replay filter: a hash of its name, computed once per event.
pub type ChannelKey = u64;

/// The key of frames that are not events (presence changes): never filtered.
pub const NOT_AN_EVENT: ChannelKey = 0;

/// Most frames one system call writes.
const MAX_IOV: usize = 64;

pub fn channel_key(channel: &str) -> ChannelKey {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    channel.hash(&mut hasher);
    hasher.finish().max(1)
}

#[derive(Debug)]
pub struct Outbox {
    /// `None` for a sink: a member without a socket (benchmarks register those).
    stream: Option<TcpStream>,
    state: Mutex<State>,
    /// Wakes the connection's task when frames wait for the socket.
    waiting: Notify,
    kick: Kick,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Frames not yet (fully) written, in order.
    backlog: VecDeque<Bytes>,
    /// Bytes of the first backlog frame already written.
    written: usize,
    /// Live frames held during a replay: (channel, seq, frame).
    held: Option<VecDeque<(ChannelKey, u64, Bytes)>>,
    /// Per channel, the seq up to which this connection already has the events (a replay,
    /// or before it resumed).
    replayed: Vec<(ChannelKey, u64)>,
    /// The socket failed: nothing more is written.
    broken: bool,
}

impl State {
    fn covered(&self, key: ChannelKey, seq: u64) -> bool {
        key != NOT_AN_EVENT
            && self
                .replayed
                .iter()
                .any(|&(k, upto)| k == key && seq <= upto)
    }
}

impl Outbox {
    pub fn new(stream: TcpStream, kick: Kick, capacity: usize) -> Outbox {
        Outbox {
            stream: Some(stream),
            state: Mutex::default(),
            waiting: Notify::new(),
            kick,
            capacity,
        }
    }

    /// An outbox that accepts every frame and sends it nowhere.
    pub fn sink(kick: Kick) -> Outbox {
        Outbox {
            stream: None,
            state: Mutex::default(),
            waiting: Notify::new(),
            kick,
            capacity: usize::MAX,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The socket (none for a sink).
    pub fn stream(&self) -> Option<&TcpStream> {
        self.stream.as_ref()
    }

    pub fn kick(&self) -> &Kick {
        &self.kick
    }

    /// Offers a live frame (event `seq` of channel `key`, or a presence change): written now
    /// if the socket takes it, else queued; a full queue cuts the connection off.
    pub fn offer(&self, key: ChannelKey, seq: u64, frame: &Bytes, outcome: &mut Delivery) {
        self.offer_batch(key, &[(seq, frame.clone())], outcome);
    }

    /// Offers consecutive live frames of channel `key`, as (seq, frame): written with one
    /// system call when the socket takes them.
    pub fn offer_batch(&self, key: ChannelKey, frames: &[(u64, Bytes)], outcome: &mut Delivery) {
        let mut state = self.lock();
        if state.broken {
            return;
        }
        // Events the connection already has (it resumed) can only be a prefix: seqs ascend.
        let start = frames
            .iter()
            .position(|(seq, _)| !state.covered(key, *seq))
            .unwrap_or(frames.len());
        let frames = &frames[start..];
        if frames.is_empty() {
            return;
        }
        let waiting = state.backlog.len() + state.held.as_ref().map_or(0, VecDeque::len);
        if waiting + frames.len() > self.capacity {
            drop(state);
            if self.kick.kick(disconnect::SLOW_CONSUMER) {
                outcome.slow += 1;
            }
            return;
        }
        outcome.recipients += 1;
        outcome.delivered += frames.len();
        outcome.bytes += frames.iter().map(|(_, f)| f.len()).sum::<usize>();
        if let Some(held) = &mut state.held {
            held.extend(frames.iter().map(|(seq, frame)| (key, *seq, frame.clone())));
            return;
        }
        self.write_or_queue(&mut state, frames.iter().map(|(_, frame)| frame));
    }

    /// Sends one of the connection's own frames (a reply, a replayed event, a ping): never
    /// held or filtered. Follow with [`Outbox::flush`] to wait until it is written.
    pub fn send(&self, frame: Bytes) {
        let mut state = self.lock();
        if !state.broken {
            self.write_or_queue(&mut state, std::iter::once(&frame));
        }
    }

    /// Writes `frames` with one system call if nothing is waiting before them and the
    /// socket takes them; whatever it does not take is queued for the connection's task.
    fn write_or_queue<'a>(
        &self,
        state: &mut State,
        frames: impl Iterator<Item = &'a Bytes> + Clone,
    ) {
        let Some(stream) = &self.stream else {
            return;
        };
        let mut done = 0; // frames fully written
        if state.backlog.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (slice, frame) in slices.iter_mut().zip(frames.clone()) {
                *slice = IoSlice::new(frame);
                n += 1;
            }
            let mut written = 0; // bytes of the first frame not fully written
            match stream.try_write_vectored(&slices[..n]) {
                Ok(mut left) => {
                    for frame in frames.clone() {
                        if left < frame.len() {
                            break;
                        }
                        left -= frame.len();
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
        let before = state.backlog.len();
        state.backlog.extend(frames.skip(done).cloned());
        if state.backlog.len() > before {
            self.waiting.notify_one();
        }
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
                Ok(false) => match &self.stream {
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
            let written = state.written;
            let slices: Vec<IoSlice<'_>> = state
                .backlog
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(i, frame)| IoSlice::new(if i == 0 { &frame[written..] } else { frame }))
                .collect();
            let Some(stream) = &self.stream else {
                return Ok(true);
            };
            let result = stream.try_write_vectored(&slices);
            drop(slices);
            match result {
                Ok(mut n) => {
                    n += state.written;
                    while let Some(front) = state.backlog.front() {
                        if n < front.len() {
                            break;
                        }
                        n -= front.len();
                        state.backlog.pop_front();
                    }
                    state.written = n;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => {
                    state.broken = true;
                    return Err(err);
                }
            }
        }
    }

    /// Holds live frames back (for a replay) until [`Outbox::release`].
    pub fn hold(&self) {
        let mut state = self.lock();
        state.held.get_or_insert_with(VecDeque::new);
    }

    /// Records that this connection has channel `key`'s events up to `upto` (`None`:
    /// forget it) and lets the held frames go, without those covered.
    pub fn release(&self, key: ChannelKey, upto: Option<u64>) {
        let mut state = self.lock();
        state.replayed.retain(|(k, _)| *k != key);
        if let Some(upto) = upto {
            state.replayed.push((key, upto));
        }
        self.let_go(&mut state);
    }

    /// Lets the held frames go, without those covered, and changes nothing else.
    pub fn release_held(&self) {
        let mut state = self.lock();
        self.let_go(&mut state);
    }

    fn let_go(&self, state: &mut State) {
        if let Some(held) = state.held.take()
            && !state.broken
        {
            let fresh: Vec<Bytes> = held
                .into_iter()
                .filter(|(key, seq, _)| !state.covered(*key, *seq))
                .map(|(_, _, frame)| frame)
                .collect();
            self.write_or_queue(state, fresh.iter());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_util::sync::CancellationToken;

    async fn pair(capacity: usize) -> (Outbox, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let kick = Kick::new(CancellationToken::new());
        (Outbox::new(server, kick, capacity), client)
    }

    async fn read(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        client.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn writes_in_order_and_filters_what_a_replay_covered() {
        let (outbox, mut client) = pair(8).await;
        let key = channel_key("x");
        let mut outcome = Delivery::default();
        outbox.offer(key, 1, &Bytes::from_static(b"e1;"), &mut outcome);
        outbox.hold();
        outbox.offer(key, 2, &Bytes::from_static(b"e2;"), &mut outcome);
        outbox.offer(key, 3, &Bytes::from_static(b"e3;"), &mut outcome);
        outbox.offer(NOT_AN_EVENT, 0, &Bytes::from_static(b"p;"), &mut outcome);
        outbox.send(Bytes::from_static(b"r2;")); // the replay, before the held frames
        outbox.release(key, Some(2));
        outbox.offer(key, 2, &Bytes::from_static(b"e2;"), &mut outcome); // late duplicate
        outbox.flush().await.unwrap();
        assert_eq!(read(&mut client, 11).await, b"e1;r2;e3;p;");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off() {
        let (outbox, _client) = pair(4).await;
        let frame = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut outcome = Delivery::default();
        for _ in 0..200 {
            outbox.offer(NOT_AN_EVENT, 0, &frame, &mut outcome);
        }
        assert_eq!(outcome.slow, 1);
        assert!(outbox.kick().token().is_cancelled());
        assert_eq!(outbox.kick().reason(), disconnect::SLOW_CONSUMER);
    }
}
