//! Page-aligned byte buffers that become [`Bytes`] without copying.
//!
//! `O_DIRECT` transfers need the buffer address, the file offset and the length
//! aligned to the file system's direct-I/O alignment. [`AlignedBuf`] always starts
//! on a [`DIRECT_IO_ALIGN_BYTES`] boundary, so a read into it can go straight to
//! the device, and a front end that receives a write payload into one (see
//! [`AlignedBuf::zeroed`] and [`AlignedBuf::as_mut_slice`]) hands the store a
//! `Bytes` that can be written with `O_DIRECT` as it is.
//!
//! The buffer is a boxed slice of 4096-byte, 4096-aligned blocks viewed as bytes
//! through `zerocopy`, so this module needs no `unsafe`.

use std::fmt;

use bytes::Bytes;
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Alignment of every [`AlignedBuf`] and of the requests the file store sends
/// through `O_DIRECT`. It is the page size and a multiple of every logical block
/// size in common use (512 and 4096), so it satisfies any file system whose
/// reported direct-I/O alignment divides it.
pub const DIRECT_IO_ALIGN_BYTES: usize = 4096;

const _: () = assert!(DIRECT_IO_ALIGN_BYTES.is_power_of_two());

/// One aligned block; the unit of allocation of an [`AlignedBuf`].
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C, align(4096))]
struct Block([u8; DIRECT_IO_ALIGN_BYTES]);

/// An owned byte buffer whose first byte is aligned to [`DIRECT_IO_ALIGN_BYTES`]. Its
/// capacity is rounded up to whole blocks; its length is what was asked for. Large buffers
/// go back to a pool when dropped, for [`AlignedBuf::recycled`].
pub struct AlignedBuf {
    blocks: Box<[Block]>,
    len: usize,
}

/// Buffers of at least this many blocks are pooled: below it the allocator is as quick.
const POOLED_BLOCKS_MIN: usize = 16;
/// Most bytes the pool keeps.
const POOL_BYTES_MAX: usize = 64 << 20;

/// Freed large buffers by block count, for reuse without a fresh (zeroed, faulted-in)
/// allocation.
#[derive(Default)]
struct Pool {
    free: std::collections::HashMap<usize, Vec<Box<[Block]>>>,
    bytes: usize,
}

impl Pool {
    /// Keeps `blocks` for reuse, if there is room; false if it was not kept.
    fn put(&mut self, blocks: &mut Box<[Block]>) -> bool {
        let count = blocks.len();
        let bytes = count * DIRECT_IO_ALIGN_BYTES;
        if count < POOLED_BLOCKS_MIN || self.bytes + bytes > POOL_BYTES_MAX {
            return false;
        }
        self.bytes += bytes;
        self.free.entry(count).or_default().push(std::mem::take(blocks));
        true
    }

    /// A kept buffer of `count` blocks, if there is one.
    fn take(&mut self, count: usize) -> Option<Box<[Block]>> {
        let b = self.free.get_mut(&count)?.pop()?;
        self.bytes -= count * DIRECT_IO_ALIGN_BYTES;
        Some(b)
    }
}

static POOL: std::sync::Mutex<Option<Pool>> = std::sync::Mutex::new(None);

