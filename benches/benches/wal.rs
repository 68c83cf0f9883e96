//! The replication WAL's group commit, once per WAL engine (`sync`: pwrite per append +
//! fdatasync; `io_uring`: appends buffered, writes linked to the fdatasync in one
//! submission).
//!
//! Run with `cargo bench -p raftblk-benches --bench wal`. One iteration is one runner round:
//! one `Wal::append` per group (a 4 KiB entry each, as a client write would make) and one
//! `Wal::sync`. The temporary directory is on the file system of `$TMPDIR`; on tmpfs the
//! fdatasync is free and the comparison says little.

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raftblk_replication::wal::disk::{NodeDisk, WalEngine};
use raftblk_replication::wal::record::{GroupId, LogIndex, Record, Term};
use raftblk_replication::wal::{Wal, WalOptions};

const ENTRY_BYTES: usize = 4096;

fn wal(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_round");
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let data = Bytes::from(vec![0x5au8; ENTRY_BYTES]);
    for groups in [1u64, 16] {
        group.throughput(Throughput::Bytes(groups * ENTRY_BYTES as u64));
        for engine in [WalEngine::Sync, WalEngine::Uring] {
            let dir = match tempfile::tempdir() {
                Ok(dir) => dir,
                Err(e) => panic!("tempdir: {e}"),
            };
            let disk = match NodeDisk::open(dir.path(), engine) {
                Ok(disk) => disk,
                Err(e) => {
                    eprintln!("skipping the {engine} WAL engine: {e}");
                    continue;
                }
            };
            let mut wal = match Wal::open(disk, WalOptions::default()) {
                Ok(wal) => wal,
                Err(e) => panic!("open the WAL: {e}"),
            };
            let mut next = vec![1u64; groups as usize];
            group.bench_function(BenchmarkId::new(engine.to_string(), format!("{groups}_groups")), |b| {
                b.iter(|| {
                    for (g, index) in next.iter_mut().enumerate() {
                        let record =
                            Record::entry(GroupId(g as u64), LogIndex(*index), Term(1), data.clone());
                        *index += 1;
                        if let Err(e) = wal.append(&[record]) {
                            panic!("append: {e}");
                        }
                    }
                    if let Err(e) = wal.sync() {
                        panic!("sync: {e}");
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, wal);
criterion_main!(benches);
