//! The runner thread: owns every group's [`GroupDriver`] and turns events into
//! Raft rounds (propose, collect, one WAL sync, send). Applying committed entries to a copy
//! and checkpointing it run as tasks on the runtime, which report back as events; the
//! round never waits for them (acknowledgements follow `Event::Applied`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Message};
use raftblk_blockdev::backend::{check_range, BackendError};
use raftblk_blockdev::seal::{SealedBlocks, BLOCK};
use tokio::sync::oneshot;

use super::repair::{read_repaired, RepairContext};
use super::{GroupStore, NodeConfig, NodeError, PeerFetcher, RebuildStatus, Shared, SnapshotSource};
use crate::snapshot::image::pull_image;
use crate::snapshot::marker::{self, Marker, OpenPlan};
use crate::snapshot::pull::{pull, PullPlan, PullProgress};
use crate::storage::GroupStorage;
use crate::transport::Transport;
use crate::volume::command::{Command, BATCH_COMMANDS_MAX};
use crate::volume::group::{CommittedEntry, GroupConfig, GroupDriver, InstalledSnapshot, RequestId};
use crate::volume::{apply_entries, ApplyReport};
use crate::wal::disk::NodeDisk;
use crate::wal::record::{GroupId, NodeId};
use crate::wal::Wal;

/// Most events handled in one round before the round's Raft work runs.
const EVENTS_PER_ROUND_MAX: usize = 1024;
/// Most payload bytes proposed in one entry (several client writes batch into one).
const ENTRY_PAYLOAD_BYTES_MAX: usize = 8 << 20;
/// Largest payload of one write request: the NBD maximum (32 MiB) and its blocks' seals (at
/// most 37 bytes per 4 KiB block, 296 KiB); an entry holding it alone still fits a WAL
/// record (see `wal::record::PAYLOAD_BYTES_MAX`, 1 MiB above the NBD maximum).
const REQUEST_PAYLOAD_BYTES_MAX: usize = (32 << 20) + (512 << 10);
/// How often each group's store is flushed and its applied index recorded.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;
/// An apply running on the runtime: the last index it applies and its outcome.
type ApplyTask = tokio::task::JoinHandle<(u64, Result<ApplyReport, String>)>;

/// Work for the runner.
pub(super) enum Event {
    Open {
        group: GroupId,
        voters: Vec<u64>,
        store: GroupStore,
        done: Reply<()>,
    },
    Close {
        group: GroupId,
        done: Reply<()>,
    },
    Write {
        group: GroupId,
        commands: Vec<Command>,
        done: Reply<()>,
    },
    Read {
        group: GroupId,
        first: u64,
        count: u32,
        done: Reply<SealedBlocks>,
    },
    Raft {
        from: NodeId,
        group: GroupId,
        bytes: Bytes,
    },
    TransferLeader {
        group: GroupId,
        to: u64,
    },
    ConfChange {
        group: GroupId,
        change: raft::eraftpb::ConfChangeV2,
        done: Reply<()>,
    },
    /// A checkpoint task finished: the store is durable up to the index it returns.
    Checkpointed {
        group: GroupId,
        result: Result<u64, String>,
    },
    /// Apply task `seq` of the group finished (its result is its task's output; see
    /// `Runner::start_apply`).
    Applied {
        group: GroupId,
        seq: u64,
    },
    /// A rebuild task finished copying (or failed on the local store).
    RebuildDone {
        group: GroupId,
        index: u64,
        result: Result<(), String>,
    },
    Shutdown,
}

/// A store being rebuilt from peers.
struct Rebuild {
    index: u64,
    progress: Arc<PullProgress>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
}

struct PendingRead {
    first: u64,
    count: u32,
    done: Reply<SealedBlocks>,
}

struct Slot {
    driver: GroupDriver<NodeDisk>,
    store: GroupStore,
    new_writes: Vec<(Vec<Command>, Reply<()>)>,
    new_reads: Vec<PendingRead>,
    writes: HashMap<RequestId, Reply<()>>,
    reads: HashMap<RequestId, Vec<PendingRead>>,
    /// Guarded writes this leader proposed, by (entry index, position): which request to
    /// tell if the guard fails when the entry is applied.
    guarded: HashMap<(u64, usize), RequestId>,
    /// Requests whose guarded write was skipped (the block had changed).
    guard_failed: HashMap<RequestId, u64>,
    /// Highest index applied to the store.
    applied: u64,
    /// Committed entries waiting for the apply in flight to finish, in log order.
    to_apply: Vec<CommittedEntry>,
    /// The apply task in flight and its number (at most one per group: entries apply in
    /// log order).
    applying: Option<(u64, ApplyTask)>,
    /// Highest index applied and flushed, as the applied file records.
    checkpointed: u64,
    /// The checkpoint task in flight.
    checkpointing: Option<tokio::task::JoinHandle<()>>,
    last_checkpoint: Instant,
    /// Set when the store failed to apply: the replica stops serving.
    broken: Option<String>,
    /// Set while the store is being rebuilt: committed entries are logged but not applied.
    rebuild: Option<Rebuild>,
    /// What peers copying snapshot chunks from this store may rely on.
    servable: Arc<AtomicU64>,
}

