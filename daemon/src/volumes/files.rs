//! Where a copy's files live and how they go. Unlinking a large allocated file frees its
//! extents before it returns (seconds for a big volume on ext4), so removals run on the
//! blocking pool, off the runtime's workers that serve NBD.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{lock, VolumeManager};
use crate::planner::reconcile::orphans;

impl VolumeManager {
    /// A copy's data file.
    pub(super) fn data_path(&self, uuid: &str) -> PathBuf {
        self.volumes_dir.join(format!("{uuid}.img"))
    }

    /// Where a copy's checkpointed applied index lives (cluster mode).
    pub(super) fn applied_path(&self, uuid: &str) -> PathBuf {
        self.volumes_dir.join(format!("{uuid}.applied"))
    }

    /// Where the marker of an unfinished rebuild of a copy lives (cluster mode).
    pub(super) fn rebuild_path(&self, uuid: &str) -> PathBuf {
        self.volumes_dir.join(format!("{uuid}.rebuild"))
    }

    /// Removes every file of the copy `uuid`: the data file must go (its error is returned),
    /// the others may be missing already.
    pub(super) async fn remove_copy_files(&self, uuid: &str) -> std::io::Result<()> {
        let data = self.data_path(uuid);
        let others = [
            raftblk_blockdev::store::sealed::meta_path(&data),
            self.applied_path(uuid),
            self.rebuild_path(uuid),
        ];
        tokio::task::spawn_blocking(move || {
            let removed = match std::fs::remove_file(&data) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            };
            for p in others {
                let _ = std::fs::remove_file(p);
            }
            removed
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes the files in the volumes directory that no open volume owns: left by a create
    /// or delete that was cut short.
    pub(super) async fn remove_orphans(&self) {
        let known: BTreeSet<String> =
            lock(&self.open).values().map(|v| lock(&v.record).uuid.clone()).collect();
        let dir = self.volumes_dir.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&dir) else { return };
            let files: Vec<String> =
                entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            for file in orphans(&known, &files) {
                let path = dir.join(file);
                tracing::warn!(file = %path.display(), "removing a file no volume owns (interrupted create or delete)");
                let _ = std::fs::remove_file(path);
            }
        });
        if let Err(e) = scan.await {
            tracing::warn!(error = %e, "the scan for files no volume owns failed");
        }
    }
}
