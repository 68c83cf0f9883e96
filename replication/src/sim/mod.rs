//! Deterministic simulation of one replicated volume on 3 or 5 nodes.
//!
//! Each node runs the production node core (`node::node_core::NodeCore`) over its
//! [`SimDisk`]; the simulator is its shell, as the runner thread is in production: it
//! delivers messages, ticks, syncs the WAL (or crashes before), and carries out the core's
//! outputs, running applies and checkpoints some steps after the core asked for them (rounds
//! go on meanwhile, as with production's apply tasks). Proposals batch, checkpoints and log
//! compaction follow the production rules.
//!
//! Everything comes from one seed: message drops, delays, duplicates and reordering,
//! partitions, node crashes (the [`SimDisk`] loses or tears unsynced writes; the store keeps
//! what its last checkpoint flushed plus a random part of what came after; the node restarts
//! from its WAL and re-applies the committed log from its checkpoint) and a client issuing
//! writes, trims and linearizable reads against whoever is leader, retrying on timeouts.
//! Nodes checkpoint and compact their logs down to [`LOG_RETAIN_ENTRIES`], so lagging and
//! restarted nodes often need a snapshot: they copy the volume block by block from any live
//! member that has applied the snapshot index (a fuzzy copy, as in production), survive
//! crashes in the middle of it through the rebuild marker, and replay the log over it. The
//! decisions are the production ones (`marker::plan_open`, the driver's snapshot handling).
//! Checked on every run:
//!
//! * every read (ReadIndex on a node) returns a value the model allows: after a write to a
//!   block is acknowledged, only that value or later ones; never anything older;
//! * once healed, every replica applies the same log and their copies hold the same blocks
//!   under the same versions;
//! * every acknowledged write is read back with its data at the end;
//! * no damaged byte reaches a client: the simulator rots blocks on its disks (a flipped
//!   data bit, a lost metadata record), a read of a damaged block on the leader is repaired
//!   from another copy by the production rule (`repair::usable`) or fails, never returns it.
//!
//! Replay a failure with `SEED=<n> cargo test -p raftblk-replication sim_ -- --nocapture`.

#![allow(clippy::field_reassign_with_default)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Message};
use raftblk_blockdev::seal::{
    BlockImage, BlockState, BlockWrite, CopyStore, MemSealedStore, Seal, SealedBlocks,
};

use crate::node::node_core::{Collected, CoreConfig, NodeCore, Output, Persist};
use crate::node::raft_codec;
use crate::node::repair::usable;
use crate::snapshot::marker::Marker;
use crate::storage::GroupStorage;
use crate::volume::command::Command;
use crate::volume::group::{CommittedEntry, GroupDriver, RequestId};
use crate::volume::{apply_entries, ApplyReport};
use crate::wal::disk::{FileSync, SimDisk, SimSync};
use crate::wal::record::GroupId;
use crate::wal::{SyncMark, Wal, WalOptions};

const GROUP: GroupId = GroupId(1);
const BLOCK_BYTES: u64 = 4096;
const BLOCKS: u64 = 8;
const OP_TIMEOUT_TICKS: u64 = 40;
/// Entries kept below each node's checkpoint (tiny, so snapshots happen).
const LOG_RETAIN_ENTRIES: u64 = 3;
/// Read lease in steps (the clock here): followers' election timeouts are at least 10 ticks,
/// at most one per step, so the bound is 9; 80 % of it as in production.
const READ_LEASE_STEPS: u64 = 7;
/// Ticks between a node's checkpoints (plus a random part).
const CHECKPOINT_TICKS: u64 = 12;

struct NoopWake;
impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

/// Runs a future that completes without waiting (the in-memory store never waits).
fn now<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(NoopWake));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("in-memory store future did not complete at once"),
    }
}

/// xorshift64*; the whole simulation draws from one.
pub struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn block_data(value: u64) -> Bytes {
    if value == 0 {
        return Bytes::from(vec![0u8; BLOCK_BYTES as usize]);
    }
    let mut v = vec![(value % 251) as u8 + 1; BLOCK_BYTES as usize];
    v[..8].copy_from_slice(&value.to_le_bytes());
    Bytes::from(v)
}

fn value_of(data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let mut b = [0; 8];
    b.copy_from_slice(&data[..8]);
    let v = u64::from_le_bytes(b);
    (block_data(v) == data).then_some(v)
}

/// The production core with the simulator's reply handles: requests' ids.
type SimCore = NodeCore<SimDisk, u64, u64>;

struct Node {
    disk: SimDisk,
    core: Option<SimCore>,
    /// The store as the running node sees it (the page cache, in production).
    store: MemSealedStore,
    /// What the last checkpoint flushed (plus blocks a rebuild copied and recorded).
    durable: MemSealedStore,
    /// The applied index the last checkpoint recorded (the store's applied file).
    checkpointed: u64,
    /// The rebuild marker file.
    marker: Option<Marker>,
    /// The copy the core asked for, running: (snapshot index, next block, sources).
    copy: Option<(u64, u64, Vec<u64>)>,
    /// What peers may copy from this store (the core's `Servable`).
    servable: u64,
    /// The apply the core asked for, not run yet: it runs a few steps later, while rounds go on.
    applying: Option<(u64, Vec<CommittedEntry>)>,
    /// The checkpoint the core asked for, not run yet (the applied index it records).
    checkpointing: Option<u64>,
    /// The WAL sync begun for a round, not done yet: it finishes a few steps later, while
    /// rounds go on, as on production's sync thread. A crash drops it.
    syncing: Option<(u64, SimSync, SyncMark)>,
    /// The latest round that asked for a sync while one ran.
    sync_wanted: Option<u64>,
    /// Test hook: the apply that replays the log over a copy is skipped.
    skip_replay: bool,
    snapshots: u64,
    next_scrub: u64,
}

