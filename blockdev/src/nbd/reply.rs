//! Transmission-phase replies: encoding (server side) and decoding (client side,
//! used by tests, fuzzing and tools). Pure functions over byte buffers.
//!
//! An [`EncodedReply`] keeps the small header apart from the payload so that read
//! data travels from the backend to the socket as the same [`Bytes`], never copied.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::backend::{Extent, ExtentKind};

use super::proto::{
    clip_to_string_limit, reply_flags, reply_type, state, Cookie, MetaContextId, NbdErrno,
    SIMPLE_REPLY_HEADER_BYTES, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_BYTES, STRUCTURED_REPLY_MAGIC,
};

/// Most descriptors one block status chunk carries (the spec lets a server send fewer
/// than the whole range; clients ask again for the rest).
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 4096;

/// Why a reply could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// An `OFFSET_DATA` chunk must carry at least one byte.
    #[error("an OFFSET_DATA chunk must carry at least one byte")]
    EmptyData,
    /// The payload does not fit the 32-bit chunk length.
    #[error("chunk payload of {0} bytes does not fit a 32-bit length")]
    PayloadTooLong(usize),
    /// A block status chunk needs between one and [`MAX_BLOCK_STATUS_DESCRIPTORS`] descriptors.
    #[error("a block status chunk needs 1..={MAX_BLOCK_STATUS_DESCRIPTORS} descriptors, got {0}")]
    DescriptorCount(usize),
    /// A block status descriptor must have a nonzero length.
    #[error("block status descriptor {0} has length 0")]
    ZeroLengthDescriptor(usize),
    /// Error replies must carry a nonzero error.
    #[error("an error reply needs a nonzero error value")]
    ZeroErrno,
    /// A received reply starts with an unknown magic.
    #[error("reply magic {0:#010x} is neither simple nor structured")]
    BadMagic(u32),
    /// A received chunk payload does not match its type.
    #[error("chunk of type {kind} has a malformed payload of {len} bytes")]
    MalformedChunk { kind: u16, len: usize },
}

/// A reply ready for the socket: `head` then `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedReply {
    /// Reply header and any small fixed fields.
    pub head: Bytes,
    /// Bulk data (read data), possibly empty; shared, not copied.
    pub payload: Bytes,
}

impl EncodedReply {
    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    /// Head and payload joined (for tests and fuzzing; the server never joins them).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.payload);
        v
    }
}

/// One `base:allocation` (or other context) extent in a block status chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length of the extent in bytes (nonzero).
    pub len_bytes: u32,
    /// Status flags defined by the context.
    pub flags: u32,
}

fn simple_head(cookie: Cookie, errno: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(SIMPLE_REPLY_HEADER_BYTES);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(errno);
    b.put_u64(cookie.0);
    b
}

/// A simple reply reporting success with no data.
pub fn simple_ok(cookie: Cookie) -> EncodedReply {
    EncodedReply { head: simple_head(cookie, 0).freeze(), payload: Bytes::new() }
}

/// A simple reply reporting success, followed by read data.
pub fn simple_read(cookie: Cookie, data: Bytes) -> EncodedReply {
    EncodedReply { head: simple_head(cookie, 0).freeze(), payload: data }
}

/// A simple reply reporting an error (never followed by data).
pub fn simple_error(cookie: Cookie, errno: NbdErrno) -> Result<EncodedReply, ReplyError> {
    if errno.0 == 0 {
        return Err(ReplyError::ZeroErrno);
    }
    Ok(EncodedReply { head: simple_head(cookie, errno.0).freeze(), payload: Bytes::new() })
}

fn chunk_head_u32(extra: usize, flags: u16, kind: u16, cookie: Cookie, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + extra);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie.0);
    b.put_u32(len);
    b
}

fn chunk_head(
    extra: usize,
    flags: u16,
    kind: u16,
    cookie: Cookie,
    len: usize,
) -> Result<BytesMut, ReplyError> {
    let len32 = u32::try_from(len).map_err(|_| ReplyError::PayloadTooLong(len))?;
    Ok(chunk_head_u32(extra, flags, kind, cookie, len32))
}

