//! [`raft::Storage`] for one Raft group on top of the node's shared [`Wal`].
//!
//! Every group of a node writes into the same WAL (so one `fdatasync` covers them all); a
//! [`GroupStorage`] is one group's view of it. Besides entries and the hard state, which the
//! WAL keeps natively, a group needs its membership ([`ConfState`]) and the index and term of
//! the entry just below its log (after a compaction or a snapshot install). Both travel in the
//! WAL's opaque per-group [`Payload::GroupMeta`](crate::wal::record::Payload::GroupMeta)
//! record, encoded by [`encode_meta`]; a restarted node reads them back in [`GroupStorage::open`].
//!
//! Writes (`append`, `set_hard_state`, `compact`, ...) go to the WAL but are **not durable**
//! until the caller syncs the WAL. That is the point: the node runner collects the writes of
//! many groups, syncs once, and only then tells each group (see [`crate::volume::group`]).
//!
//! Entry data in the WAL is `[entry_type u8][context_len u32][context][data]` (little-endian);
//! index and term are the WAL record's own fields.

// The protobuf structs of raft-rs carry hidden fields, so they are built by assignment (as
// raft-proto itself does).
#![allow(clippy::field_reassign_with_default)]

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};

use crate::wal::disk::WalDisk;
use crate::wal::record::{self, GroupId, LogIndex, NodeId, Record, Term};
use crate::wal::{Wal, WalError};

/// Version byte at the start of the encoded group metadata (1: without `conf_index`).
const META_VERSION: u8 = 2;

/// Bytes of an entry's data header: type and context length.
const ENTRY_HEADER_BYTES: usize = 5;

