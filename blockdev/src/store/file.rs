//! [`FileBackend`]: a volume kept in a sparse file, driven by an [`IoEngine`].
//!
//! # Two descriptors, one file
//!
//! The file is opened twice: once with `O_DIRECT` (if the file system supports it
//! with an alignment that divides [`DIRECT_IO_ALIGN_BYTES`]) and once buffered.
//! Requests whose offset and length are multiples of [`DIRECT_IO_ALIGN_BYTES`]
//! go through the direct descriptor (a write's buffer is copied into an
//! [`AlignedBuf`] first if it is not aligned already; reads always land in one);
//! everything else goes through the page cache.
//!
//! Mixing the two is coherent on Linux: a direct read first writes back dirty
//! cached pages of its range, and a direct write writes them back and then
//! invalidates the cached pages of its range, so later buffered reads see it;
//! `fallocate` (hole punching and zeroing) drops the cached pages of its range
//! too. Only *concurrent* overlapping requests could see stale data, and block
//! clients get no ordering between overlapping in-flight requests anyway.
//! Direct I/O is used only where the page size is at most
//! [`DIRECT_IO_ALIGN_BYTES`]: then a direct request covers whole pages, and a
//! concurrent buffered request on a *disjoint* range never shares a page with it
//! (a shared page could be re-dirtied between write-back and invalidation, and
//! keep stale bytes of the direct write's range).
//!
//! Durability covers both descriptors: `fdatasync` works on the inode, not the
//! descriptor, so one call writes back the dirty pages that buffered writes left
//! and flushes the device cache for what direct writes put on the device.
//! FLUSH is one `fdatasync`; a FUA write is the write followed by one.
//!
//! # Other operations
//!
//! TRIM punches a hole; WRITE_ZEROES zeroes the range with
//! `FALLOC_FL_ZERO_RANGE` (or punches a hole when it may deallocate). Where the
//! file system lacks these, zeroes are written, unless the client asked for the
//! fast path only. Block status comes from `SEEK_DATA`/`SEEK_HOLE`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::{SeekFrom, StatxFlags};

use super::aligned::{AlignedBuf, DIRECT_IO_ALIGN_BYTES};
use super::engine::{run_steps_now, ChainStep, EngineError, FallocMode, IoEngine};
use crate::backend::{check_range, BackendError, BackendResult, BlockBackend, Extent, ExtentKind};

/// Most extents one block-status reply carries; the rest of the range is left
/// for the client's next query.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;
/// Bytes per write when zeroes have to be written out.
const ZERO_CHUNK_BYTES: usize = 1 << 20;
const ALIGN: u64 = DIRECT_IO_ALIGN_BYTES as u64;

/// The source of written-out zeroes: aligned, so it can go through `O_DIRECT`.
#[repr(C, align(4096))]
struct Zeroes([u8; ZERO_CHUNK_BYTES]);
static ZEROES: Zeroes = Zeroes([0; ZERO_CHUNK_BYTES]);

/// Why a volume file could not be created, opened or resized.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file could not be created (it may exist already).
    #[error("cannot create volume file {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    /// The file could not be opened.
    #[error("cannot open volume file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// The file's metadata could not be read.
    #[error("cannot stat volume file {}: {source}", path.display())]
    Stat { path: PathBuf, source: io::Error },
    /// The file could not be given its new size.
    #[error("cannot resize volume file {} to {size_bytes} bytes: {source}", path.display())]
    Resize { path: PathBuf, size_bytes: u64, source: io::Error },
}

/// A volume in a sparse file. See the [module documentation](self).
#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    /// Buffered descriptor: unaligned requests, `fdatasync`, `fallocate`, `lseek`.
    buffered: Arc<File>,
    /// `O_DIRECT` descriptor, if the file system supports direct I/O.
    direct: Option<Arc<File>>,
    /// Aligned requests shorter than this go through the page cache (0: none do).
    cached_below_bytes: u64,
    size_bytes: AtomicU64,
    /// Serialises [`FileBackend::grow`] calls.
    grow_lock: Mutex<()>,
    engine: IoEngine,
}

