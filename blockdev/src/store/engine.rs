//! The I/O engine: how the file store gets bytes to and from a file.
//!
//! [`IoEngine`] is a cheap, cloneable handle over one of two engines with the same
//! operations and the same results:
//!
//! - `io_uring` ([`super::uring`]): dedicated ring threads, each owning one ring;
//!   callers hand requests over a bounded channel and await a oneshot reply.
//! - `sync` ([`super::sync`]): `pread`/`pwrite`/`fdatasync`/`fallocate` on Tokio's
//!   blocking thread pool; the fallback where io_uring is missing or forbidden.
//!
//! Every operation takes an `Arc<File>` so that the descriptor stays open while
//! the operation is in flight, even if the caller gives up waiting for it.

use std::fmt;
use std::fs::File;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use super::aligned::AlignedBuf;
use super::sync::SyncEngine;
use super::uring::{UringEngine, UringError};

/// Which engine to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring if this kernel lets us use it, otherwise sync.
    #[default]
    Auto,
    /// io_uring or nothing.
    Uring,
    /// Blocking system calls on a thread pool.
    Sync,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Auto => "auto",
            EngineKind::Uring => "io_uring",
            EngineKind::Sync => "sync",
        })
    }
}

impl FromStr for EngineKind {
    type Err = EngineError;

    /// Parses `auto`, `io_uring` (also `uring`, `io-uring`) or `sync`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(EngineKind::Auto),
            "io_uring" | "uring" | "io-uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(EngineError::UnknownKind(s.to_string())),
        }
    }
}

/// Errors of the I/O engines.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// io_uring could not be set up.
    #[error("io_uring is unavailable: {0}")]
    UringUnavailable(#[from] UringError),
    /// The io_uring engine needs at least one ring thread.
    #[error("the io_uring engine needs at least one ring thread")]
    NoRingThreads,
    /// An engine name that is none of `auto`, `io_uring`, `sync`.
    #[error("unknown I/O engine {0:?} (expected auto, io_uring or sync)")]
    UnknownKind(String),
    /// The operation failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The engine stopped before the operation completed.
    #[error("the I/O engine has shut down")]
    ShutDown,
}

impl EngineError {
    /// Whether the file system does not implement the operation (`EOPNOTSUPP`).
    pub fn is_not_supported(&self) -> bool {
        matches!(self, EngineError::Io(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP))
    }
}

/// What a `fallocate` call does; both keep the file size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallocMode {
    /// Deallocate the range (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    PunchHole,
    /// Make the range read as zeroes, keeping it allocated
    /// (`FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`).
    ZeroRange,
}

impl FallocMode {
    /// The `mode` argument of `fallocate(2)`.
    pub fn bits(self) -> i32 {
        match self {
            FallocMode::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            FallocMode::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        }
    }
}

/// One step of [`IoEngine::chain`].
#[derive(Debug)]
pub enum ChainStep {
    /// Write all of `data` at `offset`.
    Write { file: Arc<File>, offset: u64, data: Bytes },
    /// `fallocate` the range (punch a hole, or zero it keeping its allocation).
    Fallocate { file: Arc<File>, mode: FallocMode, offset: u64, len: u64 },
}

/// Runs `steps` in order on the calling thread, with blocking system calls: for small
/// writes into the page cache whose completion must precede what comes next.
pub fn run_steps_now(steps: Vec<ChainStep>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    for step in steps {
        match step {
            ChainStep::Write { file, offset, data } => file.write_all_at(&data, offset)?,
            ChainStep::Fallocate { file, mode, offset, len } => {
                super::sync::fallocate(&file, mode, offset, len)?
            }
        }
    }
    Ok(())
}

/// A handle on a running I/O engine. Clones share the engine; the io_uring
/// engine's threads stop (after finishing in-flight operations) when the last
/// handle is dropped.
#[derive(Clone)]
pub struct IoEngine {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Uring(Arc<UringEngine>),
    Sync(SyncEngine),
}

impl fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoEngine").field("name", &self.name()).finish()
    }
}

