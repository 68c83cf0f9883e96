//! The `raftblk` CLI against a real `raftblkd`: the volume lifecycle in JSON and
//! in tables, and every refusal with the message that tells the user what to fix.

use raftblk_tests::{Daemon, RawNbd, MIB};
use serde_json::Value;

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("volume list is a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("name is a string").to_string())
        .collect()
}

#[test]
fn volume_lifecycle_json_and_tables() {
    let d = Daemon::start();

    // Empty node: a hint, not an empty table.
    let out = d.cli(&["volume", "list"]);
    assert!(out.ok().contains("no volumes"), "{out}");
    assert_eq!(d.cli_json(&["volume", "list"]), Value::Array(vec![]));

    // create --json
    let v = d.cli_json(&[
        "volume",
        "create",
        "db-1",
        "--size",
        "256M",
        "--label",
        "app=db",
        "--label",
        "tier=gold",
    ]);
    assert_eq!(v["name"], "db-1", "{v}");
    assert_eq!(v["labels"], serde_json::json!({"app": "db", "tier": "gold"}), "{v}");
    assert_eq!(v["size_bytes"], 256 * MIB, "{v}");
    assert_eq!(v["read_only"], false, "{v}");
    assert_eq!(v["connections"], 0, "{v}");
    let uuid = v["uuid"].as_str().expect("uuid").to_string();
    assert_eq!(uuid.len(), 36, "uuid looks like a UUID: {v}");
    assert!(v["allocated_bytes"].as_u64().expect("allocated_bytes") < MIB, "thin volume: {v}");
    assert!(v["created_unix_s"].as_u64().expect("created_unix_s") > 1_600_000_000, "{v}");

    // create, human output
    let out = d.cli(&["volume", "create", "logs", "--size", "64MiB", "--read-only"]);
    let text = out.ok();
    assert!(text.contains("created volume logs"), "{out}");
    assert!(text.lines().any(|l| l.starts_with("size") && l.contains("64.0 MiB (67108864 bytes)")), "{out}");
    assert!(text.lines().any(|l| l.starts_with("read-only") && l.trim_end().ends_with("true")), "{out}");
    assert!(text.lines().any(|l| l.starts_with("export") && l.contains("/logs")), "{out}");

    // list --json, sorted by name
    let list = d.cli_json(&["volume", "list"]);
    assert_eq!(names(&list), ["db-1", "logs"], "{list}");
    // the `ls` alias
    assert_eq!(d.cli_json(&["volume", "ls"]), list);

    // list, table
    let out = d.cli(&["volume", "list"]);
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "SIZE", "ALLOCATED", "MODE", "CONNECTIONS", "HEALTH", "ENCRYPTED", "COPIES", "ON"],
        "{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], "db-1", "{out}");
    assert_eq!(&row[1..3], ["256.0", "MiB"], "{out}");
    assert_eq!(row[row.len() - 5..], ["rw", "0", "healthy", "no", "-"], "{out}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row[0], "logs", "{out}");
    assert_eq!(row[row.len() - 5..], ["ro", "0", "healthy", "no", "-"], "{out}");
    // columns line up: every row's second column starts where SIZE does
    let col = lines[0].find("SIZE").expect("SIZE column");
    for l in &lines[1..] {
        assert_ne!(l.as_bytes()[col], b' ', "misaligned table:\n{}", lines.join("\n"));
        assert_eq!(l.as_bytes()[col - 1], b' ', "misaligned table:\n{}", lines.join("\n"));
    }

    // inspect
    let v = d.cli_json(&["volume", "inspect", "db-1"]);
    assert_eq!(v["uuid"], uuid.as_str(), "{v}");
    let out = d.cli(&["volume", "inspect", "db-1"]);
    assert!(out.ok().contains(&uuid), "{out}");
    assert!(!out.stdout.contains("created volume"), "{out}");

    // resize (grow), same size is a no-op, the `grow` alias
    let v = d.cli_json(&["volume", "resize", "db-1", "512M"]);
    assert_eq!(v["size_bytes"], 512 * MIB, "{v}");
    assert_eq!(d.cli_json(&["volume", "inspect", "db-1"])["size_bytes"], 512 * MIB);
    let v = d.cli_json(&["volume", "resize", "db-1", "512M"]);
    assert_eq!(v["size_bytes"], 512 * MIB, "{v}");
    let out = d.cli(&["volume", "grow", "db-1", "1G"]);
    assert!(out.ok().contains("resized volume db-1"), "{out}");
    assert!(out.stdout.contains("1.0 GiB (1073741824 bytes)"), "{out}");
    // a grown volume is served at its new size
    let c = RawNbd::connect(d.nbd_addr, "db-1").expect("NBD connect");
    assert_eq!(c.size, 1 << 30);
    c.disconnect();

    // status
    let s = d.cli_json(&["status"]);
    assert_eq!(s["node"]["nbd_listen"], d.nbd_addr.to_string(), "{s}");
    assert_eq!(names(&s["volumes"]), ["db-1", "logs"], "{s}");
    let out = d.cli(&["status"]);
    assert!(out.ok().contains(&d.nbd_addr.to_string()), "{out}");
    assert!(out.stdout.contains("NAME"), "{out}");

    // delete
    let v = d.cli_json(&["volume", "delete", "logs"]);
    assert_eq!(v["deleted"], "logs", "{v}");
    let out = d.cli(&["volume", "rm", "db-1"]);
    assert!(out.ok().contains("deleted volume db-1"), "{out}");
    assert_eq!(d.cli_json(&["volume", "list"]), Value::Array(vec![]));
    // the data files are gone too
    let left: Vec<_> = std::fs::read_dir(d.data_dir().join("volumes"))
        .expect("volumes dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "data files left after delete: {left:?}");
    // and the name can be reused
    d.create_volume("db-1", "4M");
}

/// Runs a CLI command that must be refused: exit 1, nothing on stdout, and
/// `error: ...` on stderr containing every `needles` entry.
#[track_caller]
fn refused(d: &Daemon, args: &[&str], needles: &[&str]) {
    let out = d.cli(args);
    assert_eq!(out.code(), 1, "{out}");
    assert!(out.stdout.is_empty(), "refusal printed to stdout: {out}");
    assert!(out.stderr.starts_with("error: "), "{out}");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr lacks {n:?}: {out}");
    }
    assert!(!out.stderr.contains("panicked"), "{out}");
}

