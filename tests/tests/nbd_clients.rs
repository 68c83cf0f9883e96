//! Real NBD clients against a real `raftblkd`: nbdinfo, qemu-io, qemu-img,
//! nbdcopy and fio, plus the metrics those clients' I/O produces.

use raftblk_tests::{python, qemu_io, require_python_nbd, require_tools, run, Daemon, MIB};
use serde_json::Value;

fn nbdinfo_json(uri: &str) -> Value {
    let out = run("nbdinfo", &["--json", uri]);
    out.json()
}

fn only_export(info: &Value) -> &Value {
    let exports = info["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{info}");
    &exports[0]
}

#[test]
fn nbdinfo_lists_every_volume_and_reports_size_and_flags() {
    if !require_tools("nbdinfo", &["nbdinfo"]) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("alpha", "256M");
    d.create_volume("beta", "64M");
    d.cli(&["volume", "create", "gamma", "--size", "16M", "--read-only"]).ok();

    // --list, text and JSON
    let out = run("nbdinfo", &["--list", &format!("nbd://{}", d.nbd_addr)]);
    let text = out.ok();
    for name in ["alpha", "beta", "gamma"] {
        assert!(text.contains(&format!("export=\"{name}\":")), "{name} not listed: {out}");
    }
    assert!(text.contains("268435456"), "{out}");
    let out = run("nbdinfo", &["--list", "--json", &format!("nbd://{}", d.nbd_addr)]);
    let info = out.json();
    let mut names: Vec<&str> = info["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name"))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["alpha", "beta", "gamma"], "{info}");

    // one export in detail
    let info = nbdinfo_json(&d.nbd_uri("alpha"));
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    assert_eq!(info["structured"], true, "{info}");
    let e = only_export(&info);
    assert_eq!(e["export-name"], "alpha", "{e}");
    assert_eq!(e["export-size"], 256 * MIB, "{e}");
    for flag in ["can_multi_conn", "can_trim", "can_zero", "can_fua", "can_flush", "can_cache"] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["block_size_minimum"], 512, "{e}");
    assert_eq!(e["block_size_preferred"], 4096, "{e}");
    assert_eq!(e["block_size_maximum"], 33_554_432, "{e}");
    let contexts: Vec<&str> =
        e["contexts"].as_array().expect("contexts").iter().filter_map(Value::as_str).collect();
    assert!(contexts.contains(&"base:allocation"), "{e}");

    // the same over the unix socket
    let e2 = only_export(&nbdinfo_json(&d.unix_uri("beta"))).clone();
    assert_eq!(e2["export-size"], 64 * MIB, "{e2}");

    // an unknown export is refused
    let out = run("nbdinfo", &["--json", &d.nbd_uri("nosuch")]);
    assert!(!out.success(), "{out}");

    // read-only volume
    let info = nbdinfo_json(&d.nbd_uri("gamma"));
    let e = only_export(&info);
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["export-size"], 16 * MIB, "{e}");
}

#[test]
fn read_only_volume_refuses_writes() {
    if !require_tools("read_only", &["qemu-io"]) || !require_python_nbd("read_only") {
        return;
    }
    let d = Daemon::start();
    d.cli(&["volume", "create", "ro", "--size", "16M", "--read-only"]).ok();
    let uri = d.nbd_uri("ro");

    // qemu-io refuses to open it read-write; read-only opens read zeroes
    let out = qemu_io(&uri, &["write -P 0xab 0 64k"]);
    assert!(!out.success(), "write to a read-only export succeeded: {out}");
    let mut args = vec!["-r".to_string(), "-f".into(), "raw".into(), "-c".into(), "read -P 0 0 1M".into()];
    args.push(uri.clone());
    run("qemu-io", &args).ok();

    // a client that sends the write anyway gets EPERM from the server, and the data is unchanged
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only() == 1, "not read-only"
for what, fn in [("pwrite", lambda: h.pwrite(b"\xab" * 4096, 0)),
                 ("trim", lambda: h.trim(4096, 0)),
                 ("zero", lambda: h.zero(4096, 0))]:
    try:
        fn()
    except nbd.Error as e:
        print(what, e.errno)
    else:
        print(what, "SUCCEEDED")
assert h.pread(4096, 0) == bytearray(4096), "data changed"
print("read ok")
"#;
    let out = python(script, &[&uri]);
    let text = out.ok();
    assert!(text.contains("pwrite EPERM"), "{out}");
    assert!(!text.contains("SUCCEEDED"), "{out}");
    assert!(text.contains("read ok"), "{out}");
}

