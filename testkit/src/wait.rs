//! Bounded waits: for a future, or for a condition polled until it holds. Nothing waits for a
//! duration to "let things settle".

use std::{future::Future, time::Duration};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(15);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Runs `fut` under [`WAIT`], failing with `what` if it takes longer.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// Polls `check` until it returns true, failing after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(WAIT, what, check).await
}

/// [`eventually`] with another bound, for a wait that the system under test itself may
/// legitimately make longer than [`WAIT`] (say, a client's reconnect backoff, or a NATS
/// cluster electing its JetStream leaders on a loaded machine).
pub async fn eventually_within<F, Fut>(bound: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let polling = async {
        while !check().await {
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::time::timeout(bound, polling)
        .await
        .unwrap_or_else(|_| panic!("timed out after {bound:?} waiting for {what}"))
}

/// [`eventually_within`] for code without a runtime (the launchers): polls `check` on this
/// thread.
pub fn blocking_until(bound: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + bound;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}