fn done_flag(done: bool) -> u16 {
    if done {
        reply_flags::DONE
    } else {
        0
    }
}

/// A structured `NBD_REPLY_TYPE_NONE` chunk with `DONE`: the request succeeded.
pub fn structured_done(cookie: Cookie) -> EncodedReply {
    let head = chunk_head_u32(0, reply_flags::DONE, reply_type::NONE, cookie, 0);
    EncodedReply { head: head.freeze(), payload: Bytes::new() }
}

/// A structured `NBD_REPLY_TYPE_ERROR` chunk with `DONE`; `message` is cut to 4096 bytes.
pub fn structured_error(cookie: Cookie, errno: NbdErrno, message: &str) -> Result<EncodedReply, ReplyError> {
    if errno.0 == 0 {
        return Err(ReplyError::ZeroErrno);
    }
    Ok(encode_structured_error(cookie, errno.0, message))
}

fn encode_structured_error(cookie: Cookie, errno: u32, message: &str) -> EncodedReply {
    let msg = clip_to_string_limit(message).as_bytes();
    // clip_to_string_limit keeps the message within 4096 bytes, so both lengths fit.
    let len = 6 + msg.len();
    let mut b = chunk_head_u32(len, reply_flags::DONE, reply_type::ERROR, cookie, len as u32);
    b.put_u32(errno);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    EncodedReply { head: b.freeze(), payload: Bytes::new() }
}

/// The final error reply to a request: a structured `ERROR` chunk when structured
/// replies were negotiated, else a simple reply. An `errno` of 0 is sent as `EIO`.
pub fn error_reply(structured: bool, cookie: Cookie, errno: NbdErrno, message: &str) -> EncodedReply {
    let errno = if errno.0 == 0 { NbdErrno::EIO.0 } else { errno.0 };
    if structured {
        encode_structured_error(cookie, errno, message)
    } else {
        EncodedReply { head: simple_head(cookie, errno).freeze(), payload: Bytes::new() }
    }
}

/// The final success reply to a request that returns no data.
pub fn ok_reply(structured: bool, cookie: Cookie) -> EncodedReply {
    if structured {
        structured_done(cookie)
    } else {
        simple_ok(cookie)
    }
}

/// Turns a backend allocation map into `base:allocation` descriptors for a request of
/// `len` bytes: drops empty extents, merges neighbours of the same kind, never reports
/// past `len`, keeps one descriptor with `req_one`, and at most
/// [`MAX_BLOCK_STATUS_DESCRIPTORS`]. An empty map becomes one "allocated" descriptor
/// (status 0 is always safe).
pub fn descriptors_from_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<BlockDescriptor> {
    let limit = if req_one { 1 } else { MAX_BLOCK_STATUS_DESCRIPTORS };
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        if left == 0 {
            break;
        }
        let n = e.len_bytes.min(left);
        if n == 0 {
            continue;
        }
        let flags = match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Hole => state::HOLE | state::ZERO,
        };
        // n <= left <= len, so it fits 32 bits.
        let n32 = n as u32;
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len_bytes += n32,
            _ if full => break,
            _ => out.push(BlockDescriptor { len_bytes: n32, flags }),
        }
        left -= n;
    }
    if out.is_empty() && len > 0 {
        out.push(BlockDescriptor { len_bytes: len, flags: 0 });
    }
    out
}

/// A structured `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data` read at `offset`.
pub fn structured_offset_data(
    cookie: Cookie,
    offset: u64,
    data: Bytes,
    done: bool,
) -> Result<EncodedReply, ReplyError> {
    if data.is_empty() {
        return Err(ReplyError::EmptyData);
    }
    let len = data.len().checked_add(8).ok_or(ReplyError::PayloadTooLong(data.len()))?;
    let mut b = chunk_head(8, done_flag(done), reply_type::OFFSET_DATA, cookie, len)?;
    b.put_u64(offset);
    Ok(EncodedReply { head: b.freeze(), payload: data })
}

