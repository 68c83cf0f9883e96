//! The node's volumes: catalog records plus what serves each one, and the export
//! catalog the NBD server resolves export names through.
//!
//! Two modes. A node without peers serves each volume straight from its local
//! file. A node in a cluster serves every volume through a [`ReplicatedStore`] (sealed by a `SealingBackend`):
//! the volume's voters keep a copy each and form its Raft group, and any node,
//! voter or not, forwards client I/O to the group's leader. Every record change is
//! committed to the cluster catalog first ([`crate::cluster_catalog`]); nodes follow it
//! (and take pushes of committed records, [`crate::cluster`]).
//!
//! What a record means for this node's copies is decided by [`crate::planner::reconcile`]
//! and carried out here (`upsert_locked`); `open` opens a copy, `files` places and removes
//! its files, `replicas` takes [`crate::planner::replica`]'s steps, `groups` talks to a
//! volume's group across the nodes, `status` reports, `lockable` serves a volume whose key is
//! not loaded yet, and `publishing`, `rekey`, `scrubbing` change a record for one purpose.

mod files;
mod groups;
mod lockable;
mod open;
mod publishing;
mod rekey;
mod replicas;
mod scrubbing;
mod status;

pub use status::{NodeStatus, ReplicationStatus, VolumeStatus};

pub use publishing::PublishError;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use raftblk_blockdev::nbd::{ExportCatalog, ExportInfo, OpenError, OpenExport};
use raftblk_blockdev::seal::backend::VolumeCrypto;
use raftblk_blockdev::seal::{CopyStore, NonceSource, SealedStore, SealingBackend};
use raftblk_blockdev::store::{IoEngine, SealedFile};
use raftblk_blockdev::{BackendError, BlockBackend};
use raftblk_replication::node::{ReplicaStore, ReplicatedStore, ReplicationNode};
use raftblk_replication::wal::record::GroupId;

use crate::catalog::{Catalog, CatalogError};
use crate::cluster_catalog::ClusterCatalog;
use crate::control::{self, Answer, ControlError, ErrorKind, MembershipChange, RemoteError, Request};
use crate::keys::{volume_id, Keyring};
use crate::metrics::{MeteredBackend, Metrics};
pub use crate::model::VolumeHealth;
use crate::model::{validate_name, validate_size, CatalogOp, Outcome, VolumeRecord, REPLICAS_MAX};
use crate::planner::reconcile::{plan_record, RecordAction};
use lockable::Lockable;

/// A copy's data requests below this size go through the page cache (see
/// `FileBackend::cache_below`); 64 KiB folios are small enough for ext4's per-block walk.
const COPY_CACHED_BELOW_BYTES: u64 = 64 << 10;

/// How long a create or delete waits for each peer's confirmation.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control message waits for a peer not heard from lately (likely dying).
const SUSPECT_CONTROL_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a search for a volume's leader that finds none says so in the log.
const LEADERLESS_REPORT: Duration = Duration::from_secs(5);
/// How long a membership change may take to show before it is proposed again.
const MEMBERSHIP_RETRY: Duration = Duration::from_secs(2);
/// How long `inspect` waits for the peers' views of a volume (asked all at once).
const INSPECT_TIMEOUT: Duration = Duration::from_millis(300);

/// Why a volume operation was refused or failed. The refusals say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Bad name, size or other input.
    #[error("{0}")]
    Invalid(String),
    /// No such volume.
    #[error("no volume named {0:?}; `raftblk volume list` shows the volumes")]
    NotFound(String),
    /// Not enough nodes (or zones) can take the copies asked for.
    #[error("{0}")]
    NoPlacement(String),
    /// The name is taken.
    #[error("a volume named {0:?} already exists; pick another name or delete it first")]
    Exists(String),
    /// The volume is in use and the operation was not forced.
    #[error("volume {name:?} has {connections} open NBD connection(s) on this node; disconnect the clients or delete with --force")]
    InUse { name: String, connections: usize },
    /// The cluster cannot do it now (a peer did not answer, no leader).
    #[error("{0}")]
    Unavailable(String),
    /// Catalog failure.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Data file failure.
    #[error("volume {name:?} data file: {message}")]
    Store { name: String, message: String },
    /// Another node refused, with the kind of refusal it gave.
    #[error("node {node}: {error}")]
    Remote { node: u64, error: RemoteError },
}

