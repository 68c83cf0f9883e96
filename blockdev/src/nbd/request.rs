//! Transmission-phase requests: framing (header + write payload out of a byte
//! buffer) and validation against what was negotiated. Pure code, no I/O.
//!
//! Two kinds of failure are kept apart: a [`RequestError`] breaks the framing and
//! closes the connection; a [`Rejection`] is a well-framed request the server answers
//! with an error value and carries on.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::proto::{
    cmd, cmd_flags, Cookie, MetaContextId, NbdErrno, MAX_BLOCK_SIZE_BYTES, REQUEST_HEADER_BYTES,
    REQUEST_MAGIC,
};

/// Largest write payload the decoder buffers; a larger one is a hard disconnect
/// (the spec allows it: the payload cannot be skipped without reading it all).
pub const MAX_WRITE_PAYLOAD_BYTES: u32 = MAX_BLOCK_SIZE_BYTES;

/// A framing violation: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request does not start with `NBD_REQUEST_MAGIC`.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadMagic(u32),
    /// A write announced more payload than we buffer.
    #[error("write payload of {len} bytes exceeds the {MAX_WRITE_PAYLOAD_BYTES}-byte limit")]
    PayloadTooLarge { len: u32 },
}

/// The fixed 28-byte request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`), possibly unknown.
    pub kind: u16,
    /// Echoed in the reply.
    pub cookie: Cookie,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl RequestHeader {
    /// The header on the wire (for clients and tests).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_BYTES];
        let mut b = &mut out[..];
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(self.flags);
        b.put_u16(self.kind);
        b.put_u64(self.cookie.0);
        b.put_u64(self.offset);
        b.put_u32(self.len);
        out
    }

    /// Parses a header from the first 28 bytes of `b`; `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Result<RequestHeader, RequestError>> {
        let mut b = b.get(..REQUEST_HEADER_BYTES)?;
        let magic = b.get_u32();
        if magic != REQUEST_MAGIC {
            return Some(Err(RequestError::BadMagic(magic)));
        }
        Some(Ok(RequestHeader {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: Cookie(b.get_u64()),
            offset: b.get_u64(),
            len: b.get_u32(),
        }))
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.kind == cmd::WRITE {
            self.len
        } else {
            0
        }
    }
}

/// One request as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: RequestHeader,
    /// Write data (empty for every other command).
    pub payload: Bytes,
}

/// Takes one complete request off the front of `buf`. Returns `Ok(None)` when more
/// bytes are needed (and reserves room for them); nothing is consumed then.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, RequestError> {
    let header = match RequestHeader::decode(buf) {
        None => return Ok(None),
        Some(h) => h?,
    };
    let payload_len = header.payload_len();
    if payload_len > MAX_WRITE_PAYLOAD_BYTES {
        return Err(RequestError::PayloadTooLarge { len: payload_len });
    }
    let total = REQUEST_HEADER_BYTES + payload_len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(REQUEST_HEADER_BYTES);
    let payload = buf.split_to(payload_len as usize).freeze();
    Ok(Some(Frame { header, payload }))
}

/// What the handshake settled that decides which requests are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionPolicy {
    /// The export refuses writes, trims and zeroes (`EPERM`).
    pub read_only: bool,
    /// Structured replies were negotiated (and so `NBD_FLAG_SEND_DF` was advertised).
    pub structured_replies: bool,
    /// The id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<MetaContextId>,
}

/// A validated request, ready for the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes (`len` may be 0: answered without touching the backend).
    Read { offset: u64, len: u32 },
    /// Write `data`; with `fua` it is durable before the reply.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Orderly disconnect: finish in-flight requests, then close.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u32, fua: bool },
    /// Hint that a range will be read.
    Cache { offset: u64, len: u32 },
    /// Zero a range.
    WriteZeroes { offset: u64, len: u32, fua: bool, may_trim: bool, fast_only: bool },
    /// Report the allocation map (`base:allocation`) of a range.
    BlockStatus { offset: u64, len: u32, req_one: bool, context: MetaContextId },
}

/// A well-framed request the server refuses with `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The error value for the reply.
    pub errno: NbdErrno,
    /// Why, for the structured error message and the log.
    pub reason: &'static str,
}

fn reject(errno: NbdErrno, reason: &'static str) -> Rejection {
    Rejection { errno, reason }
}

