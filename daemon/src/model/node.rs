//! Nodes as the cluster sees them: liveness, operators' decisions, what a node reports
//! about itself, its catalog registration and its place in the member list.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Whether a node is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Heard from recently.
    Alive,
    /// Missed a few heartbeats (or not heard from since this node started).
    Suspect,
    /// Silent for longer than the dead timeout: its copies are replaced.
    Dead,
}

/// What operators decided about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    /// Takes new copies.
    #[default]
    Active,
    /// Keeps its copies, takes no new ones.
    Cordoned,
    /// Takes no new copies; its copies are being moved away.
    Draining,
    /// Out of the cluster: holds no copies, takes none (it may be shut down).
    Removed,
}

impl AdminState {
    /// Whether new copies may be placed on such a node.
    pub fn takes_copies(self) -> bool {
        self == AdminState::Active
    }

    /// Whether copies on such a node must move away.
    pub fn evicts_copies(self) -> bool {
        matches!(self, AdminState::Draining | AdminState::Removed)
    }
}

/// One operator decision, with the generation that orders it against others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminEntry {
    /// The decision.
    pub state: AdminState,
    /// Higher wins; a new decision takes the highest generation known plus one.
    pub generation: u64,
}

/// What a node says about itself in each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeReport {
    /// Node id.
    pub id: u64,
    /// Its zone label (`cluster.zone`; empty: none).
    #[serde(default)]
    pub zone: String,
    /// Size of the file system holding its data directory.
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Free bytes on it.
    #[serde(default)]
    pub free_bytes: u64,
    /// Its HTTP API address.
    #[serde(default)]
    pub api_addr: String,
    /// Its other labels (`cluster.labels`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[cfg(test)]
impl NodeReport {
    /// A report for tests: node `id` in `zone` with 100 GiB of which `free_gib` free.
    pub(crate) fn sample(id: u64, zone: &str, free_gib: u64) -> NodeReport {
        NodeReport {
            id,
            zone: zone.into(),
            capacity_bytes: 100 << 30,
            free_bytes: free_gib << 30,
            ..Default::default()
        }
    }
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: u64,
    /// Heard from or not.
    pub liveness: Liveness,
    /// Operator decision.
    pub admin: AdminState,
    /// What it last reported (defaults if never heard from).
    pub report: NodeReport,
    /// Milliseconds since it was last heard from (`None`: never, since this node started).
    pub last_heard_ms: Option<u64>,
}

/// A node as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its report: id, zone, labels, capacity, free space, API address.
    pub report: NodeReport,
    /// Where its peers reach it.
    pub peer_addr: String,
}

/// One node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Node id.
    pub id: u64,
    /// Its `cluster.peer_listen` address.
    pub peer_addr: SocketAddr,
}
