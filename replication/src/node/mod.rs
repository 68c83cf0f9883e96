//! The multi-Raft node: every replicated volume on this node is one Raft group,
//! and all groups share one WAL and one [`Transport`].
//!
//! ```text
//! ReplicatedStore (per volume, async) ──Event──▶ runner thread (runner.rs: the I/O shell)
//!   │ not leader? forward to the leader       │  events → NodeCore inputs (node_core.rs, sans-IO,
//!   │ over the transport (forward.rs)         │  every GroupDriver): propose (batched entries),
//!   ▼                                         │  collect Readies → send leader appends, one WAL
//! leader's node: same path, locally           │  fdatasync for all groups → synced → apply tasks
//!                                             ▼  → committed: acknowledge writes; Event::Applied → serve reads
//! ```
//!
//! The runner is a dedicated thread that blocks only on the WAL sync: applies, checkpoints,
//! copies and reads of the stores run as tasks on the runtime and report back as events, so
//! neither a tokio worker nor the round waits on a copy. The simulator (`crate::sim`) drives
//! the same `NodeCore`.

pub mod backend;
pub mod forward;
pub(crate) mod node_core;
pub mod raft_codec;
pub(crate) mod repair;
mod runner;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use raftblk_blockdev::backend::BackendError;
use raftblk_blockdev::seal::{CopyStore, IntegrityReporter, SealedBlocks};
use tokio::sync::{mpsc, oneshot};

use self::forward::{ForwardOp, ForwardRequest, ForwardStatus};
use self::runner::{Event, Runner};
use crate::machine::MachineStore;
use crate::snapshot::chunk::Chunk;
use crate::snapshot::pull::{ChunkFetcher, FetchError};
use crate::transport::{ClusterId, FaultController, Inbound, RequestId, Transport, TransportError};
use crate::volume::command::Command;
use crate::wal::disk::{NodeDisk, WalEngine};
use crate::wal::record::{GroupId, NodeId};
use crate::wal::{Wal, WalOptions};

pub use self::backend::ReplicatedStore;

/// Most inbound messages queued from the transport before it waits.
const INBOUND_QUEUE_MAX: usize = 4096;

/// A change to a group's membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a node as a learner: it receives the log but does not vote.
    AddLearner(u64),
    /// Make a learner (or new node) a voter.
    Promote(u64),
    /// Remove a voter or learner.
    Remove(u64),
}

/// Settings of the replication node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub node_id: NodeId,
    /// Cluster identity (connections from other clusters are refused).
    pub cluster: ClusterId,
    /// Where peers connect.
    pub peer_listen: SocketAddr,
    /// The other nodes.
    pub peers: HashMap<NodeId, SocketAddr>,
    /// The WAL directory.
    pub wal_dir: PathBuf,
    /// How the WAL writes: io_uring (the default, falling back to sync where the kernel
    /// refuses it) or `pwrite` + `fdatasync`.
    pub wal_engine: WalEngine,
    /// Raft tick.
    pub tick: Duration,
    /// Election timeout in ticks (each group draws its own in `[n, 2n)`).
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Longest a request waits for a leader before failing.
    pub io_timeout: Duration,
    /// Entries each group keeps in its log below its checkpoint, for peers that lag a little
    /// (a peer further behind gets a snapshot).
    pub log_retain_entries: u64,
    /// Most bytes of such entries kept per group (whichever bound is tighter wins).
    pub log_retain_bytes: u64,
    /// Most bytes per second a rebuilding replica copies from its peers (0: unlimited).
    pub rebuild_rate_bytes_per_s: u64,
    /// Volume bytes per snapshot chunk.
    pub snapshot_chunk_bytes: u64,
    /// Single-copy volumes acknowledge a write once its record is in the kernel and make it
    /// durable at the next FLUSH (see `GroupConfig::write_back`); false: at every write.
    pub write_back: bool,
}

impl NodeConfig {
    /// How long a leader serves reads after a quorum confirmed its leadership (see
    /// `GroupDriver::read`): no follower can elect another leader within
    /// `(election_ticks - 1) × tick` of that confirmation, and 20 % of that is left as
    /// margin for clocks that run at different rates on different nodes (monotonic clocks
    /// drift by parts per million; the margin also covers a runner that stalls).
    pub fn read_lease_ms(&self) -> u64 {
        let bound = (self.election_ticks.max(2) as u64 - 1) * self.tick.as_millis() as u64;
        bound * 4 / 5
    }

    /// Defaults for the tuning fields; identity and addresses still have to be set.
    pub const LOG_RETAIN_ENTRIES_DEFAULT: u64 = 1024;
    /// See [`NodeConfig::log_retain_bytes`].
    pub const LOG_RETAIN_BYTES_DEFAULT: u64 = 64 << 20;
    /// See [`NodeConfig::rebuild_rate_bytes_per_s`].
    pub const REBUILD_RATE_BYTES_PER_S_DEFAULT: u64 = 200 << 20;
}

