//! End-to-end tests: an [`NbdServer`] on a loopback socket, a [`MemBackend`] behind
//! it, and a small hand-written client speaking the wire protocol.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::proto::{
    client_flags, cmd, cmd_flags, info, opt, rep, reply_flags, state, transmission_flags, Cookie,
    BASE_ALLOCATION, IHAVEOPT, NBD_MAGIC, OPTION_REPLY_MAGIC,
};
use super::reply::{decode_reply, BlockDescriptor, Chunk, ReplyMessage};
use super::request::RequestHeader;
use super::{ExportCatalog, ExportInfo, NbdServer, OpenError, OpenExport};
use crate::backend::{BackendResult, BlockBackend, Extent};
use crate::store::MemBackend;

const DISK_BYTES: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Backend wrapper that delays reads, to hold requests in flight.
struct SlowBackend {
    inner: MemBackend,
    read_delay: Duration,
}

#[async_trait]
impl BlockBackend for SlowBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        tokio::time::sleep(self.read_delay).await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> BackendResult<()> {
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.inner.trim(offset, len).await
    }
    async fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> BackendResult<()> {
        self.inner.write_zeroes(o, l, t, f).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.inner.block_status(offset, len).await
    }
}

/// Sets its flag when dropped (stands in for a volume lease).
struct Guard(Arc<AtomicBool>);
impl Drop for Guard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// "disk" (shared MemBackend), "ro" (read-only), "slow" (reads take 300 ms).
struct Catalog {
    disk: Arc<MemBackend>,
    slow: Arc<SlowBackend>,
    guard_dropped: Arc<AtomicBool>,
    opens: AtomicUsize,
}

impl Catalog {
    fn new() -> Arc<Self> {
        Arc::new(Catalog {
            disk: Arc::new(MemBackend::new(DISK_BYTES)),
            slow: Arc::new(SlowBackend {
                inner: MemBackend::new(DISK_BYTES),
                read_delay: Duration::from_millis(300),
            }),
            guard_dropped: Arc::new(AtomicBool::new(false)),
            opens: AtomicUsize::new(0),
        })
    }
}

impl ExportCatalog for Catalog {
    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo { name: "disk".into(), description: "test disk".into() }]
    }
    fn open(&self, name: &str) -> Result<OpenExport, OpenError> {
        self.opens.fetch_add(1, Ordering::SeqCst);
        let (backend, read_only): (Arc<dyn BlockBackend>, bool) = match name {
            "disk" | "" => (self.disk.clone(), false),
            "ro" => (self.disk.clone(), true),
            "slow" => (self.slow.clone(), false),
            other => return Err(OpenError::NotFound(other.into())),
        };
        self.guard_dropped.store(false, Ordering::SeqCst);
        Ok(OpenExport {
            backend,
            read_only,
            multi_conn: true,
            description: "test disk".into(),
            guard: Box::new(Guard(self.guard_dropped.clone())),
        })
    }
}

struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(catalog: Arc<Catalog>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = NbdServer::new(catalog);
    let token = shutdown.clone();
    let task = tokio::spawn(async move { server.serve_tcp(listener, token).await });
    Server { addr, shutdown, task }
}

/// Options to negotiate before `NBD_OPT_GO`.
#[derive(Clone, Copy)]
struct Want {
    structured: bool,
    block_status: bool,
}

const FULL: Want = Want { structured: true, block_status: true };

/// A minimal NBD client over any stream.
struct Client<S> {
    s: S,
    buf: BytesMut,
    structured: bool,
    transmission_flags: u16,
    size_bytes: u64,
    /// Expected data length of simple read replies, by cookie.
    pending_reads: HashMap<u64, usize>,
}

impl Client<TcpStream> {
    async fn tcp(addr: std::net::SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect");
        Client::greet(s).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn greet(mut s: S) -> Self {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.expect("greeting");
        assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        Client {
            s,
            buf: BytesMut::new(),
            structured: false,
            transmission_flags: 0,
            size_bytes: 0,
            pending_reads: HashMap::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send");
    }

    async fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let got = tokio::time::timeout(TIMEOUT, self.s.read_buf(&mut self.buf))
                .await
                .expect("reply in time")
                .expect("read");
            assert!(got > 0, "server closed the connection unexpectedly");
        }
    }

