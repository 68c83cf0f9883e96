//! Replication for raftblk volumes (issue 2/3): one Raft group per volume over a
//! shared transport and write-ahead log. Not built yet; until then volumes are
//! served by a single local `raftblk_blockdev::store::FileBackend`.
