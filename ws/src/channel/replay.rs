//! What a resuming client missed, read back: from the channel's recent events when they
//! reach back to its position, else from this region's copy of each region's stream. The
//! decision is [`super::recovery`]'s; this file gathers its facts and does the reads.

use std::{sync::Arc, time::Duration};

use fanout::{Bus, BusError, Channel, time::now_ms};
use metrics::{counter, histogram};

use super::{
    log::Log,
    reader,
    recovery::{self, Epoch, Facts, Limits},
};
use crate::{
    control::Rules,
    position::{Mark, Marks, Position, Spots, mark},
    sink::Outgoing,
};

/// What a replay found.
#[derive(Debug)]
pub struct Replay {
    /// The events, encoded.
    pub events: Vec<Outgoing>,
    pub recovered: bool,
    pub epoch: String,
    /// Live events of the channel up to these marks (one per region) were replayed (or seen
    /// by the client before): the connection skips them. Empty when `since` meant nothing.
    pub skip_upto: Marks,
}

impl Replay {
    fn lost(epoch: String) -> Replay {
        Replay {
            events: Vec::new(),
            recovered: false,
            epoch,
            skip_upto: Marks::new(),
        }
    }
}

/// A channel as a resume finds it on this node: its current log (none: no local
/// subscriber) and whether its subscription is in place.
pub type Local = (Option<Arc<Log>>, bool);

/// Reads what resuming clients missed.
#[derive(Debug, Clone)]
pub struct Replayer {
    bus: Bus,
    /// Where a channel's history was removed (`DELETE /v1/channels/{channel}/history`).
    rules: Arc<Rules>,
    limits: Limits,
    with_trace: bool,
    /// The node's stream reads for replays at once (`FANOUT_REPLAY_CONCURRENCY`).
    reads: Arc<tokio::sync::Semaphore>,
}

impl Replayer {
    pub fn new(
        bus: Bus,
        rules: Arc<Rules>,
        limits: Limits,
        with_trace: bool,
        concurrency: usize,
    ) -> Replayer {
        Replayer {
            bus,
            rules,
            limits,
            with_trace,
            reads: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
        }
    }

    /// The stored events of `channel` after `from` (a position per region; a region without
    /// one is followed from now on), for a resuming client whose positions belong to `epoch`
    /// (and were vouched for at `at`, unix ms), and whether they are all of them.
    ///
    /// Call it once the connection is in the channel (`local`): the replay then reaches
    /// everything this node delivered before the connection joined (a replica that lags is
    /// waited for). A stream that cannot be read is tried again for about a second (a NATS
    /// cluster electing a leader), then the error is the caller's: it must not tell the
    /// client anything it cannot know.
    pub async fn replay(
        &self,
        channel: &Channel,
        local: Local,
        from: &[Position],
        epoch: Option<&str>,
        at: Option<u64>,
    ) -> Result<Replay, BusError> {
        let mut pause = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            match self.try_replay(channel, &local, from, epoch, at).await {
                Ok(replay) => return Ok(replay),
                Err(err) if attempt < 2 => {
                    tracing::debug!(%channel, %err, "cannot replay yet; trying again");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                Err(err) => {
                    tracing::warn!(%channel, %err, "cannot replay");
                    return Err(err);
                }
            }
        }
    }

    async fn try_replay(
        &self,
        channel: &Channel,
        local: &Local,
        from: &[Position],
        epoch: Option<&str>,
        at: Option<u64>,
    ) -> Result<Replay, BusError> {
        let current = self.bus.log().epoch();
        match recovery::epoch(epoch, &current) {
            Epoch::Unknown => {
                return Err(BusError::Unavailable("the stream is not known yet"));
            }
            Epoch::Other => return Ok(Replay::lost(current)),
            Epoch::Same => {}
        }
        let mut replay = Replay {
            events: Vec::new(),
            recovered: true,
            epoch: current,
            skip_upto: Marks::new(),
        };
        let mut regions = Vec::new();
        for &position in from {
            if position.region() >= self.bus.topology().count() {
                continue;
            }
            let (events, recovered, skip) = self
                .region(channel, local, position, at, &replay.epoch)
                .await?;
            replay.events.extend(events);
            regions.push(recovered);
            replay.skip_upto.push(skip);
        }
        replay.recovered = recovery::resumed(regions);
        Ok(replay)
    }