/// Checks that `[offset, offset+len)` lies within an export of `size_bytes`.
fn in_range(offset: u64, len: u32, size_bytes: u64) -> bool {
    matches!(offset.checked_add(u64::from(len)), Some(end) if end <= size_bytes)
}

/// Validates a framed request against the negotiated policy and the current export
/// size. Error values follow the spec: unknown commands and flags `EINVAL`; writes on
/// a read-only export `EPERM`; writes and write-zeroes past the end `ENOSPC`, reads,
/// trims, cache and block status past the end `EINVAL`; reads and writes over the
/// maximum block size `EINVAL`. Unaligned requests are served.
pub fn validate(frame: Frame, size_bytes: u64, policy: &TransmissionPolicy) -> Result<Command, Rejection> {
    let Frame { header: h, payload } = frame;
    let allowed = match h.kind {
        cmd::READ if policy.structured_replies => cmd_flags::FUA | cmd_flags::DF,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => cmd_flags::FUA,
        cmd::WRITE_ZEROES => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        cmd::BLOCK_STATUS => cmd_flags::FUA | cmd_flags::REQ_ONE,
        // A disconnect gets no reply, so its flags cannot be refused.
        cmd::DISC => return Ok(Command::Disconnect),
        _ => return Err(reject(NbdErrno::EINVAL, "unknown command")),
    };
    if h.flags & !allowed != 0 {
        return Err(reject(NbdErrno::EINVAL, "command flag not valid for this command"));
    }
    let fua = h.flags & cmd_flags::FUA != 0;
    let writes = matches!(h.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && policy.read_only {
        return Err(reject(NbdErrno::EPERM, "export is read-only"));
    }
    if matches!(h.kind, cmd::READ | cmd::WRITE) && h.len > MAX_BLOCK_SIZE_BYTES {
        return Err(reject(NbdErrno::EINVAL, "length exceeds the maximum block size"));
    }
    let (offset, len) = (h.offset, h.len);
    let range_ok = in_range(offset, len, size_bytes);
    match h.kind {
        cmd::READ => {
            if !range_ok {
                return Err(reject(NbdErrno::EINVAL, "read beyond the end of the export"));
            }
            Ok(Command::Read { offset, len })
        }
        cmd::WRITE => {
            if !range_ok {
                return Err(reject(NbdErrno::ENOSPC, "write beyond the end of the export"));
            }
            Ok(Command::Write { offset, data: payload, fua })
        }
        cmd::FLUSH => Ok(Command::Flush),
        cmd::TRIM => {
            if !range_ok {
                return Err(reject(NbdErrno::EINVAL, "trim beyond the end of the export"));
            }
            Ok(Command::Trim { offset, len, fua })
        }
        cmd::CACHE => {
            if !range_ok {
                return Err(reject(NbdErrno::EINVAL, "cache beyond the end of the export"));
            }
            Ok(Command::Cache { offset, len })
        }
        cmd::WRITE_ZEROES => {
            if !range_ok {
                return Err(reject(NbdErrno::ENOSPC, "write zeroes beyond the end of the export"));
            }
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim: h.flags & cmd_flags::NO_HOLE == 0,
                fast_only: h.flags & cmd_flags::FAST_ZERO != 0,
            })
        }
        _ => {
            // cmd::BLOCK_STATUS, the only kind left.
            let context = match (policy.structured_replies, policy.base_allocation) {
                (true, Some(id)) => id,
                _ => return Err(reject(NbdErrno::EINVAL, "no metadata context was negotiated")),
            };
            if len == 0 {
                return Err(reject(NbdErrno::EINVAL, "block status of length 0"));
            }
            if !range_ok {
                return Err(reject(NbdErrno::EINVAL, "block status beyond the end of the export"));
            }
            let req_one = h.flags & cmd_flags::REQ_ONE != 0;
            Ok(Command::BlockStatus { offset, len, req_one, context })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: Cookie(0xabcdef), offset, len }
    }

    fn frame(kind: u16, flags: u16, offset: u64, len: u32) -> Frame {
        let payload = if kind == cmd::WRITE { Bytes::from(vec![1u8; len as usize]) } else { Bytes::new() };
        Frame { header: header(kind, flags, offset, len), payload }
    }

    fn full() -> TransmissionPolicy {
        TransmissionPolicy {
            read_only: false,
            structured_replies: true,
            base_allocation: Some(MetaContextId(1)),
        }
    }

    fn errno_of(r: Result<Command, Rejection>) -> NbdErrno {
        match r {
            Err(rej) => rej.errno,
            Ok(c) => panic!("expected a rejection, got {c:?}"),
        }
    }

    #[test]
    fn header_round_trips_with_the_spec_layout() {
        let h = header(cmd::WRITE, cmd_flags::FUA, 0x1122334455667788, 0x99aabbcc);
        let wire = h.encode();
        assert_eq!(&wire[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&wire[4..6], &[0, 1]);
        assert_eq!(&wire[6..8], &[0, 1]);
        assert_eq!(RequestHeader::decode(&wire), Some(Ok(h)));
        assert_eq!(RequestHeader::decode(&wire[..27]), None);
    }

    #[test]
    fn frames_wait_for_the_whole_payload() {
        let h = header(cmd::WRITE, 0, 0, 5);
        let mut wire = h.encode().to_vec();
        wire.extend_from_slice(b"hello");
        let next = header(cmd::FLUSH, 0, 0, 0).encode();
        wire.extend_from_slice(&next);
        for cut in 0..33 {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(decode_frame(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
        let mut buf = BytesMut::from(&wire[..]);
        let f = decode_frame(&mut buf).expect("valid").expect("complete");
        assert_eq!(f.header, h);
        assert_eq!(&f.payload[..], b"hello");
        let f2 = decode_frame(&mut buf).expect("valid").expect("complete");
        assert_eq!(f2.header.kind, cmd::FLUSH);
        assert!(f2.payload.is_empty());
        assert!(buf.is_empty());
    }

    #[test]
    fn framing_violations_are_errors() {
        let mut wire = header(cmd::READ, 0, 0, 512).encode();
        wire[0] = 0x12;
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(decode_frame(&mut buf), Err(RequestError::BadMagic(0x12609513)));

        let big = header(cmd::WRITE, 0, 0, MAX_WRITE_PAYLOAD_BYTES + 1).encode();
        let mut buf = BytesMut::from(&big[..]);
        assert_eq!(
            decode_frame(&mut buf),
            Err(RequestError::PayloadTooLarge { len: MAX_WRITE_PAYLOAD_BYTES + 1 })
        );
        // A huge read carries no payload: it frames fine and is rejected later.
        let read = header(cmd::READ, 0, 0, u32::MAX).encode();
        let mut buf = BytesMut::from(&read[..]);
        assert!(decode_frame(&mut buf).expect("frames").is_some());
    }

    #[test]
    fn valid_requests_become_commands() {
        let p = full();
        assert_eq!(
            validate(frame(cmd::READ, cmd_flags::DF, 512, 4096), SIZE, &p),
            Ok(Command::Read { offset: 512, len: 4096 })
        );
        assert_eq!(
            validate(frame(cmd::WRITE, cmd_flags::FUA, 0, 3), SIZE, &p),
            Ok(Command::Write { offset: 0, data: Bytes::from(vec![1u8; 3]), fua: true })
        );
        assert_eq!(validate(frame(cmd::FLUSH, 0, 0, 0), SIZE, &p), Ok(Command::Flush));
        assert_eq!(validate(frame(cmd::DISC, 0xffff, 5, 5), SIZE, &p), Ok(Command::Disconnect));
        assert_eq!(
            validate(frame(cmd::TRIM, 0, SIZE - 4096, 4096), SIZE, &p),
            Ok(Command::Trim { offset: SIZE - 4096, len: 4096, fua: false })
        );
        assert_eq!(
            validate(frame(cmd::CACHE, 0, 0, 4096), SIZE, &p),
            Ok(Command::Cache { offset: 0, len: 4096 })
        );
        assert_eq!(
            validate(frame(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO, 0, 8192), SIZE, &p),
            Ok(Command::WriteZeroes { offset: 0, len: 8192, fua: false, may_trim: false, fast_only: true })
        );
        assert_eq!(
            validate(frame(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, 1), SIZE, &p),
            Ok(Command::BlockStatus { offset: 0, len: 1, req_one: true, context: MetaContextId(1) })
        );
        // Unaligned and zero-length requests are served.
        assert_eq!(validate(frame(cmd::READ, 0, 3, 0), SIZE, &p), Ok(Command::Read { offset: 3, len: 0 }));
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        let p = full();
        assert_eq!(errno_of(validate(frame(8, 0, 0, 0), SIZE, &p)), NbdErrno::EINVAL);
        assert_eq!(errno_of(validate(frame(0xffff, 0, 0, 0), SIZE, &p)), NbdErrno::EINVAL);
        assert_eq!(errno_of(validate(frame(cmd::READ, 1 << 5, 0, 1), SIZE, &p)), NbdErrno::EINVAL);
        assert_eq!(
            errno_of(validate(frame(cmd::WRITE, cmd_flags::NO_HOLE, 0, 1), SIZE, &p)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno_of(validate(frame(cmd::TRIM, cmd_flags::REQ_ONE, 0, 1), SIZE, &p)),
            NbdErrno::EINVAL
        );
        assert_eq!(
            errno_of(validate(frame(cmd::BLOCK_STATUS, cmd_flags::DF, 0, 1), SIZE, &p)),
            NbdErrno::EINVAL
        );
        // DF needs structured replies.
        let simple = TransmissionPolicy { structured_replies: false, base_allocation: None, ..p };
        assert_eq!(
            errno_of(validate(frame(cmd::READ, cmd_flags::DF, 0, 1), SIZE, &simple)),
            NbdErrno::EINVAL
        );
    }

    #[test]
    fn out_of_range_errors_follow_the_spec() {
        let p = full();
        let past = |kind| validate(frame(kind, 0, SIZE - 512, 1024), SIZE, &p);
        assert_eq!(errno_of(past(cmd::READ)), NbdErrno::EINVAL);
        assert_eq!(errno_of(past(cmd::WRITE)), NbdErrno::ENOSPC);
        assert_eq!(errno_of(past(cmd::WRITE_ZEROES)), NbdErrno::ENOSPC);
        assert_eq!(errno_of(past(cmd::TRIM)), NbdErrno::EINVAL);
        assert_eq!(errno_of(past(cmd::CACHE)), NbdErrno::EINVAL);
        assert_eq!(errno_of(past(cmd::BLOCK_STATUS)), NbdErrno::EINVAL);
        // offset + len overflowing u64.
        let wrap = validate(frame(cmd::READ, 0, u64::MAX, 2), SIZE, &p);
        assert_eq!(errno_of(wrap), NbdErrno::EINVAL);
        // Zero length at the very end is in range.
        assert!(validate(frame(cmd::WRITE, 0, SIZE, 0), SIZE, &p).is_ok());
    }

    #[test]
    fn oversized_and_forbidden_requests_are_refused() {
        let p = full();
        assert_eq!(
            errno_of(validate(frame(cmd::READ, 0, 0, MAX_BLOCK_SIZE_BYTES + 1), u64::MAX, &p)),
            NbdErrno::EINVAL
        );
        // Trims and zeroes have no payload: large lengths are fine.
        assert!(validate(frame(cmd::TRIM, 0, 0, u32::MAX), u64::MAX, &p).is_ok());

        let ro = TransmissionPolicy { read_only: true, ..p };
        assert_eq!(errno_of(validate(frame(cmd::WRITE, 0, 0, 1), SIZE, &ro)), NbdErrno::EPERM);
        assert_eq!(errno_of(validate(frame(cmd::TRIM, 0, 0, 1), SIZE, &ro)), NbdErrno::EPERM);
        assert_eq!(errno_of(validate(frame(cmd::WRITE_ZEROES, 0, 0, 1), SIZE, &ro)), NbdErrno::EPERM);
        assert!(validate(frame(cmd::READ, 0, 0, 1), SIZE, &ro).is_ok());
        assert!(validate(frame(cmd::FLUSH, 0, 0, 0), SIZE, &ro).is_ok());

        let no_ctx = TransmissionPolicy { base_allocation: None, ..p };
        assert_eq!(errno_of(validate(frame(cmd::BLOCK_STATUS, 0, 0, 1), SIZE, &no_ctx)), NbdErrno::EINVAL);
        let no_sr = TransmissionPolicy { structured_replies: false, ..p };
        assert_eq!(errno_of(validate(frame(cmd::BLOCK_STATUS, 0, 0, 1), SIZE, &no_sr)), NbdErrno::EINVAL);
        assert_eq!(errno_of(validate(frame(cmd::BLOCK_STATUS, 0, 0, 0), SIZE, &p)), NbdErrno::EINVAL);
    }
}
