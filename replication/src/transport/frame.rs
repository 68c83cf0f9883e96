//! Frames on the wire between nodes (sans-IO: `BytesMut` in, [`Frame`]s out, and back).
//!
//! Every frame is
//!
//! ```text
//! [len u32][crc32 u32][body: len bytes]
//! body = [version u8][kind u8][from u64][payload]
//! ```
//!
//! all integers little-endian. `len` counts body bytes; the CRC (crc32fast, IEEE) covers the
//! body. `from` is the sending node.
//!
//! | kind | payload |
//! |---|---|
//! | 1 `Hello` | cluster u64 (the node id is `from`); the first frame on every connection |
//! | 2 `RaftBatch` | count u32, then count × `[group u64][len u32][message: len bytes]` |
//! | 3 `AppRequest` | request id u64, payload (the rest) |
//! | 4 `AppResponse` | request id u64, payload (the rest) |
//!
//! Raft messages are opaque bytes here: the Raft layer encodes raft-rs `eraftpb::Message`
//! itself (`node::raft_codec`), so this module knows nothing about Raft. A message may be
//! handed over in several parts ([`RaftMessage::more`]); [`Frame::encode_gathered`] keeps
//! large parts and payloads as they are, for a vectored write.
//!
//! # Versions
//!
//! [`PROTOCOL_VERSION`] `2`: the layout above, Raft messages laid out by `node::raft_codec`
//! (version `1` carried whole protobuf messages). The `[len][crc]` header and the leading
//! `[version][kind][from]` of the body stay as they are in every later version, so a node
//! can always tell a frame of another version from a damaged one
//! ([`FrameError::UnsupportedVersion`] rather than a CRC failure).
//!
//! [`decode`] is incremental: it reports [`Decoded::NeedMore`] for a short buffer (and
//! consumes nothing), [`Decoded::Complete`] for a whole frame (and consumes it), and
//! [`Decoded::Corrupt`] when the bytes can never become a valid frame (the connection
//! must then be closed: there is no way to resynchronise a byte stream). A `len` above
//! [`FRAME_BODY_BYTES_MAX`] is refused from the 8-byte header alone.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::gather::Gather;
use crate::wal::record::{GroupId, NodeId};

/// The only wire version this build speaks.
pub const PROTOCOL_VERSION: u8 = 2;

/// Bytes of the frame header: len (4) and crc (4).
pub const FRAME_HEADER_BYTES: usize = 8;

/// Bytes at the start of every body: version (1), kind (1), from (8).
pub const BODY_PREFIX_BYTES: usize = 10;

/// Largest body a frame may have. A larger `len` is [`Decoded::Corrupt`] at once, before any
/// of the body arrives, so a peer cannot make a node buffer more than this per connection.
pub const FRAME_BODY_BYTES_MAX: usize = 64 << 20;

/// Bytes a Raft message takes in a batch besides its own: group (8) and len (4).
pub const RAFT_MESSAGE_OVERHEAD_BYTES: usize = 12;

/// Largest opaque Raft message one frame can carry (a batch of just that message).
pub const RAFT_MESSAGE_BYTES_MAX: usize =
    FRAME_BODY_BYTES_MAX - BODY_PREFIX_BYTES - 4 - RAFT_MESSAGE_OVERHEAD_BYTES;

/// Largest application request or response payload one frame can carry.
pub const APP_PAYLOAD_BYTES_MAX: usize = FRAME_BODY_BYTES_MAX - BODY_PREFIX_BYTES - 8;

const KIND_HELLO: u8 = 1;
const KIND_RAFT_BATCH: u8 = 2;
const KIND_APP_REQUEST: u8 = 3;
const KIND_APP_RESPONSE: u8 = 4;

/// Identifies a raftblk cluster; a node refuses connections from another cluster's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterId(pub u64);

/// Matches an application response to its request; chosen by the requester, unique per
/// (requester, connection lifetime) as far as the transport cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RequestId(pub u64);

/// One Raft message of one group, as opaque bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftMessage {
    /// The Raft group (volume) the message belongs to.
    pub group: GroupId,
    /// The encoded message, opaque to the transport.
    pub bytes: Bytes,
    /// Further parts of the message, sent right after `bytes` without being copied into one
    /// buffer; the receiver gets them all joined in `bytes` (and `more` empty).
    pub more: Vec<Bytes>,
}

impl RaftMessage {
    /// A message in one part.
    pub fn new(group: GroupId, bytes: Bytes) -> RaftMessage {
        RaftMessage { group, bytes, more: Vec::new() }
    }

