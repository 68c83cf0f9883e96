//! Replication for raftblk volumes.
//!
//! Every volume is one Raft group (raft-rs), and every node runs many groups over one
//! write-ahead log ([`wal`]). [`storage::GroupStorage`] is a group's `raft::Storage` on that
//! WAL; [`volume::group::GroupDriver`] drives a group's `RawNode` sans-IO; [`volume::command`]
//! is what the entries carry (sealed blocks: checksummed, and encrypted where the volume is,
//! by the node that received the write); [`volume::apply_entries`] applies them to a copy
//! (a `raftblk_blockdev::seal::CopyStore`), the same function in production and in the
//! simulator. [`node`] runs every group of a node as one sans-IO core (`node::node_core`)
//! behind a thread shell; the simulator drives the same core. [`transport`] carries Raft
//! messages between nodes.
//! Logs are compacted once applied; a replica that falls behind the compacted log (or loses
//! its copy) pulls the volume from a peer as a [`snapshot`] and replays its log over it.
//! Groups that replicate a [`machine::StateMachine`] instead of a volume (the cluster
//! catalog) share all of this; only what applying and snapshots mean differs. A
//! deterministic simulator (`sim`, tests only) runs 3 or 5 nodes with crashes, torn disks, rotting blocks and
//! a faulty network and checks the guarantees below.
//!
//! How one write flows:
//!
//! ```text
//! client write ─▶ GroupDriver::propose (leader only; else NotLeader → client retries)
//!   │
//! node core (node::node_core, sans-IO; the runner thread carries out what it asks), per round,
//! over all groups:
//!   │ GroupDriver::collect: entries + hard state ─▶ Wal::append (not durable yet)
//!   │                       leader's append messages ─▶ transport (safe before the sync)
//!   │                       committed entries (durable here and in a majority), whose
//!   │                       writes are acknowledged now
//!   │ Wal::begin_sync: one fdatasync for every group (group commit; none if the round only
//!   │            moved commit indexes), run by the sync thread while the next rounds go on
//!   │            (one sync at a time; the next covers every round that asked meanwhile)
//!   │ NodeCore::synced ─▶ GroupDriver::on_persisted, round by round in order: votes and
//!   │            append acks ─▶ transport; the next collect hands out what became committed
//!   │ apply committed entries, in order, on the runtime ─▶ the volume's local copy (one
//!   │            apply task per group in flight; the next rounds do not wait for it)
//!   │ Event::Applied ─▶ NodeCore::applied ─▶ GroupDriver::applied ─▶ reads that may proceed
//!   │            (they wait for the commit index they started at to be applied), guarded
//!   │            writes and state-machine commands answered
//!   ▼
//! wal::Wal ─▶ wal::segment (files <id>.wal, framed records) ─▶ wal::disk::WalDisk
//!                                                              (UringDisk or StdDisk, SimDisk)
//! ```
//!
//! Reads go through ReadIndex: the leader confirms it still leads with a heartbeat round, and
//! the read runs on the local store once it has applied up to the leader's commit index, so
//! no read returns data older than a write acknowledged before it began. FLUSH and FUA need no
//! work of their own (see [`volume`]).
//!
//! The WAL is single-owner per node (shared by the groups behind a mutex); its appends run on
//! the runner thread and its `fdatasync`s on the sync thread, outside the lock. Its segments
//! reuse the files of deleted ones, so a sync rewrites allocated blocks.
//! Everything that touches the file system goes through [`wal::disk::WalDisk`], so the same
//! code runs in production and against the simulated disk in tests.

// The one exception is `wal::uring::ring`, the io_uring submission code, which allows it
// for itself with a `// SAFETY:` comment on every block.
#![deny(unsafe_code)]

pub mod durable_file;
pub mod fuzzing;
pub mod gather;
pub mod machine;
pub mod node;
#[cfg(test)]
mod sim;
pub mod snapshot;
pub mod storage;
pub mod transport;
pub mod volume;
pub mod wal;
