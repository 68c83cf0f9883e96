//! Commands carried in Raft entries, and their binary encoding.
//!
//! One entry carries a batch of commands (several client writes proposed together):
//!
//! ```text
//! [version u8 = 1][count u32] count × command [crc32 u32 over everything before it]
//! command: [kind u8] then
//!   1 Write        offset u64, len u32, data (len bytes)
//!   2 Trim         offset u64, len u64
//!   3 WriteZeroes  offset u64, len u64
//!   4 Resize       size u64
//!   5 App          len u32, data (len bytes): opaque to this crate, for groups whose
//!                  replicas apply to a state machine ([`crate::machine`])
//! ```
//!
//! All integers little-endian. Decoding slices write data out of the entry's buffer without
//! copying it.

use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
const KIND_WRITE: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_WRITE_ZEROES: u8 = 3;
const KIND_RESIZE: u8 = 4;
const KIND_APP: u8 = 5;

/// Largest number of commands in one batch.
pub const BATCH_COMMANDS_MAX: usize = 4096;

/// One change to a replicated volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Write `data` at `offset`.
    Write { offset: u64, data: Bytes },
    /// Discard a range (reads return zeroes).
    Trim { offset: u64, len: u64 },
    /// Zero a range.
    WriteZeroes { offset: u64, len: u64 },
    /// Grow the volume to `size` bytes.
    Resize { size: u64 },
    /// A state machine's command (see [`crate::machine`]); volume stores ignore it.
    App { data: Bytes },
}

impl Command {
    /// The byte range `(offset, len)` the command changes (`None` for a resize).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Command::Write { offset, data } => Some((*offset, data.len() as u64)),
            Command::Trim { offset, len } | Command::WriteZeroes { offset, len } => Some((*offset, *len)),
            Command::Resize { .. } | Command::App { .. } => None,
        }
    }

    /// Bytes of data the command carries (only writes and state machine commands carry any).
    pub fn payload_len(&self) -> usize {
        match self {
            Command::Write { data, .. } | Command::App { data } => data.len(),
            _ => 0,
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
    let data_bytes: usize = commands.iter().map(|c| c.payload_len() + 17).sum();
    let mut out = BytesMut::with_capacity(9 + data_bytes);
    out.put_u8(VERSION);
    out.put_u32_le(commands.len() as u32);
    for c in commands {
        match c {
            Command::Write { offset, data } => {
                out.put_u8(KIND_WRITE);
                out.put_u64_le(*offset);
                out.put_u32_le(data.len() as u32);
                out.put_slice(data);
            }
            Command::Trim { offset, len } => {
                out.put_u8(KIND_TRIM);
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
            Command::WriteZeroes { offset, len } => {
                out.put_u8(KIND_WRITE_ZEROES);
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
            }
            Command::Resize { size } => {
                out.put_u8(KIND_RESIZE);
                out.put_u64_le(*size);
            }
            Command::App { data } => {
                out.put_u8(KIND_APP);
                out.put_u32_le(data.len() as u32);
                out.put_slice(data);
            }
        }
    }
    let crc = crc32fast::hash(&out);
    out.put_u32_le(crc);
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
    if crc32fast::hash(&buf[..end]) != u32::from_le_bytes(stored) {
        return Err(CommandError::Checksum);
    }
    let mut c = Cursor { buf, at: 0, end };
    let version = c.u8()?;
    if version != VERSION {
        return Err(CommandError::Unknown(version));
    }
    let count = c.u32()? as usize;
    if count > BATCH_COMMANDS_MAX {
        return Err(CommandError::Malformed);
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let cmd = match c.u8()? {
            KIND_WRITE => {
                let offset = c.u64()?;
                let len = c.u32()? as usize;
                let r = c.take(len)?;
                Command::Write { offset, data: buf.slice(r) }
            }
            KIND_TRIM => Command::Trim { offset: c.u64()?, len: c.u64()? },
            KIND_WRITE_ZEROES => Command::WriteZeroes { offset: c.u64()?, len: c.u64()? },
            KIND_RESIZE => Command::Resize { size: c.u64()? },
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Command> {
        vec![
            Command::Write { offset: 4096, data: Bytes::from(vec![7u8; 100]) },
            Command::Trim { offset: 0, len: 8192 },
            Command::WriteZeroes { offset: 512, len: 1 },
            Command::Resize { size: 1 << 30 },
            Command::Write { offset: u64::MAX - 1, data: Bytes::new() },
            Command::App { data: Bytes::from_static(b"{\"op\":1}") },
            Command::App { data: Bytes::new() },
        ]
    }

    #[test]
    fn round_trip() {
        let enc = encode_batch(&sample());
        assert_eq!(decode_batch(&enc).unwrap(), sample());
        assert_eq!(decode_batch(&encode_batch(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_bit_flip_and_every_cut_is_rejected() {
        let enc = encode_batch(&sample()).to_vec();
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut bad = enc.clone();
                bad[i] ^= 1 << bit;
                assert!(decode_batch(&Bytes::from(bad)).is_err(), "byte {i} bit {bit}");
            }
            assert!(decode_batch(&Bytes::copy_from_slice(&enc[..i])).is_err(), "cut {i}");
        }
    }
}
