//! [`UringDisk`]: the WAL's files written through io_uring.
//!
//! The WAL runs on one thread that may block, so the ring (`ring::WalRing`) is used
//! synchronously: one ring per disk, shared by its files behind a mutex (only one thread
//! uses it at a time; the lock is never contended in a node).
//!
//! * [`WalFile::append`] and [`WalFile::append_parts`] only add to the file's pending bytes
//!   (a [`Gather`]: large parts are the WAL's own `Bytes`, not copies), handing them to the
//!   kernel when they pass [`FLUSH_BYTES`].
//! * [`WalFile::sync`] submits the pending bytes as WRITEV SQEs linked to an
//!   `fdatasync` (`IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`) in one `io_uring_enter`
//!   and waits for all of them: the group commit of a round costs one system call where
//!   [`StdDisk`] makes one `pwrite` per append plus the `fdatasync`.
//! * **Direct writes.** Where the file system takes `O_DIRECT` (ext4, xfs; not tmpfs), a
//!   flush copies the block the file's end lies in (kept in memory), then the pending bytes,
//!   into one 4 KiB-aligned buffer padded with zeroes to whole blocks, and writes that with
//!   `O_DIRECT` at the block's offset: the next flush writes the partial block again, with
//!   what follows it. Rewriting an already synced prefix with the same bytes cannot damage
//!   it, even if the write tears. Measured on this project's machine (ext4 on virtio, Linux
//!   6.18), a buffered 1 MiB write cost about 0.77 ms of CPU (page cache allocation and the
//!   kernel's copy, `copy_folio_from_iter_atomic`, in an io-wq worker) against 0.12 ms direct:
//!   with three nodes each writing every byte to its WAL, it was the largest item of a
//!   replicated 1 MiB write's profile. The copy into the aligned buffer is the only
//!   user-space copy of a payload on its way to the WAL. [`UringDisk::open_buffered`] keeps
//!   the page cache (and writes the parts themselves, no copy).
//! * [`WalFile::read_at`] serves the buffered part from memory and the rest with `pread`
//!   (not through the ring): reads are rare (recovery reads each segment once; raft-rs
//!   reads entries the in-memory cache no longer holds), each is one blocking call either
//!   way, and a ring read would need `&mut` access to the ring from `&self`, or another
//!   lock, for no gain.
//! * [`WalFile::truncate`] drops buffered bytes, and `ftruncate`s the file when the cut
//!   reaches written data (io_uring has no truncate before Linux 6.9).
//! * Creating, opening, listing and removing files (and syncing the directory) are
//!   [`StdDisk`]'s own code: rare metadata calls.
//!
//! Dropping a file writes out (without syncing) what it still buffers and cuts a direct
//! write's padding, so a clean drop leaves the same bytes as [`StdDisk`] does; unsynced bytes
//! carry no promise either way.
//!
//! After a failed write or sync the file refuses every further call (the bytes on disk are
//! unknown, and after a failed `fdatasync` the kernel may have dropped dirty pages); the
//! WAL poisons itself on the same error and is reopened.

mod ring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use raftblk_blockdev::store::{AlignedBuf, DIRECT_IO_ALIGN_BYTES};

use self::ring::WalRing;
use super::disk::{DiskError, FdSync, StdDisk, WalDisk, WalFile};
use crate::gather::Gather;

/// Buffered bytes at which `append` hands them to the kernel without waiting for `sync`.
/// Small (and odd) in tests, so that flushes from `append` get exercised.
#[cfg(not(test))]
pub const FLUSH_BYTES: usize = 4 << 20;
#[cfg(test)]
pub const FLUSH_BYTES: usize = 10_001;

/// Below this many pending bytes, a write-out without a sync goes through the page cache
/// (see [`UringFile::write_buffered`]); larger ones are direct, where the page cache costs
/// more CPU than it saves.
const BUFFERED_WRITE_OUT_BYTES: usize = 64 << 10;

/// Block size of direct writes: offsets and lengths are multiples of it.
const BLOCK: u64 = DIRECT_IO_ALIGN_BYTES as u64;

/// A directory of WAL files written through io_uring.
#[derive(Debug, Clone)]
pub struct UringDisk {
    std: StdDisk,
    ring: Arc<Mutex<WalRing>>,
    /// Files are written with `O_DIRECT` where the file system allows it.
    direct: bool,
}