/// Errors of the Raft storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// the WAL refused or failed an operation
    #[error(transparent)]
    Wal(#[from] WalError),
    /// the group metadata in the WAL cannot be decoded
    #[error("group {group}: metadata record is malformed: {reason}")]
    BadMeta { group: GroupId, reason: &'static str },
    /// an entry's data in the WAL cannot be decoded
    #[error("group {group}: entry {index} is malformed")]
    BadEntry { group: GroupId, index: u64 },
    /// a thread panicked while holding the WAL lock
    #[error("the WAL lock is poisoned")]
    LockPoisoned,
    /// the group is already initialized with a membership
    #[error("group {group} is already initialized")]
    AlreadyInitialized { group: GroupId },
    /// a compaction past the last entry or the commit index, or below nothing to keep
    #[error("group {group}: cannot compact to {to} (log {first}..={last}, committed {commit})")]
    BadCompaction { group: GroupId, to: u64, first: u64, last: u64, commit: u64 },
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> raft::Error {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

/// What a group keeps in its [`Payload::GroupMeta`](crate::wal::record::Payload::GroupMeta)
/// record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupMetaState {
    /// Membership of the group.
    pub conf_state: ConfState,
    /// Index of the entry just below the log (0 when nothing was ever compacted).
    pub snapshot_index: u64,
    /// Term of that entry.
    pub snapshot_term: u64,
    /// Index of the entry that produced `conf_state` (or of the snapshot that carried it).
    pub conf_index: u64,
}

fn put_list(out: &mut BytesMut, ids: &[u64]) {
    out.put_u32_le(ids.len() as u32);
    for id in ids {
        out.put_u64_le(*id);
    }
}

/// Encodes group metadata: version u8, snapshot index u64, snapshot term u64, conf index u64,
/// auto_leave u8, then voters, learners, voters_outgoing, learners_next, each as count u32 +
/// ids u64. (Version 1 had no conf index.)
pub fn encode_meta(meta: &GroupMetaState) -> Bytes {
    let cs = &meta.conf_state;
    let mut out = BytesMut::with_capacity(
        26 + 16
            + 8 * (cs.voters.len() + cs.learners.len() + cs.voters_outgoing.len() + cs.learners_next.len()),
    );
    out.put_u8(META_VERSION);
    out.put_u64_le(meta.snapshot_index);
    out.put_u64_le(meta.snapshot_term);
    out.put_u64_le(meta.conf_index);
    out.put_u8(u8::from(cs.auto_leave));
    put_list(&mut out, &cs.voters);
    put_list(&mut out, &cs.learners);
    put_list(&mut out, &cs.voters_outgoing);
    put_list(&mut out, &cs.learners_next);
    out.freeze()
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
    }
    fn list(&mut self) -> Option<Vec<u64>> {
        let n = self.u32()? as usize;
        if n > self.0.len() / 8 {
            return None;
        }
        (0..n).map(|_| self.u64()).collect()
    }
}

/// Decodes what [`encode_meta`] wrote.
pub fn decode_meta(group: GroupId, data: &[u8]) -> Result<GroupMetaState, StorageError> {
    let bad = |reason| StorageError::BadMeta { group, reason };
    let mut r = Reader(data);
    let version = r.u8().ok_or(bad("empty"))?;
    if version != 1 && version != META_VERSION {
        return Err(bad("unknown version"));
    }
    let short = || bad("truncated");
    let snapshot_index = r.u64().ok_or_else(short)?;
    let snapshot_term = r.u64().ok_or_else(short)?;
    let conf_index = if version == 1 { snapshot_index } else { r.u64().ok_or_else(short)? };
    let auto_leave = match r.u8().ok_or_else(short)? {
        0 => false,
        1 => true,
        _ => return Err(bad("auto_leave is not a bool")),
    };
    let mut conf_state = ConfState::default();
    conf_state.voters = r.list().ok_or_else(short)?;
    conf_state.learners = r.list().ok_or_else(short)?;
    conf_state.voters_outgoing = r.list().ok_or_else(short)?;
    conf_state.learners_next = r.list().ok_or_else(short)?;
    conf_state.auto_leave = auto_leave;
    if !r.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(GroupMetaState { conf_state, snapshot_index, snapshot_term, conf_index })
}

fn entry_type_code(t: EntryType) -> u8 {
    match t {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

/// A Raft entry as a WAL record: its type and context in the record's head, its data (shared,
/// not copied) after them.
pub fn entry_record(group: GroupId, e: &Entry) -> Record {
    let mut head = BytesMut::with_capacity(ENTRY_HEADER_BYTES + e.context.len());
    head.put_u8(entry_type_code(e.get_entry_type()));
    head.put_u32_le(e.context.len() as u32);
    head.put_slice(&e.context);
    Record::entry_with_head(group, LogIndex(e.index), Term(e.term), head.freeze(), e.data.clone())
}

/// Rebuilds a Raft entry from a WAL entry.
pub fn decode_entry(group: GroupId, e: record::Entry) -> Result<Entry, StorageError> {
    let bad = || StorageError::BadEntry { group, index: e.index.0 };
    let mut r = Reader(&e.data);
    let entry_type = match r.u8().ok_or_else(bad)? {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => return Err(bad()),
    };
    let context_len = r.u32().ok_or_else(bad)? as usize;
    if context_len > r.0.len() {
        return Err(bad());
    }
    let mut out = Entry::default();
    out.set_entry_type(entry_type);
    out.index = e.index.0;
    out.term = e.term.0;
    out.context = e.data.slice(ENTRY_HEADER_BYTES..ENTRY_HEADER_BYTES + context_len);
    out.data = e.data.slice(ENTRY_HEADER_BYTES + context_len..);
    Ok(out)
}

fn to_wal_hard_state(hs: &HardState) -> record::HardState {
    record::HardState { term: Term(hs.term), vote: NodeId(hs.vote), commit: LogIndex(hs.commit) }
}

/// One group's Raft storage over the node's shared WAL. Not durable until the WAL is synced
/// (see the module docs).
pub struct GroupStorage<D: WalDisk> {
    wal: Arc<Mutex<Wal<D>>>,
    group: GroupId,
    meta: GroupMetaState,
    hard_state: HardState,
    /// The most recently appended entries, consecutive, at most [`RECENT_ENTRIES_BYTES_MAX`]:
    /// raft-rs reads fresh entries right after appending them (to send them to followers and
    /// to apply them), and serving those from memory saves a WAL read, a crc check and a
    /// decode per entry. Rebuilt empty on open; the WAL stays the only source of truth.
    recent: std::collections::VecDeque<Entry>,
    recent_bytes: u64,
    /// Highest index handed to the state machine; what [`raft::Storage::snapshot`] offers.
    snapshot_point: u64,
}

/// Most payload bytes of recent entries kept in memory per group.
pub const RECENT_ENTRIES_BYTES_MAX: u64 = 64 << 20;

impl<D: WalDisk> std::fmt::Debug for GroupStorage<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStorage")
            .field("group", &self.group)
            .field("meta", &self.meta)
            .field("hard_state", &self.hard_state)
            .finish_non_exhaustive()
    }
}

fn lock<D: WalDisk>(wal: &Mutex<Wal<D>>) -> Result<MutexGuard<'_, Wal<D>>, StorageError> {
    wal.lock().map_err(|_| StorageError::LockPoisoned)
}