fn pool() -> std::sync::MutexGuard<'static, Option<Pool>> {
    // Each update is one push or pop: a panic cannot leave the pool inconsistent.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.blocks.len() >= POOLED_BLOCKS_MIN {
            pool().get_or_insert_with(Pool::default).put(&mut self.blocks);
        }
    }
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    ///
    /// # Panics
    /// If the allocation fails (as `Vec` would).
    pub fn zeroed(len: usize) -> Self {
        let count = len.div_ceil(DIRECT_IO_ALIGN_BYTES);
        let blocks = match <[Block]>::new_box_zeroed_with_elems(count) {
            Ok(blocks) => blocks,
            Err(_) => panic!("cannot allocate an aligned buffer of {len} bytes"),
        };
        AlignedBuf { blocks, len }
    }

    /// A buffer of `len` bytes whose contents are unspecified (an earlier user's bytes):
    /// for callers that overwrite every byte before anyone reads it. Reuses a pooled
    /// buffer of the same size when there is one.
    pub fn recycled(len: usize) -> Self {
        let count = len.div_ceil(DIRECT_IO_ALIGN_BYTES);
        if count >= POOLED_BLOCKS_MIN {
            if let Some(blocks) = pool().as_mut().and_then(|p| p.take(count)) {
                return AlignedBuf { blocks, len };
            }
        }
        AlignedBuf::zeroed(len)
    }

    /// An aligned copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = AlignedBuf::recycled(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of the buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.blocks.as_bytes()[..self.len]
    }

    /// The bytes of the buffer, for filling in place (e.g. reading a socket into it).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.blocks.as_mut_bytes()[..self.len]
    }

    /// Shortens the buffer to `len` bytes; does nothing if it is not longer.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Turns the buffer into [`Bytes`] without copying; the `Bytes` keeps the
    /// allocation (and so the alignment) alive.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// Whether `data` starts at an address aligned to [`DIRECT_IO_ALIGN_BYTES`].
    pub fn is_aligned(data: &[u8]) -> bool {
        (data.as_ptr() as usize) & (DIRECT_IO_ALIGN_BYTES - 1) == 0
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl From<AlignedBuf> for Bytes {
    fn from(buf: AlignedBuf) -> Bytes {
        buf.into_bytes()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_keeps_large_buffers_up_to_its_limit() {
        let mut pool = Pool::default();
        let mut small = std::mem::take(&mut AlignedBuf::zeroed(4096).blocks);
        assert!(!pool.put(&mut small), "small buffers are not pooled");
        let mut big = std::mem::take(&mut AlignedBuf::zeroed(1 << 20).blocks);
        let ptr = big.as_ptr();
        assert!(pool.put(&mut big));
        assert!(pool.take(255).is_none(), "only the same size is handed out");
        assert_eq!(pool.take(256).map(|b| b.as_ptr()), Some(ptr), "the kept buffer comes back");
        let mut n = 0;
        while pool.put(&mut std::mem::take(&mut AlignedBuf::zeroed(1 << 20).blocks)) {
            n += 1;
        }
        assert_eq!(n * (1 << 20), POOL_BYTES_MAX, "the pool stops at its limit");
        let r = AlignedBuf::recycled(100_000);
        assert_eq!(r.len(), 100_000);
        assert!(AlignedBuf::is_aligned(r.as_slice()));
    }

    #[test]
    fn buffers_are_aligned_zeroed_and_sized() {
        for len in [1, 511, 4095, 4096, 4097, 65536 + 3] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert!(AlignedBuf::is_aligned(buf.as_slice()), "len {len}");
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
        let empty = AlignedBuf::zeroed(0);
        assert!(empty.is_empty());
        assert!(empty.as_slice().is_empty());
        assert!(empty.into_bytes().is_empty());
    }

    #[test]
    fn into_bytes_does_not_copy() {
        let mut buf = AlignedBuf::zeroed(8192);
        buf.as_mut_slice()[100] = 7;
        let ptr = buf.as_slice().as_ptr();
        let bytes = buf.into_bytes();
        assert_eq!(bytes.as_ptr(), ptr);
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[100], 7);
        assert!(AlignedBuf::is_aligned(&bytes));
        // Slicing at a block boundary keeps the alignment.
        assert!(AlignedBuf::is_aligned(&bytes.slice(4096..)));
        assert!(!AlignedBuf::is_aligned(&bytes.slice(1..)));
    }

    #[test]
    fn copy_from_and_truncate() {
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let mut buf = AlignedBuf::copy_from(&data);
        assert_eq!(buf.as_slice(), &data[..]);
        buf.truncate(10);
        assert_eq!(buf.as_ref(), &data[..10]);
        buf.truncate(20);
        assert_eq!(buf.len(), 10);
    }
}
