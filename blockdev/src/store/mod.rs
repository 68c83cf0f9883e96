//! Stores that keep a volume's bytes: a sparse file driven by an I/O engine, or memory.
//!
//! - [`FileBackend`] ([`file`]) keeps a volume in a sparse file. Aligned requests
//!   bypass the page cache with `O_DIRECT`, the rest go through it; TRIM and
//!   WRITE_ZEROES become `fallocate`, block status comes from `SEEK_DATA`/`SEEK_HOLE`.
//! - [`IoEngine`] ([`engine`]) does the file I/O: the io_uring engine ([`uring`],
//!   ring threads that batch submissions) or the sync engine (blocking calls on
//!   Tokio's blocking pool). [`EngineKind::Auto`] picks io_uring when the kernel
//!   allows it.
//! - [`AlignedBuf`] ([`aligned`]) is the 4096-aligned buffer that direct I/O needs;
//!   it turns into [`bytes::Bytes`] without copying, so a front end that receives
//!   write payloads into one gets zero-copy direct writes.
//! - [`MemBackend`] ([`mem`]) keeps a volume in memory; it is the model the file
//!   store is tested against.
//! - [`SealedFile`] ([`sealed`]) is a [`FileBackend`] plus a metadata file: a checksum
//!   (and for encrypted volumes a nonce and tag) for every 4 KiB block, checked on every
//!   read. Every volume's copy is one (see [`crate::seal`]).
//!
//! `unsafe` code in this crate lives in [`uring`] only.

pub mod aligned;
pub mod engine;
pub mod file;
#[cfg_attr(test, allow(clippy::unwrap_used))]
pub mod mem;
pub mod sealed;
mod sync;
pub mod uring;

#[cfg(test)]
mod proptests;

pub use aligned::{AlignedBuf, DIRECT_IO_ALIGN_BYTES};
pub use engine::{ChainStep, EngineError, EngineKind, FallocMode, IoEngine};
pub use file::{FileBackend, FileError, BLOCK_STATUS_EXTENTS_MAX};
pub use mem::MemBackend;
pub use sealed::{SealedError, SealedFile};
pub use uring::UringError;
