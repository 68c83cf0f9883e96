//! A volume whose key is not available yet (its KEK is not loaded): it is served once
//! unlocked, and refuses I/O until then.

use super::*;

type Res<T> = raftblk_blockdev::backend::BackendResult<T>;

/// What serves an encrypted volume opened on a node that lacked its KEK: every request
/// fails with the reason (exports refuse it before a client gets this far) until the KEK
/// arrives ([`VolumeManager::unlock_all`]) and the real backend is put in.
pub(super) struct Lockable {
    pub(super) why: String,
    pub(super) size: Arc<AtomicU64>,
    pub(super) unlocked: OnceLock<Arc<dyn BlockBackend>>,
}

impl Lockable {
    fn inner(&self) -> raftblk_blockdev::backend::BackendResult<&Arc<dyn BlockBackend>> {
        self.unlocked.get().ok_or_else(|| {
            BackendError::Io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, self.why.clone()))
        })
    }
}

#[async_trait::async_trait]
impl BlockBackend for Lockable {
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::SeqCst)
    }
    async fn read(&self, offset: u64, len: u32) -> Res<bytes::Bytes> {
        self.inner()?.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: bytes::Bytes, fua: bool) -> Res<()> {
        self.inner()?.write(offset, data, fua).await
    }
    async fn flush(&self) -> Res<()> {
        self.inner()?.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Res<()> {
        self.inner()?.trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool) -> Res<()> {
        self.inner()?.write_zeroes(offset, len, may_trim, fast_only).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Res<Vec<raftblk_blockdev::Extent>> {
        self.inner()?.block_status(offset, len).await
    }
}

impl Volume {
    /// Why this node cannot serve the volume now (an encrypted volume whose KEK it lacks).
    pub(super) fn locked(&self) -> Option<String> {
        self.lockable.as_ref().filter(|l| l.unlocked.get().is_none()).map(|l| l.why.clone())
    }
}
