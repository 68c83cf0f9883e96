//! Record framing for the write-ahead log (sans-IO: byte slices in, byte vectors out).
//!
//! Every record is
//!
//! ```text
//! [len u32][crc32 u32][group u64][kind u8][payload: len bytes]
//! ```
//!
//! all integers little-endian. `len` counts payload bytes only. The CRC (crc32fast, IEEE) covers
//! every byte of the record except the CRC field itself: `len`, `group`, `kind` and the payload.
//!
//! | kind | payload |
//! |---|---|
//! | 1 `Entry` | index u64, term u64, data (the rest) |
//! | 2 `HardState` | term u64, vote u64, commit u64 |
//! | 3 `CompactTo` | index u64: entries below it are applied and may be dropped |
//! | 4 `GroupMeta` | reset_to u64 (0: no reset), data (the rest): opaque state of the layer above |
//!
//! [`decode`] tells a complete record apart from a short buffer ([`Decoded::Incomplete`], what a
//! torn tail looks like) and from bytes that fail the checks ([`Decoded::Corrupt`]). A torn
//! write can also look corrupt (the file system may persist later pages of an unsynced write
//! and not earlier ones); the segment scan treats both as the end of the log.

use std::fmt;

use bytes::Bytes;

use crate::gather::Gather;

/// Identifies a Raft group (one per volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GroupId(pub u64);

/// Position of an entry in a group's Raft log. Raft logs start at index 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogIndex(pub u64);

/// A Raft term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Term(pub u64);

/// A Raft node (peer) id; `NodeId(0)` means "none", as in raft-rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u64);

macro_rules! display_newtype {
    ($($t:ident),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    )*};
}
display_newtype!(GroupId, LogIndex, Term, NodeId);

impl LogIndex {
    /// The next index; saturates instead of overflowing.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0.saturating_add(1))
    }
}

/// Bytes before the payload: len (4), crc (4), group (8), kind (1).
pub const HEADER_BYTES: usize = 17;

/// Largest payload a record may carry. Anything larger is refused by [`Record::encode`] and a
/// larger `len` field read back is reported as corrupt rather than waited for. An entry
/// carries at most one client write of the NBD maximum (32 MiB) alone, plus its headers; the
/// extra MiB is ample room for those.
pub const PAYLOAD_BYTES_MAX: usize = (32 << 20) + (1 << 20);

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_COMPACT_TO: u8 = 3;
const KIND_GROUP_META: u8 = 4;

const ENTRY_FIXED_BYTES: usize = 16;
const HARD_STATE_BYTES: usize = 24;
const COMPACT_TO_BYTES: usize = 8;
const GROUP_META_FIXED_BYTES: usize = 8;
/// The largest of the fixed parts above.
const FIXED_BYTES_MAX: usize = HARD_STATE_BYTES;

/// One Raft log entry. Its bytes, `head` then `data`, are opaque to the WAL: the Raft storage
/// layer decides what goes in them (for raft-rs, the entry's type and context, then its data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub index: LogIndex,
    pub term: Term,
    /// Bytes stored before `data`, kept apart so that a small header in front of a large
    /// payload costs no copy of the payload. Decoding returns them joined in `data` (and
    /// `head` empty).
    pub head: Bytes,
    pub data: Bytes,
}

/// The Raft hard state of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: Term,
    pub vote: NodeId,
    pub commit: LogIndex,
}

/// What a record says about its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A log entry. An entry at an index at or below the group's last index replaces the old
    /// suffix from that index on (Raft truncating an uncommitted suffix).
    Entry(Entry),
    /// The latest hard state; replaces any earlier one.
    HardState(HardState),
    /// Entries below this index are applied (or covered by a snapshot) and may be dropped.
    /// Marks only move forward; a lower mark than the current one changes nothing.
    CompactTo(LogIndex),
    /// State the layer above keeps per group (the Raft storage: membership and the index and
    /// term of the last compacted or snapshotted entry); replaces any earlier one and is copied
    /// forward in checkpoints. With `reset_to` it also drops the whole log in the same record
    /// (installing a snapshot): see [`GroupMeta`].
    GroupMeta(GroupMeta),
}