impl From<crate::cluster_catalog::CatalogGroupError> for VolumeError {
    fn from(e: crate::cluster_catalog::CatalogGroupError) -> Self {
        VolumeError::Unavailable(e.to_string())
    }
}

/// What a create asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Name (also the NBD export name).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Serve read-only.
    pub read_only: bool,
    /// Extra copies.
    pub replicas: u8,
    /// Operator's labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Encrypt the volume's blocks (AES-256-GCM under a data key of its own).
    pub encrypted: bool,
    /// Zones the copies must be placed in (CSI accessibility requirements); empty: any.
    pub zones: Vec<String>,
}

impl VolumeSpec {
    /// Whether an existing volume is what this spec asks for (a retried create then gets it
    /// back instead of a conflict).
    pub fn matches(&self, r: &VolumeRecord) -> bool {
        r.name == self.name
            && r.size_bytes == self.size_bytes
            && r.read_only == self.read_only
            && r.replicas == self.replicas
            && r.labels == self.labels
            && r.encrypted == self.encrypted
    }
}

struct Volume {
    record: Mutex<VolumeRecord>,
    /// This node's copy (data and metadata files), if it holds one.
    file: Option<Arc<SealedFile>>,
    replicated: Option<Arc<ReplicatedStore>>,
    /// Set for an encrypted volume that was locked when opened (this node lacked its KEK);
    /// it serves once unlocked.
    lockable: Option<Arc<Lockable>>,
    /// The volume's blocks (this node's copy, or the replicated volume) under `served`.
    sealed: Arc<dyn SealedStore>,
    size: Arc<AtomicU64>,
    served: Arc<MeteredBackend>,
    connections: Arc<AtomicUsize>,
}

/// Owns every volume of this node.
pub struct VolumeManager {
    catalog: Catalog,
    volumes_dir: PathBuf,
    engine: IoEngine,
    metrics: Arc<Metrics>,
    replication: Option<ReplicationNode>,
    open: Mutex<HashMap<String, Arc<Volume>>>,
    /// Serializes create/resize/delete/upsert so checks and effects cannot interleave.
    control: tokio::sync::Mutex<()>,
    /// Whether a volume's leader moves to the node where its client connects.
    leader_follows_client: std::sync::atomic::AtomicBool,
    /// Scrubs by volume name: the running one, or the last one run from this node.
    scrubs: Mutex<HashMap<String, crate::scrub::SharedJob>>,
    /// Most allocated bytes per second a scrub reads (0: unlimited).
    scrub_rate_bytes_per_s: AtomicU64,
    /// Hours between background scrubs of a volume (0: none).
    scrub_interval_h: AtomicU64,
    /// Node liveness and operator decisions (cluster mode).
    nodes: std::sync::OnceLock<Arc<crate::nodes::NodeDirectory>>,
    /// The cluster catalog, where every record change is committed first (cluster mode).
    cluster_catalog: std::sync::OnceLock<Arc<ClusterCatalog>>,
    /// Key-encryption keys (for encrypted volumes' data keys).
    keys: Arc<Keyring>,
    /// This node's nonces for encrypting blocks.
    nonces: Arc<NonceSource>,
}

/// What encrypted volumes need of the node: its KEKs and its nonce counter.
#[derive(Clone)]
pub struct Security {
    /// The node's key-encryption keys.
    pub keys: Arc<Keyring>,
    /// The node's nonces.
    pub nonces: Arc<NonceSource>,
}

