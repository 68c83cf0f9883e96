//! The file system under the WAL, behind a trait, so the same WAL code runs on real files
//! and on a deterministic simulated disk ([`SimDisk`]) that loses and tears unsynced writes
//! on [`SimDisk::crash`].
//!
//! Real files come in two engines with the same results: [`StdDisk`] (`pwrite` per append,
//! `fdatasync` per sync, through `std::fs`) and [`UringDisk`] (appends buffered, each sync
//! one io_uring submission of the writes linked to an `fdatasync`; see [`super::uring`]).
//! [`NodeDisk`] is whichever of the two [`NodeDisk::open`] could start for a
//! [`WalEngine`]; a node's WAL runs on it, the simulator's on [`SimDisk`].
//!
//! Durability contract for implementations:
//! * [`WalFile::append`] may be lost or torn (any prefix of the unsynced bytes may survive a
//!   crash) until [`WalFile::sync`] returns `Ok`.
//! * [`WalDisk::create`] and [`WalDisk::remove`] are durable when they return (the directory
//!   entry is synced).
//! * [`WalFile::truncate`] is durable after the next [`WalFile::sync`].
//! * [`WalDisk::rename`] and [`WalDisk::reuse`] are durable when they return. A reused file
//!   reads as empty, and its appends overwrite its old bytes in place, which stay in the file
//!   past its length (and reappear after a crash) until a truncate cuts them. Overwriting
//!   allocated blocks is why files are reused: an `fdatasync` then writes no file-system
//!   metadata (no size change, no block allocation), which on ext4 halves its cost.
//! * A file is open through one handle at a time. While it is, the file on disk may be longer
//!   than [`WalFile::len_bytes`] ([`UringDisk`] writes whole blocks, zero-padded, with
//!   `O_DIRECT`); dropping the handle or a truncate cuts it. After a crash the padding reads
//!   like any unsynced tail: recovery cuts it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

pub use super::uring::{UringDisk, UringFile};

/// Errors of the disk layer.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// an operating-system call failed
    #[error("{op} {name}: {source}")]
    Io {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// the file does not exist
    #[error("{name}: no such file")]
    NotFound { name: String },
    /// the file already exists (create never overwrites)
    #[error("{name}: file already exists")]
    AlreadyExists { name: String },
    /// a read asked for bytes past the end of the file
    #[error("{name}: read of {len_bytes} bytes at offset {offset} is past the end ({file_len_bytes} bytes)")]
    ReadPastEnd { name: String, offset: u64, len_bytes: u64, file_len_bytes: u64 },
    /// the simulated disk crashed after this handle was opened; reopen the WAL
    #[error("{name}: handle is stale (the simulated disk crashed)")]
    Stale { name: String },
    /// a fault injected by a test
    #[error("{name}: injected {op} failure")]
    Injected { op: &'static str, name: String },
}

/// A directory of WAL files.
pub trait WalDisk {
    type File: WalFile;

    /// Creates a new, empty file. Fails if it exists. Durable on return.
    fn create(&self, name: &str) -> Result<Self::File, DiskError>;
    /// Opens an existing file for reading and appending.
    fn open(&self, name: &str) -> Result<Self::File, DiskError>;
    /// Names of all files, in no particular order.
    fn list(&self) -> Result<Vec<String>, DiskError>;
    /// Removes a file. Durable on return.
    fn remove(&self, name: &str) -> Result<(), DiskError>;
    /// Renames a file, replacing any file named `to`. Durable on return.
    fn rename(&self, from: &str, to: &str) -> Result<(), DiskError>;
    /// Renames `from` to `to` and opens it for overwriting from offset 0 (see the module
    /// docs). Durable on return.
    fn reuse(&self, from: &str, to: &str) -> Result<Self::File, DiskError>;
}

/// Makes the bytes a file had handed to the kernel durable, on any thread: what
/// [`WalFile::begin_sync`] returns, so the `fdatasync` need not hold up the appends that
/// follow it.
pub trait FileSync: Send + 'static {
    fn sync(self) -> Result<(), DiskError>;
}

/// A real file's `fdatasync`, through a handle of its own.
#[derive(Debug)]
pub struct FdSync {
    file: File,
    name: String,
}