pub(super) struct Runner {
    config: NodeConfig,
    wal: Arc<Mutex<Wal<NodeDisk>>>,
    events: Receiver<Event>,
    /// For apply, checkpoint and rebuild tasks to report back (the runner's own queue).
    task_events: std::sync::mpsc::Sender<Event>,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    rt: tokio::runtime::Handle,
    groups: HashMap<GroupId, Slot>,
    next_request: u64,
    /// Numbers apply tasks (see `Slot::applying`).
    next_apply: u64,
    rng: u64,
    /// The monotonic clock read leases are measured in.
    clock: Instant,
}

fn fail<T>(tx: Reply<T>, e: NodeError) {
    let _ = tx.send(Err(e));
}

impl Runner {
    pub(super) fn new(
        config: NodeConfig,
        wal: Wal<NodeDisk>,
        events: Receiver<Event>,
        task_events: std::sync::mpsc::Sender<Event>,
        shared: Arc<Shared>,
        transport: Arc<Transport>,
        rt: tokio::runtime::Handle,
    ) -> Runner {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ config.node_id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Runner {
            config,
            wal: Arc::new(Mutex::new(wal)),
            events,
            task_events,
            shared,
            transport,
            rt,
            groups: HashMap::new(),
            next_request: 0,
            next_apply: 0,
            rng: seed | 1,
            clock: Instant::now(),
        }
    }

    fn random(&mut self) -> u64 {
        crate::volume::group::xorshift64(&mut self.rng)
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// Runs until shutdown; returns false if it stopped because replication failed.
    pub(super) fn run(mut self) -> bool {
        let mut clean = true;
        let tick = self.config.tick;
        let mut next_tick = Instant::now() + tick;
        'outer: loop {
            // Raft may have work left from the last round (entries committed by a late ack,
            // more to apply); then only look for events, do not wait for one.
            let busy = self.groups.values().any(|s| s.broken.is_none() && s.driver.has_ready());
            let wait =
                if busy { Duration::ZERO } else { next_tick.saturating_duration_since(Instant::now()) };
            match self.events.recv_timeout(wait) {
                Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
            }
            for _ in 0..EVENTS_PER_ROUND_MAX {
                match self.events.try_recv() {
                    Ok(Event::Shutdown) => break 'outer,
                    Ok(ev) => self.handle(ev),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.tick_groups();
                next_tick = if now > next_tick + tick { now + tick } else { next_tick + tick };
                self.publish_status();
            }
            self.propose();
            if let Err(e) = self.round() {
                // The WAL cannot be trusted after a failed sync; stop replicating rather than
                // acknowledge writes that may not be durable.
                tracing::error!(error = %e, "Raft round failed; replication on this node stops");
                clean = false;
                break;
            }
            self.checkpoint(false);
        }
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in ids {
            self.drain_apply(group);
            self.complete(group);
        }
        self.checkpoint(true);
        for (_, slot) in self.groups.drain() {
            fail_all(slot, || NodeError::ShuttingDown);
        }
        tracing::info!("replication runner stopped");
        clean
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Open { group, voters, store, done } => {
                let r = self.open(group, voters, store);
                let _ = done.send(r);
            }
            Event::Close { group, done } => {
                self.drain_apply(group);
                if let Some(mut slot) = self.groups.remove(&group) {
                    self.checkpoint_slot(group, &mut slot);
                    fail_all(slot, || NodeError::ShuttingDown);
                }
                if let Ok(mut m) = self.shared.status.write() {
                    m.remove(&group);
                }
                if let Ok(mut m) = self.shared.sources.write() {
                    m.remove(&group);
                }
                let _ = done.send(Ok(()));
            }
            Event::Write { group, commands, done } => {
                let slot = match self.serving(group) {
                    Ok(slot) => slot,
                    Err(e) => return fail(done, e),
                };
                let is_app = |c: &Command| matches!(c, Command::App { .. });
                match &slot.store {
                    GroupStore::Volume(store) => {
                        let size = store.backend.size_bytes();
                        let in_range = commands.iter().all(|c| {
                            !is_app(c)
                                && c.range().is_none_or(|(off, len)| check_range(off, len, size).is_ok())
                        });
                        if !in_range {
                            return fail(done, NodeError::OutOfRange);
                        }
                    }
                    GroupStore::Machine(_) if !commands.iter().all(is_app) => {
                        return fail(
                            done,
                            NodeError::Internal("a state machine group takes only App commands".into()),
                        );
                    }
                    GroupStore::Machine(_) => {}
                }
                // Proposals batch requests up to ENTRY_PAYLOAD_BYTES_MAX, and a larger one goes
                // alone; one past the NBD maximum would not fit a WAL record.
                let payload: usize = commands.iter().map(Command::payload_len).sum();
                if payload > REQUEST_PAYLOAD_BYTES_MAX {
                    return fail(
                        done,
                        NodeError::Internal(format!(
                            "a write of {payload} bytes exceeds the largest replicated write ({REQUEST_PAYLOAD_BYTES_MAX})"
                        )),
                    );
                }
                slot.new_writes.push((commands, done));
            }
            Event::Read { group, first, count, done } => {
                let slot = match self.serving(group) {
                    Ok(slot) => slot,
                    Err(e) => return fail(done, e),
                };
                let GroupStore::Volume(store) = &slot.store else {
                    return fail(done, NodeError::Internal("state machine groups are read locally".into()));
                };
                let (offset, len) = (first.saturating_mul(BLOCK), u64::from(count) * BLOCK);
                if check_range(offset, len, store.backend.size_bytes()).is_err() {
                    return fail(done, NodeError::OutOfRange);
                }
                slot.new_reads.push(PendingRead { first, count, done });
            }
            Event::Raft { from, group, bytes } => {
                let Some(slot) = self.groups.get_mut(&group) else {
                    tracing::debug!(%group, %from, "message for a group this node does not (yet) have");
                    return;
                };
                // Entries' data become slices of the frame's buffer, not copies of it.
                match <Message as protobuf::Message>::parse_from_carllerche_bytes(&bytes) {
                    Ok(m) => {
                        if let Err(e) = slot.driver.step(m) {
                            tracing::debug!(%group, %from, error = %e, "Raft refused a message");
                        }
                    }
                    Err(e) => tracing::warn!(%group, %from, error = %e, "undecodable Raft message"),
                }
            }
            Event::TransferLeader { group, to } => {
                if let Some(slot) = self.groups.get_mut(&group) {
                    slot.driver.transfer_leader(to);
                }
            }
            Event::ConfChange { group, change, done } => {
                let Some(slot) = self.groups.get_mut(&group) else {
                    return fail(done, NodeError::NotMember(group));
                };
                let r = slot.driver.propose_conf_change(change).map_err(|e| match e {
                    crate::volume::group::GroupError::NotLeader { leader } => NodeError::NotLeader { leader },
                    other => NodeError::Internal(other.to_string()),
                });
                let _ = done.send(r);
            }
            Event::Applied { group, seq } => self.applied(group, seq),
            Event::Checkpointed { group, result } => self.checkpointed(group, result),
            Event::RebuildDone { group, index, result } => self.rebuild_done(group, index, result),
            Event::Shutdown => {}
        }
    }

