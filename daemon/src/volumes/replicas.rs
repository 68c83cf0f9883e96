//! Adding and removing a volume's copies: the loop that carries out
//! [`crate::planner::replica`]'s steps. Each turn reads the record, asks the group's leader
//! for its view, takes the one step the planner names and looks again; so a command that was
//! cut short (a timeout, a restart, a dropped configuration change) is simply run again.
//! Waits are `WaitGroup` requests to the node that will see the change (the leader, or the
//! new copy), answered when it shows: nothing here sleeps and polls.

use std::time::{Duration, Instant};

use super::{lock, VolumeError, VolumeManager, VolumeStatus};
use crate::control::Request;
use crate::model::{GroupView, WaitCondition};
use crate::planner::replica::{self, Goal, Seen, Step};

impl VolumeManager {
    /// Adds a copy of `name` on `node`: the node joins as a learner, receives the log,
    /// and is promoted to voter once it has caught up.
    pub async fn add_replica(
        &self,
        name: &str,
        target: u64,
        timeout: Duration,
    ) -> Result<VolumeStatus, VolumeError> {
        let Some(node) = &self.replication else {
            return Err(VolumeError::Invalid("this node runs alone; replicas need a cluster".into()));
        };
        let mut known = node.peer_ids();
        known.push(node.node_id().0);
        if !known.contains(&target) {
            return Err(VolumeError::Invalid(format!(
                "node {target} is not in the cluster; nodes are {known:?}"
            )));
        }
        self.change_replicas(name, Goal::Add(target), timeout).await
    }

    /// Removes the copy of `name` on `node` (leadership moves away first if it leads).
    pub async fn remove_replica(
        &self,
        name: &str,
        target: u64,
        timeout: Duration,
    ) -> Result<VolumeStatus, VolumeError> {
        if self.replication.is_none() {
            return Err(VolumeError::Invalid("this node runs alone; there are no replicas to remove".into()));
        }
        let record = lock(&self.get(name)?.record).clone();
        replica::check_remove(&record, target).map_err(|e| VolumeError::Invalid(e.to_string()))?;
        self.change_replicas(name, Goal::Remove(target), timeout).await
    }

    /// Takes the planner's steps towards `goal` until it holds or `timeout` passes.
    async fn change_replicas(
        &self,
        name: &str,
        goal: Goal,
        timeout: Duration,
    ) -> Result<VolumeStatus, VolumeError> {
        let deadline = Instant::now() + timeout;
        let target = goal.target();
        let mut checked = false;
        loop {
            // Looking for the leader (minutes, if the copies are on dead nodes) holds no
            // lock: every other volume operation on this node would wait behind it. The
            // volume is looked up each time: a change of copies reopens it.
            let record = lock(&self.get(name)?.record).clone();
            let (_, group) = self.leader_status(&record, deadline).await?;
            if let (Goal::Add(_), false) = (goal, checked) {
                replica::check_add(&record, &group, target)
                    .map_err(|e| VolumeError::Invalid(e.to_string()))?;
            }
            checked = true;
            let seen = Seen { record: &record, group: &group, copied: None };
            let mut step = replica::next_step(goal, &seen);
            if step == Step::AskCopied {
                let copied = !self.rebuilding(&record, target).await;
                step = replica::next_step(goal, &Seen { copied: Some(copied), ..seen });
            }
            match step {
                Step::Done => return self.status(name),
                Step::CommitRecord(_) => self.commit_replica_record(name, goal, &group).await?,
                Step::Propose(change) => {
                    self.propose_membership(&record, change, target, deadline).await?;
                    tracing::info!(volume = name, node = target, %change, "membership change took effect");
                }
                Step::MoveLeader { to } => {
                    if Instant::now() >= deadline {
                        return Err(VolumeError::Unavailable(format!(
                            "node {target} still leads {name:?}; retry to remove its copy"
                        )));
                    }
                    if let Some(node) = &self.replication {
                        let msg = Request::TransferLeader { group_id: record.group_id, to };
                        let _ = self.send_control(node, group.leader, &msg).await;
                    }
                    self.wait_at(
                        group.leader,
                        record.group_id,
                        WaitCondition::LeaderNot { node: target },
                        deadline,
                    )
                    .await;
                }
                Step::WaitCaughtUp { .. } => {
                    let until = WaitCondition::CaughtUp { node: target, slack: replica::CAUGHT_UP_SLACK };
                    self.wait_for_new_copy(name, target, group.leader, record.group_id, until, deadline)
                        .await?
                }
                // (`AskCopied` was answered above; it cannot come back.)
                Step::WaitCopied | Step::AskCopied => {
                    let until = WaitCondition::Copied;
                    self.wait_for_new_copy(name, target, target, record.group_id, until, deadline).await?
                }
                Step::Blocked(why) => return Err(VolumeError::Unavailable(why)),
            }
        }
    }

    /// Waits at node `at` for the new copy on `target` to get further (`until`), or refuses
    /// once `deadline` has passed.
    async fn wait_for_new_copy(
        &self,
        name: &str,
        target: u64,
        at: u64,
        group_id: u64,
        until: WaitCondition,
        deadline: Instant,
    ) -> Result<(), VolumeError> {
        if Instant::now() >= deadline {
            return Err(VolumeError::Unavailable(format!(
                "node {target} is still catching up on {name:?}; run the same command again to keep waiting and promote it"
            )));
        }
        self.wait_at(at, group_id, until, deadline).await;
        Ok(())
    }

    /// Commits the record the planner asks for, planned again under the control lock from
    /// the record as it is then (another operation may have changed it meanwhile), and
    /// spreads it: a new copy's node must have it before its group sends it anything.
    async fn commit_replica_record(
        &self,
        name: &str,
        goal: Goal,
        group: &GroupView,
    ) -> Result<(), VolumeError> {
        let _control = self.control.lock().await;
        let record = lock(&self.get(name)?.record).clone();
        let Step::CommitRecord(next) =
            replica::next_step(goal, &Seen { record: &record, group, copied: None })
        else {
            return Ok(());
        };
        let next = *next;
        self.commit_change(&next, record.generation).await?;
        self.upsert_locked(next.clone(), false).await?;
        match goal {
            Goal::Add(target) => self.broadcast(&Request::Upsert(next), &[target]).await,
            Goal::Remove(target) => {
                tracing::info!(volume = %next.name, node = target, "copy removed");
                // Peers that miss it follow their catalog replica (errors are logged).
                let _ = self.broadcast(&Request::Upsert(next), &[]).await;
                Ok(())
            }
        }
    }
}
