//! The node's Raft core, sans-IO: every group's [`GroupDriver`] and what each group waits
//! for (queued requests, the apply and the checkpoint in flight, a rebuild), fed with inputs
//! and returning [`Output`]s for a shell to carry out. Production's shell is the runner
//! thread (`runner.rs`: tokio tasks, the transport, the WAL file); the simulator (`sim`)
//! drives the same core with its simulated disk, network and clock.
//!
//! A round, as a shell drives it:
//! 1. inputs as they come: [`NodeCore::open`], [`NodeCore::write`], [`NodeCore::read`],
//!    [`NodeCore::step`], [`NodeCore::tick`], and the reports of work the core asked for:
//!    [`NodeCore::applied`], [`NodeCore::checkpointed`], [`NodeCore::rebuild_done`],
//!    [`NodeCore::persisted`];
//! 2. [`NodeCore::propose`]: queued writes become batched entries, queued reads one ReadIndex
//!    per group;
//! 3. [`NodeCore::collect`]: every group's Ready, appended to the WAL (unsynced); the outputs
//!    carry rebuild markers (written before the sync), messages (sent at once) and the
//!    committed entries already durable; returns the round's number and what the WAL needs
//!    ([`Persist`]: a sync, or only a write-out for single-copy volumes, which follow a
//!    disk's write-cache contract, see [`NodeCore::flush`]);
//! 4. the shell writes out the WAL or begins a sync, as asked, and goes on with the next
//!    rounds while the sync runs; once it is durable, [`NodeCore::persisted`] with the round's
//!    number: the messages that waited for it, flushes answered, and (at the next collect)
//!    what that made committed. Rounds complete in order: one reported persisted waits for
//!    those before it, so a message never says more is durable than is;
//! 5. [`NodeCore::checkpoints`]: `Checkpoint` outputs for groups whose interval passed.
//!
//! Applies never block a round: at most one per group is in flight (entries apply in log
//! order; within a batch `apply_entries` runs non-overlapping commands together), the next
//! batch waits in the group's queue, and acknowledgements and reads follow the applied
//! index. The WAL's appends and compactions go through each driver's `GroupStorage`, which
//! writes through the disk seam (`WalDisk`), so the core is generic over the disk.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use raft::eraftpb::{ConfChangeV2, Message, MessageType};

use super::{GroupStatus, NodeError};
use crate::snapshot::marker::{plan_open, Marker, OpenPlan};
use crate::storage::GroupStorage;
use crate::volume::command::{Command, BATCH_COMMANDS_MAX};
use crate::volume::group::{CommittedEntry, GroupConfig, GroupDriver, GroupError, RequestId};
use crate::volume::ApplyReport;
use crate::wal::disk::WalDisk;
use crate::wal::record::GroupId;

/// Most payload bytes proposed in one entry (several client writes batch into one).
const ENTRY_PAYLOAD_BYTES_MAX: usize = 8 << 20;
/// Largest payload of one write request: the NBD maximum (32 MiB) and its blocks' seals (at
/// most 37 bytes per 4 KiB block, 296 KiB); an entry holding it alone still fits a WAL
/// record (see `wal::record::PAYLOAD_BYTES_MAX`, 1 MiB above the NBD maximum).
pub(crate) const REQUEST_PAYLOAD_BYTES_MAX: usize = (32 << 20) + (512 << 10);

/// Settings of a core.
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    pub node_id: u64,
    /// Election timeout in ticks (each group draws its own in `[n, 2n)`).
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// See `GroupConfig::read_lease_ms`; in the clock the shell passes.
    pub read_lease_ms: u64,
    /// Log entries (and most bytes of them) kept below a checkpoint for peers that lag.
    pub log_retain_entries: u64,
    pub log_retain_bytes: u64,
    /// How often each group's store is flushed and its applied index recorded.
    pub checkpoint_interval_ms: u64,
    /// Seeds the groups' randomized election timeouts.
    pub seed: u64,
}

/// Longest a single-copy volume's acknowledged writes stay unsynced without a FLUSH (a power
/// loss takes at most this much of them; a crash of the process none).
const WRITE_BACK_SYNC_MS: u64 = 1000;

/// What the WAL needs before a round collected by [`NodeCore::collect`] is reported
/// [`NodeCore::persisted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persist {
    /// Nothing was appended that must persist first: the core counts the round persisted
    /// itself (once the rounds before it are).
    Nothing,
    /// Hand what was appended to the kernel ([`crate::wal::Wal::write_out`]): only
    /// write-back groups appended, and no FLUSH waits.
    Write,
    /// `fdatasync` it ([`crate::wal::Wal::begin_sync`], or [`crate::wal::Wal::sync`]).
    Sync,
}

/// A round [`NodeCore::collect`] returned: its number and what the WAL needs for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Collected {
    pub round: u64,
    pub persist: Persist,
}

/// A round collected and not yet complete.
#[derive(Debug)]
struct Round<W> {
    number: u64,
    /// Reported persisted; it completes once every round before it has.
    done: bool,
    /// Groups it collected, with the number of each one's Ready.
    readies: Vec<(GroupId, u64)>,
    /// Snapshots its groups installed: (group, index, the node it came from).
    installed: Vec<(GroupId, u64, u64)>,
    /// FLUSH requests its sync answers.
    flushes: Vec<W>,
}

/// Committed payload bytes a group's copy may have yet to apply while writes are still
/// acknowledged at commit (see `NodeCore::committed`).
const APPLY_BACKLOG_BYTES_MAX: usize = 16 << 20;

/// Payload bytes of committed entries.
fn entries_bytes(entries: &[CommittedEntry]) -> usize {
    entries.iter().flat_map(|e| &e.commands).map(Command::payload_len).sum()
}

/// Committed entries waiting for the apply in flight, in log order, with their payload bytes
/// (kept as they come and go, not summed again on every round).
#[derive(Debug, Default)]
struct ApplyQueue {
    entries: Vec<CommittedEntry>,
    bytes: usize,
}

impl ApplyQueue {
    fn extend(&mut self, entries: Vec<CommittedEntry>) {
        self.bytes += entries_bytes(&entries);
        self.entries.extend(entries);
    }

