//! The per-node write-ahead log shared by every Raft group on the node.
//!
//! # Contract
//!
//! * [`Wal::append`] takes a batch of records from any number of groups, checks it, writes it
//!   and updates the in-memory index. Nothing is durable yet.
//! * [`Wal::sync`] makes everything appended so far durable with one `fdatasync` (group
//!   commit). **Every record appended before a successful `sync()` survives any later crash.**
//! * [`Wal::begin_sync`] and [`Wal::finish_sync`] are the same sync in two halves, for a
//!   node that goes on appending while another thread runs the `fdatasync`: what was
//!   appended before `begin_sync` is durable once `finish_sync` returns `Ok`.
//! * Records that were not synced may be lost in a crash, but only from the end: what survives
//!   is always a prefix of the append order. So a hard state appended after the entries it
//!   commits is never recovered without them.
//! * [`Wal::open`] syncs what it recovered before returning, so whatever a reopened WAL
//!   serves is durable. It then starts a new segment (so every open adds one).
//! * After any I/O error the WAL is poisoned: every later call fails with
//!   [`WalError::Poisoned`], and the caller reopens it (after an `fsync` failure the kernel may
//!   have dropped the dirty pages, so retrying the sync would lie).
//!
//! # Per-group rules (checked by `append`, all or nothing per batch)
//!
//! * A group's log is contiguous: it holds entries `first_index..next_index`. A new entry must
//!   have an index in `first_index..=next_index`. An index below `next_index` replaces the old
//!   suffix from that index on (Raft dropping an uncommitted suffix after a conflict).
//! * `CompactTo(n)` says entries below `n` are applied and may be dropped; marks only move
//!   forward. A mark past the end empties the log, and the next entry must then have index
//!   `n` (the shape of installing a snapshot at `n - 1`).
//! * A new group's first entry has index 1 (or, after a compaction mark, the mark).
//! * `GroupMeta` replaces the group's opaque metadata. With `reset_to: Some(n)` it also drops
//!   every entry and moves the mark to `n` (which must not be below the current start), so the
//!   next entry must have index `n`: installing a snapshot at `n - 1`, in one record.
//!
//! # Segments and compaction
//!
//! Records go to the active segment; once it reaches [`WalOptions::segment_target_bytes`] it
//! is synced and closed, and a new one starts with a *checkpoint*: the hard state and
//! compaction mark and metadata of every group, copied forward. Hence the records in any segment, replayed
//! after the checkpoint at the start of some later segment, add nothing that segment's
//! checkpoint does not already say, except the entries.
//!
//! Deletion rule: after each successful sync, every closed segment older than the oldest
//! segment still holding a retained entry of any group when the sync began is deleted,
//! oldest first. Why that
//! is safe:
//! * Entries: a group's retained entries were written in index order (rewriting an index
//!   drops everything after it), so its oldest retained entry is in its oldest needed
//!   segment, and no retained entry is in a deleted one.
//! * Hard states and marks: the active segment was always started by this process (`open`
//!   starts a new one after recovery), so its checkpoint is complete, and it was just synced
//!   (or, if it was closed since the sync began, synced when it closed).
//!   It is kept and comes after every deleted segment, so it supersedes their metadata.
//!   (Checkpoints of older kept segments may be incomplete, cut by a crash; replay passes
//!   through them and the active segment's checkpoint restores what they lack.)
//!
//! On replay, entries of a group may start above its recovered mark (their predecessors were
//! in deleted segments, and a later mark or checkpoint drops them again); replay marks are
//! never above the true ones, so such an entry is not below its mark. Replay accepts a gap by
//! restarting the group's log at that entry, and checks at the end that every group's log
//! starts exactly at its mark. A group that stops advancing its mark keeps every segment from
//! its oldest entry on alive, which is why the node runner compacts an idle group's whole log
//! (see `node::runner`); removing groups (deleted volumes) needs a record kind of its own.
//!
//! # Memory
//!
//! The index keeps, per entry, its term and location (about 32 bytes); entry data is read
//! back from the segment files by [`Wal::entries`] and checked again against its CRC.
//!
//! # Disks
//!
//! The WAL writes through a [`disk::WalDisk`]: on a node, io_uring ([`disk::UringDisk`]:
//! appends are buffered and each sync is one submission of the writes linked to the
//! `fdatasync`) or plain `pwrite`/`fdatasync` ([`disk::StdDisk`]), chosen at start
//! ([`disk::NodeDisk`]); in tests and the simulator, [`disk::SimDisk`].

pub mod disk;
pub mod record;
pub mod segment;
pub mod uring;

use std::collections::{BTreeMap, HashMap, VecDeque};

use self::disk::{DiskError, WalDisk, WalFile};
use self::record::{
    EncodeError, Entry, GroupId, GroupMeta, HardState, LogIndex, Payload, Record, Term, HEADER_BYTES,
    PAYLOAD_BYTES_MAX,
};
use self::segment::{
    RecordLoc, Segment, SegmentError, SegmentId, Truncation, FREE_SUFFIX, SEGMENT_TARGET_BYTES_DEFAULT,
};
use crate::gather::Gather;

/// Encoded bytes buffered by one `append` before they are written out.
const WRITE_BUFFER_BYTES_MAX: usize = 1 << 20;

