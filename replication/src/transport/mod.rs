//! The peer transport shared by every Raft group on a node.
//!
//! Every volume is one Raft group and a node runs many; they all talk to other nodes over
//! one [`Transport`]: one outbound TCP connection per peer, carrying the messages of every
//! group, batched.
//!
//! ```text
//! Raft driver ── send(to, group, bytes) ──▶ peer queue (bounded; full → drop oldest Raft msg)
//!   (any thread, never blocks)                 │ writer task per peer (peer.rs): one frame
//!                                              │ per write with everything queued; reconnects
//!                                              ▼ with backoff
//!                                          TCP, frames (frame.rs): Hello, then RaftBatch /
//!                                              │ AppRequest / AppResponse
//!                                              ▼
//! remote listener ─▶ reader task per connection (inbound.rs): Hello check, crc/framing check
//!   ─▶ handler: mpsc::Sender<Inbound>  (Raft { from, group, bytes } or app request/response)
//! ```
//!
//! * The transport knows nothing about Raft: messages are opaque [`Bytes`] tagged with a
//!   [`GroupId`] (the Raft layer encodes raft-rs `eraftpb::Message` itself).
//! * Order: messages sent to one peer arrive in send order as long as one connection lasts
//!   (one writer, one TCP stream, one reader). Across a reconnect, messages in the failed
//!   write are lost; nothing is reordered or duplicated by the transport.
//! * Loss: messages may be lost (queue overflow, reconnects, [`FaultController`]); see
//!   `peer.rs` for why dropping Raft messages is safe. Application messages are only lost
//!   with a connection; callers time out their requests.
//! * Connections are one-way: node A's messages to B travel on the connection A opened,
//!   B's to A on the one B opened. A connection from a node that is not (yet) a peer is
//!   accepted if it is of the same cluster, so a node being added can talk before every
//!   member has called [`Transport::add_peer`].
//!
//! Dropping the [`Transport`] stops its tasks; [`Transport::shutdown`] does the same and
//! waits until the listening socket is closed (so a new transport can bind the same port).

pub mod fault;
pub mod frame;
pub mod inbound;
pub mod peer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

pub use self::fault::FaultController;
use self::frame::{Body, RaftMessage, APP_PAYLOAD_BYTES_MAX, RAFT_MESSAGE_BYTES_MAX};
pub use self::frame::{ClusterId, RequestId};
use self::peer::PeerLink;
use crate::wal::record::{GroupId, NodeId};

/// Backlog of the listening socket.
const LISTEN_BACKLOG: u32 = 1024;

/// What the transport hands to its handler, in arrival order per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A Raft message for one group.
    Raft {
        /// The sending node.
        from: NodeId,
        /// The group it belongs to.
        group: GroupId,
        /// The encoded message, as given to [`Transport::send`] on the sender.
        bytes: Bytes,
    },
    /// An application request (client I/O forwarded to this node as leader).
    AppRequest {
        /// The requesting node; answer with [`Transport::send_app_response`] to it.
        from: NodeId,
        /// Echo in the response.
        id: RequestId,
        /// Opaque to the transport.
        payload: Bytes,
    },
    /// The answer to an application request this node sent.
    AppResponse {
        /// The answering node.
        from: NodeId,
        /// The id of the request it answers.
        id: RequestId,
        /// Opaque to the transport.
        payload: Bytes,
    },
}

/// Why a transport could not start or a message could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// node id 0 means "none" and cannot be used
    #[error("node id 0 means \"none\" and cannot be used")]
    InvalidNodeId,
    /// cannot listen on {addr}: {source}
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// no peer {0}
    #[error("no peer {0}")]
    UnknownPeer(NodeId),
    /// node {0} is this node, not a peer
    #[error("node {0} is this node, not a peer")]
    SelfPeer(NodeId),
    /// message of {len} bytes exceeds the maximum of {max}
    #[error("message of {len} bytes exceeds the maximum of {max}")]
    MessageTooLarge {
        /// The message's size.
        len: usize,
        /// The largest allowed.
        max: usize,
    },
    /// queue of application messages to peer {0} is full
    #[error("queue of application messages to peer {0} is full")]
    AppQueueFull(NodeId),
}

/// Counters since the transport started (a snapshot; see [`Transport::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransportStats {
    /// Frames written to peers (including `Hello`s).
    pub frames_sent: u64,
    /// Bytes written to peers.
    pub bytes_sent: u64,
    /// Raft messages written to peers.
    pub raft_messages_sent: u64,
    /// Application messages written to peers.
    pub app_messages_sent: u64,
    /// Valid frames read from peers.
    pub frames_received: u64,
    /// Bytes of valid frames read from peers.
    pub bytes_received: u64,
    /// Raft messages received and being or having been handed to the handler.
    pub raft_messages_received: u64,
    /// Application messages received and being or having been handed to the handler.
    pub app_messages_received: u64,
    /// Raft messages dropped because a peer's queue was full.
    pub queue_drops: u64,
    /// Messages dropped by the [`FaultController`] (either direction).
    pub fault_drops: u64,
    /// Outbound connections established.
    pub connects: u64,
    /// Outbound connections established to a peer that had been connected before.
    pub reconnects: u64,
    /// Outbound connection attempts that failed.
    pub connect_failures: u64,
    /// Inbound connections accepted.
    pub inbound_accepted: u64,
    /// Inbound connections closed for breaking the protocol (or refused over the limit).
    pub inbound_rejected: u64,
}