impl FdSync {
    /// A handle on `file` that syncs it (a `dup` of its descriptor).
    pub(super) fn of(file: &File, name: &str) -> Result<FdSync, DiskError> {
        Ok(FdSync { file: file.try_clone().map_err(io_err("dup", name))?, name: name.to_owned() })
    }
}

impl FileSync for FdSync {
    fn sync(self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(io_err("fdatasync", &self.name))
    }
}

/// One open WAL file: append-only writes, positioned reads.
pub trait WalFile {
    /// What [`WalFile::begin_sync`] hands out.
    type Sync: FileSync;

    /// Current length, including unsynced appends.
    fn len_bytes(&self) -> Result<u64, DiskError>;
    /// Fills `buf` from `offset`; fails if the file is shorter.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Appends `data` at the end. Not durable until [`WalFile::sync`].
    fn append(&mut self, data: &[u8]) -> Result<(), DiskError>;
    /// Appends `parts`, one after another, as [`WalFile::append`] does. A file that buffers
    /// appends keeps the parts themselves, not a copy.
    fn append_parts(&mut self, parts: Vec<Bytes>) -> Result<(), DiskError> {
        parts.iter().try_for_each(|part| self.append(part))
    }
    /// Hands every appended byte to the kernel (a crash of the process then keeps it; a
    /// power loss may not). A file that writes through at once has nothing to do.
    fn write_out(&mut self) -> Result<(), DiskError> {
        Ok(())
    }
    /// Makes all appended data (and any truncation) durable.
    fn sync(&mut self) -> Result<(), DiskError>;
    /// Hands every appended byte to the kernel and returns what makes them (and any
    /// truncation before) durable, for another thread to run while appends go on: the bytes
    /// appended later are not covered.
    fn begin_sync(&mut self) -> Result<Self::Sync, DiskError>;
    /// Cuts the file to `len_bytes`, its old bytes past them included.
    fn truncate(&mut self, len_bytes: u64) -> Result<(), DiskError>;
}

// ---------------------------------------------------------------------------------------------
// StdDisk

/// Real files in one directory, through `std::fs`.
#[derive(Debug, Clone)]
pub struct StdDisk {
    dir: PathBuf,
}

/// A file of a [`StdDisk`].
#[derive(Debug)]
pub struct StdFile {
    file: File,
    name: String,
    len_bytes: u64,
}

fn io_err<'a>(op: &'static str, name: &'a str) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io { op, name: name.to_owned(), source }
}

impl StdDisk {
    /// Uses `dir` (created if missing) for the WAL's files. The directory should hold nothing
    /// else; files whose names are not segment names are ignored.
    pub fn open(dir: impl AsRef<Path>) -> Result<StdDisk, DiskError> {
        let dir = dir.as_ref().to_path_buf();
        let name = dir.display().to_string();
        std::fs::create_dir_all(&dir).map_err(io_err("create_dir_all", &name))?;
        let disk = StdDisk { dir };
        disk.sync_dir()?;
        Ok(disk)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sync_dir(&self) -> Result<(), DiskError> {
        let name = self.dir.display().to_string();
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", &name))
    }
}

impl StdFile {
    /// The open file, its name and its length, for [`UringDisk`] to take over.
    pub(super) fn into_parts(self) -> (File, String, u64) {
        (self.file, self.name, self.len_bytes)
    }
}

impl WalDisk for StdDisk {
    type File = StdFile;

    fn create(&self, name: &str) -> Result<StdFile, DiskError> {
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(self.dir.join(name)).map_err(
                |source| {
                    if source.kind() == io::ErrorKind::AlreadyExists {
                        DiskError::AlreadyExists { name: name.to_owned() }
                    } else {
                        io_err("create", name)(source)
                    }
                },
            )?;
        self.sync_dir()?;
        Ok(StdFile { file, name: name.to_owned(), len_bytes: 0 })
    }

