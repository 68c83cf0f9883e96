//! Nonces that never repeat under a key.
//!
//! AES-GCM loses both confidentiality and authenticity if a nonce is used twice under one
//! key. Random 96-bit nonces reach a collision probability of 2^-32 after ~2^32 writes,
//! which a busy volume does in hours, so nonces here are *counters*:
//!
//! ```text
//! nonce = prefix (u32 LE) ‖ counter (u64 LE)
//! prefix:  the node's id, unique in the cluster (the catalog refuses a duplicate)
//! counter: per node, shared by every volume it encrypts for; a counter value is handed out
//!          only below a high-water mark that was reserved *durably* before
//! ```
//!
//! The reservation ([`NonceReserver`]) is the whole proof: a counter value is handed out
//! only from a run that was reserved *durably* first, and a reserver never grants a value
//! twice (its durable high-water mark only grows). A restart (a crash included) starts with
//! no run, so its first nonce comes from a fresh reservation above everything the previous
//! run could have handed out. Skipped values are never reused, which costs nothing: the
//! counter is 64 bits wide, centuries of a million writes per second. Runs are reserved
//! ahead of need (the next one when half of the current one is used), so writes do not wait
//! for reservations in the steady state.
//!
//! Two nodes never share a prefix (node ids are unique), and one node's counter is unique
//! across all its volumes, so a nonce is unique under every data key. In a cluster the
//! reservation is committed to the replicated catalog, so even a node whose disk is wiped
//! and that rejoins with its old id continues above its old counter.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::NONCE_BYTES;

/// Counter values reserved at a time by default.
pub const RESERVE_BATCH_DEFAULT: u64 = 1 << 24;

/// Why no nonce could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// The durable reservation failed; nothing may be encrypted until one succeeds.
    #[error("cannot reserve nonces durably: {0}")]
    Reserve(String),
    /// The reserver returned a run it should not have (empty, or below what was asked).
    #[error("nonce reservation returned [{from}, {to}) for at least {at_least}; refusing to encrypt")]
    Backwards { at_least: u64, from: u64, to: u64 },
    /// The 64-bit counter is exhausted (not reachable in practice).
    #[error("the nonce counter is exhausted")]
    Exhausted,
}

/// Durable reservation of a node's counter values.
#[async_trait]
pub trait NonceReserver: Send + Sync {
    /// Reserves, durably, `count` counter values `[from, from + count)` with `from >=
    /// at_least`, none of which was ever reserved before for this node.
    async fn reserve(&self, at_least: u64, count: u64) -> Result<(u64, u64), NonceError>;
}

/// A run of consecutive nonces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonceRun {
    prefix: u32,
    start: u64,
    count: u64,
}

impl NonceRun {
    /// The `i`-th nonce of the run.
    pub fn nonce(&self, i: u64) -> [u8; NONCE_BYTES] {
        debug_assert!(i < self.count);
        encode(self.prefix, self.start + i)
    }

    /// Number of nonces.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The nonce for `counter` under `prefix`.
pub fn encode(prefix: u32, counter: u64) -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    n[..4].copy_from_slice(&prefix.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

#[derive(Debug, Default)]
struct Window {
    /// Next counter to hand out, and the end of the reserved run it is in.
    next: u64,
    end: u64,
    /// A run reserved ahead of need.
    spare: Option<(u64, u64)>,
    /// A background reservation is under way.
    refilling: bool,
}

/// Hands out nonces of one node: counters from runs reserved durably before use.
pub struct NonceSource {
    prefix: u32,
    window: Mutex<Window>,
    batch: u64,
    reserver: Arc<dyn NonceReserver>,
    /// Serialises reservations made while a writer waits.
    reserving: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.window();
        f.debug_struct("NonceSource")
            .field("prefix", &self.prefix)
            .field("next", &w.next)
            .field("end", &w.end)
            .finish()
    }
}

impl NonceSource {
    /// A source for the node with nonce prefix `prefix`; nothing is reserved until the
    /// first nonce is wanted (so a node starts without waiting for its reserver).
    pub fn new(prefix: u32, reserver: Arc<dyn NonceReserver>, batch: u64) -> Arc<NonceSource> {
        Arc::new(NonceSource {
            prefix,
            window: Mutex::new(Window::default()),
            batch: batch.max(1),
            reserver,
            reserving: tokio::sync::Mutex::new(()),
        })
    }

