//! Which copies to replace: for every volume at once, the copy on a dead, draining or
//! removed node (or one a scrub could not repair) and the node its replacement goes to.

use std::collections::BTreeMap;

use super::placement::place_with_load;
use super::state_of;
use crate::model::{Liveness, NodeView, VolumeRecord};

/// One copy to replace: add a copy of `volume` on `to`, then remove the one on `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// The volume.
    pub volume: String,
    /// The node whose copy goes.
    pub from: u64,
    /// The node that gets the new copy.
    pub to: u64,
}

/// A volume with a copy to replace that cannot be replaced now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    /// The volume.
    pub volume: String,
    /// Why (for the log).
    pub why: String,
}

/// What a healing pass does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealPlan {
    /// At most one per volume (its record changes with each), by volume name.
    pub replacements: Vec<Replacement>,
    /// Volumes that need a replacement nobody can take or copy from.
    pub stuck: Vec<Stuck>,
}

/// The copies of `record` that must move.
pub fn leaving(record: &VolumeRecord, nodes: &[NodeView]) -> Vec<u64> {
    record
        .voters
        .iter()
        .copied()
        .filter(|&id| {
            let (liveness, admin) = state_of(nodes, id);
            liveness == Liveness::Dead
                || admin.evicts_copies()
                // A copy a scrub could not repair is rebuilt elsewhere from the good ones.
                || (record.damaged_copies.contains(&id) && record.voters.len() > 1)
        })
        .collect()
}

