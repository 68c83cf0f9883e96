//! CSI ControllerPublish/Unpublish on a volume's record: the publications and the fence
//! (see [`crate::publish`]) change like any other field of the record, compare-and-set on
//! its generation through the cluster catalog, so every node sees one answer.

use std::time::Instant;

use super::{lock, Volume, VolumeError, VolumeManager};
use crate::control::Request;
use crate::model::Publication;
use crate::model::VolumeRecord;
use crate::publish::{self, PublishRefusal, PublishRequest, Published};

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The rules refused it.
    #[error("{0}")]
    Refused(#[from] PublishRefusal),
    /// The volume or the catalog failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl VolumeManager {
    /// Publishes `name` to a node; answers the caller's publication (its generation goes
    /// into the attach request of that node).
    pub async fn publish(&self, name: &str, req: PublishRequest) -> Result<Publication, PublishError> {
        let _control = self.control.lock().await;
        let v = self.get(name)?;
        let mut record = lock(&v.record).clone();
        let now = Instant::now();
        let dead = |node: u64| {
            self.nodes.get().is_some_and(|d| d.table.liveness(node, now) == crate::model::Liveness::Dead)
        };
        let Published { publications, fence, mine, fenced_out, changed } =
            publish::publish(&record.publications, record.fence, record.read_only, req, dead)?;
        // A repeat is committed too (compare-and-set on the generation read here): a node
        // whose copy of the record is behind must not confirm a publication that a newer
        // one has replaced; the catalog refuses its stale generation and the caller retries.
        record.publications = publications;
        record.fence = fence;
        self.save_publications(&v, record).await?;
        if changed {
            tracing::info!(
                volume = name,
                node = req.node,
                read_only = req.read_only,
                generation = mine.generation,
                ?fenced_out,
                "volume published"
            );
        }
        Ok(mine)
    }

    /// Removes a node's publication of `name` (idempotent).
    pub async fn unpublish(&self, name: &str, node: u64) -> Result<(), VolumeError> {
        let _control = self.control.lock().await;
        let v = self.get(name)?;
        let mut record = lock(&v.record).clone();
        let Some(publications) = publish::unpublish(&record.publications, node) else { return Ok(()) };
        record.publications = publications;
        self.save_publications(&v, record).await?;
        tracing::info!(volume = name, node, "volume unpublished");
        Ok(())
    }

    /// The volume's fence as this node knows it (`None`: no such volume here).
    pub fn fence(&self, name: &str) -> Option<u64> {
        self.get(name).ok().map(|v| lock(&v.record).fence)
    }

    /// Commits `record` (read from `v`, its publications changed) as the next generation
    /// through the catalog, keeps it here and pushes it to the peers (those that miss it
    /// follow their catalog replica).
    async fn save_publications(&self, v: &Volume, mut record: VolumeRecord) -> Result<(), VolumeError> {
        record.generation += 1;
        self.commit_change(&record, record.generation - 1).await?;
        self.catalog.update(&record).await?;
        *lock(&v.record) = record.clone();
        let _ = self.broadcast(&Request::Upsert(record), &[]).await;
        Ok(())
    }
}
