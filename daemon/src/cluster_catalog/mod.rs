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
//! Every node holds a replica: up to five of them vote (`CATALOG_VOTERS_MAX` in
//! [`crate::planner::catalog_members`]), the rest are learners, so every node answers reads
//! from its own copy and learns changes as soon as they commit. The catalog leader's node
//! keeps that membership in shape ([`plan_membership`]): new nodes become learners, and
//! voters that are dead, drained or removed are replaced by live learners. Proposals are
//! conditional ([`crate::model::op`]), so a proposal retried after a lost answer cannot apply
//! twice, and two nodes creating the same name at once get one volume: the log orders them
//! and the second finds the name taken.

pub mod machine;
pub mod settings;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftblk_replication::machine::StateMachine;
use raftblk_replication::node::{GroupStatus, NodeError, ReplicationNode};
use raftblk_replication::volume::command::Command;
use raftblk_replication::wal::record::GroupId;

use self::machine::CatalogMachine;
use crate::control::{Answer, ErrorKind, RemoteError, Request};
use crate::model::{CatalogOp, Outcome, Proposal};
use crate::planner::catalog_members::{plan_membership, Candidate};

/// The catalog's Raft group (volume groups have odd ids).
pub const CATALOG_GROUP: GroupId = GroupId(2);
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
