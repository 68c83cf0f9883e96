//! The node-to-node control protocol: what one node asks another ([`Request`]) and what
//! comes back ([`Answer`]), with refusals as typed [`RemoteError`]s so a caller on another
//! node can tell "no such volume" from "no leader right now" without reading prose.
//!
//! On the wire each is JSON inside a versioned envelope, `{"v":1,"m":…}` (small, rare, and
//! readable in a capture). A decoder meets bytes from any peer, so it never panics: bytes
//! that are not an envelope, or an envelope of another version, come back as a
//! [`DecodeError`] that the server answers with [`ErrorKind::Malformed`] or
//! [`ErrorKind::Unsupported`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::model::{AdminEntry, Member, NodeReport, Outcome, Proposal, VolumeRecord};
pub use crate::model::{GroupView, MembershipChange, WaitCondition};

/// The protocol version this build speaks (and the only one it decodes).
pub const VERSION: u32 = 1;

/// Longest a `WaitGroup` request is held before it is answered (below a control message's
/// timeout, so the answer arrives).
pub const WAIT_GROUP_MAX_MS: u64 = 3_000;

/// A control request from one node to another.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Create (or learn the new size of) a volume.
    Upsert(VolumeRecord),
    /// Forget a deleted volume.
    Delete {
        /// The deleted volume's uuid.
        uuid: String,
    },
    /// Commit a change to the cluster catalog (sent to the catalog leader).
    CatalogPropose(Proposal),
    /// If leading `group_id`, propose a membership change.
    Membership {
        /// The volume's group.
        group_id: u64,
        /// What to change.
        change: MembershipChange,
        /// The node concerned.
        node: u64,
    },
    /// Report the replication status of `group_id` as this node sees it.
    GroupStatus {
        /// The volume's group.
        group_id: u64,
    },
    /// Answer `GroupStatus` for `group_id` once `until` holds here, or after `timeout_ms`
    /// (at most [`WAIT_GROUP_MAX_MS`]) with the view as it is then.
    WaitGroup {
        /// The volume's group.
        group_id: u64,
        /// What to wait for.
        until: WaitCondition,
        /// How long to wait at most.
        timeout_ms: u64,
    },
    /// If leading `group_id`, hand leadership to node `to`.
    TransferLeader {
        /// The volume's group.
        group_id: u64,
        /// The node to lead next.
        to: u64,
    },
    /// The sender is alive: its report and the operator decisions it knows.
    Heartbeat {
        /// The sender's report.
        report: NodeReport,
        /// Operator decisions, by node id.
        admin: BTreeMap<u64, AdminEntry>,
    },
    /// A node joined (or moved): add it as a peer at `peer_addr`.
    AddPeer {
        /// Its node id.
        id: u64,
        /// Its peer address.
        peer_addr: SocketAddr,
    },
    /// Send every member this node knows (itself included).
    Members,
    /// Load the KEK in this file (the same path on every node) for a rotation; answer
    /// with its id.
    LoadKek {
        /// Absolute path of the key file.
        path: PathBuf,
    },
    /// Wrap new volumes' data keys with this KEK from now on (the end of a rotation).
    UseKek {
        /// The KEK's id.
        id: String,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Answer {
    /// Done.
    Ok,
    /// Refused or failed, with what kind of refusal it is.
    Error(RemoteError),
    /// The answer to `GroupStatus`.
    Status(GroupView),
    /// The answer to `CatalogPropose`: what applying the change did, and an index of the
    /// catalog log at or after it.
    Catalog {
        /// What applying the change did.
        outcome: Outcome,
        /// The leader's applied index when it answered.
        index: u64,
    },
    /// The answer to `Members`: the answering node and every peer it knows.
    Members(Vec<Member>),
    /// The answer to `LoadKek`: the id of the key the node loaded.
    Kek {
        /// The KEK's id.
        id: String,
    },
    /// The answer to `Heartbeat`: the answering node's report and decisions.
    Heartbeat {
        /// The answering node's report.
        report: NodeReport,
        /// Operator decisions, by node id.
        admin: BTreeMap<u64, AdminEntry>,
    },
}

/// A refusal as it crosses nodes: its kind (what the caller may do about it) and the
/// answering node's message (what a person reads).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// What kind of refusal.
    pub kind: ErrorKind,
    /// The answering node's explanation.
    pub message: String,
}

/// What kind of refusal a [`RemoteError`] is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request is wrong (bad argument, not possible on that node).
    Invalid,
    /// What it names does not exist there.
    NotFound,
    /// What it would create exists already.
    Exists,
    /// It conflicts with the current state (in use, changed meanwhile).
    Conflict,
    /// Not possible right now (no leader, a peer down); retrying may help.
    Unavailable,
    /// The answering node does not lead the group; `hint` is the leader it knows (0: none).
    NotLeader {
        /// The leader the answering node knows of.
        hint: u64,
    },
    /// The request was not a control message this node could read.
    Malformed,
    /// The request is of a protocol version this node does not speak.
    Unsupported,
    /// The answering node failed doing it.
    Internal,
}

