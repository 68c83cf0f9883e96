//! The tokio shell: accepts connections, drives the [`Handshake`] state machine, then
//! runs a reader task (frames and validates requests, spawns each) and a writer task
//! (the only owner of the socket's write half) per connection.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::handshake::{Handshake, HandshakeError, Negotiated, Progress};
use super::proto::{Cookie, NbdErrno};
use super::reply::{self, EncodedReply};
use super::request::{decode_frame, validate, Command, RequestError};
use super::ExportCatalog;
use crate::backend::BlockBackend;

/// Most requests one connection has in flight; the reader stops reading at the limit.
pub const MAX_INFLIGHT_REQUESTS: usize = 128;
/// Most read and write data one connection holds for in-flight requests.
pub const MAX_INFLIGHT_PAYLOAD_BYTES: usize = 128 * 1024 * 1024;
/// A client that has not finished negotiating by then is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// On shutdown, how long a connection may take to finish in-flight requests and send
/// their replies before it is dropped.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Capacity of the reply write buffer; larger payloads bypass it.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Room made in the read buffer before each read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Pause after an accept error that may clear up (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// Socket I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Option negotiation broke the protocol.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// The client did not finish negotiating in time.
    #[error("handshake not finished within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    /// A request broke the framing.
    #[error("request framing: {0}")]
    Request(#[from] RequestError),
    /// In-flight requests did not finish within the shutdown grace period.
    #[error("in-flight requests not finished within {SHUTDOWN_DRAIN_TIMEOUT:?} of shutdown")]
    DrainTimeout,
}

/// Serves NBD exports from a catalog.
pub struct NbdServer {
    catalog: Arc<dyn ExportCatalog>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").finish_non_exhaustive()
    }
}

/// An export opened by [`NbdServer::open_direct`], not yet served.
pub struct DirectSession {
    negotiated: Negotiated,
}

impl DirectSession {
    /// Serves through `wrap(backend)` instead (e.g. a fence on writes).
    pub fn wrap_backend(mut self, wrap: impl FnOnce(Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend>) -> Self {
        let inner = Arc::clone(&self.negotiated.export.backend);
        self.negotiated.export.backend = wrap(inner);
        self
    }

    /// The export size to configure the client with.
    pub fn size_bytes(&self) -> u64 {
        self.negotiated.size_bytes
    }

    /// The transmission flags to configure the client with.
    pub fn transmission_flags(&self) -> u16 {
        self.negotiated.transmission_flags
    }

    /// The export's backend (its size may grow while it is served).
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        Arc::clone(&self.negotiated.export.backend)
    }
}

impl std::fmt::Debug for DirectSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.negotiated.fmt(f)
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l) => {
                let (s, peer) = l.accept().await?;
                let peer = match peer.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:unnamed".to_owned(),
                };
                Ok((Stream::Unix(s), peer))
            }
        }
    }
}

/// Accept errors that concern one connection or pass with time; others end serving.
fn accept_error_is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut)
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
        )
}

impl NbdServer {
    /// A server for the exports of `catalog`.
    pub fn new(catalog: Arc<dyn ExportCatalog>) -> Self {
        NbdServer { catalog }
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, lets every connection
    /// finish its in-flight requests (no new requests are read), closes them, and returns.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: CancellationToken) -> io::Result<()> {
        self.serve(Listener::Tcp(listener), shutdown).await
    }

