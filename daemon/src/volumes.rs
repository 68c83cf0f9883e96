//! The node's volumes: the catalog records plus their open data files, and the
//! export catalog the NBD server resolves export names through.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use raftblk_blockdev::nbd::{ExportCatalog, ExportInfo, OpenError, OpenExport};
use raftblk_blockdev::store::{FileBackend, IoEngine};
use raftblk_blockdev::BlockBackend;
use serde::Serialize;

use crate::catalog::{validate_name, validate_size, Catalog, CatalogError, VolumeRecord};
use crate::metrics::{MeteredBackend, Metrics};

/// Why a volume operation was refused or failed. The refusals say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Bad name, size or other input.
    #[error("{0}")]
    Invalid(String),
    /// No such volume.
    #[error("no volume named {0:?}; `raftblk volume list` shows the volumes")]
    NotFound(String),
    /// The name is taken.
    #[error("a volume named {0:?} already exists; pick another name or delete it first")]
    Exists(String),
    /// The volume is in use and the operation was not forced.
    #[error("volume {name:?} has {connections} open NBD connection(s); disconnect the clients or delete with --force")]
    InUse { name: String, connections: usize },
    /// Catalog failure.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Data file failure.
    #[error("volume {name:?} data file: {message}")]
    Store { name: String, message: String },
}

/// A volume as the API reports it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VolumeStatus {
    /// Name and NBD export name.
    pub name: String,
    /// Stable identity.
    pub uuid: String,
    /// Provisioned size.
    pub size_bytes: u64,
    /// Bytes allocated on disk.
    pub allocated_bytes: u64,
    /// Whether clients may only read.
    pub read_only: bool,
    /// Open NBD connections.
    pub connections: usize,
    /// Creation time, seconds since the epoch.
    pub created_unix_s: u64,
}

struct Volume {
    record: Mutex<VolumeRecord>,
    file: Arc<FileBackend>,
    served: Arc<MeteredBackend>,
    connections: Arc<AtomicUsize>,
}

/// Owns every volume of this node.
pub struct VolumeManager {
    catalog: Catalog,
    volumes_dir: PathBuf,
    engine: IoEngine,
    metrics: Arc<Metrics>,
    open: Mutex<HashMap<String, Arc<Volume>>>,
    /// Serializes create/resize/delete so checks and effects cannot interleave.
    control: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent across a panic (every update is one insert
    // or remove), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VolumeManager {
    /// Opens the catalog and every volume under `data_dir`, removing data files
    /// that no record owns (left by a crash during create or delete).
    pub fn open(data_dir: &Path, engine: IoEngine, metrics: Arc<Metrics>) -> Result<Self, VolumeError> {
        let volumes_dir = data_dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir).map_err(|e| VolumeError::Store {
            name: String::new(),
            message: format!("cannot create {}: {e}", volumes_dir.display()),
        })?;
        let catalog = Catalog::open(&data_dir.join("catalog"))?;
        let manager = VolumeManager {
            catalog,
            volumes_dir,
            engine,
            metrics,
            open: Mutex::new(HashMap::new()),
            control: Mutex::new(()),
        };
        let records = manager.catalog.list()?;
        for mut record in records {
            let path = manager.data_path(&record.uuid);
            let file = FileBackend::open(&path, manager.engine.clone()).map_err(|e| VolumeError::Store {
                name: record.name.clone(),
                message: format!("cannot open {}: {e}", path.display()),
            })?;
            let file_size = file.size_bytes();
            if file_size < record.size_bytes {
                // A grow's truncate did not reach the disk before a crash; redo it.
                file.grow(record.size_bytes).map_err(|e| store_err(&record.name, e))?;
            } else if file_size > record.size_bytes {
                // The grow reached the file but not the catalog; the larger size was
                // never acknowledged, but keeping it loses nothing.
                record.size_bytes = file_size;
                manager.catalog.update(&record)?;
            }
            manager.insert_open(record, Arc::new(file));
        }
        manager.remove_orphans();
        Ok(manager)
    }

    fn data_path(&self, uuid: &str) -> PathBuf {
        self.volumes_dir.join(format!("{uuid}.img"))
    }

    fn insert_open(&self, record: VolumeRecord, file: Arc<FileBackend>) {
        let name = record.name.clone();
        let served = Arc::new(MeteredBackend::new(file.clone(), self.metrics.volume(&name)));
        self.metrics.volume_size.with_label_values(&[&name]).set(record.size_bytes as i64);
        self.metrics.volume_connections.with_label_values(&[&name]).set(0);
        let volume =
            Volume { record: Mutex::new(record), file, served, connections: Arc::new(AtomicUsize::new(0)) };
        let mut open = lock(&self.open);
        open.insert(name, Arc::new(volume));
        self.metrics.volumes.set(open.len() as i64);
    }

