//! Segment files: the WAL is a sequence of files `<id>.wal`, each starting with a small header
//! and followed by records back to back. A segment is closed (synced, never written again)
//! when the next one is started, so only the newest segment can end in a torn write.
//!
//! Header (24 bytes): magic `RBLKWAL\0`, format version u32, segment id u64, crc32 of the
//! preceding 20 bytes. Format 2 seeds every record's CRC with the segment's salt
//! ([`record::segment_salt`]), so that a segment can live in a reused file: the old records
//! past the new ones fail their CRC and end the scan like a torn tail. A segment is cut to
//! its length when it is closed, so only the newest segment can hold old bytes. Format 1
//! (unsalted) segments are still read.
//!
//! [`recover`] reads the segments in id order and stops at the first record that does not
//! decode. It truncates that segment there, removes every later segment, and reports what it
//! cut. In the newest segment that is the normal torn tail of a crash; anywhere else it is
//! damage to synced data, logged as an error, and the log is still cut there because a log
//! with a hole cannot be replayed.

use bytes::Bytes;

use super::disk::{DiskError, WalDisk, WalFile};
use super::record::{self, Corruption, Decoded, Record};

/// Segment sequence number; segment files are named by it and replayed in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u64);

impl SegmentId {
    pub fn next(self) -> SegmentId {
        SegmentId(self.0 + 1)
    }

    /// `00000000000000000001.wal`: fixed width, so names sort like ids.
    pub fn file_name(self) -> String {
        format!("{:020}{FILE_SUFFIX}", self.0)
    }

    /// The inverse of [`SegmentId::file_name`]; `None` for any other name.
    pub fn parse_file_name(name: &str) -> Option<SegmentId> {
        let digits = name.strip_suffix(FILE_SUFFIX)?;
        if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(SegmentId)
    }
}

impl std::fmt::Display for SegmentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

const FILE_SUFFIX: &str = ".wal";
pub const SEGMENT_MAGIC: [u8; 8] = *b"RBLKWAL\0";
pub const SEGMENT_FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads (1: records unsalted).
pub const SEGMENT_FORMAT_VERSION_MIN: u32 = 1;
/// Name suffix of a closed segment file kept for reuse (not part of the log).
pub const FREE_SUFFIX: &str = ".free";
pub const SEGMENT_HEADER_BYTES: u64 = 24;
/// Default size at which the WAL starts a new segment.
pub const SEGMENT_TARGET_BYTES_DEFAULT: u64 = 64 << 20;

/// Errors of the segment layer.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// the disk failed
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// a segment was written by a newer (or unknown) format version; nothing is truncated
    #[error("segment {segment}: format version {version} is not supported (this build reads {SEGMENT_FORMAT_VERSION})")]
    UnsupportedVersion { segment: SegmentId, version: u32 },
    /// segment ids are not contiguous: a file in the middle of the log is missing
    #[error("segment {missing} is missing (found {before} and {after})")]
    Missing { missing: SegmentId, before: SegmentId, after: SegmentId },
    /// reading a record back at a known location did not give a valid record
    #[error("segment {segment} offset {offset}: no valid record where one was written ({detail})")]
    BadRead { segment: SegmentId, offset: u64, detail: String },
}

/// Where a record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLoc {
    pub segment: SegmentId,
    pub offset: u64,
    pub len_bytes: u32,
}

/// An open segment file.
#[derive(Debug)]
pub struct Segment<F> {
    id: SegmentId,
    file: F,
    len_bytes: u64,
    /// CRC seed of this segment's records (0 in format 1).
    salt: u32,
}

fn header(id: SegmentId) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&id.0.to_le_bytes());
    let crc = crc32fast::hash(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

enum HeaderCheck {
    /// Valid, of this format version.
    Ok(u32),
    /// Short, wrong magic, wrong crc or wrong id: treated like a torn or corrupt record.
    Damaged,
    UnsupportedVersion(u32),
}

fn check_header(id: SegmentId, bytes: &[u8]) -> HeaderCheck {
    let Some(h) = bytes.get(..SEGMENT_HEADER_BYTES as usize) else {
        return HeaderCheck::Damaged;
    };
    let crc_ok = crc32fast::hash(&h[..20]).to_le_bytes() == h[20..24];
    if h[..8] != SEGMENT_MAGIC || !crc_ok {
        return HeaderCheck::Damaged;
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..12]);
    let version = u32::from_le_bytes(v);
    if !(SEGMENT_FORMAT_VERSION_MIN..=SEGMENT_FORMAT_VERSION).contains(&version) {
        return HeaderCheck::UnsupportedVersion(version);
    }
    if h[12..20] != id.0.to_le_bytes() {
        return HeaderCheck::Damaged;
    }
    HeaderCheck::Ok(version)
}

