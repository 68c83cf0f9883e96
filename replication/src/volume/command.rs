//! Commands carried in Raft entries, and their binary encoding.
//!
//! One entry carries a batch of commands (several client writes proposed together):
//!
//! ```text
//! [version u8 = 3][count u32] count × command
//! [crc32 u32 over everything before it except the Write commands' block data]
//! command: [kind u8] then
//!   4 Resize       size u64
//!   5 App          len u32, data (len bytes): opaque to this crate, for groups whose
//!                  replicas apply to a state machine ([`crate::machine`])
//!   6 Write        first block u64, count u32, guards u16,
//!                  guards × [block u64, version u64], count × seal, count × 4096 bytes
//!   7 Zero         first block u64, count u64, deallocate u8
//!   8 Scrub        id u64, first block u64, count u32: every copy checks these blocks
//!                  when it applies the entry, so all of them report the same point of the log
//! ```
//!
//! All integers little-endian; seals as `raftblk_blockdev::seal::wire` writes them.
//! The batch's CRC leaves out the block data because every block carries its own crc32c in
//! its seal, which each copy checks before storing it (and every read checks again): a second
//! pass over the payload here cost a crc32 of every byte on the leader's runner thread twice
//! (at propose and when the entry commits) and on every follower once. Version 2 (the CRC
//! over every byte) is still read, so a log written before is replayed.
//! Writes carry *sealed* blocks: the crc32c (and, for encrypted volumes, the ciphertext,
//! nonce and tag) made on the node that received the client's write, so the log, the WAL
//! and the peer traffic never hold an encrypted volume's plaintext, and every copy checks
//! the blocks again before storing them. Decoding slices write data out of the entry's
//! buffer without copying it. Version 1 (byte-addressed, unsealed writes) is no longer
//! read: a log from before sealing must be drained (every node checkpointed) first.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use raftblk_blockdev::seal::{wire, BlockWrite, Guard, BLOCK, BLOCK_BYTES};

const VERSION: u8 = 3;
/// The previous layout: the same, its CRC over every byte.
const VERSION_FULL_CRC: u8 = 2;
const KIND_RESIZE: u8 = 4;
const KIND_APP: u8 = 5;
const KIND_WRITE: u8 = 6;
const KIND_ZERO: u8 = 7;
const KIND_SCRUB: u8 = 8;
/// Most blocks one scrub command checks.
pub const SCRUB_BLOCKS_MAX: u32 = 1 << 10;

/// Largest number of commands in one batch.
pub const BATCH_COMMANDS_MAX: usize = 4096;
/// Bits of a block version below the log index: a version is `index << 12 | position`
/// of the command in its entry, unique per write and the same on every copy.
pub const VERSION_POSITION_BITS: u32 = 12;
const _: () = assert!(BATCH_COMMANDS_MAX <= 1 << VERSION_POSITION_BITS);
/// Most guards one write carries (a read-modify-write guards its two partial ends).
pub const GUARDS_MAX: usize = 8;

/// The version blocks written by command `position` of the entry at `index` get.
pub fn block_version(index: u64, position: usize) -> u64 {
    (index << VERSION_POSITION_BITS) | position as u64
}

/// The log index of the write that produced a block version.
pub fn version_index(version: u64) -> u64 {
    version >> VERSION_POSITION_BITS
}

/// One change to a replicated volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Store sealed blocks (if the guards hold).
    Write(BlockWrite),
    /// Zero `count` blocks from `first`; `deallocate` may free them.
    Zero { first: u64, count: u64, deallocate: bool },
    /// Grow the volume to `size` bytes.
    Resize { size: u64 },
    /// A state machine's command (see [`crate::machine`]); volume stores ignore it.
    App { data: Bytes },
    /// Check `count` blocks from `first` on every copy, as of this entry (scrub `id`).
    Scrub { id: u64, first: u64, count: u32 },
}

