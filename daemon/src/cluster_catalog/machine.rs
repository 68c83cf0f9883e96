//! The catalog's state machine, in a sled tree: every replica of the catalog group applies
//! the same proposals in log order and so holds the same records.
//!
//! ```text
//! key                value
//! applied            u64 (big-endian): the last entry applied, written in the same
//!                    atomic batch as the entry's changes
//! v/<volume name>    VolumeRecord (JSON)
//! t/<volume uuid>    empty: the volume was deleted (a record with it is never accepted again)
//! a/<node id, 20 digits>  AdminEntry (JSON); its generation is the entry's log index
//! n/<node id, 20 digits>  NodeRecord (JSON): what the node registered about itself
//! s/<setting key>    the setting's value (JSON)
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use raftblk_replication::machine::{MachineError, StateMachine};
use serde::{Deserialize, Serialize};

use crate::model::AdminEntry;
use crate::model::VolumeRecord;
use crate::model::{CatalogOp, NodeRecord, Outcome, Proposal};

const APPLIED_KEY: &[u8] = b"applied";
/// Outcomes kept for proposers to collect (they ask right after their entry applied).
const OUTCOMES_KEPT: usize = 1024;

/// The whole catalog, as a snapshot carries it.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// The entry the image reflects.
    pub applied: u64,
    /// Every volume.
    pub volumes: Vec<VolumeRecord>,
    /// Uuids of deleted volumes.
    pub deleted: Vec<String>,
    /// Operators' decisions about nodes.
    pub admin: BTreeMap<u64, AdminEntry>,
    /// Nodes' registrations.
    #[serde(default)]
    pub nodes: BTreeMap<u64, NodeRecord>,
    /// Cluster settings.
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
    /// Each node's nonce high-water mark (no counter value at or above it was reserved).
    #[serde(default)]
    pub nonce_marks: BTreeMap<u64, u64>,
}

/// The catalog state machine on one node.
pub struct CatalogMachine {
    tree: sled::Tree,
    db: sled::Db,
    applied: AtomicU64,
    /// Serializes apply, install and image, so an image is one consistent state.
    write: Mutex<()>,
    outcomes: Mutex<VecDeque<(u64, Outcome)>>,
    changed: tokio::sync::watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section leaves the data consistent (sled batches are atomic).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(e: impl std::fmt::Display) -> MachineError {
    MachineError(format!("catalog: {e}"))
}

fn volume_key(name: &str) -> Vec<u8> {
    format!("v/{name}").into_bytes()
}

fn deleted_key(uuid: &str) -> Vec<u8> {
    format!("t/{uuid}").into_bytes()
}

fn admin_key(node: u64) -> Vec<u8> {
    format!("a/{node:020}").into_bytes()
}

fn node_key(node: u64) -> Vec<u8> {
    format!("n/{node:020}").into_bytes()
}

fn setting_key(key: &str) -> Vec<u8> {
    format!("s/{key}").into_bytes()
}

fn nonce_key(node: u64) -> Vec<u8> {
    format!("r/{node:020}").into_bytes()
}

/// Reads through an entry's own earlier changes (one entry may carry several proposals).
struct Overlay<'a> {
    tree: &'a sled::Tree,
    changes: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Overlay<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, MachineError> {
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(key).map_err(err)?.map(|v| v.to_vec())),
        }
    }

    fn set(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.changes.insert(key, value);
    }

    fn record(&self, name: &str) -> Result<Option<VolumeRecord>, MachineError> {
        self.get(&volume_key(name))?.map(|v| serde_json::from_slice(&v).map_err(err)).transpose()
    }
}

impl CatalogMachine {
    /// Opens the machine in `tree` of `db` (the node's sled database).
    pub fn open(db: &sled::Db, tree: &str) -> Result<CatalogMachine, sled::Error> {
        let tree = db.open_tree(tree)?;
        let applied = tree.get(APPLIED_KEY)?.map_or(0, |v| decode_u64(&v));
        let (changed, _) = tokio::sync::watch::channel(applied);
        Ok(CatalogMachine {
            tree,
            db: db.clone(),
            applied: AtomicU64::new(applied),
            write: Mutex::new(()),
            outcomes: Mutex::new(VecDeque::new()),
            changed,
        })
    }