/// Why a replication call failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// This node is not the group's leader; `leader` is its hint (0: unknown).
    #[error("not the leader (leader hint: node {leader})")]
    NotLeader { leader: u64 },
    /// This node has no replica of the group.
    #[error("no replica of group {0} on this node")]
    NotMember(GroupId),
    /// The request reached past the end of the volume (`size` bytes where it was checked).
    #[error("request at offset {offset} length {len} reaches past the volume end ({size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The copy asked has not applied the index the request needs (or is being rebuilt).
    #[error("the copy is not ready: it has not applied what the request needs")]
    NotReady,
    /// The request is malformed or not one this node serves; retrying changes nothing.
    #[error("request refused: {0}")]
    Refused(String),
    /// Another node could not serve the request now (its own error, as it said it).
    #[error("the node could not serve the request: {0}")]
    Unavailable(String),
    /// A guarded write found its block changed since it was read.
    #[error("block {block} changed since it was read; read it again")]
    GuardFailed { block: u64 },
    /// The write's entry was replaced by a new leader; retry.
    #[error("proposal dropped by a leader change; retry")]
    Dropped,
    /// The node is stopping.
    #[error("replication node is shutting down")]
    ShuttingDown,
    /// No leader answered within the I/O timeout.
    #[error("no leader within the I/O timeout")]
    Timeout,
    /// The WAL, Raft or the store failed.
    #[error("replication failure: {0}")]
    Internal(String),
    /// The transport refused.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl From<BackendError> for NodeError {
    fn from(e: BackendError) -> NodeError {
        match e {
            BackendError::OutOfRange { offset, len, size } => NodeError::OutOfRange { offset, len, size },
            other => NodeError::Internal(other.to_string()),
        }
    }
}

/// What a volume's client sees of a replication error.
impl From<NodeError> for BackendError {
    fn from(e: NodeError) -> BackendError {
        use std::io::{Error, ErrorKind};
        match e {
            NodeError::OutOfRange { offset, len, size } => BackendError::OutOfRange { offset, len, size },
            NodeError::ShuttingDown => BackendError::ShuttingDown,
            NodeError::Timeout => BackendError::Io(Error::new(ErrorKind::TimedOut, e.to_string())),
            NodeError::Refused(_) => BackendError::Io(Error::new(ErrorKind::InvalidInput, e.to_string())),
            other => BackendError::Io(Error::other(other.to_string())),
        }
    }
}

/// How a node answers a forwarded request that failed: the one mapping from errors to the
/// wire ([`ForwardStatus::into_result`] is the way back).
impl From<NodeError> for ForwardStatus {
    fn from(e: NodeError) -> ForwardStatus {
        match e {
            NodeError::NotLeader { leader } => ForwardStatus::NotLeader(leader),
            // The entry lost to a leader change: the requester retries at the new leader.
            NodeError::Dropped => ForwardStatus::NotLeader(0),
            NodeError::NotMember(_) => ForwardStatus::NotMember,
            NodeError::OutOfRange { offset, len, size } => ForwardStatus::OutOfRange { offset, len, size },
            NodeError::GuardFailed { block } => ForwardStatus::GuardFailed(block),
            NodeError::NotReady => ForwardStatus::NotReady,
            NodeError::Refused(why) => ForwardStatus::Refused(why),
            NodeError::Unavailable(why) => ForwardStatus::Unavailable(why),
            other @ (NodeError::ShuttingDown
            | NodeError::Timeout
            | NodeError::Internal(_)
            | NodeError::Transport(_)) => ForwardStatus::Unavailable(other.to_string()),
        }
    }
}

impl ForwardStatus {
    /// What an answer from another node means here: its data, or its error as that node
    /// meant it (`group`: the request's).
    pub fn into_result(self, group: GroupId) -> Result<Bytes, NodeError> {
        match self {
            ForwardStatus::Ok(data) => Ok(data),
            ForwardStatus::NotLeader(leader) => Err(NodeError::NotLeader { leader }),
            ForwardStatus::NotMember => Err(NodeError::NotMember(group)),
            ForwardStatus::OutOfRange { offset, len, size } => {
                Err(NodeError::OutOfRange { offset, len, size })
            }
            ForwardStatus::GuardFailed(block) => Err(NodeError::GuardFailed { block }),
            ForwardStatus::NotReady => Err(NodeError::NotReady),
            ForwardStatus::Refused(why) => Err(NodeError::Refused(why)),
            ForwardStatus::Unavailable(why) => Err(NodeError::Unavailable(why)),
        }
    }
}

/// What a volume's replica applies committed entries to.
#[derive(Clone)]
pub struct ReplicaStore {
    /// The local copy of the volume (sealed blocks, checked on every read).
    pub backend: Arc<dyn CopyStore>,
    /// Where damaged blocks found and repaired in this copy are reported.
    pub reporter: Arc<dyn IntegrityReporter>,
    /// Grows the local copy (a replicated resize).
    pub grow: Arc<dyn Fn(u64) -> Result<(), BackendError> + Send + Sync>,
    /// File that records the index applied *and flushed* to `backend`.
    pub applied_path: PathBuf,
    /// File that exists while `backend` is being rebuilt from peers (see
    /// [`crate::snapshot::marker`]).
    pub rebuild_path: PathBuf,
}