impl<D: WalDisk> GroupStorage<D> {
    /// The storage of `group` as the WAL has it (empty and uninitialized for a new group).
    pub fn open(wal: Arc<Mutex<Wal<D>>>, group: GroupId) -> Result<GroupStorage<D>, StorageError> {
        let (meta, hard_state) = {
            let w = lock(&wal)?;
            let meta = match w.group_meta(group) {
                Some(data) => decode_meta(group, data)?,
                None => GroupMetaState::default(),
            };
            let mut hs = HardState::default();
            if let Some(h) = w.hard_state(group) {
                hs.term = h.term.0;
                hs.vote = h.vote.0;
                hs.commit = h.commit.0;
            }
            // A snapshot install appends its metadata, then the hard state that commits it;
            // a crash before the sync can keep the first record and lose the second. Only a
            // committed snapshot is ever sent, so its index is committed, and a term the
            // durable hard state does not reach was never voted in here.
            if meta.snapshot_index > hs.commit {
                hs.commit = meta.snapshot_index;
            }
            if meta.snapshot_term > hs.term {
                hs.term = meta.snapshot_term;
                hs.vote = 0;
            }
            (meta, hs)
        };
        Ok(GroupStorage {
            wal,
            group,
            meta,
            hard_state,
            recent: std::collections::VecDeque::new(),
            recent_bytes: 0,
            snapshot_point: 0,
        })
    }

    /// The group this storage belongs to.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The shared WAL.
    pub fn wal(&self) -> &Arc<Mutex<Wal<D>>> {
        &self.wal
    }

    /// The group's membership and snapshot point as last written.
    pub fn meta(&self) -> &GroupMetaState {
        &self.meta
    }

    /// The hard state as last written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Whether the group has a membership (was bootstrapped, or installed a snapshot).
    pub fn is_initialized(&self) -> bool {
        self.meta.conf_state != ConfState::default()
    }

    fn write_meta(&mut self, meta: GroupMetaState, reset_to: Option<LogIndex>) -> Result<(), StorageError> {
        let record = Record::group_meta(self.group, reset_to, encode_meta(&meta));
        lock(&self.wal)?.append(&[record])?;
        self.meta = meta;
        Ok(())
    }

    /// Gives a new group its first membership, the same on every node (like raft-rs's
    /// `MemStorage::new_with_conf_state`): the log starts empty at index 0, term 0.
    pub fn initialize(&mut self, conf_state: ConfState) -> Result<(), StorageError> {
        if self.is_initialized() {
            return Err(StorageError::AlreadyInitialized { group: self.group });
        }
        let meta = GroupMetaState { conf_state, ..self.meta.clone() };
        self.write_meta(meta, None)
    }

    /// Records a new membership, produced by the entry at `index`.
    pub fn set_conf_state(&mut self, conf_state: ConfState, index: u64) -> Result<(), StorageError> {
        let meta = GroupMetaState { conf_state, conf_index: index, ..self.meta.clone() };
        self.write_meta(meta, None)
    }

