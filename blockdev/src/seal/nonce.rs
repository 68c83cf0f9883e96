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
//! The reservation ([`NonceReserver`]) is the whole proof: the durable high-water mark only
//! grows, every counter handed out is below it, and after a restart (a crash included)
//! counting starts *at* the durable mark, above every value the previous run could have
//! handed out. Skipped values are never reused, which costs nothing: the counter is 64 bits
//! wide, a century of a million writes per second. Reservations are made in batches
//! ahead of need, so writes never wait for them in the steady state.
//!
//! Two nodes never share a prefix (node ids are unique), and one node's counter is unique
//! across all its volumes, so a nonce is unique under every data key. In a cluster the
//! reservation is committed to the replicated catalog, so even a node whose disk is wiped
//! and that rejoins with its old id continues above its old counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::NONCE_BYTES;

/// Counter values reserved at a time by default.
pub const RESERVE_BATCH_DEFAULT: u64 = 1 << 22;

/// Why no nonce could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// The durable reservation failed; nothing may be encrypted until one succeeds.
    #[error("cannot reserve nonces durably: {0}")]
    Reserve(String),
    /// The reserver returned a mark below the one already reserved.
    #[error("nonce reservation went backwards ({got} < {had}); refusing to encrypt")]
    Backwards { had: u64, got: u64 },
    /// The 64-bit counter is exhausted (not reachable in practice).
    #[error("the nonce counter is exhausted")]
    Exhausted,
}

/// Durable storage of a node's nonce high-water mark.
#[async_trait]
pub trait NonceReserver: Send + Sync {
    /// The durable mark: no counter at or above it was ever handed out.
    async fn load(&self) -> Result<u64, NonceError>;

    /// Makes `mark` durable (it is never lower than the last one). Returns the durable
    /// mark, which may be higher if another reservation raced ahead.
    async fn advance(&self, mark: u64) -> Result<u64, NonceError>;
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

/// Hands out nonces of one node: counters below a durably reserved mark.
pub struct NonceSource {
    prefix: u32,
    next: AtomicU64,
    /// Counters below this are reserved (readable without the lock).
    reserved: AtomicU64,
    batch: u64,
    reserver: Arc<dyn NonceReserver>,
    /// Serialises reservations.
    reserving: tokio::sync::Mutex<()>,
    /// A background reservation is under way.
    refilling: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for NonceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceSource")
            .field("prefix", &self.prefix)
            .field("next", &self.next.load(Ordering::Relaxed))
            .field("reserved", &self.reserved.load(Ordering::Relaxed))
            .finish()
    }
}

impl NonceSource {
    /// Starts counting at the reserver's durable mark (above anything handed out before).
    pub async fn start(
        prefix: u32,
        reserver: Arc<dyn NonceReserver>,
        batch: u64,
    ) -> Result<Arc<NonceSource>, NonceError> {
        let mark = reserver.load().await?;
        let source = Arc::new(NonceSource {
            prefix,
            next: AtomicU64::new(mark),
            reserved: AtomicU64::new(mark),
            batch: batch.max(1),
            reserver,
            reserving: tokio::sync::Mutex::new(()),
            refilling: std::sync::atomic::AtomicBool::new(false),
        });
        source.reserve_beyond(mark + 1).await?;
        Ok(source)
    }

    /// The node prefix.
    pub fn prefix(&self) -> u32 {
        self.prefix
    }

    /// The next counter value to be handed out.
    pub fn next_counter(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }

    /// `count` fresh nonces. Waits for a reservation only when the reserved window is used
    /// up; starts the next one in the background once half of it is.
    pub async fn take(self: &Arc<Self>, count: u64) -> Result<NonceRun, NonceError> {
        let start = self.next.fetch_add(count, Ordering::SeqCst);
        let end = start.checked_add(count).ok_or(NonceError::Exhausted)?;
        if end > self.reserved.load(Ordering::SeqCst) {
            self.reserve_beyond(end).await?;
        } else if end > self.reserved.load(Ordering::SeqCst).saturating_sub(self.batch / 2)
            && !self.refilling.swap(true, Ordering::SeqCst)
        {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.reserve_beyond(end + me.batch / 2).await {
                    tracing::warn!(error = %e, "reserving nonces ahead of need failed; retried when needed");
                }
                me.refilling.store(false, Ordering::SeqCst);
            });
        }
        Ok(NonceRun { prefix: self.prefix, start, count })
    }

    /// Makes sure every counter below `need` is durably reserved.
    async fn reserve_beyond(&self, need: u64) -> Result<(), NonceError> {
        let _one = self.reserving.lock().await;
        if need <= self.reserved.load(Ordering::SeqCst) {
            return Ok(());
        }
        let want = need.checked_add(self.batch).ok_or(NonceError::Exhausted)?;
        let got = self.reserver.advance(want).await?;
        if got < want {
            return Err(NonceError::Backwards { had: want, got });
        }
        self.reserved.fetch_max(got, Ordering::SeqCst);
        Ok(())
    }
}

/// A reserver that keeps the mark in memory only: for tests and the simulator.
#[derive(Debug, Default)]
pub struct MemReserver {
    mark: std::sync::Mutex<u64>,
}

impl MemReserver {
    /// The current mark.
    pub fn mark(&self) -> u64 {
        *self.mark.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl NonceReserver for MemReserver {
    async fn load(&self) -> Result<u64, NonceError> {
        Ok(self.mark())
    }
    async fn advance(&self, mark: u64) -> Result<u64, NonceError> {
        let mut m = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        *m = (*m).max(mark);
        Ok(*m)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[tokio::test]
    async fn counters_stay_below_the_durable_mark_and_restarts_start_above() {
        let reserver = Arc::new(MemReserver::default());
        let mut seen = HashSet::new();
        for restart in 0..5 {
            let source = NonceSource::start(7, reserver.clone(), 100).await.unwrap();
            for _ in 0..(37 + restart * 50) {
                let run = source.take(3).await.unwrap();
                for i in 0..run.len() {
                    let counter = u64::from_le_bytes(run.nonce(i)[4..].try_into().unwrap());
                    assert!(counter < reserver.mark(), "handed out above the durable mark");
                    assert!(seen.insert(run.nonce(i)), "nonce repeated after {restart} restarts");
                }
            }
            // A "kill -9": the source goes away with part of its window unused.
        }
        assert!(seen.iter().all(|n| n[..4] == 7u32.to_le_bytes()));
    }

    struct Failing;
    #[async_trait]
    impl NonceReserver for Failing {
        async fn load(&self) -> Result<u64, NonceError> {
            Ok(10)
        }
        async fn advance(&self, _: u64) -> Result<u64, NonceError> {
            Err(NonceError::Reserve("disk full".into()))
        }
    }

    #[tokio::test]
    async fn nothing_is_handed_out_without_a_reservation() {
        assert!(matches!(NonceSource::start(1, Arc::new(Failing), 10).await, Err(NonceError::Reserve(_))));
    }
}
