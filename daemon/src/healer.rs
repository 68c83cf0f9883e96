//! Self-healing: copies on dead, draining or removed nodes are replaced, and so are copies
//! a scrub found damaged beyond repair (their replacement is copied from the good ones).
//!
//! One node acts: the lowest-id node that is alive and not removed in its own view (every
//! node runs the loop; the others find they are not the one and wait). Views can differ
//! for a moment (a partition, a node just back); two nodes acting at once is safe because
//! every change goes through the volume's Raft group, one configuration change at a time,
//! and through the volume record's generation.
//!
//! The decisions are pure planners ([`crate::planner`]); this module carries them out. For
//! each volume with a copy to replace, up to eight volumes at once and three new copies per
//! receiving node: pick a node by [`crate::planner::healing::plan_heal`] (excluding the
//! current holders, so zones stay spread, and spreading one pass's copies over the nodes),
//! add the copy there (a learner that gets a snapshot, promoted once it holds the data), then
//! remove the old one. No step asks a node the liveness view calls dead (a dead voter would
//! cost a control timeout per question), and a volume that lost the majority of its copies
//! waits for one to return (a membership change needs a majority). A copy is only ever
//! removed after its replacement votes, so redundancy never drops below what the failure left.
//!
//! When nothing needs repair, the acting node also spreads leaders: if a live node leads at
//! least two volumes more than another node holding a copy of one of them, it moves that
//! leadership over, one volume per pass. Volumes with NBD clients connected are left alone:
//! their leader follows the client (`cluster.leader_follows_client`), which matters more.
//!
//! The cluster catalog's own membership is kept by its leader instead ([`catalog_loop`]):
//! it changes quickly (a catalog replica holds kilobytes) and must not wait behind a volume
//! copy that takes minutes.
//!
//! The acting node also schedules background scrubs ([`scrub_loop`]): a scrub covers every
//! copy of a volume, so one node starting them is enough.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::model::{AdminState, Liveness, NodeView};
use crate::nodes::NodeDirectory;
use crate::planner::{self, healing::Replacement};
use crate::volumes::VolumeManager;

/// How often the acting node looks for copies to replace.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait for a new copy to catch up before the next attempt.
const ADD_TIMEOUT: Duration = Duration::from_secs(600);
/// Most volumes one healing pass replaces copies of at once.
const HEAL_CONCURRENCY: usize = 8;
/// Most new copies one node receives at once in a pass (each is a rebuild it serves).
const HEAL_PER_TARGET: usize = 3;
/// Longest wait for a removal to take effect.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Every node this one knows of (itself, its peers, and every node holding a copy) as it
/// sees them now: the snapshot the planners decide on.
fn view(
    volumes: &VolumeManager,
    dir: &NodeDirectory,
    records: &[crate::model::VolumeRecord],
) -> Vec<NodeView> {
    let mut ids = volumes.peer_ids();
    ids.extend(records.iter().flat_map(|r| r.voters.iter().copied()));
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|&id| Some(id) != volumes.node_id());
    dir.views(&ids)
}

/// Whether this node is the one that repairs (see [`planner::acting::is_acting`]).
pub fn is_acting(volumes: &VolumeManager, dir: &NodeDirectory) -> bool {
    let Some(me) = volumes.node_id() else { return false };
    planner::acting::is_acting(me, &dir.views(&volumes.peer_ids()))
}

/// One pass: every copy that must move gets a replacement
/// ([`planner::healing::plan_heal`]), at most [`HEAL_CONCURRENCY`] volumes at a time and
/// [`HEAL_PER_TARGET`] new copies per receiving node at a time; the next replacement starts
/// as soon as one finishes. Returns what it did.
pub async fn heal_once(volumes: &VolumeManager, dir: &NodeDirectory) -> Vec<String> {
    let records = volumes.records();
    let plan = planner::healing::plan_heal(&records, &view(volumes, dir, &records));
    for stuck in &plan.stuck {
        tracing::warn!(volume = %stuck.volume, why = %stuck.why, "cannot replace a copy yet");
    }
    let done =
        run_bounded(plan.replacements, HEAL_CONCURRENCY, HEAL_PER_TARGET, |r| replace(volumes, r)).await;
    done.into_iter().flatten().collect()
}