    /// Like [`NbdServer::serve_tcp`], on a Unix socket.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: CancellationToken) -> io::Result<()> {
        self.serve(Listener::Unix(listener), shutdown).await
    }

    /// Opens `name` for a connection whose client skips the handshake: the kernel's NBD
    /// client configured over netlink (see [`crate::kernel_nbd`]), which needs the size and
    /// transmission flags this returns. Simple replies only, as that client expects.
    pub fn open_direct(&self, name: &str, read_only: bool) -> Result<DirectSession, super::OpenError> {
        let mut export = self.catalog.open(name)?;
        export.read_only |= read_only;
        let size_bytes = export.backend.size_bytes();
        let transmission_flags =
            super::handshake::transmission_flags_for(export.read_only, export.multi_conn, false);
        let policy = super::request::TransmissionPolicy {
            read_only: export.read_only,
            structured_replies: false,
            base_allocation: None,
        };
        Ok(DirectSession {
            negotiated: Negotiated {
                export_name: name.to_owned(),
                export,
                size_bytes,
                transmission_flags,
                policy,
            },
        })
    }

    /// Serves an opened [`DirectSession`] on `stream` (already in the transmission phase)
    /// until the client hangs up or `shutdown` is cancelled (in-flight requests finish first).
    pub async fn serve_direct(
        &self,
        session: DirectSession,
        stream: UnixStream,
        shutdown: CancellationToken,
        peer: String,
    ) {
        let (r, w) = stream.into_split();
        info!(%peer, export = %session.negotiated.export_name, "NBD transmission started (kernel attach)");
        let result = transmission(session.negotiated, r, w, BytesMut::new(), shutdown, &peer).await;
        match result {
            Ok(()) => info!(%peer, "NBD connection closed"),
            Err(ConnectionError::Io(e)) => info!(%peer, error = %e, "NBD connection closed"),
            Err(e) => warn!(%peer, error = %e, "NBD connection closed abnormally"),
        }
    }

    async fn serve(&self, listener: Listener, shutdown: CancellationToken) -> io::Result<()> {
        // Connections stop on `shutdown`, or on `stop` if accepting fails for good.
        let stop = shutdown.child_token();
        let mut conns = JoinSet::new();
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                Some(joined) = conns.join_next(), if !conns.is_empty() => log_join(joined),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let catalog = Arc::clone(&self.catalog);
                        let stop = stop.clone();
                        match stream {
                            Stream::Tcp(s) => {
                                if let Err(e) = s.set_nodelay(true) {
                                    warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                                }
                                let (r, w) = s.into_split();
                                conns.spawn(serve_connection(r, w, catalog, stop, peer));
                            }
                            Stream::Unix(s) => {
                                let (r, w) = s.into_split();
                                conns.spawn(serve_connection(r, w, catalog, stop, peer));
                            }
                        }
                    }
                    Err(e) if accept_error_is_transient(&e) => {
                        warn!(error = %e, "NBD accept failed; retrying");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                    Err(e) => {
                        warn!(error = %e, "NBD accept failed; closing every connection");
                        stop.cancel();
                        break Err(e);
                    }
                },
            }
        };
        drop(listener);
        while let Some(joined) = conns.join_next().await {
            log_join(joined);
        }
        result
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        warn!(error = %e, "NBD connection task failed");
    }
}

/// Runs one connection to the end and logs how it ended.
async fn serve_connection<R, W>(
    reader: R,
    writer: W,
    catalog: Arc<dyn ExportCatalog>,
    shutdown: CancellationToken,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    info!(%peer, "NBD connection opened");
    match run_connection(reader, writer, catalog, shutdown, &peer).await {
        Ok(()) => info!(%peer, "NBD connection closed"),
        Err(ConnectionError::Io(e)) => info!(%peer, error = %e, "NBD connection closed"),
        Err(e) => warn!(%peer, error = %e, "NBD connection closed abnormally"),
    }
}

async fn run_connection<R, W>(
    mut reader: R,
    mut writer: W,
    catalog: Arc<dyn ExportCatalog>,
    shutdown: CancellationToken,
    peer: &str,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut input = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let negotiate = negotiate(&mut reader, &mut writer, &mut input, catalog, &shutdown);
    let negotiated = match tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate).await {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ConnectionError::HandshakeTimeout),
    };
    info!(
        %peer,
        export = %negotiated.export_name,
        size_bytes = negotiated.size_bytes,
        structured_replies = negotiated.policy.structured_replies,
        block_status = negotiated.policy.base_allocation.is_some(),
        "NBD transmission started"
    );
    transmission(*negotiated, reader, writer, input, shutdown, peer).await
}

