//! [`MemSealedStore`]: sealed blocks in memory, for tests and the simulator, with damage
//! injection (a flipped data byte, a lost metadata record) to check that damage is caught.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{
    check_write, BlockImage, BlockState, BlockWrite, CopyStore, Damage, SealedBlocks, SealedStore,
    WriteOutcome, BLOCK, BLOCK_BYTES, ZERO_GROUP_BLOCKS,
};
use crate::backend::{check_range, BackendError, BackendResult, Extent, ExtentKind};

#[derive(Debug, Clone)]
enum Record {
    Sealed {
        seal: super::Seal,
        version: u64,
    },
    Zero {
        version: u64,
    },
    /// The metadata was lost or damaged.
    Lost,
}

#[derive(Debug, Clone)]
struct Block {
    /// `None`: a hole (zeroes, unallocated).
    data: Option<Box<[u8]>>,
    record: Record,
}

/// Sealed blocks in memory. Blocks never written read as `Zero { version: 0 }`.
#[derive(Debug)]
pub struct MemSealedStore {
    size_bytes: AtomicU64,
    blocks: Mutex<BTreeMap<u64, Block>>,
    /// Versions of client writes ([`SealedStore`]); copies get theirs from the log.
    next_version: AtomicU64,
}

impl MemSealedStore {
    /// An empty store of `size_bytes` (a multiple of [`BLOCK`]).
    pub fn new(size_bytes: u64) -> MemSealedStore {
        MemSealedStore {
            size_bytes: AtomicU64::new(size_bytes),
            blocks: Mutex::new(BTreeMap::new()),
            next_version: AtomicU64::new(1),
        }
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    fn blocks(&self) -> MutexGuard<'_, BTreeMap<u64, Block>> {
        // Every update replaces whole entries: a panic leaves none half written.
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, first: u64, count: u64) -> BackendResult<()> {
        check_range(first.saturating_mul(BLOCK), count.saturating_mul(BLOCK), self.size())
    }

    /// Flips one bit of block `index`'s stored data (a disk that rots). False if the block
    /// holds no data.
    pub fn damage_data(&self, index: u64, byte: usize) -> bool {
        match self.blocks().get_mut(&index).and_then(|b| b.data.as_mut()) {
            Some(d) => {
                d[byte % BLOCK_BYTES] ^= 0x10;
                true
            }
            None => false,
        }
    }

    /// Loses block `index`'s metadata (a torn or misdirected metadata write).
    pub fn damage_record(&self, index: u64) {
        let mut blocks = self.blocks();
        let b = blocks.entry(index).or_insert(Block { data: None, record: Record::Lost });
        b.record = Record::Lost;
    }

    /// A copy of everything, as another store (the simulator's crash images).
    pub fn duplicate(&self) -> MemSealedStore {
        MemSealedStore {
            size_bytes: AtomicU64::new(self.size()),
            blocks: Mutex::new(self.blocks().clone()),
            next_version: AtomicU64::new(self.next_version.load(Ordering::SeqCst)),
        }
    }

    /// Copies block `index` as stored (data and metadata) from `from`.
    pub fn copy_block_from(&self, from: &MemSealedStore, index: u64) {
        let b = from.blocks().get(&index).cloned();
        let mut blocks = self.blocks();
        match b {
            Some(b) => blocks.insert(index, b),
            None => blocks.remove(&index),
        };
    }

    /// Grows (never shrinks) the store.
    pub fn grow_to(&self, size_bytes: u64) {
        self.size_bytes.fetch_max(size_bytes, Ordering::SeqCst);
    }

    fn state_of(index: u64, block: Option<&Block>) -> BlockState {
        let Some(b) = block else { return BlockState::Zero { version: 0 } };
        match (&b.record, &b.data) {
            (Record::Sealed { seal, version }, Some(d)) if seal.verifies(index, d) => {
                BlockState::Sealed { seal: *seal, version: *version }
            }
            (Record::Sealed { .. }, _) => BlockState::Damaged(Damage::Checksum),
            (Record::Zero { version }, d) if d.as_ref().is_none_or(|d| d.iter().all(|&x| x == 0)) => {
                BlockState::Zero { version: *version }
            }
            (Record::Zero { .. }, _) => BlockState::Damaged(Damage::Checksum),
            (Record::Lost, _) => BlockState::Damaged(Damage::Metadata),
        }
    }

