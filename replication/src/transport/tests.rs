//! Transports on loopback: delivery and order across many groups, reconnects, partitions,
//! hostile clients.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::frame::{Body, Frame};
use super::*;

const CLUSTER: ClusterId = ClusterId(0x7261_6674);
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn node_at(id: u64, addr: SocketAddr) -> (Transport, mpsc::Receiver<Inbound>) {
    let (tx, rx) = mpsc::channel(1024);
    let t = Transport::start(NodeId(id), CLUSTER, addr, HashMap::new(), tx).await.unwrap();
    (t, rx)
}

async fn node(id: u64) -> (Transport, mpsc::Receiver<Inbound>) {
    node_at(id, any_port()).await
}

fn mesh(nodes: &[&Transport]) {
    for a in nodes {
        for b in nodes {
            if a.local_id() != b.local_id() {
                a.add_peer(b.local_id(), b.local_addr()).unwrap();
            }
        }
    }
}

/// A message carrying a sequence number, padded to a size that varies with it.
fn payload(seq: u64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u64_le(seq);
    b.put_bytes((seq % 251) as u8, (seq % 97) as usize);
    b.freeze()
}

fn seq_of(bytes: &Bytes) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[..8]);
    let seq = u64::from_le_bytes(a);
    assert_eq!(bytes.len(), 8 + (seq % 97) as usize, "payload of {seq} damaged");
    seq
}

async fn recv(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
    tokio::time::timeout(RECV_TIMEOUT, rx.recv())
        .await
        .expect("nothing received in time")
        .expect("channel closed")
}

