//! Groups whose replicas apply their log to a state machine rather than a block store (the
//! cluster catalog is one). The runner treats both alike: entries carry [`Command::App`]
//! payloads, opaque here, and each replica hands them to its [`StateMachine`] in log order.
//!
//! The differences from a volume, and why:
//! * A state machine keeps its applied index itself, in the same atomic write as the state
//!   it changes, so [`StateMachine::apply`] can skip entries it already holds and a replay
//!   after a crash or a snapshot is exact (commands may be conditional, unlike block writes,
//!   so replaying an entry twice would not be safe).
//! * A snapshot is one consistent image ([`StateMachine::image`]), not a fuzzy copy: the
//!   source serves its whole state as one chunk, with the index it was taken at, and the
//!   receiver installs it and skips every entry up to that index.
//!
//! [`Command::App`]: crate::volume::command::Command::App

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

/// Why a state machine failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state machine: {0}")]
pub struct MachineError(pub String);

/// A replicated state machine, applied by the runner thread (calls must be quick: the runner
/// serves every group on the node).
pub trait StateMachine: Send + Sync {
    /// Applies entry `index`'s commands (empty for a no-op or a membership change) and
    /// records `index` as applied, atomically. Entries at or below
    /// [`StateMachine::applied_index`] are ignored. Must be deterministic: every replica
    /// applies the same entries and must reach the same state.
    fn apply(&self, index: u64, commands: &[Bytes]) -> Result<(), MachineError>;
    /// Highest index applied.
    fn applied_index(&self) -> u64;
    /// Makes every applied entry durable; returns the highest index now durable.
    fn flush(&self) -> Result<u64, MachineError>;
    /// The whole state and the index it reflects.
    fn image(&self) -> Result<(u64, Bytes), MachineError>;
    /// Replaces the whole state by `image`, taken at `index`.
    fn install(&self, index: u64, image: Bytes) -> Result<(), MachineError>;
}

/// What a state machine group's replica applies committed entries to.
#[derive(Clone)]
pub struct MachineStore {
    /// The state machine.
    pub machine: Arc<dyn StateMachine>,
    /// File that exists while the state is being fetched from peers (see
    /// [`crate::snapshot::marker`]).
    pub rebuild_path: PathBuf,
}
