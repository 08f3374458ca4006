//! A channel's log on this node, kept by its reader as it delivers: the highest seq offered
//! to the channel's members (per region: the delivered marks), and the channel's recent
//! events, so that a client that resumes from a recent position (every long-poll, an SSE or
//! WebSocket reconnect) is answered from memory instead of the stream. One log per stretch of
//! the node's interest in the channel: a reader of an ended stretch writes to its own.
//!
//! **Delivered marks.** A fan-out pass records its frames here *before* it copies the
//! channel's members: a member that joins after the copy was not offered the pass's frames,
//! but sees them counted here, and must get everything up to the mark from history; a member
//! in the copy gets them live. (The member list's lock orders the copy and the join.)
//!
//! **Recent events.**
//! Complete or not used: each event comes with the seq of the channel's event before it
//! (`Nats-Last-Sequence`, or the reader's own repair), and an event that does not follow
//! the last one kept starts the window afresh. So the window holds *every* event of the
//! channel after the first one's predecessor, up to the last one delivered; a position
//! inside it is answered from it, any other from the stream. Bounded per channel
//! (`FANOUT_RECENT_EVENTS`) and node-wide (`FANOUT_RECENT_MAX_BYTES`): a channel that would
//! pass the node's budget gives up its own oldest events first, and keeps none rather than
//! pass it.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use metrics::gauge;

use super::recovery;
use crate::{
    position::{Marks, mark},
    sink::Outgoing,
};

/// The current log of every channel this node has interest in (and `broadcast`'s): opened
/// when a channel gets its first local subscriber, closed when its last leaves, both in the
/// hub's own order (see [`super::interest::Reports`]). A resume reads the log it finds here
/// once its connection is in the channel.
#[derive(Debug)]
pub struct Logs {
    limits: Limits,
    current: Mutex<std::collections::HashMap<fanout::Channel, (u64, Arc<Log>)>>,
}