    /// True if the server closes the connection (EOF or reset) within the timeout.
    async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 1024];
        loop {
            match tokio::time::timeout(TIMEOUT, self.s.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn option(&mut self, code: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.put_u64(IHAVEOPT);
        m.put_u32(code);
        m.put_u32(data.len() as u32);
        m.put_slice(data);
        self.send(&m).await;
    }

    /// Reads option replies up to and including the final one (ACK or an error).
    async fn option_replies(&mut self, code: u32) -> Vec<(u32, Bytes)> {
        let mut out = Vec::new();
        loop {
            self.fill(20).await;
            let mut h = &self.buf[..20];
            assert_eq!(h.get_u64(), OPTION_REPLY_MAGIC);
            assert_eq!(h.get_u32(), code);
            let kind = h.get_u32();
            let len = h.get_u32() as usize;
            self.fill(20 + len).await;
            self.buf.advance(20);
            let data = self.buf.split_to(len).freeze();
            out.push((kind, data));
            if kind == rep::ACK || kind & rep::ERR_FLAG != 0 {
                return out;
            }
        }
    }

    async fn negotiate(&mut self, name: &str, want: Want) {
        self.send(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes()).await;
        if want.structured {
            self.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.option_replies(opt::STRUCTURED_REPLY).await, vec![(rep::ACK, Bytes::new())]);
            self.structured = true;
        }
        if want.block_status {
            let mut d = Vec::new();
            d.put_u32(name.len() as u32);
            d.put_slice(name.as_bytes());
            d.put_u32(1);
            d.put_u32(BASE_ALLOCATION.len() as u32);
            d.put_slice(BASE_ALLOCATION.as_bytes());
            self.option(opt::SET_META_CONTEXT, &d).await;
            let rs = self.option_replies(opt::SET_META_CONTEXT).await;
            assert_eq!(rs.len(), 2);
            assert_eq!(rs[0].0, rep::META_CONTEXT);
            assert_eq!(&rs[0].1[4..], BASE_ALLOCATION.as_bytes());
        }
        let mut d = Vec::new();
        d.put_u32(name.len() as u32);
        d.put_slice(name.as_bytes());
        d.put_u16(1);
        d.put_u16(info::BLOCK_SIZE);
        self.option(opt::GO, &d).await;
        let rs = self.option_replies(opt::GO).await;
        assert_eq!(rs.last().map(|r| r.0), Some(rep::ACK), "GO failed: {rs:?}");
        for (kind, mut data) in rs {
            if kind != rep::INFO {
                continue;
            }
            match data.get_u16() {
                info::EXPORT => {
                    self.size_bytes = data.get_u64();
                    self.transmission_flags = data.get_u16();
                }
                info::BLOCK_SIZE => {
                    assert_eq!((data.get_u32(), data.get_u32(), data.get_u32()), (512, 4096, 32 << 20));
                }
                other => panic!("unrequested info {other}"),
            }
        }
    }

    async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader { flags, kind, cookie: Cookie(cookie), offset, len };
        if kind == cmd::READ {
            self.pending_reads.insert(cookie, len as usize);
        }
        self.send(&h.encode()).await;
    }

    async fn write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let h =
            RequestHeader { flags, kind: cmd::WRITE, cookie: Cookie(cookie), offset, len: data.len() as u32 };
        let mut m = h.encode().to_vec();
        m.extend_from_slice(data);
        self.send(&m).await;
    }

    async fn reply(&mut self) -> ReplyMessage {
        loop {
            let pending = &self.pending_reads;
            match decode_reply(&mut self.buf, |c| pending.get(&c.0).copied().unwrap_or(0)) {
                Ok(Some(m)) => {
                    if let ReplyMessage::Simple { cookie, .. } = &m {
                        self.pending_reads.remove(&cookie.0);
                    }
                    return m;
                }
                Ok(None) => {
                    let need = self.buf.len() + 1;
                    self.fill(need).await;
                }
                Err(e) => panic!("bad reply: {e}"),
            }
        }
    }

    /// Collects the chunks of one structured reply (the next reply must be for `cookie`).
    async fn structured_reply(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            match self.reply().await {
                ReplyMessage::Chunk { cookie: c, flags, chunk } => {
                    assert_eq!(c, Cookie(cookie));
                    chunks.push(chunk);
                    if flags & reply_flags::DONE != 0 {
                        return chunks;
                    }
                }
                other => panic!("expected a structured chunk, got {other:?}"),
            }
        }
    }

    /// The error value of the reply to `cookie` (0 on success), any reply form.
    async fn status(&mut self, cookie: u64) -> u32 {
        if self.structured {
            let chunks = self.structured_reply(cookie).await;
            chunks
                .iter()
                .find_map(|c| match c {
                    Chunk::Error { errno, .. } => Some(*errno),
                    _ => None,
                })
                .unwrap_or(0)
        } else {
            match self.reply().await {
                ReplyMessage::Simple { cookie: c, errno, .. } => {
                    assert_eq!(c, Cookie(cookie));
                    errno
                }
                other => panic!("expected a simple reply, got {other:?}"),
            }
        }
    }

    async fn read_structured(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(cmd::READ, 0, cookie, offset, len).await;
        let mut out = vec![0u8; len as usize];
        let mut covered = 0usize;
        for c in self.structured_reply(cookie).await {
            match c {
                Chunk::OffsetData { offset: o, data } => {
                    let at = (o - offset) as usize;
                    out[at..at + data.len()].copy_from_slice(&data);
                    covered += data.len();
                }
                Chunk::OffsetHole { len, .. } => covered += len as usize,
                Chunk::None => {}
                other => panic!("read failed: {other:?}"),
            }
        }
        assert_eq!(covered, len as usize, "read reply covers the whole range");
        out
    }
}