#[test]
fn refusals_say_what_to_fix() {
    let d = Daemon::start();
    d.create_volume("vol", "16M");

    // bad names (checked by the daemon for create, by the CLI for the others)
    let long = "a".repeat(64);
    for bad in ["bad name", ".hidden", "a/b", "-dash", "ünï", long.as_str()] {
        // `--` so that "-dash" reaches the daemon as a name, not a flag
        refused(&d, &["volume", "create", "--size", "1M", "--", bad], &["volume name", "letters, digits"]);
    }
    refused(&d, &["volume", "create", "", "--size", "1M"], &["volume name"]);
    refused(&d, &["volume", "inspect", "a/b"], &["not allowed"]);
    refused(&d, &["volume", "delete", "../vol"], &["not allowed"]);
    // 63 characters is fine
    d.create_volume(&"b".repeat(63), "4K");

    // bad labels (checked by the CLI, and by the daemon for API clients)
    refused(&d, &["volume", "create", "l1", "--size", "1M", "--label", "novalue"], &["KEY=VALUE"]);
    refused(
        &d,
        &["volume", "create", "l2", "--size", "1M", "--label", "a b=c"],
        &["label key", "letters, digits"],
    );
    let (code, body) =
        d.post_json("/v1/volumes", r#"{"name": "l3", "size": "1M", "labels": {"k": "with space"}}"#);
    assert!(code == 400 && body.contains("label value"), "HTTP {code}: {body}");

    // bad sizes
    refused(&d, &["volume", "create", "x1", "--size", "10X"], &["10X", "unknown unit", "K, M, G"]);
    refused(&d, &["volume", "create", "x2", "--size", "0"], &["larger than 0"]);
    refused(&d, &["volume", "create", "x3", "--size", "4097"], &["not a multiple of 4096", "8192"]);
    refused(&d, &["volume", "create", "x4", "--size", "1.5G"], &["unknown unit"]);
    refused(&d, &["volume", "create", "x5", "--size", "17T"], &["maximum"]);
    refused(&d, &["volume", "create", "x6", "--size", ""], &["empty"]);

    // duplicate: a different size is refused; the same request again (a retry) gets the volume
    refused(&d, &["volume", "create", "vol", "--size", "32M"], &["\"vol\" already exists"]);
    let again = d.cli_json(&["volume", "create", "vol", "--size", "16M"]);
    let first = d.cli_json(&["volume", "inspect", "vol"]);
    assert_eq!(again["uuid"], first["uuid"], "a retried create made another volume: {again} vs {first}");
    assert_eq!(
        d.cli_json(&["volume", "inspect", "vol"])["size_bytes"],
        16 * MIB,
        "duplicate create changed the volume"
    );

    // shrink, and bad resize sizes
    refused(&d, &["volume", "resize", "vol", "8M"], &["shrinking is not supported", "16777216"]);
    refused(&d, &["volume", "resize", "vol", "16M+1"], &["unknown unit"]);
    refused(&d, &["volume", "resize", "vol", "16781313"], &["not a multiple of 4096"]);
    assert_eq!(d.cli_json(&["volume", "inspect", "vol"])["size_bytes"], 16 * MIB);

    // unknown volume
    refused(&d, &["volume", "inspect", "nosuch"], &["no volume named \"nosuch\"", "volume list"]);
    refused(&d, &["volume", "resize", "nosuch", "1G"], &["no volume named \"nosuch\""]);
    refused(&d, &["volume", "delete", "nosuch"], &["no volume named \"nosuch\""]);
    refused(&d, &["volume", "delete", "nosuch", "--force"], &["no volume named \"nosuch\""]);

    // nothing above left a volume behind
    let list = d.cli_json(&["volume", "list"]);
    assert_eq!(names(&list), [&"b".repeat(63), "vol"], "{list}");

    // the API refuses bad JSON with an example, and unknown paths with a hint
    let (code, body) = d.get("/v1/volumes/nosuch");
    assert_eq!(code, 404, "{body}");
    let v: Value = serde_json::from_str(&body).expect("error body is JSON");
    assert!(v["error"].as_str().expect("error").contains("no volume named"), "{body}");
    let (code, body) = d.get("/v2/whatever");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("/v1/volumes"), "{body}");

    // an unreachable daemon: a hint, not a stack trace
    let out = raftblk_tests::run(
        raftblk_tests::bin_dir().join("raftblk").to_str().expect("utf-8 path"),
        &["--api", "http://127.0.0.1:1", "volume", "list"],
    );
    assert_eq!(out.code(), 1, "{out}");
    assert!(out.stderr.contains("cannot reach raftblkd"), "{out}");
}

