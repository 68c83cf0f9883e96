//! Requests well-behaved clients do not send: out of range, oversized, unknown
//! flags and commands, block status without a metadata context. Each must get
//! the NBD spec's error, leave the connection usable, and leave other clients
//! untouched.

use std::time::Duration;

use raftblk_tests::{python, require_python_nbd, wire, Daemon, RawNbd, MIB};

/// Runs every case on one connection (`h`) while a second connection (`other`)
/// keeps working; prints `label errno` per case. Any unexpected outcome raises.
const LIBNBD_SCRIPT: &str = r#"
import nbd, sys

def errname(e):
    v = e.errno
    if isinstance(v, int):
        import errno as E
        return E.errorcode.get(v, str(v))
    return str(v)

uri = sys.argv[1]
h = nbd.NBD()
h.set_strict_mode(0)          # let libnbd send what the server must refuse
h.add_meta_context("base:allocation")
h.connect_uri(uri)
size = h.get_size()
assert size == 64 * 1024 * 1024, size
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024

other = nbd.NBD()
other.connect_uri(uri)
A = b"\xa5" * 4096
B = b"\x5b" * 4096
h.pwrite(A, 0)
other.pwrite(B, 8192)
other.flush()

def healthy():
    assert h.pread(4096, 0) == A, "normal read on the same connection failed"
    assert other.pread(4096, 8192) == B, "other connection affected"
    assert other.pread(4096, 0) == A, "other connection sees different data"

def expect_error(label, fn, allowed):
    try:
        fn()
    except nbd.Error as e:
        name = errname(e)
        print(label, name, flush=True)
        if name not in allowed:
            raise SystemExit("%s: got %s, expected one of %s (%s)" % (label, name, allowed, e.string))
    else:
        raise SystemExit("%s: succeeded, expected one of %s" % (label, allowed))
    healthy()

healthy()
expect_error("read-past-end", lambda: h.pread(4096, size), ["EINVAL"])
expect_error("read-straddling-end", lambda: h.pread(8192, size - 4096), ["EINVAL"])
expect_error("read-offset-huge", lambda: h.pread(4096, 2**63), ["EINVAL"])
expect_error("write-past-end", lambda: h.pwrite(A, size), ["ENOSPC", "EINVAL"])
expect_error("write-straddling-end", lambda: h.pwrite(A + A, size - 4096), ["ENOSPC", "EINVAL"])
expect_error("trim-past-end", lambda: h.trim(8192, size - 4096), ["ENOSPC", "EINVAL"])
expect_error("zero-past-end", lambda: h.zero(8192, size - 4096), ["ENOSPC", "EINVAL"])
expect_error("read-over-32MiB", lambda: h.pread(32 * 1024 * 1024 + 4096, 0), ["EINVAL", "EOVERFLOW"])
expect_error("read-unknown-flag", lambda: h.pread(4096, 0, flags=1 << 9), ["EINVAL"])
expect_error("write-unknown-flag", lambda: h.pwrite(B, 0, flags=1 << 12), ["EINVAL"])  # healthy() checks A is still at 0
expect_error("flush-with-offset-len-and-bad-flag", lambda: h.flush(flags=1 << 14), ["EINVAL"])

# the past-end write and the refused flagged write left the data alone
assert h.pread(4096, size - 4096) == bytearray(4096)

# block status without a negotiated context, on a second handle
n = nbd.NBD()
n.set_strict_mode(0)
n.connect_uri(uri)
assert not n.can_meta_context("base:allocation")
try:
    n.block_status(4096, 0, lambda *a: 0)
except nbd.Error as e:
    print("block-status-no-context", errname(e), flush=True)
    if errname(e) != "EINVAL":
        raise SystemExit("block status without context: %s" % errname(e))
else:
    raise SystemExit("block status without context succeeded")
assert n.pread(4096, 0) == A
healthy()

# unaligned (but in range) requests are served: the server is lenient
h.pwrite(b"xyz", 16382)           # straddles a 4 KiB block boundary
assert h.pread(6, 16381) == b"\0xyz\0\0", h.pread(6, 16381)
assert other.pread(4096, 12288)[-2:] == b"xy"     # (other is strict: aligned reads only)
assert other.pread(4096, 16384)[:2] == b"z\0"

# block status with the context works and reports data at 0
seen = []
h.block_status(65536, 0, lambda meta, off, entries, err: seen.append((meta, entries)) or 0)
assert seen and seen[0][0] == "base:allocation", seen
assert seen[0][1][1] & 1 == 0, seen   # offset 0 is allocated
healthy()
print("ALL OK")
"#;