impl Node {
    fn rebuilding(&self) -> bool {
        self.core.as_ref().is_some_and(|c| c.rebuilding(GROUP))
    }

    fn applied(&self) -> u64 {
        self.core.as_ref().map_or(0, |c| c.applied_index(GROUP))
    }

    fn driver(&self) -> Option<&GroupDriver<SimDisk>> {
        self.core.as_ref().and_then(|c| c.driver(GROUP))
    }
}

fn read_block(store: &MemSealedStore, block: u64) -> SealedBlocks {
    now(CopyStore::read_blocks(store, block, 1)).expect("read")
}

/// The sealed write of `value` to `block` (0: a zeroing).
fn write_command(block: u64, value: u64) -> Command {
    if value == 0 {
        return Command::Zero { first: block, count: 1, deallocate: true };
    }
    let data = block_data(value);
    let seals = vec![Seal::plain(block, &data)];
    Command::Write(BlockWrite { first: block, data, seals, guards: vec![] })
}

#[derive(Clone, Copy, Debug)]
enum OpKind {
    Write(u64),
    Read,
}

#[derive(Clone, Debug)]
struct Op {
    block: u64,
    kind: OpKind,
    node: usize,
    sent_at: u64,
}

/// Knobs of one run.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    pub nodes: usize,
    pub ticks: u64,
    pub ops: u64,
    /// Test hook: acknowledge writes as soon as they are proposed (a bug the run must catch).
    pub ack_before_commit: bool,
    /// Test hook: finish a rebuild without replaying the log after the snapshot index over
    /// the fuzzy copy (a bug the run must catch).
    pub rebuild_without_replay: bool,
    /// Leaders serve reads by a lease of this many steps (0: always ReadIndex).
    pub read_lease_steps: u64,
    /// Test hook: return damaged blocks to the client unrepaired (a bug the run must catch).
    pub serve_damaged: bool,
}

struct Sim {
    rng: Rng,
    opts: SimOptions,
    nodes: Vec<Node>,
    /// (deliver_at, seq, from, to, message)
    net: Vec<(u64, u64, usize, usize, Message)>,
    seq: u64,
    now: u64,
    partition: Option<Vec<bool>>,
    faults: bool,
    /// Per block: values a read may return, oldest first.
    possible: Vec<Vec<u64>>,
    busy: Vec<bool>,
    ops: BTreeMap<u64, Op>,
    next_req: u64,
    next_value: u64,
    issued: u64,
    acked_writes: u64,
    reads_ok: u64,
    crashes: u64,
    /// Blocks the simulator damaged, damaged blocks repaired, reads that failed (EIO).
    rots: u64,
    repairs: u64,
    eio_reads: u64,
    /// Requests refused or failed this step: the client sends them again next step.
    retry_soon: Vec<u64>,
    /// Entries applied that batched several requests.
    batched: u64,
}

/// Prints the run's events when `SIM_TRACE` is set (for replaying one seed).
macro_rules! trace {
    ($($arg:tt)*) => {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!($($arg)*);
        }
    };
}

fn fail(seed: u64, what: String) -> ! {
    panic!(
        "simulation seed {seed} failed: {what}\n  replay: SEED={seed} cargo test -p raftblk-replication sim_ -- --nocapture"
    )
}

impl Sim {
    fn new(seed: u64, opts: SimOptions) -> Sim {
        let mut rng = Rng::new(seed);
        let mut nodes = Vec::new();
        for _ in 0..opts.nodes {
            let disk = SimDisk::new(rng.next());
            let wal = Wal::open(disk.clone(), WalOptions { segment_target_bytes: 64 << 10 }).expect("open");
            let wal = Arc::new(Mutex::new(wal));
            let mut st = GroupStorage::open(wal.clone(), GROUP).expect("storage");
            let mut cs = ConfState::default();
            cs.voters = (1..=opts.nodes as u64).collect();
            st.initialize(cs).expect("init");
            wal.lock().expect("lock").sync().expect("sync");
            drop(st);
            nodes.push(Node {
                disk,
                core: None,
                store: MemSealedStore::new(BLOCKS * BLOCK_BYTES),
                durable: MemSealedStore::new(BLOCKS * BLOCK_BYTES),
                checkpointed: 0,
                marker: None,
                copy: None,
                servable: 0,
                applying: None,
                checkpointing: None,
                syncing: None,
                sync_wanted: None,
                skip_replay: false,
                snapshots: 0,
                next_scrub: 0,
            });
        }
        let mut sim = Sim {
            rng,
            opts,
            nodes,
            net: Vec::new(),
            seq: 0,
            now: 0,
            partition: None,
            faults: true,
            possible: vec![vec![0]; BLOCKS as usize],
            busy: vec![false; BLOCKS as usize],
            ops: BTreeMap::new(),
            next_req: 1,
            next_value: 1,
            issued: 0,
            acked_writes: 0,
            reads_ok: 0,
            crashes: 0,
            rots: 0,
            repairs: 0,
            eio_reads: 0,
            retry_soon: Vec::new(),
            batched: 0,
        };
        for i in 0..sim.nodes.len() {
            sim.start(i);
        }
        sim
    }

