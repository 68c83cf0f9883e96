//! The runner thread: the I/O shell around the node's sans-IO [`NodeCore`]. It turns events
//! (client requests, peer messages, ticks, finished tasks) into the core's inputs and
//! carries out its outputs: WAL syncs (or, for single-copy volumes, write-outs), messages to
//! the transport, applies, checkpoints and rebuild copies as tasks on the runtime (which
//! report back as events), and replies. The round never waits for a copy, nor for the disk:
//! the `fdatasync` runs on the sync thread (`sync_thread`), one at a time, while the rounds
//! after it go on appending, and the next sync covers every round that asked meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Message};
use raftblk_blockdev::backend::check_range;
use raftblk_blockdev::seal::{SealedBlocks, BLOCK};
use tokio::sync::oneshot;

use super::node_core::{Collected, CoreConfig, NodeCore, Output, Persist, ReadRequest};
use super::raft_codec;
use super::repair::{read_repaired, RepairContext};
use super::{GroupStore, NodeConfig, NodeError, PeerFetcher, RebuildStatus, Shared, SnapshotSource};
use crate::snapshot::image::pull_image;
use crate::snapshot::marker;
use crate::snapshot::pull::{pull, PullPlan, PullProgress};
use crate::storage::GroupStorage;
use crate::transport::Transport;
use crate::volume::command::Command;
use crate::volume::group::CommittedEntry;
use crate::volume::{apply_entries, ApplyReport};
use crate::wal::disk::{DiskError, FdSync, FileSync, NodeDisk};
use crate::wal::record::{GroupId, NodeId};
use crate::wal::{SyncMark, Wal};

/// Most events handled in one round before the round's Raft work runs.
const EVENTS_PER_ROUND_MAX: usize = 1024;
/// How often each group's store is flushed and its applied index recorded.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;
/// An apply running on the runtime and its outcome.
type ApplyTask = tokio::task::JoinHandle<Result<ApplyReport, String>>;

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
    /// Every write acknowledged before this made durable.
    Flush {
        group: GroupId,
        done: Reply<()>,
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
    /// The sync thread finished the WAL sync begun for `round`.
    Synced {
        round: u64,
        result: Result<(), DiskError>,
    },
    Shutdown,
}

/// A WAL sync handed to the sync thread, and what the runner keeps of it.
struct SyncJob {
    round: u64,
    sync: FdSync,
}

/// The sync in flight: its round and WAL mark; and the latest round that asked for one
/// since it began (the next sync, begun when this one is done, covers it).
#[derive(Default)]
struct Syncing {
    running: Option<(u64, SyncMark)>,
    wanted: Option<u64>,
}

/// A copy of the store being made from peers.
struct RebuildTask {
    index: u64,
    progress: Arc<PullProgress>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
}

/// The shell's side of a group: its store and the tasks running for it.
struct Tasks {
    store: GroupStore,
    /// What peers copying snapshot chunks from this store may rely on.
    servable: Arc<AtomicU64>,
    applying: Option<(u64, ApplyTask)>,
    checkpointing: Option<tokio::task::JoinHandle<()>>,
    rebuild: Option<RebuildTask>,
}

type Core = NodeCore<NodeDisk, Reply<()>, Reply<SealedBlocks>>;

pub(super) struct Runner {
    config: NodeConfig,
    wal: Arc<Mutex<Wal<NodeDisk>>>,
    events: Receiver<Event>,
    /// For apply, checkpoint and rebuild tasks to report back (the runner's own queue).
    task_events: std::sync::mpsc::Sender<Event>,
    shared: Arc<Shared>,
    transport: Arc<Transport>,
    rt: tokio::runtime::Handle,
    core: Core,
    tasks: HashMap<GroupId, Tasks>,
    /// The monotonic clock the core's read leases and checkpoints are measured in.
    clock: Instant,
    /// To the sync thread (which answers with `Event::Synced`).
    sync_jobs: std::sync::mpsc::Sender<SyncJob>,
    syncing: Syncing,
}

fn fail<T>(tx: Reply<T>, e: NodeError) {
    let _ = tx.send(Err(e));
}