/// The live counters behind [`TransportStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) frames_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) raft_messages_sent: AtomicU64,
    pub(crate) app_messages_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) raft_messages_received: AtomicU64,
    pub(crate) app_messages_received: AtomicU64,
    pub(crate) queue_drops: AtomicU64,
    pub(crate) fault_drops: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) connect_failures: AtomicU64,
    pub(crate) inbound_accepted: AtomicU64,
    pub(crate) inbound_rejected: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> TransportStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            frames_sent: get(&self.frames_sent),
            bytes_sent: get(&self.bytes_sent),
            raft_messages_sent: get(&self.raft_messages_sent),
            app_messages_sent: get(&self.app_messages_sent),
            frames_received: get(&self.frames_received),
            bytes_received: get(&self.bytes_received),
            raft_messages_received: get(&self.raft_messages_received),
            app_messages_received: get(&self.app_messages_received),
            queue_drops: get(&self.queue_drops),
            fault_drops: get(&self.fault_drops),
            connects: get(&self.connects),
            reconnects: get(&self.reconnects),
            connect_failures: get(&self.connect_failures),
            inbound_accepted: get(&self.inbound_accepted),
            inbound_rejected: get(&self.inbound_rejected),
        }
    }
}

/// What the transport's tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) local: NodeId,
    pub(crate) cluster: ClusterId,
    pub(crate) counters: Counters,
    pub(crate) faults: FaultController,
    pub(crate) handler: mpsc::Sender<Inbound>,
}

/// One node's links to its peers. See the [module docs](self).
#[derive(Debug)]
pub struct Transport {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    local_addr: SocketAddr,
    peers: RwLock<HashMap<NodeId, PeerLink>>,
    listener: Option<JoinHandle<()>>,
}