/// Runs `work` for every replacement, at most `most` at a time and at most `per_target`
/// at a time for any one receiving node; the next starts as soon as one finishes.
async fn run_bounded<T, F, Fut>(
    replacements: Vec<Replacement>,
    most: usize,
    per_target: usize,
    work: F,
) -> Vec<T>
where
    F: Fn(Replacement) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let all = Semaphore::new(most);
    let targets: BTreeMap<u64, Semaphore> =
        replacements.iter().map(|r| (r.to, Semaphore::new(per_target))).collect();
    let runs = replacements.into_iter().map(|r| {
        let (all, target, work) = (&all, targets.get(&r.to), &work);
        async move {
            // The target's permit first, so a volume waiting for a busy node holds no slot.
            let _target = match target {
                Some(t) => t.acquire().await.ok(),
                None => None,
            };
            let _slot = all.acquire().await.ok();
            work(r).await
        }
    });
    futures::future::join_all(runs).await
}

/// Adds the new copy, then removes the old one.
async fn replace(volumes: &VolumeManager, Replacement { volume, from, to }: Replacement) -> Option<String> {
    tracing::info!(%volume, from, to, "replacing a copy");
    if let Err(e) = volumes.add_replica(&volume, to, ADD_TIMEOUT).await {
        tracing::warn!(%volume, to, error = %e, "adding the replacement copy failed; will retry");
        return None;
    }
    match volumes.remove_replica(&volume, from, REMOVE_TIMEOUT).await {
        Ok(_) => Some(format!("{volume}: node {from} -> node {to}")),
        Err(e) => {
            tracing::warn!(%volume, node = from, error = %e, "removing the replaced copy failed; will retry");
            None
        }
    }
}

/// Moves at most one leadership ([`planner::leaders::plan_balance`]). Returns what it moved.
pub async fn balance_once(volumes: &VolumeManager, dir: &NodeDirectory) -> Option<String> {
    let records = volumes.records();
    let nodes = view(volumes, dir, &records);
    // Leaders are moving anyway while a copy holder is not heard from (and asking it would
    // cost a timeout per volume): balance once the cluster is whole again.
    let holders: BTreeSet<u64> = records.iter().flat_map(|r| r.voters.iter().copied()).collect();
    if nodes.iter().any(|n| holders.contains(&n.id) && n.liveness != Liveness::Alive) {
        return None;
    }
    let usable: BTreeSet<u64> = nodes
        .iter()
        .filter(|n| n.liveness == Liveness::Alive && n.admin == AdminState::Active)
        .map(|n| n.id)
        .collect();
    let asked = futures::future::join_all(records.iter().map(|r| volumes.leader_and_clients(r))).await;
    let groups: Vec<planner::leaders::Led> = records
        .iter()
        .zip(asked)
        .map(|(record, (leader, clients))| planner::leaders::Led { record, leader, clients })
        .collect();
    let m = planner::leaders::plan_balance(&groups, &usable)?;
    match volumes.transfer_leader(&m.volume, m.to).await {
        Ok(()) => {
            Some(format!("{}: node {} -> node {} (leader counts {:?})", m.volume, m.from, m.to, m.counts))
        }
        Err(e) => {
            tracing::debug!(volume = %m.volume, to = m.to, error = %e, "leader transfer for balance failed");
            None
        }
    }
}

/// Waits `interval`; false (at once) when `stop` is cancelled.
async fn pause(stop: &tokio_util::sync::CancellationToken, interval: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(interval) => true,
    }
}