/// Extents from `nbdinfo --map --json`, as (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = run("nbdinfo", &["--map", "--json", uri]);
    out.json()
        .as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

/// The map type of every byte in [start, end) must be `want`.
#[track_caller]
fn assert_range(extents: &[(u64, u64, u64)], start: u64, end: u64, want: u64) {
    for &(off, len, ty) in extents {
        let (a, b) = (off.max(start), (off + len).min(end));
        if a < b {
            assert_eq!(ty, want, "bytes [{a}, {b}) have type {ty}, expected {want}; map: {extents:?}");
        }
    }
}

#[test]
fn nbdinfo_map_shows_data_and_holes_after_writes_and_trim() {
    if !require_tools("nbdinfo_map", &["nbdinfo", "qemu-io"]) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("thin", "64M");
    let uri = d.nbd_uri("thin");

    // a new volume is one hole that reads as zeroes
    let m = map(&uri);
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 64 * MIB, "{m:?}");
    assert_range(&m, 0, 64 * MIB, 3);

    qemu_io(&uri, &["write -P 0xab 0 2M", "write -P 0xcd 8M 1M", "write -P 0xef 60M 4k", "flush"]).ok();
    let m = map(&uri);
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 64 * MIB, "{m:?}");
    assert_range(&m, 0, 2 * MIB, 0);
    assert_range(&m, 2 * MIB, 8 * MIB, 3);
    assert_range(&m, 8 * MIB, 9 * MIB, 0);
    assert_range(&m, 9 * MIB, 60 * MIB, 3);
    assert_range(&m, 60 * MIB, 60 * MIB + 4096, 0);
    assert_range(&m, 60 * MIB + 4096, 64 * MIB, 3);

    // trim the first MiB: it becomes a hole again, reading zeroes
    qemu_io(&uri, &["discard 0 1M", "flush"]).ok();
    let m = map(&uri);
    assert_range(&m, 0, MIB, 3);
    assert_range(&m, MIB, 2 * MIB, 0);
    assert_range(&m, 8 * MIB, 9 * MIB, 0);
    qemu_io(&uri, &["read -P 0 0 1M", "read -P 0xab 1M 1M", "read -P 0xcd 8M 1M"]).ok();

    // allocated_bytes in the API follows the data (about 2 MiB + 4 KiB now)
    let v = d.cli_json(&["volume", "inspect", "thin"]);
    let allocated = v["allocated_bytes"].as_u64().expect("allocated_bytes");
    assert!((2 * MIB..=3 * MIB).contains(&allocated), "allocated {allocated}: {v}");
}