/// What a group's replica applies to: a volume's block store or a state machine.
#[derive(Clone)]
pub(crate) enum GroupStore {
    Volume(ReplicaStore),
    Machine(MachineStore),
}

impl GroupStore {
    fn rebuild_path(&self) -> &std::path::Path {
        match self {
            GroupStore::Volume(s) => &s.rebuild_path,
            GroupStore::Machine(s) => &s.rebuild_path,
        }
    }
}

/// A rebuild in progress, as [`GroupStatus::rebuild`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildStatus {
    /// Snapshot index being copied.
    pub index: u64,
    /// Bytes of the volume covered (data and holes).
    pub done_bytes: u64,
    /// The volume's size (0 until the first chunk arrived).
    pub total_bytes: u64,
    /// Bytes of data transferred.
    pub copied_bytes: u64,
    /// The member the last chunk came from.
    pub source: u64,
    /// Seconds since the rebuild (re)started.
    pub elapsed_s: u64,
}

/// A group's state as the node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// The leader this node knows of (0: none).
    pub leader: u64,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// Raft term.
    pub term: u64,
    /// Highest committed index known here.
    pub commit_index: u64,
    /// Highest index applied to the local store.
    pub applied_index: u64,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners (copies catching up, not yet voting).
    pub learners: Vec<u64>,
    /// Matched index of every peer (leader only).
    pub progress: Vec<(u64, u64)>,
    /// First index still in this node's log (entries below it are compacted).
    pub first_index: u64,
    /// Set while this replica's store is being rebuilt from its peers.
    pub rebuild: Option<RebuildStatus>,
}

impl GroupStatus {
    /// Whether `self` and `other` differ in what a waiter on the group cares about: the
    /// leader, the members, a learner's progress, a rebuild starting or ending, the first
    /// commit. (The commit index alone moves with every write and wakes no one.)
    pub fn shape_differs(&self, other: &GroupStatus) -> bool {
        self.leader != other.leader
            || self.voters != other.voters
            || self.learners != other.learners
            || (!self.learners.is_empty() && self.progress != other.progress)
            || self.rebuild.is_some() != other.rebuild.is_some()
            || (self.commit_index == 0) != (other.commit_index == 0)
    }
}

/// A replica's store as seen by peers that copy from it.
#[derive(Clone)]
struct SnapshotSource {
    store: GroupStore,
    /// Index the store has applied, 0 while it cannot serve (rebuilding, broken).
    servable: Arc<AtomicU64>,
}

#[derive(Default)]
struct Shared {
    /// Leader hints per group, updated by the runner.
    leaders: RwLock<HashMap<GroupId, u64>>,
    /// Status snapshots per group, refreshed by the runner every tick.
    status: RwLock<HashMap<GroupId, GroupStatus>>,
    /// Bumped when a published status changed in a way a waiter cares about (see
    /// [`GroupStatus::shape_differs`]).
    status_changes: tokio::sync::watch::Sender<u64>,
    /// Forwarded requests waiting for their response.
    pending: Mutex<HashMap<RequestId, oneshot::Sender<Bytes>>>,
    next_request: AtomicU64,
    /// Local stores peers may copy snapshot chunks from, registered by the runner.
    sources: RwLock<HashMap<GroupId, SnapshotSource>>,
    /// The rebuild rate limit now (starts as the configuration's; see
    /// [`ReplicationNode::set_rebuild_rate`]).
    rebuild_rate_bytes_per_s: AtomicU64,
    /// What this node's copies found for scrub commands, until a coordinator asks.
    scrubs: Mutex<ScrubResults>,
}

impl Shared {
    /// The group's leader as the runner last published it (0: none known).
    fn leader(&self, group: GroupId) -> u64 {
        self.leaders.read().map_or(0, |m| m.get(&group).copied().unwrap_or(0))
    }
}

/// Most scrub findings kept per node (a coordinator collects each within seconds).
const SCRUB_RESULTS_MAX: usize = 4096;

/// Scrub findings by (group, scrub id, first block), oldest dropped first.
#[derive(Default)]
struct ScrubResults {
    found: HashMap<(GroupId, u64, u64), crate::volume::ScrubChunk>,
    order: std::collections::VecDeque<(GroupId, u64, u64)>,
}

impl ScrubResults {
    fn insert(&mut self, group: GroupId, chunk: crate::volume::ScrubChunk) {
        let key = (group, chunk.id, chunk.first);
        if self.found.insert(key, chunk).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > SCRUB_RESULTS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.found.remove(&old);
            }
        }
    }
}

/// What a volume operation run on the local replica returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A write, zeroing or resize is done.
    Done,
    /// A read's blocks.
    Blocks(SealedBlocks),
}