impl Command {
    /// The byte range `(offset, len)` the command changes (`None` for a resize).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            // Saturating: a command from a peer may name any block; range checks refuse it.
            Command::Write(w) => Some((w.first.saturating_mul(BLOCK), w.count() * BLOCK)),
            Command::Zero { first, count, .. } => {
                Some((first.saturating_mul(BLOCK), count.saturating_mul(BLOCK)))
            }
            Command::Scrub { first, count, .. } => {
                Some((first.saturating_mul(BLOCK), u64::from(*count) * BLOCK))
            }
            Command::Resize { .. } | Command::App { .. } => None,
        }
    }

    /// Bytes of data the command carries (only writes and state machine commands carry any).
    pub fn payload_len(&self) -> usize {
        match self {
            Command::Write(w) => w.data.len() + w.seals.iter().map(wire::seal_len).sum::<usize>(),
            Command::App { data } => data.len(),
            _ => 0,
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Command::Write(w) => 1 + 8 + 4 + 2 + 16 * w.guards.len() + self.payload_len(),
            Command::Zero { .. } => 1 + 8 + 8 + 1,
            Command::Scrub { .. } => 1 + 8 + 8 + 4,
            Command::Resize { .. } => 1 + 8,
            Command::App { data } => 1 + 4 + data.len(),
        }
    }
}

/// Why bytes are not a valid command batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// the buffer ends early
    #[error("command batch is truncated")]
    Truncated,
    /// the checksum does not match
    #[error("command batch checksum mismatch")]
    Checksum,
    /// unknown version or command kind
    #[error("unknown command batch version or kind {0}")]
    Unknown(u8),
    /// more commands than [`BATCH_COMMANDS_MAX`], or bytes after the last one
    #[error("malformed command batch")]
    Malformed,
}

/// Encodes a batch of commands.
pub fn encode_batch(commands: &[Command]) -> Bytes {
    let len: usize = commands.iter().map(Command::encoded_len).sum();
    let mut out = BytesMut::with_capacity(9 + len);
    let mut crc = crc32fast::Hasher::new();
    let mut hashed = 0; // bytes of `out` the CRC has taken in
    out.put_u8(VERSION);
    out.put_u32_le(commands.len() as u32);
    for c in commands {
        match c {
            Command::Write(w) => {
                out.put_u8(KIND_WRITE);
                out.put_u64_le(w.first);
                out.put_u32_le(w.seals.len() as u32);
                out.put_u16_le(w.guards.len() as u16);
                for g in &w.guards {
                    out.put_u64_le(g.block);
                    out.put_u64_le(g.version);
                }
                for seal in &w.seals {
                    wire::put_seal(&mut out, seal);
                }
                crc.update(&out[hashed..]);
                out.put_slice(&w.data);
                hashed = out.len();
            }
            Command::Zero { first, count, deallocate } => {
                out.put_u8(KIND_ZERO);
                out.put_u64_le(*first);
                out.put_u64_le(*count);
                out.put_u8(u8::from(*deallocate));
            }
            Command::Resize { size } => {
                out.put_u8(KIND_RESIZE);
                out.put_u64_le(*size);
            }
            Command::Scrub { id, first, count } => {
                out.put_u8(KIND_SCRUB);
                out.put_u64_le(*id);
                out.put_u64_le(*first);
                out.put_u32_le(*count);
            }
            Command::App { data } => {
                out.put_u8(KIND_APP);
                out.put_u32_le(data.len() as u32);
                out.put_slice(data);
            }
        }
    }
    crc.update(&out[hashed..]);
    out.put_u32_le(crc.finalize());
    out.freeze()
}