impl RemoteError {
    /// A refusal of `kind` explained by `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RemoteError {
        RemoteError { kind, message: message.into() }
    }

    /// Whether asking again later (or elsewhere) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::NotLeader { .. })
    }
}

impl From<&raftblk_replication::node::NodeError> for RemoteError {
    fn from(e: &raftblk_replication::node::NodeError) -> RemoteError {
        use raftblk_replication::node::NodeError as N;
        let kind = match e {
            N::NotLeader { leader } => ErrorKind::NotLeader { hint: *leader },
            N::NotMember(_) => ErrorKind::NotFound,
            N::OutOfRange { .. } | N::Refused(_) => ErrorKind::Invalid,
            N::GuardFailed { .. } => ErrorKind::Conflict,
            N::NotReady | N::Unavailable(_) | N::Dropped | N::ShuttingDown | N::Timeout | N::Transport(_) => {
                ErrorKind::Unavailable
            }
            N::Internal(_) => ErrorKind::Internal,
        };
        RemoteError::new(kind, e.to_string())
    }
}

/// Why bytes did not decode as a control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a control envelope (or its message is not one this build knows).
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// An envelope of a version this build does not speak.
    #[error("control protocol version {got} is not spoken here (this node speaks {VERSION}); run the same raftblk release on every node")]
    Version {
        /// The version the sender used.
        got: u32,
    },
}

impl From<DecodeError> for RemoteError {
    fn from(e: DecodeError) -> RemoteError {
        let kind = match e {
            DecodeError::Malformed(_) => ErrorKind::Malformed,
            DecodeError::Version { .. } => ErrorKind::Unsupported,
        };
        RemoteError::new(kind, e.to_string())
    }
}

#[derive(Serialize)]
struct Sealed<'a, T> {
    v: u32,
    m: &'a T,
}

/// The version is read before the message, so a newer peer's message that this build
/// cannot parse is reported as a version mismatch rather than as garbage.
#[derive(Deserialize)]
struct Opened {
    v: u32,
    m: serde_json::Value,
}

fn encode<T: Serialize>(m: &T) -> Bytes {
    // Every field is a string, number, map, list or enum of them: serialization cannot fail,
    // and an empty payload would be refused as malformed by the peer rather than lost.
    Bytes::from(serde_json::to_vec(&Sealed { v: VERSION, m }).unwrap_or_default())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let opened: Opened = serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if opened.v != VERSION {
        return Err(DecodeError::Version { got: opened.v });
    }
    serde_json::from_value(opened.m).map_err(|e| DecodeError::Malformed(e.to_string()))
}

impl Request {
    /// The wire form.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
        decode(bytes)
    }
}

impl Answer {
    /// The wire form.
    pub fn encode(&self) -> Bytes {
        encode(self)
    }

    /// Parses the wire form.
    pub fn decode(bytes: &[u8]) -> Result<Answer, DecodeError> {
        decode(bytes)
    }

