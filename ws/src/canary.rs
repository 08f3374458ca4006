//! The node proves its own delivery path, all the time (`FANOUT_CANARY_INTERVAL_MS`): every
//! interval it publishes a probe through the stream, on a channel of its own
//! (`_fanout.canary.<node>`), and must get it back through its republish subscription, the
//! way every client's event comes. A broken path that keeps every connection up (the
//! stream's RePublish gone, a subscription the server refused or lost, a stream that takes
//! no writes) is invisible to connection state; the probe is not.
//!
//! When probes are missing for [`MISSED_TO_FAIL`] intervals in a row, the node is unready
//! (`/readyz` 503 with the reason), `fanout_ws_canary_ok` is 0, the log says why, and the
//! node rebuilds its path ([`Bus::resync`]: the stream's settings checked and restored,
//! every channel subscribed afresh). While broken, the probe's own subscription is renewed
//! every interval; once a probe comes back, the node is ready again and resyncs once more,
//! so every channel fetches what was stored while the path was broken.
//!
//! Each probe is one stored event (small; kept for `FANOUT_HISTORY_MAX_AGE_SECS` like any).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fanout::{Bus, Channel, Subscription};
use metrics::{counter, gauge};
use tokio_util::sync::CancellationToken;

/// Intervals in a row without a probe back before the path counts as broken.
pub const MISSED_TO_FAIL: u32 = 2;

/// What the canary last found; read by `/readyz`.
#[derive(Debug)]
pub struct Health {
    ok: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            ok: AtomicBool::new(true),
            reason: Mutex::new(None),
        }
    }
}

impl Health {
    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Acquire)
    }

    /// Why the path counts as broken, while it does.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, reason: Option<String>) {
        gauge!("fanout_ws_canary_ok").set(if reason.is_none() { 1.0 } else { 0.0 });
        self.ok.store(reason.is_none(), Ordering::Release);
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }
}

/// The probes' bookkeeping, apart from the I/O (unit-tested with paused time).
#[derive(Debug, Default)]
struct Tally {
    /// The last probe sent, and the highest one back.
    sent: u64,
    back: u64,
    /// Intervals in a row whose probe did not come back.
    missed: u32,
    /// Why the last probe was not stored, if it was not.
    refused: Option<String>,
}

/// What a tick decided.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Just found broken, with the reason.
    Broke(String),
    /// Still broken.
    Broken,
    /// Just recovered.
    Recovered,
}

impl Tally {
    /// Judges the probe sent at the previous tick; `healthy` is what the node says now.
    fn tick(&mut self, healthy: bool, interval: Duration) -> Verdict {
        if self.sent > 0 {
            if self.back >= self.sent {
                self.missed = 0;
            } else {
                self.missed += 1;
            }
        }
        match (healthy, self.missed >= MISSED_TO_FAIL) {
            (true, false) => Verdict::Fine,
            (true, true) => Verdict::Broke(match &self.refused {
                Some(err) => format!("canary: the stream does not take the probe: {err}"),
                None => format!(
                    "canary: {} probes in a row, published every {} ms, did not come back \
                     through the republish subscription",
                    self.missed,
                    interval.as_millis()
                ),
            }),
            (false, true) => Verdict::Broken,
            (false, false) => Verdict::Recovered,
        }
    }
}

