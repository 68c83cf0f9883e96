//! The node's encryption keys: the key-encryption keys it was given (the keyring), the
//! data keys of encrypted volumes unwrapped with them, and the durable reservation of the
//! node's nonce counter.
//!
//! KEKs come from `security.kek_file` (checked: mode 0600, owned by the daemon's user),
//! from `RAFTBLK_KEK` (hex, for tests), or are loaded while running for a rotation
//! (`raftblk cluster rotate-kek`); the paths of the latter are kept in
//! `<data_dir>/keyring.json` so a restart finds them again. No key material is ever
//! written by raftblk: only paths and key ids.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use raftblk_blockdev::seal::crypt::{CryptError, DataKey, Kek, KekId, WrappedKey, VOLUME_ID_BYTES};
use raftblk_blockdev::seal::nonce::{NonceError, NonceReserver};

/// The environment variable that gives a KEK directly (64 hex digits), for tests.
pub const KEK_ENV: &str = "RAFTBLK_KEK";
/// File (in the data directory) listing KEK files loaded at runtime.
pub const KEYRING_FILE: &str = "keyring.json";
/// File (in the data directory) holding the nonce counter's durable high-water mark.
pub const NONCE_FILE: &str = "nonce-reservation";

/// Why a key could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The KEK file is missing or unreadable.
    #[error("cannot read the KEK file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The KEK file may be read by others.
    #[error("the KEK file {} has mode {mode:o}; it must not be readable by group or others: chmod 600 {}", path.display(), path.display())]
    Mode { path: PathBuf, mode: u32 },
    /// The KEK file belongs to another user.
    #[error("the KEK file {} is owned by uid {owner}, not by the daemon's user (uid {me}): chown it", path.display())]
    Owner { path: PathBuf, owner: u32, me: u32 },
    /// The KEK's bytes are malformed.
    #[error("the KEK in {source_name} is not usable: {error}")]
    Malformed { source_name: String, error: CryptError },
    /// This node lacks the KEK a volume's key is wrapped by.
    #[error("volume {volume:?} is encrypted with a data key wrapped by KEK {kek}, which this node does not have; give it as security.kek_file (every node needs the same KEK)")]
    Missing { volume: String, kek: KekId },
    /// This node has no KEK at all, so it cannot create encrypted volumes.
    #[error("this node has no key-encryption key: set security.kek_file (a 32-byte key file, mode 0600) to create or serve encrypted volumes")]
    NoKek,
    /// A wrapped key is malformed or does not unwrap.
    #[error("volume {volume:?}: {error}")]
    Unwrap { volume: String, error: CryptError },
    /// The keyring file could not be written.
    #[error("cannot record the keyring in {}: {source}", path.display())]
    Persist { path: PathBuf, source: std::io::Error },
}

/// A KEK and the file it came from (`None`: the environment).
type HeldKek = (Arc<Kek>, Option<PathBuf>);

/// The KEKs this node holds, by id; one of them is current (new volumes are wrapped by it).
#[derive(Debug, Default)]
pub struct Keyring {
    keks: RwLock<BTreeMap<KekId, HeldKek>>,
    current: RwLock<Option<KekId>>,
    /// Where runtime-loaded KEK paths are recorded (none for tests without a data dir).
    record: Option<PathBuf>,
}

/// Reads a KEK file after checking its mode and owner.
pub fn read_kek_file(path: &Path) -> Result<Kek, KeyError> {
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Mode { path: path.to_owned(), mode });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(KeyError::Owner { path: path.to_owned(), owner: meta.uid(), me });
    }
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?,
    );
    Kek::parse(&bytes).map_err(|error| KeyError::Malformed { source_name: path.display().to_string(), error })
}

