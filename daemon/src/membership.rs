//! Which nodes form the cluster, kept in `<data_dir>/cluster.json` so that it outlives
//! restarts, and kept equal to the peer transport's view while the node runs.
//!
//! A node learns members three ways: the static `cluster.peers` list (laid over the
//! file at every start; the configuration wins for an id it names), the answer to its
//! own `--join` (every member the answering node knows), and, while it runs, other
//! members telling it about a node that joined through them ([`crate::cluster`]'s
//! `AddPeer`, and the `Members` pull of the sync loop for members that were down when
//! that was sent). The file is rewritten (write, fsync, rename) on every change, before
//! the change is acknowledged, so a member that answered a join still knows the new node
//! after a crash.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use raftblk_replication::node::ReplicationNode;
use serde::{Deserialize, Serialize};

use crate::config::PeerSetting;
use crate::model::Member;

/// The file under the data directory that holds the membership.
pub const MEMBERSHIP_FILE: &str = "cluster.json";

/// The body of `POST /v1/cluster/join`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The joining node's id.
    pub node_id: u64,
    /// The joining node's peer address.
    pub peer_addr: SocketAddr,
}

/// The answer to a join: the cluster id for the transport handshake and every member,
/// the answering node and the joiner included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// The cluster's transport id.
    pub cluster_id: u64,
    /// Every member, by id.
    pub members: Vec<Member>,
    /// The voters the cluster catalog's Raft group started with (see
    /// [`Membership::catalog_voters`]).
    #[serde(default)]
    pub catalog_voters: Vec<u64>,
}

/// What [`Membership::add`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new member.
    Added,
    /// A known member at a new address (the old one given).
    Moved(SocketAddr),
    /// Already known at that address.
    Unchanged,
}

/// Why the membership could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file does not decode.
    #[error("{path} is corrupt ({message}); fix it or remove it and restart with --join or --peers")]
    Corrupt { path: PathBuf, message: String },
    /// The file cannot be written.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The data directory belongs to another node id.
    #[error("{path} says this data directory belongs to node {stored}, but this node is configured as node {configured}; use --node-id {stored} or another data directory")]
    OtherNode { path: PathBuf, stored: u64, configured: u64 },
    /// The change names this node itself, or id 0.
    #[error("{0}")]
    Invalid(String),
    /// The running transport refused the peer.
    #[error("cannot add peer {id} to the transport: {message}")]
    Transport { id: u64, message: String },
}

/// What the file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    cluster_id: u64,
    node_id: u64,
    peers: Vec<Member>,
    #[serde(default)]
    catalog_voters: Vec<u64>,
}

/// The membership of this node's cluster; see the [module docs](self).
pub struct Membership {
    path: PathBuf,
    node_id: u64,
    state: Mutex<State>,
    /// The running replication node, whose transport every change is applied to.
    node: OnceLock<ReplicationNode>,
}

