//! What the node reports about volumes and nodes: the status types the API and the CLI
//! share, and the volume manager's list, status, inspect and gauges.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use raftblk_replication::wal::record::GroupId;
use serde::{Deserialize, Serialize};

use super::{lock, Volume, VolumeError, VolumeManager};
use crate::model::{RebuildView, VolumeHealth, VolumeRecord};

/// Replication state of a volume as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ReplicationStatus {
    /// The leader this node knows of (0: none known).
    pub leader: u64,
    /// Raft term (only on voters).
    pub term: u64,
    /// Commit index (only on voters).
    pub commit_index: u64,
    /// Applied index of this node's copy (only on voters).
    pub applied_index: u64,
    /// Each voter's matched log index (only on the leader).
    pub progress: Vec<(u64, u64)>,
    /// Copies still catching up (not voting yet).
    #[serde(default)]
    pub learners: Vec<u64>,
    /// First index still in this node's log (older entries are compacted).
    #[serde(default)]
    pub log_first_index: u64,
    /// Copies being rebuilt from a snapshot, with their progress (see `VolumeManager::inspect`).
    #[serde(default)]
    pub rebuilds: Vec<RebuildView>,
}

/// A node as `GET /v1/nodes` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// Liveness, operator state, report.
    #[serde(flatten)]
    pub view: crate::model::NodeView,
    /// Volumes with a copy on it.
    pub copies: usize,
    /// Volumes it leads (as far as this node knows: the groups it is a member of).
    pub leads: usize,
}

impl RebuildView {
    pub(super) fn from_status(node: u64, r: &raftblk_replication::node::RebuildStatus) -> RebuildView {
        RebuildView {
            node,
            index: r.index,
            done_bytes: r.done_bytes,
            total_bytes: r.total_bytes,
            copied_bytes: r.copied_bytes,
            source: r.source,
            elapsed_s: r.elapsed_s,
        }
    }
}

/// A volume as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeStatus {
    /// Name and NBD export name.
    pub name: String,
    /// Stable identity.
    pub uuid: String,
    /// Provisioned size.
    pub size_bytes: u64,
    /// Bytes allocated in this node's copy (0 where the node holds none).
    pub allocated_bytes: u64,
    /// Whether clients may only read.
    pub read_only: bool,
    /// Open NBD connections on this node.
    pub connections: usize,
    /// Creation time, seconds since the epoch.
    pub created_unix_s: u64,
    /// Extra copies.
    #[serde(default)]
    pub replicas: u8,
    /// Nodes holding a copy.
    #[serde(default)]
    pub voters: Vec<u64>,
    /// healthy, degraded or rebuilding (see [`crate::planner::health::health_of`]).
    #[serde(default)]
    pub health: VolumeHealth,
    /// Operator's labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether blocks are encrypted at rest.
    #[serde(default)]
    pub encrypted: bool,
    /// Set when this node cannot serve the volume (it lacks the KEK its key is wrapped by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<String>,
    /// Raft state (cluster mode only).
    #[serde(default)]
    pub replication: Option<ReplicationStatus>,
    /// The nodes it is published to (CSI ControllerPublish).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<crate::model::Publication>,
}

