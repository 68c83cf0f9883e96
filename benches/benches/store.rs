//! 4 KiB random writes and reads through `FileBackend`, once per I/O engine.
//!
//! Run with `cargo bench -p raftblk-benches --bench store`. Each request is
//! awaited before the next (queue depth 1), so this measures per-request latency
//! of the store path; the fio runner measures throughput at depth.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raftblk_blockdev::store::{AlignedBuf, EngineKind, FileBackend, IoEngine};
use raftblk_blockdev::BlockBackend;

const VOLUME_BYTES: u64 = 64 << 20;
const IO_BYTES: usize = 4096;
const FILL_CHUNK_BYTES: usize = 1 << 20;

/// xorshift64: a cheap, seedable source of block numbers.
struct Blocks(u64);

impl Blocks {
    fn next_offset(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (VOLUME_BYTES / IO_BYTES as u64)) * IO_BYTES as u64
    }
}

fn payload(len: usize, byte: u8) -> Bytes {
    let mut buf = AlignedBuf::zeroed(len);
    buf.as_mut_slice().fill(byte);
    buf.into_bytes()
}

fn store(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let mut group = c.benchmark_group("store_4k_random");
    group.throughput(Throughput::Bytes(IO_BYTES as u64));
    group.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));

    for kind in [EngineKind::Uring, EngineKind::Sync] {
        let engine = match IoEngine::start(kind, 1) {
            Ok(engine) => engine,
            Err(e) => {
                eprintln!("skipping the {kind} engine: {e}");
                continue;
            }
        };
        let name = engine.name();
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => panic!("tempdir: {e}"),
        };
        let backend = match FileBackend::create(dir.path().join("vol"), VOLUME_BYTES, engine) {
            Ok(b) => b,
            Err(e) => panic!("create volume: {e}"),
        };
        // Fill the volume so that reads hit allocated blocks, not holes.
        rt.block_on(async {
            let chunk = payload(FILL_CHUNK_BYTES, 0xa5);
            for offset in (0..VOLUME_BYTES).step_by(FILL_CHUNK_BYTES) {
                if let Err(e) = backend.write(offset, chunk.clone(), false).await {
                    panic!("fill: {e}");
                }
            }
            if let Err(e) = backend.flush().await {
                panic!("flush: {e}");
            }
        });

        let data = payload(IO_BYTES, 0x5a);
        let mut blocks = Blocks(0x9e37_79b9_7f4a_7c15);
        group.bench_function(BenchmarkId::new("write", name), |b| {
            b.iter(|| {
                let offset = blocks.next_offset();
                rt.block_on(backend.write(offset, data.clone(), false)).map_err(|e| e.to_string())
            })
        });
        group.bench_function(BenchmarkId::new("read", name), |b| {
            b.iter(|| {
                let offset = blocks.next_offset();
                black_box(rt.block_on(backend.read(offset, IO_BYTES as u32)).map_err(|e| e.to_string()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
