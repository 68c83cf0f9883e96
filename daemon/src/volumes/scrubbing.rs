//! Scrubs of this node's volumes: starting them, their status, and recording what they
//! found in the volume's record (see [`crate::scrub`] for what a scrub does).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{lock, VolumeError, VolumeManager};

impl VolumeManager {
    /// Sets the scrub rate limit (MiB/s of allocated data read; 0: unlimited).
    pub fn set_scrub_rate_mib_s(&self, mib: u64) {
        self.scrub_rate_bytes_per_s.store(mib.saturating_mul(1 << 20), Ordering::Relaxed);
    }

    /// The scrub rate limit in MiB/s.
    pub fn scrub_rate_mib_s(&self) -> u64 {
        self.scrub_rate_bytes_per_s.load(Ordering::Relaxed) >> 20
    }

    /// Sets the hours between background scrubs (0: none).
    pub fn set_scrub_interval_h(&self, hours: u64) {
        self.scrub_interval_h.store(hours, Ordering::Relaxed);
    }

    /// Hours between background scrubs (0: none).
    pub fn scrub_interval_h(&self) -> u64 {
        self.scrub_interval_h.load(Ordering::Relaxed)
    }

    /// Starts a scrub of `name` (or returns the one running). It reads every block of
    /// every copy, repairs damage from good copies, and records what it found in the
    /// volume's record (a copy left damaged makes the volume degraded).
    pub fn start_scrub(self: &Arc<Self>, name: &str) -> Result<crate::scrub::ScrubStatus, VolumeError> {
        // A locked volume scrubs too: checksums are over the stored (encrypted) bytes.
        let v = self.get(name)?;
        let job = {
            let mut scrubs = lock(&self.scrubs);
            if let Some(j) = scrubs.get(name).filter(|j| !j.finished.load(Ordering::SeqCst)) {
                return Ok(j.status());
            }
            let job = Arc::new(crate::scrub::ScrubJob::default());
            crate::scrub::begin(&job, name);
            scrubs.insert(name.to_string(), job.clone());
            job
        };
        let me = self.clone();
        let name = name.to_string();
        let run = job.clone();
        tokio::spawn(async move {
            let rate = me.scrub_rate_bytes_per_s.load(Ordering::Relaxed);
            let copies = lock(&v.record).voters.clone();
            match (&v.replicated, &me.replication, &v.file) {
                (Some(store), Some(node), _) => {
                    let c = crate::scrub::ClusterScrub { store: store.as_ref(), node, copies };
                    crate::scrub::scrub_replicated(c, &run, rate).await;
                }
                (None, _, Some(file)) => {
                    crate::scrub::scrub_local(file.as_ref(), &run, rate).await;
                }
                _ => {}
            }
            let summary = crate::scrub::end(&run);
            tracing::info!(volume = %name, blocks = summary.blocks_checked, bad_copies = ?summary.bad_copies(), error = ?summary.error, "scrub finished");
            if let Err(e) = me.record_scrub(&name, &summary).await {
                tracing::warn!(volume = %name, error = %e, "cannot record the scrub's findings");
            }
        });
        Ok(job.status())
    }

    /// The running scrub of `name`, or the last one run from this node, or what the volume's
    /// record says of the last one anywhere.
    pub fn scrub_status(&self, name: &str) -> Result<crate::scrub::ScrubStatus, VolumeError> {
        let v = self.get(name)?;
        if let Some(j) = lock(&self.scrubs).get(name) {
            return Ok(j.status());
        }
        let r = lock(&v.record).clone();
        Ok(crate::scrub::ScrubStatus {
            running: false,
            summary: (r.scrubbed_unix_s > 0).then(|| crate::scrub::ScrubSummary {
                volume: r.name.clone(),
                finished_unix_s: r.scrubbed_unix_s,
                copies: r
                    .damaged_copies
                    .iter()
                    .map(|&n| (n, crate::scrub::CopyFindings { unrepaired: 1, ..Default::default() }))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Records a finished scrub in the volume's record (through the catalog in a cluster).
    async fn record_scrub(
        &self,
        name: &str,
        summary: &crate::scrub::ScrubSummary,
    ) -> Result<(), VolumeError> {
        if summary.error.is_some() && summary.blocks_checked == 0 {
            return Ok(());
        }
        for _ in 0..5 {
            let _control = self.control.lock().await;
            let v = self.get(name)?;
            let mut record = lock(&v.record).clone();
            let expect = record.generation;
            record.scrubbed_unix_s = summary.finished_unix_s;
            record.damaged_copies = summary.bad_copies();
            record.generation += 1;
            match self.commit_change(&record, expect).await {
                Ok(()) => {
                    self.catalog.update(&record).await?;
                    *lock(&v.record) = record;
                    return Ok(());
                }
                Err(VolumeError::Unavailable(why)) if why.contains("changed") => {
                    // This node's copy of the record is behind the catalog: let it catch up.
                    drop(_control);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(VolumeError::Unavailable(format!(
            "volume {name:?} kept changing; its scrub findings were not recorded"
        )))
    }
}
