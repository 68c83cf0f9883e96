//! State machine groups on real nodes (loopback transport, real WALs): every replica applies
//! the same entries, conditional commands included; a replica that joins after the log was
//! compacted receives the state as an image and then follows the log.

// The helpers below are test code too (clippy only exempts `#[test]` functions).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raftblk_replication::machine::{MachineError, MachineStore, StateMachine};
use raftblk_replication::node::{MembershipChange, NodeConfig, NodeError, ReplicationNode};
use raftblk_replication::transport::ClusterId;
use raftblk_replication::volume::command::Command;
use raftblk_replication::wal::disk::WalEngine;
use raftblk_replication::wal::record::{GroupId, NodeId};

const GROUP: GroupId = GroupId(2);

/// A key-value machine: `k=v` sets, `k?=v` sets only if `k` is absent (so replaying an
/// entry twice would be visible), `-k` deletes.
#[derive(Default)]
struct KvMachine {
    state: Mutex<(u64, BTreeMap<String, String>)>,
    installs: Mutex<u32>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvMachine {
    fn snapshot(&self) -> (u64, BTreeMap<String, String>) {
        lock(&self.state).clone()
    }
}

impl StateMachine for KvMachine {
    fn apply(&self, index: u64, commands: &[Bytes]) -> Result<(), MachineError> {
        let mut s = lock(&self.state);
        if index <= s.0 {
            return Ok(());
        }
        assert_eq!(index, s.0 + 1, "entries must arrive in order, without gaps");
        for c in commands {
            let text = std::str::from_utf8(c).map_err(|e| MachineError(e.to_string()))?;
            if let Some(k) = text.strip_prefix('-') {
                s.1.remove(k);
            } else if let Some((k, v)) = text.split_once("?=") {
                s.1.entry(k.to_string()).or_insert_with(|| v.to_string());
            } else if let Some((k, v)) = text.split_once('=') {
                s.1.insert(k.to_string(), v.to_string());
            } else {
                return Err(MachineError(format!("bad command {text:?}")));
            }
        }
        s.0 = index;
        Ok(())
    }

    fn applied_index(&self) -> u64 {
        lock(&self.state).0
    }

    fn flush(&self) -> Result<u64, MachineError> {
        Ok(self.applied_index())
    }

    fn image(&self) -> Result<(u64, Bytes), MachineError> {
        let s = lock(&self.state);
        let text: String = s.1.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Ok((s.0, Bytes::from(text)))
    }

    fn install(&self, index: u64, image: Bytes) -> Result<(), MachineError> {
        let text = std::str::from_utf8(&image).map_err(|e| MachineError(e.to_string()))?;
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or_else(|| MachineError(format!("bad line {line:?}")))?;
            map.insert(k.to_string(), v.to_string());
        }
        *lock(&self.state) = (index, map);
        *lock(&self.installs) += 1;
        Ok(())
    }
}

struct TestNode {
    node: ReplicationNode,
    machine: Arc<KvMachine>,
    _dir: tempfile::TempDir,
}

async fn start(id: u64, retain: u64) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        node_id: NodeId(id),
        cluster: ClusterId(7),
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        peers: HashMap::new(),
        wal_dir: dir.path().join("wal"),
        wal_engine: WalEngine::Sync,
        tick: Duration::from_millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        io_timeout: Duration::from_secs(5),
        log_retain_entries: retain,
        log_retain_bytes: 1 << 20,
        rebuild_rate_bytes_per_s: 0,
        snapshot_chunk_bytes: 1 << 20,
        write_back: true,
    };
    let node = ReplicationNode::start(config).await.unwrap();
    TestNode { node, machine: Arc::new(KvMachine::default()), _dir: dir }
}

fn connect(nodes: &[&TestNode]) {
    for a in nodes {
        for b in nodes {
            if a.node.node_id() != b.node.node_id() {
                a.node.add_peer(b.node.node_id().0, b.node.peer_listen()).unwrap();
            }
        }
    }
}

