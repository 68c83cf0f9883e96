//! Sealed blocks: per-block integrity (and, for encrypted volumes, confidentiality) that
//! travels with every 4 KiB block from the node that received a client's write to every
//! copy, and back to the node that serves a read.
//!
//! ```text
//! front end (NBD) ── plaintext bytes ──▶ SealingBackend (backend.rs, a BlockBackend)
//!   │  whole blocks: crc32c (plain) or AES-256-GCM + crc32c (encrypted) → Seal per block
//!   │  partial blocks: read-modify-write, guarded by the block's version (compare-and-set)
//!   ▼
//! SealedStore (this trait): blocks + seals, block-addressed
//!   ├─ store::sealed::SealedFile   a node alone: data file + metadata file (two slots per block)
//!   ├─ MemSealedStore (mem.rs)      tests and the simulator
//!   └─ replication's ReplicatedStore: seals go into Raft entries, the WAL, peer frames,
//!      snapshot chunks; every copy is a SealedFile that checks them again on every read
//! ```
//!
//! A [`Seal`] is what a block needs to be checked (and decrypted) anywhere: the crc32c of
//! its stored bytes and its index, and for encrypted blocks the key generation, the nonce
//! and the GCM tag. The store adds a *version* (which write produced the block: a log
//! position in a cluster, a local sequence number alone) that makes read-modify-write safe
//! across nodes and lets copies be compared.
//!
//! Stores never hold plaintext of an encrypted volume: encryption happens in
//! [`backend::SealingBackend`] on the node that received the write, before anything is
//! stored, proposed or forwarded.

pub mod backend;
pub mod crypt;
pub mod fuzzing;
pub mod mem;
pub mod nonce;
mod range_lock;
pub mod wire;

#[cfg(test)]
mod proptests;

use async_trait::async_trait;
use bytes::Bytes;

use crate::backend::{BackendResult, Extent};

pub use backend::{IntegrityEvent, IntegrityKind, IntegrityReporter, SealingBackend};
pub use crypt::{CryptError, DataKey, Kek, KekId, WrappedKey};
pub use mem::MemSealedStore;
pub use nonce::{NonceError, NonceReserver, NonceSource};
pub use range_lock::RangeLock;

/// Bytes per sealed block: the unit of checksums, encryption and versions.
pub const BLOCK_BYTES: usize = 4096;
/// [`BLOCK_BYTES`] as a `u64`, for offset arithmetic.
pub const BLOCK: u64 = BLOCK_BYTES as u64;
/// Blocks per zeroing group: a zeroing that covers a whole aligned group leaves its blocks
/// at version 0 (the group's metadata is dropped), a partial group keeps the zeroing's
/// version. Every store follows this rule, so every copy has the same versions.
pub const ZERO_GROUP_BLOCKS: u64 = 32;
/// Length of an AES-GCM nonce.
pub const NONCE_BYTES: usize = 12;
/// Length of an AES-GCM tag.
pub const TAG_BYTES: usize = 16;

/// The crc32c that seals a block: over its index (little-endian) and its stored bytes
/// (ciphertext for encrypted volumes), so a block written to the wrong place fails too.
pub fn block_crc(index: u64, stored: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), stored)
}

/// What an encrypted block needs besides its crc to be decrypted and authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CipherSeal {
    /// Which of the volume's data keys encrypted it (see [`crypt`]).
    pub key_generation: u32,
    /// The AES-GCM nonce; never used twice under one key (see [`nonce`]).
    pub nonce: [u8; NONCE_BYTES],
    /// The AES-GCM tag over the ciphertext and the block's place.
    pub tag: [u8; TAG_BYTES],
}

/// The metadata that travels with one stored block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// [`block_crc`] of the stored bytes.
    pub crc: u32,
    /// Set for encrypted blocks.
    pub cipher: Option<CipherSeal>,
}

