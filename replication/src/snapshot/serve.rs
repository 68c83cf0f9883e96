//! The source side: reading one chunk of a replica's store.

use bytes::{Bytes, BytesMut};
use raftblk_blockdev::backend::{BackendError, BlockBackend, ExtentKind};

use super::chunk::Chunk;

/// Reads `len` bytes of `backend` from `offset` (cut at the volume's end) as a chunk:
/// block status finds the allocated extents, and only those are read. `applied` is the
/// index the store had applied before the first read (the caller checked it is enough).
pub async fn read_chunk(
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    applied: u64,
) -> Result<Chunk, BackendError> {
    let size = backend.size_bytes();
    let len = len.min(size.saturating_sub(offset));
    let mut extents: Vec<(u64, ExtentKind)> = Vec::new();
    if len > 0 {
        let mut at = offset;
        for e in backend.block_status(offset, len).await? {
            let take = e.len_bytes.min(offset + len - at);
            if take == 0 {
                break;
            }
            match extents.last_mut() {
                Some((l, k)) if *k == e.kind => *l += take,
                _ => extents.push((take, e.kind)),
            }
            at += take;
        }
        if at < offset + len {
            // Block status may answer for less than asked; what it did not describe is
            // copied as data (always correct, merely not sparse).
            match extents.last_mut() {
                Some((l, ExtentKind::Data)) => *l += offset + len - at,
                _ => extents.push((offset + len - at, ExtentKind::Data)),
            }
        }
    }
    let data_len: u64 = extents.iter().filter(|(_, k)| *k == ExtentKind::Data).map(|(l, _)| l).sum();
    let mut data = BytesMut::with_capacity(data_len as usize);
    let mut at = offset;
    for (l, kind) in &extents {
        if *kind == ExtentKind::Data {
            let mut done = 0u64;
            while done < *l {
                let piece = (*l - done).min(super::READ_BYTES_MAX);
                data.extend_from_slice(&backend.read(at + done, piece as u32).await?);
                done += piece;
            }
        }
        at += l;
    }
    let data: Bytes = data.freeze();
    Ok(Chunk { volume_size: size, source_applied: applied, offset, extents, data })
}
