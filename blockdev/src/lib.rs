//! Block devices for raftblk: the front ends that speak to block clients and the
//! stores that keep the bytes.
//!
//! Data flows one way through this crate: a front end ([`nbd`]) decodes a client
//! request, turns it into a call on a [`BlockBackend`], and encodes the result as
//! a reply. A `BlockBackend` is the single seam between front ends and storage.
//! Every volume is served by a [`seal::SealingBackend`]: it turns plaintext bytes into
//! sealed 4 KiB blocks (a crc32c each, and AES-256-GCM for encrypted volumes) and back,
//! over a [`seal::SealedStore`]: [`store::SealedFile`] (a data file and a metadata file,
//! driven by an io_uring or plain pread/pwrite [`store::engine`]) on a node alone, or the
//! replicated volume of `raftblk-replication`, whose copies are `SealedFile`s too (as a
//! [`seal::CopyStore`]). [`store::FileBackend`] and [`store::MemBackend`] are plain
//! byte stores (the data file of a `SealedFile`, and a model for tests).

pub mod backend;
pub mod kernel_nbd;
pub mod nbd;
pub mod seal;
pub mod store;

pub use backend::{BackendError, BackendResult, BlockBackend, Extent, ExtentKind};
