//! Sending a [`Request`] to another node over the replication transport's application
//! messages, and what can go wrong on the way.

use std::time::Duration;

use raftblk_replication::node::ReplicationNode;

use super::protocol::{Answer, RemoteError, Request};

/// Why a control request did not get an answer other than a refusal.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The peer did not answer or the transport refused.
    #[error("{0}")]
    Unreachable(String),
    /// The peer answered with a refusal.
    #[error("refused: {0}")]
    Refused(RemoteError),
    /// The answer did not decode.
    #[error("unintelligible answer: {0}")]
    Garbled(String),
}

/// Sends `request` to node `to` and returns its answer; refusals become
/// [`ControlError::Refused`].
pub async fn send(
    node: &ReplicationNode,
    to: u64,
    request: &Request,
    timeout: Duration,
) -> Result<Answer, ControlError> {
    let answer = node
        .control(to, request.encode(), timeout)
        .await
        .map_err(|e| ControlError::Unreachable(e.to_string()))?;
    match Answer::decode(&answer) {
        Ok(Answer::Error(e)) => Err(ControlError::Refused(e)),
        Ok(a) => Ok(a),
        Err(e) => Err(ControlError::Garbled(e.to_string())),
    }
}
