//! The io_uring engine: dedicated ring threads, each owning one ring.
//!
//! ```text
//!  caller (any task)                      ring thread "raftblk-uring-N"
//!  ─────────────────                      ──────────────────────────────
//!  Request + oneshot ──bounded channel──▶ drain ≤ SUBMIT_BATCH_MAX requests
//!  eventfd write if the thread sleeps ──▶ push one SQE each, one submit per batch
//!                                         reap CQEs: finish, or resubmit the rest
//!  await oneshot ◀────────────────────── of a short read/write, or retry EINTR/EAGAIN
//! ```
//!
//! A ring thread that has nothing to do blocks in `io_uring_enter` waiting for one
//! completion. It keeps a READ of its eventfd in the ring at all times, so a
//! submitter that finds it asleep wakes it by writing the eventfd: the READ
//! completes and the thread drains the channel again.
//!
//! Ownership: a request moves into the thread's in-flight table, which owns the
//! file (`Arc<File>`, so the descriptor stays open) and the buffer (`Bytes` for a
//! write, an [`AlignedBuf`] for a read) until the kernel has posted the final CQE.
//! Buffers live on the heap, so moving table entries does not move them. A caller
//! that stops waiting does not cancel the operation; the reply is dropped.
//!
//! Shutdown: dropping the last [`UringEngine`] closes the channels and wakes the
//! threads; each finishes its in-flight operations, collects its own eventfd READ
//! and exits, and the drop joins it. If a ring fails beyond repair, the thread
//! fails every waiting caller and leaks (never frees) the buffers the kernel may
//! still write to.
//!
//! This is the only module of the crate with `unsafe` code: pushing an SQE hands
//! the kernel raw pointers whose validity the type system cannot check.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

use super::aligned::AlignedBuf;
use super::engine::{ChainStep, EngineError, FallocMode};

/// Submission queue entries per ring (the completion queue gets twice as many).
pub const RING_ENTRIES: u32 = 256;
/// Operations a ring thread keeps in flight at most; never more than the
/// completion queue holds, so completions cannot overflow.
pub const IN_FLIGHT_MAX: usize = RING_ENTRIES as usize;
/// Requests taken from the channel between two submits.
pub const SUBMIT_BATCH_MAX: usize = 64;
/// Requests waiting in a ring thread's channel before submitters wait too.
pub const CHANNEL_DEPTH: usize = 1024;
/// Largest transfer of one SQE; longer reads and writes continue in further SQEs
/// (as short ones do). Kept small in tests so that continuation gets exercised;
/// it must stay a multiple of `DIRECT_IO_ALIGN_BYTES` so `O_DIRECT` continuations
/// stay aligned.
#[cfg(not(test))]
const SQE_BYTES_MAX: usize = 1 << 30;
#[cfg(test)]
const SQE_BYTES_MAX: usize = 16 * 1024;
const _: () = assert!(SQE_BYTES_MAX & (super::aligned::DIRECT_IO_ALIGN_BYTES - 1) == 0);
/// Times an operation is retried after EINTR/EAGAIN before its error is returned.
const RETRIES_MAX: u32 = 16;
/// Attempts to submit (or to push into a full submission queue) before the ring
/// is considered broken.
const SUBMIT_ATTEMPTS_MAX: u32 = 1000;
/// `user_data` of the eventfd READ; in-flight operations use their table index.
const EVENTFD_USER_DATA: u64 = u64::MAX;