    fn seed_fail(&self, what: String) -> ! {
        fail(self.rng_seed(), what)
    }

    fn rng_seed(&self) -> u64 {
        SEED.with(|s| *s.borrow())
    }

    /// (Re)starts node `i` from its WAL and what its store kept: the checkpoint, plus any
    /// later block the crash happened to leave on disk.
    fn start(&mut self, i: usize) {
        let seed = self.rng.next();
        let interval = CHECKPOINT_TICKS + self.rng.below(CHECKPOINT_TICKS);
        let keep: Vec<bool> = (0..BLOCKS).map(|_| self.rng.chance(50)).collect();
        let n = &mut self.nodes[i];
        let wal = Wal::open(n.disk.clone(), WalOptions { segment_target_bytes: 64 << 10 }).expect("reopen");
        let st = GroupStorage::open(Arc::new(Mutex::new(wal)), GROUP).expect("storage");
        let store = n.durable.duplicate();
        for (b, &kept) in keep.iter().enumerate() {
            if kept && n.marker.is_none() {
                store.copy_block_from(&n.store, b as u64);
            }
        }
        n.store = store;
        trace!("t{} start n{} marker {:?} checkpointed {}", self.now, i + 1, n.marker, n.checkpointed);
        let mut core = SimCore::new(CoreConfig {
            node_id: i as u64 + 1,
            election_ticks: 10,
            heartbeat_ticks: 3,
            read_lease_ms: self.opts.read_lease_steps,
            log_retain_entries: LOG_RETAIN_ENTRIES,
            log_retain_bytes: u64::MAX,
            checkpoint_interval_ms: interval,
            seed,
        });
        core.open(GROUP, st, n.checkpointed, n.marker, false, self.now).expect("open");
        n.core = Some(core);
        self.execute(i);
    }

    /// Carries out what node `i`'s core asked for, as production's runner does, except that
    /// applies and checkpoints are left for later steps (`background`).
    fn execute(&mut self, i: usize) {
        loop {
            let Some(core) = self.nodes[i].core.as_mut() else { return };
            let outputs = core.take_outputs();
            if outputs.is_empty() {
                return;
            }
            for output in outputs {
                self.carry_out(i, output);
            }
        }
    }

    fn carry_out(&mut self, i: usize, output: Output<u64, u64>) {
        match output {
            Output::Send { messages, .. } => self.send(i, messages),
            Output::Acked { token, result: Ok(()) } => self.complete(token, None),
            Output::Acked { token, result: Err(e) } => {
                trace!("t{} n{} write {token} failed: {e}", self.now, i + 1);
                self.retry_soon.push(token);
            }
            Output::ReadFailed { token, .. } => self.retry_soon.push(token),
            Output::Serve { reads, .. } => {
                for r in reads {
                    if self.ops.get(&r.token).is_none_or(|op| op.node != i) {
                        continue;
                    }
                    match self.read_repaired(i, r.first) {
                        Some(data) => self.complete(r.token, Some(data)),
                        None => {
                            // EIO for this request (no intact copy reachable): the client tries again.
                            self.eio_reads += 1;
                            self.retry_soon.push(r.token);
                        }
                    }
                }
            }
            Output::Apply { seq, entries, .. } => {
                let n = &mut self.nodes[i];
                if n.skip_replay {
                    if let Some(core) = n.core.as_mut() {
                        core.applied(GROUP, seq, Ok(ApplyReport::default()));
                    }
                    return;
                }
                assert!(n.applying.is_none(), "the core started a second apply of one group");
                n.applying = Some((seq, entries));
            }
            Output::Checkpoint { applied, .. } => self.nodes[i].checkpointing = Some(applied),
            Output::WriteMarker { marker, .. } => {
                let n = &mut self.nodes[i];
                n.marker = Some(marker);
                n.snapshots += 1;
                trace!("t{} n{} installs snapshot {}", self.now, i + 1, marker.index);
            }
            Output::RemoveMarker { .. } => self.nodes[i].marker = None,
            Output::Rebuild { index, offset, sources, .. } => {
                trace!("t{} n{} copies the volume as of {index} from {sources:?}", self.now, i + 1);
                let n = &mut self.nodes[i];
                // As the production copy does, it records where it starts.
                n.marker = Some(Marker { index, offset });
                n.copy = Some((index, offset / BLOCK_BYTES, sources));
            }
            Output::Servable { index, .. } => self.nodes[i].servable = index,
            Output::LeaderChanged { .. } => {}
        }
    }