impl Transport {
    /// Listens on `listen` and starts a writer for each of `peers`; received messages go
    /// to `handler`. Must be called inside a tokio runtime, whose tasks it uses from then on.
    pub async fn start(
        local: NodeId,
        cluster: ClusterId,
        listen: SocketAddr,
        peers: HashMap<NodeId, SocketAddr>,
        handler: mpsc::Sender<Inbound>,
    ) -> Result<Transport, TransportError> {
        if local == NodeId(0) {
            return Err(TransportError::InvalidNodeId);
        }
        let bind = |source| TransportError::Bind { addr: listen, source };
        let socket =
            if listen.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind)?;
        // A restarted node must get its port back while old connections sit in TIME_WAIT.
        socket.set_reuseaddr(true).map_err(bind)?;
        socket.bind(listen).map_err(bind)?;
        let listener = socket.listen(LISTEN_BACKLOG).map_err(bind)?;
        let local_addr = listener.local_addr().map_err(bind)?;
        let shared = Arc::new(Shared {
            local,
            cluster,
            counters: Counters::default(),
            faults: FaultController::new(),
            handler,
        });
        let runtime = tokio::runtime::Handle::current();
        let listener = runtime.spawn(inbound::run_listener(listener, shared.clone()));
        info!(node = %local, cluster = cluster.0, addr = %local_addr, "transport listening");
        let transport = Transport {
            shared,
            runtime,
            local_addr,
            peers: RwLock::new(HashMap::new()),
            listener: Some(listener),
        };
        for (id, addr) in peers {
            transport.add_peer(id, addr)?;
        }
        Ok(transport)
    }

    /// This node's id.
    pub fn local_id(&self) -> NodeId {
        self.shared.local
    }

    /// The address the transport listens on (with the real port if it was asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Adds a peer (membership change), or points an existing one at `addr`.
    pub fn add_peer(&self, id: NodeId, addr: SocketAddr) -> Result<(), TransportError> {
        if id == NodeId(0) {
            return Err(TransportError::InvalidNodeId);
        }
        if id == self.shared.local {
            return Err(TransportError::SelfPeer(id));
        }
        let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
        match peers.get(&id) {
            Some(link) => {
                if link.addr() != addr {
                    link.set_addr(addr);
                }
            }
            None => {
                info!(peer = %id, %addr, "adding peer");
                peers.insert(id, PeerLink::spawn(&self.runtime, self.shared.clone(), id, addr));
            }
        }
        Ok(())
    }

    /// Removes a peer: its queue is dropped and its connection closed. Returns whether it
    /// was a peer. Its inbound connection, if any, stays until it closes it.
    pub fn remove_peer(&self, id: NodeId) -> bool {
        let removed = self.peers.write().unwrap_or_else(PoisonError::into_inner).remove(&id);
        if removed.is_some() {
            info!(peer = %id, "removed peer");
        }
        removed.is_some()
    }

    /// Points a peer at a new address; its writer reconnects there at once.
    pub fn update_peer_addr(&self, id: NodeId, addr: SocketAddr) -> Result<(), TransportError> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        let link = peers.get(&id).ok_or(TransportError::UnknownPeer(id))?;
        link.set_addr(addr);
        Ok(())
    }

    /// The peers and their addresses, in no particular order.
    pub fn peers(&self) -> Vec<(NodeId, SocketAddr)> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.iter().map(|(id, link)| (*id, link.addr())).collect()
    }

    /// Whether `to` cannot be reached now: the last attempt to connect to it failed and no
    /// connection is up since. A peer never tried, or connected, is not unreachable; one
    /// that is merely slow is not either. Lets a caller ask another node at once instead of
    /// waiting out a timeout on one that is down.
    pub fn unreachable(&self, to: NodeId) -> bool {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        peers.get(&to).is_some_and(|link| link.queue.unreachable.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Queues a Raft message of `group` for `to`. Never blocks and never waits for the
    /// network: when the peer's queue is full the oldest Raft messages are dropped (and
    /// counted in [`TransportStats::queue_drops`]); Raft retransmits. Callable from any
    /// thread.
    pub fn send(&self, to: NodeId, group: GroupId, bytes: Bytes) -> Result<(), TransportError> {
        self.send_message(to, RaftMessage::new(group, bytes))
    }

    /// Queues a Raft message given as parts (sent one after another, not copied into one
    /// buffer; the peer receives them joined), as [`Transport::send`] does.
    pub fn send_parts(
        &self,
        to: NodeId,
        group: GroupId,
        mut parts: Vec<Bytes>,
    ) -> Result<(), TransportError> {
        let bytes = if parts.is_empty() { Bytes::new() } else { parts.remove(0) };
        self.send_message(to, RaftMessage { group, bytes, more: parts })
    }

    fn send_message(&self, to: NodeId, message: RaftMessage) -> Result<(), TransportError> {
        if message.len() > RAFT_MESSAGE_BYTES_MAX {
            return Err(TransportError::MessageTooLarge { len: message.len(), max: RAFT_MESSAGE_BYTES_MAX });
        }
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        let link = peers.get(&to).ok_or(TransportError::UnknownPeer(to))?;
        if self.shared.faults.is_outbound_blocked(to) {
            self.shared.counters.fault_drops.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let dropped = link.queue.push_raft(message);
        if dropped > 0 {
            self.shared.counters.queue_drops.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Queues an application request for `to`. Never blocks; fails if the peer's
    /// application queue is full. The request may still be lost with a connection, so the
    /// caller needs a timeout.
    pub fn send_app_request(&self, to: NodeId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        self.send_app(to, Body::AppRequest { id, payload })
    }

    /// Queues the response to an application request from `to`. Never blocks; fails if the
    /// peer's application queue is full.
    pub fn send_app_response(&self, to: NodeId, id: RequestId, payload: Bytes) -> Result<(), TransportError> {
        self.send_app(to, Body::AppResponse { id, payload })
    }

    fn send_app(&self, to: NodeId, body: Body) -> Result<(), TransportError> {
        let len = match &body {
            Body::AppRequest { payload, .. } | Body::AppResponse { payload, .. } => payload.len(),
            Body::Hello { .. } | Body::RaftBatch(_) => 0,
        };
        if len > APP_PAYLOAD_BYTES_MAX {
            return Err(TransportError::MessageTooLarge { len, max: APP_PAYLOAD_BYTES_MAX });
        }
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        let link = peers.get(&to).ok_or(TransportError::UnknownPeer(to))?;
        if self.shared.faults.is_outbound_blocked(to) {
            self.shared.counters.fault_drops.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        link.queue.push_app(body).map_err(|_| TransportError::AppQueueFull(to))
    }

    /// The handle that blocks and heals this node's traffic to and from chosen peers.
    pub fn faults(&self) -> FaultController {
        self.shared.faults.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        self.shared.counters.snapshot()
    }

    /// Stops every task and waits until the listening socket and outbound connections are
    /// closed. Inbound connections are aborted too (their sockets close as the runtime
    /// drops them).
    pub async fn shutdown(mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
            // Cancelled is the expected outcome.
            let _ = listener.await;
        }
        let peers = std::mem::take(&mut *self.peers.write().unwrap_or_else(PoisonError::into_inner));
        for (_, link) in peers {
            link.stop().await;
        }
        info!(node = %self.shared.local, "transport stopped");
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
        // Dropping the links aborts their writers.
    }
}