    fn open(&self, name: &str) -> Result<StdFile, DiskError> {
        let file = OpenOptions::new().read(true).write(true).open(self.dir.join(name)).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                DiskError::NotFound { name: name.to_owned() }
            } else {
                io_err("open", name)(source)
            }
        })?;
        let len_bytes = file.metadata().map_err(io_err("stat", name))?.len();
        Ok(StdFile { file, name: name.to_owned(), len_bytes })
    }

    fn list(&self) -> Result<Vec<String>, DiskError> {
        let dir_name = self.dir.display().to_string();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err("read_dir", &dir_name))? {
            let entry = entry.map_err(io_err("read_dir", &dir_name))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn remove(&self, name: &str) -> Result<(), DiskError> {
        std::fs::remove_file(self.dir.join(name)).map_err(io_err("remove", name))?;
        self.sync_dir()
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), DiskError> {
        std::fs::rename(self.dir.join(from), self.dir.join(to)).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                DiskError::NotFound { name: from.to_owned() }
            } else {
                io_err("rename", from)(source)
            }
        })?;
        self.sync_dir()
    }

    fn reuse(&self, from: &str, to: &str) -> Result<StdFile, DiskError> {
        self.rename(from, to)?;
        let mut file = WalDisk::open(self, to)?;
        file.len_bytes = 0;
        Ok(file)
    }
}

impl WalFile for StdFile {
    type Sync = FdSync;

    fn len_bytes(&self) -> Result<u64, DiskError> {
        Ok(self.len_bytes)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len_bytes {
            return Err(DiskError::ReadPastEnd {
                name: self.name.clone(),
                offset,
                len_bytes: buf.len() as u64,
                file_len_bytes: self.len_bytes,
            });
        }
        self.file.read_exact_at(buf, offset).map_err(io_err("read", &self.name))
    }

    fn append(&mut self, data: &[u8]) -> Result<(), DiskError> {
        self.file.write_all_at(data, self.len_bytes).map_err(io_err("write", &self.name))?;
        self.len_bytes += data.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(io_err("fdatasync", &self.name))
    }

    fn begin_sync(&mut self) -> Result<FdSync, DiskError> {
        FdSync::of(&self.file, &self.name)
    }

    fn truncate(&mut self, len_bytes: u64) -> Result<(), DiskError> {
        self.file.set_len(len_bytes).map_err(io_err("truncate", &self.name))?;
        self.len_bytes = len_bytes;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// NodeDisk: the engine chosen at node start

/// Which engine writes a node's WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalEngine {
    /// io_uring if this kernel lets us use it, otherwise sync.
    #[default]
    Auto,
    /// io_uring or nothing.
    Uring,
    /// `pwrite` and `fdatasync` ([`StdDisk`]).
    Sync,
}

impl std::fmt::Display for WalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WalEngine::Auto => "auto",
            WalEngine::Uring => "io_uring",
            WalEngine::Sync => "sync",
        })
    }
}

/// A WAL engine name that is none of `auto`, `io_uring`, `sync`.
#[derive(Debug, thiserror::Error)]
#[error("unknown WAL engine {0:?} (expected auto, io_uring or sync)")]
pub struct UnknownWalEngine(pub String);

impl FromStr for WalEngine {
    type Err = UnknownWalEngine;

    /// Parses `auto`, `io_uring` (also `uring`, `io-uring`) or `sync`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(WalEngine::Auto),
            "io_uring" | "uring" | "io-uring" => Ok(WalEngine::Uring),
            "sync" => Ok(WalEngine::Sync),
            _ => Err(UnknownWalEngine(s.to_owned())),
        }
    }
}

/// The disk of a node's WAL: a [`StdDisk`] or a [`UringDisk`], chosen at start.
#[derive(Debug, Clone)]
pub enum NodeDisk {
    Std(StdDisk),
    Uring(UringDisk),
}

/// A file of a [`NodeDisk`].
#[derive(Debug)]
pub enum NodeFile {
    Std(StdFile),
    Uring(UringFile),
}

