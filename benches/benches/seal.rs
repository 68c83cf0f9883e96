//! Micro-benchmarks of sealing: the crc32c of a block, AES-256-GCM of a 4 KiB block and of
//! 1 MiB (encrypt and decrypt), and a SealingBackend write and read of 4 KiB over memory.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use raftblk_blockdev::seal::backend::{LogReporter, VolumeCrypto};
use raftblk_blockdev::seal::nonce::MemReserver;
use raftblk_blockdev::seal::{block_crc, DataKey, MemSealedStore, NonceSource, SealingBackend, BLOCK_BYTES};
use raftblk_blockdev::BlockBackend;

fn seal(c: &mut Criterion) {
    let key = DataKey::generate(1).expect("key");
    let mut g = c.benchmark_group("seal");
    let block = vec![0x5au8; BLOCK_BYTES];
    g.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    g.bench_function("crc32c_4k", |b| b.iter(|| black_box(block_crc(7, &block))));
    let mut out = vec![0u8; BLOCK_BYTES];
    g.bench_function("encrypt_4k", |b| {
        b.iter(|| black_box(key.encrypt_block(&[1; 16], 7, [2; 12], &block, &mut out).expect("encrypt")))
    });
    let sealed = key.encrypt_block(&[1; 16], 7, [2; 12], &block, &mut out).expect("encrypt");
    let stored = out.clone();
    let mut plain = vec![0u8; BLOCK_BYTES];
    g.bench_function("decrypt_4k", |b| {
        b.iter(|| key.decrypt_block(&[1; 16], 7, &sealed, &stored, &mut plain).expect("decrypt"))
    });
    let big = vec![0x33u8; 1 << 20];
    let mut big_out = vec![0u8; 1 << 20];
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("encrypt_1m", |b| {
        b.iter(|| {
            for (i, (src, dst)) in big.chunks(BLOCK_BYTES).zip(big_out.chunks_mut(BLOCK_BYTES)).enumerate() {
                black_box(key.encrypt_block(&[1; 16], i as u64, [3; 12], src, dst).expect("encrypt"));
            }
        })
    });
    g.finish();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut g = c.benchmark_group("sealing_backend");
    g.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    for encrypted in [false, true] {
        let store = Arc::new(MemSealedStore::new(64 << 20));
        let b = if encrypted {
            let nonces = NonceSource::new(1, Arc::new(MemReserver::default()), 1 << 24);
            let crypto = VolumeCrypto { key: DataKey::generate(1).expect("key"), volume: [1; 16], nonces };
            SealingBackend::encrypted(store, crypto, Arc::new(LogReporter))
        } else {
            SealingBackend::plain(store, Arc::new(LogReporter))
        };
        let name = if encrypted { "encrypted" } else { "plain" };
        let data = Bytes::from(vec![9u8; BLOCK_BYTES]);
        g.bench_function(format!("write_4k_{name}"), |bench| {
            bench.iter(|| rt.block_on(b.write(8192, data.clone(), false)).expect("write"))
        });
        g.bench_function(format!("read_4k_{name}"), |bench| {
            bench.iter(|| black_box(rt.block_on(b.read(8192, BLOCK_BYTES as u32)).expect("read")))
        });
    }
    g.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