/// One replacement per volume that needs one, placed so that the new copies of one pass
/// spread over the nodes (each placed copy counts against its node for the next volume).
pub fn plan_heal(records: &[VolumeRecord], nodes: &[NodeView]) -> HealPlan {
    let mut plan = HealPlan::default();
    let mut load: BTreeMap<u64, usize> = BTreeMap::new();
    let mut records: Vec<&VolumeRecord> = records.iter().collect();
    records.sort_by(|a, b| a.name.cmp(&b.name));
    for record in records {
        let leaving = leaving(record, nodes);
        if leaving.is_empty() {
            continue;
        }
        let live = record.voters.iter().filter(|&&id| state_of(nodes, id).0 != Liveness::Dead).count();
        if live == 0 {
            // A replacement would wait forever for data nobody reachable holds: the volume is
            // unavailable until one of its nodes returns (replicas=0 risks exactly this).
            plan.stuck.push(Stuck {
                volume: record.name.clone(),
                why: format!("every copy is on a dead node ({:?}); nothing to copy from", record.voters),
            });
            continue;
        }
        if live * 2 <= record.voters.len() {
            // Adding a copy is a membership change, which needs a majority of the voters:
            // trying would only wait until one of the dead nodes returns.
            plan.stuck.push(Stuck {
                volume: record.name.clone(),
                why: format!(
                    "only {live} of its {} copies ({:?}) are on live nodes, not a majority; it waits for one to return",
                    record.voters.len(),
                    record.voters
                ),
            });
            continue;
        }
        let mut why = None;
        for &from in &leaving {
            match place_with_load(nodes, 1, &record.voters, None, &load) {
                Ok(chosen) => {
                    let to = chosen[0];
                    *load.entry(to).or_default() += 1;
                    plan.replacements.push(Replacement { volume: record.name.clone(), from, to });
                    why = None;
                    break;
                }
                Err(e) => why = Some(format!("cannot replace the copy on node {from}: {e}")),
            }
        }
        if let Some(why) = why {
            plan.stuck.push(Stuck { volume: record.name.clone(), why });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AdminState::{self, *};
    use crate::model::Liveness::*;
    use crate::planner::view;

    fn record(name: &str, voters: &[u64]) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            voters: voters.to_vec(),
            replicas: voters.len() as u8 - 1,
            ..Default::default()
        }
    }

    fn cluster(states: &[(u64, Liveness, AdminState)]) -> Vec<NodeView> {
        states.iter().map(|&(id, l, a)| view(id, l, a)).collect()
    }

    #[test]
    fn copies_on_dead_draining_and_removed_nodes_and_damaged_copies_leave() {
        let nodes = cluster(&[
            (1, Alive, Active),
            (2, Dead, Active),
            (3, Alive, Draining),
            (4, Alive, Removed),
            (5, Alive, Cordoned),
            (6, Suspect, Active),
        ]);
        assert_eq!(
            leaving(&record("v", &[1, 2, 3, 4, 5, 6]), &nodes),
            vec![2, 3, 4],
            "cordoned and suspect stay"
        );
        let mut damaged = record("d", &[1, 5]);
        damaged.damaged_copies = vec![5];
        assert_eq!(leaving(&damaged, &nodes), vec![5]);
        let mut only = record("o", &[1]);
        only.damaged_copies = vec![1];
        assert!(leaving(&only, &nodes).is_empty(), "the only copy, damaged, has nothing to be rebuilt from");
    }

    #[test]
    fn a_dead_nodes_copies_spread_over_the_others() {
        let nodes = cluster(&[
            (1, Alive, Active),
            (2, Alive, Active),
            (3, Dead, Active),
            (4, Alive, Active),
            (5, Alive, Active),
        ]);
        let records: Vec<VolumeRecord> = (0..20)
            .map(|i| {
                let other = [1, 2, 4, 5][i % 4];
                let another = [2, 4, 5, 1][i % 4];
                record(&format!("v{i:02}"), &[other, another, 3])
            })
            .collect();
        let plan = plan_heal(&records, &nodes);
        assert!(plan.stuck.is_empty(), "{:?}", plan.stuck);
        assert_eq!(plan.replacements.len(), 20, "one per volume");
        let mut per_node: BTreeMap<u64, usize> = BTreeMap::new();
        for r in &plan.replacements {
            assert_eq!(r.from, 3);
            let rec = records.iter().find(|x| x.name == r.volume).expect("a planned volume");
            assert!(!rec.voters.contains(&r.to), "{r:?} goes to a node that holds a copy already");
            *per_node.entry(r.to).or_default() += 1;
        }
        // 20 copies over the 4 live nodes, each volume choosing between the two it is not
        // on: 4 to 6 each (placing them one at a time by free space and id would give
        // node 1 ten of them).
        assert_eq!(per_node.len(), 4, "{per_node:?}");
        assert!(per_node.values().all(|&n| (4..=6).contains(&n)), "{per_node:?}");
    }

    #[test]
    fn a_volume_with_nothing_to_copy_from_or_nowhere_to_go_is_stuck_not_planned() {
        let nodes =
            cluster(&[(1, Dead, Active), (2, Dead, Active), (3, Alive, Cordoned), (4, Alive, Cordoned)]);
        // "full" keeps a majority but every node without a copy is dead or cordoned.
        let plan = plan_heal(&[record("lost", &[1, 2]), record("full", &[3, 4, 1])], &nodes);
        assert!(plan.replacements.is_empty(), "{plan:?}");
        let why: Vec<(&str, &str)> = plan.stuck.iter().map(|s| (s.volume.as_str(), s.why.as_str())).collect();
        assert_eq!(why.len(), 2);
        assert!(why[0].0 == "full" && why[0].1.contains("node 1"), "{why:?}");
        assert!(why[1].0 == "lost" && why[1].1.contains("nothing to copy from"), "{why:?}");
    }

    #[test]
    fn a_volume_that_lost_its_majority_waits_instead_of_being_replaced() {
        let nodes = cluster(&[
            (1, Alive, Active),
            (2, Dead, Active),
            (3, Dead, Active),
            (4, Alive, Active),
            (5, Alive, Active),
        ]);
        let plan = plan_heal(&[record("two-dead", &[1, 2, 3]), record("one-dead", &[1, 2, 4])], &nodes);
        assert_eq!(plan.replacements, vec![Replacement { volume: "one-dead".into(), from: 2, to: 5 }]);
        assert_eq!(plan.stuck.len(), 1, "{plan:?}");
        assert!(
            plan.stuck[0].volume == "two-dead" && plan.stuck[0].why.contains("not a majority"),
            "{plan:?}"
        );
    }

    #[test]
    fn healthy_volumes_are_left_alone() {
        let nodes = cluster(&[(1, Alive, Active), (2, Alive, Active), (3, Suspect, Active)]);
        assert_eq!(plan_heal(&[record("v", &[1, 2, 3])], &nodes), HealPlan::default());
    }
}
