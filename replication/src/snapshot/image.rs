//! Snapshots of state machine groups ([`crate::machine`]): the whole state travels as one
//! chunk, a single data extent holding the machine's image, taken at the index the chunk
//! names. Unlike a volume's fuzzy copy, the image is consistent, so the receiver installs it
//! and skips the entries it covers instead of replaying them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::chunk::Chunk;
use super::marker::{self, Marker};
use super::pull::{ChunkFetcher, PullError, PullProgress};
use crate::machine::{MachineError, MachineStore, StateMachine};
use crate::wal::record::GroupId;

/// Largest image a snapshot carries: it travels as one forwarded chunk. (The catalog, the
/// one state machine so far, holds a few hundred bytes per volume and node.)
pub const IMAGE_BYTES_MAX: u64 = crate::node::forward::FORWARD_READ_MAX_BYTES;

/// How long to wait after every source failed before asking again.
const ALL_SOURCES_FAILED_BACKOFF: Duration = Duration::from_millis(500);

/// The chunk that carries `machine`'s image.
pub fn image_chunk(machine: &dyn StateMachine) -> Result<Chunk, MachineError> {
    let (index, image) = machine.image()?;
    let len = image.len() as u64;
    if len > IMAGE_BYTES_MAX {
        return Err(MachineError(format!(
            "the state image has {len} bytes, more than a snapshot carries ({IMAGE_BYTES_MAX})"
        )));
    }
    Ok(Chunk { volume_size: len, source_applied: index, offset: 0, body: image })
}

/// Fetches an image taken at `index` or later from the first of `sources` that has one and
/// installs it. Never gives up on the sources (the caller aborts the task when the
/// rebuild is no longer wanted).
pub async fn pull_image(
    fetcher: &dyn ChunkFetcher,
    store: &MachineStore,
    group: GroupId,
    index: u64,
    sources: &[u64],
    progress: &PullProgress,
) -> Result<(), PullError> {
    if sources.is_empty() {
        return Err(PullError::NoSources);
    }
    progress.index.store(index, Ordering::Relaxed);
    marker::write(&store.rebuild_path, Marker { index, offset: 0 })?;
    let mut attempt = 0usize;
    loop {
        let source = sources[attempt % sources.len()];
        attempt += 1;
        match fetcher.fetch(source, group, 0, IMAGE_BYTES_MAX, index).await {
            Ok(chunk) if chunk.offset == 0 && chunk.source_applied >= index => {
                let image: Bytes = chunk.body;
                progress.total_bytes.store(image.len() as u64, Ordering::Relaxed);
                progress.source.store(source, Ordering::Relaxed);
                store.machine.install(chunk.source_applied, image.clone()).map_err(PullError::Machine)?;
                store.machine.flush().map_err(PullError::Machine)?;
                progress.done_bytes.store(image.len() as u64, Ordering::Relaxed);
                progress.copied_bytes.store(image.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
            Ok(chunk) => {
                tracing::warn!(%group, source, at = chunk.source_applied, "source answered an unusable image");
            }
            Err(e) => tracing::debug!(%group, source, error = %e, "state machine image not delivered"),
        }
        progress.retries.fetch_add(1, Ordering::Relaxed);
        if attempt.is_multiple_of(sources.len()) {
            tokio::time::sleep(ALL_SOURCES_FAILED_BACKOFF).await;
        }
    }
}