    fn remove_orphans(&self) {
        let known: Vec<String> =
            lock(&self.open).values().map(|v| format!("{}.img", lock(&v.record).uuid)).collect();
        let Ok(entries) = std::fs::read_dir(&self.volumes_dir) else { return };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.ends_with(".img") && !known.contains(&file_name) {
                tracing::warn!(file = %entry.path().display(), "removing data file no volume owns (interrupted create or delete)");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn get(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        lock(&self.open).get(name).cloned().ok_or_else(|| VolumeError::NotFound(name.to_string()))
    }

    /// The I/O engine's name ("io_uring" or "sync").
    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    /// Creates a thin volume.
    pub fn create(&self, name: &str, size_bytes: u64, read_only: bool) -> Result<VolumeStatus, VolumeError> {
        validate_name(name).map_err(VolumeError::Invalid)?;
        validate_size(size_bytes).map_err(VolumeError::Invalid)?;
        let _control = lock(&self.control);
        if lock(&self.open).contains_key(name) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        let record = VolumeRecord {
            name: name.to_string(),
            uuid: uuid::Uuid::new_v4().to_string(),
            size_bytes,
            read_only,
            created_unix_s: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let path = self.data_path(&record.uuid);
        // File first, record second: a crash in between leaves an orphan file that
        // the next start removes, never a record without its file.
        let file =
            FileBackend::create(&path, size_bytes, self.engine.clone()).map_err(|e| store_err(name, e))?;
        if !self.catalog.insert_new(&record)? {
            let _ = std::fs::remove_file(&path);
            return Err(VolumeError::Exists(name.to_string()));
        }
        tracing::info!(volume = name, size_bytes, uuid = %record.uuid, "volume created");
        self.insert_open(record, Arc::new(file));
        self.status(name)
    }

    /// Every volume, ordered by name.
    pub fn list(&self) -> Vec<VolumeStatus> {
        let volumes: Vec<Arc<Volume>> = lock(&self.open).values().cloned().collect();
        let mut out: Vec<VolumeStatus> = volumes.iter().map(|v| Self::status_of(v)).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// One volume.
    pub fn status(&self, name: &str) -> Result<VolumeStatus, VolumeError> {
        let v = self.get(name)?;
        Ok(Self::status_of(&v))
    }

    fn status_of(v: &Volume) -> VolumeStatus {
        let r = lock(&v.record).clone();
        VolumeStatus {
            name: r.name,
            uuid: r.uuid,
            size_bytes: r.size_bytes,
            allocated_bytes: v.file.allocated_bytes().unwrap_or(0),
            read_only: r.read_only,
            connections: v.connections.load(Ordering::SeqCst),
            created_unix_s: r.created_unix_s,
        }
    }

    /// Grows a volume; new NBD connections see the new size.
    pub fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeStatus, VolumeError> {
        validate_size(size_bytes).map_err(VolumeError::Invalid)?;
        let _control = lock(&self.control);
        let v = self.get(name)?;
        let mut record = lock(&v.record).clone();
        if size_bytes < record.size_bytes {
            return Err(VolumeError::Invalid(format!(
                "volume {name:?} is {} bytes; shrinking is not supported (it would destroy data), give a size of at least that",
                record.size_bytes
            )));
        }
        if size_bytes > record.size_bytes {
            v.file.grow(size_bytes).map_err(|e| store_err(name, e))?;
            record.size_bytes = size_bytes;
            self.catalog.update(&record)?;
            self.metrics.volume_size.with_label_values(&[name]).set(size_bytes as i64);
            tracing::info!(volume = name, size_bytes, "volume grown");
            *lock(&v.record) = record;
        }
        self.status(name)
    }

    /// Deletes a volume; refused while NBD clients are connected unless `force`.
    pub fn delete(&self, name: &str, force: bool) -> Result<(), VolumeError> {
        let _control = lock(&self.control);
        let v = self.get(name)?;
        let connections = v.connections.load(Ordering::SeqCst);
        if connections > 0 && !force {
            return Err(VolumeError::InUse { name: name.to_string(), connections });
        }
        v.served.mark_deleted();
        // Record first, file second: a crash in between leaves an orphan file.
        self.catalog.remove(name)?;
        let uuid = lock(&v.record).uuid.clone();
        {
            let mut open = lock(&self.open);
            open.remove(name);
            self.metrics.volumes.set(open.len() as i64);
        }
        self.metrics.forget_volume(name);
        std::fs::remove_file(self.data_path(&uuid)).map_err(|e| store_err(name, e))?;
        tracing::info!(volume = name, forced = force, connections, "volume deleted");
        Ok(())
    }

    /// Creates `name` unless a volume of that name exists (used for bootstrap volumes).
    pub fn ensure(&self, name: &str, size_bytes: u64) -> Result<bool, VolumeError> {
        match self.create(name, size_bytes, false) {
            Ok(_) => Ok(true),
            Err(VolumeError::Exists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the node has no volumes at all.
    pub fn is_empty(&self) -> bool {
        lock(&self.open).is_empty()
    }

    /// Refreshes the allocated-bytes gauges (called when `/metrics` is scraped).
    pub fn refresh_gauges(&self) {
        for v in lock(&self.open).values() {
            let name = lock(&v.record).name.clone();
            let allocated = v.file.allocated_bytes().unwrap_or(0);
            self.metrics.volume_allocated.with_label_values(&[&name]).set(allocated as i64);
        }
    }

    /// Flushes every volume (at shutdown).
    pub async fn flush_all(&self) -> Result<(), VolumeError> {
        let volumes: Vec<Arc<Volume>> = lock(&self.open).values().cloned().collect();
        for v in volumes {
            let name = lock(&v.record).name.clone();
            v.file.flush().await.map_err(|e| store_err(&name, e))?;
        }
        Ok(())
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
        let record = lock(&v.record).clone();
        v.connections.fetch_add(1, Ordering::SeqCst);
        let gauge = self.metrics.volume_connections.with_label_values(&[&name]);
        gauge.inc();
        Ok(OpenExport {
            backend: v.served.clone(),
            read_only: record.read_only,
            // One data file per volume: an fdatasync from any connection covers
            // writes completed on all of them, which is what CAN_MULTI_CONN promises.
            multi_conn: true,
            description: format!("raftblk volume {name}"),
            guard: Box::new(ConnectionGuard { connections: v.connections.clone(), gauge }),
        })
    }
}
