//! The WAL on real files (in a temporary directory), once per engine (`StdDisk` and
//! `UringDisk`, through `NodeDisk`): reopen, damage the tail the way a crash or a bad disk
//! would, reopen again.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use raftblk_replication::wal::disk::{NodeDisk, WalEngine};
use raftblk_replication::wal::record::{GroupId, HardState, LogIndex, NodeId, Record, Term};
use raftblk_replication::wal::segment::{Damage, SegmentId};
use raftblk_replication::wal::{Wal, WalOptions};

const A: GroupId = GroupId(1);
const B: GroupId = GroupId(2);

/// Runs each test once per engine: `mod name { fn sync(); fn io_uring() }`. The io_uring
/// run is skipped, with a note, where this kernel refuses io_uring.
macro_rules! per_engine {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn sync() {
                super::$name(WalEngine::Sync);
            }

            #[test]
            fn io_uring() {
                let tmp = tempfile::tempdir().expect("tempdir");
                match NodeDisk::open(tmp.path(), WalEngine::Uring) {
                    Ok(_) => super::$name(WalEngine::Uring),
                    Err(e) => eprintln!("skipping: io_uring unavailable: {e}"),
                }
            }
        }
    )*};
}

per_engine!(
    reopen_returns_what_was_synced,
    corrupt_last_record_is_detected_and_cut,
    record_cut_mid_way_is_detected_as_torn,
    compaction_deletes_old_segment_files,
    damage_in_an_older_segment_drops_every_later_segment,
);

fn open(dir: &Path, engine: WalEngine, segment_target_bytes: u64) -> Wal<NodeDisk> {
    let disk = NodeDisk::open(dir, engine).expect("disk");
    assert_eq!(disk.engine(), engine);
    Wal::open(disk, WalOptions { segment_target_bytes }).expect("open wal")
}

fn entry(g: GroupId, i: u64) -> Record {
    Record::entry(g, LogIndex(i), Term(1), Bytes::from(format!("{g}:{i}")))
}

fn data(wal: &Wal<NodeDisk>, g: GroupId) -> Vec<String> {
    let (Some(lo), Some(hi)) = (wal.first_index(g), wal.last_index(g)) else {
        return Vec::new();
    };
    wal.entries(g, lo, hi.next())
        .expect("entries")
        .into_iter()
        .map(|e| String::from_utf8(e.data.to_vec()).expect("utf8"))
        .collect()
}

fn expected(g: GroupId, range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| format!("{g}:{i}")).collect()
}

fn segment_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(id.file_name())
}

fn wal_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("name"))
        .filter(|n| SegmentId::parse_file_name(n).is_some())
        .collect();
    names.sort();
    names
}

/// Writes entries 1..=10 of A and B interleaved and a hard state for A, synced. Returns the
/// newest segment id and the file length before the last record (B's entry 10).
fn write_ten(dir: &Path, engine: WalEngine) -> (SegmentId, u64) {
    let mut wal = open(dir, engine, 1 << 20);
    for i in 1..=10 {
        wal.append(&[entry(A, i), entry(B, i)]).expect("append");
        if i == 5 {
            let hs = HardState { term: Term(1), vote: NodeId(1), commit: LogIndex(5) };
            wal.append(&[Record::hard_state(A, hs)]).expect("append");
        }
    }
    wal.sync().expect("sync");
    let last = *wal.segment_ids().last().expect("a segment");
    // Closed, so the file is as long as its records (an open io_uring file may be longer by
    // a direct write's zero padding).
    drop(wal);
    let len = std::fs::metadata(segment_path(dir, last)).expect("stat").len();
    (last, len - entry(B, 10).encoded_len() as u64)
}

fn reopen_returns_what_was_synced(engine: WalEngine) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    write_ten(dir, engine);
    std::fs::write(dir.join("README"), b"not a segment").expect("write");
    let wal = open(dir, engine, 1 << 20);
    assert_eq!(wal.recovery_report().truncation, None);
    assert_eq!(data(&wal, A), expected(A, 1..=10));
    assert_eq!(data(&wal, B), expected(B, 1..=10));
    assert_eq!(wal.hard_state(A).map(|h| h.commit), Some(LogIndex(5)));
    assert_eq!(wal.hard_state(B), None);
}

