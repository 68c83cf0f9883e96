//! Property test: random appends, syncs, crashes, failed syncs and reopens of a [`Wal`] on a
//! [`SimDisk`], checked against a model (a `BTreeMap` per group), including group metadata
//! records that reset the log.
//!
//! After a crash the recovered state must equal the model after *some prefix* of the records
//! appended since the last successful sync: everything synced survives, nothing after a
//! torn tail comes back, and overwritten suffixes stay overwritten. Small segments make
//! rotation, checkpoints and segment deletion happen all the time.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::prelude::*;
use raftblk_replication::wal::disk::SimDisk;
use raftblk_replication::wal::record::{GroupId, HardState, LogIndex, NodeId, Payload, Record, Term};
use raftblk_replication::wal::{Wal, WalError, WalOptions};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct GroupModel {
    entries: BTreeMap<u64, (u64, Bytes)>,
    hard_state: Option<HardState>,
    mark: u64,
    meta: Option<Bytes>,
}

impl GroupModel {
    fn first(&self) -> u64 {
        self.mark.max(1)
    }

    fn next(&self) -> u64 {
        self.entries.last_key_value().map_or(self.first(), |(&i, _)| i + 1)
    }

    fn is_blank(&self) -> bool {
        self.entries.is_empty() && self.hard_state.is_none() && self.mark == 0 && self.meta.is_none()
    }
}

type Model = BTreeMap<u64, GroupModel>;

fn apply(model: &mut Model, r: &Record) {
    let g = model.entry(r.group.0).or_default();
    match &r.payload {
        Payload::Entry(e) => {
            g.entries.split_off(&e.index.0);
            g.entries.insert(e.index.0, (e.term.0, e.data.clone()));
        }
        Payload::HardState(hs) => g.hard_state = Some(*hs),
        Payload::CompactTo(m) => {
            if m.0 > g.mark {
                g.mark = m.0;
                g.entries = g.entries.split_off(&m.0);
            }
        }
        Payload::GroupMeta(m) => {
            if let Some(to) = m.reset_to {
                g.entries.clear();
                g.mark = g.mark.max(to.0);
            }
            g.meta = Some(m.data.clone());
        }
    }
}

/// Groups that hold nothing are not observable; drop them before comparing.
fn normalized(mut model: Model) -> Model {
    model.retain(|_, g| !g.is_blank());
    model
}

fn observe(wal: &Wal<SimDisk>) -> Model {
    let mut model = Model::new();
    for group in wal.groups() {
        let mut g = GroupModel {
            hard_state: wal.hard_state(group),
            mark: wal.compacted_below(group).0,
            meta: wal.group_meta(group).cloned(),
            ..GroupModel::default()
        };
        if let (Some(lo), Some(hi)) = (wal.first_index(group), wal.last_index(group)) {
            for e in wal.entries(group, lo, hi.next()).expect("entries") {
                assert_eq!(wal.term(group, e.index), Some(e.term));
                g.entries.insert(e.index.0, (e.term.0, e.data));
            }
        }
        assert_eq!(wal.next_index(group).0, g.next(), "group {group}");
        model.insert(group.0, g);
    }
    normalized(model)
}

/// A record in raw form; [`RawRecord::build`] turns it into a valid one for the current model.
#[derive(Debug, Clone)]
struct RawRecord {
    group: u64,
    kind: u8,
    a: u8,
    b: u8,
}

