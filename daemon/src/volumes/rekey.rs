//! KEK rotation and unlocking: what changes for encrypted volumes when the node gets a new
//! key-encryption key.
//!
//! A rotation (`raftblk cluster rotate-kek --key-file NEW`) runs on one node:
//! 1. every node loads the new KEK from the same path (a node that cannot is named and the
//!    rotation stops before anything changed), so from here on every node holds both;
//! 2. each encrypted volume's data key is unwrapped with the old KEK and wrapped with the
//!    new one, and the record committed (compare-and-set on its generation, like any change);
//!    the data keys themselves do not change, so nothing is re-encrypted and I/O goes on;
//! 3. every node makes the new KEK current (new volumes are wrapped by it) and remembers
//!    its path in `<data_dir>/keyring.json`, so a restart loads it before the old file is
//!    replaced in the configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use raftblk_blockdev::seal::backend::VolumeCrypto;
use raftblk_blockdev::seal::SealingBackend;
use serde::{Deserialize, Serialize};

use super::{lock, Volume, VolumeError, VolumeManager};
use crate::control::{Answer, Request};
use crate::keys::volume_id;

/// How long each node may take to load the new KEK or switch to it.
const KEK_CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationReport {
    /// The new KEK's id.
    pub kek: String,
    /// Encrypted volumes whose data key is now wrapped by it.
    pub volumes_rewrapped: usize,
    /// Nodes that loaded it (this one included).
    pub nodes: Vec<u64>,
    /// What the operator does next.
    pub next: String,
}

impl VolumeManager {
    /// Rotates the cluster KEK to the key in `path` (see the [module documentation](self)).
    pub async fn rotate_kek(&self, path: &Path) -> Result<RotationReport, VolumeError> {
        if !path.is_absolute() {
            return Err(VolumeError::Invalid(format!(
                "give the new key file's absolute path ({}): every node reads it at that path",
                path.display()
            )));
        }
        let id = self.keys.load_file(path).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        self.unlock_all();
        let me = self.node_id().unwrap_or(0);
        let mut nodes = vec![me];
        if let Some(node) = &self.replication {
            let msg = Request::LoadKek { path: path.to_owned() };
            let mut refused = Vec::new();
            for peer in self.peer_ids() {
                match crate::control::send(node, peer, &msg, KEK_CONTROL_TIMEOUT).await {
                    Ok(Answer::Kek { id: got }) if got == id.to_string() => nodes.push(peer),
                    Ok(Answer::Kek { id: got }) => {
                        refused.push(format!("node {peer} read KEK {got} from {}, not {id}", path.display()))
                    }
                    Ok(other) => refused.push(format!("node {peer} answered {other:?}")),
                    Err(e) => refused.push(format!("node {peer}: {e}")),
                }
            }
            if !refused.is_empty() {
                return Err(VolumeError::Unavailable(format!(
                    "the rotation did not start (no volume changed): every node needs the new key file at {} (mode 0600): {}",
                    path.display(),
                    refused.join("; ")
                )));
            }
        }
        let mut rewrapped = 0;
        for record in self.records().into_iter().filter(|r| r.encrypted) {
            if self.rewrap(&record.name, id).await? {
                rewrapped += 1;
            }
        }
        self.keys.set_current(id).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        if let Some(node) = &self.replication {
            let msg = Request::UseKek { id: id.to_string() };
            for peer in self.peer_ids() {
                if let Err(e) = crate::control::send(node, peer, &msg, KEK_CONTROL_TIMEOUT).await {
                    tracing::warn!(peer, error = %e, "a node did not switch to the new KEK; new volumes it creates use the old one until it does");
                }
            }
        }
        tracing::info!(kek = %id, volumes = rewrapped, "KEK rotated");
        Ok(RotationReport {
            kek: id.to_string(),
            volumes_rewrapped: rewrapped,
            nodes,
            next: format!(
                "every data key is now wrapped by KEK {id}; on every node set security.kek_file = {} (and remove the old key file) before its next restart",
                path.display()
            ),
        })
    }

    /// Ids of the KEKs this node holds, and the current one.
    pub fn kek_ids(&self) -> (Vec<String>, Option<String>) {
        (
            self.keys.ids().iter().map(|k| k.to_string()).collect(),
            self.keys.current_id().map(|k| k.to_string()),
        )
    }

    /// Wraps `name`'s data key by KEK `to`, through the catalog; false if it already was.
    async fn rewrap(&self, name: &str, to: raftblk_blockdev::seal::KekId) -> Result<bool, VolumeError> {
        for _ in 0..10 {
            let control = self.control.lock().await;
            let v = self.get(name)?;
            let mut record = lock(&v.record).clone();
            let prefix = format!("v1:{to}:");
            if record.wrapped_keys.iter().all(|w| w.starts_with(&prefix)) {
                return Ok(false);
            }
            let wrapped = self
                .keys
                .rewrap(name, &volume_id(&record.uuid), &record.wrapped_keys, to)
                .map_err(|e| VolumeError::Unavailable(e.to_string()))?;
            let expect = record.generation;
            record.wrapped_keys = vec![wrapped.to_text()];
            record.generation += 1;
            match self.commit_change(&record, expect).await {
                Ok(()) => {
                    self.catalog.update(&record).await?;
                    *lock(&v.record) = record;
                    return Ok(true);
                }
                Err(VolumeError::Unavailable(why)) if why.contains("changed") => {
                    drop(control);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(VolumeError::Unavailable(format!(
            "volume {name:?} kept changing during the rotation; run it again"
        )))
    }

    /// Opens encrypted volumes that were locked for want of a KEK this node now has.
    pub fn unlock_all(&self) {
        let locked: Vec<(String, Arc<Volume>)> = lock(&self.open)
            .iter()
            .filter(|(_, v)| v.locked().is_some())
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for (name, v) in locked {
            let Some(lockable) = &v.lockable else { continue };
            let record = lock(&v.record).clone();
            let id = volume_id(&record.uuid);
            let Ok(key) = self.keys.unwrap(&name, &id, &record.wrapped_keys) else { continue };
            let inner: Arc<dyn raftblk_blockdev::BlockBackend> = Arc::new(SealingBackend::encrypted(
                v.sealed.clone(),
                VolumeCrypto { key, volume: id, nonces: self.nonces.clone() },
                self.metrics.integrity(&name),
            ));
            if lockable.unlocked.set(inner).is_ok() {
                tracing::info!(volume = %name, "encrypted volume unlocked");
            }
        }
    }
}
