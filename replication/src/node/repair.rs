//! Reads that repair: a block of the leader's copy that fails its check is fetched from
//! another copy, written back, and served, without the client noticing.
//!
//! Which copy's block is right: the leader serves a read once its copy has applied index
//! `A`. Another copy that has applied at least `A` holds, for each block, the last write
//! to it at or before its own applied index. If that write's log index (the block's
//! version) is at most `A`, it is exactly the write the leader's copy should show, so it is
//! stored back (only over a block that is still damaged: `restore(.., only_damaged)`). If
//! it is newer, the leader will apply that write itself shortly, which replaces the damage;
//! the read waits for that instead of showing a value from the leader's future.

use std::sync::Arc;
use std::time::Duration;

use raftblk_blockdev::backend::BackendError;
use raftblk_blockdev::seal::{wire, BlockImage, BlockState, SealedBlocks};

use super::forward::{ForwardOp, ForwardRequest, ForwardStatus};
use super::{forward_via, ReplicaStore, Shared};
use crate::transport::Transport;
use crate::volume::command::version_index;
use crate::wal::record::GroupId;

/// How long one peer may take to answer a repair read.
const REPAIR_TIMEOUT: Duration = Duration::from_secs(2);
/// Re-reads while waiting for the local copy to apply a newer write over a damaged block.
const CATCH_UP_ATTEMPTS: usize = 50;
const CATCH_UP_PAUSE: Duration = Duration::from_millis(20);

/// Whether another copy's block (in state `theirs`) may replace a damaged block of a copy
/// that has applied `applied`: it is intact and was written at or before `applied`.
pub(crate) fn usable(theirs: &BlockState, applied: u64) -> bool {
    match theirs {
        BlockState::Sealed { version, .. } | BlockState::Zero { version } => {
            version_index(*version) <= applied
        }
        BlockState::Damaged(_) => false,
    }
}

/// What a repairing read needs of its node.
pub(super) struct RepairContext {
    pub shared: Arc<Shared>,
    pub transport: Arc<Transport>,
    pub group: GroupId,
    pub me: u64,
    /// The group's other members, best first.
    pub peers: Vec<u64>,
}

/// Reads `count` blocks from `first` of the local copy, which has applied `applied`;
/// damaged blocks are repaired from a peer's copy where one holds them intact. Blocks no
/// copy has intact stay damaged (the caller answers EIO for them).
pub(super) async fn read_repaired(
    ctx: &RepairContext,
    store: &ReplicaStore,
    first: u64,
    count: u32,
    applied: u64,
) -> Result<SealedBlocks, BackendError> {
    let mut read = store.backend.read_blocks(first, count).await?;
    for _ in 0..CATCH_UP_ATTEMPTS {
        let damaged: Vec<u64> = read.damaged().map(|(b, _)| b).collect();
        let (Some(&lo), Some(&hi)) = (damaged.first(), damaged.last()) else { return Ok(read) };
        let mut waiting_for_newer = false;
        let mut repaired = false;
        for &peer in &ctx.peers {
            let op = ForwardOp::ReadCopy { first: lo, count: (hi - lo + 1) as u32, min_applied: applied };
            let request = ForwardRequest { group: ctx.group, op };
            let answer = forward_via(&ctx.shared, &ctx.transport, peer, request, REPAIR_TIMEOUT).await;
            let Ok(ForwardStatus::Ok(bytes)) = answer else { continue };
            let Ok(theirs) = wire::decode_image(bytes) else { continue };
            let theirs = theirs.into_blocks();
            let mut states = Vec::new();
            let mut data = bytes::BytesMut::new();
            let mut good = Vec::new();
            for &block in &damaged {
                let i = (block - lo) as usize;
                match theirs.states.get(i) {
                    Some(s @ BlockState::Sealed { .. }) if usable(s, applied) => {
                        good.push((block, *s, Some(theirs.block(i).to_vec())));
                    }
                    Some(s @ BlockState::Zero { .. }) if usable(s, applied) => good.push((block, *s, None)),
                    Some(BlockState::Sealed { .. } | BlockState::Zero { .. }) => waiting_for_newer = true,
                    _ => {}
                }
            }
            for (block, state, bytes) in good {
                states.clear();
                data.clear();
                states.push(state);
                if let Some(b) = bytes {
                    data.extend_from_slice(&b);
                }
                let image = BlockImage { first: block, states: states.clone(), data: data.clone().freeze() };
                if store.backend.restore(image, true).await? > 0 {
                    store.reporter.repaired(block, Some(ctx.me));
                    repaired = true;
                }
            }
            if repaired {
                break;
            }
        }
        if repaired {
            read = store.backend.read_blocks(first, count).await?;
            continue;
        }
        if !waiting_for_newer {
            return Ok(read);
        }
        tokio::time::sleep(CATCH_UP_PAUSE).await;
        read = store.backend.read_blocks(first, count).await?;
    }
    Ok(read)
}