/// Why io_uring could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// `io_uring_setup` failed (ENOSYS: no io_uring; EPERM: forbidden by sysctl or seccomp).
    #[error("cannot create a ring: {0}")]
    Setup(#[source] io::Error),
    /// `IORING_REGISTER_PROBE` failed (kernels before 5.6).
    #[error("cannot probe the ring's opcodes: {0}")]
    Probe(#[source] io::Error),
    /// The kernel lacks an opcode the engine needs.
    #[error("the kernel's io_uring lacks the {0} opcode")]
    MissingOpcode(&'static str),
    /// A NOP through the new ring failed.
    #[error("a NOP through the ring failed: {0}")]
    Nop(#[source] io::Error),
    /// The eventfd that wakes a ring thread could not be created.
    #[error("cannot create an eventfd: {0}")]
    Eventfd(#[source] io::Error),
    /// The ring thread could not be started.
    #[error("cannot spawn a ring thread: {0}")]
    Spawn(#[source] io::Error),
}

/// A request from a submitter to a ring thread.
enum Request {
    Read {
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
        reply: oneshot::Sender<io::Result<Bytes>>,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        data: Bytes,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Fdatasync {
        file: Arc<File>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// Operations run one after the other; each starts only once the previous one has
    /// completed in full (see [`super::engine::ChainStep`]).
    Chain {
        steps: Vec<ChainStep>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    Fallocate {
        file: Arc<File>,
        mode: FallocMode,
        offset: u64,
        len: u64,
        reply: oneshot::Sender<io::Result<()>>,
    },
}

/// How a ring thread is woken: the eventfd it keeps a READ on, and whether it is
/// (about to be) asleep in `io_uring_enter`.
struct Wake {
    eventfd: File,
    sleeping: AtomicBool,
}

impl Wake {
    fn wake(&self) {
        if let Err(e) = (&self.eventfd).write(&1u64.to_ne_bytes()) {
            tracing::error!(error = %e, "cannot wake a ring thread");
        }
    }

    fn wake_if_sleeping(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wake();
        }
    }
}

/// The submitting side of one ring thread.
struct RingHandle {
    requests: Option<mpsc::Sender<Request>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for RingHandle {
    fn drop(&mut self) {
        // Closing the channel tells the thread to stop once it has drained it and
        // finished what is in flight; the wake makes sure it notices.
        self.requests = None;
        self.wake.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("an io_uring thread panicked");
            }
        }
    }
}

/// The io_uring engine: a set of ring threads fed round-robin.
pub(crate) struct UringEngine {
    rings: Vec<RingHandle>,
    next: AtomicUsize,
}

impl UringEngine {
    /// Creates `threads` rings (each checked with a NOP) and starts a thread per ring.
    pub(crate) fn start(threads: usize) -> Result<Self, UringError> {
        let mut rings = Vec::with_capacity(threads);
        for index in 0..threads {
            let ring = new_ring()?;
            let eventfd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
                .map_err(|e| UringError::Eventfd(e.into()))?;
            let wake = Arc::new(Wake { eventfd: File::from(eventfd), sleeping: AtomicBool::new(false) });
            let (requests, receiver) = mpsc::channel(CHANNEL_DEPTH);
            let worker = RingThread::new(ring, receiver, wake.clone());
            let thread = std::thread::Builder::new()
                .name(format!("raftblk-uring-{index}"))
                .spawn(move || worker.run())
                .map_err(UringError::Spawn)?;
            rings.push(RingHandle { requests: Some(requests), wake, thread: Some(thread) });
        }
        Ok(UringEngine { rings, next: AtomicUsize::new(0) })
    }

    pub(crate) async fn read_at(
        &self,
        file: Arc<File>,
        offset: u64,
        buf: AlignedBuf,
    ) -> Result<Bytes, EngineError> {
        self.call(|reply| Request::Read { file, offset, buf, reply }).await
    }

    pub(crate) async fn write_at(
        &self,
        file: Arc<File>,
        offset: u64,
        data: Bytes,
    ) -> Result<(), EngineError> {
        self.call(|reply| Request::Write { file, offset, data, reply }).await
    }

    pub(crate) async fn fdatasync(&self, file: Arc<File>) -> Result<(), EngineError> {
        self.call(|reply| Request::Fdatasync { file, reply }).await
    }

    pub(crate) async fn chain(&self, steps: Vec<ChainStep>) -> Result<(), EngineError> {
        self.call(|reply| Request::Chain { steps, reply }).await
    }

    pub(crate) async fn fallocate(
        &self,
        file: Arc<File>,
        mode: FallocMode,
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        self.call(|reply| Request::Fallocate { file, mode, offset, len, reply }).await
    }

    /// Sends a request to the next ring thread and waits for its reply.
    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Request,
    ) -> Result<T, EngineError> {
        let ring = &self.rings[self.next.fetch_add(1, Ordering::Relaxed) % self.rings.len()];
        let requests = ring.requests.as_ref().ok_or(EngineError::ShutDown)?;
        let (reply, result) = oneshot::channel();
        requests.send(make(reply)).await.map_err(|_| EngineError::ShutDown)?;
        ring.wake.wake_if_sleeping();
        result.await.map_err(|_| EngineError::ShutDown)?.map_err(EngineError::Io)
    }
}

/// Creates a ring, checks that it has the opcodes the engine uses, and runs a NOP.
fn new_ring() -> Result<IoUring, UringError> {
    let mut ring = IoUring::new(RING_ENTRIES).map_err(UringError::Setup)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(UringError::Probe)?;
    for (code, name) in [
        (opcode::Nop::CODE, "NOP"),
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !probe.is_supported(code) {
            return Err(UringError::MissingOpcode(name));
        }
    }
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP refers to no memory and no file descriptor.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| UringError::Nop(io::Error::other("a new ring's submission queue is full")))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(UringError::Nop(e)),
        }
    }
    let result = ring.completion().next().map(|cqe| cqe.result());
    match result {
        Some(r) if r >= 0 => Ok(ring),
        Some(r) => Err(UringError::Nop(io::Error::from_raw_os_error(-r))),
        None => Err(UringError::Nop(io::Error::other("no completion for the NOP"))),
    }
}

/// Where a caller's answer goes.
enum Reply {
    Bytes(oneshot::Sender<io::Result<Bytes>>),
    Unit(oneshot::Sender<io::Result<()>>),
}

impl Reply {
    fn fail(self, error: io::Error) {
        // A caller that stopped waiting has dropped its receiver; nothing to do.
        match self {
            Reply::Bytes(tx) => {
                let _ = tx.send(Err(error));
            }
            Reply::Unit(tx) => {
                let _ = tx.send(Err(error));
            }
        }
    }
}

/// An operation in flight: what the kernel may be reading or writing.
struct Op {
    file: Arc<File>,
    kind: OpKind,
    reply: Reply,
    retries: u32,
    /// Steps of a chain still to run after this one, in order.
    then: VecDeque<ChainStep>,
}

enum OpKind {
    /// `done` bytes of `buf` have been read so far.
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: usize,
    },
    /// `done` bytes of `data` have been written so far.
    Write {
        offset: u64,
        data: Bytes,
        done: usize,
    },
    Fdatasync,
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
}

impl Op {
    fn new(request: Request) -> Option<Op> {
        let (file, kind, reply) = match request {
            Request::Read { file, offset, buf, reply } => {
                (file, OpKind::Read { offset, buf, done: 0 }, Reply::Bytes(reply))
            }
            Request::Write { file, offset, data, reply } => {
                (file, OpKind::Write { offset, data, done: 0 }, Reply::Unit(reply))
            }
            Request::Fdatasync { file, reply } => (file, OpKind::Fdatasync, Reply::Unit(reply)),
            Request::Fallocate { file, mode, offset, len, reply } => {
                (file, OpKind::Fallocate { mode: mode.bits(), offset, len }, Reply::Unit(reply))
            }
            Request::Chain { steps, reply } => {
                let mut then: VecDeque<ChainStep> = steps.into();
                let Some(first) = then.pop_front() else {
                    // An empty chain: nothing to wait for.
                    let _ = reply.send(Ok(()));
                    return None;
                };
                let (file, kind) = step_kind(first);
                return Some(Op { file, kind, reply: Reply::Unit(reply), retries: 0, then });
            }
        };
        Some(Op { file, kind, reply, retries: 0, then: VecDeque::new() })
    }

    /// Moves on to the next step of a chain; false if there is none.
    fn advance(&mut self) -> bool {
        let Some(step) = self.then.pop_front() else { return false };
        let (file, kind) = step_kind(step);
        self.file = file;
        self.kind = kind;
        self.retries = 0;
        true
    }

    /// The SQE for the (rest of the) operation. The pointers in it stay valid as
    /// long as `self` is neither dropped nor its buffer replaced.
    fn sqe(&mut self) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        match &mut self.kind {
            OpKind::Read { offset, buf, done } => {
                let rest = &mut buf.as_mut_slice()[*done..];
                let len = rest.len().min(SQE_BYTES_MAX) as u32;
                opcode::Read::new(fd, rest.as_mut_ptr(), len).offset(*offset + *done as u64).build()
            }
            OpKind::Write { offset, data, done } => {
                let rest = &data[*done..];
                let len = rest.len().min(SQE_BYTES_MAX) as u32;
                opcode::Write::new(fd, rest.as_ptr(), len).offset(*offset + *done as u64).build()
            }
            OpKind::Fdatasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            OpKind::Fallocate { mode, offset, len } => {
                opcode::Fallocate::new(fd, *len).offset(*offset).mode(*mode).build()
            }
        }
    }

    /// Sends the successful result to the caller.
    fn finish(self) {
        // A caller that stopped waiting has dropped its receiver; nothing to do.
        match (self.kind, self.reply) {
            (OpKind::Read { buf, .. }, Reply::Bytes(tx)) => {
                let _ = tx.send(Ok(buf.into_bytes()));
            }
            (_, Reply::Unit(tx)) => {
                let _ = tx.send(Ok(()));
            }
            (_, reply) => reply.fail(io::Error::other("io_uring engine: reply of the wrong type")),
        }
    }
}