/// How long a client must stay connected before the leader moves to its node: short
/// probes (nbdinfo, a health check) should not move it.
const LEADER_FOLLOW_DELAY: Duration = Duration::from_secs(3);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (every update is one insert
    // or remove), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl VolumeManager {
    /// Opens the catalog and every volume under `data_dir`, removing data files that no
    /// record owns (left by a crash during create or delete). With `replication`, the
    /// node is part of a cluster and volumes are Raft groups.
    pub async fn open(
        data_dir: &Path,
        engine: IoEngine,
        metrics: Arc<Metrics>,
        replication: Option<ReplicationNode>,
        security: Security,
    ) -> Result<Arc<Self>, VolumeError> {
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir).map_err(|e| VolumeError::Store {
            name: String::new(),
            message: format!("cannot create {}: {e}", volumes_dir.display()),
        })?;
        let catalog = Catalog::open(&data_dir.join("catalog"))?;
        let manager = Arc::new(VolumeManager {
            catalog,
            volumes_dir,
            engine,
            metrics,
            replication,
            open: Mutex::new(HashMap::new()),
            control: tokio::sync::Mutex::new(()),
            leader_follows_client: std::sync::atomic::AtomicBool::new(false),
            scrubs: Mutex::new(HashMap::new()),
            scrub_rate_bytes_per_s: AtomicU64::new(crate::scrub::SCRUB_RATE_MIB_S_DEFAULT << 20),
            scrub_interval_h: AtomicU64::new(crate::scrub::SCRUB_INTERVAL_H_DEFAULT),
            nodes: std::sync::OnceLock::new(),
            cluster_catalog: std::sync::OnceLock::new(),
            keys: security.keys,
            nonces: security.nonces,
        });
        for record in manager.catalog.list()? {
            manager.open_volume(record, false).await?;
        }
        manager.remove_orphans().await;
        Ok(manager)
    }

    /// The node's sled database (the cluster catalog's replica keeps a tree in it).
    pub fn sled_db(&self) -> &sled::Db {
        self.catalog.db()
    }

    /// Attaches the cluster catalog (cluster mode, once at start).
    pub fn attach_catalog(&self, catalog: Arc<ClusterCatalog>) {
        let _ = self.cluster_catalog.set(catalog);
    }

    /// The cluster catalog, if attached.
    pub fn cluster_catalog(&self) -> Option<&Arc<ClusterCatalog>> {
        self.cluster_catalog.get()
    }

    /// This node's record of volume `name`.
    pub fn record(&self, name: &str) -> Option<VolumeRecord> {
        lock(&self.open).get(name).map(|v| lock(&v.record).clone())
    }

    /// Commits a changed `record` (of generation `expect` before) to the cluster catalog.
    /// A node alone has no catalog beyond its own, and skips this.
    async fn commit_change(&self, record: &VolumeRecord, expect: u64) -> Result<(), VolumeError> {
        let Some(catalog) = self.cluster_catalog() else { return Ok(()) };
        let op = CatalogOp::PutVolume { record: record.clone(), expect: Some(expect) };
        let outcome = catalog.propose(op).await?;
        match outcome {
            o if o.holds(record) => Ok(()),
            Outcome::Conflict { current: Some(c) } if c.uuid == record.uuid => Err(VolumeError::Unavailable(format!(
                "volume {:?} was changed by another operation meanwhile (generation {} in the catalog, {expect} here); retry",
                record.name, c.generation
            ))),
            _ => Err(VolumeError::NotFound(record.name.clone())),
        }
    }

    /// Makes a volume's leader move to the node where its NBD client connects.
    pub fn set_leader_follows_client(&self, on: bool) {
        self.leader_follows_client.store(on, Ordering::SeqCst);
    }

    /// Whether a volume's leader moves to the node where its NBD client connects.
    pub fn leader_follows_client(&self) -> bool {
        self.leader_follows_client.load(Ordering::SeqCst)
    }

    /// After [`LEADER_FOLLOW_DELAY`], if the client is still connected here, this node
    /// holds a copy and another node leads, asks that leader to hand over to this node.
    fn follow_client(&self, v: &Arc<Volume>) {
        let Some(node) = self.replication.clone() else { return };
        if !self.leader_follows_client.load(Ordering::SeqCst) {
            return;
        }
        let record = lock(&v.record).clone();
        let me = node.node_id().0;
        if !record.voters.contains(&me) {
            return;
        }
        let connections = v.connections.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LEADER_FOLLOW_DELAY).await;
            let group = GroupId(record.group_id);
            let leader = node.leader(group);
            if connections.load(Ordering::SeqCst) == 0 || leader == 0 || leader == me {
                return;
            }
            tracing::info!(volume = %record.name, from = leader, to = me, "moving the leader to the node its client uses");
            let msg = Request::TransferLeader { group_id: record.group_id, to: me };
            if let Err(e) = control::send(&node, leader, &msg, CONTROL_TIMEOUT).await {
                tracing::debug!(error = %e, "leader move refused");
            }
        });
    }

    /// This node's id in the cluster (`None` without peers).
    pub fn node_id(&self) -> Option<u64> {
        self.replication.as_ref().map(|r| r.node_id().0)
    }

    /// The other nodes' ids (empty without peers).
    pub fn peer_ids(&self) -> Vec<u64> {
        self.replication.as_ref().map(|r| r.peer_ids()).unwrap_or_default()
    }

    fn holds_copy(&self, record: &VolumeRecord) -> bool {
        crate::planner::reconcile::holds_copy(self.node_id(), record)
    }

    fn get(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        lock(&self.open).get(name).cloned().ok_or_else(|| VolumeError::NotFound(name.to_string()))
    }

    /// The I/O engine's name ("io_uring" or "sync").
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Picks the voters of a new volume: with the node table attached (a running cluster),
    /// by [`crate::planner::placement::place`]; otherwise this node first, then the next
    /// nodes by id.
    fn place(&self, replicas: u8, zones: &[String]) -> Result<Vec<u64>, VolumeError> {
        if replicas > REPLICAS_MAX {
            return Err(VolumeError::Invalid(format!(
                "replicas {replicas} is out of range; use 0 to {REPLICAS_MAX} (extra copies)"
            )));
        }
        let Some(node) = &self.replication else {
            if replicas > 0 {
                return Err(VolumeError::NoPlacement(format!(
                    "replicas={replicas} needs {} nodes, but this node runs alone (no cluster.peers); use replicas=0 or start a cluster (raftblk dev-cluster)",
                    replicas + 1
                )));
            }
            return Ok(Vec::new());
        };
        if let Some(dir) = self.nodes.get() {
            let mut views = dir.views(&node.peer_ids());
            if !zones.is_empty() {
                views.retain(|n| zones.contains(&n.report.zone));
            }
            let within = if zones.is_empty() { String::new() } else { format!(" in zones {zones:?}") };
            return crate::planner::placement::place(
                &views,
                replicas as usize + 1,
                &[],
                Some(node.node_id().0),
            )
            .map_err(|why| {
                VolumeError::NoPlacement(format!("cannot place replicas={replicas}{within}: {why}"))
            });
        }
        let me = node.node_id().0;
        let mut ids = node.peer_ids();
        ids.push(me);
        ids.sort_unstable();
        if replicas as usize + 1 > ids.len() {
            return Err(VolumeError::NoPlacement(format!(
                "replicas={replicas} needs {} nodes holding a copy each, but the cluster has {}; use replicas={} or add nodes",
                replicas + 1,
                ids.len(),
                ids.len() - 1
            )));
        }
        let start = ids.iter().position(|&i| i == me).unwrap_or(0);
        Ok((0..=replicas as usize).map(|k| ids[(start + k) % ids.len()]).collect())
    }

    /// Creates a thin volume as `spec` says.
    pub async fn create(&self, spec: &VolumeSpec) -> Result<VolumeStatus, VolumeError> {
        let VolumeSpec { name, size_bytes, read_only, replicas, labels, encrypted, zones } = spec;
        let (name, size_bytes, read_only, replicas) = (name.as_str(), *size_bytes, *read_only, *replicas);
        validate_name(name).map_err(VolumeError::Invalid)?;
        validate_size(size_bytes).map_err(VolumeError::Invalid)?;
        crate::model::validate_labels(labels).map_err(VolumeError::Invalid)?;
        let _control = self.control.lock().await;
        let existing = lock(&self.open).get(name).cloned();
        if let Some(v) = existing {
            // Idempotent, as CSI's CreateVolume must be: a create retried after a timeout finds
            // the volume the first attempt made and gets it back, rather than an error.
            if spec.matches(&lock(&v.record)) {
                drop(_control);
                return self.status(name);
            }
            return Err(VolumeError::Exists(name.to_string()));
        }
        let voters = self.place(replicas, zones)?;
        let uuid = uuid::Uuid::new_v4();
        // The data key is made (and wrapped by the cluster KEK) here, once: every node that
        // serves the volume unwraps the same key from the record.
        let wrapped_keys = if *encrypted {
            vec![self
                .keys
                .new_volume_key(uuid.as_bytes())
                .map_err(|e| VolumeError::Invalid(e.to_string()))?
                .to_text()]
        } else {
            Vec::new()
        };
        let group_id = if self.replication.is_some() {
            u64::from_le_bytes(uuid.as_bytes()[..8].try_into().unwrap_or([1; 8])) | 1
        } else {
            0
        };
        let record = VolumeRecord {
            name: name.to_string(),
            uuid: uuid.to_string(),
            size_bytes,
            read_only,
            created_unix_s: now_unix_s(),
            replicas,
            voters: voters.clone(),
            group_id,
            initial_voters: voters.clone(),
            generation: 1,
            labels: labels.clone(),
            encrypted: *encrypted,
            wrapped_keys,
            ..VolumeRecord::default()
        };
        // The catalog decides: committed there, the volume exists (once: a create of the
        // same name on another node, or this create retried, finds it taken); not committed,
        // it exists nowhere. Only then do the nodes holding copies open them.
        if let Some(catalog) = self.cluster_catalog() {
            let op = CatalogOp::PutVolume { record: record.clone(), expect: None };
            let outcome = catalog.propose(op).await?;
            match outcome {
                o if o.holds(&record) => {}
                Outcome::Conflict { current: Some(c) } if spec.matches(&c) => {
                    // Idempotent across nodes too: the volume another attempt made.
                    self.upsert_locked(*c, false).await?;
                    drop(_control);
                    return self.status(name);
                }
                _ => return Err(VolumeError::Exists(name.to_string())),
            }
        }
        let told = self.broadcast(&Request::Upsert(record.clone()), &voters).await;
        self.upsert_locked(record.clone(), true).await?;
        tracing::info!(volume = name, size_bytes, replicas, ?voters, uuid = %record.uuid, encrypted, "volume created");
        if let Err(e) = told {
            return Err(VolumeError::Unavailable(format!(
                "volume {name:?} was created, but {e}; it may not be writable until they are back. Delete it and retry, or wait for them"
            )));
        }
        drop(_control);
        self.status(name)
    }

    /// Applies a record learned from a peer (or made here): opens a new volume, or
    /// records a grow. Records of deleted volumes are ignored.
    pub async fn upsert(&self, record: VolumeRecord) -> Result<(), VolumeError> {
        let _control = self.control.lock().await;
        self.upsert_locked(record, false).await
    }

    /// Carries out what [`plan_record`] says of `record` (`new_here`: a create on this node).
    async fn upsert_locked(&self, record: VolumeRecord, new_here: bool) -> Result<(), VolumeError> {
        let deleted = self.catalog.is_tombstoned(&record.uuid)?;
        let existing = lock(&self.open).get(&record.name).cloned();
        let current = existing.as_ref().map(|v| lock(&v.record).clone());
        let action = plan_record(self.node_id(), current.as_ref(), &record, deleted, new_here);
        match (action, existing, current) {
            (RecordAction::Nothing, ..) => Ok(()),
            (RecordAction::NameTaken, ..) => Err(VolumeError::Exists(record.name.clone())),
            (RecordAction::ChangeCopies { gains, loses }, Some(v), Some(current)) => {
                self.change_copies(&v, current, record, gains, loses).await
            }
            (RecordAction::Update { record: merged, grows }, Some(v), _) => {
                let merged = *merged;
                // Changes to a record are serialized by the control lock this runs under;
                // the record's own lock is only for readers.
                *lock(&v.record) = merged.clone();
                if v.locked().is_some() {
                    // A rotation may have rewrapped its key by a KEK this node has.
                    self.unlock_all();
                }
                if grows {
                    v.size.fetch_max(merged.size_bytes, Ordering::SeqCst);
                    self.metrics.volume_size.with_label_values(&[&merged.name]).set(merged.size_bytes as i64);
                }
                self.catalog.update(&merged).await?;
                Ok(())
            }
            (RecordAction::Open { create }, ..) => {
                // File first, record second: a crash in between leaves an orphan file that
                // the next start removes, never a record without its file.
                self.open_volume(record.clone(), create).await?;
                if !self.catalog.insert_new(&record).await? {
                    return Err(VolumeError::Exists(record.name.clone()));
                }
                Ok(())
            }
            // The planner only changes or updates a volume it was shown open.
            (RecordAction::ChangeCopies { .. } | RecordAction::Update { .. }, ..) => Ok(()),
        }
    }

    /// Applies a new set of copy holders: a node that gains a copy starts its replica
    /// (which replays the log from the start), a node that loses one stops it and
    /// deletes the copy. Open NBD connections keep working through forwarding.
    async fn change_copies(
        &self,
        v: &Arc<Volume>,
        old: VolumeRecord,
        mut new: VolumeRecord,
        gains: bool,
        loses: bool,
    ) -> Result<(), VolumeError> {
        new.size_bytes = new.size_bytes.max(v.size.load(Ordering::SeqCst));
        if loses {
            if let Some(node) = &self.replication {
                let _ = node.close_group(GroupId(old.group_id)).await;
            }
        }
        lock(&self.open).remove(&new.name);
        self.open_volume_with(new.clone(), gains, v.connections.clone()).await?;
        self.catalog.update(&new).await?;
        if loses {
            if let Err(e) = self.remove_copy_files(&old.uuid).await {
                tracing::warn!(volume = %new.name, error = %e, "cannot remove the copy this node no longer holds; the next start does");
            }
            tracing::info!(volume = %new.name, "this node no longer holds a copy; removed it");
        } else if gains {
            tracing::info!(volume = %new.name, "this node now holds a copy; replaying the log into it");
        }
        Ok(())
    }

    /// Attaches the node table (cluster mode, once at start).
    pub fn attach_nodes(&self, dir: Arc<crate::nodes::NodeDirectory>) {
        let _ = self.nodes.set(dir);
    }

    /// The node table, if attached.
    pub fn nodes(&self) -> Option<&Arc<crate::nodes::NodeDirectory>> {
        self.nodes.get()
    }

    /// Grows a volume (through its Raft log in a cluster); new NBD connections see the new size.
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeStatus, VolumeError> {
        validate_size(size_bytes).map_err(VolumeError::Invalid)?;
        let _control = self.control.lock().await;
        let v = self.get(name)?;
        let mut record = lock(&v.record).clone();
        if size_bytes < record.size_bytes {
            return Err(VolumeError::Invalid(format!(
                "volume {name:?} is {} bytes; shrinking is not supported (it would destroy data), give a size of at least that",
                record.size_bytes
            )));
        }
        if size_bytes == record.size_bytes {
            return self.status(name);
        }
        match (&v.replicated, &v.file) {
            (Some(r), _) => r.resize(size_bytes).await.map_err(|e| {
                VolumeError::Unavailable(format!("growing volume {name:?} through its replicas failed: {e}"))
            })?,
            (None, Some(f)) => f.grow_to(size_bytes).map_err(|e| store_err(name, e))?,
            (None, None) => return Err(store_err(name, "no local copy")),
        }
        v.size.fetch_max(size_bytes, Ordering::SeqCst);
        record.size_bytes = size_bytes;
        record.generation += 1;
        // The volume has grown already (through its own log); a failed commit here leaves
        // the record behind the volume until the resize is retried, never the reverse.
        self.commit_change(&record, record.generation - 1).await?;
        self.catalog.update(&record).await?;
        *lock(&v.record) = record.clone();
        self.metrics.volume_size.with_label_values(&[name]).set(size_bytes as i64);
        tracing::info!(volume = name, size_bytes, "volume grown");
        // Peers that miss it follow their catalog replica (errors are logged).
        let _ = self.broadcast(&Request::Upsert(record), &[]).await;
        drop(_control);
        self.status(name)
    }

    /// Deletes a volume; refused while NBD clients are connected here unless `force`.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), VolumeError> {
        let _control = self.control.lock().await;
        let v = self.get(name)?;
        let connections = v.connections.load(Ordering::SeqCst);
        if connections > 0 && !force {
            return Err(VolumeError::InUse { name: name.to_string(), connections });
        }
        let record = lock(&v.record).clone();
        if let Some(catalog) = self.cluster_catalog() {
            let op = CatalogOp::DeleteVolume { name: name.to_string(), uuid: record.uuid.clone() };
            catalog.propose(op).await?;
        }
        self.remove_locked(&record).await?;
        tracing::info!(volume = name, forced = force, connections, "volume deleted");
        // Peers that miss it follow their catalog replica (errors are logged).
        let _ = self.broadcast(&Request::Delete { uuid: record.uuid.clone() }, &[]).await;
        Ok(())
    }

    /// Applies a delete learned from a peer.
    pub async fn delete_uuid(&self, uuid: &str) -> Result<(), VolumeError> {
        let _control = self.control.lock().await;
        let record = lock(&self.open).values().map(|v| lock(&v.record).clone()).find(|r| r.uuid == uuid);
        match record {
            Some(r) => self.remove_locked(&r).await,
            None => Ok(self.catalog.tombstone(uuid).await?),
        }
    }

    async fn remove_locked(&self, record: &VolumeRecord) -> Result<(), VolumeError> {
        let name = &record.name;
        let Some(v) = lock(&self.open).get(name).cloned() else { return Ok(()) };
        v.served.mark_deleted();
        if self.replication.is_some() {
            self.catalog.tombstone(&record.uuid).await?;
        }
        // Record first, file second: a crash in between leaves an orphan file.
        self.catalog.remove(name).await?;
        {
            let mut open = lock(&self.open);
            open.remove(name);
            self.metrics.volumes.set(open.len() as i64);
        }
        self.metrics.forget_volume(name);
        if let (Some(node), Some(_)) = (&self.replication, &v.file) {
            let _ = node.close_group(GroupId(record.group_id)).await;
        }
        if v.file.is_some() {
            self.remove_copy_files(&record.uuid)
                .await
                .map_err(|e| store_err(name, format!("removing the copy's files: {e}")))?;
        }
        Ok(())
    }

    /// Creates `name` unless a volume of that name exists (used for bootstrap volumes).
    pub async fn ensure(&self, name: &str, size_bytes: u64) -> Result<bool, VolumeError> {
        let spec = VolumeSpec { name: name.to_string(), size_bytes, ..VolumeSpec::default() };
        match self.create(&spec).await {
            Ok(_) => Ok(true),
            Err(VolumeError::Exists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Asks the volume's leader to hand leadership to `to`.
    pub async fn transfer_leader(&self, name: &str, to: u64) -> Result<(), VolumeError> {
        let v = self.get(name)?;
        let record = lock(&v.record).clone();
        let Some(node) = &self.replication else {
            return Err(VolumeError::Invalid("this node runs alone; there is no leader to move".into()));
        };
        if !record.voters.contains(&to) {
            return Err(VolumeError::Invalid(format!(
                "node {to} holds no copy of {name:?}; its copies are on nodes {:?}",
                record.voters
            )));
        }
        let leader = node.leader(GroupId(record.group_id));
        if leader == 0 {
            return Err(VolumeError::Unavailable(format!(
                "volume {name:?} has no leader right now; retry shortly"
            )));
        }
        let msg = Request::TransferLeader { group_id: record.group_id, to };
        match self.send_control(node, leader, &msg).await {
            Ok(_) => Ok(()),
            Err(ControlError::Refused(error)) => Err(VolumeError::Remote { node: leader, error }),
            Err(e) => Err(VolumeError::Unavailable(format!("leader node {leader} did not answer: {e}"))),
        }
    }

    /// Cuts this node off from `block` (both directions) after healing every earlier cut.
    pub fn set_partition(&self, block: &[u64], block_inbound: &[u64]) -> Result<(), VolumeError> {
        let Some(node) = &self.replication else {
            return Err(VolumeError::Invalid("this node runs alone; there is nothing to partition".into()));
        };
        let faults = node.faults();
        faults.heal_all();
        for &peer in block {
            faults.block(raftblk_replication::wal::record::NodeId(peer));
        }
        for &peer in block_inbound {
            faults.block_inbound(raftblk_replication::wal::record::NodeId(peer));
        }
        tracing::warn!(?block, ?block_inbound, "fault injection: traffic with these nodes is dropped");
        Ok(())
    }

    /// Whether the node has no volumes at all.
    pub fn is_empty(&self) -> bool {
        lock(&self.open).is_empty()
    }

    /// Flushes every local copy (at shutdown).
    pub async fn flush_all(&self) -> Result<(), VolumeError> {
        let volumes: Vec<Arc<Volume>> = lock(&self.open).values().cloned().collect();
        for v in volumes {
            if let Some(f) = &v.file {
                let name = lock(&v.record).name.clone();
                // Flushed and marked clean: the next open trusts every record at once.
                f.close().await.map_err(|e| store_err(&name, e))?;
            }
        }
        Ok(())
    }

    /// Answers a peer's control message.
    pub async fn on_control(&self, msg: Request) -> Answer {
        let not_clustered = || VolumeError::Invalid("this node runs alone: it has no volume groups".into());
        let result = match msg {
            Request::Upsert(record) => self.upsert(record).await,
            Request::Delete { uuid } => self.delete_uuid(&uuid).await,
            Request::GroupStatus { group_id } => {
                let Some(node) = &self.replication else { return Answer::Error((&not_clustered()).into()) };
                return Answer::Status(self.group_view(node, group_id));
            }
            Request::WaitGroup { group_id, until, timeout_ms } => {
                let Some(node) = &self.replication else { return Answer::Error((&not_clustered()).into()) };
                let wait = Duration::from_millis(timeout_ms.min(control::WAIT_GROUP_MAX_MS));
                return Answer::Status(self.wait_group_view(node, group_id, until, wait).await);
            }
            Request::Membership { group_id, change, node: target } => match &self.replication {
                Some(node) => {
                    use raftblk_replication::node::MembershipChange as Change;
                    let change = match change {
                        MembershipChange::AddLearner => Change::AddLearner(target),
                        MembershipChange::Promote => Change::Promote(target),
                        MembershipChange::Remove => Change::Remove(target),
                    };
                    if let Err(e) = node.change_membership(GroupId(group_id), change).await {
                        return Answer::Error((&e).into());
                    }
                    Ok(())
                }
                None => Err(not_clustered()),
            },
            Request::AddPeer { .. }
            | Request::Members
            | Request::Heartbeat { .. }
            | Request::CatalogPropose(_) => {
                // cluster::install_handler answers these before they get here.
                return Answer::error(ErrorKind::Invalid, "membership messages are not volume messages");
            }
            Request::LoadKek { path } => {
                return match self.keys.load_file(&path) {
                    Ok(id) => {
                        self.unlock_all();
                        Answer::Kek { id: id.to_string() }
                    }
                    Err(e) => Answer::error(ErrorKind::Invalid, e.to_string()),
                };
            }
            Request::UseKek { id } => match id.parse() {
                Ok(id) => self.keys.set_current(id).map_err(|e| VolumeError::Invalid(e.to_string())),
                Err(e) => Err(VolumeError::Invalid(format!("KEK id {id:?}: {e}"))),
            },
            Request::TransferLeader { group_id, to } => match &self.replication {
                Some(node) => match node.transfer_leader(GroupId(group_id), to) {
                    Ok(()) => Ok(()),
                    Err(e) => return Answer::Error((&e).into()),
                },
                None => Err(not_clustered()),
            },
        };
        match result {
            Ok(()) => Answer::Ok,
            Err(e) => Answer::Error((&e).into()),
        }
    }
}

impl From<&VolumeError> for RemoteError {
    fn from(e: &VolumeError) -> RemoteError {
        let kind = match e {
            VolumeError::Invalid(_) => ErrorKind::Invalid,
            VolumeError::NotFound(_) => ErrorKind::NotFound,
            VolumeError::Exists(_) => ErrorKind::Exists,
            VolumeError::InUse { .. } => ErrorKind::Conflict,
            VolumeError::NoPlacement(_) | VolumeError::Unavailable(_) => ErrorKind::Unavailable,
            VolumeError::Remote { error, .. } => error.kind,
            VolumeError::Catalog(_) | VolumeError::Store { .. } => ErrorKind::Internal,
        };
        RemoteError::new(kind, e.to_string())
    }
}

fn store_err(name: &str, e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Store { name: name.to_string(), message: e.to_string() }
}

/// Counts a connection for as long as it lives.
struct ConnectionGuard {
    connections: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::SeqCst);
        self.gauge.dec();
    }
}

