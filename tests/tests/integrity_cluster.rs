//! Block integrity and encryption at rest in a three-node cluster: no plaintext in any
//! copy, WAL, snapshot stream or peer packet; damaged blocks repaired from other copies on
//! read and by scrub; a node without the KEK; a KEK rotation under fio verify.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftblk_tests::{
    files_containing, flip, have_tool, poll, qemu_io, require_tools, run, swap_blocks, Cluster,
};

const MIB: usize = 1 << 20;
const ALL: [u64; 3] = [1, 2, 3];
const LIMIT: Duration = Duration::from_secs(90);
/// Small logs, so that a node that was away needs a snapshot (and its data travels).
const RETAIN: [&str; 4] = ["--log-retain-entries", "8", "--log-retain-mib", "1"];

fn marker(tag: &str, len: usize) -> Vec<u8> {
    format!("raftblk-{tag}-marker-5d1e8b2c-").into_bytes().into_iter().cycle().take(len).collect()
}

fn put(c: &Cluster, node: u64, volume: &str, file: &Path) {
    run("nbdcopy", &[file.to_str().expect("path"), &c.nbd_uri(node, volume)]).ok();
}

fn get(c: &Cluster, node: u64, volume: &str, len: usize) -> Vec<u8> {
    let out = c.scratch().join(format!("{volume}-{node}.read"));
    run("nbdcopy", &[&c.nbd_uri(node, volume), out.to_str().expect("path")]).ok();
    let mut all = std::fs::read(&out).expect("read back");
    all.truncate(len);
    all
}

fn wait_all_applied(c: &Cluster, name: &str) {
    let leader = c.wait_leader(name, &ALL, LIMIT);
    let commit = c.settled_commit(name, leader);
    for id in ALL {
        c.wait_applied(name, id, commit, LIMIT);
    }
}