fn step_kind(step: ChainStep) -> (Arc<File>, OpKind) {
    match step {
        ChainStep::Write { file, offset, data } => (file, OpKind::Write { offset, data, done: 0 }),
        ChainStep::Fallocate { file, mode, offset, len } => {
            (file, OpKind::Fallocate { mode: mode.bits(), offset, len })
        }
    }
}

/// What the completion of one SQE means for its operation.
enum Outcome {
    Done,
    Resubmit,
    Failed(io::Error),
}

/// The state a ring thread owns.
struct RingThread {
    ring: IoUring,
    requests: mpsc::Receiver<Request>,
    wake: Arc<Wake>,
    /// In-flight operations, indexed by SQE `user_data`.
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Operations whose (next) SQE is still to be pushed.
    pending: VecDeque<usize>,
    /// Target of the eventfd READ; on the heap so its address is stable.
    eventfd_buf: Box<[u8; 8]>,
    eventfd_armed: bool,
    /// The channel is closed and empty: finish what is in flight, then stop.
    closed: bool,
    /// Completions reaped but not yet handled (kept to reuse its allocation).
    reaped: Vec<(u64, i32)>,
}

impl RingThread {
    fn new(ring: IoUring, requests: mpsc::Receiver<Request>, wake: Arc<Wake>) -> Self {
        RingThread {
            ring,
            requests,
            wake,
            ops: Vec::with_capacity(IN_FLIGHT_MAX),
            free: Vec::with_capacity(IN_FLIGHT_MAX),
            in_flight: 0,
            pending: VecDeque::with_capacity(IN_FLIGHT_MAX),
            eventfd_buf: Box::new([0u8; 8]),
            eventfd_armed: false,
            closed: false,
            reaped: Vec::with_capacity(IN_FLIGHT_MAX * 2),
        }
    }

