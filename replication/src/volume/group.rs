//! The driver of one volume's Raft group: a sans-IO wrapper around [`raft::RawNode`].
//!
//! Inputs: [`GroupDriver::propose`], [`GroupDriver::step`], [`GroupDriver::tick`],
//! [`GroupDriver::read_index`]. Outputs come from [`GroupDriver::collect`], and persistence
//! is reported back with [`GroupDriver::on_persisted`], so that the node can cover many
//! groups with **one** WAL sync (group commit) and go on with the next rounds while a sync
//! runs (raft-rs's asynchronous Ready: `advance_append_async`, `on_persist_ready`):
//!
//! ```text
//! round N, for every group with work:
//!     a = group.collect()?       // entries + hard state appended to the WAL (not yet
//!                                // durable); a.number is the Ready's
//!     send a.messages now        // leader appends: safe before the sync
//!     apply a.committed          // only entries already durable here are committed
//! begin one WAL sync for the round (another thread runs it; rounds N+1.. go on meanwhile)
//! once it is durable, for every group round N collected:
//!     b = group.on_persisted(a.number)
//!     send b.messages            // votes, append acks: they needed the sync
//! the next collect hands out what that made committed
//! ```
//!
//! This follows the raft-rs `Ready` contract: `messages` may go out before the local log is
//! durable, `persisted_messages` only after; readies are persisted in order. A write is
//! acknowledged once its entry is committed (durable in a majority's WAL, this leader's own
//! included: raft-rs counts its own copy only once persisted) **and** applied to the local
//! store, so a read on this node afterwards sees it. Proposals are matched to entries by
//! (index, term): an entry is unique by that pair, so a proposal whose slot commits with
//! another term was lost (a leader change) and is reported in [`Applied::failed`] for the
//! client to retry.

// The protobuf structs of raft-rs carry hidden fields, so they are built by assignment.
#![allow(clippy::field_reassign_with_default)]

use std::collections::BTreeMap;

use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message};
use raft::{RawNode, StateRole};

use super::command::{decode_batch, encode_batch, Command, CommandError};
use crate::storage::{GroupStorage, StorageError};
use crate::wal::disk::WalDisk;
use crate::wal::record::GroupId;

/// Ticks a pre-candidate waits before campaigning again, drawn from `lo..hi` (see
/// `GroupDriver::campaign_again`).
const PRE_CANDIDATE_RETRY_TICKS: (usize, usize) = (2, 5);
/// The same for a candidate.
const CANDIDATE_RETRY_TICKS: (usize, usize) = (3, 7);

/// xorshift64: election timeouts only need to differ between nodes, groups and elections,
/// from a seed the caller controls (the simulator's runs must repeat). `state` must not be 0.
pub(crate) fn xorshift64(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Request contexts with this bit set are lease renewals, not client reads (client request
/// ids are counters far below it).
const LEASE_PROBE_BIT: u64 = 1 << 63;

/// Ticks a leader waits for a peer to confirm a snapshot before sending another. The
/// message is tiny and confirmed right after the peer's WAL sync (the data is pulled
/// afterwards), so only a lost message takes this long.
pub const SNAPSHOT_CONFIRM_TICKS: usize = 60;

/// Most bytes of entries read back from the log at once by [`GroupDriver::committed_entries`].
const REPLAY_READ_BYTES_MAX: u64 = 64 << 20;

/// A client request, chosen by the caller; echoed back when it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Errors of the group driver.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// this node is not the leader; `leader` is the one it knows of (0: none)
    #[error("not the leader (leader hint: {leader})")]
    NotLeader { leader: u64 },
    /// raft-rs refused the input
    #[error(transparent)]
    Raft(#[from] raft::Error),
    /// the Raft storage failed
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// a committed entry does not decode: the replica must stop
    #[error("committed entry {index} is malformed: {source}")]
    BadEntry { index: u64, source: CommandError },
}

/// Settings of one group on one node.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// This node's id in the group (non-zero).
    pub node_id: u64,
    /// The group (volume).
    pub group: GroupId,
    /// Ticks without a leader before campaigning, at least: each timeout is drawn from
    /// `[election_tick, 2 × election_tick)` with a generator seeded by `seed` (raft-rs would
    /// draw from a thread-local RNG, which the simulator cannot seed). Drawing anew after
    /// every election keeps two candidates from splitting the vote forever.
    pub election_tick: usize,
    /// Seed of the election timeout draws (differs between nodes).
    pub seed: u64,
    /// Ticks between heartbeats.
    pub heartbeat_tick: usize,
    /// Index already applied to the local store (raft-rs re-delivers what follows).
    pub applied: u64,
    /// How long a leader may serve reads without a heartbeat round after a quorum confirmed
    /// its leadership, in the caller's clock (0: always ReadIndex). See [`GroupDriver::read`]
    /// for the bound it must respect.
    pub read_lease_ms: u64,
    /// While this node is the group's only member, what a round appends needs only to reach
    /// the kernel, not the disk, before it counts as persisted: see [`Actions::needs_sync`].
    pub write_back: bool,
}

/// A committed entry to apply to the volume's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedEntry {
    /// Log index.
    pub index: u64,
    /// Commands to apply, in order (empty for a leader's no-op or a membership change).
    pub commands: Vec<Command>,
}

