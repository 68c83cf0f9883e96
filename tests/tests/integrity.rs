//! Block integrity and encryption at rest on a node alone: what is on disk, what a crash
//! leaves, what tampering does, what happens without the right key, and the nonces.

use std::path::{Path, PathBuf};

use std::time::Duration;

use raftblk_tests::{
    files_containing, flip, nonces_in, pseudo_random_bytes, qemu_io, require_tools, run, swap_blocks, Daemon,
};

const MIB: usize = 1 << 20;

/// A pattern that occurs nowhere by chance: a marker line repeated.
fn secret_pattern(len: usize) -> Vec<u8> {
    b"raftblk-plaintext-marker-7f3a9c1e-".iter().copied().cycle().take(len).collect()
}

fn write_file(d: &Daemon, name: &str, data: &[u8]) -> PathBuf {
    let path = d.scratch().join(name);
    std::fs::write(&path, data).expect("write scratch file");
    path
}

/// Copies `file` onto the volume through NBD.
fn nbd_put(d: &Daemon, volume: &str, file: &Path) {
    run("nbdcopy", &[file.to_str().expect("path"), &d.nbd_uri(volume)]).ok();
}

/// The first `len` bytes of the volume, read through NBD.
fn nbd_get(d: &Daemon, volume: &str, len: usize) -> Vec<u8> {
    let out = d.scratch().join(format!("{volume}.read"));
    run("nbdcopy", &[&d.nbd_uri(volume), out.to_str().expect("path")]).ok();
    let mut all = std::fs::read(&out).expect("read back");
    all.truncate(len);
    all
}

fn metric(d: &Daemon, name: &str, labels: &[&str]) -> u64 {
    raftblk_tests::metric_value(d.api_addr, name, labels)
}

fn uuid_of(d: &Daemon, volume: &str) -> String {
    d.cli_json(&["volume", "inspect", volume])["uuid"].as_str().expect("uuid").to_string()
}

#[test]
fn encrypted_volumes_hold_no_plaintext_on_disk_and_read_back() {
    if !require_tools("encrypted_volumes_hold_no_plaintext_on_disk_and_read_back", &["nbdcopy"]) {
        return;
    }
    let d = Daemon::start();
    d.cli(&["volume", "create", "sec", "--size", "16M", "--encrypted"]).ok();
    d.create_volume("pl", "16M");
    let v = d.cli_json(&["volume", "inspect", "sec"]);
    assert_eq!(v["encrypted"], true, "{v}");
    let pattern = secret_pattern(4 * MIB);
    let file = write_file(&d, "pattern", &pattern);
    nbd_put(&d, "sec", &file);
    nbd_put(&d, "pl", &file);
    // Unaligned writes go through the read-modify-write path.
    qemu_io(&d.nbd_uri("sec"), &["write -P 0x61 4097 1000"]).ok();
    let mut want = pattern.clone();
    want[4097..5097].fill(0x61);
    assert!(nbd_get(&d, "sec", 4 * MIB) == want, "the encrypted volume reads back what was written");
    assert!(nbd_get(&d, "pl", 4 * MIB) == pattern);
    let marker = &pattern[..34];
    let hits = files_containing(&d.data_dir(), marker);
    let plain_file = d.image_path(&uuid_of(&d, "pl"));
    assert_eq!(hits, vec![plain_file], "only the plain volume's file holds the pattern (the search works)");
}