async fn open(n: &TestNode, voters: Vec<u64>) {
    let store =
        MachineStore { machine: n.machine.clone(), rebuild_path: n._dir.path().join("catalog.rebuild") };
    n.node.open_machine_group(GROUP, voters, store).await.unwrap();
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes through whichever node leads, retrying through elections.
async fn propose(nodes: &[&TestNode], command: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in nodes {
            let c = vec![Command::App { data: Bytes::from(command.to_string()) }];
            match n.node.local_write(GROUP, c).await {
                Ok(()) => return,
                Err(NodeError::NotLeader { .. } | NodeError::Dropped) => {}
                Err(e) => panic!("proposing {command}: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader took {command}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_and_a_late_member_gets_an_image() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let (a, b, c) = (start(1, 4).await, start(2, 4).await, start(3, 4).await);
    connect(&[&a, &b, &c]);
    for n in [&a, &b, &c] {
        open(n, vec![1, 2, 3]).await;
    }
    let all = [&a, &b, &c];
    for i in 0..40 {
        propose(&all, &format!("k{}={i}", i % 7)).await;
        propose(&all, &format!("first{}?={i}", i % 5)).await;
    }
    propose(&all, "-k0").await;
    let leader_state = || {
        let l = all.iter().find(|n| n.node.status(GROUP).is_some_and(|s| s.is_leader)).unwrap();
        l.machine.snapshot()
    };
    let expected = leader_state();
    assert_eq!(expected.1.get("first3").map(String::as_str), Some("3"), "?= must keep the first value");
    assert_eq!(expected.1.get("k6").map(String::as_str), Some("34"));
    assert!(!expected.1.contains_key("k0"));
    wait_for("every replica to apply everything", || {
        all.iter().all(|n| n.machine.snapshot().1 == expected.1)
    })
    .await;

    // Checkpoints run every 5 s; after one, the log keeps 4 entries, so a new member can only
    // catch up from an image.
    wait_for("the leader's log to be compacted", || {
        all.iter().all(|n| n.node.status(GROUP).is_some_and(|s| s.first_index > 10))
    })
    .await;
    let d = start(4, 4).await;
    connect(&[&a, &b, &c, &d]);
    open(&d, vec![1, 2, 3]).await;
    let leader = all.iter().find(|n| n.node.status(GROUP).is_some_and(|s| s.is_leader)).unwrap();
    leader.node.change_membership(GROUP, MembershipChange::AddLearner(4)).await.unwrap();
    propose(&all, "after=image").await;
    let expected = leader_state();
    wait_for("the new member to hold the same state", || d.machine.snapshot().1 == expected.1).await;
    assert_eq!(*d.machine.installs.lock().unwrap(), 1, "the new member must have installed one image");
    // And it follows the log from there, exactly once per entry.
    propose(&all, "first0?=late").await;
    propose(&all, "last=1").await;
    let expected = leader_state();
    assert_eq!(expected.1.get("first0").map(String::as_str), Some("0"));
    wait_for("the new member to follow the log", || d.machine.snapshot().1 == expected.1).await;
    for n in [&a, &b, &c, &d] {
        n.node.shutdown().await;
    }
}

/// Bytes of the WAL's segments (`*.wal`; the few deleted segment files it keeps for reuse,
/// `*.free`, are a bounded pool and not part of the log).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// A group that goes quiet must not keep the WAL from shrinking while another group writes:
/// its last entries would sit in the oldest segment and pin every segment after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_does_not_pin_the_wal() {
    let n = start(1, 4).await;
    let store = |name: &str, m: &Arc<KvMachine>| MachineStore {
        machine: m.clone(),
        rebuild_path: n._dir.path().join(format!("{name}.rebuild")),
    };
    let (busy, quiet) = (GroupId(4), GroupId(6));
    let quiet_machine = Arc::new(KvMachine::default());
    n.node.open_machine_group(busy, vec![1], store("busy", &n.machine)).await.unwrap();
    n.node.open_machine_group(quiet, vec![1], store("quiet", &quiet_machine)).await.unwrap();
    let write = |group: GroupId, command: String| {
        let node = n.node.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match node.local_write(group, vec![Command::App { data: Bytes::from(command.clone()) }]).await
                {
                    Ok(()) => return,
                    Err(NodeError::NotLeader { .. } | NodeError::Dropped) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("write to {group}: {e}"),
                }
            }
        }
    };
    for i in 0..3 {
        write(quiet, format!("q{i}=x")).await;
    }
    let big = "v".repeat(1 << 20);
    for i in 0..320 {
        write(busy, format!("k{}={big}", i % 8)).await;
    }
    let wal = n._dir.path().join("wal");
    let peak = dir_bytes(&wal);
    assert!(peak > 256 << 20, "the busy group should have written several segments ({peak} bytes)");
    // Two checkpoint intervals: the quiet group is seen idle and gives up its entries; the
    // busy one keeps writing, so syncs run and old segments can go.
    let until = Instant::now() + Duration::from_secs(12);
    let mut i = 0;
    while Instant::now() < until {
        write(busy, format!("k{}=small", i % 8)).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = dir_bytes(&wal);
    assert!(
        after < 160 << 20,
        "the WAL kept {after} bytes (peak {peak}): segments older than the quiet group's last entries were not deleted"
    );
    assert_eq!(quiet_machine.snapshot().1.len(), 3);
    n.node.shutdown().await;
}