    fn run(mut self) {
        if let Err(e) = self.serve() {
            tracing::error!(error = %e, "io_uring ring failed; failing its operations");
            self.abandon(e);
        }
    }

    /// The thread's loop; returns when the channel is closed and nothing is in flight.
    fn serve(&mut self) -> io::Result<()> {
        self.arm_eventfd()?;
        loop {
            let mut progressed = self.reap();
            progressed |= self.drain_requests();
            self.push_pending()?;
            if self.closed && self.in_flight == 0 {
                break;
            }
            if progressed {
                self.submit(0)?;
                continue;
            }
            // Nothing new: announce that we sleep, look once more (a submitter that
            // sent before seeing the flag did not write the eventfd), then wait for
            // a completion: an operation's or the eventfd READ's.
            self.wake.sleeping.store(true, Ordering::SeqCst);
            if self.drain_requests() {
                self.wake.sleeping.store(false, Ordering::SeqCst);
                self.push_pending()?;
                self.submit(0)?;
                continue;
            }
            self.submit(1)?;
            self.wake.sleeping.store(false, Ordering::SeqCst);
        }
        // Collect our own eventfd READ so the kernel holds no pointer into this
        // thread's memory when the ring is dropped.
        if self.eventfd_armed {
            self.wake.wake();
            for _ in 0..SUBMIT_ATTEMPTS_MAX {
                self.submit(1)?;
                self.reap();
                if !self.eventfd_armed {
                    return Ok(());
                }
            }
            return Err(io::Error::other("the eventfd READ never completed"));
        }
        Ok(())
    }