/// Drives the handshake; `None` when the client aborted, hung up, or we shut down.
async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    input: &mut BytesMut,
    catalog: Arc<dyn ExportCatalog>,
    shutdown: &CancellationToken,
) -> Result<Option<Box<Negotiated>>, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hs = Handshake::new(catalog);
    let mut out = BytesMut::new();
    writer.write_all(&Handshake::greeting()).await?;
    loop {
        let progress = hs.receive(input, &mut out);
        if !out.is_empty() {
            writer.write_all(&out).await?;
            out.clear();
        }
        match progress? {
            Progress::NeedMore => {}
            Progress::Aborted => {
                writer.shutdown().await?;
                return Ok(None);
            }
            Progress::Done(n) => {
                writer.flush().await?;
                return Ok(Some(n));
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            n = reader.read_buf(input) => {
                if n? == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

/// What a request task needs.
struct RequestContext {
    backend: Arc<dyn BlockBackend>,
    structured: bool,
}

async fn transmission<R, W>(
    negotiated: Negotiated,
    reader: R,
    writer: W,
    input: BytesMut,
    shutdown: CancellationToken,
    peer: &str,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated { export, policy, .. } = negotiated;
    let ctx = Arc::new(RequestContext {
        backend: Arc::clone(&export.backend),
        structured: policy.structured_replies,
    });
    let (tx, rx) = mpsc::channel::<EncodedReply>(MAX_INFLIGHT_REQUESTS);
    let writer_failed = CancellationToken::new();
    let writer_task = tokio::spawn(write_replies(writer, rx, writer_failed.clone()));
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let payload_budget = Arc::new(Semaphore::new(MAX_INFLIGHT_PAYLOAD_BYTES));

    let reader_result = read_requests(
        reader,
        input,
        &ctx,
        &policy,
        &tx,
        &inflight,
        &payload_budget,
        &shutdown,
        &writer_failed,
        peer,
    )
    .await;

    // Let in-flight requests finish and their replies go out; the semaphore is never
    // closed, so acquiring every permit only waits. A client that stops reading could
    // stall this forever, so once the server shuts down it gets a bounded grace period.
    let abort_writer = writer_task.abort_handle();
    let drain = async move {
        let _all = inflight.acquire_many(MAX_INFLIGHT_REQUESTS as u32).await;
        drop(tx);
        writer_task.await
    };
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_DRAIN_TIMEOUT).await;
    };
    let writer_result = tokio::select! {
        r = drain => r,
        _ = deadline => {
            abort_writer.abort();
            drop(export);
            return Err(ConnectionError::DrainTimeout);
        }
    };
    drop(export);
    reader_result?;
    match writer_result {
        Ok(r) => r.map_err(ConnectionError::Io),
        Err(e) => Err(ConnectionError::Io(io::Error::other(e))),
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<R>(
    mut reader: R,
    mut input: BytesMut,
    ctx: &Arc<RequestContext>,
    policy: &super::request::TransmissionPolicy,
    tx: &mpsc::Sender<EncodedReply>,
    inflight: &Arc<Semaphore>,
    payload_budget: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    writer_failed: &CancellationToken,
    peer: &str,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
{
    loop {
        while let Some(frame) = decode_frame(&mut input)? {
            let cookie = frame.header.cookie;
            let kind = frame.header.kind;
            let command = match validate(frame, ctx.backend.size_bytes(), policy) {
                Ok(Command::Disconnect) => {
                    debug!(%peer, "client sent NBD_CMD_DISC");
                    return Ok(());
                }
                Ok(c) => c,
                Err(rej) => {
                    debug!(%peer, kind, errno = rej.errno.0, reason = rej.reason, "request refused");
                    let r = reply::error_reply(ctx.structured, cookie, rej.errno, rej.reason);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        sent = tx.send(r) => if sent.is_err() {
                            return Ok(());
                        },
                    }
                    continue;
                }
            };
            let payload_bytes = match &command {
                Command::Read { len, .. } => *len,
                Command::Write { data, .. } => data.len() as u32,
                _ => 0,
            };
            let permits = tokio::select! {
                _ = writer_failed.cancelled() => return Ok(()),
                _ = shutdown.cancelled() => return Ok(()),
                p = async {
                    let req = Arc::clone(inflight).acquire_owned().await;
                    let bytes = Arc::clone(payload_budget).acquire_many_owned(payload_bytes).await;
                    (req, bytes)
                } => p,
            };
            let (Ok(req_permit), Ok(byte_permit)) = permits else {
                // The semaphores are never closed.
                return Ok(());
            };
            let ctx = Arc::clone(ctx);
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = execute(&ctx, cookie, command).await;
                // The writer may be gone (peer hung up); the reply is then moot.
                let _ = tx.send(r).await;
                drop(byte_permit);
                drop(req_permit);
            });
        }
        if input.capacity() - input.len() < READ_CHUNK_BYTES {
            input.reserve(READ_CHUNK_BYTES);
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                debug!(%peer, "server shutting down; no more requests read");
                return Ok(());
            }
            _ = writer_failed.cancelled() => return Ok(()),
            n = reader.read_buf(&mut input) => {
                if n? == 0 {
                    if !input.is_empty() {
                        debug!(%peer, bytes = input.len(), "client hung up mid-request");
                    }
                    return Ok(());
                }
            }
        }
    }
}

/// Runs one validated command on the backend and encodes its reply.
async fn execute(ctx: &RequestContext, cookie: Cookie, command: Command) -> EncodedReply {
    let b = &ctx.backend;
    let sr = ctx.structured;
    let fail =
        |e: crate::BackendError| reply::error_reply(sr, cookie, NbdErrno::from_backend(&e), &e.to_string());
    let done = |r: crate::BackendResult<()>| match r {
        Ok(()) => reply::ok_reply(sr, cookie),
        Err(e) => fail(e),
    };
    match command {
        Command::Read { len: 0, .. } => reply::ok_reply(sr, cookie),
        Command::Read { offset, len } => match b.read(offset, len).await {
            Ok(data) if data.len() != len as usize => {
                reply::error_reply(sr, cookie, NbdErrno::EIO, "backend returned a short read")
            }
            Ok(data) if sr => match reply::structured_offset_data(cookie, offset, data, true) {
                Ok(r) => r,
                Err(e) => reply::error_reply(sr, cookie, NbdErrno::EIO, &e.to_string()),
            },
            Ok(data) => reply::simple_read(cookie, data),
            Err(e) => fail(e),
        },
        Command::Write { data, .. } if data.is_empty() => reply::ok_reply(sr, cookie),
        Command::Write { offset, data, fua } => done(b.write(offset, data, fua).await),
        Command::Flush => done(b.flush().await),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => reply::ok_reply(sr, cookie),
        Command::Trim { offset, len, fua } => {
            let mut r = b.trim(offset, u64::from(len)).await;
            if r.is_ok() && fua {
                r = b.flush().await;
            }
            done(r)
        }
        Command::WriteZeroes { offset, len, fua, may_trim, fast_only } => {
            let mut r = b.write_zeroes(offset, u64::from(len), may_trim, fast_only).await;
            if r.is_ok() && fua {
                r = b.flush().await;
            }
            done(r)
        }
        Command::Cache { offset, len } => done(b.cache(offset, u64::from(len)).await),
        Command::BlockStatus { offset, len, req_one, context } => {
            match b.block_status(offset, u64::from(len)).await {
                Ok(extents) => {
                    let ds = reply::descriptors_from_extents(&extents, len, req_one);
                    match reply::structured_block_status(cookie, context, &ds, true) {
                        Ok(r) => r,
                        Err(e) => reply::error_reply(sr, cookie, NbdErrno::EIO, &e.to_string()),
                    }
                }
                Err(e) => fail(e),
            }
        }
        // Handled by the reader; never spawned.
        Command::Disconnect => reply::ok_reply(sr, cookie),
    }
}

/// Owns the write half: writes replies in arrival order, batching while more are
/// queued and flushing when the queue is empty. On an error, cancels `failed`.
async fn write_replies<W>(
    writer: W,
    mut rx: mpsc::Receiver<EncodedReply>,
    failed: CancellationToken,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    let result = async {
        loop {
            let reply = match rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Empty) => {
                    w.flush().await?;
                    match rx.recv().await {
                        Some(r) => r,
                        None => break,
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            };
            w.write_all(&reply.head).await?;
            if !reply.payload.is_empty() {
                // Larger than the buffer: BufWriter hands it straight to the socket.
                w.write_all(&reply.payload).await?;
            }
        }
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.cancel();
    }
    result
}
