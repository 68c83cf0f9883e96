//! [`ReplicatedStore`]: a replicated volume as a [`SealedStore`], usable on any node (a
//! `SealingBackend` over it is what front ends see). Requests go to the local replica when
//! it leads, and are forwarded to the leader otherwise, as sealed blocks: the node a client
//! writes to encrypts and checksums, and only that node ever holds its plaintext. On a
//! leader change requests are retried until a leader answers or the I/O timeout passes
//! (then the client sees EIO).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use raftblk_blockdev::backend::{check_range, BackendError, BackendResult, Extent, ExtentKind};
use raftblk_blockdev::seal::{wire, BlockWrite, CopyStore, SealedBlocks, SealedStore, WriteOutcome, BLOCK};

use super::forward::{ForwardOp, ForwardRequest};
use super::{Answer, NodeError, ReplicationNode};
use crate::wal::record::GroupId;

/// Longest one attempt may take before it is retried elsewhere: a deposed leader's
/// proposals only fail once a new leader commits over them.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1000);
/// Payload bytes per second an attempt is allowed on top of [`ATTEMPT_TIMEOUT`]: a 32 MiB
/// write goes through two WALs and the network, and retrying it early only adds another
/// 32 MiB entry to the log.
const ATTEMPT_BYTES_PER_S: u64 = 16 << 20;
/// How often an attempt in flight checks whether another node has become leader.
const LEADER_WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// Pause between attempts while no leader is known, doubling up to the maximum.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Short: while no leader is known a retry only waits out the election (which its sleep
/// may overshoot by this much at most; the failover bound is 1 s).
const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// One replicated volume as seen from one node.
pub struct ReplicatedStore {
    node: ReplicationNode,
    group: GroupId,
    voters: Vec<u64>,
    size_bytes: Arc<AtomicU64>,
    local: Option<Arc<dyn CopyStore>>,
}

/// How long one attempt at `op` may take.
fn attempt_timeout(op: &ForwardOp) -> Duration {
    let bytes = match op {
        ForwardOp::Write(w) => w.data.len() as u64,
        ForwardOp::Read { count, .. } => u64::from(*count) * BLOCK,
        _ => 0,
    };
    ATTEMPT_TIMEOUT + Duration::from_secs_f64(bytes as f64 / ATTEMPT_BYTES_PER_S as f64)
}

enum Outcome {
    Done(Answer),
    /// The request cannot succeed anywhere (out of range, refused): fail it.
    Fail(NodeError),
    GuardFailed(u64),
    Retry {
        leader_hint: u64,
    },
}

impl ReplicatedStore {
    /// Grows the volume on every replica through the log.
    pub async fn resize(&self, size_bytes: u64) -> BackendResult<()> {
        self.execute(ForwardOp::Resize { size: size_bytes }).await.map(|_| ())
    }

    /// Commits a scrub of `count` blocks from `first` (scrub `id`) through the log: every
    /// copy checks them as of that entry (see [`ReplicationNode::scrub_result`]).
    pub async fn scrub(&self, id: u64, first: u64, count: u32) -> BackendResult<()> {
        self.execute(ForwardOp::Scrub { id, first, count }).await.map(|_| ())
    }

    /// The nodes holding copies (as this store was opened with).
    pub fn voters(&self) -> &[u64] {
        &self.voters
    }

    /// The volume's Raft group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The node this store runs on.
    pub fn node(&self) -> &ReplicationNode {
        &self.node
    }

    /// A volume of `size_bytes` replicated by `voters`; `local` is this node's replica, if any.
    pub fn new(
        node: ReplicationNode,
        group: GroupId,
        voters: Vec<u64>,
        size_bytes: Arc<AtomicU64>,
        local: Option<Arc<dyn CopyStore>>,
    ) -> Self {
        ReplicatedStore { node, group, voters, size_bytes, local }
    }

    fn is_member(&self) -> bool {
        self.voters.contains(&self.node.node_id().0)
    }

    /// One attempt at `target`, cut short when this node learns of another leader
    /// (so requests stuck at a dead leader move on as soon as a new one is elected).
    async fn attempt(&self, target: u64, op: &ForwardOp) -> Outcome {
        let known_at_start = self.node.leader(self.group);
        let watch = async {
            loop {
                tokio::time::sleep(LEADER_WATCH_INTERVAL).await;
                let leader = self.node.leader(self.group);
                if leader != 0 && leader != target && leader != known_at_start {
                    return leader;
                }
            }
        };
        tokio::select! {
            outcome = self.attempt_at(target, op, attempt_timeout(op)) => outcome,
            leader = watch => Outcome::Retry { leader_hint: leader },
        }
    }

    async fn attempt_at(&self, target: u64, op: &ForwardOp, timeout: Duration) -> Outcome {
        let result = if target == self.node.node_id().0 {
            match tokio::time::timeout(timeout, self.node.run_local(self.group, op.clone())).await {
                Ok(result) => result,
                Err(_) => Err(NodeError::Timeout),
            }
        } else {
            let request = ForwardRequest { group: self.group, op: op.clone() };
            self.node
                .forward(target, request, timeout)
                .await
                .and_then(|s| s.into_result(self.group))
                .and_then(|data| self.answer(op, data))
        };
        match result {
            Ok(answer) => Outcome::Done(answer),
            Err(NodeError::GuardFailed { block }) => Outcome::GuardFailed(block),
            Err(e @ (NodeError::OutOfRange { .. } | NodeError::Refused(_))) => Outcome::Fail(e),
            Err(NodeError::NotLeader { leader }) => Outcome::Retry { leader_hint: leader },
            Err(_) => Outcome::Retry { leader_hint: 0 },
        }
    }