impl Keyring {
    /// Loads the configured KEK (file or environment) and the ones recorded in
    /// `<data_dir>/keyring.json`. The configured one is current.
    pub fn load(kek_file: &Path, data_dir: Option<&Path>) -> Result<Keyring, KeyError> {
        let ring = Keyring { record: data_dir.map(|d| d.join(KEYRING_FILE)), ..Keyring::default() };
        if let Ok(hex) = std::env::var(KEK_ENV) {
            if !hex.is_empty() {
                let kek = Kek::parse(hex.as_bytes())
                    .map_err(|error| KeyError::Malformed { source_name: KEK_ENV.into(), error })?;
                ring.insert(kek, None, true);
            }
        }
        if !kek_file.as_os_str().is_empty() {
            let kek = read_kek_file(kek_file)?;
            ring.insert(kek, Some(kek_file.to_owned()), true);
        }
        if let Some(record) = &ring.record {
            for path in read_recorded(record) {
                match read_kek_file(&path) {
                    Ok(kek) => ring.insert(kek, Some(path), false),
                    Err(e) => tracing::warn!(error = %e, "a KEK loaded for a rotation is no longer readable"),
                }
            }
            if let Some(current) = read_recorded_current(record) {
                if ring.get(current).is_some() {
                    *write(&ring.current) = Some(current);
                }
            }
        }
        if let Some(id) = ring.current_id() {
            tracing::info!(kek = %id, keks = ring.ids().len(), "key-encryption keys loaded");
        }
        Ok(ring)
    }

    fn insert(&self, kek: Kek, path: Option<PathBuf>, make_current: bool) {
        let id = kek.id();
        write(&self.keks).insert(id, (Arc::new(kek), path));
        let mut current = write(&self.current);
        if make_current || current.is_none() {
            *current = Some(id);
        }
    }

    /// Loads a KEK file while running (a rotation): checked like the configured one, and
    /// recorded so that a restart loads it again. Returns its id.
    pub fn load_file(&self, path: &Path) -> Result<KekId, KeyError> {
        let kek = read_kek_file(path)?;
        let id = kek.id();
        self.insert(kek, Some(path.to_owned()), false);
        self.persist()?;
        Ok(id)
    }

    /// Makes `id` the KEK new data keys are wrapped by (and remembers that).
    pub fn set_current(&self, id: KekId) -> Result<(), KeyError> {
        if self.get(id).is_none() {
            return Err(KeyError::Missing { volume: String::new(), kek: id });
        }
        *write(&self.current) = Some(id);
        self.persist()
    }

    fn persist(&self) -> Result<(), KeyError> {
        let Some(record) = &self.record else { return Ok(()) };
        let paths: Vec<String> = read(&self.keks)
            .values()
            .filter_map(|(_, p)| p.as_ref().map(|p| p.display().to_string()))
            .collect();
        let current = self.current_id().map(|id| id.to_string());
        let body = serde_json::json!({ "kek_files": paths, "current": current });
        raftblk_replication::durable_file::write(record, body.to_string().as_bytes())
            .map_err(|source| KeyError::Persist { path: record.clone(), source })
    }

    /// The KEK new volumes are wrapped by.
    pub fn current_id(&self) -> Option<KekId> {
        *read(&self.current)
    }

    /// The KEK with this id, if the node has it.
    pub fn get(&self, id: KekId) -> Option<Arc<Kek>> {
        read(&self.keks).get(&id).map(|(k, _)| k.clone())
    }

    /// Ids of every KEK the node holds.
    pub fn ids(&self) -> Vec<KekId> {
        read(&self.keks).keys().copied().collect()
    }

    /// A fresh data key for a new volume, wrapped by the current KEK.
    pub fn new_volume_key(&self, volume: &[u8; VOLUME_ID_BYTES]) -> Result<WrappedKey, KeyError> {
        let id = self.current_id().ok_or(KeyError::NoKek)?;
        let kek = self.get(id).ok_or(KeyError::NoKek)?;
        let key = DataKey::generate(1).map_err(|error| KeyError::Unwrap { volume: String::new(), error })?;
        kek.wrap(&key, volume).map_err(|error| KeyError::Unwrap { volume: String::new(), error })
    }

    /// Unwraps a volume's data key with whichever of its wrappings this node can open.
    pub fn unwrap(
        &self,
        volume: &str,
        uuid: &[u8; VOLUME_ID_BYTES],
        wrapped: &[String],
    ) -> Result<DataKey, KeyError> {
        let mut wanted = None;
        for text in wrapped {
            let w = WrappedKey::from_text(text)
                .map_err(|error| KeyError::Unwrap { volume: volume.into(), error })?;
            match self.get(w.kek) {
                Some(kek) => {
                    return kek
                        .unwrap(&w, uuid)
                        .map_err(|error| KeyError::Unwrap { volume: volume.into(), error })
                }
                None => wanted = Some(w.kek),
            }
        }
        match wanted {
            Some(kek) => Err(KeyError::Missing { volume: volume.into(), kek }),
            None => Err(KeyError::Unwrap {
                volume: volume.into(),
                error: CryptError::Malformed {
                    what: "volume record",
                    why: "encrypted, but no wrapped key".into(),
                },
            }),
        }
    }

