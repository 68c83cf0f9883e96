//! Snapshots and log compaction (issue 2/3, item 5), with real `raftblkd` processes.
//! Every node keeps only the last 8 log entries below its checkpoint, so a copy that was
//! away, or a new one, cannot catch up from the log and must get a snapshot: the allocated
//! extents of the volume, pulled in checksummed chunks from a peer, then the log after it.
//!
//! - a follower that fell behind the compacted log is rebuilt: data, holes (a trim done
//!   while it was away) and sparseness all match the leader
//! - a rebuild killed half-way resumes where its marker says, rate-limited, while client
//!   writes keep being served
//! - a new copy added after compaction is filled by a snapshot before it is promoted

use std::path::PathBuf;
use std::time::{Duration, Instant};

use raftblk_tests::pattern::{
    assert_image_holds, assert_patterns_read, pat, sha_of_file, write_patterns, Pat,
};
use raftblk_tests::{http_get, poll, qemu_io, require_tools, Cluster, MIB};

const ALL: [u64; 3] = [1, 2, 3];
const LIMIT: Duration = Duration::from_secs(90);
const RETAIN: [&str; 4] = ["--log-retain-entries", "8", "--log-retain-mib", "1"];

fn rebuild_marker(c: &Cluster, id: u64, uuid: &str) -> PathBuf {
    c.node(id).image_path(uuid).with_extension("rebuild")
}

/// Many small writes, one log entry each: compaction has something to drop, and past
/// raft-rs's 256 messages in flight to a peer the leader stops sending to a dead one, so
/// what the transport queued for it does not cover the log.
fn small_writes(byte: u8, base: u64, n: u64) -> Vec<Pat> {
    (0..n).map(|i| pat(byte.wrapping_add(i as u8), base + i * (64 * 1024 + 4096), 4096)).collect()
}

/// More single-entry writes than raft-rs keeps in flight to one peer.
const PAST_INFLIGHT: u64 = 300;

/// Waits until the leader's log starts after `index` (it compacted past it).
fn wait_compacted_past(c: &Cluster, name: &str, leader: u64, index: u64) -> u64 {
    poll(&format!("node {leader} to compact {name:?} past {index}"), Duration::from_secs(40), || {
        let r = c.try_repl(leader, name)?;
        if r.log_first_index > index + 1 {
            Ok(r.log_first_index)
        } else {
            Err(format!("{r:?}"))
        }
    })
}

/// The log with its terminal colour codes removed.
fn without_colors(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn assert_same_copies(c: &Cluster, uuid: &str, nodes: &[u64]) {
    let digests: Vec<String> = nodes.iter().map(|&id| sha_of_file(&c.node(id).image_path(uuid))).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "copies on {nodes:?} differ: {digests:?}");
}

fn wait_all_applied(c: &Cluster, name: &str, leader: u64, nodes: &[u64]) -> u64 {
    let commit = c.settled_commit(name, leader);
    for &id in nodes {
        c.wait_applied(name, id, commit, LIMIT);
    }
    commit
}