    /// One region's events after `from`: the events, whether they are all, and the mark up
    /// to which live events are covered.
    async fn region(
        &self,
        channel: &Channel,
        local: &Local,
        from: Position,
        at: Option<u64>,
        current: &str,
    ) -> Result<(Vec<Outgoing>, bool, Mark), BusError> {
        let log = self.bus.log();
        let region = from.region();
        let after = from.seq();
        let one_region = self.bus.topology().count() == 1;
        // The channel's history was removed after the client's position: whatever is found
        // now is not everything it missed.
        let removed = self
            .rules
            .removed(channel)
            .and_then(|last| last.get(region as usize).copied())
            .is_some_and(|last| after < last);
        // Recent events first: a window that reaches back to the position holds every event
        // after it (up to what was delivered; the rest comes live). (With regions, the
        // windows are off: their sequences are per region.)
        let (recent, live) = local;
        if one_region
            && !removed
            && let Some(recent) = recent
            && let Some(events) = recent.recent(after, current)
        {
            counter!("fanout_ws_replayed_events_total", "from" => "memory")
                .increment(events.len() as u64);
            let skip = events.last().map_or(after, |e| e.seq.max(after));
            return Ok((events, true, skip));
        }
        // From the stream: at most `FANOUT_REPLAY_CONCURRENCY` at once on this node, so that
        // a storm of resumes queues here instead of swamping NATS.
        let waited = std::time::Instant::now();
        let _read = self
            .reads
            .acquire()
            .await
            .expect("the replays' semaphore is never closed");
        histogram!("fanout_ws_replay_wait_seconds").record(waited.elapsed().as_secs_f64());
        let live = *live;
        let sequences = match live {
            true => log.sequences(region).await.ok(),
            false => None,
        };
        let delivered = recent.as_ref().map_or(0, |log| log.delivered(region));
        let range = recovery::range(from, sequences.map(|(_, last)| last), delivered);
        let events = log
            .history_reaching(channel, region, range.after, range.until, range.reach)
            .await?;
        let stored = match from {
            Position::Event(_) if after > 0 => Some(log.is_stored(channel, region, after).await?),
            _ => None,
        };
        let (first, last) = match sequences {
            Some(sequences) => sequences,
            None => log.sequences(region).await?,
        };
        let facts = Facts {
            position: from,
            found: events.len() as u64,
            stored,
            first,
            last,
            mirror: self.is_mirror(region),
            vouched: at,
            now: now_ms(),
        };
        let recovered = !removed && recovery::recovered(&facts, &self.limits);
        if one_region
            && live
            && let Some(recent) = recent
        {
            recent.seed(last, current);
        }
        counter!("fanout_ws_replayed_events_total", "from" => "stream")
            .increment(events.len() as u64);
        let skip = mark::pack(region, events.last().map_or(after, |e| e.seq));
        let events: Vec<Outgoing> = events
            .iter()
            .filter_map(|event| reader::frame(event, self.with_trace))
            .collect();
        Ok((events, recovered, skip))
    }

    /// Whether this node reads region `region`'s events from a mirror (another region's).
    fn is_mirror(&self, region: u8) -> bool {
        let topology = self.bus.topology();
        topology.count() > 1 && topology.own() != region
    }

    /// Every region's stream's last sequence: "now", for a stream that starts following a
    /// channel (a position per region).
    pub async fn now(&self) -> Result<Spots, BusError> {
        let mut now = Spots::new();
        for region in 0..self.bus.topology().count() {
            let last = self.bus.log().sequences(region).await?.1;
            now.push(Position::After(mark::pack(region, last)));
        }
        Ok(now)
    }
}
