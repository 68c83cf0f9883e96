//! Prometheus metrics: per-volume I/O counters and latency histograms, recorded
//! by [`MeteredBackend`], a decorator every served volume is wrapped in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use raftblk_blockdev::backend::BackendResult;
use raftblk_blockdev::{BackendError, BlockBackend, Extent};

/// I/O latency buckets, 20 µs to 5 s: block I/O spans page-cache hits to stalled disks.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];

/// The kinds of block operation that are counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// READ
    Read,
    /// WRITE
    Write,
    /// FLUSH (and FUA's flush)
    Flush,
    /// TRIM
    Trim,
    /// WRITE_ZEROES
    WriteZeroes,
    /// BLOCK_STATUS
    BlockStatus,
    /// CACHE
    Cache,
}

impl Op {
    const ALL: [Op; 7] =
        [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::BlockStatus, Op::Cache];

    fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::BlockStatus => "block_status",
            Op::Cache => "cache",
        }
    }
}

/// Every metric family of the daemon.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    ops: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    latency: HistogramVec,
    /// Volume size in bytes.
    pub volume_size: IntGaugeVec,
    /// Bytes allocated in the volume's data file.
    pub volume_allocated: IntGaugeVec,
    /// Open NBD connections per volume.
    pub volume_connections: IntGaugeVec,
    /// Replication gauges of this node's copy, by volume and `kind` (see `Metrics::new`).
    pub volume_raft: IntGaugeVec,
    /// Bytes of the volume a rebuilding copy has yet to cover (0 when not rebuilding).
    pub volume_rebuild_remaining: IntGaugeVec,
    /// 1 for the volume's current health state, 0 for the others.
    pub volume_health: IntGaugeVec,
    /// Number of volumes on this node.
    pub volumes: IntGauge,
    /// The cluster catalog's Raft positions on this node, by `kind`.
    pub catalog_raft: IntGaugeVec,
    /// The catalog's voters and learners as this node sees them, by `role`.
    pub catalog_members: IntGaugeVec,
    /// 1 while this node leads the catalog.
    pub catalog_leader: IntGauge,
    /// Blocks that failed an integrity check, by volume and kind.
    integrity_errors: IntCounterVec,
    /// Damaged blocks rewritten from a good copy, by volume.
    blocks_repaired: IntCounterVec,
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let labels = &["volume", "op"];
        let ops = IntCounterVec::new(
            Opts::new("raftblk_volume_operations_total", "Block operations completed, by volume and kind"),
            labels,
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "raftblk_volume_operation_errors_total",
                "Block operations that failed, by volume and kind",
            ),
            labels,
        )?;
        let bytes = IntCounterVec::new(
            Opts::new("raftblk_volume_bytes_total", "Bytes read or written by clients, by volume and kind"),
            labels,
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "raftblk_volume_operation_duration_seconds",
                "Time from request to completion in the block backend, by volume and kind",
            )
            .buckets(LATENCY_BUCKETS_S.to_vec()),
            labels,
        )?;
        let volume_size = IntGaugeVec::new(
            Opts::new("raftblk_volume_size_bytes", "Provisioned size of the volume"),
            &["volume"],
        )?;
        let volume_allocated = IntGaugeVec::new(
            Opts::new(
                "raftblk_volume_allocated_bytes",
                "Bytes allocated on disk for the volume (thin provisioning)",
            ),
            &["volume"],
        )?;
        let volume_connections = IntGaugeVec::new(
            Opts::new("raftblk_volume_nbd_connections", "Open NBD connections to the volume"),
            &["volume"],
        )?;
        let volume_raft = IntGaugeVec::new(
            Opts::new(
                "raftblk_volume_raft_index",
                "Raft log positions of this node's copy: kind=commit, applied, log_first (older entries compacted); \
                 applied far behind commit means a lagging copy",
            ),
            &["volume", "kind"],
        )?;
        let volume_rebuild_remaining = IntGaugeVec::new(
            Opts::new(
                "raftblk_volume_rebuild_remaining_bytes",
                "Bytes of the volume this node's copy has yet to copy from its peers (0: not rebuilding)",
            ),
            &["volume"],
        )?;
        let volume_health = IntGaugeVec::new(
            Opts::new(
                "raftblk_volume_health",
                "1 for the volume's health state (healthy, rebuilding, degraded) as this node sees it, 0 for the others",
            ),
            &["volume", "state"],
        )?;
        let volumes = IntGauge::new("raftblk_volumes", "Volumes on this node")?;
        let catalog_raft = IntGaugeVec::new(
            Opts::new(
                "raftblk_catalog_raft_index",
                "Raft log positions of this node's cluster catalog replica: kind=commit, applied",
            ),
            &["kind"],
        )?;
        let catalog_members = IntGaugeVec::new(
            Opts::new(
                "raftblk_catalog_members",
                "Cluster catalog replicas as this node sees them, by role (voter, learner); fewer than \
                 3 voters leaves the catalog without fault tolerance",
            ),
            &["role"],
        )?;
        let catalog_leader = IntGauge::new(
            "raftblk_catalog_is_leader",
            "1 while this node leads the cluster catalog, else 0",
        )?;
        let integrity_errors = IntCounterVec::new(
            Opts::new(
                "raftblk_volume_integrity_errors_total",
                "Blocks that failed an integrity check on this node, by volume and kind: checksum \
                 (data does not match its crc32c), metadata (the block's records are damaged), \
                 authentication (an encrypted block's tag fails), unrecoverable (a request failed: \
                 no copy of the block was intact)",
            ),
            &["volume", "kind"],
        )?;
        let blocks_repaired = IntCounterVec::new(
            Opts::new(
                "raftblk_volume_blocks_repaired_total",
                "Damaged blocks of this node's copies rewritten from another copy, by volume",
            ),
            &["volume"],
        )?;
        registry.register(Box::new(integrity_errors.clone()))?;
        registry.register(Box::new(blocks_repaired.clone()))?;
        registry.register(Box::new(ops.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(volume_size.clone()))?;
        registry.register(Box::new(volume_allocated.clone()))?;
        registry.register(Box::new(volume_connections.clone()))?;
        registry.register(Box::new(volume_raft.clone()))?;
        registry.register(Box::new(volume_rebuild_remaining.clone()))?;
        registry.register(Box::new(volume_health.clone()))?;
        registry.register(Box::new(volumes.clone()))?;
        registry.register(Box::new(catalog_raft.clone()))?;
        registry.register(Box::new(catalog_members.clone()))?;
        registry.register(Box::new(catalog_leader.clone()))?;
        Ok(Metrics {
            registry,
            ops,
            errors,
            bytes,
            latency,
            volume_size,
            volume_allocated,
            volume_connections,
            volume_raft,
            volume_rebuild_remaining,
            catalog_raft,
            catalog_members,
            catalog_leader,
            volume_health,
            volumes,
            integrity_errors,
            blocks_repaired,
        })
    }

    /// The integrity reporter of one volume: counts and logs every failure and repair.
    pub fn integrity(&self, volume: &str) -> Arc<IntegrityCounters> {
        use raftblk_blockdev::seal::IntegrityKind as K;
        let kinds = [K::Checksum, K::Metadata, K::Authentication, K::Unrecoverable];
        Arc::new(IntegrityCounters {
            volume: volume.to_string(),
            errors: kinds.map(|k| self.integrity_errors.with_label_values(&[volume, k.label()])),
            repaired: self.blocks_repaired.with_label_values(&[volume]),
        })
    }

    /// Resolves one volume's series once, so the I/O path does no label lookups.
    pub fn volume(&self, volume: &str) -> VolumeMetrics {
        let per_op = Op::ALL.map(|op| OpMetrics {
            ops: self.ops.with_label_values(&[volume, op.label()]),
            errors: self.errors.with_label_values(&[volume, op.label()]),
            bytes: self.bytes.with_label_values(&[volume, op.label()]),
            latency: self.latency.with_label_values(&[volume, op.label()]),
        });
        VolumeMetrics { per_op }
    }

    /// Drops every series of a deleted volume.
    pub fn forget_volume(&self, volume: &str) {
        for op in Op::ALL {
            let _ = self.ops.remove_label_values(&[volume, op.label()]);
            let _ = self.errors.remove_label_values(&[volume, op.label()]);
            let _ = self.bytes.remove_label_values(&[volume, op.label()]);
            let _ = self.latency.remove_label_values(&[volume, op.label()]);
        }
        let _ = self.volume_size.remove_label_values(&[volume]);
        let _ = self.volume_allocated.remove_label_values(&[volume]);
        let _ = self.volume_connections.remove_label_values(&[volume]);
        for kind in ["commit", "applied", "log_first"] {
            let _ = self.volume_raft.remove_label_values(&[volume, kind]);
        }
        let _ = self.volume_rebuild_remaining.remove_label_values(&[volume]);
        for kind in ["checksum", "metadata", "authentication", "unrecoverable"] {
            let _ = self.integrity_errors.remove_label_values(&[volume, kind]);
        }
        let _ = self.blocks_repaired.remove_label_values(&[volume]);
        for state in ["healthy", "rebuilding", "degraded"] {
            let _ = self.volume_health.remove_label_values(&[volume, state]);
        }
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on metric families that break the text format's rules.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// One volume's integrity counters; also its [`IntegrityReporter`], which logs each
/// failure with the volume, the copy and the offset.
pub struct IntegrityCounters {
    volume: String,
    errors: [IntCounter; 4],
    repaired: IntCounter,
}

impl IntegrityCounters {
    /// Failures counted so far, of one kind.
    pub fn errors(&self, kind: raftblk_blockdev::seal::IntegrityKind) -> u64 {
        self.errors[kind as usize].get()
    }
}

impl raftblk_blockdev::seal::IntegrityReporter for IntegrityCounters {
    fn damaged(&self, e: raftblk_blockdev::seal::IntegrityEvent) {
        self.errors[e.kind as usize].inc();
        tracing::warn!(
            volume = %self.volume,
            copy = ?e.copy,
            block = e.block,
            offset = e.block * raftblk_blockdev::seal::BLOCK,
            kind = e.kind.label(),
            "block failed an integrity check"
        );
    }

    fn repaired(&self, block: u64, copy: Option<u64>) {
        self.repaired.inc();
        tracing::info!(volume = %self.volume, copy = ?copy, block, offset = block * raftblk_blockdev::seal::BLOCK, "damaged block rewritten from a good copy");
    }
}

struct OpMetrics {
    ops: IntCounter,
    errors: IntCounter,
    bytes: IntCounter,
    latency: Histogram,
}

/// One volume's pre-resolved series.
pub struct VolumeMetrics {
    per_op: [OpMetrics; 7],
}

impl VolumeMetrics {
    fn record<T>(&self, op: Op, bytes: u64, started: Instant, result: &BackendResult<T>) {
        let m = &self.per_op[op as usize];
        m.latency.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                m.ops.inc();
                m.bytes.inc_by(bytes);
            }
            Err(_) => m.errors.inc(),
        }
    }
}

