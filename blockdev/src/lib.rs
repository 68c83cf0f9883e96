//! Block devices for raftblk: the front ends that speak to block clients and the
//! stores that keep the bytes.
//!
//! Data flows one way through this crate: a front end ([`nbd`]) decodes a client
//! request, turns it into a call on a [`BlockBackend`], and encodes the result as
//! a reply. A `BlockBackend` is the single seam between front ends and storage:
//! [`store::FileBackend`] keeps a volume in a sparse file through an io_uring (or
//! plain pread/pwrite) [`store::engine`], [`store::MemBackend`] keeps it in memory
//! for tests, and the replicated volume of `raftblk-replication` will be a third.

pub mod backend;
pub mod nbd;
pub mod seal;
pub mod store;

pub use backend::{BackendError, BackendResult, BlockBackend, Extent, ExtentKind};
