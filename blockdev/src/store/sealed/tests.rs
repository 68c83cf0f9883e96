use std::os::unix::fs::FileExt;

use super::*;
use crate::seal::backend::LogReporter;
use crate::seal::{Guard, Seal};
use crate::store::engine::tests::engines;

const MIB: u64 = 1 << 20;

fn new_store(engine: &IoEngine, size: u64) -> (tempfile::TempDir, SealedFile) {
    let dir = tempfile::tempdir().unwrap();
    let s =
        SealedFile::create(dir.path().join("vol.img"), size, engine.clone(), Arc::new(LogReporter)).unwrap();
    (dir, s)
}

fn write_of(first: u64, count: usize, seed: u8) -> BlockWrite {
    let data: Vec<u8> = (0..count * BLOCK_BYTES).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
    let seals = (0..count)
        .map(|i| Seal::plain(first + i as u64, &data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]))
        .collect();
    BlockWrite { first, data: Bytes::from(data), seals, guards: vec![] }
}

async fn reopen(dir: &tempfile::TempDir, engine: &IoEngine) -> SealedFile {
    SealedFile::open(dir.path().join("vol.img"), engine.clone(), Arc::new(LogReporter)).await.unwrap()
}

fn flip_file_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_read_back_and_survive_reopening() {
    for engine in engines() {
        let (dir, s) = new_store(&engine, MIB);
        let w = write_of(3, 5, 1);
        assert_eq!(SealedStore::write_blocks(&s, w.clone()).await.unwrap(), WriteOutcome::Written);
        let r = SealedStore::read_blocks(&s, 0, 10).await.unwrap();
        assert_eq!(&r.data[3 * BLOCK_BYTES..8 * BLOCK_BYTES], &w.data[..]);
        assert!(matches!(r.states[0], BlockState::Zero { version: 0 }));
        assert!(matches!(r.states[3], BlockState::Sealed { .. }));
        // Rewrite one block twice (both slots get used), then reopen without closing
        // (a crash after the writes completed) and after closing.
        for seed in [2, 3] {
            SealedStore::write_blocks(&s, write_of(4, 1, seed)).await.unwrap();
        }
        let first_seqs = s.seq_start;
        drop(s);
        let s = reopen(&dir, &engine).await;
        let r = SealedStore::read_blocks(&s, 4, 1).await.unwrap();
        assert_eq!(&r.data[..], &write_of(4, 1, 3).data[..], "{}", engine.name());
        let doubted_after_crash = s.doubted.clone();
        assert!(doubted_after_crash
            .ranges()
            .iter()
            .all(|&(from, to)| from >= first_seqs && to == s.seq_start));
        SealedStore::write_blocks(&s, write_of(5, 1, 4)).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let s = reopen(&dir, &engine).await;
        assert_eq!(&SealedStore::read_blocks(&s, 4, 1).await.unwrap().data[..], &write_of(4, 1, 3).data[..]);
        assert_eq!(s.doubted, doubted_after_crash, "a clean close doubts nothing new (and forgets nothing)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_data_and_records_on_disk_are_caught() {
    for engine in engines() {
        let (dir, s) = new_store(&engine, MIB);
        SealedStore::write_blocks(&s, write_of(0, 8, 9)).await.unwrap();
        s.close().await.unwrap();
        drop(s);
        let data = dir.path().join("vol.img");
        let meta = meta_path(&data);
        flip_file_byte(&data, 2 * BLOCK + 77);
        // Block 5's records: both slots (the written one and the empty one).
        flip_file_byte(&meta, 4096 + 5 * 128 + 20);
        flip_file_byte(&meta, 4096 + 5 * 128 + 64 + 20);
        let s = reopen(&dir, &engine).await;
        let r = SealedStore::read_blocks(&s, 0, 8).await.unwrap();
        assert_eq!(r.damaged().collect::<Vec<_>>(), vec![(2, Damage::Checksum), (5, Damage::Metadata)]);
        // A whole-block write replaces the damage.
        SealedStore::write_blocks(&s, write_of(2, 1, 4)).await.unwrap();
        let r = SealedStore::read_blocks(&s, 2, 1).await.unwrap();
        assert!(matches!(r.states[0], BlockState::Sealed { .. }));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_blocks_fail_their_checks() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(10, 2, 5)).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    // Swap the two blocks' data and their records: each now sits at the wrong index.
    let path = dir.path().join("vol.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let m = std::fs::OpenOptions::new().read(true).write(true).open(meta_path(&path)).unwrap();
    let (mut a, mut b) = (vec![0u8; BLOCK_BYTES], vec![0u8; BLOCK_BYTES]);
    f.read_exact_at(&mut a, 10 * BLOCK).unwrap();
    f.read_exact_at(&mut b, 11 * BLOCK).unwrap();
    f.write_all_at(&b, 10 * BLOCK).unwrap();
    f.write_all_at(&a, 11 * BLOCK).unwrap();
    let (mut ra, mut rb) = ([0u8; 128], [0u8; 128]);
    m.read_exact_at(&mut ra, 4096 + 10 * 128).unwrap();
    m.read_exact_at(&mut rb, 4096 + 11 * 128).unwrap();
    m.write_all_at(&rb, 4096 + 10 * 128).unwrap();
    m.write_all_at(&ra, 4096 + 11 * 128).unwrap();
    let s = reopen(&dir, &engine).await;
    let r = SealedStore::read_blocks(&s, 10, 2).await.unwrap();
    assert_eq!(r.damaged().count(), 2, "{:?}", r.states);
}

/// Writes the record of `w` (one block) as `put` would, but never its data: what a
/// kill -9 between the two leaves. Returns the slot the record went to.
async fn record_without_data(s: &SealedFile, w: &BlockWrite) -> usize {
    record_without_data_at(s, w, s.next_seq.load(Ordering::SeqCst) + 5).await
}

async fn record_without_data_at(s: &SealedFile, w: &BlockWrite, seq: u64) -> usize {
    let (pairs, _pin) = s.meta.pairs(w.first, 1).await.unwrap();
    let Target::Slot(slot) = s.target(&pairs[0]) else { panic!("a fresh record is trusted") };
    let record = Record { seq, version: 99, content: Content::Sealed(w.seals[0]) };
    let mut pair = if pairs[0].hole { [0u8; PAIR_BYTES] } else { pairs[0].bytes };
    pair[slot * RECORD_BYTES..(slot + 1) * RECORD_BYTES].copy_from_slice(&record.encode());
    let step = s.meta.update(w.first, &[pair]).await.unwrap();
    s.data.run_chain(vec![step]).await.unwrap();
    slot
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_record_and_data_leaves_the_old_block() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(7, 1, 1)).await.unwrap();
    let slot = record_without_data(&s, &write_of(7, 1, 2)).await;
    drop(s);
    // kill -9 here. The new record is the newest but not known complete: the old data is
    // what the block holds, and the next write must not overwrite the old record's slot.
    let s = reopen(&dir, &engine).await;
    let r = SealedStore::read_blocks(&s, 7, 1).await.unwrap();
    assert_eq!(&r.data[..], &write_of(7, 1, 1).data[..]);
    let (pairs, _pin) = s.meta.pairs(7, 1).await.unwrap();
    assert!(matches!(s.target(&pairs[0]), Target::NeedData), "an unconfirmed newest record is doubted");
    assert_eq!(s.target_by_data(&pairs[0], 7, &r.data), slot, "the stale record's slot is reused");
    SealedStore::write_blocks(&s, write_of(7, 1, 3)).await.unwrap();
    drop(s);
    let s = reopen(&dir, &engine).await;
    assert_eq!(&SealedStore::read_blocks(&s, 7, 1).await.unwrap().data[..], &write_of(7, 1, 3).data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_after_its_records_is_never_trusted() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(7, 1, 1)).await.unwrap();
    // A put dropped after its record went to the file, before its data did.
    let seq = s.take_seq().unwrap();
    record_without_data_at(&s, &write_of(7, 1, 2), seq).await;
    drop(Unfinished { store: &s, seq });
    let r = SealedStore::read_blocks(&s, 7, 1).await.unwrap();
    assert_eq!(&r.data[..], &write_of(7, 1, 1).data[..], "the old block is what is there");
    let (pairs, _pin) = s.meta.pairs(7, 1).await.unwrap();
    assert!(matches!(s.target(&pairs[0]), Target::NeedData), "the abandoned record is not trusted");
    drop(_pin);
    s.close().await.unwrap();
    drop(s);
    let s = reopen(&dir, &engine).await;
    assert!(s.doubted.contains(seq), "a close after an abandoned write is not clean: {:?}", s.doubted);
    SealedStore::write_blocks(&s, write_of(7, 1, 3)).await.unwrap();
    drop(s);
    let s = reopen(&dir, &engine).await;
    assert_eq!(&SealedStore::read_blocks(&s, 7, 1).await.unwrap().data[..], &write_of(7, 1, 3).data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_blocks_first_write_leaves_zeroes() {
    for engine in engines() {
        let (dir, s) = new_store(&engine, MIB);
        // Block 6 shares its metadata page with block 7 (so the page is no hole); block 40
        // is alone in its page.
        SealedStore::write_blocks(&s, write_of(7, 1, 1)).await.unwrap();
        for block in [6, 40] {
            record_without_data(&s, &write_of(block, 1, 2)).await;
        }
        drop(s);
        // The next process writes elsewhere, confirms (a flush) and crashes too: its
        // confirmation covers its own writes, not the first process's unfinished ones.
        for _ in 0..2 {
            let s = reopen(&dir, &engine).await;
            SealedStore::write_blocks(&s, write_of(8, 1, 3)).await.unwrap();
            SealedStore::flush(&s).await.unwrap();
        }
        let s = reopen(&dir, &engine).await;
        let r = SealedStore::read_blocks(&s, 6, 1).await.unwrap();
        assert_eq!(r.states, vec![BlockState::Zero { version: 0 }], "{}", engine.name());
        assert!(r.data.iter().all(|&b| b == 0));
        let r = SealedStore::read_blocks(&s, 40, 1).await.unwrap();
        assert_eq!(r.states, vec![BlockState::Zero { version: 0 }]);
        // A read-modify-write guarded by what that read saw goes through, and lands.
        let mut w = write_of(6, 1, 4);
        w.guards = vec![Guard { block: 6, version: 0 }];
        assert_eq!(SealedStore::write_blocks(&s, w.clone()).await.unwrap(), WriteOutcome::Written);
        drop(s);
        let s = reopen(&dir, &engine).await;
        assert_eq!(&SealedStore::read_blocks(&s, 6, 1).await.unwrap().data[..], &w.data[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_on_a_doubted_block_compares_the_version_its_data_matches() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(9, 1, 1)).await.unwrap();
    record_without_data(&s, &write_of(9, 1, 2)).await;
    drop(s);
    let s = reopen(&dir, &engine).await;
    let r = SealedStore::read_blocks(&s, 9, 1).await.unwrap();
    let version = r.states[0].version().unwrap();
    assert_ne!(version, 99, "the read saw the old block, not the unfinished write");
    let mut stale = write_of(9, 1, 3);
    stale.guards = vec![Guard { block: 9, version: 99 }];
    assert_eq!(
        SealedStore::write_blocks(&s, stale).await.unwrap(),
        WriteOutcome::GuardFailed { block: 9 },
        "a guard naming the unfinished write's version fails"
    );
    let mut w = write_of(9, 1, 4);
    w.guards = vec![Guard { block: 9, version }];
    assert_eq!(SealedStore::write_blocks(&s, w.clone()).await.unwrap(), WriteOutcome::Written);
    assert_eq!(&SealedStore::read_blocks(&s, 9, 1).await.unwrap().data[..], &w.data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroes_under_a_completed_first_record_are_damage() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(3, 1, 1)).await.unwrap();
    s.close().await.unwrap();
    drop(s);
    // The data lost after a clean close (a lost write on the disk): not a crash's zeroes.
    let f = std::fs::OpenOptions::new().write(true).open(dir.path().join("vol.img")).unwrap();
    f.write_all_at(&[0u8; BLOCK_BYTES], 3 * BLOCK).unwrap();
    let s = reopen(&dir, &engine).await;
    let r = SealedStore::read_blocks(&s, 3, 1).await.unwrap();
    assert_eq!(r.damaged().collect::<Vec<_>>(), vec![(3, Damage::Checksum)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_punch_whole_metadata_pages_and_keep_versions_at_the_ends() {
    for engine in engines() {
        let (dir, s) = new_store(&engine, 4 * MIB);
        SealedStore::write_blocks(&s, write_of(0, 100, 3)).await.unwrap();
        let before = s.meta.allocated_bytes().unwrap();
        CopyStore::apply_zero(&s, 10, 80, true, 4242).await.unwrap();
        let r = SealedStore::read_blocks(&s, 0, 100).await.unwrap();
        for (i, st) in r.states.iter().enumerate() {
            let want = match i {
                0..=9 | 90..=99 => "sealed",
                32..=63 => "zero@0",
                _ => "zero@4242",
            };
            let got = match st {
                BlockState::Sealed { .. } => "sealed",
                BlockState::Zero { version: 0 } => "zero@0",
                BlockState::Zero { version: 4242 } => "zero@4242",
                other => panic!("block {i}: {other:?}"),
            };
            assert_eq!(got, want, "block {i} ({})", engine.name());
        }
        assert!(r.data[10 * BLOCK_BYTES..90 * BLOCK_BYTES].iter().all(|&b| b == 0));
        if is_sparse_fs(dir.path()) {
            assert!(s.meta.allocated_bytes().unwrap() < before, "a whole page of records was punched");
        }
        drop(s);
        let s = reopen(&dir, &engine).await;
        let r = SealedStore::read_blocks(&s, 32, 1).await.unwrap();
        assert_eq!(r.states[0], BlockState::Zero { version: 0 });
    }
}

fn is_sparse_fs(path: &Path) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::statfs(path).map(|s| [EXT4, XFS, BTRFS, TMPFS].contains(&(s.f_type as i64))).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_page_punched_before_its_data_reads_as_zero() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (_dir, s) = new_store(&engine, MIB);
    SealedStore::write_blocks(&s, write_of(32, 32, 8)).await.unwrap();
    // The first step of a trim of page 1, then a crash before the data punch.
    let step = s.meta.punch(1, 2).await.unwrap();
    s.data.run_chain(vec![step]).await.unwrap();
    let r = SealedStore::read_blocks(&s, 32, 32).await.unwrap();
    assert!(r.states.iter().all(|st| *st == BlockState::Zero { version: 0 }));
    assert!(r.data.iter().all(|&b| b == 0), "the stale data is not returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_and_repairs() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let (dir, s) = new_store(&engine, MIB);
    CopyStore::apply_write(&s, write_of(1, 2, 1), 500).await.unwrap();
    let mut w = write_of(1, 2, 2);
    w.guards.push(Guard { block: 2, version: 499 });
    assert_eq!(
        CopyStore::apply_write(&s, w.clone(), 501).await.unwrap(),
        WriteOutcome::GuardFailed { block: 2 }
    );
    w.guards[0].version = 500;
    assert_eq!(CopyStore::apply_write(&s, w, 501).await.unwrap(), WriteOutcome::Written);
    let good = CopyStore::read_blocks(&s, 1, 2).await.unwrap();
    let image = BlockImage::of(&good).unwrap();
    // Damage block 2; a repair restores only it.
    flip_file_byte(&dir.path().join("vol.img"), 2 * BLOCK + 5);
    // The page cache of the data file is what reads see; the flip went through it.
    let r = CopyStore::read_blocks(&s, 1, 2).await.unwrap();
    assert_eq!(r.damaged().collect::<Vec<_>>(), vec![(2, Damage::Checksum)]);
    assert_eq!(CopyStore::restore(&s, image.clone(), true).await.unwrap(), 1, "only the damaged block");
    let r = CopyStore::read_blocks(&s, 1, 2).await.unwrap();
    assert_eq!(r, good);
    // Nothing damaged: a repair writes nothing.
    assert_eq!(CopyStore::restore(&s, image, true).await.unwrap(), 0);
    assert_eq!(CopyStore::read_blocks(&s, 1, 2).await.unwrap(), good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_files_without_metadata_are_sealed_on_open() {
    let engine = IoEngine::start(crate::store::EngineKind::Sync, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MIB).unwrap();
    f.write_all_at(&[6u8; 8192], 5 * BLOCK).unwrap();
    drop(f);
    let s = SealedFile::open(&path, engine, Arc::new(LogReporter)).await.unwrap();
    let r = SealedStore::read_blocks(&s, 4, 3).await.unwrap();
    assert_eq!(r.states[0], BlockState::Zero { version: 0 });
    assert!(matches!(r.states[1], BlockState::Sealed { version: IMPORTED_VERSION, .. }));
    assert!(r.data[BLOCK_BYTES..].iter().all(|&b| b == 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_block_leave_one_of_them() {
    for engine in engines() {
        let (dir, s) = new_store(&engine, MIB);
        let s = Arc::new(s);
        let tasks: Vec<_> = (0..32u8)
            .map(|seed| {
                let s = s.clone();
                tokio::spawn(async move { SealedStore::write_blocks(s.as_ref(), write_of(9, 1, seed)).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let r = SealedStore::read_blocks(s.as_ref(), 9, 1).await.unwrap();
        assert!(matches!(r.states[0], BlockState::Sealed { .. }), "{:?}", r.states);
        drop(s);
        let s = reopen(&dir, &engine).await;
        assert!(matches!(
            SealedStore::read_blocks(&s, 9, 1).await.unwrap().states[0],
            BlockState::Sealed { .. }
        ));
    }
}
