//! The outbound side of a peer link: a bounded queue and one writer task per peer.
//!
//! The `PeerQueue` is filled by `Transport::send*` (synchronous, never blocks: one short mutex
//! hold) and drained by the peer's writer task, which owns the one outbound TCP connection
//! to that peer:
//!
//! * connect (with [`CONNECT_TIMEOUT`]), send a `Hello`, then loop: take everything queued
//!   (up to [`BATCH_BYTES_MAX`] per frame), encode all Raft messages as one `RaftBatch`
//!   frame plus one frame per application message, and write them with vectored writes
//!   (the payloads of large messages are written from the senders' own buffers, not copied
//!   into the frame); wait for more.
//! * The connection is one-way: the peer never writes on it, so a read that returns means
//!   the peer closed it (or broke the protocol); the writer then reconnects.
//! * Any failure (connect, write, write stalled past [`WRITE_TIMEOUT`], peer closed) ends
//!   the connection; the writer retries with exponential backoff from [`RECONNECT_DELAY_MIN`]
//!   to [`RECONNECT_DELAY_MAX`] with jitter, logging the failure and the recovery. Messages
//!   in the failed write are lost (Raft retransmits); messages still queued are sent on the
//!   next connection.
//!
//! # Why dropping the oldest Raft messages is safe
//!
//! Raft is built for a network that loses messages: every message is either retransmitted
//! (a leader re-sends appends from `next_index` after a rejection or a probe, heartbeats go
//! out every tick, candidates re-request votes on the next election timeout) or superseded
//! by a newer one (a later append or heartbeat carries the newer commit index). So when a
//! peer's queue is full, dropping messages only costs a retransmission, never correctness.
//! The oldest go first because the newest carry the most recent terms and indexes, and the
//! oldest are the likeliest to be stale already. Application messages are not Raft's and
//! are not retransmitted, so they are never dropped this way: a full application queue is
//! refused to the caller instead.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::frame::{Body, Frame, FrameError, RaftMessage};
use super::Shared;
use crate::gather::Gather;
use crate::wal::record::NodeId;

/// Raft messages a peer queue holds at most; past it the oldest are dropped.
pub const PEER_QUEUE_RAFT_MESSAGES_MAX: usize = 16 * 1024;

/// Bytes of Raft messages a peer queue holds at most; past it the oldest are dropped (a
/// single message larger than this is still kept, alone).
pub const PEER_QUEUE_RAFT_BYTES_MAX: usize = 64 << 20;

/// Application messages a peer queue holds at most; past it sends are refused.
pub const PEER_QUEUE_APP_MESSAGES_MAX: usize = 1024;

/// Bytes of application messages a peer queue holds at most; past it sends are refused.
pub const PEER_QUEUE_APP_BYTES_MAX: usize = 64 << 20;

/// Bytes of messages the writer puts in one frame (at least one message, however large).
pub const BATCH_BYTES_MAX: usize = 4 << 20;

/// First delay before reconnecting to a peer.
pub const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(50);

/// Largest delay between reconnection attempts; a connection that lived at least this long
/// resets the backoff to [`RECONNECT_DELAY_MIN`].
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one write may stall (peer not reading) before the connection is given up.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an outbound connection ended.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// connect failed: {0}
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    /// connect timed out after {CONNECT_TIMEOUT:?}
    #[error("connect timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout,
    /// write failed: {0}
    #[error("write failed: {0}")]
    Write(std::io::Error),
    /// write stalled for {WRITE_TIMEOUT:?} (peer not reading)
    #[error("write stalled for {WRITE_TIMEOUT:?} (peer not reading)")]
    WriteTimeout,
    /// peer closed the connection
    #[error("peer closed the connection")]
    Closed,
    /// peer sent data on a one-way connection
    #[error("peer sent data on a one-way connection")]
    UnexpectedData,
    /// read failed: {0}
    #[error("read failed: {0}")]
    Read(std::io::Error),
    /// could not encode a frame: {0}
    #[error("could not encode a frame: {0}")]
    Encode(#[from] FrameError),
}