/// A structured `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeroes.
pub fn structured_offset_hole(
    cookie: Cookie,
    offset: u64,
    len: u32,
    done: bool,
) -> Result<EncodedReply, ReplyError> {
    if len == 0 {
        return Err(ReplyError::EmptyData);
    }
    let mut b = chunk_head(12, done_flag(done), reply_type::OFFSET_HOLE, cookie, 12)?;
    b.put_u64(offset);
    b.put_u32(len);
    Ok(EncodedReply { head: b.freeze(), payload: Bytes::new() })
}

/// A structured `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context.
pub fn structured_block_status(
    cookie: Cookie,
    context: MetaContextId,
    descriptors: &[BlockDescriptor],
    done: bool,
) -> Result<EncodedReply, ReplyError> {
    if descriptors.is_empty() || descriptors.len() > MAX_BLOCK_STATUS_DESCRIPTORS {
        return Err(ReplyError::DescriptorCount(descriptors.len()));
    }
    if let Some(i) = descriptors.iter().position(|d| d.len_bytes == 0) {
        return Err(ReplyError::ZeroLengthDescriptor(i));
    }
    let len = 4 + 8 * descriptors.len();
    let mut b = chunk_head(len, done_flag(done), reply_type::BLOCK_STATUS, cookie, len)?;
    b.put_u32(context.0);
    for d in descriptors {
        b.put_u32(d.len_bytes);
        b.put_u32(d.flags);
    }
    Ok(EncodedReply { head: b.freeze(), payload: Bytes::new() })
}

/// A reply message as a client sees it on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyMessage {
    /// A simple reply; `data` is the read payload (empty unless a successful read).
    Simple { cookie: Cookie, errno: u32, data: Bytes },
    /// One structured reply chunk.
    Chunk { cookie: Cookie, flags: u16, chunk: Chunk },
}

impl ReplyMessage {
    /// The cookie the reply answers.
    pub fn cookie(&self) -> Cookie {
        match self {
            ReplyMessage::Simple { cookie, .. } | ReplyMessage::Chunk { cookie, .. } => *cookie,
        }
    }
}

/// The payload of a structured chunk, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    OffsetData { offset: u64, data: Bytes },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole { offset: u64, len: u32 },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus { context: MetaContextId, descriptors: Vec<BlockDescriptor> },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error { errno: u32, message: Bytes },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset { errno: u32, message: Bytes, offset: u64 },
    /// A type this decoder does not know.
    Unknown { kind: u16, payload: Bytes },
}

/// Decodes one reply from the front of `buf`, consuming it; `Ok(None)` if more bytes
/// are needed. A simple reply's data length is not on the wire: `simple_data_len`
/// says how many bytes follow a successful simple reply to `cookie` (0 unless a read).
pub fn decode_reply(
    buf: &mut BytesMut,
    simple_data_len: impl FnOnce(Cookie) -> usize,
) -> Result<Option<ReplyMessage>, ReplyError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    match magic {
        SIMPLE_REPLY_MAGIC => {
            if buf.len() < SIMPLE_REPLY_HEADER_BYTES {
                return Ok(None);
            }
            let mut h = &buf[4..SIMPLE_REPLY_HEADER_BYTES];
            let errno = h.get_u32();
            let cookie = Cookie(h.get_u64());
            let data_len = if errno == 0 { simple_data_len(cookie) } else { 0 };
            let total = SIMPLE_REPLY_HEADER_BYTES.saturating_add(data_len);
            if buf.len() < total {
                return Ok(None);
            }
            buf.advance(SIMPLE_REPLY_HEADER_BYTES);
            let data = buf.split_to(data_len).freeze();
            Ok(Some(ReplyMessage::Simple { cookie, errno, data }))
        }
        STRUCTURED_REPLY_MAGIC => {
            if buf.len() < STRUCTURED_REPLY_HEADER_BYTES {
                return Ok(None);
            }
            let mut h = &buf[4..STRUCTURED_REPLY_HEADER_BYTES];
            let flags = h.get_u16();
            let kind = h.get_u16();
            let cookie = Cookie(h.get_u64());
            let len = h.get_u32() as usize;
            if buf.len() < STRUCTURED_REPLY_HEADER_BYTES + len {
                return Ok(None);
            }
            buf.advance(STRUCTURED_REPLY_HEADER_BYTES);
            let payload = buf.split_to(len).freeze();
            let chunk = parse_chunk(kind, payload)?;
            Ok(Some(ReplyMessage::Chunk { cookie, flags, chunk }))
        }
        other => Err(ReplyError::BadMagic(other)),
    }
}