impl IoEngine {
    /// Starts an engine. `ring_threads` is the number of io_uring threads (each
    /// with its own ring); the sync engine ignores it.
    ///
    /// With [`EngineKind::Auto`], io_uring is tried first (a ring is created and a
    /// NOP run through it); if that fails, a warning says why and the sync engine
    /// is used.
    pub fn start(kind: EngineKind, ring_threads: usize) -> Result<IoEngine, EngineError> {
        match kind {
            EngineKind::Sync => Ok(IoEngine::sync()),
            EngineKind::Uring => IoEngine::uring(ring_threads),
            EngineKind::Auto => match IoEngine::uring(ring_threads) {
                Ok(engine) => Ok(engine),
                Err(EngineError::NoRingThreads) => Err(EngineError::NoRingThreads),
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring is unavailable; using the sync I/O engine");
                    Ok(IoEngine::sync())
                }
            },
        }
    }

    fn uring(ring_threads: usize) -> Result<IoEngine, EngineError> {
        if ring_threads == 0 {
            return Err(EngineError::NoRingThreads);
        }
        let engine = UringEngine::start(ring_threads)?;
        Ok(IoEngine { inner: Inner::Uring(Arc::new(engine)) })
    }

    fn sync() -> IoEngine {
        IoEngine { inner: Inner::Sync(SyncEngine) }
    }

    /// `"io_uring"` or `"sync"`.
    pub fn name(&self) -> &'static str {
        match &self.inner {
            Inner::Uring(_) => "io_uring",
            Inner::Sync(_) => "sync",
        }
    }

    /// The kind of the running engine (never [`EngineKind::Auto`]).
    pub fn kind(&self) -> EngineKind {
        match &self.inner {
            Inner::Uring(_) => EngineKind::Uring,
            Inner::Sync(_) => EngineKind::Sync,
        }
    }

    /// Reads `len` bytes at `offset` into a fresh [`AlignedBuf`]; bytes past the end
    /// of the file read as zeroes. Short reads are continued until `len` bytes or
    /// end of file.
    pub async fn read_at(&self, file: &Arc<File>, offset: u64, len: usize) -> Result<Bytes, EngineError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let buf = AlignedBuf::zeroed(len);
        match &self.inner {
            Inner::Uring(u) => u.read_at(file.clone(), offset, buf).await,
            Inner::Sync(s) => s.read_at(file.clone(), offset, buf).await,
        }
    }

    /// Writes all of `data` at `offset` (short writes are continued).
    pub async fn write_at(&self, file: &Arc<File>, offset: u64, data: Bytes) -> Result<(), EngineError> {
        if data.is_empty() {
            return Ok(());
        }
        match &self.inner {
            Inner::Uring(u) => u.write_at(file.clone(), offset, data).await,
            Inner::Sync(s) => s.write_at(file.clone(), offset, data).await,
        }
    }

    /// `fdatasync(2)`: makes the file's written data (through any descriptor) durable.
    pub async fn fdatasync(&self, file: &Arc<File>) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Uring(u) => u.fdatasync(file.clone()).await,
            Inner::Sync(s) => s.fdatasync(file.clone()).await,
        }
    }

    /// Runs `steps` in order, each starting only after the one before it completed in
    /// full (not merely submitted): what a store needs to put metadata on the page cache
    /// or the disk before the data it describes. Stops at the first failure.
    pub async fn chain(&self, steps: Vec<ChainStep>) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Uring(u) => u.chain(steps).await,
            Inner::Sync(s) => s.chain(steps).await,
        }
    }

    /// Deallocates `[offset, offset+len)`; it then reads as zeroes. Keeps the size.
    pub async fn punch_hole(&self, file: &Arc<File>, offset: u64, len: u64) -> Result<(), EngineError> {
        self.fallocate(file, FallocMode::PunchHole, offset, len).await
    }

    /// Makes `[offset, offset+len)` read as zeroes without writing them
    /// (`FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`).
    pub async fn zero_range(&self, file: &Arc<File>, offset: u64, len: u64) -> Result<(), EngineError> {
        self.fallocate(file, FallocMode::ZeroRange, offset, len).await
    }

    async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: FallocMode,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        if len == 0 {
            return Ok(());
        }
        match &self.inner {
            Inner::Uring(u) => u.fallocate(file.clone(), mode, offset, len).await,
            Inner::Sync(s) => s.fallocate(file.clone(), mode, offset, len).await,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Both engines, or only sync when this kernel refuses io_uring (then a note
    /// says so: the io_uring half of a test did not run).
    pub(crate) fn engines() -> Vec<IoEngine> {
        let mut engines = vec![IoEngine::start(EngineKind::Sync, 1).expect("sync engine starts")];
        match IoEngine::start(EngineKind::Uring, 2) {
            Ok(e) => engines.push(e),
            Err(e) => eprintln!("skipping the io_uring engine: {e}"),
        }
        engines
    }

    fn temp_file(len: u64) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .expect("open");
        file.set_len(len).expect("set_len");
        (dir, Arc::new(file))
    }

    #[test]
    fn kinds_parse_and_print() {
        for kind in [EngineKind::Auto, EngineKind::Uring, EngineKind::Sync] {
            assert_eq!(kind.to_string().parse::<EngineKind>().expect("parses"), kind);
        }
        assert_eq!("URING".parse::<EngineKind>().expect("parses"), EngineKind::Uring);
        assert!(matches!("aio".parse::<EngineKind>(), Err(EngineError::UnknownKind(_))));
    }

    #[test]
    fn start_names_the_engine() {
        assert_eq!(IoEngine::start(EngineKind::Sync, 0).expect("sync").name(), "sync");
        assert!(matches!(IoEngine::start(EngineKind::Uring, 0), Err(EngineError::NoRingThreads)));
        let auto = IoEngine::start(EngineKind::Auto, 1).expect("auto always starts");
        assert!(["io_uring", "sync"].contains(&auto.name()));
        assert_ne!(auto.kind(), EngineKind::Auto);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_operation_works_on_both_engines() {
        for engine in engines() {
            let name = engine.name();
            let (_dir, file) = temp_file(64 * 1024);
            let data = Bytes::from((0..10_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
            engine.write_at(&file, 1000, data.clone()).await.expect("write");
            engine.fdatasync(&file).await.expect("fdatasync");
            let back = engine.read_at(&file, 1000, data.len()).await.expect("read");
            assert_eq!(back, data, "{name}");
            assert!(AlignedBuf::is_aligned(&back), "{name}: reads land in aligned buffers");

            engine.punch_hole(&file, 4096, 4096).await.expect("punch");
            engine.zero_range(&file, 9000, 100).await.expect("zero range");
            let mut expect = vec![0u8; 64 * 1024];
            expect[1000..11_000].copy_from_slice(&data);
            expect[4096..8192].fill(0);
            expect[9000..9100].fill(0);
            let mut on_disk = vec![0u8; 64 * 1024];
            file.read_exact_at(&mut on_disk, 0).expect("read back");
            assert!(on_disk == expect, "{name}: file contents differ");
            assert_eq!(file.metadata().expect("stat").len(), 64 * 1024, "{name}: size kept");

            // Reads past the end of the file are short; the rest reads as zeroes.
            engine.write_at(&file, 64 * 1024 - 10, Bytes::from_static(b"0123456789")).await.expect("tail");
            expect[64 * 1024 - 10..].copy_from_slice(b"0123456789");
            let tail = engine.read_at(&file, 64 * 1024 - 10, 100).await.expect("read past EOF");
            assert_eq!(&tail[..10], &expect[64 * 1024 - 10..]);
            assert!(tail[10..].iter().all(|&b| b == 0), "{name}");

            // Empty operations are no-ops.
            engine.write_at(&file, 0, Bytes::new()).await.expect("empty write");
            assert!(engine.read_at(&file, 0, 0).await.expect("empty read").is_empty());
            engine.punch_hole(&file, 0, 0).await.expect("empty punch");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_come_back_as_io_errors() {
        for engine in engines() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("ro");
            std::fs::write(&path, b"x").expect("write");
            let ro = Arc::new(File::open(&path).expect("open read-only"));
            let err = engine.write_at(&ro, 0, Bytes::from_static(b"y")).await.expect_err("EBADF");
            match err {
                EngineError::Io(e) => assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{}", engine.name()),
                other => panic!("{}: unexpected {other}", engine.name()),
            }
            assert!(!EngineError::Io(io::Error::from_raw_os_error(libc::EIO)).is_not_supported());
            assert!(EngineError::Io(io::Error::from_raw_os_error(libc::EOPNOTSUPP)).is_not_supported());
        }
    }
}
