//! Fault tests of a three-node cluster (issue 2/3): real `raftblkd` processes
//! (50 ms Raft tick, fault injection on), one volume with `--replicas 2`, and
//! real clients (fio with crc32c verify, qemu-io, nbdcopy). Each test prints
//! what it measured; the cluster tests of one binary run one at a time (see
//! `raftblk_tests::Cluster`).
//!
//! - leader `kill -9` during fio through a follower: no I/O or verify error, I/O pause < 2 s
//! - the same twice in a row, each killed node restarted and caught up before the next kill
//! - follower `kill -9` during fio through the leader; restart; it catches up, copies identical
//! - acknowledged writes survive `kill -9` of every node
//! - leader partitioned: new leader, no stale read or successful write on the old one, rejoin
//! - follower WAL tail damaged (flipped bytes / cut mid-record): it truncates and catches up
//! - follower data file deleted: rebuilt by replaying the log, identical to the others

use std::path::Path;
use std::time::{Duration, Instant};

use raftblk_tests::pattern::{
    assert_image_holds, assert_patterns_read, pat, read_patterns, sha_of_file, sha_via_nbd, wait_checkpoint,
    write_patterns,
};
use raftblk_tests::{
    longest_completion_gap, parse_fio_json, poll, qemu_io, require_tools, run, Cluster, FioReport, Out,
    RawNbd, MIB,
};

const ALL: [u64; 3] = [1, 2, 3];
const ELECTION_LIMIT: Duration = Duration::from_secs(20);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// The longest I/O pause a leader failover may cause.
const FAILOVER_PAUSE_MAX: Duration = Duration::from_secs(2);

/// Three nodes, one volume `name` of `size` with a copy on each; returns the leader.
fn three_nodes(name: &str, size: &str, extra: &[&str]) -> (Cluster, String, u64) {
    let c = Cluster::start_with(3, extra);
    let uuid = c.create_volume(1, name, size, 2);
    let leader = c.wait_leader(name, &ALL, ELECTION_LIMIT);
    (c, uuid, leader)
}

fn others(of: u64) -> Vec<u64> {
    ALL.iter().copied().filter(|&i| i != of).collect()
}

/// Waits until the leader's commit index has grown by `by` (fio is really writing).
fn wait_commit_growth(c: &Cluster, name: &str, leader: u64, by: u64) -> u64 {
    let start = c.repl(leader, name).commit_index;
    poll(&format!("{by} commits on leader {leader}"), Duration::from_secs(30), || {
        let r = c.try_repl(leader, name)?;
        if r.commit_index >= start + by {
            Ok(r.commit_index)
        } else {
            Err(format!("{r:?} (started at {start})"))
        }
    })
}

/// Waits until every node in `nodes` has applied everything the leader committed.
fn wait_all_applied(c: &Cluster, name: &str, leader: u64, nodes: &[u64]) -> u64 {
    let commit = c.settled_commit(name, leader);
    for &id in nodes {
        c.wait_applied(name, id, commit, CATCH_UP_LIMIT);
    }
    commit
}

struct FioRun {
    out: Out,
    report: FioReport,
    lat_log: String,
}

/// Starts fio (randwrite 4k, iodepth 8, crc32c verify of every block as it goes)
/// against `uri` for `secs` seconds in a thread.
fn spawn_fio(
    uri: String,
    size: u64,
    secs: u32,
    scratch: &Path,
    tag: &str,
) -> std::thread::JoinHandle<FioRun> {
    let json = scratch.join(format!("fio-{tag}.json"));
    let lat_prefix = scratch.join(format!("fio-{tag}"));
    let tag = tag.to_string();
    std::thread::spawn(move || {
        let args: Vec<String> = vec![
            format!("--name={tag}"),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=8".into(),
            format!("--size={size}"),
            "--time_based".into(),
            format!("--runtime={secs}"),
            // time_based leaves no time for a final read phase: verify as it goes
            "--verify=crc32c".into(),
            "--verify_backlog=64".into(),
            "--verify_fatal=1".into(),
            "--verify_state_save=0".into(),
            format!("--write_lat_log={}", lat_prefix.display()),
            "--log_avg_msec=0".into(),
            "--output-format=json".into(),
            format!("--output={}", json.display()),
        ];
        let out = run("fio", &args);
        let text = std::fs::read_to_string(&json).unwrap_or_default();
        let report = parse_fio_json(&text).unwrap_or_else(|e| panic!("{e}\n{out}"));
        let lat_log =
            std::fs::read_to_string(format!("{}_clat.1.log", lat_prefix.display())).unwrap_or_default();
        FioRun { out, report, lat_log }
    })
}