fn corrupt_last_record_is_detected_and_cut(engine: WalEngine) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (last, last_record_at) = write_ten(dir, engine);
    let path = segment_path(dir, last);
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    bytes[len - 2] ^= 0x5a; // inside B's entry 10 data
    std::fs::write(&path, &bytes).expect("write");

    let mut wal = open(dir, engine, 1 << 20);
    let t = wal.recovery_report().truncation.clone().expect("truncation");
    assert!(matches!(t.damage, Damage::Corrupt(_)), "{t:?}");
    assert!(t.in_last_segment);
    assert_eq!(t.segment, last);
    assert_eq!(t.kept_bytes, last_record_at);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), last_record_at);
    assert_eq!(data(&wal, A), expected(A, 1..=10));
    assert_eq!(data(&wal, B), expected(B, 1..=9));

    // The log goes on from there.
    wal.append(&[entry(B, 10), entry(B, 11)]).expect("append");
    wal.sync().expect("sync");
    drop(wal);
    let wal = open(dir, engine, 1 << 20);
    assert_eq!(wal.recovery_report().truncation, None);
    assert_eq!(data(&wal, B), expected(B, 1..=11));
}

fn record_cut_mid_way_is_detected_as_torn(engine: WalEngine) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (last, last_record_at) = write_ten(dir, engine);
    let path = segment_path(dir, last);
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(last_record_at + 7).expect("truncate");
    drop(f);

    let wal = open(dir, engine, 1 << 20);
    let t = wal.recovery_report().truncation.clone().expect("truncation");
    assert_eq!(t.damage, Damage::Torn);
    assert_eq!(t.kept_bytes, last_record_at);
    assert_eq!(t.dropped_bytes, 7);
    assert_eq!(data(&wal, A), expected(A, 1..=10));
    assert_eq!(data(&wal, B), expected(B, 1..=9));
}

fn compaction_deletes_old_segment_files(engine: WalEngine) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut wal = open(dir, engine, 1024);
    for i in 1..=200 {
        wal.append(&[entry(A, i), entry(B, i)]).expect("append");
        if i % 20 == 0 {
            wal.sync().expect("sync");
        }
    }
    let before = wal_files(dir);
    assert!(before.len() > 10, "{before:?}");
    // A has applied everything up to 190, B only up to 100: B holds the older segments.
    wal.append(&[Record::compact_to(A, LogIndex(191)), Record::compact_to(B, LogIndex(101))])
        .expect("compact");
    wal.sync().expect("sync");
    let middle = wal_files(dir);
    assert!(middle.len() < before.len(), "{middle:?}");
    assert!(middle.len() > 2, "B still needs its entries from 101: {middle:?}");
    assert_eq!(middle.len(), wal.segment_ids().len(), "the WAL and the directory agree");
    wal.append(&[Record::compact_to(B, LogIndex(191))]).expect("compact");
    wal.sync().expect("sync");
    let after = wal_files(dir);
    assert!(after.len() <= 2, "{after:?}");
    drop(wal);

    let wal = open(dir, engine, 1024);
    assert_eq!(data(&wal, A), expected(A, 191..=200));
    assert_eq!(data(&wal, B), expected(B, 191..=200));
    assert_eq!(wal.compacted_below(B), LogIndex(191));
}

fn damage_in_an_older_segment_drops_every_later_segment(engine: WalEngine) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut wal = open(dir, engine, 512);
    for i in 1..=60 {
        wal.append(&[entry(A, i)]).expect("append");
    }
    wal.sync().expect("sync");
    let ids = wal.segment_ids();
    drop(wal);
    assert!(ids.len() >= 4, "{ids:?}");

    // Flip a byte in the last record of the second segment.
    let path = segment_path(dir, ids[1]);
    let mut bytes = std::fs::read(&path).expect("read");
    let len = bytes.len();
    bytes[len - 1] ^= 1;
    std::fs::write(&path, &bytes).expect("write");

    let wal = open(dir, engine, 512);
    let t = wal.recovery_report().truncation.clone().expect("truncation");
    assert!(!t.in_last_segment);
    assert_eq!(t.segment, ids[1]);
    assert_eq!(t.dropped_segments, ids[2..].to_vec());
    // Opening started a fresh segment after the cut one, reusing the next id.
    assert_eq!(wal.segment_ids(), vec![ids[0], ids[1], ids[1].next()]);
    for gone in &ids[3..] {
        assert!(!segment_path(dir, *gone).exists(), "{gone} should be removed");
    }
    // What is left is a prefix of A's log.
    let got = data(&wal, A);
    assert!(!got.is_empty() && got.len() < 60);
    assert_eq!(got, expected(A, 1..=got.len() as u64));
}
