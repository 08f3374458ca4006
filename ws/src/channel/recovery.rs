//! The resume decision, as a function of values: where a client is on a channel (one
//! region's position), what this node's copy of the region's stream holds now, when a node
//! last vouched for the client's positions, the history limits and whether the copy is a
//! mirror. What to read (a [`Range`]), and whether what was read is everything the client
//! missed (`recovered`). No I/O: [`super::replay`] gathers the facts and reads the stream
//! (centrifuge keeps its decision in `internal/recovery` the same way).
//!
//! Why each rule holds:
//! - **An event still stored** proves nothing after it is gone: limits remove a channel's
//!   oldest events first.
//! - **A position before the channel's first event** (the client has seen none of it) is
//!   whole if the stream still starts right after it, or if nothing could have expired
//!   since: the node vouched for the position within the history window.
//! - **Young and below the limit:** a position vouched for within the history window (less
//!   a margin for clocks and delivery) lost nothing to age; fewer events than the
//!   per-channel limit found after it lost nothing to the limit.
//! - **A mirror that lags** (another region's copy that has not reached the client's
//!   position yet: the client saw the event at the origin) cannot have lost what comes
//!   after: it arrives there in order.
//! - **Another epoch:** the stream was recreated; the client's sequences name nothing.

use std::time::Duration;

use crate::position::Position;

/// How much younger than the history window a position's vouching time must be for a node
/// to vouch that nothing after it expired: clocks of different nodes, and delivery.
pub const VOUCH_MARGIN: Duration = Duration::from_secs(5);

/// The history limits every copy of the stream keeps.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long the stream keeps an event.
    pub window: Duration,
    /// How many events it keeps per channel.
    pub per_channel: u64,
}

/// What to read from the stream for one region: the channel's events with
/// `after < seq <= until` (no bound: `None`), reaching at least `reach` (an event this node
/// has offered the channel's members: stored, so a replica that lags behind it is waited for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub after: u64,
    pub until: Option<u64>,
    pub reach: u64,
}

/// What to read for a client at `position`. `last` is the copy's last sequence, when read
/// once the channel's subscription was in place: every later event is delivered live, so the
/// read stops there (it would otherwise chase the end of a busy stream). `delivered` is the
/// highest seq this node has offered the channel's members.
pub fn range(position: Position, last: Option<u64>, delivered: u64) -> Range {
    Range {
        after: position.seq(),
        until: last.map(|last| last.max(delivered)),
        reach: delivered,
    }
}

/// What a resume found out about one region's copy of the channel.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    /// Where the client is.
    pub position: Position,
    /// How many events the read found after it.
    pub found: u64,
    /// For a position at an event of the channel: whether that event is still stored.
    pub stored: Option<bool>,
    /// The copy's first stored and last sequences now.
    pub first: u64,
    pub last: u64,
    /// The copy is this region's mirror of another region's stream.
    pub mirror: bool,
    /// When a node last vouched for the client's positions (unix ms), if one did.
    pub vouched: Option<u64>,
    /// Now (unix ms).
    pub now: u64,
}

/// Whether the events read after the client's position are every event it missed.
pub fn recovered(facts: &Facts, limits: &Limits) -> bool {
    let after = facts.position.seq();
    let below_limit = facts.found < limits.per_channel;
    let window = limits.window.as_millis() as u64;
    let margin = VOUCH_MARGIN.as_millis() as u64;
    let young = facts
        .vouched
        .is_some_and(|at| facts.now + margin < at + window);
    match (facts.position, facts.stored) {
        (Position::Event(_), Some(true)) if after > 0 => true,
        (Position::Event(_), _) if after > 0 => {
            (facts.mirror && facts.last < after) || (young && below_limit)
        }
        _ => (facts.first <= after + 1 || young) && below_limit,
    }
}

/// Whether a channel's recent events, kept from after `base` up to `reach` (the last one
/// kept, or `base` when none is), answer a client at `after`: they reach back to it, and
/// forward to `delivered`, everything offered to the channel's members so far (what a member
/// does not get from them it gets live).
pub fn in_window(base: u64, reach: u64, after: u64, delivered: u64) -> bool {
    base <= after && reach >= delivered
}

/// Whether a resume from positions in several regions is whole: every region's is.
pub fn resumed(regions: impl IntoIterator<Item = bool>) -> bool {
    regions.into_iter().all(|recovered| recovered)
}

/// How a client's epoch compares with the stream's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    /// This node has not read the stream yet: it cannot tell one epoch from another.
    Unknown,
    /// The stream was recreated since: the client's positions count in sequences that no
    /// longer exist. Nothing is replayed, and the resume is not recovered.
    Other,
    /// The positions count in the stream's sequences (or the client did not say).
    Same,
}