/// Tuning of a [`Wal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// Size at which the active segment is closed and a new one started. A segment may end up
    /// larger by one record. Should be far larger than a checkpoint (about 60 bytes a group).
    pub segment_target_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { segment_target_bytes: SEGMENT_TARGET_BYTES_DEFAULT }
    }
}

/// Errors of the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// reading or writing a segment failed
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// a record cannot be encoded
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// an entry would leave a hole in (or reach below the start of) its group's log
    #[error("group {group}: entry index {index} rejected, the next entry must be in {lo}..={hi}")]
    OutOfOrder { group: GroupId, index: LogIndex, lo: LogIndex, hi: LogIndex },
    /// a log reset would move the start of the log backwards
    #[error("group {group}: reset to {index} rejected, the log starts at {first}")]
    ResetBelowStart { group: GroupId, index: LogIndex, first: LogIndex },
    /// the requested entries are below the compaction point
    #[error("group {group}: entry {lo} is compacted (the log starts at {first})")]
    Compacted { group: GroupId, lo: LogIndex, first: LogIndex },
    /// the requested entries are past the end of the log
    #[error("group {group}: entries up to (not including) {hi} requested, the log ends before {next}")]
    Unavailable { group: GroupId, hi: LogIndex, next: LogIndex },
    /// `lo > hi`
    #[error("group {group}: empty-or-reversed range {lo}..{hi}")]
    BadRange { group: GroupId, lo: LogIndex, hi: LogIndex },
    /// an earlier write or sync failed; reopen the WAL
    #[error("the WAL failed an earlier write or sync and must be reopened")]
    Poisoned,
    /// the log on disk does not replay to a consistent state (a bug, or damage the CRCs missed)
    #[error("recovered log is inconsistent: {0}")]
    Inconsistent(String),
}

/// What [`Wal::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments left after recovery.
    pub segments: u64,
    /// Valid records replayed.
    pub records: u64,
    /// What was cut from the end of the log, if anything.
    pub truncation: Option<Truncation>,
}

#[derive(Debug, Clone, Copy)]
struct EntryMeta {
    term: Term,
    loc: RecordLoc,
}

/// One group's part of the index.
#[derive(Debug)]
struct GroupIndex {
    /// Index of `entries[0]`; when `entries` is empty, the index the next entry must have.
    first: LogIndex,
    entries: VecDeque<EntryMeta>,
    compacted_below: LogIndex,
    hard_state: Option<HardState>,
    meta: Option<bytes::Bytes>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Validated by `append`: rules hold exactly.
    Append,
    /// Replaying segments whose older predecessors may have been deleted.
    Replay,
}

impl GroupIndex {
    fn new() -> GroupIndex {
        GroupIndex {
            first: LogIndex(1),
            entries: VecDeque::new(),
            compacted_below: LogIndex(0),
            hard_state: None,
            meta: None,
        }
    }

    fn next_index(&self) -> LogIndex {
        LogIndex(self.first.0 + self.entries.len() as u64)
    }

    /// Position of `index` in `entries`, if present.
    fn position(&self, index: LogIndex) -> Option<usize> {
        let pos = usize::try_from(index.0.checked_sub(self.first.0)?).ok()?;
        (pos < self.entries.len()).then_some(pos)
    }

    /// Where the log must start given the mark.
    fn start(&self) -> LogIndex {
        LogIndex(self.compacted_below.0.max(1))
    }

    fn apply_entry(&mut self, index: LogIndex, meta: EntryMeta, mode: Mode) -> Result<(), ()> {
        let next = self.next_index();
        if index >= self.first && index <= next {
            self.entries.truncate((index.0 - self.first.0) as usize);
        } else if mode == Mode::Replay && index >= self.start() {
            self.entries.clear();
            self.first = index;
        } else {
            return Err(());
        }
        self.entries.push_back(meta);
        Ok(())
    }

    /// Drops every entry; the next one must have index `to` (see `validate`).
    fn apply_reset(&mut self, to: LogIndex) {
        self.entries.clear();
        self.compacted_below = self.compacted_below.max(to);
        self.first = self.compacted_below.max(LogIndex(1));
    }

    fn apply_compact(&mut self, mark: LogIndex) {
        if mark <= self.compacted_below {
            return;
        }
        self.compacted_below = mark;
        if mark <= self.first {
            return;
        }
        if mark >= self.next_index() {
            self.entries.clear();
        } else {
            self.entries.drain(..(mark.0 - self.first.0) as usize);
        }
        self.first = mark;
    }
}

fn apply_record(
    groups: &mut BTreeMap<GroupId, GroupIndex>,
    record: &Record,
    loc: RecordLoc,
    mode: Mode,
) -> Result<(), WalError> {
    let g = groups.entry(record.group).or_insert_with(GroupIndex::new);
    match &record.payload {
        Payload::Entry(e) => {
            let meta = EntryMeta { term: e.term, loc };
            let (lo, hi) = (g.first, g.next_index());
            g.apply_entry(e.index, meta, mode).map_err(|()| match mode {
                Mode::Append => WalError::OutOfOrder { group: record.group, index: e.index, lo, hi },
                Mode::Replay => WalError::Inconsistent(format!(
                    "group {}: entry {} at {loc:?} is below the compaction mark {}",
                    record.group, e.index, g.compacted_below
                )),
            })?;
        }
        Payload::HardState(hs) => g.hard_state = Some(*hs),
        Payload::CompactTo(mark) => g.apply_compact(*mark),
        Payload::GroupMeta(GroupMeta { reset_to, data }) => {
            if let Some(to) = reset_to {
                g.apply_reset(*to);
            }
            g.meta = Some(data.clone());
        }
    }
    Ok(())
}