/// Payload of [`Payload::GroupMeta`].
///
/// One record, so that a crash keeps either the old log and the old metadata or the reset log
/// and the new metadata, never a mix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMeta {
    /// When set (never `LogIndex(0)`, which encodes "none"): every entry is dropped, the
    /// compaction mark becomes at least this index and the next entry must have it.
    pub reset_to: Option<LogIndex>,
    /// Opaque to the WAL.
    pub data: Bytes,
}

/// One WAL record: a payload for one Raft group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub group: GroupId,
    pub payload: Payload,
}

/// Why a record cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    /// the payload is larger than PAYLOAD_BYTES_MAX
    #[error("record payload of {payload_bytes} bytes exceeds the limit of {PAYLOAD_BYTES_MAX} bytes")]
    TooLarge { payload_bytes: usize },
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// The length field is larger than [`PAYLOAD_BYTES_MAX`].
    LengthTooLarge { payload_bytes: u32 },
    /// The stored CRC does not match the bytes.
    Checksum { stored: u32, computed: u32 },
    /// The CRC matches but the kind is unknown (a newer format, or a bug).
    UnknownKind { kind: u8 },
    /// The CRC matches but the payload has the wrong size for its kind.
    BadPayloadLength { kind: u8, payload_bytes: u32 },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::LengthTooLarge { payload_bytes } => {
                write!(f, "length field {payload_bytes} exceeds {PAYLOAD_BYTES_MAX}")
            }
            Corruption::Checksum { stored, computed } => {
                write!(f, "crc mismatch: stored {stored:#010x}, computed {computed:#010x}")
            }
            Corruption::UnknownKind { kind } => write!(f, "unknown record kind {kind}"),
            Corruption::BadPayloadLength { kind, payload_bytes } => {
                write!(f, "kind {kind} with a payload of {payload_bytes} bytes")
            }
        }
    }
}

/// Result of [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record and the number of bytes it took.
    Complete(Record, usize),
    /// The buffer ends inside a record (or is empty): a torn tail, or simply the end.
    Incomplete,
    /// The bytes at the start of the buffer are not a valid record.
    Corrupt(Corruption),
}

impl Record {
    pub fn entry(group: GroupId, index: LogIndex, term: Term, data: Bytes) -> Record {
        Record::entry_with_head(group, index, term, Bytes::new(), data)
    }

    /// An entry whose bytes are `head` followed by `data` (see [`Entry::head`]).
    pub fn entry_with_head(group: GroupId, index: LogIndex, term: Term, head: Bytes, data: Bytes) -> Record {
        Record { group, payload: Payload::Entry(Entry { index, term, head, data }) }
    }

    pub fn hard_state(group: GroupId, hard_state: HardState) -> Record {
        Record { group, payload: Payload::HardState(hard_state) }
    }

    pub fn compact_to(group: GroupId, index: LogIndex) -> Record {
        Record { group, payload: Payload::CompactTo(index) }
    }

    /// Opaque group metadata, optionally resetting the log (see [`GroupMeta`]).
    pub fn group_meta(group: GroupId, reset_to: Option<LogIndex>, data: Bytes) -> Record {
        Record { group, payload: Payload::GroupMeta(GroupMeta { reset_to, data }) }
    }

    fn payload_bytes(&self) -> usize {
        match &self.payload {
            Payload::Entry(e) => ENTRY_FIXED_BYTES + e.head.len() + e.data.len(),
            Payload::HardState(_) => HARD_STATE_BYTES,
            Payload::CompactTo(_) => COMPACT_TO_BYTES,
            Payload::GroupMeta(m) => GROUP_META_FIXED_BYTES + m.data.len(),
        }
    }