/// What is waiting to go to one peer.
#[derive(Debug, Default)]
pub(crate) struct PeerQueue {
    state: Mutex<QueueState>,
    ready: Notify,
    /// The writer's last attempt to connect failed, and no connection is up since.
    pub(crate) unreachable: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct QueueState {
    raft: VecDeque<RaftMessage>,
    raft_bytes: usize,
    app: VecDeque<Body>,
    app_bytes: usize,
    dropped_since_drain: u64,
}

/// One write's worth of messages taken from a [`PeerQueue`].
#[derive(Debug, Default)]
pub(crate) struct Drained {
    pub raft: Vec<RaftMessage>,
    pub app: Vec<Body>,
    /// Raft messages dropped for lack of room since the previous drain.
    pub dropped: u64,
}

impl Drained {
    fn is_empty(&self) -> bool {
        self.raft.is_empty() && self.app.is_empty()
    }

    fn message_count(&self) -> u64 {
        (self.raft.len() + self.app.len()) as u64
    }
}

fn app_payload_len(body: &Body) -> usize {
    match body {
        Body::AppRequest { payload, .. } | Body::AppResponse { payload, .. } => payload.len(),
        Body::Hello { .. } | Body::RaftBatch(_) => 0,
    }
}

impl PeerQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a Raft message, dropping the oldest ones past the bounds. Returns how many
    /// were dropped.
    pub(crate) fn push_raft(&self, message: RaftMessage) -> u64 {
        let mut dropped = 0;
        {
            let mut s = self.lock();
            s.raft_bytes += message.wire_bytes();
            s.raft.push_back(message);
            while s.raft.len() > 1
                && (s.raft.len() > PEER_QUEUE_RAFT_MESSAGES_MAX || s.raft_bytes > PEER_QUEUE_RAFT_BYTES_MAX)
            {
                if let Some(old) = s.raft.pop_front() {
                    s.raft_bytes -= old.wire_bytes();
                    dropped += 1;
                }
            }
            s.dropped_since_drain += dropped;
        }
        self.ready.notify_one();
        dropped
    }

    /// Queues an application message (an `AppRequest` or `AppResponse` body), or hands it
    /// back if the queue is full.
    pub(crate) fn push_app(&self, body: Body) -> Result<(), Body> {
        {
            let mut s = self.lock();
            let len = app_payload_len(&body);
            if s.app.len() >= PEER_QUEUE_APP_MESSAGES_MAX
                || (!s.app.is_empty() && s.app_bytes + len > PEER_QUEUE_APP_BYTES_MAX)
            {
                return Err(body);
            }
            s.app_bytes += len;
            s.app.push_back(body);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Takes up to [`BATCH_BYTES_MAX`] of Raft messages (at least one if any) and up to as
    /// much of application messages (at least one if any), oldest first.
    pub(crate) fn drain(&self) -> Drained {
        let mut s = self.lock();
        let mut out = Drained { dropped: std::mem::take(&mut s.dropped_since_drain), ..Drained::default() };
        let mut bytes = 0;
        while let Some(m) = s.raft.front() {
            let n = m.wire_bytes();
            if !out.raft.is_empty() && bytes + n > BATCH_BYTES_MAX {
                break;
            }
            bytes += n;
            s.raft_bytes -= n;
            if let Some(m) = s.raft.pop_front() {
                out.raft.push(m);
            }
        }
        let mut bytes = 0;
        while let Some(b) = s.app.front() {
            let n = app_payload_len(b);
            if !out.app.is_empty() && bytes + n > BATCH_BYTES_MAX {
                break;
            }
            bytes += n;
            s.app_bytes -= n;
            if let Some(b) = s.app.pop_front() {
                out.app.push(b);
            }
        }
        out
    }

    /// Raft and application messages waiting.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let s = self.lock();
        s.raft.len() + s.app.len()
    }
}

/// Exponential backoff with jitter for reconnecting.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self { next: RECONNECT_DELAY_MIN, rng: seed | 1 }
    }

    /// The delay before the next attempt: uniformly in `[d/2, d]` where `d` doubles per
    /// call from [`RECONNECT_DELAY_MIN`] up to [`RECONNECT_DELAY_MAX`]. The jitter keeps
    /// the nodes of a cluster from reconnecting in lockstep after a shared failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(RECONNECT_DELAY_MAX);
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half_us = (d.as_micros() / 2) as u64;
        Duration::from_micros(half_us + self.rng % (half_us + 1))
    }

    pub(crate) fn reset(&mut self) {
        self.next = RECONNECT_DELAY_MIN;
    }
}