    /// The group's slot if this replica may serve client I/O now: it holds the group, its
    /// store works, it leads, and its store is not being rebuilt (a rebuilding store cannot
    /// answer reads or apply writes; clients retry until leadership moves to a complete
    /// replica, see `tick_groups`).
    fn serving(&mut self, group: GroupId) -> Result<&mut Slot, NodeError> {
        let slot = self.groups.get_mut(&group).ok_or(NodeError::NotMember(group))?;
        if let Some(why) = &slot.broken {
            return Err(NodeError::Internal(why.clone()));
        }
        if !slot.driver.is_leader() || slot.rebuild.is_some() {
            return Err(NodeError::NotLeader { leader: slot.driver.leader() });
        }
        Ok(slot)
    }

    fn open(&mut self, group: GroupId, voters: Vec<u64>, store: GroupStore) -> Result<(), NodeError> {
        if self.groups.contains_key(&group) {
            return Ok(());
        }
        let internal = |e: &dyn std::fmt::Display| NodeError::Internal(format!("group {group}: {e}"));
        let mut storage = GroupStorage::open(self.wal.clone(), group).map_err(|e| internal(&e))?;
        if !storage.is_initialized() {
            storage.initialize(ConfState::from((voters, Vec::new()))).map_err(|e| internal(&e))?;
            self.sync_wal().map_err(|e| internal(&e))?;
        }
        let checkpointed = match &store {
            GroupStore::Volume(s) => read_applied(&s.applied_path).map_err(|e| internal(&e))?,
            GroupStore::Machine(s) => s.machine.applied_index(),
        };
        let found = marker::read(store.rebuild_path()).map_err(|e| internal(&e))?;
        let plan = marker::plan_open(
            checkpointed,
            storage.meta().snapshot_index,
            storage.hard_state().commit,
            found,
        );
        let applied = match plan {
            OpenPlan::Replay { applied } => {
                if found.is_some() {
                    marker::remove(store.rebuild_path()).map_err(|e| internal(&e))?;
                }
                applied
            }
            OpenPlan::Rebuild { index, .. } => index,
        };
        let election_tick = self.config.election_ticks.max(2);
        let seed = self.random();
        let cfg = GroupConfig {
            node_id: self.config.node_id.0,
            group,
            election_tick,
            seed,
            heartbeat_tick: self.config.heartbeat_ticks,
            applied,
            read_lease_ms: self.config.read_lease_ms(),
        };
        let driver = GroupDriver::new(&cfg, storage).map_err(|e| internal(&e))?;
        tracing::info!(%group, applied, election_tick, ?plan, "replica opened");
        let servable = Arc::new(AtomicU64::new(0));
        if let Ok(mut m) = self.shared.sources.write() {
            m.insert(group, SnapshotSource { store: store.clone(), servable: servable.clone() });
        }
        self.groups.insert(
            group,
            Slot {
                driver,
                store,
                new_writes: Vec::new(),
                new_reads: Vec::new(),
                writes: HashMap::new(),
                reads: HashMap::new(),
                guarded: HashMap::new(),
                guard_failed: HashMap::new(),
                applied,
                to_apply: Vec::new(),
                applying: None,
                checkpointed: applied,
                checkpointing: None,
                last_checkpoint: Instant::now(),
                broken: None,
                rebuild: None,
                servable,
            },
        );
        match plan {
            OpenPlan::Replay { applied } => self.set_servable(group, applied),
            OpenPlan::Rebuild { index, offset } => self.start_rebuild(group, index, offset, 0),
        }
        Ok(())
    }