/// The write-ahead log. See the module docs for the contract.
#[derive(Debug)]
pub struct Wal<D: WalDisk> {
    disk: D,
    options: WalOptions,
    /// Closed segments: synced, never written again.
    closed: BTreeMap<SegmentId, Segment<D::File>>,
    active: Segment<D::File>,
    /// Length of the active segment's header and checkpoint; it is not rotated before it
    /// holds more than that.
    active_base_bytes: u64,
    groups: BTreeMap<GroupId, GroupIndex>,
    /// Appends (and rotations) so far, counted; `synced` is the count the last successful
    /// sync covered. Counts, not a flag, because a sync begun on another thread
    /// ([`Wal::begin_sync`]) covers only what came before it.
    appended: u64,
    synced: u64,
    poisoned: bool,
    recovery: RecoveryReport,
    /// Files of deleted segments kept for the next segments to reuse (see `disk`'s docs: an
    /// `fdatasync` of overwritten blocks costs half that of appended ones).
    free: Vec<String>,
}

/// What makes a [`Wal::begin_sync`] durable on disk `D`: its files' [`WalFile::Sync`].
pub type FileSyncOf<D> = <<D as WalDisk>::File as WalFile>::Sync;

/// What a sync begun with [`Wal::begin_sync`] covers: the appends counted before it, and the
/// oldest segment anything needed then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncMark {
    appended: u64,
    keep_from: SegmentId,
}

/// Most deleted segment files kept for reuse.
const FREE_SEGMENTS_MAX: usize = 4;

impl<D: WalDisk> Drop for Wal<D> {
    fn drop(&mut self) {
        if !self.poisoned {
            if let Err(e) = self.active.cut() {
                tracing::warn!(error = %e, "wal: cutting the active segment's old bytes on close failed");
            }
        }
    }
}

/// Starts segment `id` in a free file if one is kept, else in a new file.
fn new_segment<D: WalDisk>(
    disk: &D,
    free: &mut Vec<String>,
    id: SegmentId,
) -> Result<Segment<D::File>, SegmentError> {
    match free.pop() {
        Some(name) => Segment::reuse(disk, &name, id),
        None => Segment::create(disk, id),
    }
}

impl<D: WalDisk> Wal<D> {
    /// Opens the WAL on `disk`, recovering (and cutting the torn tail of) whatever is there,
    /// or starts an empty one.
    pub fn open(disk: D, options: WalOptions) -> Result<Wal<D>, WalError> {
        let mut groups = BTreeMap::new();
        let mut records = 0u64;
        let recovered = segment::recover(&disk, |record, loc| {
            records += 1;
            apply_record(&mut groups, &record, loc, Mode::Replay)
        })?;
        for (id, g) in &groups {
            if g.first != g.start() {
                return Err(WalError::Inconsistent(format!(
                    "group {id}: log starts at {} but its compaction mark is {}",
                    g.first, g.compacted_below
                )));
            }
        }

        let mut closed: BTreeMap<SegmentId, Segment<D::File>> =
            recovered.segments.into_iter().map(|s| (s.id(), s)).collect();
        let mut free: Vec<String> = disk
            .list()
            .map_err(SegmentError::from)?
            .into_iter()
            .filter(|n| n.ends_with(FREE_SUFFIX))
            .collect();
        free.sort();
        let (active, recovered_any) = match closed.pop_last() {
            Some((_, s)) => (s, true),
            None => (new_segment(&disk, &mut free, SegmentId(1))?, false),
        };
        let report =
            RecoveryReport { segments: closed.len() as u64 + 1, records, truncation: recovered.truncation };
        tracing::debug!(?report, groups = groups.len(), "wal: opened");
        let mut wal = Wal {
            disk,
            options,
            closed,
            active_base_bytes: active.len_bytes(),
            active,
            groups,
            appended: 0,
            synced: 0,
            poisoned: false,
            recovery: report,
            free,
        };
        if recovered_any {
            // Two reasons to start a new segment now:
            // * the recovered tail may never have been synced (the process died, the machine
            //   did not); rotating syncs it before anyone acts on what was read back;
            // * a crash may have cut the checkpoint at the start of the newest segment, even
            //   at a record boundary, where nothing shows it. The new segment's checkpoint is
            //   complete, so the active segment's checkpoint always is (see the module docs).
            wal.rotate()?;
        }
        Ok(wal)
    }

