//! [`SealedFile`]: a volume's copy on disk, with a checksum (and, encrypted, a nonce and
//! tag) for every 4 KiB block, checked on every read.
//!
//! # Layout
//!
//! The data stays where it always was, block-aligned in `<uuid>.img` (so `O_DIRECT` and
//! io_uring work as before); the metadata lives beside it in `<uuid>.meta` ([`meta`]): a
//! header page, then two 64-byte records per block ([`record`]).
//!
//! # Why two records per block, and how a crash cannot make a block unreadable
//!
//! A write changes the data and its record, two writes that no file system makes atomic
//! together. So a block has two slots, and a write puts its new record in the slot that
//! does *not* describe the data on disk now, and only then (once that record write has
//! completed) writes the data. Whatever moment a crash picks, the disk holds the old data
//! (matching the untouched old record) or the new data (whose record was written first),
//! and a read accepts a record in either slot that matches. Which slot describes the data
//! is decided by the records' `seq`: the newest record whose data write is known complete.
//! Records of this process's writes are complete once the writer released the block (the
//! writer holds an exclusive range lock until its data write completed); records of an
//! earlier process are complete unless the header doubts them: a process that did not
//! close cleanly leaves the seqs above its `seq_confirmed` (written every second and at
//! every flush) doubted, for every later process, until the blocks are written again. A block
//! whose newest record is not known complete is settled by reading its data once. An empty
//! slot stands for the block as it was before its first record, zeroes: a crash between a
//! block's first record and its data leaves that record doubted and the data zero, and
//! the block reads as zero (a *known complete* record over zeroes is damage, not a crash).
//! A guard on a doubted block compares the version of the record its data matches.
//!
//! This covers a process crash (kill -9) completely: completed writes are in the page
//! cache, in order. After a power loss, writes that no flush covered may be missing in any
//! combination; in a cluster the log replay rewrites everything after the checkpoint (data
//! and records together), and a node alone may find such a block damaged (EIO, never wrong
//! data) — see ARCHITECTURE.md.
//!
//! # Trim and zeroing
//!
//! Blocks in whole metadata pages (32 blocks, 128 KiB) lose their records: the page is
//! punched out of the metadata file, then the data is punched or zeroed; a punched
//! metadata page reads as zero whatever the data says, so a crash in between leaves zeroes.
//! Blocks at the ends get a zero record in their free slot, like a write.

pub mod meta;
pub mod record;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use self::meta::{Doubted, Header, MetaError, MetaFile, PairView, PAGE_BLOCKS};
use self::record::{decode_pair, Content, Record, Slot, PAIR_BYTES, RECORD_BYTES};
use super::engine::{run_steps_now, IoEngine};
use super::file::{FileBackend, FileError};
use crate::backend::{check_range, BackendError, BackendResult, BlockBackend, Extent};
use crate::seal::backend::{IntegrityEvent, IntegrityReporter};
use crate::seal::{
    check_write, BlockImage, BlockState, BlockWrite, CopyStore, Damage, RangeLock, SealedBlocks, SealedStore,
    WriteOutcome, BLOCK, BLOCK_BYTES,
};

/// Local seqs reserved (durably, in the header) at a time.
const SEQ_RESERVE_BATCH: u64 = 1 << 20;
/// How often, at most, the header's `seq_confirmed` is brought up to date by writes.
const CONFIRM_INTERVAL: Duration = Duration::from_secs(1);
/// The version of blocks found in a data file that had no metadata yet (an upgrade).
pub const IMPORTED_VERSION: u64 = 1;
/// Metadata pages cached per volume by default (64 MiB, the metadata of 2 GiB of data).
pub const CACHE_PAGES_DEFAULT: usize = 16384;

/// Metadata pages each store opened from now on caches (see [`set_cache_pages`]).
static CACHE_PAGES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(CACHE_PAGES_DEFAULT);

/// Sets how many metadata pages (4 KiB each, describing 128 KiB of data) every store opened
/// from now on keeps in memory: the working set whose reads and writes need no metadata I/O.
pub fn set_cache_pages(pages: usize) {
    CACHE_PAGES.store(pages.max(16), Ordering::Relaxed);
}

fn cache_pages() -> usize {
    CACHE_PAGES.load(Ordering::Relaxed)
}

/// Why a sealed volume could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    /// The data file.
    #[error(transparent)]
    Data(#[from] FileError),
    /// The metadata file.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Importing an existing data file failed.
    #[error("sealing the existing data of {}: {source}", path.display())]
    Import { path: PathBuf, source: BackendError },
    /// Writing the metadata header failed.
    #[error("metadata header of {}: {source}", path.display())]
    Header { path: PathBuf, source: std::io::Error },
}