/// A file of a [`UringDisk`].
#[derive(Debug)]
pub struct UringFile {
    ring: Arc<Mutex<WalRing>>,
    file: File,
    name: String,
    /// The same file opened with `O_DIRECT` (see the module docs), if the file system takes it.
    direct: Option<File>,
    /// Bytes handed to the kernel and written: the file's length on disk (which a direct
    /// write's zero padding may exceed until the next flush, truncate or drop).
    written: u64,
    /// Direct writes only: the bytes of the block `written` ends inside (from its start to
    /// `written`), which the next flush writes again, with what follows them.
    partial: Vec<u8>,
    /// Appended bytes not yet handed to the kernel; they belong at offset `written`.
    pending: Gather,
    /// A write or sync failed; the file is unusable.
    failed: bool,
}

impl UringDisk {
    /// Uses `dir` (created if missing) for the WAL's files, with a new ring. Fails if
    /// io_uring cannot be set up here (old kernel, seccomp, `io_uring_disabled` sysctl).
    pub fn open(dir: impl AsRef<Path>) -> Result<UringDisk, DiskError> {
        let ring = WalRing::new().map_err(|source| DiskError::Io {
            op: "io_uring setup",
            name: dir.as_ref().display().to_string(),
            source,
        })?;
        Ok(UringDisk { std: StdDisk::open(dir)?, ring: Arc::new(Mutex::new(ring)), direct: true })
    }

    /// As [`UringDisk::open`], with writes through the page cache even where `O_DIRECT`
    /// works (what a file system without it gets).
    pub fn open_buffered(dir: impl AsRef<Path>) -> Result<UringDisk, DiskError> {
        Ok(UringDisk { direct: false, ..UringDisk::open(dir)? })
    }

    pub fn dir(&self) -> &Path {
        self.std.dir()
    }

    /// `fdatasync`s completed through this disk's ring (all its files).
    pub fn fdatasyncs(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).fdatasyncs()
    }

    fn wrap(&self, (file, name, len_bytes): (File, String, u64)) -> Result<UringFile, DiskError> {
        // EINVAL where the file system has no direct I/O (tmpfs): that file is buffered.
        let direct = self.direct.then(|| {
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(self.dir().join(&name)).ok()
        });
        let mut f = UringFile {
            ring: self.ring.clone(),
            file,
            direct: direct.flatten(),
            name,
            written: len_bytes,
            partial: Vec::new(),
            pending: Gather::default(),
            failed: false,
        };
        f.load_partial()?;
        Ok(f)
    }
}

impl WalDisk for UringDisk {
    type File = UringFile;

    fn create(&self, name: &str) -> Result<UringFile, DiskError> {
        self.wrap(self.std.create(name)?.into_parts())
    }

    fn open(&self, name: &str) -> Result<UringFile, DiskError> {
        self.wrap(self.std.open(name)?.into_parts())
    }

    fn list(&self) -> Result<Vec<String>, DiskError> {
        self.std.list()
    }

    fn remove(&self, name: &str) -> Result<(), DiskError> {
        self.std.remove(name)
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), DiskError> {
        self.std.rename(from, to)
    }

    fn reuse(&self, from: &str, to: &str) -> Result<UringFile, DiskError> {
        self.wrap(self.std.reuse(from, to)?.into_parts())
    }
}

impl UringFile {
    fn check_usable(&self, op: &'static str) -> Result<(), DiskError> {
        if self.failed {
            Err(DiskError::Io {
                op,
                name: self.name.clone(),
                source: io::Error::other("an earlier io_uring write or sync of this file failed"),
            })
        } else {
            Ok(())
        }
    }

    /// Hands the pending bytes to the kernel, followed by an `fdatasync` if `sync`, and
    /// waits for them.
    fn flush(&mut self, sync: bool) -> Result<(), DiskError> {
        let op = if sync { "io_uring write+fdatasync" } else { "io_uring write" };
        self.check_usable(op)?;
        if self.pending.is_empty() && !sync {
            return Ok(());
        }
        let len_bytes = self.pending.len() as u64;
        let parts = self.pending.take_parts();
        let (file, offset, mut parts, partial) = match &self.direct {
            Some(direct) if len_bytes > 0 => {
                let (block, partial) = self.blocks(&parts);
                (direct, self.written - self.partial.len() as u64, vec![block], Some(partial))
            }
            Some(direct) => (direct, self.written, parts, None),
            None => (&self.file, self.written, parts, None),
        };
        // A panic while the lock was held left the ring marked busy, and it refuses work.
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let result = ring.write_all(file, offset, &mut parts, sync);
        drop(ring);
        if let Err(source) = result {
            self.failed = true;
            return Err(DiskError::Io { op, name: self.name.clone(), source });
        }
        self.written += len_bytes;
        if let Some(partial) = partial {
            self.partial = partial;
        }
        Ok(())
    }