/// Output of [`GroupDriver::collect`].
#[derive(Debug, Default)]
pub struct Actions {
    /// The Ready's number, to give [`GroupDriver::on_persisted`] once what `collect`
    /// appended is durable.
    pub number: u64,
    /// Messages to send now.
    pub messages: Vec<Message>,
    /// Entries to apply, in log order.
    pub committed: Vec<CommittedEntry>,
    /// The leader this node now knows of, if it changed (0: none).
    pub leader_changed: Option<u64>,
    /// A snapshot was installed: the log now starts after its index, and the volume's data
    /// up to that index must be fetched from a peer (see [`InstalledSnapshot`]).
    pub snapshot: Option<InstalledSnapshot>,
    /// What `collect` appended must be synced before `on_persisted` (entries, a term or vote,
    /// a snapshot). A Ready that only moves the commit index needs no sync: commit is only
    /// ever "at least" and is recovered from the leader, and the entries it covers were
    /// synced by an earlier round. Skipping it takes one `fdatasync` off every replicated
    /// write's path on the leader (which learns the commit from the acks). A membership
    /// applied from a committed entry needs none either: the entry is in the synced log, and
    /// the node syncs the WAL before it records an applied index past it (its checkpoint).
    ///
    /// A write-back group (see [`GroupConfig::write_back`]) whose only member is this node
    /// needs no sync either, only [`Actions::needs_write`]: with no other copy there is no
    /// vote or acknowledgement another node relies on, and a crash of the process keeps what
    /// reached the kernel. What a power loss takes is a suffix of the log (the WAL recovers a
    /// prefix), which is the contract of a disk with a volatile write cache: a write is
    /// durable once a FLUSH (or FUA) that follows it returns (see `NodeCore::flush`).
    pub needs_sync: bool,
    /// What `collect` appended must at least be handed to the kernel before `on_persisted`
    /// (implied by `needs_sync`).
    pub needs_write: bool,
}

/// A snapshot that raft-rs installed: only metadata. The caller owes the store the volume's
/// data as of `index` (at least), which any member whose store has applied `index` can give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledSnapshot {
    /// The snapshot's index: committed entries after it follow through the log.
    pub index: u64,
    /// The node that sent it (the best first source of the data).
    pub from: u64,
}

/// Output of [`GroupDriver::applied`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Writes committed and applied here: acknowledge them.
    pub writes: Vec<RequestId>,
    /// Writes whose entry was replaced (leader change): fail them, the client retries.
    pub failed: Vec<RequestId>,
    /// Linearizable reads that may now read the local store.
    pub reads: Vec<RequestId>,
}

/// A group's Raft membership and progress, as [`GroupDriver::raft_status`] reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// Current term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Non-voting members catching up.
    pub learners: Vec<u64>,
    /// Matched log index per member (leader only).
    pub progress: Vec<(u64, u64)>,
}

