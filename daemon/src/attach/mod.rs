//! Kernel attach owned by the daemon: `raftblk volume attach NAME` gives a local
//! `/dev/nbdN` served by this process through a socket pair (no TCP hop), configured over
//! generic netlink (see `raftblk_blockdev::kernel_nbd`).
//!
//! Each attachment has a supervisor task that keeps the device served: it opens the
//! volume, hands the kernel a fresh socket (CONNECT the first time, RECONFIGURE after), and
//! serves it until the connection ends; if the attachment still stands it does so again.
//! The kernel queues the device's requests while no socket is alive (the dead-connection
//! timeout), so a restart of this daemon (SIGTERM or kill -9) reaches no application: the
//! records in [`record`] tell the next process which devices to reattach, and [`plan`]
//! decides how from what the kernel reports. The supervisor also passes a grown volume's
//! size to the kernel (RECONFIGURE with the new size), so a mounted file system can grow.

pub mod fence;
pub mod plan;
pub mod record;

use std::sync::Arc;
use std::time::Duration;

use raftblk_blockdev::kernel_nbd::{self, AttachError, DeviceConfig, NbdNetlink};
use raftblk_blockdev::nbd::{NbdServer, OpenError};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub use plan::{plan_restore, RestoreStep};
pub use record::{Attachment, AttachmentFile};

use crate::volumes::VolumeManager;

/// How long after a served connection ends the supervisor tries again.
const RESERVE_BACKOFF: Duration = Duration::from_millis(200);
/// How long a supervisor waits before trying a failed (re)connect again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often a served device's size is compared with its volume's.
const SIZE_POLL: Duration = Duration::from_secs(1);
/// Kernel NBD devices are 512..=4096-byte sectors; raftblk blocks are 4 KiB.
const BLOCK_SIZE: u64 = 4096;
/// Indices this daemon picks from (the kernel creates devices past `nbds_max` on demand).
const MAX_INDEX: u32 = 1 << 16;

/// Why an attachment request failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachmentError {
    /// No such volume (or it cannot be served here now).
    #[error("{0}")]
    Volume(String),
    /// The volume is attached here already in a different mode.
    #[error("{0}")]
    Conflict(String),
    /// No attachment matches.
    #[error("no attachment of {0:?} on this node (`raftblk volume attachments` lists them)")]
    NotFound(String),
    /// The device is mounted or otherwise busy.
    #[error("{0}")]
    Busy(String),
    /// The kernel side failed.
    #[error(transparent)]
    Kernel(#[from] AttachError),
    /// The attachment records could not be read or written.
    #[error("attachment records: {0}")]
    Record(String),
}

/// Kernel timeouts for attached devices (`[attach]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachTiming {
    /// Seconds before the kernel resends a request that got no answer.
    pub request_timeout_s: u64,
    /// Seconds the kernel waits for a new socket after the daemon's end closes.
    pub dead_conn_timeout_s: u64,
}

struct Live {
    record: Attachment,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The node's kernel attachments and their supervisors.
pub struct Attacher {
    server: Arc<NbdServer>,
    volumes: Arc<VolumeManager>,
    file: AttachmentFile,
    timing: AttachTiming,
    live: Mutex<Vec<Live>>,
    /// Each attached volume's current generation, shared with the fences of its sessions.
    generations: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicU64>>>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Attacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attacher").field("timing", &self.timing).finish_non_exhaustive()
    }
}

/// Runs a netlink call on a blocking thread.
async fn netlink<T: Send + 'static>(
    f: impl FnOnce(&NbdNetlink) -> Result<T, AttachError> + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(move || {
        let nl = NbdNetlink::open()?;
        f(&nl)
    })
    .await
    .map_err(|e| AttachError::Netlink(format!("netlink task: {e}")))?
}