/// The path of the metadata file that goes with the data file `data`.
pub fn meta_path(data: &Path) -> PathBuf {
    data.with_extension("meta")
}

/// Where a block's next record goes, or that the data must be read to know.
enum Target {
    Slot(usize),
    NeedData,
}

/// See the [module documentation](self).
pub struct SealedFile {
    data: FileBackend,
    meta: MetaFile,
    locks: Arc<RangeLock>,
    next_seq: AtomicU64,
    /// Seqs below this were handed out by an earlier process.
    seq_start: u64,
    /// Records of earlier processes that may be incomplete (see [`Header::doubted`]).
    doubted: Doubted,
    header: Mutex<HeaderState>,
    /// Seqs of writes in flight (with how many writes hold each).
    in_flight: Mutex<BTreeMap<u64, usize>>,
    /// Writes dropped (cancelled) between their records and the end of their data write;
    /// their seqs stay in `in_flight` for good (see [`Unfinished`]).
    abandoned: AtomicU64,
    reporter: Arc<dyn IntegrityReporter>,
    copy: Option<u64>,
}

#[derive(Debug)]
struct HeaderState {
    header: Header,
    confirmed_at: Instant,
}

fn other(slot: usize) -> usize {
    1 - slot
}

impl SealedFile {
    /// Creates a new volume: an all-hole data file and an empty metadata file.
    pub fn create(
        path: impl AsRef<Path>,
        size_bytes: u64,
        engine: IoEngine,
        reporter: Arc<dyn IntegrityReporter>,
    ) -> Result<SealedFile, SealedError> {
        let path = path.as_ref();
        let data = FileBackend::create(path, size_bytes, engine.clone())?;
        let meta = MetaFile::create(&meta_path(path), engine, cache_pages())?;
        Self::start(data, meta, Header::new_volume(), reporter)
    }

    /// Opens a volume. A data file without a metadata file (made by an older raftblk) is
    /// sealed as it stands first: every allocated block gets a record.
    pub async fn open(
        path: impl AsRef<Path>,
        engine: IoEngine,
        reporter: Arc<dyn IntegrityReporter>,
    ) -> Result<SealedFile, SealedError> {
        let path = path.as_ref();
        let data = FileBackend::open(path, engine.clone())?;
        let mpath = meta_path(path);
        if !mpath.exists() {
            let meta = MetaFile::create(&mpath, engine, cache_pages())?;
            let store = Self::start(data, meta, Header::new_volume(), reporter)?;
            tracing::warn!(path = %path.display(), "volume has no metadata file (older format); sealing its data");
            store.import().await.map_err(|source| SealedError::Import { path: path.to_owned(), source })?;
            return Ok(store);
        }
        let (meta, mut header) = match MetaFile::open(&mpath, engine.clone(), cache_pages()) {
            Ok(opened) => opened,
            Err(MetaError::Header { .. }) => {
                // Both header copies lost: rebuild one from the records (every record is
                // then doubted, and settled by its data when first written).
                let (meta, _) = MetaFile::open_without_header(&mpath, engine, cache_pages())?;
                let highest = meta
                    .highest_seq()
                    .map_err(|source| SealedError::Header { path: mpath.clone(), source })?;
                tracing::warn!(path = %mpath.display(), highest, "metadata header damaged; rebuilt from the records");
                let header = Header {
                    generation: 1,
                    seq_reserved: highest + 1,
                    doubted: Doubted::all(0, highest + 1),
                    ..Header::default()
                };
                (meta, header)
            }
            Err(e) => return Err(e.into()),
        };
        if !header.clean {
            tracing::info!(path = %path.display(), confirmed = header.seq_confirmed, "volume was not closed cleanly; its last writes are settled by their data when next written");
        }
        header.generation += 1;
        Self::start(data, meta, header, reporter)
    }

    fn start(
        data: FileBackend,
        meta: MetaFile,
        header: Header,
        reporter: Arc<dyn IntegrityReporter>,
    ) -> Result<SealedFile, SealedError> {
        // Seqs start above every one an earlier process may have used; 0 and 1 are never
        // used, so versions of local writes never collide with IMPORTED_VERSION.
        let seq_start = header.seq_reserved.max(IMPORTED_VERSION + 1);
        // What the last process did not confirm stays doubted until its blocks are written
        // again, through any number of later processes and crashes: a later process's
        // confirmation covers its own seqs only.
        let mut doubted = header.doubted.clone();
        if !header.clean {
            doubted.add(header.seq_confirmed.saturating_add(1), seq_start);
        }
        let fresh = Header {
            generation: header.generation,
            seq_reserved: seq_start + SEQ_RESERVE_BATCH,
            // Nothing of this process is written yet.
            seq_confirmed: seq_start - 1,
            clean: false,
            doubted: doubted.clone(),
        };
        meta.write_header_now(&fresh, true)
            .map_err(|source| SealedError::Header { path: meta.path().to_owned(), source })?;
        Ok(SealedFile {
            data,
            meta,
            locks: RangeLock::new(),
            next_seq: AtomicU64::new(seq_start),
            seq_start,
            doubted,
            header: Mutex::new(HeaderState { header: fresh, confirmed_at: Instant::now() }),
            in_flight: Mutex::new(BTreeMap::new()),
            abandoned: AtomicU64::new(0),
            reporter,
            copy: None,
        })
    }