impl NodeDisk {
    /// Opens `dir` with the engine `engine` asks for. With [`WalEngine::Auto`], io_uring is
    /// tried first (a ring is created and a NOP run through it); if that fails, a warning
    /// says why and [`StdDisk`] is used.
    pub fn open(dir: impl AsRef<Path>, engine: WalEngine) -> Result<NodeDisk, DiskError> {
        let dir = dir.as_ref();
        match engine {
            WalEngine::Sync => Ok(NodeDisk::Std(StdDisk::open(dir)?)),
            WalEngine::Uring => Ok(NodeDisk::Uring(UringDisk::open(dir)?)),
            WalEngine::Auto => match UringDisk::open(dir) {
                Ok(disk) => Ok(NodeDisk::Uring(disk)),
                Err(e @ DiskError::Io { op: "io_uring setup", .. }) => {
                    tracing::warn!(error = %e, "io_uring is unavailable; the WAL uses pwrite and fdatasync");
                    Ok(NodeDisk::Std(StdDisk::open(dir)?))
                }
                Err(e) => Err(e),
            },
        }
    }

    /// `"io_uring"` or `"sync"`.
    pub fn engine_name(&self) -> &'static str {
        match self {
            NodeDisk::Std(_) => "sync",
            NodeDisk::Uring(_) => "io_uring",
        }
    }

    /// The engine in use (never [`WalEngine::Auto`]).
    pub fn engine(&self) -> WalEngine {
        match self {
            NodeDisk::Std(_) => WalEngine::Sync,
            NodeDisk::Uring(_) => WalEngine::Uring,
        }
    }

    pub fn dir(&self) -> &Path {
        match self {
            NodeDisk::Std(d) => d.dir(),
            NodeDisk::Uring(d) => d.dir(),
        }
    }
}

impl WalDisk for NodeDisk {
    type File = NodeFile;

    fn create(&self, name: &str) -> Result<NodeFile, DiskError> {
        match self {
            NodeDisk::Std(d) => d.create(name).map(NodeFile::Std),
            NodeDisk::Uring(d) => d.create(name).map(NodeFile::Uring),
        }
    }

    fn open(&self, name: &str) -> Result<NodeFile, DiskError> {
        match self {
            NodeDisk::Std(d) => WalDisk::open(d, name).map(NodeFile::Std),
            NodeDisk::Uring(d) => WalDisk::open(d, name).map(NodeFile::Uring),
        }
    }

    fn list(&self) -> Result<Vec<String>, DiskError> {
        match self {
            NodeDisk::Std(d) => d.list(),
            NodeDisk::Uring(d) => d.list(),
        }
    }

    fn remove(&self, name: &str) -> Result<(), DiskError> {
        match self {
            NodeDisk::Std(d) => d.remove(name),
            NodeDisk::Uring(d) => d.remove(name),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), DiskError> {
        match self {
            NodeDisk::Std(d) => d.rename(from, to),
            NodeDisk::Uring(d) => d.rename(from, to),
        }
    }

    fn reuse(&self, from: &str, to: &str) -> Result<NodeFile, DiskError> {
        match self {
            NodeDisk::Std(d) => d.reuse(from, to).map(NodeFile::Std),
            NodeDisk::Uring(d) => d.reuse(from, to).map(NodeFile::Uring),
        }
    }
}

impl WalFile for NodeFile {
    type Sync = FdSync;

    fn len_bytes(&self) -> Result<u64, DiskError> {
        match self {
            NodeFile::Std(f) => f.len_bytes(),
            NodeFile::Uring(f) => f.len_bytes(),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.read_at(offset, buf),
            NodeFile::Uring(f) => f.read_at(offset, buf),
        }
    }