#[test]
fn libnbd_malformed_requests_get_spec_errors_and_connections_survive() {
    if !require_python_nbd("malformed") {
        return;
    }
    let d = Daemon::start();
    d.create_volume("m", "64M");
    for uri in [d.nbd_uri("m"), d.unix_uri("m")] {
        let out = python(LIBNBD_SCRIPT, &[&uri]);
        assert!(out.ok().contains("ALL OK"), "{out}");
        for label in [
            "read-past-end EINVAL",
            "read-over-32MiB",
            "read-unknown-flag EINVAL",
            "block-status-no-context EINVAL",
        ] {
            assert!(out.stdout.contains(label), "{label} missing: {out}");
        }
    }
    let (code, body) = d.get("/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
}

#[test]
fn raw_protocol_abuse_unknown_commands_and_oversized_writes() {
    let d = Daemon::start();
    d.create_volume("raw", "16M");
    let mut c = RawNbd::connect(d.nbd_addr, "raw").expect("connect");
    let mut bystander = RawNbd::connect(d.nbd_addr, "raw").expect("connect bystander");
    assert_eq!(c.size, 16 * MIB);
    // HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
    for bit in [0, 2, 3, 5, 6, 8] {
        assert_ne!(c.flags & (1 << bit), 0, "transmission flag bit {bit} missing: {:#x}", c.flags);
    }
    assert_eq!(c.flags & 2, 0, "read-only flag set on a read-write volume");
    let data = vec![0x42u8; 4096];
    assert_eq!(c.write(0, &data).expect("write").error, 0);

    // unknown command types: EINVAL, connection usable
    for cmd in [8u16, 99, 0xffff] {
        let r = c.request(cmd, 0, 0, 4096, &[]).expect("reply to an unknown command");
        assert_eq!(r.error, wire::EINVAL, "command type {cmd}");
        assert_eq!(c.read(0, 4096).expect("read").data, data);
    }
    // offset + length overflows u64
    let r = c.read(u64::MAX - 100, 4096).expect("reply");
    assert_eq!(r.error, wire::EINVAL);
    // simple replies carry no payload on error: the stream must stay in sync
    let r = c.read(16 * MIB, 4096).expect("reply");
    assert_eq!(r.error, wire::EINVAL);
    assert_eq!(c.read(0, 4096).expect("read").data, data);
    // DF on a connection without structured replies
    // (EINVAL, or ignored by a lenient server; the stream must stay in sync)
    let r = c.request(wire::CMD_READ, 1 << 2, 0, 4096, &[]).expect("reply");
    assert!(
        r.error == wire::EINVAL || (r.error == 0 && r.data == data),
        "DF without structured replies: {r:?}"
    );
    assert_eq!(c.read(0, 4096).expect("read").data, data);
    // pipelined requests are all answered, each cookie once
    let mut cookies = std::collections::BTreeSet::new();
    for i in 0..32u64 {
        cookies.insert(c.send(wire::CMD_WRITE, 0, (64 + i) * 4096, 4096, &data).expect("send"));
    }
    for _ in 0..32 {
        let (cookie, error) = c.recv_simple_reply_header().expect("reply");
        assert_eq!(error, 0);
        assert!(cookies.remove(&cookie), "unexpected or repeated cookie {cookie}");
    }
    assert_eq!(c.read(64 * 4096, 4096).expect("read").data, data);
    drop(c);

    // a write whose payload is above the 32 MiB maximum: the server may
    // refuse it or close the connection, but must not fall over
    let mut big = RawNbd::connect(d.nbd_addr, "raw").expect("connect");
    let payload = vec![0x77u8; 32 * MIB as usize + 4096];
    big.set_read_timeout(Duration::from_secs(10));
    // Err (connection closed) is allowed
    if let Ok(r) = big.write(0, &payload) {
        assert_ne!(r.error, 0, "oversized write accepted");
    }
    drop(big);
    // the bystander did not notice, and nothing of the oversized write landed
    let r = bystander.read(0, 4096).expect("bystander read");
    assert_eq!(r.error, 0);
    assert_eq!(r.data, data);
    bystander.disconnect();

    // a garbage greeting reply / option and a client that vanishes mid-request
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(d.nbd_addr).expect("connect");
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    {
        let mut v = RawNbd::connect(d.nbd_addr, "raw").expect("connect");
        let _ = v.send(wire::CMD_WRITE, 0, 0, 4096, &data[..100]); // header promises 4096, sends 100
    }
    let mut again = RawNbd::connect(d.nbd_addr, "raw").expect("server still accepts clients");
    assert_eq!(again.read(0, 4096).expect("read").data, data);
    again.disconnect();
    assert_eq!(d.get("/healthz").0, 200);
}