impl Logs {
    pub fn new(limits: Limits) -> Logs {
        Logs {
            limits,
            current: Mutex::default(),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<fanout::Channel, (u64, Arc<Log>)>>
    {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh log for `channel`'s stretch of interest `generation`, now its current one.
    pub fn open(&self, channel: &fanout::Channel, generation: u64) -> Arc<Log> {
        let log = Log::new(&self.limits);
        self.lock()
            .insert(channel.clone(), (generation, log.clone()));
        log
    }

    /// `channel`'s stretch of interest ended: its log is no one's current one.
    pub fn close(&self, channel: &fanout::Channel) {
        self.lock().remove(channel);
    }

    /// `channel`'s current log (none: no local subscriber).
    pub fn get(&self, channel: &fanout::Channel) -> Option<Arc<Log>> {
        self.lock().get(channel).map(|(_, log)| log.clone())
    }
}

/// One channel's log (for one stretch of interest), shared by its reader and the resumes
/// that read it.
#[derive(Debug)]
pub struct Log {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    recent: Recent,
    /// The highest seq a fan-out pass has offered the channel's members, per region.
    delivered: Marks,
}

impl Log {
    pub fn new(limits: &Limits) -> Arc<Log> {
        Arc::new(Log {
            inner: Mutex::new(Inner {
                recent: Recent::new(limits),
                delivered: Marks::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `frames`, about to be offered to the channel's members (events of stream epoch
    /// `epoch`; a frame with seq 0 is no event): raises the delivered marks and keeps them as
    /// recent events. Call before the members are copied.
    pub fn record(&self, frames: &[Outgoing], epoch: &str) {
        let mut inner = self.lock();
        for frame in frames.iter().filter(|f| f.seq != 0) {
            mark::raise(&mut inner.delivered, frame.seq);
            inner.recent.push(frame, epoch);
        }
    }

    /// The highest seq of region `region`'s events offered to the channel's members so far.
    /// A connection that joined the channel before calling this gets, live, every event above
    /// it; those up to it it may have missed (they came before it joined) and must replay.
    pub fn delivered(&self, region: u8) -> u64 {
        mark::seq_of(&self.lock().delivered, region)
    }

    /// Every event of the channel after `after` (in stream epoch `epoch`) from its recent
    /// events, if they reach back to it and include everything delivered so far; else `None`
    /// (ask the stream). For a connection in the channel: what it does not get here it gets
    /// live.
    pub fn recent(&self, after: u64, epoch: &str) -> Option<Vec<Outgoing>> {
        let inner = self.lock();
        let delivered = mark::seq_of(&inner.delivered, 0);
        inner.recent.after(after, delivered, epoch)
    }

    /// Whether the recent events know where they start (else a stream read can tell them:
    /// [`Log::seed`]).
    pub fn is_seeded(&self, epoch: &str) -> bool {
        self.lock().recent.is_seeded(epoch)
    }

    /// Tells the recent events, if they know nothing yet, that every event after stream
    /// sequence `last` is delivered from now on (`last` was read once the channel's
    /// subscription was in place).
    pub fn seed(&self, last: u64, epoch: &str) {
        self.lock().recent.seed(last, epoch);
    }
}

/// The bounds of every channel's window.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Events one channel keeps (0: none).
    pub events: usize,
    /// Bytes (of event JSON) all channels together keep.
    pub max_bytes: usize,
    used: Arc<AtomicUsize>,
    /// `fanout_ws_recent_bytes`, looked up once rather than once per event.
    gauge: metrics::Gauge,
}

impl Limits {
    pub fn new(events: usize, max_bytes: usize) -> Limits {
        Limits {
            events,
            max_bytes,
            used: Arc::default(),
            gauge: gauge!("fanout_ws_recent_bytes"),
        }
    }

    /// Bytes kept now, node-wide.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One channel's window: consecutive events of the channel, oldest first, and where it
/// starts.
#[derive(Debug)]
struct Recent {
    /// The stream epoch the sequences belong to.
    epoch: String,
    /// Every event of the channel after this seq is in the window or not delivered yet
    /// (`None`: nothing is known).
    base: Option<u64>,
    /// (the event's seq, its JSON), after `base`.
    events: VecDeque<(u64, bytes::Bytes)>,
    bytes: usize,
    limits: Limits,
}

impl Recent {
    fn new(limits: &Limits) -> Recent {
        Recent {
            epoch: String::new(),
            base: None,
            events: VecDeque::new(),
            bytes: 0,
            limits: limits.clone(),
        }
    }

    /// Keeps `frame` (an event of stream epoch `epoch` whose channel predecessor is
    /// `frame.prev`), delivered now.
    fn push(&mut self, frame: &Outgoing, epoch: &str) {
        if self.limits.events == 0 || frame.seq == 0 {
            return;
        }
        if self.epoch != epoch {
            self.reset(None);
            self.epoch = epoch.to_string();
        }
        // The window's last seq (or its start, when empty): nothing of the channel after it
        // is missing so far.
        let reach = self.events.back().map(|(seq, _)| *seq).or(self.base);
        match reach {
            // Follows on: no event of the channel between what is kept and this one.
            Some(reach) if frame.prev <= reach => {}
            // A gap that could not be repaired, a stream recreated, an event dropped as
            // malformed, or nothing known: the window starts afresh, after its predecessor.
            _ => self.reset(Some(frame.prev)),
        }
        let size = frame.json().len();
        while !self.events.is_empty()
            && (self.events.len() >= self.limits.events
                || self.limits.used() + size > self.limits.max_bytes)
        {
            self.pop();
        }
        if self.limits.used() + size > self.limits.max_bytes {
            // The node's budget is spent: this one is not kept, so the window starts after it.
            self.base = Some(frame.seq);
            return;
        }
        self.limits.used.fetch_add(size, Ordering::Relaxed);
        self.bytes += size;
        self.events.push_back((frame.seq, frame.json().clone()));
        self.limits.gauge.set(self.limits.used() as f64);
    }

    /// Whether the window knows where it starts.
    fn is_seeded(&self, epoch: &str) -> bool {
        self.base.is_some() && self.epoch == epoch
    }

    /// Starts an empty window that knows nothing yet: every event of the channel after
    /// stream sequence `last` is delivered from now on (the channel's subscription was in
    /// place before `last` was read).
    fn seed(&mut self, last: u64, epoch: &str) {
        if self.limits.events == 0 || self.is_seeded(epoch) {
            return;
        }
        self.reset(Some(last));
        self.epoch = epoch.to_string();
    }

    /// Every event of the channel after `after` (a seq of the channel's, or a stream
    /// sequence before its next event, in `epoch`), if the window reaches back to it and
    /// forward to `delivered` (everything delivered so far); else `None`: ask the stream.
    fn after(&self, after: u64, delivered: u64, epoch: &str) -> Option<Vec<Outgoing>> {
        let base = self.base.filter(|_| self.epoch == epoch)?;
        let reach = self.events.back().map_or(base, |(seq, _)| *seq);
        if !recovery::in_window(base, reach, after, delivered) {
            return None;
        }
        Some(
            self.events
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(seq, json)| Outgoing::event(*seq, json.clone()))
                .collect(),
        )
    }

    fn pop(&mut self) {
        if let Some((seq, json)) = self.events.pop_front() {
            self.base = Some(seq);
            self.bytes -= json.len();
            self.limits.used.fetch_sub(json.len(), Ordering::Relaxed);
        }
    }

    /// Empties the window, which starts after `base` now.
    fn reset(&mut self, base: Option<u64>) {
        if self.bytes > 0 {
            let used = self.limits.used.fetch_sub(self.bytes, Ordering::Relaxed) - self.bytes;
            self.limits.gauge.set(used as f64);
        }
        self.bytes = 0;
        self.events.clear();
        self.base = base;
    }
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.reset(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(prev: u64, seq: u64) -> Outgoing {
        Outgoing::event(seq, format!("{{\"seq\":{seq}}}")).after(prev)
    }

    fn seqs(events: Option<Vec<Outgoing>>) -> Option<Vec<u64>> {
        events.map(|events| events.iter().map(|e| e.seq).collect())
    }

    #[test]
    fn answers_only_positions_it_reaches_completely() {
        let limits = Limits::new(3, 1 << 20);
        let mut recent = Recent::new(&limits);
        assert_eq!(seqs(recent.after(0, 0, "E")), None, "empty: ask the stream");
        for (prev, seq) in [(2, 5), (5, 9), (9, 12)] {
            recent.push(&event(prev, seq), "E");
        }
        assert_eq!(seqs(recent.after(5, 12, "E")), Some(vec![9, 12]));
        assert_eq!(
            seqs(recent.after(3, 12, "E")),
            Some(vec![5, 9, 12]),
            "between events"
        );
        assert_eq!(seqs(recent.after(2, 12, "E")), Some(vec![5, 9, 12]));
        assert_eq!(seqs(recent.after(1, 12, "E")), None, "before the window");
        assert_eq!(seqs(recent.after(12, 12, "E")), Some(vec![]));
        assert_eq!(
            seqs(recent.after(9, 13, "E")),
            None,
            "something delivered is not here"
        );
        // Full: the oldest goes, and the window starts later.
        recent.push(&event(12, 20), "E");
        assert_eq!(seqs(recent.after(5, 20, "E")), Some(vec![9, 12, 20]));
        assert_eq!(seqs(recent.after(4, 20, "E")), None);
        // An event that does not follow the last one: only what comes after it is known.
        recent.push(&event(25, 30), "E");
        assert_eq!(seqs(recent.after(20, 30, "E")), None);
        assert_eq!(seqs(recent.after(25, 30, "E")), Some(vec![30]));
        assert_eq!(
            seqs(recent.after(25, 30, "F")),
            None,
            "another epoch's sequences"
        );
        recent.push(&event(0, 1), "F");
        assert_eq!(
            seqs(recent.after(0, 1, "F")),
            Some(vec![1]),
            "a recreated stream"
        );
    }

    #[test]
    fn a_seeded_window_answers_before_its_first_event() {
        let limits = Limits::new(8, 1 << 20);
        let mut recent = Recent::new(&limits);
        assert!(!recent.is_seeded("E"));
        recent.seed(40, "E");
        assert!(recent.is_seeded("E"));
        assert_eq!(
            seqs(recent.after(40, 0, "E")),
            Some(vec![]),
            "nothing since"
        );
        assert_eq!(seqs(recent.after(39, 0, "E")), None, "from before the seed");
        assert_eq!(
            seqs(recent.after(40, 41, "E")),
            None,
            "41 was delivered, not kept"
        );
        // The first event after the seed follows on from it if its predecessor is older.
        recent.push(&event(7, 45), "E");
        assert_eq!(seqs(recent.after(40, 45, "E")), Some(vec![45]));
        recent.seed(50, "E");
        assert_eq!(
            seqs(recent.after(40, 45, "E")),
            Some(vec![45]),
            "seeded once"
        );
        // Nothing kept: the window still knows it starts after what it could not keep.
        let mut none = Recent::new(&Limits::new(8, 4));
        none.seed(1, "E");
        none.push(&event(1, 2), "E");
        assert_eq!(seqs(none.after(2, 2, "E")), Some(vec![]));
        assert_eq!(seqs(none.after(1, 2, "E")), None);
    }

    #[test]
    fn the_log_marks_what_was_delivered_per_region() {
        let log = Log::new(&Limits::new(8, 1 << 20));
        assert_eq!(log.delivered(0), 0);
        log.record(&[event(0, 3), event(3, 5)], "E");
        log.record(&[Outgoing::other("join", "p")], "E"); // no event: nothing changes
        assert_eq!(seqs(log.recent(3, "E")), Some(vec![5]));
        // With regions (whose windows are off), a mark per region.
        log.record(&[Outgoing::event(mark::pack(1, 9), "us")], "E");
        assert_eq!((log.delivered(0), log.delivered(1)), (5, 9));
    }

    #[test]
    fn the_node_budget_holds_across_channels() {
        let limits = Limits::new(100, 45);
        let (mut a, mut b) = (Recent::new(&limits), Recent::new(&limits));
        a.push(&event(0, 1), "E"); // 9 bytes each
        a.push(&event(1, 2), "E");
        a.push(&event(2, 3), "E");
        b.push(&event(0, 4), "E");
        b.push(&event(4, 5), "E");
        assert_eq!(limits.used(), 45);
        a.push(&event(3, 6), "E");
        assert_eq!(limits.used(), 45, "a gave up its own oldest");
        assert_eq!(seqs(a.after(2, 6, "E")), Some(vec![3, 6]));
        assert_eq!(seqs(a.after(0, 6, "E")), None, "1 is gone");
        assert_eq!(seqs(b.after(0, 5, "E")), Some(vec![4, 5]), "b kept its own");
        drop(a);
        assert_eq!(limits.used(), 18);
        drop(b);
        assert_eq!(limits.used(), 0);
        let mut c = Recent::new(&Limits::new(100, 4));
        c.push(&event(0, 1), "E");
        assert_eq!(
            seqs(c.after(0, 1, "E")),
            None,
            "too big for the budget: nothing kept"
        );
    }
}