fn assert_fio_clean(run: &FioRun) {
    assert!(run.out.success(), "fio failed: {}", run.out);
    assert_eq!(run.report.error, 0, "fio reported an error: {:?}\n{}", run.report, run.out);
    let said = format!("{}{}", run.out.stdout, run.out.stderr).to_lowercase();
    for needle in ["verify failed", "bad magic", "io_u error", "verify: "] {
        assert!(!said.contains(needle), "fio complained ({needle}): {}", run.out);
    }
    assert!(
        run.report.write_ios > 0 && run.report.read_ios > 0,
        "fio wrote or verified nothing: {:?}",
        run.report
    );
}

// ---------------------------------------------------------------------------

#[test]
fn a_kill9_leader_during_fio_through_a_follower() {
    if !require_tools("kill9 leader", &["fio"]) {
        return;
    }
    let name = "fa";
    let (mut c, _uuid, leader) = three_nodes(name, "64M", &[]);
    let via = others(leader)[0];
    let fio_start = Instant::now();
    let fio = spawn_fio(c.nbd_uri(via, name), 64 * MIB, 6, c.scratch(), "failover");
    wait_commit_growth(&c, name, leader, 200);
    let killed_at = fio_start.elapsed();
    let t = Instant::now();
    c.kill9(leader);
    let survivors = others(leader);
    let new_leader = c.wait_leader(name, &survivors, ELECTION_LIMIT);
    let election = t.elapsed();
    let run = fio.join().expect("fio thread");
    let (gap, gap_at) = longest_completion_gap(&run.lat_log);
    let completions = run.lat_log.lines().count();
    let after_gap = run
        .lat_log
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse::<u64>().ok())
        .filter(|&ms| ms > gap_at + gap.as_millis() as u64)
        .count();
    println!(
        "MEASURED leader failover under fio: leader {leader} killed {killed_at:?} after fio start (fio through node {via}); \
         node {new_leader} seen as leader by both survivors {election:?} after the kill; longest I/O pause \
         (no completion at all) {gap:?} starting at +{gap_at} ms; max write clat {:?}, max verify-read clat {:?}; \
         {} writes, {} verify reads, {completions} completions logged, {after_gap} after the pause",
        run.report.write_clat_max, run.report.read_clat_max, run.report.write_ios, run.report.read_ios
    );
    assert_fio_clean(&run);
    assert_ne!(new_leader, leader);
    assert!(after_gap > 50, "fio barely progressed after the failover pause ({after_gap} completions)");
    assert!(
        gap < FAILOVER_PAUSE_MAX && run.report.write_clat_max < FAILOVER_PAUSE_MAX,
        "failover paused I/O for {gap:?} (max write clat {:?}); the bound is {FAILOVER_PAUSE_MAX:?}",
        run.report.write_clat_max
    );
}