#[test]
fn a_follower_behind_the_compacted_log_is_rebuilt_from_a_snapshot() {
    if !require_tools("snapshot rebuild", &["qemu-io"]) {
        return;
    }
    let name = "sa";
    let mut c = Cluster::start_with(3, &RETAIN);
    let uuid = c.create_volume(1, name, "256M", 2);
    let leader = c.wait_leader(name, &ALL, LIMIT);
    let follower = *ALL.iter().find(|&&id| id != leader).expect("a follower");
    let doomed = pat(0x11, 100 * MIB, 4 * MIB);
    write_patterns(&c.nbd_uri(leader, name), &[doomed]);
    let away_at = wait_all_applied(&c, name, leader, &ALL);
    c.kill9(follower);

    let mut pats = small_writes(0x20, 0, PAST_INFLIGHT);
    pats.push(pat(0x55, 200 * MIB, 16 * MIB));
    write_patterns(&c.nbd_uri(leader, name), &pats);
    // Trimmed while the follower is away: its old bytes there must not survive the rebuild.
    qemu_io(&c.nbd_uri(leader, name), &["discard 100M 4M"]).ok();
    pats.extend(small_writes(0x60, 30 * MIB, 20));
    write_patterns(&c.nbd_uri(leader, name), &pats[pats.len() - 20..]);
    let first = wait_compacted_past(&c, name, leader, away_at);
    let commit = c.settled_commit(name, leader);

    let t = Instant::now();
    c.restart(follower);
    let r = c.wait_applied(name, follower, commit, LIMIT);
    let took = t.elapsed();
    let log = c.node(follower).log();
    if !log.contains("snapshot installed") {
        std::thread::sleep(Duration::from_secs(2));
        panic!("node {follower} caught up without a snapshot: {r:?}\n{}", c.node(follower).log());
    }
    assert!(log.contains("store rebuilt"), "node {follower} never finished a rebuild:\n{log}");
    let leader_r = c.repl(leader, name);
    let written: u64 = pats.iter().map(|p| p.len).sum();
    println!(
        "MEASURED snapshot rebuild: follower {follower} away from index {away_at}, leader log starts at {first}; \
         restarted, applied {} (commit {commit}) after {took:?}; allocated {} bytes (leader {}, written {written})",
        r.applied_index, r.allocated_bytes, leader_r.allocated_bytes
    );
    let image = c.node(follower).image_path(&uuid);
    assert_image_holds(&image, &pats);
    assert_image_holds(&image, &[pat(0, doomed.off, doomed.len)]);
    assert!(!rebuild_marker(&c, follower, &uuid).exists(), "the rebuild marker outlived the rebuild");
    // Only allocated extents travel, so the copy stays as sparse as the leader's.
    assert!(
        r.allocated_bytes >= written && r.allocated_bytes <= leader_r.allocated_bytes + MIB,
        "follower allocates {} bytes, leader {}, written {written}",
        r.allocated_bytes,
        leader_r.allocated_bytes
    );
    assert_patterns_read(&c.nbd_uri(follower, name), &pats);
    wait_all_applied(&c, name, leader, &ALL);
    assert_same_copies(&c, &uuid, &ALL);
}

#[test]
fn b_an_interrupted_rebuild_resumes_at_its_marker_while_clients_write() {
    if !require_tools("resumed rebuild", &["qemu-io"]) {
        return;
    }
    let name = "sb";
    let rate_mib_s = 16u64;
    let mut extra = RETAIN.to_vec();
    let rate = rate_mib_s.to_string();
    extra.extend(["--rebuild-rate-mib-s", &rate]);
    let mut c = Cluster::start_with(3, &extra);
    let uuid = c.create_volume(1, name, "128M", 2);
    let leader = c.wait_leader(name, &ALL, LIMIT);
    let follower = *ALL.iter().find(|&&id| id != leader).expect("a follower");
    c.kill9(follower);
    let mut pats: Vec<Pat> = (0..3).map(|i| pat(0x31 + i as u8, i * 32 * MIB, 32 * MIB)).collect();
    pats.extend(small_writes(0x70, 100 * MIB, PAST_INFLIGHT));
    write_patterns(&c.nbd_uri(leader, name), &pats);
    wait_compacted_past(&c, name, leader, 1);

    c.restart(follower);
    let started = Instant::now();
    // Client writes while the copy runs (at most rate_mib_s MiB/s) are served at once.
    let during = small_writes(0x90, 124 * MIB, 8);
    let t = Instant::now();
    write_patterns(&c.nbd_uri(leader, name), &during);
    let write_took = t.elapsed();
    pats.extend(during);
    let done = poll("the rebuild to pass a third", LIMIT, || {
        let r = c.try_repl(follower, name)?;
        let b = r.rebuilds.first().ok_or_else(|| format!("no rebuild reported: {r:?}"))?;
        let (done, total) = (b["done_bytes"].as_u64().unwrap_or(0), b["total_bytes"].as_u64().unwrap_or(0));
        if total > 0 && done * 3 >= total {
            Ok(done)
        } else {
            Err(format!("{b}"))
        }
    });
    let (_, metrics) = http_get(c.node(follower).api_addr, "/metrics").expect("GET /metrics");
    let remaining = metrics
        .lines()
        .find(|l| l.starts_with(&format!("raftblk_volume_rebuild_remaining_bytes{{volume=\"{name}\"}}")))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(remaining.is_some_and(|r| r > 0), "/metrics does not show the rebuild: {remaining:?}");
    let shown = c.cli(leader, &["volume", "inspect", name]);
    assert!(shown.ok().contains("rebuilding"), "inspect on the leader does not show the rebuild:\n{shown}");
    let first_run = started.elapsed();
    c.kill9(follower);
    let marker = std::fs::read_to_string(rebuild_marker(&c, follower, &uuid)).expect("rebuild marker");
    let offset: u64 = marker.split_whitespace().nth(2).and_then(|w| w.parse().ok()).expect("marker offset");
    assert!(offset > 0, "the marker recorded no progress: {marker:?}");

    let t = Instant::now();
    c.restart(follower);
    let commit = c.settled_commit(name, leader);
    let r = c.wait_applied(name, follower, commit, LIMIT);
    let resumed_took = t.elapsed();
    let log = without_colors(&c.node(follower).log());
    assert!(log.contains(&format!("offset={offset}")), "node {follower} did not resume at {offset}:\n{log}");
    let data: u64 = 96 * MIB;
    let secs = (first_run + resumed_took).as_secs_f64();
    println!(
        "MEASURED resumed rebuild: {done} bytes covered in {first_run:?}, killed, marker at {offset}; \
         resumed and applied {} in {resumed_took:?}; ~{:.1} MiB/s of data against a {rate_mib_s} MiB/s limit; \
         8 client writes during the rebuild took {write_took:?}",
        r.applied_index,
        (data - offset.min(data) + done) as f64 / MIB as f64 / secs
    );
    // The limit holds: copying the data took at least (data / rate) / 2.
    assert!(
        secs >= (data - offset.min(data)) as f64 / MIB as f64 / rate_mib_s as f64 / 2.0,
        "the rebuild ran faster than its rate limit allows ({secs} s)"
    );
    assert_image_holds(&c.node(follower).image_path(&uuid), &pats);
    assert!(!rebuild_marker(&c, follower, &uuid).exists(), "the rebuild marker outlived the rebuild");
    wait_all_applied(&c, name, leader, &ALL);
    assert_same_copies(&c, &uuid, &ALL);
}