    fn append(&mut self, data: &[u8]) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.append(data),
            NodeFile::Uring(f) => f.append(data),
        }
    }

    fn append_parts(&mut self, parts: Vec<Bytes>) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.append_parts(parts),
            NodeFile::Uring(f) => f.append_parts(parts),
        }
    }

    fn write_out(&mut self) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.write_out(),
            NodeFile::Uring(f) => f.write_out(),
        }
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.sync(),
            NodeFile::Uring(f) => f.sync(),
        }
    }

    fn begin_sync(&mut self) -> Result<FdSync, DiskError> {
        match self {
            NodeFile::Std(f) => f.begin_sync(),
            NodeFile::Uring(f) => f.begin_sync(),
        }
    }

    fn truncate(&mut self, len_bytes: u64) -> Result<(), DiskError> {
        match self {
            NodeFile::Std(f) => f.truncate(len_bytes),
            NodeFile::Uring(f) => f.truncate(len_bytes),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SimDisk

/// An in-memory disk for deterministic tests. Clones share the same disk, so a test keeps one
/// handle to [`crash`](SimDisk::crash) and inspect it while the WAL owns another.
///
/// Model: each file has bytes and a synced length. Creating, removing, renaming and
/// truncating are durable at once (the real disk syncs them before the WAL relies on them). A
/// crash keeps the synced bytes of every file and a seeded random prefix of the unsynced ones:
/// all of them, none, or a cut at a random byte. A reused file also keeps its old bytes: past
/// its length, they come back as part of the file after a crash (or a reopen). Handles opened before a crash fail with
/// [`DiskError::Stale`] afterwards, like a process that died.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug)]
struct SimState {
    files: BTreeMap<String, SimFileState>,
    epoch: u64,
    rng: SplitMix64,
    fail_next_sync: bool,
    fail_next_append: bool,
}

#[derive(Debug, Default, Clone)]
struct SimFileState {
    data: Vec<u8>,
    synced_len: usize,
    /// A reused file's old bytes (its whole old content; those below `data.len()` are
    /// overwritten).
    old: Vec<u8>,
}

impl SimFileState {
    /// What a new handle sees: the bytes written since reuse, then the old ones past them.
    fn settle(&mut self) {
        if self.old.len() > self.data.len() {
            self.data.extend_from_slice(&self.old[self.data.len()..]);
        }
        self.old = Vec::new();
    }
}

/// A file of a [`SimDisk`].
#[derive(Debug)]
pub struct SimFile {
    disk: SimDisk,
    name: String,
    epoch: u64,
}

/// What a [`SimDisk::crash`] did to the unsynced data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Unsynced bytes that existed, over all files.
    pub unsynced_bytes: u64,
    /// Of those, bytes that survived.
    pub survived_bytes: u64,
}

#[derive(Debug, Clone)]
/// A small seeded generator (SplitMix64) for the simulated disk and the WAL tests.
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    /// The next value.
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn up_to(&mut self, max: u64) -> u64 {
        match max.checked_add(1) {
            Some(n) => self.next() % n,
            None => self.next(),
        }
    }

    /// In `0..n` (0 when `n` is 0).
    #[cfg(test)]
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `len` pseudo-random bytes.
    #[cfg(test)]
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

impl SimDisk {
    /// An empty disk whose crashes are decided by `seed`.
    pub fn new(seed: u64) -> SimDisk {
        SimDisk {
            state: Arc::new(Mutex::new(SimState {
                files: BTreeMap::new(),
                epoch: 0,
                rng: SplitMix64(seed),
                fail_next_sync: false,
                fail_next_append: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates power loss: unsynced bytes are dropped or torn, open handles go stale.
    pub fn crash(&self) -> CrashReport {
        let mut st = self.lock();
        let SimState { files, rng, .. } = &mut *st;
        let mut report = CrashReport::default();
        for f in files.values_mut() {
            let unsynced = (f.data.len() - f.synced_len) as u64;
            let survived = match rng.next() % 3 {
                0 => 0,
                1 => unsynced,
                _ => rng.up_to(unsynced),
            };
            report.unsynced_bytes += unsynced;
            report.survived_bytes += survived;
            // `survived <= unsynced`, which is a `usize` difference.
            f.data.truncate(f.synced_len + survived as usize);
            f.settle();
            f.synced_len = f.data.len();
        }
        st.epoch += 1;
        st.fail_next_sync = false;
        st.fail_next_append = false;
        report
    }

    /// A copy of a file's current bytes (synced or not).
    pub fn file_bytes(&self, name: &str) -> Option<Vec<u8>> {
        self.lock().files.get(name).map(|f| f.data.clone())
    }

    /// Replaces a file's bytes, as durable (for corruption tests).
    pub fn set_file_bytes(&self, name: &str, data: Vec<u8>) {
        let mut st = self.lock();
        let synced_len = data.len();
        st.files.insert(name.to_owned(), SimFileState { data, synced_len, old: Vec::new() });
    }

    /// The next [`WalFile::sync`] on any file fails.
    pub fn fail_next_sync(&self) {
        self.lock().fail_next_sync = true;
    }

    /// The next [`WalFile::append`] on any file fails (writing nothing).
    pub fn fail_next_append(&self) {
        self.lock().fail_next_append = true;
    }

    fn with_file<T>(
        &self,
        name: &str,
        epoch: u64,
        f: impl FnOnce(&mut SimState) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let mut st = self.lock();
        if st.epoch != epoch {
            return Err(DiskError::Stale { name: name.to_owned() });
        }
        if !st.files.contains_key(name) {
            return Err(DiskError::NotFound { name: name.to_owned() });
        }
        f(&mut st)
    }
}

impl WalDisk for SimDisk {
    type File = SimFile;

    fn create(&self, name: &str) -> Result<SimFile, DiskError> {
        let mut st = self.lock();
        if st.files.contains_key(name) {
            return Err(DiskError::AlreadyExists { name: name.to_owned() });
        }
        st.files.insert(name.to_owned(), SimFileState::default());
        Ok(SimFile { disk: self.clone(), name: name.to_owned(), epoch: st.epoch })
    }

    fn open(&self, name: &str) -> Result<SimFile, DiskError> {
        let mut st = self.lock();
        let Some(f) = st.files.get_mut(name) else {
            return Err(DiskError::NotFound { name: name.to_owned() });
        };
        f.settle();
        Ok(SimFile { disk: self.clone(), name: name.to_owned(), epoch: st.epoch })
    }

    fn list(&self) -> Result<Vec<String>, DiskError> {
        Ok(self.lock().files.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> Result<(), DiskError> {
        match self.lock().files.remove(name) {
            Some(_) => Ok(()),
            None => Err(DiskError::NotFound { name: name.to_owned() }),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), DiskError> {
        let mut st = self.lock();
        let f = st.files.remove(from).ok_or_else(|| DiskError::NotFound { name: from.to_owned() })?;
        st.files.insert(to.to_owned(), f);
        Ok(())
    }

    fn reuse(&self, from: &str, to: &str) -> Result<SimFile, DiskError> {
        self.rename(from, to)?;
        let mut st = self.lock();
        let f = SimFile::state(&mut st, to)?;
        f.settle();
        f.old = std::mem::take(&mut f.data);
        f.synced_len = 0;
        Ok(SimFile { disk: self.clone(), name: to.to_owned(), epoch: st.epoch })
    }
}

impl SimFile {
    fn state<'a>(st: &'a mut SimState, name: &str) -> Result<&'a mut SimFileState, DiskError> {
        st.files.get_mut(name).ok_or_else(|| DiskError::NotFound { name: name.to_owned() })
    }
}

/// A [`SimFile`]'s sync begun: makes the file durable up to the length it had then (unless
/// the disk crashed since, which drops it like a process that died mid-`fdatasync`).
#[derive(Debug)]
pub struct SimSync {
    disk: SimDisk,
    name: String,
    epoch: u64,
    len: usize,
}

impl FileSync for SimSync {
    fn sync(self) -> Result<(), DiskError> {
        self.disk.with_file(&self.name, self.epoch, |st| {
            if std::mem::take(&mut st.fail_next_sync) {
                return Err(DiskError::Injected { op: "sync", name: self.name.clone() });
            }
            let f = SimFile::state(st, &self.name)?;
            // A truncate since cut the file below what this sync covers.
            f.synced_len = f.synced_len.max(self.len.min(f.data.len()));
            Ok(())
        })
    }
}

impl WalFile for SimFile {
    type Sync = SimSync;

    fn len_bytes(&self) -> Result<u64, DiskError> {
        self.disk.with_file(
            &self.name,
            self.epoch,
            |st| Ok(SimFile::state(st, &self.name)?.data.len() as u64),
        )
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.disk.with_file(&self.name, self.epoch, |st| {
            let f = SimFile::state(st, &self.name)?;
            let past_end = || DiskError::ReadPastEnd {
                name: self.name.clone(),
                offset,
                len_bytes: buf.len() as u64,
                file_len_bytes: f.data.len() as u64,
            };
            let start = usize::try_from(offset).map_err(|_| past_end())?;
            let end = start.checked_add(buf.len()).ok_or_else(past_end)?;
            let src = f.data.get(start..end).ok_or_else(past_end)?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn append(&mut self, data: &[u8]) -> Result<(), DiskError> {
        self.disk.with_file(&self.name, self.epoch, |st| {
            if std::mem::take(&mut st.fail_next_append) {
                return Err(DiskError::Injected { op: "append", name: self.name.clone() });
            }
            SimFile::state(st, &self.name)?.data.extend_from_slice(data);
            Ok(())
        })
    }

    fn append_parts(&mut self, parts: Vec<Bytes>) -> Result<(), DiskError> {
        self.append(&parts.concat())
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.disk.with_file(&self.name, self.epoch, |st| {
            if std::mem::take(&mut st.fail_next_sync) {
                return Err(DiskError::Injected { op: "sync", name: self.name.clone() });
            }
            let f = SimFile::state(st, &self.name)?;
            f.synced_len = f.data.len();
            Ok(())
        })
    }

    fn begin_sync(&mut self) -> Result<SimSync, DiskError> {
        let len = self
            .disk
            .with_file(&self.name, self.epoch, |st| Ok(SimFile::state(st, &self.name)?.data.len()))?;
        Ok(SimSync { disk: self.disk.clone(), name: self.name.clone(), epoch: self.epoch, len })
    }

    fn truncate(&mut self, len_bytes: u64) -> Result<(), DiskError> {
        self.disk.with_file(&self.name, self.epoch, |st| {
            let f = SimFile::state(st, &self.name)?;
            let len = usize::try_from(len_bytes).unwrap_or(usize::MAX).min(f.data.len());
            f.data.truncate(len);
            f.old.truncate(len);
            f.synced_len = f.synced_len.min(len);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_begun_covers_what_came_before_it_on_the_simulated_disk() {
        for seed in 0..64 {
            let disk = SimDisk::new(seed);
            let mut f = disk.create("a").expect("create");
            f.append(b"before").expect("append");
            let sync = f.begin_sync().expect("begin");
            f.append(b"-after").expect("append");
            sync.sync().expect("sync");
            disk.crash();
            let bytes = disk.file_bytes("a").expect("file survives");
            assert!(bytes.starts_with(b"before"), "seed {seed}: {bytes:?}");
            assert!(b"before-after".starts_with(&bytes));
        }
        // A crash before the sync ran drops it, as a process that died mid-fdatasync.
        let disk = SimDisk::new(1);
        let mut f = disk.create("a").expect("create");
        f.append(b"x").expect("append");
        let sync = f.begin_sync().expect("begin");
        disk.crash();
        assert!(matches!(sync.sync(), Err(DiskError::Stale { .. })));
    }

    #[test]
    fn real_files_sync_from_another_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disks = [NodeDisk::open(dir.path().join("std"), WalEngine::Sync).expect("std"), {
            NodeDisk::open(dir.path().join("auto"), WalEngine::Auto).expect("auto")
        }];
        for disk in disks {
            let mut f = disk.create("a").expect("create");
            f.append(&[7u8; 10_000]).expect("append");
            let sync = f.begin_sync().expect("begin");
            std::thread::spawn(move || sync.sync()).join().expect("thread").expect("fdatasync");
            let path = disk.dir().join("a");
            let on_disk = std::fs::read(&path).expect("read");
            assert!(
                on_disk.len() >= 10_000 && on_disk[..10_000].iter().all(|&b| b == 7),
                "{}",
                disk.engine_name()
            );
        }
    }

    #[test]
    fn sim_crash_keeps_synced_bytes_and_a_prefix_of_the_rest() {
        for seed in 0..64 {
            let disk = SimDisk::new(seed);
            let mut f = disk.create("a").expect("create");
            f.append(b"synced").expect("append");
            f.sync().expect("sync");
            f.append(b"-unsynced").expect("append");
            let report = disk.crash();
            let bytes = disk.file_bytes("a").expect("file survives");
            assert!(bytes.starts_with(b"synced"));
            assert!(b"synced-unsynced".starts_with(&bytes));
            assert_eq!(report.unsynced_bytes, 9);
            assert_eq!(report.survived_bytes as usize, bytes.len() - 6);
            assert!(matches!(f.len_bytes(), Err(DiskError::Stale { .. })));
        }
    }

    #[test]
    fn sim_crashes_are_deterministic_per_seed_and_vary_across_seeds() {
        let run = |seed| {
            let disk = SimDisk::new(seed);
            let mut f = disk.create("a").expect("create");
            f.append(&[7u8; 1000]).expect("append");
            disk.crash().survived_bytes
        };
        let outcomes: Vec<u64> = (0..32).map(run).collect();
        assert_eq!(outcomes, (0..32).map(run).collect::<Vec<_>>());
        assert!(outcomes.contains(&0));
        assert!(outcomes.contains(&1000));
        assert!(outcomes.iter().any(|&n| n > 0 && n < 1000));
    }

    #[test]
    fn sim_injected_faults_fire_once() {
        let disk = SimDisk::new(1);
        let mut f = disk.create("a").expect("create");
        disk.fail_next_append();
        assert!(matches!(f.append(b"x"), Err(DiskError::Injected { .. })));
        f.append(b"x").expect("second append works");
        disk.fail_next_sync();
        assert!(matches!(f.sync(), Err(DiskError::Injected { .. })));
        f.sync().expect("second sync works");
    }

    fn exercise(disk: &impl WalDisk) {
        let mut f = disk.create("seg").expect("create");
        assert!(matches!(disk.create("seg"), Err(DiskError::AlreadyExists { .. })));
        f.append(b"hello ").expect("append");
        f.append(b"world").expect("append");
        f.sync().expect("sync");
        assert_eq!(f.len_bytes().expect("len"), 11);
        let mut buf = [0u8; 5];
        f.read_at(6, &mut buf).expect("read");
        assert_eq!(&buf, b"world");
        assert!(matches!(f.read_at(7, &mut buf), Err(DiskError::ReadPastEnd { .. })));
        f.truncate(5).expect("truncate");
        f.append(b"!").expect("append");
        f.sync().expect("sync");
        drop(f);
        let g = disk.open("seg").expect("open");
        let mut all = vec![0u8; g.len_bytes().expect("len") as usize];
        g.read_at(0, &mut all).expect("read");
        assert_eq!(all, b"hello!");
        assert_eq!(disk.list().expect("list"), vec!["seg".to_owned()]);
        disk.remove("seg").expect("remove");
        assert!(disk.list().expect("list").is_empty());
        assert!(matches!(disk.open("seg"), Err(DiskError::NotFound { .. })));
    }

    #[test]
    fn std_uring_and_sim_disks_behave_alike() {
        let dir = tempfile::tempdir().expect("tempdir");
        exercise(&StdDisk::open(dir.path().join("wal")).expect("open"));
        exercise(&SimDisk::new(0));
        exercise(&NodeDisk::open(dir.path().join("node-sync"), WalEngine::Sync).expect("open"));
        match UringDisk::open(dir.path().join("uring")) {
            Ok(disk) => exercise(&disk),
            Err(e) => eprintln!("skipping the io_uring disk: {e}"),
        }
        let auto = NodeDisk::open(dir.path().join("node-auto"), WalEngine::Auto).expect("auto always opens");
        assert_ne!(auto.engine(), WalEngine::Auto);
        exercise(&auto);
    }

    #[test]
    fn wal_engines_parse_and_print() {
        for engine in [WalEngine::Auto, WalEngine::Uring, WalEngine::Sync] {
            assert_eq!(engine.to_string().parse::<WalEngine>().expect("parses"), engine);
        }
        assert_eq!("URING".parse::<WalEngine>().expect("parses"), WalEngine::Uring);
        assert!("aio".parse::<WalEngine>().is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let sync = NodeDisk::open(dir.path(), WalEngine::Sync).expect("open");
        assert_eq!((sync.engine(), sync.engine_name()), (WalEngine::Sync, "sync"));
    }
}
