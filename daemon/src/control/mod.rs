//! How nodes ask each other things: the typed, versioned [`protocol`] and the [`client`]
//! that sends a request over the replication transport. The answering side is whoever the
//! daemon installs as the node's control handler (`crate::cluster::install_handler`).
//! This module sits at the bottom of the crate: it speaks [`crate::model`]'s vocabulary
//! and imports nothing else of the daemon, so every part above can use it.

pub mod client;
pub mod fuzzing;
pub mod protocol;

pub use client::{send, ControlError};
pub use protocol::{
    Answer, DecodeError, ErrorKind, GroupView, MembershipChange, RemoteError, Request, WaitCondition,
    WAIT_GROUP_MAX_MS,
};