struct Cursor<'a> {
    buf: &'a Bytes,
    at: usize,
    end: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<std::ops::Range<usize>, CommandError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.end).ok_or(CommandError::Truncated)?;
        let r = self.at..end;
        self.at = end;
        Ok(r)
    }
    fn u8(&mut self) -> Result<u8, CommandError> {
        let r = self.take(1)?;
        Ok(self.buf[r.start])
    }
    fn u16(&mut self) -> Result<u16, CommandError> {
        let r = self.take(2)?;
        Ok(u16::from_le_bytes([self.buf[r.start], self.buf[r.start + 1]]))
    }
    fn seal(&mut self) -> Result<raftblk_blockdev::seal::Seal, CommandError> {
        let mut rest = &self.buf[self.at..self.end];
        let before = rest.remaining();
        let seal = wire::get_seal(&mut rest).map_err(|e| match e {
            wire::WireError::Unknown(k) => CommandError::Unknown(k),
            _ => CommandError::Truncated,
        })?;
        self.at += before - rest.remaining();
        Ok(seal)
    }
    fn u32(&mut self) -> Result<u32, CommandError> {
        let r = self.take(4)?;
        let mut b = [0; 4];
        b.copy_from_slice(&self.buf[r]);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, CommandError> {
        let r = self.take(8)?;
        let mut b = [0; 8];
        b.copy_from_slice(&self.buf[r]);
        Ok(u64::from_le_bytes(b))
    }
}

/// Decodes a batch written by [`encode_batch`].
pub fn decode_batch(buf: &Bytes) -> Result<Vec<Command>, CommandError> {
    if buf.len() < 9 {
        return Err(CommandError::Truncated);
    }
    let end = buf.len() - 4;
    let mut stored = [0; 4];
    stored.copy_from_slice(&buf[end..]);
    let stored = u32::from_le_bytes(stored);
    let version = buf[0];
    match version {
        VERSION_FULL_CRC if crc32fast::hash(&buf[..end]) != stored => return Err(CommandError::Checksum),
        VERSION_FULL_CRC | VERSION => {}
        other => return Err(CommandError::Unknown(other)),
    }
    // Version 3's CRC skips the block data, so where that lies follows from parsing: the
    // batch is parsed first (the parser trusts nothing), then checked.
    let (commands, data) = parse_batch(buf, end)?;
    if version == VERSION {
        let mut crc = crc32fast::Hasher::new();
        let mut at = 0;
        for r in data {
            crc.update(&buf[at..r.start]);
            at = r.end;
        }
        crc.update(&buf[at..end]);
        if crc.finalize() != stored {
            return Err(CommandError::Checksum);
        }
    }
    Ok(commands)
}

