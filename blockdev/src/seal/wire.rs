//! The binary form of seals and block states, for every place they travel (Raft entries,
//! forwarded requests and answers, snapshot chunks). Sans-IO; integers little-endian.
//!
//! ```text
//! seal:  [kind u8: 1 plain | 2 aes-256-gcm][crc32c u32]
//!        kind 2 adds [key generation u32][nonce 12][tag 16]
//! state: [tag u8: 1 sealed | 2 zero | 3 damaged]
//!        sealed: [version u64][seal]    zero: [version u64]    damaged: [damage u8]
//! blocks: [first u64][count u32] count × state, then the stored bytes of the sealed
//!        blocks only, in order (zero and damaged blocks carry none)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{
    BlockImage, BlockState, CipherSeal, Damage, Seal, SealedBlocks, BLOCK_BYTES, NONCE_BYTES, TAG_BYTES,
};

/// Most blocks one encoded run may hold (64 MiB of data; reads and chunks stay far below).
pub const BLOCKS_MAX: u32 = 1 << 14;

const SEAL_PLAIN: u8 = 1;
const SEAL_GCM: u8 = 2;
const STATE_SEALED: u8 = 1;
const STATE_ZERO: u8 = 2;
const STATE_DAMAGED: u8 = 3;

/// Largest encoded seal.
pub const SEAL_BYTES_MAX: usize = 1 + 4 + 4 + NONCE_BYTES + TAG_BYTES;

/// Why bytes are not a seal or block state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends early.
    #[error("sealed block metadata is truncated")]
    Truncated,
    /// An unknown kind or tag byte.
    #[error("unknown sealed block metadata kind {0}")]
    Unknown(u8),
    /// Counts and lengths that contradict each other.
    #[error("malformed sealed blocks: {0}")]
    Malformed(&'static str),
}

/// Bytes [`put_seal`] writes for `seal`.
pub fn seal_len(seal: &Seal) -> usize {
    if seal.cipher.is_some() {
        SEAL_BYTES_MAX
    } else {
        5
    }
}

/// Appends `seal`.
pub fn put_seal(out: &mut impl BufMut, seal: &Seal) {
    match &seal.cipher {
        None => {
            out.put_u8(SEAL_PLAIN);
            out.put_u32_le(seal.crc);
        }
        Some(c) => {
            out.put_u8(SEAL_GCM);
            out.put_u32_le(seal.crc);
            out.put_u32_le(c.key_generation);
            out.put_slice(&c.nonce);
            out.put_slice(&c.tag);
        }
    }
}

