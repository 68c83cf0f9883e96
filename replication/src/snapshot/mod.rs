//! Snapshots: how a replica that cannot catch up from the log gets the volume's data.
//!
//! A Raft snapshot here is **metadata only** (index, term, membership; see
//! `GroupStorage::snapshot`): offering one costs nothing, so a leader can compact its log
//! whenever its store has durably applied it. The data moves separately, pulled by the
//! receiver:
//!
//! ```text
//! follower too far behind ◀── MsgSnapshot (index S) ── leader
//!   install S in the WAL (log restarts at S+1), write the marker "rebuild S 0", ack
//!   pull.rs: for each chunk of the volume, ask a member whose store applied ≥ S
//!            ── ReadChunk(offset, len, S) ──▶ serve.rs: block status, read data extents
//!            ◀── chunk (extents + data + crc32, chunk.rs) ──
//!            write data / zero holes, every second: flush, marker "rebuild S offset"
//!   meanwhile: the replica takes part in Raft (entries after S are logged and committed
//!              but not applied; no reads or writes are served here)
//!   done: replay the logged entries after S over the copy, checkpoint, remove the marker
//! ```
//!
//! Why the fuzzy copy is exact after the replay: each chunk reflects the source's store at
//! some index ≥ S, i.e. all writes up to S plus some later ones. Replaying every command
//! after S, in order, rewrites each block touched after S with its last value; a block not
//! touched after S already holds its value at S. Commands are idempotent block writes,
//! zeroes and grows, so applying one twice is harmless.
//!
//! Restartable: the marker records the flushed prefix; a replica restarted mid-copy resumes
//! there (`marker::plan_open`), from any member. A data file lost with its checkpoint is
//! rebuilt the same way, at the log start. Rate-limited: `PullPlan::rate_bytes_per_s`.
//!
//! State machine groups ([`crate::machine`]) use the same messages and marker, but their
//! snapshot is one consistent image in one chunk ([`image`]).

pub mod chunk;
pub mod image;
pub mod marker;
pub mod pull;
pub mod serve;