    /// A refusal of `kind`.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Answer {
        Answer::Error(RemoteError::new(kind, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AdminState, CatalogOp, RebuildView};
    use proptest::prelude::*;

    fn record() -> VolumeRecord {
        VolumeRecord {
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 4096,
            replicas: 2,
            voters: vec![1, 2, 3],
            group_id: 9,
            generation: 4,
            labels: [("app".to_string(), "db".to_string())].into(),
            ..VolumeRecord::default()
        }
    }

    fn requests() -> Vec<Request> {
        let report = NodeReport { id: 2, zone: "z".into(), capacity_bytes: 10, ..NodeReport::default() };
        vec![
            Request::Upsert(record()),
            Request::Delete { uuid: "u".into() },
            Request::CatalogPropose(Proposal {
                id: 3,
                op: CatalogOp::PutVolume { record: record(), expect: Some(3) },
            }),
            Request::Membership { group_id: 9, change: MembershipChange::AddLearner, node: 4 },
            Request::Membership { group_id: 9, change: MembershipChange::Promote, node: 4 },
            Request::Membership { group_id: 9, change: MembershipChange::Remove, node: 4 },
            Request::GroupStatus { group_id: 9 },
            Request::WaitGroup {
                group_id: 9,
                until: WaitCondition::CaughtUp { node: 4, slack: 16 },
                timeout_ms: 3000,
            },
            Request::WaitGroup { group_id: 9, until: WaitCondition::Copied, timeout_ms: 1 },
            Request::WaitGroup {
                group_id: 9,
                until: WaitCondition::Changed { change: MembershipChange::Remove, node: 4 },
                timeout_ms: 0,
            },
            Request::WaitGroup { group_id: 9, until: WaitCondition::LeaderNot { node: 1 }, timeout_ms: 9 },
            Request::TransferLeader { group_id: 9, to: 2 },
            Request::Heartbeat {
                report,
                admin: [(3, AdminEntry { state: AdminState::Draining, generation: 2 })].into(),
            },
            Request::AddPeer { id: 4, peer_addr: "127.0.0.1:10841".parse().expect("address") },
            Request::Members,
            Request::LoadKek { path: "/etc/raftblk/kek2".into() },
            Request::UseKek { id: "abc".into() },
        ]
    }

    fn answers() -> Vec<Answer> {
        let kinds = [
            ErrorKind::Invalid,
            ErrorKind::NotFound,
            ErrorKind::Exists,
            ErrorKind::Conflict,
            ErrorKind::Unavailable,
            ErrorKind::NotLeader { hint: 3 },
            ErrorKind::Malformed,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
        ];
        let mut out: Vec<Answer> = kinds.into_iter().map(|k| Answer::error(k, "why")).collect();
        out.extend([
            Answer::Ok,
            Answer::Status(GroupView {
                leader: 2,
                commit_index: 40,
                voters: vec![1, 2, 3],
                learners: vec![4],
                progress: vec![(1, 40), (3, 39)],
                rebuild: Some(RebuildView {
                    node: 4,
                    index: 30,
                    total_bytes: 8192,
                    ..RebuildView::default()
                }),
                connections: 1,
            }),
            Answer::Catalog { outcome: Outcome::Conflict { current: Some(Box::new(record())) }, index: 12 },
            Answer::Members(vec![Member { id: 1, peer_addr: "127.0.0.1:1".parse().expect("address") }]),
            Answer::Kek { id: "k".into() },
            Answer::Heartbeat { report: NodeReport::default(), admin: BTreeMap::new() },
        ]);
        out
    }

    #[test]
    fn every_request_and_answer_survives_the_wire() {
        for r in requests() {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
        for a in answers() {
            assert_eq!(Answer::decode(&a.encode()), Ok(a));
        }
    }

    #[test]
    fn the_wire_form_is_a_versioned_envelope_with_readable_names() {
        let m = Request::Membership { group_id: 9, change: MembershipChange::AddLearner, node: 4 };
        assert_eq!(
            std::str::from_utf8(&m.encode()).expect("utf-8"),
            r#"{"v":1,"m":{"Membership":{"group_id":9,"change":"add_learner","node":4}}}"#
        );
        let a = Answer::error(ErrorKind::NotLeader { hint: 3 }, "node 2 does not lead group 9");
        assert_eq!(
            std::str::from_utf8(&a.encode()).expect("utf-8"),
            r#"{"v":1,"m":{"Error":{"kind":{"not_leader":{"hint":3}},"message":"node 2 does not lead group 9"}}}"#
        );
    }

    #[test]
    fn another_version_or_an_unversioned_message_is_refused_with_the_reason() {
        let newer = br#"{"v":2,"m":{"SomethingNew":{}}}"#;
        assert_eq!(Request::decode(newer), Err(DecodeError::Version { got: 2 }));
        let refusal = RemoteError::from(DecodeError::Version { got: 2 });
        assert_eq!(refusal.kind, ErrorKind::Unsupported);
        assert!(refusal.message.contains("version 2"), "{refusal}");
        // The form before versioning (a bare message) is not taken for a v1 one.
        let bare = br#"{"GroupStatus":{"group_id":9}}"#;
        assert!(matches!(Request::decode(bare), Err(DecodeError::Malformed(_))));
        // A v1 envelope around something that is not a request.
        let wrong = br#"{"v":1,"m":{"Membership":{"group_id":9,"change":"demote","node":4}}}"#;
        let e = Request::decode(wrong).expect_err("an unknown change");
        assert!(e.to_string().contains("demote"), "{e}");
    }

    #[test]
    fn membership_changes_know_when_they_took_effect() {
        let (voters, learners) = (vec![1, 2, 3], vec![4]);
        assert!(MembershipChange::AddLearner.took_effect(4, &voters, &learners));
        assert!(MembershipChange::AddLearner.took_effect(3, &voters, &learners));
        assert!(!MembershipChange::AddLearner.took_effect(5, &voters, &learners));
        assert!(!MembershipChange::Promote.took_effect(4, &voters, &learners));
        assert!(MembershipChange::Promote.took_effect(2, &voters, &learners));
        assert!(!MembershipChange::Remove.took_effect(4, &voters, &learners));
        assert!(MembershipChange::Remove.took_effect(5, &voters, &learners));
        assert!(RemoteError::new(ErrorKind::NotLeader { hint: 0 }, "x").retryable());
        assert!(!RemoteError::new(ErrorKind::NotFound, "x").retryable());
    }

    proptest! {
        /// Whatever a peer sends, decoding answers or refuses; it never panics, and what
        /// decodes encodes back to something that decodes the same.
        #[test]
        fn arbitrary_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            crate::control::fuzzing::control_message(&bytes);
        }

        /// Real messages with a byte changed: still no panic, and round trips hold.
        #[test]
        fn damaged_messages_never_panic(pick in 0usize..32, at in any::<usize>(), byte in any::<u8>()) {
            let all: Vec<Bytes> = requests().iter().map(Request::encode).chain(answers().iter().map(Answer::encode)).collect();
            let mut bytes = all[pick % all.len()].to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            crate::control::fuzzing::control_message(&bytes);
        }
    }
}