fn salt_of(id: SegmentId, version: u32) -> u32 {
    if version >= 2 {
        record::segment_salt(id.0)
    } else {
        0
    }
}

impl<F: WalFile> Segment<F> {
    /// Creates the file and writes its header (not yet synced).
    pub fn create<D: WalDisk<File = F>>(disk: &D, id: SegmentId) -> Result<Self, SegmentError> {
        let file = disk.create(&id.file_name())?;
        Self::start(file, id)
    }

    /// Starts segment `id` in the free file `free` (see [`FREE_SUFFIX`]): its header and
    /// records overwrite the old bytes (not yet synced).
    pub fn reuse<D: WalDisk<File = F>>(disk: &D, free: &str, id: SegmentId) -> Result<Self, SegmentError> {
        let file = disk.reuse(free, &id.file_name())?;
        Self::start(file, id)
    }

    fn start(mut file: F, id: SegmentId) -> Result<Self, SegmentError> {
        file.append(&header(id))?;
        Ok(Segment { id, file, len_bytes: SEGMENT_HEADER_BYTES, salt: salt_of(id, SEGMENT_FORMAT_VERSION) })
    }

    /// CRC seed for records appended to this segment.
    pub fn salt(&self) -> u32 {
        self.salt
    }

    /// Cuts the file at the segment's end (old bytes of a reused file go) and syncs it: the
    /// segment is complete and is never written again.
    pub fn close(&mut self) -> Result<(), SegmentError> {
        self.cut()?;
        Ok(self.file.sync()?)
    }

    /// Cuts the file at the segment's end without syncing (a reused file's old bytes go, so
    /// a clean reopen finds no tail to cut; unsynced records stay as unsynced as they were).
    pub fn cut(&mut self) -> Result<(), SegmentError> {
        Ok(self.file.truncate(self.len_bytes)?)
    }

    pub fn id(&self) -> SegmentId {
        self.id
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Appends already-framed records; returns the offset they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64, SegmentError> {
        let offset = self.len_bytes;
        self.file.append(bytes)?;
        self.len_bytes += bytes.len() as u64;
        Ok(offset)
    }

    /// Appends already-framed records held as parts (see [`WalFile::append_parts`]);
    /// returns the offset they start at.
    pub fn append_parts(&mut self, parts: Vec<Bytes>) -> Result<u64, SegmentError> {
        let offset = self.len_bytes;
        let len_bytes: usize = parts.iter().map(Bytes::len).sum();
        self.file.append_parts(parts)?;
        self.len_bytes += len_bytes as u64;
        Ok(offset)
    }

    pub fn sync(&mut self) -> Result<(), SegmentError> {
        Ok(self.file.sync()?)
    }

    /// See [`WalFile::begin_sync`].
    pub fn begin_sync(&mut self) -> Result<F::Sync, SegmentError> {
        Ok(self.file.begin_sync()?)
    }

    /// See [`WalFile::write_out`].
    pub fn write_out(&mut self) -> Result<(), SegmentError> {
        Ok(self.file.write_out()?)
    }

    /// Reads and decodes the record at `loc` (which must be in this segment).
    pub fn read_record(&self, loc: RecordLoc) -> Result<Record, SegmentError> {
        let mut buf = vec![0u8; loc.len_bytes as usize];
        self.file.read_at(loc.offset, &mut buf)?;
        match record::decode_salted(&buf, self.salt) {
            Decoded::Complete(r, n) if n == buf.len() => Ok(r),
            other => Err(SegmentError::BadRead {
                segment: self.id,
                offset: loc.offset,
                detail: format!("{other:?}"),
            }),
        }
    }
}

/// What was wrong where the scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The data ends inside a record (a torn write).
    Torn,
    /// A record failed its checks.
    Corrupt(Corruption),
    /// The segment header is short or invalid; the whole segment was removed.
    BadHeader,
}