    /// What recovery found when this WAL was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    fn check_usable(&self) -> Result<(), WalError> {
        if self.poisoned {
            Err(WalError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Checks a batch against the per-group rules as if applied in order; writes nothing.
    fn validate(&self, records: &[Record]) -> Result<(), WalError> {
        // Per touched group: (first, next) as the batch would leave them.
        let mut bounds: HashMap<GroupId, (LogIndex, LogIndex)> = HashMap::new();
        for r in records {
            if r.encoded_len() > HEADER_BYTES + PAYLOAD_BYTES_MAX {
                return Err(EncodeError::TooLarge { payload_bytes: r.encoded_len() - HEADER_BYTES }.into());
            }
            let (first, next) = bounds.entry(r.group).or_insert_with(|| {
                self.groups.get(&r.group).map_or((LogIndex(1), LogIndex(1)), |g| (g.first, g.next_index()))
            });
            match &r.payload {
                Payload::Entry(e) => {
                    if e.index < *first || e.index > *next {
                        return Err(WalError::OutOfOrder {
                            group: r.group,
                            index: e.index,
                            lo: *first,
                            hi: *next,
                        });
                    }
                    *next = e.index.next();
                }
                Payload::CompactTo(mark) => {
                    if *mark > *first {
                        *first = *mark;
                        *next = (*next).max(*mark);
                    }
                }
                Payload::GroupMeta(GroupMeta { reset_to: Some(to), .. }) => {
                    if *to < *first {
                        return Err(WalError::ResetBelowStart { group: r.group, index: *to, first: *first });
                    }
                    *first = *to;
                    *next = *to;
                }
                Payload::HardState(_) | Payload::GroupMeta(GroupMeta { reset_to: None, .. }) => {}
            }
        }
        Ok(())
    }

    /// Appends a batch of records (from any groups) and updates the index. Checks the whole
    /// batch first: if any record breaks the rules, nothing is written. Not durable until
    /// [`Wal::sync`].
    pub fn append(&mut self, records: &[Record]) -> Result<(), WalError> {
        self.check_usable()?;
        self.validate(records)?;
        let result = self.write_batch(records);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn write_batch(&mut self, records: &[Record]) -> Result<(), WalError> {
        let mut buf = Gather::default();
        for r in records {
            let len_bytes = r.encoded_len() as u64;
            let segment_bytes = self.active.len_bytes() + buf.len() as u64;
            if segment_bytes + len_bytes > self.options.segment_target_bytes
                && segment_bytes > self.active_base_bytes
            {
                self.active.append_parts(buf.take_parts())?;
                self.rotate()?;
            } else if buf.len() >= WRITE_BUFFER_BYTES_MAX {
                self.active.append_parts(buf.take_parts())?;
            }
            let loc = RecordLoc {
                segment: self.active.id(),
                offset: self.active.len_bytes() + buf.len() as u64,
                // validate() bounded it by HEADER_BYTES + PAYLOAD_BYTES_MAX.
                len_bytes: len_bytes as u32,
            };
            r.encode_gathered(&mut buf, self.active.salt())?;
            apply_record(&mut self.groups, r, loc, Mode::Append)?;
            self.appended += 1;
        }
        if !buf.is_empty() {
            self.active.append_parts(buf.into_parts())?;
        }
        Ok(())
    }

    /// Closes the active segment (synced, so only the newest segment can ever be torn) and
    /// starts the next one with a checkpoint of every group's hard state and mark.
    fn rotate(&mut self) -> Result<(), WalError> {
        self.active.close()?;
        let mut next = new_segment(&self.disk, &mut self.free, self.active.id().next())?;
        let salt = next.salt();
        let mut checkpoint = Vec::new();
        for (&group, g) in &self.groups {
            if let Some(hs) = g.hard_state {
                Record::hard_state(group, hs).encode_salted(&mut checkpoint, salt)?;
            }
            if g.compacted_below > LogIndex(0) {
                Record::compact_to(group, g.compacted_below).encode_salted(&mut checkpoint, salt)?;
            }
            if let Some(meta) = &g.meta {
                Record::group_meta(group, None, meta.clone()).encode_salted(&mut checkpoint, salt)?;
            }
        }
        next.append(&checkpoint)?;
        // The checkpoint must be synced before `synced_to` relies on it.
        self.appended += 1;
        self.active_base_bytes = next.len_bytes();
        let old = std::mem::replace(&mut self.active, next);
        tracing::debug!(closed = %old.id(), active = %self.active.id(), checkpoint_bytes = checkpoint.len(), "wal: rotated");
        self.closed.insert(old.id(), old);
        Ok(())
    }

    /// Hands every record appended so far to the kernel, without waiting for the disk: a
    /// crash of the process keeps them, a power loss may take a suffix of the log (see
    /// `GroupConfig::write_back`). [`Wal::sync`] still owes the disk them.
    pub fn write_out(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        let result = self.active.write_out().map_err(WalError::from);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// Makes every record appended so far durable, then deletes segments nothing needs any
    /// more.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.check_usable()?;
        let mark = self.sync_mark();
        let result = self.sync_and_purge(mark);
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    fn sync_and_purge(&mut self, mark: SyncMark) -> Result<(), WalError> {
        if self.synced < mark.appended {
            self.active.sync()?;
        }
        self.synced_to(mark)
    }

    /// A sync in two halves, for a node that goes on appending while the disk syncs: hands
    /// every record appended so far to the kernel and returns what makes them durable (to
    /// run on another thread: [`FileSync::sync`]; `None` if they already are) with the mark
    /// to give [`Wal::finish_sync`] once it has. Records appended meanwhile are not covered.
    pub fn begin_sync(&mut self) -> Result<(Option<FileSyncOf<D>>, SyncMark), WalError> {
        self.check_usable()?;
        let mark = self.sync_mark();
        if self.synced == mark.appended {
            return Ok((None, mark));
        }
        match self.active.begin_sync() {
            Ok(sync) => Ok((Some(sync), mark)),
            Err(e) => {
                self.poisoned = true;
                Err(e.into())
            }
        }
    }

    /// The second half of [`Wal::begin_sync`], with what its sync returned: everything
    /// appended before the mark is durable, and segments nothing needed then are deleted.
    pub fn finish_sync(&mut self, mark: SyncMark, result: Result<(), DiskError>) -> Result<(), WalError> {
        self.check_usable()?;
        let result =
            result.map_err(|e| WalError::from(SegmentError::from(e))).and_then(|()| self.synced_to(mark));
        if result.is_err() {
            self.poisoned = true;
        }
        result
    }

    /// What a sync begun now covers, and the oldest segment still needed now.
    fn sync_mark(&self) -> SyncMark {
        let keep_from = self
            .groups
            .values()
            .filter_map(|g| g.entries.front().map(|e| e.loc.segment))
            .min()
            .unwrap_or(self.active.id())
            .min(self.active.id());
        SyncMark { appended: self.appended, keep_from }
    }

    /// Records that a sync covering `mark` succeeded, and deletes the segments before the
    /// mark's oldest needed one. That is safe once the sync is done: the segment active at the
    /// mark, whose checkpoint supersedes the deleted segments' metadata, is durable (closed
    /// segments were synced, the active one was just), and so is every compaction mark that
    /// let those segments go.
    fn synced_to(&mut self, mark: SyncMark) -> Result<(), WalError> {
        self.synced = self.synced.max(mark.appended);
        while let Some(oldest) = self.closed.first_entry() {
            if *oldest.key() >= mark.keep_from {
                break;
            }
            let id = *oldest.key();
            drop(oldest.remove());
            if self.free.len() < FREE_SEGMENTS_MAX {
                let name = format!("{:020}{FREE_SUFFIX}", id.0);
                self.disk.rename(&id.file_name(), &name).map_err(SegmentError::from)?;
                self.free.push(name);
                tracing::debug!(segment = %id, "wal: compacted segment kept for reuse");
            } else {
                self.disk.remove(&id.file_name()).map_err(SegmentError::from)?;
                tracing::debug!(segment = %id, "wal: deleted compacted segment");
            }
        }
        Ok(())
    }

    fn segment(&self, id: SegmentId) -> Option<&Segment<D::File>> {
        if id == self.active.id() {
            Some(&self.active)
        } else {
            self.closed.get(&id)
        }
    }

    /// Entries `lo..hi` of `group`, read back from the segments.
    pub fn entries(&self, group: GroupId, lo: LogIndex, hi: LogIndex) -> Result<Vec<Entry>, WalError> {
        self.check_usable()?;
        if lo > hi {
            return Err(WalError::BadRange { group, lo, hi });
        }
        let Some(g) = self.groups.get(&group) else {
            return if lo == hi {
                Ok(Vec::new())
            } else {
                Err(WalError::Unavailable { group, hi, next: LogIndex(1) })
            };
        };
        if lo < g.first {
            return Err(WalError::Compacted { group, lo, first: g.first });
        }
        if hi > g.next_index() {
            return Err(WalError::Unavailable { group, hi, next: g.next_index() });
        }
        let mut out = Vec::with_capacity((hi.0 - lo.0) as usize);
        for i in lo.0..hi.0 {
            let index = LogIndex(i);
            let meta = g
                .position(index)
                .and_then(|p| g.entries.get(p))
                .ok_or_else(|| WalError::Inconsistent(format!("group {group}: no entry {index}")))?;
            let segment = self.segment(meta.loc.segment).ok_or_else(|| {
                WalError::Inconsistent(format!(
                    "group {group}: entry {index} is in segment {}, which is gone",
                    meta.loc.segment
                ))
            })?;
            match segment.read_record(meta.loc)? {
                Record { group: g2, payload: Payload::Entry(e) }
                    if g2 == group && e.index == index && e.term == meta.term =>
                {
                    out.push(e)
                }
                other => {
                    return Err(WalError::Inconsistent(format!(
                        "group {group}: entry {index} at {:?} reads back as {other:?}",
                        meta.loc
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The latest hard state of `group`.
    pub fn hard_state(&self, group: GroupId) -> Option<HardState> {
        self.groups.get(&group).and_then(|g| g.hard_state)
    }

    /// Index of the first retained entry, `None` if the group holds no entries.
    pub fn first_index(&self, group: GroupId) -> Option<LogIndex> {
        let g = self.groups.get(&group)?;
        (!g.entries.is_empty()).then_some(g.first)
    }

    /// Index of the last entry, `None` if the group holds no entries.
    pub fn last_index(&self, group: GroupId) -> Option<LogIndex> {
        let g = self.groups.get(&group)?;
        (!g.entries.is_empty()).then(|| LogIndex(g.next_index().0 - 1))
    }

    /// The index the group's next new entry gets (one past the last entry, or the compaction
    /// mark, or 1). A Raft storage reports `next_index - 1` as its last index.
    pub fn next_index(&self, group: GroupId) -> LogIndex {
        self.groups.get(&group).map_or(LogIndex(1), GroupIndex::next_index)
    }

    /// The group's latest metadata (see [`Payload::GroupMeta`]).
    pub fn group_meta(&self, group: GroupId) -> Option<&bytes::Bytes> {
        self.groups.get(&group).and_then(|g| g.meta.as_ref())
    }

    /// The group's compaction mark: entries below it are gone (0 if never compacted).
    pub fn compacted_below(&self, group: GroupId) -> LogIndex {
        self.groups.get(&group).map_or(LogIndex(0), |g| g.compacted_below)
    }

    /// The lowest index in `lo..hi` such that the retained entries from it up to (not
    /// including) `hi` take at most `keep_bytes` of records; `hi` if even entry `hi - 1` is
    /// larger, `lo` if all of them fit (or are not retained). From memory.
    pub fn index_keeping_bytes(
        &self,
        group: GroupId,
        lo: LogIndex,
        hi: LogIndex,
        keep_bytes: u64,
    ) -> LogIndex {
        let Some(g) = self.groups.get(&group) else { return lo };
        let mut kept = 0u64;
        let mut i = hi.0;
        while i > lo.0 {
            let Some(meta) = g.position(LogIndex(i - 1)).and_then(|p| g.entries.get(p)) else { break };
            kept += u64::from(meta.loc.len_bytes);
            if kept > keep_bytes {
                break;
            }
            i -= 1;
        }
        LogIndex(i)
    }

    /// Term of a retained entry, from memory.
    pub fn term(&self, group: GroupId, index: LogIndex) -> Option<Term> {
        let g = self.groups.get(&group)?;
        g.entries.get(g.position(index)?).map(|m| m.term)
    }

    /// Every group the WAL knows anything about, in id order.
    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    /// Ids of the segments on disk, oldest first (the last is the active one).
    pub fn segment_ids(&self) -> Vec<SegmentId> {
        self.closed.keys().copied().chain(std::iter::once(self.active.id())).collect()
    }

    /// Whether an earlier failure has made this WAL unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::disk::SimDisk;
    use super::record::NodeId;
    use super::*;

    const G: GroupId = GroupId(1);

    fn entry(i: u64, t: u64) -> Record {
        Record::entry(G, LogIndex(i), Term(t), Bytes::from(format!("e{i}t{t}")))
    }

    fn open(disk: &SimDisk, target: u64) -> Wal<SimDisk> {
        Wal::open(disk.clone(), WalOptions { segment_target_bytes: target }).expect("open")
    }

    fn terms(wal: &Wal<SimDisk>, g: GroupId) -> Vec<(u64, u64)> {
        let (Some(lo), Some(hi)) = (wal.first_index(g), wal.last_index(g)) else {
            return Vec::new();
        };
        wal.entries(g, lo, hi.next()).expect("entries").iter().map(|e| (e.index.0, e.term.0)).collect()
    }

    #[test]
    fn rejects_holes_and_entries_below_the_start_and_writes_nothing() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 1 << 20);
        let err = wal.append(&[entry(2, 1)]).expect_err("hole");
        assert!(matches!(err, WalError::OutOfOrder { lo: LogIndex(1), hi: LogIndex(1), .. }));
        let err = wal.append(&[entry(0, 1)]).expect_err("index 0");
        assert!(matches!(err, WalError::OutOfOrder { .. }));
        // The bad record comes last: the good ones before it are not written either.
        let err = wal.append(&[entry(1, 1), entry(2, 1), entry(4, 1)]).expect_err("hole in batch");
        assert!(matches!(
            err,
            WalError::OutOfOrder { index: LogIndex(4), lo: LogIndex(1), hi: LogIndex(3), .. }
        ));
        assert_eq!(wal.last_index(G), None);
        assert!(!wal.is_poisoned());

        wal.append(&[entry(1, 1), entry(2, 1), Record::compact_to(G, LogIndex(2))]).expect("append");
        let err = wal.append(&[entry(1, 2)]).expect_err("below mark");
        assert!(matches!(err, WalError::OutOfOrder { lo: LogIndex(2), .. }));
    }

    #[test]
    fn conflicting_append_replaces_the_suffix_in_memory_and_after_reopen() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 1 << 20);
        wal.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>()).expect("append");
        wal.append(&[entry(3, 2), entry(4, 2)]).expect("overwrite");
        wal.sync().expect("sync");
        let expect = vec![(1, 1), (2, 1), (3, 2), (4, 2)];
        assert_eq!(terms(&wal, G), expect);
        assert_eq!(wal.term(G, LogIndex(5)), None);
        drop(wal);
        let wal = open(&disk, 1 << 20);
        assert_eq!(terms(&wal, G), expect);
        assert_eq!(
            wal.entries(G, LogIndex(3), LogIndex(4)).expect("entries")[0].data,
            Bytes::from_static(b"e3t2")
        );
    }

    #[test]
    fn range_errors() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 1 << 20);
        wal.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).expect("append");
        wal.append(&[Record::compact_to(G, LogIndex(2))]).expect("compact");
        assert!(matches!(
            wal.entries(G, LogIndex(1), LogIndex(3)),
            Err(WalError::Compacted { first: LogIndex(2), .. })
        ));
        assert!(matches!(
            wal.entries(G, LogIndex(2), LogIndex(5)),
            Err(WalError::Unavailable { next: LogIndex(4), .. })
        ));
        assert!(matches!(wal.entries(G, LogIndex(3), LogIndex(2)), Err(WalError::BadRange { .. })));
        assert_eq!(wal.entries(G, LogIndex(4), LogIndex(4)).expect("empty").len(), 0);
        assert_eq!(wal.entries(GroupId(9), LogIndex(1), LogIndex(1)).expect("empty").len(), 0);
    }

    #[test]
    fn compaction_past_the_end_empties_the_log_and_sets_the_next_index() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 1 << 20);
        wal.append(&[entry(1, 1), entry(2, 1)]).expect("append");
        wal.append(&[Record::compact_to(G, LogIndex(10))]).expect("snapshot-like mark");
        assert_eq!(wal.first_index(G), None);
        assert_eq!(wal.next_index(G), LogIndex(10));
        assert!(wal.append(&[entry(3, 1)]).is_err());
        wal.append(&[entry(10, 2)]).expect("entry at the mark");
        wal.sync().expect("sync");
        let wal = open(&disk, 1 << 20);
        assert_eq!(terms(&wal, G), vec![(10, 2)]);
        assert_eq!(wal.compacted_below(G), LogIndex(10));
    }

    #[test]
    fn failed_sync_poisons_until_reopen() {
        let disk = SimDisk::new(3);
        let mut wal = open(&disk, 1 << 20);
        wal.append(&[entry(1, 1)]).expect("append");
        wal.sync().expect("sync");
        wal.append(&[entry(2, 1)]).expect("append");
        disk.fail_next_sync();
        assert!(wal.sync().is_err());
        assert!(wal.is_poisoned());
        assert!(matches!(wal.append(&[entry(3, 1)]), Err(WalError::Poisoned)));
        assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
        assert!(matches!(wal.entries(G, LogIndex(1), LogIndex(2)), Err(WalError::Poisoned)));
        drop(wal);
        disk.crash();
        let wal = open(&disk, 1 << 20);
        assert!(matches!(terms(&wal, G).as_slice(), [(1, 1)] | [(1, 1), (2, 1)]));
    }

    #[test]
    fn failed_append_poisons() {
        let disk = SimDisk::new(3);
        let mut wal = open(&disk, 1 << 20);
        disk.fail_next_append();
        assert!(wal.append(&[entry(1, 1)]).is_err());
        assert!(matches!(wal.sync(), Err(WalError::Poisoned)));
    }

    #[test]
    fn segments_rotate_with_a_checkpoint_and_compaction_deletes_them() {
        let disk = SimDisk::new(0);
        let other = GroupId(2);
        let mut wal = open(&disk, 400);
        let hs = HardState { term: Term(3), vote: NodeId(2), commit: LogIndex(1) };
        // The other group writes its hard state and one entry, then compacts it away.
        wal.append(&[
            Record::hard_state(other, hs),
            Record::entry(other, LogIndex(1), Term(1), Bytes::from_static(b"x")),
            Record::compact_to(other, LogIndex(2)),
        ])
        .expect("append");
        for i in 1..=60 {
            wal.append(&[entry(i, 1)]).expect("append");
        }
        wal.sync().expect("sync");
        let before = wal.segment_ids();
        assert!(before.len() > 5, "{before:?}");
        wal.append(&[Record::compact_to(G, LogIndex(55))]).expect("compact");
        wal.sync().expect("sync");
        let after = wal.segment_ids();
        assert!(after.len() <= 3, "{after:?}");
        let names = disk.list().expect("list");
        assert_eq!(names.iter().filter(|n| n.ends_with(".wal")).count(), after.len());
        let free = names.iter().filter(|n| n.ends_with(FREE_SUFFIX)).count();
        assert!((1..=FREE_SEGMENTS_MAX).contains(&free), "deleted segments are kept for reuse: {names:?}");
        assert_eq!(wal.first_index(G), Some(LogIndex(55)));

        drop(wal);
        let wal = open(&disk, 400);
        // Opening starts one new segment after the recovered ones.
        let reopened = wal.segment_ids();
        assert_eq!(reopened[..after.len()], after[..]);
        assert_eq!(reopened.len(), after.len() + 1);
        assert_eq!(wal.hard_state(other), Some(hs));
        assert_eq!(wal.compacted_below(other), LogIndex(2));
        assert_eq!(wal.next_index(other), LogIndex(2));
        assert_eq!(terms(&wal, G), (55..=60).map(|i| (i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn group_meta_reset_drops_the_log_atomically_and_survives_rotation_and_reopen() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 300);
        wal.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>()).expect("append");
        wal.append(&[Record::group_meta(G, None, Bytes::from_static(b"m1"))]).expect("meta");
        assert_eq!(terms(&wal, G).len(), 5);
        assert_eq!(wal.group_meta(G), Some(&Bytes::from_static(b"m1")));
        // A reset below the start is refused and writes nothing.
        wal.append(&[Record::compact_to(G, LogIndex(3))]).expect("compact");
        let err = wal.append(&[Record::group_meta(G, Some(LogIndex(2)), Bytes::new())]).expect_err("below");
        assert!(matches!(err, WalError::ResetBelowStart { index: LogIndex(2), first: LogIndex(3), .. }));
        // A reset inside the log drops the entries above it too (a snapshot replaces the log).
        wal.append(&[Record::group_meta(G, Some(LogIndex(4)), Bytes::from_static(b"m2")), entry(4, 3)])
            .expect("reset");
        assert_eq!(terms(&wal, G), vec![(4, 3)]);
        assert_eq!(wal.compacted_below(G), LogIndex(4));
        // Past the end, entries continue from the reset index.
        wal.append(&[Record::group_meta(G, Some(LogIndex(20)), Bytes::from_static(b"m3"))]).expect("reset");
        assert_eq!(wal.next_index(G), LogIndex(20));
        assert!(wal.append(&[entry(5, 3)]).is_err());
        for i in 20..40 {
            wal.append(&[entry(i, 4)]).expect("append");
        }
        wal.sync().expect("sync");
        assert!(wal.segment_ids().len() > 2);
        drop(wal);
        let wal = open(&disk, 300);
        assert_eq!(terms(&wal, G), (20..40).map(|i| (i, 4)).collect::<Vec<_>>());
        assert_eq!(wal.group_meta(G), Some(&Bytes::from_static(b"m3")));
        assert_eq!(wal.compacted_below(G), LogIndex(20));
    }

    #[test]
    fn group_meta_survives_when_its_segment_is_deleted() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 300);
        wal.append(&[Record::group_meta(G, None, Bytes::from_static(b"conf"))]).expect("meta");
        for i in 1..=40 {
            wal.append(&[entry(i, 1)]).expect("append");
        }
        wal.append(&[Record::compact_to(G, LogIndex(41))]).expect("compact");
        wal.sync().expect("sync");
        assert!(wal.segment_ids()[0] > SegmentId(1));
        drop(wal);
        let wal = open(&disk, 300);
        assert_eq!(wal.group_meta(G), Some(&Bytes::from_static(b"conf")));
    }

