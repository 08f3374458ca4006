//! CPU profiles on demand, in pprof's format (`GET /debug/pprof/profile?seconds=N` on both
//! binaries, as Go's `net/http/pprof` serves them), for `go tool pprof`, Speedscope,
//! Pyroscope and the other usual viewers.
//!
//! The profiler is pprof-rs: it samples the whole process 99 times a second of CPU time
//! (`SIGPROF`), so a profile shows where CPU went, not where tasks waited. One profile at a
//! time per process: a second request while one runs is refused ([`ProfileError::Busy`]).
//! A request that goes away (the client disconnects) stops its profile.
//!
//! Off unless `FANOUT_PROFILING=true`: sampling costs nothing until a profile is asked for, but
//! the endpoint reveals the program's internals, so it is for trusted networks (the API puts
//! it behind its key).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::codes::Code;

/// Samples per second of CPU time (Go's profiler takes 100; 99 avoids lockstep with timers
/// that fire 100 times a second).
const FREQUENCY: i32 = 99;

/// A profile's length when the request names none (Go's default).
pub const DEFAULT_SECONDS: u64 = 30;

/// The longest profile a request may ask for.
pub const MAX_SECONDS: u64 = 300;

/// Whether a profile is being taken in this process (the profiler is process-wide).
static BUSY: AtomicBool = AtomicBool::new(false);

/// Why no profile was taken.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profiling is off: FANOUT_PROFILING=true turns it on")]
    Off,
    #[error("`seconds` must be a whole number from 1 to {MAX_SECONDS}, not {0:?}")]
    InvalidSeconds(String),
    #[error("a CPU profile is already being taken in this process; ask again when it is done")]
    Busy,
    #[error("the profiler failed: {0}")]
    Failed(String),
}

impl ProfileError {
    /// The HTTP status and wire code of the error.
    pub fn status_and_code(&self) -> (u16, Code) {
        match self {
            ProfileError::Off => (404, Code::ProfilingOff),
            ProfileError::InvalidSeconds(_) => (400, Code::InvalidQuery),
            ProfileError::Busy => (409, Code::ProfilingBusy),
            ProfileError::Failed(_) => (500, Code::Internal),
        }
    }
}

/// The length a request asks for: its `seconds` parameter, [`DEFAULT_SECONDS`] without one.
pub fn seconds(query: Option<&str>) -> Result<Duration, ProfileError> {
    let raw = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(name, _)| *name == "seconds")
        .map(|(_, value)| value);
    let Some(raw) = raw else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match raw.parse::<u64>() {
        Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(ProfileError::InvalidSeconds(raw.to_string())),
    }
}

/// What `GET /debug/pprof/profile?<query>` answers: a CPU profile of this process, as long
/// as the query's `seconds` asks, encoded as pprof's protobuf `Profile` (uncompressed; every
/// pprof reader takes it so).
pub async fn serve(enabled: bool, query: Option<&str>) -> Result<Vec<u8>, ProfileError> {
    if !enabled {
        return Err(ProfileError::Off);
    }
    cpu_profile(seconds(query)?).await
}

/// Takes a CPU profile of this process for `length`, encoded as pprof's protobuf `Profile`.
pub async fn cpu_profile(length: Duration) -> Result<Vec<u8>, ProfileError> {
    let _claim = Claim::take()?;
    let failed = |err: pprof::Error| ProfileError::Failed(err.to_string());
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        // Samples taken inside these are dropped: unwinding from them can deadlock.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(failed)?;
    tokio::time::sleep(length).await;
    // Symbolizing takes a while (tens of milliseconds): off the runtime's threads.
    tokio::task::spawn_blocking(move || {
        use pprof::protos::Message;
        let profile = guard
            .report()
            .build()
            .map_err(failed)?
            .pprof()
            .map_err(failed)?;
        drop(guard);
        Ok(profile.encode_to_vec())
    })
    .await
    .map_err(|err| ProfileError::Failed(err.to_string()))?
}

/// This process's one profile slot, given back when dropped.
struct Claim;

impl Claim {
    fn take() -> Result<Claim, ProfileError> {
        BUSY.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| ProfileError::Busy)?;
        metrics::gauge!("fanout_profiling_active").set(1.0);
        Ok(Claim)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        metrics::gauge!("fanout_profiling_active").set(0.0);
        BUSY.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_seconds() {
        assert_eq!(seconds(None).unwrap(), Duration::from_secs(DEFAULT_SECONDS));
        assert_eq!(
            seconds(Some("")).unwrap(),
            Duration::from_secs(DEFAULT_SECONDS)
        );
        assert_eq!(seconds(Some("seconds=5")).unwrap(), Duration::from_secs(5));
        assert_eq!(
            seconds(Some("x=1&seconds=300")).unwrap(),
            Duration::from_secs(300)
        );
        for bad in [
            "seconds=0",
            "seconds=301",
            "seconds=1.5",
            "seconds=",
            "seconds",
        ] {
            let err = seconds(Some(bad)).unwrap_err();
            assert!(
                matches!(err, ProfileError::InvalidSeconds(_)),
                "{bad}: {err}"
            );
            assert_eq!(err.status_and_code(), (400, Code::InvalidQuery));
        }
    }

    #[tokio::test]
    async fn off_unless_enabled() {
        // Off is said before anything else is looked at.
        let err = serve(false, Some("seconds=nope")).await.unwrap_err();
        assert_eq!(err.status_and_code(), (404, Code::ProfilingOff));
    }

    #[test]
    fn one_profile_at_a_time() {
        let first = Claim::take().unwrap();
        assert!(matches!(Claim::take(), Err(ProfileError::Busy)));
        drop(first);
        drop(Claim::take().unwrap());
    }
}