    /// Wakes on every applied entry (the value is the applied index).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes the outcome of proposal `id`, if this node applied it recently.
    pub fn take_outcome(&self, id: u64) -> Option<Outcome> {
        let mut outcomes = lock(&self.outcomes);
        let at = outcomes.iter().rposition(|(i, _)| *i == id)?;
        outcomes.remove(at).map(|(_, o)| o)
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, MachineError> {
        self.tree
            .scan_prefix(b"v/")
            .values()
            .map(|v| serde_json::from_slice(&v.map_err(err)?).map_err(err))
            .collect()
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, MachineError> {
        Overlay { tree: &self.tree, changes: HashMap::new() }.record(name)
    }

    /// Uuids of deleted volumes.
    pub fn deleted(&self) -> Result<Vec<String>, MachineError> {
        self.tree
            .scan_prefix(b"t/")
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k.map_err(err)?[2..]).into_owned()))
            .collect()
    }

    /// Operators' decisions about nodes.
    pub fn admin(&self) -> Result<BTreeMap<u64, AdminEntry>, MachineError> {
        self.by_node(b"a/")
    }

    /// Nodes' registrations.
    pub fn nodes(&self) -> Result<BTreeMap<u64, NodeRecord>, MachineError> {
        self.by_node(b"n/")
    }

    /// Each node's nonce high-water mark.
    pub fn nonce_marks(&self) -> Result<BTreeMap<u64, u64>, MachineError> {
        self.tree
            .scan_prefix(b"r/")
            .map(|kv| {
                let (k, v) = kv.map_err(err)?;
                let id = String::from_utf8_lossy(&k[2..]).parse::<u64>().map_err(err)?;
                Ok((id, decode_u64(&v)))
            })
            .collect()
    }

    /// Cluster settings that were set.
    pub fn settings(&self) -> Result<BTreeMap<String, serde_json::Value>, MachineError> {
        self.tree
            .scan_prefix(b"s/")
            .map(|kv| {
                let (k, v) = kv.map_err(err)?;
                Ok((String::from_utf8_lossy(&k[2..]).into_owned(), serde_json::from_slice(&v).map_err(err)?))
            })
            .collect()
    }

    /// The JSON values under `prefix`, by the node id that follows it.
    fn by_node<T: serde::de::DeserializeOwned>(
        &self,
        prefix: &[u8],
    ) -> Result<BTreeMap<u64, T>, MachineError> {
        self.tree
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(err)?;
                let id = String::from_utf8_lossy(&k[prefix.len()..]).parse::<u64>().map_err(err)?;
                Ok((id, serde_json::from_slice(&v).map_err(err)?))
            })
            .collect()
    }

    /// The outcome of one proposal against the state in `o`, recording its changes there.
    fn evaluate(o: &mut Overlay<'_>, index: u64, op: CatalogOp) -> Result<Outcome, MachineError> {
        match op {
            CatalogOp::PutVolume { record, expect } => {
                let current = o.record(&record.name)?;
                let deleted = o.get(&deleted_key(&record.uuid))?.is_some();
                let ok = !deleted
                    && match (&current, expect) {
                        (None, None) => true,
                        (Some(c), Some(g)) => c.uuid == record.uuid && c.generation == g,
                        _ => false,
                    };
                if !ok {
                    return Ok(Outcome::Conflict { current: current.map(Box::new) });
                }
                o.set(volume_key(&record.name), Some(serde_json::to_vec(&record).map_err(err)?));
                Ok(Outcome::Applied)
            }
            CatalogOp::DeleteVolume { name, uuid } => {
                let current = o.record(&name)?;
                o.set(deleted_key(&uuid), Some(Vec::new()));
                match current {
                    Some(c) if c.uuid == uuid => {
                        o.set(volume_key(&name), None);
                        Ok(Outcome::Applied)
                    }
                    other => Ok(Outcome::Conflict { current: other.map(Box::new) }),
                }
            }
            CatalogOp::SetNodeAdmin { node, state } => {
                let entry = AdminEntry { state, generation: index };
                o.set(admin_key(node), Some(serde_json::to_vec(&entry).map_err(err)?));
                Ok(Outcome::Applied)
            }
            CatalogOp::PutNode { node } => {
                o.set(node_key(node.report.id), Some(serde_json::to_vec(&node).map_err(err)?));
                Ok(Outcome::Applied)
            }
            CatalogOp::SetSetting { key, value } => {
                o.set(setting_key(&key), Some(serde_json::to_vec(&value).map_err(err)?));
                Ok(Outcome::Applied)
            }
            CatalogOp::ReserveNonces { node, at_least, count } => {
                let mark = o.get(&nonce_key(node))?.map_or(0, |v| decode_u64(&v));
                let from = mark.max(at_least);
                let Some(to) = from.checked_add(count) else {
                    return Ok(Outcome::Conflict { current: None });
                };
                o.set(nonce_key(node), Some(to.to_be_bytes().to_vec()));
                Ok(Outcome::Reserved { from, to })
            }
        }
    }
}