    /// The node prefix.
    pub fn prefix(&self) -> u32 {
        self.prefix
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // Every update is a few assignments of plain values.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `count` counters from the current run (or the spare), if they fit.
    fn take_now(&self, count: u64) -> Option<(u64, bool)> {
        let mut w = self.window();
        if w.end - w.next < count {
            match w.spare.take() {
                Some((from, to)) if to - from >= count => {
                    w.next = from;
                    w.end = to;
                }
                other => {
                    w.spare = other;
                    return None;
                }
            }
        }
        let start = w.next;
        w.next += count;
        let low = w.end - w.next < self.batch / 2 && w.spare.is_none() && !w.refilling;
        if low {
            w.refilling = true;
        }
        Some((start, low))
    }

    /// `count` fresh nonces. Waits for a reservation only when the reserved runs are used
    /// up; the next run is reserved in the background once half of the current one is.
    pub async fn take(self: &Arc<Self>, count: u64) -> Result<NonceRun, NonceError> {
        loop {
            if let Some((start, low)) = self.take_now(count) {
                if low {
                    let me = self.clone();
                    tokio::spawn(async move { me.refill().await });
                }
                return Ok(NonceRun { prefix: self.prefix, start, count });
            }
            let _one = self.reserving.lock().await;
            if self.take_now_peek(count) {
                continue;
            }
            let at_least = self.window().end;
            let (from, to) = self.reserve(at_least, count.max(self.batch)).await?;
            let mut w = self.window();
            w.next = from;
            w.end = to;
        }
    }

    fn take_now_peek(&self, count: u64) -> bool {
        let w = self.window();
        w.end - w.next >= count || w.spare.is_some_and(|(f, t)| t - f >= count)
    }

    async fn reserve(&self, at_least: u64, count: u64) -> Result<(u64, u64), NonceError> {
        let (from, to) = self.reserver.reserve(at_least, count).await?;
        if from < at_least || to <= from || to - from < count {
            return Err(NonceError::Backwards { at_least, from, to });
        }
        Ok((from, to))
    }

    async fn refill(&self) {
        let at_least = self.window().end;
        let result = self.reserve(at_least, self.batch).await;
        let mut w = self.window();
        w.refilling = false;
        match result {
            Ok(run) => w.spare = Some(run),
            Err(e) => {
                tracing::warn!(error = %e, "reserving nonces ahead of need failed; retried when needed")
            }
        }
    }
}

/// A reserver that keeps the mark in memory only: for tests and the simulator.
#[derive(Debug, Default)]
pub struct MemReserver {
    mark: std::sync::Mutex<u64>,
}

impl MemReserver {
    /// The current mark (everything below it may have been handed out).
    pub fn mark(&self) -> u64 {
        *self.mark.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl NonceReserver for MemReserver {
    async fn reserve(&self, at_least: u64, count: u64) -> Result<(u64, u64), NonceError> {
        let mut m = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        let from = (*m).max(at_least);
        let to = from.checked_add(count).ok_or(NonceError::Exhausted)?;
        *m = to;
        Ok((from, to))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[tokio::test]
    async fn counters_come_from_reserved_runs_and_restarts_never_reuse_one() {
        let reserver = Arc::new(MemReserver::default());
        let mut seen = HashSet::new();
        for restart in 0..5 {
            let source = NonceSource::new(7, reserver.clone(), 100);
            for _ in 0..(37 + restart * 50) {
                let run = source.take(3).await.unwrap();
                for i in 0..run.len() {
                    let counter = u64::from_le_bytes(run.nonce(i)[4..].try_into().unwrap());
                    assert!(counter < reserver.mark(), "handed out above the durable mark");
                    assert!(seen.insert(run.nonce(i)), "nonce repeated after {restart} restarts");
                }
            }
            // A "kill -9": the source goes away with part of its runs unused.
        }
        assert!(seen.iter().all(|n| n[..4] == 7u32.to_le_bytes()));
    }

    #[tokio::test]
    async fn a_large_take_gets_a_run_of_its_own() {
        let source = NonceSource::new(1, Arc::new(MemReserver::default()), 10);
        let run = source.take(1000).await.unwrap();
        assert_eq!(run.len(), 1000);
    }

    struct Failing;
    #[async_trait]
    impl NonceReserver for Failing {
        async fn reserve(&self, _: u64, _: u64) -> Result<(u64, u64), NonceError> {
            Err(NonceError::Reserve("disk full".into()))
        }
    }

    struct Liar;
    #[async_trait]
    impl NonceReserver for Liar {
        async fn reserve(&self, _: u64, _: u64) -> Result<(u64, u64), NonceError> {
            Ok((0, 0))
        }
    }

    #[tokio::test]
    async fn nothing_is_handed_out_without_a_reservation() {
        let source = NonceSource::new(1, Arc::new(Failing), 10);
        assert!(matches!(source.take(1).await, Err(NonceError::Reserve(_))));
        let source = NonceSource::new(1, Arc::new(Liar), 10);
        assert!(matches!(source.take(1).await, Err(NonceError::Backwards { .. })));
    }
}
