//! What the cluster catalog's log carries: one [`Proposal`] per `Command::App`, as JSON
//! (small, rare, and readable in a debugger), and what applying one did.

use serde::{Deserialize, Serialize};

use super::{AdminState, NodeRecord, VolumeRecord};

/// One change to the catalog, with the proposer's id for it (to find its [`Outcome`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Chosen by the proposer; a retry of the same change keeps it.
    pub id: u64,
    /// The change.
    pub op: CatalogOp,
}

/// A change to the catalog. Each is conditional or idempotent, so a proposal retried after
/// a lost answer (and so applied twice) changes nothing the second time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CatalogOp {
    /// Creates a volume record (`expect: None`: the name must be free and the uuid never
    /// deleted) or replaces one (`expect: Some(g)`: the current record has the same uuid
    /// and generation `g`).
    PutVolume { record: VolumeRecord, expect: Option<u64> },
    /// Deletes the volume `name` if it still has `uuid`; the uuid is remembered as deleted.
    DeleteVolume { name: String, uuid: String },
    /// Records an operator's decision about a node.
    SetNodeAdmin { node: u64, state: AdminState },
    /// Registers a node (or updates its registration): what it reports about itself.
    PutNode { node: NodeRecord },
    /// Sets a cluster setting (checked by `cluster_catalog::settings::validate` before proposing).
    SetSetting { key: String, value: serde_json::Value },
    /// Reserves `count` of node `node`'s nonce counter values, at or above `at_least` and
    /// above every value reserved for it before ([`Outcome::Reserved`] says which). A retry
    /// applied twice reserves twice, which wastes values and never repeats one.
    ReserveNonces { node: u64, at_least: u64, count: u64 },
}

/// What applying a proposal did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The change was made.
    Applied,
    /// The condition did not hold; `current` is the record the name has now (if any).
    Conflict { current: Option<Box<VolumeRecord>> },
    /// Nonce counter values `[from, to)` are the proposer's.
    Reserved { from: u64, to: u64 },
}

impl Proposal {
    /// The log form.
    pub fn encode(&self) -> bytes::Bytes {
        // A struct of strings, integers and enums always serializes.
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses the log form.
    pub fn decode(bytes: &[u8]) -> Result<Proposal, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl Outcome {
    /// Whether `wanted` is in the catalog now: the change was made, or it had been made
    /// already (by an earlier attempt of the same proposal).
    pub fn holds(&self, wanted: &VolumeRecord) -> bool {
        match self {
            Outcome::Applied => true,
            Outcome::Conflict { current } => current.as_deref() == Some(wanted),
            Outcome::Reserved { .. } => false,
        }
    }
}