    /// Names this copy's node in integrity reports.
    pub fn with_copy_id(mut self, node: u64) -> SealedFile {
        self.copy = Some(node);
        self
    }

    /// Serves data requests shorter than `bytes` through the page cache (see
    /// [`FileBackend::cache_below`]).
    pub fn cache_below(mut self, bytes: u64) -> SealedFile {
        self.data = self.data.cache_below(bytes);
        self
    }

    /// The data file's path.
    pub fn path(&self) -> &Path {
        self.data.path()
    }

    /// Bytes the volume occupies on disk (data and metadata).
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        Ok(self.data.allocated_bytes()? + self.meta.allocated_bytes()?)
    }

    /// Whether aligned data I/O bypasses the page cache.
    pub fn uses_direct_io(&self) -> bool {
        self.data.uses_direct_io()
    }

    /// Grows the volume (never shrinks); new blocks read as zero.
    pub fn grow_to(&self, size_bytes: u64) -> Result<(), FileError> {
        self.data.grow(size_bytes)
    }

    fn header(&self) -> std::sync::MutexGuard<'_, HeaderState> {
        // The state is one copyable value: a panic cannot leave it half updated.
        self.header.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh seq, reserving more in the header (durably) when they run out.
    fn take_seq(&self) -> BackendResult<u64> {
        // Taken and marked in flight at once, or `confirmed` could vouch for it meanwhile.
        let seq = {
            let mut in_flight = self.in_flight();
            let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
            *in_flight.entry(seq).or_insert(0) += 1;
            seq
        };
        let mut h = self.header();
        if seq >= h.header.seq_reserved {
            let mut header = h.header.clone();
            header.generation += 1;
            header.seq_reserved = seq + SEQ_RESERVE_BATCH;
            if let Err(e) = self.meta.write_header_now(&header, true) {
                drop(h);
                self.finish_seq(seq);
                return Err(BackendError::Io(e));
            }
            h.header = header;
        }
        Ok(seq)
    }

    fn finish_seq(&self, seq: u64) {
        {
            let mut in_flight = self.in_flight();
            if let Some(n) = in_flight.get_mut(&seq) {
                *n -= 1;
                if *n == 0 {
                    in_flight.remove(&seq);
                }
            }
        }
        let due = self.header().confirmed_at.elapsed() >= CONFIRM_INTERVAL;
        if due {
            self.write_confirmed(false, false);
        }
    }

    /// Every seq below the lowest one in flight is complete.
    fn confirmed(&self) -> u64 {
        let in_flight = self.in_flight();
        match in_flight.keys().next() {
            Some(&lowest) => lowest - 1,
            None => self.next_seq.load(Ordering::SeqCst) - 1,
        }
    }

    fn write_confirmed(&self, sync: bool, clean: bool) {
        let confirmed = self.confirmed();
        let mut h = self.header();
        let mut header = h.header.clone();
        header.generation += 1;
        header.seq_confirmed = confirmed.max(header.seq_confirmed);
        header.clean = clean;
        match self.meta.write_header_now(&header, sync) {
            Ok(()) => h.header = header,
            Err(e) => {
                tracing::warn!(path = %self.meta.path().display(), error = %e, "cannot update the metadata header")
            }
        }
        h.confirmed_at = Instant::now();
    }

    fn trusted(&self, seq: u64) -> bool {
        if seq < self.seq_start {
            return !self.doubted.contains(seq);
        }
        // A seq of this process still in flight, seen by someone other than its writer
        // (who holds the block exclusively while it runs), is an abandoned write's.
        self.abandoned.load(Ordering::Relaxed) == 0 || !self.in_flight().contains_key(&seq)
    }

    /// Where the next record of a block goes, from its pair alone if possible.
    fn target(&self, pair: &PairView) -> Target {
        if pair.hole {
            return Target::Slot(0);
        }
        let slots = decode_pair(&pair.bytes);
        let newest = (0..2)
            .filter_map(|i| match slots[i] {
                Slot::Valid(r) => Some((i, r)),
                _ => None,
            })
            .max_by_key(|(_, r)| r.seq);
        match newest {
            None => Target::Slot(0),
            Some((i, r)) if self.trusted(r.seq) => Target::Slot(other(i)),
            Some(_) => Target::NeedData,
        }
    }

    /// The slot that describes `data`: the newest valid record that matches it, or else an
    /// empty slot standing for the zeroes the block held before its first record, when the
    /// only record there is one an earlier process may never have completed (a crash
    /// between the record of a block's first write and its data). `None` inside: that
    /// implicit zero record.
    fn describing(&self, slots: &[Slot; 2], index: u64, data: &[u8]) -> Option<(usize, Option<Record>)> {
        let newest = (0..2)
            .filter_map(|i| match slots[i] {
                Slot::Valid(r) if matches(&r, index, data) => Some((i, r)),
                _ => None,
            })
            .max_by_key(|(_, r)| r.seq);
        if let Some((i, r)) = newest {
            return Some((i, Some(r)));
        }
        let empty = slots.iter().position(|s| *s == Slot::Empty)?;
        let doubted = match slots[other(empty)] {
            Slot::Valid(r) => !self.trusted(r.seq),
            Slot::Empty => true,
            // A damaged record is evidence of damage, not of an unfinished first write.
            Slot::Damaged => false,
        };
        (doubted && is_zero(data)).then_some((empty, None))
    }

    /// Settles a doubted block by its data: the free slot is the one not describing it.
    fn target_by_data(&self, pair: &PairView, index: u64, data: &[u8]) -> usize {
        let slots = decode_pair(&pair.bytes);
        match self.describing(&slots, index, data) {
            Some((i, _)) => other(i),
            // Nothing matches: the block is damaged either way; overwrite the newest record
            // and keep the other as the only evidence there is.
            None => (0..2)
                .filter_map(|i| if let Slot::Valid(r) = slots[i] { Some((i, r.seq)) } else { None })
                .max_by_key(|&(_, seq)| seq)
                .map_or(0, |(i, _)| i),
        }
    }

    /// The state of block `index` from its pair and its stored bytes.
    fn evaluate(&self, pair: &PairView, index: u64, data: &[u8]) -> BlockState {
        if pair.hole {
            return BlockState::Zero { version: 0 };
        }
        let slots = decode_pair(&pair.bytes);
        match self.describing(&slots, index, data) {
            Some((_, Some(Record { content: Content::Sealed(seal), version, .. }))) => {
                BlockState::Sealed { seal, version }
            }
            Some((_, Some(Record { content: Content::Zero, version, .. }))) => BlockState::Zero { version },
            Some((_, None)) => BlockState::Zero { version: 0 },
            None if slots.iter().any(|s| matches!(s, Slot::Damaged))
                || slots.iter().all(|s| *s == Slot::Empty) =>
            {
                BlockState::Damaged(Damage::Metadata)
            }
            None => BlockState::Damaged(Damage::Checksum),
        }
    }

    /// The version a guard compares: the newest valid record's (data is not read: a block
    /// whose data rotted keeps its version, identically on every copy).
    fn guard_version(&self, pair: &PairView) -> Option<u64> {
        if pair.hole {
            return Some(0);
        }
        let slots = decode_pair(&pair.bytes);
        if slots.iter().all(|s| *s == Slot::Empty) {
            return Some(0);
        }
        slots
            .iter()
            .filter_map(|s| if let Slot::Valid(r) = s { Some(*r) } else { None })
            .max_by_key(|r| r.seq)
            .map(|r| r.version)
    }

    async fn read_data(&self, first: u64, count: u64) -> BackendResult<Bytes> {
        self.data.read(first * BLOCK, (count * BLOCK) as u32).await
    }

    /// Reads and checks blocks, with the range held shared.
    async fn read_checked(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        let n = u64::from(count);
        check_range(first.saturating_mul(BLOCK), n.saturating_mul(BLOCK), self.data.size_bytes())?;
        if count == 0 {
            return Ok(SealedBlocks { first, data: Bytes::new(), states: Vec::new() });
        }
        let _shared = self.locks.lock(first, first + n, false).await;
        let (data, pairs) = tokio::join!(self.read_data(first, n), self.meta.pairs(first, n));
        let (data, (pairs, _pinned)) = (data?, pairs?);
        let mut states = Vec::with_capacity(count as usize);
        let mut zero_fix: Vec<usize> = Vec::new();
        for (i, pair) in pairs.iter().enumerate() {
            let index = first + i as u64;
            let block = &data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
            let state = self.evaluate(pair, index, block);
            match state {
                BlockState::Damaged(d) => {
                    self.reporter.damaged(IntegrityEvent { kind: d.into(), block: index, copy: self.copy });
                    tracing::error!(path = %self.path().display(), copy = ?self.copy, block = index, offset = index * BLOCK, damage = d.label(), "stored block fails its check");
                }
                BlockState::Zero { .. } if pair.hole && !is_zero(block) => zero_fix.push(i),
                _ => {}
            }
            states.push(state);
        }
        let data = if zero_fix.is_empty() {
            data
        } else {
            // A metadata page punched by a trim whose data punch a crash cut short.
            let mut fixed = BytesMut::from(&data[..]);
            for i in zero_fix {
                fixed[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].fill(0);
            }
            fixed.freeze()
        };
        Ok(SealedBlocks { first, data, states })
    }

    /// Stores blocks `[first, first + contents.len())`: their records first, then `data`
    /// (sealed blocks) or the zeroing. Runs with the range held exclusively.
    async fn put(&self, put: Put<'_>) -> BackendResult<PutResult> {
        let count = put.contents.len() as u64;
        let (first, end) = (put.first, put.first + count);
        check_range(first.saturating_mul(BLOCK), count.saturating_mul(BLOCK), self.data.size_bytes())?;
        if count == 0 {
            return Ok(PutResult::Written(0));
        }
        let _exclusive = self.locks.lock(first, end, true).await;
        let (pairs, pinned) = self.meta.pairs(first, count).await?;
        // Blocks that need their data to be settled (or checked, for a repair).
        let need_data = put.only_damaged || pairs.iter().any(|p| matches!(self.target(p), Target::NeedData));
        let current = if need_data { Some(self.read_data(first, count).await?) } else { None };
        for g in put.guards {
            let i = (g.block - first) as usize;
            let version = match (&current, self.target(&pairs[i])) {
                // A doubted block's version is that of whichever record its data matches,
                // as the read that made the guard saw it.
                (Some(cur), Target::NeedData) => {
                    self.evaluate(&pairs[i], g.block, &cur[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]).version()
                }
                _ => self.guard_version(&pairs[i]),
            };
            if version != Some(g.version) {
                return Ok(PutResult::GuardFailed { block: g.block });
            }
        }
        let mut skip = vec![false; count as usize];
        if put.only_damaged {
            if let Some(cur) = &current {
                for (i, pair) in pairs.iter().enumerate() {
                    let block = &cur[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
                    skip[i] = !matches!(self.evaluate(pair, first + i as u64, block), BlockState::Damaged(_));
                }
            }
            if skip.iter().all(|&s| s) {
                return Ok(PutResult::Written(0));
            }
        }
        let seq = self.take_seq()?;
        let unfinished = Unfinished { store: self, seq };
        let result = self.put_locked(&put, &pairs, current.as_ref(), &skip, seq).await;
        drop(pinned);
        std::mem::forget(unfinished);
        self.finish_seq(seq);
        let written = skip.iter().filter(|&&s| !s).count() as u64;
        result.map(|()| PutResult::Written(written))
    }

    async fn put_locked(
        &self,
        put: &Put<'_>,
        pairs: &[PairView],
        current: Option<&Bytes>,
        skip: &[bool],
        seq: u64,
    ) -> BackendResult<()> {
        let first = put.first;
        let count = put.contents.len() as u64;
        let zeroing = matches!(put.payload, Payload::Zero { .. });
        let mut new_pairs: Vec<[u8; PAIR_BYTES]> = Vec::with_capacity(count as usize);
        for (i, pair) in pairs.iter().enumerate() {
            let index = first + i as u64;
            if skip[i] {
                new_pairs.push(if pair.hole { [0u8; PAIR_BYTES] } else { pair.bytes });
                continue;
            }
            let slot = match self.target(pair) {
                Target::Slot(s) => s,
                Target::NeedData => {
                    let data = current.map(|d| &d[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]).unwrap_or(&[]);
                    self.target_by_data(pair, index, data)
                }
            };
            let (content, version) = put.contents[i];
            let version = if put.own_version { seq } else { version };
            let record = Record { seq, version, content };
            let mut bytes = if pair.hole { [0u8; PAIR_BYTES] } else { pair.bytes };
            bytes[slot * RECORD_BYTES..(slot + 1) * RECORD_BYTES].copy_from_slice(&record.encode());
            new_pairs.push(bytes);
        }
        let mut records = Vec::new();
        // Records before data (runs of blocks not skipped).
        let mut run_start = None;
        for i in 0..=count {
            let inside = i < count && !skip[i as usize];
            match (inside, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    records.push(self.meta.update(first + s, &new_pairs[s as usize..i as usize]).await?);
                    run_start = None;
                }
                _ => {}
            }
        }
        // The records go straight to the page cache from this thread: a few hundred bytes
        // into pages the metadata cache read (so resident), done before the data write is
        // even submitted, which is all the ordering a process crash needs, without a trip
        // through the ring (a buffered write there is punted to a kernel worker thread).
        if let Err(e) = run_steps_now(records) {
            self.restore_pairs(first, pairs).await;
            return Err(BackendError::Io(e));
        }
        let mut steps = Vec::new();
        match &put.payload {
            Payload::Data(data) => {
                if skip.iter().any(|&s| s) {
                    for (i, &s) in skip.iter().enumerate() {
                        if !s {
                            let block = data.slice(i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES);
                            steps.push(self.data.write_step((first + i as u64) * BLOCK, block));
                        }
                    }
                } else {
                    steps.push(self.data.write_step(first * BLOCK, data.clone()));
                }
            }
            Payload::Zero { deallocate } => {
                steps.push(self.data.fallocate_step(*deallocate, first * BLOCK, count * BLOCK));
            }
        }
        match self.data.run_chain(steps).await {
            Ok(()) => Ok(()),
            Err(BackendError::Io(e)) if zeroing && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The file system cannot fallocate that way; the records are in place, so
                // writing zeroes completes the operation just the same.
                self.data.write_zeroes_by_writing(first * BLOCK, count * BLOCK).await
            }
            Err(e) => {
                self.restore_pairs(first, pairs).await;
                Err(e)
            }
        }
    }

    /// After a failed write the records may be on disk while the data is not: puts the old
    /// pairs back in the cache and the file, so no record claims data that never arrived.
    async fn restore_pairs(&self, first: u64, pairs: &[PairView]) {
        let old: Vec<[u8; PAIR_BYTES]> = pairs.iter().map(|p| p.bytes).collect();
        let restored = match self.meta.update(first, &old).await {
            Ok(step) => run_steps_now(vec![step]),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        if let Err(e) = restored {
            tracing::error!(path = %self.meta.path().display(), error = %e, "cannot restore metadata after a failed write");
        }
    }

    /// Gives every allocated block of the data file a record (an upgrade from a format
    /// without metadata).
    async fn import(&self) -> BackendResult<()> {
        let size = self.data.size_bytes();
        let mut offset = 0;
        let mut sealed = 0u64;
        while offset < size {
            let len = (size - offset).min(64 << 20);
            let extents = self.data.block_status(offset, len).await?;
            let mut at = offset;
            for e in extents {
                if e.kind == crate::backend::ExtentKind::Data {
                    let (a, b) = (at / BLOCK, (at + e.len_bytes).div_ceil(BLOCK));
                    let mut block = a;
                    while block < b {
                        let n = (b - block).min(256);
                        let data = self.read_data(block, n).await?;
                        let contents: Vec<(Content, u64)> = (0..n)
                            .map(|i| {
                                let d = &data[(i as usize) * BLOCK_BYTES..(i as usize + 1) * BLOCK_BYTES];
                                (Content::Sealed(crate::seal::Seal::plain(block + i, d)), IMPORTED_VERSION)
                            })
                            .collect();
                        let put = Put {
                            first: block,
                            contents: &contents,
                            own_version: false,
                            payload: Payload::Data(data),
                            guards: &[],
                            only_damaged: false,
                        };
                        self.put(put).await?;
                        sealed += n;
                        block += n;
                    }
                }
                at += e.len_bytes;
            }
            offset = at.max(offset + 1);
        }
        self.flush_all().await?;
        tracing::info!(path = %self.path().display(), blocks = sealed, "sealed the existing data");
        Ok(())
    }

    async fn flush_all(&self) -> BackendResult<()> {
        // Confirm first: the header then goes to disk with the records it vouches for.
        self.write_confirmed(false, false);
        let (d, m) = tokio::join!(self.data.flush(), self.meta.flush());
        d?;
        m
    }

    /// Flushes everything and marks the store clean (the next open trusts every record).
    /// Writes after this mark it unclean again.
    pub async fn close(&self) -> BackendResult<()> {
        let _all = self.locks.lock(0, u64::MAX, true).await;
        self.flush_all().await?;
        // An abandoned write's record may claim data that never arrived: the next process
        // must doubt it, so the store is not closed clean.
        let clean = self.abandoned.load(Ordering::Relaxed) == 0;
        self.write_confirmed(true, clean);
        Ok(())
    }

    fn mark_dirty(&self) {
        let clean = self.header().header.clean;
        if clean {
            self.write_confirmed(true, false);
        }
    }

    async fn client_put(&self, put: Put<'_>) -> BackendResult<WriteOutcome> {
        self.mark_dirty();
        self.put(put).await.map(WriteOutcome::from)
    }
}