/// A packet capture of every node's peer port while it lives.
struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    fn start(c: &Cluster) -> Capture {
        let path = c.scratch().join("peers.pcap");
        let filter: Vec<String> =
            ALL.iter().map(|&id| format!("tcp port {}", c.node(id).peer_addr.port())).collect();
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-s", "0", "-w"])
            .arg(&path)
            .arg(filter.join(" or "))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tcpdump");
        poll("tcpdump to start writing", Duration::from_secs(10), || {
            if path.exists() {
                Ok(())
            } else {
                Err("no capture file yet".into())
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        Capture { child, path }
    }

    fn stop(mut self) -> Vec<u8> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        std::fs::read(&self.path).expect("read the capture")
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_no_plaintext_in_copies_logs_snapshots_or_peer_traffic() {
    if !require_tools("no plaintext anywhere", &["nbdcopy", "qemu-io", "tcpdump"]) {
        return;
    }
    let mut c = Cluster::start_with(3, &RETAIN);
    c.cli(1, &["volume", "create", "sec", "--size", "64M", "--replicas", "2", "--encrypted"]).ok();
    c.create_volume(1, "pl", "64M", 2);
    wait_all_applied(&c, "sec");
    let capture = Capture::start(&c);
    let (secret, plain) = (marker("secret", 4 * MIB), marker("plain", 4 * MIB));
    let (sf, pf) = (c.scratch().join("secret.bin"), c.scratch().join("plain.bin"));
    std::fs::write(&sf, &secret).expect("write");
    std::fs::write(&pf, &plain).expect("write");
    // Through a node that may not lead (forwarded) and one that may.
    put(&c, 2, "sec", &sf);
    put(&c, 2, "pl", &pf);
    wait_all_applied(&c, "sec");
    wait_all_applied(&c, "pl");

    // Node 3 loses its copies and comes back after the logs were compacted: the copies
    // travel as snapshot chunks from the others.
    c.kill9(3);
    for v in ["sec", "pl"] {
        for i in 0..40u64 {
            qemu_io(
                &c.nbd_uri(1, v),
                &[&format!("write -P {} {} 4k", i % 200 + 1, 8 * MIB as u64 + i * 65536)],
            )
            .ok();
        }
    }
    std::thread::sleep(Duration::from_secs(7)); // a checkpoint and compaction pass
    for v in ["sec", "pl"] {
        let uuid = c.cli_json(1, &["volume", "inspect", v])["uuid"].as_str().expect("uuid").to_string();
        let img = c.node(3).image_path(&uuid);
        for ext in ["img", "meta", "applied"] {
            let _ = std::fs::remove_file(img.with_extension(ext));
        }
    }
    c.restart(3);
    wait_all_applied(&c, "sec");
    wait_all_applied(&c, "pl");
    let log = c.node(3).log();
    assert!(
        log.contains("store rebuilt") || log.contains("snapshot installed") || log.contains("rebuilding"),
        "node 3 got its copies back without a rebuild?\n{log}"
    );
    assert!(get(&c, 3, "sec", 4 * MIB) == secret, "node 3 serves the encrypted volume after its rebuild");
    let traffic = capture.stop();

    let probe_s = &secret[..40];
    let probe_p = &plain[..40];
    for id in ALL {
        let dir = c.node(id).data_dir();
        let hits = files_containing(&dir, probe_s);
        assert!(hits.is_empty(), "node {id}: the encrypted volume's plaintext is in {hits:?}");
        assert!(
            !files_containing(&dir, probe_p).is_empty(),
            "node {id}: the plain pattern is found (the search works)"
        );
    }
    assert!(!contains(&traffic, probe_s), "the encrypted volume's plaintext crossed the network");
    assert!(contains(&traffic, probe_p), "the plain pattern is in the capture (the capture works)");
    println!(
        "MEASURED no plaintext: {} bytes of peer traffic captured, searched with every file of 3 nodes (copies, metadata, WAL, catalog): 0 hits for the encrypted volume, hits for the plain one",
        traffic.len()
    );
}

fn metric(c: &Cluster, id: u64, name: &str, labels: &[&str]) -> u64 {
    raftblk_tests::metric_value(c.node(id).api_addr, name, labels)
}

fn uuid(c: &Cluster, volume: &str) -> String {
    c.cli_json(1, &["volume", "inspect", volume])["uuid"].as_str().expect("uuid").to_string()
}

#[test]
fn b_damaged_blocks_are_repaired_from_another_copy_on_read_and_by_scrub() {
    if !require_tools("repairs", &["nbdcopy", "qemu-io"]) {
        return;
    }
    let mut c = Cluster::start(3);
    c.create_volume(1, "pl", "16M", 2);
    c.cli(1, &["volume", "create", "sec", "--size", "16M", "--replicas", "2", "--encrypted"]).ok();
    let data = raftblk_tests::pseudo_random_bytes(8 * MIB, 5);
    let file = c.scratch().join("data.bin");
    std::fs::write(&file, &data).expect("write");
    put(&c, 1, "pl", &file);
    put(&c, 1, "sec", &file);
    wait_all_applied(&c, "pl");
    wait_all_applied(&c, "sec");
    let uuids: std::collections::HashMap<&str, String> =
        [("pl", uuid(&c, "pl")), ("sec", uuid(&c, "sec"))].into();
    let image = |c: &Cluster, id: u64, v: &str| c.node(id).image_path(&uuids[v]);

    // The leader's copy rots: a data byte, and a block's records (read after a restart, so
    // the records come from the disk). Reads through it are repaired from the others.
    let leader = c.wait_leader("pl", &ALL, LIMIT);
    c.sigterm(leader, Duration::from_secs(30));
    for v in ["pl", "sec"] {
        let img = image(&c, leader, v);
        flip(&img, 3 * 4096 + 10);
        flip(&img.with_extension("meta"), 4096 + 7 * 128 + 20);
        flip(&img.with_extension("meta"), 4096 + 7 * 128 + 64 + 20);
    }
    c.restart(leader);
    for v in ["pl", "sec"] {
        poll(&format!("node {leader} to lead {v} again"), LIMIT, || {
            let now = c.wait_leader(v, &ALL, LIMIT);
            if now == leader {
                return Ok(());
            }
            let _ = c.cli(leader, &["volume", "transfer-leader", v, &leader.to_string()]);
            std::thread::sleep(Duration::from_millis(300));
            Err(format!("node {now} leads"))
        });
        assert!(
            get(&c, leader, v, 8 * MIB) == data,
            "{v}: reads through the damaged leader return the right data"
        );
        let repaired =
            metric(&c, leader, "raftblk_volume_blocks_repaired_total", &[&format!("volume=\"{v}\"")]);
        assert!(repaired >= 2, "{v}: {repaired} blocks repaired on node {leader}");
        let found = metric(
            &c,
            leader,
            "raftblk_volume_integrity_errors_total",
            &[&format!("volume=\"{v}\""), "kind=\"checksum\""],
        );
        assert!(found >= 1, "{v}: the damage was counted");
    }

    // A follower's copy rots (and two encrypted blocks swap places): scrub finds and repairs it.
    let follower = *ALL.iter().find(|&&id| id != leader).expect("follower");
    c.sigterm(follower, Duration::from_secs(30));
    flip(&image(&c, follower, "pl"), 11 * 4096 + 99);
    swap_blocks(&image(&c, follower, "sec"), 20, 21);
    c.restart(follower);
    wait_all_applied(&c, "pl");
    for (v, blocks) in [("pl", 1), ("sec", 2)] {
        let out = c.cli(leader, &["--json", "volume", "scrub", v]);
        assert!(out.success(), "{v}: the scrub repaired everything: {out}");
        let s: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        let f = &s["copies"][follower.to_string()];
        assert_eq!(
            (f["damaged"].as_u64(), f["repaired"].as_u64(), f["unrepaired"].as_u64()),
            (Some(blocks), Some(blocks), Some(0)),
            "{v}: {s}"
        );
        for id in ALL.iter().filter(|&&id| id != follower) {
            assert_eq!(s["copies"][id.to_string()]["damaged"], 0, "{v}: {s}");
        }
        // A second scrub finds every copy clean.
        let again: serde_json::Value =
            serde_json::from_str(c.cli(leader, &["--json", "volume", "scrub", v]).ok()).expect("json");
        assert!(again["copies"].as_object().expect("copies").values().all(|f| f["damaged"] == 0), "{again}");
        assert_eq!(c.cli_json(leader, &["volume", "inspect", v])["health"], "healthy");
    }
    // Reads through the follower's node (forwarded to the leader) are right, too.
    assert!(get(&c, follower, "sec", 8 * MIB) == data);
    // An encrypted volume grows like any other; the new blocks are written and read back.
    c.cli(leader, &["volume", "resize", "sec", "24M"]).ok();
    qemu_io(&c.nbd_uri(follower, "sec"), &["write -P 0x5e 20M 1M"]).ok();
    let back = qemu_io(&c.nbd_uri(leader, "sec"), &["read -P 0x5e 20M 1M"]);
    assert!(back.success() && !back.stdout.contains("verification failed"), "{back}");
}

#[test]
fn c_a_node_without_the_kek_replicates_ciphertext_and_a_rotation_under_fio_unlocks_it() {
    if !require_tools("KEK rotation", &["fio", "qemu-io", "nbdinfo"]) || !have_tool("nbdcopy") {
        return;
    }
    let mut c = Cluster::start(3);
    c.cli(1, &["volume", "create", "sec", "--size", "64M", "--replicas", "2", "--encrypted"]).ok();
    wait_all_applied(&c, "sec");
    c.sigterm(3, Duration::from_secs(30));
    c.set_kek(3, None);
    c.restart(3);
    let v = c.cli_json(3, &["volume", "inspect", "sec"]);
    assert!(v["locked"].as_str().is_some_and(|w| w.contains("KEK")), "node 3 shows the volume locked: {v}");
    assert!(!run("nbdinfo", &[&c.nbd_uri(3, "sec")]).success(), "node 3 refuses to serve it");
    // Writes through node 1 still reach node 3's copy (as ciphertext); one of the NBD
    // maximum (32 MiB), sealed and encrypted as one command.
    qemu_io(&c.nbd_uri(1, "sec"), &["write -P 0x33 0 32M"]).ok();
    wait_all_applied(&c, "sec");

    // A new KEK, at the same path on every node (one machine here); a rotation while fio
    // writes and verifies through node 2.
    let new_kek = c.scratch().join("kek.new");
    std::fs::write(&new_kek, [0x77u8; 32]).expect("write key");
    std::fs::set_permissions(&new_kek, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let fio = Command::new("fio")
        .args([
            "--name=v",
            "--ioengine=nbd",
            &format!("--uri={}", c.nbd_uri(2, "sec")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--size=32M",
            "--offset=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--time_based",
            "--runtime=12",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let out = c.cli(1, &["--json", "cluster", "rotate-kek", "--key-file", new_kek.to_str().expect("path")]);
    let took = t.elapsed();
    let report: serde_json::Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(report["volumes_rewrapped"], 1, "{report}");
    assert_eq!(report["nodes"].as_array().map(Vec::len), Some(3), "{report}");
    let fio = fio.wait_with_output().expect("fio");
    assert!(
        fio.status.success(),
        "fio saw an error during the rotation: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    let r = raftblk_tests::parse_fio_json(&String::from_utf8_lossy(&fio.stdout)).expect("fio json");
    assert_eq!(r.error, 0, "fio errors");
    // Node 3 now holds the KEK the key is wrapped by: the volume unlocks there.
    poll("node 3 to unlock the volume", Duration::from_secs(30), || {
        let v = c.cli_json(3, &["volume", "inspect", "sec"]);
        if v.get("locked").is_none() {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let back = qemu_io(&c.nbd_uri(3, "sec"), &["read -P 0x33 0 4M"]);
    assert!(back.success() && !back.stdout.contains("verification failed"), "{back}");

    // Every node restarted with only the new key file: the data is still theirs to read.
    for id in ALL {
        c.sigterm(id, Duration::from_secs(30));
        c.set_kek(id, None);
    }
    for id in ALL {
        // The runtime-loaded key file is remembered in the data directory.
        c.restart(id);
    }
    let back = qemu_io(&c.nbd_uri(2, "sec"), &["read -P 0x33 0 4M"]);
    assert!(
        back.success() && !back.stdout.contains("verification failed"),
        "after restarts with the new key only: {back}"
    );
    println!("MEASURED KEK rotation under fio verify through node 2: rotate-kek took {took:?}, fio {} writes, 0 errors; the node that lacked the old KEK unlocked", r.write_ios);
}
