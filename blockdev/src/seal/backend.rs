//! [`SealingBackend`]: plaintext bytes for the front ends, sealed blocks for the store.
//!
//! Writes: whole blocks are sealed (crc32c, or AES-256-GCM then crc32c of the ciphertext)
//! and handed on as they come. A write that covers part of a block becomes a
//! read-modify-write of that block: read it (decrypt it), merge the new bytes, seal it
//! again, and store it *guarded* by the version that was read, so a concurrent write to the
//! same block by any node makes the store refuse ours and we start over. Nothing below this
//! layer ever sees an encrypted volume's plaintext.
//!
//! Reads: blocks come back with their states; damaged blocks (which a replicated store
//! has already tried to repair from another copy) fail the request with EIO, never with
//! wrong data; encrypted blocks are authenticated as they are decrypted.
//!
//! Copies of the payload: a plain aligned write passes its `Bytes` on untouched (the crc
//! reads it once); an encrypted one is encrypted into one new aligned buffer. A plain read
//! returns a slice of the store's buffer; an encrypted one decrypts into one new buffer.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::crypt::{DataKey, VOLUME_ID_BYTES};
use super::nonce::{NonceRun, NonceSource};
use super::{
    block_crc, block_span, BlockState, BlockWrite, Guard, Seal, SealedBlocks, SealedStore, WriteOutcome,
    BLOCK, BLOCK_BYTES,
};
use crate::backend::{check_range, BackendError, BackendResult, BlockBackend, Extent};
use crate::store::AlignedBuf;

/// Read-modify-write attempts before a partial write gives up (each failure means another
/// writer changed the block in between; only a pathological workload loses this often).
const RMW_ATTEMPTS_MAX: usize = 64;

/// Kinds of integrity failure, as counted in `raftblk_volume_integrity_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    /// Stored bytes do not match their checksum.
    Checksum,
    /// A block's metadata is unreadable or missing.
    Metadata,
    /// An encrypted block failed to authenticate (tampered, moved, or foreign).
    Authentication,
    /// A request failed because no copy of a block was intact.
    Unrecoverable,
}

impl IntegrityKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            IntegrityKind::Checksum => "checksum",
            IntegrityKind::Metadata => "metadata",
            IntegrityKind::Authentication => "authentication",
            IntegrityKind::Unrecoverable => "unrecoverable",
        }
    }
}

impl From<super::Damage> for IntegrityKind {
    fn from(d: super::Damage) -> Self {
        match d {
            super::Damage::Checksum => IntegrityKind::Checksum,
            super::Damage::Metadata => IntegrityKind::Metadata,
        }
    }
}

/// One integrity failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntegrityEvent {
    /// What failed.
    pub kind: IntegrityKind,
    /// The block.
    pub block: u64,
    /// The node whose copy it was (`None`: this node alone, or not known).
    pub copy: Option<u64>,
}

/// Where integrity failures and repairs are reported (metrics and logs, in the daemon).
pub trait IntegrityReporter: Send + Sync {
    /// A block failed a check.
    fn damaged(&self, event: IntegrityEvent);
    /// A damaged block of `copy` was rewritten from a good copy.
    fn repaired(&self, block: u64, copy: Option<u64>);
}

/// Logs failures and counts nothing: for tests and tools.
#[derive(Debug, Default)]
pub struct LogReporter;

impl IntegrityReporter for LogReporter {
    fn damaged(&self, e: IntegrityEvent) {
        tracing::warn!(kind = e.kind.label(), block = e.block, copy = ?e.copy, "integrity failure");
    }
    fn repaired(&self, block: u64, copy: Option<u64>) {
        tracing::info!(block, copy = ?copy, "damaged block repaired");
    }
}

/// What an encrypted volume's node needs to encrypt and decrypt it.
pub struct VolumeCrypto {
    /// The volume's data key.
    pub key: DataKey,
    /// The volume's id (bound into every block's AAD).
    pub volume: [u8; VOLUME_ID_BYTES],
    /// This node's nonces.
    pub nonces: Arc<NonceSource>,
}

/// See the [module documentation](self).
pub struct SealingBackend {
    store: Arc<dyn SealedStore>,
    crypto: Option<Arc<VolumeCrypto>>,
    reporter: Arc<dyn IntegrityReporter>,
}

/// Requests of at least this many blocks are encrypted or decrypted on a blocking thread
/// (several at once use every core) instead of the async worker that serves the sockets.
const OFFLOAD_BLOCKS: usize = 16;

/// Why a block could not be opened.
enum OpenFailure {
    /// Plaintext where ciphertext belongs.
    Plaintext(u64),
    /// The tag does not authenticate the block.
    Authentication(u64),
}