/// A write between taking its seq and finishing it. Dropped there (its future cancelled),
/// its records may be on disk without its data, so its seq is left in flight: never
/// confirmed (the next process doubts it) and never trusted by this one.
struct Unfinished<'a> {
    store: &'a SealedFile,
    seq: u64,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        self.store.abandoned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %self.store.path().display(), seq = self.seq, "a write was cancelled between its metadata and its data; its blocks are settled by their data");
    }
}

/// What [`SealedFile::put`] stores.
struct Put<'a> {
    first: u64,
    /// Per block: what its record says, and under which version.
    contents: &'a [(Content, u64)],
    /// Every record's version is the write's own seq instead (a node alone).
    own_version: bool,
    payload: Payload,
    guards: &'a [crate::seal::Guard],
    /// Write only blocks that are damaged now (a repair).
    only_damaged: bool,
}

/// What [`SealedFile::put`] did.
enum PutResult {
    /// Stored this many blocks.
    Written(u64),
    /// A guard failed; nothing was stored.
    GuardFailed { block: u64 },
}

impl From<PutResult> for WriteOutcome {
    fn from(r: PutResult) -> WriteOutcome {
        match r {
            PutResult::Written(_) => WriteOutcome::Written,
            PutResult::GuardFailed { block } => WriteOutcome::GuardFailed { block },
        }
    }
}

