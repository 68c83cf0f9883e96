//! Talking to a volume's group across the nodes: control messages to one node or all, the
//! group's status as its leader reports it, and membership changes proposed until the leader
//! shows them. Nodes the liveness view calls dead are never waited on.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use raftblk_replication::node::ReplicationNode;
use raftblk_replication::wal::record::GroupId;

use super::{
    lock, VolumeError, VolumeManager, CONTROL_TIMEOUT, INSPECT_TIMEOUT, LEADERLESS_REPORT, MEMBERSHIP_RETRY,
    SUSPECT_CONTROL_TIMEOUT,
};
use crate::control::{self, Answer, ControlError, GroupView, MembershipChange, Request, WaitCondition};
use crate::model::{RebuildView, VolumeRecord};

/// Pause after a wait that could not be asked for, before the caller looks again.
const FAILED_WAIT_PAUSE: Duration = Duration::from_millis(200);

impl VolumeManager {
    /// Sends a control message to node `to`, or answers it here when `to` is this node
    /// (the transport only reaches peers). Only for messages that take no control lock.
    pub(super) async fn send_control(
        &self,
        node: &ReplicationNode,
        to: u64,
        msg: &Request,
    ) -> Result<Answer, ControlError> {
        self.send_control_within(node, to, msg, CONTROL_TIMEOUT).await
    }

    /// [`VolumeManager::send_control`] with its own timeout for a peer's answer.
    pub(super) async fn send_control_within(
        &self,
        node: &ReplicationNode,
        to: u64,
        msg: &Request,
        timeout: Duration,
    ) -> Result<Answer, ControlError> {
        if to != node.node_id().0 {
            return control::send(node, to, msg, timeout).await;
        }
        match Box::pin(self.on_control(msg.clone())).await {
            Answer::Error(e) => Err(ControlError::Refused(e)),
            answer => Ok(answer),
        }
    }