    /// Everything queued, leaving the queue empty.
    fn take(&mut self) -> (Vec<CommittedEntry>, usize) {
        (std::mem::take(&mut self.entries), std::mem::take(&mut self.bytes))
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Payload bytes the group's copy has committed and not yet applied (in flight or queued).
fn backlog_bytes<D: WalDisk, W, R>(slot: &Slot<D, W, R>) -> usize {
    slot.applying_bytes + slot.to_apply.bytes
}

/// Whether the replica holds back its acknowledgements of appends (see `NodeCore::send`): a
/// working follower whose copy lags by over APPLY_BACKLOG_BYTES_MAX.
fn holds_acks<D: WalDisk, W, R>(slot: &Slot<D, W, R>) -> bool {
    slot.broken.is_none() && !slot.driver.is_leader() && backlog_bytes(slot) > APPLY_BACKLOG_BYTES_MAX
}

/// A read waiting for its group's applied index.
#[derive(Debug)]
pub(crate) struct ReadRequest<R> {
    pub first: u64,
    pub count: u32,
    pub token: R,
}

/// What the shell does for the core. `W` and `R` are the shell's handles for a write's and
/// a read's reply.
#[derive(Debug)]
pub(crate) enum Output<W, R> {
    /// Send Raft messages to their nodes.
    Send { group: GroupId, messages: Vec<Message> },
    /// A write is done (committed; applied here too if it carried guards) or failed.
    Acked { token: W, result: Result<(), NodeError> },
    /// A read failed before it reached the store.
    ReadFailed { token: R, error: NodeError },
    /// Reads the local store may now serve: it has applied `applied`, at least their read
    /// index. `peers` hold other copies to repair damaged blocks from.
    Serve { group: GroupId, reads: Vec<ReadRequest<R>>, applied: u64, peers: Vec<u64> },
    /// Apply committed entries to the group's store, in order; report with
    /// [`NodeCore::applied`] and `seq`.
    Apply { group: GroupId, seq: u64, entries: Vec<CommittedEntry> },
    /// Sync the WAL (what applying entries wrote there, a membership's conf state, must be
    /// durable before an applied index past it is), flush the store, record `applied` as its
    /// durable index; report with [`NodeCore::checkpointed`].
    Checkpoint { group: GroupId, applied: u64 },
    /// Write the rebuild marker, before this round's WAL sync: once the sync makes a snapshot
    /// install durable, a restart must know the store is not the volume as of the log.
    WriteMarker { group: GroupId, marker: Marker },
    /// The store is complete again: remove the rebuild marker.
    RemoveMarker { group: GroupId },
    /// Copy the volume as of `index` from `sources` (in that order of preference),
    /// continuing at `offset`, replacing any copy running; report with
    /// [`NodeCore::rebuild_done`].
    Rebuild { group: GroupId, index: u64, offset: u64, sources: Vec<u64> },
    /// What peers copying from this store may rely on: it holds the volume as of `index`
    /// (0: nothing, it is being replaced or broken).
    Servable { group: GroupId, index: u64 },
    /// The group's leader changed (0: none known).
    LeaderChanged { group: GroupId, leader: u64 },
}

/// Where a store being rebuilt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebuild {
    /// A snapshot is installed in the log, and the round that appended it is not durable
    /// yet: the copy starts once it is. A copy running for an older snapshot is superseded.
    Installing,
    /// The copy waits for the apply in flight (it must not write over the copied blocks).
    Waiting { index: u64, offset: u64, hint: u64 },
    /// Copying from peers; committed entries are logged, not applied.
    Copying { index: u64 },
    /// Copied: the log since the snapshot replays over the copy as ordinary applies, then a
    /// checkpoint records `target` before the marker goes. Entries committed meanwhile queue
    /// behind the replay.
    Finishing { target: u64 },
}

struct Slot<D: WalDisk, W, R> {
    driver: GroupDriver<D>,
    new_writes: Vec<(Vec<Command>, W)>,
    new_reads: Vec<ReadRequest<R>>,
    // Ordered maps (here and for the groups): what a core outputs follows from its inputs
    // alone, so the simulator replays a seed exactly.
    writes: BTreeMap<RequestId, W>,
    reads: BTreeMap<RequestId, Vec<ReadRequest<R>>>,
    /// Guarded writes this leader proposed, by (entry index, position): which request to
    /// tell if the guard fails when the entry is applied.
    guarded: HashMap<(u64, usize), RequestId>,
    /// Requests acknowledged only once applied here, not at commit: writes with guards, and
    /// a state machine's commands (whose proposer reads the outcome of applying them).
    at_apply: HashSet<RequestId>,
    /// Requests whose guarded write was skipped (the block had changed).
    guard_failed: HashMap<RequestId, u64>,
    /// Highest index applied to the store.
    applied: u64,
    /// Committed entries waiting for the apply in flight to finish, in log order.
    to_apply: ApplyQueue,
    /// The apply in flight: its number and the last index it applies.
    applying: Option<(u64, u64)>,
    /// Payload bytes of the apply in flight.
    applying_bytes: usize,
    /// Highest index applied and flushed, as the store's applied file records.
    checkpointed: u64,
    /// The checkpoint in flight: the applied index it records.
    checkpointing: Option<u64>,
    last_checkpoint_ms: u64,
    /// Set when the store failed: the replica stops serving.
    broken: Option<String>,
    rebuild: Option<Rebuild>,
    /// Write-back only: the group appended entries that no sync has covered yet.
    unsynced: bool,
    /// Write-back only: the round whose sync covers what the group appended before it, while
    /// that sync runs (a FLUSH waits for it).
    syncing: Option<u64>,
    /// FLUSH requests waiting for the next sync (see [`NodeCore::flush`]).
    flushes: Vec<W>,
    /// A follower's latest acknowledgement of appends to each node, held back while its copy
    /// lags by over APPLY_BACKLOG_BYTES_MAX (see `NodeCore::send`).
    held: BTreeMap<u64, Message>,
}

/// Every group of one node. See the module docs for the calling protocol.
pub(crate) struct NodeCore<D: WalDisk, W, R> {
    config: CoreConfig,
    groups: BTreeMap<GroupId, Slot<D, W, R>>,
    out: Vec<Output<W, R>>,
    /// Rounds collected and not yet complete, oldest first.
    rounds: VecDeque<Round<W>>,
    next_round: u64,
    /// Since when write-back groups hold entries no sync has covered (the shell's clock).
    unsynced_since_ms: Option<u64>,
    /// The clock as of the last [`NodeCore::propose`].
    now_ms: u64,
    next_request: u64,
    next_apply: u64,
    rng: u64,
}

fn not_leader_or_internal(e: &GroupError, leader: u64) -> NodeError {
    match e {
        GroupError::NotLeader { .. } => NodeError::NotLeader { leader },
        other => NodeError::Internal(other.to_string()),
    }
}

impl<D: WalDisk, W, R> NodeCore<D, W, R> {
    pub(crate) fn new(config: CoreConfig) -> NodeCore<D, W, R> {
        let rng = config.seed | 1;
        NodeCore {
            config,
            groups: BTreeMap::new(),
            out: Vec::new(),
            rounds: VecDeque::new(),
            next_round: 0,
            unsynced_since_ms: None,
            now_ms: 0,
            next_request: 0,
            next_apply: 0,
            rng,
        }
    }

    /// What the shell has to do, in order.
    pub(crate) fn take_outputs(&mut self) -> Vec<Output<W, R>> {
        std::mem::take(&mut self.out)
    }

    /// Whether the core holds `group`.
    pub(crate) fn contains(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    /// Groups held, in id order.
    pub(crate) fn group_ids(&self) -> Vec<GroupId> {
        self.groups.keys().copied().collect()
    }

    /// The group's Raft driver (for the simulator).
    #[cfg(test)]
    pub(crate) fn driver(&self, group: GroupId) -> Option<&GroupDriver<D>> {
        self.groups.get(&group).map(|s| &s.driver)
    }

    /// The group's Raft driver, mutably (for the simulator's probes).
    #[cfg(test)]
    pub(crate) fn driver_mut(&mut self, group: GroupId) -> Option<&mut GroupDriver<D>> {
        self.groups.get_mut(&group).map(|s| &mut s.driver)
    }

    /// Highest index applied to the group's store (meaningless while it is rebuilt).
    #[cfg(test)]
    pub(crate) fn applied_index(&self, group: GroupId) -> u64 {
        self.groups.get(&group).map_or(0, |s| s.applied)
    }

    /// Whether the group's store is being rebuilt (copied, or its log replayed over a copy).
    #[cfg(test)]
    pub(crate) fn rebuilding(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|s| s.rebuild.is_some())
    }

    /// Whether some group has Raft work left (then the shell should not wait for input).
    pub(crate) fn has_ready(&self) -> bool {
        self.groups.values().any(|s| s.broken.is_none() && s.driver.has_ready())
    }

    /// The group's state for status reports (`rebuild` is the shell's to fill in).
    pub(crate) fn status(&self, group: GroupId) -> Option<GroupStatus> {
        let slot = self.groups.get(&group)?;
        let crate::volume::group::RaftStatus { term, voters, learners, progress } = slot.driver.raft_status();
        Some(GroupStatus {
            leader: slot.driver.leader(),
            is_leader: slot.driver.is_leader(),
            term,
            commit_index: slot.driver.commit_index(),
            // A store being rebuilt holds no consistent index yet.
            applied_index: if slot.rebuild.is_some() { 0 } else { slot.applied },
            voters,
            learners,
            progress,
            first_index: slot.driver.storage().meta().snapshot_index + 1,
            rebuild: None,
        })
    }