    /// Hands the pending bytes to the page cache with `pwrite`s on this thread: a small
    /// write-out (a single-copy volume's round) then costs a copy into the page cache instead
    /// of a device write in the round, or an io-wq worker's wakeup. The next direct write
    /// rewrites the partial block through the `O_DIRECT` handle, and the kernel writes back
    /// and drops the cached pages in its range before it does, so the file stays coherent.
    fn write_buffered(&mut self) -> Result<(), DiskError> {
        self.check_usable("write")?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let len_bytes = self.pending.len() as u64;
        let partial = self.partial_after_pending();
        let parts = self.pending.take_parts();
        let mut offset = self.written;
        for part in &parts {
            if let Err(source) = self.file.write_all_at(part, offset) {
                self.failed = true;
                return Err(DiskError::Io { op: "write", name: self.name.clone(), source });
            }
            offset += part.len() as u64;
        }
        self.written += len_bytes;
        self.partial = partial;
        Ok(())
    }

    /// The bytes of the block the file will end inside once the pending bytes are written:
    /// the end of today's partial block (if they stay inside it), then the pending bytes' tail.
    fn partial_after_pending(&self) -> Vec<u8> {
        let pending = self.pending.len();
        let keep = ((self.written + pending as u64) % BLOCK) as usize;
        let from_pending = keep.min(pending);
        // When the pending bytes stay inside today's partial block, `keep` covers all of both.
        let mut partial = self.partial[self.partial.len() - (keep - from_pending)..].to_vec();
        let start = partial.len();
        partial.resize(keep, 0);
        let held = self.pending.read_at(pending - from_pending, &mut partial[start..]);
        debug_assert!(held, "the range ends at the pending bytes' end");
        partial
    }

    /// For a direct write of `parts` after `written`: one aligned buffer of whole blocks
    /// holding the partial block's bytes, then the parts, then zeroes (a recycled buffer's
    /// old bytes past the end could read as records of this segment); and the new partial
    /// block's bytes. The copy replaces the page cache's: a buffered write of 1 MiB costs
    /// this kernel several times the CPU of a user-space copy and a direct write.
    fn blocks(&self, parts: &[Bytes]) -> (Bytes, Vec<u8>) {
        let len = self.partial.len() + parts.iter().map(Bytes::len).sum::<usize>();
        let mut buf = AlignedBuf::recycled(len.next_multiple_of(DIRECT_IO_ALIGN_BYTES));
        let out = buf.as_mut_slice();
        out[..self.partial.len()].copy_from_slice(&self.partial);
        let mut at = self.partial.len();
        for part in parts {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        out[len..].fill(0);
        let partial = out[len - len % DIRECT_IO_ALIGN_BYTES..len].to_vec();
        (buf.into_bytes(), partial)
    }

    /// Direct writes only: reads the bytes of the block `written` ends inside from the file.
    fn load_partial(&mut self) -> Result<(), DiskError> {
        self.partial.clear();
        if self.direct.is_none() {
            return Ok(());
        }
        let start = self.written - self.written % BLOCK;
        // Below one block, so it fits in a usize.
        self.partial.resize((self.written - start) as usize, 0);
        self.file.read_exact_at(&mut self.partial, start).map_err(|source| DiskError::Io {
            op: "read",
            name: self.name.clone(),
            source,
        })
    }

    fn flush_if_full(&mut self) -> Result<(), DiskError> {
        if self.pending.len() >= FLUSH_BYTES {
            self.flush(false)?;
        }
        Ok(())
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        if !self.failed && !self.pending.is_empty() {
            if let Err(e) = self.flush(false) {
                tracing::warn!(error = %e, "wal: writing out a dropped file's unsynced bytes failed");
            }
        }
        // A direct write ends on a block boundary; the zeroes past the file's length go, so
        // a clean drop leaves the same bytes as a buffered file.
        if !self.failed && !self.partial.is_empty() {
            if let Err(e) = self.file.set_len(self.written) {
                tracing::warn!(error = %e, "wal: cutting a dropped file's padding failed");
            }
        }
    }
}

impl WalFile for UringFile {
    type Sync = FdSync;

