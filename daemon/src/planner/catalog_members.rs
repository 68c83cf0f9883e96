//! Who holds a replica of the cluster catalog and who votes in it: the first voters of a
//! new cluster, and the next membership change the catalog leader makes, one at a time.

use raftblk_replication::node::MembershipChange;

use crate::model::{AdminState, Liveness, NodeView};

/// Most voting replicas of the catalog: five survive two failures, and more would only
/// slow every commit.
pub const CATALOG_VOTERS_MAX: usize = 5;
/// The first voters of a new cluster's catalog: the lowest ids of the nodes it starts with
/// (every node computes the same list from the same peer list).
pub fn initial_voters(mut ids: Vec<u64>) -> Vec<u64> {
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(CATALOG_VOTERS_MAX);
    ids
}

/// This node's view of a node, as [`plan_membership`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Node id.
    pub id: u64,
    /// Alive (heard from recently).
    pub alive: bool,
    /// Dead past the timeout, or removed by an operator: holds no catalog replica.
    pub gone: bool,
    /// May hold a vote (not cordoned or draining): a node that should not take new
    /// replicas should not be relied on for the catalog's quorum either.
    pub may_vote: bool,
    /// Its catalog replica is caught up with the leader.
    pub caught_up: bool,
}

/// The next membership change of the catalog group (one at a time), or `None` when it is
/// in shape. `voters`/`learners` as the leader sees them; `me` is the leader, which never
/// plans its own removal (it hands leadership away first, see
/// `cluster_catalog::ClusterCatalog::keep_membership`).
pub fn plan_membership(
    me: u64,
    voters: &[u64],
    learners: &[u64],
    nodes: &[Candidate],
) -> Option<MembershipChange> {
    let node = |id: u64| nodes.iter().find(|n| n.id == id);
    let known = |id: u64| voters.contains(&id) || learners.contains(&id);
    let votes_well = |id: u64| node(id).is_some_and(|n| n.may_vote && !n.gone);
    // Every member of the cluster gets a replica, to answer reads and stand by as a voter.
    if let Some(n) = nodes.iter().find(|n| !n.gone && !known(n.id)) {
        return Some(MembershipChange::AddLearner(n.id));
    }
    let good_voters = voters.iter().filter(|v| votes_well(**v)).count();
    let target = nodes.iter().filter(|n| n.may_vote && !n.gone).count().min(CATALOG_VOTERS_MAX);
    if good_voters < target {
        let best = nodes
            .iter()
            .filter(|n| learners.contains(&n.id) && n.alive && n.caught_up && votes_well(n.id))
            .min_by_key(|n| n.id);
        if let Some(n) = best {
            return Some(MembershipChange::Promote(n.id));
        }
    }
    // A voter that should not vote leaves once its replacement votes, or when there is no
    // replacement to wait for (then removing it lowers the quorum it is not part of). A dead
    // one stays while it is one of three or fewer voters: two voters need both, just as three
    // with one dead need the other two, so removing it gains nothing, and it votes again the
    // moment it returns. Operators' removals and drains go through regardless.
    if let Some(v) = voters.iter().find(|v| **v != me && !votes_well(**v)) {
        let wanted_out = node(*v).is_none_or(|n| !n.may_vote);
        let replaced = good_voters >= target || voters.len() > CATALOG_VOTERS_MAX;
        if replaced && (voters.len() > 3 || wanted_out) {
            return Some(MembershipChange::Remove(*v));
        }
    }
    if let Some(l) = learners.iter().find(|l| node(**l).is_none_or(|n| n.gone)) {
        return Some(MembershipChange::Remove(*l));
    }
    None
}

