//! Entry points for the cargo-fuzz targets in `replication/fuzz`: every decoder of bytes that
//! arrive from a peer or from the disk. Each seals the fuzzer's bytes with a valid checksum
//! first, so the fuzzer explores the structure behind the CRC rather than the CRC, and checks
//! that whatever decodes survives an encode/decode round trip unchanged. None may panic.

use bytes::{BufMut, Bytes, BytesMut};

use crate::node::forward::{ForwardRequest, ForwardStatus};
use crate::node::raft_codec;
use crate::snapshot::chunk::Chunk;
use crate::transport::frame::{self, Body, Decoded as FrameDecoded, FRAME_HEADER_BYTES};
use crate::volume::command::{decode_batch, encode_batch};
use crate::wal::record::{self, Decoded as RecordDecoded};

/// `data` as a transport frame body (header and CRC made valid), then every payload it
/// carries through its own decoder: Raft messages, forwarded requests and their answers.
pub fn peer_frame(data: &[u8]) {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_BYTES + data.len());
    buf.put_u32_le(data.len() as u32);
    buf.put_u32_le(crc32fast::hash(data));
    buf.put_slice(data);
    let FrameDecoded::Complete(f) = frame::decode(&mut buf) else { return };
    let mut again = BytesMut::new();
    if f.encode(&mut again).is_ok() {
        match frame::decode(&mut again) {
            FrameDecoded::Complete(g) => assert_eq!(f, g, "a decoded frame changed in a round trip"),
            other => panic!("a re-encoded frame does not decode: {other:?}"),
        }
    }
    match f.body {
        Body::RaftBatch(messages) => {
            for m in messages {
                raft_message(&m.bytes);
            }
        }
        Body::AppRequest { payload, .. } => forward_request(payload),
        Body::AppResponse { payload, .. } => forward_status(payload),
        Body::Hello { .. } => {}
    }
}

fn raft_message(bytes: &Bytes) {
    if let Ok(m) = raft_codec::decode(bytes) {
        let again = Bytes::from(raft_codec::encode(m.clone()).expect("a decoded message encodes").concat());
        assert_eq!(raft_codec::decode(&again).as_ref(), Ok(&m), "Raft message round trip");
    }
}

fn forward_request(payload: Bytes) {
    if let Ok(r) = ForwardRequest::decode(payload) {
        assert_eq!(ForwardRequest::decode(r.encode()).as_ref(), Ok(&r), "forwarded request round trip");
    }
}

fn forward_status(payload: Bytes) {
    if let Ok(s) = ForwardStatus::decode(payload.clone()) {
        assert_eq!(ForwardStatus::decode(s.encode()).as_ref(), Ok(&s), "forwarded status round trip");
        if let ForwardStatus::Ok(inner) = s {
            // An answer may be a snapshot chunk, sealed blocks, or a scrub's findings.
            if let Ok(c) = Chunk::decode(inner.clone()) {
                assert_eq!(Chunk::decode(c.encode()).as_ref(), Ok(&c), "chunk round trip");
                let _ = c.blocks();
            }
            raftblk_blockdev::seal::fuzzing::sealed_metadata(&inner);
            scrub_chunk(&inner);
        }
    }
}

fn scrub_chunk(data: &[u8]) {
    if let Ok(c) = crate::volume::ScrubChunk::decode(data) {
        assert_eq!(
            crate::volume::ScrubChunk::decode(&c.encode()).as_ref(),
            Ok(&c),
            "scrub findings round trip"
        );
    }
}

/// `data` sealed with a CRC as a Raft entry's command batch and as a snapshot chunk.
pub fn sealed_payloads(data: &[u8]) {
    let mut sealed = BytesMut::from(data);
    sealed.put_u32_le(crc32fast::hash(data));
    let sealed = sealed.freeze();
    if let Ok(commands) = decode_batch(&sealed) {
        assert_eq!(
            decode_batch(&encode_batch(&commands)).as_ref(),
            Ok(&commands),
            "command batch round trip"
        );
    }
    if let Ok(c) = Chunk::decode(sealed) {
        assert_eq!(Chunk::decode(c.encode()).as_ref(), Ok(&c), "chunk round trip");
    }
    forward_request(Bytes::copy_from_slice(data));
    forward_status(Bytes::copy_from_slice(data));
    scrub_chunk(data);
}

/// `data` as a WAL record whose CRC is made valid (the first 8 bytes are its length and CRC
/// fields; the length is set to what follows the header).
pub fn wal_record(data: &[u8]) {
    if data.len() < record::HEADER_BYTES {
        let _ = record::decode(data);
        return;
    }
    let mut rec = data.to_vec();
    let payload = (rec.len() - record::HEADER_BYTES) as u32;
    rec[..4].copy_from_slice(&payload.to_le_bytes());
    let crc = record::checksum(&rec, 0);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    if let RecordDecoded::Complete(r, used) = record::decode(&rec) {
        assert_eq!(used, rec.len());
        let mut again = Vec::new();
        if r.encode(&mut again).is_ok() {
            match record::decode(&again) {
                RecordDecoded::Complete(s, _) => assert_eq!(r, s, "WAL record round trip"),
                other => panic!("a re-encoded WAL record does not decode: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harnesses run on a few inputs here too, so they build and hold without nightly.
    #[test]
    fn harnesses_accept_arbitrary_bytes() {
        let mut rng = 7u64;
        for len in [0usize, 1, 8, 17, 18, 40, 100, 600] {
            let data: Vec<u8> = (0..len).map(|_| crate::volume::group::xorshift64(&mut rng) as u8).collect();
            peer_frame(&data);
            sealed_payloads(&data);
            wal_record(&data);
        }
        // Real encodings go all the way through.
        let batch = encode_batch(&[crate::volume::command::Command::App { data: Bytes::from_static(b"x") }]);
        sealed_payloads(&batch[..batch.len() - 4]);
    }
}
