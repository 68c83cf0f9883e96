//! The seam between front ends (NBD, later ublk) and whatever stores a volume.

use async_trait::async_trait;
use bytes::Bytes;

/// What a range of a volume holds, as reported by block status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated; may hold any data.
    Data,
    /// Not allocated; reads return zeroes.
    Hole,
}

/// One run of bytes of the same [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub len_bytes: u64,
    /// Whether the run is allocated.
    pub kind: ExtentKind,
}

/// Why a backend refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request reaches past the end of the volume.
    #[error("request at offset {offset} length {len} reaches past the volume end ({size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The volume does not accept writes.
    #[error("volume is read-only")]
    ReadOnly,
    /// This writer's attachment was fenced out: another node has taken the volume over.
    #[error("attachment generation {generation} is fenced out (the volume's fence is {fence}): another node has taken the volume over")]
    Fenced { generation: u64, fence: u64 },
    /// The operation cannot be done (quickly) by this backend.
    #[error("operation not supported by this backend")]
    NotSupported,
    /// The store is out of space.
    #[error("no space left on the store")]
    NoSpace,
    /// The backend is shutting down and takes no new work.
    #[error("backend is shutting down")]
    ShuttingDown,
    /// Stored data failed its integrity check and no intact copy was found (EIO).
    #[error("{what} (at offset {offset}, length {len})")]
    Corrupt { offset: u64, len: u64, what: &'static str },
    /// An I/O error from the operating system.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl BackendError {
    /// The POSIX errno that best describes this error (NBD replies carry errnos).
    pub fn errno(&self) -> i32 {
        match self {
            BackendError::OutOfRange { .. } => libc::EINVAL,
            BackendError::ReadOnly | BackendError::Fenced { .. } => libc::EPERM,
            BackendError::NotSupported => libc::ENOTSUP,
            BackendError::NoSpace => libc::ENOSPC,
            BackendError::ShuttingDown => libc::ESHUTDOWN,
            BackendError::Corrupt { .. } => libc::EIO,
            BackendError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                Some(libc::EOVERFLOW) => libc::EOVERFLOW,
                Some(libc::EINVAL) => libc::EINVAL,
                Some(libc::ENOTSUP) => libc::ENOTSUP,
                _ => libc::EIO,
            },
        }
    }
}

/// Result of a backend call.
pub type BackendResult<T> = Result<T, BackendError>;

/// A volume as the front ends see it: a byte-addressed device with a size.
///
/// Implementations must be safe to call concurrently; requests may complete in
/// any order. A write that returned `Ok` is visible to every later read through
/// any handle to the same backend. A `flush` that returned `Ok` makes every write
/// that completed before it was issued durable; a write with `fua = true` is
/// durable when it returns.
#[async_trait]
pub trait BlockBackend: Send + Sync + 'static {
    /// Current size in bytes (may grow while the backend is open).
    fn size_bytes(&self) -> u64;

    /// Reads `len` bytes at `offset`; holes read as zeroes.
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes>;

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> BackendResult<()>;

    /// Discards a range; later reads of it return zeroes.
    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()>;

    /// Zeroes a range. With `may_trim` the range may be deallocated; with `fast_only`
    /// the backend returns [`BackendError::NotSupported`] instead of writing zeroes slowly.
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast_only: bool)
        -> BackendResult<()>;

    /// Allocation map of `[offset, offset+len)`: extents in order, covering at least
    /// the first byte and never past the end of the volume.
    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>>;

    /// Hint that a range will be read soon. The default does nothing.
    async fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())
    }
}

/// Checks that `[offset, offset+len)` lies within a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> BackendResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_reject_overflow_and_past_end() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(1, 10, 10).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }

    #[test]
    fn io_errors_map_to_errnos() {
        let e = BackendError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = BackendError::Io(std::io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(BackendError::ReadOnly.errno(), libc::EPERM);
    }
}