/// Receives `n` Raft messages and returns their sequence numbers per (sender, group).
async fn recv_raft(rx: &mut mpsc::Receiver<Inbound>, n: usize) -> BTreeMap<(NodeId, GroupId), Vec<u64>> {
    let mut got: BTreeMap<_, Vec<u64>> = BTreeMap::new();
    for _ in 0..n {
        match recv(rx).await {
            Inbound::Raft { from, group, bytes } => {
                got.entry((from, group)).or_default().push(seq_of(&bytes))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got
}

/// Nothing arrives for a while.
async fn assert_quiet(rx: &mut mpsc::Receiver<Inbound>, what: &str) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("{what}: unexpected {m:?}");
    }
}

/// Sends `n` messages from `t` to `to`, round robin over `groups` groups, sequence numbers
/// from `first`; returns what each group should receive.
fn send_many(t: &Transport, to: NodeId, groups: u64, first: u64, n: u64) -> BTreeMap<GroupId, Vec<u64>> {
    let mut sent: BTreeMap<_, Vec<u64>> = BTreeMap::new();
    for seq in first..first + n {
        let group = GroupId(seq % groups);
        t.send(to, group, payload(seq)).unwrap();
        sent.entry(group).or_default().push(seq);
    }
    sent
}

fn expect_from(
    got: &BTreeMap<(NodeId, GroupId), Vec<u64>>,
    from: NodeId,
    sent: &BTreeMap<GroupId, Vec<u64>>,
) {
    for (group, seqs) in sent {
        assert_eq!(got.get(&(from, *group)), Some(seqs), "from {from}, group {group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_thousands_of_messages_in_order_and_batched() {
    let (a, mut rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    mesh(&[&a, &b]);
    let n = 5000;
    // Bursts with pauses, so some writes batch many messages and some few.
    let mut to_b: BTreeMap<GroupId, Vec<u64>> = BTreeMap::new();
    let mut to_a: BTreeMap<GroupId, Vec<u64>> = BTreeMap::new();
    for burst in 0..10 {
        for (g, s) in send_many(&a, b.local_id(), 64, burst * n / 10, n / 10) {
            to_b.entry(g).or_default().extend(s);
        }
        for (g, s) in send_many(&b, a.local_id(), 64, burst * n / 10, n / 10) {
            to_a.entry(g).or_default().extend(s);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let got_b = recv_raft(&mut rx_b, n as usize).await;
    let got_a = recv_raft(&mut rx_a, n as usize).await;
    expect_from(&got_b, a.local_id(), &to_b);
    expect_from(&got_a, b.local_id(), &to_a);

    let s = a.stats();
    assert_eq!(s.raft_messages_sent, n);
    assert_eq!(s.raft_messages_received, n);
    assert_eq!(s.queue_drops, 0);
    assert_eq!(s.connects, 1);
    assert!(s.frames_sent < n / 2, "no batching: {s:?}");
    assert!(s.bytes_sent > 0 && b.stats().bytes_received == s.bytes_sent, "{s:?} vs {:?}", b.stats());

    // A large message goes through whole.
    let big = Bytes::from(vec![0x5A; 3 << 20]);
    a.send(b.local_id(), GroupId(9), big.clone()).unwrap();
    assert_eq!(recv(&mut rx_b).await, Inbound::Raft { from: a.local_id(), group: GroupId(9), bytes: big });
}

/// On one thread the writer runs only once the sender yields, so everything sent before
/// that goes in one frame and one write.
#[tokio::test]
async fn everything_queued_goes_in_one_frame() {
    let (a, _rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    mesh(&[&a, &b]);
    let warmup = send_many(&a, b.local_id(), 1, 0, 1);
    expect_from(&recv_raft(&mut rx_b, 1).await, a.local_id(), &warmup);
    let before = a.stats();
    let sent = send_many(&a, b.local_id(), 50, 1, 1000);
    expect_from(&recv_raft(&mut rx_b, 1000).await, a.local_id(), &sent);
    let after = a.stats();
    assert_eq!(after.frames_sent - before.frames_sent, 1, "{after:?}");
    assert_eq!(b.stats().frames_received, after.frames_sent, "{:?}", b.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_all_to_all_many_groups() {
    let (a, mut rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    let (c, mut rx_c) = node(3).await;
    let nodes = [&a, &b, &c];
    mesh(&nodes);
    let n = 2000;
    let mut sent = HashMap::new();
    for from in nodes {
        for to in nodes {
            if from.local_id() != to.local_id() {
                sent.insert((from.local_id(), to.local_id()), send_many(from, to.local_id(), 100, 0, n));
            }
        }
    }
    for (t, rx) in [(&a, &mut rx_a), (&b, &mut rx_b), (&c, &mut rx_c)] {
        let got = recv_raft(rx, 2 * n as usize).await;
        for from in nodes {
            if from.local_id() != t.local_id() {
                expect_from(&got, from.local_id(), &sent[&(from.local_id(), t.local_id())]);
            }
        }
    }
    for t in nodes {
        let s = t.stats();
        assert_eq!((s.raft_messages_sent, s.raft_messages_received, s.queue_drops), (2 * n, 2 * n, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_reconnects_after_peer_restart_on_the_same_port() {
    let (a, _rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    let b_addr = b.local_addr();
    a.add_peer(b.local_id(), b_addr).unwrap();
    let sent = send_many(&a, NodeId(2), 8, 0, 100);
    expect_from(&recv_raft(&mut rx_b, 100).await, NodeId(1), &sent);

    b.shutdown().await;
    drop(rx_b);
    // Sent while B is down: queued, or lost with the dying connection.
    send_many(&a, NodeId(2), 8, 1000, 50);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (b, mut rx_b) = node_at(2, b_addr).await;
    // Delivery resumes. The downtime messages may all have gone into a write on the dying
    // connection (TCP accepts it, the peer never reads it), so keep sending until one lands.
    let mut probe = 1500;
    let first = loop {
        a.send(NodeId(2), GroupId(0), payload(probe)).unwrap();
        probe += 1;
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(50), rx_b.recv()).await {
            break m.expect("channel closed");
        }
        assert!(probe < 1500 + 100, "no delivery within 5 s of the restart");
    };
    let Inbound::Raft { bytes, .. } = first else { panic!("unexpected {first:?}") };
    let mut last = seq_of(&bytes);
    assert!(last >= 1000, "message from before the restart delivered again: {last}");
    let sent = send_many(&a, NodeId(2), 1, 2000, 200);
    let mut after = Vec::new();
    while after.len() < 200 {
        match recv(&mut rx_b).await {
            Inbound::Raft { bytes, .. } => {
                let seq = seq_of(&bytes);
                assert!(seq > last, "{seq} after {last}");
                last = seq;
                if seq >= 2000 {
                    after.push(seq);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(Some(&after), sent.get(&GroupId(0)));
    let s = a.stats();
    assert!(s.reconnects >= 1 && s.connects >= 2, "{s:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_drops_everything_and_heal_resumes_delivery() {
    let (a, mut rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    let (c, mut rx_c) = node(3).await;
    mesh(&[&a, &b, &c]);
    let faults = a.faults();
    faults.block(c.local_id());

    let to_b = send_many(&a, b.local_id(), 4, 0, 50);
    send_many(&a, c.local_id(), 4, 0, 50);
    send_many(&c, a.local_id(), 4, 0, 50);
    // The A–B link is unaffected.
    expect_from(&recv_raft(&mut rx_b, 50).await, a.local_id(), &to_b);
    assert_quiet(&mut rx_c, "C during partition").await;
    assert_quiet(&mut rx_a, "A during partition").await;
    assert_eq!(a.stats().fault_drops, 100);

    faults.heal(c.local_id());
    let to_c = send_many(&a, c.local_id(), 4, 100, 50);
    let to_a = send_many(&c, a.local_id(), 4, 100, 50);
    expect_from(&recv_raft(&mut rx_c, 50).await, a.local_id(), &to_c);
    expect_from(&recv_raft(&mut rx_a, 50).await, c.local_id(), &to_a);

    // One-way: A still hears C but C does not hear A.
    faults.block_outbound(c.local_id());
    send_many(&a, c.local_id(), 1, 200, 10);
    let to_a = send_many(&c, a.local_id(), 1, 200, 10);
    expect_from(&recv_raft(&mut rx_a, 10).await, c.local_id(), &to_a);
    assert_quiet(&mut rx_c, "C during one-way partition").await;
    faults.heal_all();
    let to_c = send_many(&a, c.local_id(), 1, 300, 10);
    expect_from(&recv_raft(&mut rx_c, 10).await, a.local_id(), &to_c);
}

/// Reads until the server closes the connection; panics if it does not within the timeout.
async fn expect_closed(mut s: TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(RECV_TIMEOUT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "{what}: connection not closed");
}

fn hello(from: u64, cluster: ClusterId) -> BytesMut {
    let mut b = BytesMut::new();
    Frame { from: NodeId(from), body: Body::Hello { cluster } }.encode(&mut b).unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_disconnected_without_affecting_peers() {
    let (a, _rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    mesh(&[&a, &b]);
    let warmup = send_many(&a, b.local_id(), 4, 0, 20);
    expect_from(&recv_raft(&mut rx_b, 20).await, a.local_id(), &warmup);

    // Plain garbage: a huge length.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    g.write_all(&[0xFF; 64]).await.unwrap();
    expect_closed(g, "garbage").await;

    // A valid Hello, then a frame with a broken CRC.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    let mut bytes = hello(7, CLUSTER);
    let mut bad = BytesMut::new();
    Frame { from: NodeId(7), body: Body::RaftBatch(Vec::new()) }.encode(&mut bad).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    bytes.extend_from_slice(&bad);
    g.write_all(&bytes).await.unwrap();
    expect_closed(g, "bad crc").await;

    // Another cluster's node.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    g.write_all(&hello(7, ClusterId(1))).await.unwrap();
    expect_closed(g, "wrong cluster").await;

    // A frame before the Hello.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    let mut f = BytesMut::new();
    Frame { from: NodeId(7), body: Body::RaftBatch(Vec::new()) }.encode(&mut f).unwrap();
    g.write_all(&f).await.unwrap();
    expect_closed(g, "no hello").await;

    // Frames naming another sender than the Hello did.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    let mut f = hello(7, CLUSTER);
    Frame { from: NodeId(8), body: Body::RaftBatch(Vec::new()) }.encode(&mut f).unwrap();
    g.write_all(&f).await.unwrap();
    expect_closed(g, "wrong sender").await;

    // EOF in the middle of a frame.
    let mut g = TcpStream::connect(b.local_addr()).await.unwrap();
    let mut f = hello(7, CLUSTER);
    f.put_u32_le(100);
    g.write_all(&f).await.unwrap();
    g.shutdown().await.unwrap();
    expect_closed(g, "truncated").await;

    // The real peer's link never noticed.
    let after = send_many(&a, b.local_id(), 4, 100, 20);
    expect_from(&recv_raft(&mut rx_b, 20).await, a.local_id(), &after);
    assert_eq!(a.stats().connects, 1);
    assert_eq!(b.stats().inbound_rejected, 6, "{:?}", b.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_request_and_response_round_trip() {
    let (a, mut rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    mesh(&[&a, &b]);
    a.send_app_request(b.local_id(), RequestId(42), Bytes::from_static(b"write 4096 @ 0")).unwrap();
    let Inbound::AppRequest { from, id, payload } = recv(&mut rx_b).await else { panic!("not a request") };
    assert_eq!((from, id, &payload[..]), (a.local_id(), RequestId(42), &b"write 4096 @ 0"[..]));
    b.send_app_response(from, id, Bytes::from_static(b"ok")).unwrap();
    let Inbound::AppResponse { from, id, payload } = recv(&mut rx_a).await else { panic!("not a response") };
    assert_eq!((from, id, &payload[..]), (b.local_id(), RequestId(42), &b"ok"[..]));
    assert_eq!((a.stats().app_messages_sent, a.stats().app_messages_received), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes() {
    let (a, _rx_a) = node(1).await;
    let (b, _rx_b) = node(2).await;
    assert!(matches!(a.send(NodeId(2), GroupId(1), payload(0)), Err(TransportError::UnknownPeer(NodeId(2)))));
    assert!(matches!(a.add_peer(NodeId(1), b.local_addr()), Err(TransportError::SelfPeer(_))));
    assert!(matches!(a.add_peer(NodeId(0), b.local_addr()), Err(TransportError::InvalidNodeId)));
    assert!(matches!(
        a.update_peer_addr(NodeId(2), b.local_addr()),
        Err(TransportError::UnknownPeer(NodeId(2)))
    ));

    // B moves to another port: the sender follows once told.
    a.add_peer(NodeId(2), b.local_addr()).unwrap();
    b.shutdown().await;
    let (b2, mut rx_b2) = node(2).await;
    a.update_peer_addr(NodeId(2), b2.local_addr()).unwrap();
    assert_eq!(a.peers(), vec![(NodeId(2), b2.local_addr())]);
    let sent = send_many(&a, NodeId(2), 2, 0, 30);
    expect_from(&recv_raft(&mut rx_b2, 30).await, NodeId(1), &sent);

    assert!(a.remove_peer(NodeId(2)));
    assert!(!a.remove_peer(NodeId(2)));
    assert!(matches!(a.send(NodeId(2), GroupId(1), payload(0)), Err(TransportError::UnknownPeer(_))));
    assert!(a.peers().is_empty());
    // The removed peer's connection is closed; it is gone from B's point of view too.
    assert_quiet(&mut rx_b2, "after removal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_a_dead_peer_drops_oldest_and_counts() {
    // Nothing listens on B's address: everything stays queued, then overflows.
    let (dead, _rx) = node(2).await;
    let dead_addr = dead.local_addr();
    dead.shutdown().await;
    let (a, _rx_a) = node(1).await;
    a.add_peer(NodeId(2), dead_addr).unwrap();
    let n = peer::PEER_QUEUE_RAFT_MESSAGES_MAX as u64 + 100;
    send_many(&a, NodeId(2), 16, 0, n);
    assert_eq!(a.stats().queue_drops, 100);
    assert!(matches!(
        a.send(NodeId(2), GroupId(0), Bytes::from(vec![0; frame::RAFT_MESSAGE_BYTES_MAX + 1])),
        Err(TransportError::MessageTooLarge { .. })
    ));
}

/// Messages in several parts, large ones among them (written with vectored writes, more parts
/// than one `writev` takes in a batch), arrive whole and in order.
#[tokio::test]
async fn messages_sent_in_parts_arrive_joined() {
    let (a, _rx_a) = node(1).await;
    let (b, mut rx_b) = node(2).await;
    mesh(&[&a, &b]);
    let mut sent = Vec::new();
    for i in 0..40u64 {
        let part = |n: usize, seed: u64| {
            Bytes::from((0..n).map(|j| (j as u64 * 7 + seed) as u8).collect::<Vec<u8>>())
        };
        let parts = vec![
            part(10, i),
            part(if i % 3 == 0 { 300_000 } else { 5000 }, i + 1),
            Bytes::new(),
            part(3, i + 2),
        ];
        sent.push(parts.concat());
        a.send_parts(NodeId(2), GroupId(i % 4), parts).unwrap();
    }
    for (i, want) in sent.iter().enumerate() {
        match recv(&mut rx_b).await {
            Inbound::Raft { from, group, bytes } => {
                assert_eq!((from, group), (NodeId(1), GroupId(i as u64 % 4)));
                assert!(bytes[..] == want[..], "message {i} damaged");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_connections_is_unreachable_until_it_answers() {
    let (a, _rx_a) = node(1).await;
    let (b, _rx_b) = node(2).await;
    let b_addr = b.local_addr();
    assert!(!a.unreachable(NodeId(2)), "an unknown peer is not unreachable");
    a.add_peer(NodeId(2), b_addr).unwrap();
    a.send(NodeId(2), GroupId(0), payload(1)).unwrap();
    let wait = |want: bool| {
        let a = &a;
        async move {
            for _ in 0..200 {
                if a.unreachable(NodeId(2)) == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("peer 2 never became {}", if want { "unreachable" } else { "reachable" });
        }
    };
    wait(false).await;
    b.shutdown().await;
    // The writer notices the closed connection and fails to reconnect.
    a.send(NodeId(2), GroupId(0), payload(2)).unwrap();
    wait(true).await;
    let (_b, _rx_b) = node_at(2, b_addr).await;
    wait(false).await;
}