/// One group's Raft state machine driver. See the module docs for the calling protocol.
pub struct GroupDriver<D: WalDisk> {
    raw: RawNode<GroupStorage<D>>,
    /// Proposals by log index: (term, requests).
    proposals: BTreeMap<u64, (u64, Vec<RequestId>)>,
    /// Proposals whose entry was handed out as committed, waiting for `applied`.
    committed_proposals: BTreeMap<u64, Vec<RequestId>>,
    /// Failures found while handing out committed entries.
    failed: Vec<RequestId>,
    /// Reads that have a read index, waiting for `applied` to reach it.
    reads: Vec<(u64, RequestId)>,
    /// Messages of Readies collected and not yet persisted, by Ready number: they go out once
    /// [`GroupDriver::on_persisted`] says their Ready is durable.
    unpersisted: std::collections::VecDeque<(u64, Vec<Message>)>,
    leader: u64,
    /// Highest index handed out in `committed`.
    handed_out: u64,
    applied: u64,
    /// Sender of the last snapshot message stepped.
    snapshot_from: u64,
    /// Leader only: peers a snapshot was sent to, and ticks spent waiting for them to confirm.
    snapshot_waits: BTreeMap<u64, usize>,
    read_lease_ms: u64,
    /// Until when (caller's clock) leadership is certain without asking a quorum.
    lease_until_ms: u64,
    /// ReadIndex requests in flight: request context → (term, when issued).
    lease_probes: BTreeMap<u64, (u64, u64)>,
    next_probe: u64,
    /// See [`GroupConfig::write_back`].
    write_back: bool,
    /// xorshift64 state for election timeouts.
    rng: u64,
    /// (term, role) when the election timeout was last drawn.
    drawn_for: (u64, StateRole),
    /// Election timeouts are drawn from `min..max` ticks.
    election_range: (usize, usize),
    /// While campaigning: as what, ticks since the campaign began, and after how many the
    /// driver campaigns again (see `campaign_again`).
    campaign: Option<(StateRole, usize, usize)>,
}

/// How a read was started by [`GroupDriver::read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// Within the leader's lease: it completes once the store applies the commit index.
    Lease,
    /// Through ReadIndex: it completes after a heartbeat round and the apply.
    ReadIndex,
}