fn need(buf: &impl Buf, n: usize) -> Result<(), WireError> {
    if buf.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

/// Takes one seal off the front of `buf`.
pub fn get_seal(buf: &mut impl Buf) -> Result<Seal, WireError> {
    need(buf, 5)?;
    let kind = buf.get_u8();
    let crc = buf.get_u32_le();
    match kind {
        SEAL_PLAIN => Ok(Seal { crc, cipher: None }),
        SEAL_GCM => {
            need(buf, 4 + NONCE_BYTES + TAG_BYTES)?;
            let key_generation = buf.get_u32_le();
            let mut nonce = [0u8; NONCE_BYTES];
            buf.copy_to_slice(&mut nonce);
            let mut tag = [0u8; TAG_BYTES];
            buf.copy_to_slice(&mut tag);
            Ok(Seal { crc, cipher: Some(CipherSeal { key_generation, nonce, tag }) })
        }
        other => Err(WireError::Unknown(other)),
    }
}

/// Bytes [`put_state`] writes for `state`.
pub fn state_len(state: &BlockState) -> usize {
    match state {
        BlockState::Sealed { seal, .. } => 1 + 8 + seal_len(seal),
        BlockState::Zero { .. } => 9,
        BlockState::Damaged(_) => 2,
    }
}

/// Appends `state`.
pub fn put_state(out: &mut impl BufMut, state: &BlockState) {
    match state {
        BlockState::Sealed { seal, version } => {
            out.put_u8(STATE_SEALED);
            out.put_u64_le(*version);
            put_seal(out, seal);
        }
        BlockState::Zero { version } => {
            out.put_u8(STATE_ZERO);
            out.put_u64_le(*version);
        }
        BlockState::Damaged(d) => {
            out.put_u8(STATE_DAMAGED);
            out.put_u8(match d {
                Damage::Checksum => 1,
                Damage::Metadata => 2,
            });
        }
    }
}

/// Takes one block state off the front of `buf`.
pub fn get_state(buf: &mut impl Buf) -> Result<BlockState, WireError> {
    need(buf, 1)?;
    match buf.get_u8() {
        STATE_SEALED => {
            need(buf, 8)?;
            let version = buf.get_u64_le();
            Ok(BlockState::Sealed { version, seal: get_seal(buf)? })
        }
        STATE_ZERO => {
            need(buf, 8)?;
            Ok(BlockState::Zero { version: buf.get_u64_le() })
        }
        STATE_DAMAGED => {
            need(buf, 1)?;
            match buf.get_u8() {
                1 => Ok(BlockState::Damaged(Damage::Checksum)),
                2 => Ok(BlockState::Damaged(Damage::Metadata)),
                other => Err(WireError::Unknown(other)),
            }
        }
        other => Err(WireError::Unknown(other)),
    }
}

/// Encodes blocks as read (only sealed blocks' bytes travel).
pub fn encode_blocks(read: &SealedBlocks) -> Bytes {
    let sealed = read.states.iter().filter(|s| matches!(s, BlockState::Sealed { .. })).count();
    let meta: usize = read.states.iter().map(state_len).sum();
    let mut out = BytesMut::with_capacity(12 + meta + sealed * BLOCK_BYTES);
    out.put_u64_le(read.first);
    out.put_u32_le(read.states.len() as u32);
    for s in &read.states {
        put_state(&mut out, s);
    }
    for (i, s) in read.states.iter().enumerate() {
        if matches!(s, BlockState::Sealed { .. }) {
            out.put_slice(read.block(i));
        }
    }
    out.freeze()
}

/// Decodes [`encode_blocks`] into an image (its data a zero-copy slice of `bytes`). The
/// states may include damaged blocks; [`BlockImage::check`] refuses those for storing.
pub fn decode_image(mut bytes: Bytes) -> Result<BlockImage, WireError> {
    need(&bytes, 12)?;
    let first = bytes.get_u64_le();
    let count = bytes.get_u32_le();
    if count > BLOCKS_MAX {
        return Err(WireError::Malformed("too many blocks"));
    }
    let mut states = Vec::with_capacity(count as usize);
    for _ in 0..count {
        states.push(get_state(&mut bytes)?);
    }
    let sealed = states.iter().filter(|s| matches!(s, BlockState::Sealed { .. })).count();
    if bytes.len() != sealed * BLOCK_BYTES {
        return Err(WireError::Malformed("data length does not match the sealed blocks"));
    }
    Ok(BlockImage { first, states, data: bytes })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn samples() -> Vec<BlockState> {
        let cipher = CipherSeal { key_generation: 3, nonce: [7; 12], tag: [9; 16] };
        vec![
            BlockState::Sealed { seal: Seal { crc: 0xdead_beef, cipher: None }, version: 42 },
            BlockState::Sealed { seal: Seal { crc: 1, cipher: Some(cipher) }, version: u64::MAX },
            BlockState::Zero { version: 0 },
            BlockState::Zero { version: 5 },
            BlockState::Damaged(Damage::Checksum),
            BlockState::Damaged(Damage::Metadata),
        ]
    }

    #[test]
    fn blocks_round_trip_with_only_sealed_data() {
        let states = samples();
        let mut data = vec![0u8; states.len() * BLOCK_BYTES];
        data[..BLOCK_BYTES].fill(1);
        data[BLOCK_BYTES..2 * BLOCK_BYTES].fill(2);
        let read = SealedBlocks { first: 9, data: Bytes::from(data), states: states.clone() };
        let enc = encode_blocks(&read);
        let image = decode_image(enc.clone()).unwrap();
        assert_eq!(image.data.len(), 2 * BLOCK_BYTES, "zero and damaged blocks carry no bytes");
        let back = image.into_blocks();
        assert_eq!(back.states, states);
        assert_eq!(back.block(1), read.block(1));
        assert!(back.block(2).iter().all(|&b| b == 0));
        for cut in [0, 5, 13, enc.len() - 1] {
            assert!(decode_image(enc.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn states_round_trip_and_cuts_are_refused() {
        for s in samples() {
            let mut b = Vec::new();
            put_state(&mut b, &s);
            assert_eq!(b.len(), state_len(&s));
            assert_eq!(get_state(&mut b.as_slice()).unwrap(), s);
            for cut in 0..b.len() {
                assert!(get_state(&mut &b[..cut]).is_err(), "{s:?} cut at {cut}");
            }
        }
        assert_eq!(get_state(&mut [9u8].as_slice()), Err(WireError::Unknown(9)));
        assert_eq!(get_seal(&mut [3u8, 0, 0, 0, 0].as_slice()), Err(WireError::Unknown(3)));
    }
}