impl FileBackend {
    /// Creates a new sparse file of `size_bytes` (all holes). Fails if `path` exists.
    pub fn create(path: impl AsRef<Path>, size_bytes: u64, engine: IoEngine) -> Result<Self, FileError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| FileError::Create { path: path.to_owned(), source })?;
        file.set_len(size_bytes).map_err(|source| FileError::Resize {
            path: path.to_owned(),
            size_bytes,
            source,
        })?;
        Self::with_file(path, file, size_bytes, engine)
    }

    /// Serves requests shorter than `bytes` through the page cache, and larger aligned ones
    /// with `O_DIRECT`: for copies whose durability comes from elsewhere (a replicated
    /// volume's WAL) and which are flushed at checkpoints. Caching small writes costs no
    /// safety and keeps them out of the device cache that every WAL `fdatasync` flushes
    /// (each random 4 KiB block in it adds about 40 µs to that flush here). Large requests
    /// stay direct because a buffered one fills the cache with large folios, and ext4 then
    /// walks every block of a large folio on each later 4 KiB write into it (24 µs of CPU per
    /// write against 7 µs into small folios, measured on Linux 6.18); readahead is turned off
    /// for the same reason.
    pub fn cache_below(mut self, bytes: u64) -> Self {
        self.cached_below_bytes = bytes;
        // Advice only: a failure leaves readahead on.
        if let Err(e) = super::sync::fadvise_random(&self.buffered) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot turn readahead off");
        }
        self
    }

    /// Opens an existing volume file; its length is the volume size.
    pub fn open(path: impl AsRef<Path>, engine: IoEngine) -> Result<Self, FileError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FileError::Open { path: path.to_owned(), source })?;
        let size_bytes =
            file.metadata().map_err(|source| FileError::Stat { path: path.to_owned(), source })?.len();
        Self::with_file(path, file, size_bytes, engine)
    }

    fn with_file(path: &Path, file: File, size_bytes: u64, engine: IoEngine) -> Result<Self, FileError> {
        let direct = open_direct(path).map(Arc::new);
        tracing::debug!(
            path = %path.display(),
            size_bytes,
            direct_io = direct.is_some(),
            engine = engine.name(),
            "opened volume file"
        );
        Ok(FileBackend {
            path: path.to_owned(),
            buffered: Arc::new(file),
            direct,
            cached_below_bytes: 0,
            size_bytes: AtomicU64::new(size_bytes),
            grow_lock: Mutex::new(()),
            engine,
        })
    }

    /// Grows the volume to `new_size_bytes`; a smaller or equal size does nothing
    /// (volumes never shrink). The new range reads as zeroes.
    pub fn grow(&self, new_size_bytes: u64) -> Result<(), FileError> {
        let _guard = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        if new_size_bytes <= self.size_bytes() {
            return Ok(());
        }
        self.buffered.set_len(new_size_bytes).map_err(|source| FileError::Resize {
            path: self.path.clone(),
            size_bytes: new_size_bytes,
            source,
        })?;
        self.size_bytes.store(new_size_bytes, Ordering::SeqCst);
        Ok(())
    }

    /// Bytes the file occupies on disk (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.blocks() * 512)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine doing the I/O.
    pub fn engine(&self) -> &IoEngine {
        &self.engine
    }

    /// Whether aligned requests bypass the page cache (`O_DIRECT`).
    pub fn uses_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct descriptor, if there is one, the range is aligned and it is not one to
    /// cache (see [`FileBackend::cache_below`]).
    fn direct_for(&self, offset: u64, len: u64) -> Option<&Arc<File>> {
        self.direct.as_ref().filter(|_| (offset | len) & (ALIGN - 1) == 0 && len >= self.cached_below_bytes)
    }

    async fn fdatasync(&self) -> BackendResult<()> {
        self.engine.fdatasync(&self.buffered).await.map_err(backend_error)
    }

    /// Writes zeroes over the range, [`ZERO_CHUNK_BYTES`] at a time.
    async fn write_zeroes_slowly(&self, offset: u64, len: u64) -> BackendResult<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK_BYTES as u64);
            self.write_at(pos, Bytes::from_static(&ZEROES.0[..n as usize])).await?;
            pos += n;
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> BackendResult<()> {
        if self.cached_inline(data.len() as u64) {
            let step = ChainStep::Write { file: self.buffered.clone(), offset, data };
            return run_steps_now(vec![step]).map_err(BackendError::Io);
        }
        let (file, data) = self.write_target(offset, data);
        self.engine.write_at(file, offset, data).await.map_err(backend_error)
    }

    /// Whether a buffered write of `len` bytes is one of the small cached ones (see
    /// [`FileBackend::cache_below`]), written from the calling thread: a copy into the page
    /// cache takes a few microseconds, while through the ring it is punted to a kernel worker
    /// thread (about 50 µs per write under load here).
    fn cached_inline(&self, len: u64) -> bool {
        len < self.cached_below_bytes
    }

    /// The descriptor a write of `data` at `offset` goes through, and the buffer to write
    /// (copied into an aligned one if it goes direct from a misaligned address).
    fn write_target(&self, offset: u64, data: Bytes) -> (&Arc<File>, Bytes) {
        match self.direct_for(offset, data.len() as u64) {
            Some(direct) if AlignedBuf::is_aligned(&data) => (direct, data),
            Some(direct) => (direct, AlignedBuf::copy_from(&data).into_bytes()),
            None => (&self.buffered, data),
        }
    }

    /// A [`ChainStep`] writing `data` at `offset` the way [`BlockBackend::write`] would.
    pub fn write_step(&self, offset: u64, data: Bytes) -> ChainStep {
        let (file, data) = self.write_target(offset, data);
        ChainStep::Write { file: file.clone(), offset, data }
    }

    /// A [`ChainStep`] deallocating (`punch`) or zeroing a range of the file.
    pub fn fallocate_step(&self, punch: bool, offset: u64, len: u64) -> ChainStep {
        let mode = if punch { FallocMode::PunchHole } else { FallocMode::ZeroRange };
        ChainStep::Fallocate { file: self.buffered.clone(), mode, offset, len }
    }

    /// Runs `steps` through the engine (see [`IoEngine::chain`]).
    pub async fn run_chain(&self, steps: Vec<ChainStep>) -> BackendResult<()> {
        let inline = steps.iter().all(|s| match s {
            ChainStep::Write { file, data, .. } => {
                Arc::ptr_eq(file, &self.buffered) && self.cached_inline(data.len() as u64)
            }
            ChainStep::Fallocate { .. } => false,
        });
        if inline {
            return run_steps_now(steps).map_err(BackendError::Io);
        }
        self.engine.chain(steps).await.map_err(backend_error)
    }

    /// Writes zeroes over the range without `fallocate` (for file systems that lack it).
    pub async fn write_zeroes_by_writing(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.write_zeroes_slowly(offset, len).await
    }
}

