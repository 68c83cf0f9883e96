//! The metadata file of a [`super::SealedFile`] and its cache of pages.
//!
//! ```text
//! offset 0        header page: two 2048-byte header copies at 0 and 2048, written in turn
//!                 (a torn header write leaves the other copy)
//! offset 4096     pairs: block b's two records at 4096 + b × 128 (32 blocks per page)
//! ```
//!
//! The file is sparse: a page never written, or punched because the 32 blocks it describes
//! were all trimmed or zeroed, is a hole, and its blocks read as zero whatever the data
//! file holds there (a trim punches the metadata first, then the data).
//!
//! The cache keeps whole pages in memory, write-through: an update changes the cached
//! page, and the caller writes the changed pairs to the file (before the data, in one
//! engine chain). A page being updated is *pinned* (its `Arc` is held until the file write
//! completed), and only unpinned pages are evicted, so a page is only ever loaded from the
//! file when the file holds everything written to it.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use rustix::fs::SeekFrom;

use super::record::PAIR_BYTES;
use crate::backend::BackendResult;
use crate::store::engine::{ChainStep, FallocMode, IoEngine};
use crate::store::file::backend_error;

/// Bytes per metadata page.
pub const PAGE_BYTES: usize = 4096;
/// Blocks described by one metadata page.
pub const PAGE_BLOCKS: u64 = (PAGE_BYTES / PAIR_BYTES) as u64;
const PAIRS_AT: u64 = PAGE_BYTES as u64;
/// Bytes of one header copy.
pub const HEADER_BYTES: usize = 2048;
const HEADER_AT: [u64; 2] = [0, 2048];
const MAGIC: &[u8; 8] = b"RBLKMETA";
const FORMAT: u32 = 2;
/// Ranges of doubted seqs a header holds; more are merged (see [`Doubted::add`]).
pub const DOUBTED_RANGES_MAX: usize = 64;
/// Where the doubted ranges start in an encoded header.
const DOUBTED_AT: usize = 64;

const _: () = assert!(PAGE_BLOCKS == crate::seal::ZERO_GROUP_BLOCKS);
const _: () = assert!(DOUBTED_AT + DOUBTED_RANGES_MAX * 16 + 4 <= HEADER_BYTES);

/// The durable facts about a metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Bumped by every header write; the higher copy wins.
    pub generation: u64,
    /// No record was ever written with a seq at or above this.
    pub seq_reserved: u64,
    /// Every record of the process that wrote this header with a seq at or below this had
    /// its data written completely (records of earlier processes: see `doubted`).
    pub seq_confirmed: u64,
    /// The store was closed cleanly: every record's data is written and flushed.
    pub clean: bool,
    /// Seqs whose records crashed processes may not have completed (their data may never
    /// have been written). Every other seq below the writer's own is complete.
    pub doubted: Doubted,
}

/// Disjoint, sorted half-open ranges of seqs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Doubted(Vec<(u64, u64)>);

impl Doubted {
    /// Every seq in `[from, to)` doubted.
    pub fn all(from: u64, to: u64) -> Doubted {
        let mut d = Doubted::default();
        d.add(from, to);
        d
    }

    /// Whether `seq` is doubted.
    pub fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|&(_, end)| end <= seq);
        self.0.get(i).is_some_and(|&(start, _)| start <= seq)
    }

    /// Doubts `[from, to)` too. Past [`DOUBTED_RANGES_MAX`] ranges the two closest are
    /// merged, doubting the seqs between them as well: doubting a complete record only
    /// costs a read when its block is next written, while trusting an incomplete one could
    /// let that write overwrite the only record matching the data.
    pub fn add(&mut self, from: u64, to: u64) {
        if from >= to {
            return;
        }
        let (mut from, mut to) = (from, to);
        self.0.retain(|&(s, e)| {
            let touches = s <= to && from <= e;
            if touches {
                from = from.min(s);
                to = to.max(e);
            }
            !touches
        });
        let at = self.0.partition_point(|&(s, _)| s < from);
        self.0.insert(at, (from, to));
        while self.0.len() > DOUBTED_RANGES_MAX {
            let Some(i) = (0..self.0.len() - 1).min_by_key(|&i| self.0[i + 1].0 - self.0[i].1) else { break };
            self.0[i].1 = self.0[i + 1].1;
            self.0.remove(i + 1);
        }
    }

    /// The ranges, lowest first.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }
}

impl Header {
    /// The header a new metadata file starts from: nothing written, nothing doubted.
    pub fn new_volume() -> Header {
        Header { generation: 1, clean: true, ..Header::default() }
    }

