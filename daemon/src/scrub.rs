//! Scrub: read every block of every copy, check it, compare the copies, repair what is
//! damaged from a good copy, and report.
//!
//! In a cluster the comparison needs every copy at the *same point of the log* while
//! writes go on, so each chunk (256 blocks, 1 MiB) is a `Scrub` command committed through
//! the volume's Raft log: every copy checks those blocks when it applies that entry and
//! keeps what it found (each block's version and seal, or its damage) until the coordinator
//! here collects it. Copies agree block by block, or one differs: a damaged block is
//! repaired by its copy from another one (the repair rule of `raftblk_replication::node`:
//! an intact block of the same version), a block whose versions or seals differ between
//! intact copies is a *mismatch* (a bug: copies apply the same log) and is reported. A copy
//! left with damage or mismatches makes the volume `degraded`.
//!
//! A node alone has one copy: its scrub checks every block and reports damage it cannot
//! repair. Scrubs are rate-limited (`scrub_rate_mib_s` of allocated data per second) so
//! client I/O keeps flowing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_blockdev::seal::{BlockState, SealedStore, BLOCK};
use serde::{Deserialize, Serialize};

/// Default scrub rate (MiB of allocated data per second).
pub const SCRUB_RATE_MIB_S_DEFAULT: u64 = 100;
/// Default interval between background scrubs of a volume (hours; a week).
pub const SCRUB_INTERVAL_H_DEFAULT: u64 = 168;
/// Blocks per scrub command (1 MiB).
pub const CHUNK_BLOCKS: u32 = 256;
/// How long the coordinator waits for a copy to report a chunk.
const RESULT_WAIT: Duration = Duration::from_secs(10);
/// At most this many damaged block numbers are listed per copy in a summary.
const LISTED_BLOCKS_MAX: usize = 64;

/// What a scrub found in one copy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyFindings {
    /// Blocks that failed their checks.
    pub damaged: u64,
    /// Of those, rewritten from another copy.
    pub repaired: u64,
    /// Blocks still damaged after the repair attempt (the first few).
    pub unrepaired_blocks: Vec<u64>,
    /// Number of blocks still damaged.
    pub unrepaired: u64,
    /// Intact blocks whose version or seal differs from the other copies'.
    pub mismatched: u64,
    /// Chunks this copy did not report (down, rebuilding, or too slow).
    pub chunks_missed: u64,
}

impl CopyFindings {
    /// Whether the copy is as it should be (every block intact and agreeing).
    pub fn is_clean(&self) -> bool {
        self.unrepaired == 0 && self.mismatched == 0
    }
}

/// The result of one scrub.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSummary {
    /// The volume.
    pub volume: String,
    /// When it started and finished (seconds since the epoch).
    pub started_unix_s: u64,
    /// 0 while running.
    pub finished_unix_s: u64,
    /// Blocks checked (on each copy).
    pub blocks_checked: u64,
    /// Bytes of allocated data read (on each copy).
    pub data_bytes: u64,
    /// Findings per copy, by node id (0: the only copy of a node alone).
    pub copies: BTreeMap<u64, CopyFindings>,
    /// Why it stopped early, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ScrubSummary {
    /// Copies left damaged or mismatched.
    pub fn bad_copies(&self) -> Vec<u64> {
        self.copies.iter().filter(|(_, f)| !f.is_clean()).map(|(n, _)| *n).collect()
    }
}

/// A scrub in progress (or done), as the API shows it.
#[derive(Debug, Default)]
pub struct ScrubJob {
    /// Bytes of the volume covered so far.
    pub done_bytes: AtomicU64,
    /// The volume's size.
    pub total_bytes: AtomicU64,
    /// Set when finished.
    pub finished: AtomicBool,
    summary: Mutex<ScrubSummary>,
}

impl ScrubJob {
    /// The findings so far (final once `finished`).
    pub fn summary(&self) -> ScrubSummary {
        self.summary.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ScrubSummary)) {
        f(&mut self.summary.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Every block below `blocks_checked` is done; the findings so far.
    fn progress(&self, blocks_checked: u64, data_bytes: u64, copies: BTreeMap<u64, CopyFindings>) {
        self.done_bytes.store(blocks_checked * BLOCK, Ordering::Relaxed);
        self.update(|s| {
            s.blocks_checked = blocks_checked;
            s.data_bytes = data_bytes;
            s.copies = copies;
        });
    }
}

/// Progress as the API reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// Whether a scrub is running now.
    pub running: bool,
    /// Bytes covered and the volume's size.
    pub done_bytes: u64,
    /// See `done_bytes`.
    pub total_bytes: u64,
    /// The running scrub's findings so far, or the last one's.
    pub summary: Option<ScrubSummary>,
}