/// The short version of `tests/failover-cycles.sh` (100 cycles on release binaries): the
/// leader is killed, a new one elected, the killed node restarted and caught up, twice in
/// a row under one fio run through a node that is never killed.
#[test]
fn a2_kill9_leader_twice_in_a_row_with_restarts() {
    if !require_tools("kill9 leader cycles", &["fio"]) {
        return;
    }
    const CYCLES: usize = 2;
    let name = "fc";
    let (mut c, _uuid, first) = three_nodes(name, "64M", &[]);
    let via = others(first)[0];
    let fio = spawn_fio(c.nbd_uri(via, name), 64 * MIB, 45, c.scratch(), "cycles");
    wait_commit_growth(&c, name, first, 100);
    let mut killed = Vec::new();
    for cycle in 0..CYCLES {
        let mut leader = c.wait_leader(name, &ALL, ELECTION_LIMIT);
        if leader == via {
            let to = others(via)[0];
            c.cli(via, &["volume", "transfer-leader", name, &to.to_string()]).ok();
            leader = c.wait_leader(name, &[to], ELECTION_LIMIT);
        }
        let t = Instant::now();
        c.kill9(leader);
        let new_leader = c.wait_leader(name, &others(leader), ELECTION_LIMIT);
        let election = t.elapsed();
        c.restart(leader);
        let commit = c.repl(new_leader, name).commit_index;
        c.wait_applied(name, leader, commit, CATCH_UP_LIMIT);
        println!("cycle {cycle}: killed leader {leader}, node {new_leader} leads after {election:?}, node {leader} caught up to {commit}");
        killed.push(leader);
    }
    let run = fio.join().expect("fio thread");
    println!(
        "MEASURED {CYCLES} leader kills with restarts under one fio run through node {via} (killed {killed:?}): \
         max write clat {:?}, max verify-read clat {:?}, {} writes, {} verify reads",
        run.report.write_clat_max, run.report.read_clat_max, run.report.write_ios, run.report.read_ios
    );
    assert_fio_clean(&run);
    assert!(
        run.report.write_clat_max < FAILOVER_PAUSE_MAX,
        "a write took {:?} across the failovers; the bound is {FAILOVER_PAUSE_MAX:?}",
        run.report.write_clat_max
    );
}

#[test]
fn b_kill9_follower_during_fio_then_restart_catches_up() {
    if !require_tools("kill9 follower", &["fio", "qemu-io", "nbdcopy"]) {
        return;
    }
    let name = "fb";
    let (mut c, uuid, leader) = three_nodes(name, "64M", &[]);
    let rest = others(leader);
    let (follower, other) = (rest[1], rest[0]);
    let fio = spawn_fio(c.nbd_uri(leader, name), 64 * MIB, 5, c.scratch(), "follower");
    let at_kill = wait_commit_growth(&c, name, leader, 300);
    c.kill9(follower);
    let run = fio.join().expect("fio thread");
    let (gap, _) = longest_completion_gap(&run.lat_log);
    let commit_after_fio = c.settled_commit(name, leader);
    // written while the follower is down, read back through it after its restart
    let late = [pat(0x5b, 60 * MIB, MIB), pat(0x5c, 4096, 4096)];
    write_patterns(&c.nbd_uri(other, name), &late);
    let commit = c.settled_commit(name, leader);
    println!(
        "MEASURED follower {follower} killed at commit index {at_kill}; fio through leader {leader} went on to \
         commit {commit_after_fio} ({} writes, {} verify reads, longest pause {gap:?}, max write clat {:?})",
        run.report.write_ios, run.report.read_ios, run.report.write_clat_max
    );
    assert_fio_clean(&run);
    assert!(commit_after_fio > at_kill + 100, "writes stalled with one follower down");

    let t = Instant::now();
    c.restart(follower);
    let r = c.wait_applied(name, follower, commit, CATCH_UP_LIMIT);
    println!(
        "MEASURED restarted follower {follower} applied {} (leader commit {commit}) {:?} after restart; \
         {} entries behind at restart",
        r.applied_index,
        t.elapsed(),
        commit - at_kill
    );
    wait_all_applied(&c, name, leader, &ALL);

    assert_patterns_read(&c.nbd_uri(follower, name), &late);
    let images: Vec<String> = ALL.iter().map(|&id| sha_of_file(&c.node(id).image_path(&uuid))).collect();
    let via_nbd: Vec<String> =
        [leader, follower].iter().map(|&id| sha_via_nbd(&c.nbd_uri(id, name))).collect();
    println!("sha256 of the copies on nodes {ALL:?}: {images:?}; of the volume read via nodes {leader},{follower}: {via_nbd:?}");
    assert!(images.iter().all(|s| *s == images[0]), "the copies differ: {images:?}");
    assert_eq!(via_nbd[0], via_nbd[1], "the volume reads differently through leader and follower");
    assert_eq!(via_nbd[0], images[0], "the volume read over NBD differs from the copies");
    assert_image_holds(&c.node(follower).image_path(&uuid), &late);
}