#[tokio::test]
async fn structured_session_reads_writes_and_maps_blocks() {
    let catalog = Catalog::new();
    let server = start(catalog.clone()).await;
    let mut c = Client::tcp(server.addr).await;
    c.negotiate("disk", FULL).await;
    assert_eq!(c.size_bytes, DISK_BYTES);
    use transmission_flags::*;
    let want = HAS_FLAGS
        | SEND_FLUSH
        | SEND_FUA
        | SEND_TRIM
        | SEND_WRITE_ZEROES
        | SEND_FAST_ZERO
        | SEND_CACHE
        | SEND_DF
        | CAN_MULTI_CONN;
    assert_eq!(c.transmission_flags, want);

    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.write(cmd_flags::FUA, 1, 4096, &data).await;
    assert_eq!(c.status(1).await, 0);
    assert_eq!(c.read_structured(2, 4096, 8192).await, data);
    assert_eq!(catalog.disk.read(4096, 8192).await.expect("backend read"), Bytes::from(data.clone()));
    // Unaligned read straddling a hole and data.
    let r = c.read_structured(3, 4000, 200).await;
    assert_eq!(&r[..96], &[0u8; 96][..]);
    assert_eq!(&r[96..], &data[..104]);

    c.request(cmd::BLOCK_STATUS, 0, 4, 0, 4 * 4096).await;
    let chunks = c.structured_reply(4).await;
    let hole = state::HOLE | state::ZERO;
    assert_eq!(
        chunks,
        vec![Chunk::BlockStatus {
            context: super::proto::BASE_ALLOCATION_CONTEXT_ID,
            descriptors: vec![
                BlockDescriptor { len_bytes: 4096, flags: hole },
                BlockDescriptor { len_bytes: 8192, flags: 0 },
                BlockDescriptor { len_bytes: 4096, flags: hole },
            ]
        }]
    );
    c.request(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 5, 4096, 4 * 4096).await;
    match &c.structured_reply(5).await[..] {
        [Chunk::BlockStatus { descriptors, .. }] => {
            assert_eq!(descriptors, &vec![BlockDescriptor { len_bytes: 8192, flags: 0 }])
        }
        other => panic!("unexpected {other:?}"),
    }

    // Trim the first page, zero the second without holes; both read back as zeroes.
    c.request(cmd::TRIM, 0, 6, 4096, 4096).await;
    assert_eq!(c.status(6).await, 0);
    c.request(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE, 7, 8192, 4096).await;
    assert_eq!(c.status(7).await, 0);
    assert_eq!(c.read_structured(8, 4096, 8192).await, vec![0u8; 8192]);
    c.request(cmd::BLOCK_STATUS, 0, 9, 4096, 8192).await;
    match &c.structured_reply(9).await[..] {
        [Chunk::BlockStatus { descriptors, .. }] => assert_eq!(
            descriptors,
            &vec![
                BlockDescriptor { len_bytes: 4096, flags: hole },
                BlockDescriptor { len_bytes: 4096, flags: 0 },
            ]
        ),
        other => panic!("unexpected {other:?}"),
    }
    c.request(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 10, 0, 4096).await;
    assert_eq!(c.status(10).await, 0);
    c.request(cmd::FLUSH, 0, 11, 0, 0).await;
    assert_eq!(c.status(11).await, 0);
    c.request(cmd::CACHE, 0, 12, 0, 4096).await;
    assert_eq!(c.status(12).await, 0);

    // Errors: out of range (read EINVAL, write ENOSPC), unknown command and flag,
    // zero-length block status. The write payload is consumed: the stream stays in sync.
    c.request(cmd::READ, 0, 20, DISK_BYTES - 512, 1024).await;
    let chunks = c.structured_reply(20).await;
    assert!(matches!(&chunks[..], [Chunk::Error { errno: 22, message }] if !message.is_empty()));
    c.write(0, 21, DISK_BYTES - 512, &[1u8; 1024]).await;
    assert_eq!(c.status(21).await, 28);
    c.request(cmd::WRITE_ZEROES, 0, 22, DISK_BYTES, 1).await;
    assert_eq!(c.status(22).await, 28);
    c.request(cmd::TRIM, 0, 23, u64::MAX, 2).await;
    assert_eq!(c.status(23).await, 22);
    c.request(42, 0, 24, 0, 0).await;
    assert_eq!(c.status(24).await, 22);
    c.request(cmd::FLUSH, cmd_flags::REQ_ONE, 25, 0, 0).await;
    assert_eq!(c.status(25).await, 22);
    c.request(cmd::BLOCK_STATUS, 0, 26, 0, 0).await;
    assert_eq!(c.status(26).await, 22);
    c.request(cmd::READ, 0, 27, 0, (32 << 20) + 1).await;
    assert_eq!(c.status(27).await, 22);
    // A zero-length read succeeds with no data.
    c.request(cmd::READ, 0, 28, 0, 0).await;
    assert_eq!(c.structured_reply(28).await, vec![Chunk::None]);

    // Soft disconnect: the server closes and drops the export's guard.
    c.request(cmd::DISC, 0, 99, 0, 0).await;
    assert!(c.closed().await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(catalog.guard_dropped.load(Ordering::SeqCst), "guard dropped after close");

    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn simple_replies_and_export_name() {
    let server = start(Catalog::new()).await;
    let mut c = Client::tcp(server.addr).await;
    c.send(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes()).await;
    c.option(opt::LIST, &[]).await;
    let rs = c.option_replies(opt::LIST).await;
    assert_eq!(rs.len(), 2);
    assert_eq!(&rs[0].1[..], b"\x00\x00\x00\x04disktest disk");
    c.option(opt::EXPORT_NAME, b"disk").await;
    c.fill(10).await;
    assert_eq!(c.buf.get_u64(), DISK_BYTES);
    let flags = c.buf.get_u16();
    assert_eq!(flags & transmission_flags::SEND_DF, 0, "no DF without structured replies");

    c.write(0, 1, 0, b"hello, nbd").await;
    assert_eq!(c.status(1).await, 0);
    c.request(cmd::READ, 0, 2, 0, 10).await;
    assert_eq!(
        c.reply().await,
        ReplyMessage::Simple { cookie: Cookie(2), errno: 0, data: Bytes::from_static(b"hello, nbd") }
    );
    // An error reply to a read carries no data.
    c.request(cmd::READ, 0, 3, DISK_BYTES, 512).await;
    assert_eq!(c.reply().await, ReplyMessage::Simple { cookie: Cookie(3), errno: 22, data: Bytes::new() });
    // No structured replies, so no block status and no DF.
    c.request(cmd::BLOCK_STATUS, 0, 4, 0, 512).await;
    assert_eq!(c.status(4).await, 22);
    c.request(cmd::READ, cmd_flags::DF, 5, 0, 512).await;
    assert_eq!(c.status(5).await, 22);
    c.request(cmd::READ, 0, 6, 0, 4).await;
    assert!(matches!(c.reply().await, ReplyMessage::Simple { errno: 0, data, .. } if &data[..] == b"hell"));
    server.shutdown.cancel();
    assert!(c.closed().await, "shutdown closes idle connections");
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn read_only_exports_refuse_writes() {
    let server = start(Catalog::new()).await;
    let mut c = Client::tcp(server.addr).await;
    c.negotiate("ro", Want { structured: true, block_status: false }).await;
    assert_ne!(c.transmission_flags & transmission_flags::READ_ONLY, 0);
    assert_eq!(c.transmission_flags & transmission_flags::CAN_MULTI_CONN, transmission_flags::CAN_MULTI_CONN);
    c.write(0, 1, 0, &[1u8; 512]).await;
    assert_eq!(c.status(1).await, 1);
    c.request(cmd::TRIM, 0, 2, 0, 512).await;
    assert_eq!(c.status(2).await, 1);
    c.request(cmd::WRITE_ZEROES, 0, 3, 0, 512).await;
    assert_eq!(c.status(3).await, 1);
    assert_eq!(c.read_structured(4, 0, 512).await, vec![0u8; 512]);
    // Block status without a negotiated context.
    c.request(cmd::BLOCK_STATUS, 0, 5, 0, 512).await;
    assert_eq!(c.status(5).await, 22);
    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn handshake_errors_and_abort() {
    let catalog = Catalog::new();
    let server = start(catalog.clone()).await;

    let mut c = Client::tcp(server.addr).await;
    c.send(&client_flags::FIXED_NEWSTYLE.to_be_bytes()).await;
    let mut d = Vec::new();
    d.put_u32(4);
    d.put_slice(b"nope");
    d.put_u16(0);
    c.option(opt::GO, &d).await;
    assert_eq!(c.option_replies(opt::GO).await[0].0, rep::ERR_UNKNOWN);
    c.option(opt::STARTTLS, &[]).await;
    assert_eq!(c.option_replies(opt::STARTTLS).await[0].0, rep::ERR_UNSUP);
    c.option(opt::ABORT, &[]).await;
    assert_eq!(c.option_replies(opt::ABORT).await, vec![(rep::ACK, Bytes::new())]);
    assert!(c.closed().await);

    // Unknown client flags: closed without a word.
    let mut c = Client::tcp(server.addr).await;
    c.send(&0x8000_0001u32.to_be_bytes()).await;
    assert!(c.closed().await);

    // Oversized option data: closed.
    let mut c = Client::tcp(server.addr).await;
    c.send(&client_flags::FIXED_NEWSTYLE.to_be_bytes()).await;
    let mut m = Vec::new();
    m.put_u64(IHAVEOPT);
    m.put_u32(opt::GO);
    m.put_u32(1 << 20);
    c.send(&m).await;
    assert!(c.closed().await);

    // EXPORT_NAME for an unknown export: closed (it cannot fail politely).
    let mut c = Client::tcp(server.addr).await;
    c.send(&client_flags::FIXED_NEWSTYLE.to_be_bytes()).await;
    c.option(opt::EXPORT_NAME, b"missing").await;
    assert!(c.closed().await);

    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn bad_magic_closes_only_that_connection() {
    let server = start(Catalog::new()).await;
    let mut good = Client::tcp(server.addr).await;
    good.negotiate("disk", FULL).await;
    let mut bad = Client::tcp(server.addr).await;
    bad.negotiate("disk", FULL).await;

    let mut garbage =
        RequestHeader { flags: 0, kind: cmd::READ, cookie: Cookie(1), offset: 0, len: 512 }.encode();
    garbage[..4].copy_from_slice(b"GARB");
    bad.send(&garbage).await;
    assert!(bad.closed().await, "bad magic closes the connection");

    // An oversized write payload also closes (cleanly) only its own connection.
    let mut big = Client::tcp(server.addr).await;
    big.negotiate("disk", FULL).await;
    let h = RequestHeader { flags: 0, kind: cmd::WRITE, cookie: Cookie(1), offset: 0, len: (32 << 20) + 1 };
    big.send(&h.encode()).await;
    assert!(big.closed().await, "oversized write payload closes the connection");

    good.write(0, 7, 0, b"still here").await;
    assert_eq!(good.status(7).await, 0);
    assert_eq!(good.read_structured(8, 0, 10).await, b"still here".to_vec());

    // A fresh connection works too.
    let mut fresh = Client::tcp(server.addr).await;
    fresh.negotiate("disk", FULL).await;
    assert_eq!(fresh.read_structured(1, 0, 10).await, b"still here".to_vec());

    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn pipelined_requests_complete_and_each_is_answered_once() {
    let server = start(Catalog::new()).await;
    let mut c = Client::tcp(server.addr).await;
    c.negotiate("disk", FULL).await;

    // More requests than MAX_INFLIGHT_REQUESTS, all sent before reading any reply.
    const N: u64 = 300;
    let pattern = |i: u64| vec![(i % 256) as u8; 2048];
    let mut wire = Vec::new();
    for i in 0..N {
        let h = RequestHeader { flags: 0, kind: cmd::WRITE, cookie: Cookie(i), offset: i * 2048, len: 2048 };
        wire.extend_from_slice(&h.encode());
        wire.extend_from_slice(&pattern(i));
    }
    let (mut rd, mut wr) = tokio::io::split(c.s);
    let sender = tokio::spawn(async move {
        wr.write_all(&wire).await.expect("send pipeline");
        wr
    });
    let mut buf = BytesMut::new();
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let msg = loop {
            if let Some(m) = decode_reply(&mut buf, |_| 0).expect("valid reply") {
                break m;
            }
            let n =
                tokio::time::timeout(TIMEOUT, rd.read_buf(&mut buf)).await.expect("in time").expect("read");
            assert!(n > 0);
        };
        let ReplyMessage::Chunk { cookie, flags, chunk: Chunk::None } = msg else {
            panic!("unexpected {msg:?}")
        };
        assert_ne!(flags & reply_flags::DONE, 0);
        assert!(!std::mem::replace(&mut seen[cookie.0 as usize], true), "cookie answered twice");
    }
    assert!(seen.iter().all(|s| *s));
    let wr = sender.await.expect("sender");
    c.s = rd.unsplit(wr);
    c.buf = buf;

    // Concurrent reads of what was written, also pipelined.
    for i in 0..N {
        c.request(cmd::READ, 0, 1000 + i, i * 2048, 2048).await;
    }
    let mut got = HashMap::new();
    for _ in 0..N {
        match c.reply().await {
            ReplyMessage::Chunk { cookie, chunk: Chunk::OffsetData { offset, data }, flags } => {
                assert_ne!(flags & reply_flags::DONE, 0);
                assert_eq!(offset, (cookie.0 - 1000) * 2048);
                got.insert(cookie.0 - 1000, data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 0..N {
        assert_eq!(got.get(&i).map(|d| d.to_vec()), Some(pattern(i)), "block {i}");
    }
    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn replies_complete_out_of_order() {
    // A slow read issued first is answered after a fast write issued second.
    let server = start(Catalog::new()).await;
    let mut c = Client::tcp(server.addr).await;
    c.negotiate("slow", FULL).await;
    c.request(cmd::READ, 0, 1, 0, 512).await;
    c.write(0, 2, 4096, &[9u8; 512]).await;
    assert_eq!(c.reply().await.cookie(), Cookie(2));
    assert_eq!(c.reply().await.cookie(), Cookie(1));
    server.shutdown.cancel();
    server.task.await.expect("join").expect("serve_tcp");
}

#[tokio::test]
async fn shutdown_finishes_inflight_requests_then_closes() {
    let server = start(Catalog::new()).await;
    let mut c = Client::tcp(server.addr).await;
    c.negotiate("slow", FULL).await;
    c.request(cmd::READ, 0, 1, 0, 512).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.shutdown.cancel();
    // The slow read (300 ms) still gets its reply, then the connection closes.
    let chunks = c.structured_reply(1).await;
    assert!(matches!(&chunks[..], [Chunk::OffsetData { data, .. }] if data.len() == 512));
    assert!(c.closed().await);
    tokio::time::timeout(TIMEOUT, server.task).await.expect("serve returns").expect("join").expect("ok");
    // No longer accepting.
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn unix_socket_serves_the_default_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let catalog = Catalog::new();
    let shutdown = CancellationToken::new();
    let server = NbdServer::new(catalog.clone());
    let token = shutdown.clone();
    let task = tokio::spawn(async move { server.serve_unix(listener, token).await });

    let s = UnixStream::connect(&path).await.expect("connect");
    let mut c = Client::greet(s).await;
    c.negotiate("", Want { structured: false, block_status: false }).await;
    assert_eq!(c.size_bytes, DISK_BYTES);
    c.write(0, 1, 512, b"unix").await;
    assert_eq!(c.status(1).await, 0);
    c.request(cmd::READ, 0, 2, 512, 4).await;
    assert!(matches!(c.reply().await, ReplyMessage::Simple { errno: 0, data, .. } if &data[..] == b"unix"));
    assert_eq!(catalog.disk.read(512, 4).await.expect("read"), Bytes::from_static(b"unix"));
    shutdown.cancel();
    task.await.expect("join").expect("serve_unix");
}