    fn random(&mut self) -> u64 {
        crate::volume::group::xorshift64(&mut self.rng)
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// Opens a group over its (initialized) log. `checkpointed`: the applied index the
    /// store's last checkpoint recorded; `marker`: the rebuild marker found, if any. The
    /// store either replays the log from its checkpoint or is rebuilt (`marker::plan_open`).
    /// `write_back`: see [`GroupConfig::write_back`] (a volume's data, never records a
    /// control plane relies on).
    pub(crate) fn open(
        &mut self,
        group: GroupId,
        storage: GroupStorage<D>,
        checkpointed: u64,
        marker: Option<Marker>,
        write_back: bool,
        now_ms: u64,
    ) -> Result<(), NodeError> {
        if self.groups.contains_key(&group) {
            return Ok(());
        }
        let plan =
            plan_open(checkpointed, storage.meta().snapshot_index, storage.hard_state().commit, marker);
        let applied = match plan {
            OpenPlan::Replay { applied } => applied,
            OpenPlan::Rebuild { index, .. } => index,
        };
        let election_tick = self.config.election_ticks.max(2);
        let cfg = GroupConfig {
            node_id: self.config.node_id,
            group,
            election_tick,
            seed: self.random(),
            heartbeat_tick: self.config.heartbeat_ticks,
            applied,
            read_lease_ms: self.config.read_lease_ms,
            write_back,
        };
        let driver = GroupDriver::new(&cfg, storage)
            .map_err(|e| NodeError::Internal(format!("group {group}: {e}")))?;
        tracing::info!(%group, applied, election_tick, ?plan, "replica opened");
        self.groups.insert(
            group,
            Slot {
                driver,
                new_writes: Vec::new(),
                new_reads: Vec::new(),
                writes: BTreeMap::new(),
                reads: BTreeMap::new(),
                guarded: HashMap::new(),
                at_apply: HashSet::new(),
                guard_failed: HashMap::new(),
                applied,
                to_apply: ApplyQueue::default(),
                applying: None,
                applying_bytes: 0,
                checkpointed: applied,
                checkpointing: None,
                last_checkpoint_ms: now_ms,
                broken: None,
                rebuild: None,
                unsynced: false,
                syncing: None,
                flushes: Vec::new(),
                held: BTreeMap::new(),
            },
        );
        match plan {
            OpenPlan::Replay { applied } => {
                if marker.is_some() {
                    self.out.push(Output::RemoveMarker { group });
                }
                self.out.push(Output::Servable { group, index: applied });
            }
            OpenPlan::Rebuild { index, offset } => self.start_rebuild(group, index, offset, 0),
        }
        Ok(())
    }

    /// Forgets the group (closing it or shutting down), failing what waits on it with
    /// `error()`. The shell settles it first (see `Runner::settle`).
    pub(crate) fn remove(&mut self, group: GroupId, error: impl Fn() -> NodeError) {
        let Some(slot) = self.groups.remove(&group) else { return };
        let queued = slot.new_writes.into_iter().map(|(_, token)| token);
        for token in queued.chain(slot.writes.into_values()).chain(slot.flushes) {
            self.out.push(Output::Acked { token, result: Err(error()) });
        }
        for r in slot.new_reads.into_iter().chain(slot.reads.into_values().flatten()) {
            self.out.push(Output::ReadFailed { token: r.token, error: error() });
        }
    }

    /// The group's slot if this replica may serve client I/O now: it holds the group, its
    /// store works, it leads, and its store is not being rebuilt (a rebuilding store cannot
    /// answer reads or apply writes; clients retry until leadership moves to a complete
    /// replica, see `tick`).
    fn serving(&mut self, group: GroupId) -> Result<&mut Slot<D, W, R>, NodeError> {
        let slot = self.groups.get_mut(&group).ok_or(NodeError::NotMember(group))?;
        if let Some(why) = &slot.broken {
            return Err(NodeError::Internal(why.clone()));
        }
        if !slot.driver.is_leader() || slot.rebuild.is_some() {
            return Err(NodeError::NotLeader { leader: slot.driver.leader() });
        }
        Ok(slot)
    }

    /// A client write (already checked against the store: its range, its kind). Queued for
    /// the next [`NodeCore::propose`]; acknowledged once committed (see `committed`).
    pub(crate) fn write(&mut self, group: GroupId, commands: Vec<Command>, token: W) {
        // Proposals batch requests up to ENTRY_PAYLOAD_BYTES_MAX, and a larger one goes
        // alone; one past the NBD maximum would not fit a WAL record.
        let payload: usize = commands.iter().map(Command::payload_len).sum();
        if payload > REQUEST_PAYLOAD_BYTES_MAX {
            let error = NodeError::Internal(format!(
                "a write of {payload} bytes exceeds the largest replicated write ({REQUEST_PAYLOAD_BYTES_MAX})"
            ));
            return self.out.push(Output::Acked { token, result: Err(error) });
        }
        match self.serving(group) {
            Ok(slot) => slot.new_writes.push((commands, token)),
            Err(error) => self.out.push(Output::Acked { token, result: Err(error) }),
        }
    }

    /// A FLUSH: once it is answered, every write acknowledged before it came is durable.
    /// Acknowledged writes of a replicated group are (in the synced WAL of a majority), so it
    /// is answered at once; a write-back group's wait for the next round's sync, or for the
    /// sync running that covers them.
    pub(crate) fn flush(&mut self, group: GroupId, token: W) {
        match self.serving(group) {
            Ok(slot) if slot.unsynced => slot.flushes.push(token),
            Ok(slot) => {
                let syncing = slot.syncing;
                match syncing.and_then(|n| self.rounds.iter_mut().find(|r| r.number == n)) {
                    Some(round) => round.flushes.push(token),
                    None => self.out.push(Output::Acked { token, result: Ok(()) }),
                }
            }
            Err(error) => self.out.push(Output::Acked { token, result: Err(error) }),
        }
    }

    /// A linearizable read of blocks `first..first + count` (already checked against the
    /// store); served by an `Output::Serve` once the store has applied its read index.
    pub(crate) fn read(&mut self, group: GroupId, first: u64, count: u32, token: R) {
        match self.serving(group) {
            Ok(slot) => slot.new_reads.push(ReadRequest { first, count, token }),
            Err(error) => self.out.push(Output::ReadFailed { token, error }),
        }
    }

    /// A Raft message from a peer.
    pub(crate) fn step(&mut self, group: GroupId, from: u64, message: Message) {
        let Some(slot) = self.groups.get_mut(&group) else {
            tracing::debug!(%group, from, "message for a group this node does not (yet) have");
            return;
        };
        if let Err(e) = slot.driver.step(message) {
            tracing::debug!(%group, from, error = %e, "Raft refused a message");
        }
    }

    /// Asks the group's leader (if this node) to hand leadership to `to`.
    pub(crate) fn transfer_leader(&mut self, group: GroupId, to: u64) {
        if let Some(slot) = self.groups.get_mut(&group) {
            slot.driver.transfer_leader(to);
        }
    }

    /// Proposes a membership change; it takes effect when committed.
    pub(crate) fn conf_change(&mut self, group: GroupId, change: ConfChangeV2) -> Result<(), NodeError> {
        let slot = self.groups.get_mut(&group).ok_or(NodeError::NotMember(group))?;
        let leader = slot.driver.leader();
        slot.driver.propose_conf_change(change).map_err(|e| not_leader_or_internal(&e, leader))
    }

    /// One clock tick of every group. A replica that leads while its store is being copied
    /// hands leadership to a complete one.
    pub(crate) fn tick(&mut self) {
        let me = self.config.node_id;
        for slot in self.groups.values_mut() {
            slot.driver.tick();
            if matches!(
                slot.rebuild,
                Some(Rebuild::Installing | Rebuild::Copying { .. } | Rebuild::Waiting { .. })
            ) && slot.driver.is_leader()
            {
                let status = slot.driver.raft_status();
                let best = status
                    .progress
                    .iter()
                    .filter(|(id, _)| *id != me && status.voters.contains(id))
                    .max_by_key(|(_, matched)| *matched)
                    .map(|(id, _)| *id);
                if let Some(to) = best {
                    slot.driver.transfer_leader(to);
                }
            }
        }
    }

    /// Turns queued writes into proposals (batched into few entries) and queued reads
    /// into one ReadIndex request per group. `now_ms` is the clock read leases run on.
    pub(crate) fn propose(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        for group in self.group_ids() {
            let mut writes = match self.groups.get_mut(&group) {
                Some(slot) if !slot.new_writes.is_empty() => std::mem::take(&mut slot.new_writes),
                _ => Vec::new(),
            };
            writes.reverse(); // popped from the back, in arrival order
            while !writes.is_empty() {
                let mut commands = Vec::new();
                let mut bytes = 0usize;
                let mut batch = Vec::new();
                let mut guarded = Vec::new();
                let mut at_apply = Vec::new();
                while let Some((cmds, _)) = writes.last() {
                    let size: usize = cmds.iter().map(|c| c.payload_len().max(16)).sum();
                    let fits = commands.len() + cmds.len() <= BATCH_COMMANDS_MAX
                        && (batch.is_empty() || bytes + size <= ENTRY_PAYLOAD_BYTES_MAX);
                    if !fits {
                        break;
                    }
                    let Some((cmds, token)) = writes.pop() else { break };
                    bytes += size;
                    let id = self.request_id();
                    for (i, c) in cmds.iter().enumerate() {
                        if matches!(c, Command::Write(w) if !w.guards.is_empty()) {
                            guarded.push((commands.len() + i, id));
                        }
                    }
                    if cmds.iter().any(|c| matches!(c, Command::App { .. }))
                        || guarded.last().is_some_and(|&(_, g)| g == id)
                    {
                        at_apply.push(id);
                    }
                    commands.extend(cmds);
                    batch.push((id, token));
                }
                let Some(slot) = self.groups.get_mut(&group) else { break };
                let ids: Vec<RequestId> = batch.iter().map(|(id, _)| *id).collect();
                match slot.driver.propose(&commands, ids) {
                    Ok(index) => {
                        slot.writes.extend(batch);
                        slot.guarded
                            .extend(guarded.into_iter().map(|(position, id)| ((index, position), id)));
                        slot.at_apply.extend(at_apply);
                    }
                    Err(e) => {
                        let leader = slot.driver.leader();
                        for (_, token) in batch {
                            let result = Err(not_leader_or_internal(&e, leader));
                            self.out.push(Output::Acked { token, result });
                        }
                    }
                }
            }
            let reads = match self.groups.get_mut(&group) {
                Some(slot) if !slot.new_reads.is_empty() => std::mem::take(&mut slot.new_reads),
                _ => continue,
            };
            let id = self.request_id();
            if let Some(slot) = self.groups.get_mut(&group) {
                slot.driver.read(id, now_ms);
                slot.reads.insert(id, reads);
            }
        }
    }

    /// A round: every group's Ready, appended to the WAL unsynced. The outputs so far must be
    /// carried out before the WAL is synced (markers) or may be at once (messages, applies).
    /// Returns the round and what the WAL needs before it is [`NodeCore::persisted`].
    pub(crate) fn collect(&mut self) -> Result<Collected, NodeError> {
        self.next_round += 1;
        let number = self.next_round;
        let mut round =
            Round { number, done: false, readies: Vec::new(), installed: Vec::new(), flushes: Vec::new() };
        let mut needs_sync = false;
        let mut needs_write = false;
        for group in self.group_ids() {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            if slot.broken.is_some() {
                continue;
            }
            let Some(actions) =
                slot.driver.collect().map_err(|e| NodeError::Internal(format!("group {group}: {e}")))?
            else {
                continue;
            };
            round.readies.push((group, actions.number));
            if let Some(leader) = actions.leader_changed {
                self.leader_changed(group, leader);
            }
            if let Some(snap) = actions.snapshot {
                if let Some(slot) = self.groups.get_mut(&group) {
                    slot.rebuild = Some(Rebuild::Installing);
                }
                self.out.push(Output::WriteMarker { group, marker: Marker { index: snap.index, offset: 0 } });
                self.out.push(Output::Servable { group, index: 0 });
                round.installed.push((group, snap.index, snap.from));
            }
            self.send(group, actions.messages);
            self.committed(group, actions.committed);
            needs_sync |= actions.needs_sync;
            if actions.needs_write && !actions.needs_sync {
                needs_write = true;
                if let Some(slot) = self.groups.get_mut(&group) {
                    slot.unsynced = true;
                }
                self.unsynced_since_ms.get_or_insert(self.now_ms);
            }
        }
        let flushes_wait = self.groups.values().any(|s| !s.flushes.is_empty());
        let sync_due =
            self.unsynced_since_ms.is_some_and(|t| self.now_ms.saturating_sub(t) >= WRITE_BACK_SYNC_MS);
        let persist = if needs_sync || flushes_wait || sync_due {
            // One fdatasync covers every group's appends: the write-back groups' and their
            // FLUSHes ride along.
            self.unsynced_since_ms = None;
            for slot in self.groups.values_mut() {
                round.flushes.append(&mut slot.flushes);
                if std::mem::take(&mut slot.unsynced) {
                    slot.syncing = Some(number);
                }
            }
            Persist::Sync
        } else if needs_write {
            Persist::Write
        } else {
            Persist::Nothing
        };
        let nothing_waits =
            round.readies.is_empty() && round.installed.is_empty() && round.flushes.is_empty();
        if !(nothing_waits && persist == Persist::Nothing) {
            self.rounds.push_back(round);
        }
        if persist == Persist::Nothing {
            self.persisted(number);
        } else {
            self.start_applies();
        }
        Ok(Collected { round: number, persist })
    }

    /// Round `number` is persisted as [`NodeCore::collect`] asked (written out): it
    /// completes once every round before it has. A completed round's groups' messages that
    /// waited for it go out, its FLUSHes are answered, the copies of snapshots it installed
    /// start.
    pub(crate) fn persisted(&mut self, number: u64) {
        if let Some(round) = self.rounds.iter_mut().find(|r| r.number == number) {
            round.done = true;
        }
        self.complete_rounds();
    }

    /// A WAL sync begun after round `number` was collected is done: that round and every one
    /// before it are durable (see [`NodeCore::persisted`]).
    pub(crate) fn synced(&mut self, number: u64) {
        for round in self.rounds.iter_mut().take_while(|r| r.number <= number) {
            round.done = true;
        }
        self.complete_rounds();
    }

    fn complete_rounds(&mut self) {
        while let Some(round) = self.rounds.pop_front_if(|r| r.done) {
            for token in round.flushes {
                self.out.push(Output::Acked { token, result: Ok(()) });
            }
            for slot in self.groups.values_mut() {
                slot.syncing = slot.syncing.filter(|&n| n != round.number);
            }
            for (group, index, from) in round.installed {
                tracing::info!(%group, index, from, "snapshot installed");
                self.start_rebuild(group, index, 0, from);
            }
            for (group, ready) in round.readies {
                let Some(slot) = self.groups.get_mut(&group) else { continue };
                let messages = slot.driver.on_persisted(ready);
                self.send(group, messages);
            }
        }
        self.start_applies();
    }

    /// Starts the applies that can start, completes what the applied indexes cover, lets held
    /// acknowledgements go.
    fn start_applies(&mut self) {
        for group in self.group_ids() {
            self.start_apply(group);
            self.complete(group);
            // Also after a change of role or a rebuild, which `applied` does not see.
            self.release_held(group);
        }
    }

    /// Sends the group's messages, except that a follower whose copy lags by over
    /// APPLY_BACKLOG_BYTES_MAX holds back its acknowledgements of appends until its apply
    /// catches up: the leader commits no faster than a majority's copies apply, the way its
    /// own writes wait for its apply past that lag (`committed`). Without it a follower slower
    /// than the leader queues committed entries without bound (memory, and reads after the
    /// writes stop wait behind its catching up on a shared machine). Holding a message is a
    /// network delay to Raft; an acknowledgement covers every earlier one, so only the latest
    /// per node is kept. Heartbeat responses and rejections go out, so leadership holds.
    fn send(&mut self, group: GroupId, mut messages: Vec<Message>) {
        if let Some(slot) = self.groups.get_mut(&group).filter(|s| holds_acks(s)) {
            messages.retain(|m| {
                let ack = m.get_msg_type() == MessageType::MsgAppendResponse && !m.reject;
                if ack {
                    slot.held.insert(m.to, m.clone());
                }
                !ack
            });
        }
        if !messages.is_empty() {
            self.out.push(Output::Send { group, messages });
        }
    }

    /// Lets held acknowledgements go once the copy's backlog is back within bounds (or the
    /// replica leads now, or broke).
    fn release_held(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.held.is_empty() || holds_acks(slot) {
            return;
        }
        let messages: Vec<Message> = std::mem::take(&mut slot.held).into_values().collect();
        self.out.push(Output::Send { group, messages });
    }

    fn leader_changed(&mut self, group: GroupId, leader: u64) {
        tracing::info!(%group, leader, "leader changed");
        self.out.push(Output::LeaderChanged { group, leader });
        let me = self.config.node_id;
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if leader != me {
            // ReadIndex requests of a deposed leader never complete: fail them so the
            // clients retry at the new leader. Writes resolve through the log.
            for (_, reads) in std::mem::take(&mut slot.reads) {
                for r in reads {
                    self.out
                        .push(Output::ReadFailed { token: r.token, error: NodeError::NotLeader { leader } });
                }
            }
        }
    }

    /// Queues committed entries for the group's store, and acknowledges the writes among
    /// them that need not wait for it.
    ///
    /// A write is durable once committed (in the synced WAL of a majority), and every read
    /// waits until the copy it reads has applied the commit index at the read's start, so an
    /// acknowledged write is seen by every later read whether or not it is applied yet. So a
    /// write is acknowledged at commit; only one with guards (a read-modify-write of a partial
    /// block, which apply may skip and the proposer then retries) and a state machine's
    /// commands (`at_apply`) wait for their apply. This takes the apply (an O_DIRECT write of
    /// the whole entry: several ms for 8 MiB) off the write's latency.
    fn committed(&mut self, group: GroupId, entries: Vec<CommittedEntry>) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        let Some(last) = entries.last().map(|e| e.index) else { return };
        match slot.rebuild {
            // Logged and committed; replayed over the copy when it is complete.
            Some(Rebuild::Installing | Rebuild::Copying { .. } | Rebuild::Waiting { .. }) => return,
            Some(Rebuild::Finishing { .. }) => return slot.to_apply.extend(entries),
            None => slot.to_apply.extend(entries),
        }
        // Bounded lag: past it, writes wait for their apply again, which slows the clients
        // down to what the copy takes (otherwise the backlog, and what a read waits for,
        // would grow without bound).
        if slot.broken.is_some() || backlog_bytes(slot) > APPLY_BACKLOG_BYTES_MAX {
            return;
        }
        let at_apply = &slot.at_apply;
        for id in slot.driver.take_committed(last, |id| !at_apply.contains(&id)) {
            if let Some(token) = slot.writes.remove(&id) {
                self.out.push(Output::Acked { token, result: Ok(()) });
            }
        }
    }