/// Wraps a backend: counts and times every call, and refuses all I/O once the
/// volume has been deleted (a forced delete leaves connections open until the
/// clients go).
pub struct MeteredBackend {
    inner: Arc<dyn BlockBackend>,
    metrics: VolumeMetrics,
    deleted: AtomicBool,
}

impl MeteredBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockBackend>, metrics: VolumeMetrics) -> Self {
        MeteredBackend { inner, metrics, deleted: AtomicBool::new(false) }
    }

    /// From now on every call fails with `ShuttingDown`.
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::SeqCst);
    }

    fn live(&self) -> BackendResult<()> {
        if self.deleted.load(Ordering::SeqCst) {
            Err(BackendError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl BlockBackend for MeteredBackend {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> BackendResult<Bytes> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.metrics.record(Op::Read, len as u64, t, &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BackendResult<()> {
        self.live()?;
        let t = Instant::now();
        let n = data.len() as u64;
        let r = self.inner.write(offset, data, fua).await;
        self.metrics.record(Op::Write, n, t, &r);
        r
    }

    async fn flush(&self) -> BackendResult<()> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.metrics.record(Op::Flush, 0, t, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.trim(offset, len).await;
        self.metrics.record(Op::Trim, len, t, &r);
        r
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> BackendResult<()> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, may_trim, fast_only).await;
        self.metrics.record(Op::WriteZeroes, len, t, &r);
        r
    }

    async fn block_status(&self, offset: u64, len: u64) -> BackendResult<Vec<Extent>> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.block_status(offset, len).await;
        self.metrics.record(Op::BlockStatus, 0, t, &r);
        r
    }

    async fn cache(&self, offset: u64, len: u64) -> BackendResult<()> {
        self.live()?;
        let t = Instant::now();
        let r = self.inner.cache(offset, len).await;
        self.metrics.record(Op::Cache, 0, t, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_blockdev::store::MemBackend;

    #[tokio::test]
    async fn counts_bytes_errors_and_refuses_after_delete() {
        let m = Metrics::new().unwrap();
        let b = MeteredBackend::new(Arc::new(MemBackend::new(8192)), m.volume("v1"));
        b.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap();
        b.read(0, 512).await.unwrap();
        assert!(b.read(8000, 512).await.is_err());
        let text = m.render();
        assert!(text.contains(r#"raftblk_volume_bytes_total{op="write",volume="v1"} 4096"#), "{text}");
        assert!(text.contains(r#"raftblk_volume_bytes_total{op="read",volume="v1"} 512"#), "{text}");
        assert!(text.contains(r#"raftblk_volume_operation_errors_total{op="read",volume="v1"} 1"#), "{text}");
        assert!(text.contains("raftblk_volume_operation_duration_seconds_bucket"), "{text}");
        b.mark_deleted();
        assert!(matches!(b.read(0, 512).await, Err(BackendError::ShuttingDown)));
        m.forget_volume("v1");
        assert!(!m.render().contains(r#"volume="v1""#));
    }
}
