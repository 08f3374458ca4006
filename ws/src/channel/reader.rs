//! Channel readers: one task per NATS subscription (per channel this node's clients are in,
//! and `broadcast`), turning its events into [`Outgoing`] frames for the channel's members,
//! in stream order, each once, and without gaps. A fan-out pass records its frames in the
//! channel's [`Log`], copies the members' sinks out of the hub, and offers the frames to each
//! outside every lock.
//!
//! NATS may drop messages (a slow subscription, a reconnect): a live event whose
//! `Nats-Last-Sequence` is not the last one delivered reveals a gap, which is filled from the
//! stream before the event is delivered; after a reconnect, what was stored meanwhile is
//! fetched at once. Each event is encoded to JSON once, here; each transport's framing of it
//! is made once, by the first connection of that kind that gets it ([`Outgoing`]).

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fanout::{Bus, Channel, Envelope, Subscription, telemetry, time::now_ms};
use futures_util::FutureExt;
use metrics::{counter, histogram};
use tracing::field::Empty;

use super::log::Log;
use crate::{
    hub::Hub,
    position::{ChannelKey, channel_key, mark},
    sink::{Deltas, Outgoing, Recipients, offer_all},
};

/// What every reader of the node counted since it started, for `GET /v1/stats` (the
/// Prometheus counters cannot be read back).
#[derive(Debug, Default)]
pub struct Totals {
    events_received: AtomicU64,
    frames_delivered: AtomicU64,
    bytes_out: AtomicU64,
    slow_consumer_disconnects: AtomicU64,
}