impl ExportCatalog for VolumeManager {
    fn list(&self) -> Vec<ExportInfo> {
        VolumeManager::list(self)
            .into_iter()
            .map(|v| ExportInfo {
                description: format!("raftblk volume {} ({} bytes)", v.name, v.size_bytes),
                name: v.name,
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        let name = if name.is_empty() {
            // The default export is the only volume, when there is exactly one.
            let open = lock(&self.open);
            match open.keys().next() {
                Some(only) if open.len() == 1 => only.clone(),
                _ => {
                    return Err(OpenError::Refused(
                        "no default export: name a volume (nbd://HOST/NAME)".into(),
                    ))
                }
            }
        } else {
            name.to_string()
        };
        let v = self.get(&name).map_err(|_| OpenError::NotFound(name.clone()))?;
        if let Some(why) = v.locked() {
            return Err(OpenError::Refused(why));
        }
        let record = lock(&v.record).clone();
        v.connections.fetch_add(1, Ordering::SeqCst);
        let gauge = self.metrics.volume_connections.with_label_values(&[&name]);
        gauge.inc();
        self.follow_client(&v);
        Ok(OpenExport {
            backend: v.served.clone(),
            read_only: record.read_only,
            // Alone: one data file per volume, so an fdatasync from any connection covers
            // writes completed on all of them. In a cluster: every acknowledged write is
            // already durable on a majority. Either way CAN_MULTI_CONN's promise holds.
            multi_conn: true,
            description: format!("raftblk volume {name}"),
            guard: Box::new(ConnectionGuard { connections: v.connections.clone(), gauge }),
        })
    }
}