    /// Starts applying the group's queued entries unless an apply is in flight.
    fn start_apply(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.applying.is_some() || slot.to_apply.is_empty() || slot.broken.is_some() {
            return;
        }
        let (entries, bytes) = slot.to_apply.take();
        let Some(last) = entries.last().map(|e| e.index) else { return };
        self.next_apply += 1;
        let seq = self.next_apply;
        slot.applying = Some((seq, last));
        slot.applying_bytes = bytes;
        self.out.push(Output::Apply { group, seq, entries });
    }

    /// Apply `seq` of the group finished: take in its result, complete what it covers, start
    /// the next batch (or the copy that waited for it).
    pub(crate) fn applied(&mut self, group: GroupId, seq: u64, result: Result<ApplyReport, String>) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        let Some((_, last)) = slot.applying.filter(|(s, _)| *s == seq) else { return };
        slot.applying = None;
        slot.applying_bytes = 0;
        match slot.rebuild {
            Some(Rebuild::Waiting { index, offset, hint }) => {
                // The store is being replaced: the copy that waited for this apply starts.
                return self.start_rebuild(group, index, offset, hint);
            }
            Some(Rebuild::Installing | Rebuild::Copying { .. }) => return,
            None | Some(Rebuild::Finishing { .. }) => {}
        }
        match result {
            Ok(report) => {
                for at in report.guard_failures {
                    if let Some(id) = slot.guarded.remove(&at) {
                        slot.guard_failed.insert(id, at.0);
                    }
                }
                slot.applied = slot.applied.max(last);
                if slot.broken.is_none() && slot.rebuild.is_none() {
                    self.out.push(Output::Servable { group, index: slot.applied });
                }
            }
            Err(e) => {
                tracing::error!(%group, error = %e, "replica stops: the local store cannot apply committed entries");
                slot.broken = Some(format!("applying to the local store failed: {e}"));
                self.out.push(Output::Servable { group, index: 0 });
            }
        }
        self.finish_rebuild(group);
        self.complete(group);
        self.start_apply(group);
        self.release_held(group);
    }

