//! The steps that add a copy of a volume on a node or remove one, as a pure function of what
//! the caller saw last: the volume's record, its group as the leader reports it, and (when
//! asked for) whether the new copy has all the data yet.
//!
//! The loop that carries the steps out (`volumes/replicas.rs`) observes, asks [`next_step`],
//! does that one step and observes again. Nothing is remembered between steps, so a step
//! that was lost (a configuration change raft-rs dropped, a leader that changed, a node that
//! restarted the command) is planned again from what the group shows.
//!
//! Order matters for safety:
//! * adding: the record first (so the new node opens a copy before its group sends it
//!   anything), then the learner, then promotion only once the learner's log has caught up
//!   *and* its copy is no longer being copied from a snapshot (a voter without the data
//!   could form a majority that lost writes);
//! * removing: leadership moves off the copy first, then the member goes, and the record
//!   last (a record without the node while the group still counts its vote would let the
//!   planner think the volume is short of a copy it still has).

use crate::model::{GroupView, MembershipChange, VolumeRecord, REPLICAS_MAX};

/// How far (in log entries) a learner may trail the commit index and still be promoted.
pub const CAUGHT_UP_SLACK: u64 = 16;

/// Most copies a volume may have while one is being replaced: one above the most a volume
/// asks for, because a replacement adds the new copy before the old one goes.
pub const COPIES_MAX: usize = REPLICAS_MAX as usize + 2;

/// What the command is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// A copy on this node.
    Add(u64),
    /// No copy on this node.
    Remove(u64),
}

impl Goal {
    /// The node the command is about.
    pub fn target(self) -> u64 {
        match self {
            Goal::Add(t) | Goal::Remove(t) => t,
        }
    }
}

/// What the caller saw, freshly, before asking for the next step.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// The volume's record as this node holds it.
    pub record: &'a VolumeRecord,
    /// The group as its leader reports it (`leader` is the one that answered).
    pub group: &'a GroupView,
    /// Whether the target's copy has every block: `None` until asked (see [`Step::AskCopied`]).
    pub copied: Option<bool>,
}

/// The one thing to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Store this record (the next generation) in the catalog and spread it.
    CommitRecord(Box<VolumeRecord>),
    /// Ask the leader for this change to the target's membership and wait for it.
    Propose(MembershipChange),
    /// Ask the leader (the target) to hand leadership to `to`, then look again.
    MoveLeader {
        /// The copy holder to lead next.
        to: u64,
    },
    /// The learner's log trails the leader's: wait at the leader until it catches up.
    WaitCaughtUp {
        /// The learner's matched index.
        matched: u64,
        /// The leader's commit index.
        commit: u64,
    },
    /// The learner's log is there but its copy is still being copied from a snapshot: wait
    /// at the learner until it has the data.
    WaitCopied,
    /// The group and the record disagree in a way no step mends (the target is the group's
    /// only voter, yet the record names others): refuse, saying so.
    Blocked(String),
    /// The learner's log has caught up: ask the target whether its copy has all the data,
    /// and ask again with [`Seen::copied`] set.
    AskCopied,
    /// The goal holds.
    Done,
}

/// Why a command is refused before it starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The target already votes in the group.
    #[error("node {node} already holds a voting copy of {volume:?}")]
    AlreadyVoter {
        /// The volume.
        volume: String,
        /// The target.
        node: u64,
    },
    /// No room for another copy.
    #[error("volume {volume:?} already has the most copies allowed ({})", REPLICAS_MAX + 1)]
    TooMany {
        /// The volume.
        volume: String,
    },
    /// The target holds no copy to remove.
    #[error("node {node} holds no copy of {volume:?}; copies are on {copies:?}")]
    NoCopy {
        /// The volume.
        volume: String,
        /// The target.
        node: u64,
        /// Where the copies are.
        copies: Vec<u64>,
    },
    /// Removing the target would leave no copy.
    #[error("node {node} holds the only copy of {volume:?}; delete the volume instead")]
    OnlyCopy {
        /// The volume.
        volume: String,
        /// The target.
        node: u64,
    },
}

/// Whether a copy may be added on `node`, given the record and the group as first seen.
pub fn check_add(record: &VolumeRecord, group: &GroupView, node: u64) -> Result<(), Refusal> {
    let volume = record.name.clone();
    if group.voters.contains(&node) {
        return Err(Refusal::AlreadyVoter { volume, node });
    }
    // A record that already names the node is a command run again: it goes on.
    if !record.voters.contains(&node) && record.voters.len() >= COPIES_MAX {
        return Err(Refusal::TooMany { volume });
    }
    Ok(())
}

