//! Node lifecycle: which nodes are alive (heartbeats), what operators decided about them
//! (cordon, drain, remove), and where new copies go (placement).
//!
//! Every node sends a heartbeat to every peer each [`HEARTBEAT_INTERVAL`] carrying its
//! report (zone, capacity, free space) and its table of operator decisions; the answer
//! carries the peer's. A node not heard from for [`LivenessTiming::suspect_after`] is
//! *suspect* (shown, nothing done), and after [`LivenessTiming::dead_after`] *dead*: its
//! copies get replaced (see `crate::healer`). Operator decisions are merged
//! last-writer-wins by a generation number, so they reach every node, including one that
//! was down when they were made, and survive restarts (`<data_dir>/nodes.json`).
//!
//! The logic here is pure (the caller passes the clock), so it is unit-tested without
//! processes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::model::{AdminEntry, AdminState, Liveness, NodeReport, NodeView};

/// How often a node sends its heartbeat to every peer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// File under the data directory holding the operator decisions.
pub const NODES_FILE: &str = "nodes.json";

/// When silence makes a node suspect, then dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTiming {
    /// Suspect after this long without a heartbeat.
    pub suspect_after: Duration,
    /// Dead after this long.
    pub dead_after: Duration,
}

/// Why an operator decision was refused or could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No such node.
    #[error("no node {0}; `raftblk node list` shows the nodes")]
    Unknown(u64),
    /// The decision file cannot be written or read.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

struct Inner {
    heard: BTreeMap<u64, (NodeReport, Instant)>,
    admin: BTreeMap<u64, AdminEntry>,
    /// `timing.dead_after`, or the cluster setting that replaced it.
    dead_after: Duration,
    /// What nodes registered in the cluster catalog (shown until they are heard from).
    registered: BTreeMap<u64, NodeReport>,
}

