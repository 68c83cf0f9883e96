//! A volume's Raft group as one node sees it, as control answers carry it.

use serde::{Deserialize, Serialize};

/// A copy being rebuilt from its peers (snapshot streaming).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RebuildView {
    /// The node whose copy is rebuilt.
    pub node: u64,
    /// Snapshot index the copy is taken at.
    pub index: u64,
    /// Bytes of the volume covered so far.
    pub done_bytes: u64,
    /// The volume's size.
    pub total_bytes: u64,
    /// Bytes of data transferred (holes cost nothing).
    pub copied_bytes: u64,
    /// The node the last chunk came from.
    pub source: u64,
    /// Seconds since the copy (re)started.
    pub elapsed_s: u64,
}
