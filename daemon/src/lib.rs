//! raftblk's node daemon as a library, so tests can drive it in-process.
//!
//! `raftblkd` loads a [`config::Config`], opens the [`volumes::VolumeManager`]
//! (catalog in sled, data files through the blockdev crate's I/O engine), and
//! serves it two ways: the NBD server of `raftblk-blockdev` resolves export names
//! through the manager, and the [`api`] router manages volumes over HTTP. Every
//! served volume is wrapped in a [`metrics::MeteredBackend`].
//! In a cluster, [`nodes`] tracks which nodes are alive (heartbeats) and what operators
//! decided about them, [`healer`] replaces copies on dead or drained nodes and spreads
//! leaders, [`cluster_catalog`] replicates volume records and operators' decisions through
//! a Raft group of their own, and [`cluster`] carries the control messages between nodes.
//! Every volume's copy is a sealed file (checksums, and for encrypted volumes AES-256-GCM,
//! see `raftblk_blockdev::seal`); [`keys`] holds the key-encryption keys that unwrap
//! encrypted volumes' data keys, and the node's nonce reservation.
//! [`attach`] serves volumes to the kernel's own NBD client as local `/dev/nbdN` devices
//! and keeps them served across restarts of this daemon.
//! `raftblk` (the CLI) is a thin HTTP client of the same API ([`api_client`]).

pub mod api;
pub mod api_client;
pub mod attach;
pub mod catalog;
pub mod cluster;
pub mod cluster_catalog;
pub mod config;
pub mod control;
pub mod csi;
pub mod devcluster;
pub mod healer;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod model;
pub mod mounts;
pub mod nodes;
pub mod planner;
pub mod publish;
pub mod scrub;
pub mod size;
pub mod volumes;