#[async_trait]
impl BlockBackend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        check_range(offset, len as u64, self.size_bytes())?;
        let file = self.direct_for(offset, len as u64).unwrap_or(&self.buffered);
        self.engine.read_at(file, offset, len as usize).await.map_err(backend_error)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        check_range(offset, data.len() as u64, self.size_bytes())?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_at(offset, data).await?;
        if fua {
            self.fdatasync().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        self.fdatasync().await
    }

    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())?;
        if len == 0 {
            return Ok(());
        }
        // Trimmed ranges must read as zeroes afterwards, so if the file system
        // cannot punch holes, zero the range another way.
        self.write_zeroes(offset, len, true, false).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())?;
        if len == 0 {
            return Ok(());
        }
        if may_trim {
            match self.engine.punch_hole(&self.buffered, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_supported() => {}
                Err(e) => return Err(backend_error(e)),
            }
        }
        match self.engine.zero_range(&self.buffered, offset, len).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_supported() && fast_only => Err(BackendError::NotSupported),
            Err(e) if e.is_not_supported() => self.write_zeroes_slowly(offset, len).await,
            Err(e) => Err(backend_error(e)),
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let size = self.size_bytes();
        check_range(offset, len, size)?;
        if len == 0 {
            return Err(BackendError::OutOfRange { offset, len, size });
        }
        let file = self.buffered.clone();
        match tokio::task::spawn_blocking(move || {
            map_extents(&file, offset, offset + len, BLOCK_STATUS_EXTENTS_MAX)
        })
        .await
        {
            Ok(result) => result.map_err(BackendError::Io),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(BackendError::ShuttingDown),
        }
    }
}