    /// Bytes [`Record::encode`] appends.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.payload_bytes()
    }

    /// Appends the framed record to `out` with an unsalted CRC (format 1). On error `out` is
    /// left unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_salted(out, 0)
    }

    /// Appends the framed record to `out`, its CRC seeded with `salt` (the segment's, see
    /// [`segment_salt`]). On error `out` is left unchanged.
    pub fn encode_salted(&self, out: &mut Vec<u8>, salt: u32) -> Result<(), EncodeError> {
        let mut gathered = Gather::default();
        self.encode_gathered(&mut gathered, salt)?;
        for part in gathered.into_parts() {
            out.extend_from_slice(&part);
        }
        Ok(())
    }

    /// Appends the framed record to `out` as [`encode_salted`](Record::encode_salted) does,
    /// the payload's large `Bytes` shared rather than copied (see [`Gather`]). On error `out`
    /// is left unchanged.
    pub fn encode_gathered(&self, out: &mut Gather, salt: u32) -> Result<(), EncodeError> {
        let payload_bytes = self.payload_bytes();
        if payload_bytes > PAYLOAD_BYTES_MAX {
            return Err(EncodeError::TooLarge { payload_bytes });
        }
        let len = u32::try_from(payload_bytes).map_err(|_| EncodeError::TooLarge { payload_bytes })?;
        // The header and the kind's fixed fields, then the variable parts, which are not
        // copied here.
        let mut fixed = [0u8; HEADER_BYTES + FIXED_BYTES_MAX];
        let mut n = 0;
        let mut put = |bytes: &[u8]| {
            fixed[n..n + bytes.len()].copy_from_slice(bytes);
            n += bytes.len();
        };
        put(&len.to_le_bytes());
        put(&[0; 4]); // crc, filled in below
        put(&self.group.0.to_le_bytes());
        let variable: [&Bytes; 2] = match &self.payload {
            Payload::Entry(e) => {
                put(&[KIND_ENTRY]);
                put(&e.index.0.to_le_bytes());
                put(&e.term.0.to_le_bytes());
                [&e.head, &e.data]
            }
            Payload::HardState(hs) => {
                put(&[KIND_HARD_STATE]);
                put(&hs.term.0.to_le_bytes());
                put(&hs.vote.0.to_le_bytes());
                put(&hs.commit.0.to_le_bytes());
                [&EMPTY, &EMPTY]
            }
            Payload::CompactTo(index) => {
                put(&[KIND_COMPACT_TO]);
                put(&index.0.to_le_bytes());
                [&EMPTY, &EMPTY]
            }
            Payload::GroupMeta(m) => {
                put(&[KIND_GROUP_META]);
                put(&m.reset_to.map_or(0, |i| i.0).to_le_bytes());
                [&m.data, &EMPTY]
            }
        };
        let crc = checksum_parts(&fixed[..n], variable.iter().map(|b| &b[..]), salt);
        fixed[4..8].copy_from_slice(&crc.to_le_bytes());
        out.put_slice(&fixed[..n]);
        for part in variable {
            out.put_bytes(part);
        }
        Ok(())
    }
}

static EMPTY: Bytes = Bytes::new();

/// The CRC seed of the records of segment `id` (format 2). A recycled segment file still
/// holds its previous life's records past the new ones; seeded with another segment's salt,
/// their CRCs cannot match (a CRC's initial value shifts it by an invertible map for a given
/// length), so a scan stops at them as at a torn tail. The multiplier is odd, so distinct ids
/// below 2^32 get distinct, non-zero salts.
pub fn segment_salt(id: u64) -> u32 {
    (id as u32).wrapping_mul(0x9E37_79B1)
}

/// CRC over a whole framed record, skipping the CRC field (bytes 4..8), seeded with `salt`
/// (0: format 1, unsalted).
pub(crate) fn checksum(record: &[u8], salt: u32) -> u32 {
    checksum_parts(&record[..HEADER_BYTES], [&record[HEADER_BYTES..]], salt)
}

/// [`checksum`] of a record given as its header (`HEADER_BYTES` or more, the CRC field
/// included) and the rest in pieces.
fn checksum_parts<'a>(head: &[u8], rest: impl IntoIterator<Item = &'a [u8]>, salt: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(salt);
    hasher.update(&head[..4]);
    hasher.update(&head[8..]);
    for piece in rest {
        hasher.update(piece);
    }
    hasher.finalize()
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes the record at the start of `buf` (unsalted CRC, format 1). The entry data is
/// copied out of `buf`.
pub fn decode(buf: &[u8]) -> Decoded {
    decode_salted(buf, 0)
}

