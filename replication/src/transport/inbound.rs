//! The inbound side: the listener and one reader task per accepted connection.
//!
//! A connection must open with a `Hello` (within [`HELLO_TIMEOUT`]) naming a valid node id
//! and this node's cluster; after it, every frame must come from that node and be a Raft
//! batch or an application message. Each Raft message and application message is handed
//! to the transport's handler channel in arrival order; a full handler channel stops the
//! reader, which lets TCP flow control push back on the sender.
//!
//! Anything else (a CRC failure, a framing violation, a wrong cluster, a second `Hello`, a
//! frame from another node, EOF inside a frame) closes that connection only: other
//! connections, and this node's outbound links, are not affected. The sender's writer sees
//! the close and reconnects.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::frame::{self, Body, ClusterId, Decoded, Frame, FrameError};
use super::{Inbound, Shared};
use crate::wal::record::NodeId;

/// How long a new connection may take to send its `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Inbound connections served at once; more are closed on accept.
pub const INBOUND_CONNECTIONS_MAX: usize = 1024;

/// How long the listener pauses after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// Most bytes reserved for one read before the peer's `Hello`, however large the frame being
/// read. After it, the rest of a frame is reserved at once: a large frame (a MsgAppend of
/// MiB-sized entries) then lands in one buffer instead of being moved each time it grows.
const READ_RESERVE_BYTES_MAX: usize = 1 << 20;

/// Least bytes reserved for one read.
const READ_RESERVE_BYTES_MIN: usize = 64 << 10;

/// Why an inbound connection was closed.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    /// read failed: {0}
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// bad frame: {0}
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// connection closed inside a frame
    #[error("connection closed inside a frame")]
    TruncatedFrame,
    /// no Hello within {HELLO_TIMEOUT:?}
    #[error("no Hello within {HELLO_TIMEOUT:?}")]
    HelloTimeout,
    /// first frame was not a Hello
    #[error("first frame was not a Hello")]
    NoHello,
    /// node {node} is in cluster {theirs:?}, this node in {ours:?}
    #[error("node {node} is in cluster {theirs:?}, this node in {ours:?}")]
    WrongCluster {
        /// The node that connected.
        node: NodeId,
        /// Its cluster.
        theirs: ClusterId,
        /// This node's cluster.
        ours: ClusterId,
    },
    /// Hello from invalid node id {0}
    #[error("Hello from invalid node id {0}")]
    InvalidNode(NodeId),
    /// second Hello on a connection
    #[error("second Hello on a connection")]
    UnexpectedHello,
    /// connection of node {hello} carried a frame from node {frame}
    #[error("connection of node {hello} carried a frame from node {frame}")]
    WrongSender {
        /// The node named by the Hello.
        hello: NodeId,
        /// The node named by the frame.
        frame: NodeId,
    },
}

impl InboundError {
    /// Whether the peer broke the protocol (as opposed to the connection just ending).
    fn is_violation(&self) -> bool {
        !matches!(self, InboundError::Io(_))
    }
}

/// Accepts connections until aborted; dropping this future closes the listener and aborts
/// every connection it accepted.
pub(crate) async fn run_listener(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    if conns.len() >= INBOUND_CONNECTIONS_MAX {
                        warn!(%remote, limit = INBOUND_CONNECTIONS_MAX, "too many inbound connections; closing the new one");
                        shared.counters.inbound_rejected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    shared.counters.inbound_accepted.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve(shared.clone(), stream, remote));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_DELAY).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream, remote: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%remote, error = %e, "cannot set TCP_NODELAY");
    }
    let mut conn = Conn { shared, stream, remote, buf: BytesMut::new(), reserve_max: READ_RESERVE_BYTES_MAX };
    match conn.run().await {
        Ok(node) => debug!(%remote, peer = ?node, "inbound connection closed"),
        Err(e) if e.is_violation() => {
            conn.shared.counters.inbound_rejected.fetch_add(1, Ordering::Relaxed);
            warn!(%remote, error = %e, "closing inbound connection");
        }
        Err(e) => debug!(%remote, error = %e, "inbound connection failed"),
    }
}

