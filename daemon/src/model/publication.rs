//! A node's right to attach a volume, as a volume record keeps it (see `crate::publish`
//! for the rules that hand these out).

use serde::{Deserialize, Serialize};

/// One node's right to attach a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// The node (its raftblk node id; 0 for a node alone).
    pub node: u64,
    /// Read-only.
    pub read_only: bool,
    /// The attachment generation its writes carry (read-only ones carry the fence current
    /// when they were made, and never write).
    pub generation: u64,
}