enum Payload {
    Data(Bytes),
    Zero { deallocate: bool },
}

fn matches(r: &Record, index: u64, data: &[u8]) -> bool {
    match &r.content {
        Content::Sealed(seal) => data.len() == BLOCK_BYTES && seal.verifies(index, data),
        Content::Zero => is_zero(data),
    }
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

fn sealed_contents(write: &BlockWrite, version: u64) -> Vec<(Content, u64)> {
    write.seals.iter().map(|s| (Content::Sealed(*s), version)).collect()
}

impl SealedFile {
    /// Stores a sealed write; `version: None` gives it the write's own seq (a node alone).
    async fn write_versioned(&self, write: BlockWrite, version: Option<u64>) -> BackendResult<WriteOutcome> {
        // A copy checks what reached it through the log and the network; a node alone's
        // blocks were sealed a moment ago from these very bytes by its SealingBackend, and a
        // wrong seal could only make a read fail, never return wrong data.
        if version.is_some() {
            check_write(&write)?;
        } else if !write.is_well_formed() {
            return Err(BackendError::Corrupt {
                offset: write.first.saturating_mul(BLOCK),
                len: write.data.len() as u64,
                what: "a sealed write whose data and seals differ in size",
            });
        }
        let contents = sealed_contents(&write, version.unwrap_or(0));
        let put = Put {
            first: write.first,
            contents: &contents,
            own_version: version.is_none(),
            payload: Payload::Data(write.data.clone()),
            guards: &write.guards,
            only_damaged: false,
        };
        self.client_put(put).await
    }

    /// Zeroes blocks `[first, first + count)`: the metadata pages the range covers whole are
    /// punched, then their data (no per-block work, whatever the range's size); the blocks
    /// at either end get zero records under `version` (`None`: the write's own seq), like a
    /// write. Each part is crash-safe on its own (records or punch first, data second).
    async fn zero_versioned(
        &self,
        first: u64,
        count: u64,
        deallocate: bool,
        version: Option<u64>,
    ) -> BackendResult<()> {
        check_range(first.saturating_mul(BLOCK), count.saturating_mul(BLOCK), self.data.size_bytes())?;
        let end = first + count;
        let (a, b) = (first.div_ceil(PAGE_BLOCKS), end / PAGE_BLOCKS);
        if a >= b {
            return self.zero_records(first, count, deallocate, version).await;
        }
        self.zero_records(first, a * PAGE_BLOCKS - first, deallocate, version).await?;
        self.zero_pages(a, b, deallocate).await?;
        self.zero_records(b * PAGE_BLOCKS, end - b * PAGE_BLOCKS, deallocate, version).await
    }

    /// Zeroes a few blocks (less than a metadata page's worth) with zero records.
    async fn zero_records(
        &self,
        first: u64,
        count: u64,
        deallocate: bool,
        version: Option<u64>,
    ) -> BackendResult<()> {
        if count == 0 {
            return Ok(());
        }
        let contents = vec![(Content::Zero, version.unwrap_or(0)); count as usize];
        let put = Put {
            first,
            contents: &contents,
            own_version: version.is_none(),
            payload: Payload::Zero { deallocate },
            guards: &[],
            only_damaged: false,
        };
        self.client_put(put).await.map(|_| ())
    }

    /// Zeroes whole metadata pages `[first_page, end_page)` and their blocks: the pages are
    /// punched out of the metadata file first (their blocks read as zero from then on), then
    /// the data is punched or zeroed.
    async fn zero_pages(&self, first_page: u64, end_page: u64, deallocate: bool) -> BackendResult<()> {
        let (first, end) = (first_page * PAGE_BLOCKS, end_page * PAGE_BLOCKS);
        self.mark_dirty();
        let _exclusive = self.locks.lock(first, end, true).await;
        run_steps_now(vec![self.meta.punch(first_page, end_page).await?]).map_err(BackendError::Io)?;
        let steps = vec![self.data.fallocate_step(deallocate, first * BLOCK, (end - first) * BLOCK)];
        match self.data.run_chain(steps).await {
            Err(BackendError::Io(e)) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The metadata is punched: writing zeroes completes it just the same.
                self.data.write_zeroes_by_writing(first * BLOCK, (end - first) * BLOCK).await
            }
            other => other,
        }
    }
}