    /// Runs node `i`'s pending apply and checkpoint, each at some step after the core asked
    /// (meanwhile rounds go on: the pipelining production has).
    fn background(&mut self, i: usize) {
        if self.nodes[i].core.is_none() {
            return;
        }
        if self.nodes[i].applying.is_some() && (!self.faults || self.rng.chance(60)) {
            let n = &mut self.nodes[i];
            let Some((seq, entries)) = n.applying.take() else { return };
            for e in &entries {
                trace!(
                    "t{} n{} applies {} {:?}",
                    self.now,
                    i + 1,
                    e.index,
                    e.commands
                        .iter()
                        .map(|c| match c {
                            Command::Write(w) => format!("W{}={:?}", w.first, value_of(&w.data)),
                            other => format!("{other:?}"),
                        })
                        .collect::<Vec<_>>()
                );
            }
            self.batched += entries.iter().filter(|e| e.commands.len() > 1).count() as u64;
            let n = &mut self.nodes[i];
            let store = &n.store;
            let grow = |size| {
                store.grow_to(size);
                Ok(())
            };
            let report = now(apply_entries(store, &grow, entries)).expect("apply");
            assert!(report.guard_failures.is_empty(), "the simulator's writes carry no guards");
            if let Some(core) = n.core.as_mut() {
                core.applied(GROUP, seq, Ok(report));
            }
            self.execute(i);
        }
        if self.nodes[i].checkpointing.is_some() && (!self.faults || self.rng.chance(60)) {
            let n = &mut self.nodes[i];
            let Some(applied) = n.checkpointing.take() else { return };
            let Some(core) = n.core.as_mut() else { return };
            // As production's checkpoint: the WAL first, then the store, then the index.
            if let Some(d) = core.driver(GROUP) {
                d.storage().wal().lock().expect("lock").sync().expect("sync");
            }
            n.durable = n.store.duplicate();
            n.checkpointed = applied;
            trace!("t{} n{} checkpoint {}", self.now, i + 1, applied);
            core.checkpointed(GROUP, Ok(applied));
            self.execute(i);
        }
    }

    /// One step of node `i`'s copy: one block from a live member whose store has applied
    /// the snapshot index; after the last, the core replays the log over the copy.
    fn rebuild_step(&mut self, i: usize) {
        let Some((index, next, sources)) = self.nodes[i].copy.clone() else { return };
        if self.nodes[i].core.is_none() || !self.rng.chance(50) {
            return;
        }
        if next < BLOCKS {
            let from: Vec<usize> = (0..self.nodes.len())
                .filter(|&j| {
                    let n = &self.nodes[j];
                    j != i
                        && sources.contains(&(j as u64 + 1))
                        && n.core.is_some()
                        && n.servable >= index
                        && n.servable > 0
                        && self.partition.as_ref().is_none_or(|p| p[i] == p[j])
                })
                .collect();
            if from.is_empty() {
                return;
            }
            let j = from[self.rng.below(from.len() as u64) as usize];
            let (src, dst) = if i < j {
                let (a, b) = self.nodes.split_at_mut(j);
                (&b[0], &mut a[i])
            } else {
                let (a, b) = self.nodes.split_at_mut(i);
                (&a[j], &mut b[0])
            };
            trace!(
                "t{} n{} copies block {next} from n{} (servable {}) for index {index}",
                self.now,
                i + 1,
                j + 1,
                src.servable
            );
            // As in production, a damaged block never travels (read_chunk refuses it): the
            // copy asks again later, maybe another member.
            if read_block(&src.store, next).damaged().next().is_some() {
                return;
            }
            dst.store.copy_block_from(&src.store, next);
            dst.durable.copy_block_from(&src.store, next);
            dst.copy = Some((index, next + 1, sources));
            dst.marker = Some(Marker { index, offset: (next + 1) * BLOCK_BYTES });
            return;
        }
        let n = &mut self.nodes[i];
        n.copy = None;
        // The bug the hook plants: the replay the core asks for is not done.
        n.skip_replay = self.opts.rebuild_without_replay;
        let Some(core) = n.core.as_mut() else { return };
        core.rebuild_done(GROUP, index, Ok(()));
        trace!("t{} n{} copied the volume as of {index}", self.now, i + 1);
        self.execute(i);
        self.nodes[i].skip_replay = false;
    }

    fn crash(&mut self, i: usize) {
        trace!("t{} crash n{}", self.now, i + 1);
        let n = &mut self.nodes[i];
        n.core = None;
        n.copy = None;
        n.applying = None;
        n.checkpointing = None;
        n.syncing = None;
        n.sync_wanted = None;
        n.servable = 0;
        n.disk.crash();
        self.crashes += 1;
    }

    /// One round of node `i`'s core: propose, collect, then a write-out, or a sync begun (or
    /// a crash before either).
    fn round(&mut self, i: usize) {
        let now = self.now;
        let Some(core) = self.nodes[i].core.as_mut() else { return };
        core.propose(now);
        let Collected { round, persist } = core.collect().expect("collect");
        self.execute(i);
        if persist != Persist::Nothing && self.faults && self.rng.chance(2) {
            // Power loss between appending and syncing.
            return self.crash(i);
        }
        match persist {
            Persist::Sync if self.nodes[i].syncing.is_some() => self.nodes[i].sync_wanted = Some(round),
            Persist::Sync => self.begin_sync(i, round),
            Persist::Write => {
                let Some(core) = self.nodes[i].core.as_mut() else { return };
                if let Some(d) = core.driver(GROUP) {
                    d.storage().wal().lock().expect("lock").write_out().expect("write out");
                }
                core.persisted(round);
            }
            Persist::Nothing => {}
        }
        let Some(core) = self.nodes[i].core.as_mut() else { return };
        core.checkpoints(now);
        self.execute(i);
    }

    fn begin_sync(&mut self, i: usize, round: u64) {
        let n = &mut self.nodes[i];
        let Some(d) = n.core.as_ref().and_then(|c| c.driver(GROUP)) else { return };
        let (sync, mark) = d.storage().wal().lock().expect("lock").begin_sync().expect("begin sync");
        match sync {
            Some(sync) => n.syncing = Some((round, sync, mark)),
            None => self.finish_sync(i, round, mark),
        }
    }