/// What [`recover`] cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Segment the scan stopped in.
    pub segment: SegmentId,
    /// Bytes kept in that segment (0 if it was removed for a bad header).
    pub kept_bytes: u64,
    /// Bytes cut from that segment.
    pub dropped_bytes: u64,
    pub damage: Damage,
    /// Later segments removed entirely, oldest first.
    pub dropped_segments: Vec<SegmentId>,
    /// The stop was in the newest segment (the expected place for a torn tail).
    pub in_last_segment: bool,
}

/// Segments left after [`recover`], oldest first, and what it cut.
#[derive(Debug)]
pub struct Recovered<F> {
    pub segments: Vec<Segment<F>>,
    pub truncation: Option<Truncation>,
}

/// Scans all segments in order, calling `visit` for every valid record, then cuts the log at
/// the first invalid one (see the module docs). `visit` may fail; its error is returned as is.
pub fn recover<D, E>(
    disk: &D,
    mut visit: impl FnMut(Record, RecordLoc) -> Result<(), E>,
) -> Result<Recovered<D::File>, E>
where
    D: WalDisk,
    E: From<SegmentError>,
{
    let mut ids: Vec<SegmentId> = disk
        .list()
        .map_err(SegmentError::from)?
        .iter()
        .filter_map(|n| SegmentId::parse_file_name(n))
        .collect();
    ids.sort();
    for w in ids.windows(2) {
        if w[1] != w[0].next() {
            return Err(SegmentError::Missing { missing: w[0].next(), before: w[0], after: w[1] }.into());
        }
    }

    let mut segments = Vec::with_capacity(ids.len());
    let mut truncation = None;
    for (pos, &id) in ids.iter().enumerate() {
        let file = disk.open(&id.file_name()).map_err(SegmentError::from)?;
        let len_bytes = file.len_bytes().map_err(SegmentError::from)?;
        let mut bytes = vec![0u8; len_bytes as usize];
        file.read_at(0, &mut bytes).map_err(SegmentError::from)?;

        let mut salt = 0;
        let damage_at = match check_header(id, &bytes) {
            HeaderCheck::UnsupportedVersion(version) => {
                return Err(SegmentError::UnsupportedVersion { segment: id, version }.into())
            }
            HeaderCheck::Damaged => Some((0, Damage::BadHeader)),
            HeaderCheck::Ok(version) => {
                salt = salt_of(id, version);
                let mut at = SEGMENT_HEADER_BYTES as usize;
                loop {
                    match record::decode_salted(&bytes[at..], salt) {
                        Decoded::Complete(r, n) => {
                            let loc = RecordLoc {
                                segment: id,
                                offset: at as u64,
                                // n <= HEADER_BYTES + PAYLOAD_BYTES_MAX, which fits in u32.
                                len_bytes: n as u32,
                            };
                            visit(r, loc)?;
                            at += n;
                        }
                        Decoded::Incomplete if at == bytes.len() => break None,
                        Decoded::Incomplete => break Some((at as u64, Damage::Torn)),
                        Decoded::Corrupt(c) => break Some((at as u64, Damage::Corrupt(c))),
                    }
                }
            }
        };

        let Some((kept_bytes, damage)) = damage_at else {
            segments.push(Segment { id, file, len_bytes, salt });
            continue;
        };

        let in_last_segment = pos + 1 == ids.len();
        let dropped_segments = ids[pos + 1..].to_vec();
        if damage == Damage::BadHeader {
            disk.remove(&id.file_name()).map_err(SegmentError::from)?;
        } else {
            let mut file = file;
            file.truncate(kept_bytes).map_err(SegmentError::from)?;
            file.sync().map_err(SegmentError::from)?;
            segments.push(Segment { id, file, len_bytes: kept_bytes, salt });
        }
        for later in &dropped_segments {
            disk.remove(&later.file_name()).map_err(SegmentError::from)?;
        }
        let t = Truncation {
            segment: id,
            kept_bytes,
            dropped_bytes: len_bytes - kept_bytes,
            damage,
            dropped_segments,
            in_last_segment,
        };
        if in_last_segment {
            tracing::info!(truncation = ?t, "wal: cut torn tail of the newest segment");
        } else {
            tracing::error!(truncation = ?t, "wal: damaged record before the newest segment; log cut there, later segments removed");
        }
        truncation = Some(t);
        break;
    }
    Ok(Recovered { segments, truncation })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::disk::SimDisk;
    use crate::wal::record::{GroupId, LogIndex};

    fn write_segment(disk: &SimDisk, id: u64, marks: &[u64]) {
        let mut seg = Segment::create(disk, SegmentId(id)).expect("create");
        let mut buf = Vec::new();
        for &m in marks {
            Record::compact_to(GroupId(1), LogIndex(m)).encode_salted(&mut buf, seg.salt()).expect("encode");
        }
        seg.append(&buf).expect("append");
        seg.sync().expect("sync");
    }

    fn scan(disk: &SimDisk) -> (Vec<u64>, Recovered<crate::wal::disk::SimFile>) {
        let mut seen = Vec::new();
        let rec = recover::<_, SegmentError>(disk, |r, _| {
            if let crate::wal::record::Payload::CompactTo(i) = r.payload {
                seen.push(i.0);
            }
            Ok(())
        })
        .expect("recover");
        (seen, rec)
    }

    #[test]
    fn file_names_round_trip_and_sort() {
        let a = SegmentId(9).file_name();
        let b = SegmentId(10).file_name();
        assert!(a < b);
        assert_eq!(SegmentId::parse_file_name(&a), Some(SegmentId(9)));
        assert_eq!(SegmentId::parse_file_name("9.wal"), None);
        assert_eq!(SegmentId::parse_file_name("LOCK"), None);
    }

    #[test]
    fn clean_segments_scan_in_order() {
        let disk = SimDisk::new(0);
        write_segment(&disk, 1, &[1, 2]);
        write_segment(&disk, 2, &[3]);
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![1, 2, 3]);
        assert_eq!(rec.truncation, None);
        assert_eq!(rec.segments.len(), 2);
    }

    #[test]
    fn torn_tail_in_last_segment_is_cut() {
        let disk = SimDisk::new(0);
        write_segment(&disk, 1, &[1, 2]);
        let name = SegmentId(1).file_name();
        let mut bytes = disk.file_bytes(&name).expect("file");
        let full = bytes.len() as u64;
        bytes.truncate(bytes.len() - 3);
        disk.set_file_bytes(&name, bytes);
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![1]);
        let t = rec.truncation.expect("truncated");
        assert_eq!(t.damage, Damage::Torn);
        assert!(t.in_last_segment);
        assert_eq!(t.kept_bytes, full - 25);
        assert_eq!(t.kept_bytes + t.dropped_bytes, full - 3);
        assert_eq!(disk.file_bytes(&name).expect("file").len() as u64, t.kept_bytes);
    }

    #[test]
    fn corruption_in_an_older_segment_drops_the_later_ones() {
        let disk = SimDisk::new(0);
        write_segment(&disk, 1, &[1, 2]);
        write_segment(&disk, 2, &[3]);
        write_segment(&disk, 3, &[4]);
        let name = SegmentId(2).file_name();
        let mut bytes = disk.file_bytes(&name).expect("file");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        disk.set_file_bytes(&name, bytes);
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![1, 2]);
        let t = rec.truncation.expect("truncated");
        assert!(matches!(t.damage, Damage::Corrupt(Corruption::Checksum { .. })));
        assert!(!t.in_last_segment);
        assert_eq!(t.dropped_segments, vec![SegmentId(3)]);
        assert_eq!(rec.segments.len(), 2);
        assert_eq!(disk.list().expect("list").len(), 2);
    }

    #[test]
    fn torn_header_of_the_newest_segment_removes_it() {
        let disk = SimDisk::new(0);
        write_segment(&disk, 1, &[1]);
        disk.set_file_bytes(&SegmentId(2).file_name(), b"RBLK".to_vec());
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![1]);
        assert_eq!(rec.truncation.expect("truncated").damage, Damage::BadHeader);
        assert_eq!(disk.list().expect("list"), vec![SegmentId(1).file_name()]);
    }

    #[test]
    fn unknown_version_is_an_error_not_a_truncation() {
        let disk = SimDisk::new(0);
        let mut h = header(SegmentId(1));
        h[8..12].copy_from_slice(&(SEGMENT_FORMAT_VERSION + 1).to_le_bytes());
        let crc = crc32fast::hash(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        disk.set_file_bytes(&SegmentId(1).file_name(), h.to_vec());
        let err = recover::<_, SegmentError>(&disk, |_, _| Ok(())).expect_err("version");
        assert!(
            matches!(err, SegmentError::UnsupportedVersion { version: v, .. } if v == SEGMENT_FORMAT_VERSION + 1)
        );
        assert!(disk.file_bytes(&SegmentId(1).file_name()).is_some());
    }

    #[test]
    fn a_reused_file_ends_at_its_new_records_and_closing_cuts_the_old_ones() {
        let disk = SimDisk::new(0);
        // An old segment with more records than the new one will have.
        write_segment(&disk, 1, &[10, 11, 12, 13, 14, 15]);
        let old_len = disk.file_bytes(&SegmentId(1).file_name()).expect("file").len();
        disk.rename(&SegmentId(1).file_name(), &format!("1{FREE_SUFFIX}")).expect("rename");
        let mut seg = Segment::reuse(&disk, &format!("1{FREE_SUFFIX}"), SegmentId(2)).expect("reuse");
        let mut buf = Vec::new();
        Record::compact_to(GroupId(1), LogIndex(20)).encode_salted(&mut buf, seg.salt()).expect("encode");
        seg.append(&buf).expect("append");
        seg.sync().expect("sync");
        // Before closing, the old records are still in the file, past the new one.
        let name = SegmentId(2).file_name();
        assert_eq!(disk.file_bytes(&name).expect("file").len(), SEGMENT_HEADER_BYTES as usize + buf.len());
        disk.crash();
        assert_eq!(disk.file_bytes(&name).expect("file").len(), old_len, "old bytes reappear after a crash");
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![20], "the old records fail the new salt");
        let t = rec.truncation.expect("the scan stops at the old bytes");
        assert!(t.in_last_segment);
        assert!(matches!(t.damage, Damage::Corrupt(Corruption::Checksum { .. })), "{t:?}");
        assert_eq!(disk.file_bytes(&name).expect("file").len() as u64, t.kept_bytes, "cut there");

        // A closed reused segment holds nothing past its end, so a later segment can follow.
        write_segment(&disk, 3, &[1, 2, 3, 4, 5, 6, 7, 8]);
        disk.rename(&SegmentId(3).file_name(), &format!("3{FREE_SUFFIX}")).expect("rename");
        let mut seg = Segment::reuse(&disk, &format!("3{FREE_SUFFIX}"), SegmentId(3)).expect("reuse");
        seg.append(&buf[..0]).expect("append");
        seg.close().expect("close");
        write_segment(&disk, 4, &[30]);
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![20, 30]);
        assert_eq!(rec.truncation, None);
    }

    #[test]
    fn format_1_segments_are_still_read() {
        let disk = SimDisk::new(0);
        let mut h = header(SegmentId(1));
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&h[..20]);
        h[20..24].copy_from_slice(&crc.to_le_bytes());
        let mut bytes = h.to_vec();
        Record::compact_to(GroupId(1), LogIndex(7)).encode(&mut bytes).expect("encode");
        disk.set_file_bytes(&SegmentId(1).file_name(), bytes);
        let (seen, rec) = scan(&disk);
        assert_eq!(seen, vec![7]);
        assert_eq!(rec.truncation, None);
    }

    #[test]
    fn a_missing_middle_segment_is_an_error() {
        let disk = SimDisk::new(0);
        write_segment(&disk, 1, &[1]);
        write_segment(&disk, 3, &[2]);
        let err = recover::<_, SegmentError>(&disk, |_, _| Ok(())).expect_err("gap");
        assert!(matches!(err, SegmentError::Missing { missing: SegmentId(2), .. }));
    }
}