    /// A store whose log replayed over its copy up to the target is checkpointed (once no
    /// older checkpoint is in flight), which [`NodeCore::checkpointed`] turns into the end of
    /// the rebuild.
    fn finish_rebuild(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        let Some(Rebuild::Finishing { target }) = slot.rebuild else { return };
        if slot.applied >= target && slot.checkpointing.is_none() && slot.broken.is_none() {
            slot.checkpointing = Some(slot.applied);
            self.out.push(Output::Checkpoint { group, applied: slot.applied });
        }
    }

    /// Acknowledges writes and serves reads that the applied index now covers.
    fn complete(&mut self, group: GroupId) {
        let me = self.config.node_id;
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.rebuild.is_some() {
            return;
        }
        let done = slot.driver.applied(slot.applied);
        for id in done.writes {
            slot.at_apply.remove(&id);
            if let Some(token) = slot.writes.remove(&id) {
                let result = match slot.guard_failed.remove(&id) {
                    Some(block) => Err(NodeError::GuardFailed { block }),
                    None => Ok(()),
                };
                self.out.push(Output::Acked { token, result });
            }
        }
        let applied = slot.applied;
        slot.guarded.retain(|&(index, _), _| index > applied);
        for id in done.failed {
            slot.at_apply.remove(&id);
            if let Some(token) = slot.writes.remove(&id) {
                self.out.push(Output::Acked { token, result: Err(NodeError::Dropped) });
            }
        }
        let mut serve = Vec::new();
        for id in done.reads {
            serve.extend(slot.reads.remove(&id).into_iter().flatten());
        }
        if !serve.is_empty() {
            let status = slot.driver.raft_status();
            let peers = status.voters.iter().chain(&status.learners).copied().filter(|&n| n != me).collect();
            self.out.push(Output::Serve { group, reads: serve, applied, peers });
        }
    }