    /// Finishes node `i`'s sync in flight, at some step after it began (never without
    /// faults: then at once, so a run without faults keeps its pace).
    fn sync_step(&mut self, i: usize) {
        if self.nodes[i].syncing.is_none() || (self.faults && !self.rng.chance(50)) {
            return;
        }
        let Some((round, sync, mark)) = self.nodes[i].syncing.take() else { return };
        sync.sync().expect("sync");
        self.finish_sync(i, round, mark);
    }

    fn finish_sync(&mut self, i: usize, round: u64, mark: SyncMark) {
        let n = &mut self.nodes[i];
        let Some(core) = n.core.as_mut() else { return };
        if let Some(d) = core.driver(GROUP) {
            d.storage().wal().lock().expect("lock").finish_sync(mark, Ok(())).expect("finish sync");
        }
        trace!("t{} n{} synced round {round}", self.now, i + 1);
        core.synced(round);
        self.execute(i);
        if let Some(next) = self.nodes[i].sync_wanted.take() {
            self.begin_sync(i, next);
        }
    }

    fn send(&mut self, from: usize, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to as usize - 1;
            // Through the wire layout the nodes use, so the simulation runs its codec too.
            let wire = Bytes::from(raft_codec::encode(m).expect("a Raft message encodes").concat());
            let m = raft_codec::decode(&wire).expect("an encoded Raft message decodes");
            if self.faults && self.rng.chance(5) {
                continue;
            }
            let copies = if self.faults && self.rng.chance(3) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = 1 + self.rng.below(if self.faults { 4 } else { 1 });
                self.seq += 1;
                self.net.push((self.now + delay, self.seq, from, to, m.clone()));
            }
        }
    }

    fn deliver(&mut self) {
        let mut due = Vec::new();
        let mut keep = Vec::new();
        for m in self.net.drain(..) {
            if m.0 <= self.now {
                due.push(m)
            } else {
                keep.push(m)
            }
        }
        self.net = keep;
        // Reorder what arrives in the same tick.
        for k in (1..due.len()).rev() {
            let j = self.rng.below(k as u64 + 1) as usize;
            due.swap(k, j);
        }
        for (_, _, from, to, m) in due {
            if let Some(p) = &self.partition {
                if p[from] != p[to] {
                    continue;
                }
            }
            if let Some(core) = self.nodes[to].core.as_mut() {
                core.step(GROUP, from as u64 + 1, m);
            }
        }
    }

    /// Node `i` reads `block` of its copy; a damaged block is repaired from another copy
    /// that holds it intact at a version node `i` has applied (the production rule), or the
    /// read fails. Never returns damaged bytes.
    fn read_repaired(&mut self, i: usize, block: u64) -> Option<Bytes> {
        let read = read_block(&self.nodes[i].store, block);
        let state = read.states[0];
        if !matches!(state, BlockState::Damaged(_)) || self.opts.serve_damaged {
            return Some(read.data);
        }
        let applied = self.nodes[i].applied();
        for j in 0..self.nodes.len() {
            let n = &self.nodes[j];
            // As production's ReadCopy: the other copy serves if it has applied as much.
            let reachable = j != i
                && n.core.is_some()
                && n.servable > 0
                && n.servable >= applied
                && self.partition.as_ref().is_none_or(|p| p[i] == p[j]);
            if !reachable {
                continue;
            }
            let theirs = read_block(&n.store, block);
            if !usable(&theirs.states[0], applied) {
                continue;
            }
            let image = BlockImage::of(&theirs).expect("intact");
            now(CopyStore::restore(&self.nodes[i].store, image, true)).expect("restore");
            self.repairs += 1;
            trace!("t{} n{} repaired block {block} from n{}", self.now, i + 1, j + 1);
            let read = read_block(&self.nodes[i].store, block);
            assert!(!matches!(read.states[0], BlockState::Damaged(_)), "a repair left damage");
            return Some(read.data);
        }
        None
    }

    /// Node `i` scrubs its copy (as `raftblk volume scrub` does, here at each checkpoint):
    /// damaged blocks are repaired from another copy by the production rule. Without it a
    /// rotted block nobody reads stays damaged until the other copies are lost to rebuilds,
    /// a second fault on the same block that no replication survives.
    fn scrub(&mut self, i: usize) {
        if self.nodes[i].core.is_none() || self.nodes[i].rebuilding() {
            return;
        }
        for block in 0..BLOCKS {
            if read_block(&self.nodes[i].store, block).damaged().next().is_some() {
                let _ = self.read_repaired(i, block);
            }
        }
    }

    /// Rots one block of one copy (on disk: the page cache and the durable image alike),
    /// at most one copy of a block at a time.
    fn rot(&mut self) {
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        let block = self.rng.below(BLOCKS);
        let elsewhere = (0..self.nodes.len())
            .any(|j| j != i && read_block(&self.nodes[j].store, block).damaged().next().is_some());
        // One fault at a time: the block keeps intact copies on every other store, all
        // complete (rotting a block while another copy is being replaced, or when the one
        // other intact copy is replaced before a scrub came by, loses the block for good,
        // which no replication can undo).
        // And those copies can repair it: they are reachable and have applied what this one
        // has (the repair rule reads a copy only at or past the reader's applied index).
        let applied = self.nodes[i].applied();
        let others_complete = self.partition.is_none()
            && (0..self.nodes.len()).all(|j| {
                let n = &self.nodes[j];
                j == i || (n.core.is_some() && !n.rebuilding() && n.servable >= applied)
            });
        if elsewhere || !others_complete || self.nodes[i].rebuilding() {
            return;
        }
        let n = &mut self.nodes[i];
        let byte = self.rng.below(BLOCK_BYTES) as usize;
        if self.rng.chance(50) {
            if !n.store.damage_data(block, byte) {
                return;
            }
            n.durable.damage_data(block, byte);
        } else {
            n.store.damage_record(block);
            n.durable.damage_record(block);
        }
        self.rots += 1;
        trace!("t{} n{} block {block} rots", self.now, i + 1);
    }

    fn complete(&mut self, id: u64, read: Option<Bytes>) {
        let Some(op) = self.ops.remove(&id) else { return };
        let b = op.block as usize;
        self.busy[b] = false;
        match (op.kind, read) {
            (OpKind::Write(v), _) => {
                self.possible[b] = vec![v];
                self.acked_writes += 1;
            }
            (OpKind::Read, Some(data)) => {
                let got = value_of(&data);
                let pos = got.and_then(|v| self.possible[b].iter().position(|&p| p == v));
                match pos {
                    Some(k) => {
                        self.possible[b].drain(..k);
                        self.reads_ok += 1;
                    }
                    None => self.seed_fail(format!(
                        "tick {}: read of block {b} on node {} returned {got:?}, allowed {:?}",
                        self.now,
                        op.node + 1,
                        self.possible[b]
                    )),
                }
            }
            (OpKind::Read, None) => {}
        }
    }

    /// The request failed or timed out: send it again (as a new request) to the leader.
    fn retry(&mut self, id: u64) {
        let Some(op) = self.ops.remove(&id) else { return };
        self.submit(op.block, op.kind);
    }

    fn pick_node(&mut self) -> usize {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].core.is_some()).collect();
        if let Some(&l) = up.iter().find(|&&i| self.nodes[i].driver().is_some_and(|d| d.is_leader())) {
            return l;
        }
        if up.is_empty() {
            return 0;
        }
        up[self.rng.below(up.len() as u64) as usize]
    }

    fn submit(&mut self, block: u64, kind: OpKind) {
        let id = self.next_req;
        self.next_req += 1;
        // Reads sometimes go to a follower: ReadIndex is forwarded to the leader and the read
        // waits for the follower to apply up to the returned index.
        let node = match kind {
            OpKind::Read if self.rng.chance(30) => self.rng.below(self.nodes.len() as u64) as usize,
            _ => self.pick_node(),
        };
        self.busy[block as usize] = true;
        self.ops.insert(id, Op { block, kind, node, sent_at: self.now });
        let Some(core) = self.nodes[node].core.as_mut() else { return };
        match kind {
            OpKind::Write(v) => {
                core.write(GROUP, vec![write_command(block, v)], id);
                if self.opts.ack_before_commit {
                    self.complete(id, None);
                }
            }
            OpKind::Read => core.read(GROUP, block, 1, id),
        }
        self.execute(node);
    }

    fn client(&mut self) {
        // Time out stuck requests and retry them.
        let stale: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| self.now - o.sent_at > OP_TIMEOUT_TICKS)
            .map(|(&id, _)| id)
            .collect();
        for id in stale.into_iter().chain(std::mem::take(&mut self.retry_soon)) {
            self.retry(id);
        }
        // Up to two new requests a step: the leader batches what arrives together.
        for _ in 0..2 {
            if self.issued >= self.opts.ops || !self.rng.chance(40) {
                return;
            }
            let block = self.rng.below(BLOCKS);
            if self.busy[block as usize] {
                continue;
            }
            self.issued += 1;
            let kind = if self.rng.chance(50) {
                let v = if self.rng.chance(10) { 0 } else { self.next_value };
                self.next_value += 1;
                self.possible[block as usize].push(v);
                OpKind::Write(v)
            } else {
                OpKind::Read
            };
            self.submit(block, kind);
        }
    }

    fn faults(&mut self) {
        let n = self.nodes.len();
        let down = self.nodes.iter().filter(|x| x.core.is_none()).count();
        // One fault at a time: while a copy holds a rotted block, no other copy is lost to a
        // crash or a partition (which can end in a snapshot that replaces the copy): the
        // scrub or a read repairs it first. Losing every intact copy of a block is what no
        // replication survives.
        let damaged = (0..self.nodes.len())
            .any(|j| (0..BLOCKS).any(|b| read_block(&self.nodes[j].store, b).damaged().next().is_some()));
        if down < n / 2 && !damaged && self.rng.chance(2) {
            let i = self.rng.below(n as u64) as usize;
            if self.nodes[i].core.is_some() {
                self.crash(i);
            }
        }
        for i in 0..n {
            if self.nodes[i].core.is_none() && self.rng.chance(5) {
                self.start(i);
            }
        }
        if self.rng.chance(3) {
            self.rot();
        }
        if self.partition.is_none() && !damaged && self.rng.chance(2) {
            self.partition = Some((0..n).map(|_| self.rng.chance(50)).collect());
        } else if self.partition.is_some() && self.rng.chance(5) {
            self.partition = None;
        }
    }

    fn step(&mut self) {
        self.now += 1;
        if self.faults {
            self.faults();
        }
        for i in 0..self.nodes.len() {
            let tick = !self.faults || self.rng.chance(90);
            if let Some(core) = self.nodes[i].core.as_mut() {
                if tick {
                    core.tick();
                }
            }
        }
        self.deliver();
        self.client();
        for i in 0..self.nodes.len() {
            // Drain: a round can produce more work (e.g. light-ready commits).
            for _ in 0..4 {
                self.round(i);
                if !self.nodes[i].core.as_ref().is_some_and(|c| c.has_ready()) {
                    break;
                }
            }
            self.sync_step(i);
            self.background(i);
            self.rebuild_step(i);
            if self.now >= self.nodes[i].next_scrub {
                self.nodes[i].next_scrub = self.now + CHECKPOINT_TICKS + self.rng.below(CHECKPOINT_TICKS);
                self.scrub(i);
            }
        }
    }

    fn heal(&mut self) {
        self.faults = false;
        self.partition = None;
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                self.start(i);
            }
        }
    }

    fn run(&mut self) {
        for _ in 0..self.opts.ticks {
            self.step();
        }
        self.heal();
        // Let outstanding requests finish (retries included), then converge.
        let mut budget = 2000;
        while !self.ops.is_empty() && budget > 0 {
            self.step();
            budget -= 1;
        }
        if !self.ops.is_empty() {
            self.seed_fail(format!(
                "{} requests never completed after healing: {:?}",
                self.ops.len(),
                self.ops
            ));
        }
        // Read every block through the leader: acknowledged writes must be there.
        for b in 0..BLOCKS {
            self.submit(b, OpKind::Read);
        }
        let mut budget = 2000;
        while !self.ops.is_empty() && budget > 0 {
            self.step();
            budget -= 1;
        }
        if !self.ops.is_empty() {
            self.seed_fail("final reads never completed".into());
        }
        // (commit, applied, rebuilding): a rebuilding store has applied nothing yet.
        let state = |sim: &Sim| -> Vec<(u64, u64, bool)> {
            sim.nodes
                .iter()
                .map(|n| {
                    let busy = n.rebuilding() || n.applying.is_some() || n.copy.is_some();
                    n.driver().map_or((0, 0, false), |d| (d.commit_index(), d.applied_index(), busy))
                })
                .collect()
        };
        let converged = |c: &[(u64, u64, bool)]| c.iter().all(|x| *x == c[0] && x.0 == x.1 && !x.2);
        let mut budget = 1000;
        while !converged(&state(self)) && budget > 0 {
            self.step();
            budget -= 1;
        }
        let commits = state(self);
        if !converged(&commits) {
            let leaders: Vec<String> = self.nodes.iter().map(|n| format!("{:?}", n.driver())).collect();
            self.seed_fail(format!(
                "replicas did not converge: (commit, applied, rebuilding) {commits:?} {leaders:?}"
            ));
        }
        // What a scrub does: damage left in any copy is repaired from an intact one.
        for i in 0..self.nodes.len() {
            for b in 0..BLOCKS {
                if read_block(&self.nodes[i].store, b).damaged().next().is_some()
                    && self.read_repaired(i, b).is_none()
                {
                    self.seed_fail(format!("block {b} of node {} has no intact copy anywhere", i + 1));
                }
            }
        }
        let images: Vec<SealedBlocks> = self
            .nodes
            .iter()
            .map(|n| now(CopyStore::read_blocks(&n.store, 0, BLOCKS as u32)).expect("read"))
            .collect();
        for (i, img) in images.iter().enumerate() {
            if *img != images[0] {
                let blocks: Vec<String> = (0..BLOCKS as usize)
                    .map(|b| {
                        let r = b * BLOCK_BYTES as usize..(b + 1) * BLOCK_BYTES as usize;
                        format!(
                            "{:?}",
                            images
                                .iter()
                                .map(|im| (value_of(&im.data[r.clone()]), im.states[b].version()))
                                .collect::<Vec<_>>()
                        )
                    })
                    .collect();
                self.seed_fail(format!(
                    "replica {} differs from replica 1 after healing; per block, each replica's (value, version): {blocks:?}",
                    i + 1
                ));
            }
        }
    }
}

