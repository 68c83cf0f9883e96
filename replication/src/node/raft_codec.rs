//! Raft messages as bytes for the transport (sans-IO), laid out so that the entries' data of a
//! MsgAppend is never copied on its way out:
//!
//! ```text
//! [count u32][data len u32 × count][protobuf eraftpb::Message, its entries' data emptied]
//! [data of entry 0][data of entry 1]...
//! ```
//!
//! all integers little-endian; `count` is the number of entries. [`encode`] returns the
//! message as parts: the small head (table and protobuf), then each entry's data as the very
//! `Bytes` raft-rs holds, which the transport writes with a vectored write. [`decode`] gives
//! each entry its data as a slice of the received buffer. Before this, the whole message
//! (data included) was protobuf-encoded into a new buffer and then copied into the frame:
//! two copies of every payload per follower.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raft::eraftpb::Message;

/// Why bytes are not a Raft message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RaftCodecError {
    /// the message ends inside its data-length table or its entries' data
    #[error("raft message truncated: {0}")]
    Truncated(&'static str),
    /// the protobuf part does not parse
    #[error("raft message: protobuf: {0}")]
    Protobuf(String),
    /// the table and the protobuf part disagree on the entries
    #[error("raft message has {table} data lengths for {entries} entries")]
    EntryCount { table: usize, entries: usize },
    /// an entry carries data inside the protobuf part, where the layout has none
    #[error("raft message entry {0} has data inside its protobuf part")]
    InlineData(usize),
}

/// `m` as parts to send one after another (see the module docs). Fails only if protobuf
/// cannot encode it.
pub fn encode(mut m: Message) -> Result<Vec<Bytes>, RaftCodecError> {
    let data: Vec<Bytes> = m.entries.iter_mut().map(|e| std::mem::take(&mut e.data)).collect();
    let proto = protobuf::Message::write_to_bytes(&m).map_err(|e| RaftCodecError::Protobuf(e.to_string()))?;
    let mut head = BytesMut::with_capacity(4 + 4 * data.len() + proto.len());
    // A message's entries are bounded by the transport's frame limit, far below u32::MAX.
    head.put_u32_le(data.len() as u32);
    for d in &data {
        head.put_u32_le(d.len() as u32);
    }
    head.put_slice(&proto);
    let mut parts = Vec::with_capacity(1 + data.len());
    parts.push(head.freeze());
    parts.extend(data.into_iter().filter(|d| !d.is_empty()));
    Ok(parts)
}

/// The message in `bytes` (all of one, as [`encode`]'s parts joined). Entries' data are
/// slices of `bytes`, not copies.
pub fn decode(bytes: &Bytes) -> Result<Message, RaftCodecError> {
    let mut rest = bytes.clone();
    let count = rest.try_get_u32_le().map_err(|_| RaftCodecError::Truncated("entry count"))? as usize;
    if count > rest.len() / 4 {
        return Err(RaftCodecError::Truncated("data-length table"));
    }
    let lens: Vec<usize> = (0..count).map(|_| rest.get_u32_le() as usize).collect();
    // Each length is below 2^32 and there are fewer than 2^30 of them: no overflow in u64.
    let data_total: u64 = lens.iter().map(|&l| l as u64).sum();
    let proto_len = (rest.len() as u64)
        .checked_sub(data_total)
        .ok_or(RaftCodecError::Truncated("entries' data"))? as usize;
    let proto = rest.split_to(proto_len);
    let mut m = <Message as protobuf::Message>::parse_from_carllerche_bytes(&proto)
        .map_err(|e| RaftCodecError::Protobuf(e.to_string()))?;
    if m.entries.len() != count {
        return Err(RaftCodecError::EntryCount { table: count, entries: m.entries.len() });
    }
    for (i, (e, len)) in m.entries.iter_mut().zip(lens).enumerate() {
        if !e.data.is_empty() {
            return Err(RaftCodecError::InlineData(i));
        }
        e.data = rest.split_to(len);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use raft::eraftpb::{Entry, MessageType};

    use super::*;

    fn append(datas: &[Vec<u8>]) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = 2;
        m.from = 1;
        m.term = 7;
        m.index = 41;
        m.commit = 40;
        m.entries = datas
            .iter()
            .enumerate()
            .map(|(i, d)| Entry {
                index: 42 + i as u64,
                term: 7,
                data: Bytes::from(d.clone()),
                context: Bytes::from_static(b"ctx"),
                ..Default::default()
            })
            .collect();
        m
    }

    fn joined(parts: &[Bytes]) -> Bytes {
        Bytes::from(parts.concat())
    }

    #[test]
    fn payloads_are_sent_as_they_are_and_received_as_slices() {
        let m = append(&[vec![1; 100_000], vec![], vec![3; 10]]);
        let big = m.entries[0].data.clone();
        let parts = encode(m.clone()).expect("encode");
        assert_eq!(parts.len(), 3, "the head, then the two non-empty data");
        assert_eq!(parts[1].as_ptr(), big.as_ptr(), "the entry's own bytes, not a copy");
        let wire = joined(&parts);
        let back = decode(&wire).expect("decode");
        assert_eq!(back, m);
        let range = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.len();
        assert!(range.contains(&(back.entries[0].data.as_ptr() as usize)), "a slice of the received bytes");
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(decode(&Bytes::new()), Err(RaftCodecError::Truncated("entry count")));
        assert_eq!(
            decode(&Bytes::from_static(&[5, 0, 0, 0, 1])),
            Err(RaftCodecError::Truncated("data-length table"))
        );
        // One entry claiming more data than there is.
        let mut wire = joined(&encode(append(&[vec![9; 8]])).expect("encode")).to_vec();
        wire[4] = 200;
        assert_eq!(decode(&Bytes::from(wire)), Err(RaftCodecError::Truncated("entries' data")));
        // The table says two entries, the protobuf part has one.
        let wire = joined(&encode(append(&[vec![9; 8]])).expect("encode"));
        let mut two = BytesMut::new();
        two.put_u32_le(2);
        two.put_u32_le(8);
        two.put_u32_le(0);
        two.put_slice(&wire[8..]);
        assert_eq!(decode(&two.freeze()), Err(RaftCodecError::EntryCount { table: 2, entries: 1 }));
        // A whole protobuf message (the old layout) is not this one.
        let old = protobuf::Message::write_to_bytes(&append(&[vec![9; 8]])).expect("encode");
        assert!(decode(&Bytes::from(old)).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6)) {
            let m = append(&datas);
            prop_assert_eq!(decode(&joined(&encode(m.clone()).expect("encode"))).expect("decode"), m);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }
}