    /// The header copy as it goes to disk.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT.to_le_bytes());
        b[12..16].copy_from_slice(&(crate::seal::BLOCK_BYTES as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq_reserved.to_le_bytes());
        b[32..40].copy_from_slice(&self.seq_confirmed.to_le_bytes());
        b[40] = u8::from(self.clean);
        let ranges = &self.doubted.0[..self.doubted.0.len().min(DOUBTED_RANGES_MAX)];
        b[41] = ranges.len() as u8;
        for (i, &(s, e)) in ranges.iter().enumerate() {
            let at = DOUBTED_AT + i * 16;
            b[at..at + 8].copy_from_slice(&s.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..HEADER_BYTES - 4]);
        b[HEADER_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A header copy as it lies on disk; `None` if it is not one, or damaged.
    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() != HEADER_BYTES {
            return None;
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(x)
        };
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&b[HEADER_BYTES - 4..]);
        if &b[..8] != MAGIC || crc32c::crc32c(&b[..HEADER_BYTES - 4]) != u32::from_le_bytes(crc) {
            return None;
        }
        let mut format = [0u8; 4];
        format.copy_from_slice(&b[8..12]);
        let count = usize::from(b[41]);
        if u32::from_le_bytes(format) != FORMAT || b[40] > 1 || count > DOUBTED_RANGES_MAX {
            return None;
        }
        let mut ranges = Vec::with_capacity(count);
        for i in 0..count {
            let (s, e) = (u64_at(DOUBTED_AT + i * 16), u64_at(DOUBTED_AT + i * 16 + 8));
            // Sorted, disjoint and non-empty, or not a header this code wrote.
            if s >= e || ranges.last().is_some_and(|&(_, prev_end)| prev_end >= s) {
                return None;
            }
            ranges.push((s, e));
        }
        Some(Header {
            generation: u64_at(16),
            seq_reserved: u64_at(24),
            seq_confirmed: u64_at(32),
            clean: b[40] == 1,
            doubted: Doubted(ranges),
        })
    }
}

/// Why a metadata file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The file could not be created, opened or read.
    #[error("metadata file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Neither header copy is valid.
    #[error("metadata file {}: both header copies are damaged", path.display())]
    Header { path: PathBuf },
}

/// One cached page.
#[derive(Debug)]
pub struct Page {
    bytes: Mutex<Box<[u8; PAGE_BYTES]>>,
    /// The page is a hole in the file (and was not written since it was loaded).
    hole: Mutex<bool>,
}

impl Page {
    fn bytes(&self) -> MutexGuard<'_, Box<[u8; PAGE_BYTES]>> {
        // Updates copy whole pairs in: a panic cannot leave one half written.
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn hole(&self) -> MutexGuard<'_, bool> {
        self.hole.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A block's two records as cached, and whether its page is a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairView {
    /// Both slots' bytes.
    pub bytes: [u8; PAIR_BYTES],
    /// The page describing the block is a hole: the block is zero.
    pub hole: bool,
}

#[derive(Debug, Default)]
struct Cache {
    pages: HashMap<u64, Arc<Page>>,
    order: VecDeque<u64>,
}

/// Pages held while their updates are written; dropping it unpins them.
#[derive(Debug, Default)]
pub struct Pinned(Vec<Arc<Page>>);

impl Pinned {
    /// Number of pages held.
    pub fn pages(&self) -> usize {
        self.0.len()
    }
}

/// See the [module documentation](self).
#[derive(Debug)]
pub struct MetaFile {
    file: Arc<File>,
    path: PathBuf,
    engine: IoEngine,
    cache: Mutex<Cache>,
    cache_pages_max: usize,
}

fn pair_offset(block: u64) -> u64 {
    PAIRS_AT + block * PAIR_BYTES as u64
}

fn page_offset(page: u64) -> u64 {
    PAIRS_AT + page * PAGE_BYTES as u64
}