#[test]
fn c_acknowledged_writes_survive_kill9_of_every_node() {
    if !require_tools("kill9 all", &["qemu-io"]) {
        return;
    }
    let name = "fc";
    let (mut c, uuid, leader) = three_nodes(name, "64M", &[]);
    let pats = [
        pat(0x11, 0, 64 * 1024),
        pat(0x22, MIB, 4096),
        pat(0x33, 7 * MIB + 512, 1536),
        pat(0x44, 20 * MIB, MIB),
        pat(0x55, 64 * MIB - 4096, 4096),
    ];
    // each pattern through a different node, so forwarded writes are covered too
    for (i, p) in pats.iter().enumerate() {
        write_patterns(&c.nbd_uri(ALL[i % 3], name), std::slice::from_ref(p));
    }
    let commit = c.settled_commit(name, leader);
    for id in ALL {
        c.kill9(id);
    }
    let t = Instant::now();
    for id in ALL {
        c.restart(id);
    }
    let new_leader = c.wait_leader(name, &ALL, ELECTION_LIMIT);
    let elected = t.elapsed();
    let applied: Vec<u64> =
        ALL.iter().map(|&id| c.wait_applied(name, id, commit, CATCH_UP_LIMIT).applied_index).collect();
    println!(
        "MEASURED all nodes killed at commit index {commit} (leader {leader}); after restarting all, node \
         {new_leader} leads after {elapsed:?} and the nodes applied {applied:?}",
        elapsed = elected
    );
    let zero = [pat(0, 30 * MIB, MIB)];
    for id in ALL {
        let uri = c.nbd_uri(id, name);
        assert_patterns_read(&uri, &pats);
        assert_patterns_read(&uri, &zero);
    }
    // the check can fail
    assert!(
        !read_patterns(&c.nbd_uri(1, name), &[pat(0x12, 0, 4096)]).success(),
        "a wrong pattern read as good"
    );
    // and the restarted cluster takes writes again, through a follower
    let follower = others(new_leader)[0];
    let again = [pat(0x66, 2 * MIB, 8192)];
    write_patterns(&c.nbd_uri(follower, name), &again);
    assert_patterns_read(&c.nbd_uri(new_leader, name), &again);
    wait_all_applied(&c, name, new_leader, &ALL);
    for id in ALL {
        assert_image_holds(&c.node(id).image_path(&uuid), &pats);
    }
}

