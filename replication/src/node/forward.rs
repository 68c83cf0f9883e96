//! The wire form of client I/O forwarded from the node a client is connected to
//! to the volume's leader (carried as transport application messages), sans-IO.
//!
//! Request:  `[op u8][group u64][a u64][b u64][data]` (little-endian):
//!
//! ```text
//! 0 Read       a = first block, b = count
//! 1 Write      data = a command batch holding one Write (sealed blocks, see volume::command)
//! 2 Zero       a = first block, b = count, data = [deallocate u8]
//! 3 Flush      (every write acknowledged before it made durable)
//! 4 Resize     a = size
//! 5 Control    data = the daemon's message
//! 6 ReadChunk  a = offset, b = length, data = [min index u64]   (snapshot chunks)
//! 7 ReadCopy   a = first block, b = count, data = [min applied u64]  (repairs)
//! 8 Scrub      a = first block, b = count, data = [scrub id u64]      (through the log)
//! 9 ScrubResult a = first block, data = [scrub id u64]   (what the receiver's copy found)
//! 10 Repair    a = first block, b = count   (the receiver repairs its own copy's damage)
//! ```
//!
//! Response: `[status u8][hint u64][data]`; data only for a successful read (sealed blocks
//! as `raftblk_blockdev::seal::wire::encode_blocks` writes them) or chunk. Blocks travel
//! sealed both ways: an encrypted volume's plaintext never crosses the network.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftblk_blockdev::seal::{BlockWrite, BLOCK};

use crate::volume::command::{decode_batch, encode_batch, Command};
use crate::wal::record::GroupId;

/// What a forwarded request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOp {
    /// Linearizable read of `count` sealed blocks.
    Read { first: u64, count: u32 },
    /// Replicated write of sealed blocks.
    Write(BlockWrite),
    /// Makes every write the leader acknowledged before it durable.
    Flush,
    /// Replicated zeroing of blocks.
    Zero { first: u64, count: u64, deallocate: bool },
    /// Replicated grow to `size` bytes.
    Resize { size: u64 },
    /// A control-plane message for the daemon (the group is ignored); opaque here.
    Control { payload: Bytes },
    /// A snapshot chunk: `len` bytes at `offset` of the receiver's store, which must have
    /// applied at least `min_index` (see [`crate::snapshot`]).
    ReadChunk { offset: u64, len: u64, min_index: u64 },
    /// Blocks of the receiver's own copy, which must have applied at least `min_applied`
    /// (to repair a damaged copy elsewhere; no leadership needed).
    ReadCopy { first: u64, count: u32, min_applied: u64 },
    /// A scrub command committed through the log (every copy checks the blocks).
    Scrub { id: u64, first: u64, count: u32 },
    /// What the receiver's copy found for scrub `id` at `first` (NotReady until it applied it).
    ScrubResult { id: u64, first: u64 },
    /// The receiver repairs damaged blocks of its own copy from the other copies; answers
    /// `[repaired u32][still damaged u32]`.
    Repair { first: u64, count: u32 },
}

/// A forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRequest {
    /// The volume's group.
    pub group: GroupId,
    /// The operation.
    pub op: ForwardOp,
}

/// How the leader answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardStatus {
    /// Done; `data` holds what a read returned.
    Ok(Bytes),
    /// The receiver is not the leader; retry at the hint (0: unknown).
    NotLeader(u64),
    /// The receiver has no replica of the group.
    NotMember,
    /// The request reached past the end of the volume, `size` bytes on the receiver.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The receiver cannot serve the request now (shutting down, its store failed, no
    /// leader in time); another node may.
    Unavailable(String),
    /// The request itself is wrong (undecodable, or not one the receiver serves): asking
    /// again changes nothing.
    Refused(String),
    /// The receiver's store has not applied the index a snapshot chunk needs (or is being
    /// rebuilt itself): ask another member.
    NotReady,
    /// A guarded write found the block changed: read it again and retry.
    GuardFailed(u64),
}

/// Why bytes are not a forwarded request or response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Shorter than its header says.
    #[error("forwarded message is truncated")]
    Truncated,
    /// Unknown op or status code.
    #[error("unknown forwarded op or status {0}")]
    Unknown(u8),
    /// A read longer than the largest NBD request.
    #[error("forwarded read of {0} bytes is too long")]
    TooLong(u64),
    /// A write whose sealed blocks do not decode.
    #[error("forwarded write is malformed")]
    Malformed,
}

const HEADER_BYTES: usize = 1 + 8 + 8 + 8;
/// Longest forwarded read (the NBD maximum request size).
pub const FORWARD_READ_MAX_BYTES: u64 = 32 << 20;