#[test]
fn delete_is_refused_while_a_client_is_connected_and_forced_delete_cuts_it_off() {
    let d = Daemon::start();
    d.create_volume("busy", "8M");
    d.create_volume("other", "8M");

    let mut c = RawNbd::connect(d.nbd_addr, "busy").expect("NBD connect");
    assert_eq!(c.size, 8 * MIB);
    let pattern = vec![0x5au8; 4096];
    assert_eq!(c.write(4096, &pattern).expect("write").error, 0);
    assert_eq!(d.cli_json(&["volume", "inspect", "busy"])["connections"], 1);
    assert_eq!(d.cli_json(&["volume", "inspect", "other"])["connections"], 0);

    refused(&d, &["volume", "delete", "busy"], &["1 open NBD connection", "--force"]);
    // still there, still served
    assert_eq!(d.cli_json(&["volume", "inspect", "busy"])["size_bytes"], 8 * MIB);
    let r = c.read(4096, 4096).expect("read after refused delete");
    assert_eq!(r.error, 0);
    assert_eq!(r.data, pattern);

    // a second connection counts too
    let c2 = RawNbd::connect(d.nbd_addr, "busy").expect("second NBD connect");
    refused(&d, &["volume", "delete", "busy"], &["2 open NBD connection"]);
    c2.disconnect();

    // --force deletes; the held connection's I/O now fails (or it is closed)
    let out = d.cli(&["volume", "delete", "busy", "--force"]);
    assert!(out.ok().contains("deleted volume busy"), "{out}");
    // Err (connection closed) is also acceptable
    if let Ok(r) = c.read(4096, 4096) {
        assert_ne!(r.error, 0, "read on a deleted volume returned data");
    }
    if let Ok(r) = c.write(0, &pattern) {
        assert_ne!(r.error, 0, "write on a deleted volume succeeded");
    }
    c.disconnect();
    assert_eq!(names(&d.cli_json(&["volume", "list"])), ["other"]);

    // a new volume of the same name starts empty, not with the old data
    d.create_volume("busy", "8M");
    let mut c = RawNbd::connect(d.nbd_addr, "busy").expect("NBD connect to recreated volume");
    let r = c.read(4096, 4096).expect("read");
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 0), "recreated volume shows old data");
    c.disconnect();

    // after clients leave, plain delete works again (connection count drops)
    let mut ok = false;
    for _ in 0..100 {
        if d.cli_json(&["volume", "inspect", "busy"])["connections"] == 0 {
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ok, "connection count did not drop to 0 after NBD_CMD_DISC");
    d.cli(&["volume", "delete", "busy"]).ok();
}