    fn set_servable(&self, group: GroupId, applied: u64) {
        if let Some(slot) = self.groups.get(&group) {
            let ok = slot.rebuild.is_none() && slot.broken.is_none();
            slot.servable.store(if ok { applied } else { 0 }, Ordering::Release);
        }
    }

    /// Starts copying the volume as of `index` from the group's other members (`hint`
    /// first), continuing at `offset`. Replaces a rebuild already running.
    fn start_rebuild(&mut self, group: GroupId, index: u64, offset: u64, hint: u64) {
        let me = self.config.node_id.0;
        let fetcher = PeerFetcher { shared: self.shared.clone(), transport: self.transport.clone() };
        let chunk_bytes = self.config.snapshot_chunk_bytes;
        let rate = self.shared.rebuild_rate_bytes_per_s.load(Ordering::Relaxed);
        let events = self.task_events.clone();
        // An apply in flight must not write over blocks the copy brings in.
        self.drain_apply(group);
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if let Some(old) = slot.rebuild.take() {
            old.task.abort();
        }
        // Committed entries not applied yet are replayed over the copy from the log.
        slot.to_apply.clear();
        slot.servable.store(0, Ordering::Release);
        slot.applied = index;
        let status = slot.driver.raft_status();
        let mut sources: Vec<u64> = Vec::new();
        for id in std::iter::once(hint).chain(status.voters).chain(status.learners) {
            if id != 0 && id != me && !sources.contains(&id) {
                sources.push(id);
            }
        }
        let plan = PullPlan { group, index, offset, sources, chunk_bytes, rate_bytes_per_s: rate };
        tracing::info!(%group, index, offset, sources = ?plan.sources, "rebuilding the store from peers");
        let progress = Arc::new(PullProgress::default());
        let store = slot.store.clone();
        let p = progress.clone();
        let task = self.rt.spawn(async move {
            let result = match &store {
                GroupStore::Volume(s) => pull(&fetcher, s, &plan, &p).await,
                GroupStore::Machine(s) => pull_image(&fetcher, s, group, index, &plan.sources, &p).await,
            };
            let _ =
                events.send(Event::RebuildDone { group, index, result: result.map_err(|e| e.to_string()) });
        });
        slot.rebuild = Some(Rebuild { index, progress, task, started: Instant::now() });
        // Visible before this replica acknowledges the snapshot (see `VolumeManager`'s
        // promotion check), not only at the next tick.
        self.publish_status();
    }