impl ScrubJob {
    /// The job as the API shows it.
    pub fn status(&self) -> ScrubStatus {
        ScrubStatus {
            running: !self.finished.load(Ordering::SeqCst),
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            summary: Some(self.summary()),
        }
    }
}

/// What the copies reported for one chunk, compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkFindings {
    /// Per copy: indexes (within the chunk) of damaged blocks.
    pub damaged: BTreeMap<u64, Vec<usize>>,
    /// Per copy: indexes of intact blocks that disagree with the majority of intact copies.
    pub mismatched: BTreeMap<u64, Vec<usize>>,
    /// Copies that reported nothing.
    pub missing: Vec<u64>,
    /// Sealed (allocated) blocks in the agreed states.
    pub sealed_blocks: u64,
}

/// Compares what each copy found for one chunk (`None`: the copy did not report). Pure.
pub fn compare(reports: &BTreeMap<u64, Option<Vec<BlockState>>>) -> ChunkFindings {
    let mut out = ChunkFindings::default();
    let present: Vec<(u64, &Vec<BlockState>)> =
        reports.iter().filter_map(|(n, r)| r.as_ref().map(|r| (*n, r))).collect();
    out.missing = reports.iter().filter(|(_, r)| r.is_none()).map(|(n, _)| *n).collect();
    let blocks = present.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    for i in 0..blocks {
        let mut intact: Vec<(u64, BlockState)> = Vec::new();
        for (node, states) in &present {
            match states.get(i) {
                Some(BlockState::Damaged(_)) | None => out.damaged.entry(*node).or_default().push(i),
                Some(s) => intact.push((*node, *s)),
            }
        }
        // The state most intact copies agree on; a tie is decided by the lowest node id.
        let mut votes: Vec<(BlockState, usize)> = Vec::new();
        for (_, s) in &intact {
            match votes.iter_mut().find(|(v, _)| v == s) {
                Some((_, n)) => *n += 1,
                None => votes.push((*s, 1)),
            }
        }
        let Some((agreed, _)) = votes.iter().max_by_key(|(_, n)| *n).copied() else { continue };
        if matches!(agreed, BlockState::Sealed { .. }) {
            out.sealed_blocks += 1;
        }
        for (node, s) in intact {
            if s != agreed {
                out.mismatched.entry(node).or_default().push(i);
            }
        }
    }
    out
}

/// Scrubs a node alone's only copy: every block checked; damage reported (nothing to
/// repair it from). `rate` limits the allocated bytes read per second (0: unlimited).
pub async fn scrub_local(store: &dyn SealedStore, job: &ScrubJob, rate: u64) -> ScrubSummary {
    let size = store.size_bytes();
    let blocks = size / BLOCK;
    job.total_bytes.store(size, Ordering::Relaxed);
    let started = Instant::now();
    let mut findings = CopyFindings::default();
    let mut data_bytes = 0u64;
    let mut first = 0u64;
    while first < blocks {
        let count = (blocks - first).min(u64::from(CHUNK_BLOCKS)) as u32;
        match store.read_blocks(first, count).await {
            Ok(read) => {
                for (block, _) in read.damaged() {
                    findings.damaged += 1;
                    findings.unrepaired += 1;
                    if findings.unrepaired_blocks.len() < LISTED_BLOCKS_MAX {
                        findings.unrepaired_blocks.push(block);
                    }
                }
                let sealed = read.states.iter().filter(|s| matches!(s, BlockState::Sealed { .. })).count();
                data_bytes += sealed as u64 * BLOCK;
            }
            Err(e) => {
                job.update(|s| s.error = Some(format!("reading blocks at {first}: {e}")));
                break;
            }
        }
        first += u64::from(count);
        job.progress(first, data_bytes, BTreeMap::from([(0, findings.clone())]));
        pace(started, data_bytes, rate).await;
    }
    job.summary()
}