impl Seal {
    /// The seal of a plain (unencrypted) block.
    pub fn plain(index: u64, data: &[u8]) -> Seal {
        Seal { crc: block_crc(index, data), cipher: None }
    }

    /// Whether `stored` (the block at `index`) matches this seal's checksum.
    pub fn verifies(&self, index: u64, stored: &[u8]) -> bool {
        block_crc(index, stored) == self.crc
    }
}

/// Why a stored block cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The data does not match any of the block's metadata records.
    Checksum,
    /// The metadata records are unreadable (their own checksum fails) or missing while
    /// the block holds data.
    Metadata,
}

impl Damage {
    /// Label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Damage::Checksum => "checksum",
            Damage::Metadata => "metadata",
        }
    }
}

/// One block as a store found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Stored bytes that match `seal`; `version` names the write that stored them.
    Sealed { seal: Seal, version: u64 },
    /// Zeroes (trimmed, zeroed or never written); `version` names the write that zeroed it
    /// (0: never written, or trimmed along with its whole metadata page).
    Zero { version: u64 },
    /// Bytes that must not be returned.
    Damaged(Damage),
}

impl BlockState {
    /// The block's version, if it is intact.
    pub fn version(&self) -> Option<u64> {
        match self {
            BlockState::Sealed { version, .. } | BlockState::Zero { version } => Some(*version),
            BlockState::Damaged(_) => None,
        }
    }
}

/// Blocks read from a store: `data` holds `states.len()` blocks back to back (zeroes for
/// zero blocks; whatever was on disk for damaged ones, which callers must not use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBlocks {
    /// First block's index.
    pub first: u64,
    /// The stored bytes.
    pub data: Bytes,
    /// One state per block.
    pub states: Vec<BlockState>,
}

impl SealedBlocks {
    /// The stored bytes of block `i` of this read.
    pub fn block(&self, i: usize) -> &[u8] {
        &self.data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]
    }

    /// Indexes (within the volume) of damaged blocks.
    pub fn damaged(&self) -> impl Iterator<Item = (u64, Damage)> + '_ {
        self.states.iter().enumerate().filter_map(|(i, s)| match s {
            BlockState::Damaged(d) => Some((self.first.saturating_add(i as u64), *d)),
            _ => None,
        })
    }
}

/// "Write only if block `block` still has version `version`": the compare-and-set that
/// makes a read-modify-write of a partial block safe against a concurrent writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    /// The block.
    pub block: u64,
    /// The version it had when it was read.
    pub version: u64,
}

/// A write of whole sealed blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockWrite {
    /// First block's index.
    pub first: u64,
    /// `seals.len()` blocks of stored bytes (ciphertext for encrypted volumes).
    pub data: Bytes,
    /// One seal per block.
    pub seals: Vec<Seal>,
    /// Blocks whose version must be unchanged for the write to happen (all or nothing).
    pub guards: Vec<Guard>,
}

impl BlockWrite {
    /// Number of blocks written.
    pub fn count(&self) -> u64 {
        self.seals.len() as u64
    }

    /// Whether data and seals agree in size.
    pub fn is_well_formed(&self) -> bool {
        self.data.len() == self.seals.len() * BLOCK_BYTES
            && self
                .first
                .checked_add(self.count())
                .is_some_and(|end| self.guards.iter().all(|g| g.block >= self.first && g.block < end))
    }
}

/// What became of a [`BlockWrite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Stored.
    Written,
    /// A guarded block had changed (or was damaged); nothing was stored.
    GuardFailed {
        /// The first block whose guard failed.
        block: u64,
    },
}