#[async_trait]
impl SealedStore for SealedFile {
    fn size_bytes(&self) -> u64 {
        self.data.size_bytes()
    }

    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        self.read_checked(first, count).await
    }

    async fn write_blocks(&self, write: BlockWrite) -> BackendResult<WriteOutcome> {
        self.write_versioned(write, None).await
    }

    async fn zero_blocks(&self, first: u64, count: u64, deallocate: bool) -> BackendResult<()> {
        self.zero_versioned(first, count, deallocate, None).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.data.block_status(offset, len).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.flush_all().await
    }
}

#[async_trait]
impl CopyStore for SealedFile {
    fn size_bytes(&self) -> u64 {
        self.data.size_bytes()
    }

    fn grow(&self, size_bytes: u64) -> BackendResult<()> {
        self.grow_to(size_bytes).map_err(|e| BackendError::Io(std::io::Error::other(e.to_string())))
    }

    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        self.read_checked(first, count).await
    }

    async fn apply_write(&self, write: BlockWrite, version: u64) -> BackendResult<WriteOutcome> {
        self.write_versioned(write, Some(version)).await
    }

    async fn apply_zero(&self, first: u64, count: u64, deallocate: bool, version: u64) -> BackendResult<()> {
        self.zero_versioned(first, count, deallocate, Some(version)).await
    }

    async fn restore(&self, image: BlockImage, only_damaged: bool) -> BackendResult<u64> {
        image.check()?;
        /// Runs of blocks stored the same way: sealed (one write), zero at version 0 (may
        /// lose their records in whole pages, as on any copy), zero at another version.
        #[derive(PartialEq)]
        enum Run {
            Sealed,
            ZeroUnversioned,
            ZeroVersioned,
        }
        let run_of = |s: &BlockState| match s {
            BlockState::Sealed { .. } => Run::Sealed,
            BlockState::Zero { version: 0 } | BlockState::Damaged(_) => Run::ZeroUnversioned,
            BlockState::Zero { .. } => Run::ZeroVersioned,
        };
        let mut written = 0;
        let mut at = 0usize;
        let mut i = 0usize;
        let n = image.states.len();
        while i < n {
            let run = run_of(&image.states[i]);
            let mut j = i;
            while j < n && run_of(&image.states[j]) == run {
                j += 1;
            }
            let contents: Vec<(Content, u64)> = image.states[i..j]
                .iter()
                .map(|s| match s {
                    BlockState::Sealed { seal, version } => (Content::Sealed(*seal), *version),
                    BlockState::Zero { version } => (Content::Zero, *version),
                    BlockState::Damaged(_) => (Content::Zero, 0),
                })
                .collect();
            let payload = if run == Run::Sealed {
                let len = (j - i) * BLOCK_BYTES;
                at += len;
                Payload::Data(image.data.slice(at - len..at))
            } else {
                Payload::Zero { deallocate: true }
            };
            let first = image.first + i as u64;
            if run == Run::ZeroUnversioned && !only_damaged {
                // As on the copy it came from: whole pages lose their records.
                self.zero_versioned(first, (j - i) as u64, true, Some(0)).await?;
                written += (j - i) as u64;
                i = j;
                continue;
            }
            self.mark_dirty();
            let put =
                Put { first, contents: &contents, own_version: false, payload, guards: &[], only_damaged };
            if let PutResult::Written(n) = self.put(put).await? {
                written += n;
            }
            i = j;
        }
        Ok(written)
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.data.block_status(offset, len).await
    }

    async fn flush(&self) -> BackendResult<()> {
        self.flush_all().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