impl Totals {
    /// Counts `events` received from NATS, and the frames and bytes one fan-out pass queued
    /// and the slow consumers it cut off.
    fn count(&self, events: u64, frames: u64, bytes: u64, slow: u64) {
        for (counter, n) in [
            (&self.events_received, events),
            (&self.frames_delivered, frames),
            (&self.bytes_out, bytes),
            (&self.slow_consumer_disconnects, slow),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Everything counted so far.
    pub fn get(&self) -> fanout::stats::Totals {
        fanout::stats::Totals {
            events_received: self.events_received.load(Ordering::Relaxed),
            frames_delivered: self.frames_delivered.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            slow_consumer_disconnects: self.slow_consumer_disconnects.load(Ordering::Relaxed),
        }
    }
}

/// What a reader delivers to: the hub's members of its channel, for its stretch of interest
/// (`generation`), whose events it records in `log`.
#[derive(Debug, Clone)]
pub struct Target {
    pub hub: Arc<Hub>,
    pub log: Arc<Log>,
    pub generation: u64,
    pub totals: Arc<Totals>,
    /// The channel keeps deltas for the clients that take them (`FANOUT_DELTA_CHANNELS`).
    pub deltas: bool,
}

/// An event's `event` frame ([`Envelope::frame_json`]).
pub fn encode(envelope: &Envelope, with_trace: bool) -> Result<String, serde_json::Error> {
    envelope.frame_json(with_trace)
}

/// A stored event (read back for a replay) as a frame, its seq marked with its region; none
/// when its data is not JSON.
pub fn frame(envelope: &Envelope, with_trace: bool) -> Option<Outgoing> {
    let json = encode(envelope, with_trace).ok()?;
    Some(Outgoing::event(
        mark::pack(envelope.region, envelope.seq),
        json,
    ))
}

/// Delivers one subscription's events to the hub until the subscription ends: in stream
/// order, each once, and without gaps. NATS may drop messages (a slow subscription, a
/// reconnect): a live event whose `Nats-Last-Sequence` is not the last one delivered reveals
/// a gap, which is filled from the stream before the event is delivered; after a reconnect,
/// what was stored meanwhile is fetched at once.
pub async fn read(
    mut subscription: Subscription,
    target: Target,
    bus: Bus,
    with_trace: bool,
    coalesce: Duration,
) {
    let channel = subscription.channel().clone();
    let mut reader = Reader::new(channel.clone(), target, with_trace, subscription.subject());
    let repairs = counter!("fanout_ws_gap_repairs_total");
    let repaired = counter!("fanout_ws_events_repaired_total");
    let mut connections = bus.connections();
    connections.borrow_and_update();
    let mut resyncs = bus.resyncs();
    resyncs.borrow_and_update();
    let mut epoch = bus.log().epoch();
    reader.epoch = epoch.clone();
    // The last sequence delivered, per region (each region's stream counts its own); none
    // until the region's first event.
    let mut cursors: Vec<Option<u64>> = vec![None; bus.topology().count() as usize];
    // Events that arrived together, delivered together: each recipient gets them with one
    // write. Nothing waits for a batch to fill: it is whatever NATS has already handed over.
    let mut ready: VecDeque<Envelope> = VecDeque::new();
    // A catch-up that could not read the stream is tried again (from 250 ms, doubling to 4 s)
    // until it can: a channel that gets no further event would otherwise never be told what
    // it missed.
    let mut retry: Option<(tokio::time::Instant, Duration)> = None;
    loop {
        let envelope = if let Some(envelope) = ready.pop_front() {
            envelope
        } else {
            // With `coalesce`, a channel's events go out at most that often, together.
            let due = reader.flushed + coalesce;
            if tokio::time::Instant::now() >= due {
                reader.flush();
            }
            let first = tokio::select! {
                _ = tokio::time::sleep_until(due), if reader.has_frames() => {
                    reader.flush();
                    continue;
                }
                _ = tokio::time::sleep_until(retry.map_or(due, |(at, _)| at)), if retry.is_some() => {
                    let pause = retry.map_or(RETRY_FIRST, |(_, pause)| pause);
                    retry = (!catch_up(&bus, &mut reader, &mut cursors).await)
                        .then(|| (tokio::time::Instant::now() + pause, (pause * 2).min(RETRY_MOST)));
                    continue;
                }
            event = subscription.next() => match event {
                None => break,
                Some(Ok(envelope)) => envelope,
                Some(Err(err)) => {
                    reader.malformed.increment(1);
                    tracing::warn!(%channel, %err, "dropping a malformed message");
                    continue;
                }
            },
            changed = connections.changed() => {
                if changed.is_err() {
                    break;
                }
                // Reconnected: nothing published meanwhile reached this subscription.
                if !catch_up(&bus, &mut reader, &mut cursors).await {
                    retry = Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST * 2));
                }
                continue;
            }
            changed = resyncs.changed() => {
                if changed.is_err() {
                    break;
                }
                // The delivery path was broken: subscribe afresh (the server may have lost
                // or refused the old subscription), then fetch what was stored meanwhile.
                match bus.subscribe(&channel).await {
                    Ok(fresh) => subscription = fresh,
                    Err(err) => tracing::warn!(%channel, %err, "cannot subscribe afresh"),
                }
                if !catch_up(&bus, &mut reader, &mut cursors).await {
                    retry = Some((tokio::time::Instant::now() + RETRY_FIRST, RETRY_FIRST * 2));
                }
                continue;
            }
            };
            while ready.len() < MAX_BATCH - 1 {
                match subscription.next().now_or_never() {
                    Some(Some(Ok(envelope))) => ready.push_back(envelope),
                    Some(Some(Err(err))) => {
                        reader.malformed.increment(1);
                        tracing::warn!(%channel, %err, "dropping a malformed message");
                    }
                    Some(None) | None => break,
                }
            }
            first
        };
        if envelope.volatile {
            // Not stored: no sequence to follow or repair, nothing to record.
            reader.volatile(&envelope);
            continue;
        }
        let region = envelope.region;
        let index = (region as usize).min(cursors.len() - 1);
        let cursor = &mut cursors[index];
        if let Some(last) = *cursor {
            if envelope.seq <= last {
                // Delivered already (a repair fetched it), unless the stream was recreated:
                // then sequences restarted and this is a channel's first event again.
                if envelope.last_seq != 0 || bus.log().refresh_epoch().await == epoch {
                    continue;
                }
                epoch = bus.log().epoch();
                reader.epoch = epoch.clone();
                tracing::warn!(%channel, "the stream was recreated; following its new sequences");
            } else if envelope.last_seq > last {
                // The channel's previous event is `last_seq`: stored, so the repair reaches it.
                let previous = envelope.last_seq;
                match bus
                    .log()
                    .history_reaching(&channel, region, last, Some(envelope.seq - 1), previous)
                    .await
                {
                    Ok(missing) => {
                        repairs.increment(1);
                        repaired.increment(missing.len() as u64);
                        tracing::info!(%channel, missing = missing.len(), "repaired a gap");
                        let mut prev = last;
                        for event in &missing {
                            reader.push(event, prev);
                            prev = event.seq;
                        }
                    }
                    Err(err) => {
                        // What the members missed cannot be read now: delivering past the gap
                        // would lose it silently. Close them (4003: reconnect and resume:
                        // their resume reads it, or says `recovered: false`) and hold the
                        // channel at the gap: the next event tries the repair again.
                        reader.flush();
                        let closed = reader.unavailable();
                        tracing::warn!(%channel, %err, closed, "cannot repair a gap; closed its members with 4003");
                        continue;
                    }
                }
            }
        }
        // Its predecessor, as the stream says (0: the channel's first event).
        reader.push(&envelope, envelope.last_seq);
        *cursor = Some(envelope.seq);
    }
    reader.flush();
}