    fn len_bytes(&self) -> Result<u64, DiskError> {
        self.check_usable("len")?;
        Ok(self.written + self.pending.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check_usable("read")?;
        let len_bytes = self.written + self.pending.len() as u64;
        let end = offset.saturating_add(buf.len() as u64);
        if end > len_bytes {
            return Err(DiskError::ReadPastEnd {
                name: self.name.clone(),
                offset,
                len_bytes: buf.len() as u64,
                file_len_bytes: len_bytes,
            });
        }
        // Bytes below `written` are in the file, the rest pending. Both bounds are at
        // most `len_bytes`, so the differences fit in the slices' `usize` lengths.
        let on_disk = self.written.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (disk_part, buffered_part) = buf.split_at_mut(on_disk);
        if !disk_part.is_empty() {
            self.file.read_exact_at(disk_part, offset).map_err(|source| DiskError::Io {
                op: "read",
                name: self.name.clone(),
                source,
            })?;
        }
        if !buffered_part.is_empty() {
            let start = (offset + on_disk as u64 - self.written) as usize;
            if !self.pending.read_at(start, buffered_part) {
                return Err(DiskError::Io {
                    op: "read",
                    name: self.name.clone(),
                    source: io::Error::other("buffered range out of bounds"),
                });
            }
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) -> Result<(), DiskError> {
        self.check_usable("append")?;
        self.pending.put_slice(data);
        self.flush_if_full()
    }

    fn append_parts(&mut self, parts: Vec<Bytes>) -> Result<(), DiskError> {
        self.check_usable("append")?;
        for part in &parts {
            self.pending.put_bytes(part);
        }
        self.flush_if_full()
    }

    fn write_out(&mut self) -> Result<(), DiskError> {
        if self.direct.is_some() && self.pending.len() < BUFFERED_WRITE_OUT_BYTES {
            self.write_buffered()
        } else {
            self.flush(false)
        }
    }

    fn sync(&mut self) -> Result<(), DiskError> {
        self.flush(true)
    }

    /// The pending bytes go out as [`WalFile::write_out`] sends them (a small round through
    /// the page cache, which the `fdatasync` then writes back), and the sync is a plain
    /// `fdatasync` on a handle of its own: the ring stays with the thread that appends.
    fn begin_sync(&mut self) -> Result<FdSync, DiskError> {
        self.write_out()?;
        FdSync::of(&self.file, &self.name)
    }

    fn truncate(&mut self, len_bytes: u64) -> Result<(), DiskError> {
        self.check_usable("truncate")?;
        if len_bytes >= self.written {
            let keep = len_bytes - self.written;
            // Checked against the pending length before the cast, so `keep` fits in a usize.
            if keep <= self.pending.len() as u64 {
                self.pending.truncate(keep as usize);
            }
            // The buffered bytes go first: the file's length is then cut (dropping a reused
            // file's old bytes past it) or grown with zeroes after them.
            self.flush(false)?;
        } else {
            self.pending.truncate(0);
        }
        self.file.set_len(len_bytes).map_err(|source| DiskError::Io {
            op: "truncate",
            name: self.name.clone(),
            source,
        })?;
        self.written = len_bytes;
        self.load_partial()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::wal::disk::StdFile;
    use crate::wal::record::{GroupId, HardState, LogIndex, NodeId, Record, Term};
    use crate::wal::{Wal, WalOptions};

    /// A [`UringDisk`] in `dir` (with direct writes if `direct` and the file system takes
    /// them), or `None` (with a note: the io_uring half did not run) when this kernel refuses
    /// io_uring.
    fn uring_disk(dir: &Path, direct: bool) -> Option<UringDisk> {
        match if direct { UringDisk::open(dir) } else { UringDisk::open_buffered(dir) } {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipping: io_uring unavailable: {e}");
                None
            }
        }
    }

    // splitmix64, seeded: the same operations on both disks, reproducible per seed.
    use crate::wal::disk::SplitMix64 as Rng;

    fn dir_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name().into_string().expect("name"), std::fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn a_buffered_write_out_keeps_the_partial_block_for_the_next_direct_write() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = uring_disk(tmp.path(), true) else { return };
        let mut f = disk.create("f").expect("create");
        if f.direct.is_none() {
            return; // this file system takes no O_DIRECT: no partial block to keep
        }
        let data: Vec<u8> = (0..9010u32).map(|i| (i * 7 % 251) as u8).collect();
        // Inside the first block, then across into the second, then into the third.
        for (from, to) in [(0, 100), (100, 5000), (5000, 5010), (5010, 9010)] {
            f.append(&data[from..to]).expect("append");
            f.write_out().expect("write_out");
            let block_start = to - to % BLOCK as usize;
            assert_eq!(f.partial, data[block_start..to], "partial block after {to} bytes");
        }
        // A direct write (the sync) rewrites the partial block from what was kept.
        f.append(&data[..10]).expect("append");
        f.sync().expect("sync");
        drop(f);
        let on_disk = std::fs::read(tmp.path().join("f")).expect("read");
        assert_eq!(on_disk[..9010], data[..]);
        assert_eq!(on_disk[9010..], data[..10]);
    }

    /// Applies the same random appends, syncs, truncates, reads, reopens, creates and removes
    /// to a [`StdDisk`] and a [`UringDisk`] and checks that every answer and, at the end, every
    /// file's bytes are the same.
    fn differential(seed: u64, steps: usize, direct: bool) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(uring) = uring_disk(&tmp.path().join("uring"), direct) else { return };
        let std_disk = StdDisk::open(tmp.path().join("std")).expect("std disk");
        let mut rng = Rng(seed);
        let names = ["a", "b", "c"];
        let mut files: Vec<Option<(StdFile, UringFile)>> = names.iter().map(|_| None).collect();
        for step in 0..steps {
            let at = format!("seed {seed} step {step}");
            let i = rng.below(names.len() as u64) as usize;
            let name = names[i];
            let Some((s, u)) = files[i].as_mut() else {
                // Open or create the file on both disks, with the same outcome.
                let pair = match (WalDisk::open(&std_disk, name), WalDisk::open(&uring, name)) {
                    (Ok(s), Ok(u)) => (s, u),
                    (Err(DiskError::NotFound { .. }), Err(DiskError::NotFound { .. })) => {
                        (std_disk.create(name).expect("create"), uring.create(name).expect("create"))
                    }
                    (s, u) => panic!("{at}: open differs: {s:?} vs {u:?}"),
                };
                files[i] = Some(pair);
                continue;
            };
            let len = s.len_bytes().expect("len");
            assert_eq!(u.len_bytes().expect("len"), len, "{at}: length");
            match rng.below(100) {
                0..=39 => {
                    // Mostly small records; sometimes longer than a chain of SQEs or a flush.
                    let n = match rng.below(10) {
                        0 => rng.below(40_000),
                        1..=3 => rng.below(5_000),
                        _ => rng.below(300),
                    } as usize;
                    let data = rng.bytes(n);
                    // Chosen by the length, so the draws (and the seeds' coverage) stay as they were.
                    if n.is_multiple_of(2) {
                        s.append(&data).expect("std append");
                        u.append(&data).expect("uring append");
                    } else {
                        // The same bytes as parts, which the uring file keeps as they are.
                        let cut = n / 3;
                        let parts =
                            vec![Bytes::copy_from_slice(&data[..cut]), Bytes::copy_from_slice(&data[cut..])];
                        s.append_parts(parts.clone()).expect("std append_parts");
                        u.append_parts(parts).expect("uring append_parts");
                    }
                }
                40..=54 if len % 3 == 0 => {
                    // A write-out without a sync (buffered when small, direct when large),
                    // chosen by the length so that the draws stay as they were.
                    s.write_out().expect("std write_out");
                    u.write_out().expect("uring write_out");
                }
                40..=54 => {
                    s.sync().expect("std sync");
                    u.sync().expect("uring sync");
                }
                55..=64 => {
                    // Cut into the buffered tail, into written data, or (rarely) grow.
                    let to = match rng.below(8) {
                        0 => len + rng.below(100),
                        1..=3 => len.saturating_sub(rng.below(200)),
                        _ => rng.below(len + 1),
                    };
                    s.truncate(to).expect("std truncate");
                    u.truncate(to).expect("uring truncate");
                }
                65..=89 => {
                    let off = rng.below(len + 1);
                    let n = rng.below(len - off + 1 + 10) as usize;
                    let (mut a, mut b) = (vec![0u8; n], vec![1u8; n]);
                    match (s.read_at(off, &mut a), u.read_at(off, &mut b)) {
                        (Ok(()), Ok(())) => assert!(a == b, "{at}: read {off}+{n} differs"),
                        (Err(DiskError::ReadPastEnd { .. }), Err(DiskError::ReadPastEnd { .. })) => {
                            assert!(off + n as u64 > len, "{at}")
                        }
                        (s, u) => panic!("{at}: read {off}+{n}: {s:?} vs {u:?}"),
                    }
                }
                90..=95 => {
                    // Close both handles (unsynced bytes included) and reopen later.
                    files[i] = None;
                }
                _ => {
                    files[i] = None;
                    std_disk.remove(name).expect("std remove");
                    uring.remove(name).expect("uring remove");
                }
            }
        }
        for (s, u) in files.iter_mut().flatten() {
            s.sync().expect("std sync");
            u.sync().expect("uring sync");
        }
        drop(files);
        let (mut a, mut b) = (std_disk.list().expect("list"), uring.list().expect("list"));
        a.sort();
        b.sort();
        assert_eq!(a, b, "seed {seed}: file lists");
        let (a, b) = (dir_contents(std_disk.dir()), dir_contents(uring.dir()));
        assert!(a == b, "seed {seed}: file bytes differ");
        assert!(a.iter().any(|(_, bytes)| bytes.len() > 4096), "seed {seed}: the test wrote little");
    }