/// Sends `request` to node `to` over `transport` and waits for its answer (up to `timeout`).
async fn forward_via(
    shared: &Shared,
    transport: &Transport,
    to: u64,
    request: ForwardRequest,
    timeout: Duration,
) -> Result<ForwardStatus, NodeError> {
    let id = RequestId(shared.next_request.fetch_add(1, Ordering::Relaxed) + 1);
    let (tx, rx) = oneshot::channel();
    lock(&shared.pending).insert(id, tx);
    let sent = transport.send_app_request(NodeId(to), id, request.encode());
    let result = match sent {
        Ok(()) => match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(bytes)) => ForwardStatus::decode(bytes)
                .map_err(|e| NodeError::Internal(format!("bad forward response: {e}"))),
            Ok(Err(_)) => Err(NodeError::ShuttingDown),
            Err(_) => Err(NodeError::Timeout),
        },
        Err(e) => Err(e.into()),
    };
    lock(&shared.pending).remove(&id);
    result
}

/// Fetches snapshot chunks from peers over the transport.
struct PeerFetcher {
    shared: Arc<Shared>,
    transport: Arc<Transport>,
}

/// Longest wait for one snapshot chunk before asking another member.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl ChunkFetcher for PeerFetcher {
    async fn fetch(
        &self,
        source: u64,
        group: GroupId,
        offset: u64,
        len: u64,
        min_index: u64,
    ) -> Result<Chunk, FetchError> {
        if self.transport.unreachable(NodeId(source)) {
            // Down (connection refused or timed out): the next source is asked at once
            // rather than after CHUNK_TIMEOUT.
            return Err(FetchError::Unreachable(format!("no connection to node {source}")));
        }
        let request = ForwardRequest { group, op: ForwardOp::ReadChunk { offset, len, min_index } };
        match forward_via(&self.shared, &self.transport, source, request, CHUNK_TIMEOUT).await {
            Ok(ForwardStatus::Ok(bytes)) => Ok(Chunk::decode(bytes)?),
            Ok(ForwardStatus::NotReady) => Err(FetchError::NotReady),
            Ok(ForwardStatus::NotMember) => Err(FetchError::NotMember),
            Ok(other) => Err(FetchError::Unreachable(format!("answered {other:?}"))),
            Err(e) => Err(FetchError::Unreachable(e.to_string())),
        }
    }

    fn leader(&self, group: GroupId) -> u64 {
        let leader = self.shared.leader(group);
        if leader == self.transport.local_id().0 {
            0
        } else {
            leader
        }
    }
}

/// Handle to the node's replication engine (cheap to clone).
#[derive(Clone)]
pub struct ReplicationNode {
    inner: Arc<Inner>,
}

/// Answers control-plane messages from other nodes (see [`ReplicationNode::set_control_handler`]).
pub type ControlHandler =
    Arc<dyn Fn(Bytes) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>> + Send + Sync>;