/// Every node in `nodes` as [`plan_membership`] sees it (`caught_up` is filled in by the
/// catalog leader from its progress).
pub fn candidates(nodes: &[NodeView]) -> Vec<Candidate> {
    nodes
        .iter()
        .map(|n| Candidate {
            id: n.id,
            alive: n.liveness == Liveness::Alive,
            gone: n.liveness == Liveness::Dead || n.admin == AdminState::Removed,
            may_vote: !n.admin.evicts_copies(),
            caught_up: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, alive: bool, gone: bool) -> Candidate {
        Candidate { id, alive, gone, may_vote: true, caught_up: true }
    }

    #[test]
    fn candidates_say_who_may_vote_and_who_is_gone() {
        use crate::planner::view;
        let nodes = [
            view(1, Liveness::Alive, AdminState::Active),
            view(2, Liveness::Dead, AdminState::Active),
            view(3, Liveness::Suspect, AdminState::Cordoned),
            view(4, Liveness::Alive, AdminState::Draining),
            view(5, Liveness::Alive, AdminState::Removed),
        ];
        let c = candidates(&nodes);
        let row = |i: usize| (c[i].alive, c[i].gone, c[i].may_vote);
        assert_eq!(row(0), (true, false, true));
        assert_eq!(row(1), (false, true, true));
        assert_eq!(row(2), (false, false, true), "a cordoned node keeps its vote");
        assert_eq!(row(3), (true, false, false), "a draining one does not");
        assert_eq!(row(4), (true, true, false));
        assert!(c.iter().all(|c| !c.caught_up));
    }

    #[test]
    fn initial_voters_are_the_lowest_five() {
        assert_eq!(initial_voters(vec![7, 3, 1, 9, 2, 5, 3]), vec![1, 2, 3, 5, 7]);
        assert_eq!(initial_voters(vec![2, 1]), vec![1, 2]);
    }

    #[test]
    fn new_nodes_become_learners_then_voters_up_to_five() {
        let nodes: Vec<Candidate> = (1..=7).map(|i| node(i, true, false)).collect();
        assert_eq!(plan_membership(1, &[1, 2, 3], &[], &nodes), Some(MembershipChange::AddLearner(4)));
        assert_eq!(plan_membership(1, &[1, 2, 3], &[4, 5, 6, 7], &nodes), Some(MembershipChange::Promote(4)));
        assert_eq!(plan_membership(1, &[1, 2, 3, 4, 5], &[6, 7], &nodes), None);
    }

    #[test]
    fn a_gone_voter_is_replaced_before_it_is_removed() {
        let mut nodes: Vec<Candidate> = (1..=6).map(|i| node(i, true, false)).collect();
        nodes[1] = node(2, false, true);
        assert_eq!(plan_membership(1, &[1, 2, 3, 4, 5], &[6], &nodes), Some(MembershipChange::Promote(6)));
        assert_eq!(plan_membership(1, &[1, 2, 3, 4, 5, 6], &[], &nodes), Some(MembershipChange::Remove(2)));
        // A learner that is not caught up is not promoted, and the dead voter stays until
        // one is (removing it would leave four voters where five are possible).
        let mut lagging = nodes.clone();
        lagging[5].caught_up = false;
        assert_eq!(plan_membership(1, &[1, 2, 3, 4, 5], &[6], &lagging), None);
        // With no learner to promote, the dead voter goes (3 good voters of 3 possible).
        let small =
            vec![node(1, true, false), node(2, false, true), node(3, true, false), node(4, true, false)];
        assert_eq!(plan_membership(1, &[1, 2, 3, 4], &[], &small), Some(MembershipChange::Remove(2)));
        // Three voters, one dead, nobody to promote: it keeps its vote (removing it would
        // leave two voters that need each other, and it votes again when it returns).
        let three = vec![node(1, true, false), node(2, false, true), node(3, true, false)];
        assert_eq!(plan_membership(1, &[1, 2, 3], &[], &three), None);
        // A gone learner is dropped.
        assert_eq!(plan_membership(1, &[1, 3, 4], &[2], &small), Some(MembershipChange::Remove(2)));
        // The leader never plans its own removal.
        let me_gone = vec![node(1, true, true), node(2, true, false), node(3, true, false)];
        assert_eq!(plan_membership(1, &[1, 2, 3], &[], &me_gone), None);
    }

    #[test]
    fn a_draining_voter_becomes_a_learner() {
        let mut nodes: Vec<Candidate> = (1..=4).map(|i| node(i, true, false)).collect();
        nodes[2].may_vote = false;
        // Node 4 takes the vote first, then node 3 leaves the voters and comes back as a
        // learner (it still serves reads).
        assert_eq!(plan_membership(1, &[1, 2, 3], &[4], &nodes), Some(MembershipChange::Promote(4)));
        assert_eq!(plan_membership(1, &[1, 2, 3, 4], &[], &nodes), Some(MembershipChange::Remove(3)));
        assert_eq!(plan_membership(1, &[1, 2, 4], &[], &nodes), Some(MembershipChange::AddLearner(3)));
        assert_eq!(plan_membership(1, &[1, 2, 4], &[3], &nodes), None);
    }
}