/// The first retry of a catch-up that could not read the stream, and the longest pause.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MOST: Duration = Duration::from_secs(4);

/// Delivers what each region stored after the last event delivered from it; false when the
/// stream could not be read (for one region or more).
async fn catch_up(bus: &Bus, reader: &mut Reader, cursors: &mut [Option<u64>]) -> bool {
    let channel = reader.channel.clone();
    let mut read = true;
    for (region, cursor) in cursors.iter_mut().enumerate() {
        let region = region as u8;
        let Some(last) = *cursor else { continue };
        match bus.log().history(&channel, region, last, None).await {
            Ok(missed) if !missed.is_empty() => {
                counter!("fanout_ws_gap_repairs_total").increment(1);
                counter!("fanout_ws_events_repaired_total").increment(missed.len() as u64);
                // Every event after `last`: each follows the one before.
                let mut prev = last;
                for event in &missed {
                    reader.push(event, prev);
                    prev = event.seq;
                    *cursor = Some(event.seq);
                }
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%channel, %err, "cannot catch up; trying again");
                read = false;
            }
        }
    }
    // Delivered now: a retry may come with no further event to flush it.
    reader.flush();
    read
}

/// Most events delivered together.
const MAX_BATCH: usize = 64;

/// Turns events into frames for the hub, with the per-event metrics and span.
struct Reader {
    channel: Channel,
    /// The channel's key in connections' replay filters.
    key: ChannelKey,
    /// Encoded events waiting for the next flush, and their spans.
    frames: Vec<Outgoing>,
    /// The recipients of the pass under way (kept: a pass allocates nothing).
    recipients: Recipients,
    target: Target,
    /// When the last flush wrote something.
    flushed: tokio::time::Instant,
    spans: Vec<(tracing::Span, Instant)>,
    subject: String,
    with_trace: bool,
    /// The stream epoch it reads in.
    epoch: String,
    /// With deltas: the last event pushed (its seq, marked, and its data), what the next
    /// one's delta is from.
    base: Option<(u64, bytes::Bytes)>,
    // Metric handles are looked up once, not once per event.
    received: metrics::Counter,
    malformed: metrics::Counter,
    delivered: metrics::Counter,
    bytes_out: metrics::Counter,
    slow: metrics::Counter,
    latency: metrics::Histogram,
}

impl Reader {
    fn new(channel: Channel, target: Target, with_trace: bool, subject: &str) -> Reader {
        Reader {
            key: channel_key(channel.as_str()),
            frames: Vec::new(),
            recipients: Recipients::new(),
            flushed: tokio::time::Instant::now(),
            spans: Vec::new(),
            channel,
            subject: subject.to_string(),
            target,
            with_trace,
            epoch: String::new(),
            base: None,
            received: counter!("fanout_ws_events_received_total"),
            malformed: counter!("fanout_ws_events_malformed_total"),
            delivered: counter!("fanout_ws_frames_delivered_total"),
            bytes_out: counter!("fanout_ws_bytes_out_total"),
            slow: counter!("fanout_ws_slow_consumer_disconnects_total"),
            latency: histogram!("fanout_ws_event_latency_seconds"),
        }
    }

