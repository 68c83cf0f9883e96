//! The receiving side: filling a replica's store from its peers, chunk by chunk.
//!
//! Every chunk comes from a member whose store had applied at least the snapshot index when
//! it read the chunk (the source checks; see `min_index`). Sources may change between chunks
//! (a source dies, another is asked): the copy is *fuzzy*, each chunk newer than the index
//! by its own amount. Replaying the log after the index over it converges to the exact
//! state, because every command is an idempotent block operation and the log holds every
//! change after the index in order (see [`crate::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use raftblk_blockdev::backend::BackendError;

use super::chunk::{Chunk, ChunkError};
use super::marker::{self, Marker};
use crate::node::ReplicaStore;
use crate::wal::record::GroupId;

/// How long to wait after every source failed a chunk before asking again.
const ALL_SOURCES_FAILED_BACKOFF: Duration = Duration::from_millis(500);
/// How often the copied prefix is flushed and recorded in the marker.
const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Why a source did not deliver a chunk.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// the source has not applied the snapshot index yet (or is rebuilding itself)
    #[error("source has not applied the snapshot index")]
    NotReady,
    /// the source holds no replica of the volume
    #[error("source holds no replica of the volume")]
    NotMember,
    /// the source is unreachable or failed
    #[error("source unreachable or failed: {0}")]
    Unreachable(String),
    /// the chunk arrived damaged
    #[error(transparent)]
    Corrupt(#[from] ChunkError),
}

/// Where chunks come from (the peer transport in production, memory in tests).
#[async_trait]
pub trait ChunkFetcher: Send + Sync {
    /// Asks node `source` for `len` bytes of `group`'s volume at `offset`, read from a store
    /// that has applied at least `min_index`.
    async fn fetch(
        &self,
        source: u64,
        group: GroupId,
        offset: u64,
        len: u64,
        min_index: u64,
    ) -> Result<Chunk, FetchError>;

    /// The group's leader as this node knows it now (0: none, or this node), asked first:
    /// the sources a rebuild starts with come from the membership it knew then, which may
    /// have changed since (a new copy starts from the group's initial members, some of
    /// them long gone), while the leader is a member that has applied what it committed.
    fn leader(&self, _group: GroupId) -> u64 {
        0
    }
}