/// This node's view of every node.
pub struct NodeTable {
    me: u64,
    timing: LivenessTiming,
    started: Instant,
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl NodeTable {
    /// A table for node `me`; decisions persist in `path` (if given), read back here.
    pub fn open(
        me: u64,
        timing: LivenessTiming,
        path: Option<PathBuf>,
        now: Instant,
    ) -> Result<NodeTable, NodeError> {
        let admin = match &path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => serde_json::from_str(&text)
                    .map_err(|e| NodeError::File { path: p.clone(), message: format!("corrupt: {e}") })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
                Err(e) => return Err(NodeError::File { path: p.clone(), message: e.to_string() }),
            },
            None => BTreeMap::new(),
        };
        Ok(NodeTable {
            me,
            timing,
            started: now,
            path,
            inner: Mutex::new(Inner {
                heard: BTreeMap::new(),
                admin,
                dead_after: timing.dead_after,
                registered: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section is a few map operations: a poisoned lock holds consistent data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's id.
    pub fn me(&self) -> u64 {
        self.me
    }

    /// The liveness timing.
    pub fn timing(&self) -> LivenessTiming {
        LivenessTiming { dead_after: self.lock().dead_after, ..self.timing }
    }

    /// Takes the nodes' registrations from the cluster catalog.
    pub fn set_registered(&self, registered: BTreeMap<u64, NodeReport>) {
        self.lock().registered = registered;
    }

    /// Replaces the dead timeout (a cluster setting changed); `None` restores the node's own.
    pub fn set_dead_after(&self, dead_after: Option<Duration>) {
        self.lock().dead_after = dead_after.unwrap_or(self.timing.dead_after);
    }

    /// Records a heartbeat (or an answer to one) from `report.id`.
    pub fn heard(&self, report: NodeReport, now: Instant) {
        let id = report.id;
        self.lock().heard.insert(id, (report, now));
    }

    /// Whether node `id` is alive, suspect or dead at `now`. This node is always alive;
    /// a node never heard from counts from this node's start.
    pub fn liveness(&self, id: u64, now: Instant) -> Liveness {
        if id == self.me {
            return Liveness::Alive;
        }
        let (since, dead_after) = {
            let inner = self.lock();
            (inner.heard.get(&id).map_or(self.started, |(_, at)| *at), inner.dead_after)
        };
        let silent = now.saturating_duration_since(since);
        if silent >= dead_after {
            Liveness::Dead
        } else if silent >= self.timing.suspect_after || !self.lock().heard.contains_key(&id) {
            Liveness::Suspect
        } else {
            Liveness::Alive
        }
    }

    /// The operator decision about node `id`.
    pub fn admin(&self, id: u64) -> AdminState {
        self.lock().admin.get(&id).map_or(AdminState::Active, |e| e.state)
    }

    /// Every decision (sent in heartbeats).
    pub fn admin_entries(&self) -> BTreeMap<u64, AdminEntry> {
        self.lock().admin.clone()
    }

    /// Records a new decision about `id`, ordered after every one known.
    pub fn set_admin(&self, id: u64, state: AdminState) -> Result<AdminEntry, NodeError> {
        let mut inner = self.lock();
        let generation = inner.admin.values().map(|e| e.generation).max().unwrap_or(0) + 1;
        let entry = AdminEntry { state, generation };
        inner.admin.insert(id, entry);
        self.save(&inner.admin)?;
        Ok(entry)
    }

    /// Merges a peer's decisions: per node, the higher generation wins. Returns whether
    /// anything changed.
    pub fn merge_admin(&self, entries: &BTreeMap<u64, AdminEntry>) -> Result<bool, NodeError> {
        let mut inner = self.lock();
        let mut changed = false;
        for (id, e) in entries {
            let newer = inner.admin.get(id).is_none_or(|mine| e.generation > mine.generation);
            if newer {
                inner.admin.insert(*id, *e);
                changed = true;
            }
        }
        if changed {
            self.save(&inner.admin)?;
        }
        Ok(changed)
    }

    fn save(&self, admin: &BTreeMap<u64, AdminEntry>) -> Result<(), NodeError> {
        let Some(path) = &self.path else { return Ok(()) };
        let err = |e: std::io::Error| NodeError::File { path: path.clone(), message: e.to_string() };
        let text = serde_json::to_string_pretty(admin)
            .map_err(|e| NodeError::File { path: path.clone(), message: e.to_string() })?;
        raftblk_replication::durable_file::write(path, text.as_bytes()).map_err(err)
    }

    /// Every node in `ids` (this node and its peers) as seen at `now`, by id.
    pub fn view(&self, ids: &[u64], mine: &NodeReport, now: Instant) -> Vec<NodeView> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .map(|id| {
                let (heard, registered) = {
                    let inner = self.lock();
                    (inner.heard.get(&id).cloned(), inner.registered.get(&id).cloned())
                };
                let (report, last_heard_ms) = if id == self.me {
                    (mine.clone(), Some(0))
                } else {
                    match heard {
                        Some((r, at)) => (r, Some(now.saturating_duration_since(at).as_millis() as u64)),
                        // Not heard from since this node started: what it registered, if anything.
                        None => (registered.unwrap_or(NodeReport { id, ..NodeReport::default() }), None),
                    }
                };
                NodeView {
                    id,
                    liveness: self.liveness(id, now),
                    admin: self.admin(id),
                    report,
                    last_heard_ms,
                }
            })
            .collect()
    }
}

/// This node's lifecycle context: the table plus what it reports about itself.
pub struct NodeDirectory {
    /// Every node as this node sees it.
    pub table: NodeTable,
    zone: String,
    labels: BTreeMap<String, String>,
    api_addr: String,
    data_dir: PathBuf,
}

impl NodeDirectory {
    /// The directory of node `table.me()`, in `zone`, answering its API on `api_addr`,
    /// storing under `data_dir`.
    pub fn new(table: NodeTable, zone: String, api_addr: String, data_dir: PathBuf) -> NodeDirectory {
        NodeDirectory { table, zone, labels: BTreeMap::new(), api_addr, data_dir }
    }

    /// Adds the node's other labels to its reports.
    pub fn with_labels(mut self, labels: BTreeMap<String, String>) -> NodeDirectory {
        self.labels = labels;
        self
    }

    /// What this node reports in its heartbeats (free space read now).
    pub fn my_report(&self) -> NodeReport {
        let (capacity_bytes, free_bytes) = disk_space(&self.data_dir);
        NodeReport {
            id: self.table.me(),
            zone: self.zone.clone(),
            capacity_bytes,
            free_bytes,
            api_addr: self.api_addr.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Every node in `ids` (plus this one), as seen now.
    pub fn views(&self, ids: &[u64]) -> Vec<NodeView> {
        let mut ids = ids.to_vec();
        ids.push(self.table.me());
        self.table.view(&ids, &self.my_report(), Instant::now())
    }
}

/// Size and free space of the file system holding `path`.
pub fn disk_space(path: &std::path::Path) -> (u64, u64) {
    match rustix::fs::statvfs(path) {
        Ok(s) => (s.f_blocks.saturating_mul(s.f_frsize), s.f_bavail.saturating_mul(s.f_frsize)),
        Err(_) => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: LivenessTiming =
        LivenessTiming { suspect_after: Duration::from_secs(3), dead_after: Duration::from_secs(60) };

    #[test]
    fn liveness_follows_heartbeats() {
        let t0 = Instant::now();
        let t = NodeTable::open(1, TIMING, None, t0).unwrap();
        assert_eq!(t.liveness(1, t0 + Duration::from_secs(999)), Liveness::Alive, "this node");
        assert_eq!(t.liveness(2, t0), Liveness::Suspect, "never heard from yet");
        assert_eq!(t.liveness(2, t0 + Duration::from_secs(61)), Liveness::Dead, "never heard from at all");
        t.heard(NodeReport::sample(2, "", 1), t0 + Duration::from_secs(10));
        assert_eq!(t.liveness(2, t0 + Duration::from_secs(11)), Liveness::Alive);
        assert_eq!(t.liveness(2, t0 + Duration::from_secs(14)), Liveness::Suspect);
        assert_eq!(t.liveness(2, t0 + Duration::from_secs(70)), Liveness::Dead);
        t.heard(NodeReport::sample(2, "", 1), t0 + Duration::from_secs(71));
        assert_eq!(t.liveness(2, t0 + Duration::from_secs(71)), Liveness::Alive, "back");
    }

    #[test]
    fn decisions_merge_by_generation_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NODES_FILE);
        let now = Instant::now();
        let a = NodeTable::open(1, TIMING, Some(path.clone()), now).unwrap();
        let b = NodeTable::open(2, TIMING, None, now).unwrap();
        a.set_admin(3, AdminState::Cordoned).unwrap();
        b.set_admin(3, AdminState::Draining).unwrap();
        b.set_admin(3, AdminState::Removed).unwrap();
        // b's newer decision wins on a; a's older one changes nothing on b.
        assert!(a.merge_admin(&b.admin_entries()).unwrap());
        assert!(!b.merge_admin(&a.admin_entries()).unwrap());
        assert_eq!((a.admin(3), b.admin(3)), (AdminState::Removed, AdminState::Removed));
        let again = NodeTable::open(1, TIMING, Some(path), now).unwrap();
        assert_eq!(again.admin(3), AdminState::Removed);
        assert_eq!(again.admin(4), AdminState::Active);
    }
}
