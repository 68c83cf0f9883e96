//! A volume's Raft group as one node sees it, as control answers carry it, and the changes
//! to its members.

use serde::{Deserialize, Serialize};

/// A copy being rebuilt from its peers (snapshot streaming).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RebuildView {
    /// The node whose copy is rebuilt.
    pub node: u64,
    /// Snapshot index the copy is taken at.
    pub index: u64,
    /// Bytes of the volume covered so far.
    pub done_bytes: u64,
    /// The volume's size.
    pub total_bytes: u64,
    /// Bytes of data transferred (holes cost nothing).
    pub copied_bytes: u64,
    /// The node the last chunk came from.
    pub source: u64,
    /// Seconds since the copy (re)started.
    pub elapsed_s: u64,
}

/// A change to a volume group's members.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    /// The node joins as a learner (receives the log, does not vote).
    AddLearner,
    /// The learner becomes a voter.
    Promote,
    /// The node leaves the group.
    Remove,
}

impl MembershipChange {
    /// Whether a group whose members are `voters` and `learners` shows this change made
    /// for `node`.
    pub fn took_effect(self, node: u64, voters: &[u64], learners: &[u64]) -> bool {
        match self {
            MembershipChange::AddLearner => learners.contains(&node) || voters.contains(&node),
            MembershipChange::Promote => voters.contains(&node),
            MembershipChange::Remove => !voters.contains(&node) && !learners.contains(&node),
        }
    }
}

impl std::fmt::Display for MembershipChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MembershipChange::AddLearner => "add_learner",
            MembershipChange::Promote => "promote",
            MembershipChange::Remove => "remove",
        })
    }
}

/// A volume group as the answering node sees it (the answer to `GroupStatus`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct GroupView {
    /// Leader known (0: none).
    pub leader: u64,
    /// Commit index.
    pub commit_index: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Matched index per node (leader only).
    pub progress: Vec<(u64, u64)>,
    /// This node's copy is being rebuilt from a snapshot.
    #[serde(default)]
    pub rebuild: Option<RebuildView>,
    /// NBD connections to the volume on the answering node.
    #[serde(default)]
    pub connections: usize,
}

impl GroupView {
    /// `node`'s matched index as the leader reports it (0: not known to the leader yet).
    pub fn matched(&self, node: u64) -> u64 {
        self.progress.iter().find(|p| p.0 == node).map_or(0, |p| p.1)
    }

    /// Whether `node`'s log is at most `slack` entries behind the commit index.
    pub fn caught_up(&self, node: u64, slack: u64) -> bool {
        self.matched(node) >= self.commit_index.saturating_sub(slack)
    }
}

/// What a `WaitGroup` request waits for, judged on the answering node's view of the group.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WaitCondition {
    /// (At the leader) `node`'s matched index is at most `slack` behind the commit index.
    CaughtUp {
        /// The learner.
        node: u64,
        /// Entries it may trail by.
        slack: u64,
    },
    /// (At the node holding the copy) its copy is not being copied from a snapshot, and it
    /// has heard of a commit.
    Copied,
    /// (At the leader) the membership change shows for `node`.
    Changed {
        /// The change.
        change: MembershipChange,
        /// The node it is for.
        node: u64,
    },
    /// `node` no longer leads.
    LeaderNot {
        /// The leader that should hand over.
        node: u64,
    },
}

impl WaitCondition {
    /// Whether the condition holds in `view` (the view of node `me`). A condition that
    /// needs the leader's view also ends when `me` stops leading: the waiter then looks for
    /// the leader again.
    pub fn holds(self, me: u64, view: &GroupView) -> bool {
        let leads = view.leader == me;
        match self {
            WaitCondition::CaughtUp { node, slack } => !leads || view.caught_up(node, slack),
            WaitCondition::Copied => view.rebuild.is_none() && view.commit_index > 0,
            WaitCondition::Changed { change, node } => {
                !leads || change.took_effect(node, &view.voters, &view.learners)
            }
            WaitCondition::LeaderNot { node } => view.leader != node,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_conditions_hold_when_the_view_shows_them_or_the_answerer_stops_leading() {
        let view = GroupView {
            leader: 1,
            commit_index: 100,
            voters: vec![1, 2],
            learners: vec![3],
            progress: vec![(1, 100), (2, 100), (3, 83)],
            ..GroupView::default()
        };
        assert!(!WaitCondition::CaughtUp { node: 3, slack: 16 }.holds(1, &view));
        assert!(WaitCondition::CaughtUp { node: 3, slack: 17 }.holds(1, &view));
        assert!(WaitCondition::CaughtUp { node: 3, slack: 0 }.holds(2, &view), "node 2 does not lead");
        let change = |change| WaitCondition::Changed { change, node: 3 };
        assert!(change(MembershipChange::AddLearner).holds(1, &view));
        assert!(!change(MembershipChange::Promote).holds(1, &view));
        assert!(!change(MembershipChange::Remove).holds(1, &view));
        assert!(WaitCondition::LeaderNot { node: 2 }.holds(1, &view));
        assert!(!WaitCondition::LeaderNot { node: 1 }.holds(1, &view));
        assert!(WaitCondition::Copied.holds(3, &view));
        let copying = GroupView { rebuild: Some(RebuildView::default()), ..view.clone() };
        assert!(!WaitCondition::Copied.holds(3, &copying));
        let empty = GroupView { commit_index: 0, ..view };
        assert!(!WaitCondition::Copied.holds(3, &empty), "a copy that heard of no commit knows nothing yet");
    }
}