struct Conn {
    shared: Arc<Shared>,
    stream: TcpStream,
    remote: SocketAddr,
    buf: BytesMut,
    /// Most bytes one read reserves (see [`READ_RESERVE_BYTES_MAX`]).
    reserve_max: usize,
}

impl Conn {
    /// Serves the connection until it ends; returns the peer if it said Hello.
    async fn run(&mut self) -> Result<Option<NodeId>, InboundError> {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, self.read_frame()).await {
            Err(_) => return Err(InboundError::HelloTimeout),
            Ok(frame) => frame?,
        };
        let Some(hello) = hello else { return Ok(None) };
        let node = hello.from;
        match hello.body {
            Body::Hello { cluster } if cluster != self.shared.cluster => {
                return Err(InboundError::WrongCluster { node, theirs: cluster, ours: self.shared.cluster });
            }
            Body::Hello { .. } if node == NodeId(0) || node == self.shared.local => {
                return Err(InboundError::InvalidNode(node));
            }
            Body::Hello { .. } => {}
            _ => return Err(InboundError::NoHello),
        }
        debug!(remote = %self.remote, peer = %node, "inbound connection from peer");
        self.reserve_max = frame::FRAME_HEADER_BYTES + frame::FRAME_BODY_BYTES_MAX;
        while let Some(frame) = self.read_frame().await? {
            if frame.from != node {
                return Err(InboundError::WrongSender { hello: node, frame: frame.from });
            }
            if self.shared.faults.is_inbound_blocked(node) {
                let n = match &frame.body {
                    Body::RaftBatch(m) => m.len() as u64,
                    _ => 1,
                };
                self.shared.counters.fault_drops.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            if !self.deliver(frame).await? {
                debug!(peer = %node, "handler closed; closing inbound connection");
                return Ok(Some(node));
            }
        }
        Ok(Some(node))
    }

    /// Hands a frame's messages to the handler; false if the handler is gone.
    async fn deliver(&self, frame: Frame) -> Result<bool, InboundError> {
        let from = frame.from;
        let handler = &self.shared.handler;
        let c = &self.shared.counters;
        match frame.body {
            Body::Hello { .. } => return Err(InboundError::UnexpectedHello),
            Body::RaftBatch(messages) => {
                for m in messages {
                    c.raft_messages_received.fetch_add(1, Ordering::Relaxed);
                    if handler.send(Inbound::Raft { from, group: m.group, bytes: m.bytes }).await.is_err() {
                        return Ok(false);
                    }
                }
            }
            Body::AppRequest { id, payload } => {
                c.app_messages_received.fetch_add(1, Ordering::Relaxed);
                if handler.send(Inbound::AppRequest { from, id, payload }).await.is_err() {
                    return Ok(false);
                }
            }
            Body::AppResponse { id, payload } => {
                c.app_messages_received.fetch_add(1, Ordering::Relaxed);
                if handler.send(Inbound::AppResponse { from, id, payload }).await.is_err() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Reads the next frame; `None` at a clean EOF between frames.
    async fn read_frame(&mut self) -> Result<Option<Frame>, InboundError> {
        loop {
            let before = self.buf.len();
            match frame::decode(&mut self.buf) {
                Decoded::Complete(frame) => {
                    let c = &self.shared.counters;
                    c.frames_received.fetch_add(1, Ordering::Relaxed);
                    c.bytes_received.fetch_add((before - self.buf.len()) as u64, Ordering::Relaxed);
                    return Ok(Some(frame));
                }
                Decoded::Corrupt(e) => return Err(e.into()),
                Decoded::NeedMore(n) => {
                    self.buf.reserve(n.clamp(READ_RESERVE_BYTES_MIN, self.reserve_max));
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return if self.buf.is_empty() {
                            Ok(None)
                        } else {
                            Err(InboundError::TruncatedFrame)
                        };
                    }
                }
            }
        }
    }
}