#[test]
fn qemu_io_patterns_trim_and_write_zeroes_over_tcp_and_unix() {
    if !require_tools("qemu_io", &["qemu-io"]) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("qio", "256M");
    let tcp = d.nbd_uri("qio");
    let unix = d.unix_uri("qio");

    let out = qemu_io(&tcp, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    assert!(out.ok().contains("read 1048576/1048576 bytes at offset 0"), "{out}");

    // the check can fail: a wrong pattern is reported and the exit status is 1
    let out = qemu_io(&tcp, &["read -P 0xcd 0 1M"]);
    assert_eq!(out.code(), 1, "{out}");
    assert!(out.stdout.contains("Pattern verification failed"), "{out}");

    // FUA writes, writes straddling 4 KiB blocks, writes at the very end
    qemu_io(
        &tcp,
        &[
            "write -f -P 0x11 2M 64k",
            "write -P 0x22 3145828 5000",
            "write -P 0x33 268431360 4096",
            "flush",
            "read -P 0x11 2M 64k",
            "read -P 0x22 3145828 5000",
            "read -P 0 3145728 100",
            "read -P 0 3150828 100",
            "read -P 0x33 268431360 4096",
        ],
    )
    .ok();
    // past the end is refused
    let out = qemu_io(&tcp, &["read 268431360 8192"]);
    assert!(!out.success() || out.stdout.contains("failed"), "read past the end succeeded: {out}");

    // discard: the first half reads zeroes, the second keeps its data
    qemu_io(&tcp, &["discard 0 512k", "read -P 0 0 512k", "read -P 0xab 512k 512k"]).ok();

    // write zeroes, with and without unmap
    qemu_io(&tcp, &["write -P 0xee 4M 1M", "write -z 4M 512k", "write -z -u 4608k 512k"]).ok();
    qemu_io(&tcp, &["read -P 0 4M 1M"]).ok();

    // never-written areas read as zeroes
    qemu_io(&tcp, &["read -P 0 100M 1M", "read -P 0 200M 4k"]).ok();

    // the unix socket serves the same volume
    let out = qemu_io(&unix, &["read -P 0xab 512k 512k", "read -P 0 4M 1M", "write -P 0x77 10M 128k"]);
    out.ok();
    qemu_io(&tcp, &["read -P 0x77 10M 128k"]).ok();
    let out = qemu_io(&unix, &["read -P 0x78 10M 128k"]);
    assert_eq!(out.code(), 1, "wrong pattern over the unix socket not detected: {out}");
}

#[test]
fn qemu_img_convert_from_qcow2_and_compare() {
    if !require_tools("qemu_img", &["qemu-img", "qemu-io"]) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("img", "64M");
    let uri = d.nbd_uri("img");
    let qcow2 = d.scratch().join("src.qcow2");
    let qcow2 = qcow2.to_str().expect("utf-8 path");

    run("qemu-img", &["create", "-q", "-f", "qcow2", qcow2, "64M"]).ok();
    let mut args = vec!["-f", "qcow2"];
    for c in [
        "write -P 0x11 0 64k",
        "write -P 0x22 5M 1M",
        "write -P 0x33 34603520 307200",
        "write -P 0x44 66056192 4096",
        "write -z 6M 64k",
    ] {
        args.extend(["-c", c]);
    }
    args.push(qcow2);
    run("qemu-io", &args).ok();
    // put junk where the image has zeroes, so the convert must overwrite it
    qemu_io(&uri, &["write -P 0x99 20M 1M"]).ok();

    let out = run("qemu-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", qcow2, &uri]);
    out.ok();
    let out = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", qcow2, &uri]);
    assert!(out.ok().contains("Images are identical"), "{out}");

    let out = run("qemu-img", &["info", "--output=json", &uri]);
    assert_eq!(out.json()["virtual-size"], 64 * MIB, "{out}");

    // one modified sector through NBD: compare now fails and names the offset
    qemu_io(&uri, &["write -P 0x99 5246976 512"]).ok();
    let out = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", qcow2, &uri]);
    assert_eq!(out.code(), 1, "{out}");
    assert!(out.stdout.contains("Content mismatch at offset 5246976"), "{out}");
}

#[test]
fn nbdcopy_file_to_volume_to_file_is_byte_identical() {
    if !require_tools("nbdcopy", &["nbdcopy"]) {
        return;
    }
    let d = Daemon::start();
    let size = 24 * MIB as usize;
    d.create_volume("copy", "24M");
    let mut data = raftblk_tests::pseudo_random_bytes(size, 0x5eed);
    // a zero run in the middle, so sparse detection is exercised too
    data[8 << 20..10 << 20].fill(0);
    let src = d.scratch().join("src.bin");
    let dst = d.scratch().join("dst.bin");
    std::fs::write(&src, &data).expect("write src");
    // junk on the volume where the source has zeroes
    if raftblk_tests::have_tool("qemu-io") {
        qemu_io(&d.nbd_uri("copy"), &["write -P 0x99 9M 64k"]).ok();
    }

    let uri = d.nbd_uri("copy");
    run("nbdcopy", &[src.to_str().expect("path"), &uri]).ok();
    run("nbdcopy", &[&uri, dst.to_str().expect("path")]).ok();
    let back = std::fs::read(&dst).expect("read dst");
    assert_eq!(back.len(), data.len());
    if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("first difference at byte {i}: {:#x} != {:#x}", back[i], data[i]);
    }
    // and over the unix socket, single connection, synchronous
    std::fs::remove_file(&dst).expect("rm dst");
    run("nbdcopy", &["--connections=1", "--synchronous", &d.unix_uri("copy"), dst.to_str().expect("path")])
        .ok();
    assert!(std::fs::read(&dst).expect("read dst") == data, "unix-socket copy differs");
}