impl<D: WalDisk> std::fmt::Debug for GroupDriver<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupDriver")
            .field("id", &self.raw.raft.id)
            .field("leader", &self.leader)
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl<D: WalDisk> GroupDriver<D> {
    /// Starts the group on `storage` (which must be initialized with a membership).
    pub fn new(config: &GroupConfig, storage: GroupStorage<D>) -> Result<GroupDriver<D>, GroupError> {
        let cfg = raft::Config {
            id: config.node_id,
            election_tick: config.election_tick,
            min_election_tick: config.election_tick,
            max_election_tick: 2 * config.election_tick,
            heartbeat_tick: config.heartbeat_tick,
            applied: config.applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            // A commit does not get its own broadcast: followers learn it from the next
            // append or heartbeat. Broadcasting it cost every replicated write a second
            // round of messages, wakeups and (commit-only) Readies on all three nodes.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = RawNode::new(&cfg, storage, &logger)?;
        raw.mut_store().set_snapshot_point(config.applied);
        let mut driver = GroupDriver {
            raw,
            proposals: BTreeMap::new(),
            committed_proposals: BTreeMap::new(),
            failed: Vec::new(),
            reads: Vec::new(),
            unpersisted: std::collections::VecDeque::new(),
            leader: 0,
            handed_out: config.applied,
            applied: config.applied,
            snapshot_from: 0,
            snapshot_waits: BTreeMap::new(),
            read_lease_ms: config.read_lease_ms,
            lease_until_ms: 0,
            lease_probes: BTreeMap::new(),
            next_probe: 0,
            write_back: config.write_back,
            rng: config.seed | 1,
            drawn_for: (u64::MAX, StateRole::Follower),
            election_range: (config.election_tick, 2 * config.election_tick),
            campaign: None,
        };
        driver.redraw_election_timeout();
        Ok(driver)
    }

    /// Asks raft-rs to hand leadership to `to` (only acts on the leader). Ends the read
    /// lease: the target campaigns at once, without waiting out any election timeout.
    pub fn transfer_leader(&mut self, to: u64) {
        self.lease_until_ms = 0;
        self.raw.transfer_leader(to);
    }

    /// Term, voters, learners and (on the leader) each peer's matched index.
    pub fn raft_status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        let mut voters: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let mut learners: Vec<u64> = raft.prs().conf().learners().iter().copied().collect();
        learners.sort_unstable();
        let mut progress: Vec<(u64, u64)> = if self.is_leader() {
            raft.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            Vec::new()
        };
        progress.sort_unstable();
        RaftStatus { term: raft.term, voters, learners, progress }
    }

    /// Whether this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// The leader this node knows of (0: none).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Index applied to the local store, as reported to [`GroupDriver::applied`].
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// The commit index.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// The storage (for its WAL handle and metadata).
    pub fn storage(&self) -> &GroupStorage<D> {
        self.raw.store()
    }

    /// Proposes a batch of commands as one entry; `requests` complete when it is applied.
    /// Returns the entry's index (command `i` of the batch writes version
    /// `block_version(index, i)`).
    pub fn propose(&mut self, commands: &[Command], requests: Vec<RequestId>) -> Result<u64, GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader { leader: self.leader() });
        }
        // `RawNode::propose` takes a `Vec` (a copy of the batch); the message it builds can
        // carry the batch's `Bytes` as they are.
        let mut entry = raft::eraftpb::Entry::default();
        entry.data = encode_batch(commands);
        let mut m = Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
        m.from = self.raw.raft.id;
        m.set_entries(vec![entry].into());
        self.raw.raft.step(m)?;
        let index = self.raw.raft.raft_log.last_index();
        self.proposals.insert(index, (self.raw.raft.term, requests));
        Ok(index)
    }

    /// Proposes a membership change (raft-rs applies it when its entry commits; see
    /// `hand_out`). Only the leader may propose, and only one change may be pending.
    pub fn propose_conf_change(&mut self, change: ConfChangeV2) -> Result<(), GroupError> {
        if !self.is_leader() {
            return Err(GroupError::NotLeader { leader: self.leader() });
        }
        self.raw.propose_conf_change(Vec::new(), change)?;
        Ok(())
    }

    /// Feeds a message from a peer. Messages from unknown peers or stale terms are dropped
    /// by raft-rs; only storage failures are errors worth stopping for.
    pub fn step(&mut self, mut message: Message) -> Result<(), GroupError> {
        // A node whose WAL lost a damaged tail may be behind what it once acknowledged; the
        // leader's heartbeat then carries a commit index past our log, which raft-rs treats as
        // a fatal invariant breach. Clamping it is safe (commit only ever means "at least"), and
        // the next append, rejected at the gap, makes the leader resend what is missing.
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgHeartbeat {
            let last = self.raw.raft.raft_log.last_index();
            if message.commit > last {
                message.commit = last;
            }
        }
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            self.snapshot_from = message.from;
        }
        let r = match self.raw.step(message) {
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e.into()),
        };
        self.redraw_election_timeout();
        r
    }

    /// raft-rs redraws the election timeout (from its own RNG) whenever the term or role
    /// changes; replace the draw with ours before the next tick can consult it.
    fn redraw_election_timeout(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.state);
        if now == self.drawn_for {
            return;
        }
        self.drawn_for = now;
        let (min, max) = self.election_range;
        let span = (max - min).max(1) as u64;
        self.raw.raft.set_randomized_election_timeout(min + (xorshift64(&mut self.rng) % span) as usize);
    }

    /// A (pre-)candidate that got no majority campaigns again after a short random wait
    /// instead of a whole election timeout: after a leader dies, two survivors that campaign
    /// at once (a split vote), or one whose pre-vote a peer refused because the peer's own
    /// timeout was a tick behind, otherwise add 350-700 ms to the failover. Only a campaign
    /// already under way is repeated, so the first one still waits the full timeout and the
    /// read lease holds (a peer grants no vote while it heard from a leader within its
    /// election timeout). Each attempt draws its own wait, so two nodes do not collide again.
    fn campaign_again(&mut self) {
        let role = self.raw.raft.state;
        let (lo, hi) = match role {
            StateRole::PreCandidate => PRE_CANDIDATE_RETRY_TICKS,
            // A candidate's votes are synced to the voters' WALs before they answer.
            StateRole::Candidate => CANDIDATE_RETRY_TICKS,
            _ => {
                self.campaign = None;
                return;
            }
        };
        let started = self.raw.raft.election_elapsed == 0;
        match &mut self.campaign {
            Some((was, ticks, wait)) if *was == role && !started => {
                *ticks += 1;
                if *ticks < *wait {
                    return;
                }
                // Fails only on a node that cannot be elected (removed, a learner): it then
                // stops campaigning anyway.
                let _ = self.raw.campaign();
            }
            _ => {}
        }
        let wait = lo + (xorshift64(&mut self.rng) % (hi - lo) as u64) as usize;
        self.campaign = Some((self.raw.raft.state, 0, wait));
    }

    /// Advances the logical clock by one tick. A leader also gives up on snapshots nobody
    /// confirmed within [`SNAPSHOT_CONFIRM_TICKS`]: raft-rs waits for the peer forever
    /// otherwise, and a lost snapshot message would leave the peer behind for good.
    pub fn tick(&mut self) {
        self.raw.tick();
        self.redraw_election_timeout();
        self.campaign_again();
        let waiting = self.peers_awaiting_snapshot();
        self.snapshot_waits.retain(|peer, _| waiting.contains(peer));
        for peer in waiting {
            let ticks = self.snapshot_waits.entry(peer).or_insert(0);
            *ticks += 1;
            if *ticks > SNAPSHOT_CONFIRM_TICKS {
                self.snapshot_waits.remove(&peer);
                self.raw.report_snapshot(peer, raft::SnapshotStatus::Failure);
            }
        }
    }

    /// Asks for a linearizable read; it shows up in [`Applied::reads`] once the local store
    /// has applied everything committed when the leader confirmed its leadership. A read lost
    /// to a leader change never shows up: the caller times out and retries.
    pub fn read_index(&mut self, request: RequestId) {
        self.raw.read_index(request.0.to_le_bytes().to_vec());
    }

    /// Starts a linearizable read at time `now_ms` (the caller's monotonic clock), by lease
    /// when the leader holds one, else by ReadIndex; either way it shows up in
    /// [`Applied::reads`].
    ///
    /// # The lease and its clock bound
    ///
    /// When a ReadIndex request issued at `t` completes, a quorum acknowledged this leader's
    /// heartbeat sent at or after `t`. With `check_quorum`, each of those followers refuses
    /// to vote for anyone else until its election timer expires, which takes at least
    /// `election_tick - 1` of its ticks after it received that heartbeat (a tick may fire
    /// right after the receipt). So no other leader can exist before
    /// `t + (election_tick - 1) × tick` in the followers' clocks. The leader serves reads
    /// locally until `t + read_lease_ms`; the caller picks `read_lease_ms` below that bound
    /// with a margin for clock rate differences between nodes (raftblk: 20 %, see
    /// `NodeConfig`). Leader transfers end the lease (the target campaigns at once), and a
    /// leader reads by lease only once it committed an entry of its own term, so its
    /// commit index covers every acknowledged write.
    pub fn read(&mut self, request: RequestId, now_ms: u64) -> ReadPath {
        let lease_ok = self.is_leader()
            && self.raw.raft.lead_transferee.is_none()
            && now_ms < self.lease_until_ms
            && self.raw.raft.raft_log.term(self.commit_index()).ok() == Some(self.raw.raft.term);
        if !lease_ok {
            self.probe(request.0, now_ms);
            return ReadPath::ReadIndex;
        }
        self.reads.push((self.commit_index(), request));
        // Renew ahead of expiry, so a steady stream of reads never waits for a round.
        let half = self.read_lease_ms / 2;
        if self.lease_until_ms.saturating_sub(now_ms) < half && self.lease_probes.is_empty() {
            self.next_probe += 1;
            self.probe(LEASE_PROBE_BIT | self.next_probe, now_ms);
        }
        ReadPath::Lease
    }

    fn probe(&mut self, ctx: u64, now_ms: u64) {
        if self.read_lease_ms > 0 && self.is_leader() {
            self.lease_probes.insert(ctx, (self.raw.raft.term, now_ms));
        }
        self.raw.read_index(ctx.to_le_bytes().to_vec());
    }

    /// Whether a read started now would be served by lease (for tests and status).
    pub fn holds_lease(&self, now_ms: u64) -> bool {
        self.is_leader() && now_ms < self.lease_until_ms
    }

    /// Whether this round may skip the sync (see [`Actions::needs_sync`]): write-back is on
    /// and this node is the only member, with no change of membership under way (the sync of
    /// the round that appends one makes everything before it durable, before a second copy
    /// can rely on it).
    pub fn alone_with_write_back(&self) -> bool {
        if !self.write_back || self.raw.raft.has_pending_conf() {
            return false;
        }
        // Every round asks: read the configuration in place, without building a ConfState.
        let conf = self.raw.raft.prs().conf();
        conf.learners().is_empty()
            && conf.learners_next().is_empty()
            && conf.voters().is_singleton()
            && conf.voters().contains(self.raw.raft.id)
    }

    /// Whether [`GroupDriver::collect`] has anything to do.
    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    fn hand_out(
        &mut self,
        entries: Vec<raft::eraftpb::Entry>,
        out: &mut Vec<CommittedEntry>,
    ) -> Result<(), GroupError> {
        for e in entries {
            // Proposals at or below this index that are still open were replaced.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i >= e.index {
                    break;
                }
                if let Some((_, (_, ids))) = self.proposals.pop_first() {
                    self.failed.extend(ids);
                }
            }
            if let Some((term, ids)) = self.proposals.remove(&e.index) {
                if term == e.term {
                    self.committed_proposals.insert(e.index, ids);
                } else {
                    self.failed.extend(ids);
                }
            }
            let commands = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => Vec::new(),
                EntryType::EntryNormal => {
                    decode_batch(&e.data).map_err(|source| GroupError::BadEntry { index: e.index, source })?
                }
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &e.data).map_err(raft::Error::from)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.raw.mut_store().set_conf_state(cs, e.index)?;
                    Vec::new()
                }
                EntryType::EntryConfChangeV2 => {
                    let mut cc = ConfChangeV2::default();
                    protobuf::Message::merge_from_bytes(&mut cc, &e.data).map_err(raft::Error::from)?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.raw.mut_store().set_conf_state(cs, e.index)?;
                    Vec::new()
                }
            };
            self.handed_out = e.index;
            self.raw.mut_store().set_snapshot_point(e.index);
            out.push(CommittedEntry { index: e.index, commands });
        }
        Ok(())
    }

    /// Takes raft-rs's Ready, appends its entries and hard state to the WAL (not synced), and
    /// returns what may be done before the sync; the messages that must wait for it are kept
    /// until [`GroupDriver::on_persisted`]. `None` if there is nothing to do. It may be
    /// called again before the Ready is persisted.
    pub fn collect(&mut self) -> Result<Option<Actions>, GroupError> {
        if !self.has_ready() {
            return Ok(None);
        }
        let mut rd = self.raw.ready();
        let mut out = Actions { number: rd.number(), messages: rd.take_messages(), ..Actions::default() };
        let held = rd.take_persisted_messages();
        let before = self.raw.store().hard_state();
        out.needs_write = !rd.entries().is_empty()
            || !rd.snapshot().is_empty()
            || rd.hs().is_some_and(|hs| hs.term != before.term || hs.vote != before.vote);
        out.needs_sync = out.needs_write && !self.alone_with_write_back();
        if let Some(ss) = rd.ss() {
            if ss.leader_id != self.leader {
                self.leader = ss.leader_id;
                out.leader_changed = Some(ss.leader_id);
            }
            if ss.raft_state != StateRole::Leader {
                self.lease_until_ms = 0;
                self.lease_probes.clear();
            }
        }
        if !rd.snapshot().is_empty() {
            let index = rd.snapshot().get_metadata().index;
            self.raw.mut_store().apply_snapshot(rd.snapshot().get_metadata())?;
            self.raw.mut_store().set_snapshot_point(index);
            self.handed_out = index;
            // Open proposals at or below the snapshot can no longer commit as proposed.
            while let Some((&i, _)) = self.proposals.first_key_value() {
                if i > index {
                    break;
                }
                if let Some((_, (_, ids))) = self.proposals.pop_first() {
                    self.failed.extend(ids);
                }
            }
            out.snapshot = Some(InstalledSnapshot { index, from: self.snapshot_from });
        }
        for rs in rd.take_read_states() {
            let Ok(b) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else { continue };
            let ctx = u64::from_le_bytes(b);
            if let Some((term, issued)) = self.lease_probes.remove(&ctx) {
                if term == self.raw.raft.term && self.is_leader() && self.raw.raft.lead_transferee.is_none() {
                    self.lease_until_ms = self.lease_until_ms.max(issued + self.read_lease_ms);
                }
            }
            if ctx & LEASE_PROBE_BIT == 0 {
                self.reads.push((rs.index, RequestId(ctx)));
            }
        }
        let committed = rd.take_committed_entries();
        self.hand_out(committed, &mut out.committed)?;
        self.raw.mut_store().append(rd.entries())?;
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
        }
        // The Ready's updates are readable from the storage now (raft-rs's condition for this).
        self.raw.advance_append_async(rd);
        self.advance_applied_mark();
        if !held.is_empty() {
            self.unpersisted.push_back((out.number, held));
        }
        Ok(Some(out))
    }

    /// raft-rs counts entries as applied once handed out (its synchronous `advance` moved the
    /// mark there); the store may finish them later, which only this driver's own mark
    /// follows. raft-rs takes a mark only up to what is persisted here (an installed
    /// snapshot's index only once its Ready is).
    fn advance_applied_mark(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.handed_out.min(log.committed).min(log.persisted);
        if to > log.applied {
            self.raw.advance_apply_to(to);
        }
    }

    /// Reports that the Ready `number` (and every one before it) is durable: returns the
    /// messages that waited for it. What it makes committed (this node's copy now counts)
    /// comes out of the next [`GroupDriver::collect`].
    pub fn on_persisted(&mut self, number: u64) -> Vec<Message> {
        self.raw.on_persist_ready(number);
        self.advance_applied_mark();
        let mut out = Vec::new();
        while let Some((_, messages)) = self.unpersisted.pop_front_if(|(n, _)| *n <= number) {
            out.extend(messages);
        }
        out
    }

    /// Highest index handed out as committed (or installed by a snapshot).
    pub fn handed_out(&self) -> u64 {
        self.handed_out
    }

    /// Peers the leader is waiting on to confirm a snapshot (empty on a follower).
    pub fn peers_awaiting_snapshot(&self) -> Vec<u64> {
        if !self.is_leader() {
            return Vec::new();
        }
        let mut ids: Vec<u64> = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(_, p)| p.state == raft::ProgressState::Snapshot)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Drops this node's log below `to` (entries the store has durably applied).
    pub fn compact(&mut self, to: u64) -> Result<(), GroupError> {
        Ok(self.raw.mut_store().compact(to)?)
    }

    /// Committed entries `lo..hi` read back from the log, decoded for the store (configuration
    /// changes come out empty: raft-rs applied them when they were handed out). For replaying
    /// entries that were handed out while the store was being rebuilt.
    pub fn committed_entries(&self, lo: u64, hi: u64) -> Result<Vec<CommittedEntry>, GroupError> {
        let hi = hi.min(self.handed_out + 1);
        let mut out = Vec::new();
        let mut next = lo;
        while next < hi {
            let entries = raft::Storage::entries(
                self.raw.store(),
                next,
                hi,
                Some(REPLAY_READ_BYTES_MAX),
                raft::GetEntriesContext::empty(false),
            )?;
            let Some(last) = entries.last().map(|e| e.index) else { break };
            for e in entries {
                let commands = match e.get_entry_type() {
                    EntryType::EntryNormal if !e.data.is_empty() => decode_batch(&e.data)
                        .map_err(|source| GroupError::BadEntry { index: e.index, source })?,
                    _ => Vec::new(),
                };
                out.push(CommittedEntry { index: e.index, commands });
            }
            next = last + 1;
        }
        Ok(out)
    }

    /// Takes the requests of the committed entries up to `index` that `done_at_commit`
    /// accepts, so they complete now; the others complete when applied.
    pub fn take_committed(
        &mut self,
        index: u64,
        done_at_commit: impl Fn(RequestId) -> bool,
    ) -> Vec<RequestId> {
        let mut done = Vec::new();
        for ids in self.committed_proposals.range_mut(..=index).map(|(_, ids)| ids) {
            ids.retain(|&id| {
                let now = done_at_commit(id);
                if now {
                    done.push(id);
                }
                !now
            });
        }
        self.committed_proposals.retain(|_, ids| !ids.is_empty());
        done
    }

    /// Reports that every handed-out entry up to `index` is applied to the local store;
    /// returns the requests that completed.
    pub fn applied(&mut self, index: u64) -> Applied {
        let index = index.min(self.handed_out);
        if index > self.applied {
            self.applied = index;
        }
        let mut out = Applied { failed: std::mem::take(&mut self.failed), ..Applied::default() };
        while let Some(entry) = self.committed_proposals.first_entry() {
            if *entry.key() > self.applied {
                break;
            }
            out.writes.extend(entry.remove());
        }
        let applied = self.applied;
        self.reads.retain(|&(i, id)| {
            if i <= applied {
                out.reads.push(id);
                false
            } else {
                true
            }
        });
        out
    }
}