/// Every second, if this node leads the catalog, one step towards its wanted membership.
pub async fn catalog_loop(
    volumes: Arc<VolumeManager>,
    dir: Arc<NodeDirectory>,
    stop: tokio_util::sync::CancellationToken,
) {
    while pause(&stop, Duration::from_secs(1)).await {
        if let Some(catalog) = volumes.cluster_catalog() {
            let nodes = dir.views(&volumes.peer_ids());
            catalog.keep_membership(&planner::catalog_members::candidates(&nodes)).await;
        }
    }
}

/// Runs [`heal_once`] every [`HEAL_INTERVAL`] while this node is the acting one, until `stop`.
pub async fn heal_loop(
    volumes: Arc<VolumeManager>,
    dir: Arc<NodeDirectory>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut again = false;
    while again || pause(&stop, HEAL_INTERVAL).await {
        again = false;
        if !is_acting(&volumes, &dir) {
            continue;
        }
        let healed = heal_once(&volumes, &dir).await;
        // A pass that replaced something may have left more to do (a record changed, or a
        // volume lost a second copy meanwhile): look again at once.
        again = !healed.is_empty();
        for what in &healed {
            tracing::info!(%what, "copy replaced");
        }
        if healed.is_empty() {
            if let Some(what) = balance_once(&volumes, &dir).await {
                tracing::info!(%what, "leadership moved to spread leaders");
            }
        }
    }
}

/// How often the background scrubber looks for a volume due.
const SCRUB_CHECK: Duration = Duration::from_secs(60);

/// Scrubs each volume every `scrub_interval_h` hours, one at a time. In a cluster the
/// acting node (the one that heals) does it, since a scrub covers every copy.
pub async fn scrub_loop(volumes: Arc<VolumeManager>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SCRUB_CHECK) => {}
        }
        if volumes.nodes().is_some_and(|dir| !is_acting(&volumes, dir)) {
            continue;
        }
        let records = volumes.records();
        let Some(r) =
            crate::scrub::due_for_scrub(&records, volumes.scrub_interval_h(), crate::scrub::now_unix_s())
        else {
            continue;
        };
        tracing::info!(volume = %r.name, "background scrub starts");
        if let Err(e) = volumes.start_scrub(&r.name) {
            tracing::warn!(volume = %r.name, error = %e, "background scrub did not start");
            continue;
        }
        // One at a time: wait for it before looking for the next.
        while volumes.scrub_status(&r.name).is_ok_and(|s| s.running) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn replacements_run_concurrently_within_both_bounds() {
        let planned: Vec<Replacement> = (0..12)
            .map(|i| Replacement { volume: format!("v{i}"), from: 9, to: if i < 6 { 1 } else { 2 + i % 3 } })
            .collect();
        let (running, most_running) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let per_node: Mutex<BTreeMap<u64, (usize, usize)>> = Mutex::new(BTreeMap::new());
        let t0 = tokio::time::Instant::now();
        let done = run_bounded(planned, 4, 2, |r| {
            let (running, most_running, per_node) = (&running, &most_running, &per_node);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most_running.fetch_max(now, Ordering::SeqCst);
                {
                    let mut p = per_node.lock().expect("lock");
                    let e = p.entry(r.to).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                per_node.lock().expect("lock").entry(r.to).or_default().0 -= 1;
                running.fetch_sub(1, Ordering::SeqCst);
                r.volume
            }
        })
        .await;
        assert_eq!(done.len(), 12, "every replacement ran");
        assert_eq!(most_running.load(Ordering::SeqCst), 4, "never more than 4 at once, and 4 reached");
        let most_per_node: Vec<usize> = per_node.lock().expect("lock").values().map(|e| e.1).collect();
        assert!(most_per_node.iter().all(|&n| n <= 2), "{most_per_node:?}");
        // 12 one-second jobs, 4 at a time (node 1's six at most 2 at a time): 3 s, not 12.
        assert!(t0.elapsed() <= Duration::from_secs(4), "{:?}", t0.elapsed());
    }
}