    /// The copy is complete: replay the entries logged since the snapshot index over it,
    /// checkpoint, and only then drop the marker.
    fn rebuild_done(&mut self, group: GroupId, index: u64, result: Result<(), String>) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.rebuild.as_ref().map(|r| r.index) != Some(index) {
            return; // a superseded rebuild
        }
        if let Err(why) = result {
            tracing::error!(%group, index, error = %why, "rebuild failed; the replica stops");
            slot.rebuild = None;
            slot.broken = Some(format!("rebuild failed: {why}"));
            return;
        }
        let handed_out = slot.driver.handed_out();
        let replay = match slot.driver.committed_entries(index + 1, handed_out + 1) {
            Ok(entries) => entries,
            Err(e) => {
                slot.rebuild = None;
                slot.broken = Some(format!("rebuild: reading the log to replay: {e}"));
                return;
            }
        };
        let entries = replay.len();
        let store = slot.store.clone();
        // Guards decide the same way as on the first apply (see `apply_entries`); nobody
        // waits for their outcome here.
        if let Err(e) = self.rt.block_on(apply_to(&store, replay)) {
            slot.rebuild = None;
            slot.broken = Some(format!("rebuild: replaying the log: {e}"));
            return;
        }
        let took = slot.rebuild.take().map(|r| r.started.elapsed());
        slot.applied = handed_out;
        slot.checkpointed = 0;
        tracing::info!(%group, index, replayed = entries, applied = handed_out, ?took, "store rebuilt");
        let Some(mut slot) = self.groups.remove(&group) else { return };
        self.checkpoint_slot(group, &mut slot);
        if slot.checkpointed >= handed_out {
            if let Err(e) = marker::remove(slot.store.rebuild_path()) {
                tracing::warn!(%group, error = %e, "cannot remove the rebuild marker");
            }
        }
        self.groups.insert(group, slot);
        self.set_servable(group, handed_out);
    }

    /// Turns queued writes into proposals (batched into few entries) and queued reads
    /// into one ReadIndex request per group.
    fn propose(&mut self) {
        let now_ms = self.clock.elapsed().as_millis() as u64;
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in ids {
            let mut writes = match self.groups.get_mut(&group) {
                Some(slot) if !slot.new_writes.is_empty() => std::mem::take(&mut slot.new_writes),
                _ => Vec::new(),
            };
            while !writes.is_empty() {
                let mut commands = Vec::new();
                let mut bytes = 0usize;
                let mut batch = Vec::new();
                let mut guarded = Vec::new();
                while let Some((cmds, _)) = writes.first() {
                    let size: usize = cmds.iter().map(|c| c.payload_len().max(16)).sum();
                    let fits = commands.len() + cmds.len() <= BATCH_COMMANDS_MAX
                        && (batch.is_empty() || bytes + size <= ENTRY_PAYLOAD_BYTES_MAX);
                    if !fits {
                        break;
                    }
                    let (cmds, done) = writes.remove(0);
                    bytes += size;
                    let id = self.request_id();
                    for (i, c) in cmds.iter().enumerate() {
                        if matches!(c, Command::Write(w) if !w.guards.is_empty()) {
                            guarded.push((commands.len() + i, id));
                        }
                    }
                    commands.extend(cmds);
                    batch.push((id, done));
                }
                let Some(slot) = self.groups.get_mut(&group) else { break };
                let ids: Vec<RequestId> = batch.iter().map(|(id, _)| *id).collect();
                match slot.driver.propose(&commands, ids) {
                    Ok(index) => {
                        slot.writes.extend(batch);
                        slot.guarded
                            .extend(guarded.into_iter().map(|(position, id)| ((index, position), id)));
                    }
                    Err(e) => {
                        let leader = slot.driver.leader();
                        for (_, done) in batch {
                            fail(
                                done,
                                match &e {
                                    crate::volume::group::GroupError::NotLeader { .. } => {
                                        NodeError::NotLeader { leader }
                                    }
                                    other => NodeError::Internal(other.to_string()),
                                },
                            );
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

    /// One Raft round over every group: collect, one WAL sync, on_synced, apply, complete.
    fn round(&mut self) -> Result<(), NodeError> {
        let mut collected = Vec::new();
        let mut needs_sync = false;
        let mut snapshots: Vec<(GroupId, InstalledSnapshot)> = Vec::new();
        let mut to_apply: HashMap<GroupId, Vec<CommittedEntry>> = HashMap::new();
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for &group in &ids {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            if slot.broken.is_some() {
                continue;
            }
            match slot.driver.collect() {
                Ok(Some(actions)) => {
                    if let Some(leader) = actions.leader_changed {
                        self.leader_changed(group, leader);
                    }
                    if let Some(snap) = actions.snapshot {
                        // The marker goes first: once the WAL sync makes the install durable,
                        // a restart must know the store is not the volume as of the log.
                        if let Some(slot) = self.groups.get(&group) {
                            marker::write(slot.store.rebuild_path(), Marker { index: snap.index, offset: 0 })
                                .map_err(|e| {
                                    NodeError::Internal(format!("group {group}: rebuild marker: {e}"))
                                })?;
                            slot.servable.store(0, Ordering::Release);
                        }
                        snapshots.push((group, snap));
                    }
                    self.send(group, actions.messages);
                    to_apply.entry(group).or_default().extend(actions.committed);
                    needs_sync |= actions.needs_sync;
                    collected.push(group);
                }
                Ok(None) => {}
                Err(e) => return Err(NodeError::Internal(format!("group {group}: {e}"))),
            }
        }
        if needs_sync {
            self.sync_wal()?;
        }
        for (group, snap) in snapshots {
            tracing::info!(%group, index = snap.index, from = snap.from, "snapshot installed");
            self.start_rebuild(group, snap.index, 0, snap.from);
        }
        for &group in &collected {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            let actions =
                slot.driver.on_synced().map_err(|e| NodeError::Internal(format!("group {group}: {e}")))?;
            if let Some(leader) = actions.leader_changed {
                self.leader_changed(group, leader);
            }
            self.send(group, actions.messages);
            to_apply.entry(group).or_default().extend(actions.committed);
        }
        self.apply(to_apply);
        for group in ids {
            self.complete(group);
        }
        Ok(())
    }

    /// One `fdatasync` of the WAL for everything appended so far (nothing if it is synced).
    fn sync_wal(&self) -> Result<(), NodeError> {
        let mut wal = self.wal.lock().map_err(|_| NodeError::Internal("WAL lock poisoned".into()))?;
        wal.sync().map_err(|e| NodeError::Internal(format!("WAL sync: {e}")))
    }

    fn send(&self, group: GroupId, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            match protobuf::Message::write_to_bytes(&m) {
                Ok(bytes) => {
                    if let Err(e) = self.transport.send(NodeId(to), group, Bytes::from(bytes)) {
                        tracing::debug!(%group, to, error = %e, "cannot send a Raft message");
                    }
                }
                Err(e) => tracing::error!(%group, error = %e, "cannot encode a Raft message"),
            }
        }
    }

    fn leader_changed(&mut self, group: GroupId, leader: u64) {
        tracing::info!(%group, leader, "leader changed");
        if let Ok(mut m) = self.shared.leaders.write() {
            m.insert(group, leader);
        }
        if let Some(slot) = self.groups.get_mut(&group) {
            if leader != self.config.node_id.0 {
                // ReadIndex requests of a deposed leader never complete: fail them so the
                // clients retry at the new leader. Writes resolve through the log.
                for (_, reads) in slot.reads.drain() {
                    for r in reads {
                        fail(r.done, NodeError::NotLeader { leader });
                    }
                }
            }
        }
    }

    /// Queues committed entries for each group's store and starts applying them where no
    /// apply is in flight. The round does not wait: an apply runs on the runtime while the
    /// next rounds append, sync and send (`Event::Applied` reports back), so one slow copy
    /// stalls neither its own log nor any other group.
    fn apply(&mut self, to_apply: HashMap<GroupId, Vec<CommittedEntry>>) {
        for (group, entries) in to_apply {
            let Some(slot) = self.groups.get_mut(&group) else { continue };
            if slot.rebuild.is_some() {
                // Logged and committed; replayed over the copy when it is complete.
                continue;
            }
            slot.to_apply.extend(entries);
            self.start_apply(group);
        }
    }

    /// Starts applying the group's queued entries, unless an apply is in flight (entries
    /// apply in log order; within a batch, `apply_entries` runs non-overlapping commands
    /// together).
    fn start_apply(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.applying.is_some() || slot.to_apply.is_empty() || slot.broken.is_some() {
            return;
        }
        self.next_apply += 1;
        let seq = self.next_apply;
        let entries = std::mem::take(&mut slot.to_apply);
        let Some(last) = entries.last().map(|e| e.index) else { return };
        let store = slot.store.clone();
        let events = self.task_events.clone();
        let task = self.rt.spawn(async move {
            let result = apply_to(&store, entries).await;
            let _ = events.send(Event::Applied { group, seq });
            (last, result)
        });
        slot.applying = Some((seq, task));
    }

    /// Waits for the group's apply in flight, if any, and takes in its result: before the
    /// store is copied over by a rebuild, or closed. (Its `Applied` event, coming later,
    /// finds nothing in flight under its number and is ignored.)
    fn drain_apply(&mut self, group: GroupId) {
        let Some((_, task)) = self.groups.get_mut(&group).and_then(|s| s.applying.take()) else { return };
        // The task has finished or is about to (it reported, or it is being drained).
        let (last, result) = match self.rt.block_on(task) {
            Ok(done) => done,
            Err(e) => (0, Err(format!("the apply task failed: {e}"))),
        };
        self.take_applied(group, last, result);
    }

    /// Apply task `seq` finished: take in its result, complete what it covers, start the
    /// next batch.
    fn applied(&mut self, group: GroupId, seq: u64) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.applying.as_ref().map(|(s, _)| *s) != Some(seq) {
            return;
        }
        self.drain_apply(group);
        self.complete(group);
        self.start_apply(group);
    }

    fn take_applied(&mut self, group: GroupId, last: u64, result: Result<ApplyReport, String>) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.rebuild.is_some() {
            return; // the store is being replaced; the rebuild replays these entries
        }
        match result {
            Ok(report) => {
                if !report.scrubs.is_empty() {
                    let mut found = super::lock(&self.shared.scrubs);
                    for chunk in report.scrubs {
                        found.insert(group, chunk);
                    }
                }
                for at in report.guard_failures {
                    if let Some(id) = slot.guarded.remove(&at) {
                        slot.guard_failed.insert(id, at.0);
                    }
                }
                slot.applied = slot.applied.max(last);
                if slot.broken.is_none() {
                    slot.servable.store(slot.applied, Ordering::Release);
                }
            }
            Err(e) => {
                slot.servable.store(0, Ordering::Release);
                let why = format!("applying to the local store failed: {e}");
                tracing::error!(%group, error = %e, "replica stops: the local store cannot apply committed entries");
                slot.broken = Some(why);
            }
        }
    }

    /// Acknowledges writes and serves reads that the applied index now covers.
    fn complete(&mut self, group: GroupId) {
        let Some(slot) = self.groups.get_mut(&group) else { return };
        if slot.rebuild.is_some() {
            return;
        }
        let done = slot.driver.applied(slot.applied);
        for id in done.writes {
            if let Some(tx) = slot.writes.remove(&id) {
                match slot.guard_failed.remove(&id) {
                    Some(block) => fail(tx, NodeError::GuardFailed { block }),
                    None => {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
        }
        let applied = slot.applied;
        slot.guarded.retain(|&(index, _), _| index > applied);
        for id in done.failed {
            if let Some(tx) = slot.writes.remove(&id) {
                fail(tx, NodeError::Dropped);
            }
        }
        let me = self.config.node_id.0;
        for id in done.reads {
            let Some(reads) = slot.reads.remove(&id) else { continue };
            // Only volume groups take reads (see `handle`).
            let GroupStore::Volume(store) = &slot.store else { continue };
            let status = slot.driver.raft_status();
            let peers: Vec<u64> =
                status.voters.iter().chain(&status.learners).copied().filter(|&n| n != me).collect();
            let ctx = Arc::new(RepairContext {
                shared: self.shared.clone(),
                transport: self.transport.clone(),
                group,
                me,
                peers,
            });
            for r in reads {
                let (store, ctx) = (store.clone(), ctx.clone());
                // The store holds everything up to the read index: read it off this thread
                // (repairing damaged blocks from another copy on the way).
                self.rt.spawn(async move {
                    let result =
                        read_repaired(&ctx, &store, r.first, r.count, applied).await.map_err(|e| match e {
                            BackendError::OutOfRange { .. } => NodeError::OutOfRange,
                            other => NodeError::Internal(other.to_string()),
                        });
                    let _ = r.done.send(result);
                });
            }
        }
    }

    fn publish_status(&self) {
        let Ok(mut m) = self.shared.status.write() else { return };
        for (group, slot) in &self.groups {
            let crate::volume::group::RaftStatus { term, voters, learners, progress } =
                slot.driver.raft_status();
            m.insert(
                *group,
                super::GroupStatus {
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
                    rebuild: slot.rebuild.as_ref().map(|r| RebuildStatus {
                        index: r.index,
                        done_bytes: r.progress.done_bytes.load(Ordering::Relaxed),
                        total_bytes: r.progress.total_bytes.load(Ordering::Relaxed),
                        copied_bytes: r.progress.copied_bytes.load(Ordering::Relaxed),
                        source: r.progress.source.load(Ordering::Relaxed),
                        elapsed_s: r.started.elapsed().as_secs(),
                    }),
                },
            );
        }
    }

    /// Starts a checkpoint of every group whose interval passed (`force`: of every group,
    /// waiting for each: at shutdown).
    fn checkpoint(&mut self, force: bool) {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for group in ids {
            let Some(mut slot) = self.groups.remove(&group) else { continue };
            if force {
                self.checkpoint_slot(group, &mut slot);
            } else if slot.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL && slot.checkpointing.is_none() {
                self.start_checkpoint(group, &mut slot);
            }
            self.groups.insert(group, slot);
        }
    }

    /// Whether the slot has anything to checkpoint; an idle group gives up the log entries
    /// it keeps for lagging peers instead.
    fn checkpoint_due(&self, group: GroupId, slot: &mut Slot) -> bool {
        slot.last_checkpoint = Instant::now();
        if slot.broken.is_some() || slot.rebuild.is_some() {
            return false;
        }
        if slot.applied <= slot.checkpointed {
            // Nothing applied for a whole interval: the group is idle. The entries it keeps
            // for lagging peers would pin every WAL segment written after them (see the
            // WAL's deletion rule) while other groups keep writing, so the WAL would grow
            // without bound; an idle group gives them up (a peer that still needs them gets a
            // snapshot instead).
            self.compact_to(group, slot, slot.checkpointed + 1);
            return false;
        }
        // The applied index recorded must not run ahead of the WAL: what applying an entry
        // wrote there (a membership's conf state) may still be unsynced, and after a crash the
        // log is only re-applied from the recorded index.
        if let Err(e) = self.sync_wal() {
            tracing::warn!(%group, error = %e, "checkpoint skipped");
            return false;
        }
        true
    }

    /// Checkpoints off the runner thread: flushing a copy that took many random writes can
    /// take seconds, which would stall every group's round. `Event::Checkpointed` reports.
    fn start_checkpoint(&mut self, group: GroupId, slot: &mut Slot) {
        if !self.checkpoint_due(group, slot) {
            return;
        }
        let (applied, store, events) = (slot.applied, slot.store.clone(), self.task_events.clone());
        slot.checkpointing = Some(self.rt.spawn(async move {
            let result = flush_and_record(&store, applied).await;
            let _ = events.send(Event::Checkpointed { group, result });
        }));
    }

    /// A checkpoint task finished: record how far the store is durable, compact the log.
    fn checkpointed(&mut self, group: GroupId, result: Result<u64, String>) {
        let Some(mut slot) = self.groups.remove(&group) else { return };
        slot.checkpointing = None;
        match result {
            // A rebuild that began meanwhile starts the store over; its own checkpoint counts.
            Ok(durable) if slot.rebuild.is_none() && slot.broken.is_none() => {
                slot.checkpointed = slot.checkpointed.max(durable);
                self.compact(group, &mut slot);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%group, error = %e, "checkpoint skipped"),
        }
        self.groups.insert(group, slot);
    }

    /// Flushes the store, then records the applied index, waiting for it (closing a group,
    /// shutting down, finishing a rebuild): after a crash the replica re-applies the log from
    /// there (entries are idempotent block writes).
    fn checkpoint_slot(&self, group: GroupId, slot: &mut Slot) {
        if let Some(task) = slot.checkpointing.take() {
            // Its report is moot: this checkpoint covers at least as much.
            let _ = self.rt.block_on(task);
        }
        if !self.checkpoint_due(group, slot) {
            return;
        }
        match self.rt.block_on(flush_and_record(&slot.store, slot.applied)) {
            Ok(durable) => slot.checkpointed = slot.checkpointed.max(durable),
            Err(e) => {
                tracing::warn!(%group, error = %e, "checkpoint skipped");
                return;
            }
        }
        self.compact(group, slot);
    }

    /// Drops log entries the store has durably applied, keeping the last
    /// `log_retain_entries` / `log_retain_bytes` of them for peers that lag a little.
    fn compact(&self, group: GroupId, slot: &mut Slot) {
        let hi = slot.checkpointed + 1;
        let by_count = hi.saturating_sub(self.config.log_retain_entries);
        let by_bytes = match slot.driver.storage().compaction_point(hi, self.config.log_retain_bytes) {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(%group, error = %e, "cannot size the log for compaction");
                return;
            }
        };
        self.compact_to(group, slot, by_count.max(by_bytes));
    }

    /// Drops the group's log entries below `to` (nothing if they are gone already).
    fn compact_to(&self, group: GroupId, slot: &mut Slot, to: u64) {
        if to <= slot.driver.storage().meta().snapshot_index + 1 {
            return;
        }
        match slot.driver.compact(to) {
            Ok(()) => tracing::debug!(%group, to, "log compacted"),
            Err(e) => tracing::warn!(%group, to, error = %e, "log compaction refused"),
        }
    }

    /// Per tick: a replica that leads while its store is being rebuilt hands leadership to
    /// a complete one.
    fn tick_groups(&mut self) {
        let me = self.config.node_id.0;
        for slot in self.groups.values_mut() {
            slot.driver.tick();
            if slot.rebuild.is_some() && slot.driver.is_leader() {
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
}

fn fail_all(slot: Slot, e: impl Fn() -> NodeError) {
    for (_, done) in slot.new_writes {
        fail(done, e());
    }
    for (_, done) in slot.writes {
        fail(done, e());
    }
    for r in slot.new_reads.into_iter().chain(slot.reads.into_values().flatten()) {
        fail(r.done, e());
    }
}

/// Applies entries in log order to a volume's copy or a state machine.
async fn apply_to(store: &GroupStore, entries: Vec<CommittedEntry>) -> Result<ApplyReport, String> {
    match store {
        GroupStore::Volume(s) => {
            let grow = |size| (s.grow)(size);
            apply_entries(s.backend.as_ref(), &grow, entries).await.map_err(|e| e.to_string())
        }
        GroupStore::Machine(s) => {
            for e in entries {
                let commands: Vec<Bytes> = e
                    .commands
                    .into_iter()
                    .filter_map(|c| if let Command::App { data } = c { Some(data) } else { None })
                    .collect();
                s.machine.apply(e.index, &commands).map_err(|e| e.to_string())?;
            }
            Ok(ApplyReport::default())
        }
    }
}

/// Flushes the store and records `applied` as its durable index; returns the index the
/// store is now durable to (a state machine records its own, which may be lower).
async fn flush_and_record(store: &GroupStore, applied: u64) -> Result<u64, String> {
    match store {
        GroupStore::Volume(s) => {
            s.backend.flush().await.map_err(|e| format!("flushing the replica store: {e}"))?;
            let path = s.applied_path.clone();
            tokio::task::spawn_blocking(move || write_applied(&path, applied))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("recording the applied index: {e}"))?;
            Ok(applied)
        }
        GroupStore::Machine(s) => {
            let machine = s.machine.clone();
            let durable = tokio::task::spawn_blocking(move || machine.flush())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("flushing the state machine: {e}"))?;
            Ok(durable.min(applied))
        }
    }
}

fn read_applied(path: &std::path::Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .map_err(|_| std::io::Error::other(format!("{} is corrupt: {s:?}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn write_applied(path: &std::path::Path, applied: u64) -> std::io::Result<()> {
    crate::durable_file::write(path, format!("{applied}\n").as_bytes())
}