fn decode_u64(v: &[u8]) -> u64 {
    v.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl StateMachine for CatalogMachine {
    fn apply(&self, index: u64, commands: &[Bytes]) -> Result<(), MachineError> {
        let _write = lock(&self.write);
        if index <= self.applied.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut overlay = Overlay { tree: &self.tree, changes: HashMap::new() };
        let mut outcomes = Vec::new();
        for c in commands {
            // Every replica holds the same bytes, so skipping an undecodable proposal keeps
            // them equal (none is ever written: proposals are encoded by `Proposal::encode`).
            let proposal = match Proposal::decode(c) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(index, error = %e, "undecodable catalog proposal skipped");
                    continue;
                }
            };
            let outcome = Self::evaluate(&mut overlay, index, proposal.op)?;
            outcomes.push((proposal.id, outcome));
        }
        let mut batch = sled::Batch::default();
        for (k, v) in overlay.changes {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        batch.insert(APPLIED_KEY, &index.to_be_bytes());
        self.tree.apply_batch(batch).map_err(err)?;
        self.applied.store(index, Ordering::Release);
        {
            let mut kept = lock(&self.outcomes);
            kept.extend(outcomes);
            while kept.len() > OUTCOMES_KEPT {
                kept.pop_front();
            }
        }
        self.changed.send_replace(index);
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    fn flush(&self) -> Result<u64, MachineError> {
        let applied = self.applied_index();
        self.db.flush().map_err(err)?;
        Ok(applied)
    }

    fn image(&self) -> Result<(u64, Bytes), MachineError> {
        let _write = lock(&self.write);
        let image = Image {
            applied: self.applied_index(),
            volumes: self.volumes()?,
            deleted: self.deleted()?,
            admin: self.admin()?,
            nodes: self.nodes()?,
            settings: self.settings()?,
            nonce_marks: self.nonce_marks()?,
        };
        Ok((image.applied, Bytes::from(serde_json::to_vec(&image).map_err(err)?)))
    }

    fn install(&self, index: u64, image: Bytes) -> Result<(), MachineError> {
        let image: Image = serde_json::from_slice(&image).map_err(err)?;
        if image.applied != index {
            return Err(err(format!("image of entry {} offered as entry {index}", image.applied)));
        }
        let _write = lock(&self.write);
        let mut batch = sled::Batch::default();
        for k in self.tree.iter().keys() {
            batch.remove(k.map_err(err)?);
        }
        for r in &image.volumes {
            batch.insert(volume_key(&r.name), serde_json::to_vec(r).map_err(err)?);
        }
        for uuid in &image.deleted {
            batch.insert(deleted_key(uuid), Vec::new());
        }
        for (node, entry) in &image.admin {
            batch.insert(admin_key(*node), serde_json::to_vec(entry).map_err(err)?);
        }
        for (node, record) in &image.nodes {
            batch.insert(node_key(*node), serde_json::to_vec(record).map_err(err)?);
        }
        for (key, value) in &image.settings {
            batch.insert(setting_key(key), serde_json::to_vec(value).map_err(err)?);
        }
        for (node, mark) in &image.nonce_marks {
            batch.insert(nonce_key(*node), &mark.to_be_bytes());
        }
        batch.insert(APPLIED_KEY, &index.to_be_bytes());
        self.tree.apply_batch(batch).map_err(err)?;
        self.applied.store(index, Ordering::Release);
        self.changed.send_replace(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AdminState;

    fn record(name: &str, uuid: &str, generation: u64) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            uuid: uuid.into(),
            size_bytes: 1 << 20,
            read_only: false,
            created_unix_s: 1,
            replicas: 1,
            voters: vec![1, 2],
            group_id: 3,
            initial_voters: vec![1, 2],
            generation,
            labels: Default::default(),
            ..VolumeRecord::default()
        }
    }

    fn put(id: u64, r: &VolumeRecord, expect: Option<u64>) -> Bytes {
        Proposal { id, op: CatalogOp::PutVolume { record: r.clone(), expect } }.encode()
    }

    fn open(dir: &std::path::Path) -> CatalogMachine {
        CatalogMachine::open(&sled::open(dir).unwrap(), "cluster_catalog").unwrap()
    }

    #[test]
    fn creates_are_unique_and_changes_are_compare_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path());
        let a = record("v", "u1", 1);
        let b = record("v", "u2", 1);
        // Two creates of one name in one entry: the first wins, the second sees it.
        m.apply(1, &[put(10, &a, None), put(11, &b, None)]).unwrap();
        assert_eq!(m.take_outcome(10), Some(Outcome::Applied));
        assert_eq!(m.take_outcome(11), Some(Outcome::Conflict { current: Some(Box::new(a.clone())) }));
        assert_eq!(m.take_outcome(10), None, "an outcome is taken once");
        // A retried create of the same record conflicts with itself: `holds` says done.
        m.apply(2, &[put(10, &a, None)]).unwrap();
        assert!(m.take_outcome(10).unwrap().holds(&a));
        // A change needs the generation it replaces.
        let a2 = VolumeRecord { size_bytes: 2 << 20, generation: 2, ..a.clone() };
        m.apply(3, &[put(12, &a2, Some(5))]).unwrap();
        assert!(!m.take_outcome(12).unwrap().holds(&a2));
        m.apply(4, &[put(13, &a2, Some(1))]).unwrap();
        assert_eq!(m.take_outcome(13), Some(Outcome::Applied));
        assert_eq!(m.volume("v").unwrap(), Some(a2.clone()));
        // Deleted: gone, and its uuid can never come back.
        let del = Proposal { id: 14, op: CatalogOp::DeleteVolume { name: "v".into(), uuid: "u1".into() } };
        m.apply(5, &[del.encode()]).unwrap();
        assert_eq!(m.take_outcome(14), Some(Outcome::Applied));
        m.apply(6, &[put(15, &a, None)]).unwrap();
        assert_eq!(m.take_outcome(15), Some(Outcome::Conflict { current: None }));
        assert!(m.volumes().unwrap().is_empty());
        assert_eq!(m.deleted().unwrap(), vec!["u1".to_string()]);
        // Entries at or below the applied index are not applied again.
        m.apply(6, &[put(16, &b, None)]).unwrap();
        assert_eq!(m.take_outcome(16), None);
        assert!(m.volumes().unwrap().is_empty());
        // Undecodable proposals are skipped alike everywhere; the index still advances.
        m.apply(7, &[Bytes::from_static(b"{not json")]).unwrap();
        assert_eq!(m.applied_index(), 7);
    }

    #[test]
    fn state_survives_reopen_and_travels_as_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = {
            let m = open(dir.path());
            m.apply(1, &[put(1, &record("a", "ua", 1), None), put(2, &record("b", "ub", 1), None)]).unwrap();
            let admin =
                Proposal { id: 3, op: CatalogOp::SetNodeAdmin { node: 4, state: AdminState::Draining } };
            m.apply(2, &[admin.encode()]).unwrap();
            let del = Proposal { id: 4, op: CatalogOp::DeleteVolume { name: "b".into(), uuid: "ub".into() } };
            let node = NodeRecord {
                report: crate::model::NodeReport { id: 4, zone: "z1".into(), ..Default::default() },
                peer_addr: "10.0.0.4:10811".into(),
            };
            let reg = Proposal { id: 5, op: CatalogOp::PutNode { node } };
            let set = Proposal {
                id: 6,
                op: CatalogOp::SetSetting { key: "node_dead_after_s".into(), value: serde_json::json!(90) },
            };
            m.apply(3, &[del.encode(), reg.encode(), set.encode()]).unwrap();
            assert_eq!(m.flush().unwrap(), 3);
            m.image().unwrap()
        };
        let m = open(dir.path());
        assert_eq!(m.applied_index(), 3);
        assert_eq!(m.admin().unwrap()[&4], AdminEntry { state: AdminState::Draining, generation: 2 });
        assert_eq!(image.0, 3);
        // Installed over different state, the image replaces all of it.
        let other = tempfile::tempdir().unwrap();
        let n = open(other.path());
        n.apply(1, &[put(9, &record("zzz", "uz", 1), None)]).unwrap();
        n.install(image.0, image.1.clone()).unwrap();
        assert_eq!(n.applied_index(), 3);
        assert_eq!(n.volumes().unwrap(), m.volumes().unwrap());
        assert_eq!(n.deleted().unwrap(), vec!["ub".to_string()]);
        assert_eq!(n.admin().unwrap(), m.admin().unwrap());
        assert_eq!(n.nodes().unwrap()[&4].report.zone, "z1");
        assert_eq!(n.settings().unwrap()["node_dead_after_s"], serde_json::json!(90));
        assert_eq!(n.image().unwrap(), image);
        // An image offered under another index is refused.
        assert!(n.install(4, image.1).is_err());
    }
}
