//! The wire form of one snapshot chunk, sans-IO: a range of the source's copy under one
//! CRC. A volume's chunk carries sealed blocks (every block's state and version, and the
//! stored bytes of the sealed ones only, so holes and zeroed blocks cost a few bytes); a
//! state machine's chunk carries its image.
//!
//! ```text
//! [volume_size u64][source_applied u64][offset u64][body_len u32][body]
//! [crc32 u32 over everything before it]
//! body (volume): raftblk_blockdev::seal::wire::encode_blocks (first block = offset / 4096)
//! body (machine): the image
//! ```
//!
//! All integers little-endian. An encrypted volume's chunks hold only ciphertext: blocks
//! travel exactly as stored, seals included, and the receiver checks them again.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftblk_blockdev::seal::{wire, BlockImage, BLOCK};

const FIXED_BYTES: usize = 8 + 8 + 8 + 4;

/// One chunk of a copy as a source sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The source's size when the chunk was read (a volume's, or the image's length).
    pub volume_size: u64,
    /// The index the source's store had applied when the chunk was read.
    pub source_applied: u64,
    /// Where the chunk starts.
    pub offset: u64,
    /// Encoded sealed blocks (a volume), or the image (a state machine).
    pub body: Bytes,
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
    /// The chunk of a volume holding `image`.
    pub fn of_blocks(
        volume_size: u64,
        source_applied: u64,
        read: &raftblk_blockdev::seal::SealedBlocks,
    ) -> Chunk {
        Chunk {
            volume_size,
            source_applied,
            offset: read.first.saturating_mul(BLOCK),
            body: wire::encode_blocks(read),
        }
    }

    /// The sealed blocks of a volume's chunk, checked against the chunk's place and size.
    pub fn blocks(&self) -> Result<BlockImage, ChunkError> {
        let image =
            wire::decode_image(self.body.clone()).map_err(|_| ChunkError::Malformed("undecodable blocks"))?;
        if image.first.checked_mul(BLOCK) != Some(self.offset) {
            return Err(ChunkError::Malformed("blocks start elsewhere than the chunk"));
        }
        let end = (image.first + image.states.len() as u64).saturating_mul(BLOCK);
        if end > self.volume_size {
            return Err(ChunkError::Malformed("blocks reach past the volume"));
        }
        Ok(image)
    }

    /// Encodes the chunk with its CRC.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FIXED_BYTES + self.body.len() + 4);
        b.put_u64_le(self.volume_size);
        b.put_u64_le(self.source_applied);
        b.put_u64_le(self.offset);
        b.put_u32_le(self.body.len() as u32);
        b.put_slice(&self.body);
        let crc = crc32fast::hash(&b);
        b.put_u32_le(crc);
        b.freeze()
    }

    /// Decodes and checks a chunk; `body` is a zero-copy slice of `bytes`.
    pub fn decode(mut bytes: Bytes) -> Result<Chunk, ChunkError> {
        if bytes.len() < FIXED_BYTES + 4 {
            return Err(ChunkError::Truncated);
        }
        let body_end = bytes.len() - 4;
        let crc = u32::from_le_bytes(bytes[body_end..].try_into().map_err(|_| ChunkError::Truncated)?);
        if crc32fast::hash(&bytes[..body_end]) != crc {
            return Err(ChunkError::Checksum);
        }
        bytes.truncate(body_end);
        let volume_size = bytes.get_u64_le();
        let source_applied = bytes.get_u64_le();
        let offset = bytes.get_u64_le();
        let len = bytes.get_u32_le() as usize;
        if bytes.len() != len {
            return Err(ChunkError::Truncated);
        }
        Ok(Chunk { volume_size, source_applied, offset, body: bytes })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use raftblk_blockdev::seal::{BlockState, Seal, SealedBlocks, BLOCK_BYTES};

    use super::*;

    fn sample() -> Chunk {
        let mut data = vec![0u8; 3 * BLOCK_BYTES];
        data[..BLOCK_BYTES].fill(3);
        let states = vec![
            BlockState::Sealed { seal: Seal::plain(2, &data[..BLOCK_BYTES]), version: 4097 },
            BlockState::Zero { version: 0 },
            BlockState::Zero { version: 8193 },
        ];
        Chunk::of_blocks(1 << 20, 42, &SealedBlocks { first: 2, data: Bytes::from(data), states })
    }

    #[test]
    fn round_trips() {
        let c = sample();
        assert_eq!(Chunk::decode(c.encode()), Ok(c.clone()));
        let image = c.blocks().unwrap();
        assert_eq!(image.states.len(), 3);
        assert_eq!(image.data.len(), BLOCK_BYTES, "only the sealed block's bytes travel");
        image.check().unwrap();
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
        assert_eq!(Chunk::decode(sealed(&body[..body.len() - 1])), Err(ChunkError::Truncated));
        // Blocks past the volume end, or elsewhere than the chunk says.
        let mut b = body.to_vec();
        b[0..8].copy_from_slice(&8192u64.to_le_bytes());
        assert!(matches!(Chunk::decode(sealed(&b)).unwrap().blocks(), Err(ChunkError::Malformed(_))));
        let mut b = body.to_vec();
        b[16..24].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(Chunk::decode(sealed(&b)).unwrap().blocks(), Err(ChunkError::Malformed(_))));
        for n in 0..40 {
            assert!(Chunk::decode(Bytes::from(vec![0u8; n])).is_err());
        }
    }
}