#[test]
fn d_partitioned_leader_serves_no_stale_data_and_rejoins() {
    if !require_tools("partition", &["qemu-io"]) {
        return;
    }
    let name = "fd";
    // a short I/O timeout, so requests the old leader cannot serve fail quickly
    let (c, uuid, old) = three_nodes(name, "64M", &["--io-timeout-ms", "3000"]);
    let majority = others(old);
    let old_data = pat(0xa1, 0, 64 * 1024);
    let new_data = pat(0xb2, 0, 64 * 1024);
    write_patterns(&c.nbd_uri(old, name), &[old_data]);
    wait_all_applied(&c, name, old, &ALL);
    // connected before the cut, as a client already using the old leader would be
    let mut stale_client = RawNbd::connect(c.node(old).nbd_addr, name).expect("connect to the old leader");

    let t = Instant::now();
    c.partition(old, &majority);
    for &m in &majority {
        c.partition(m, &[old]);
    }
    let new = c.wait_leader(name, &majority, ELECTION_LIMIT);
    let elected = t.elapsed();
    assert_ne!(new, old);
    let follower = majority.iter().copied().find(|&m| m != new).expect("a second majority node");
    write_patterns(&c.nbd_uri(follower, name), &[new_data]);
    assert_patterns_read(&c.nbd_uri(new, name), &[new_data]);
    assert_patterns_read(&c.nbd_uri(follower, name), &[new_data]);

    // the old leader must neither return the old data nor take a write
    stale_client.set_read_timeout(Duration::from_secs(20));
    let t_read = Instant::now();
    let read = stale_client.read(0, 64 * 1024);
    let read_took = t_read.elapsed();
    let read_outcome = match &read {
        Ok(r) if r.error != 0 => format!("NBD error {}", r.error),
        Ok(r) if r.data.iter().all(|&b| b == new_data.byte) => "the new data".to_string(),
        Ok(r) if r.data.iter().all(|&b| b == old_data.byte) => "STALE (old) data".to_string(),
        Ok(r) => format!("unexpected bytes starting {:02x?}", &r.data[..16]),
        Err(e) => format!("connection error {e}"),
    };
    let t_write = Instant::now();
    let write = stale_client.write(0, &[0xee; 4096]);
    let write_took = t_write.elapsed();
    let write_outcome = match &write {
        Ok(r) if r.error != 0 => format!("NBD error {}", r.error),
        Ok(_) => "SUCCESS".to_string(),
        Err(e) => format!("connection error {e}"),
    };
    let fresh = qemu_io(&c.nbd_uri(old, name), &[&old_data.read()]);
    println!(
        "MEASURED partition: leader {old} cut off; node {new} elected by the majority {elected:?} after the cut; \
         on the old leader: read -> {read_outcome} after {read_took:?}, write -> {write_outcome} after {write_took:?}, \
         a new qemu-io connection reading the old pattern exited {}",
        fresh.code()
    );
    match &read {
        Ok(r) => assert!(
            r.error != 0 || r.data.iter().all(|&b| b == new_data.byte),
            "the partitioned old leader answered a read with {read_outcome}"
        ),
        Err(e) => assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the old leader did not answer a read within 20 s (I/O timeout 3 s)"
        ),
    }
    assert!(!matches!(&write, Ok(r) if r.error == 0), "the partitioned old leader acknowledged a write");
    assert!(!fresh.success(), "the partitioned old leader served the old data to a new client: {fresh}");

    let t = Instant::now();
    c.heal(old);
    for &m in &majority {
        c.heal(m);
    }
    let leader = c.wait_leader(name, &ALL, ELECTION_LIMIT);
    assert_ne!(leader, old, "the old leader, with a stale log, led again");
    let commit = wait_all_applied(&c, name, leader, &ALL);
    println!(
        "MEASURED heal: node {old} follows node {leader} and applied up to {commit} within {:?}",
        t.elapsed()
    );
    assert_patterns_read(&c.nbd_uri(old, name), &[new_data]);
    assert_image_holds(&c.node(old).image_path(&uuid), &[new_data]);
    let after = [pat(0xc3, MIB, 4096)];
    write_patterns(&c.nbd_uri(old, name), &after);
    assert_patterns_read(&c.nbd_uri(leader, name), &after);
}

// ---------------------------------------------------------------------------
// WAL damage

/// One WAL record's place: `[len u32][crc u32][group u64][kind u8][payload]` after a 24-byte segment header.
#[derive(Debug)]
struct WalRecord {
    offset: u64,
    bytes: u64,
    kind: u8,
}

const WAL_SEGMENT_HEADER: usize = 24;
const WAL_RECORD_HEADER: usize = 17;

fn wal_records(data: &[u8]) -> Vec<WalRecord> {
    let mut out = Vec::new();
    let mut p = WAL_SEGMENT_HEADER;
    while p + WAL_RECORD_HEADER <= data.len() {
        let len = u32::from_le_bytes(data[p..p + 4].try_into().expect("4 bytes")) as usize;
        let bytes = WAL_RECORD_HEADER + len;
        // Kind 0 is no record: the zero padding after the last one.
        if p + bytes > data.len() || data[p + 16] == 0 {
            break;
        }
        out.push(WalRecord { offset: p as u64, bytes: bytes as u64, kind: data[p + 16] });
        p += bytes;
    }
    out
}

