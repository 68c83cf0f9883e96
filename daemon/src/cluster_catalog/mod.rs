//! The cluster catalog: volume records, deletions and operators' decisions about nodes,
//! replicated by a Raft group of its own (group [`CATALOG_GROUP`]) whose replicas apply it
//! to a sled-backed state machine ([`machine`]).
//!
//! ```text
//! API call on any node ── CatalogOp ──▶ ClusterCatalog::propose
//!   │ leader here? local_write(App) : Request::CatalogPropose ──▶ catalog leader
//!   │ committed by a majority of the catalog voters, applied on every replica
//!   ▼
//! every node's replica (voter or learner) ──watch──▶ reconcile loop (cluster.rs)
//!   opens, regrows, moves and deletes its local volume replicas to match
//! ```
//!
//! Every node holds a replica: up to [`CATALOG_VOTERS_MAX`] of them vote, the rest are
//! learners, so every node answers reads from its own copy and learns changes as soon as
//! they commit. The catalog leader's node keeps that membership in shape
//! ([`plan_membership`]): new nodes become learners, and voters that are dead, drained or
//! removed are replaced by live learners. Proposals are conditional ([`op`]), so a proposal
//! retried after a lost answer cannot apply twice, and two nodes creating the same name at
//! once get one volume: the log orders them and the second finds the name taken.

pub mod machine;
pub mod settings;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftblk_replication::machine::StateMachine;
use raftblk_replication::node::{GroupStatus, MembershipChange, NodeError, ReplicationNode};
use raftblk_replication::volume::command::Command;
use raftblk_replication::wal::record::GroupId;

use self::machine::CatalogMachine;
use crate::control::{Answer, ErrorKind, RemoteError, Request};
use crate::model::{CatalogOp, Outcome, Proposal};

/// The catalog's Raft group (volume groups have odd ids).
pub const CATALOG_GROUP: GroupId = GroupId(2);
/// Most voting replicas of the catalog: five survive two failures, and more would only
/// slow every commit.
pub const CATALOG_VOTERS_MAX: usize = 5;
/// How long a proposal keeps looking for a catalog leader.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for this node's replica to apply a change the leader committed.
const LOCAL_APPLY_WAIT: Duration = Duration::from_secs(2);
/// How long one attempt at the leader waits.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a catalog change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CatalogGroupError {
    /// No catalog leader answered in time.
    #[error("the cluster catalog is unavailable: {0}")]
    Unavailable(String),
}

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
/// [`ClusterCatalog::keep_membership`]).
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

/// The catalog group as one node sees it (`GET /v1/catalog`, `raftblk status`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CatalogStatus {
    /// The catalog leader this node knows of (0: none).
    pub leader: u64,
    /// Raft term.
    pub term: u64,
    /// Voting replicas.
    pub voters: Vec<u64>,
    /// Non-voting replicas.
    pub learners: Vec<u64>,
    /// Highest committed entry known here.
    pub commit_index: u64,
    /// Highest entry this node's replica applied.
    pub applied_index: u64,
}

/// This node's handle on the catalog group.
pub struct ClusterCatalog {
    node: ReplicationNode,
    machine: Arc<CatalogMachine>,
    next_id: AtomicU64,
}

impl ClusterCatalog {
    /// Opens this node's catalog replica (`initial_voters`: the membership the group started
    /// with, for a replica that is new here).
    pub async fn open(
        node: ReplicationNode,
        machine: Arc<CatalogMachine>,
        initial_voters: Vec<u64>,
        rebuild_path: std::path::PathBuf,
    ) -> Result<ClusterCatalog, NodeError> {
        let store = raftblk_replication::machine::MachineStore { machine: machine.clone(), rebuild_path };
        node.open_machine_group(CATALOG_GROUP, initial_voters, store).await?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        // Ids only need to be unique among proposals in flight: node id in the top bits.
        let next_id = AtomicU64::new((node.node_id().0 << 48) ^ (seed & 0xFFFF_FFFF_FFFF));
        Ok(ClusterCatalog { node, machine, next_id })
    }

    /// The local replica's state.
    pub fn machine(&self) -> &Arc<CatalogMachine> {
        &self.machine
    }

    /// The replication node the catalog runs on.
    pub fn node(&self) -> &ReplicationNode {
        &self.node
    }

    /// The catalog group as this node sees it.
    pub fn status(&self) -> Option<GroupStatus> {
        self.node.status(CATALOG_GROUP)
    }

