//! Self-healing: copies on dead, draining or removed nodes are replaced, and so are copies
//! a scrub found damaged beyond repair (their replacement is copied from the good ones).
//!
//! One node acts: the lowest-id node that is alive and not removed in its own view (every
//! node runs the loop; the others find they are not the one and wait). Views can differ
//! for a moment (a partition, a node just back); two nodes acting at once is safe because
//! every change goes through the volume's Raft group, one configuration change at a time,
//! and through the volume record's generation.
//!
//! For each volume with a copy to replace, one at a time: pick a node by
//! [`crate::nodes::place`] (excluding the current holders, so zones stay spread), add
//! the copy there (a learner that gets a snapshot, promoted once it holds the data), then
//! remove the old one. A copy is only ever removed after its replacement votes, so
//! redundancy never drops below what the failure left.
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::Liveness;
use crate::nodes::NodeDirectory;
use crate::volumes::VolumeManager;

/// How often the acting node looks for copies to replace.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(2);
/// Longest wait for a new copy to catch up before the next attempt.
const ADD_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for a removal to take effect.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether this node is the one that repairs: the lowest id alive and not removed.
pub fn is_acting(volumes: &VolumeManager, dir: &NodeDirectory) -> bool {
    let Some(me) = volumes.node_id() else { return false };
    let now = Instant::now();
    let peers = volumes.peer_ids();
    let lowest = peers
        .into_iter()
        .chain(std::iter::once(me))
        .filter(|&id| {
            dir.table.liveness(id, now) == Liveness::Alive
                && dir.table.admin(id) != crate::model::AdminState::Removed
        })
        .min();
    lowest == Some(me)
}

/// One pass: every volume copy that must move gets a replacement. Returns what it did.
pub async fn heal_once(volumes: &VolumeManager, dir: &NodeDirectory) -> Vec<String> {
    let mut done = Vec::new();
    let now = Instant::now();
    let mut records = volumes.records();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    for record in records {
        let leaving: Vec<u64> = record
            .voters
            .iter()
            .copied()
            .filter(|&id| {
                dir.table.liveness(id, now) == Liveness::Dead
                    || dir.table.admin(id).evicts_copies()
                    // A copy a scrub could not repair is rebuilt elsewhere from the good ones.
                    || (record.damaged_copies.contains(&id) && record.voters.len() > 1)
            })
            .collect();
        let source = record.voters.iter().any(|&id| dir.table.liveness(id, now) != Liveness::Dead);
        if !leaving.is_empty() && !source {
            // A replacement would wait forever for data nobody reachable holds: the volume is
            // unavailable until one of its nodes returns (replicas=0 risks exactly this).
            tracing::warn!(volume = %record.name, voters = ?record.voters, "every copy is on a dead node; nothing to copy from");
            continue;
        }
        for old in leaving {
            let views = dir.views(&volumes.peer_ids());
            let new = match crate::nodes::place(&views, 1, &record.voters, None) {
                Ok(chosen) => chosen[0],
                Err(why) => {
                    tracing::warn!(volume = %record.name, node = old, %why, "cannot replace a copy yet");
                    continue;
                }
            };
            tracing::info!(volume = %record.name, from = old, to = new, "replacing a copy");
            if let Err(e) = volumes.add_replica(&record.name, new, ADD_TIMEOUT).await {
                tracing::warn!(volume = %record.name, to = new, error = %e, "adding the replacement copy failed; will retry");
                break;
            }
            match volumes.remove_replica(&record.name, old, REMOVE_TIMEOUT).await {
                Ok(_) => done.push(format!("{}: node {old} -> node {new}", record.name)),
                Err(e) => {
                    tracing::warn!(volume = %record.name, node = old, error = %e, "removing the replaced copy failed; will retry")
                }
            }
            // The record changed: the next pass sees the new holders.
            break;
        }
    }
    done
}

/// Moves at most one leadership from the node leading the most volumes to a copy holder
/// leading at least two fewer. Returns what it moved.
pub async fn balance_once(volumes: &VolumeManager, dir: &NodeDirectory) -> Option<String> {
    let now = Instant::now();
    let usable = |id: u64| {
        dir.table.liveness(id, now) == Liveness::Alive
            && dir.table.admin(id) == crate::model::AdminState::Active
    };
    let mut records = volumes.records();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    let mut counts: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for id in volumes.peer_ids().into_iter().chain(volumes.node_id()) {
        if usable(id) {
            counts.insert(id, 0);
        }
    }
    let mut leaders = Vec::new();
    for r in &records {
        let (leader, clients) = volumes.leader_and_clients(r).await;
        if leader == 0 {
            return None; // an election is under way: counts would be wrong
        }
        *counts.entry(leader).or_default() += 1;
        leaders.push((r, leader, clients));
    }
    let mut best: Option<(&crate::model::VolumeRecord, u64, u64, usize)> = None;
    for (r, leader, clients) in leaders {
        if clients > 0 {
            continue;
        }
        let from = counts.get(&leader).copied().unwrap_or(0);
        let to = r
            .voters
            .iter()
            .copied()
            .filter(|&v| v != leader && usable(v))
            .min_by_key(|v| (counts.get(v).copied().unwrap_or(0), *v));
        if let Some(to) = to {
            let gap = from.saturating_sub(counts.get(&to).copied().unwrap_or(0));
            if gap >= 2 && best.is_none_or(|b| gap > b.3) {
                best = Some((r, leader, to, gap));
            }
        }
    }
    let (r, from, to, _) = best?;
    match volumes.transfer_leader(&r.name, to).await {
        Ok(()) => Some(format!("{}: node {from} -> node {to} (leader counts {counts:?})", r.name)),
        Err(e) => {
            tracing::debug!(volume = %r.name, to, error = %e, "leader transfer for balance failed");
            None
        }
    }
}

/// How the catalog leader sees every node, for [`crate::cluster_catalog::plan_membership`].
pub fn catalog_candidates(
    volumes: &VolumeManager,
    dir: &NodeDirectory,
) -> Vec<crate::cluster_catalog::Candidate> {
    let now = Instant::now();
    volumes
        .peer_ids()
        .into_iter()
        .chain(volumes.node_id())
        .map(|id| {
            let liveness = dir.table.liveness(id, now);
            let admin = dir.table.admin(id);
            crate::cluster_catalog::Candidate {
                id,
                alive: liveness == Liveness::Alive,
                gone: liveness == Liveness::Dead || admin == crate::model::AdminState::Removed,
                may_vote: !admin.evicts_copies(),
                caught_up: false, // filled in from the leader's progress
            }
        })
        .collect()
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
            catalog.keep_membership(&catalog_candidates(&volumes, &dir)).await;
        }
    }
}

/// Runs [`heal_once`] every [`HEAL_INTERVAL`] while this node is the acting one, until `stop`.
pub async fn heal_loop(
    volumes: Arc<VolumeManager>,
    dir: Arc<NodeDirectory>,
    stop: tokio_util::sync::CancellationToken,
) {
    while pause(&stop, HEAL_INTERVAL).await {
        if !is_acting(&volumes, &dir) {
            continue;
        }
        let healed = heal_once(&volumes, &dir).await;
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