/// Encrypts whole blocks from `first` of `plain` into `out`; the blocks' seals.
fn encrypt_blocks(
    c: &VolumeCrypto,
    first: u64,
    nonces: NonceRun,
    plain: &[u8],
    out: &mut [u8],
) -> Result<Vec<Seal>, super::CryptError> {
    let count = plain.len() / BLOCK_BYTES;
    let mut seals = Vec::with_capacity(count);
    for i in 0..count {
        let index = first + i as u64;
        let (src, dst) = (
            &plain[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES],
            &mut out[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES],
        );
        let cipher = c.key.encrypt_block(&c.volume, index, nonces.nonce(i as u64), src, dst)?;
        seals.push(Seal { crc: block_crc(index, dst), cipher: Some(cipher) });
    }
    Ok(seals)
}

/// Decrypts the sealed blocks of `read` into `out` (zero blocks stay zero).
fn decrypt_blocks(c: &VolumeCrypto, read: &SealedBlocks, out: &mut [u8]) -> Result<(), OpenFailure> {
    for (i, state) in read.states.iter().enumerate() {
        let index = read.first + i as u64;
        if !matches!(state, BlockState::Sealed { .. }) {
            // `out` may hold an earlier user's bytes: a zero block must be written as such.
            out[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].fill(0);
        }
        if let BlockState::Sealed { seal, .. } = state {
            let Some(cs) = &seal.cipher else { return Err(OpenFailure::Plaintext(index)) };
            let dst = &mut out[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
            if c.key.decrypt_block(&c.volume, index, cs, read.block(i), dst).is_err() {
                return Err(OpenFailure::Authentication(index));
            }
        }
    }
    Ok(())
}

/// Runs `f` on a blocking thread when the request is large, inline otherwise.
async fn maybe_offload<T: Send + 'static>(
    blocks: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> BackendResult<T> {
    if blocks < OFFLOAD_BLOCKS {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await.map_err(|e| match e.try_into_panic() {
        Ok(p) => std::panic::resume_unwind(p),
        Err(_) => BackendError::ShuttingDown,
    })
}

impl SealingBackend {
    /// A plain (checksummed, unencrypted) volume over `store`.
    pub fn plain(store: Arc<dyn SealedStore>, reporter: Arc<dyn IntegrityReporter>) -> SealingBackend {
        SealingBackend { store, crypto: None, reporter }
    }

    /// An encrypted volume over `store`.
    pub fn encrypted(
        store: Arc<dyn SealedStore>,
        crypto: VolumeCrypto,
        reporter: Arc<dyn IntegrityReporter>,
    ) -> SealingBackend {
        SealingBackend { store, crypto: Some(Arc::new(crypto)), reporter }
    }

    /// Whether blocks are encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn SealedStore> {
        &self.store
    }

    /// Reads whole blocks `[first, end)` as plaintext.
    async fn read_plain(&self, first: u64, end: u64) -> BackendResult<(Bytes, SealedBlocks)> {
        let count = u32::try_from(end - first).map_err(|_| BackendError::OutOfRange {
            offset: first * BLOCK,
            len: (end - first) * BLOCK,
            size: self.store.size_bytes(),
        })?;
        let read = self.store.read_blocks(first, count).await?;
        if let Some((block, damage)) = read.damaged().next() {
            self.reporter.damaged(IntegrityEvent { kind: IntegrityKind::Unrecoverable, block, copy: None });
            tracing::error!(
                block,
                damage = damage.label(),
                "no intact copy of a block; the read fails with EIO"
            );
            return Err(BackendError::Corrupt {
                offset: block * BLOCK,
                len: BLOCK,
                what: "no intact copy of this block (checksum or metadata damaged)",
            });
        }
        let Some(crypto) = &self.crypto else {
            if let Some(i) = read
                .states
                .iter()
                .position(|s| matches!(s, BlockState::Sealed { seal, .. } if seal.cipher.is_some()))
            {
                return Err(self.foreign(first + i as u64, "an encrypted block in a plain volume"));
            }
            return Ok((read.data.clone(), read));
        };
        let (c, blocks) = (crypto.clone(), read.states.len());
        let opened = maybe_offload(blocks, move || {
            let mut out = AlignedBuf::recycled(read.data.len());
            let r = decrypt_blocks(&c, &read, out.as_mut_slice());
            (r, out, read)
        })
        .await?;
        let (result, out, read) = opened;
        match result {
            Ok(()) => {}
            Err(OpenFailure::Plaintext(index)) => {
                return Err(self.foreign(index, "a plaintext block in an encrypted volume"))
            }
            Err(OpenFailure::Authentication(index)) => {
                self.reporter.damaged(IntegrityEvent {
                    kind: IntegrityKind::Authentication,
                    block: index,
                    copy: None,
                });
                tracing::error!(block = index, "block failed to authenticate; the read fails with EIO");
                return Err(BackendError::Corrupt {
                    offset: index * BLOCK,
                    len: BLOCK,
                    what: "block failed to authenticate (tampered with, moved, or under another key)",
                });
            }
        }
        Ok((out.into_bytes(), read))
    }

    fn foreign(&self, block: u64, what: &'static str) -> BackendError {
        self.reporter.damaged(IntegrityEvent { kind: IntegrityKind::Authentication, block, copy: None });
        tracing::error!(block, what, "block of the wrong kind; the read fails with EIO");
        BackendError::Corrupt { offset: block * BLOCK, len: BLOCK, what }
    }

    /// Seals whole plaintext blocks from `first`.
    async fn seal(&self, first: u64, plain: Bytes, guards: Vec<Guard>) -> BackendResult<BlockWrite> {
        let count = plain.len() / BLOCK_BYTES;
        let Some(crypto) = &self.crypto else {
            let seals = (0..count)
                .map(|i| Seal::plain(first + i as u64, &plain[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]))
                .collect();
            return Ok(BlockWrite { first, data: plain, seals, guards });
        };
        let nonces = crypto.nonces.take(count as u64).await.map_err(|e| {
            tracing::error!(error = %e, "no nonces; encrypted writes are refused");
            BackendError::Io(std::io::Error::other(e))
        })?;
        let c = crypto.clone();
        let sealed = maybe_offload(count, move || {
            let mut out = AlignedBuf::recycled(plain.len());
            encrypt_blocks(&c, first, nonces, &plain, out.as_mut_slice()).map(|seals| (out, seals))
        })
        .await?;
        let (out, seals) = sealed.map_err(|e| BackendError::Io(std::io::Error::other(e)))?;
        Ok(BlockWrite { first, data: out.into_bytes(), seals, guards })
    }

    /// Writes `data` at `offset`, merging partial blocks with what they hold.
    async fn write_bytes(&self, offset: u64, data: Bytes) -> BackendResult<()> {
        let len = data.len() as u64;
        let (first, end) = block_span(offset, len);
        if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
            let write = self.seal(first, data, Vec::new()).await?;
            return match self.store.write_blocks(write).await? {
                WriteOutcome::Written => Ok(()),
                WriteOutcome::GuardFailed { .. } => Err(BackendError::Io(std::io::Error::other(
                    "the store refused an unguarded write as guarded",
                ))),
            };
        }
        // A block needs merging unless the write covers it whole.
        let head = !offset.is_multiple_of(BLOCK) || offset + len < (first + 1) * BLOCK;
        let tail = end - 1 != first && !(offset + len).is_multiple_of(BLOCK);
        for _ in 0..RMW_ATTEMPTS_MAX {
            let mut merged = AlignedBuf::zeroed(((end - first) * BLOCK) as usize);
            let mut guards = Vec::new();
            for (wanted, index) in [(head, first), (tail, end - 1)] {
                if !wanted {
                    continue;
                }
                let (plain, read) = self.read_plain(index, index + 1).await?;
                let at = ((index - first) * BLOCK) as usize;
                merged.as_mut_slice()[at..at + BLOCK_BYTES].copy_from_slice(&plain);
                if let Some(version) = read.states[0].version() {
                    guards.push(Guard { block: index, version });
                }
            }
            let at = (offset - first * BLOCK) as usize;
            merged.as_mut_slice()[at..at + data.len()].copy_from_slice(&data);
            let write = self.seal(first, merged.into_bytes(), guards).await?;
            match self.store.write_blocks(write).await? {
                WriteOutcome::Written => return Ok(()),
                WriteOutcome::GuardFailed { block } => {
                    tracing::debug!(block, "partial block changed under a read-modify-write; again");
                }
            }
        }
        Err(BackendError::Io(std::io::Error::other(format!(
            "a partial-block write at {offset} lost {RMW_ATTEMPTS_MAX} races with other writers"
        ))))
    }

    /// Zeroes `[offset, offset + len)`: whole blocks in the store, partial ones by writing
    /// zeroes into them.
    async fn zero_bytes(&self, offset: u64, len: u64, deallocate: bool) -> BackendResult<()> {
        let end = offset + len;
        let whole_first = offset.div_ceil(BLOCK);
        let whole_end = end / BLOCK;
        if whole_first >= whole_end {
            return self.write_bytes(offset, Bytes::from(vec![0u8; len as usize])).await;
        }
        if offset < whole_first * BLOCK {
            let n = whole_first * BLOCK - offset;
            self.write_bytes(offset, Bytes::from(vec![0u8; n as usize])).await?;
        }
        self.store.zero_blocks(whole_first, whole_end - whole_first, deallocate).await?;
        if end > whole_end * BLOCK {
            let n = end - whole_end * BLOCK;
            self.write_bytes(whole_end * BLOCK, Bytes::from(vec![0u8; n as usize])).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockBackend for SealingBackend {
    fn size_bytes(&self) -> u64 {
        self.store.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        check_range(offset, u64::from(len), self.size_bytes())?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (first, end) = block_span(offset, u64::from(len));
        let (plain, _) = self.read_plain(first, end).await?;
        let at = (offset - first * BLOCK) as usize;
        Ok(plain.slice(at..at + len as usize))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        check_range(offset, data.len() as u64, self.size_bytes())?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_bytes(offset, data).await?;
        if fua {
            self.store.flush().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> BackendResult<()> {
        self.store.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        check_range(offset, len, self.size_bytes())?;
        if len == 0 {
            return Ok(());
        }
        self.zero_bytes(offset, len, true).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        _fast_only: bool,
    ) -> BackendResult<()> {
        // Whole blocks are zeroed by metadata and fallocate, which is always fast.
        check_range(offset, len, self.size_bytes())?;
        if len == 0 {
            return Ok(());
        }
        self.zero_bytes(offset, len, may_trim).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.store.block_status(offset, len).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::seal::mem::MemSealedStore;
    use crate::seal::nonce::MemReserver;

    pub(crate) async fn crypto() -> VolumeCrypto {
        let nonces = NonceSource::new(3, Arc::new(MemReserver::default()), 64);
        VolumeCrypto { key: DataKey::generate(1).unwrap(), volume: [4; 16], nonces }
    }

    #[tokio::test]
    async fn encrypted_volumes_store_only_ciphertext() {
        let store = Arc::new(MemSealedStore::new(16 * BLOCK));
        let b = SealingBackend::encrypted(store.clone(), crypto().await, Arc::new(LogReporter));
        let pattern = Bytes::from(b"raftblk-secret!!".repeat(512));
        b.write(BLOCK, pattern.clone(), false).await.unwrap();
        b.write(3 * BLOCK + 100, pattern.slice(..50), false).await.unwrap();
        let raw = SealedStore::read_blocks(store.as_ref(), 0, 16).await.unwrap();
        assert!(!raw.data.windows(16).any(|w| w == b"raftblk-secret!!"), "plaintext reached the store");
        assert_eq!(b.read(BLOCK, 8192).await.unwrap(), pattern);
        assert_eq!(b.read(3 * BLOCK + 100, 50).await.unwrap(), pattern.slice(..50));
        assert_eq!(b.read(3 * BLOCK, 100).await.unwrap(), Bytes::from(vec![0u8; 100]));
    }

    #[tokio::test]
    async fn damaged_blocks_fail_the_read_and_leave_the_rest_readable() {
        let store = Arc::new(MemSealedStore::new(16 * BLOCK));
        let b = SealingBackend::plain(store.clone(), Arc::new(LogReporter));
        b.write(0, Bytes::from(vec![5u8; 4 * BLOCK_BYTES]), false).await.unwrap();
        store.damage_data(2, 17);
        let err = b.read(0, 4 * BLOCK as u32).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert_eq!(b.read(0, 2 * BLOCK as u32).await.unwrap(), Bytes::from(vec![5u8; 2 * BLOCK_BYTES]));
        assert!(
            b.write(2 * BLOCK + 1, Bytes::from_static(b"x"), false).await.is_err(),
            "cannot merge into damage"
        );
        b.write(2 * BLOCK, Bytes::from(vec![6u8; BLOCK_BYTES]), false).await.unwrap();
        assert_eq!(
            b.read(2 * BLOCK, 10).await.unwrap(),
            Bytes::from(vec![6u8; 10]),
            "a whole write replaces damage"
        );
    }

    #[tokio::test]
    async fn concurrent_partial_writes_to_one_block_both_land() {
        for crypto in [None, Some(crypto().await)] {
            let store = Arc::new(MemSealedStore::new(4 * BLOCK));
            let b = Arc::new(match crypto {
                None => SealingBackend::plain(store.clone(), Arc::new(LogReporter)),
                Some(c) => SealingBackend::encrypted(store.clone(), c, Arc::new(LogReporter)),
            });
            let tasks: Vec<_> = (0..16u64)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(
                        async move { b.write(i * 256, Bytes::from(vec![i as u8 + 1; 256]), false).await },
                    )
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let got = b.read(0, BLOCK as u32).await.unwrap();
            for i in 0..16usize {
                assert!(got[i * 256..(i + 1) * 256].iter().all(|&x| x == i as u8 + 1), "slice {i} lost");
            }
        }
    }
}