    /// Wraps `volume`'s data key (unwrapped from `wrapped`) by KEK `to`: a rotation.
    pub fn rewrap(
        &self,
        volume: &str,
        uuid: &[u8; VOLUME_ID_BYTES],
        wrapped: &[String],
        to: KekId,
    ) -> Result<WrappedKey, KeyError> {
        let key = self.unwrap(volume, uuid, wrapped)?;
        let kek = self.get(to).ok_or(KeyError::Missing { volume: volume.into(), kek: to })?;
        kek.wrap(&key, uuid).map_err(|error| KeyError::Unwrap { volume: volume.into(), error })
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Every update is one insert or assignment: a panic cannot leave the map half changed.
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn read_record(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn read_recorded(path: &Path) -> Vec<PathBuf> {
    read_record(path)
        .and_then(|v| {
            v.get("kek_files")?
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(PathBuf::from)).collect())
        })
        .unwrap_or_default()
}

fn read_recorded_current(path: &Path) -> Option<KekId> {
    read_record(path)?.get("current")?.as_str()?.parse().ok()
}

/// The bytes of a volume's uuid, as bound into its blocks' AAD.
pub fn volume_id(uuid: &str) -> [u8; VOLUME_ID_BYTES] {
    match uuid::Uuid::parse_str(uuid) {
        Ok(u) => *u.as_bytes(),
        // Not a UUID (never made by raftblk): derive 16 bytes from the text instead.
        Err(_) => {
            let mut id = [0u8; VOLUME_ID_BYTES];
            for (i, b) in uuid.bytes().enumerate() {
                id[i % VOLUME_ID_BYTES] ^= b.rotate_left(i as u32 % 8);
            }
            id
        }
    }
}

/// The nonce high-water mark in a file of the data directory (write, fsync, rename): the
/// reserver of a node alone.
#[derive(Debug)]
pub struct FileReserver {
    path: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

impl FileReserver {
    /// A reserver keeping its mark at `path`.
    pub fn new(path: PathBuf) -> FileReserver {
        FileReserver { path, lock: tokio::sync::Mutex::new(()) }
    }
}

impl FileReserver {
    fn mark(&self) -> Result<u64, NonceError> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|_| NonceError::Reserve(format!("{} is corrupt: {s:?}", self.path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(NonceError::Reserve(format!("{}: {e}", self.path.display()))),
        }
    }