/// What a cluster scrub needs of its volume and node.
pub struct ClusterScrub<'a> {
    /// The volume's replicated store (proposes the scrub commands).
    pub store: &'a raftblk_replication::node::ReplicatedStore,
    /// The node (collects findings, asks copies to repair).
    pub node: &'a raftblk_replication::node::ReplicationNode,
    /// The nodes holding copies.
    pub copies: Vec<u64>,
}

/// Scrubs every copy of a replicated volume (see the [module documentation](self)).
pub async fn scrub_replicated(c: ClusterScrub<'_>, job: &ScrubJob, rate: u64) -> ScrubSummary {
    let size = raftblk_blockdev::seal::SealedStore::size_bytes(c.store);
    let blocks = size / BLOCK;
    job.total_bytes.store(size, Ordering::Relaxed);
    let group = c.store.group();
    let id = scrub_id();
    let started = Instant::now();
    let mut copies: BTreeMap<u64, CopyFindings> =
        c.copies.iter().map(|&n| (n, CopyFindings::default())).collect();
    let mut data_bytes = 0u64;
    let mut first = 0u64;
    while first < blocks {
        let count = (blocks - first).min(u64::from(CHUNK_BLOCKS)) as u32;
        if let Err(e) = c.store.scrub(id, first, count).await {
            job.update(|s| s.error = Some(format!("committing the scrub of blocks {first}..: {e}")));
            break;
        }
        let mut reports = BTreeMap::new();
        for &node in &c.copies {
            reports.insert(node, collect(c.node, node, group, id, first).await);
        }
        let found = compare(&reports);
        data_bytes += found.sealed_blocks * BLOCK;
        for node in &found.missing {
            if let Some(f) = copies.get_mut(node) {
                f.chunks_missed += 1;
            }
        }
        for (node, idx) in &found.mismatched {
            tracing::error!(volume = %job.summary().volume, copy = node, first, blocks = ?idx, "copies disagree on intact blocks");
            if let Some(f) = copies.get_mut(node) {
                f.mismatched += idx.len() as u64;
            }
        }
        for (node, idx) in &found.damaged {
            let Some(f) = copies.get_mut(node) else { continue };
            f.damaged += idx.len() as u64;
            let (lo, hi) = (idx[0], idx[idx.len() - 1]);
            let run_first = first + lo as u64;
            let run_count = (hi - lo + 1) as u32;
            match c.node.repair_copy(*node, group, run_first, run_count).await {
                Ok((repaired, still)) => {
                    f.repaired += u64::from(repaired);
                    f.unrepaired += u64::from(still);
                    if still > 0 {
                        for i in idx.iter().take(LISTED_BLOCKS_MAX.saturating_sub(f.unrepaired_blocks.len()))
                        {
                            f.unrepaired_blocks.push(first + *i as u64);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(copy = node, first = run_first, error = %e, "asking a copy to repair failed");
                    f.unrepaired += idx.len() as u64;
                    for i in idx.iter().take(LISTED_BLOCKS_MAX.saturating_sub(f.unrepaired_blocks.len())) {
                        f.unrepaired_blocks.push(first + *i as u64);
                    }
                }
            }
        }
        first += u64::from(count);
        job.progress(first, data_bytes, copies.clone());
        pace(started, data_bytes, rate).await;
    }
    job.summary()
}

/// What `node`'s copy found for chunk `first` of scrub `id`, waiting for it to apply the
/// command (`None` after [`RESULT_WAIT`]).
async fn collect(
    node: &raftblk_replication::node::ReplicationNode,
    copy: u64,
    group: raftblk_replication::wal::record::GroupId,
    id: u64,
    first: u64,
) -> Option<Vec<BlockState>> {
    let deadline = Instant::now() + RESULT_WAIT;
    loop {
        match node.scrub_result(copy, group, id, first).await {
            Ok(Some(chunk)) => return Some(chunk.states),
            Ok(None) => {}
            Err(e) => tracing::debug!(copy, first, error = %e, "scrub result not available"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sleeps so that `bytes` since `started` stay within `rate` bytes per second.
async fn pace(started: Instant, bytes: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = started + Duration::from_secs_f64(bytes as f64 / rate as f64);
    let now = Instant::now();
    if due > now {
        tokio::time::sleep(due - now).await;
    }
}

/// A fresh scrub id (random: two scrubs of one volume never mix their findings).
fn scrub_id() -> u64 {
    let u = uuid::Uuid::new_v4();
    let (hi, _) = u.as_u64_pair();
    hi | 1
}

/// Starts `job` afresh for volume `name` (summary reset, start time set).
pub fn begin(job: &ScrubJob, name: &str) {
    job.finished.store(false, Ordering::SeqCst);
    job.done_bytes.store(0, Ordering::Relaxed);
    job.update(|s| {
        *s =
            ScrubSummary { volume: name.to_string(), started_unix_s: now_unix_s(), ..ScrubSummary::default() }
    });
}

/// Marks `job` finished.
pub fn end(job: &ScrubJob) -> ScrubSummary {
    job.update(|s| s.finished_unix_s = now_unix_s());
    job.finished.store(true, Ordering::SeqCst);
    job.summary()
}

/// Seconds since the Unix epoch now.
pub fn now_unix_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Shared handle for a volume's scrub.
pub type SharedJob = Arc<ScrubJob>;

/// The volume whose scrub is due first (oldest scrub, a new volume counting from its
/// creation) among `records`, if any is older than `interval_h` hours at `now_unix_s`.
pub fn due_for_scrub(
    records: &[crate::model::VolumeRecord],
    interval_h: u64,
    now_unix_s: u64,
) -> Option<&crate::model::VolumeRecord> {
    if interval_h == 0 {
        return None;
    }
    let due_after = interval_h.saturating_mul(3600);
    let last = |r: &crate::model::VolumeRecord| r.scrubbed_unix_s.max(r.created_unix_s);
    records
        .iter()
        .filter(|r| now_unix_s.saturating_sub(last(r)) >= due_after)
        .min_by_key(|r| (last(r), r.name.as_str()))
}

#[cfg(test)]
mod tests {
    use raftblk_blockdev::seal::{Damage, Seal};

    use super::*;

    fn sealed(v: u64) -> BlockState {
        BlockState::Sealed { seal: Seal { crc: v as u32, cipher: None }, version: v }
    }

    #[test]
    fn the_volume_scrubbed_longest_ago_is_due_first() {
        let r = |name: &str, created: u64, scrubbed: u64| crate::model::VolumeRecord {
            name: name.into(),
            created_unix_s: created,
            scrubbed_unix_s: scrubbed,
            ..Default::default()
        };
        let hour = 3600;
        let records =
            vec![r("a", 0, 10 * hour), r("b", 0, 2 * hour), r("new", 20 * hour, 0), r("c", hour, 0)];
        let now = 25 * hour;
        // b was scrubbed at 2 h, c created at 1 h and never scrubbed: c is older.
        assert_eq!(due_for_scrub(&records, 10, now).map(|r| r.name.as_str()), Some("c"));
        // Nothing is 24 h old but c (24 h): only it is due; at 25 h nothing is.
        assert_eq!(due_for_scrub(&records, 24, now).map(|r| r.name.as_str()), Some("c"));
        assert_eq!(due_for_scrub(&records, 25, now), None);
        assert_eq!(due_for_scrub(&records, 0, now), None, "interval 0 turns the background scrub off");
        assert_eq!(due_for_scrub(&[], 1, now), None);
    }

    #[test]
    fn copies_that_agree_have_no_findings() {
        let r: BTreeMap<u64, Option<Vec<BlockState>>> = [1, 2, 3]
            .into_iter()
            .map(|n| (n, Some(vec![sealed(5), BlockState::Zero { version: 0 }, sealed(9)])))
            .collect();
        let f = compare(&r);
        assert!(f.damaged.is_empty() && f.mismatched.is_empty() && f.missing.is_empty());
        assert_eq!(f.sealed_blocks, 2);
    }

    #[test]
    fn damage_mismatches_and_silence_are_told_apart() {
        let mut r: BTreeMap<u64, Option<Vec<BlockState>>> = BTreeMap::new();
        r.insert(1, Some(vec![sealed(5), sealed(6), sealed(7)]));
        r.insert(2, Some(vec![BlockState::Damaged(Damage::Checksum), sealed(6), sealed(8)]));
        r.insert(3, Some(vec![sealed(5), sealed(6), sealed(7)]));
        r.insert(4, None);
        let f = compare(&r);
        assert_eq!(f.damaged, BTreeMap::from([(2, vec![0])]));
        assert_eq!(f.mismatched, BTreeMap::from([(2, vec![2])]), "the minority of intact copies differs");
        assert_eq!(f.missing, vec![4]);
    }
}