    /// Moves up to [`SUBMIT_BATCH_MAX`] requests from the channel to `pending`,
    /// while fewer than [`IN_FLIGHT_MAX`] are in flight. True if it took any, or
    /// found the channel closed.
    fn drain_requests(&mut self) -> bool {
        if self.closed {
            return false;
        }
        let mut taken = 0;
        while taken < SUBMIT_BATCH_MAX && self.in_flight < IN_FLIGHT_MAX {
            match self.requests.try_recv() {
                Ok(request) => {
                    if let Some(op) = Op::new(request) {
                        let index = self.insert(op);
                        self.pending.push_back(index);
                    }
                    taken += 1;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    return true;
                }
            }
        }
        taken > 0
    }

    fn insert(&mut self, op: Op) -> usize {
        self.in_flight += 1;
        match self.free.pop() {
            Some(index) => {
                self.ops[index] = Some(op);
                index
            }
            None => {
                self.ops.push(Some(op));
                self.ops.len() - 1
            }
        }
    }

    fn remove(&mut self, index: usize) -> Option<Op> {
        let op = self.ops.get_mut(index)?.take()?;
        self.free.push(index);
        self.in_flight -= 1;
        Some(op)
    }

    fn arm_eventfd(&mut self) -> io::Result<()> {
        let entry =
            opcode::Read::new(types::Fd(self.wake.eventfd.as_raw_fd()), self.eventfd_buf.as_mut_ptr(), 8)
                .build()
                .user_data(EVENTFD_USER_DATA);
        // SAFETY: the READ targets `eventfd_buf`, a heap allocation owned by this
        // thread that is neither freed nor moved while `eventfd_armed` is true (the
        // thread collects the READ before exiting, or leaks the buffer in
        // `abandon`); the eventfd stays open as long as `self.wake` lives.
        unsafe { self.push_entry(&entry) }?;
        self.eventfd_armed = true;
        Ok(())
    }

    /// Pushes the SQEs of all pending operations, submitting whenever the
    /// submission queue is full.
    fn push_pending(&mut self) -> io::Result<()> {
        if !self.eventfd_armed && !self.closed {
            self.arm_eventfd()?;
        }
        while let Some(index) = self.pending.pop_front() {
            let Some(op) = self.ops.get_mut(index).and_then(Option::as_mut) else {
                tracing::error!(index, "io_uring engine: pending operation missing");
                continue;
            };
            let entry = op.sqe().user_data(index as u64);
            // SAFETY: the SQE points into the buffer of `self.ops[index]` (an
            // `AlignedBuf` or `Bytes`, both heap allocations that do not move with
            // the `Op`) and names the descriptor of its `Arc<File>`. The op stays in
            // the table, untouched but for its progress counters, until its CQE is
            // reaped, or is leaked in `abandon`; so the memory and the descriptor
            // outlive the kernel's use of them.
            unsafe { self.push_entry(&entry) }?;
        }
        Ok(())
    }

