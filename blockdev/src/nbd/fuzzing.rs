//! Bodies of the cargo-fuzz targets in `blockdev/fuzz`, kept here so that a plain
//! `cargo test` runs them too (see the tests below). Each takes arbitrary bytes,
//! must never panic on them, and asserts the invariants the sans-IO modules promise.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::handshake::{Handshake, HandshakeError, Progress};
use super::proto::{
    rep, Cookie, MetaContextId, BASE_ALLOCATION_CONTEXT_ID, MAX_BLOCK_SIZE_BYTES, OPTION_REPLY_MAGIC,
};
use super::reply::{self, Chunk, ReplyMessage};
use super::request::{decode_frame, validate, Command, TransmissionPolicy};
use super::{ExportCatalog, ExportInfo, OpenError, OpenExport};
use crate::backend::{Extent, ExtentKind};
use crate::store::MemBackend;

/// A catalog for fuzzing: "a" (writable), "ro" (read-only), "" (default), "deny" (refused).
#[derive(Debug, Default)]
pub struct FuzzCatalog;

impl ExportCatalog for FuzzCatalog {
    fn list(&self) -> Vec<ExportInfo> {
        vec![
            ExportInfo { name: "a".into(), description: "writable".into() },
            ExportInfo { name: "ro".into(), description: "read-only".into() },
        ]
    }

    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        let read_only = match name {
            "a" | "" => false,
            "ro" => true,
            "deny" => return Err(OpenError::Refused("denied".into())),
            other => return Err(OpenError::NotFound(other.into())),
        };
        Ok(OpenExport {
            backend: Arc::new(MemBackend::new(1 << 20)),
            read_only,
            multi_conn: true,
            description: format!("{name} export"),
            guard: Box::new(()),
        })
    }
}

/// Checks that `out` is a run of well-formed option replies, optionally followed by
/// an `NBD_OPT_EXPORT_NAME` reply (10 or 134 bytes) when `may_end_with_export` is set.
fn check_option_replies(mut out: &[u8], may_end_with_export: bool) {
    while out.len() >= 20 && out[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
        let kind = u32::from_be_bytes([out[12], out[13], out[14], out[15]]);
        let len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
        assert!(out.len() >= 20 + len, "option reply overruns the output");
        if kind == rep::ACK {
            assert_eq!(len, 0, "ACK carries no data");
        }
        out = &out[20 + len..];
    }
    if may_end_with_export {
        assert!(matches!(out.len(), 0 | 10 | 134), "bad EXPORT_NAME reply of {} bytes", out.len());
    } else {
        assert!(out.is_empty(), "{} stray bytes after option replies", out.len());
    }
}

/// Fuzz body of the `handshake` target: the first byte picks how the rest is split
/// into reads; the rest is what the client sends.
pub fn handshake(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split % 32) + 1;
    let mut hs = Handshake::new(Arc::new(FuzzCatalog));
    let mut input = BytesMut::new();
    for piece in rest.chunks(chunk) {
        input.extend_from_slice(piece);
        let mut out = BytesMut::new();
        let before = input.len();
        match hs.receive(&mut input, &mut out) {
            Ok(Progress::NeedMore) => {
                assert!(input.len() <= before);
                check_option_replies(&out, false);
            }
            Ok(Progress::Aborted) => {
                check_option_replies(&out, false);
                return;
            }
            Ok(Progress::Done(n)) => {
                // GO ends with an ACK; EXPORT_NAME with the export size and flags.
                check_option_replies(&out, true);
                assert_eq!(n.size_bytes, n.export.backend.size_bytes());
                assert_eq!(n.policy.read_only, n.export.read_only);
                if n.policy.base_allocation.is_some() {
                    assert!(n.policy.structured_replies);
                    assert_eq!(n.policy.base_allocation, Some(BASE_ALLOCATION_CONTEXT_ID));
                }
                return;
            }
            Err(HandshakeError::Finished) => panic!("receive after the handshake finished"),
            Err(_) => return,
        }
    }
}

/// A reply decoded from its encoding must equal what was encoded.
fn round_trip(r: &reply::EncodedReply, simple_data_len: usize) -> ReplyMessage {
    let mut buf = BytesMut::from(&r.to_vec()[..]);
    let msg = match reply::decode_reply(&mut buf, |_| simple_data_len) {
        Ok(Some(m)) => m,
        other => panic!("encoded reply does not decode: {other:?}"),
    };
    assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    msg
}