impl ForwardRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Bytes {
        let tail;
        let (op, a, b, data): (u8, u64, u64, Option<&[u8]>) = match &self.op {
            ForwardOp::Read { first, count } => (0, *first, u64::from(*count), None),
            ForwardOp::Write(w) => {
                tail = encode_batch(&[Command::Write(w.clone())]);
                (1, w.first, w.count(), Some(&tail[..]))
            }
            ForwardOp::Zero { first, count, deallocate } => {
                (2, *first, *count, Some(if *deallocate { &[1u8][..] } else { &[0u8][..] }))
            }
            ForwardOp::Flush => (3, 0, 0, None),
            ForwardOp::Resize { size } => (4, *size, 0, None),
            ForwardOp::Control { payload } => (5, 0, payload.len() as u64, Some(&payload[..])),
            ForwardOp::ReadChunk { offset, len, min_index } => {
                tail = Bytes::copy_from_slice(&min_index.to_le_bytes());
                (6, *offset, *len, Some(&tail[..]))
            }
            ForwardOp::ReadCopy { first, count, min_applied } => {
                tail = Bytes::copy_from_slice(&min_applied.to_le_bytes());
                (7, *first, u64::from(*count), Some(&tail[..]))
            }
            ForwardOp::Scrub { id, first, count } => {
                tail = Bytes::copy_from_slice(&id.to_le_bytes());
                (8, *first, u64::from(*count), Some(&tail[..]))
            }
            ForwardOp::ScrubResult { id, first } => {
                tail = Bytes::copy_from_slice(&id.to_le_bytes());
                (9, *first, 0, Some(&tail[..]))
            }
            ForwardOp::Repair { first, count } => (10, *first, u64::from(*count), None),
        };
        let mut out = BytesMut::with_capacity(HEADER_BYTES + data.map_or(0, <[u8]>::len));
        out.put_u8(op);
        out.put_u64_le(self.group.0);
        out.put_u64_le(a);
        out.put_u64_le(b);
        if let Some(d) = data {
            out.put_slice(d);
        }
        out.freeze()
    }

    /// Decodes a request; a write's payload is a zero-copy slice of `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<ForwardRequest, ForwardError> {
        if bytes.len() < HEADER_BYTES {
            return Err(ForwardError::Truncated);
        }
        let op = bytes.get_u8();
        let group = GroupId(bytes.get_u64_le());
        let a = bytes.get_u64_le();
        let b = bytes.get_u64_le();
        let blocks = |count: u64| {
            if count.saturating_mul(BLOCK) > FORWARD_READ_MAX_BYTES {
                Err(ForwardError::TooLong(count.saturating_mul(BLOCK)))
            } else {
                Ok(count as u32)
            }
        };
        let op = match op {
            0 => ForwardOp::Read { first: a, count: blocks(b)? },
            1 => match decode_batch(&bytes).map_err(|_| ForwardError::Malformed)?.as_mut_slice() {
                [Command::Write(w)] if w.first == a && w.count() == b => ForwardOp::Write(std::mem::replace(
                    w,
                    BlockWrite { first: 0, data: Bytes::new(), seals: vec![], guards: vec![] },
                )),
                _ => return Err(ForwardError::Malformed),
            },
            2 if bytes.len() != 1 => return Err(ForwardError::Truncated),
            2 => ForwardOp::Zero {
                first: a,
                count: b,
                deallocate: match bytes.get_u8() {
                    0 => false,
                    1 => true,
                    other => return Err(ForwardError::Unknown(other)),
                },
            },
            3 => ForwardOp::Flush,
            4 => ForwardOp::Resize { size: a },
            5 if bytes.len() as u64 != b => return Err(ForwardError::Truncated),
            5 => ForwardOp::Control { payload: bytes },
            6 if b > FORWARD_READ_MAX_BYTES => return Err(ForwardError::TooLong(b)),
            6 if bytes.len() != 8 => return Err(ForwardError::Truncated),
            6 => ForwardOp::ReadChunk { offset: a, len: b, min_index: bytes.get_u64_le() },
            7 if bytes.len() != 8 => return Err(ForwardError::Truncated),
            7 => ForwardOp::ReadCopy { first: a, count: blocks(b)?, min_applied: bytes.get_u64_le() },
            8 | 9 if bytes.len() != 8 => return Err(ForwardError::Truncated),
            8 if b > u64::from(crate::volume::command::SCRUB_BLOCKS_MAX) => {
                return Err(ForwardError::TooLong(b.saturating_mul(BLOCK)))
            }
            8 => ForwardOp::Scrub { id: bytes.get_u64_le(), first: a, count: b as u32 },
            9 => ForwardOp::ScrubResult { id: bytes.get_u64_le(), first: a },
            10 => ForwardOp::Repair { first: a, count: blocks(b)? },
            other => return Err(ForwardError::Unknown(other)),
        };
        Ok(ForwardRequest { group, op })
    }
}

impl ForwardStatus {
    /// Encodes the response.
    pub fn encode(&self) -> Bytes {
        let range;
        let (code, hint, data): (u8, u64, &[u8]) = match self {
            ForwardStatus::Ok(d) => (0, 0, d),
            ForwardStatus::NotLeader(h) => (1, *h, &[]),
            ForwardStatus::NotMember => (2, 0, &[]),
            ForwardStatus::OutOfRange { offset, len, size } => {
                range = [offset.to_le_bytes(), len.to_le_bytes(), size.to_le_bytes()].concat();
                (3, 0, &range)
            }
            ForwardStatus::Unavailable(why) => (4, 0, why.as_bytes()),
            ForwardStatus::NotReady => (5, 0, &[]),
            ForwardStatus::GuardFailed(block) => (6, *block, &[]),
            ForwardStatus::Refused(why) => (7, 0, why.as_bytes()),
        };
        let mut b = BytesMut::with_capacity(9 + data.len());
        b.put_u8(code);
        b.put_u64_le(hint);
        b.put_slice(data);
        b.freeze()
    }