    /// What a leader's data means for `op`.
    fn answer(&self, op: &ForwardOp, data: Bytes) -> Result<Answer, NodeError> {
        let ForwardOp::Read { first, count } = op else { return Ok(Answer::Done) };
        match wire::decode_image(data) {
            Ok(image) if image.first == *first && image.states.len() == *count as usize => {
                Ok(Answer::Blocks(image.into_blocks()))
            }
            _ => {
                tracing::warn!(group = %self.group, "leader answered a read with malformed blocks");
                Err(NodeError::Unavailable("malformed blocks in a read's answer".into()))
            }
        }
    }

    /// Runs `op` at the leader, retrying through leader changes until the I/O timeout.
    /// Refusals come back as the leader gave them (an out-of-range one with its range).
    async fn execute(&self, op: ForwardOp) -> BackendResult<Result<Answer, u64>> {
        let deadline = Instant::now() + self.node.io_timeout();
        let me = self.node.node_id().0;
        let mut rotation = 0usize;
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut target = match self.node.leader(self.group) {
            0 if self.is_member() => me,
            0 => self.voters.first().copied().unwrap_or(me),
            l => l,
        };
        loop {
            match self.attempt(target, &op).await {
                Outcome::Done(answer) => return Ok(Ok(answer)),
                Outcome::GuardFailed(block) => return Ok(Err(block)),
                Outcome::Fail(e) => return Err(e.into()),
                Outcome::Retry { leader_hint } => {
                    if Instant::now() >= deadline {
                        tracing::warn!(group = %self.group, timeout = ?self.node.io_timeout(), "no leader answered in time; failing the request");
                        return Err(BackendError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no leader within the I/O timeout",
                        )));
                    }
                    let known = self.node.leader(self.group);
                    target = if leader_hint != 0 && leader_hint != target {
                        leader_hint
                    } else if known != 0 && known != target {
                        known
                    } else {
                        // No better idea: wait a little, then try the next voter.
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                        rotation += 1;
                        match self.voters.len() {
                            0 => me,
                            n => self.voters[rotation % n],
                        }
                    };
                }
            }
        }
    }
}

#[async_trait]
impl SealedStore for ReplicatedStore {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::SeqCst)
    }

    async fn read_blocks(&self, first: u64, count: u32) -> BackendResult<SealedBlocks> {
        check_range(first.saturating_mul(BLOCK), u64::from(count) * BLOCK, self.size_bytes())?;
        if count == 0 {
            return Ok(SealedBlocks { first, data: Bytes::new(), states: Vec::new() });
        }
        match self.execute(ForwardOp::Read { first, count }).await? {
            Ok(Answer::Blocks(read)) => Ok(read),
            _ => Err(BackendError::Io(std::io::Error::other("the leader answered a read with no blocks"))),
        }
    }

    async fn write_blocks(&self, write: BlockWrite) -> BackendResult<WriteOutcome> {
        // FUA is a FLUSH after the write (`SealedBackend::write`): an acknowledged write of
        // a replicated group is already fdatasynced in the WAL of a majority; a single-copy
        // volume's is in the kernel until its next sync.
        check_range(write.first.saturating_mul(BLOCK), write.count() * BLOCK, self.size_bytes())?;
        if write.seals.is_empty() {
            return Ok(WriteOutcome::Written);
        }
        match self.execute(ForwardOp::Write(write)).await? {
            Ok(_) => Ok(WriteOutcome::Written),
            Err(block) => Ok(WriteOutcome::GuardFailed { block }),
        }
    }

    async fn zero_blocks(&self, first: u64, count: u64, deallocate: bool) -> BackendResult<()> {
        check_range(first.saturating_mul(BLOCK), count.saturating_mul(BLOCK), self.size_bytes())?;
        if count == 0 {
            return Ok(());
        }
        self.execute(ForwardOp::Zero { first, count, deallocate }).await.map(|_| ())
    }

    async fn flush(&self) -> BackendResult<()> {
        // At the leader, which acknowledged the writes: a replicated group's are durable on a
        // majority already and it answers at once; a single-copy volume's wait for its sync.
        self.execute(ForwardOp::Flush).await.map(|_| ())
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        let size = self.size_bytes();
        check_range(offset, len, size)?;
        // Only the leader's replica has applied every acknowledged write; anywhere else a
        // hole could be stale, and a client may skip copying holes, so report data.
        match &self.local {
            Some(local) if self.node.leader(self.group) == self.node.node_id().0 => {
                local.block_status(offset, len).await
            }
            _ => Ok(vec![Extent { len_bytes: len.max(1).min(size - offset), kind: ExtentKind::Data }]),
        }
    }
}