thread_local! {
    static SEED: std::cell::RefCell<u64> = const { std::cell::RefCell::new(0) };
}

/// Summary of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimReport {
    pub acked_writes: u64,
    pub reads_ok: u64,
    pub crashes: u64,
    pub commit_index: u64,
    pub snapshots: u64,
    pub rots: u64,
    pub repairs: u64,
    pub eio_reads: u64,
    /// Entries applied (on any node) that carried several client writes.
    pub batched: u64,
}

/// Runs one seed; panics with the seed and the replay command if an invariant breaks.
pub fn run_seed(seed: u64, opts: SimOptions) -> SimReport {
    SEED.with(|s| *s.borrow_mut() = seed);
    let mut sim = Sim::new(seed, opts);
    sim.run();
    SimReport {
        acked_writes: sim.acked_writes,
        reads_ok: sim.reads_ok,
        crashes: sim.crashes,
        commit_index: sim.nodes[0].driver().map_or(0, |d| d.commit_index()),
        snapshots: sim.nodes.iter().map(|n| n.snapshots).sum(),
        rots: sim.rots,
        repairs: sim.repairs,
        eio_reads: sim.eio_reads,
        batched: sim.batched,
    }
}

/// Options for seed `seed`: 3 or 5 nodes.
pub fn options_for(seed: u64) -> SimOptions {
    SimOptions {
        nodes: if seed % 4 == 3 { 5 } else { 3 },
        ticks: 300,
        ops: 60,
        ack_before_commit: false,
        rebuild_without_replay: false,
        read_lease_steps: if seed.is_multiple_of(2) { READ_LEASE_STEPS } else { 0 },
        serve_damaged: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_u64(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    #[test]
    fn sim_seeds() {
        let seeds: Vec<u64> = match env_u64("SEED") {
            Some(s) => vec![s],
            None => (0..env_u64("SIM_SEEDS").unwrap_or(500)).collect(),
        };
        let start = std::time::Instant::now();
        let mut total = SimReport {
            acked_writes: 0,
            reads_ok: 0,
            crashes: 0,
            commit_index: 0,
            snapshots: 0,
            rots: 0,
            repairs: 0,
            eio_reads: 0,
            batched: 0,
        };
        for &seed in &seeds {
            let r = run_seed(seed, options_for(seed));
            if seeds.len() == 1 {
                println!("seed {seed}: {r:?}");
            }
            total.acked_writes += r.acked_writes;
            total.reads_ok += r.reads_ok;
            total.crashes += r.crashes;
            total.commit_index += r.commit_index;
            total.snapshots += r.snapshots;
            total.rots += r.rots;
            total.repairs += r.repairs;
            total.eio_reads += r.eio_reads;
            total.batched += r.batched;
        }
        println!("{} seeds in {:?}: {total:?}", seeds.len(), start.elapsed());
        assert!(total.acked_writes > 0 && total.reads_ok > 0);
        if seeds.len() >= 50 {
            assert!(total.snapshots > 0, "no run installed a snapshot: the rebuild path went untested");
            assert!(
                total.rots > 0 && total.repairs > 0,
                "no block rotted or was repaired: the damage path went untested"
            );
            assert!(total.batched > 0, "no entry batched several writes: batching went untested");
        }
    }

    #[test]
    fn sim_is_deterministic() {
        assert_eq!(run_seed(7, options_for(7)), run_seed(7, options_for(7)));
    }

    #[test]
    fn sim_catches_damaged_blocks_served_as_data() {
        let caught = (0..100u64).any(|seed| {
            let opts = SimOptions { serve_damaged: true, ..options_for(seed) };
            std::panic::catch_unwind(|| run_seed(seed, opts)).is_err()
        });
        assert!(caught, "the simulator did not catch damaged blocks returned to the client");
    }

    #[test]
    fn sim_catches_acks_before_commit() {
        // Acknowledging a write when it is proposed (before it is committed) loses it when the
        // leader crashes or is cut off; some seed out of a few dozen must notice.
        let caught = (0..100u64).any(|seed| {
            let opts = SimOptions { ack_before_commit: true, ..options_for(seed) };
            std::panic::catch_unwind(|| run_seed(seed, opts)).is_err()
        });
        assert!(caught, "the simulator did not catch writes acknowledged before commit");
    }

    /// Gives the leader a lease, cuts it off from everyone, and reports whether another
    /// node became leader while the old one still held its lease.
    fn lease_overlaps_a_new_leader(seed: u64, lease_steps: u64) -> bool {
        SEED.with(|s| *s.borrow_mut() = seed);
        let mut sim = Sim::new(seed, SimOptions { read_lease_steps: lease_steps, ..options_for(seed) });
        sim.faults = false;
        let mut probe = 1 << 40;
        let old = (0..400)
            .find_map(|_| {
                sim.step();
                let now = sim.now;
                let (i, d) = sim.nodes.iter_mut().enumerate().find_map(|(i, n)| {
                    n.core
                        .as_mut()
                        .and_then(|c| c.driver_mut(GROUP))
                        .filter(|d| d.is_leader())
                        .map(|d| (i, d))
                })?;
                probe += 1;
                let _ = d.read(RequestId(probe), now);
                d.holds_lease(now).then_some(i)
            })
            .expect("a leader with a lease");
        sim.partition = Some((0..sim.nodes.len()).map(|i| i == old).collect());
        for _ in 0..200 {
            sim.step();
            let now = sim.now;
            let new_leader = sim
                .nodes
                .iter()
                .enumerate()
                .any(|(i, n)| i != old && n.driver().is_some_and(|d| d.is_leader()));
            if new_leader {
                return sim.nodes[old].driver().is_some_and(|d| d.holds_lease(now));
            }
        }
        let states: Vec<String> = sim
            .nodes
            .iter()
            .map(|n| format!("{:?} {:?} copy {:?}", n.driver(), n.driver().map(|d| d.raft_status()), n.copy))
            .collect();
        panic!("seed {seed}: no new leader after the partition of node {}: {states:?}", old + 1);
    }

    #[test]
    fn read_leases_end_before_a_new_leader_can_exist() {
        for seed in 0..40 {
            assert!(!lease_overlaps_a_new_leader(seed, READ_LEASE_STEPS), "seed {seed}: leases overlap");
        }
        // The check has teeth: a lease longer than the election timeout overlaps.
        assert!(
            (0..40).any(|seed| lease_overlaps_a_new_leader(seed, 40)),
            "an overlong lease never overlapped a new leader"
        );
    }

    #[test]
    fn sim_catches_a_rebuild_that_skips_the_replay() {
        // A copy taken while the source keeps applying is fuzzy; without replaying the log
        // after the snapshot index, blocks written meanwhile can stay old on the new copy.
        let caught = (0..200u64).any(|seed| {
            let opts = SimOptions { rebuild_without_replay: true, ..options_for(seed) };
            std::panic::catch_unwind(|| run_seed(seed, opts)).is_err()
        });
        assert!(caught, "the simulator did not catch a rebuild without replay");
    }
}
