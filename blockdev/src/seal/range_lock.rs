//! A lock on ranges of blocks: shared holders (reads) coexist, an exclusive holder (a
//! write) excludes every overlapping holder. Disjoint ranges never wait for each other.
//!
//! Held ranges sit in one short list behind a mutex; a waiter sleeps on a `Notify` that
//! every release wakes. The list is as long as the requests in flight on one volume (a few
//! dozen), so a linear scan beats anything cleverer.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

/// A lock on ranges of blocks: shared holders coexist, an exclusive holder excludes every
/// overlapping one, disjoint ranges never wait for each other.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Notify,
}

/// A held range; released when dropped.
#[derive(Debug)]
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut state = self.lock.state();
        state.held.retain(|h| h.id != self.id);
        drop(state);
        self.lock.released.notify_waiters();
    }
}

impl RangeLock {
    /// A lock with nothing held.
    pub fn new() -> Arc<RangeLock> {
        Arc::new(RangeLock::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is one push or one retain: a panic cannot leave the list half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `[start, end)` shared (`exclusive = false`) or exclusively, waiting for
    /// conflicting holders to release.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64, exclusive: bool) -> RangeGuard {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check: a release between the check and the wait
            // still wakes us.
            released.as_mut().enable();
            if let Some(guard) = self.try_lock(start, end, exclusive) {
                return guard;
            }
            released.await;
        }
    }

    /// Takes the range if nothing conflicts now.
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64, exclusive: bool) -> Option<RangeGuard> {
        let mut state = self.state();
        let conflict =
            state.held.iter().any(|h| h.start < end && start < h.end && (exclusive || h.exclusive));
        if conflict {
            return None;
        }
        state.next_id += 1;
        let id = state.next_id;
        state.held.push(Held { id, start, end, exclusive });
        Some(RangeGuard { lock: self.clone(), id })
    }

    /// Number of ranges held now.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn exclusive_ranges_exclude_overlaps_only() {
        let lock = RangeLock::new();
        let a = lock.lock(0, 10, true).await;
        assert!(lock.try_lock(10, 20, true).is_some(), "disjoint ranges do not conflict");
        assert!(lock.try_lock(5, 6, false).is_none(), "a read overlapping a write waits");
        let r1 = lock.try_lock(20, 30, false).unwrap();
        let r2 = lock.try_lock(25, 35, false).unwrap();
        assert!(lock.try_lock(29, 31, true).is_none(), "a write overlapping reads waits");
        drop((r1, r2));
        let waiter = {
            let lock = lock.clone();
            tokio::spawn(async move { lock.lock(9, 11, true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while the overlap is held");
        drop(a);
        let g = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        drop(g);
        assert_eq!(lock.held(), 0);
    }
}