impl VolumeManager {
    /// Every node with its liveness, operator state, report and the copies it holds.
    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        let (Some(dir), Some(node)) = (self.nodes.get(), &self.replication) else { return Vec::new() };
        let records = self.records();
        dir.views(&node.peer_ids())
            .into_iter()
            .map(|view| {
                let copies = records.iter().filter(|r| r.voters.contains(&view.id)).count();
                let leads = records
                    .iter()
                    .filter(|r| {
                        node.leader(GroupId(r.group_id)) == view.id && r.voters.contains(&node.node_id().0)
                    })
                    .count();
                NodeStatus { view, copies, leads }
            })
            .collect()
    }

    /// The volume's health as [`crate::planner::health::health_of`] judges it from this
    /// node's view of the nodes and the group status `repl`.
    pub(super) fn health_of(&self, r: &VolumeRecord, repl: Option<&ReplicationStatus>) -> VolumeHealth {
        let now = std::time::Instant::now();
        let copying = repl.is_some_and(|s| !s.learners.is_empty() || !s.rebuilds.is_empty());
        match self.nodes.get() {
            Some(dir) => {
                let state = |id| (dir.table.liveness(id, now), dir.table.admin(id));
                crate::planner::health::health_of(r, Some(&state), copying)
            }
            None => crate::planner::health::health_of(r, None, copying),
        }
    }

    /// Every volume, ordered by name.
    pub fn list(&self) -> Vec<VolumeStatus> {
        let volumes: Vec<Arc<Volume>> = lock(&self.open).values().cloned().collect();
        let mut out: Vec<VolumeStatus> = volumes.iter().map(|v| self.status_of(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every record (for peers' catalog sync).
    pub fn records(&self) -> Vec<VolumeRecord> {
        lock(&self.open).values().map(|v| lock(&v.record).clone()).collect()
    }

    /// One volume.
    pub fn status(&self, name: &str) -> Result<VolumeStatus, VolumeError> {
        let v = self.get(name)?;
        Ok(self.status_of(&v))
    }

    /// One volume, with the rebuild progress of every copy (see `group_statuses`). The local
    /// part is read after the peers answered, so it is never older than theirs.
    pub async fn inspect(&self, name: &str) -> Result<VolumeStatus, VolumeError> {
        let first = self.status(name)?;
        let Some(node) = &self.replication else { return Ok(first) };
        let Some(repl) = first.replication.as_ref() else { return Ok(first) };
        let me = node.node_id().0;
        let group_id = lock(&self.get(name)?.record).group_id;
        let mut members: Vec<u64> = first.voters.iter().chain(&repl.learners).copied().collect();
        members.extend(repl.progress.iter().map(|(id, _)| *id));
        members.sort_unstable();
        members.dedup();
        members.retain(|m| *m != me);
        let remote: Vec<RebuildView> = self
            .group_statuses(group_id, &members)
            .await
            .into_iter()
            .filter_map(|(member, g)| {
                let mut r = g.rebuild?;
                r.node = member;
                Some(r)
            })
            .collect();
        let mut status = self.status(name)?;
        if !remote.is_empty() && status.health == VolumeHealth::Healthy {
            status.health = VolumeHealth::Rebuilding;
        }
        if let Some(repl) = status.replication.as_mut() {
            repl.rebuilds.extend(remote);
        }
        Ok(status)
    }

    pub(super) fn status_of(&self, v: &Volume) -> VolumeStatus {
        let r = lock(&v.record).clone();
        let replication = self.replication.as_ref().map(|node| {
            let group = GroupId(r.group_id);
            match node.status(group) {
                Some(s) => ReplicationStatus {
                    leader: s.leader,
                    term: s.term,
                    commit_index: s.commit_index,
                    applied_index: s.applied_index,
                    progress: s.progress,
                    learners: s.learners,
                    log_first_index: s.first_index,
                    rebuilds: s
                        .rebuild
                        .iter()
                        .map(|r| RebuildView::from_status(node.node_id().0, r))
                        .collect(),
                },
                None => ReplicationStatus { leader: node.leader(group), ..Default::default() },
            }
        });
        let health = self.health_of(&r, replication.as_ref());
        VolumeStatus {
            health,
            name: r.name,
            uuid: r.uuid,
            size_bytes: v.size.load(Ordering::SeqCst),
            allocated_bytes: v.file.as_ref().and_then(|f| f.allocated_bytes().ok()).unwrap_or(0),
            read_only: r.read_only,
            connections: v.connections.load(Ordering::SeqCst),
            created_unix_s: r.created_unix_s,
            replicas: r.replicas,
            voters: r.voters,
            labels: r.labels,
            encrypted: r.encrypted,
            locked: v.locked(),
            replication,
            publications: r.publications,
        }
    }

    /// Refreshes the allocated-bytes gauges (called when `/metrics` is scraped).
    pub fn refresh_gauges(&self) {
        let volumes: Vec<Arc<Volume>> = lock(&self.open).values().cloned().collect();
        for v in volumes {
            let VolumeStatus { name, health, allocated_bytes, .. } = self.status_of(&v);
            for h in [VolumeHealth::Healthy, VolumeHealth::Rebuilding, VolumeHealth::Degraded] {
                self.metrics.volume_health.with_label_values(&[&name, h.label()]).set(i64::from(h == health));
            }
            self.metrics.volume_allocated.with_label_values(&[&name]).set(allocated_bytes as i64);
            let status =
                self.replication.as_ref().and_then(|node| node.status(GroupId(lock(&v.record).group_id)));
            if let Some(s) = status {
                let raft = &self.metrics.volume_raft;
                raft.with_label_values(&[&name, "commit"]).set(s.commit_index as i64);
                raft.with_label_values(&[&name, "applied"]).set(s.applied_index as i64);
                raft.with_label_values(&[&name, "log_first"]).set(s.first_index as i64);
                let remaining = s.rebuild.map_or(0, |r| r.total_bytes.saturating_sub(r.done_bytes).max(1));
                self.metrics.volume_rebuild_remaining.with_label_values(&[&name]).set(remaining as i64);
            }
        }
        if let Some(catalog) = self.cluster_catalog() {
            let c = catalog.view();
            let m = &self.metrics;
            m.catalog_raft.with_label_values(&["commit"]).set(c.commit_index as i64);
            m.catalog_raft.with_label_values(&["applied"]).set(c.applied_index as i64);
            m.catalog_members.with_label_values(&["voter"]).set(c.voters.len() as i64);
            m.catalog_members.with_label_values(&["learner"]).set(c.learners.len() as i64);
            m.catalog_leader.set(i64::from(c.leader != 0 && Some(c.leader) == self.node_id()));
        }
    }
}
