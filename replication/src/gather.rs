//! [`Gather`]: bytes to write (to a WAL file, or to a peer's socket), as parts written one
//! after another.
//!
//! Record headers and small payloads are copied into a growing buffer; payloads of at least
//! [`SHARE_MIN_BYTES`] join as the caller's own `Bytes` (a reference count, no copy). A
//! 1 MiB entry therefore goes from the Raft log to the io_uring WRITEV that writes it
//! without being copied in user space, where it used to be copied three times (the entry's
//! record data, the batch buffer, the file's buffer), and to a follower's socket with a
//! vectored write, where it used to be copied twice (the encoded message, the frame).

use bytes::Bytes;

/// Payloads this large are shared, not copied. Below it, a copy costs less than the iovec
/// and the allocation a part of its own takes.
pub const SHARE_MIN_BYTES: usize = 4096;

/// Bytes to be written in order: `parts`, then `tail`.
#[derive(Debug, Default, Clone)]
pub struct Gather {
    /// Complete parts, in order.
    parts: Vec<Bytes>,
    /// Small pieces copied since the last shared part.
    tail: Vec<u8>,
    /// Bytes in `parts` and `tail` together.
    len: usize,
}

impl Gather {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a copy of `bytes`.
    pub fn put_slice(&mut self, bytes: &[u8]) {
        self.tail.extend_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Appends `bytes`: shared if it is large, copied otherwise.
    pub fn put_bytes(&mut self, bytes: &Bytes) {
        if bytes.len() < SHARE_MIN_BYTES {
            self.put_slice(bytes);
        } else {
            self.close_tail();
            self.parts.push(bytes.clone());
            self.len += bytes.len();
        }
    }

    fn close_tail(&mut self) {
        if !self.tail.is_empty() {
            self.parts.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }

    /// The parts in order (none empty), leaving this empty.
    pub fn take_parts(&mut self) -> Vec<Bytes> {
        self.close_tail();
        self.len = 0;
        std::mem::take(&mut self.parts)
    }

    /// The parts in order (none empty).
    pub fn into_parts(mut self) -> Vec<Bytes> {
        self.take_parts()
    }

    /// One contiguous copy of the bytes.
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for part in &self.parts {
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.tail);
        out
    }

    /// Keeps the first `len` bytes (all of them if there are fewer).
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let in_parts = self.len - self.tail.len();
        if len >= in_parts {
            self.tail.truncate(len - in_parts);
        } else {
            self.tail.clear();
            let mut kept = 0;
            let mut keep = 0;
            for part in &mut self.parts {
                if kept + part.len() >= len {
                    part.truncate(len - kept);
                    keep += usize::from(!part.is_empty());
                    break;
                }
                kept += part.len();
                keep += 1;
            }
            self.parts.truncate(keep);
        }
        self.len = len;
    }

    /// Copies the bytes at `offset..offset + buf.len()` into `buf`; `false` (and `buf`
    /// untouched) if they are not all held.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> bool {
        let Some(end) = offset.checked_add(buf.len()) else { return false };
        if end > self.len {
            return false;
        }
        let mut at = 0; // start of the current piece in the gathered bytes
        let mut filled = 0;
        let pieces = self.parts.iter().map(|p| &p[..]).chain(std::iter::once(&self.tail[..]));
        for piece in pieces {
            let piece_end = at + piece.len();
            let from = offset + filled;
            if filled < buf.len() && from < piece_end {
                let n = (piece_end - from).min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&piece[from - at..from - at + n]);
                filled += n;
            }
            at = piece_end;
        }
        filled == buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::disk::SplitMix64 as Rng;

    fn bytes_of(len: usize, seed: u8) -> Bytes {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
    }

    #[test]
    fn large_payloads_are_shared_and_small_ones_copied() {
        let big = bytes_of(SHARE_MIN_BYTES, 1);
        let mut g = Gather::default();
        g.put_slice(b"head");
        g.put_bytes(&big);
        g.put_bytes(&bytes_of(10, 2));
        let parts = g.into_parts();
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0][..], b"head");
        // The same memory, not a copy.
        assert_eq!(parts[1].as_ptr(), big.as_ptr());
        assert_eq!(parts[2], bytes_of(10, 2));
    }

    /// Random puts, cuts and reads against a `Vec<u8>` holding the same bytes.
    #[test]
    fn behaves_as_one_contiguous_buffer() {
        for seed in 0..200 {
            let mut rng = Rng(seed);
            let mut g = Gather::default();
            let mut model: Vec<u8> = Vec::new();
            for step in 0..40 {
                let at = format!("seed {seed} step {step}");
                match rng.below(5) {
                    0 | 1 => {
                        let b = bytes_of(rng.below(2 * SHARE_MIN_BYTES as u64) as usize, step as u8);
                        g.put_bytes(&b);
                        model.extend_from_slice(&b);
                    }
                    2 => {
                        let b = bytes_of(rng.below(40) as usize, step as u8);
                        g.put_slice(&b);
                        model.extend_from_slice(&b);
                    }
                    3 => {
                        let len = rng.below(model.len() as u64 + 2) as usize;
                        g.truncate(len);
                        model.truncate(len);
                    }
                    _ => {
                        let offset = rng.below(model.len() as u64 + 2) as usize;
                        let len = rng.below(3 * SHARE_MIN_BYTES as u64) as usize;
                        let mut buf = vec![0xAA; len];
                        let held = g.read_at(offset, &mut buf);
                        match model.get(offset..offset + len) {
                            Some(want) => {
                                assert!(held, "{at}");
                                assert_eq!(buf, want, "{at}");
                            }
                            None => assert!(!held && buf.iter().all(|&b| b == 0xAA), "{at}"),
                        }
                    }
                }
                assert_eq!(g.len(), model.len(), "{at}");
                assert_eq!(g.to_vec(), model, "{at}");
            }
            let parts = g.take_parts();
            assert!(parts.iter().all(|p| !p.is_empty()), "seed {seed}");
            assert_eq!(parts.concat(), model, "seed {seed}");
            assert!(g.is_empty());
        }
    }
}
