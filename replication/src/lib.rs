//! Replication for raftblk volumes.
//!
//! Every volume will be one Raft group (raft-rs), and every node runs many groups. This crate
//! holds what they share on a node. Today that is the write-ahead log ([`wal`]); the Raft
//! storage over it, the transport between nodes and snapshots come with issue 2/3. Until then
//! volumes are served by a single local `raftblk_blockdev::store::FileBackend`.
//!
//! How data will flow:
//!
//! ```text
//! replicated volume (a BlockBackend)
//!   │ write request ─▶ propose on the volume's Raft group
//!   ▼
//! Raft driver, one per node (issue 2/3): polls every group's Ready
//!   │ entries + hard states of many groups ─▶ Wal::append (one batch)
//!   │ one Wal::sync (group commit: one fdatasync for all of them)
//!   │ then send messages, apply committed entries to the volume's store
//!   │ applied index ─▶ CompactTo record ─▶ segments nobody needs are deleted
//!   ▼
//! wal::Wal ─▶ wal::segment (files <id>.wal, framed records) ─▶ wal::disk::WalDisk
//!                                                              (StdDisk, SimDisk, later io_uring)
//! ```
//!
//! The WAL is synchronous and single-owner: the driver thread holds it. Everything that
//! touches the file system goes through [`wal::disk::WalDisk`], so the same code runs in
//! production and against the simulated disk in tests.

#![forbid(unsafe_code)]

pub mod storage;
pub mod transport;
pub mod wal;
