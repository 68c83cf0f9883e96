//! The node's volume catalog: one record per volume, kept in sled so that a
//! create or delete is durable before the API answers.
//!
//! A change is made in memory at once (so changes keep the order they were made in) and then
//! flushed with `flush_async`, which waits for the disk on sled's own thread pool: the
//! runtime's workers, which also serve NBD requests, never block in an `fsync` here.

use std::path::Path;

use crate::model::VolumeRecord;

/// Why the catalog refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// sled failed.
    #[error("catalog storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record does not decode.
    #[error("catalog record for {name:?} is corrupt: {message}")]
    Corrupt { name: String, message: String },
}

/// How long [`open_db`] waits for an earlier handle on the same directory to let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens the sled database under `dir`. sled drops its file lock from a background thread
/// some time after the last handle is dropped, so a reopen in the same process (a restart
/// of the serving side, a test) may briefly find it held: that is waited out, not failed.
pub fn open_db(dir: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The sled-backed catalog.
pub struct Catalog {
    volumes: sled::Tree,
    deleted: sled::Tree,
    db: sled::Db,
}

impl Catalog {
    /// Opens (or creates) the catalog under `dir`.
    pub fn open(dir: &Path) -> Result<Catalog, CatalogError> {
        let db = open_db(dir)?;
        let volumes = db.open_tree("volumes")?;
        let deleted = db.open_tree("deleted")?;
        Ok(Catalog { volumes, deleted, db })
    }

    /// The sled database the catalog lives in.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Every volume, ordered by name.
    pub fn list(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        self.volumes
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&String::from_utf8_lossy(&k), &v)
            })
            .collect()
    }

    /// One volume by name.
    pub fn get(&self, name: &str) -> Result<Option<VolumeRecord>, CatalogError> {
        self.volumes.get(name)?.map(|v| decode(name, &v)).transpose()
    }

    /// Inserts a new record; returns false (and changes nothing) if the name is taken.
    pub async fn insert_new(&self, record: &VolumeRecord) -> Result<bool, CatalogError> {
        let bytes = encode(record);
        let swapped = self.volumes.compare_and_swap(&record.name, None as Option<&[u8]>, Some(bytes))?;
        if swapped.is_ok() {
            self.db.flush_async().await?;
        }
        Ok(swapped.is_ok())
    }

    /// Replaces an existing record.
    pub async fn update(&self, record: &VolumeRecord) -> Result<(), CatalogError> {
        self.volumes.insert(&record.name, encode(record))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Remembers that the volume with `uuid` was deleted, so a peer that missed the
    /// delete cannot bring it back.
    pub async fn tombstone(&self, uuid: &str) -> Result<(), CatalogError> {
        self.deleted.insert(uuid, &[])?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Whether the volume with `uuid` was deleted.
    pub fn is_tombstoned(&self, uuid: &str) -> Result<bool, CatalogError> {
        Ok(self.deleted.contains_key(uuid)?)
    }

    /// Every deleted volume's uuid.
    pub fn tombstones(&self) -> Result<Vec<String>, CatalogError> {
        self.deleted.iter().keys().map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())).collect()
    }

    /// Removes a record; returns whether it existed.
    pub async fn remove(&self, name: &str) -> Result<bool, CatalogError> {
        let existed = self.volumes.remove(name)?.is_some();
        self.db.flush_async().await?;
        Ok(existed)
    }
}

fn encode(record: &VolumeRecord) -> Vec<u8> {
    // Serializing a struct of strings and integers cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn decode(name: &str, bytes: &[u8]) -> Result<VolumeRecord, CatalogError> {
    serde_json::from_slice(bytes)
        .map_err(|e| CatalogError::Corrupt { name: name.to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            uuid: "u".into(),
            size_bytes: 4096,
            read_only: false,
            created_unix_s: 1,
            replicas: 0,
            voters: Vec::new(),
            group_id: 0,
            initial_voters: Vec::new(),
            generation: 0,
            labels: Default::default(),
            ..VolumeRecord::default()
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn records_survive_reopen_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Catalog::open(dir.path()).unwrap();
            assert!(c.insert_new(&record("a")).await.unwrap());
            assert!(!c.insert_new(&record("a")).await.unwrap());
            assert!(c.insert_new(&record("b")).await.unwrap());
            let mut r = record("b");
            r.size_bytes = 8192;
            c.update(&r).await.unwrap();
            assert!(c.remove("a").await.unwrap());
            assert!(!c.remove("a").await.unwrap());
        }
        let c = Catalog::open(dir.path()).unwrap();
        let all = c.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].size_bytes, 8192);
        assert_eq!(c.get("b").unwrap().unwrap().name, "b");
        assert!(c.get("a").unwrap().is_none());
        c.tombstone("u-a").await.unwrap();
        assert!(c.is_tombstoned("u-a").unwrap());
        assert!(!c.is_tombstoned("u-b").unwrap());
        assert_eq!(c.tombstones().unwrap(), vec!["u-a".to_string()]);
    }

    #[test]
    fn records_of_issue_1_decode_with_no_replicas() {
        let old = br#"{"name":"v","uuid":"u","size_bytes":4096,"read_only":false,"created_unix_s":1}"#;
        let r = decode("v", old).unwrap();
        assert_eq!((r.replicas, r.voters.len(), r.group_id), (0, 0, 0));
    }
}