/// Fuzz body of the `request` target: byte 0 picks the negotiated policy, bytes 1..9
/// the export size; the rest is a request stream. Every frame is validated, and a
/// plausible reply is encoded and decoded back. Arbitrary bytes are also fed to the
/// reply decoder.
pub fn request(data: &[u8]) {
    if data.len() < 9 {
        return;
    }
    let policy = TransmissionPolicy {
        read_only: data[0] & 1 != 0,
        structured_replies: data[0] & 2 != 0,
        base_allocation: (data[0] & 4 != 0).then_some(MetaContextId(1)),
    };
    let mut size = [0u8; 8];
    size.copy_from_slice(&data[1..9]);
    let size = u64::from_be_bytes(size);
    let stream = &data[9..];

    // The reply decoder must survive anything.
    let mut junk = BytesMut::from(stream);
    while let Ok(Some(_)) = reply::decode_reply(&mut junk, |c| (c.0 % 4096) as usize) {}

    let mut buf = BytesMut::from(stream);
    let sr = policy.structured_replies;
    loop {
        let frame = match decode_frame(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        let cookie = frame.header.cookie;
        let header = frame.header;
        match validate(frame, size, &policy) {
            Err(rej) => {
                assert_ne!(rej.errno.0, 0);
                match round_trip(&reply::error_reply(sr, cookie, rej.errno, rej.reason), 0) {
                    ReplyMessage::Simple { cookie: c, errno, data } => {
                        assert!(!sr);
                        assert_eq!((c, errno, data.len()), (cookie, rej.errno.0, 0));
                    }
                    ReplyMessage::Chunk { cookie: c, chunk: Chunk::Error { errno, message }, .. } => {
                        assert!(sr);
                        assert_eq!((c, errno), (cookie, rej.errno.0));
                        assert_eq!(&message[..], rej.reason.as_bytes());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            Ok(cmd) => check_command(&cmd, header.offset, header.len, size, &policy, cookie),
        }
    }
}

fn check_command(
    cmd: &Command,
    offset: u64,
    len: u32,
    size: u64,
    policy: &TransmissionPolicy,
    cookie: Cookie,
) {
    let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
    match cmd {
        Command::Disconnect | Command::Flush => {}
        Command::Read { .. } | Command::Cache { .. } => assert!(in_range),
        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. } => {
            assert!(in_range && !policy.read_only)
        }
        Command::BlockStatus { .. } => {
            assert!(in_range && len > 0 && policy.structured_replies);
            assert!(policy.base_allocation.is_some());
        }
    }
    match cmd {
        Command::Read { offset, len } if *len > 0 => {
            assert!(*len <= MAX_BLOCK_SIZE_BYTES);
            let n = (*len).min(64) as usize;
            let data = Bytes::from(vec![0xa5u8; n]);
            if policy.structured_replies {
                let r = reply::structured_offset_data(cookie, *offset, data.clone(), true);
                let msg = round_trip(&r.unwrap_or_else(|e| panic!("{e}")), 0);
                assert!(matches!(msg, ReplyMessage::Chunk {
                    chunk: Chunk::OffsetData { offset: o, data: d }, ..
                } if o == *offset && d == data));
            } else {
                let msg = round_trip(&reply::simple_read(cookie, data.clone()), n);
                assert_eq!(msg, ReplyMessage::Simple { cookie, errno: 0, data });
            }
        }
        Command::Write { data, .. } => assert_eq!(data.len(), len as usize),
        Command::BlockStatus { len, req_one, context, offset } => {
            // Pseudo extents derived from the request, alternating data and holes.
            let step = u64::from(*len / 3).max(1) + (offset % 7);
            let extents: Vec<Extent> = (0..5)
                .map(|i| Extent {
                    len_bytes: step * (i + 1),
                    kind: if i % 2 == 0 { ExtentKind::Data } else { ExtentKind::Hole },
                })
                .collect();
            let ds = reply::descriptors_from_extents(&extents, *len, *req_one);
            assert!(!ds.is_empty());
            assert!(!*req_one || ds.len() == 1);
            let total: u64 = ds.iter().map(|d| u64::from(d.len_bytes)).sum();
            assert!(total <= u64::from(*len));
            let r = reply::structured_block_status(cookie, *context, &ds, true);
            let msg = round_trip(&r.unwrap_or_else(|e| panic!("{e}")), 0);
            assert!(matches!(msg, ReplyMessage::Chunk {
                chunk: Chunk::BlockStatus { descriptors, .. }, ..
            } if descriptors == ds));
        }
        _ => {
            let msg = round_trip(&reply::ok_reply(policy.structured_replies, cookie), 0);
            assert_eq!(msg.cookie(), cookie);
        }
    }
}

/// Seeds that reach deep states: a valid negotiation, a valid request stream.
pub fn seed_inputs() -> (Vec<u8>, Vec<u8>) {
    use super::proto::{client_flags, cmd, cmd_flags, opt, BASE_ALLOCATION, IHAVEOPT};
    use super::request::RequestHeader;
    let mut hs = vec![7u8];
    hs.put_u32(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    let mut opt_msg = |code: u32, body: &[u8]| {
        hs.put_u64(IHAVEOPT);
        hs.put_u32(code);
        hs.put_u32(body.len() as u32);
        hs.put_slice(body);
    };
    opt_msg(opt::LIST, &[]);
    opt_msg(opt::STRUCTURED_REPLY, &[]);
    let mut meta = Vec::new();
    meta.put_u32(1);
    meta.put_slice(b"a");
    meta.put_u32(1);
    meta.put_u32(BASE_ALLOCATION.len() as u32);
    meta.put_slice(BASE_ALLOCATION.as_bytes());
    opt_msg(opt::LIST_META_CONTEXT, &meta);
    opt_msg(opt::SET_META_CONTEXT, &meta);
    opt_msg(opt::INFO, &[0, 0, 0, 2, b'r', b'o', 0, 1, 0, 3]);
    opt_msg(opt::GO, &[0, 0, 0, 1, b'a', 0, 2, 0, 1, 0, 2]);

    let mut rq = vec![6u8];
    rq.put_u64(1 << 20);
    let reqs = [
        (cmd::WRITE, cmd_flags::FUA, 0u64, 8u32),
        (cmd::READ, cmd_flags::DF, 0, 4096),
        (cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, 8192),
        (cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 4096, 4096),
        (cmd::TRIM, 0, 0, 4096),
        (cmd::READ, 0, (1 << 20) - 1, 2),
        (cmd::FLUSH, 0, 0, 0),
        (cmd::DISC, 0, 0, 0),
    ];
    for (i, (kind, flags, offset, len)) in reqs.into_iter().enumerate() {
        let h = RequestHeader { flags, kind, cookie: Cookie(i as u64), offset, len };
        rq.put_slice(&h.encode());
        if kind == cmd::WRITE {
            rq.put_bytes(0x5a, len as usize);
        }
    }
    (hs, rq)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Random bytes, or a seed with a few random mutations (to get past the magics).
    fn input(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        if rng.below(4) == 0 {
            let n = rng.below(512);
            return (0..n).map(|_| rng.next() as u8).collect();
        }
        let mut v = seed.to_vec();
        for _ in 0..rng.below(6) {
            match rng.below(3) {
                0 if !v.is_empty() => {
                    let i = rng.below(v.len());
                    v[i] = rng.next() as u8;
                }
                1 if !v.is_empty() => {
                    v.truncate(rng.below(v.len()));
                }
                _ => {
                    let i = rng.below(v.len() + 1);
                    v.insert(i, rng.next() as u8);
                }
            }
        }
        v
    }

    #[test]
    fn seeds_reach_transmission_and_validate() {
        let (hs, rq) = seed_inputs();
        handshake(&hs);
        request(&rq);
        // The handshake seed must actually complete negotiation.
        let mut h = Handshake::new(Arc::new(FuzzCatalog));
        let mut input = BytesMut::from(&hs[1..]);
        let mut out = BytesMut::new();
        let Ok(Progress::Done(n)) = h.receive(&mut input, &mut out) else {
            panic!("seed did not finish the handshake")
        };
        assert_eq!(n.export_name, "a");
        assert_eq!(n.policy.base_allocation, Some(BASE_ALLOCATION_CONTEXT_ID));
    }

    #[test]
    fn fuzz_bodies_survive_pseudo_random_inputs() {
        let (hs_seed, rq_seed) = seed_inputs();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..3000 {
            handshake(&input(&mut rng, &hs_seed));
            request(&input(&mut rng, &rq_seed));
        }
    }
}