/// Volume bytes per chunk by default.
pub const CHUNK_BYTES_DEFAULT: u64 = 4 << 20;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use bytes::Bytes;
    use raftblk_blockdev::seal::backend::LogReporter;
    use raftblk_blockdev::seal::{BlockWrite, CopyStore, MemSealedStore, Seal, BLOCK, BLOCK_BYTES};

    use super::chunk::{Chunk, ChunkError};
    use super::pull::{pull, ChunkFetcher, FetchError, PullPlan, PullProgress};
    use super::*;
    use crate::node::ReplicaStore;
    use crate::wal::record::GroupId;

    struct Source {
        store: Arc<MemSealedStore>,
        applied: u64,
        /// Fail this many fetches before answering.
        fail_first: AtomicU64,
        /// Damage this many answers.
        corrupt_first: AtomicU64,
    }

    struct Fetcher {
        sources: HashMap<u64, Source>,
        asked: Mutex<Vec<u64>>,
        /// What `leader` answers.
        leader: u64,
    }

    #[async_trait]
    impl ChunkFetcher for Fetcher {
        async fn fetch(
            &self,
            source: u64,
            _group: GroupId,
            offset: u64,
            len: u64,
            min_index: u64,
        ) -> Result<Chunk, FetchError> {
            self.asked.lock().unwrap().push(source);
            let s = self.sources.get(&source).ok_or(FetchError::NotMember)?;
            if s.fail_first.load(Ordering::Relaxed) > 0 {
                s.fail_first.fetch_sub(1, Ordering::Relaxed);
                return Err(FetchError::Unreachable("down".into()));
            }
            if s.applied < min_index {
                return Err(FetchError::NotReady);
            }
            let chunk = serve::read_chunk(s.store.as_ref(), offset, len, s.applied).await.unwrap();
            let mut bytes = chunk.encode().to_vec();
            if s.corrupt_first.load(Ordering::Relaxed) > 0 {
                s.corrupt_first.fetch_sub(1, Ordering::Relaxed);
                let mid = bytes.len() / 2;
                bytes[mid] ^= 1;
            }
            Ok(Chunk::decode(Bytes::from(bytes))?)
        }

        fn leader(&self, _group: GroupId) -> u64 {
            self.leader
        }
    }

    fn source(store: Arc<MemSealedStore>, applied: u64) -> Source {
        Source { store, applied, fail_first: AtomicU64::new(0), corrupt_first: AtomicU64::new(0) }
    }

    fn target(size: u64, dir: &std::path::Path) -> (Arc<MemSealedStore>, ReplicaStore) {
        let mem = Arc::new(MemSealedStore::new(size));
        let grow_mem = mem.clone();
        let store = ReplicaStore {
            backend: mem.clone(),
            reporter: Arc::new(LogReporter),
            grow: Arc::new(move |s| {
                grow_mem.grow_to(s);
                Ok(())
            }),
            applied_path: dir.join("v.applied"),
            rebuild_path: dir.join("v.rebuild"),
        };
        (mem, store)
    }

    fn tempdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("raftblk-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn fill(store: &MemSealedStore, offset: u64, byte: u8, len: usize, version: u64) {
        let data = Bytes::from(vec![byte; len]);
        let first = offset / BLOCK;
        let seals = (0..len / BLOCK_BYTES)
            .map(|i| Seal::plain(first + i as u64, &data[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES]))
            .collect();
        CopyStore::apply_write(store, BlockWrite { first, data, seals, guards: vec![] }, version)
            .await
            .unwrap();
    }

    async fn all(b: &MemSealedStore) -> raftblk_blockdev::seal::SealedBlocks {
        CopyStore::read_blocks(b, 0, (b.size() / BLOCK) as u32).await.unwrap()
    }

    #[tokio::test]
    async fn copies_blocks_and_versions_zeroes_holes_grows_and_survives_bad_sources() {
        let dir = tempdir("copy");
        let size = 3 << 20;
        let src = Arc::new(MemSealedStore::new(size + (1 << 20)));
        for (off, byte) in [(0u64, 1u8), (1 << 20, 2), ((2 << 20) + 4096, 3), (size + 8192, 4)] {
            fill(&src, off, byte, 8192, 4096 * (byte as u64 + 1)).await;
        }
        // A zeroed block keeps its version across the copy.
        CopyStore::apply_zero(src.as_ref(), 5, 1, true, 9999).await.unwrap();
        let (dst, store) = target(size, &dir);
        // Garbage where the source has a hole must be zeroed.
        fill(&dst, 512 << 10, 9, 4096, 77).await;
        let behind = source(src.clone(), 3);
        let flaky = source(src.clone(), 10);
        flaky.fail_first.store(2, Ordering::Relaxed);
        flaky.corrupt_first.store(1, Ordering::Relaxed);
        let fetcher = Fetcher {
            sources: HashMap::from([(2, behind), (3, flaky)]),
            asked: Mutex::new(Vec::new()),
            leader: 0,
        };
        let plan = PullPlan {
            group: GroupId(1),
            index: 5,
            offset: 0,
            sources: vec![2, 3, 4],
            chunk_bytes: 1 << 20,
            rate_bytes_per_s: 0,
        };
        let progress = PullProgress::default();
        pull(&fetcher, &store, &plan, &progress).await.unwrap();
        assert_eq!(dst.size(), src.size(), "the copy grows to the source's size");
        assert_eq!(all(&dst).await, all(&src).await, "same blocks, same versions");
        assert_eq!(progress.done_bytes.load(Ordering::Relaxed), src.size());
        assert!(
            progress.retries.load(Ordering::Relaxed) >= 4,
            "behind, unknown, down and damaged were retried"
        );
        // Only sealed blocks' bytes travel: 4 × 8 KiB of data.
        assert_eq!(progress.copied_bytes.load(Ordering::Relaxed), 4 * 8192);
        let m = marker::read(&store.rebuild_path).unwrap().unwrap();
        assert_eq!((m.index, m.offset), (5, src.size()));
        let asked = fetcher.asked.lock().unwrap();
        assert!(asked.contains(&2) && asked.contains(&4), "every source was tried: {asked:?}");
    }

    #[tokio::test]
    async fn the_leader_is_asked_when_the_planned_sources_are_gone() {
        let dir = tempdir("leader");
        let src = Arc::new(MemSealedStore::new(2 << 20));
        fill(&src, 0, 7, 1 << 20, 4096).await;
        let (dst, store) = target(2 << 20, &dir);
        // Planned from the group's first members: 2 no longer holds a copy, 5 is down for good.
        let down = source(src.clone(), 9);
        down.fail_first.store(u64::MAX, Ordering::Relaxed);
        let fetcher = Fetcher {
            sources: HashMap::from([(5, down), (4, source(src.clone(), 9))]),
            asked: Mutex::new(Vec::new()),
            leader: 4,
        };
        let plan = PullPlan {
            group: GroupId(1),
            index: 9,
            offset: 0,
            sources: vec![2, 5],
            chunk_bytes: 1 << 20,
            rate_bytes_per_s: 0,
        };
        let progress = PullProgress::default();
        tokio::time::timeout(std::time::Duration::from_secs(10), pull(&fetcher, &store, &plan, &progress))
            .await
            .expect("the copy finishes from the leader")
            .unwrap();
        assert_eq!(all(&dst).await, all(&src).await);
        assert_eq!(fetcher.asked.lock().unwrap().first(), Some(&4), "the leader first");
    }

    #[tokio::test]
    async fn resumes_at_the_marker_offset() {
        let dir = tempdir("resume");
        let src = Arc::new(MemSealedStore::new(2 << 20));
        fill(&src, 0, 7, 2 << 20, 4096).await;
        let (dst, store) = target(2 << 20, &dir);
        let fetcher = Fetcher {
            sources: HashMap::from([(2, source(src.clone(), 9))]),
            asked: Mutex::new(Vec::new()),
            leader: 0,
        };
        let plan = PullPlan {
            group: GroupId(1),
            index: 9,
            offset: 1 << 20,
            sources: vec![2],
            chunk_bytes: 256 << 10,
            rate_bytes_per_s: 0,
        };
        let progress = PullProgress::default();
        pull(&fetcher, &store, &plan, &progress).await.unwrap();
        let got = all(&dst).await;
        assert!(
            got.data[..1 << 20].iter().all(|&b| b == 0),
            "the prefix before the marker is not copied again"
        );
        assert!(got.data[1 << 20..].iter().all(|&b| b == 7));
        assert_eq!(fetcher.asked.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_damaged_source_block_never_travels() {
        let src = MemSealedStore::new(1 << 20);
        fill(&src, 0, 1, 8192, 4096).await;
        src.damage_data(1, 3);
        assert!(serve::read_chunk(&src, 0, 1 << 20, 1).await.is_err());
    }

    #[test]
    fn a_damaged_chunk_is_an_error_not_data() {
        let c = Chunk { volume_size: 4096, source_applied: 1, offset: 0, body: Bytes::from(vec![1u8; 4096]) };
        let mut b = c.encode().to_vec();
        b[100] ^= 4;
        assert_eq!(Chunk::decode(Bytes::from(b)), Err(ChunkError::Checksum));
    }
}
