//! The replicated volume, sans-IO: commands carried in Raft entries ([`command`]), the
//! driver of a volume's Raft group ([`group`]), and applying committed entries to a copy
//! ([`apply_entries`]).
//!
//! # Why FLUSH and FUA need no work of their own
//!
//! A write is acknowledged only once its entry is *committed*: appended to and `fdatasync`ed
//! in the WAL of a majority of the group's nodes (raft-rs counts the leader's own log only
//! after [`group::GroupDriver::on_persisted`], which the caller calls after the WAL sync). From
//! then on the write survives the loss of any minority of nodes, power loss included: a
//! restarted node replays it from its WAL into its store. So every acknowledged write is
//! already as durable as the replication promises, and `FLUSH` (make completed writes
//! durable) and `FUA` (make this write durable before replying) are satisfied the moment the
//! write is acknowledged. The local block store itself never needs an `fsync` for
//! correctness: it is a cache of the log that can be rebuilt from it (as long as the log is
//! not compacted past what the store has durably applied, which compaction must respect).

pub mod command;
pub mod group;

use raftblk_blockdev::backend::BackendError;
use raftblk_blockdev::seal::{wire, BlockState, CopyStore, WriteOutcome};

use self::command::{block_version, Command};
use self::group::CommittedEntry;

/// What one copy found when it applied a scrub command: the state (version, seal, or
/// damage) of each block, as of the command's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubChunk {
    /// The scrub.
    pub id: u64,
    /// The entry the copy checked at.
    pub index: u64,
    /// First block checked.
    pub first: u64,
    /// One state per block.
    pub states: Vec<BlockState>,
}

impl ScrubChunk {
    /// `[id u64][index u64][first u64][count u32]` then the states (`seal::wire`).
    pub fn encode(&self) -> bytes::Bytes {
        use bytes::BufMut;
        let mut out =
            bytes::BytesMut::with_capacity(28 + self.states.iter().map(wire::state_len).sum::<usize>());
        out.put_u64_le(self.id);
        out.put_u64_le(self.index);
        out.put_u64_le(self.first);
        out.put_u32_le(self.states.len() as u32);
        for s in &self.states {
            wire::put_state(&mut out, s);
        }
        out.freeze()
    }

    /// Decodes [`ScrubChunk::encode`].
    pub fn decode(mut b: &[u8]) -> Result<ScrubChunk, wire::WireError> {
        use bytes::Buf;
        if b.remaining() < 28 {
            return Err(wire::WireError::Truncated);
        }
        let (id, index, first, count) = (b.get_u64_le(), b.get_u64_le(), b.get_u64_le(), b.get_u32_le());
        if count > command::SCRUB_BLOCKS_MAX {
            return Err(wire::WireError::Malformed("too many blocks"));
        }
        let mut states = Vec::with_capacity(count as usize);
        for _ in 0..count {
            states.push(wire::get_state(&mut b)?);
        }
        if b.has_remaining() {
            return Err(wire::WireError::Malformed("bytes after the states"));
        }
        Ok(ScrubChunk { id, index, first, states })
    }
}

/// What applying entries did besides storing them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Guarded writes whose guard failed, as `(entry index, position in the entry)`: they
    /// were skipped identically on every copy, and their proposer retries them.
    pub guard_failures: Vec<(u64, usize)>,
    /// What this copy found for the scrub commands it applied.
    pub scrubs: Vec<ScrubChunk>,
}

/// Applies committed entries to a volume's copy, in log order: commands run concurrently
/// until one overlaps a command still in flight (or is a resize), which waits for the wave
/// before it. Each write's blocks get the version of its place in the log, the same on
/// every copy. Deterministic refusals (out of range, a guard that failed) are skipped,
/// which keeps the copies identical; any other error means this copy can no longer follow
/// the log and must stop. The one apply of volume entries: the node runner and the
/// simulator both call it.
pub async fn apply_entries(
    store: &dyn CopyStore,
    grow: &(dyn Fn(u64) -> Result<(), BackendError> + Sync),
    entries: Vec<CommittedEntry>,
) -> Result<ApplyReport, BackendError> {
    let mut report = ApplyReport::default();
    let mut wave = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for entry in entries {
        for (position, command) in entry.commands.into_iter().enumerate() {
            let range = command.range();
            let barrier = range.is_none_or(|r| ranges.iter().any(|&o| overlaps(r, o)));
            if barrier {
                finish_wave(std::mem::take(&mut wave), &mut report).await?;
                ranges.clear();
            }
            if let Command::Resize { size } = command {
                grow(size)?;
                continue;
            }
            if let Some(r) = range {
                ranges.push(r);
            }
            let version = block_version(entry.index, position);
            let at = (entry.index, position);
            let index = entry.index;
            wave.push(async move {
                let r = match command {
                    Command::Write(w) => store.apply_write(w, version).await,
                    Command::Zero { first, count, deallocate } => store
                        .apply_zero(first, count, deallocate, version)
                        .await
                        .map(|()| WriteOutcome::Written),
                    Command::Scrub { id, first, count } => {
                        // Reading checks every block; a damaged one is a finding, not an error.
                        return match store.read_blocks(first, count).await {
                            Ok(read) => {
                                Ok(Done::Scrubbed(ScrubChunk { id, index, first, states: read.states }))
                            }
                            Err(BackendError::OutOfRange { .. }) => Ok(Done::Stored),
                            Err(e) => Err(e),
                        };
                    }
                    // A volume has no state machine: never proposed to one.
                    Command::Resize { .. } | Command::App { .. } => Ok(WriteOutcome::Written),
                };
                match r {
                    // Out of range is refused identically on every copy (the size is replicated).
                    Err(BackendError::OutOfRange { .. }) => Ok(Done::Stored),
                    Ok(WriteOutcome::GuardFailed { .. }) => Ok(Done::GuardFailed(at)),
                    Ok(WriteOutcome::Written) => Ok(Done::Stored),
                    Err(e) => Err(e),
                }
            });
        }
    }
    finish_wave(wave, &mut report).await?;
    Ok(report)
}

/// What one applied command produced.
enum Done {
    Stored,
    GuardFailed((u64, usize)),
    Scrubbed(ScrubChunk),
}

async fn finish_wave<F: std::future::Future<Output = Result<Done, BackendError>>>(
    wave: Vec<F>,
    report: &mut ApplyReport,
) -> Result<(), BackendError> {
    for r in futures::future::join_all(wave).await {
        match r? {
            Done::Stored => {}
            Done::GuardFailed(at) => report.guard_failures.push(at),
            Done::Scrubbed(chunk) => report.scrubs.push(chunk),
        }
    }
    Ok(())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}
