//! The fallback engine: blocking `pread`/`pwrite`/`fdatasync`/`fallocate` on
//! Tokio's blocking thread pool.
//!
//! Used where io_uring is missing (old kernels) or forbidden (seccomp,
//! `kernel.io_uring_disabled`). It has no errors of its own beyond
//! [`EngineError`]; it needs to be called from within a Tokio runtime.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::engine::{ChainStep, EngineError, FallocMode};

/// The sync engine; it holds no state.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SyncEngine;

impl SyncEngine {
    pub(crate) async fn read_at(
        &self,
        file: Arc<File>,
        offset: u64,
        mut buf: AlignedBuf,
    ) -> Result<Bytes, EngineError> {
        blocking(move || {
            read_full_at(&file, offset, buf.as_mut_slice())?;
            Ok(buf.into_bytes())
        })
        .await
    }

    pub(crate) async fn write_at(
        &self,
        file: Arc<File>,
        offset: u64,
        data: Bytes,
    ) -> Result<(), EngineError> {
        // `write_all_at` continues short writes and retries EINTR.
        blocking(move || file.write_all_at(&data, offset)).await
    }

    pub(crate) async fn fdatasync(&self, file: Arc<File>) -> Result<(), EngineError> {
        // `sync_data` is fdatasync(2), retried on EINTR.
        blocking(move || file.sync_data()).await
    }

    pub(crate) async fn chain(&self, steps: Vec<ChainStep>) -> Result<(), EngineError> {
        blocking(move || super::engine::run_steps_now(steps)).await
    }

    pub(crate) async fn fallocate(
        &self,
        file: Arc<File>,
        mode: FallocMode,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        blocking(move || fallocate(&file, mode, offset, len)).await
    }
}

/// Reads until `buf` is full or end of file; what lies past the end stays as it
/// was (zero for a fresh [`AlignedBuf`]).
fn read_full_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `posix_fadvise(POSIX_FADV_RANDOM)` over the whole file: no readahead.
pub(crate) fn fadvise_random(file: &File) -> io::Result<()> {
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random).map_err(io::Error::from)
}

/// `fallocate(2)`, retried on EINTR.
pub(crate) fn fallocate(file: &File, mode: FallocMode, offset: u64, len: u64) -> io::Result<()> {
    let flags = rustix::fs::FallocateFlags::from_bits_retain(mode.bits() as u32);
    loop {
        match rustix::fs::fallocate(file, flags, offset, len) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Runs `f` on the blocking pool; a panic in `f` is resumed in the caller.
async fn blocking<T, F>(f: F) -> Result<T, EngineError>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(EngineError::Io),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(EngineError::ShutDown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_full_at_stops_at_end_of_file() {
        let mut file = tempfile::tempfile().expect("tempfile");
        std::io::Write::write_all(&mut file, &[5u8; 100]).expect("write");
        let mut buf = [9u8; 150];
        read_full_at(&file, 50, &mut buf).expect("read");
        assert_eq!(&buf[..50], &[5u8; 50][..]);
        assert_eq!(&buf[50..], &[9u8; 100][..], "bytes past the end are left alone");
    }

    #[tokio::test]
    async fn fallocate_modes_keep_the_size() {
        let file = Arc::new(tempfile::tempfile().expect("tempfile"));
        file.write_all_at(&[1u8; 16384], 0).expect("write");
        let engine = SyncEngine;
        engine.fallocate(file.clone(), FallocMode::PunchHole, 0, 4096).await.expect("punch");
        engine.fallocate(file.clone(), FallocMode::ZeroRange, 8192, 10).await.expect("zero");
        assert_eq!(file.metadata().expect("stat").len(), 16384);
        let mut buf = vec![0u8; 16384];
        file.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..8192].iter().all(|&b| b == 1));
        assert!(buf[8192..8202].iter().all(|&b| b == 0));
        assert!(buf[8202..].iter().all(|&b| b == 1));
    }
}
