//! The source side: reading one chunk of a replica's copy.

use raftblk_blockdev::backend::{check_range, BackendError};
use raftblk_blockdev::seal::{CopyStore, BLOCK};

use super::chunk::Chunk;

/// Reads `len` bytes of `store` from `offset` (cut at the volume's end, whole blocks) as a
/// chunk of sealed blocks, exactly as stored (seals and versions included). `applied` is the
/// index the store had applied before the read (the caller checked it is enough). A
/// damaged block fails the chunk (the receiver asks another member) rather than travel.
pub async fn read_chunk(
    store: &dyn CopyStore,
    offset: u64,
    len: u64,
    applied: u64,
) -> Result<Chunk, BackendError> {
    let size = store.size_bytes();
    let first = offset / BLOCK;
    let end = offset.saturating_add(len).min(size).div_ceil(BLOCK);
    check_range(first * BLOCK, end.saturating_sub(first) * BLOCK, size)?;
    let count = u32::try_from(end.saturating_sub(first)).unwrap_or(u32::MAX);
    let read = store.read_blocks(first, count).await?;
    if let Some((block, _)) = read.damaged().next() {
        return Err(BackendError::Corrupt {
            offset: block * BLOCK,
            len: BLOCK,
            what: "a damaged block in this copy (another member is asked for the chunk)",
        });
    }
    Ok(Chunk::of_blocks(size, applied, &read))
}