    /// [`ClusterCatalog::status`] in the API's form.
    pub fn view(&self) -> CatalogStatus {
        let mut s = self.status().unwrap_or_default();
        s.voters.sort_unstable();
        s.learners.sort_unstable();
        CatalogStatus {
            leader: s.leader,
            term: s.term,
            voters: s.voters,
            learners: s.learners,
            commit_index: s.commit_index,
            applied_index: self.machine.applied_index(),
        }
    }

    /// Commits `op` through the catalog leader and returns what applying it did, once this
    /// node's replica has applied it too (or [`LOCAL_APPLY_WAIT`] passed), so a read here
    /// right after sees it. Retries through leader changes (with the same proposal, which
    /// the ops make harmless).
    pub async fn propose(&self, op: CatalogOp) -> Result<Outcome, CatalogGroupError> {
        let proposal = Proposal { id: self.next_id.fetch_add(1, Ordering::Relaxed), op };
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut last = String::from("no catalog leader elected yet");
        loop {
            let leader = self.node.leader(CATALOG_GROUP);
            if leader != 0 {
                match self.attempt(leader, &proposal).await {
                    Ok((outcome, index)) => {
                        self.wait_applied(index).await;
                        return Ok(outcome);
                    }
                    Err(why) => last = format!("catalog leader {leader}: {why}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(CatalogGroupError::Unavailable(format!(
                    "{last}; the catalog needs a majority of its voters ({:?}) up",
                    self.status().map(|s| s.voters).unwrap_or_default()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_applied(&self, index: u64) {
        let mut changed = self.machine.subscribe();
        let waited = tokio::time::timeout(LOCAL_APPLY_WAIT, changed.wait_for(|&applied| applied >= index));
        if waited.await.is_err() {
            tracing::debug!(index, "the local catalog replica is behind; answering anyway");
        }
    }

    async fn attempt(&self, leader: u64, proposal: &Proposal) -> Result<(Outcome, u64), String> {
        if leader == self.node.node_id().0 {
            return self.propose_here(proposal).await.map_err(|e| e.to_string());
        }
        let request = Request::CatalogPropose(proposal.clone());
        match crate::control::send(&self.node, leader, &request, ATTEMPT_TIMEOUT).await {
            Ok(Answer::Catalog { outcome, index }) => Ok((outcome, index)),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Commits `proposal` through the local replica, which must lead the catalog group;
    /// returns its outcome and an index at or after its entry.
    pub async fn propose_here(&self, proposal: &Proposal) -> Result<(Outcome, u64), RemoteError> {
        let command = Command::App { data: proposal.encode() };
        let wrote =
            tokio::time::timeout(ATTEMPT_TIMEOUT, self.node.local_write(CATALOG_GROUP, vec![command]));
        match wrote.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RemoteError::from(&e)),
            Err(_) => return Err(RemoteError::new(ErrorKind::Unavailable, "the catalog commit timed out")),
        }
        // The leader acknowledges only once its own replica applied the entry.
        let index = self.machine.applied_index();
        let outcome = self.machine.take_outcome(proposal.id).ok_or_else(|| {
            RemoteError::new(ErrorKind::Internal, "the catalog recorded no outcome for the change")
        })?;
        Ok((outcome, index))
    }

    /// Runs one step of [`plan_membership`] if this node leads the catalog.
    pub async fn keep_membership(&self, nodes: &[Candidate]) {
        let me = self.node.node_id().0;
        let Some(status) = self.status() else { return };
        if !status.is_leader {
            return;
        }
        let votes_well = |id: u64| nodes.iter().any(|n| n.id == id && n.may_vote && !n.gone && n.alive);
        if !votes_well(me) {
            // A node being drained or removed should not lead the catalog: hand it on.
            if let Some(to) = status.voters.iter().find(|v| **v != me && votes_well(**v)) {
                let _ = self.node.transfer_leader(CATALOG_GROUP, *to);
            }
            return;
        }
        let caught_up = |id: u64| {
            status.progress.iter().any(|(p, matched)| *p == id && *matched + 8 >= status.commit_index)
        };
        let nodes: Vec<Candidate> =
            nodes.iter().map(|n| Candidate { caught_up: caught_up(n.id) || n.id == me, ..*n }).collect();
        if let Some(change) = plan_membership(me, &status.voters, &status.learners, &nodes) {
            tracing::info!(?change, voters = ?status.voters, learners = ?status.learners, "catalog membership change");
            if let Err(e) = self.node.change_membership(CATALOG_GROUP, change).await {
                tracing::warn!(?change, error = %e, "catalog membership change refused");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, alive: bool, gone: bool) -> Candidate {
        Candidate { id, alive, gone, may_vote: true, caught_up: true }
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