    /// Decodes a response.
    pub fn decode(mut bytes: Bytes) -> Result<ForwardStatus, ForwardError> {
        if bytes.len() < 9 {
            return Err(ForwardError::Truncated);
        }
        let code = bytes.get_u8();
        let hint = bytes.get_u64_le();
        Ok(match code {
            0 => ForwardStatus::Ok(bytes),
            1 => ForwardStatus::NotLeader(hint),
            2 => ForwardStatus::NotMember,
            3 if bytes.len() != 24 => return Err(ForwardError::Truncated),
            3 => ForwardStatus::OutOfRange {
                offset: bytes.get_u64_le(),
                len: bytes.get_u64_le(),
                size: bytes.get_u64_le(),
            },
            4 => ForwardStatus::Unavailable(String::from_utf8_lossy(&bytes).into_owned()),
            5 => ForwardStatus::NotReady,
            6 => ForwardStatus::GuardFailed(hint),
            7 => ForwardStatus::Refused(String::from_utf8_lossy(&bytes).into_owned()),
            other => return Err(ForwardError::Unknown(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write() -> BlockWrite {
        let data = Bytes::from(vec![5u8; 4096]);
        let seals = vec![raftblk_blockdev::seal::Seal::plain(2, &data)];
        BlockWrite {
            first: 2,
            data,
            seals,
            guards: vec![raftblk_blockdev::seal::Guard { block: 2, version: 9 }],
        }
    }

    #[test]
    fn requests_round_trip() {
        for op in [
            ForwardOp::Read { first: 1, count: 8 },
            ForwardOp::Write(write()),
            ForwardOp::Zero { first: 1, count: 2, deallocate: true },
            ForwardOp::Zero { first: 3, count: 4, deallocate: false },
            ForwardOp::Flush,
            ForwardOp::Resize { size: 1 << 30 },
            ForwardOp::Control { payload: Bytes::from_static(b"{}") },
            ForwardOp::ReadChunk { offset: 1 << 20, len: 4 << 20, min_index: 77 },
            ForwardOp::ReadCopy { first: 5, count: 2, min_applied: 88 },
            ForwardOp::Scrub { id: 9, first: 256, count: 256 },
            ForwardOp::ScrubResult { id: 9, first: 256 },
            ForwardOp::Repair { first: 3, count: 1 },
        ] {
            let r = ForwardRequest { group: GroupId(7), op };
            assert_eq!(ForwardRequest::decode(r.encode()), Ok(r));
        }
    }

    #[test]
    fn responses_round_trip() {
        for s in [
            ForwardStatus::Ok(Bytes::from_static(b"data")),
            ForwardStatus::Ok(Bytes::new()),
            ForwardStatus::NotLeader(3),
            ForwardStatus::NotMember,
            ForwardStatus::OutOfRange { offset: 4096, len: 8192, size: 1 << 20 },
            ForwardStatus::Unavailable("the store failed".into()),
            ForwardStatus::Refused(String::new()),
            ForwardStatus::NotReady,
            ForwardStatus::GuardFailed(12),
        ] {
            assert_eq!(ForwardStatus::decode(s.encode()), Ok(s));
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert_eq!(ForwardRequest::decode(Bytes::from_static(&[1, 2, 3])), Err(ForwardError::Truncated));
        let mut w = ForwardRequest { group: GroupId(1), op: ForwardOp::Write(write()) }.encode().to_vec();
        w.pop();
        assert_eq!(ForwardRequest::decode(Bytes::from(w)), Err(ForwardError::Malformed));
        let mut r = ForwardRequest { group: GroupId(1), op: ForwardOp::Read { first: 0, count: 1 } }
            .encode()
            .to_vec();
        r[0] = 99;
        assert_eq!(ForwardRequest::decode(Bytes::from(r)), Err(ForwardError::Unknown(99)));
        let mut big = BytesMut::new();
        big.put_u8(0);
        big.put_u64_le(1);
        big.put_u64_le(0);
        big.put_u64_le(1 << 40);
        assert!(matches!(ForwardRequest::decode(big.freeze()), Err(ForwardError::TooLong(_))));
        assert_eq!(ForwardStatus::decode(Bytes::from_static(&[8; 9])), Err(ForwardError::Unknown(8)));
        // An out-of-range answer carries its range: nine bytes alone are not one.
        assert_eq!(ForwardStatus::decode(Bytes::from_static(&[3; 9])), Err(ForwardError::Truncated));
        for n in 0..40u64 {
            // Pseudo-random bytes of every short length must decode or fail cleanly.
            let v: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2654435761) >> 3) as u8).collect();
            let _ = ForwardRequest::decode(Bytes::from(v.clone()));
            let _ = ForwardStatus::decode(Bytes::from(v));
        }
    }
}