/// Maps `[offset, end)` into Data/Hole extents with `SEEK_DATA`/`SEEK_HOLE`,
/// merging neighbours of the same kind and stopping after `max_extents`.
/// `end` must not exceed the file size.
fn map_extents(file: &File, offset: u64, end: u64, max_extents: usize) -> io::Result<Vec<Extent>> {
    let seek = |pos: SeekFrom| -> io::Result<Option<u64>> {
        match rustix::fs::seek(file, pos) {
            Ok(p) => Ok(Some(p)),
            // No data (or no hole) at or after the position, which is past the end.
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = seek(SeekFrom::Data(pos))?.unwrap_or(end).min(end);
        let (kind, run_end) = if data > pos {
            (ExtentKind::Hole, data)
        } else {
            let hole = seek(SeekFrom::Hole(pos))?.unwrap_or(end).min(end);
            // `hole == pos` only if the range changed between the two calls;
            // claiming one byte of data is always safe and keeps the loop moving.
            (ExtentKind::Data, hole.max(pos + 1))
        };
        let run = run_end - pos;
        if let Some(last) = extents.last_mut().filter(|last| last.kind == kind) {
            last.len_bytes += run;
        } else if extents.len() == max_extents {
            break;
        } else {
            extents.push(Extent { len_bytes: run, kind });
        }
        pos = run_end;
    }
    Ok(extents)
}

/// Opens `path` with `O_DIRECT` if its file system supports direct I/O at an
/// alignment that divides [`DIRECT_IO_ALIGN_BYTES`].
///
/// `statx(STATX_DIOALIGN)` (Linux 6.1+) reports the file's direct-I/O offset and
/// memory alignment, typically the device's logical block size (512 or 4096).
/// Kernels that do not report it get a trial aligned read instead.
fn open_direct(path: &Path) -> Option<File> {
    let page_bytes = rustix::param::page_size();
    if page_bytes > DIRECT_IO_ALIGN_BYTES {
        tracing::debug!(page_bytes, "pages are larger than the direct-I/O alignment; buffered I/O only");
        return None;
    }
    let file = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => file,
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "O_DIRECT refused; buffered I/O only");
            return None;
        }
    };
    let stat = rustix::fs::statx(&file, "", rustix::fs::AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN);
    match stat {
        Ok(st) if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0 => {
            let (offset_align, mem_align) = (st.stx_dio_offset_align, st.stx_dio_mem_align);
            // Powers of two (as alignments are) divide ALIGN iff they are at most ALIGN.
            let divides = |a: u32| a.is_power_of_two() && u64::from(a) <= ALIGN;
            if divides(offset_align) && divides(mem_align) {
                Some(file)
            } else {
                tracing::debug!(
                    path = %path.display(),
                    offset_align,
                    mem_align,
                    "direct I/O unsupported or needs a larger alignment; buffered I/O only"
                );
                None
            }
        }
        _ => {
            let mut buf = AlignedBuf::zeroed(DIRECT_IO_ALIGN_BYTES);
            match file.read_at(buf.as_mut_slice(), 0) {
                Ok(_) => Some(file),
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "O_DIRECT read failed; buffered I/O only");
                    None
                }
            }
        }
    }
}