/// Decodes the record at the start of `buf`, whose CRC is seeded with `salt`.
pub fn decode_salted(buf: &[u8], salt: u32) -> Decoded {
    if buf.len() < 4 {
        return Decoded::Incomplete;
    }
    let payload_len = u32_at(buf, 0);
    let payload_bytes = payload_len as usize;
    if payload_bytes > PAYLOAD_BYTES_MAX {
        return Decoded::Corrupt(Corruption::LengthTooLarge { payload_bytes: payload_len });
    }
    let total = HEADER_BYTES + payload_bytes;
    if buf.len() < total {
        return Decoded::Incomplete;
    }
    let record = &buf[..total];
    let stored = u32_at(record, 4);
    let computed = checksum(record, salt);
    if stored != computed {
        return Decoded::Corrupt(Corruption::Checksum { stored, computed });
    }
    let group = GroupId(u64_at(record, 8));
    let kind = record[16];
    let p = &record[HEADER_BYTES..];
    let bad_length = Decoded::Corrupt(Corruption::BadPayloadLength { kind, payload_bytes: payload_len });
    let payload = match kind {
        KIND_ENTRY => {
            if p.len() < ENTRY_FIXED_BYTES {
                return bad_length;
            }
            Payload::Entry(Entry {
                index: LogIndex(u64_at(p, 0)),
                term: Term(u64_at(p, 8)),
                head: Bytes::new(),
                data: Bytes::copy_from_slice(&p[ENTRY_FIXED_BYTES..]),
            })
        }
        KIND_HARD_STATE => {
            if p.len() != HARD_STATE_BYTES {
                return bad_length;
            }
            Payload::HardState(HardState {
                term: Term(u64_at(p, 0)),
                vote: NodeId(u64_at(p, 8)),
                commit: LogIndex(u64_at(p, 16)),
            })
        }
        KIND_COMPACT_TO => {
            if p.len() != COMPACT_TO_BYTES {
                return bad_length;
            }
            Payload::CompactTo(LogIndex(u64_at(p, 0)))
        }
        KIND_GROUP_META => {
            if p.len() < GROUP_META_FIXED_BYTES {
                return bad_length;
            }
            let reset = u64_at(p, 0);
            Payload::GroupMeta(GroupMeta {
                reset_to: (reset != 0).then_some(LogIndex(reset)),
                data: Bytes::copy_from_slice(&p[GROUP_META_FIXED_BYTES..]),
            })
        }
        kind => return Decoded::Corrupt(Corruption::UnknownKind { kind }),
    };
    Decoded::Complete(Record { group, payload }, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record::entry(GroupId(7), LogIndex(1), Term(1), Bytes::from_static(b"hello")),
            Record::entry(GroupId(u64::MAX), LogIndex(u64::MAX), Term(3), Bytes::new()),
            Record::hard_state(GroupId(7), HardState { term: Term(5), vote: NodeId(2), commit: LogIndex(9) }),
            Record::compact_to(GroupId(0), LogIndex(42)),
            Record::group_meta(GroupId(3), None, Bytes::from_static(b"conf")),
            Record::group_meta(GroupId(3), Some(LogIndex(11)), Bytes::new()),
        ]
    }

    fn encoded(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        r.encode(&mut out).expect("encode");
        out
    }

    /// Recomputes the CRC after a test edits a field, so only the edited check fires.
    fn reseal(buf: &mut [u8]) {
        let crc = checksum(buf, 0);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip_each_kind() {
        for r in samples() {
            let buf = encoded(&r);
            assert_eq!(buf.len(), r.encoded_len());
            assert_eq!(decode(&buf), Decoded::Complete(r.clone(), buf.len()));
        }
    }

    #[test]
    fn decodes_a_stream_back_to_back_and_ignores_trailing_bytes() {
        let mut buf = Vec::new();
        for r in samples() {
            r.encode(&mut buf).expect("encode");
        }
        buf.extend_from_slice(&[1, 2]); // start of a torn record
        let mut at = 0;
        let mut got = Vec::new();
        while let Decoded::Complete(r, n) = decode(&buf[at..]) {
            got.push(r);
            at += n;
        }
        assert_eq!(got, samples());
        assert_eq!(decode(&buf[at..]), Decoded::Incomplete);
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        for r in samples() {
            let buf = encoded(&r);
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), Decoded::Incomplete, "cut at {cut} of {r:?}");
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        for r in samples() {
            let buf = encoded(&r);
            for byte in 0..buf.len() {
                for bit in 0..8 {
                    let mut bad = buf.clone();
                    bad[byte] ^= 1 << bit;
                    match decode(&bad) {
                        Decoded::Corrupt(_) | Decoded::Incomplete => {}
                        Decoded::Complete(got, _) => {
                            panic!("flip of byte {byte} bit {bit} decoded as {got:?}")
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn flips_outside_the_length_field_are_reported_as_checksum_errors() {
        let buf = encoded(&samples()[0]);
        for byte in 4..buf.len() {
            let mut bad = buf.clone();
            bad[byte] ^= 0x40;
            assert!(matches!(decode(&bad), Decoded::Corrupt(Corruption::Checksum { .. })), "byte {byte}");
        }
    }

    #[test]
    fn zeroed_header_is_corrupt_not_an_empty_record() {
        assert!(matches!(decode(&[0u8; 64]), Decoded::Corrupt(Corruption::Checksum { .. })));
    }

    #[test]
    fn length_beyond_the_limit_is_corrupt_even_when_the_buffer_is_short() {
        let mut buf = encoded(&samples()[0]);
        buf[..4].copy_from_slice(&(PAYLOAD_BYTES_MAX as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&buf),
            Decoded::Corrupt(Corruption::LengthTooLarge { payload_bytes: PAYLOAD_BYTES_MAX as u32 + 1 })
        );
    }

    #[test]
    fn unknown_kind_with_valid_crc_is_corrupt() {
        let mut buf = encoded(&samples()[3]);
        buf[16] = 99;
        reseal(&mut buf);
        assert_eq!(decode(&buf), Decoded::Corrupt(Corruption::UnknownKind { kind: 99 }));
    }

    #[test]
    fn wrong_payload_size_for_kind_is_corrupt() {
        // A compaction mark with 9 payload bytes.
        let mut buf = encoded(&samples()[3]);
        buf.push(0);
        buf[..4].copy_from_slice(&9u32.to_le_bytes());
        reseal(&mut buf);
        assert_eq!(
            decode(&buf),
            Decoded::Corrupt(Corruption::BadPayloadLength { kind: KIND_COMPACT_TO, payload_bytes: 9 })
        );
        // An entry too short to hold index and term.
        let mut buf = encoded(&samples()[1]);
        buf.truncate(HEADER_BYTES + 8);
        buf[..4].copy_from_slice(&8u32.to_le_bytes());
        reseal(&mut buf);
        assert!(matches!(
            decode(&buf),
            Decoded::Corrupt(Corruption::BadPayloadLength { kind: KIND_ENTRY, .. })
        ));
        // A hard state with a short payload.
        let mut buf = encoded(&samples()[2]);
        buf.truncate(HEADER_BYTES + 16);
        buf[..4].copy_from_slice(&16u32.to_le_bytes());
        reseal(&mut buf);
        assert!(matches!(
            decode(&buf),
            Decoded::Corrupt(Corruption::BadPayloadLength { kind: KIND_HARD_STATE, .. })
        ));
    }

    #[test]
    fn oversized_payload_is_refused_and_leaves_output_unchanged() {
        let r = Record::entry(GroupId(1), LogIndex(1), Term(1), Bytes::from(vec![0u8; PAYLOAD_BYTES_MAX]));
        let mut out = vec![1, 2, 3];
        assert!(matches!(r.encode(&mut out), Err(EncodeError::TooLarge { .. })));
        assert_eq!(out, vec![1, 2, 3]);
    }
}
