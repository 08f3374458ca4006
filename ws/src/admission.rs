//! Admission control: how many connections a node holds (`FANOUT_MAX_CONNECTIONS`) and how
//! fast it takes new ones (`FANOUT_ACCEPT_RATE`, `FANOUT_ACCEPT_BURST`). A connection beyond
//! either is answered 503 with `Retry-After` before any work (no token checked, no hook
//! asked): in a reconnect storm a node takes what it can and sends the rest elsewhere, to
//! come back later, instead of falling behind on everyone.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use metrics::counter;
use serde_json::{Value, json};

use crate::config::Config;

/// How long a client is told to wait when the node is full: its connections leave at their
/// own pace, so this is a guess, and the client tries another node meanwhile.
const FULL_RETRY: Duration = Duration::from_secs(5);

/// Why a new connection is not taken now, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `FANOUT_MAX_CONNECTIONS` held.
    Full(Duration),
    /// Over `FANOUT_ACCEPT_RATE`.
    Rate(Duration),
}

impl Refused {
    pub fn retry_after(&self) -> Duration {
        match self {
            Refused::Full(after) | Refused::Rate(after) => *after,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Full(_) => "the node holds FANOUT_MAX_CONNECTIONS connections",
            Refused::Rate(_) => "the node takes FANOUT_ACCEPT_RATE new connections a second",
        }
    }
}

/// A node's admission: its limits and its token bucket.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    rate: f64,
    burst: f64,
    /// Tokens, and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

impl Admission {
    pub fn new(config: &Config) -> Admission {
        let rate = f64::from(config.accept_rate);
        let burst = match config.accept_burst {
            0 => rate,
            burst => f64::from(burst),
        };
        Admission {
            max: config.max_connections,
            rate,
            burst,
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a new connection while the node holds `held`, or says why not and when to try
    /// again (counted in `fanout_ws_admission_refusals_total{reason}`).
    pub fn take(&self, held: usize) -> Result<(), Refused> {
        if self.max > 0 && held >= self.max {
            counter!("fanout_ws_admission_refusals_total", "reason" => "full").increment(1);
            return Err(Refused::Full(FULL_RETRY));
        }
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *bucket;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            return Ok(());
        }
        *bucket = (tokens, now);
        counter!("fanout_ws_admission_refusals_total", "reason" => "rate").increment(1);
        Err(Refused::Rate(Duration::from_secs_f64(
            (1.0 - tokens) / self.rate,
        )))
    }

    /// Whether the node is full (`/readyz` answers 503 then: balancers send new clients
    /// elsewhere).
    pub fn full(&self, held: usize) -> bool {
        self.max > 0 && held >= self.max
    }

    /// What `/readyz` says of it.
    pub fn report(&self, held: usize) -> Value {
        json!({
            "connections": held,
            "max_connections": (self.max > 0).then_some(self.max),
            "accept_rate": (self.rate > 0.0).then_some(self.rate),
            "accept_burst": (self.rate > 0.0).then_some(self.burst),
            "full": self.full(held),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_rate_refuse_with_when_to_come_back() {
        let config = Config {
            max_connections: 3,
            accept_rate: 1,
            accept_burst: 2,
            ..Config::default()
        };
        let admission = Admission::new(&config);
        assert_eq!(admission.take(3), Err(Refused::Full(FULL_RETRY)));
        assert!(admission.full(3) && !admission.full(2));
        assert_eq!(admission.take(0), Ok(()));
        assert_eq!(admission.take(1), Ok(()));
        // The burst is spent: the next token comes within a second.
        match admission.take(2) {
            Err(Refused::Rate(after)) => assert!(after <= Duration::from_secs(1), "{after:?}"),
            other => panic!("{other:?}"),
        }
        let open = Admission::new(&Config::default());
        assert!((0..1000).all(|_| open.take(1_000_000).is_ok()));
    }
}