    /// Bytes of the message, all parts.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.more.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this message takes inside a [`Body::RaftBatch`].
    pub fn wire_bytes(&self) -> usize {
        RAFT_MESSAGE_OVERHEAD_BYTES + self.len()
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// First frame on a connection: the sender's cluster (its node id is [`Frame::from`]).
    Hello {
        /// The cluster the sender belongs to.
        cluster: ClusterId,
    },
    /// Raft messages of any number of groups, in the order they were sent.
    RaftBatch(Vec<RaftMessage>),
    /// An opaque application request (client I/O forwarded to a leader).
    AppRequest {
        /// Chosen by the requester; echoed in the response.
        id: RequestId,
        /// Opaque to the transport.
        payload: Bytes,
    },
    /// The answer to an [`Body::AppRequest`].
    AppResponse {
        /// The id of the request this answers.
        id: RequestId,
        /// Opaque to the transport.
        payload: Bytes,
    },
}

/// One frame: who sent it and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sending node.
    pub from: NodeId,
    /// The contents.
    pub body: Body,
}

/// Why bytes are not a valid frame, or a frame cannot be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// frame body of {0} bytes exceeds the maximum of {FRAME_BODY_BYTES_MAX}
    #[error("frame body of {0} bytes exceeds the maximum of {FRAME_BODY_BYTES_MAX}")]
    TooLarge(usize),
    /// frame body of {0} bytes is shorter than the {BODY_PREFIX_BYTES}-byte prefix
    #[error("frame body of {0} bytes is shorter than the {BODY_PREFIX_BYTES}-byte prefix")]
    TooShort(usize),
    /// frame crc mismatch: header says {expected:#010x}, body hashes to {actual:#010x}
    #[error("frame crc mismatch: header says {expected:#010x}, body hashes to {actual:#010x}")]
    Crc {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of the body received.
        actual: u32,
    },
    /// peer speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}
    #[error("peer speaks protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u8),
    /// unknown frame kind {0}
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// frame payload ends inside a field
    #[error("frame payload ends inside a field")]
    Truncated,
    /// {0} bytes left over after the frame payload
    #[error("{0} bytes left over after the frame payload")]
    TrailingBytes(usize),
}

/// The result of [`decode`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, valid frame; its bytes were consumed from the buffer.
    Complete(Frame),
    /// The buffer holds a prefix of a frame; at least this many more bytes are needed.
    /// Nothing was consumed.
    NeedMore(usize),
    /// The bytes can never become a valid frame; close the connection. What is left in the
    /// buffer is unspecified (a frame whose header and CRC were fine but whose payload is
    /// malformed has been consumed).
    Corrupt(FrameError),
}

impl Frame {
    /// Bytes of the body once encoded.
    pub fn body_bytes(&self) -> usize {
        BODY_PREFIX_BYTES
            + match &self.body {
                Body::Hello { .. } => 8,
                Body::RaftBatch(messages) => 4 + messages.iter().map(RaftMessage::wire_bytes).sum::<usize>(),
                Body::AppRequest { payload, .. } | Body::AppResponse { payload, .. } => 8 + payload.len(),
            }
    }

    /// Appends the encoded frame to `out`. Fails only if the body would exceed
    /// [`FRAME_BODY_BYTES_MAX`]; `out` is unchanged then.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let mut gathered = Gather::default();
        self.encode_gathered(&mut gathered)?;
        for part in gathered.into_parts() {
            out.put_slice(&part);
        }
        Ok(())
    }

    /// Appends the encoded frame to `out` as [`Frame::encode`] does, large payloads shared
    /// rather than copied (see [`Gather`]), for a vectored write.
    pub fn encode_gathered(&self, out: &mut Gather) -> Result<(), FrameError> {
        let body_len = self.body_bytes();
        if body_len > FRAME_BODY_BYTES_MAX {
            return Err(FrameError::TooLarge(body_len));
        }
        let mut body = Gather::default();
        body.put_slice(&[PROTOCOL_VERSION]);
        match &self.body {
            Body::Hello { cluster } => {
                body.put_slice(&[KIND_HELLO]);
                body.put_slice(&self.from.0.to_le_bytes());
                body.put_slice(&cluster.0.to_le_bytes());
            }
            Body::RaftBatch(messages) => {
                body.put_slice(&[KIND_RAFT_BATCH]);
                body.put_slice(&self.from.0.to_le_bytes());
                // Each message takes at least 12 bytes, so the count fits in u32.
                body.put_slice(&(messages.len() as u32).to_le_bytes());
                for m in messages {
                    body.put_slice(&m.group.0.to_le_bytes());
                    // Within the body's limit, which fits in u32 (checked above).
                    body.put_slice(&(m.len() as u32).to_le_bytes());
                    body.put_bytes(&m.bytes);
                    for part in &m.more {
                        body.put_bytes(part);
                    }
                }
            }
            Body::AppRequest { id, payload } | Body::AppResponse { id, payload } => {
                let kind = if matches!(self.body, Body::AppRequest { .. }) {
                    KIND_APP_REQUEST
                } else {
                    KIND_APP_RESPONSE
                };
                body.put_slice(&[kind]);
                body.put_slice(&self.from.0.to_le_bytes());
                body.put_slice(&id.0.to_le_bytes());
                body.put_bytes(payload);
            }
        }
        assert_eq!(body.len(), body_len, "frame body length miscomputed");
        let parts = body.into_parts();
        let mut crc = crc32fast::Hasher::new();
        for part in &parts {
            crc.update(part);
        }
        // Within FRAME_BODY_BYTES_MAX, which fits in u32 (checked above).
        out.put_slice(&(body_len as u32).to_le_bytes());
        out.put_slice(&crc.finalize().to_le_bytes());
        for part in &parts {
            out.put_bytes(part);
        }
        Ok(())
    }
}

