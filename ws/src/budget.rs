//! The node-wide budget of bytes held on behalf of clients (`FANOUT_MAX_BUFFERED_BYTES`):
//! what connections have sent and the node has not yet decoded (incomplete frames, fragmented
//! messages), and what waits for their sockets (backlogs, frames held during a subscribe).
//!
//! Each connection holds a [`Charge`] and sets it to what it holds whenever that grows or
//! shrinks; a connection whose growth would pass the budget is refused (and closed with 1013,
//! "try again later"), so that clients that hold memory cannot take it from the others. The
//! charge changes only when bytes are actually kept: a frame written straight into a socket,
//! the common case, costs no atomic operation here.
//!
//! Frames of a fan-out are shared between recipients (one allocation), yet each backlog that
//! holds one is charged its full size: the budget bounds what the node may be made to hold,
//! an upper bound of the memory it takes.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// The node's budget: a limit and what all charges hold together.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held by all connections now (`fanout_ws_buffered_bytes`).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A new connection's charge, holding nothing yet.
    pub fn charge(self: &Arc<Budget>) -> Charge {
        Charge {
            budget: self.clone(),
            held: 0,
        }
    }
}

/// Growing a charge would pass the node's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// What one connection holds against the budget; given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    held: usize,
}

impl Charge {
    /// Sets what this connection holds to `bytes`. Shrinking always succeeds; growing fails,
    /// changing nothing, when the budget cannot take the difference.
    pub fn set(&mut self, bytes: usize) -> Result<(), OverBudget> {
        if bytes <= self.held {
            if bytes < self.held {
                self.budget
                    .used
                    .fetch_sub(self.held - bytes, Ordering::Relaxed);
                self.held = bytes;
            }
            return Ok(());
        }
        let more = bytes - self.held;
        let before = self.budget.used.fetch_add(more, Ordering::Relaxed);
        if before + more > self.budget.limit {
            self.budget.used.fetch_sub(more, Ordering::Relaxed);
            return Err(OverBudget);
        }
        self.held = bytes;
        Ok(())
    }

    /// What this connection holds.
    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let _ = self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_budget_is_refused_and_nothing_leaks() {
        let budget = Budget::new(100);
        let mut a = budget.charge();
        let mut b = budget.charge();
        a.set(60).unwrap();
        assert_eq!(b.set(50), Err(OverBudget));
        assert_eq!((b.held(), budget.used()), (0, 60));
        b.set(40).unwrap();
        a.set(10).unwrap();
        b.set(90).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