/// Whether `node`'s copy may be removed, given the record (no group needed: a volume
/// without a leader is refused at once, not after a wait).
pub fn check_remove(record: &VolumeRecord, node: u64) -> Result<(), Refusal> {
    let volume = record.name.clone();
    if !record.voters.contains(&node) {
        return Err(Refusal::NoCopy { volume, node, copies: record.voters.clone() });
    }
    if record.voters.len() == 1 {
        return Err(Refusal::OnlyCopy { volume, node });
    }
    Ok(())
}

/// The next step towards `goal` from what was `seen`.
pub fn next_step(goal: Goal, seen: &Seen<'_>) -> Step {
    let Seen { record, group, copied } = *seen;
    let target = goal.target();
    let voter = group.voters.contains(&target);
    let learner = group.learners.contains(&target);
    match goal {
        Goal::Add(_) if !record.voters.contains(&target) => {
            let mut next = record.clone();
            next.voters.push(target);
            next.replicas = (next.voters.len() - 1) as u8;
            next.generation += 1;
            Step::CommitRecord(Box::new(next))
        }
        Goal::Add(_) if voter => Step::Done,
        Goal::Add(_) if !learner => Step::Propose(MembershipChange::AddLearner),
        Goal::Add(_) => {
            let commit = group.commit_index;
            if !group.caught_up(target, CAUGHT_UP_SLACK) {
                return Step::WaitCaughtUp { matched: group.matched(target), commit };
            }
            match copied {
                None => Step::AskCopied,
                Some(false) => Step::WaitCopied,
                Some(true) => Step::Propose(MembershipChange::Promote),
            }
        }
        Goal::Remove(_) if voter || learner => {
            if group.leader == target {
                match group.voters.iter().copied().find(|&n| n != target) {
                    Some(to) => Step::MoveLeader { to },
                    None => Step::Blocked(format!(
                        "node {target} is the only voter of {:?}'s group although its record names {:?}",
                        record.name, record.voters
                    )),
                }
            } else {
                Step::Propose(MembershipChange::Remove)
            }
        }
        Goal::Remove(_) if record.voters.contains(&target) => {
            let mut next = record.clone();
            next.voters.retain(|&n| n != target);
            // A damaged copy that is gone no longer degrades the volume (and a new copy on
            // that node later starts clean).
            next.damaged_copies.retain(|&n| n != target);
            next.replicas = next.voters.len().saturating_sub(1) as u8;
            next.generation += 1;
            Step::CommitRecord(Box::new(next))
        }
        Goal::Remove(_) => Step::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(voters: &[u64]) -> VolumeRecord {
        VolumeRecord {
            name: "v".into(),
            voters: voters.to_vec(),
            replicas: (voters.len() - 1) as u8,
            generation: 5,
            ..VolumeRecord::default()
        }
    }

    fn group(
        leader: u64,
        voters: &[u64],
        learners: &[u64],
        commit: u64,
        progress: &[(u64, u64)],
    ) -> GroupView {
        GroupView {
            leader,
            commit_index: commit,
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            progress: progress.to_vec(),
            ..GroupView::default()
        }
    }

    fn step(goal: Goal, r: &VolumeRecord, g: &GroupView, copied: Option<bool>) -> Step {
        next_step(goal, &Seen { record: r, group: g, copied })
    }

    #[test]
    fn adding_commits_the_record_first_then_a_learner() {
        let r = record(&[1, 2]);
        let g = group(1, &[1, 2], &[], 100, &[(1, 100), (2, 100)]);
        let Step::CommitRecord(next) = step(Goal::Add(3), &r, &g, None) else { panic!("record first") };
        assert_eq!((next.voters, next.replicas, next.generation), (vec![1, 2, 3], 2, 6));
        let r = record(&[1, 2, 3]);
        assert_eq!(step(Goal::Add(3), &r, &g, None), Step::Propose(MembershipChange::AddLearner));
    }

    #[test]
    fn a_learner_is_promoted_only_when_its_log_and_its_data_are_there() {
        let r = record(&[1, 2, 3]);
        let lagging = group(1, &[1, 2], &[3], 100, &[(1, 100), (2, 100), (3, 83)]);
        assert_eq!(
            step(Goal::Add(3), &r, &lagging, Some(true)),
            Step::WaitCaughtUp { matched: 83, commit: 100 }
        );
        let near = group(1, &[1, 2], &[3], 100, &[(1, 100), (2, 100), (3, 84)]);
        assert_eq!(step(Goal::Add(3), &r, &near, None), Step::AskCopied);
        assert_eq!(step(Goal::Add(3), &r, &near, Some(false)), Step::WaitCopied);
        assert_eq!(step(Goal::Add(3), &r, &near, Some(true)), Step::Propose(MembershipChange::Promote));
        // The leader reports no progress for a node it does not know yet.
        let unknown = group(1, &[1, 2], &[3], 100, &[(1, 100)]);
        assert_eq!(
            step(Goal::Add(3), &r, &unknown, Some(true)),
            Step::WaitCaughtUp { matched: 0, commit: 100 }
        );
        let voter = group(1, &[1, 2, 3], &[], 100, &[]);
        assert_eq!(step(Goal::Add(3), &r, &voter, None), Step::Done);
    }

    #[test]
    fn removing_moves_leadership_off_then_the_member_then_the_record() {
        let r = VolumeRecord { damaged_copies: vec![3], ..record(&[1, 2, 3]) };
        let led = group(3, &[1, 2, 3], &[], 50, &[]);
        assert_eq!(step(Goal::Remove(3), &r, &led, None), Step::MoveLeader { to: 1 });
        let g = group(1, &[1, 2, 3], &[], 50, &[]);
        assert_eq!(step(Goal::Remove(3), &r, &g, None), Step::Propose(MembershipChange::Remove));
        let as_learner = group(1, &[1, 2], &[3], 50, &[]);
        assert_eq!(step(Goal::Remove(3), &r, &as_learner, None), Step::Propose(MembershipChange::Remove));
        let gone = group(1, &[1, 2], &[], 50, &[]);
        let Step::CommitRecord(next) = step(Goal::Remove(3), &r, &gone, None) else { panic!("record last") };
        assert_eq!((next.voters, next.replicas, next.generation), (vec![1, 2], 1, 6));
        assert!(next.damaged_copies.is_empty(), "the damaged copy went with the node");
        assert_eq!(step(Goal::Remove(3), &record(&[1, 2]), &gone, None), Step::Done);
        let alone = group(3, &[3], &[], 50, &[]);
        assert!(matches!(step(Goal::Remove(3), &r, &alone, None), Step::Blocked(_)));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let g = group(1, &[1, 2], &[], 1, &[]);
        assert!(matches!(check_add(&record(&[1, 2]), &g, 2), Err(Refusal::AlreadyVoter { node: 2, .. })));
        assert!(check_add(&record(&[1, 2]), &g, 3).is_ok());
        // A record that already names the target (a command run again) may go on.
        assert!(check_add(&record(&[1, 2, 3]), &g, 3).is_ok());
        let full: Vec<u64> = (1..=COPIES_MAX as u64).collect();
        assert!(matches!(check_add(&record(&full), &g, 99), Err(Refusal::TooMany { .. })));
        let one_short: Vec<u64> = (1..COPIES_MAX as u64).collect();
        assert!(check_add(&record(&one_short), &g, 99).is_ok(), "a replacement may add one above the most");
        assert!(matches!(check_remove(&record(&[1, 2]), 3), Err(Refusal::NoCopy { node: 3, .. })));
        assert!(matches!(check_remove(&record(&[1]), 1), Err(Refusal::OnlyCopy { node: 1, .. })));
        assert!(check_remove(&record(&[1, 2]), 2).is_ok());
        let text = check_remove(&record(&[1]), 1).unwrap_err().to_string();
        assert!(text.contains("delete the volume instead"), "{text}");
    }

    /// A model of a volume's record and group that carries out steps, some of them lost, for
    /// checking that the steps reach their goal from anywhere and never break a rule on the
    /// way.
    #[derive(Debug, Clone)]
    struct World {
        record: VolumeRecord,
        group: GroupView,
        /// Steps until the target's copy has all the data (a snapshot copy is running; it
        /// ends a few steps after the log caught up, as a real one does).
        copying: u32,
    }

    impl World {
        /// Carries out `step`; `lose` drops it (the membership change that raft-rs threw
        /// away, a record write that timed out). Time passes: the learner catches up a bit.
        fn carry_out(&mut self, step: &Step, target: u64, lose: bool) {
            if let Some(p) = self.group.progress.iter_mut().find(|p| p.0 == target) {
                if p.1 == self.group.commit_index {
                    self.copying = self.copying.saturating_sub(1);
                }
                p.1 = (p.1 + 40).min(self.group.commit_index);
            }
            if lose {
                return;
            }
            match step {
                Step::CommitRecord(r) => self.record = (**r).clone(),
                Step::Propose(MembershipChange::AddLearner) => {
                    self.group.learners.push(target);
                    self.group.progress.push((target, 0));
                }
                Step::Propose(MembershipChange::Promote) => {
                    self.group.learners.retain(|&n| n != target);
                    self.group.voters.push(target);
                }
                Step::Propose(MembershipChange::Remove) => {
                    self.group.learners.retain(|&n| n != target);
                    self.group.voters.retain(|&n| n != target);
                    self.group.progress.retain(|p| p.0 != target);
                }
                Step::MoveLeader { to } => self.group.leader = *to,
                Step::WaitCaughtUp { .. }
                | Step::WaitCopied
                | Step::AskCopied
                | Step::Blocked(_)
                | Step::Done => {}
            }
        }
    }

    /// Runs `goal` in `world` with every `lose_every`-th step lost, checking the rules after
    /// each step; returns the steps taken.
    fn run(goal: Goal, mut world: World, lose_every: usize) -> Vec<Step> {
        let target = goal.target();
        let mut steps = Vec::new();
        for i in 0..100 {
            let seen = Seen { record: &world.record, group: &world.group, copied: None };
            let mut s = next_step(goal, &seen);
            if s == Step::AskCopied {
                let seen = Seen { copied: Some(world.copying == 0), ..seen };
                s = next_step(goal, &seen);
            }
            if s == Step::Done {
                return steps;
            }
            if s == Step::Propose(MembershipChange::Promote) {
                assert_eq!(world.copying, 0, "promoted a copy that lacks data: {world:?}");
            }
            if s == Step::Propose(MembershipChange::Remove) {
                assert_ne!(world.group.leader, target, "removed the leader: {world:?}");
            }
            world.carry_out(&s, target, lose_every > 0 && i % lose_every == lose_every - 1);
            // The record never lacks a node the group counts as a voter.
            for v in &world.group.voters {
                assert!(world.record.voters.contains(v), "record {:?} lacks voter {v}", world.record.voters);
            }
            steps.push(s);
        }
        panic!("{goal:?} never finished: {world:?}, steps {steps:?}")
    }

    #[test]
    fn steps_reach_the_goal_from_every_state_and_with_lost_steps() {
        let base = World {
            record: record(&[1, 2]),
            group: group(1, &[1, 2], &[], 200, &[(1, 200), (2, 200)]),
            copying: 3,
        };
        // Every state an add passes through is a valid place to start again (a node that
        // restarted the command halfway), and losing steps only takes longer.
        let path = run(Goal::Add(3), base.clone(), 0);
        assert_eq!(path.first(), Some(&Step::CommitRecord(Box::new(next_record(&base.record, 3)))));
        assert_eq!(path.last(), Some(&Step::Propose(MembershipChange::Promote)));
        let mut w = base.clone();
        for (i, s) in path.iter().enumerate() {
            for lose_every in [0, 2, 3] {
                let again = run(Goal::Add(3), w.clone(), lose_every);
                assert_eq!(again.last(), Some(&Step::Propose(MembershipChange::Promote)), "from step {i}");
            }
            w.carry_out(s, 3, false);
        }
        assert!(w.group.voters.contains(&3) && w.record.voters.contains(&3));
        // Removing the copy again, from the leader, with steps lost.
        let mut led = w.clone();
        led.group.leader = 3;
        for lose_every in [0, 2, 3] {
            let path = run(Goal::Remove(3), led.clone(), lose_every);
            assert_eq!(path.first(), Some(&Step::MoveLeader { to: 1 }));
            assert!(matches!(path.last(), Some(Step::CommitRecord(r)) if r.voters == vec![1, 2]));
        }
    }

    fn next_record(r: &VolumeRecord, node: u64) -> VolumeRecord {
        let mut next = r.clone();
        next.voters.push(node);
        next.replicas += 1;
        next.generation += 1;
        next
    }
}