    #[test]
    fn a_group_that_does_not_compact_keeps_segments_alive() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 300);
        wal.append(&[Record::entry(GroupId(2), LogIndex(1), Term(1), Bytes::new())]).expect("append");
        for i in 1..=40 {
            wal.append(&[entry(i, 1)]).expect("append");
        }
        wal.append(&[Record::compact_to(G, LogIndex(41))]).expect("compact");
        wal.sync().expect("sync");
        assert_eq!(wal.segment_ids()[0], SegmentId(1));
    }

    #[test]
    fn a_sync_in_two_halves_covers_what_came_before_it_and_purges_as_of_then() {
        use super::disk::FileSync;
        for seed in 0..32 {
            let disk = SimDisk::new(seed);
            let mut wal = open(&disk, 300);
            for i in 1..=40 {
                wal.append(&[entry(i, 1)]).expect("append");
            }
            wal.sync().expect("sync");
            let before = wal.segment_ids();
            // Compacted before the sync begins: its segments may go once it is done.
            wal.append(&[Record::compact_to(G, LogIndex(35))]).expect("compact");
            let (sync, mark) = wal.begin_sync().expect("begin");
            // Appended while the sync runs: not covered, and the compaction past them must
            // not delete anything when the sync (which does not cover it) finishes.
            for i in 41..=60 {
                wal.append(&[entry(i, 1)]).expect("append");
            }
            wal.append(&[Record::compact_to(G, LogIndex(58))]).expect("compact");
            sync.expect("something to sync").sync().expect("sync");
            wal.finish_sync(mark, Ok(())).expect("finish");
            let after = wal.segment_ids();
            assert!(after.len() < before.len() + 2, "{before:?} {after:?}");
            let (again, _) = wal.begin_sync().expect("begin");
            assert!(again.is_some(), "appends after the mark are still unsynced");
            drop(again);
            disk.crash();
            drop(wal);
            let wal = open(&disk, 300);
            // Everything before the mark survives and what follows is a prefix: the log starts
            // at the first mark, or at the second if that survived. Had the finished sync
            // deleted the segments the second mark let go, a crash that lost that mark would
            // leave a log that does not start at its mark (`open` refuses it) or lacks 35..40.
            let t = terms(&wal, G);
            let first = t.first().map(|&(i, _)| i);
            assert!(first == Some(35) || first == Some(58), "seed {seed}: {t:?}");
            assert!(t.last().is_some_and(|&(i, _)| i >= 40), "seed {seed}: {t:?}");
            assert!(t.windows(2).all(|w| w[1].0 == w[0].0 + 1), "seed {seed}: {t:?}");
        }
    }

    #[test]
    fn a_failed_sync_half_poisons() {
        let disk = SimDisk::new(0);
        let mut wal = open(&disk, 1 << 20);
        wal.append(&[entry(1, 1)]).expect("append");
        let (_, mark) = wal.begin_sync().expect("begin");
        let err = DiskError::Injected { op: "sync", name: "x".into() };
        assert!(wal.finish_sync(mark, Err(err)).is_err());
        assert!(wal.is_poisoned());
        assert!(matches!(wal.append(&[entry(2, 1)]), Err(WalError::Poisoned)));
    }
}