    /// Starts copying the volume as of `index` from the group's other members (`hint`
    /// first), continuing at `offset`, once no apply is in flight. Replaces a copy running.
    fn start_rebuild(&mut self, group: GroupId, index: u64, offset: u64, hint: u64) {
        let me = self.config.node_id;
        let Some(slot) = self.groups.get_mut(&group) else { return };
        // Committed entries not applied yet are replayed over the copy from the log.
        slot.to_apply = ApplyQueue::default();
        slot.applied = index;
        if slot.applying.is_some() {
            slot.rebuild = Some(Rebuild::Waiting { index, offset, hint });
            return;
        }
        slot.rebuild = Some(Rebuild::Copying { index });
        let status = slot.driver.raft_status();
        let mut sources: Vec<u64> = Vec::new();
        for id in std::iter::once(hint).chain(status.voters).chain(status.learners) {
            if id != 0 && id != me && !sources.contains(&id) {
                sources.push(id);
            }
        }
        tracing::info!(%group, index, offset, ?sources, "rebuilding the store from peers");
        self.out.push(Output::Servable { group, index: 0 });
        self.out.push(Output::Rebuild { group, index, offset, sources });
    }

    /// The copy for `index` is complete (or failed on the local store): replay the entries
    /// logged since the snapshot index over it, checkpoint, and only then drop the marker.
    pub(crate) fn rebuild_done(&mut self, group: GroupId, index: u64, result: Result<(), String>) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.rebuild != Some(Rebuild::Copying { index }) {
            return; // a superseded copy
        }
        if let Err(why) = result {
            tracing::error!(%group, index, error = %why, "rebuild failed; the replica stops");
            slot.rebuild = None;
            slot.broken = Some(format!("rebuild failed: {why}"));
            return;
        }
        let target = slot.driver.handed_out();
        let replay = match slot.driver.committed_entries(index + 1, target + 1) {
            Ok(entries) => entries,
            Err(e) => {
                slot.rebuild = None;
                slot.broken = Some(format!("rebuild: reading the log to replay: {e}"));
                return;
            }
        };
        tracing::info!(%group, index, replay = replay.len(), target, "store copied; replaying the log over it");
        // Guards decide the same way as on the first apply (see `apply_entries`); nobody
        // waits for their outcome here. (`applied` is still `index`: nothing applies while
        // the copy runs.)
        slot.to_apply = ApplyQueue::default();
        slot.to_apply.extend(replay);
        slot.rebuild = Some(Rebuild::Finishing { target });
        self.start_apply(group);
        self.finish_rebuild(group);
    }

    /// Starts a checkpoint of every group whose interval passed.
    pub(crate) fn checkpoints(&mut self, now_ms: u64) {
        let interval = self.config.checkpoint_interval_ms;
        for group in self.group_ids() {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            if slot.checkpointing.is_some() || now_ms.saturating_sub(slot.last_checkpoint_ms) < interval {
                continue;
            }
            slot.last_checkpoint_ms = now_ms;
            self.checkpoint_now(group);
        }
    }

    /// Checkpoints the group if it has anything to checkpoint (closing it, shutting down);
    /// an idle group gives up the log entries it keeps for lagging peers instead.
    pub(crate) fn checkpoint_now(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.broken.is_some() || slot.rebuild.is_some() {
            return;
        }
        if slot.applied <= slot.checkpointed {
            // Nothing applied for a whole interval: the group is idle. The entries it keeps
            // for lagging peers would pin every WAL segment written after them (see the
            // WAL's deletion rule) while other groups keep writing, so the WAL would grow
            // without bound; an idle group gives them up (a peer that still needs them gets a
            // snapshot instead).
            let to = slot.checkpointed + 1;
            return compact_to(group, slot, to);
        }
        slot.checkpointing = Some(slot.applied);
        self.out.push(Output::Checkpoint { group, applied: slot.applied });
    }

    /// A checkpoint finished: the store is durable up to the index `result` holds.
    pub(crate) fn checkpointed(&mut self, group: GroupId, result: Result<u64, String>) {
        let (retain_entries, retain_bytes) = (self.config.log_retain_entries, self.config.log_retain_bytes);
        let Some(slot) = self.groups.get_mut(&group) else { return };
        let Some(requested) = slot.checkpointing.take() else { return };
        match (slot.rebuild, result) {
            (Some(Rebuild::Finishing { target }), _) if requested < target => {
                // One from before the copy: the rebuild's own checkpoint follows.
                self.finish_rebuild(group);
            }
            (Some(Rebuild::Finishing { target }), result) => {
                slot.rebuild = None;
                match result {
                    Ok(durable) if durable >= target => {
                        slot.checkpointed = durable;
                        self.out.push(Output::RemoveMarker { group });
                    }
                    // The marker stays: a restart rebuilds again.
                    Ok(durable) => {
                        tracing::warn!(%group, durable, target, "the store's checkpoint after a rebuild fell short")
                    }
                    Err(e) => tracing::warn!(%group, error = %e, "checkpoint after a rebuild failed"),
                }
                tracing::info!(%group, applied = slot.applied, "store rebuilt");
                if slot.broken.is_none() {
                    self.out.push(Output::Servable { group, index: slot.applied });
                }
                self.complete(group);
            }
            // A copy that began meanwhile starts the store over; its own checkpoint counts.
            (Some(_), _) => {}
            (None, Ok(durable)) if slot.broken.is_none() => {
                slot.checkpointed = slot.checkpointed.max(durable);
                compact(group, slot, retain_entries, retain_bytes);
            }
            (None, Ok(_)) => {}
            (None, Err(e)) => tracing::warn!(%group, error = %e, "checkpoint skipped"),
        }
    }
}

/// Drops log entries the store has durably applied, keeping the last `retain_entries` /
/// `retain_bytes` of them for peers that lag a little.
fn compact<D: WalDisk, W, R>(
    group: GroupId,
    slot: &mut Slot<D, W, R>,
    retain_entries: u64,
    retain_bytes: u64,
) {
    let hi = slot.checkpointed + 1;
    let by_count = hi.saturating_sub(retain_entries);
    let by_bytes = match slot.driver.storage().compaction_point(hi, retain_bytes) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%group, error = %e, "cannot size the log for compaction");
            return;
        }
    };
    compact_to(group, slot, by_count.max(by_bytes));
}