/// Starts the thread that runs the WAL's `fdatasync`s, one at a time, reporting each to the
/// runner's queue. It ends when the runner drops its sender.
fn sync_thread(events: std::sync::mpsc::Sender<Event>) -> std::sync::mpsc::Sender<SyncJob> {
    let (tx, rx) = std::sync::mpsc::channel::<SyncJob>();
    let spawned = std::thread::Builder::new().name("raftblk-wal-sync".into()).spawn(move || {
        for job in rx {
            let result = job.sync.sync();
            if events.send(Event::Synced { round: job.round, result }).is_err() {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        // Without the thread the first sync's send fails, and the runner stops replicating.
        tracing::error!(error = %e, "cannot start the WAL sync thread");
    }
    tx
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
        let core = NodeCore::new(CoreConfig {
            node_id: config.node_id.0,
            election_ticks: config.election_ticks,
            heartbeat_ticks: config.heartbeat_ticks,
            read_lease_ms: config.read_lease_ms(),
            log_retain_entries: config.log_retain_entries,
            log_retain_bytes: config.log_retain_bytes,
            checkpoint_interval_ms: CHECKPOINT_INTERVAL.as_millis() as u64,
            seed,
        });
        let sync_jobs = sync_thread(task_events.clone());
        Runner {
            config,
            wal: Arc::new(Mutex::new(wal)),
            events,
            task_events,
            shared,
            transport,
            rt,
            core,
            tasks: HashMap::new(),
            clock: Instant::now(),
            sync_jobs,
            syncing: Syncing::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Runs until shutdown; returns false if it stopped because replication failed.
    pub(super) fn run(mut self) -> bool {
        let clean = match self.serve() {
            Ok(()) => true,
            Err(e) => {
                // The WAL cannot be trusted after a failed sync; stop replicating rather than
                // acknowledge writes that may not be durable.
                tracing::error!(error = %e, "Raft round failed; replication on this node stops");
                false
            }
        };
        for group in self.core.group_ids() {
            self.settle(group);
        }
        for group in self.core.group_ids() {
            self.core.remove(group, || NodeError::ShuttingDown);
        }
        self.execute_logged();
        for (_, t) in self.tasks.drain() {
            if let Some(r) = t.rebuild {
                r.task.abort();
            }
        }
        tracing::info!("replication runner stopped");
        clean
    }

    /// The event loop: events in, rounds out, until shutdown or a failed round.
    fn serve(&mut self) -> Result<(), NodeError> {
        let tick = self.config.tick;
        let mut next_tick = Instant::now() + tick;
        loop {
            // Raft may have work left from the last round (entries committed by a late ack);
            // then only look for events, do not wait for one.
            let wait = if self.core.has_ready() {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            match self.events.recv_timeout(wait) {
                Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
                Ok(ev) => self.handle(ev)?,
                Err(RecvTimeoutError::Timeout) => {}
            }
            for _ in 0..EVENTS_PER_ROUND_MAX {
                match self.events.try_recv() {
                    Ok(Event::Shutdown) => return Ok(()),
                    Ok(ev) => self.handle(ev)?,
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.core.tick();
                next_tick = if now > next_tick + tick { now + tick } else { next_tick + tick };
                self.publish_status();
            }
            let now_ms = self.now_ms();
            self.core.propose(now_ms);
            let Collected { round, persist } = self.core.collect()?;
            // Markers before the sync; leader appends go out in parallel with it.
            self.execute(false)?;
            match persist {
                Persist::Sync if self.syncing.running.is_some() => self.syncing.wanted = Some(round),
                Persist::Sync => self.begin_sync(round)?,
                Persist::Write => {
                    self.write_out_wal()?;
                    self.core.persisted(round);
                }
                Persist::Nothing => {}
            }
            self.core.checkpoints(now_ms);
            self.execute(false)?;
        }
    }

    /// Hands the WAL's sync for `round` (and every round before it) to the sync thread.
    fn begin_sync(&mut self, round: u64) -> Result<(), NodeError> {
        let (sync, mark) =
            self.lock_wal()?.begin_sync().map_err(|e| NodeError::Internal(format!("WAL sync: {e}")))?;
        match sync {
            Some(sync) => {
                self.syncing.running = Some((round, mark));
                self.sync_jobs
                    .send(SyncJob { round, sync })
                    .map_err(|_| NodeError::Internal("the WAL sync thread stopped".into()))
            }
            // Durable already (an inline sync came first).
            None => self.synced(round, mark, Ok(())),
        }
    }

    /// The sync for `round` finished: the core learns it, and the next sync starts if a round
    /// asked for one meanwhile.
    fn synced(&mut self, round: u64, mark: SyncMark, result: Result<(), DiskError>) -> Result<(), NodeError> {
        self.lock_wal()?
            .finish_sync(mark, result)
            .map_err(|e| NodeError::Internal(format!("WAL sync: {e}")))?;
        self.core.synced(round);
        if let Some(next) = self.syncing.wanted.take() {
            self.begin_sync(next)?;
        }
        Ok(())
    }

    /// Waits for the sync in flight (closing a group, shutting down).
    fn wait_for_sync(&mut self) -> Result<(), NodeError> {
        let (running, wanted) = (self.syncing.running.take(), self.syncing.wanted.take());
        if running.is_none() && wanted.is_none() {
            return Ok(());
        }
        // One inline sync covers every round so far; the thread's answer, when it comes,
        // finds no sync running for its round and is dropped.
        self.sync_wal()?;
        if let Some(round) = wanted.or(running.map(|(round, _)| round)) {
            self.core.synced(round);
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event) -> Result<(), NodeError> {
        match ev {
            Event::Open { group, voters, store, done } => {
                let r = self.open(group, voters, store);
                let _ = done.send(r);
            }
            Event::Close { group, done } => {
                self.settle(group);
                self.core.remove(group, || NodeError::ShuttingDown);
                if let Some(r) = self.tasks.remove(&group).and_then(|t| t.rebuild) {
                    r.task.abort();
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
                if let Err(e) = self.check_write(group, &commands) {
                    fail(done, e);
                } else {
                    self.core.write(group, commands, done);
                }
            }
            // The core refuses a group it does not hold (NotMember), as for writes.
            Event::Flush { group, done } => self.core.flush(group, done),
            Event::Read { group, first, count, done } => {
                if let Err(e) = self.check_read(group, first, count) {
                    fail(done, e);
                } else {
                    self.core.read(group, first, count, done);
                }
            }
            Event::Raft { from, group, bytes } => {
                // Entries' data become slices of the frame's buffer, not copies of it.
                match raft_codec::decode(&bytes) {
                    Ok(m) => self.core.step(group, from.0, m),
                    Err(e) => tracing::warn!(%group, %from, error = %e, "undecodable Raft message"),
                }
            }
            Event::TransferLeader { group, to } => self.core.transfer_leader(group, to),
            Event::ConfChange { group, change, done } => {
                let _ = done.send(self.core.conf_change(group, change));
            }
            Event::Applied { group, seq } => {
                let finished =
                    self.tasks.get_mut(&group).and_then(|t| t.applying.take_if(|(s, _)| *s == seq));
                if let Some((seq, task)) = finished {
                    // The task has finished: it reported.
                    self.applied(group, seq, task);
                }
            }
            Event::Checkpointed { group, result } => {
                if let Some(t) = self.tasks.get_mut(&group) {
                    t.checkpointing = None;
                }
                self.core.checkpointed(group, result);
            }
            Event::RebuildDone { group, index, result } => {
                let Some(t) = self.tasks.get_mut(&group) else { return Ok(()) };
                if t.rebuild.as_ref().is_some_and(|r| r.index == index) {
                    t.rebuild = None;
                    self.core.rebuild_done(group, index, result);
                }
            }
            Event::Synced { round, result } => {
                if let Some((running, mark)) = self.syncing.running.take_if(|(r, _)| *r == round) {
                    self.synced(running, mark, result)?;
                }
            }
            Event::Shutdown => {}
        }
        self.execute(false)
    }

    /// What only the store knows: a volume's writes stay inside it, a state machine takes
    /// only `App` commands.
    fn check_write(&self, group: GroupId, commands: &[Command]) -> Result<(), NodeError> {
        let Some(t) = self.tasks.get(&group) else { return Err(NodeError::NotMember(group)) };
        let is_app = |c: &Command| matches!(c, Command::App { .. });
        match &t.store {
            GroupStore::Volume(store) => {
                let size = store.backend.size_bytes();
                for c in commands {
                    if is_app(c) {
                        return Err(NodeError::Internal("a volume group takes no App commands".into()));
                    }
                    if let Some((offset, length)) = c.range() {
                        if check_range(offset, length, size).is_err() {
                            return Err(NodeError::OutOfRange { offset, len: length, size });
                        }
                    }
                }
                Ok(())
            }
            GroupStore::Machine(_) if !commands.iter().all(is_app) => {
                Err(NodeError::Internal("a state machine group takes only App commands".into()))
            }
            GroupStore::Machine(_) => Ok(()),
        }
    }

    fn check_read(&self, group: GroupId, first: u64, count: u32) -> Result<(), NodeError> {
        let Some(t) = self.tasks.get(&group) else { return Err(NodeError::NotMember(group)) };
        let GroupStore::Volume(store) = &t.store else {
            return Err(NodeError::Internal("state machine groups are read locally".into()));
        };
        let (offset, length) = (first.saturating_mul(BLOCK), u64::from(count) * BLOCK);
        let size = store.backend.size_bytes();
        check_range(offset, length, size).map_err(|_| NodeError::OutOfRange { offset, len: length, size })
    }

    fn open(&mut self, group: GroupId, voters: Vec<u64>, store: GroupStore) -> Result<(), NodeError> {
        if self.core.contains(group) {
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
        let servable = Arc::new(AtomicU64::new(0));
        let tasks = Tasks {
            store: store.clone(),
            servable: servable.clone(),
            applying: None,
            checkpointing: None,
            rebuild: None,
        };
        self.tasks.insert(group, tasks);
        let now_ms = self.now_ms();
        // A single-copy volume follows a disk's write-cache contract; a state machine's
        // records (the catalog) are durable when acknowledged.
        let write_back = self.config.write_back && matches!(store, GroupStore::Volume(_));
        if let Err(e) = self.core.open(group, storage, checkpointed, found, write_back, now_ms) {
            self.tasks.remove(&group);
            return Err(e);
        }
        if let Ok(mut m) = self.shared.sources.write() {
            m.insert(group, SnapshotSource { store, servable });
        }
        self.execute(false)
    }

    /// Lets the group's work finish before it is closed (or the node stops): the apply in
    /// flight and what is queued behind it, then a checkpoint, waiting for each.
    fn settle(&mut self, group: GroupId) {
        if let Err(e) = self.wait_for_sync() {
            tracing::warn!(%group, error = %e, "settling the group: the WAL sync failed");
        }
        while let Some((seq, task)) = self.tasks.get_mut(&group).and_then(|t| t.applying.take()) {
            self.applied(group, seq, task);
            self.execute_logged();
        }
        if let Some(task) = self.tasks.get_mut(&group).and_then(|t| t.checkpointing.take()) {
            // Its report is moot: the checkpoint below covers at least as much.
            let _ = self.rt.block_on(task);
        }
        self.core.checkpoint_now(group);
        if let Err(e) = self.execute(true) {
            tracing::warn!(%group, error = %e, "settling the group");
        }
    }

    /// Takes in apply task `seq` (waiting for it if it has not finished): its scrub findings
    /// go to the scrubber, the rest to the core.
    fn applied(&mut self, group: GroupId, seq: u64, task: ApplyTask) {
        let mut result =
            self.rt.block_on(task).unwrap_or_else(|e| Err(format!("the apply task failed: {e}")));
        if let Ok(report) = &mut result {
            if !report.scrubs.is_empty() {
                let mut found = super::lock(&self.shared.scrubs);
                for chunk in std::mem::take(&mut report.scrubs) {
                    found.insert(group, chunk);
                }
            }
        }
        self.core.applied(group, seq, result);
    }

    fn execute_logged(&mut self) {
        if let Err(e) = self.execute(false) {
            tracing::warn!(error = %e, "carrying out the core's outputs");
        }
    }

    /// Carries out the core's outputs until it has none left. `wait`: checkpoints run here,
    /// not as tasks (closing a group, shutting down). Fails only where the round must stop.
    fn execute(&mut self, wait: bool) -> Result<(), NodeError> {
        loop {
            let outputs = self.core.take_outputs();
            if outputs.is_empty() {
                return Ok(());
            }
            for output in outputs {
                self.carry_out(output, wait)?;
            }
        }
    }

    fn carry_out(
        &mut self,
        output: Output<Reply<()>, Reply<SealedBlocks>>,
        wait: bool,
    ) -> Result<(), NodeError> {
        match output {
            Output::Send { group, messages } => self.send(group, messages),
            Output::Acked { token, result } => {
                let _ = token.send(result);
            }
            Output::ReadFailed { token, error } => fail(token, error),
            Output::Serve { group, reads, applied, peers } => self.serve_reads(group, reads, applied, peers),
            Output::Apply { group, seq, entries } => {
                let Some(t) = self.tasks.get_mut(&group) else { return Ok(()) };
                let (store, events) = (t.store.clone(), self.task_events.clone());
                let task = self.rt.spawn(async move {
                    let result = apply_to(&store, entries).await;
                    let _ = events.send(Event::Applied { group, seq });
                    result
                });
                t.applying = Some((seq, task));
            }
            Output::Checkpoint { group, applied } => {
                let Some(store) = self.tasks.get(&group).map(|t| t.store.clone()) else { return Ok(()) };
                if let Err(e) = self.sync_wal() {
                    self.core.checkpointed(group, Err(e.to_string()));
                } else if wait {
                    let result = self.rt.block_on(flush_and_record(&store, applied));
                    self.core.checkpointed(group, result);
                } else {
                    let events = self.task_events.clone();
                    let task = self.rt.spawn(async move {
                        let result = flush_and_record(&store, applied).await;
                        let _ = events.send(Event::Checkpointed { group, result });
                    });
                    if let Some(t) = self.tasks.get_mut(&group) {
                        t.checkpointing = Some(task);
                    }
                }
            }
            Output::WriteMarker { group, marker: m } => {
                if let Some(t) = self.tasks.get(&group) {
                    // A copy still running for an older snapshot is superseded, and must not
                    // write its marker over this one. Its entry stays, so the status shows a
                    // rebuild until the next one starts.
                    if let Some(old) = &t.rebuild {
                        old.task.abort();
                    }
                    marker::write(t.store.rebuild_path(), m)
                        .map_err(|e| NodeError::Internal(format!("group {group}: rebuild marker: {e}")))?;
                }
            }
            Output::RemoveMarker { group } => {
                if let Some(t) = self.tasks.get(&group) {
                    if let Err(e) = marker::remove(t.store.rebuild_path()) {
                        tracing::warn!(%group, error = %e, "cannot remove the rebuild marker");
                    }
                }
            }
            Output::Rebuild { group, index, offset, sources } => {
                self.start_rebuild(group, index, offset, sources)
            }
            Output::Servable { group, index } => {
                if let Some(t) = self.tasks.get(&group) {
                    t.servable.store(index, Ordering::Release);
                }
            }
            Output::LeaderChanged { group, leader } => {
                if let Ok(mut m) = self.shared.leaders.write() {
                    m.insert(group, leader);
                }
            }
        }
        Ok(())
    }

    /// Reads the store for reads whose index it has applied, off this thread (repairing
    /// damaged blocks from another copy on the way).
    fn serve_reads(
        &self,
        group: GroupId,
        reads: Vec<ReadRequest<Reply<SealedBlocks>>>,
        applied: u64,
        peers: Vec<u64>,
    ) {
        let Some(GroupStore::Volume(store)) = self.tasks.get(&group).map(|t| &t.store) else { return };
        let ctx = Arc::new(RepairContext {
            shared: self.shared.clone(),
            transport: self.transport.clone(),
            group,
            me: self.config.node_id.0,
            peers,
        });
        for r in reads {
            let (store, ctx) = (store.clone(), ctx.clone());
            self.rt.spawn(async move {
                let result =
                    read_repaired(&ctx, &store, r.first, r.count, applied).await.map_err(NodeError::from);
                let _ = r.token.send(result);
            });
        }
    }

    /// Starts copying the volume as of `index` from `sources`, continuing at `offset`.
    /// Replaces a copy already running.
    fn start_rebuild(&mut self, group: GroupId, index: u64, offset: u64, sources: Vec<u64>) {
        let fetcher = PeerFetcher { shared: self.shared.clone(), transport: self.transport.clone() };
        let chunk_bytes = self.config.snapshot_chunk_bytes;
        let rate = self.shared.rebuild_rate_bytes_per_s.load(Ordering::Relaxed);
        let events = self.task_events.clone();
        let Some(t) = self.tasks.get_mut(&group) else { return };
        if let Some(old) = t.rebuild.take() {
            old.task.abort();
        }
        let plan = PullPlan { group, index, offset, sources, chunk_bytes, rate_bytes_per_s: rate };
        let progress = Arc::new(PullProgress::default());
        let store = t.store.clone();
        let p = progress.clone();
        let task = self.rt.spawn(async move {
            let result = match &store {
                GroupStore::Volume(s) => pull(&fetcher, s, &plan, &p).await,
                GroupStore::Machine(s) => pull_image(&fetcher, s, group, index, &plan.sources, &p).await,
            };
            let _ =
                events.send(Event::RebuildDone { group, index, result: result.map_err(|e| e.to_string()) });
        });
        t.rebuild = Some(RebuildTask { index, progress, task, started: Instant::now() });
        // Visible before this replica acknowledges the snapshot (see `VolumeManager`'s
        // promotion check), not only at the next tick.
        self.publish_status();
    }

    fn lock_wal(&self) -> Result<std::sync::MutexGuard<'_, Wal<NodeDisk>>, NodeError> {
        self.wal.lock().map_err(|_| NodeError::Internal("WAL lock poisoned".into()))
    }

    /// One `fdatasync` of the WAL for everything appended so far (nothing if it is synced).
    fn sync_wal(&self) -> Result<(), NodeError> {
        self.lock_wal()?.sync().map_err(|e| NodeError::Internal(format!("WAL sync: {e}")))
    }

    /// Hands what the WAL buffered to the kernel, without an `fdatasync`.
    fn write_out_wal(&self) -> Result<(), NodeError> {
        self.lock_wal()?.write_out().map_err(|e| NodeError::Internal(format!("WAL write: {e}")))
    }

    fn send(&self, group: GroupId, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            match raft_codec::encode(m) {
                Ok(parts) => {
                    if let Err(e) = self.transport.send_parts(NodeId(to), group, parts) {
                        tracing::debug!(%group, to, error = %e, "cannot send a Raft message");
                    }
                }
                Err(e) => tracing::error!(%group, error = %e, "cannot encode a Raft message"),
            }
        }
    }

    fn publish_status(&self) {
        let Ok(mut m) = self.shared.status.write() else { return };
        let mut changed = false;
        for group in self.core.group_ids() {
            let Some(mut status) = self.core.status(group) else { continue };
            status.rebuild = self.tasks.get(&group).and_then(|t| t.rebuild.as_ref()).map(|r| RebuildStatus {
                index: r.index,
                done_bytes: r.progress.done_bytes.load(Ordering::Relaxed),
                total_bytes: r.progress.total_bytes.load(Ordering::Relaxed),
                copied_bytes: r.progress.copied_bytes.load(Ordering::Relaxed),
                source: r.progress.source.load(Ordering::Relaxed),
                elapsed_s: r.started.elapsed().as_secs(),
            });
            changed |= m.get(&group).is_none_or(|old| old.shape_differs(&status));
            m.insert(group, status);
        }
        drop(m);
        if changed {
            self.shared.status_changes.send_modify(|n| *n += 1);
        }
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