/// Why a rebuild stopped (source trouble is retried, never an error).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// the local store failed
    #[error("local store: {0}")]
    Store(#[from] BackendError),
    /// the marker file cannot be written
    #[error("rebuild marker: {0}")]
    Marker(#[from] std::io::Error),
    /// no member to copy from
    #[error("no other member to copy the volume from")]
    NoSources,
    /// a state machine refused the image
    #[error(transparent)]
    Machine(crate::machine::MachineError),
}

/// What a rebuild does.
#[derive(Debug, Clone)]
pub struct PullPlan {
    /// The volume's group.
    pub group: GroupId,
    /// Snapshot index: sources must have applied at least this.
    pub index: u64,
    /// Where to continue (bytes before it are already copied and flushed).
    pub offset: u64,
    /// Members to copy from, best first.
    pub sources: Vec<u64>,
    /// Volume bytes asked for per chunk.
    pub chunk_bytes: u64,
    /// Most bytes of data copied per second (0: unlimited), so client I/O keeps flowing.
    pub rate_bytes_per_s: u64,
}

/// Progress of a rebuild, readable while it runs.
#[derive(Debug, Default)]
pub struct PullProgress {
    /// Snapshot index being copied.
    pub index: AtomicU64,
    /// Bytes of the volume covered so far (data and holes).
    pub done_bytes: AtomicU64,
    /// The volume's size.
    pub total_bytes: AtomicU64,
    /// Bytes of data actually transferred.
    pub copied_bytes: AtomicU64,
    /// The member the last chunk came from.
    pub source: AtomicU64,
    /// Chunks that had to be asked for again.
    pub retries: AtomicU64,
}

/// Copies the volume into `store` as `plan` says, recording progress in the marker at
/// `store.rebuild_path` after every flush. Returns once every byte is copied and flushed;
/// the caller then replays the log after `plan.index` and removes the marker.
pub async fn pull(
    fetcher: &dyn ChunkFetcher,
    store: &ReplicaStore,
    plan: &PullPlan,
    progress: &PullProgress,
) -> Result<(), PullError> {
    if plan.sources.is_empty() {
        return Err(PullError::NoSources);
    }
    let chunk_bytes = plan.chunk_bytes.max(4096);
    progress.index.store(plan.index, Ordering::Relaxed);
    progress.done_bytes.store(plan.offset, Ordering::Relaxed);
    marker::write(&store.rebuild_path, Marker { index: plan.index, offset: plan.offset })?;
    let started = Instant::now();
    let mut last_save = Instant::now();
    let mut saved = plan.offset;
    let mut offset = plan.offset;
    let mut size = u64::MAX;
    let mut copied = 0u64;
    let mut next_source = 0usize;
    while offset < size {
        let (volume_size, image) =
            fetch_any(fetcher, plan, offset, chunk_bytes, &mut next_source, progress).await;
        if volume_size > store.backend.size_bytes() {
            (store.grow)(volume_size)?;
        }
        size = volume_size;
        progress.total_bytes.store(size, Ordering::Relaxed);
        if image.states.is_empty() {
            break;
        }
        // Every block as the source holds it, versions and zero blocks included: whatever
        // this copy held there before must go.
        let blocks = image.states.len() as u64;
        let data_len = image.data.len() as u64;
        store.backend.restore(image, false).await?;
        offset += blocks * raftblk_blockdev::seal::BLOCK;
        copied += data_len;
        progress.done_bytes.store(offset, Ordering::Relaxed);
        progress.copied_bytes.store(copied, Ordering::Relaxed);
        if last_save.elapsed() >= SAVE_INTERVAL {
            save(store, plan.index, offset).await?;
            saved = offset;
            last_save = Instant::now();
        }
        if plan.rate_bytes_per_s > 0 {
            let due = started + Duration::from_secs_f64(copied as f64 / plan.rate_bytes_per_s as f64);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
    }
    if offset != saved || offset == plan.offset {
        save(store, plan.index, offset).await?;
    }
    Ok(())
}

/// Flushes what was copied, then records it: the marker never claims unflushed bytes.
async fn save(store: &ReplicaStore, index: u64, offset: u64) -> Result<(), PullError> {
    store.backend.flush().await?;
    marker::write(&store.rebuild_path, Marker { index, offset })?;
    Ok(())
}

/// Asks the sources in turn until one delivers the chunk at `offset`; never gives up (the
/// caller aborts the task when the rebuild is no longer wanted).
async fn fetch_any(
    fetcher: &dyn ChunkFetcher,
    plan: &PullPlan,
    offset: u64,
    chunk_bytes: u64,
    next_source: &mut usize,
    progress: &PullProgress,
) -> (u64, raftblk_blockdev::seal::BlockImage) {
    let mut failures = 0usize;
    loop {
        let leader = fetcher.leader(plan.group);
        let candidates: Vec<u64> = std::iter::once(leader)
            .filter(|&l| l != 0)
            .chain(plan.sources.iter().copied().filter(|&s| s != leader))
            .collect();
        let source = candidates[*next_source % candidates.len()];
        match fetcher.fetch(source, plan.group, offset, chunk_bytes, plan.index).await {
            Ok(chunk) if chunk.offset == offset && chunk.source_applied >= plan.index => match chunk.blocks()
            {
                Ok(image) if image.check().is_ok() => {
                    progress.source.store(source, Ordering::Relaxed);
                    return (chunk.volume_size, image);
                }
                Ok(_) => {
                    tracing::warn!(group = %plan.group, source, offset, "source sent blocks that fail their seals")
                }
                Err(e) => {
                    tracing::warn!(group = %plan.group, source, offset, error = %e, "source sent a malformed chunk")
                }
            },
            Ok(chunk) => {
                tracing::warn!(group = %plan.group, source, offset, got = chunk.offset, "source answered the wrong chunk");
            }
            Err(e) => {
                tracing::debug!(group = %plan.group, source, offset, error = %e, "snapshot chunk not delivered");
            }
        }
        progress.retries.fetch_add(1, Ordering::Relaxed);
        *next_source += 1;
        failures += 1;
        if failures.is_multiple_of(candidates.len()) {
            tokio::time::sleep(ALL_SOURCES_FAILED_BACKOFF).await;
        }
    }
}