    /// Pushes `entry` into the submission queue, submitting (and reaping, if the
    /// kernel is busy) while the queue is full.
    ///
    /// # Safety
    /// The memory and the descriptor that `entry` names must stay valid until its
    /// completion has been reaped.
    unsafe fn push_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            // SAFETY: the caller keeps what `entry` points to valid until its completion.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            self.submit(0)?;
        }
        Err(io::Error::other("the submission queue stays full"))
    }

    /// `io_uring_enter`: submits what was pushed and waits for `want` completions.
    fn submit(&mut self, want: usize) -> io::Result<()> {
        for _ in 0..SUBMIT_ATTEMPTS_MAX {
            match self.ring.submitter().submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // The kernel is short of resources or holds completions we have
                    // not taken: take them and try again.
                    Some(libc::EBUSY) | Some(libc::EAGAIN) => {
                        if !self.reap() {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        if want > 0 {
                            return Ok(());
                        }
                    }
                    _ => return Err(e),
                },
            }
        }
        Err(io::Error::other("io_uring_enter keeps failing with EINTR/EBUSY/EAGAIN"))
    }

    /// Handles every completion in the queue. True if there were any.
    fn reap(&mut self) -> bool {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(self.ring.completion().map(|cqe| (cqe.user_data(), cqe.result())));
        let any = !reaped.is_empty();
        for &(user_data, result) in &reaped {
            if user_data == EVENTFD_USER_DATA {
                self.eventfd_armed = false; // re-armed by the next `push_pending`
                if result < 0 {
                    tracing::warn!(errno = -result, "io_uring eventfd READ failed");
                }
            } else {
                self.complete(user_data as usize, result);
            }
        }
        reaped.clear();
        self.reaped = reaped;
        any
    }

    /// Applies one CQE to its operation: finish it, fail it, or queue the rest.
    fn complete(&mut self, index: usize, result: i32) {
        let Some(op) = self.ops.get_mut(index).and_then(Option::as_mut) else {
            tracing::error!(index, "io_uring engine: completion for an unknown operation");
            return;
        };
        let outcome = if result < 0 {
            let errno = -result;
            if (errno == libc::EINTR || errno == libc::EAGAIN) && op.retries < RETRIES_MAX {
                op.retries += 1;
                Outcome::Resubmit
            } else {
                Outcome::Failed(io::Error::from_raw_os_error(errno))
            }
        } else {
            let n = result as usize;
            match &mut op.kind {
                // End of file: the rest of the (zeroed) buffer reads as zeroes.
                OpKind::Read { .. } if n == 0 => Outcome::Done,
                OpKind::Read { buf, done, .. } => {
                    *done += n;
                    if *done < buf.len() {
                        Outcome::Resubmit
                    } else {
                        Outcome::Done
                    }
                }
                OpKind::Write { .. } if n == 0 => {
                    Outcome::Failed(io::Error::new(io::ErrorKind::WriteZero, "write returned 0 bytes"))
                }
                OpKind::Write { data, done, .. } => {
                    *done += n;
                    if *done < data.len() {
                        Outcome::Resubmit
                    } else {
                        Outcome::Done
                    }
                }
                OpKind::Fdatasync | OpKind::Fallocate { .. } => Outcome::Done,
            }
        };
        // The kernel is done with this step's buffer; a chain's next step starts only now,
        // which is the ordering a chain promises.
        let outcome = match outcome {
            Outcome::Done if op.advance() => Outcome::Resubmit,
            other => other,
        };
        match outcome {
            Outcome::Resubmit => self.pending.push_back(index),
            Outcome::Done => {
                if let Some(op) = self.remove(index) {
                    op.finish();
                }
            }
            Outcome::Failed(error) => {
                if let Some(op) = self.remove(index) {
                    op.reply.fail(error);
                }
            }
        }
    }

    /// After a ring failure: fail every caller, and leak the buffers and files of
    /// in-flight operations (and the eventfd buffer), since the kernel may still
    /// use them. Requests still in the channel fail when it is dropped.
    fn abandon(mut self, error: io::Error) {
        for op in self.ops.drain(..).flatten() {
            let Op { file, kind, reply, then, .. } = op;
            reply.fail(io::Error::new(error.kind(), error.to_string()));
            std::mem::forget(file);
            std::mem::forget(kind);
            drop(then); // steps not started: the kernel never saw them
        }
        if self.eventfd_armed {
            std::mem::forget(std::mem::replace(&mut self.eventfd_buf, Box::new([0u8; 8])));
            // The eventfd itself is shared with the submitters and closes with them;
            // a READ on a closed eventfd completes harmlessly into the leaked buffer.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    fn engine(threads: usize) -> Option<UringEngine> {
        match UringEngine::start(threads) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("skipping: io_uring unavailable: {e}");
                None
            }
        }
    }

    fn temp_file(len: u64) -> Arc<File> {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(len).expect("set_len");
        Arc::new(file)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_operations_overflow_batches_and_queues() {
        let Some(engine) = engine(2) else { return };
        let engine = Arc::new(engine);
        let file = temp_file(0);
        // More requests than the in-flight table, a batch and a channel hold.
        let count = CHANNEL_DEPTH * 2 + 3;
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let (engine, file) = (engine.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                let data = Bytes::from(vec![(i % 256) as u8; 512]);
                engine.write_at(file, (i * 512) as u64, data).await
            }));
        }
        let all_done = async {
            for t in tasks {
                t.await.expect("task").expect("write");
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all_done).await.expect("no request got stuck");
        engine.fdatasync(file.clone()).await.expect("fdatasync");
        let mut all = vec![0u8; count * 512];
        file.read_exact_at(&mut all, 0).expect("read back");
        for (i, chunk) in all.chunks(512).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 256) as u8), "chunk {i}");
        }
    }

    #[tokio::test]
    async fn an_idle_thread_wakes_for_new_work() {
        let Some(engine) = engine(1) else { return };
        let file = temp_file(4096);
        for round in 0..5u8 {
            // Let the thread go to sleep in io_uring_enter.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let data = Bytes::from(vec![round; 4096]);
            tokio::time::timeout(Duration::from_secs(5), engine.write_at(file.clone(), 0, data.clone()))
                .await
                .expect("the ring thread woke up")
                .expect("write");
            let back = tokio::time::timeout(
                Duration::from_secs(5),
                engine.read_at(file.clone(), 0, AlignedBuf::zeroed(4096)),
            )
            .await
            .expect("the ring thread woke up")
            .expect("read");
            assert_eq!(back, data);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_engine_finishes_in_flight_operations() {
        let Some(engine) = engine(1) else { return };
        let engine = Arc::new(engine);
        let file = temp_file(0);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let (engine, file) = (engine.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                engine.write_at(file, i * 4096, Bytes::from(vec![1u8; 4096])).await
            }));
        }
        // The last task to finish drops the engine (joining its thread) while
        // others may still be in flight.
        drop(engine);
        for t in tasks {
            t.await.expect("task").expect("write");
        }
        assert_eq!(file.metadata().expect("stat").len(), 200 * 4096);
    }

    #[test]
    fn drop_without_a_runtime_joins_the_threads() {
        let Some(engine) = engine(3) else { return };
        let threads: Vec<String> = engine
            .rings
            .iter()
            .filter_map(|r| r.thread.as_ref().and_then(|t| t.thread().name().map(str::to_string)))
            .collect();
        assert_eq!(threads, ["raftblk-uring-0", "raftblk-uring-1", "raftblk-uring-2"]);
        drop(engine); // would hang if a thread missed the shutdown wake
    }

    #[tokio::test]
    async fn large_reads_and_writes_round_trip() {
        let Some(engine) = engine(1) else { return };
        let file = temp_file(0);
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i % 253) as u8).collect();
        engine.write_at(file.clone(), 5, Bytes::from(data.clone())).await.expect("write");
        let back = engine.read_at(file.clone(), 5, AlignedBuf::zeroed(data.len())).await.expect("read");
        assert!(back == data);
    }
}
