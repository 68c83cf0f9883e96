//! An in-memory [`BlockBackend`] for tests: sparse 4 KiB pages in a map.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use crate::backend::{check_range, BackendError, BackendResult, BlockBackend, Extent, ExtentKind};

/// Page size of the in-memory map; allocation is tracked at this granularity.
pub const MEM_PAGE_BYTES: u64 = 4096;

/// A volume held in memory. Pages that were never written (or were trimmed) are holes.
#[derive(Debug)]
pub struct MemBackend {
    size_bytes: AtomicU64,
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl MemBackend {
    /// An empty (all-hole) volume of `size_bytes`.
    pub fn new(size_bytes: u64) -> Self {
        MemBackend { size_bytes: AtomicU64::new(size_bytes), pages: Mutex::new(BTreeMap::new()) }
    }

    /// Grows (never shrinks) the volume.
    pub fn grow(&self, size_bytes: u64) {
        self.size_bytes.fetch_max(size_bytes, Ordering::SeqCst);
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<[u8]>>> {
        // A panic while holding the lock cannot leave a page half-updated in a way
        // that matters to tests, so a poisoned lock is still usable.
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f(page_bytes, range_in_page, offset_in_request)` to every page the range touches.
    fn for_each_page(offset: u64, len: u64, mut f: impl FnMut(u64, std::ops::Range<usize>, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let page = pos / MEM_PAGE_BYTES;
            let in_page = (pos % MEM_PAGE_BYTES) as usize;
            let n = ((MEM_PAGE_BYTES as usize) - in_page).min((end - pos) as usize);
            f(page, in_page..in_page + n, (pos - offset) as usize);
            pos += n as u64;
        }
    }

    fn zero_range(&self, offset: u64, len: u64, dealloc: bool) {
        let mut pages = self.pages();
        Self::for_each_page(offset, len, |page, range, _| {
            if range.len() == MEM_PAGE_BYTES as usize && dealloc {
                pages.remove(&page);
            } else if let Some(p) = pages.get_mut(&page) {
                p[range].fill(0);
            } else if !dealloc {
                pages.insert(page, vec![0u8; MEM_PAGE_BYTES as usize].into_boxed_slice());
            }
        });
    }
}

#[async_trait]
impl BlockBackend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        check_range(offset, len as u64, self.size_bytes())?;
        let mut out = vec![0u8; len as usize];
        let pages = self.pages();
        Self::for_each_page(offset, len as u64, |page, range, at| {
            if let Some(p) = pages.get(&page) {
                out[at..at + range.len()].copy_from_slice(&p[range]);
            }
        });
        Ok(Bytes::from(out))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> BackendResult<()> {
        check_range(offset, data.len() as u64, self.size_bytes())?;
        let mut pages = self.pages();
        Self::for_each_page(offset, data.len() as u64, |page, range, at| {
            let p =
                pages.entry(page).or_insert_with(|| vec![0u8; MEM_PAGE_BYTES as usize].into_boxed_slice());
            let n = range.len();
            p[range].copy_from_slice(&data[at..at + n]);
        });
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())?;
        self.zero_range(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        _fast_only: bool,
    ) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())?;
        self.zero_range(offset, len, may_trim);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let size = self.size_bytes();
        check_range(offset, len, size)?;
        if len == 0 {
            return Err(BackendError::OutOfRange { offset, len, size });
        }
        let pages = self.pages();
        let mut extents: Vec<Extent> = Vec::new();
        Self::for_each_page(offset, len, |page, range, _| {
            let kind = if pages.contains_key(&page) { ExtentKind::Data } else { ExtentKind::Hole };
            match extents.last_mut() {
                Some(last) if last.kind == kind => last.len_bytes += range.len() as u64,
                _ => extents.push(Extent { len_bytes: range.len() as u64, kind }),
            }
        });
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_trim_round_trip() {
        let m = MemBackend::new(64 * 1024);
        m.write(4000, Bytes::from(vec![7u8; 200]), false).await.unwrap();
        let r = m.read(3990, 220).await.unwrap();
        assert_eq!(&r[..10], &[0u8; 10]);
        assert_eq!(&r[10..210], &[7u8; 200][..]);
        assert_eq!(&r[210..], &[0u8; 10]);
        let map = m.block_status(0, 16384).await.unwrap();
        assert_eq!(map[0], Extent { len_bytes: 8192, kind: ExtentKind::Data });
        m.trim(0, 8192).await.unwrap();
        assert_eq!(m.read(4000, 200).await.unwrap(), Bytes::from(vec![0u8; 200]));
        assert!(m.read(64 * 1024 - 1, 2).await.is_err());
    }
}
