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