/// Parses a batch's commands (between its version byte and `end`, where the CRC starts);
/// returns them and where the Write commands' block data lies.
fn parse_batch(buf: &Bytes, end: usize) -> Result<(Vec<Command>, Vec<std::ops::Range<usize>>), CommandError> {
    let mut c = Cursor { buf, at: 1, end };
    let mut data_ranges = Vec::new();
    let count = c.u32()? as usize;
    if count > BATCH_COMMANDS_MAX {
        return Err(CommandError::Malformed);
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let cmd = match c.u8()? {
            KIND_WRITE => {
                let first = c.u64()?;
                let count = c.u32()? as usize;
                let guards = c.u16()? as usize;
                if guards > GUARDS_MAX || count > wire::BLOCKS_MAX as usize {
                    return Err(CommandError::Malformed);
                }
                let mut g = Vec::with_capacity(guards);
                for _ in 0..guards {
                    g.push(Guard { block: c.u64()?, version: c.u64()? });
                }
                let mut seals = Vec::with_capacity(count);
                for _ in 0..count {
                    seals.push(c.seal()?);
                }
                let r = c.take(count * BLOCK_BYTES)?;
                data_ranges.push(r.clone());
                let write = BlockWrite { first, data: buf.slice(r), seals, guards: g };
                if !write.is_well_formed() {
                    return Err(CommandError::Malformed);
                }
                Command::Write(write)
            }
            KIND_ZERO => {
                let (first, count) = (c.u64()?, c.u64()?);
                let deallocate = match c.u8()? {
                    0 => false,
                    1 => true,
                    other => return Err(CommandError::Unknown(other)),
                };
                Command::Zero { first, count, deallocate }
            }
            KIND_RESIZE => Command::Resize { size: c.u64()? },
            KIND_SCRUB => {
                let (id, first, count) = (c.u64()?, c.u64()?, c.u32()?);
                if count > SCRUB_BLOCKS_MAX {
                    return Err(CommandError::Malformed);
                }
                Command::Scrub { id, first, count }
            }
            KIND_APP => {
                let len = c.u32()? as usize;
                let r = c.take(len)?;
                Command::App { data: buf.slice(r) }
            }
            k => return Err(CommandError::Unknown(k)),
        };
        out.push(cmd);
    }
    if c.at != end {
        return Err(CommandError::Malformed);
    }
    Ok((out, data_ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Command> {
        let data = Bytes::from(vec![7u8; 2 * BLOCK_BYTES]);
        let seals = vec![
            raftblk_blockdev::seal::Seal::plain(4, &data[..BLOCK_BYTES]),
            raftblk_blockdev::seal::Seal {
                crc: 9,
                cipher: Some(raftblk_blockdev::seal::CipherSeal {
                    key_generation: 1,
                    nonce: [3; 12],
                    tag: [4; 16],
                }),
            },
        ];
        vec![
            Command::Write(BlockWrite {
                first: 4,
                data,
                seals,
                guards: vec![Guard { block: 5, version: 77 }],
            }),
            Command::Zero { first: 0, count: 2, deallocate: true },
            Command::Zero { first: 9, count: 1, deallocate: false },
            Command::Resize { size: 1 << 30 },
            Command::Write(BlockWrite {
                first: u64::MAX - 1,
                data: Bytes::new(),
                seals: vec![],
                guards: vec![],
            }),
            Command::App { data: Bytes::from_static(b"{\"op\":1}") },
            Command::App { data: Bytes::new() },
            Command::Scrub { id: 5, first: 256, count: 256 },
        ]
    }

    #[test]
    fn round_trip() {
        let enc = encode_batch(&sample());
        assert_eq!(decode_batch(&enc).unwrap(), sample());
        assert_eq!(decode_batch(&encode_batch(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_bit_flip_and_every_cut_is_rejected_and_data_flips_fail_their_seal() {
        let enc = encode_batch(&sample());
        let data = {
            let Command::Write(w) = &decode_batch(&enc).unwrap()[0] else { panic!("a write first") };
            let start = w.data.as_ptr() as usize - enc.as_ptr() as usize;
            start..start + w.data.len()
        };
        let enc = enc.to_vec();
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut bad = enc.clone();
                bad[i] ^= 1 << bit;
                let decoded = decode_batch(&Bytes::from(bad));
                if data.contains(&i) {
                    // Not the batch's CRC: the block's seal, which every copy checks.
                    let Ok(commands) = decoded else { panic!("byte {i} bit {bit}: {decoded:?}") };
                    let Command::Write(w) = &commands[0] else { panic!("a write first") };
                    let block = (i - data.start) / BLOCK_BYTES;
                    let bytes = &w.data[block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES];
                    let resealed = raftblk_blockdev::seal::Seal::plain(w.first + block as u64, bytes);
                    assert_ne!(
                        resealed.crc, w.seals[block].crc,
                        "byte {i} bit {bit}: the seal still matches"
                    );
                } else {
                    assert!(decoded.is_err(), "byte {i} bit {bit}");
                }
            }
            assert!(decode_batch(&Bytes::copy_from_slice(&enc[..i])).is_err(), "cut {i}");
        }
    }

    #[test]
    fn version_2_batches_are_still_read() {
        let mut v2 = encode_batch(&sample()).to_vec();
        let end = v2.len() - 4;
        v2[0] = VERSION_FULL_CRC;
        let crc = crc32fast::hash(&v2[..end]);
        v2[end..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_batch(&Bytes::from(v2.clone())).unwrap(), sample());
        // Its CRC covers the block data.
        v2[100] ^= 1; // inside the first write's block data
        assert_eq!(decode_batch(&Bytes::from(v2)), Err(CommandError::Checksum));
    }
}
