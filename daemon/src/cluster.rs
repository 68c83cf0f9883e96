//! Control messages between nodes: how volume records reach every node of a
//! cluster (until the cluster catalog of issue 3/3 replaces this), carried as
//! JSON in the replication transport's application messages.
//!
//! A create, grow or delete is applied locally and then pushed to every peer.
//! A peer that was down catches up through the sync loop: every
//! [`SYNC_INTERVAL`] each node pulls every peer's records and tombstones and
//! applies what it lacks. Tombstones keep a deleted volume from coming back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use raftblk_replication::node::ReplicationNode;
use serde::{Deserialize, Serialize};

use crate::catalog::VolumeRecord;
use crate::volumes::VolumeManager;

/// How often each node pulls its peers' volume records.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long a sync waits for one peer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

/// A control-plane request from one node to another.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ControlMessage {
    /// Create (or learn the new size of) a volume.
    Upsert(VolumeRecord),
    /// Forget a deleted volume.
    Delete {
        /// The deleted volume's uuid.
        uuid: String,
    },
    /// Send every record and tombstone.
    List,
    /// If leading `group_id`, propose a membership change.
    Membership {
        /// The volume's group.
        group_id: u64,
        /// "add_learner", "promote" or "remove".
        change: String,
        /// The node concerned.
        node: u64,
    },
    /// Report the replication status of `group_id` as this node sees it.
    GroupStatus {
        /// The volume's group.
        group_id: u64,
    },
    /// If leading `group_id`, hand leadership to node `to`.
    TransferLeader {
        /// The volume's group.
        group_id: u64,
        /// The node to lead next.
        to: u64,
    },
}

/// The answer to a [`ControlMessage`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ControlAnswer {
    /// Done.
    Ok,
    /// Refused or failed, with the reason.
    Error(String),
    /// The answer to `GroupStatus`: leader, commit index, voters, learners, progress.
    Status {
        /// Leader known (0: none).
        leader: u64,
        /// Commit index.
        commit_index: u64,
        /// Voters.
        voters: Vec<u64>,
        /// Learners.
        learners: Vec<u64>,
        /// Matched index per node (leader only).
        progress: Vec<(u64, u64)>,
        /// This node's copy is being rebuilt from a snapshot.
        #[serde(default)]
        rebuild: Option<crate::volumes::RebuildView>,
    },
    /// The answer to `List`.
    List {
        /// Every volume record.
        volumes: Vec<VolumeRecord>,
        /// Uuids of deleted volumes.
        deleted: Vec<String>,
    },
}

/// Why a control message did not get an `Ok`.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The peer did not answer or the transport refused.
    #[error("{0}")]
    Unreachable(String),
    /// The peer answered with an error.
    #[error("refused: {0}")]
    Refused(String),
    /// The answer did not decode.
    #[error("unintelligible answer: {0}")]
    Garbled(String),
}

/// Sends `msg` to node `to` and returns its answer; `Error` answers become errors.
pub async fn send(
    node: &ReplicationNode,
    to: u64,
    msg: &ControlMessage,
    timeout: Duration,
) -> Result<ControlAnswer, ControlError> {
    let payload = serde_json::to_vec(msg).map_err(|e| ControlError::Garbled(e.to_string()))?;
    let answer = node
        .control(to, Bytes::from(payload), timeout)
        .await
        .map_err(|e| ControlError::Unreachable(e.to_string()))?;
    match serde_json::from_slice::<ControlAnswer>(&answer) {
        Ok(ControlAnswer::Error(e)) => Err(ControlError::Refused(e)),
        Ok(a) => Ok(a),
        Err(e) => Err(ControlError::Garbled(e.to_string())),
    }
}

/// Makes `volumes` answer peers' control messages.
pub fn install_handler(node: &ReplicationNode, volumes: Arc<VolumeManager>) {
    node.set_control_handler(Arc::new(move |payload: Bytes| {
        let volumes = volumes.clone();
        Box::pin(async move {
            let answer = match serde_json::from_slice::<ControlMessage>(&payload) {
                Ok(msg) => volumes.on_control(msg).await,
                Err(e) => ControlAnswer::Error(format!("malformed control message: {e}")),
            };
            Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
        })
    }));
}

/// Pulls every peer's records once and applies what this node lacks.
pub async fn sync_once(node: &ReplicationNode, volumes: &VolumeManager) {
    for peer in node.peer_ids() {
        match send(node, peer, &ControlMessage::List, SYNC_TIMEOUT).await {
            Ok(ControlAnswer::List { volumes: records, deleted }) => {
                for uuid in deleted {
                    if let Err(e) = volumes.delete_uuid(&uuid).await {
                        tracing::warn!(peer, %uuid, error = %e, "cannot apply a peer's delete");
                    }
                }
                for record in records {
                    let name = record.name.clone();
                    if let Err(e) = volumes.upsert(record).await {
                        tracing::warn!(peer, volume = %name, error = %e, "cannot apply a peer's volume record");
                    }
                }
            }
            Ok(other) => tracing::debug!(peer, ?other, "unexpected answer to List"),
            Err(e) => tracing::debug!(peer, error = %e, "catalog sync with peer failed"),
        }
    }
}

/// Runs [`sync_once`] every [`SYNC_INTERVAL`] until `stop`.
pub async fn sync_loop(
    node: ReplicationNode,
    volumes: Arc<VolumeManager>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        sync_once(&node, &volumes).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_json() {
        let record = VolumeRecord {
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 4096,
            read_only: false,
            created_unix_s: 1,
            replicas: 2,
            voters: vec![1, 2, 3],
            group_id: 9,
            initial_voters: vec![1, 2, 3],
        };
        for m in [
            ControlMessage::Upsert(record.clone()),
            ControlMessage::Delete { uuid: "u".into() },
            ControlMessage::List,
            ControlMessage::TransferLeader { group_id: 9, to: 2 },
        ] {
            let bytes = serde_json::to_vec(&m).unwrap();
            assert_eq!(serde_json::from_slice::<ControlMessage>(&bytes).unwrap(), m);
        }
        let a = ControlAnswer::List { volumes: vec![record], deleted: vec!["x".into()] };
        assert_eq!(serde_json::from_slice::<ControlAnswer>(&serde_json::to_vec(&a).unwrap()).unwrap(), a);
    }
}