    /// Sends `msg` to every peer at once and returns the errors of the `must` peers. It waits
    /// for those and for every peer not known dead (so the change is everywhere when this
    /// returns); dead peers are told in the background (errors logged: they catch up at their
    /// next sync when they return), so they do not hold up the operation.
    pub(super) async fn broadcast(&self, msg: &Request, must: &[u64]) -> Result<(), VolumeError> {
        let Some(node) = &self.replication else { return Ok(()) };
        let (waited, background): (Vec<u64>, Vec<u64>) = node
            .peer_ids()
            .into_iter()
            .partition(|&p| must.contains(&p) || self.peer_timeout(node, p).is_some());
        for peer in background {
            let (node, msg) = (node.clone(), msg.clone());
            tokio::spawn(async move {
                if let Err(e) = control::send(&node, peer, &msg, CONTROL_TIMEOUT).await {
                    tracing::warn!(peer, error = %e, "peer did not confirm; it will catch up at its next sync");
                }
            });
        }
        let sends = waited
            .into_iter()
            .map(|peer| async move { (peer, control::send(node, peer, msg, CONTROL_TIMEOUT).await) });
        let mut missing = Vec::new();
        for (peer, result) in futures::future::join_all(sends).await {
            match result {
                Err(e) if must.contains(&peer) => missing.push(format!("node {peer}: {e}")),
                Err(e) => {
                    tracing::warn!(peer, error = %e, "peer did not confirm; it will catch up at its next sync")
                }
                Ok(_) => {}
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(VolumeError::Unavailable(format!("nodes did not confirm: {}", missing.join("; "))))
        }
    }

    /// The group's status as its leader reports it (retrying until a leader answers).
    pub(super) async fn leader_status(
        &self,
        record: &VolumeRecord,
        deadline: std::time::Instant,
    ) -> Result<(u64, GroupView), VolumeError> {
        let Some(node) = &self.replication else {
            return Err(VolumeError::Invalid("not in a cluster".into()));
        };
        let msg = Request::GroupStatus { group_id: record.group_id };
        let mut hints: Vec<u64> = Vec::new();
        let mut reported = std::time::Instant::now();
        loop {
            // The leader this node knows of may be stale (on a node that holds no copy it is
            // only the last one a forwarded request met, and may be dead), so every voter is
            // asked too.
            let known = node.leader(GroupId(record.group_id));
            let mut candidates: Vec<u64> = record.voters.clone();
            candidates.extend(Some(known).filter(|&k| k != 0));
            candidates.append(&mut hints);
            candidates.sort_unstable();
            candidates.dedup();
            // Every candidate at once, and none known dead: a dead voter would cost a whole
            // timeout per call, and a replacement asks for the leader several times.
            let asks = candidates.iter().filter_map(|&c| {
                let timeout = self.peer_timeout(node, c)?;
                let msg = &msg;
                Some(async move { (c, self.send_control_within(node, c, msg, timeout).await) })
            });
            let mut heard = Vec::new();
            for (c, answer) in futures::future::join_all(asks).await {
                match answer {
                    Ok(Answer::Status(view)) if view.leader == c => return Ok((c, view)),
                    // A follower's idea of the leader is asked next, at once.
                    Ok(Answer::Status(view)) if view.leader != 0 && !candidates.contains(&view.leader) => {
                        heard.push(format!("node {c}: leader {}", view.leader));
                        hints.push(view.leader)
                    }
                    Ok(Answer::Status(view)) => heard.push(format!("node {c}: leader {}", view.leader)),
                    Ok(other) => heard.push(format!("node {c}: {other:?}")),
                    Err(e) => heard.push(format!("node {c}: {e}")),
                }
            }
            if reported.elapsed() >= LEADERLESS_REPORT {
                reported = std::time::Instant::now();
                tracing::warn!(volume = %record.name, voters = ?record.voters, ?candidates, ?heard, "still looking for the volume's leader");
            }
            if std::time::Instant::now() >= deadline {
                return Err(VolumeError::Unavailable(format!(
                    "volume {:?} has no leader right now; retry shortly",
                    record.name
                )));
            }
            if hints.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// How long to wait for node `id`'s answer: `None` for a node the liveness view calls
    /// dead (do not ask), [`SUSPECT_CONTROL_TIMEOUT`] for one not heard from lately.
    pub(super) fn peer_timeout(&self, node: &ReplicationNode, id: u64) -> Option<Duration> {
        if id == node.node_id().0 {
            return Some(CONTROL_TIMEOUT);
        }
        let Some(dir) = self.nodes.get() else { return Some(CONTROL_TIMEOUT) };
        match dir.table.liveness(id, std::time::Instant::now()) {
            crate::model::Liveness::Dead => None,
            crate::model::Liveness::Suspect => Some(SUSPECT_CONTROL_TIMEOUT),
            crate::model::Liveness::Alive => Some(CONTROL_TIMEOUT),
        }
    }

    pub(super) async fn propose_membership(
        &self,
        record: &VolumeRecord,
        change: MembershipChange,
        target: u64,
        deadline: std::time::Instant,
    ) -> Result<(), VolumeError> {
        let Some(node) = &self.replication else {
            return Err(VolumeError::Invalid("not in a cluster".into()));
        };
        let took_effect = |g: &GroupView| change.took_effect(target, &g.voters, &g.learners);
        // raft-rs drops a configuration change proposed while another is still being applied
        // (it commits an empty entry instead), so a proposal is repeated until the leader
        // reports the change.
        loop {
            let (leader, status) = self.leader_status(record, deadline).await?;
            if took_effect(&status) {
                return Ok(());
            }
            let msg = Request::Membership { group_id: record.group_id, change, node: target };
            let sent = self.send_control(node, leader, &msg).await;
            if let Err(e) = &sent {
                if std::time::Instant::now() >= deadline {
                    return Err(VolumeError::Unavailable(format!(
                        "membership change {change} {target} failed: {e}"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            // The leader answers once the change shows (or it stops leading); a change still
            // missing after MEMBERSHIP_RETRY is proposed again at the top.
            let until = WaitCondition::Changed { change, node: target };
            self.wait_at(leader, record.group_id, until, deadline.min(Instant::now() + MEMBERSHIP_RETRY))
                .await;
            if self.leader_status(record, deadline).await.is_ok_and(|(_, s)| took_effect(&s)) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(VolumeError::Unavailable(format!(
                    "membership change {change} {target} has not taken effect yet; retry"
                )));
            }
        }
    }

    /// `GroupStatus` answers of the nodes `ids` for `group_id`, asked all at once (this node
    /// answers locally); nodes known dead are not asked, and nodes that do not answer within
    /// [`INSPECT_TIMEOUT`] are left out.
    pub(super) async fn group_statuses(&self, group_id: u64, ids: &[u64]) -> Vec<(u64, GroupView)> {
        let Some(node) = &self.replication else { return Vec::new() };
        let msg = Request::GroupStatus { group_id };
        let asks = ids.iter().filter(|&&id| self.peer_timeout(node, id).is_some()).map(|&id| {
            let msg = &msg;
            async move {
                match self.send_control_within(node, id, msg, INSPECT_TIMEOUT).await {
                    Ok(Answer::Status(view)) => Some((id, view)),
                    _ => None,
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// The volume's leader (0: none agreed) and its NBD connections summed over the nodes
    /// holding a copy.
    pub async fn leader_and_clients(&self, record: &VolumeRecord) -> (u64, usize) {
        let answers: Vec<(u64, u64, usize)> = self
            .group_statuses(record.group_id, &record.voters)
            .await
            .into_iter()
            .map(|(id, g)| (id, g.leader, g.connections))
            .collect();
        let leader = answers.iter().find(|(id, leader, _)| id == leader).map_or(0, |a| a.0);
        (leader, answers.iter().map(|a| a.2).sum())
    }

    /// Whether `target`'s copy of the volume is still being copied from a snapshot (or cannot
    /// say): a copy whose log caught up may still lack the data, and promoting it (or, in a
    /// move, removing the copy it pulls from) before it has it would lose the volume.
    pub(super) async fn rebuilding(&self, record: &VolumeRecord, target: u64) -> bool {
        let Some(node) = &self.replication else { return false };
        let msg = Request::GroupStatus { group_id: record.group_id };
        !matches!(
            self.send_control(node, target, &msg).await,
            Ok(Answer::Status(view)) if WaitCondition::Copied.holds(target, &view)
        )
    }

    /// Group `group_id` as this node sees it (the answer to `GroupStatus`).
    pub(super) fn group_view(&self, node: &ReplicationNode, group_id: u64) -> GroupView {
        let connections = lock(&self.open)
            .values()
            .find(|v| lock(&v.record).group_id == group_id)
            .map_or(0, |v| v.connections.load(Ordering::SeqCst));
        match node.status(GroupId(group_id)) {
            Some(s) => GroupView {
                leader: s.leader,
                commit_index: s.commit_index,
                voters: s.voters,
                learners: s.learners,
                progress: s.progress,
                rebuild: s.rebuild.as_ref().map(|r| RebuildView::from_status(node.node_id().0, r)),
                connections,
            },
            None => GroupView { leader: node.leader(GroupId(group_id)), connections, ..GroupView::default() },
        }
    }

    /// The group's view once `until` holds here, or after `wait`: woken by the replication
    /// node's status changes, not by polling.
    pub(super) async fn wait_group_view(
        &self,
        node: &ReplicationNode,
        group_id: u64,
        until: WaitCondition,
        wait: Duration,
    ) -> GroupView {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changes = node.status_changes();
        loop {
            changes.borrow_and_update();
            let view = self.group_view(node, group_id);
            if until.holds(node.node_id().0, &view) {
                return view;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.group_view(node, group_id),
            }
        }
    }

    /// Waits (at most until `deadline`, and at most [`control::WAIT_GROUP_MAX_MS`]) for
    /// `until` to hold at node `at`. Whatever the answer, the caller looks at the group again;
    /// a node that cannot be asked costs a short pause instead of a busy loop.
    pub(super) async fn wait_at(&self, at: u64, group_id: u64, until: WaitCondition, deadline: Instant) {
        let Some(node) = &self.replication else { return };
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(Duration::from_millis(control::WAIT_GROUP_MAX_MS));
        let Some(timeout) = self.peer_timeout(node, at) else {
            return tokio::time::sleep(wait.min(FAILED_WAIT_PAUSE)).await;
        };
        let msg = Request::WaitGroup { group_id, until, timeout_ms: wait.as_millis() as u64 };
        let started = Instant::now();
        if self.send_control_within(node, at, &msg, wait + timeout).await.is_err() {
            // An error that came at once (a peer that does not know the request, say)
            // would make the caller spin.
            tokio::time::sleep(FAILED_WAIT_PAUSE.saturating_sub(started.elapsed()).min(left)).await;
        }
    }
}