    #[test]
    fn std_and_uring_disks_agree_on_random_operations() {
        for seed in 0..12 {
            differential(seed, 600, seed % 2 == 0);
        }
    }

    /// The file's bytes up to `len`, and that any past it are a direct write's zero padding.
    fn file_bytes(path: &Path, len: usize) -> Vec<u8> {
        let mut bytes = std::fs::read(path).expect("read");
        assert!(bytes.len() >= len, "the file is shorter than {len}");
        assert!(bytes[len..].iter().all(|&b| b == 0), "past the end: not zeroes");
        bytes.truncate(len);
        bytes
    }

    #[test]
    fn reads_span_written_and_buffered_bytes() {
        for direct in [true, false] {
            reads_span(direct);
        }
    }

    fn reads_span(direct: bool) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = uring_disk(tmp.path(), direct) else { return };
        let fdatasyncs = || disk.fdatasyncs();
        let mut f = disk.create("f").expect("create");
        f.append(b"0123456789").expect("append");
        assert_eq!(fdatasyncs(), 0);
        f.sync().expect("sync");
        assert_eq!(fdatasyncs(), 1, "sync reached the kernel");
        f.append(b"abcdef").expect("append");
        let mut buf = [0u8; 8];
        f.read_at(6, &mut buf).expect("read across the boundary");
        assert_eq!(&buf, b"6789abcd");
        // Only the synced part is in the file so far.
        assert_eq!(file_bytes(&tmp.path().join("f"), 10), b"0123456789");
        f.truncate(12).expect("truncate inside the buffer");
        f.sync().expect("sync");
        assert_eq!(fdatasyncs(), 2);
        assert_eq!(file_bytes(&tmp.path().join("f"), 12), b"0123456789ab");
        f.append(b"XY").expect("append");
        f.truncate(4).expect("truncate into written data");
        f.append(b"!").expect("append");
        drop(f); // writes out the buffer
        assert_eq!(std::fs::read(tmp.path().join("f")).expect("read"), b"0123!");
        assert_eq!(fdatasyncs(), 2, "dropping does not sync");
    }