/// A volume as blocks and seals: the seam below [`SealingBackend`].
///
/// Requests are in whole blocks; `first + count` never exceeds `size_bytes() / BLOCK`
/// (implementations refuse it with `OutOfRange`). Concurrency: writes to overlapping
/// blocks take effect one after the other, in some order; a read overlapping a write sees
/// each block before or after it, never a mix.
#[async_trait]
pub trait SealedStore: Send + Sync + 'static {
    /// Current size in bytes (a multiple of [`BLOCK`]).
    fn size_bytes(&self) -> u64;

    /// Reads `count` blocks from `first`, checking each against its seal.
    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks>;

    /// Stores sealed blocks (checked against their seals first: a seal that does not match
    /// its data is refused as corrupt input, never stored).
    async fn write_blocks(&self, write: BlockWrite) -> BackendResult<WriteOutcome>;

    /// Makes `count` blocks from `first` zero; `deallocate` may free their space.
    async fn zero_blocks(&self, first: u64, count: u64, deallocate: bool) -> BackendResult<()>;

    /// Allocation map, as [`crate::BlockBackend::block_status`].
    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>>;

    /// Makes every completed write durable.
    async fn flush(&self) -> BackendResult<()>;
}

/// Blocks to restore into a copy exactly as another copy holds them (a rebuild, or the
/// repair of a damaged block): `data` holds one block per `Sealed` state, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockImage {
    /// First block's index.
    pub first: u64,
    /// One state per block; never `Damaged`.
    pub states: Vec<BlockState>,
    /// The stored bytes of the sealed blocks.
    pub data: Bytes,
}

impl BlockImage {
    /// An image of the intact blocks of a read (damaged ones must not travel).
    pub fn of(read: &SealedBlocks) -> Option<BlockImage> {
        let mut data = bytes::BytesMut::new();
        for (i, s) in read.states.iter().enumerate() {
            match s {
                BlockState::Sealed { .. } => data.extend_from_slice(read.block(i)),
                BlockState::Zero { .. } => {}
                BlockState::Damaged(_) => return None,
            }
        }
        Some(BlockImage { first: read.first, states: read.states.clone(), data: data.freeze() })
    }

    /// The blocks as a read returns them: every block's bytes, zeroes where no data travels
    /// (no copy when every block is sealed).
    pub fn into_blocks(self) -> SealedBlocks {
        if self.states.iter().all(|s| matches!(s, BlockState::Sealed { .. })) {
            return SealedBlocks { first: self.first, data: self.data, states: self.states };
        }
        let mut data = crate::store::AlignedBuf::zeroed(self.states.len() * BLOCK_BYTES);
        let mut at = 0;
        for (i, s) in self.states.iter().enumerate() {
            if matches!(s, BlockState::Sealed { .. }) {
                data.as_mut_slice()[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]
                    .copy_from_slice(&self.data[at..at + BLOCK_BYTES]);
                at += BLOCK_BYTES;
            }
        }
        SealedBlocks { first: self.first, data: data.into_bytes(), states: self.states }
    }

    /// Whether the states and the data agree (sealed blocks match their seals).
    pub fn check(&self) -> BackendResult<()> {
        let sealed = self.states.iter().filter(|s| matches!(s, BlockState::Sealed { .. })).count();
        let corrupt =
            |what| crate::BackendError::Corrupt { offset: self.first.saturating_mul(BLOCK), len: 0, what };
        if self.data.len() != sealed * BLOCK_BYTES {
            return Err(corrupt("a block image whose data and states differ in size"));
        }
        let mut at = 0;
        for (i, s) in self.states.iter().enumerate() {
            match s {
                BlockState::Sealed { seal, .. } => {
                    if !seal.verifies(self.first.wrapping_add(i as u64), &self.data[at..at + BLOCK_BYTES]) {
                        return Err(corrupt("a block image with a block that does not match its seal"));
                    }
                    at += BLOCK_BYTES;
                }
                BlockState::Zero { .. } => {}
                BlockState::Damaged(_) => return Err(corrupt("a block image with a damaged block")),
            }
        }
        Ok(())
    }
}

