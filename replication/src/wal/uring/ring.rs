//! The only `unsafe` code of this crate: a small io_uring that the WAL thread uses
//! synchronously, behind the safe [`WalRing`].
//!
//! One call, [`WalRing::write_all`], writes a list of buffers (one after another) at an
//! offset of a file and, if asked, `fdatasync`s the file after it: the buffers are covered by
//! WRITEV SQEs of at most [`SQE_BYTES_MAX`] bytes and [`IOVECS_MAX`] iovecs, chained with `IOSQE_IO_LINK` and followed by an
//! `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`, so a group commit is one
//! `io_uring_enter` that submits the writes and the sync and waits for all of them. The
//! kernel runs a linked SQE only after the previous one succeeded in full; a short or
//! failed write cancels the rest of the chain (`-ECANCELED`). The call then resubmits
//! from the first byte not written (short writes, EINTR/EAGAIN up to [`RETRIES_MAX`]
//! times) or returns the error.
//!
//! Soundness: the kernel reads the buffers, the iovec arrays and the descriptor until each
//! SQE's completion is posted. `write_all` returns only after it has reaped the completion of
//! every SQE it pushed, so the borrow of the file and of the buffers covers the kernel's use.
//! If the ring itself fails with SQEs pushed or in flight (an `io_uring_enter` error other
//! than EINTR/EAGAIN/EBUSY, or completions that never come), the buffers are leaked, never
//! freed, and the ring refuses every later call, so SQEs left in its queue are never
//! submitted with a descriptor number that may by then name another file. A panic between
//! pushing and reaping leaves the buffers leaked as well (they are held in a `ManuallyDrop`) and
//! the ring marked busy, which later calls also treat as broken.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};

/// Submission queue entries (the completion queue gets twice as many).
const RING_ENTRIES: u32 = 64;
/// Most WRITE SQEs in one chain; one more slot is left for the FSYNC.
const CHAIN_WRITES_MAX: usize = RING_ENTRIES as usize - 1;
/// Longest transfer of one WRITE SQE. Small in tests, so that chains of several writes
/// (and their continuation in a later submission) get exercised.
#[cfg(not(test))]
const SQE_BYTES_MAX: usize = 1 << 30;
#[cfg(test)]
const SQE_BYTES_MAX: usize = 4096;
/// Most iovecs of one WRITEV (the kernel's `UIO_MAXIOV`).
const IOVECS_MAX: usize = 1024;
/// Times one call retries after EINTR/EAGAIN completions before returning the error.
const RETRIES_MAX: u32 = 16;
/// `io_uring_enter` calls one submission may take (EINTR, EBUSY, EAGAIN) before the ring is
/// considered broken.
const ENTER_ATTEMPTS_MAX: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing in flight.
    Ready,
    /// SQEs pushed and not all reaped (only seen here again after a panic).
    Busy,
    /// The ring failed with SQEs possibly in flight; never used again.
    Broken,
}

/// A ring for synchronous use by one thread at a time (callers share it behind a mutex).
pub(crate) struct WalRing {
    ring: IoUring,
    state: State,
    /// Completion results of the current submission, by `user_data`.
    results: Vec<Option<i32>>,
    /// `fdatasync`s completed successfully (tests check that a sync reached the kernel).
    fdatasyncs: u64,
}

impl std::fmt::Debug for WalRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalRing").field("state", &self.state).finish_non_exhaustive()
    }
}

/// How a call failed.
enum Failure {
    /// An operation failed; every SQE was reaped, the ring is fine.
    Op(io::Error),
    /// The ring failed; the kernel may still hold SQEs.
    Ring(io::Error),
}

