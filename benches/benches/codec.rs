//! Micro-benchmarks of the NBD request codec: framing + validation of a 4 KiB
//! write and a read, and encoding a structured read reply.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use raftblk_blockdev::nbd::proto::{cmd, Cookie};
use raftblk_blockdev::nbd::reply::structured_offset_data;
use raftblk_blockdev::nbd::request::{decode_frame, validate, RequestHeader, TransmissionPolicy};

fn request_bytes(kind: u16, len: u32, payload: usize, count: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..count {
        let h = RequestHeader { flags: 0, kind, cookie: Cookie(i as u64), offset: (i as u64) * 4096, len };
        buf.extend_from_slice(&h.encode());
        buf.extend_from_slice(&vec![0xa5u8; payload]);
    }
    buf
}

fn codec(c: &mut Criterion) {
    let policy = TransmissionPolicy { read_only: false, structured_replies: true, base_allocation: None };
    const BATCH: usize = 256;
    let mut g = c.benchmark_group("nbd_codec");
    g.throughput(Throughput::Elements(BATCH as u64));
    let writes = request_bytes(cmd::WRITE, 4096, 4096, BATCH);
    g.bench_function("decode_validate_write_4k", |b| {
        b.iter(|| {
            let mut buf = writes.clone();
            while let Ok(Some(frame)) = decode_frame(&mut buf) {
                black_box(validate(frame, 1 << 30, &policy).is_ok());
            }
        })
    });
    let reads = request_bytes(cmd::READ, 4096, 0, BATCH);
    g.bench_function("decode_validate_read_4k", |b| {
        b.iter(|| {
            let mut buf = reads.clone();
            while let Ok(Some(frame)) = decode_frame(&mut buf) {
                black_box(validate(frame, 1 << 30, &policy).is_ok());
            }
        })
    });
    let data = Bytes::from(vec![0x5au8; 4096]);
    g.bench_function("encode_structured_read_4k", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                black_box(structured_offset_data(Cookie(i as u64), 0, data.clone(), true).is_ok());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
