//! One metadata record (64 bytes) and the pair of them each block has, sans-IO.
//!
//! ```text
//! [0..4)   crc32c of bytes [4..64)          (a torn or rotten record fails it)
//! [4]      kind: 0 empty | 1 sealed | 2 zero
//! [5]      format: 1
//! [6]      cipher: 0 none | 1 AES-256-GCM
//! [7]      0
//! [8..16)  seq: this store's order of writes (higher = written later)
//! [16..24) version: the write that produced the block (a log position in a cluster)
//! [24..28) the block's crc32c (super::super::seal::block_crc of index and stored bytes)
//! [28..32) key generation        } encrypted blocks only
//! [32..44) nonce                 }
//! [44..60) tag                   }
//! [60..64) 0
//! ```
//!
//! An all-zero record is *empty* (never written, or cleared). Anything else whose crc
//! fails is *damaged*.

use crate::seal::{CipherSeal, Seal, NONCE_BYTES, TAG_BYTES};

/// Bytes per record.
pub const RECORD_BYTES: usize = 64;
/// Bytes per block's pair of records (slot 0, then slot 1).
pub const PAIR_BYTES: usize = 2 * RECORD_BYTES;

const FORMAT: u8 = 1;
const KIND_SEALED: u8 = 1;
const KIND_ZERO: u8 = 2;

/// What a record says about its block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The block holds bytes matching `seal`.
    Sealed(Seal),
    /// The block is zero.
    Zero,
}

/// A decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Local write order.
    pub seq: u64,
    /// Which write produced the block.
    pub version: u64,
    /// What the block holds.
    pub content: Content,
}

/// A slot as found on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Never written, or cleared.
    Empty,
    /// A valid record.
    Valid(Record),
    /// The record's own checksum fails.
    Damaged,
}

impl Record {
    /// Encodes the record.
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        b[5] = FORMAT;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.version.to_le_bytes());
        match &self.content {
            Content::Zero => b[4] = KIND_ZERO,
            Content::Sealed(seal) => {
                b[4] = KIND_SEALED;
                b[24..28].copy_from_slice(&seal.crc.to_le_bytes());
                if let Some(c) = &seal.cipher {
                    b[6] = 1;
                    b[28..32].copy_from_slice(&c.key_generation.to_le_bytes());
                    b[32..44].copy_from_slice(&c.nonce);
                    b[44..60].copy_from_slice(&c.tag);
                }
            }
        }
        let crc = crc32c::crc32c(&b[4..]);
        b[..4].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Decodes a slot (`b` is [`RECORD_BYTES`] long).
pub fn decode(b: &[u8]) -> Slot {
    debug_assert_eq!(b.len(), RECORD_BYTES);
    if b.iter().all(|&x| x == 0) {
        return Slot::Empty;
    }
    if crc32c::crc32c(&b[4..]) != u32_at(b, 0) || b[5] != FORMAT {
        return Slot::Damaged;
    }
    let seq = u64_at(b, 8);
    let version = u64_at(b, 16);
    let content = match (b[4], b[6]) {
        (KIND_ZERO, _) => Content::Zero,
        (KIND_SEALED, 0) => Content::Sealed(Seal { crc: u32_at(b, 24), cipher: None }),
        (KIND_SEALED, 1) => {
            let mut nonce = [0u8; NONCE_BYTES];
            nonce.copy_from_slice(&b[32..44]);
            let mut tag = [0u8; TAG_BYTES];
            tag.copy_from_slice(&b[44..60]);
            Content::Sealed(Seal {
                crc: u32_at(b, 24),
                cipher: Some(CipherSeal { key_generation: u32_at(b, 28), nonce, tag }),
            })
        }
        _ => return Slot::Damaged,
    };
    Slot::Valid(Record { seq, version, content })
}

/// Decodes both slots of a pair.
pub fn decode_pair(pair: &[u8]) -> [Slot; 2] {
    [decode(&pair[..RECORD_BYTES]), decode(&pair[RECORD_BYTES..PAIR_BYTES])]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn samples() -> Vec<Record> {
        vec![
            Record { seq: 1, version: 2, content: Content::Zero },
            Record { seq: u64::MAX, version: 7, content: Content::Sealed(Seal { crc: 99, cipher: None }) },
            Record {
                seq: 3,
                version: 4,
                content: Content::Sealed(Seal {
                    crc: 5,
                    cipher: Some(CipherSeal { key_generation: 6, nonce: [7; 12], tag: [8; 16] }),
                }),
            },
        ]
    }

    #[test]
    fn records_round_trip_and_every_bit_flip_is_caught() {
        for r in samples() {
            let b = r.encode();
            assert_eq!(decode(&b), Slot::Valid(r));
            for i in 0..RECORD_BYTES {
                for bit in 0..8 {
                    let mut bad = b;
                    bad[i] ^= 1 << bit;
                    assert_ne!(decode(&bad), Slot::Valid(r), "byte {i} bit {bit}");
                }
            }
        }
        assert_eq!(decode(&[0u8; RECORD_BYTES]), Slot::Empty);
    }
}
