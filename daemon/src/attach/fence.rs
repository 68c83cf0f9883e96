//! The write-path check of an attachment's generation: a device attached for a CSI
//! publication of generation G has its writes, trims and zeroes refused (EPERM) once the
//! volume's fence has moved past G, i.e. once another node took the volume over.
//!
//! The fence is read from this node's copy of the volume record, which follows the
//! cluster catalog; see ARCHITECTURE.md for what that covers and what it does not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use raftblk_blockdev::{BackendError, BackendResult, BlockBackend, Extent};

use crate::publish::may_write;

/// Where the current fence comes from.
pub type FenceSource = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// A backend whose writes carry an attachment generation.
pub struct FencedBackend {
    inner: Arc<dyn BlockBackend>,
    /// Shared with the attachment: a newer publication to the same node raises it in place.
    generation: Arc<AtomicU64>,
    fence: FenceSource,
}

impl FencedBackend {
    /// Wraps `inner` for an attachment whose generation is `generation`.
    pub fn new(inner: Arc<dyn BlockBackend>, generation: Arc<AtomicU64>, fence: FenceSource) -> Self {
        FencedBackend { inner, generation, fence }
    }

    fn check(&self) -> BackendResult<()> {
        let generation = self.generation.load(Ordering::SeqCst);
        if generation == 0 {
            return Ok(());
        }
        // A volume this node no longer knows is not written either.
        let fence = (self.fence)().unwrap_or(u64::MAX);
        if may_write(generation, fence) {
            Ok(())
        } else {
            Err(BackendError::Fenced { generation, fence })
        }
    }
}

#[async_trait]
impl BlockBackend for FencedBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.inner.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.check()?;
        self.inner.write(offset, data, fua).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.check()?;
        self.inner.trim(offset, len).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> BackendResult<()> {
        self.check()?;
        self.inner.write_zeroes(offset, len, may_trim, fast_only).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }

    async fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.inner.cache(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_stop_once_the_fence_passes_the_generation_reads_go_on() {
        let mem: Arc<dyn BlockBackend> = Arc::new(raftblk_blockdev::store::MemBackend::new(1 << 20));
        let fence = Arc::new(AtomicU64::new(2));
        let f = fence.clone();
        let generation = Arc::new(AtomicU64::new(2));
        let b = FencedBackend::new(mem, generation.clone(), Arc::new(move || Some(f.load(Ordering::SeqCst))));
        b.write(0, Bytes::from_static(&[7; 4096]), false).await.expect("generation 2 writes at fence 2");
        fence.store(3, Ordering::SeqCst);
        let e = b.write(0, Bytes::from_static(&[8; 4096]), false).await.expect_err("fenced");
        assert!(matches!(e, BackendError::Fenced { generation: 2, fence: 3 }), "{e}");
        assert_eq!(e.errno(), libc::EPERM);
        assert!(b.trim(0, 4096).await.is_err());
        assert!(b.write_zeroes(0, 4096, true, false).await.is_err());
        assert_eq!(
            &b.read(0, 4096).await.expect("read")[..],
            &[7; 4096][..],
            "the fenced write changed nothing"
        );
        // Published again to this node: the same open device writes with the new generation.
        generation.store(3, Ordering::SeqCst);
        b.write(0, Bytes::from_static(&[9; 4096]), false).await.expect("generation 3 writes at fence 3");
    }
}
