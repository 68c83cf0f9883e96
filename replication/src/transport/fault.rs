//! Fault injection: cut a node's links to chosen peers (for partition tests).
//!
//! A [`FaultController`] belongs to one [`Transport`](super::Transport) and is checked on its
//! send path ([`Transport::send`](super::Transport::send) and again in the peer writer, for
//! what was queued before the cut) and on its receive path (every inbound frame). Blocked
//! traffic is dropped silently and counted in
//! [`TransportStats::fault_drops`](super::TransportStats::fault_drops), which is what a
//! network partition looks like to Raft. Connections stay up; healing needs no reconnect.
//!
//! To partition node A from node C it is enough to [`block`](FaultController::block) C on
//! A's controller (both directions of the A–C link are then cut at A).

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

use crate::wal::record::NodeId;

/// Shared handle that blocks and heals a transport's traffic to and from given peers.
/// Cloning gives another handle to the same state.
#[derive(Debug, Clone, Default)]
pub struct FaultController {
    state: Arc<RwLock<Blocked>>,
}

#[derive(Debug, Default)]
struct Blocked {
    outbound: HashSet<NodeId>,
    inbound: HashSet<NodeId>,
}

impl FaultController {
    /// A controller that blocks nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops everything sent to and received from `peer` until healed.
    pub fn block(&self, peer: NodeId) {
        let mut s = self.write();
        s.outbound.insert(peer);
        s.inbound.insert(peer);
    }

    /// Drops everything sent to `peer` (one-way partition).
    pub fn block_outbound(&self, peer: NodeId) {
        self.write().outbound.insert(peer);
    }

    /// Drops everything received from `peer` (one-way partition).
    pub fn block_inbound(&self, peer: NodeId) {
        self.write().inbound.insert(peer);
    }

    /// Lets traffic to and from `peer` through again.
    pub fn heal(&self, peer: NodeId) {
        let mut s = self.write();
        s.outbound.remove(&peer);
        s.inbound.remove(&peer);
    }

    /// Lets all traffic through again.
    pub fn heal_all(&self) {
        let mut s = self.write();
        s.outbound.clear();
        s.inbound.clear();
    }

    /// Whether traffic to `peer` is being dropped.
    pub fn is_outbound_blocked(&self, peer: NodeId) -> bool {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        s.outbound.contains(&peer)
    }

    /// Whether traffic from `peer` is being dropped.
    pub fn is_inbound_blocked(&self, peer: NodeId) -> bool {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        s.inbound.contains(&peer)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Blocked> {
        // The sets are always consistent, so a panic elsewhere cannot leave them half-written.
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_heal_and_one_way_cuts() {
        let f = FaultController::new();
        let g = f.clone();
        assert!(!f.is_outbound_blocked(NodeId(2)));
        g.block(NodeId(2));
        assert!(f.is_outbound_blocked(NodeId(2)) && f.is_inbound_blocked(NodeId(2)));
        assert!(!f.is_outbound_blocked(NodeId(3)));
        f.heal(NodeId(2));
        assert!(!f.is_outbound_blocked(NodeId(2)) && !f.is_inbound_blocked(NodeId(2)));
        f.block_outbound(NodeId(3));
        f.block_inbound(NodeId(4));
        assert!(f.is_outbound_blocked(NodeId(3)) && !f.is_inbound_blocked(NodeId(3)));
        assert!(f.is_inbound_blocked(NodeId(4)) && !f.is_outbound_blocked(NodeId(4)));
        f.heal_all();
        assert!(!f.is_outbound_blocked(NodeId(3)) && !f.is_inbound_blocked(NodeId(4)));
    }
}