fn fio_json(out: &raftblk_tests::Out) -> Value {
    let text = out.ok();
    // fio's nbd engine prints "fio: connected to NBD server" lines before the JSON
    let start = text.find("{\n").unwrap_or_else(|| panic!("no JSON in fio output: {out}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}: {out}"))
}

#[test]
fn fio_nbd_engine_randwrite_then_crc32c_verify_four_jobs() {
    if !require_tools("fio", &["fio"]) {
        return;
    }
    let d = Daemon::start();
    d.create_volume("fio", "64M");
    let uri = format!("--uri={}", d.nbd_uri("fio"));
    let common = [
        "--name=verify",
        "--ioengine=nbd",
        uri.as_str(),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16M",
        "--numjobs=4",
        "--offset_increment=16M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--output-format=json",
    ];
    let mut args = common.to_vec();
    args.push("--do_verify=1");
    let out = run("fio", &args);
    let j = fio_json(&out);
    let jobs = j["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4, "{out}");
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{job}");
        assert_eq!(job["read"]["io_bytes"], 16 * MIB, "verify read: {job}");
    }

    // a second run only verifies, over new connections
    let mut args = common.to_vec();
    args.push("--verify_only");
    let out = run("fio", &args);
    let j = fio_json(&out);
    for job in j["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(job["read"]["io_bytes"], 16 * MIB, "verify-only read: {job}");
    }

    // the check can fail: overwrite one block of job 0's region, verify again
    if raftblk_tests::have_tool("qemu-io") {
        qemu_io(&d.nbd_uri("fio"), &["write -P 0x00 0 4k"]).ok();
        let out = run("fio", &args);
        assert!(!out.success(), "fio verify did not notice a clobbered block: {out}");
    }
}

/// The value of the first sample line that starts with `prefix` followed by a space.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_count_client_io_and_healthz_is_ok() {
    if !require_tools("metrics", &["qemu-io"]) {
        return;
    }
    let d = Daemon::start();
    assert_eq!(d.get("/healthz"), (200, "ok\n".to_string()));
    d.create_volume("met", "32M");
    d.create_volume("idle", "32M");
    let uri = d.nbd_uri("met");
    qemu_io(&uri, &["write -P 1 0 1M", "write -P 2 1M 1M", "write -P 3 4M 1M", "read -P 2 1M 1M", "flush"])
        .ok();

    let (code, text) = d.get("/metrics");
    assert_eq!(code, 200, "{text}");
    let written = sample(&text, r#"raftblk_volume_bytes_total{op="write",volume="met"}"#)
        .unwrap_or_else(|| panic!("no write byte counter for met:\n{text}"));
    assert!(written >= 3.0 * MIB as f64, "write bytes {written} < 3 MiB:\n{text}");
    let read = sample(&text, r#"raftblk_volume_bytes_total{op="read",volume="met"}"#).expect("read counter");
    assert!(read >= MIB as f64, "read bytes {read}:\n{text}");
    let writes =
        sample(&text, r#"raftblk_volume_operations_total{op="write",volume="met"}"#).expect("op counter");
    assert!(writes >= 3.0, "{text}");
    let flushes =
        sample(&text, r#"raftblk_volume_operations_total{op="flush",volume="met"}"#).expect("flush counter");
    assert!(flushes >= 1.0, "{text}");
    assert_eq!(sample(&text, r#"raftblk_volume_bytes_total{op="write",volume="idle"}"#), Some(0.0), "{text}");
    assert_eq!(sample(&text, "raftblk_volumes"), Some(2.0), "{text}");
    assert_eq!(
        sample(&text, r#"raftblk_volume_size_bytes{volume="met"}"#),
        Some(32.0 * MIB as f64),
        "{text}"
    );
    let allocated =
        sample(&text, r#"raftblk_volume_allocated_bytes{volume="met"}"#).expect("allocated gauge");
    assert!(allocated >= 3.0 * MIB as f64, "{text}");
    assert!(text.contains("# TYPE raftblk_volume_operation_duration_seconds histogram"), "{text}");

    // a deleted volume's series disappear
    d.cli(&["volume", "delete", "idle"]).ok();
    let (_, text) = d.get("/metrics");
    assert!(!text.contains(r#"volume="idle""#), "{text}");
    assert_eq!(sample(&text, "raftblk_volumes"), Some(1.0), "{text}");
}