impl WalRing {
    /// Creates a ring, checks that the kernel has the opcodes used here, and runs a NOP
    /// through it. Fails where io_uring is missing or forbidden (ENOSYS, EPERM).
    pub(crate) fn new() -> io::Result<WalRing> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in
            [(opcode::Nop::CODE, "NOP"), (opcode::Writev::CODE, "WRITEV"), (opcode::Fsync::CODE, "FSYNC")]
        {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks the {name} opcode"),
                ));
            }
        }
        let mut wal_ring = WalRing { ring, state: State::Ready, results: Vec::new(), fdatasyncs: 0 };
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a NOP refers to no memory and no file descriptor.
        unsafe { wal_ring.push_all(&[nop]) }?;
        match wal_ring.reap_all(1) {
            Ok(()) => {}
            Err(Failure::Op(e) | Failure::Ring(e)) => return Err(e),
        }
        match wal_ring.results.first().copied().flatten() {
            Some(r) if r >= 0 => Ok(wal_ring),
            Some(r) => Err(io::Error::from_raw_os_error(-r)),
            None => Err(io::Error::other("no completion for the NOP")),
        }
    }

    /// Writes `parts`, one after another, at `offset` of `file` and, if `fdatasync`, then
    /// makes the file's data durable; returns once everything completed. Partial progress is
    /// not reported: after an error, any prefix of the bytes may have been written.
    ///
    /// `parts` are lent to the kernel: they are handed back unchanged, except when the ring
    /// itself breaks (then they are leaked and left empty, and every later call fails).
    pub(crate) fn write_all(
        &mut self,
        file: &File,
        offset: u64,
        parts: &mut Vec<Bytes>,
        fdatasync: bool,
    ) -> io::Result<()> {
        match self.state {
            State::Ready => {}
            State::Busy | State::Broken => {
                self.state = State::Broken;
                return Err(io::Error::other("the WAL's io_uring failed earlier and is not used again"));
            }
        }
        // Not freed if we unwind while the kernel may read it.
        let lent = ManuallyDrop::new(std::mem::take(parts));
        match self.run(file, offset, &lent, fdatasync) {
            Ok(()) => {
                *parts = ManuallyDrop::into_inner(lent);
                Ok(())
            }
            Err(Failure::Op(e)) => {
                *parts = ManuallyDrop::into_inner(lent);
                Err(e)
            }
            Err(Failure::Ring(e)) => {
                // `lent` stays leaked: the kernel may still read it.
                self.state = State::Broken;
                tracing::error!(error = %e, "the WAL's io_uring failed; its buffers are leaked");
                Err(e)
            }
        }
    }

    fn run(&mut self, file: &File, offset: u64, parts: &[Bytes], fdatasync: bool) -> Result<(), Failure> {
        let fd = types::Fd(file.as_raw_fd());
        let layout = Layout::of(parts);
        let mut progress = Progress { done: 0, synced: !fdatasync, retries: 0 };
        let mut plan: Vec<(usize, usize)> = Vec::new();
        // Each SQE's iovecs, one after another. Held in a `ManuallyDrop` so that a ring
        // failure (which returns early) leaks them with the parts they point into.
        let mut iovecs = ManuallyDrop::new(Vec::<libc::iovec>::new());
        let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
        let mut entries: Vec<squeue::Entry> = Vec::new();
        while progress.done < layout.total || !progress.synced {
            plan.clear();
            iovecs.clear();
            spans.clear();
            let mut at = progress.done;
            while at < layout.total && plan.len() < CHAIN_WRITES_MAX {
                let first = iovecs.len();
                let n = layout.iovecs(at, &mut iovecs);
                plan.push((at, n));
                spans.push(first..iovecs.len());
                at += n;
            }
            let with_sync = !progress.synced && at == layout.total;
            entries.clear();
            for (i, span) in spans.iter().enumerate() {
                // `span.len() <= IOVECS_MAX`, which fits in a u32.
                let write = opcode::Writev::new(fd, iovecs[span.start..].as_ptr(), span.len() as u32)
                    .offset(offset + plan[i].0 as u64)
                    .build()
                    .user_data(i as u64);
                let linked = i + 1 < plan.len() || with_sync;
                entries.push(if linked { write.flags(squeue::Flags::IO_LINK) } else { write });
            }
            if with_sync {
                entries.push(
                    opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                        .user_data(plan.len() as u64),
                );
            }
            // SAFETY: the WRITEVs point at `iovecs`, which point into `parts`, and name
            // `file`'s descriptor; all are borrowed or held for this whole call, `iovecs` is not
            // touched until the completions are reaped, and `reap_all` returns `Ok` only once
            // every completion was reaped. On `Failure::Ring` the caller leaks the parts and
            // `iovecs` is never dropped, and the ring is never entered again, so nothing
            // outlives its referent in the kernel.
            unsafe { self.push_all(&entries) }.map_err(Failure::Ring)?;
            self.reap_all(entries.len())?;
            if let Err(e) = progress.apply(&plan, with_sync, &self.results) {
                ManuallyDrop::into_inner(iovecs);
                return Err(Failure::Op(e));
            }
        }
        if fdatasync {
            self.fdatasyncs += 1;
        }
        ManuallyDrop::into_inner(iovecs);
        Ok(())
    }

    /// `fdatasync`s completed successfully so far.
    pub(crate) fn fdatasyncs(&self) -> u64 {
        self.fdatasyncs
    }

    /// Pushes `entries` into the (empty) submission queue, all or none.
    ///
    /// # Safety
    /// The memory and descriptors the entries name must stay valid until their completions
    /// are reaped, or until the ring is marked broken and the memory leaked.
    unsafe fn push_all(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        // SAFETY: passed on to our caller (see above).
        unsafe { self.ring.submission().push_multiple(entries) }
            .map_err(|_| io::Error::other("the WAL ring's submission queue is full"))?;
        self.state = State::Busy;
        Ok(())
    }

    /// Submits what was pushed and waits until `count` completions (`user_data` 0..count)
    /// are in `self.results`.
    fn reap_all(&mut self, count: usize) -> Result<(), Failure> {
        self.results.clear();
        self.results.resize(count, None);
        let mut reaped = 0;
        let mut attempts = 0;
        while reaped < count {
            attempts += 1;
            if attempts > ENTER_ATTEMPTS_MAX {
                return Err(Failure::Ring(io::Error::other(
                    "io_uring_enter keeps failing with EINTR/EBUSY/EAGAIN or completions never come",
                )));
            }
            match self.ring.submit_and_wait(count - reaped) {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    // Interrupted, or the kernel is short of resources: reap what is there and
                    // enter again (the crate resubmits only what the kernel has not taken).
                    Some(libc::EINTR) => {}
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                        if self.ring.completion().is_empty() {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    }
                    _ => return Err(Failure::Ring(e)),
                },
            }
            for cqe in self.ring.completion() {
                match self.results.get_mut(cqe.user_data() as usize) {
                    Some(slot @ None) => {
                        *slot = Some(cqe.result());
                        reaped += 1;
                    }
                    _ => {
                        return Err(Failure::Ring(io::Error::other(format!(
                            "unexpected io_uring completion (user_data {})",
                            cqe.user_data()
                        ))))
                    }
                }
            }
        }
        self.state = State::Ready;
        Ok(())
    }
}