    /// Encodes one event for delivery with the next [`Reader::flush`]; `prev` is the seq of
    /// the channel's event before it.
    fn push(&mut self, envelope: &Envelope, prev: u64) {
        let Some((frame, span, started)) = self.encode(envelope) else {
            return;
        };
        // Encoded once; each transport frames it once, for all its connections.
        let region = envelope.region;
        let prev = if prev == 0 {
            0
        } else {
            mark::pack(region, prev)
        };
        let outgoing = Outgoing::event(mark::pack(region, envelope.seq), frame)
            .after(prev)
            .excluding(envelope.exclude);
        let outgoing = match self.target.deltas {
            true => self.deltas(envelope, prev, outgoing),
            false => outgoing,
        };
        self.frames.push(outgoing);
        if !span.is_none() {
            self.spans.push((span, started));
        }
    }

    /// `outgoing` with what clients that take deltas get instead: the data as a string, and
    /// the fossil delta from the channel's event before it (`prev`), when that is the one
    /// this reader pushed last. Made once per event, whoever takes them.
    fn deltas(&mut self, envelope: &Envelope, prev: u64, outgoing: Outgoing) -> Outgoing {
        // Bytes: no deltas.
        let text = match envelope.binary {
            true => None,
            false => std::str::from_utf8(&envelope.data).ok(),
        };
        let Some(text) = text else {
            self.base = None;
            return outgoing;
        };
        let delta = match &self.base {
            Some((seq, base)) if prev != 0 && *seq == prev => {
                // fossil_delta::delta(target, source): what turns `base` into this data.
                let delta = fossil_delta::delta(&envelope.data, base);
                // Only a delta that is text (JSON carries it as a string) and smaller.
                String::from_utf8(delta)
                    .ok()
                    .filter(|d| d.len() < text.len())
                    .map(|d| envelope.delta_frame_json(self.with_trace, &d, true))
            }
            _ => None,
        };
        self.base = Some((outgoing.seq, envelope.data.clone()));
        outgoing.with_deltas(Deltas {
            whole: envelope
                .delta_frame_json(self.with_trace, text, false)
                .into(),
            delta: delta.map(Into::into),
        })
    }