/// A copy of a replicated volume: it stores what committed log entries say, with the
/// versions the log gives, so every copy holds the same blocks under the same versions
/// (the guards of read-modify-writes are then decided identically on every copy).
#[async_trait]
pub trait CopyStore: Send + Sync + 'static {
    /// Current size in bytes.
    fn size_bytes(&self) -> u64;

    /// Grows the copy (never shrinks); the new blocks are zero.
    fn grow(&self, size_bytes: u64) -> BackendResult<()>;

    /// Reads and checks blocks, as [`SealedStore::read_blocks`].
    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks>;

    /// Stores a committed write under `version` if its guards hold.
    async fn apply_write(&self, write: BlockWrite, version: u64) -> BackendResult<WriteOutcome>;

    /// Zeroes blocks under `version` (blocks whose whole metadata page is covered lose
    /// their metadata and read as version 0, identically on every copy).
    async fn apply_zero(&self, first: u64, count: u64, deallocate: bool, version: u64) -> BackendResult<()>;

    /// Stores `image` as it is (versions included). With `only_damaged`, only blocks that
    /// are damaged here now are written (a repair must not undo a newer write). Returns the
    /// number of blocks written.
    async fn restore(&self, image: BlockImage, only_damaged: bool) -> BackendResult<u64>;

    /// Allocation map, as [`crate::BlockBackend::block_status`].
    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>>;

    /// Makes everything stored so far durable.
    async fn flush(&self) -> BackendResult<()>;
}

/// The block range `[first, end)` covering the bytes `[offset, offset + len)`.
pub fn block_span(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BLOCK;
    let end = (offset + len).div_ceil(BLOCK);
    (first, end)
}

/// Checks that `data` matches `seal` for block `index`; writes with mismatching seals are
/// refused (a bug or corruption in transit, never something to store).
pub fn check_write(write: &BlockWrite) -> BackendResult<()> {
    if !write.is_well_formed() {
        return Err(crate::BackendError::Corrupt {
            offset: write.first.saturating_mul(BLOCK),
            len: write.data.len() as u64,
            what: "a sealed write whose data and seals differ in size",
        });
    }
    for (i, seal) in write.seals.iter().enumerate() {
        let index = write.first.wrapping_add(i as u64);
        if !seal.verifies(index, &write.data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]) {
            return Err(crate::BackendError::Corrupt {
                offset: index.saturating_mul(BLOCK),
                len: BLOCK,
                what: "a block that does not match its seal (damaged in transit)",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_binds_the_block_index() {
        let data = vec![7u8; BLOCK_BYTES];
        let seal = Seal::plain(5, &data);
        assert!(seal.verifies(5, &data));
        assert!(!seal.verifies(6, &data), "the same bytes at another index fail");
        let mut flipped = data.clone();
        flipped[100] ^= 1;
        assert!(!seal.verifies(5, &flipped));
    }

    #[test]
    fn spans_cover_partial_blocks() {
        assert_eq!(block_span(0, 4096), (0, 1));
        assert_eq!(block_span(1, 1), (0, 1));
        assert_eq!(block_span(4095, 2), (0, 2));
        assert_eq!(block_span(8192, 0), (2, 2));
    }

    #[test]
    fn writes_with_wrong_seals_are_refused() {
        let data = Bytes::from(vec![1u8; 2 * BLOCK_BYTES]);
        let good = BlockWrite {
            first: 3,
            data: data.clone(),
            seals: vec![Seal::plain(3, &data[..BLOCK_BYTES]), Seal::plain(4, &data[BLOCK_BYTES..])],
            guards: vec![],
        };
        assert!(check_write(&good).is_ok());
        let mut swapped = good.clone();
        swapped.seals.swap(0, 1);
        assert!(check_write(&swapped).is_err(), "seals bind their index");
        let mut short = good.clone();
        short.seals.pop();
        assert!(check_write(&short).is_err());
        let mut bad_guard = good;
        bad_guard.guards.push(Guard { block: 9, version: 1 });
        assert!(check_write(&bad_guard).is_err());
    }
}