/// Where each part starts in the bytes one `write_all` writes.
struct Layout<'a> {
    parts: &'a [Bytes],
    /// `starts[i]`: offset of `parts[i]`.
    starts: Vec<usize>,
    total: usize,
}

impl<'a> Layout<'a> {
    fn of(parts: &'a [Bytes]) -> Layout<'a> {
        let mut starts = Vec::with_capacity(parts.len());
        let mut total = 0;
        for p in parts {
            starts.push(total);
            total += p.len();
        }
        Layout { parts, starts, total }
    }

    /// Appends the iovecs of one WRITEV from offset `at` (below `total`): up to
    /// [`IOVECS_MAX`] of them and [`SQE_BYTES_MAX`] bytes. Returns the bytes they cover.
    fn iovecs(&self, at: usize, out: &mut Vec<libc::iovec>) -> usize {
        let mut n = 0;
        let mut count = 0;
        while at + n < self.total && n < SQE_BYTES_MAX && count < IOVECS_MAX {
            let pos = at + n;
            // The last part starting at or before `pos`; empty parts are passed over, since
            // the part after one starts at the same offset.
            let i = self.starts.partition_point(|&s| s <= pos) - 1;
            let rest = &self.parts[i][pos - self.starts[i]..];
            let len = rest.len().min(SQE_BYTES_MAX - n);
            out.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: len });
            n += len;
            count += 1;
        }
        n
    }
}