/// Interprets a structured chunk payload of type `kind`.
pub fn parse_chunk(kind: u16, mut p: Bytes) -> Result<Chunk, ReplyError> {
    let malformed = |p: &Bytes| ReplyError::MalformedChunk { kind, len: p.len() };
    match kind {
        reply_type::NONE if p.is_empty() => Ok(Chunk::None),
        reply_type::OFFSET_DATA if p.len() >= 9 => {
            let offset = p.get_u64();
            Ok(Chunk::OffsetData { offset, data: p })
        }
        reply_type::OFFSET_HOLE if p.len() == 12 => {
            let offset = p.get_u64();
            let len = p.get_u32();
            Ok(Chunk::OffsetHole { offset, len })
        }
        reply_type::BLOCK_STATUS if p.len() >= 12 && p.len() % 8 == 4 => {
            let context = MetaContextId(p.get_u32());
            let mut descriptors = Vec::with_capacity(p.len() / 8);
            while p.has_remaining() {
                descriptors.push(BlockDescriptor { len_bytes: p.get_u32(), flags: p.get_u32() });
            }
            Ok(Chunk::BlockStatus { context, descriptors })
        }
        reply_type::ERROR | reply_type::ERROR_OFFSET => {
            let tail = if kind == reply_type::ERROR { 0 } else { 8 };
            if p.len() < 6 + tail {
                return Err(malformed(&p));
            }
            let errno = p.get_u32();
            let msg_len = p.get_u16() as usize;
            if p.len() != msg_len + tail {
                return Err(malformed(&p));
            }
            let message = p.split_to(msg_len);
            if kind == reply_type::ERROR {
                Ok(Chunk::Error { errno, message })
            } else {
                Ok(Chunk::ErrorOffset { errno, message, offset: p.get_u64() })
            }
        }
        reply_type::NONE | reply_type::OFFSET_DATA | reply_type::OFFSET_HOLE | reply_type::BLOCK_STATUS => {
            Err(malformed(&p))
        }
        _ => Ok(Chunk::Unknown { kind, payload: p }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_one(r: &EncodedReply, data_len: usize) -> ReplyMessage {
        let mut buf = BytesMut::from(&r.to_vec()[..]);
        let msg = decode_reply(&mut buf, |_| data_len).expect("decodes").expect("complete");
        assert!(buf.is_empty(), "decoder consumed the whole reply");
        msg
    }

    #[test]
    fn simple_replies_have_the_spec_layout() {
        let r = simple_ok(Cookie(0x0102030405060708));
        assert_eq!(r.to_vec(), [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8].to_vec());
        let e = simple_error(Cookie(9), NbdErrno::ENOSPC).expect("nonzero errno");
        assert_eq!(&e.head[4..8], &28u32.to_be_bytes());
        assert!(e.payload.is_empty());
        assert_eq!(simple_error(Cookie(9), NbdErrno(0)), Err(ReplyError::ZeroErrno));
    }

    #[test]
    fn simple_read_round_trips_without_copying_the_payload() {
        let data = Bytes::from(vec![5u8; 1000]);
        let r = simple_read(Cookie(3), data.clone());
        assert_eq!(r.payload.as_ptr(), data.as_ptr(), "payload is shared, not copied");
        assert_eq!(decode_one(&r, 1000), ReplyMessage::Simple { cookie: Cookie(3), errno: 0, data });
    }

    #[test]
    fn structured_chunks_round_trip() {
        let c = Cookie(77);
        let r = structured_done(c);
        assert_eq!(r.wire_len(), 20);
        assert_eq!(
            decode_one(&r, 0),
            ReplyMessage::Chunk { cookie: c, flags: reply_flags::DONE, chunk: Chunk::None }
        );

        let data = Bytes::from_static(b"hello");
        let r = structured_offset_data(c, 4096, data.clone(), true).expect("encodes");
        assert_eq!(&r.head[16..20], &13u32.to_be_bytes());
        assert_eq!(
            decode_one(&r, 0),
            ReplyMessage::Chunk {
                cookie: c,
                flags: reply_flags::DONE,
                chunk: Chunk::OffsetData { offset: 4096, data }
            }
        );

        let r = structured_offset_hole(c, 512, 1024, false).expect("encodes");
        assert_eq!(
            decode_one(&r, 0),
            ReplyMessage::Chunk { cookie: c, flags: 0, chunk: Chunk::OffsetHole { offset: 512, len: 1024 } }
        );

        let ds =
            [BlockDescriptor { len_bytes: 4096, flags: 0 }, BlockDescriptor { len_bytes: 8192, flags: 3 }];
        let r = structured_block_status(c, MetaContextId(1), &ds, true).expect("encodes");
        assert_eq!(r.wire_len(), 20 + 4 + 16);
        assert_eq!(
            decode_one(&r, 0),
            ReplyMessage::Chunk {
                cookie: c,
                flags: reply_flags::DONE,
                chunk: Chunk::BlockStatus { context: MetaContextId(1), descriptors: ds.to_vec() }
            }
        );

        let r = structured_error(c, NbdErrno::EINVAL, "bad offset").expect("encodes");
        assert_eq!(
            decode_one(&r, 0),
            ReplyMessage::Chunk {
                cookie: c,
                flags: reply_flags::DONE,
                chunk: Chunk::Error { errno: 22, message: Bytes::from_static(b"bad offset") }
            }
        );
    }

    #[test]
    fn encoders_reject_what_the_spec_forbids() {
        let c = Cookie(1);
        assert_eq!(structured_offset_data(c, 0, Bytes::new(), true), Err(ReplyError::EmptyData));
        assert_eq!(structured_offset_hole(c, 0, 0, true), Err(ReplyError::EmptyData));
        assert_eq!(
            structured_block_status(c, MetaContextId(1), &[], true),
            Err(ReplyError::DescriptorCount(0))
        );
        let many = vec![BlockDescriptor { len_bytes: 1, flags: 0 }; MAX_BLOCK_STATUS_DESCRIPTORS + 1];
        assert_eq!(
            structured_block_status(c, MetaContextId(1), &many, true),
            Err(ReplyError::DescriptorCount(MAX_BLOCK_STATUS_DESCRIPTORS + 1))
        );
        let zero = [BlockDescriptor { len_bytes: 1, flags: 0 }, BlockDescriptor { len_bytes: 0, flags: 0 }];
        assert_eq!(
            structured_block_status(c, MetaContextId(1), &zero, true),
            Err(ReplyError::ZeroLengthDescriptor(1))
        );
        assert_eq!(structured_error(c, NbdErrno(0), "x"), Err(ReplyError::ZeroErrno));
    }

    #[test]
    fn error_and_ok_replies_pick_the_negotiated_form() {
        let c = Cookie(5);
        let s = error_reply(false, c, NbdErrno::EPERM, "read-only");
        assert_eq!(decode_one(&s, 0), ReplyMessage::Simple { cookie: c, errno: 1, data: Bytes::new() });
        let z = error_reply(false, c, NbdErrno(0), "");
        assert_eq!(decode_one(&z, 0), ReplyMessage::Simple { cookie: c, errno: 5, data: Bytes::new() });
        let st = error_reply(true, c, NbdErrno::ENOSPC, "full");
        assert_eq!(
            decode_one(&st, 0),
            ReplyMessage::Chunk {
                cookie: c,
                flags: reply_flags::DONE,
                chunk: Chunk::Error { errno: 28, message: Bytes::from_static(b"full") }
            }
        );
        assert_eq!(ok_reply(false, c), simple_ok(c));
        assert_eq!(ok_reply(true, c), structured_done(c));
    }

    #[test]
    fn extents_become_clamped_merged_descriptors() {
        let d = |len_bytes, kind| Extent { len_bytes, kind };
        let hole = state::HOLE | state::ZERO;
        let map = [
            d(4096, ExtentKind::Data),
            d(0, ExtentKind::Hole),
            d(4096, ExtentKind::Data),
            d(8192, ExtentKind::Hole),
            d(1 << 40, ExtentKind::Data),
        ];
        assert_eq!(
            descriptors_from_extents(&map, 20000, false),
            vec![
                BlockDescriptor { len_bytes: 8192, flags: 0 },
                BlockDescriptor { len_bytes: 8192, flags: hole },
                BlockDescriptor { len_bytes: 20000 - 16384, flags: 0 },
            ]
        );
        assert_eq!(
            descriptors_from_extents(&map, 20000, true),
            vec![BlockDescriptor { len_bytes: 8192, flags: 0 }]
        );
        assert_eq!(
            descriptors_from_extents(&map, 100, true),
            vec![BlockDescriptor { len_bytes: 100, flags: 0 }]
        );
        assert_eq!(
            descriptors_from_extents(&[], 512, false),
            vec![BlockDescriptor { len_bytes: 512, flags: 0 }]
        );
        let alternating: Vec<Extent> = (0..10_000)
            .map(|i| d(512, if i % 2 == 0 { ExtentKind::Data } else { ExtentKind::Hole }))
            .collect();
        let ds = descriptors_from_extents(&alternating, u32::MAX, false);
        assert_eq!(ds.len(), MAX_BLOCK_STATUS_DESCRIPTORS);
        assert!(ds.iter().all(|x| x.len_bytes == 512));
    }

    #[test]
    fn long_error_messages_are_clipped_on_a_char_boundary() {
        let msg = "é".repeat(3000); // 6000 bytes, 2 bytes per char
        let r = structured_error(Cookie(1), NbdErrno::EIO, &msg).expect("encodes");
        match decode_one(&r, 0) {
            ReplyMessage::Chunk { chunk: Chunk::Error { message, .. }, .. } => {
                assert_eq!(message.len(), 4096);
                assert!(std::str::from_utf8(&message).is_ok());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn decoder_waits_for_complete_messages_and_rejects_bad_input() {
        let r =
            structured_offset_data(Cookie(1), 0, Bytes::from_static(b"abc"), true).expect("encodes").to_vec();
        for cut in 0..r.len() {
            let mut buf = BytesMut::from(&r[..cut]);
            assert_eq!(decode_reply(&mut buf, |_| 0), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed from a partial message");
        }
        let mut bad = BytesMut::from(&[0xde, 0xad, 0xbe, 0xef, 0, 0][..]);
        assert_eq!(decode_reply(&mut bad, |_| 0), Err(ReplyError::BadMagic(0xdeadbeef)));

        // A NONE chunk with a payload, and an error chunk whose message overruns.
        assert!(parse_chunk(reply_type::NONE, Bytes::from_static(b"x")).is_err());
        let p = Bytes::from(vec![0, 0, 0, 5, 0, 9, b'a']);
        assert!(parse_chunk(reply_type::ERROR, p).is_err());
        assert!(parse_chunk(reply_type::BLOCK_STATUS, Bytes::from(vec![0u8; 8])).is_err());
        assert_eq!(
            parse_chunk(0x4000, Bytes::from_static(b"zz")),
            Ok(Chunk::Unknown { kind: 0x4000, payload: Bytes::from_static(b"zz") })
        );
    }
}