/// Drops the group's log entries below `to` (nothing if they are gone already).
fn compact_to<D: WalDisk, W, R>(group: GroupId, slot: &mut Slot<D, W, R>, to: u64) {
    if to <= slot.driver.storage().meta().snapshot_index + 1 {
        return;
    }
    match slot.driver.compact(to) {
        Ok(()) => tracing::debug!(%group, to, "log compacted"),
        Err(e) => tracing::warn!(%group, to, error = %e, "log compaction refused"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfState};
    use raftblk_blockdev::seal::{BlockWrite, Guard, Seal};

    use super::*;
    use crate::wal::disk::SimDisk;
    use crate::wal::{Wal, WalOptions};

    const G: GroupId = GroupId(5);
    type Core = NodeCore<SimDisk, u64, u64>;

    fn write(block: u64) -> Vec<Command> {
        let data = Bytes::from(vec![block as u8 + 1; 4096]);
        let seals = vec![Seal::plain(block, &data)];
        vec![Command::Write(BlockWrite { first: block, data, seals, guards: vec![] })]
    }

    /// One round as the runner drives it; returns what the core asked for.
    fn round(core: &mut Core, now: u64) -> Vec<Output<u64, u64>> {
        round_persisting(core, now).1
    }

    /// As [`round`], with what the round asked of the WAL. The WAL is synced at once, and
    /// the rounds that what it made committed needs follow.
    fn round_persisting(core: &mut Core, now: u64) -> (Persist, Vec<Output<u64, u64>>) {
        core.propose(now);
        let persist = persist_round(core);
        let mut out = core.take_outputs();
        for _ in 0..8 {
            if !core.has_ready() {
                break;
            }
            persist_round(core);
        }
        out.extend(core.take_outputs());
        (persist, out)
    }

    /// Collects a round and persists it as asked, at once.
    fn persist_round(core: &mut Core) -> Persist {
        let Collected { round, persist } = core.collect().unwrap();
        let wal = core.driver(G).unwrap().storage().wal().clone();
        match persist {
            Persist::Sync => {
                wal.lock().unwrap().sync().unwrap();
                core.synced(round);
            }
            Persist::Write => {
                wal.lock().unwrap().write_out().unwrap();
                core.persisted(round);
            }
            Persist::Nothing => {}
        }
        persist
    }

    /// Node `id`'s core with group `G` open over a fresh log whose members are `voters`.
    fn open_core(id: u64, voters: Vec<u64>, write_back: bool) -> Core {
        let wal = Arc::new(Mutex::new(Wal::open(SimDisk::new(id), WalOptions::default()).unwrap()));
        let mut storage = GroupStorage::open(wal.clone(), G).unwrap();
        storage.initialize(ConfState::from((voters, vec![]))).unwrap();
        wal.lock().unwrap().sync().unwrap();
        let mut core = Core::new(CoreConfig {
            node_id: id,
            election_ticks: 3,
            heartbeat_ticks: 1,
            read_lease_ms: 0,
            log_retain_entries: 10,
            log_retain_bytes: 1 << 20,
            checkpoint_interval_ms: 1000,
            seed: id,
        });
        core.open(G, storage, 0, None, write_back, 0).unwrap();
        core.take_outputs();
        core
    }

    /// A core leading a one-voter group, with nothing left to apply.
    fn leader() -> Core {
        leader_with(false)
    }

    /// As [`leader`], the group opened with `write_back`.
    fn leader_with(write_back: bool) -> Core {
        let mut core = open_core(1, vec![1], write_back);
        for now in 0..50 {
            core.tick();
            for o in round(&mut core, now) {
                if let Output::Apply { seq, .. } = o {
                    core.applied(G, seq, Ok(ApplyReport::default()));
                }
            }
            core.take_outputs();
            if core.driver(G).is_some_and(|d| d.is_leader()) && core.groups[&G].applying.is_none() {
                return core;
            }
        }
        panic!("a one-voter group did not elect itself");
    }

    fn applies(out: &[Output<u64, u64>]) -> Vec<(u64, usize)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Apply { seq, entries, .. } => Some((*seq, entries.len())),
                _ => None,
            })
            .collect()
    }

    fn acked(out: &[Output<u64, u64>]) -> Vec<(u64, bool)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Acked { token, result } => Some((*token, result.is_ok())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn writes_batch_into_one_entry_and_are_acknowledged_at_commit_guarded_ones_after_their_apply() {
        let mut core = leader();
        core.write(G, write(1), 10);
        let mut guarded = write(2);
        if let Command::Write(w) = &mut guarded[0] {
            w.guards.push(Guard { block: 2, version: 0 });
        }
        core.write(G, guarded, 11);
        let out = round(&mut core, 100);
        // Committed (one voter) and handed to the shell as one entry: the plain write is
        // acknowledged now, the guarded one (which apply may skip) is not.
        assert_eq!(applies(&out).iter().map(|a| a.1).sum::<usize>(), 1);
        assert_eq!(acked(&out), vec![(10, true)], "{out:?}");
        let (seq, _) = applies(&out)[0];
        // The next round does not wait for the apply, and starts no second one.
        core.write(G, write(3), 12);
        let out = round(&mut core, 101);
        assert!(applies(&out).is_empty(), "{out:?}");
        assert_eq!(acked(&out), vec![(12, true)], "committed: acknowledged before any apply");
        core.applied(G, seq, Ok(ApplyReport::default()));
        let out = core.take_outputs();
        assert_eq!(acked(&out), vec![(11, true)]);
        // What committed meanwhile follows as the next apply.
        assert_eq!(applies(&out).len(), 1);
    }

    #[test]
    fn a_single_copy_volume_acknowledges_writes_unsynced_and_a_flush_waits_for_the_sync() {
        let mut core = leader_with(true);
        core.write(G, write(1), 1);
        let (persist, out) = round_persisting(&mut core, 100);
        assert_eq!(persist, Persist::Write);
        assert_eq!(acked(&out), vec![(1, true)], "acknowledged once written out");
        core.flush(G, 2);
        assert!(acked(&core.take_outputs()).is_empty(), "a FLUSH waits for the sync");
        let (persist, out) = round_persisting(&mut core, 101);
        assert_eq!(persist, Persist::Sync);
        assert_eq!(acked(&out), vec![(2, true)]);
        core.flush(G, 3);
        assert_eq!(acked(&core.take_outputs()), vec![(3, true)], "nothing unsynced: answered at once");
        // Without a FLUSH, the sync comes within WRITE_BACK_SYNC_MS.
        core.write(G, write(2), 4);
        assert_eq!(round_persisting(&mut core, 200).0, Persist::Write);
        assert_eq!(round_persisting(&mut core, 200 + WRITE_BACK_SYNC_MS - 1).0, Persist::Nothing);
        assert_eq!(round_persisting(&mut core, 200 + WRITE_BACK_SYNC_MS).0, Persist::Sync);
    }

    #[test]
    fn a_volume_without_write_back_or_with_a_second_copy_coming_syncs_every_write() {
        let mut core = leader();
        core.write(G, write(1), 1);
        assert_eq!(round_persisting(&mut core, 100).0, Persist::Sync);
        core.flush(G, 2);
        assert_eq!(acked(&core.take_outputs()), vec![(2, true)], "acknowledged writes are durable");

        let mut core = leader_with(true);
        let mut learner = ConfChangeSingle::default();
        learner.set_change_type(ConfChangeType::AddLearnerNode);
        learner.node_id = 2;
        let mut change = ConfChangeV2::default();
        change.mut_changes().push(learner);
        core.conf_change(G, change).unwrap();
        assert_eq!(round_persisting(&mut core, 100).0, Persist::Sync, "a membership change pending");
        for now in 101..105 {
            round(&mut core, now);
        }
        assert_eq!(core.driver(G).unwrap().raft_status().learners, vec![2]);
        core.write(G, write(1), 3);
        assert_eq!(round_persisting(&mut core, 105).0, Persist::Sync, "a second copy relies on the log");
    }

    #[test]
    fn writes_wait_for_their_apply_once_the_copy_lags_too_far() {
        let mut core = leader();
        let mut acked_at_commit = Vec::new();
        let mut first_apply = None;
        for i in 0..20u64 {
            core.write(G, mib_write(i * 256), i);
            let out = round(&mut core, 100 + i);
            first_apply = first_apply.or(applies(&out).first().map(|a| a.0));
            acked_at_commit.extend(acked(&out));
        }
        // Nothing was applied: up to 16 MiB of backlog (15 writes of 1 MiB and their seals)
        // are acknowledged at commit, the rest not.
        assert_eq!(acked_at_commit, (0..15).map(|t| (t, true)).collect::<Vec<_>>());
        core.applied(G, first_apply.expect("an apply started"), Ok(ApplyReport::default()));
        let out = core.take_outputs();
        assert!(acked(&out).is_empty(), "the first apply covered only the first write: {out:?}");
        let (seq, n) = applies(&out)[0];
        assert_eq!(n, 19, "the rest goes as one apply");
        core.applied(G, seq, Ok(ApplyReport::default()));
        let out = core.take_outputs();
        assert_eq!(acked(&out), (15..20).map(|t| (t, true)).collect::<Vec<_>>(), "answered once applied");
    }

    /// Carries out `out` of core `from`: messages go to `other`, applies are reported done at
    /// once or, with `hold`, kept there to report later; returns the other outputs.
    fn drain(
        core: &mut Core,
        other: &mut Core,
        from: u64,
        mut out: Vec<Output<u64, u64>>,
        mut hold: Option<&mut Vec<u64>>,
    ) -> Vec<Output<u64, u64>> {
        let mut kept = Vec::new();
        while !out.is_empty() {
            for o in std::mem::take(&mut out) {
                match o {
                    Output::Send { messages, .. } => {
                        messages.into_iter().for_each(|m| other.step(G, from, m))
                    }
                    Output::Apply { seq, .. } => match hold.as_deref_mut() {
                        Some(held) => held.push(seq),
                        None => core.applied(G, seq, Ok(ApplyReport::default())),
                    },
                    o => kept.push(o),
                }
            }
            out = core.take_outputs();
        }
        kept
    }

    /// One round of leader `a` (node 1) and follower `b` (node 2), each delivering to the
    /// other; returns `a`'s outputs other than messages and applies.
    fn exchange(
        a: &mut Core,
        b: &mut Core,
        now: u64,
        b_holds: Option<&mut Vec<u64>>,
    ) -> Vec<Output<u64, u64>> {
        let out = round(a, now);
        let kept = drain(a, b, 1, out, None);
        let out = round(b, now);
        drain(b, a, 2, out, b_holds);
        kept
    }

    fn mib_write(first: u64) -> Vec<Command> {
        let blocks = (1 << 20) / 4096;
        let data = Bytes::from(vec![7u8; 1 << 20]);
        let seals = (0..blocks).map(|b| Seal::plain(first + b, &data[b as usize * 4096..][..4096])).collect();
        vec![Command::Write(BlockWrite { first, data, seals, guards: vec![] })]
    }

    #[test]
    fn a_follower_whose_copy_lags_too_far_holds_its_acknowledgements_until_it_applies() {
        let (mut a, mut b) = (open_core(1, vec![1, 2], false), open_core(2, vec![1, 2], false));
        // Only node 1's clock runs, so it is the one that campaigns.
        for now in 0..100 {
            a.tick();
            exchange(&mut a, &mut b, now, None);
            if a.driver(G).is_some_and(|d| d.is_leader()) && b.driver(G).is_some_and(|d| d.leader() == 1) {
                break;
            }
        }
        assert!(a.driver(G).is_some_and(|d| d.is_leader()), "node 1 did not get elected");
        // The follower's copy applies nothing: once it lags by 16 MiB, the leader, which needs
        // its acknowledgement to commit, stops acknowledging writes.
        let mut pending = Vec::new();
        let mut acks = Vec::new();
        for i in 0..24u64 {
            a.write(G, mib_write(i * 256), i);
            for r in 0..3 {
                acks.extend(acked(&exchange(&mut a, &mut b, 200 + i * 3 + r, Some(&mut pending))));
            }
        }
        assert!(acks.iter().all(|(_, ok)| *ok), "{acks:?}");
        let before = acks.len();
        assert!(
            (15..21).contains(&before),
            "{before} of 24 writes acknowledged with the follower's copy stalled"
        );
        // Once it applies, the acknowledgements go out, and every write commits.
        let out: Vec<_> = pending
            .drain(..)
            .flat_map(|seq| {
                b.applied(G, seq, Ok(ApplyReport::default()));
                b.take_outputs()
            })
            .collect();
        drain(&mut b, &mut a, 2, out, None);
        for r in 0..10 {
            acks.extend(acked(&exchange(&mut a, &mut b, 400 + r, None)));
        }
        assert_eq!(acks.len(), 24, "{acks:?}");
    }

    #[test]
    fn reads_are_served_once_their_index_is_applied() {
        let mut core = leader();
        core.write(G, write(1), 10);
        let out = round(&mut core, 100);
        let (seq, _) = applies(&out)[0];
        core.read(G, 1, 1, 20);
        let mut out = Vec::new();
        for now in 101..105 {
            out.extend(round(&mut core, now));
        }
        assert!(!out.iter().any(|o| matches!(o, Output::Serve { .. })), "served before the apply: {out:?}");
        core.applied(G, seq, Ok(ApplyReport::default()));
        let out = core.take_outputs();
        let served: Vec<u64> = out
            .iter()
            .flat_map(|o| match o {
                Output::Serve { reads, applied, .. } if *applied >= 2 => {
                    reads.iter().map(|r| r.token).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(served, vec![20]);
    }

    #[test]
    fn a_failed_apply_stops_the_replica_serving() {
        let mut core = leader();
        core.write(G, write(1), 10);
        let out = round(&mut core, 100);
        let (seq, _) = applies(&out)[0];
        core.applied(G, seq, Err("disk gone".into()));
        let out = core.take_outputs();
        assert!(out.iter().any(|o| matches!(o, Output::Servable { index: 0, .. })), "{out:?}");
        core.write(G, write(2), 11);
        let out = core.take_outputs();
        assert!(
            matches!(&out[..], [Output::Acked { token: 11, result: Err(NodeError::Internal(_)) }]),
            "{out:?}"
        );
    }

    #[test]
    fn an_oversized_write_is_refused_not_proposed() {
        let mut core = leader();
        let data = Bytes::from(vec![0u8; REQUEST_PAYLOAD_BYTES_MAX + 4096]);
        let seals = (0..data.len() as u64 / 4096).map(|b| Seal::plain(b, &data[..4096])).collect();
        core.write(G, vec![Command::Write(BlockWrite { first: 0, data, seals, guards: vec![] })], 7);
        let out = core.take_outputs();
        assert!(
            matches!(&out[..], [Output::Acked { token: 7, result: Err(NodeError::Internal(_)) }]),
            "{out:?}"
        );
    }

    #[test]
    fn a_round_reported_persisted_waits_for_the_rounds_before_it() {
        let mut core = leader();
        let wal = core.driver(G).unwrap().storage().wal().clone();
        core.write(G, write(1), 1);
        core.propose(10);
        let first = core.collect().unwrap();
        assert_eq!(first.persist, Persist::Sync);
        wal.lock().unwrap().begin_sync().unwrap();
        core.write(G, write(2), 2);
        core.propose(11);
        let second = core.collect().unwrap();
        assert_eq!(second.persist, Persist::Sync);
        assert!(acked(&core.take_outputs()).is_empty());
        // The second round's sync finished first: nothing is durable that the first round
        // appended, as far as the core may know, so nothing commits.
        wal.lock().unwrap().sync().unwrap();
        core.persisted(second.round);
        let mut out = core.take_outputs();
        for _ in 0..4 {
            persist_round(&mut core);
            out.extend(core.take_outputs());
        }
        assert!(acked(&out).is_empty(), "acknowledged before the round before it was persisted: {out:?}");
        core.synced(first.round);
        for _ in 0..4 {
            persist_round(&mut core);
            out.extend(core.take_outputs());
        }
        assert_eq!(acked(&out), vec![(1, true), (2, true)]);
    }

    #[test]
    fn a_write_back_flush_waits_for_the_sync_that_runs() {
        let mut core = leader_with(true);
        core.write(G, write(1), 1);
        let (persist, out) = round_persisting(&mut core, 100);
        assert_eq!((persist, acked(&out)), (Persist::Write, vec![(1, true)]));
        core.flush(G, 2);
        core.propose(101);
        let syncing = core.collect().unwrap();
        assert_eq!(syncing.persist, Persist::Sync);
        // A second FLUSH while that sync runs: the acknowledged write is not durable yet.
        core.flush(G, 3);
        assert!(acked(&core.take_outputs()).is_empty());
        core.synced(syncing.round);
        assert_eq!(acked(&core.take_outputs()), vec![(2, true), (3, true)]);
        core.flush(G, 4);
        assert_eq!(acked(&core.take_outputs()), vec![(4, true)], "nothing unsynced: answered at once");
    }

    #[test]
    fn a_write_to_a_group_not_held_fails_with_not_member() {
        let mut core = leader();
        core.write(GroupId(99), write(1), 3);
        let out = core.take_outputs();
        assert!(matches!(
            &out[..],
            [Output::Acked { token: 3, result: Err(NodeError::NotMember(GroupId(99))) }]
        ));
    }
}
