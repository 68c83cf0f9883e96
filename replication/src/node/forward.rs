//! The wire form of client I/O forwarded from the node a client is connected to
//! to the volume's leader (carried as transport application messages), sans-IO.
//!
//! Request:  `[op u8][group u64][offset u64][len u64][data]` (little-endian; data only for
//! writes, control messages, and a chunk read's minimum index)
//! Response: `[status u8][leader hint u64][data]` (data only for a successful read)

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::wal::record::GroupId;

/// What a forwarded request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardOp {
    /// Linearizable read of `len` bytes.
    Read { offset: u64, len: u32 },
    /// Replicated write.
    Write { offset: u64, data: Bytes },
    /// Replicated trim.
    Trim { offset: u64, len: u64 },
    /// Replicated zeroing.
    WriteZeroes { offset: u64, len: u64 },
    /// Replicated grow to `size` bytes.
    Resize { size: u64 },
    /// A control-plane message for the daemon (the group is ignored); opaque here.
    Control { payload: Bytes },
    /// A snapshot chunk: `len` bytes at `offset` of the receiver's store, which must have
    /// applied at least `min_index` (see [`crate::snapshot`]).
    ReadChunk { offset: u64, len: u64, min_index: u64 },
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
    /// The request reached past the volume's end.
    OutOfRange,
    /// Anything else; the client sees EIO.
    Failed,
    /// The receiver's store has not applied the index a snapshot chunk needs (or is being
    /// rebuilt itself): ask another member.
    NotReady,
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
}

const HEADER_BYTES: usize = 1 + 8 + 8 + 8;
/// Longest forwarded read (the NBD maximum request size).
pub const FORWARD_READ_MAX_BYTES: u64 = 32 << 20;

impl ForwardRequest {
    /// Encodes the request.
    pub fn encode(&self) -> Bytes {
        let min_index_bytes;
        let (op, offset, len, data) = match &self.op {
            ForwardOp::Read { offset, len } => (0u8, *offset, *len as u64, None),
            ForwardOp::Write { offset, data } => (1, *offset, data.len() as u64, Some(data)),
            ForwardOp::Trim { offset, len } => (2, *offset, *len, None),
            ForwardOp::WriteZeroes { offset, len } => (3, *offset, *len, None),
            ForwardOp::Resize { size } => (4, *size, 0, None),
            ForwardOp::Control { payload } => (5, 0, payload.len() as u64, Some(payload)),
            ForwardOp::ReadChunk { offset, len, min_index } => {
                min_index_bytes = Bytes::copy_from_slice(&min_index.to_le_bytes());
                (6, *offset, *len, Some(&min_index_bytes))
            }
        };
        let mut b = BytesMut::with_capacity(HEADER_BYTES + data.map_or(0, |d| d.len()));
        b.put_u8(op);
        b.put_u64_le(self.group.0);
        b.put_u64_le(offset);
        b.put_u64_le(len);
        if let Some(d) = data {
            b.put_slice(d);
        }
        b.freeze()
    }

    /// Decodes a request; the write payload is a zero-copy slice of `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<ForwardRequest, ForwardError> {
        if bytes.len() < HEADER_BYTES {
            return Err(ForwardError::Truncated);
        }
        let op = bytes.get_u8();
        let group = GroupId(bytes.get_u64_le());
        let offset = bytes.get_u64_le();
        let len = bytes.get_u64_le();
        let op = match op {
            0 if len > FORWARD_READ_MAX_BYTES => return Err(ForwardError::TooLong(len)),
            0 => ForwardOp::Read { offset, len: len as u32 },
            1 if bytes.len() as u64 != len => return Err(ForwardError::Truncated),
            1 => ForwardOp::Write { offset, data: bytes },
            2 => ForwardOp::Trim { offset, len },
            3 => ForwardOp::WriteZeroes { offset, len },
            4 => ForwardOp::Resize { size: offset },
            5 if bytes.len() as u64 != len => return Err(ForwardError::Truncated),
            5 => ForwardOp::Control { payload: bytes },
            6 if len > FORWARD_READ_MAX_BYTES => return Err(ForwardError::TooLong(len)),
            6 if bytes.len() != 8 => return Err(ForwardError::Truncated),
            6 => ForwardOp::ReadChunk { offset, len, min_index: bytes.get_u64_le() },
            other => return Err(ForwardError::Unknown(other)),
        };
        Ok(ForwardRequest { group, op })
    }
}

impl ForwardStatus {
    /// Encodes the response.
    pub fn encode(&self) -> Bytes {
        let (code, hint, data) = match self {
            ForwardStatus::Ok(d) => (0u8, 0, Some(d)),
            ForwardStatus::NotLeader(h) => (1, *h, None),
            ForwardStatus::NotMember => (2, 0, None),
            ForwardStatus::OutOfRange => (3, 0, None),
            ForwardStatus::Failed => (4, 0, None),
            ForwardStatus::NotReady => (5, 0, None),
        };
        let mut b = BytesMut::with_capacity(9 + data.map_or(0, |d| d.len()));
        b.put_u8(code);
        b.put_u64_le(hint);
        if let Some(d) = data {
            b.put_slice(d);
        }
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
            3 => ForwardStatus::OutOfRange,
            4 => ForwardStatus::Failed,
            5 => ForwardStatus::NotReady,
            other => return Err(ForwardError::Unknown(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for op in [
            ForwardOp::Read { offset: 4096, len: 512 },
            ForwardOp::Write { offset: 8192, data: Bytes::from_static(b"hello") },
            ForwardOp::Trim { offset: 1, len: 2 },
            ForwardOp::WriteZeroes { offset: 3, len: 4 },
            ForwardOp::Resize { size: 1 << 30 },
            ForwardOp::Control { payload: Bytes::from_static(b"{}") },
            ForwardOp::ReadChunk { offset: 1 << 20, len: 4 << 20, min_index: 77 },
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
            ForwardStatus::OutOfRange,
            ForwardStatus::Failed,
            ForwardStatus::NotReady,
        ] {
            assert_eq!(ForwardStatus::decode(s.encode()), Ok(s));
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert_eq!(ForwardRequest::decode(Bytes::from_static(&[1, 2, 3])), Err(ForwardError::Truncated));
        let mut w = ForwardRequest {
            group: GroupId(1),
            op: ForwardOp::Write { offset: 0, data: Bytes::from_static(b"abc") },
        }
        .encode()
        .to_vec();
        w.pop();
        assert_eq!(ForwardRequest::decode(Bytes::from(w)), Err(ForwardError::Truncated));
        let mut r =
            ForwardRequest { group: GroupId(1), op: ForwardOp::Read { offset: 0, len: 1 } }.encode().to_vec();
        r[0] = 9;
        assert_eq!(ForwardRequest::decode(Bytes::from(r)), Err(ForwardError::Unknown(9)));
        let mut big = BytesMut::new();
        big.put_u8(0);
        big.put_u64_le(1);
        big.put_u64_le(0);
        big.put_u64_le(1 << 40);
        assert!(matches!(ForwardRequest::decode(big.freeze()), Err(ForwardError::TooLong(_))));
        assert_eq!(ForwardStatus::decode(Bytes::from_static(&[7; 9])), Err(ForwardError::Unknown(7)));
        for n in 0..40u64 {
            // Pseudo-random bytes of every short length must decode or fail cleanly.
            let v: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(2654435761) >> 3) as u8).collect();
            let _ = ForwardRequest::decode(Bytes::from(v.clone()));
            let _ = ForwardStatus::decode(Bytes::from(v));
        }
    }
}