    fn read(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        self.check(first, u64::from(count))?;
        let blocks = self.blocks();
        let mut data = BytesMut::zeroed(count as usize * BLOCK_BYTES);
        let mut states = Vec::with_capacity(count as usize);
        for i in 0..u64::from(count) {
            let index = first + i;
            let b = blocks.get(&index);
            let state = Self::state_of(index, b);
            if let (Some(d), BlockState::Sealed { .. } | BlockState::Damaged(_)) =
                (b.and_then(|b| b.data.as_ref()), &state)
            {
                let at = i as usize * BLOCK_BYTES;
                data[at..at + BLOCK_BYTES].copy_from_slice(d);
            }
            states.push(state);
        }
        Ok(SealedBlocks { first, data: data.freeze(), states })
    }

    fn write(&self, write: BlockWrite, version: u64) -> BackendResult<WriteOutcome> {
        check_write(&write)?;
        self.check(write.first, write.count())?;
        let mut blocks = self.blocks();
        for g in &write.guards {
            if Self::state_of(g.block, blocks.get(&g.block)).version() != Some(g.version) {
                return Ok(WriteOutcome::GuardFailed { block: g.block });
            }
        }
        for (i, seal) in write.seals.iter().enumerate() {
            let data = write.data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].to_vec().into_boxed_slice();
            blocks.insert(
                write.first + i as u64,
                Block { data: Some(data), record: Record::Sealed { seal: *seal, version } },
            );
        }
        Ok(WriteOutcome::Written)
    }

    fn zero(&self, first: u64, count: u64, deallocate: bool, version: u64) -> BackendResult<()> {
        self.check(first, count)?;
        let mut blocks = self.blocks();
        for index in first..first + count {
            let whole_group = {
                let g = index / ZERO_GROUP_BLOCKS * ZERO_GROUP_BLOCKS;
                g >= first && g + ZERO_GROUP_BLOCKS <= first + count
            };
            if whole_group {
                if deallocate {
                    blocks.remove(&index);
                } else {
                    blocks.insert(
                        index,
                        Block {
                            data: Some(vec![0u8; BLOCK_BYTES].into()),
                            record: Record::Zero { version: 0 },
                        },
                    );
                }
                continue;
            }
            let data = if deallocate { None } else { Some(vec![0u8; BLOCK_BYTES].into_boxed_slice()) };
            blocks.insert(index, Block { data, record: Record::Zero { version } });
        }
        Ok(())
    }

    fn status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let size = self.size();
        check_range(offset, len, size)?;
        if len == 0 {
            return Err(BackendError::OutOfRange { offset, len, size });
        }
        let blocks = self.blocks();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let index = pos / BLOCK;
            let end = ((index + 1) * BLOCK).min(offset + len);
            let kind = match blocks.get(&index) {
                Some(b) if b.data.is_some() => ExtentKind::Data,
                _ => ExtentKind::Hole,
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.len_bytes += end - pos,
                _ => out.push(Extent { len_bytes: end - pos, kind }),
            }
            pos = end;
        }
        Ok(out)
    }
}

#[async_trait]
impl SealedStore for MemSealedStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        self.read(first, count)
    }

    async fn write_blocks(&self, write: BlockWrite) -> BackendResult<WriteOutcome> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        self.write(write, version)
    }

    async fn zero_blocks(&self, first: u64, count: u64, deallocate: bool) -> BackendResult<()> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        self.zero(first, count, deallocate, version)
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.status(offset, len)
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }
}