impl MetaFile {
    /// Creates a new metadata file (fails if it exists) with a first header.
    pub fn create(path: &Path, engine: IoEngine, cache_pages_max: usize) -> Result<MetaFile, MetaError> {
        let io = |source| MetaError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path).map_err(io)?;
        let meta = MetaFile::with_file(path, file, engine, cache_pages_max);
        meta.write_header_now(&Header { generation: 1, ..Header::default() }, true).map_err(io)?;
        Ok(meta)
    }

    /// Opens an existing metadata file and reads its header.
    pub fn open(
        path: &Path,
        engine: IoEngine,
        cache_pages_max: usize,
    ) -> Result<(MetaFile, Header), MetaError> {
        let io = |source| MetaError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        let mut page = [0u8; PAGE_BYTES];
        read_full_at(&file, 0, &mut page).map_err(io)?;
        let header = HEADER_AT
            .iter()
            .filter_map(|&at| Header::decode(&page[at as usize..at as usize + HEADER_BYTES]))
            .max_by_key(|h| h.generation)
            .ok_or_else(|| MetaError::Header { path: path.to_owned() })?;
        Ok((MetaFile::with_file(path, file, engine, cache_pages_max), header))
    }

    /// Opens a metadata file whose header is unreadable (to rebuild the header).
    pub fn open_without_header(
        path: &Path,
        engine: IoEngine,
        cache_pages_max: usize,
    ) -> Result<(MetaFile, ()), MetaError> {
        let io = |source| MetaError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        Ok((MetaFile::with_file(path, file, engine, cache_pages_max), ()))
    }

    fn with_file(path: &Path, file: File, engine: IoEngine, cache_pages_max: usize) -> MetaFile {
        MetaFile {
            file: Arc::new(file),
            path: path.to_owned(),
            engine,
            cache: Mutex::new(Cache::default()),
            cache_pages_max: cache_pages_max.max(16),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the file occupies on disk.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Writes the header (into the copy its generation selects), synchronously: headers
    /// change rarely (reservations, flushes, open and close).
    pub fn write_header_now(&self, header: &Header, sync: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let at = HEADER_AT[(header.generation % 2) as usize];
        self.file.write_all_at(&header.encode(), at)?;
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Scans every record for the highest seq (when both header copies are lost).
    pub fn highest_seq(&self) -> io::Result<u64> {
        let len = self.file.metadata()?.len();
        let mut highest = 0;
        let mut page = [0u8; PAGE_BYTES];
        let mut at = PAIRS_AT;
        while at < len {
            read_full_at(&self.file, at, &mut page)?;
            for pair in page.chunks(PAIR_BYTES) {
                for slot in super::record::decode_pair(pair) {
                    if let super::record::Slot::Valid(r) = slot {
                        highest = highest.max(r.seq);
                    }
                }
            }
            at += PAGE_BYTES as u64;
        }
        Ok(highest)
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Every update is one insert or remove plus the order queue; a panic cannot leave
        // a page half inserted in a way that matters (a missing order entry only delays
        // its eviction).
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached page `page`, loaded from the file if needed.
    async fn page(&self, page: u64) -> BackendResult<Arc<Page>> {
        if let Some(p) = self.cache().pages.get(&page) {
            return Ok(p.clone());
        }
        let offset = page_offset(page);
        let loaded = self.engine.read_at(&self.file, offset, PAGE_BYTES).await.map_err(backend_error)?;
        let hole = loaded.iter().all(|&b| b == 0) && self.is_hole(offset)?;
        let mut bytes = Box::new([0u8; PAGE_BYTES]);
        bytes.copy_from_slice(&loaded);
        let fresh = Arc::new(Page { bytes: Mutex::new(bytes), hole: Mutex::new(hole) });
        let mut cache = self.cache();
        if let Some(p) = cache.pages.get(&page) {
            // Loaded by someone else meanwhile (and maybe updated since): theirs wins.
            return Ok(p.clone());
        }
        self.evict(&mut cache);
        cache.pages.insert(page, fresh.clone());
        cache.order.push_back(page);
        Ok(fresh)
    }

    /// Drops unpinned pages (oldest first) until there is room for one more.
    fn evict(&self, cache: &mut Cache) {
        let mut looked = 0;
        while cache.pages.len() >= self.cache_pages_max && looked < cache.order.len() {
            let Some(candidate) = cache.order.pop_front() else { break };
            match cache.pages.get(&candidate) {
                Some(p) if Arc::strong_count(p) > 1 => {
                    cache.order.push_back(candidate);
                    looked += 1;
                }
                Some(_) => {
                    cache.pages.remove(&candidate);
                }
                None => {}
            }
        }
    }

    fn is_hole(&self, offset: u64) -> BackendResult<bool> {
        match rustix::fs::seek(&*self.file, SeekFrom::Data(offset)) {
            Ok(data) => Ok(data >= offset + PAGE_BYTES as u64),
            Err(rustix::io::Errno::NXIO) => Ok(true),
            Err(e) => Err(crate::BackendError::Io(e.into())),
        }
    }

    /// The pairs of blocks `[first, first + count)`, and the pages pinned while the caller
    /// holds them (for an update that must not race an eviction).
    pub async fn pairs(&self, first: u64, count: u64) -> BackendResult<(Vec<PairView>, Pinned)> {
        let mut out = Vec::with_capacity(count as usize);
        let mut pinned = Vec::new();
        let end = first + count;
        let mut block = first;
        while block < end {
            let page_no = block / PAGE_BLOCKS;
            let page = self.page(page_no).await?;
            let page_end = ((page_no + 1) * PAGE_BLOCKS).min(end);
            {
                let hole = *page.hole();
                let bytes = page.bytes();
                for b in block..page_end {
                    let at = ((b % PAGE_BLOCKS) as usize) * PAIR_BYTES;
                    let mut pair = [0u8; PAIR_BYTES];
                    pair.copy_from_slice(&bytes[at..at + PAIR_BYTES]);
                    out.push(PairView { bytes: pair, hole });
                }
            }
            pinned.push(page);
            block = page_end;
        }
        Ok((out, Pinned(pinned)))
    }

    /// Puts new pairs for blocks `[first, first + pairs.len())` into the cache (the pages
    /// must be pinned by the caller) and returns the step that writes them to the file.
    pub async fn update(&self, first: u64, pairs: &[[u8; PAIR_BYTES]]) -> BackendResult<ChainStep> {
        let mut contiguous = Vec::with_capacity(pairs.len() * PAIR_BYTES);
        for (i, pair) in pairs.iter().enumerate() {
            let block = first + i as u64;
            let page = self.page(block / PAGE_BLOCKS).await?;
            let at = ((block % PAGE_BLOCKS) as usize) * PAIR_BYTES;
            page.bytes()[at..at + PAIR_BYTES].copy_from_slice(pair);
            *page.hole() = false;
            contiguous.extend_from_slice(pair);
        }
        Ok(ChainStep::Write {
            file: self.file.clone(),
            offset: pair_offset(first),
            data: Bytes::from(contiguous),
        })
    }

    /// Empties the cached pages `[first_page, end_page)` and returns the step that punches
    /// them out of the file: their blocks read as zero from then on.
    pub async fn punch(&self, first_page: u64, end_page: u64) -> BackendResult<ChainStep> {
        // The cached pages in the range (a trim may span far more pages than are cached).
        let cached: Vec<Arc<Page>> = self
            .cache()
            .pages
            .iter()
            .filter(|(n, _)| (first_page..end_page).contains(*n))
            .map(|(_, p)| p.clone())
            .collect();
        for page in cached {
            page.bytes().fill(0);
            *page.hole() = true;
        }
        Ok(ChainStep::Fallocate {
            file: self.file.clone(),
            mode: FallocMode::PunchHole,
            offset: page_offset(first_page),
            len: (end_page - first_page) * PAGE_BYTES as u64,
        })
    }

    /// Makes the file durable.
    pub async fn flush(&self) -> BackendResult<()> {
        self.engine.fdatasync(&self.file).await.map_err(backend_error)
    }
}

fn read_full_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_the_newer_valid_copy_wins() {
        let h = Header {
            generation: 7,
            seq_reserved: 100,
            seq_confirmed: 50,
            clean: true,
            doubted: Doubted(vec![(3, 9), (20, 40)]),
        };
        assert_eq!(Header::decode(&h.encode()), Some(h.clone()));
        let mut bad = h.encode();
        bad[30] ^= 1;
        assert_eq!(Header::decode(&bad), None);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
        let meta = MetaFile::create(&path, engine.clone(), 16).unwrap();
        meta.write_header_now(&Header { generation: 2, seq_reserved: 9, ..h.clone() }, false).unwrap();
        meta.write_header_now(&Header { generation: 3, seq_reserved: 11, ..h.clone() }, false).unwrap();
        let (_, got) = MetaFile::open(&path, engine.clone(), 16).unwrap();
        assert_eq!(got.seq_reserved, 11);
        // Tear the newer copy: the older one is used.
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[0xff; 8], 2048 + 20)
            .unwrap();
        let (_, got) = MetaFile::open(&path, engine, 16).unwrap();
        assert_eq!(got.seq_reserved, 9);
    }

    #[test]
    fn doubted_ranges_merge_and_stay_bounded_without_forgetting_a_seq() {
        let mut d = Doubted::default();
        d.add(10, 20);
        d.add(30, 40);
        d.add(20, 25); // touches the first
        assert_eq!(d.ranges(), &[(10, 25), (30, 40)]);
        assert!(d.contains(10) && d.contains(24) && !d.contains(25) && d.contains(39) && !d.contains(40));
        assert!(!d.contains(9) && !d.contains(0) && !d.contains(u64::MAX));
        d.add(5, 5);
        assert_eq!(d.ranges().len(), 2, "an empty range adds nothing");
        // Many crashes: ranges merge (closest first) but every seq ever added stays doubted.
        let mut added = Vec::new();
        for i in 0..500u64 {
            let from = 1000 + i * 1000 + (i * 37) % 300;
            d.add(from, from + 50);
            added.push(from);
            assert!(d.ranges().len() <= DOUBTED_RANGES_MAX);
            assert!(d.ranges().windows(2).all(|w| w[0].1 < w[1].0), "sorted and disjoint: {:?}", d);
        }
        for from in added {
            assert!(d.contains(from) && d.contains(from + 49), "{from}");
        }
        assert!(d.contains(10) && d.contains(35));
        let h = Header { doubted: d, ..Header::default() };
        assert_eq!(Header::decode(&h.encode()), Some(h), "a full list round trips");
    }
}