impl Attacher {
    /// An attacher serving through `server`, its records in `data_dir`; supervisors stop
    /// (leaving their devices queued for the next process) when `shutdown` is cancelled.
    pub fn new(
        server: Arc<NbdServer>,
        volumes: Arc<VolumeManager>,
        data_dir: &std::path::Path,
        timing: AttachTiming,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Attacher {
            server,
            volumes,
            file: AttachmentFile::new(data_dir),
            timing,
            live: Mutex::new(Vec::new()),
            generations: std::sync::Mutex::new(std::collections::HashMap::new()),
            shutdown,
        })
    }

    /// Waits for every supervisor to stop (after the shutdown token is cancelled).
    pub async fn join(&self) {
        let mut live = self.live.lock().await;
        for l in live.iter_mut() {
            let _ = (&mut l.task).await;
        }
    }

    /// Every attachment on this node.
    pub async fn list(&self) -> Vec<Attachment> {
        self.live.lock().await.iter().map(|l| l.record.clone()).collect()
    }

    /// Reattaches what the records list (at start-up). A device the kernel still holds
    /// gets a new socket; one it dropped (its dead-connection timeout passed, or the host
    /// rebooted) is connected again at the same index; a record of a deleted volume goes.
    pub async fn restore(self: &Arc<Self>) -> Result<(), AttachmentError> {
        let records = self.file.load()?;
        if records.is_empty() {
            return Ok(());
        }
        let kernel = match netlink(|nl| nl.status(None)).await {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, records = records.len(), "cannot reattach kernel devices");
                return Err(e.into());
            }
        };
        let known: Vec<(String, String)> =
            self.volumes.list().into_iter().map(|v| (v.name, v.uuid)).collect();
        let mut live = self.live.lock().await;
        let mut kept = Vec::new();
        for r in records {
            let exists = known.iter().any(|(n, u)| *n == r.volume && *u == r.uuid);
            match plan_restore(exists, kernel.iter().find(|d| d.index == r.index).copied()) {
                RestoreStep::Drop { disconnect } => {
                    tracing::warn!(volume = %r.volume, device = %r.device(), "attached volume no longer exists; detaching");
                    if disconnect {
                        let index = r.index;
                        if let Err(e) = netlink(move |nl| nl.disconnect(index)).await {
                            tracing::warn!(device = %r.device(), error = %e, "disconnect failed");
                        }
                    }
                }
                step => {
                    tracing::info!(volume = %r.volume, device = %r.device(), ?step, "reattaching");
                    live.push(self.spawn(r.clone(), step == RestoreStep::Reconfigure));
                    kept.push(r);
                }
            }
        }
        self.file.store(&kept)
    }

    /// Attaches `name` as a local device; idempotent for the same volume and mode.
    pub async fn attach(
        self: &Arc<Self>,
        name: &str,
        read_only: bool,
        generation: u64,
    ) -> Result<Attachment, AttachmentError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.iter_mut().find(|l| l.record.volume == name) {
            if l.record.read_only != read_only {
                return Err(AttachmentError::Conflict(format!(
                    "volume {name:?} is attached here already as {} ({}); detach it first",
                    l.record.device(),
                    if l.record.read_only { "read-only" } else { "read-write" }
                )));
            }
            if generation <= l.record.generation {
                return Ok(l.record.clone());
            }
            l.record.generation = generation;
            self.generation_of(&l.record).fetch_max(generation, std::sync::atomic::Ordering::SeqCst);
            let record = l.record.clone();
            let all: Vec<Attachment> = live.iter().map(|l| l.record.clone()).collect();
            self.file.store(&all)?;
            return Ok(record);
        }
        let status = self.volumes.status(name).map_err(|e| AttachmentError::Volume(e.to_string()))?;
        // Open first so an unservable volume (locked, say) fails before the kernel is touched.
        let probe = Attachment {
            volume: name.to_string(),
            uuid: status.uuid.clone(),
            index: 0,
            read_only,
            generation,
        };
        drop(self.open(&probe)?);
        let taken: Vec<u32> = live.iter().map(|l| l.record.index).collect();
        let kernel = netlink(|nl| nl.status(None)).await?;
        let mut last_error = None;
        for index in (0..MAX_INDEX)
            .filter(|i| !taken.contains(i) && !kernel.iter().any(|d| d.index == *i && d.connected))
        {
            let record = Attachment {
                volume: name.to_string(),
                uuid: status.uuid.clone(),
                index,
                read_only,
                generation,
            };
            let mut all: Vec<Attachment> = live.iter().map(|l| l.record.clone()).collect();
            all.push(record.clone());
            self.file.store(&all)?;
            match self.connect(&record).await {
                Ok(served) => {
                    tracing::info!(volume = name, device = %record.device(), read_only, generation, "volume attached");
                    let stop = self.shutdown.child_token();
                    let task =
                        tokio::spawn(Arc::clone(self).supervise(record.clone(), stop.clone(), Some(served)));
                    live.push(Live { record: record.clone(), stop, task });
                    return Ok(record);
                }
                Err(e) => {
                    all.pop();
                    self.file.store(&all)?;
                    // Somebody else (nbd-client, another daemon) took it meanwhile: next index.
                    if !matches!(e, AttachmentError::Kernel(AttachError::Kernel { errno: libc::EBUSY, .. })) {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| AttachmentError::Busy("no free NBD device index".into())))
    }

    /// Detaches a volume (by name or `/dev/nbdN`): refused while the device is mounted
    /// unless `force`; the device's cached writes are flushed first.
    pub async fn detach(&self, target: &str, force: bool) -> Result<Attachment, AttachmentError> {
        let index = kernel_nbd::parse_device(target);
        let mut live = self.live.lock().await;
        let Some(pos) = live.iter().position(|l| l.record.volume == target || Some(l.record.index) == index)
        else {
            return Err(AttachmentError::NotFound(target.to_string()));
        };
        let device = live[pos].record.device();
        if !force {
            if let Some(mount) = crate::mounts::of_device(&device) {
                return Err(AttachmentError::Busy(format!(
                    "{device} is mounted at {}; unmount it first (or detach with --force)",
                    mount.point
                )));
            }
        }
        // Dirty pages of the raw device reach the volume before the kernel lets go of it.
        let d = device.clone();
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new().write(true).open(&d).and_then(|f| f.sync_all())
        })
        .await;
        let record = live[pos].record.clone();
        let i = record.index;
        netlink(move |nl| nl.disconnect(i)).await?;
        let l = live.remove(pos);
        self.generations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&record.volume);
        l.stop.cancel();
        let _ = l.task.await;
        let all: Vec<Attachment> = live.iter().map(|l| l.record.clone()).collect();
        self.file.store(&all)?;
        tracing::info!(volume = %record.volume, device = %device, "volume detached");
        Ok(record)
    }

    fn device_config(&self, record: &Attachment, size_bytes: u64, flags: u16) -> DeviceConfig {
        DeviceConfig {
            index: Some(record.index),
            size_bytes,
            block_size: BLOCK_SIZE,
            server_flags: u64::from(flags),
            timeout_s: self.timing.request_timeout_s,
            dead_conn_timeout_s: self.timing.dead_conn_timeout_s,
            backend: record.backend(),
        }
    }

    fn spawn(self: &Arc<Self>, record: Attachment, reconfigure: bool) -> Live {
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(Arc::clone(self).supervise_from(record.clone(), stop.clone(), reconfigure));
        Live { record, stop, task }
    }

    async fn supervise_from(self: Arc<Self>, record: Attachment, stop: CancellationToken, reconfigure: bool) {
        if !reconfigure {
            // The kernel forgot the device: connect it again at its index.
            loop {
                match self.connect(&record).await {
                    Ok(first) => return self.supervise(record, stop, Some(first)).await,
                    Err(e) => {
                        tracing::warn!(volume = %record.volume, device = %record.device(), error = %e, "cannot reattach yet; retrying");
                    }
                }
                if !pause(&stop).await {
                    return;
                }
            }
        }
        self.supervise(record, stop, None).await
    }

    /// Opens the volume and CONNECTs the kernel device of `record` to a new socket pair.
    async fn connect(&self, record: &Attachment) -> Result<Served, AttachmentError> {
        let session = self.open(record)?;
        let (kernel_end, server_end) = kernel_nbd::socket_pair()?;
        let config = self.device_config(record, session.size_bytes(), session.transmission_flags());
        netlink(move |nl| nl.connect(&config, std::os::fd::AsFd::as_fd(&kernel_end)).map(drop)).await?;
        Ok((session, server_end))
    }

    /// Serves one device for as long as its attachment stands. `first` is a session the
    /// kernel was just connected to; otherwise each round hands the kernel a new socket.
    async fn supervise(
        self: Arc<Self>,
        record: Attachment,
        stop: CancellationToken,
        mut first: Option<Served>,
    ) {
        let peer = format!("kernel:{}", record.device());
        while !stop.is_cancelled() {
            let (session, stream) = match first.take() {
                Some(s) => s,
                None => match self.reconnect(&record).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(volume = %record.volume, device = %record.device(), error = %e, "cannot give the device a new socket yet; retrying");
                        if !pause(&stop).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let backend = session.backend();
            let mut known_size = session.size_bytes();
            let serve = self.server.serve_direct(session, stream, stop.clone(), peer.clone());
            tokio::pin!(serve);
            loop {
                tokio::select! {
                    _ = &mut serve => break,
                    _ = tokio::time::sleep(SIZE_POLL) => {
                        let size = backend.size_bytes();
                        if size != known_size {
                            let (index, backend) = (record.index, record.backend());
                            match netlink(move |nl| nl.reconfigure(index, &backend, None, Some(size), None)).await {
                                Ok(()) => {
                                    tracing::info!(device = %record.device(), size_bytes = size, "attached device grown");
                                    known_size = size;
                                }
                                Err(e) => tracing::warn!(device = %record.device(), error = %e, "cannot pass the new size to the kernel"),
                            }
                        }
                    }
                }
            }
            if !stop.is_cancelled() {
                tokio::time::sleep(RESERVE_BACKOFF).await;
            }
        }
    }

    /// Opens the volume and gives the configured kernel device a new socket (RECONFIGURE).
    async fn reconnect(&self, record: &Attachment) -> Result<Served, AttachmentError> {
        let session = self.open(record)?;
        let (kernel_end, server_end) = kernel_nbd::socket_pair()?;
        let (index, backend) = (record.index, record.backend());
        let size = session.size_bytes();
        netlink(move |nl| {
            nl.reconfigure(index, &backend, Some(std::os::fd::AsFd::as_fd(&kernel_end)), Some(size), None)
        })
        .await?;
        tracing::info!(volume = %record.volume, device = %record.device(), "device reattached (RECONFIGURE)");
        Ok((session, server_end))
    }

    /// Opens the volume for a device of `record`, its writes fenced by its generation.
    fn open(&self, record: &Attachment) -> Result<raftblk_blockdev::nbd::DirectSession, AttachmentError> {
        let session = self.server.open_direct(&record.volume, record.read_only).map_err(open_error)?;
        let (volumes, name) = (Arc::clone(&self.volumes), record.volume.clone());
        let source: fence::FenceSource = Arc::new(move || volumes.fence(&name));
        let generation = self.generation_of(record);
        generation.fetch_max(record.generation, std::sync::atomic::Ordering::SeqCst);
        Ok(session.wrap_backend(|inner| Arc::new(fence::FencedBackend::new(inner, generation, source))))
    }

    /// The shared generation cell of `record`'s volume.
    fn generation_of(&self, record: &Attachment) -> Arc<std::sync::atomic::AtomicU64> {
        let mut cells = self.generations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(cells.entry(record.volume.clone()).or_default())
    }
}

/// A served device's session and the server's end of its socket pair.
type Served = (raftblk_blockdev::nbd::DirectSession, tokio::net::UnixStream);

/// Waits before a retry; false when the attachment was stopped meanwhile.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(RETRY_PAUSE) => true,
    }
}

fn open_error(e: OpenError) -> AttachmentError {
    AttachmentError::Volume(e.to_string())
}
