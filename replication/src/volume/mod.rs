//! The replicated volume, sans-IO: commands carried in Raft entries ([`command`]), the
//! driver of a volume's Raft group ([`group`]), and applying committed commands to a
//! [`BlockBackend`] ([`apply_commands`]).
//!
//! # Why FLUSH and FUA need no work of their own
//!
//! A write is acknowledged only once its entry is *committed*: appended to and `fdatasync`ed
//! in the WAL of a majority of the group's nodes (raft-rs counts the leader's own log only
//! after [`group::GroupDriver::on_synced`], which the caller calls after the WAL sync). From
//! then on the write survives the loss of any minority of nodes, power loss included: a
//! restarted node replays it from its WAL into its store. So every acknowledged write is
//! already as durable as the replication promises, and `FLUSH` (make completed writes
//! durable) and `FUA` (make this write durable before replying) are satisfied the moment the
//! write is acknowledged. The local block store itself never needs an `fsync` for
//! correctness: it is a cache of the log that can be rebuilt from it (as long as the log is
//! not compacted past what the store has durably applied, which compaction must respect).

pub mod command;
pub mod group;

use raftblk_blockdev::backend::{BackendError, BlockBackend};

use self::command::Command;

/// What applying one command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Applied.
    Done,
    /// Refused identically on every replica (e.g. out of range: the size is replicated
    /// state), so skipping it keeps the replicas identical.
    Skipped,
}

/// Applies committed commands to `backend` in order. `resize` grows the store (the
/// [`BlockBackend`] trait has no resize of its own). Errors other than deterministic refusals
/// mean this replica can no longer follow the log and must stop.
pub async fn apply_commands<B: BlockBackend + ?Sized>(
    backend: &B,
    commands: &[Command],
    resize: &(dyn Fn(u64) -> Result<(), BackendError> + Sync),
) -> Result<Vec<ApplyOutcome>, BackendError> {
    let mut out = Vec::with_capacity(commands.len());
    for c in commands {
        let result = match c {
            // fua = false: durability comes from the WAL (see the module docs).
            Command::Write { offset, data } => backend.write(*offset, data.clone(), false).await,
            Command::Trim { offset, len } => backend.trim(*offset, *len).await,
            Command::WriteZeroes { offset, len } => backend.write_zeroes(*offset, *len, false, false).await,
            Command::Resize { size } => resize(*size),
            // State machine commands mean nothing to a volume (and are never proposed to one).
            Command::App { .. } => Ok(()),
        };
        out.push(match result {
            Ok(()) => ApplyOutcome::Done,
            Err(BackendError::OutOfRange { .. }) => ApplyOutcome::Skipped,
            Err(e) => return Err(e),
        });
    }
    Ok(out)
}