/// How far one `write_all` has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Bytes of the buffer known to be written.
    done: usize,
    /// The fdatasync (if one was asked for) completed after all bytes were written.
    synced: bool,
    retries: u32,
}

impl Progress {
    /// Takes in the results of one submission: `plan` (start, len) of its WRITEs, in chain
    /// order, then the FSYNC if `with_sync`. Advances over fully written SQEs and the part
    /// of the first short one; stops at the first failure. Returns an error that is not
    /// worth retrying.
    fn apply(&mut self, plan: &[(usize, usize)], with_sync: bool, results: &[Option<i32>]) -> io::Result<()> {
        let result = |i: usize| {
            results.get(i).copied().flatten().ok_or_else(|| io::Error::other("missing io_uring completion"))
        };
        for (i, &(start, n)) in plan.iter().enumerate() {
            if start != self.done {
                return Err(io::Error::other("io_uring write plan does not continue the buffer"));
            }
            let r = result(i)?;
            if r < 0 {
                // A linked SQE is only cancelled after an earlier one failed or was short,
                // and the loop stops at that one; so a cancellation here is real.
                return self.retry_or_fail(-r);
            }
            if r == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "io_uring write wrote 0 bytes"));
            }
            let r = (r as usize).min(n);
            self.done += r;
            if r < n {
                // Short write: the rest of the chain was cancelled; resubmit from here.
                return Ok(());
            }
        }
        if with_sync {
            let r = result(plan.len())?;
            if r < 0 {
                return self.retry_or_fail(-r);
            }
            self.synced = true;
        }
        Ok(())
    }

    fn retry_or_fail(&mut self, errno: i32) -> io::Result<()> {
        if (errno == libc::EINTR || errno == libc::EAGAIN) && self.retries < RETRIES_MAX {
            self.retries += 1;
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn ring() -> Option<WalRing> {
        match WalRing::new() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("skipping: io_uring unavailable: {e}");
                None
            }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// `data` cut into parts of varied sizes, an empty one among them.
    fn parts_of(data: &[u8]) -> Vec<Bytes> {
        let mut parts = Vec::new();
        let mut at = 0;
        let mut size = 1;
        while at < data.len() {
            let n = size.min(data.len() - at);
            parts.push(Bytes::copy_from_slice(&data[at..at + n]));
            if parts.len() == 2 {
                parts.push(Bytes::new());
            }
            at += n;
            size = size * 3 % (3 * SQE_BYTES_MAX) + 1;
        }
        parts
    }

    #[test]
    fn long_writes_span_several_chains_and_land_in_place() {
        let Some(mut ring) = ring() else { return };
        let file = tempfile::tempfile().expect("tempfile");
        // More SQEs than one chain holds, and a tail shorter than one SQE.
        let len = SQE_BYTES_MAX * (CHAIN_WRITES_MAX + 5) + 123;
        let data = pattern(len, 7);
        let mut parts = parts_of(&data);
        let before = parts.clone();
        ring.write_all(&file, 10, &mut parts, true).expect("write and sync");
        assert_eq!(ring.fdatasyncs(), 1);
        assert_eq!(parts, before, "the parts are handed back");
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, 10).expect("read");
        assert!(back == data);
        assert_eq!(file.metadata().expect("stat").len(), 10 + len as u64);
        // A sync alone, and a write alone.
        ring.write_all(&file, 0, &mut Vec::new(), true).expect("sync only");
        ring.write_all(&file, 0, &mut vec![Bytes::from_static(b"0123456789")], false).expect("write only");
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0).expect("read");
        assert_eq!(&head[..10], b"0123456789");
        assert_eq!(&head[10..], &data[..2]);
        assert_eq!(ring.fdatasyncs(), 2, "a write alone does not sync");
    }

    #[test]
    fn more_parts_than_one_writev_takes_land_in_order() {
        let Some(mut ring) = ring() else { return };
        let file = tempfile::tempfile().expect("tempfile");
        let data = pattern(3 * IOVECS_MAX + 7, 3);
        let mut parts: Vec<Bytes> = data.chunks(1).map(Bytes::copy_from_slice).collect();
        ring.write_all(&file, 0, &mut parts, false).expect("write");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).expect("read");
        assert!(back == data);
    }

    #[test]
    fn an_operation_error_is_returned_and_the_ring_stays_usable() {
        let Some(mut ring) = ring() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x").expect("write");
        let ro = File::open(&path).expect("open read-only");
        let mut parts = parts_of(&pattern(3 * SQE_BYTES_MAX, 1));
        let count = parts.len();
        let err = ring.write_all(&ro, 0, &mut parts, true).expect_err("EBADF");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert_eq!(parts.len(), count, "the parts are handed back after an error");
        let rw = tempfile::tempfile().expect("tempfile");
        ring.write_all(&rw, 0, &mut parts, true).expect("the ring still works");
    }

    #[test]
    fn a_ring_left_busy_by_a_panic_is_not_used_again() {
        let Some(mut ring) = ring() else { return };
        ring.state = State::Busy;
        let file = tempfile::tempfile().expect("tempfile");
        assert!(ring.write_all(&file, 0, &mut vec![Bytes::from_static(&[1])], false).is_err());
        assert_eq!(ring.state, State::Broken);
        assert!(ring.write_all(&file, 0, &mut vec![Bytes::from_static(&[1])], false).is_err());
    }

    fn progress() -> Progress {
        Progress { done: 0, synced: false, retries: 0 }
    }

    #[test]
    fn progress_continues_after_a_short_write() {
        let plan = [(0, 100), (100, 100), (200, 50)];
        let mut p = progress();
        let cancelled = Some(-libc::ECANCELED);
        p.apply(&plan, true, &[Some(100), Some(60), cancelled, cancelled]).expect("short write");
        assert_eq!(p, Progress { done: 160, synced: false, retries: 0 });
        p.apply(&[(160, 40), (200, 50)], true, &[Some(40), Some(50), Some(0)]).expect("rest");
        assert_eq!(p, Progress { done: 250, synced: true, retries: 0 });
    }

    #[test]
    fn progress_retries_eintr_and_eagain_a_bounded_number_of_times() {
        let plan = [(0, 10)];
        let mut p = progress();
        p.apply(&plan, true, &[Some(-libc::EINTR), Some(-libc::ECANCELED)]).expect("retry");
        p.apply(&plan, true, &[Some(10), Some(-libc::EAGAIN)]).expect("retry the sync");
        assert_eq!(p, Progress { done: 10, synced: false, retries: 2 });
        p.apply(&[], true, &[Some(0)]).expect("sync");
        assert!(p.synced);

        let mut p = progress();
        for _ in 0..RETRIES_MAX {
            p.apply(&plan, false, &[Some(-libc::EINTR)]).expect("retry");
        }
        let err = p.apply(&plan, false, &[Some(-libc::EINTR)]).expect_err("gives up");
        assert_eq!(err.raw_os_error(), Some(libc::EINTR));
    }

    #[test]
    fn progress_fails_on_errors_zero_writes_and_missing_completions() {
        let plan = [(0, 10), (10, 10)];
        let err = progress().apply(&plan, true, &[Some(10), Some(-libc::ENOSPC), None]).expect_err("ENOSPC");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let err = progress().apply(&plan, false, &[Some(0), None]).expect_err("zero");
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        let err = progress().apply(&plan, true, &[Some(10), Some(10), Some(-libc::EIO)]).expect_err("EIO");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(progress().apply(&plan, false, &[Some(10)]).is_err());
    }
}