#[test]
fn c_a_copy_added_after_compaction_gets_a_snapshot_before_promotion() {
    if !require_tools("new copy by snapshot", &["qemu-io"]) {
        return;
    }
    let name = "sc";
    let c = Cluster::start_with(3, &RETAIN);
    let uuid = c.create_volume(1, name, "64M", 1);
    let v = c.cli_json(1, &["volume", "inspect", name]);
    let voters: Vec<u64> =
        v["voters"].as_array().expect("voters").iter().filter_map(serde_json::Value::as_u64).collect();
    let newcomer = *ALL.iter().find(|id| !voters.contains(id)).expect("a node without a copy");
    let leader = c.wait_leader(name, &voters, LIMIT);
    let mut pats = small_writes(0x40, 0, 24);
    pats.push(pat(0x77, 40 * MIB, 8 * MIB));
    write_patterns(&c.nbd_uri(leader, name), &pats);
    wait_compacted_past(&c, name, leader, 1);

    let t = Instant::now();
    c.cli(newcomer, &["volume", "add-replica", name, &newcomer.to_string()]).ok();
    let took = t.elapsed();
    let log = c.node(newcomer).log();
    assert!(log.contains("snapshot installed"), "node {newcomer} got its copy without a snapshot:\n{log}");
    let mut all = voters.clone();
    all.push(newcomer);
    // The promotion is proposed before add-replica returns; it applies a moment later.
    poll(&format!("node {newcomer} to be promoted to a voter"), LIMIT, || {
        let v = c.try_status(leader, name)?;
        let learners = v["replication"]["learners"].as_array().cloned().unwrap_or_default();
        let progress = v["replication"]["progress"].to_string();
        if !learners.iter().any(|x| x.as_u64() == Some(newcomer))
            && progress.contains(&format!("[{newcomer},"))
        {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    println!("MEASURED new copy on node {newcomer} by snapshot: add-replica returned after {took:?}");
    assert_image_holds(&c.node(newcomer).image_path(&uuid), &pats);
    wait_all_applied(&c, name, leader, &all);
    assert_same_copies(&c, &uuid, &all);
}