impl RawRecord {
    fn build(&self, model: &Model) -> Record {
        let group = GroupId(self.group);
        let blank = GroupModel::default();
        let g = model.get(&self.group).unwrap_or(&blank);
        let (a, b) = (u64::from(self.a), u64::from(self.b));
        match self.kind {
            0..=5 => {
                let len = g.next() - g.first();
                let index = if self.a < 64 {
                    g.first() + b % (len + 1) // overwrite (or append at the end)
                } else {
                    g.next()
                };
                let data = Bytes::from(vec![self.b; (a % 48) as usize]);
                Record::entry(group, LogIndex(index), Term(1 + b % 4), data)
            }
            6 | 7 => Record::hard_state(
                group,
                HardState { term: Term(a), vote: NodeId(b % 3), commit: LogIndex(a + b) },
            ),
            8 | 9 => {
                let len = g.next() - g.first();
                Record::compact_to(group, LogIndex(g.first() + a % (len + 3)))
            }
            10 => Record::group_meta(group, None, Bytes::from(vec![self.a; (b % 5) as usize])),
            _ => {
                let len = g.next() - g.first();
                let to = LogIndex(g.first() + a % (len + 3));
                Record::group_meta(group, Some(to), Bytes::from(vec![self.b; (a % 5) as usize]))
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<RawRecord>),
    Sync,
    /// Power loss, then reopen.
    Crash,
    /// The next sync fails; the WAL must refuse further use; then power loss and reopen.
    FailSync,
    /// Drop and reopen without losing anything (a process restart, not a power loss).
    Reopen,
}

fn raw_record() -> impl Strategy<Value = RawRecord> {
    (0u64..3, 0u8..12, any::<u8>(), any::<u8>()).prop_map(|(group, kind, a, b)| RawRecord {
        group,
        kind,
        a,
        b,
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => prop::collection::vec(raw_record(), 1..8).prop_map(Op::Append),
        3 => Just(Op::Sync),
        2 => Just(Op::Crash),
        1 => Just(Op::FailSync),
        1 => Just(Op::Reopen),
    ]
}

struct Harness {
    disk: SimDisk,
    options: WalOptions,
    wal: Wal<SimDisk>,
    /// State as of the last successful sync (or recovery).
    durable: Model,
    /// Appended since then, in order.
    pending: Vec<Record>,
}

impl Harness {
    fn current(&self) -> Model {
        let mut m = self.durable.clone();
        for r in &self.pending {
            apply(&mut m, r);
        }
        m
    }

    fn reopen(&mut self) {
        // The old handle goes first, as in a restarted process: closing cuts a reused
        // segment's old bytes, which a WAL opened before that would take for a torn tail.
        let placeholder = Wal::open(SimDisk::new(0), self.options).expect("placeholder");
        drop(std::mem::replace(&mut self.wal, placeholder));
        self.wal = Wal::open(self.disk.clone(), self.options).expect("reopen");
    }

    /// After power loss: the recovered state is the model after some prefix of `pending`.
    fn crash_and_check(&mut self) {
        let report = self.disk.crash();
        self.reopen();
        let got = observe(&self.wal);
        let mut m = self.durable.clone();
        let mut matched = (normalized(m.clone()) == got).then_some(0);
        for (k, r) in self.pending.iter().enumerate() {
            apply(&mut m, r);
            if normalized(m.clone()) == got {
                matched = Some(k + 1);
            }
        }
        let Some(k) = matched else {
            panic!(
                "recovered state is no prefix of the appended records\n\
                 crash: {report:?}\nrecovery: {:?}\ndurable: {:?}\npending: {:?}\ngot: {got:?}",
                self.wal.recovery_report(),
                self.durable,
                self.pending
            );
        };
        let mut m = self.durable.clone();
        for r in &self.pending[..k] {
            apply(&mut m, r);
        }
        self.durable = m;
        self.pending.clear();
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Append(raw) => {
                let mut model = self.current();
                let mut batch = Vec::new();
                for r in raw {
                    let rec = r.build(&model);
                    apply(&mut model, &rec);
                    batch.push(rec);
                }
                self.wal.append(&batch).expect("append");
                self.pending.extend(batch);
                assert_eq!(observe(&self.wal), normalized(model));
            }
            Op::Sync => {
                self.wal.sync().expect("sync");
                self.durable = self.current();
                self.pending.clear();
            }
            Op::Crash => self.crash_and_check(),
            Op::FailSync => {
                if self.pending.is_empty() {
                    return; // sync would not reach the disk, and the fault would stay armed
                }
                self.disk.fail_next_sync();
                assert!(self.wal.sync().is_err());
                assert!(matches!(self.wal.append(&[]), Err(WalError::Poisoned)));
                self.crash_and_check();
            }
            Op::Reopen => {
                self.reopen();
                assert_eq!(self.wal.recovery_report().truncation, None);
                assert_eq!(observe(&self.wal), normalized(self.current()));
                // Opening syncs what it recovered.
                self.durable = self.current();
                self.pending.clear();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model_across_crashes(
        seed in any::<u64>(),
        segment_target_bytes in 256u64..2048,
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let disk = SimDisk::new(seed);
        let options = WalOptions { segment_target_bytes };
        let wal = Wal::open(disk.clone(), options).expect("open");
        let mut h = Harness { disk, options, wal, durable: Model::new(), pending: Vec::new() };
        for op in &ops {
            h.run(op);
        }
        h.crash_and_check();
    }
}