struct State {
    cluster_id: u64,
    peers: BTreeMap<u64, SocketAddr>,
    /// The catalog group's first voters (empty until known).
    catalog_voters: Vec<u64>,
    /// Whether the file existed (a node that was a member before).
    stored: bool,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update replaces whole fields after the file is written: a poisoned lock
    // still holds a consistent state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Membership {
    /// Loads `<data_dir>/cluster.json`, or starts empty with `default_cluster_id` when the
    /// node has never been a cluster member.
    pub fn open(
        data_dir: &Path,
        node_id: u64,
        default_cluster_id: u64,
    ) -> Result<Membership, MembershipError> {
        let path = data_dir.join(MEMBERSHIP_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => {
                let stored: Stored = serde_json::from_slice(&bytes)
                    .map_err(|e| MembershipError::Corrupt { path: path.clone(), message: e.to_string() })?;
                if stored.node_id != node_id {
                    return Err(MembershipError::OtherNode {
                        path,
                        stored: stored.node_id,
                        configured: node_id,
                    });
                }
                State {
                    cluster_id: stored.cluster_id,
                    peers: stored
                        .peers
                        .iter()
                        .filter(|m| m.id != node_id)
                        .map(|m| (m.id, m.peer_addr))
                        .collect(),
                    catalog_voters: stored.catalog_voters,
                    stored: true,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                cluster_id: default_cluster_id,
                peers: BTreeMap::new(),
                catalog_voters: Vec::new(),
                stored: false,
            },
            Err(source) => return Err(MembershipError::Read { path, source }),
        };
        Ok(Membership { path, node_id, state: Mutex::new(state), node: OnceLock::new() })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The transport's cluster id.
    pub fn cluster_id(&self) -> u64 {
        lock(&self.state).cluster_id
    }

    /// Whether this node was a cluster member before this start (the file existed).
    pub fn was_member(&self) -> bool {
        lock(&self.state).stored
    }

    /// Every other member, by id.
    pub fn peers(&self) -> Vec<Member> {
        lock(&self.state).peers.iter().map(|(&id, &peer_addr)| Member { id, peer_addr }).collect()
    }

    /// The voters the cluster catalog's Raft group started with: learned from the join
    /// answer, or, in a cluster started from a static peer list, the lowest ids of this node
    /// and its peers (every node computes the same). Fixed once written: a replica of the
    /// catalog that is new on a node starts from this membership and replays the log.
    pub fn catalog_voters(&self) -> Result<Vec<u64>, MembershipError> {
        let mut state = lock(&self.state);
        if state.catalog_voters.is_empty() {
            let ids = state.peers.keys().copied().chain(std::iter::once(self.node_id)).collect();
            let voters = crate::planner::catalog_members::initial_voters(ids);
            self.write(state.cluster_id, &state.peers, &voters)?;
            state.catalog_voters = voters;
            state.stored = true;
        }
        Ok(state.catalog_voters.clone())
    }

    /// From now on, applies every change to `node`'s transport too.
    pub fn attach(&self, node: ReplicationNode) {
        let _ = self.node.set(node);
    }

    /// The replication node, once attached.
    pub fn node(&self) -> Option<&ReplicationNode> {
        self.node.get()
    }

    /// Lays the static `cluster.peers` over the stored members: the configuration wins
    /// for the ids it names, members learned by joins stay.
    pub fn merge_static(&self, peers: &[PeerSetting]) -> Result<(), MembershipError> {
        let mut state = lock(&self.state);
        let mut next = state.peers.clone();
        for p in peers {
            next.insert(p.id, p.addr);
        }
        next.remove(&self.node_id);
        if next != state.peers {
            self.write(state.cluster_id, &next, &state.catalog_voters)?;
            state.peers = next;
            state.stored = true;
        }
        Ok(())
    }

    /// Takes the answer to this node's join: the cluster id and every other member.
    pub fn adopt(&self, answer: &JoinAnswer) -> Result<(), MembershipError> {
        let mut state = lock(&self.state);
        let mut next = state.peers.clone();
        for m in &answer.members {
            if m.id != self.node_id && m.id != 0 {
                next.insert(m.id, m.peer_addr);
            }
        }
        let voters = if state.catalog_voters.is_empty() {
            answer.catalog_voters.clone()
        } else {
            state.catalog_voters.clone()
        };
        if next != state.peers
            || answer.cluster_id != state.cluster_id
            || !state.stored
            || voters != state.catalog_voters
        {
            self.write(answer.cluster_id, &next, &voters)?;
            state.peers = next;
            state.catalog_voters = voters;
            state.cluster_id = answer.cluster_id;
            state.stored = true;
        }
        Ok(())
    }

    /// Adds member `id` at `addr` (or moves it there): persisted first, then applied to
    /// the running transport.
    pub fn add(&self, id: u64, addr: SocketAddr) -> Result<Change, MembershipError> {
        if id == 0 {
            return Err(MembershipError::Invalid("node id 0 is reserved; use 1 or more".into()));
        }
        if id == self.node_id {
            return Err(MembershipError::Invalid(format!("node id {id} is this node's own id")));
        }
        let change = {
            let mut state = lock(&self.state);
            let change = match state.peers.get(&id) {
                None => Change::Added,
                Some(&old) if old == addr => Change::Unchanged,
                Some(&old) => Change::Moved(old),
            };
            if change != Change::Unchanged {
                let mut next = state.peers.clone();
                next.insert(id, addr);
                self.write(state.cluster_id, &next, &state.catalog_voters)?;
                state.peers = next;
                state.stored = true;
            }
            change
        };
        if let Some(node) = self.node.get() {
            // Also for Unchanged: cheap, and repairs a transport that missed it.
            node.add_peer(id, addr).map_err(|e| MembershipError::Transport { id, message: e.to_string() })?;
        }
        match change {
            Change::Added => tracing::info!(peer = id, %addr, "new cluster member"),
            Change::Moved(old) => tracing::info!(peer = id, %old, new = %addr, "cluster member moved"),
            Change::Unchanged => {}
        }
        Ok(change)
    }

    /// The member holding `addr`, if any.
    pub fn member_at(&self, addr: SocketAddr) -> Option<u64> {
        lock(&self.state).peers.iter().find(|(_, &a)| a == addr).map(|(&id, _)| id)
    }

    /// Where member `id` is, if known.
    pub fn addr_of(&self, id: u64) -> Option<SocketAddr> {
        lock(&self.state).peers.get(&id).copied()
    }

    /// Writes the file atomically: a crash leaves the old or the new list, never half.
    fn write(
        &self,
        cluster_id: u64,
        peers: &BTreeMap<u64, SocketAddr>,
        catalog_voters: &[u64],
    ) -> Result<(), MembershipError> {
        let stored = Stored {
            cluster_id,
            node_id: self.node_id,
            peers: peers.iter().map(|(&id, &peer_addr)| Member { id, peer_addr }).collect(),
            catalog_voters: catalog_voters.to_vec(),
        };
        let err = |source| MembershipError::Write { path: self.path.clone(), source };
        let mut text = serde_json::to_vec_pretty(&stored).map_err(|e| err(std::io::Error::other(e)))?;
        text.push(b'\n');
        raftblk_replication::durable_file::write(&self.path, &text).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn joins_and_static_peers_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = Membership::open(dir.path(), 3, 7).unwrap();
        assert!(!m.was_member());
        assert!(m.peers().is_empty());
        m.merge_static(&[]).unwrap();
        assert!(!dir.path().join(MEMBERSHIP_FILE).exists(), "nothing to remember, nothing written");
        let answer = JoinAnswer {
            cluster_id: 9,
            members: vec![
                Member { id: 1, peer_addr: addr(1) },
                Member { id: 2, peer_addr: addr(2) },
                Member { id: 3, peer_addr: addr(3) },
            ],
            catalog_voters: vec![1, 2],
        };
        m.adopt(&answer).unwrap();
        assert_eq!(m.add(4, addr(4)).unwrap(), Change::Added);
        assert_eq!(m.add(4, addr(4)).unwrap(), Change::Unchanged);
        assert_eq!(m.add(4, addr(44)).unwrap(), Change::Moved(addr(4)));
        assert!(m.add(3, addr(5)).is_err(), "own id");
        assert!(m.add(0, addr(5)).is_err(), "id 0");

        let again = Membership::open(dir.path(), 3, 7).unwrap();
        assert!(again.was_member());
        assert_eq!(again.cluster_id(), 9);
        let ids: Vec<(u64, SocketAddr)> = again.peers().iter().map(|m| (m.id, m.peer_addr)).collect();
        assert_eq!(ids, vec![(1, addr(1)), (2, addr(2)), (4, addr(44))]);
        // The configuration wins for the ids it names; joined members stay.
        again.merge_static(&[PeerSetting { id: 1, addr: addr(11) }]).unwrap();
        assert_eq!(again.addr_of(1), Some(addr(11)));
        assert_eq!(again.member_at(addr(44)), Some(4));
        // The catalog's first voters come from the join answer and never change.
        assert_eq!(again.catalog_voters().unwrap(), vec![1, 2]);

        let e = Membership::open(dir.path(), 5, 7).err().unwrap().to_string();
        assert!(e.contains("belongs to node 3"), "{e}");
        std::fs::write(dir.path().join(MEMBERSHIP_FILE), b"{").unwrap();
        let e = Membership::open(dir.path(), 3, 7).err().unwrap().to_string();
        assert!(e.contains("corrupt"), "{e}");
    }
}
