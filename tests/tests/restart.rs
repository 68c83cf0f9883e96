//! Crash and shutdown: data acknowledged as flushed survives `kill -9`, and
//! SIGTERM with a client connected exits 0 promptly and loses nothing.

use std::time::{Duration, Instant};

use raftblk_tests::{qemu_io, require_tools, Daemon, RawNbd, MIB};

const LAST_4K: &str = "268431360"; // 256 MiB - 4 KiB

#[test]
fn kill9_then_restart_keeps_flushed_data_and_the_catalog() {
    if !require_tools("kill9", &["qemu-io"]) {
        return;
    }
    let mut d = Daemon::start();
    d.create_volume("keep", "256M");
    d.create_volume("grown", "16M");
    d.cli(&["volume", "resize", "grown", "32M"]).ok();
    d.cli(&["volume", "create", "ro", "--size", "4M", "--read-only"]).ok();
    let uuid = d.cli_json(&["volume", "inspect", "keep"])["uuid"].as_str().expect("uuid").to_string();
    let uri = d.nbd_uri("keep");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 100M 64k",
            &format!("write -P 0x3c {LAST_4K} 4096"),
            "write -P 0x77 50M 4k",
            "discard 50M 4k",
            "flush",
        ],
    )
    .ok();
    // FUA writes need no flush
    qemu_io(&uri, &["write -f -P 0x66 200M 8k"]).ok();
    qemu_io(&d.nbd_uri("grown"), &["write -P 0x12 31M 1M", "flush"]).ok();

    d.kill9();
    assert!(std::net::TcpStream::connect(d.api_addr).is_err(), "API still answers after kill -9");
    d.restart();

    let list = d.cli_json(&["volume", "list"]);
    let sizes: Vec<(String, u64, bool)> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().expect("name").to_string(),
                v["size_bytes"].as_u64().expect("size"),
                v["read_only"].as_bool().expect("read_only"),
            )
        })
        .collect();
    assert_eq!(
        sizes,
        [
            ("grown".to_string(), 32 * MIB, false),
            ("keep".to_string(), 256 * MIB, false),
            ("ro".to_string(), 4 * MIB, true)
        ],
        "{list}"
    );
    assert_eq!(d.cli_json(&["volume", "inspect", "keep"])["uuid"], uuid.as_str());

    qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0xa5 100M 64k",
            &format!("read -P 0x3c {LAST_4K} 4096"),
            "read -P 0 50M 4k",
            "read -P 0x66 200M 8k",
        ],
    )
    .ok();
    qemu_io(&d.nbd_uri("grown"), &["read -P 0x12 31M 1M"]).ok();
    // the check can fail
    assert_eq!(qemu_io(&uri, &["read -P 0x5b 0 1M"]).code(), 1);
    // and the restarted daemon takes writes again, over the restarted unix socket too
    qemu_io(&d.unix_uri("keep"), &["write -P 0x99 2M 64k", "read -P 0x99 2M 64k"]).ok();

    // twice in a row, with a client connected at the moment of the kill
    let mut c = RawNbd::connect(d.nbd_addr, "keep").expect("connect");
    assert_eq!(c.write(3 * MIB, &[0xc3; 4096]).expect("write").error, 0);
    assert_eq!(c.request(raftblk_tests::wire::CMD_FLUSH, 0, 0, 0, &[]).expect("flush").error, 0);
    d.kill9();
    assert!(c.closed_by_server(Duration::from_secs(5)), "client connection survived kill -9");
    d.restart();
    qemu_io(&uri, &["read -P 0xc3 3M 4k", "read -P 0x99 2M 64k", "read -P 0x5a 0 1M"]).ok();
}

#[test]
fn sigterm_with_a_client_connected_exits_zero_and_keeps_data() {
    let mut d = Daemon::start();
    d.create_volume("term", "32M");
    let mut c = RawNbd::connect(d.nbd_addr, "term").expect("connect");
    let mut idle = RawNbd::connect(d.nbd_addr, "term").expect("connect idle client");
    // written, acknowledged, never flushed by the client: a clean shutdown must flush it
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.write(MIB, &pattern).expect("write").error, 0);
    assert_eq!(c.write(31 * MIB, &pattern).expect("write").error, 0);

    let t = Instant::now();
    let status = d.sigterm(Duration::from_secs(10));
    let took = t.elapsed();
    assert!(status.success(), "raftblkd exited with {status} on SIGTERM; log:\n{}", d.log());
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?} with an idle client connected");
    assert!(c.closed_by_server(Duration::from_secs(2)), "client still connected after exit");
    assert!(idle.closed_by_server(Duration::from_secs(2)), "idle client still connected after exit");
    assert!(!d.socket.exists(), "unix socket left behind after a clean exit");
    assert!(
        d.log().contains("bye") || d.log().contains("flushed"),
        "no clean-shutdown line in the log:\n{}",
        d.log()
    );

    d.restart();
    let mut c = RawNbd::connect(d.nbd_addr, "term").expect("connect after restart");
    let r = c.read(MIB, 8192).expect("read");
    assert_eq!(r.error, 0);
    assert!(r.data == pattern, "data at 1 MiB lost over SIGTERM");
    let r = c.read(31 * MIB, 8192).expect("read");
    assert!(r.error == 0 && r.data == pattern, "data at 31 MiB lost over SIGTERM");
    c.disconnect();

    // SIGTERM with nobody connected is quick too
    let t = Instant::now();
    assert!(d.sigterm(Duration::from_secs(10)).success());
    assert!(t.elapsed() < Duration::from_secs(3), "idle SIGTERM took {:?}", t.elapsed());
}

#[test]
fn sigterm_during_a_stream_of_writes_loses_no_acknowledged_write() {
    let mut d = Daemon::start();
    d.create_volume("stream", "32M");
    let addr = d.nbd_addr;
    // a writer that writes block i with byte (i % 255 + 1) until the server goes away
    let writer = std::thread::spawn(move || {
        let mut c = RawNbd::connect(addr, "stream").expect("connect");
        let mut acked = 0u64;
        for i in 0..(32 * MIB / 4096) {
            let block = vec![(i % 255 + 1) as u8; 4096];
            match c.write(i * 4096, &block) {
                Ok(r) if r.error == 0 => acked = i + 1,
                _ => break,
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = d.sigterm(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    let acked = writer.join().expect("writer thread");
    assert!(acked > 0, "no write was acknowledged before SIGTERM");
    d.restart();
    let mut c = RawNbd::connect(d.nbd_addr, "stream").expect("connect");
    for i in 0..acked {
        let r = c.read(i * 4096, 4096).expect("read");
        assert_eq!(r.error, 0);
        let want = (i % 255 + 1) as u8;
        assert!(r.data.iter().all(|&b| b == want), "acknowledged block {i} of {acked} lost over SIGTERM");
    }
    c.disconnect();
}