/// Runs the canary of node `node` until `shutdown`.
pub async fn run(
    bus: Bus,
    node: Arc<str>,
    interval: Duration,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let channel = Channel::canary(&node);
    // Probes carry this run's nonce: anything else on the channel (a client or the API
    // publishing there) is not a probe and cannot make a broken path look healthy.
    let nonce: Arc<str> = uuid::Uuid::new_v4().simple().to_string().into();
    let mut subscription: Option<Subscription> = None;
    let mut tally = Tally::default();
    let refused: Arc<Mutex<Option<String>>> = Arc::default();
    health.set(None);
    // The first probe goes out one interval after start: the node's own start-up (NATS,
    // the stream) is `/readyz`'s other checks' to judge.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connections = bus.connections();
    connections.borrow_and_update();
    loop {
        let probe = async {
            match &mut subscription {
                Some(subscription) => subscription.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            next = probe => {
                match next {
                    Some(Ok(envelope)) => {
                        if let Some(n) = probe_number(&envelope.data, &nonce)
                            && n <= tally.sent
                        {
                            tally.back = tally.back.max(n);
                        }
                    }
                    Some(Err(_)) => {}
                    // The subscription ended (the bus closed): renew it at the next tick.
                    None => subscription = None,
                }
                // While broken, a probe back is news at once, not at the next tick.
                if !health.is_ok() && tally.back >= tally.sent {
                    tally.missed = 0;
                    recovered(&bus, &health);
                }
                continue;
            }
            changed = connections.changed() => {
                if changed.is_err() || health.is_ok() {
                    continue;
                }
                // Reconnected while broken: probe now rather than at the next tick.
                subscription = bus.subscribe(&channel).await.ok();
                tally.sent += 1;
                probe_out(&bus, &channel, &nonce, tally.sent, &refused);
                continue;
            }
            _ = ticker.tick() => {}
        }
        tally.refused = refused.lock().unwrap_or_else(|e| e.into_inner()).take();
        match tally.tick(health.is_ok(), interval) {
            Verdict::Fine => {}
            Verdict::Broke(reason) => {
                tracing::error!(%reason, "delivery path broken; rebuilding subscriptions");
                counter!("fanout_ws_canary_failures_total").increment(1);
                health.set(Some(reason));
                bus.resync();
            }
            Verdict::Broken => {
                // The server may have refused or lost the probe's subscription too; and the
                // stream's settings may have been changed again.
                subscription = None;
                bus.log().check_stream();
            }
            Verdict::Recovered => recovered(&bus, &health),
        }
        if subscription.is_none() {
            subscription = bus.subscribe(&channel).await.ok();
        }
        tally.sent += 1;
        probe_out(&bus, &channel, &nonce, tally.sent, &refused);
    }
}

fn recovered(bus: &Bus, health: &Health) {
    tracing::info!("delivery path works again; catching up every channel");
    health.set(None);
    bus.resync();
}

/// Publishes probe `n`; not awaited: a publish may take up to its timeout, and the probes
/// that come back meanwhile must be counted. A refusal is kept for the next verdict.
fn probe_out(
    bus: &Bus,
    channel: &Channel,
    nonce: &str,
    n: u64,
    refused: &Arc<Mutex<Option<String>>>,
) {
    let (bus, channel, refused) = (bus.clone(), channel.clone(), refused.clone());
    let data = format!(r#"{{"probe":{n},"nonce":"{nonce}"}}"#);
    tokio::spawn(async move {
        if let Err(err) = bus
            .log()
            .publish(&channel, bytes::Bytes::from(data), None)
            .await
        {
            *refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
        }
    });
}

/// The number of a probe of this run (`nonce`), if `data` is one.
fn probe_number(data: &[u8], nonce: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        probe: u64,
        nonce: &'a str,
    }
    serde_json::from_slice::<Probe>(data)
        .ok()
        .filter(|p| p.nonce == nonce)
        .map(|p| p.probe)
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_millis(5000);

    #[test]
    fn two_missing_probes_break_and_one_back_recovers() {
        let mut tally = Tally::default();
        assert_eq!(tally.tick(true, I), Verdict::Fine); // nothing sent yet
        tally.sent = 1;
        tally.back = 1;
        assert_eq!(tally.tick(true, I), Verdict::Fine);
        tally.sent = 2; // not back
        assert_eq!(tally.tick(true, I), Verdict::Fine);
        tally.sent = 3; // not back either: broken
        let Verdict::Broke(reason) = tally.tick(true, I) else {
            panic!("expected broken");
        };
        assert!(reason.contains("2 probes"), "{reason}");
        tally.sent = 4;
        assert_eq!(tally.tick(false, I), Verdict::Broken);
        tally.sent = 5;
        tally.back = 5; // a late one counts for all before it
        assert_eq!(tally.tick(false, I), Verdict::Recovered);
        tally.sent = 6;
        tally.refused = Some("no responders".into());
        assert_eq!(tally.tick(true, I), Verdict::Fine);
        tally.sent = 7;
        let Verdict::Broke(reason) = tally.tick(true, I) else {
            panic!("expected broken");
        };
        assert!(reason.contains("no responders"), "{reason}");
    }

    #[test]
    fn only_this_runs_probes_count() {
        assert_eq!(
            probe_number(br#"{"probe":3,"nonce":"abc"}"#, "abc"),
            Some(3)
        );
        assert_eq!(
            probe_number(br#"{"probe":99,"nonce":"forged"}"#, "abc"),
            None
        );
        assert_eq!(probe_number(br#"{"probe":99}"#, "abc"), None);
    }

    #[test]
    fn probe_channels_are_valid_for_any_node_id() {
        assert_eq!(Channel::canary("ws-1").as_str(), "_fanout.canary.ws-1");
        assert_eq!(Channel::canary("a.b c*").as_str(), "_fanout.canary.a_b_c_");
        assert_eq!(Channel::canary("").as_str(), "_fanout.canary._");
    }
}