/// Maps an engine error onto the backend's errors.
pub(crate) fn backend_error(e: EngineError) -> BackendError {
    match e {
        EngineError::Io(e) => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => BackendError::NoSpace,
            _ => BackendError::Io(e),
        },
        EngineError::ShutDown => BackendError::ShuttingDown,
        other => BackendError::Io(io::Error::other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::engine::tests::engines;

    const MIB: u64 = 1 << 20;

    fn backend(engine: &IoEngine, size: u64) -> (tempfile::TempDir, FileBackend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = FileBackend::create(dir.path().join("vol"), size, engine.clone()).expect("create");
        (dir, b)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    fn is_ext4_xfs_or_btrfs(path: &Path) -> bool {
        const EXT4: i64 = 0xEF53;
        const XFS: i64 = 0x5846_5342;
        const BTRFS: i64 = 0x9123_683E;
        // `f_type` is i64 on x86_64 but narrower on other architectures.
        #[allow(clippy::unnecessary_cast)]
        rustix::fs::statfs(path).map(|s| [EXT4, XFS, BTRFS].contains(&(s.f_type as i64))).unwrap_or(false)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_open_grow_and_allocation() {
        for engine in engines() {
            let (dir, b) = backend(&engine, MIB);
            assert_eq!(b.size_bytes(), MIB);
            assert_eq!(b.allocated_bytes().expect("stat"), 0, "a new volume is all holes");
            if is_ext4_xfs_or_btrfs(dir.path()) {
                assert!(b.uses_direct_io(), "ext4/xfs/btrfs support O_DIRECT");
            }
            b.write(8192, Bytes::from(vec![3u8; 4096]), false).await.expect("write");
            b.flush().await.expect("flush");
            assert!(b.allocated_bytes().expect("stat") >= 4096);

            assert!(matches!(
                FileBackend::create(b.path(), MIB, engine.clone()),
                Err(FileError::Create { .. })
            ));
            b.grow(2 * MIB).expect("grow");
            b.grow(MIB).expect("shrinking is a no-op");
            assert_eq!(b.size_bytes(), 2 * MIB);
            b.write(2 * MIB - 4096, Bytes::from(vec![4u8; 4096]), true).await.expect("write at the new end");
            assert!(b.write(2 * MIB - 4095, Bytes::from(vec![4u8; 4096]), false).await.is_err());

            let reopened = FileBackend::open(b.path(), engine.clone()).expect("open");
            assert_eq!(reopened.size_bytes(), 2 * MIB);
            assert_eq!(reopened.read(8192, 4096).await.expect("read"), Bytes::from(vec![3u8; 4096]));
            assert_eq!(reopened.read(MIB, 4096).await.expect("grown range"), Bytes::from(vec![0u8; 4096]));
            assert!(matches!(
                FileBackend::open(dir.path().join("missing"), engine),
                Err(FileError::Open { .. })
            ));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unaligned_and_mixed_requests_round_trip() {
        for engine in engines() {
            let name = engine.name();
            let (_dir, b) = backend(&engine, 256 * 1024);
            let mut model = vec![0u8; 256 * 1024];
            let mut apply =
                |offset: usize, data: &[u8]| model[offset..offset + data.len()].copy_from_slice(data);

            // 1-byte writes, at a block start, inside, and at the last byte.
            for (i, offset) in [0usize, 4095, 4096, 5000, 256 * 1024 - 1].into_iter().enumerate() {
                let byte = [i as u8 + 1];
                b.write(offset as u64, Bytes::copy_from_slice(&byte), false).await.expect("1-byte write");
                apply(offset, &byte);
            }
            // Aligned offset and length, in an aligned buffer (O_DIRECT as is)...
            let mut buf = AlignedBuf::zeroed(8192);
            buf.as_mut_slice().copy_from_slice(&pattern(8192, 1));
            b.write(16384, buf.into_bytes(), false).await.expect("aligned write");
            apply(16384, &pattern(8192, 1));
            // ...in a misaligned buffer (copied, then O_DIRECT)...
            let data = Bytes::from(pattern(8193, 2)).slice(1..);
            assert!(!AlignedBuf::is_aligned(&data));
            b.write(32768, data.clone(), false).await.expect("misaligned buffer");
            apply(32768, &data);
            // ...spanning aligned blocks with unaligned ends (buffered), over data
            // that went in through O_DIRECT.
            b.write(16000, Bytes::from(pattern(30000, 3)), false).await.expect("spanning write");
            apply(16000, &pattern(30000, 3));
            // Unaligned length at an aligned offset, and the reverse.
            b.write(65536, Bytes::from(pattern(5000, 4)), true).await.expect("unaligned length");
            apply(65536, &pattern(5000, 4));
            b.write(81920 + 100, Bytes::from(pattern(8192, 5)), false).await.expect("unaligned offset");
            apply(81920 + 100, &pattern(8192, 5));
            // A direct write over a range that has buffered (cached) data.
            b.write(65536, Bytes::from(pattern(4096, 6)), false).await.expect("direct over cached");
            apply(65536, &pattern(4096, 6));

            for (offset, len) in
                [(0, 256 * 1024), (4095, 2), (16384, 8192), (15999, 30002), (65536, 4096), (81920, 12288)]
            {
                let got = b.read(offset as u64, len as u32).await.expect("read");
                assert!(got[..] == model[offset..offset + len], "{name}: read {offset}+{len} differs");
            }
            assert!(b.read(256 * 1024 - 1, 2).await.is_err());
            assert!(b.read(256 * 1024, 0).await.expect("empty read at the end").is_empty());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_disjoint_requests_on_both_paths() {
        const REGION: usize = 16 * 1024;
        const TASKS: usize = 32;
        for engine in engines() {
            let (_dir, b) = backend(&engine, (REGION * TASKS) as u64);
            let b = Arc::new(b);
            let mut tasks = Vec::new();
            for t in 0..TASKS {
                let b = b.clone();
                tasks.push(tokio::spawn(async move {
                    // Each task owns one region and mixes direct (whole blocks) and
                    // buffered (unaligned) writes and reads in it.
                    let base = (t * REGION) as u64;
                    let mut model = vec![0u8; REGION];
                    for (i, (offset, len)) in
                        [(0, 8192), (100, 50), (4096, 4096), (5000, 9000), (12288, 4096), (1, REGION - 2)]
                            .into_iter()
                            .enumerate()
                    {
                        let data = pattern(len, (t * 7 + i) as u8);
                        b.write(base + offset as u64, Bytes::from(data.clone()), false).await?;
                        model[offset..offset + len].copy_from_slice(&data);
                        let got = b.read(base + 4096, 8192).await?;
                        assert!(got[..] == model[4096..12288], "task {t} step {i}");
                    }
                    let got = b.read(base, REGION as u32).await?;
                    assert!(got[..] == model[..], "task {t}: final contents");
                    Ok::<_, BackendError>(())
                }));
            }
            for t in tasks {
                t.await.expect("task").expect("requests");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trim_and_write_zeroes_read_as_zeroes() {
        for engine in engines() {
            let (_dir, b) = backend(&engine, 64 * 1024);
            b.write(0, Bytes::from(vec![9u8; 64 * 1024]), false).await.expect("fill");
            b.trim(4096, 8192).await.expect("trim");
            b.trim(20000, 10).await.expect("unaligned trim");
            b.write_zeroes(30000, 5000, false, false).await.expect("zero range");
            b.write_zeroes(40960, 4096, true, true).await.expect("fast punch");
            match b.write_zeroes(50000, 100, false, true).await {
                Ok(()) => {}
                Err(BackendError::NotSupported) if !is_ext4_xfs_or_btrfs(b.path()) => {
                    b.write_zeroes(50000, 100, false, false).await.expect("slow zeroes");
                }
                Err(e) => panic!("ext4/xfs/btrfs zero ranges quickly: {e}"),
            }
            let got = b.read(0, 64 * 1024).await.expect("read");
            for (i, &byte) in got.iter().enumerate() {
                let zero = (4096..12288).contains(&i)
                    || (20000..20010).contains(&i)
                    || (30000..35000).contains(&i)
                    || (40960..45056).contains(&i)
                    || (50000..50100).contains(&i);
                assert_eq!(byte, if zero { 0 } else { 9 }, "{}: byte {i}", engine.name());
            }
            assert!(b.trim(60000, 10000).await.is_err());
            assert!(b.write_zeroes(60000, 10000, true, false).await.is_err());
        }
    }

    #[tokio::test]
    async fn slow_zeroes_cover_long_ranges() {
        let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).expect("sync");
        let (_dir, b) = backend(&engine, 3 * MIB);
        b.write(0, Bytes::from(vec![1u8; 3 * MIB as usize]), false).await.expect("fill");
        b.write_zeroes_slowly(100, 2 * MIB + 5).await.expect("zeroes");
        let got = b.read(0, 3 * MIB as u32).await.expect("read");
        assert_eq!(got[99], 1);
        assert!(got[100..(2 * MIB + 105) as usize].iter().all(|&x| x == 0));
        assert_eq!(got[(2 * MIB + 105) as usize], 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_status_reports_data_and_holes() {
        use ExtentKind::{Data, Hole};
        let ext = |len_bytes, kind| Extent { len_bytes, kind };
        for engine in engines() {
            let name = engine.name();
            let (_dir, b) = backend(&engine, MIB);
            assert_eq!(b.block_status(0, MIB).await.expect("status"), [ext(MIB, Hole)], "{name}");

            b.write(8192 + 5, Bytes::from_static(b"x"), false).await.expect("1 byte, buffered");
            b.write(65536, Bytes::from(vec![1u8; 8192]), false).await.expect("8 KiB, direct");
            b.write(MIB - 4096, Bytes::from(vec![1u8; 4096]), false).await.expect("last block");
            let expect = [
                ext(8192, Hole),
                ext(4096, Data),
                ext(65536 - 12288, Hole),
                ext(8192, Data),
                ext(MIB - 4096 - 73728, Hole),
                ext(4096, Data),
            ];
            assert_eq!(b.block_status(0, MIB).await.expect("status"), expect, "{name}");
            // A query inside the volume is clipped to its range.
            assert_eq!(
                b.block_status(8192 + 100, 4096).await.expect("status"),
                [ext(3996, Data), ext(100, Hole)],
                "{name}"
            );
            assert_eq!(b.block_status(MIB - 10, 10).await.expect("status"), [ext(10, Data)]);

            b.trim(65536, 4096).await.expect("trim");
            let status = b.block_status(61440, 16384).await.expect("status");
            assert_eq!(status, [ext(8192, Hole), ext(4096, Data), ext(4096, Hole)], "{name}");
            assert!(b.block_status(0, MIB + 1).await.is_err());
            assert!(b.block_status(0, 0).await.is_err());

            // After growing, the new range is a hole.
            b.grow(2 * MIB).expect("grow");
            assert_eq!(
                b.block_status(MIB - 4096, 8192).await.expect("status"),
                [ext(4096, Data), ext(4096, Hole)]
            );
        }
    }

    #[test]
    fn block_status_stops_at_the_extent_cap() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(64 * 4096).expect("set_len");
        for block in (0..64u64).step_by(2) {
            file.write_all_at(&[1u8; 4096], block * 4096).expect("write");
        }
        let all = map_extents(&file, 0, 64 * 4096, 1000).expect("map");
        assert_eq!(all.len(), 64);
        let capped = map_extents(&file, 0, 64 * 4096, 5).expect("map");
        assert_eq!(capped.len(), 5);
        assert_eq!(capped.iter().map(|e| e.len_bytes).sum::<u64>(), 5 * 4096);
        assert_eq!(capped[0].kind, ExtentKind::Data);
    }

    #[test]
    fn errors_map_to_backend_errors() {
        let enospc = EngineError::Io(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(backend_error(enospc), BackendError::NoSpace));
        assert!(matches!(backend_error(EngineError::ShutDown), BackendError::ShuttingDown));
        let eio = backend_error(EngineError::Io(io::Error::from_raw_os_error(libc::EIO)));
        assert_eq!(eio.errno(), libc::EIO);
    }
}