    /// An event's frame, with its span and when its encoding began; none (counted, logged)
    /// when its data is not JSON.
    fn encode(&self, envelope: &Envelope) -> Option<(String, tracing::Span, Instant)> {
        self.received.increment(1);
        self.latency
            .record(now_ms().saturating_sub(envelope.ts) as f64 / 1000.0);
        // One span per event and node, never per recipient; none at all when tracing is off.
        let span = if telemetry::tracing_enabled() {
            process_span(&self.subject, envelope)
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        match span.in_scope(|| encode(envelope, self.with_trace)) {
            Ok(frame) => Some((frame, span, started)),
            Err(err) => {
                self.malformed.increment(1);
                let channel = &self.channel;
                tracing::warn!(%channel, seq = envelope.seq, %err, "dropping an event whose data is not JSON");
                None
            }
        }
    }

    /// Delivers a volatile event at once, behind the events pushed before it: never recorded
    /// in the log, since it is never replayed. Its frame has no seq (0: not an event for the
    /// connections' resume filters).
    fn volatile(&mut self, envelope: &Envelope) {
        self.flush();
        let Some((frame, span, started)) = self.encode(envelope) else {
            return;
        };
        if !span.is_none() {
            self.spans.push((span, started));
        }
        self.frames
            .push(Outgoing::volatile(frame).excluding(envelope.exclude));
        self.deliver();
    }

    fn has_frames(&self) -> bool {
        !self.frames.is_empty()
    }

    /// Delivers the events pushed since the last flush.
    fn flush(&mut self) {
        if self.frames.is_empty() {
            return;
        }
        self.flushed = tokio::time::Instant::now();
        // Recorded before the members are copied (see `Log`).
        self.target.log.record(&self.frames, &self.epoch);
        self.deliver();
    }

    /// Closes the channel's members with 4003 (reconnect and resume): they cannot be given
    /// what they missed now. How many.
    fn unavailable(&mut self) -> usize {
        self.members();
        let closed = self
            .recipients
            .drain(..)
            .filter(|sink| sink.kick().kick(crate::disconnect::UNAVAILABLE))
            .count();
        counter!("fanout_ws_gap_closes_total").increment(closed as u64);
        closed
    }

    /// The channel's members now, into `recipients`: every connection for broadcast; nobody
    /// when this stretch of interest has ended (this reader is being stopped).
    fn members(&mut self) {
        let Target {
            hub, generation, ..
        } = &self.target;
        if self.channel.is_broadcast() {
            hub.conns().sinks(&mut self.recipients);
        } else {
            hub.memberships().recipients(
                &self.channel,
                self.key,
                *generation,
                &mut self.recipients,
            );
        }
    }

    /// Offers the frames pushed to the channel's members, now.
    fn deliver(&mut self) {
        self.members();
        let totals = &self.target.totals;
        let outcome = offer_all(self.key, &self.frames, &mut self.recipients);
        let events = self.frames.len() as u64;
        self.frames.clear();
        totals.count(
            events,
            outcome.delivered as u64,
            outcome.bytes as u64,
            outcome.slow as u64,
        );
        self.delivered.increment(outcome.delivered as u64);
        self.bytes_out.increment(outcome.bytes as u64);
        self.slow.increment(outcome.slow as u64);
        for (span, started) in self.spans.drain(..) {
            span.record("fanout.recipients", outcome.recipients as u64);
            span.record("fanout.dropped", outcome.slow as u64);
            span.record("fanout.fanout_seconds", started.elapsed().as_secs_f64());
        }
        if outcome.slow > 0 {
            let channel = &self.channel;
            tracing::info!(%channel, slow = outcome.slow, "cut off slow consumers");
        }
    }
}

/// The `process` span of one event on this node, a child of the API's `publish` span.
fn process_span(subject: &str, envelope: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {subject}"),
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %subject,
        messaging.message.id = %envelope.id,
        fanout.channel = %envelope.channel,
        fanout.seq = envelope.seq,
        fanout.recipients = Empty,
        fanout.dropped = Empty,
        fanout.fanout_seconds = Empty,
        trace_id = Empty,
    );
    telemetry::continue_trace(
        &span,
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
    );
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_frame_embeds_data_verbatim() {
        let mut envelope = Envelope {
            channel: Channel::parse("maths").unwrap(),
            volatile: false,
            seq: 42,
            last_seq: 41,
            region: 0,
            region_name: None,
            id: "abc".into(),
            ts: 1_700_000_000_000,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
            data: bytes::Bytes::from_static(br#"{"x": [1, 2.50]}"#),
            binary: false,
            name: None,
            exclude: None,
        };
        let frame = encode(&envelope, false).unwrap();
        assert_eq!(
            frame.as_str(),
            r#"{"op":"event","channel":"maths","seq":42,"id":"abc","ts":1700000000000,"data":{"x": [1, 2.50]}}"#
        );
        let frame = encode(&envelope, true).unwrap();
        assert!(
            frame.contains(r#""trace":"4bf92f3577b34da6a3ce929d0e0e4736","data""#),
            "{frame}"
        );
        // A volatile event: no seq.
        (envelope.volatile, envelope.seq, envelope.last_seq) = (true, 0, 0);
        envelope.region_name = Some("eu".into());
        assert_eq!(
            encode(&envelope, false).unwrap(),
            r#"{"op":"event","channel":"maths","volatile":true,"region":"eu","id":"abc","ts":1700000000000,"data":{"x": [1, 2.50]}}"#
        );
        // Bytes: base64, marked; never checked as JSON.
        envelope.data = bytes::Bytes::from_static(b"\x00\xff{");
        envelope.binary = true;
        assert!(
            encode(&envelope, false)
                .unwrap()
                .ends_with(r#""data":"AP97","encoding":"base64"}"#)
        );
    }
}