    #[test]
    fn a_failed_file_refuses_further_calls() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(disk) = uring_disk(tmp.path(), true) else { return };
        let mut f = disk.create("f").expect("create");
        // Swap in read-only descriptors: the kernel refuses the write (EBADF).
        f.file = File::open(tmp.path().join("f")).expect("open read-only");
        if f.direct.is_some() {
            f.direct = Some(File::open(tmp.path().join("f")).expect("open read-only"));
        }
        f.append(b"data").expect("append only buffers");
        let err = f.sync().expect_err("write to a read-only descriptor");
        assert!(
            matches!(&err, DiskError::Io { source, .. } if source.raw_os_error() == Some(libc::EBADF)),
            "{err}"
        );
        assert!(f.append(b"x").is_err());
        assert!(f.sync().is_err());
        assert!(f.len_bytes().is_err());
        // The ring itself is fine: other files still work.
        let mut g = disk.create("g").expect("create");
        g.append(b"ok").expect("append");
        g.sync().expect("sync");
    }

    fn entry(g: u64, i: u64, t: u64, rng: &mut Rng) -> Record {
        let n = match rng.below(20) {
            0 => 20_000,
            _ => rng.below(600),
        } as usize;
        Record::entry(GroupId(g), LogIndex(i), Term(t), Bytes::from(rng.bytes(n)))
    }

    /// The same WAL workload on `Wal<StdDisk>` and `Wal<UringDisk>`, with reopens: the same
    /// entries come back and the segment files are byte for byte the same.
    #[test]
    fn wal_on_uring_matches_wal_on_std_across_reopens() {
        for direct in [true, false] {
            wal_on_uring_matches(direct);
        }
    }

    fn wal_on_uring_matches(direct: bool) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let Some(uring) = uring_disk(&tmp.path().join("uring"), direct) else { return };
        let std_dir = tmp.path().join("std");
        let options = WalOptions { segment_target_bytes: 64 << 10 };
        let mut a = Wal::open(StdDisk::open(&std_dir).expect("disk"), options).expect("open");
        let mut b = Wal::open(uring.clone(), options).expect("open");
        let mut rng = Rng(42);
        let mut next = [1u64; 3];
        let mut term = 1;
        for round in 0..400u64 {
            let mut batch = Vec::new();
            for g in 0..3u64 {
                for _ in 0..rng.below(4) {
                    batch.push(entry(g, next[g as usize], term, &mut rng));
                    next[g as usize] += 1;
                }
                if rng.below(10) == 0 {
                    let hs = HardState {
                        term: Term(term),
                        vote: NodeId(1),
                        commit: LogIndex(next[g as usize] - 1),
                    };
                    batch.push(Record::hard_state(GroupId(g), hs));
                }
                if rng.below(15) == 0 && next[g as usize] > 5 {
                    batch.push(Record::compact_to(GroupId(g), LogIndex(next[g as usize] - 3)));
                }
            }
            if rng.below(25) == 0 {
                // A new leader rewrites group 0's last two entries.
                term += 1;
                let g = 0usize;
                if next[g] > 3 && a.first_index(GroupId(0)).is_some_and(|f| f.0 + 2 < next[g]) {
                    next[g] -= 2;
                    batch.push(entry(0, next[g], term, &mut rng));
                    next[g] += 1;
                }
            }
            a.append(&batch).expect("std append");
            b.append(&batch).expect("uring append");
            if rng.below(3) > 0 {
                a.sync().expect("std sync");
                b.sync().expect("uring sync");
            }
            if round % 97 == 96 {
                a.sync().expect("std sync");
                b.sync().expect("uring sync");
                drop((a, b));
                a = Wal::open(StdDisk::open(&std_dir).expect("disk"), options).expect("reopen std");
                b = Wal::open(uring.clone(), options).expect("reopen uring");
                assert_eq!(b.recovery_report().truncation, None);
            }
            for g in 0..3 {
                let g = GroupId(g);
                assert_eq!(a.first_index(g), b.first_index(g), "round {round}");
                assert_eq!(a.next_index(g), b.next_index(g), "round {round}");
                assert_eq!(a.hard_state(g), b.hard_state(g), "round {round}");
                if let (Some(lo), Some(hi)) = (b.first_index(g), b.last_index(g)) {
                    let lo = LogIndex(lo.0.max(hi.0.saturating_sub(5)));
                    let (ea, eb) = (
                        a.entries(g, lo, hi.next()).expect("std"),
                        b.entries(g, lo, hi.next()).expect("uring"),
                    );
                    assert_eq!(ea, eb, "round {round}");
                }
            }
        }
        a.sync().expect("std sync");
        b.sync().expect("uring sync");
        // Four reopens add four segments; the rest are rotations (most since compacted away).
        let newest = b.segment_ids().last().map_or(0, |id| id.0);
        assert!(newest > 20, "the workload rotated segments: {:?}", b.segment_ids());
        assert_eq!(a.segment_ids(), b.segment_ids());
        drop((a, b));
        let (sa, sb) = (dir_contents(&std_dir), dir_contents(uring.dir()));
        assert_eq!(sa.len(), sb.len());
        assert!(sa == sb, "segment files differ");
    }
}
