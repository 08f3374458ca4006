//! The shards the connections and the channels are spread over (as centrifuge's `hub.go`).

use std::sync::{Mutex, MutexGuard};

/// How many shards the connections, and the channels, are spread over.
pub const SHARDS: usize = 64;

/// A panic while holding a shard cannot leave its maps half-updated in a way that matters
/// more than losing every connection would, so keep serving.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn shards<T: Default>() -> Box<[Mutex<T>]> {
    (0..SHARDS).map(|_| Mutex::default()).collect()
}
