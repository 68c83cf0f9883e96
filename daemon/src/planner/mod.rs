//! Every decision the cluster's loops act on, as pure functions: they are fed a snapshot
//! (volume records, the nodes as this node sees them, group leaders) and return what to do,
//! and the loops in `healer.rs`, `cluster_catalog/` and `volumes/` carry it out. Nothing
//! here does I/O or reads a clock, so each decision is unit-tested on its own.
//!
//! * [`placement`]: where new copies go.
//! * [`healing`]: which copies to replace, for every volume at once.
//! * [`health`]: whether a volume has all its copies.
//! * [`leaders`]: which leadership to move so that leaders spread over the nodes.
//! * [`catalog_members`]: the catalog group's first voters and its next membership change.
//! * [`replica`]: the steps that add or remove one copy of a volume.
//! * [`reconcile`]: what this node does with its copies when a record changes.
//! * [`acting`]: which node acts (heals, spreads leaders, schedules scrubs).

pub mod acting;
pub mod catalog_members;
pub mod healing;
pub mod health;
pub mod leaders;
pub mod placement;
pub mod reconcile;
pub mod replica;

use crate::model::{AdminState, Liveness, NodeView};

/// How `id` is seen in `nodes`; a node missing from the view is not heard from yet
/// (suspect) and has no operator decision (active).
pub fn state_of(nodes: &[NodeView], id: u64) -> (Liveness, AdminState) {
    nodes
        .iter()
        .find(|n| n.id == id)
        .map_or((Liveness::Suspect, AdminState::Active), |n| (n.liveness, n.admin))
}

#[cfg(test)]
pub(crate) fn view(id: u64, liveness: Liveness, admin: AdminState) -> NodeView {
    NodeView {
        id,
        liveness,
        admin,
        report: crate::model::NodeReport { id, ..Default::default() },
        last_heard_ms: Some(0),
    }
}