#[test]
fn kill9_during_writes_never_leaves_a_block_unreadable() {
    if !require_tools("kill9_during_writes_never_leaves_a_block_unreadable", &["fio", "nbdcopy"]) {
        return;
    }
    let mut d = Daemon::start();
    d.create_volume("pl", "32M");
    d.cli(&["volume", "create", "sec", "--size", "32M", "--encrypted"]).ok();
    let rounds = std::env::var("CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30u64);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut crashed_mid_write = 0;
    for round in 0..rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut fios = Vec::new();
        for v in ["pl", "sec"] {
            // Whole blocks and partial ones (read-modify-write), many in flight.
            let child = std::process::Command::new("fio")
                .args([
                    "--name=a",
                    "--ioengine=nbd",
                    &format!("--uri={}", d.nbd_uri(v)),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--size=32M",
                    "--time_based",
                    "--runtime=30",
                    "--name=b",
                    "--ioengine=nbd",
                    &format!("--uri={}", d.nbd_uri(v)),
                    "--rw=randwrite",
                    "--bs=1536",
                    "--blockalign=512",
                    "--iodepth=4",
                    "--size=32M",
                    "--time_based",
                    "--runtime=30",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn fio");
            fios.push(child);
        }
        let wait = Duration::from_millis(300 + seed % 900);
        std::thread::sleep(wait);
        let writes_before = metric(&d, "raftblk_volume_operations_total", &["op=\"write\""]);
        d.kill9();
        if writes_before > 0 {
            crashed_mid_write += 1;
        }
        for mut f in fios {
            let _ = f.kill();
            let _ = f.wait();
        }
        d.restart();
        for v in ["pl", "sec"] {
            let out = run("nbdcopy", &[&d.nbd_uri(v), "null:"]);
            assert!(
                out.success(),
                "round {round} (seed {seed}, killed after {wait:?}): {v} has an unreadable block: {out}"
            );
        }
        for kind in ["checksum", "metadata", "authentication", "unrecoverable"] {
            let n = metric(&d, "raftblk_volume_integrity_errors_total", &[&format!("kind=\"{kind}\"")]);
            assert_eq!(n, 0, "round {round}: {kind} errors after a crash\n{}", d.log());
        }
    }
    println!("MEASURED {rounds} kill -9 rounds under fio ({crashed_mid_write} with writes in flight): every block of both volumes readable, 0 integrity errors");
    assert!(crashed_mid_write > 0, "no round killed the daemon while it was writing");
}

#[test]
fn tampering_with_a_single_copy_fails_reads_with_eio_and_scrub_reports_it() {
    if !require_tools(
        "tampering_with_a_single_copy_fails_reads_with_eio_and_scrub_reports_it",
        &["nbdcopy", "qemu-io"],
    ) || !raftblk_tests::require_python_nbd("tampering")
    {
        return;
    }
    let mut d = Daemon::start();
    d.create_volume("pl", "8M");
    d.cli(&["volume", "create", "sec", "--size", "8M", "--encrypted"]).ok();
    let data = pseudo_random_bytes(8 * MIB, 11);
    let file = write_file(&d, "input.bin", &data);
    nbd_put(&d, "pl", &file);
    nbd_put(&d, "sec", &file);
    let (pl, sec) = (d.image_path(&uuid_of(&d, "pl")), d.image_path(&uuid_of(&d, "sec")));
    assert_eq!(d.sigterm(Duration::from_secs(20)).code(), Some(0));
    flip(&pl, 5 * 4096 + 100); // data of block 5
    flip(&pl.with_extension("meta"), 4096 + 9 * 128 + 20); // both records of block 9
    flip(&pl.with_extension("meta"), 4096 + 9 * 128 + 64 + 20);
    swap_blocks(&sec, 20, 21); // two encrypted blocks, data and metadata together
    d.restart();

    // The damaged blocks fail with EIO; the rest reads fine, on the same connection.
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for block, bad in [(4, False), (5, True), (6, False), (9, True), (10, False)]:
    try:
        h.pread(4096, block * 4096)
        got = "ok"
    except nbd.Error as e:
        got = "EIO" if e.errno in (5, "EIO") else "errno %s" % e.errno
    print(block, got)
print("still connected", h.pread(512, 0)[:4] != b"")
"#;
    let out = raftblk_tests::python(script, &[&d.nbd_uri("pl")]);
    assert_eq!(out.ok().trim(), "4 ok\n5 EIO\n6 ok\n9 EIO\n10 ok\nstill connected True", "{out}");
    let bad = qemu_io(&d.nbd_uri("sec"), &["read 81920 4096"]);
    assert!(!bad.success() || bad.stdout.contains("Input/output error"), "a swapped block reads: {bad}");
    assert!(qemu_io(&d.nbd_uri("sec"), &["read 77824 4096"]).success(), "its neighbour is fine");
    assert!(
        metric(&d, "raftblk_volume_integrity_errors_total", &["kind=\"checksum\"", "volume=\"pl\""]) >= 1
    );
    assert!(
        metric(&d, "raftblk_volume_integrity_errors_total", &["kind=\"metadata\"", "volume=\"pl\""]) >= 1
    );
    assert!(
        d.log().contains("block failed an integrity check"),
        "failures are logged with volume and offset"
    );

    // Scrub finds exactly the damaged blocks, says it could not repair them (one copy),
    // and the volume is degraded until they are rewritten.
    let out = d.cli(&["--json", "volume", "scrub", "pl"]);
    assert_eq!(out.code(), 3, "a scrub that leaves damage exits 3: {out}");
    let summary: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(summary["copies"]["0"]["unrepaired_blocks"], serde_json::json!([5, 9]), "{summary}");
    let out = d.cli(&["--json", "volume", "scrub", "sec"]);
    let summary: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(summary["copies"]["0"]["unrepaired_blocks"], serde_json::json!([20, 21]), "{summary}");
    assert_eq!(d.cli_json(&["volume", "inspect", "pl"])["health"], "degraded");
    qemu_io(&d.nbd_uri("pl"), &["write -P 7 20480 4096", "write -P 7 36864 4096"]).ok();
    assert!(d.cli(&["volume", "scrub", "pl"]).success(), "after rewriting, the scrub is clean");
    assert_eq!(d.cli_json(&["volume", "inspect", "pl"])["health"], "healthy");
}

fn key_file(d: &Daemon, name: &str, byte: u8, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = d.scratch().join(name);
    std::fs::write(&path, [byte; 32]).expect("write key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

#[test]
fn without_the_right_kek_encrypted_volumes_are_locked_and_a_rotation_moves_them() {
    if !require_tools("without_the_right_kek", &["qemu-io", "nbdinfo"]) {
        return;
    }
    let mut d = Daemon::start();
    d.cli(&["volume", "create", "sec", "--size", "8M", "--encrypted"]).ok();
    d.create_volume("pl", "8M");
    qemu_io(&d.nbd_uri("sec"), &["write -P 0x42 0 1M"]).ok();
    let info: serde_json::Value = serde_json::from_str(&d.get("/v1/node").1).expect("node info");
    let old_id = info["current_kek"].as_str().expect("a current KEK").to_string();

    // No KEK: plain volumes serve, the encrypted one is locked and says which key it needs.
    d.sigterm(Duration::from_secs(20));
    d.set_kek(None);
    d.restart();
    let v = d.cli_json(&["volume", "inspect", "sec"]);
    let why = v["locked"].as_str().unwrap_or_default().to_string();
    assert!(why.contains(&old_id) && why.contains("security.kek_file"), "{v}");
    let list = d.cli(&["volume", "list"]);
    assert!(list.ok().contains("locked"), "{list}");
    // libnbd shows the server's message in its debug output.
    let mut cmd = std::process::Command::new("nbdinfo");
    cmd.arg(d.nbd_uri("sec")).env("LIBNBD_DEBUG", "1");
    let out = raftblk_tests::run_cmd(cmd, Duration::from_secs(30));
    assert!(!out.success() && out.stderr.contains(&old_id), "NBD refuses with the reason: {out}");
    assert!(qemu_io(&d.nbd_uri("pl"), &["read 0 4096"]).success());
    let create = d.cli(&["volume", "create", "sec2", "--size", "8M", "--encrypted"]);
    assert!(!create.success() && create.stderr.contains("security.kek_file"), "{create}");

    // A KEK file others can read is refused at start-up.
    d.sigterm(Duration::from_secs(20));
    let open = key_file(&d, "kek-open", 1, 0o644);
    d.set_extra_args(&["--kek-file", open.to_str().expect("path")]);
    let err = d.try_restart().expect_err("a world-readable KEK file is refused");
    assert!(err.contains("chmod 600"), "{err}");

    // The right KEK (from a file now), then a rotation to a new one; after it, the new key
    // alone opens the volume.
    let old = key_file(&d, "kek-old", 0, 0o600);
    std::fs::write(&old, hex_to_bytes(raftblk_tests::TEST_KEK_HEX)).expect("write old key");
    d.set_extra_args(&["--kek-file", old.to_str().expect("path")]);
    d.restart();
    assert!(d.cli_json(&["volume", "inspect", "sec"]).get("locked").is_none());
    let new = key_file(&d, "kek-new", 9, 0o600);
    let out = d.cli(&["--json", "cluster", "rotate-kek", "--key-file", new.to_str().expect("path")]);
    let report: serde_json::Value = serde_json::from_str(out.ok()).expect("json");
    assert_eq!(report["volumes_rewrapped"], 1, "{report}");
    assert_ne!(report["kek"], old_id.as_str());
    d.sigterm(Duration::from_secs(20));
    d.set_extra_args(&["--kek-file", new.to_str().expect("path")]);
    std::fs::remove_file(&old).expect("the old key is gone");
    d.restart();
    assert!(d.cli_json(&["volume", "inspect", "sec"]).get("locked").is_none(), "the new KEK alone opens it");
    let back = qemu_io(&d.nbd_uri("sec"), &["read -P 0x42 0 1M"]);
    assert!(back.success() && !back.stdout.contains("Pattern verification failed"), "{back}");
}

fn hex_to_bytes(h: &str) -> Vec<u8> {
    (0..h.len()).step_by(2).map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn nonces_never_repeat_across_kill9_restarts() {
    if !require_tools("nonces_never_repeat_across_kill9_restarts", &["qemu-io"]) {
        return;
    }
    let mut d = Daemon::start();
    d.cli(&["volume", "create", "sec", "--size", "16M", "--encrypted"]).ok();
    let meta = d.image_path(&uuid_of(&d, "sec")).with_extension("meta");
    let reservation = d.data_dir().join("nonce-reservation");
    let mut marks = Vec::new();
    for round in 0..6u64 {
        // Each round writes new blocks and rewrites some of the last round's.
        let start = round * 64 * 4096;
        let rewrite = round.saturating_sub(1) * 64 * 4096;
        qemu_io(
            &d.nbd_uri("sec"),
            &[&format!("write -P {} {start} 256k", round + 1), &format!("write -P 9 {rewrite} 64k")],
        )
        .ok();
        marks.push(
            std::fs::read_to_string(&reservation).expect("reservation").trim().parse::<u64>().expect("mark"),
        );
        d.kill9();
        d.restart();
    }
    let nonces = nonces_in(&meta);
    let unique: std::collections::HashSet<_> = nonces.iter().collect();
    assert!(nonces.len() >= 6 * 64, "found {} nonces", nonces.len());
    assert_eq!(unique.len(), nonces.len(), "a nonce was used twice");
    assert!(marks.windows(2).all(|w| w[1] > w[0]), "the reservation only grows: {marks:?}");
    println!("MEASURED {} nonces in the metadata after 6 kill -9 restarts: all distinct; reservation marks {marks:?}", nonces.len());
}