/// A peer's queue and writer task; dropping it stops the task.
#[derive(Debug)]
pub(crate) struct PeerLink {
    pub(crate) queue: Arc<PeerQueue>,
    addr: watch::Sender<SocketAddr>,
    task: Option<JoinHandle<()>>,
}

impl PeerLink {
    /// Starts the writer task for `peer` on `runtime`.
    pub(crate) fn spawn(
        runtime: &tokio::runtime::Handle,
        shared: Arc<Shared>,
        peer: NodeId,
        addr: SocketAddr,
    ) -> Self {
        let queue = Arc::new(PeerQueue::default());
        let (addr_tx, addr_rx) = watch::channel(addr);
        let writer = Writer { shared, peer, queue: queue.clone(), addr: addr_rx };
        let task = runtime.spawn(writer.run());
        Self { queue, addr: addr_tx, task: Some(task) }
    }

    /// The address the writer connects to.
    pub(crate) fn addr(&self) -> SocketAddr {
        *self.addr.borrow()
    }

    /// Points the writer at a new address; it drops its connection and reconnects at once.
    pub(crate) fn set_addr(&self, addr: SocketAddr) {
        self.addr.send_replace(addr);
    }

    /// Stops the writer and waits until it has let go of its socket.
    pub(crate) async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled is the expected outcome; a panic was already reported by tokio.
            let _ = task.await;
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// How a live connection ended without an error.
enum Ended {
    /// The peer's address changed: reconnect at once.
    AddrChanged,
    /// The link was dropped: stop.
    Stopped,
}

struct Writer {
    shared: Arc<Shared>,
    peer: NodeId,
    queue: Arc<PeerQueue>,
    addr: watch::Receiver<SocketAddr>,
}

impl Writer {
    async fn run(mut self) {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut backoff = Backoff::new(now_ns ^ self.shared.local.0.rotate_left(32) ^ self.peer.0);
        let mut connected_before = false;
        let mut failures: u32 = 0;
        loop {
            let addr = *self.addr.borrow_and_update();
            match self.connect(addr).await {
                Ok(stream) => {
                    let counters = &self.shared.counters;
                    counters.connects.fetch_add(1, Ordering::Relaxed);
                    if connected_before {
                        counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    if failures > 0 || connected_before {
                        info!(peer = %self.peer, %addr, failed_attempts = failures, "reconnected to peer");
                    } else {
                        debug!(peer = %self.peer, %addr, "connected to peer");
                    }
                    connected_before = true;
                    failures = 0;
                    self.queue.unreachable.store(false, Ordering::Relaxed);
                    let started = Instant::now();
                    match self.serve(stream).await {
                        Ok(Ended::Stopped) => return,
                        Ok(Ended::AddrChanged) => {
                            info!(peer = %self.peer, old = %addr, new = %*self.addr.borrow(), "peer address changed; reconnecting");
                            backoff.reset();
                            continue;
                        }
                        Err(e) => {
                            warn!(peer = %self.peer, %addr, error = %e, "connection to peer lost; reconnecting");
                        }
                    }
                    if started.elapsed() >= RECONNECT_DELAY_MAX {
                        backoff.reset();
                    }
                }
                Err(e) => {
                    self.shared.counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                    self.queue.unreachable.store(true, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        warn!(peer = %self.peer, %addr, error = %e, "cannot connect to peer; retrying with backoff");
                    } else {
                        debug!(peer = %self.peer, %addr, error = %e, attempt = failures, "cannot connect to peer");
                    }
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = self.addr.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    backoff.reset();
                }
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, PeerError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::ConnectTimeout)?
            .map_err(PeerError::Connect)?;
        // Raft messages are latency-bound and already batched here.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(peer = %self.peer, error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    }

    async fn serve(&mut self, stream: TcpStream) -> Result<Ended, PeerError> {
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = Gather::default();
        let hello = Frame { from: self.shared.local, body: Body::Hello { cluster: self.shared.cluster } };
        hello.encode_gathered(&mut buf)?;
        self.write(&mut wr, buf.take_parts(), 1).await?;
        let mut probe = [0u8; 1];
        loop {
            loop {
                let drained = self.queue.drain();
                if drained.dropped > 0 {
                    warn!(peer = %self.peer, dropped = drained.dropped, "peer queue full; dropped the oldest Raft messages");
                }
                if drained.is_empty() {
                    break;
                }
                if self.shared.faults.is_outbound_blocked(self.peer) {
                    self.shared.counters.fault_drops.fetch_add(drained.message_count(), Ordering::Relaxed);
                    continue;
                }
                let (frames, raft_n, app_n) = self.encode(drained, &mut buf)?;
                self.write(&mut wr, buf.take_parts(), frames).await?;
                let c = &self.shared.counters;
                c.raft_messages_sent.fetch_add(raft_n, Ordering::Relaxed);
                c.app_messages_sent.fetch_add(app_n, Ordering::Relaxed);
            }
            tokio::select! {
                _ = self.queue.ready.notified() => {}
                read = rd.read(&mut probe) => {
                    return Err(match read {
                        Ok(0) => PeerError::Closed,
                        Ok(_) => PeerError::UnexpectedData,
                        Err(e) => PeerError::Read(e),
                    });
                }
                changed = self.addr.changed() => {
                    return Ok(if changed.is_err() { Ended::Stopped } else { Ended::AddrChanged });
                }
            }
        }
    }

    /// Encodes one write: a `RaftBatch` frame and one frame per application message.
    /// Returns the frame, Raft message and application message counts.
    fn encode(&self, drained: Drained, buf: &mut Gather) -> Result<(u64, u64, u64), FrameError> {
        let from = self.shared.local;
        let raft_n = drained.raft.len() as u64;
        let app_n = drained.app.len() as u64;
        let mut frames = 0;
        if !drained.raft.is_empty() {
            // Sizes were checked by `send`, and a batch stays far below the frame limit.
            Frame { from, body: Body::RaftBatch(drained.raft) }.encode_gathered(buf)?;
            frames += 1;
        }
        for body in drained.app {
            Frame { from, body }.encode_gathered(buf)?;
            frames += 1;
        }
        Ok((frames, raft_n, app_n))
    }

    async fn write(
        &self,
        wr: &mut tokio::net::tcp::OwnedWriteHalf,
        parts: Vec<Bytes>,
        frames: u64,
    ) -> Result<(), PeerError> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        tokio::time::timeout(WRITE_TIMEOUT, write_all_parts(wr, &parts))
            .await
            .map_err(|_| PeerError::WriteTimeout)?
            .map_err(PeerError::Write)?;
        let c = &self.shared.counters;
        c.frames_sent.fetch_add(frames, Ordering::Relaxed);
        c.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Iovecs handed to one `writev`: enough for a batch of large messages, few enough to build
/// on the stack's worth of a `Vec` each call.
const WRITE_SLICES_MAX: usize = 64;

/// Writes `parts` one after another with vectored writes (the payloads are not gathered into
/// one buffer first).
async fn write_all_parts<W: AsyncWrite + Unpin>(wr: &mut W, parts: &[Bytes]) -> io::Result<()> {
    let (mut i, mut offset) = (0, 0);
    loop {
        while i < parts.len() && offset == parts[i].len() {
            i += 1;
            offset = 0;
        }
        if i == parts.len() {
            return Ok(());
        }
        let slices: Vec<IoSlice<'_>> = std::iter::once(&parts[i][offset..])
            .chain(parts[i + 1..].iter().map(|p| &p[..]))
            .take(WRITE_SLICES_MAX)
            .map(IoSlice::new)
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the peer's socket took no bytes"));
        }
        while n > 0 {
            let step = n.min(parts[i].len() - offset);
            offset += step;
            n -= step;
            if offset == parts[i].len() && n > 0 {
                i += 1;
                offset = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::transport::frame::RequestId;
    use crate::wal::record::GroupId;

    fn msg(i: u64, len: usize) -> RaftMessage {
        RaftMessage::new(GroupId(i), Bytes::from(vec![0; len]))
    }

    #[test]
    fn full_queue_drops_the_oldest_raft_messages() {
        let q = PeerQueue::default();
        let extra = 10;
        let mut dropped = 0;
        for i in 0..(PEER_QUEUE_RAFT_MESSAGES_MAX + extra) as u64 {
            dropped += q.push_raft(msg(i, 0));
        }
        assert_eq!(dropped, extra as u64);
        assert_eq!(q.len(), PEER_QUEUE_RAFT_MESSAGES_MAX);
        let d = q.drain();
        assert_eq!(d.dropped, extra as u64);
        assert_eq!(d.raft.first().map(|m| m.group), Some(GroupId(extra as u64)));
        assert_eq!(
            d.raft.last().map(|m| m.group),
            Some(GroupId((PEER_QUEUE_RAFT_MESSAGES_MAX + extra - 1) as u64))
        );
        assert_eq!(q.drain().dropped, 0);
    }

    #[test]
    fn byte_bound_drops_oldest_but_keeps_one_huge_message() {
        let q = PeerQueue::default();
        let big = PEER_QUEUE_RAFT_BYTES_MAX / 2;
        assert_eq!(q.push_raft(msg(1, big)), 0);
        assert_eq!(q.push_raft(msg(2, big)), 1);
        assert_eq!(q.push_raft(msg(3, PEER_QUEUE_RAFT_BYTES_MAX * 2)), 1);
        assert_eq!(q.len(), 1);
        let d = q.drain();
        assert_eq!(d.raft.len(), 1);
        assert_eq!(d.raft[0].group, GroupId(3));
    }

    #[test]
    fn drain_takes_at_most_a_batch_but_at_least_one() {
        let q = PeerQueue::default();
        let n = 3 * BATCH_BYTES_MAX / (1 << 20);
        for i in 0..n as u64 {
            q.push_raft(msg(i, (1 << 20) - 12));
        }
        let mut seen = Vec::new();
        loop {
            let d = q.drain();
            if d.is_empty() {
                break;
            }
            assert!(d.raft.iter().map(RaftMessage::wire_bytes).sum::<usize>() <= BATCH_BYTES_MAX);
            seen.extend(d.raft.into_iter().map(|m| m.group.0));
        }
        assert_eq!(seen, (0..n as u64).collect::<Vec<_>>());
    }

    #[test]
    fn full_app_queue_refuses() {
        let q = PeerQueue::default();
        for i in 0..PEER_QUEUE_APP_MESSAGES_MAX as u64 {
            assert!(q.push_app(Body::AppRequest { id: RequestId(i), payload: Bytes::new() }).is_ok());
        }
        let refused = q.push_app(Body::AppResponse { id: RequestId(0), payload: Bytes::new() });
        assert!(refused.is_err());
        assert_eq!(q.drain().app.len(), PEER_QUEUE_APP_MESSAGES_MAX);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max_and_resets() {
        let mut b = Backoff::new(42);
        let mut d = RECONNECT_DELAY_MIN;
        for _ in 0..10 {
            let got = b.next_delay();
            assert!(got >= d / 2 && got <= d, "{got:?} not in [{:?}, {d:?}]", d / 2);
            d = (d * 2).min(RECONNECT_DELAY_MAX);
        }
        assert!(b.next_delay() >= RECONNECT_DELAY_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= RECONNECT_DELAY_MIN);
    }
}