struct Inner {
    config: NodeConfig,
    control: RwLock<Option<ControlHandler>>,
    events: std::sync::mpsc::Sender<Event>,
    transport: Arc<Transport>,
    shared: Arc<Shared>,
    runner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation: a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicationNode {
    /// Opens the WAL, starts the transport and the runner thread. Call inside a tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<ReplicationNode, NodeError> {
        let disk = NodeDisk::open(&config.wal_dir, config.wal_engine)
            .map_err(|e| NodeError::Internal(format!("WAL directory: {e}")))?;
        tracing::info!(
            engine = disk.engine_name(),
            requested = %config.wal_engine,
            dir = %config.wal_dir.display(),
            "WAL engine ready"
        );
        let wal = tokio::task::spawn_blocking(move || Wal::open(disk, WalOptions::default()))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
            .map_err(|e| NodeError::Internal(format!("opening the WAL: {e}")))?;
        if let Some(cut) = &wal.recovery_report().truncation {
            if cut.in_last_segment {
                // What any unclean stop leaves: unsynced records, or (the newest segment being
                // a reused file) its old bytes past the last record.
                tracing::info!(?cut, "WAL recovery cut the newest segment after its last whole record");
            } else {
                tracing::warn!(
                    ?cut,
                    "WAL recovery found a damaged tail and cut it; peers resend what is missing"
                );
            }
        }
        let (inbound_tx, mut inbound_rx) = mpsc::channel(INBOUND_QUEUE_MAX);
        let transport = Transport::start(
            config.node_id,
            config.cluster,
            config.peer_listen,
            config.peers.clone(),
            inbound_tx,
        )
        .await?;
        let transport = Arc::new(transport);
        let (events, events_rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared::default());
        shared.rebuild_rate_bytes_per_s.store(config.rebuild_rate_bytes_per_s, Ordering::Relaxed);
        let runner = Runner::new(
            config.clone(),
            wal,
            events_rx,
            events.clone(),
            shared.clone(),
            transport.clone(),
            tokio::runtime::Handle::current(),
        );
        let thread = std::thread::Builder::new()
            .name("raftblk-raft".into())
            .spawn(move || {
                // A runner that dies leaves a node that answers health checks but replicates
                // nothing; end the process instead, which is as safe as a kill -9 by design, so
                // a supervisor restarts it and clients fail over.
                let clean = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run()));
                if !matches!(clean, Ok(true)) {
                    tracing::error!("replication runner failed; exiting so the node restarts");
                    std::process::exit(70);
                }
            })
            .map_err(|e| NodeError::Internal(format!("starting the Raft thread: {e}")))?;
        let node = ReplicationNode {
            inner: Arc::new(Inner {
                config,
                control: RwLock::new(None),
                events,
                transport,
                shared,
                runner: Mutex::new(Some(thread)),
            }),
        };
        let n = node.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound_rx.recv().await {
                n.on_inbound(msg);
            }
        });
        Ok(node)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// The address peers connect to (the transport's, with the real port).
    pub fn peer_listen(&self) -> SocketAddr {
        self.inner.transport.local_addr()
    }

    /// The I/O timeout.
    pub fn io_timeout(&self) -> Duration {
        self.inner.config.io_timeout
    }

    /// Installs the daemon's answerer of control messages from other nodes.
    pub fn set_control_handler(&self, handler: ControlHandler) {
        if let Ok(mut h) = self.inner.control.write() {
            *h = Some(handler);
        }
    }

    /// Sends a control message to node `to` and returns its answer.
    pub async fn control(&self, to: u64, payload: Bytes, timeout: Duration) -> Result<Bytes, NodeError> {
        let request = ForwardRequest { group: GroupId(0), op: ForwardOp::Control { payload } };
        self.forward(to, request, timeout).await?.into_result(GroupId(0))
    }

    /// Every other node's id, sorted. Read from the transport rather than the start-up
    /// configuration, so nodes added later (`--join`) are included.
    pub fn peer_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.inner.transport.peers().into_iter().map(|(n, _)| n.0).collect();
        ids.sort_unstable();
        ids
    }

    /// Every other node and its peer address, sorted by id.
    pub fn peers(&self) -> Vec<(u64, SocketAddr)> {
        let mut peers: Vec<(u64, SocketAddr)> =
            self.inner.transport.peers().into_iter().map(|(n, a)| (n.0, a)).collect();
        peers.sort_unstable();
        peers
    }

    /// Adds node `id` at `addr` as a peer, or points a known peer at `addr`. Raft groups
    /// only talk to it once a volume's membership names it.
    pub fn add_peer(&self, id: u64, addr: SocketAddr) -> Result<(), NodeError> {
        Ok(self.inner.transport.add_peer(NodeId(id), addr)?)
    }

    /// The rebuild rate limit in force (0: unlimited).
    pub fn rebuild_rate(&self) -> u64 {
        self.inner.shared.rebuild_rate_bytes_per_s.load(Ordering::Relaxed)
    }

    /// Changes the rebuild rate limit (0: unlimited) for rebuilds that start from now on.
    pub fn set_rebuild_rate(&self, bytes_per_s: u64) {
        self.inner.shared.rebuild_rate_bytes_per_s.store(bytes_per_s, Ordering::Relaxed);
    }

    /// The transport's fault injector (for tests).
    pub fn faults(&self) -> FaultController {
        self.inner.transport.faults()
    }

    /// Starts (or restarts) this node's replica of `group` with membership `voters`
    /// (used only when the group is new on this node).
    pub async fn open_group(
        &self,
        group: GroupId,
        voters: Vec<u64>,
        store: ReplicaStore,
    ) -> Result<(), NodeError> {
        self.open_store(group, voters, GroupStore::Volume(store)).await
    }

    /// Starts (or restarts) this node's replica of a state machine group (see
    /// [`crate::machine`]); `voters` as for [`ReplicationNode::open_group`]. Propose to it
    /// with [`ReplicationNode::local_write`] and [`Command::App`] at its leader.
    pub async fn open_machine_group(
        &self,
        group: GroupId,
        voters: Vec<u64>,
        store: MachineStore,
    ) -> Result<(), NodeError> {
        self.open_store(group, voters, GroupStore::Machine(store)).await
    }

    async fn open_store(&self, group: GroupId, voters: Vec<u64>, store: GroupStore) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Open { group, voters, store, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Stops this node's replica of `group` (after flushing its store).
    pub async fn close_group(&self, group: GroupId) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Close { group, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Asks the group's leader (if this node is it) to hand leadership to `to`.
    pub fn transfer_leader(&self, group: GroupId, to: u64) -> Result<(), NodeError> {
        self.send(Event::TransferLeader { group, to })
    }

    /// Proposes a membership change of `group`; this node must lead it. Returns once
    /// proposed; watch [`ReplicationNode::status`] for it to take effect.
    pub async fn change_membership(&self, group: GroupId, change: MembershipChange) -> Result<(), NodeError> {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
        let (kind, node) = match change {
            MembershipChange::AddLearner(n) => (ConfChangeType::AddLearnerNode, n),
            MembershipChange::Promote(n) => (ConfChangeType::AddNode, n),
            MembershipChange::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.set_node_id(node);
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        let (tx, rx) = oneshot::channel();
        self.send(Event::ConfChange { group, change: cc, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// The leader this node knows of (0: none).
    pub fn leader(&self, group: GroupId) -> u64 {
        self.inner.shared.leader(group)
    }

    /// A receiver that is told (coalesced, at most once a tick) when any group's leader,
    /// members, learners' progress or rebuild changed here: for waiting on a group without
    /// polling its status.
    pub fn status_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.shared.status_changes.subscribe()
    }

    /// The group's status as this node sees it (`None`: no replica here).
    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        self.inner.shared.status.read().ok().and_then(|m| m.get(&group).cloned())
    }

    fn send(&self, event: Event) -> Result<(), NodeError> {
        self.inner.events.send(event).map_err(|_| NodeError::ShuttingDown)
    }

    /// Replicates `commands` through the local replica, which must be the leader.
    pub async fn local_write(&self, group: GroupId, commands: Vec<Command>) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Write { group, commands, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Makes every write the local replica (which must be the leader) acknowledged before
    /// this durable: answered at once unless the group acknowledges before syncing (a
    /// single-copy volume, see `NodeConfig::write_back`), which waits for the next sync.
    pub async fn local_flush(&self, group: GroupId) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Flush { group, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Linearizable read of sealed blocks through the local replica, which must be the
    /// leader. Damaged blocks of the local copy are repaired from another copy first where
    /// one is intact.
    pub async fn local_read(
        &self,
        group: GroupId,
        first: u64,
        count: u32,
    ) -> Result<SealedBlocks, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.send(Event::Read { group, first, count, done: tx })?;
        rx.await.map_err(|_| NodeError::ShuttingDown)?
    }

    /// Runs one volume operation through the local replica, which must lead the group:
    /// reads by ReadIndex, everything else as a replicated command. Control messages
    /// are not volume I/O and are refused.
    pub async fn run_local(&self, group: GroupId, op: ForwardOp) -> Result<Answer, NodeError> {
        let command = match op {
            ForwardOp::Read { first, count } => {
                return self.local_read(group, first, count).await.map(Answer::Blocks)
            }
            ForwardOp::Flush => return self.local_flush(group).await.map(|()| Answer::Done),
            ForwardOp::Write(w) => Command::Write(w),
            ForwardOp::Zero { first, count, deallocate } => Command::Zero { first, count, deallocate },
            ForwardOp::Resize { size } => Command::Resize { size },
            ForwardOp::Scrub { id, first, count } => Command::Scrub { id, first, count },
            ForwardOp::Control { .. }
            | ForwardOp::ReadChunk { .. }
            | ForwardOp::ReadCopy { .. }
            | ForwardOp::ScrubResult { .. }
            | ForwardOp::Repair { .. } => return Err(NodeError::Refused("not volume I/O".into())),
        };
        self.local_write(group, vec![command]).await.map(|()| Answer::Done)
    }

    /// Sends `request` to node `to` and waits for its answer (up to `timeout`).
    pub async fn forward(
        &self,
        to: u64,
        request: ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardStatus, NodeError> {
        forward_via(&self.inner.shared, &self.inner.transport, to, request, timeout).await
    }

    fn on_inbound(&self, msg: Inbound) {
        match msg {
            Inbound::Raft { from, group, bytes } => {
                let _ = self.send(Event::Raft { from, group, bytes });
            }
            Inbound::AppResponse { id, payload, .. } => {
                if let Some(tx) = lock(&self.inner.shared.pending).remove(&id) {
                    let _ = tx.send(payload);
                }
            }
            Inbound::AppRequest { from, id, payload } => {
                let node = self.clone();
                tokio::spawn(async move {
                    let status = node.serve_forwarded(payload).await;
                    if let Err(e) = node.inner.transport.send_app_response(from, id, status.encode()) {
                        tracing::debug!(error = %e, "cannot answer a forwarded request");
                    }
                });
            }
        }
    }

    /// Runs a request forwarded by another node on the local replica; never forwards again.
    async fn serve_forwarded(&self, payload: Bytes) -> ForwardStatus {
        let request = match ForwardRequest::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "malformed forwarded request");
                return ForwardStatus::Refused(e.to_string());
            }
        };
        if let ForwardOp::Control { payload } = request.op {
            let handler = self.inner.control.read().ok().and_then(|h| h.clone());
            return match handler {
                Some(h) => ForwardStatus::Ok(h(payload).await),
                None => ForwardStatus::Unavailable("the node takes no control messages yet".into()),
            };
        }
        if let ForwardOp::ReadChunk { offset, len, min_index } = request.op {
            return self.serve_chunk(request.group, offset, len, min_index).await;
        }
        if let ForwardOp::ReadCopy { first, count, min_applied } = request.op {
            return self.serve_copy(request.group, first, count, min_applied).await;
        }
        if let ForwardOp::ScrubResult { id, first } = request.op {
            return match self.local_scrub_result(request.group, id, first) {
                Some(chunk) => ForwardStatus::Ok(chunk.encode()),
                None => ForwardStatus::NotReady,
            };
        }
        if let ForwardOp::Repair { first, count } = request.op {
            return match self.repair_local(request.group, first, count).await {
                Ok((repaired, damaged)) => {
                    let mut b = Vec::with_capacity(8);
                    b.extend_from_slice(&repaired.to_le_bytes());
                    b.extend_from_slice(&damaged.to_le_bytes());
                    ForwardStatus::Ok(Bytes::from(b))
                }
                Err(e) => e.into(),
            };
        }
        let result = self.run_local(request.group, request.op).await;
        match result {
            Ok(Answer::Done) => ForwardStatus::Ok(Bytes::new()),
            Ok(Answer::Blocks(read)) => ForwardStatus::Ok(raftblk_blockdev::seal::wire::encode_blocks(&read)),
            Err(e) => e.into(),
        }
    }

    /// What this node's copy of `group` found for scrub `id` at block `first`, once applied.
    pub fn local_scrub_result(
        &self,
        group: GroupId,
        id: u64,
        first: u64,
    ) -> Option<crate::volume::ScrubChunk> {
        lock(&self.inner.shared.scrubs).found.remove(&(group, id, first))
    }

    /// What node `node`'s copy found for scrub `id` at block `first` (`None`: not applied
    /// there yet).
    pub async fn scrub_result(
        &self,
        node: u64,
        group: GroupId,
        id: u64,
        first: u64,
    ) -> Result<Option<crate::volume::ScrubChunk>, NodeError> {
        if node == self.node_id().0 {
            return Ok(self.local_scrub_result(group, id, first));
        }
        let request = ForwardRequest { group, op: ForwardOp::ScrubResult { id, first } };
        match self.forward(node, request, Duration::from_secs(5)).await?.into_result(group) {
            Ok(b) => crate::volume::ScrubChunk::decode(&b).map(Some).map_err(|e| {
                NodeError::Internal(format!("node {node} sent an undecodable scrub result: {e}"))
            }),
            Err(NodeError::NotReady) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Has node `node` repair damaged blocks of its copy of `group` in `[first, first +
    /// count)` from the other copies; returns (repaired, still damaged).
    pub async fn repair_copy(
        &self,
        node: u64,
        group: GroupId,
        first: u64,
        count: u32,
    ) -> Result<(u32, u32), NodeError> {
        if node == self.node_id().0 {
            return self.repair_local(group, first, count).await;
        }
        let request = ForwardRequest { group, op: ForwardOp::Repair { first, count } };
        let b = self.forward(node, request, Duration::from_secs(30)).await?.into_result(group)?;
        if b.len() != 8 {
            return Err(NodeError::Internal(format!("node {node} answered a repair with {} bytes", b.len())));
        }
        let n = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Ok((n(0), n(4)))
    }

    /// Repairs damaged blocks of the local copy from the group's other copies (the version
    /// rule of [`repair`] at the copy's applied index).
    async fn repair_local(&self, group: GroupId, first: u64, count: u32) -> Result<(u32, u32), NodeError> {
        let source = self.inner.shared.sources.read().ok().and_then(|m| m.get(&group).cloned());
        let Some(source) = source else { return Err(NodeError::NotMember(group)) };
        let GroupStore::Volume(store) = &source.store else { return Err(NodeError::NotMember(group)) };
        let applied = source.servable.load(Ordering::Acquire);
        if applied == 0 {
            return Err(NodeError::NotReady);
        }
        let before = store.backend.read_blocks(first, count).await?;
        let damaged_before = before.damaged().count() as u32;
        if damaged_before == 0 {
            return Ok((0, 0));
        }
        let me = self.node_id().0;
        let peers: Vec<u64> = self
            .status(group)
            .map(|s| s.voters.into_iter().chain(s.learners).filter(|&n| n != me).collect())
            .unwrap_or_default();
        let ctx = repair::RepairContext {
            shared: self.inner.shared.clone(),
            transport: self.inner.transport.clone(),
            group,
            me,
            peers,
        };
        let after = repair::read_repaired(&ctx, store, first, count, applied).await?;
        let damaged_after = after.damaged().count() as u32;
        Ok((damaged_before - damaged_after, damaged_after))
    }

    /// Blocks of the local copy for a peer repairing its own, if the copy has applied
    /// `min_applied` (checked before reading). Damaged blocks travel as such (no data).
    async fn serve_copy(&self, group: GroupId, first: u64, count: u32, min_applied: u64) -> ForwardStatus {
        let source = self.inner.shared.sources.read().ok().and_then(|m| m.get(&group).cloned());
        let Some(source) = source else { return ForwardStatus::NotMember };
        let applied = source.servable.load(Ordering::Acquire);
        if applied == 0 || applied < min_applied {
            return ForwardStatus::NotReady;
        }
        let GroupStore::Volume(store) = &source.store else {
            return ForwardStatus::Refused("a state machine group has no blocks".into());
        };
        match store.backend.read_blocks(first, count).await {
            Ok(read) => ForwardStatus::Ok(raftblk_blockdev::seal::wire::encode_blocks(&read)),
            Err(e) => {
                tracing::warn!(%group, first, error = %e, "cannot read blocks for a peer's repair");
                NodeError::from(e).into()
            }
        }
    }

    /// Reads a snapshot chunk of the local store for a peer, if the store has applied
    /// `min_index` (checked before reading: the chunk is then at least that new).
    async fn serve_chunk(&self, group: GroupId, offset: u64, len: u64, min_index: u64) -> ForwardStatus {
        let source = self.inner.shared.sources.read().ok().and_then(|m| m.get(&group).cloned());
        let Some(source) = source else { return ForwardStatus::NotMember };
        let applied = source.servable.load(Ordering::Acquire);
        if applied == 0 || applied < min_index {
            return ForwardStatus::NotReady;
        }
        let chunk = match &source.store {
            GroupStore::Volume(s) => {
                crate::snapshot::serve::read_chunk(s.backend.as_ref(), offset, len, applied)
                    .await
                    .map_err(|e| e.to_string())
            }
            GroupStore::Machine(s) => match crate::snapshot::image::image_chunk(s.machine.as_ref()) {
                Ok(chunk) if chunk.source_applied < min_index => return ForwardStatus::NotReady,
                other => other.map_err(|e| e.to_string()),
            },
        };
        match chunk {
            Ok(chunk) => ForwardStatus::Ok(chunk.encode()),
            Err(e) => {
                tracing::warn!(%group, offset, error = %e, "cannot read a snapshot chunk");
                ForwardStatus::Unavailable(format!("reading the snapshot chunk: {e}"))
            }
        }
    }

    /// Stops the runner (flushing every store and recording applied indexes) and the transport.
    pub async fn shutdown(&self) {
        let _ = self.send(Event::Shutdown);
        let thread = lock(&self.inner.runner).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_change_wakes_waiters_for_members_leaders_learners_and_rebuilds_not_commits() {
        let base = GroupStatus {
            leader: 1,
            commit_index: 10,
            voters: vec![1, 2],
            progress: vec![(1, 10), (2, 10)],
            ..GroupStatus::default()
        };
        let with = |f: &dyn Fn(&mut GroupStatus)| {
            let mut s = base.clone();
            f(&mut s);
            s
        };
        assert!(!base.shape_differs(&with(&|s| s.commit_index = 11)), "a commit alone");
        assert!(!base.shape_differs(&with(&|s| s.progress = vec![(1, 11), (2, 11)])), "voters' progress");
        assert!(base.shape_differs(&with(&|s| s.leader = 2)));
        assert!(base.shape_differs(&with(&|s| s.voters = vec![1, 2, 3])));
        assert!(base.shape_differs(&with(&|s| s.rebuild = Some(RebuildStatus::default()))));
        assert!(base.shape_differs(&with(&|s| s.commit_index = 0)), "the first commit");
        let learning = with(&|s| {
            s.learners = vec![3];
            s.progress.push((3, 4));
        });
        assert!(base.shape_differs(&learning));
        let caught_up = {
            let mut s = learning.clone();
            s.progress[2].1 = 9;
            s
        };
        assert!(learning.shape_differs(&caught_up), "a learner's progress");
    }

    /// An error as the requester sees it after the leader's answer crossed the wire.
    fn across_the_wire(e: NodeError) -> NodeError {
        let status = ForwardStatus::from(e);
        let decoded = ForwardStatus::decode(status.encode()).expect("decodes");
        decoded.into_result(GroupId(4)).expect_err("an error stays an error")
    }

    #[test]
    fn an_out_of_range_refusal_keeps_its_range_across_nodes_and_to_the_client() {
        let e = across_the_wire(NodeError::OutOfRange { offset: 1 << 30, len: 8192, size: 1 << 29 });
        assert!(
            matches!(e, NodeError::OutOfRange { offset: 1073741824, len: 8192, size: 536870912 }),
            "{e:?}"
        );
        match BackendError::from(e) {
            BackendError::OutOfRange { offset, len, size } => {
                assert_eq!((offset, len, size), (1 << 30, 8192, 1 << 29))
            }
            other => panic!("became {other:?}"),
        }
    }

    #[test]
    fn errors_keep_their_kind_across_nodes() {
        assert!(matches!(
            across_the_wire(NodeError::NotLeader { leader: 3 }),
            NodeError::NotLeader { leader: 3 }
        ));
        // A proposal lost to a leader change is retried at whoever leads now.
        assert!(matches!(across_the_wire(NodeError::Dropped), NodeError::NotLeader { leader: 0 }));
        assert!(matches!(
            across_the_wire(NodeError::NotMember(GroupId(9))),
            NodeError::NotMember(GroupId(4))
        ));
        assert!(matches!(
            across_the_wire(NodeError::GuardFailed { block: 12 }),
            NodeError::GuardFailed { block: 12 }
        ));
        assert!(matches!(across_the_wire(NodeError::NotReady), NodeError::NotReady));
        match across_the_wire(NodeError::Refused("not volume I/O".into())) {
            NodeError::Refused(why) => assert_eq!(why, "not volume I/O"),
            other => panic!("became {other:?}"),
        }
        // What only makes sense on the node that failed travels as its message.
        match across_the_wire(NodeError::Internal("the store failed".into())) {
            NodeError::Unavailable(why) => assert!(why.contains("the store failed"), "{why}"),
            other => panic!("became {other:?}"),
        }
    }
}