    /// Appends entries; an entry at or below the last index replaces the suffix from there.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = entries.iter().map(|e| entry_record(self.group, e)).collect();
        lock(&self.wal)?.append(&records)?;
        self.remember(entries);
        Ok(())
    }

    /// Adds appended entries to the in-memory tail, replacing a conflicting suffix.
    fn remember(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else { return };
        while self.recent.back().is_some_and(|e| e.index >= first) {
            if let Some(e) = self.recent.pop_back() {
                self.recent_bytes -= e.data.len() as u64;
            }
        }
        if self.recent.back().is_some_and(|e| e.index + 1 != first) {
            self.forget_recent();
        }
        for e in entries {
            self.recent_bytes += e.data.len() as u64;
            self.recent.push_back(e.clone());
        }
        while self.recent_bytes > RECENT_ENTRIES_BYTES_MAX {
            match self.recent.pop_front() {
                Some(e) => self.recent_bytes -= e.data.len() as u64,
                None => break,
            }
        }
    }

    fn forget_recent(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
    }

    /// Records the hard state.
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        lock(&self.wal)?.append(&[Record::hard_state(self.group, to_wal_hard_state(hs))])?;
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Records a new commit index (a `LightReady` carries only that).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Drops entries below `to`; the caller must have applied them. The metadata (with the
    /// term of entry `to - 1`) is written before the WAL's compaction mark, so a crash between
    /// the two keeps a consistent view (see [`raft::Storage::first_index`] below).
    pub fn compact(&mut self, to: u64) -> Result<(), StorageError> {
        let first = self.first_index_inner();
        if to <= first {
            return Ok(());
        }
        let last = self.last_index_inner()?;
        if to > last + 1 || to > self.hard_state.commit + 1 {
            return Err(StorageError::BadCompaction {
                group: self.group,
                to,
                first,
                last,
                commit: self.hard_state.commit,
            });
        }
        let term = self.term_inner(to - 1).map_err(|_| StorageError::BadCompaction {
            group: self.group,
            to,
            first,
            last,
            commit: self.hard_state.commit,
        })?;
        let meta = GroupMetaState { snapshot_index: to - 1, snapshot_term: term, ..self.meta.clone() };
        let records = [
            Record::group_meta(self.group, None, encode_meta(&meta)),
            Record::compact_to(self.group, LogIndex(to)),
        ];
        lock(&self.wal)?.append(&records)?;
        self.meta = meta;
        while self.recent.front().is_some_and(|e| e.index < to) {
            if let Some(e) = self.recent.pop_front() {
                self.recent_bytes -= e.data.len() as u64;
            }
        }
        Ok(())
    }

    /// Installs a snapshot's metadata: the log is dropped and restarts after its index, the
    /// membership becomes the snapshot's, the commit index moves to it. Refuses a snapshot
    /// older than the log start with `SnapshotOutOfDate`. The volume data of the snapshot is
    /// the caller's business.
    pub fn apply_snapshot(&mut self, meta: &SnapshotMetadata) -> raft::Result<()> {
        if meta.index < self.first_index_inner() {
            return Err(raft::Error::Store(raft::StorageError::SnapshotOutOfDate));
        }
        let new_meta = GroupMetaState {
            conf_state: meta.get_conf_state().clone(),
            snapshot_index: meta.index,
            snapshot_term: meta.term,
            conf_index: meta.index,
        };
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let records = [
            Record::group_meta(self.group, Some(LogIndex(meta.index + 1)), encode_meta(&new_meta)),
            Record::hard_state(self.group, to_wal_hard_state(&hs)),
        ];
        lock(&self.wal)?.append(&records).map_err(StorageError::from)?;
        self.meta = new_meta;
        self.hard_state = hs;
        self.forget_recent();
        Ok(())
    }

    /// Says that every committed entry up to `index` has been handed to the state machine,
    /// in order (so the membership recorded here is the one at `index`, unless a later
    /// configuration change was recorded before a restart; see `snapshot`).
    pub fn set_snapshot_point(&mut self, index: u64) {
        self.snapshot_point = index;
    }

    /// Entries from the log start up to (not including) `hi` that are past `keep_bytes` of
    /// encoded entries counted back from `hi - 1`: the index a compaction may move to.
    pub fn compaction_point(&self, hi: u64, keep_bytes: u64) -> Result<u64, StorageError> {
        let first = self.first_index_inner();
        Ok(lock(&self.wal)?.index_keeping_bytes(self.group, LogIndex(first), LogIndex(hi), keep_bytes).0)
    }

    fn first_index_inner(&self) -> u64 {
        self.meta.snapshot_index + 1
    }

    fn last_index_inner(&self) -> Result<u64, StorageError> {
        let next = lock(&self.wal)?.next_index(self.group).0;
        Ok((next - 1).max(self.meta.snapshot_index))
    }

    fn term_inner(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.meta.snapshot_index {
            return Ok(self.meta.snapshot_term);
        }
        if idx < self.first_index_inner() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        let w = lock(&self.wal)?;
        w.term(self.group, LogIndex(idx))
            .map(|t| t.0)
            .ok_or(raft::Error::Store(raft::StorageError::Unavailable))
    }
}

