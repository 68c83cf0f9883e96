//! The wire form of one snapshot chunk, sans-IO: a range of the source's volume as extents
//! (data or hole) plus the bytes of the data extents, under one CRC.
//!
//! ```text
//! [volume_size u64][source_applied u64][offset u64][count u32]
//! count × [len u64][kind u8: 0 hole, 1 data]
//! [data: the bytes of every data extent, in order]
//! [crc32 u32 over everything before it]
//! ```
//!
//! All integers little-endian. Holes carry no bytes, which is how a snapshot ships only the
//! allocated extents.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftblk_blockdev::backend::ExtentKind;

/// Most extents in one chunk (a chunk of 4 MiB in 4 KiB blocks alternating data and hole
/// has 1024).
pub const CHUNK_EXTENTS_MAX: usize = 1 << 16;

const FIXED_BYTES: usize = 8 + 8 + 8 + 4;
const EXTENT_BYTES: usize = 9;

/// One chunk of a volume as a source sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The source volume's size when the chunk was read.
    pub volume_size: u64,
    /// The index the source's store had applied when the chunk was read.
    pub source_applied: u64,
    /// Where the chunk starts in the volume.
    pub offset: u64,
    /// Runs of data and holes, in order from `offset`.
    pub extents: Vec<(u64, ExtentKind)>,
    /// The bytes of the data extents, concatenated.
    pub data: Bytes,
}

/// Why bytes are not a valid chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// shorter than its header says
    #[error("snapshot chunk is truncated")]
    Truncated,
    /// the CRC does not match: damaged in transit
    #[error("snapshot chunk checksum mismatch")]
    Checksum,
    /// counts or lengths that contradict each other
    #[error("snapshot chunk is malformed: {0}")]
    Malformed(&'static str),
}

impl Chunk {
    /// Bytes the extents cover.
    pub fn len_bytes(&self) -> u64 {
        self.extents.iter().map(|(len, _)| len).sum()
    }

    /// Encodes the chunk with its CRC.
    pub fn encode(&self) -> Bytes {
        let mut b =
            BytesMut::with_capacity(FIXED_BYTES + EXTENT_BYTES * self.extents.len() + self.data.len() + 4);
        b.put_u64_le(self.volume_size);
        b.put_u64_le(self.source_applied);
        b.put_u64_le(self.offset);
        b.put_u32_le(self.extents.len() as u32);
        for (len, kind) in &self.extents {
            b.put_u64_le(*len);
            b.put_u8(u8::from(*kind == ExtentKind::Data));
        }
        b.put_slice(&self.data);
        let crc = crc32fast::hash(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    /// Decodes and checks a chunk; `data` is a zero-copy slice of `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<Chunk, ChunkError> {
        if bytes.len() < FIXED_BYTES + 4 {
            return Err(ChunkError::Truncated);
        }
        let body_len = bytes.len() - 4;
        let crc = u32::from_le_bytes(bytes[body_len..].try_into().map_err(|_| ChunkError::Truncated)?);
        if crc32fast::hash(&bytes[..body_len]) != crc {
            return Err(ChunkError::Checksum);
        }
        bytes.truncate(body_len);
        let volume_size = bytes.get_u64_le();
        let source_applied = bytes.get_u64_le();
        let offset = bytes.get_u64_le();
        let count = bytes.get_u32_le() as usize;
        if count > CHUNK_EXTENTS_MAX {
            return Err(ChunkError::Malformed("too many extents"));
        }
        if bytes.len() < count * EXTENT_BYTES {
            return Err(ChunkError::Truncated);
        }
        let mut extents = Vec::with_capacity(count);
        let mut data_len = 0u64;
        let mut end = offset;
        for _ in 0..count {
            let len = bytes.get_u64_le();
            let kind = match bytes.get_u8() {
                0 => ExtentKind::Hole,
                1 => ExtentKind::Data,
                _ => return Err(ChunkError::Malformed("unknown extent kind")),
            };
            if len == 0 {
                return Err(ChunkError::Malformed("empty extent"));
            }
            end = end.checked_add(len).ok_or(ChunkError::Malformed("extents overflow"))?;
            if kind == ExtentKind::Data {
                data_len += len;
            }
            extents.push((len, kind));
        }
        if end > volume_size {
            return Err(ChunkError::Malformed("extents reach past the volume"));
        }
        if bytes.len() as u64 != data_len {
            return Err(ChunkError::Malformed("data length does not match the data extents"));
        }
        Ok(Chunk { volume_size, source_applied, offset, extents, data: bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Chunk {
        Chunk {
            volume_size: 1 << 20,
            source_applied: 42,
            offset: 8192,
            extents: vec![(4096, ExtentKind::Data), (8192, ExtentKind::Hole), (4096, ExtentKind::Data)],
            data: Bytes::from((0..8192u32).map(|i| i as u8).collect::<Vec<u8>>()),
        }
    }

    #[test]
    fn round_trips() {
        let c = sample();
        assert_eq!(c.len_bytes(), 16384);
        assert_eq!(Chunk::decode(c.encode()), Ok(c));
        let empty = Chunk { extents: Vec::new(), data: Bytes::new(), ..sample() };
        assert_eq!(Chunk::decode(empty.encode()), Ok(empty));
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let bytes = sample().encode().to_vec();
        for i in (0..bytes.len()).step_by(97) {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x10;
            assert!(Chunk::decode(Bytes::from(damaged)).is_err(), "flip at {i} went unnoticed");
        }
    }

    /// Re-seals a body with a valid CRC, so the structural checks are what is tested.
    fn sealed(body: &[u8]) -> Bytes {
        let mut b = BytesMut::from(body);
        let crc = crc32fast::hash(body);
        b.put_u32_le(crc);
        b.freeze()
    }

    #[test]
    fn structural_lies_are_refused_even_with_a_good_crc() {
        let good = sample().encode();
        let body = &good[..good.len() - 4];
        // Data one byte short of what the data extents claim.
        assert!(matches!(Chunk::decode(sealed(&body[..body.len() - 1])), Err(ChunkError::Malformed(_))));
        // A count far larger than the extents present.
        let mut b = body.to_vec();
        b[24..28].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(Chunk::decode(sealed(&b)), Err(ChunkError::Truncated));
        // Extents past the volume end.
        let mut b = body.to_vec();
        b[0..8].copy_from_slice(&100u64.to_le_bytes());
        assert!(matches!(Chunk::decode(sealed(&b)), Err(ChunkError::Malformed(_))));
        // Short inputs of every length fail cleanly.
        for n in 0..40 {
            assert!(Chunk::decode(Bytes::from(vec![0u8; n])).is_err());
        }
    }
}
