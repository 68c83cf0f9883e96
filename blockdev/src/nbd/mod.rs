//! The NBD front end (fixed newstyle, structured replies, block status).
//!
//! An [`NbdServer`] accepts TCP or Unix-socket connections and serves the exports an
//! [`ExportCatalog`] names, each backed by a [`crate::BlockBackend`].
//!
//! The protocol logic is sans-IO, one job per module:
//! - [`proto`]: wire constants, [`proto::Cookie`], [`proto::NbdErrno`];
//! - [`handshake`]: fixed newstyle option negotiation as a state machine over bytes;
//! - [`request`]: request framing and validation against what was negotiated;
//! - [`reply`]: simple and structured reply encoding (and decoding, for clients);
//! - `server`: the tokio shell around them. Per connection, a reader task frames
//!   requests and spawns each (at most [`MAX_INFLIGHT_REQUESTS`] at once, and at most
//!   [`MAX_INFLIGHT_PAYLOAD_BYTES`] of read and write data), so requests complete out of
//!   order; one writer task owns the socket's write half and sends every reply.
//!
//! Supported: options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT` (`base:allocation`
//! only); commands `READ`, `WRITE` (+`FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES`
//! (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` (`REQ_ONE`), `CACHE`, `DISC`. No TLS
//! (`STARTTLS` gets `NBD_REP_ERR_UNSUP`), no extended headers.
//!
//! Failure model: a framing violation (bad magic, oversized write payload, bad option
//! magic) closes only that connection; a well-framed bad request gets an error reply.

use std::sync::Arc;

pub mod fuzzing;
pub mod handshake;
pub mod proto;
pub mod reply;
pub mod request;
mod server;

#[cfg(test)]
mod tests;

pub use server::{
    DirectSession, NbdServer, HANDSHAKE_TIMEOUT, MAX_INFLIGHT_PAYLOAD_BYTES, MAX_INFLIGHT_REQUESTS,
    SHUTDOWN_DRAIN_TIMEOUT,
};

/// An export as listed by `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name a client passes to `NBD_OPT_GO`.
    pub name: String,
    /// Human-readable description.
    pub description: String,
}

/// An export opened for one connection.
pub struct OpenExport {
    /// Where the bytes live.
    pub backend: Arc<dyn crate::BlockBackend>,
    /// Refuse writes, trims and zeroes, and advertise `NBD_FLAG_READ_ONLY`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: a flush on one connection covers writes
    /// completed on every connection to this export.
    pub multi_conn: bool,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Dropped when the connection closes (e.g. to release a lock or a counter).
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for OpenExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenExport")
            .field("size_bytes", &self.backend.size_bytes())
            .field("read_only", &self.read_only)
            .field("multi_conn", &self.multi_conn)
            .field("description", &self.description)
            .finish_non_exhaustive()
    }
}

/// Why an export could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    #[error("no export named {0:?}")]
    NotFound(String),
    /// The export exists but may not be opened now (`NBD_REP_ERR_POLICY`).
    #[error("{0}")]
    Refused(String),
}

/// The exports a server offers. `open("")` is the default export; the catalog decides
/// what that means.
pub trait ExportCatalog: Send + Sync + 'static {
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// Opens an export for one connection (also used to answer `NBD_OPT_INFO` and
    /// meta context queries; the result is dropped right after those).
    fn open(&self, name: &str) -> Result<OpenExport, OpenError>;
}