impl<D: WalDisk> raft::Storage for GroupStorage<D> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.meta.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first_index_inner() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.last_index_inner()? + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let max_size = max_size.into();
        let over = |size: u64, out: &Vec<Entry>| {
            !out.is_empty() && max_size.is_some_and(|m| m != raft::NO_LIMIT && size > m)
        };
        if let (Some(front), Some(back)) = (self.recent.front(), self.recent.back()) {
            if low >= front.index && high <= back.index + 1 {
                let mut out = Vec::new();
                let mut size = 0u64;
                for e in self.recent.range((low - front.index) as usize..(high - front.index) as usize) {
                    size += u64::from(protobuf::Message::compute_size(e));
                    if over(size, &out) {
                        break;
                    }
                    out.push(e.clone());
                }
                return Ok(out);
            }
        }
        let w = lock(&self.wal)?;
        // Read only as many entries as max_size allows (always at least one).
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let e = w
                .entries(self.group, LogIndex(i), LogIndex(i + 1))
                .map_err(StorageError::from)?
                .pop()
                .ok_or(raft::Error::Store(raft::StorageError::Unavailable))?;
            let e = decode_entry(self.group, e)?;
            size += u64::from(protobuf::Message::compute_size(&e));
            if over(size, &out) {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_inner(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_inner())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_inner()?)
    }

    /// A snapshot is metadata only: the index handed to the state machine, its term and the
    /// membership at that index. The volume data travels separately: the receiver pulls the
    /// sender's allocated extents (see `crate::snapshot`), which is why a snapshot can be
    /// offered at any moment without building anything. Answers
    /// `SnapshotTemporarilyUnavailable` (raft-rs retries later) when the membership recorded
    /// here may be newer than that index: after a restart, until the entries up to the last
    /// configuration change have been handed out again.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let index = self.snapshot_point.max(self.meta.snapshot_index);
        if index == 0 || index < self.meta.conf_index || index < request_index {
            return Err(unavailable());
        }
        let term = self.term_inner(index).map_err(|_| unavailable())?;
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.meta.conf_state.clone());
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use raft::Storage;

    use super::*;
    use crate::wal::disk::SimDisk;
    use crate::wal::WalOptions;

    const G: GroupId = GroupId(5);

    fn new_entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.term = term;
        e.index = index;
        e
    }

    fn size_of(e: &Entry) -> u64 {
        u64::from(protobuf::Message::compute_size(e))
    }

    fn wal(disk: &SimDisk) -> Arc<Mutex<Wal<SimDisk>>> {
        Arc::new(Mutex::new(Wal::open(disk.clone(), WalOptions::default()).unwrap()))
    }

    /// Storage holding entries 3..=5 with terms 3, 4, 5 and snapshot point (3, 3), as in the
    /// raft-rs storage tests.
    fn storage_345(disk: &SimDisk) -> GroupStorage<SimDisk> {
        let mut s = GroupStorage::open(wal(disk), G).unwrap();
        s.apply_snapshot(&{
            let mut m = SnapshotMetadata::default();
            m.index = 2;
            m.term = 2;
            m.mut_conf_state().voters = vec![1, 2, 3];
            m
        })
        .unwrap();
        s.append(&[new_entry(3, 3), new_entry(4, 4), new_entry(5, 5)]).unwrap();
        let mut hs = HardState::default();
        hs.commit = 5;
        hs.term = 5;
        s.set_hard_state(&hs).unwrap();
        s.compact(4).unwrap();
        s
    }

    #[test]
    fn a_snapshot_install_torn_after_its_metadata_reopens_committed() {
        let disk = SimDisk::new(3);
        let w = wal(&disk);
        let mut s = GroupStorage::open(w.clone(), G).unwrap();
        s.initialize(ConfState::from((vec![1, 2], vec![]))).unwrap();
        s.append(&[new_entry(1, 1), new_entry(2, 1)]).unwrap();
        let hs = |term, vote, commit| HardState { term, vote, commit, ..HardState::default() };
        s.set_hard_state(&hs(1, 1, 2)).unwrap();
        w.lock().unwrap().sync().unwrap();
        // What survives a crash in the middle of `apply_snapshot`: its first record only.
        let meta = GroupMetaState {
            conf_state: ConfState::from((vec![1, 2], vec![])),
            snapshot_index: 9,
            snapshot_term: 3,
            conf_index: 9,
        };
        w.lock().unwrap().append(&[Record::group_meta(G, Some(LogIndex(10)), encode_meta(&meta))]).unwrap();
        w.lock().unwrap().sync().unwrap();
        drop(s);
        let s = GroupStorage::open(w, G).unwrap();
        assert_eq!(s.meta().snapshot_index, 9);
        assert_eq!(*s.hard_state(), hs(3, 0, 9));
    }

    #[test]
    fn term_follows_the_raft_rs_contract() {
        let s = storage_345(&SimDisk::new(1));
        assert_eq!(s.term(2), Err(raft::Error::Store(raft::StorageError::Compacted)));
        assert_eq!(s.term(3), Ok(3));
        assert_eq!(s.term(4), Ok(4));
        assert_eq!(s.term(5), Ok(5));
        assert_eq!(s.term(6), Err(raft::Error::Store(raft::StorageError::Unavailable)));
    }

    #[test]
    fn recent_entries_in_memory_match_the_wal_after_a_conflicting_append() {
        let disk = SimDisk::new(7);
        let w = wal(&disk);
        let mut s = GroupStorage::open(w.clone(), G).unwrap();
        s.initialize(ConfState::from((vec![1], vec![]))).unwrap();
        let mut data = new_entry(1, 1);
        data.data = vec![7u8; 100].into();
        s.append(&[data, new_entry(2, 1), new_entry(3, 1), new_entry(4, 1)]).unwrap();
        // A new leader overwrites the suffix from index 3.
        s.append(&[new_entry(3, 2), new_entry(4, 2), new_entry(5, 2)]).unwrap();
        let ctx = || GetEntriesContext::empty(false);
        let cached = s.entries(1, 6, None, ctx()).unwrap();
        assert_eq!(
            cached.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
        );
        assert_eq!(cached[0].data.len(), 100);
        // Storage reopened from the same WAL (no in-memory tail) reads the same entries.
        let reopened = GroupStorage::open(w, G).unwrap();
        assert!(reopened.recent.is_empty());
        assert_eq!(reopened.entries(1, 6, None, ctx()).unwrap(), cached);
        // A gap empties the tail instead of serving a hole.
        s.remember(&[new_entry(9, 3)]);
        assert_eq!(s.recent.len(), 1);
    }

    #[test]
    fn entries_with_max_size() {
        let s = storage_345(&SimDisk::new(1));
        let (e4, e5) = (new_entry(4, 4), new_entry(5, 5));
        let ctx = || GetEntriesContext::empty(false);
        assert_eq!(s.entries(3, 5, None, ctx()), Err(raft::Error::Store(raft::StorageError::Compacted)));
        assert_eq!(s.entries(4, 5, None, ctx()).unwrap(), vec![e4.clone()]);
        assert_eq!(s.entries(4, 6, None, ctx()).unwrap(), vec![e4.clone(), e5.clone()]);
        // At least one entry even when it alone exceeds max_size.
        assert_eq!(s.entries(4, 6, 0, ctx()).unwrap(), vec![e4.clone()]);
        assert_eq!(s.entries(4, 6, size_of(&e4), ctx()).unwrap(), vec![e4.clone()]);
        assert_eq!(s.entries(4, 6, size_of(&e4) + size_of(&e5) - 1, ctx()).unwrap(), vec![e4.clone()]);
        assert_eq!(s.entries(4, 6, size_of(&e4) + size_of(&e5), ctx()).unwrap(), vec![e4, e5]);
        assert_eq!(s.entries(4, 7, None, ctx()), Err(raft::Error::Store(raft::StorageError::Unavailable)));
    }

    #[test]
    fn first_last_and_compaction() {
        let mut s = storage_345(&SimDisk::new(1));
        assert_eq!((s.first_index(), s.last_index()), (Ok(4), Ok(5)));
        s.append(&[new_entry(6, 5)]).unwrap();
        assert_eq!(s.last_index(), Ok(6));
        // Compacting below the start changes nothing; past the commit index is refused.
        s.compact(2).unwrap();
        assert_eq!(s.first_index(), Ok(4));
        assert!(matches!(s.compact(7), Err(StorageError::BadCompaction { .. })));
        s.compact(5).unwrap();
        assert_eq!(s.first_index(), Ok(5));
        assert_eq!(s.term(4), Ok(4));
        assert_eq!(s.term(3), Err(raft::Error::Store(raft::StorageError::Compacted)));
    }

    #[test]
    fn conflicting_append_truncates() {
        let mut s = storage_345(&SimDisk::new(1));
        s.append(&[new_entry(4, 6), new_entry(5, 6)]).unwrap();
        assert_eq!(s.term(4), Ok(6));
        s.append(&[new_entry(5, 7)]).unwrap();
        assert_eq!((s.term(5), s.last_index()), (Ok(7), Ok(5)));
        s.append(&[new_entry(6, 7), new_entry(7, 7)]).unwrap();
        assert_eq!(s.last_index(), Ok(7));
        // A hole is refused by the WAL.
        assert!(s.append(&[new_entry(9, 7)]).is_err());
    }

    #[test]
    fn apply_snapshot_resets_the_log_and_refuses_stale_snapshots() {
        let mut s = storage_345(&SimDisk::new(1));
        let mut m = SnapshotMetadata::default();
        m.index = 4;
        m.term = 4;
        m.mut_conf_state().voters = vec![1, 2];
        s.apply_snapshot(&m).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (Ok(5), Ok(4)));
        assert_eq!(s.term(4), Ok(4));
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2]);
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 4);
        m.index = 3;
        assert_eq!(s.apply_snapshot(&m), Err(raft::Error::Store(raft::StorageError::SnapshotOutOfDate)));
        // The installed snapshot can be offered on (metadata only).
        let offered = s.snapshot(4, 2).unwrap();
        assert_eq!((offered.get_metadata().index, offered.get_metadata().term), (4, 4));
        assert_eq!(offered.get_metadata().get_conf_state().voters, vec![1, 2]);
    }

    #[test]
    fn snapshots_offer_the_handed_out_point_with_its_membership() {
        let unavailable = raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable);
        let disk = SimDisk::new(4);
        let mut s = GroupStorage::open(wal(&disk), G).unwrap();
        s.initialize(ConfState::from((vec![1, 2, 3], vec![]))).unwrap();
        // Nothing handed out yet: nothing to offer.
        assert_eq!(s.snapshot(0, 2).unwrap_err(), unavailable);
        s.append(&[new_entry(1, 1), new_entry(2, 1), new_entry(3, 2)]).unwrap();
        s.set_snapshot_point(2);
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (2, 1));
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        // raft-rs may ask for at least an index.
        assert_eq!(s.snapshot(3, 2).unwrap_err(), unavailable);
        // A membership recorded at entry 3 is newer than point 2 (a restart can leave the
        // store like that): not offered until the point passes it.
        s.set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])), 3).unwrap();
        assert_eq!(s.snapshot(0, 2).unwrap_err(), unavailable);
        s.set_snapshot_point(3);
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().get_conf_state().learners, vec![4]);
        // The conf index survives a reopen.
        s.wal().lock().unwrap().sync().unwrap();
        let s2 = GroupStorage::open(wal(&disk), G).unwrap();
        assert_eq!(s2.meta().conf_index, 3);
        assert_eq!(s2.snapshot(0, 2).unwrap_err(), unavailable);
    }

    #[test]
    fn version_1_metadata_still_decodes() {
        let meta =
            GroupMetaState { snapshot_index: 7, snapshot_term: 2, conf_index: 7, ..Default::default() };
        let mut v1 = encode_meta(&meta).to_vec();
        v1[0] = 1;
        v1.drain(17..25);
        assert_eq!(decode_meta(G, &v1).unwrap(), meta);
    }

    #[test]
    fn everything_survives_a_crash_after_sync_and_reopen() {
        let disk = SimDisk::new(9);
        let s = storage_345(&disk);
        s.wal().lock().unwrap().sync().unwrap();
        let mut s2 = GroupStorage::open(wal(&disk), G).unwrap();
        s2.append(&[new_entry(6, 6)]).unwrap(); // unsynced
        drop((s, s2));
        disk.crash();
        let s = GroupStorage::open(wal(&disk), G).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((st.hard_state.term, st.hard_state.commit), (5, 5));
        assert_eq!(s.first_index(), Ok(4));
        assert!(matches!(s.last_index(), Ok(5) | Ok(6)));
        assert_eq!(s.term(3), Ok(3));
        assert_eq!(s.term(5), Ok(5));
    }

    #[test]
    fn initialize_once_and_entry_fields_round_trip() {
        let disk = SimDisk::new(2);
        let mut s = GroupStorage::open(wal(&disk), G).unwrap();
        assert!(!s.is_initialized());
        let mut cs = ConfState::default();
        cs.voters = vec![1, 2, 3];
        cs.learners = vec![4];
        s.initialize(cs.clone()).unwrap();
        assert!(matches!(s.initialize(cs.clone()), Err(StorageError::AlreadyInitialized { .. })));
        assert_eq!((s.first_index(), s.last_index(), s.term(0)), (Ok(1), Ok(0), Ok(0)));
        let mut e = new_entry(1, 1);
        e.set_entry_type(EntryType::EntryConfChangeV2);
        e.context = Bytes::from_static(b"ctx");
        e.data = Bytes::from_static(b"payload");
        s.append(&[e.clone()]).unwrap();
        let got = s.entries(1, 2, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got, vec![e]);
        let reopened = GroupStorage::open(s.wal().clone(), G).unwrap();
        assert_eq!(reopened.initial_state().unwrap().conf_state, cs);
    }

    #[test]
    fn meta_decoding_rejects_garbage() {
        let meta = GroupMetaState { snapshot_index: 7, snapshot_term: 2, ..Default::default() };
        let enc = encode_meta(&meta);
        assert_eq!(decode_meta(G, &enc).unwrap(), meta);
        for cut in 0..enc.len() {
            assert!(decode_meta(G, &enc[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = enc.to_vec();
        bad.push(0);
        assert!(decode_meta(G, &bad).is_err());
    }
}