#[async_trait]
impl CopyStore for MemSealedStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    fn grow(&self, size_bytes: u64) -> BackendResult<()> {
        self.grow_to(size_bytes);
        Ok(())
    }

    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        self.read(first, count)
    }

    async fn apply_write(&self, write: BlockWrite, version: u64) -> BackendResult<WriteOutcome> {
        self.write(write, version)
    }

    async fn apply_zero(&self, first: u64, count: u64, deallocate: bool, version: u64) -> BackendResult<()> {
        self.zero(first, count, deallocate, version)
    }

    async fn restore(&self, image: BlockImage, only_damaged: bool) -> BackendResult<u64> {
        image.check()?;
        self.check(image.first, image.states.len() as u64)?;
        let mut blocks = self.blocks();
        let mut at = 0;
        let mut written = 0;
        for (i, state) in image.states.iter().enumerate() {
            let index = image.first + i as u64;
            let data = match state {
                BlockState::Sealed { .. } => {
                    at += BLOCK_BYTES;
                    Some(&image.data[at - BLOCK_BYTES..at])
                }
                _ => None,
            };
            if only_damaged && !matches!(Self::state_of(index, blocks.get(&index)), BlockState::Damaged(_)) {
                continue;
            }
            let block = match (state, data) {
                (BlockState::Sealed { seal, version }, Some(d)) => Block {
                    data: Some(d.to_vec().into()),
                    record: Record::Sealed { seal: *seal, version: *version },
                },
                (BlockState::Zero { version: 0 }, _) => {
                    blocks.remove(&index);
                    written += 1;
                    continue;
                }
                (BlockState::Zero { version }, _) => {
                    Block { data: None, record: Record::Zero { version: *version } }
                }
                _ => continue,
            };
            blocks.insert(index, block);
            written += 1;
        }
        Ok(written)
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.status(offset, len)
    }

    async fn flush(&self) -> BackendResult<()> {
        Ok(())
    }
}

/// A sealed read of `count` blocks as plain bytes, for tests: `None` if any is damaged.
pub fn plain_bytes(read: &SealedBlocks) -> Option<Bytes> {
    if read.states.iter().any(|s| matches!(s, BlockState::Damaged(_))) {
        return None;
    }
    Some(read.data.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::seal::{Guard, Seal};

    fn write_of(first: u64, byte: u8, count: usize) -> BlockWrite {
        let data = Bytes::from(vec![byte; count * BLOCK_BYTES]);
        let seals = (0..count).map(|i| Seal::plain(first + i as u64, &data[..BLOCK_BYTES])).collect();
        BlockWrite { first, data, seals, guards: vec![] }
    }

    #[tokio::test]
    async fn damage_is_reported_never_returned_as_data() {
        let s = MemSealedStore::new(64 * BLOCK);
        assert_eq!(SealedStore::write_blocks(&s, write_of(2, 7, 3)).await.unwrap(), WriteOutcome::Written);
        let r = SealedStore::read_blocks(&s, 0, 6).await.unwrap();
        assert!(matches!(r.states[0], BlockState::Zero { version: 0 }));
        assert!(matches!(r.states[2], BlockState::Sealed { .. }));
        assert!(s.damage_data(3, 100));
        s.damage_record(4);
        let r = SealedStore::read_blocks(&s, 2, 3).await.unwrap();
        assert_eq!(r.damaged().collect::<Vec<_>>(), vec![(3, Damage::Checksum), (4, Damage::Metadata)]);
        assert!(plain_bytes(&r).is_none());
    }

    #[tokio::test]
    async fn guards_compare_versions() {
        let s = MemSealedStore::new(64 * BLOCK);
        CopyStore::apply_write(&s, write_of(1, 1, 1), 10).await.unwrap();
        let mut w = write_of(1, 2, 1);
        w.guards.push(Guard { block: 1, version: 9 });
        assert_eq!(
            CopyStore::apply_write(&s, w.clone(), 11).await.unwrap(),
            WriteOutcome::GuardFailed { block: 1 }
        );
        w.guards[0].version = 10;
        assert_eq!(CopyStore::apply_write(&s, w, 11).await.unwrap(), WriteOutcome::Written);
        // Zeroing a whole group drops its versions to 0; a partial group keeps the zeroing's.
        CopyStore::apply_zero(&s, 0, 40, true, 12).await.unwrap();
        let r = CopyStore::read_blocks(&s, 0, 40).await.unwrap();
        assert_eq!(r.states[1], BlockState::Zero { version: 0 });
        assert_eq!(r.states[35], BlockState::Zero { version: 12 });
    }
}
