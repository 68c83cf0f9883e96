//! Which node acts for the cluster: heals, spreads leaders and starts background scrubs.

use crate::model::{AdminState, Liveness, NodeView};

/// Whether `me` acts: it is the lowest id in `nodes` (this node's view, itself included)
/// that is alive and not removed. Two nodes may both think so for a moment (views differ during a partition),
/// which is safe: every step they take goes through a Raft group.
pub fn is_acting(me: u64, nodes: &[NodeView]) -> bool {
    let lowest = nodes
        .iter()
        .filter(|n| n.liveness == Liveness::Alive && n.admin != AdminState::Removed)
        .map(|n| n.id)
        .min();
    lowest == Some(me)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::view;

    #[test]
    fn the_lowest_live_node_that_is_not_removed_acts() {
        use AdminState::*;
        use Liveness::*;
        let nodes = [view(1, Alive, Active), view(2, Alive, Active), view(3, Alive, Active)];
        assert!(is_acting(1, &nodes));
        assert!(!is_acting(2, &nodes));
        let one_dead = [view(1, Dead, Active), view(2, Alive, Active), view(3, Alive, Active)];
        assert!(is_acting(2, &one_dead), "a dead node does not act");
        let suspect = [view(1, Suspect, Active), view(2, Alive, Active)];
        assert!(is_acting(2, &suspect), "nor one not heard from lately");
        let removed = [view(1, Alive, Removed), view(2, Alive, Active)];
        assert!(is_acting(2, &removed), "nor a removed one");
        let draining = [view(1, Alive, Draining), view(2, Alive, Active)];
        assert!(!is_acting(2, &draining), "a draining node still acts");
        assert!(is_acting(5, &[view(5, Alive, Active)]), "a node that sees no one else acts");
        assert!(
            !is_acting(2, &[view(1, Dead, Active), view(2, Alive, Removed)]),
            "a removed node never acts"
        );
    }
}