/// Decodes the frame at the start of `buf`, consuming it if it is complete and valid.
///
/// Payloads of the returned frame share `buf`'s allocation (no copy).
pub fn decode(buf: &mut BytesMut) -> Decoded {
    if buf.len() < FRAME_HEADER_BYTES {
        return Decoded::NeedMore(FRAME_HEADER_BYTES - buf.len());
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let expected = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > FRAME_BODY_BYTES_MAX {
        return Decoded::Corrupt(FrameError::TooLarge(len));
    }
    if len < BODY_PREFIX_BYTES {
        return Decoded::Corrupt(FrameError::TooShort(len));
    }
    let total = FRAME_HEADER_BYTES + len;
    if buf.len() < total {
        return Decoded::NeedMore(total - buf.len());
    }
    let actual = crc32fast::hash(&buf[FRAME_HEADER_BYTES..total]);
    if actual != expected {
        return Decoded::Corrupt(FrameError::Crc { expected, actual });
    }
    let version = buf[FRAME_HEADER_BYTES];
    if version != PROTOCOL_VERSION {
        return Decoded::Corrupt(FrameError::UnsupportedVersion(version));
    }
    // Hand the frame's bytes over without copying; payloads share the allocation.
    let frame = buf.split_to(total).freeze();
    match parse_body(frame.slice(FRAME_HEADER_BYTES..)) {
        Ok(frame) => Decoded::Complete(frame),
        Err(e) => Decoded::Corrupt(e),
    }
}

/// Parses a body whose length and CRC were checked and whose version byte is ours.
fn parse_body(mut rest: Bytes) -> Result<Frame, FrameError> {
    let _version = rest.try_get_u8().map_err(|_| FrameError::Truncated)?;
    let kind = rest.try_get_u8().map_err(|_| FrameError::Truncated)?;
    let from = NodeId(take_u64(&mut rest)?);
    let body = match kind {
        KIND_HELLO => {
            let cluster = ClusterId(take_u64(&mut rest)?);
            Body::Hello { cluster }
        }
        KIND_RAFT_BATCH => {
            let count = take_u32(&mut rest)? as usize;
            if count > rest.len() / RAFT_MESSAGE_OVERHEAD_BYTES {
                return Err(FrameError::Truncated);
            }
            let mut messages = Vec::with_capacity(count);
            for _ in 0..count {
                let group = GroupId(take_u64(&mut rest)?);
                let len = take_u32(&mut rest)? as usize;
                if rest.len() < len {
                    return Err(FrameError::Truncated);
                }
                messages.push(RaftMessage::new(group, rest.split_to(len)));
            }
            Body::RaftBatch(messages)
        }
        KIND_APP_REQUEST => {
            let id = RequestId(take_u64(&mut rest)?);
            Body::AppRequest { id, payload: std::mem::take(&mut rest) }
        }
        KIND_APP_RESPONSE => {
            let id = RequestId(take_u64(&mut rest)?);
            Body::AppResponse { id, payload: std::mem::take(&mut rest) }
        }
        other => return Err(FrameError::UnknownKind(other)),
    };
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(Frame { from, body })
}

fn take_u64(b: &mut Bytes) -> Result<u64, FrameError> {
    b.try_get_u64_le().map_err(|_| FrameError::Truncated)
}

fn take_u32(b: &mut Bytes) -> Result<u32, FrameError> {
    b.try_get_u32_le().map_err(|_| FrameError::Truncated)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn raft_batch() -> Frame {
        Frame {
            from: NodeId(7),
            body: Body::RaftBatch(vec![
                RaftMessage::new(GroupId(1), Bytes::from_static(b"hello")),
                RaftMessage::new(GroupId(u64::MAX), Bytes::new()),
                RaftMessage::new(GroupId(3), Bytes::from(vec![0xAB; 1000])),
            ]),
        }
    }

    fn all_kinds() -> Vec<Frame> {
        vec![
            Frame { from: NodeId(1), body: Body::Hello { cluster: ClusterId(0xC0FFEE) } },
            raft_batch(),
            Frame { from: NodeId(2), body: Body::RaftBatch(Vec::new()) },
            Frame {
                from: NodeId(3),
                body: Body::AppRequest { id: RequestId(9), payload: Bytes::from_static(b"write 4k") },
            },
            Frame { from: NodeId(4), body: Body::AppResponse { id: RequestId(9), payload: Bytes::new() } },
        ]
    }

    fn encode(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        frame.encode(&mut out).unwrap();
        out
    }

    /// Re-encodes the header of `buf` after its body was edited, so only the edit is wrong.
    fn fix_crc(buf: &mut BytesMut) {
        let len = buf.len() - FRAME_HEADER_BYTES;
        buf[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc32fast::hash(&buf[FRAME_HEADER_BYTES..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn round_trip_every_kind() {
        for frame in all_kinds() {
            let mut buf = encode(&frame);
            assert_eq!(buf.len(), FRAME_HEADER_BYTES + frame.body_bytes());
            assert_eq!(decode(&mut buf), Decoded::Complete(frame));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn back_to_back_frames_decode_in_order() {
        let frames = all_kinds();
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf).unwrap();
        }
        for f in frames {
            assert_eq!(decode(&mut buf), Decoded::Complete(f));
        }
        assert_eq!(decode(&mut buf), Decoded::NeedMore(FRAME_HEADER_BYTES));
    }

    #[test]
    fn every_strict_prefix_needs_more_and_consumes_nothing() {
        for frame in all_kinds() {
            let whole = encode(&frame);
            for cut in 0..whole.len() {
                let mut buf = BytesMut::from(&whole[..cut]);
                match decode(&mut buf) {
                    Decoded::NeedMore(n) => {
                        assert!(n >= 1 && cut + n <= whole.len(), "cut {cut}: need {n}");
                        if cut >= FRAME_HEADER_BYTES {
                            assert_eq!(cut + n, whole.len());
                        }
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
                assert_eq!(buf.len(), cut);
            }
        }
    }

    #[test]
    fn oversized_len_is_corrupt_from_the_header_alone() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(FRAME_BODY_BYTES_MAX as u32 + 1);
        buf.put_u32_le(0);
        assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::TooLarge(FRAME_BODY_BYTES_MAX + 1)));
        let mut buf = BytesMut::from(&[0xFF; 8][..]);
        assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn max_len_is_waited_for_not_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32_le(FRAME_BODY_BYTES_MAX as u32);
        buf.put_u32_le(0);
        assert_eq!(decode(&mut buf), Decoded::NeedMore(FRAME_BODY_BYTES_MAX));
    }

    #[test]
    fn len_below_body_prefix_is_corrupt() {
        for len in 0..BODY_PREFIX_BYTES {
            let mut buf = BytesMut::new();
            buf.put_u32_le(len as u32);
            buf.put_u32_le(0);
            buf.put_bytes(0, len);
            assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::TooShort(len)));
        }
    }

    #[test]
    fn any_flipped_bit_is_a_crc_failure() {
        let whole = encode(&raft_batch());
        for i in FRAME_HEADER_BYTES..whole.len() {
            let mut buf = whole.clone();
            buf[i] ^= 0x10;
            assert!(matches!(decode(&mut buf), Decoded::Corrupt(FrameError::Crc { .. })), "byte {i}");
        }
        let mut buf = whole.clone();
        buf[5] ^= 1;
        assert!(matches!(decode(&mut buf), Decoded::Corrupt(FrameError::Crc { .. })));
    }

    #[test]
    fn other_version_is_reported_as_such() {
        let mut buf = encode(&raft_batch());
        buf[FRAME_HEADER_BYTES] = PROTOCOL_VERSION + 1;
        fix_crc(&mut buf);
        assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::UnsupportedVersion(PROTOCOL_VERSION + 1)));
    }

    #[test]
    fn unknown_kind_is_corrupt() {
        for kind in [0u8, 5, 0xFF] {
            let mut buf = encode(&raft_batch());
            buf[FRAME_HEADER_BYTES + 1] = kind;
            fix_crc(&mut buf);
            assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::UnknownKind(kind)));
        }
    }

    #[test]
    fn truncated_payloads_are_corrupt() {
        // Hello without (all of) its cluster id, app frames without their request id.
        for (frame, keep) in [
            (Frame { from: NodeId(1), body: Body::Hello { cluster: ClusterId(1) } }, 7),
            (
                Frame { from: NodeId(1), body: Body::AppRequest { id: RequestId(1), payload: Bytes::new() } },
                3,
            ),
            (
                Frame {
                    from: NodeId(1),
                    body: Body::AppResponse { id: RequestId(1), payload: Bytes::new() },
                },
                0,
            ),
        ] {
            let mut buf = encode(&frame);
            buf.truncate(FRAME_HEADER_BYTES + BODY_PREFIX_BYTES + keep);
            fix_crc(&mut buf);
            assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::Truncated));
        }
        // A batch cut inside every field of its messages.
        let whole = encode(&raft_batch());
        for cut in FRAME_HEADER_BYTES + BODY_PREFIX_BYTES..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            fix_crc(&mut buf);
            match decode(&mut buf) {
                Decoded::Corrupt(FrameError::Truncated) => {}
                // Cut right after a whole message: the count promises more.
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn batch_count_larger_than_the_body_is_refused_before_allocating() {
        let mut buf = encode(&Frame { from: NodeId(1), body: Body::RaftBatch(Vec::new()) });
        let count_at = FRAME_HEADER_BYTES + BODY_PREFIX_BYTES;
        buf[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fix_crc(&mut buf);
        assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::Truncated));
    }

    #[test]
    fn message_len_past_the_end_is_corrupt() {
        let mut buf = encode(&raft_batch());
        let len_at = FRAME_HEADER_BYTES + BODY_PREFIX_BYTES + 4 + 8;
        buf[len_at..len_at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
        fix_crc(&mut buf);
        assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::Truncated));
    }

    #[test]
    fn trailing_bytes_are_corrupt() {
        for frame in [Frame { from: NodeId(1), body: Body::Hello { cluster: ClusterId(1) } }, raft_batch()] {
            let mut buf = encode(&frame);
            buf.put_slice(b"xyz");
            fix_crc(&mut buf);
            assert_eq!(decode(&mut buf), Decoded::Corrupt(FrameError::TrailingBytes(3)));
        }
    }

    #[test]
    fn encode_refuses_a_body_over_the_maximum() {
        let frame = Frame {
            from: NodeId(1),
            body: Body::AppRequest {
                id: RequestId(1),
                payload: Bytes::from(vec![0; APP_PAYLOAD_BYTES_MAX + 1]),
            },
        };
        let mut out = BytesMut::from(&b"keep"[..]);
        assert_eq!(frame.encode(&mut out), Err(FrameError::TooLarge(FRAME_BODY_BYTES_MAX + 1)));
        assert_eq!(&out[..], b"keep");
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let payload = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        let message =
            (any::<u64>(), payload.clone()).prop_map(|(g, bytes)| RaftMessage::new(GroupId(g), bytes));
        let body = prop_oneof![
            any::<u64>().prop_map(|c| Body::Hello { cluster: ClusterId(c) }),
            proptest::collection::vec(message, 0..20).prop_map(Body::RaftBatch),
            (any::<u64>(), payload.clone())
                .prop_map(|(id, payload)| Body::AppRequest { id: RequestId(id), payload }),
            (any::<u64>(), payload)
                .prop_map(|(id, payload)| Body::AppResponse { id: RequestId(id), payload }),
        ];
        (any::<u64>(), body).prop_map(|(from, body)| Frame { from: NodeId(from), body })
    }

    proptest! {
        /// Frames encoded back to back and fed to the decoder in arbitrary chunks come out
        /// whole, equal and in order.
        #[test]
        fn round_trip_in_arbitrary_chunks(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            chunks in proptest::collection::vec(1usize..200, 1..50),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire).unwrap();
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut chunk_sizes = chunks.iter().cycle();
            while !wire.is_empty() {
                let n = (*chunk_sizes.next().unwrap()).min(wire.len());
                buf.extend_from_slice(&wire.split_to(n));
                loop {
                    match decode(&mut buf) {
                        Decoded::Complete(f) => got.push(f),
                        Decoded::NeedMore(_) => break,
                        Decoded::Corrupt(e) => panic!("corrupt: {e}"),
                    }
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }
    }
}