    /// Raises the recorded mark to `mark` (never lowers it), durably.
    pub async fn raise(&self, mark: u64) -> Result<u64, NonceError> {
        let _one = self.lock.lock().await;
        let had = self.mark()?;
        if mark <= had {
            return Ok(had);
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            raftblk_replication::durable_file::write(&path, format!("{mark}\n").as_bytes())
        })
        .await
        .map_err(|e| NonceError::Reserve(e.to_string()))?
        .map_err(|e| NonceError::Reserve(format!("{}: {e}", self.path.display())))?;
        Ok(mark)
    }
}

#[async_trait]
impl NonceReserver for FileReserver {
    async fn reserve(&self, at_least: u64, count: u64) -> Result<(u64, u64), NonceError> {
        let from = self.mark()?.max(at_least);
        let to = from.checked_add(count).ok_or(NonceError::Exhausted)?;
        self.raise(to).await?;
        Ok((from, to))
    }
}

/// How long a reservation waits for the cluster catalog to be attached and answer.
const CATALOG_RESERVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The reserver of a node in a cluster: runs are granted by the replicated catalog (so a
/// node whose disk was wiped, rejoining under its old id, still continues above every value
/// it ever used), and recorded in the data directory as well.
pub struct CatalogReserver {
    node: u64,
    catalog: Arc<std::sync::OnceLock<Arc<crate::cluster_catalog::ClusterCatalog>>>,
    local: FileReserver,
}

impl CatalogReserver {
    /// A reserver for node `node`; the catalog is attached once it is open.
    pub fn new(node: u64, local: FileReserver) -> CatalogReserver {
        CatalogReserver { node, catalog: Arc::new(std::sync::OnceLock::new()), local }
    }

    /// Where the daemon puts the catalog once it has opened it.
    pub fn catalog_slot(&self) -> Arc<std::sync::OnceLock<Arc<crate::cluster_catalog::ClusterCatalog>>> {
        self.catalog.clone()
    }
}

#[async_trait]
impl NonceReserver for CatalogReserver {
    async fn reserve(&self, at_least: u64, count: u64) -> Result<(u64, u64), NonceError> {
        let deadline = std::time::Instant::now() + CATALOG_RESERVE_WAIT;
        let catalog = loop {
            if let Some(c) = self.catalog.get() {
                break c.clone();
            }
            if std::time::Instant::now() >= deadline {
                return Err(NonceError::Reserve("the cluster catalog is not open yet".into()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let at_least = at_least.max(self.local.mark()?);
        let op = crate::model::CatalogOp::ReserveNonces { node: self.node, at_least, count };
        match catalog.propose(op).await {
            Ok(crate::model::Outcome::Reserved { from, to }) => {
                self.local.raise(to).await?;
                Ok((from, to))
            }
            Ok(other) => Err(NonceError::Reserve(format!("the catalog answered {other:?}"))),
            Err(e) => Err(NonceError::Reserve(e.to_string())),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn key_file(dir: &Path, name: &str, byte: u8, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, [byte; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn kek_files_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let open = key_file(dir.path(), "open", 1, 0o644);
        let err = Keyring::load(&open, None).unwrap_err();
        assert!(matches!(err, KeyError::Mode { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
        let private = key_file(dir.path(), "private", 1, 0o600);
        let ring = Keyring::load(&private, None).unwrap();
        assert_eq!(ring.current_id(), Some(Kek::from_bytes([1; 32]).id()));
        let missing = Keyring::load(&dir.path().join("nope"), None).unwrap_err();
        assert!(matches!(missing, KeyError::Read { .. }));
    }

    #[test]
    fn volumes_unwrap_with_any_kek_the_node_has_and_name_the_one_it_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let old = key_file(dir.path(), "old", 1, 0o600);
        let new = key_file(dir.path(), "new", 2, 0o600);
        let ring = Keyring::load(&old, Some(dir.path())).unwrap();
        let uuid = [7u8; 16];
        let wrapped = vec![ring.new_volume_key(&uuid).unwrap().to_text()];
        ring.unwrap("v", &uuid, &wrapped).unwrap();
        let new_id = ring.load_file(&new).unwrap();
        let rewrapped = ring.rewrap("v", &uuid, &wrapped, new_id).unwrap();
        ring.set_current(new_id).unwrap();
        // A restart finds the runtime-loaded key and keeps it current.
        let again = Keyring::load(&old, Some(dir.path())).unwrap();
        assert_eq!(again.current_id(), Some(new_id));
        again.unwrap("v", &uuid, &[rewrapped.to_text()]).unwrap();
        // A node with only the old key is told which one it lacks.
        let only_old = Keyring::load(&old, None).unwrap();
        let err = only_old.unwrap("v", &uuid, &[rewrapped.to_text()]).unwrap_err();
        assert!(matches!(err, KeyError::Missing { kek, .. } if kek == new_id), "{err}");
        assert!(err.to_string().contains(&new_id.to_string()));
        assert!(matches!(Keyring::default().new_volume_key(&uuid), Err(KeyError::NoKek)));
    }

    #[tokio::test]
    async fn the_nonce_mark_survives_restarts_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let r = FileReserver::new(dir.path().join(NONCE_FILE));
        assert_eq!(r.reserve(0, 100).await.unwrap(), (0, 100));
        assert_eq!(r.reserve(10, 5).await.unwrap(), (100, 105), "never a value twice");
        assert_eq!(r.raise(50).await.unwrap(), 105, "never lower");
        let again = FileReserver::new(dir.path().join(NONCE_FILE));
        assert_eq!(again.reserve(0, 1).await.unwrap(), (105, 106), "a restart continues above");
    }
}