fn newest_segment(wal_dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(wal_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", wal_dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs.pop().unwrap_or_else(|| panic!("no .wal segment in {}", wal_dir.display()))
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flip bytes in the last 100 bytes of the newest segment's records.
    FlipTail,
    /// Cut the newest segment in the middle of its last log entry.
    TruncateMidRecord,
}

/// Damages the newest segment; returns a description of what was done.
fn damage_wal(wal_dir: &Path, how: Damage) -> String {
    let seg = newest_segment(wal_dir);
    let mut data = std::fs::read(&seg).expect("read segment");
    let records = wal_records(&data);
    assert!(records.len() > 10, "only {} records in {}", records.len(), seg.display());
    // Where the records end: a segment left by a killed node may be longer (the zero padding
    // of a direct write), and damage there would hit nothing.
    let len = records.last().map_or(data.len(), |r| (r.offset + r.bytes) as usize);
    let desc = match how {
        Damage::FlipTail => {
            let mut flipped = 0;
            for i in (len - 100..len).step_by(7) {
                data[i] ^= 0xff;
                flipped += 1;
            }
            std::fs::write(&seg, &data).expect("write segment");
            let hit = records.iter().filter(|r| r.offset + r.bytes > (len - 100) as u64).count();
            format!(
                "flipped {flipped} bytes in the last 100 of {} ({len} bytes), hitting {hit} record(s)",
                seg.display()
            )
        }
        Damage::TruncateMidRecord => {
            let (idx, last_entry) =
                records.iter().enumerate().rev().find(|(_, r)| r.kind == 1).expect("an entry record");
            let cut = last_entry.offset + last_entry.bytes / 2;
            let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open segment");
            f.set_len(cut).expect("truncate segment");
            format!(
                "cut {} from {len} to {cut} bytes, in the middle of entry record {idx} (offset {}, {} bytes), \
                 dropping {} later record(s)",
                seg.display(),
                last_entry.offset,
                last_entry.bytes,
                records.len() - idx - 1
            )
        }
    };
    format!("{desc} ({} records before)", records.len())
}

fn damaged_follower_wal_recovers(how: Damage) {
    let name = "fe";
    let (mut c, uuid, leader) = three_nodes(name, "64M", &[]);
    let follower = others(leader)[1];
    let mut pats = vec![pat(0x41, 0, MIB), pat(0x42, 8 * MIB, 256 * 1024)];
    pats.extend((0..24).map(|i| pat(0x43 + (i % 8) as u8, 16 * MIB + i * 4096, 4096)));
    write_patterns(&c.nbd_uri(leader, name), &pats);
    let commit = wait_all_applied(&c, name, leader, &ALL);
    // the follower's copy is known to hold everything (also what the damage cuts from its log)
    wait_checkpoint(&c, follower, &uuid, commit);
    let before = c.repl(follower, name);
    c.kill9(follower);
    let what = damage_wal(&c.node(follower).wal_dir(), how);
    // newer data while it is down
    let newer = [pat(0x51, 0, 64 * 1024), pat(0x52, 32 * MIB, MIB), pat(0x53, 16 * MIB, 4096)];
    write_patterns(&c.nbd_uri(leader, name), &newer);
    let commit = c.settled_commit(name, leader);

    let log_start = c.node(follower).log().len();
    let t = Instant::now();
    c.restart(follower);
    let r = c.wait_applied(name, follower, commit, CATCH_UP_LIMIT);
    let took = t.elapsed();
    let log = c.node(follower).log();
    let new_log = log.get(log_start..).unwrap_or_default();
    let cut_lines: Vec<&str> = new_log.lines().filter(|l| l.contains("wal:")).collect();
    println!(
        "MEASURED {how:?}: {what}; follower {follower} had applied {} before; restarted and applied {} \
         (leader commit {commit}) {took:?} later; its WAL recovery said: {cut_lines:?}",
        before.applied_index, r.applied_index
    );
    assert!(
        new_log.contains("cut torn tail") || new_log.contains("damaged record"),
        "node {follower} did not report cutting its damaged WAL:\n{new_log}"
    );
    // the latest data: older patterns where not overwritten, then the newer ones
    let latest = [pat(0x41, 64 * 1024, MIB - 64 * 1024), pats[1], newer[0], newer[1], newer[2], pats[3]];
    assert_patterns_read(&c.nbd_uri(follower, name), &latest);
    wait_all_applied(&c, name, leader, &ALL);
    assert_image_holds(&c.node(follower).image_path(&uuid), &latest);
    let shas: Vec<String> = ALL.iter().map(|&id| sha_of_file(&c.node(id).image_path(&uuid))).collect();
    assert!(shas.iter().all(|s| *s == shas[0]), "the copies differ after recovery: {shas:?}");
    // it still works as a replica: the others can lose the leader and go on with it
    let t = Instant::now();
    c.kill9(leader);
    let rest = others(leader);
    let new_leader = c.wait_leader(name, &rest, ELECTION_LIMIT);
    let last = [pat(0x54, 48 * MIB, 8192)];
    write_patterns(&c.nbd_uri(follower, name), &last);
    assert_patterns_read(&c.nbd_uri(follower, name), &latest);
    println!("after that the old leader was killed: node {new_leader} leads with the recovered node, write ok {:?}", t.elapsed());
}

#[test]
fn e1_follower_wal_tail_with_flipped_bytes_is_cut_and_caught_up() {
    if !require_tools("wal flip", &["qemu-io"]) {
        return;
    }
    damaged_follower_wal_recovers(Damage::FlipTail);
}

#[test]
fn e2_follower_wal_truncated_mid_record_is_cut_and_caught_up() {
    if !require_tools("wal truncate", &["qemu-io"]) {
        return;
    }
    damaged_follower_wal_recovers(Damage::TruncateMidRecord);
}

#[test]
fn f_lost_data_file_is_rebuilt_from_the_log() {
    if !require_tools("lost copy", &["qemu-io", "nbdcopy"]) {
        return;
    }
    let name = "ff";
    let (mut c, uuid, leader) = three_nodes(name, "64M", &[]);
    let follower = others(leader)[1];
    let mut pats = vec![pat(0x61, 0, 2 * MIB), pat(0x62, 10 * MIB, 64 * 1024), pat(0x63, 63 * MIB, MIB)];
    pats.extend((0..16).map(|i| pat(0x70 + i as u8, 30 * MIB + i * 8192, 4096)));
    write_patterns(&c.nbd_uri(leader, name), &pats);
    let commit = wait_all_applied(&c, name, leader, &ALL);
    // the kept .applied says "everything up to here is in the copy": a restart that
    // trusted it would skip the replay the lost copy needs
    let checkpoint = wait_checkpoint(&c, follower, &uuid, commit);
    let before = c.repl(follower, name);
    c.kill9(follower);
    let node = c.node(follower);
    let (image, applied) = (node.image_path(&uuid), node.applied_path(&uuid));
    std::fs::remove_file(&image).expect("remove the data file");
    assert!(applied.exists(), "{} should be left in place", applied.display());
    let newer = [pat(0x64, 40 * MIB, 64 * 1024)];
    write_patterns(&c.nbd_uri(leader, name), &newer);
    pats.extend(newer);
    let commit = c.settled_commit(name, leader);

    let t = Instant::now();
    c.restart(follower);
    let r = c.wait_applied(name, follower, commit, CATCH_UP_LIMIT);
    let took = t.elapsed();
    let written: u64 = pats.iter().map(|p| p.len).sum();
    let leader_r = c.repl(leader, name);
    println!(
        "MEASURED lost copy: follower {follower} (applied {}, checkpoint {checkpoint}, {} bytes allocated before) \
         restarted without {}; {took:?} later it applied {} (leader commit {commit}) with {} bytes allocated (leader: {}; \
         patterns cover {written} bytes)",
        before.applied_index,
        before.allocated_bytes,
        image.display(),
        r.applied_index,
        r.allocated_bytes,
        leader_r.allocated_bytes
    );
    assert!(image.exists(), "the data file was not recreated");
    assert!(
        r.allocated_bytes >= written,
        "the rebuilt copy allocates {} bytes < {written}",
        r.allocated_bytes
    );
    assert_image_holds(&image, &pats);
    assert_patterns_read(&c.nbd_uri(follower, name), &pats);
    wait_all_applied(&c, name, leader, &ALL);
    let images: Vec<String> = ALL.iter().map(|&id| sha_of_file(&c.node(id).image_path(&uuid))).collect();
    let via_nbd: Vec<String> = ALL.iter().map(|&id| sha_via_nbd(&c.nbd_uri(id, name))).collect();
    println!(
        "sha256 of the copies on nodes {ALL:?}: {images:?}; of the volume read through each: {via_nbd:?}"
    );
    assert!(images.iter().all(|s| *s == images[0]), "the rebuilt copy differs: {images:?}");
    assert!(
        via_nbd.iter().all(|s| *s == images[0]),
        "the volume reads differently through some node: {via_nbd:?}"
    );
}

#[test]
fn g_leader_moves_to_the_node_its_client_uses() {
    if !require_tools("leader follows client", &["qemu-io"]) {
        return;
    }
    let name = "fg";
    let (c, _uuid, leader) = three_nodes(name, "64M", &["--leader-follows-client", "true"]);
    let via = others(leader)[0];
    // A client that stays connected (qemu-io sleeps 6 s between its commands).
    let uri = c.nbd_uri(via, name);
    let client = std::thread::spawn(move || {
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "sleep 6000", "-c", "write -P 0x33 0 64k", &uri])
            .output()
            .expect("qemu-io runs")
    });
    let t = Instant::now();
    let moved = c.wait_leader(name, &[via], Duration::from_secs(15));
    println!("MEASURED leader moved from node {leader} to the client's node {via} after {:?}", t.elapsed());
    assert_eq!(moved, via);
    let out = client.join().expect("qemu-io thread");
    assert!(out.status.success(), "qemu-io failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A single-copy volume acknowledges a write before the WAL is synced (write-back, durable at
/// the next FLUSH: see `GroupConfig::write_back`), so what it acknowledged must still be in the
/// kernel when the daemon is killed: writes never flushed survive kill -9 of its node.
#[test]
fn h_single_copy_writes_never_flushed_survive_kill9() {
    if !require_tools("single copy kill9", &["qemu-io"]) {
        return;
    }
    let name = "wb";
    let mut c = Cluster::start(3);
    c.create_volume(1, name, "16M", 0);
    // The one copy's node is the only one that names a leader: itself.
    let holder = poll("the single copy's node to lead", ELECTION_LIMIT, || {
        ALL.iter()
            .copied()
            .find(|&id| c.try_repl(id, name).is_ok_and(|r| r.leader == id))
            .ok_or_else(|| "no node leads yet".to_string())
    });
    let pats = [pat(0x71, 0, 4096), pat(0x72, 5 * MIB, 64 * 1024), pat(0x73, 9 * MIB + 4096, 4096)];
    let mut nbd = RawNbd::connect(c.node(holder).nbd_addr, name).expect("NBD connect");
    for p in &pats {
        let reply = nbd.write(p.off, &vec![p.byte; p.len as usize]).expect("NBD write");
        assert_eq!(reply.error, 0, "write of {p:?} failed");
    }
    c.kill9(holder);
    drop(nbd);
    c.restart(holder);
    c.wait_leader(name, &[holder], ELECTION_LIMIT);
    assert_patterns_read(&c.nbd_uri(holder, name), &pats);
    assert!(
        !read_patterns(&c.nbd_uri(holder, name), &[pat(0x70, 0, 4096)]).success(),
        "a wrong pattern read as good"
    );
    // A FLUSH through another node reaches the copy's node and is answered.
    let via = others(holder)[0];
    let mut nbd = RawNbd::connect(c.node(via).nbd_addr, name).expect("NBD connect");
    assert_eq!(nbd.write(MIB, &[0x74; 4096]).expect("NBD write").error, 0);
    let flushed = nbd.request(raftblk_tests::wire::CMD_FLUSH, 0, 0, 0, &[]).expect("NBD flush");
    assert_eq!(flushed.error, 0, "FLUSH failed");
}