/// Compares the client's epoch (if it gave one) with the stream's (`current`, empty while
/// unknown).
pub fn epoch(client: Option<&str>, current: &str) -> Epoch {
    match client {
        _ if current.is_empty() => Epoch::Unknown,
        Some(client) if client != current => Epoch::Other,
        _ => Epoch::Same,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::mark;

    const LIMITS: Limits = Limits {
        window: Duration::from_secs(600),
        per_channel: 1000,
    };
    const NOW: u64 = 1_800_000_000_000;

    /// A client at event 40 of a copy holding 1..=100, read back in full, no vouching.
    fn facts() -> Facts {
        Facts {
            position: Position::Event(40),
            found: 60,
            stored: Some(true),
            first: 1,
            last: 100,
            mirror: false,
            vouched: None,
            now: NOW,
        }
    }

    #[test]
    fn the_read_stops_at_the_live_end_and_reaches_what_was_delivered() {
        let at = Position::Event(40);
        assert_eq!(
            range(at, Some(100), 90),
            Range {
                after: 40,
                until: Some(100),
                reach: 90
            }
        );
        // A replica behind what this node delivered: the read goes on to it.
        assert_eq!(range(at, Some(80), 90).until, Some(90));
        // Not subscribed yet: no live end, read to the end of the stream.
        assert_eq!(range(Position::After(7), None, 0).until, None);
    }

    #[test]
    fn an_event_still_stored_recovers_everything_after_it() {
        assert!(recovered(&facts(), &LIMITS));
        // ...even when its channel has passed the limit since: limits remove the oldest.
        let crowded = Facts {
            found: 1000,
            ..facts()
        };
        assert!(recovered(&crowded, &LIMITS));
    }

    #[test]
    fn an_expired_event_is_recovered_only_when_vouched_young_and_below_the_limit() {
        let expired = Facts {
            stored: Some(false),
            first: 60,
            ..facts()
        };
        assert!(!recovered(&expired, &LIMITS), "nothing vouched for it");
        let vouched = |at: u64| Facts {
            vouched: Some(at),
            ..expired
        };
        assert!(recovered(&vouched(NOW - 60_000), &LIMITS), "a minute old");
        assert!(
            !recovered(&vouched(NOW - 596_000), &LIMITS),
            "within the window, but not by the margin"
        );
        assert!(
            !recovered(&vouched(NOW - 3_600_000), &LIMITS),
            "an hour old"
        );
        let crowded = Facts {
            found: 1000,
            ..vouched(NOW - 60_000)
        };
        assert!(
            !recovered(&crowded, &LIMITS),
            "the per-channel limit removed some"
        );
    }

    #[test]
    fn a_position_before_the_channels_first_event() {
        let after = Facts {
            position: Position::After(40),
            stored: None,
            ..facts()
        };
        assert!(recovered(&after, &LIMITS), "the stream starts before it");
        let moved_on = Facts { first: 42, ..after };
        assert!(
            !recovered(&moved_on, &LIMITS),
            "events after it may have expired"
        );
        assert!(
            recovered(&Facts { first: 41, ..after }, &LIMITS),
            "the stream starts right after it"
        );
        assert!(recovered(
            &Facts {
                vouched: Some(NOW - 1000),
                ..moved_on
            },
            &LIMITS
        ));
        // A client that has seen nothing of the channel at all (`since: 0`).
        let zero = Facts {
            position: Position::Event(0),
            stored: None,
            first: 1,
            ..facts()
        };
        assert!(recovered(&zero, &LIMITS));
        assert!(!recovered(&Facts { first: 5, ..zero }, &LIMITS));
    }

    #[test]
    fn a_position_ahead_of_a_lagging_mirror_is_recovered() {
        // With regions: the client saw event 40 of the other region at its origin; this
        // region's mirror has reached 35 only.
        let ahead = Facts {
            position: Position::Event(mark::pack(1, 40)),
            stored: Some(false),
            found: 0,
            last: 35,
            mirror: true,
            ..facts()
        };
        assert!(recovered(&ahead, &LIMITS));
        // The same on this region's own stream: the event is gone.
        assert!(!recovered(
            &Facts {
                mirror: false,
                ..ahead
            },
            &LIMITS
        ));
        // A mirror that has passed the position and lost the event: gone.
        assert!(!recovered(&Facts { last: 50, ..ahead }, &LIMITS));
    }

    #[test]
    fn the_memory_window_answers_what_it_reaches_both_ways() {
        // Events 5, 9 and 12 kept after 2; 12 is the last delivered.
        assert!(in_window(2, 12, 5, 12));
        assert!(in_window(2, 12, 2, 12), "right at its start");
        assert!(in_window(2, 12, 12, 12), "nothing since");
        assert!(
            !in_window(2, 12, 1, 12),
            "from before the window: the stream"
        );
        assert!(!in_window(2, 12, 9, 13), "13 was delivered and not kept");
        // Seeded, nothing kept yet: answers only from where it starts.
        assert!(in_window(40, 40, 40, 0));
        assert!(!in_window(40, 40, 39, 0));
    }

    #[test]
    fn with_regions_a_resume_is_whole_when_every_region_is() {
        let eu = facts();
        let us = Facts {
            position: Position::Event(mark::pack(1, 7)),
            stored: Some(false),
            first: 9,
            ..facts()
        };
        let each = [eu, us].map(|f| recovered(&f, &LIMITS));
        assert_eq!(each, [true, false], "eu's event is there, us's expired");
        assert!(!resumed(each));
        assert!(resumed([true, true]));
    }

    #[test]
    fn another_epoch_is_lost_and_an_unknown_one_is_not_judged() {
        assert_eq!(epoch(Some("a"), "a"), Epoch::Same);
        assert_eq!(epoch(None, "a"), Epoch::Same);
        assert_eq!(epoch(Some("a"), "b"), Epoch::Other);
        assert_eq!(epoch(Some("a"), ""), Epoch::Unknown);
        assert_eq!(epoch(None, ""), Epoch::Unknown);
    }
}
