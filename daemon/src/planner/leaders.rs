//! Which leadership to move so that leaders spread over the nodes holding copies.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::VolumeRecord;

/// A volume's group as the balancer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Led<'a> {
    /// The volume.
    pub record: &'a VolumeRecord,
    /// Its leader (0: none agreed, an election is under way).
    pub leader: u64,
    /// NBD connections to it, summed over the nodes.
    pub clients: usize,
}

/// A leadership to hand over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderMove {
    /// The volume.
    pub volume: String,
    /// Its leader now.
    pub from: u64,
    /// The copy holder to lead next.
    pub to: u64,
    /// Volumes led per usable node before the move.
    pub counts: BTreeMap<u64, usize>,
}

/// The one move (if any) from a node leading at least two volumes more than another
/// `usable` node holding a copy of one of them: the largest such gap, ties to the first
/// volume by name. Volumes with clients are left alone (their leader follows the client),
/// and nothing moves while any volume has no leader (the counts would be wrong).
pub fn plan_balance(groups: &[Led<'_>], usable: &BTreeSet<u64>) -> Option<LeaderMove> {
    if groups.iter().any(|g| g.leader == 0) {
        return None;
    }
    let mut counts: BTreeMap<u64, usize> = usable.iter().map(|&id| (id, 0)).collect();
    for g in groups {
        *counts.entry(g.leader).or_default() += 1;
    }
    let count = |id: u64| counts.get(&id).copied().unwrap_or(0);
    let mut sorted: Vec<&Led<'_>> = groups.iter().collect();
    sorted.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    let mut best: Option<(&Led<'_>, u64, usize)> = None;
    for g in sorted.into_iter().filter(|g| g.clients == 0) {
        let to = g
            .record
            .voters
            .iter()
            .copied()
            .filter(|&v| v != g.leader && usable.contains(&v))
            .min_by_key(|&v| (count(v), v));
        if let Some(to) = to {
            let gap = count(g.leader).saturating_sub(count(to));
            if gap >= 2 && best.is_none_or(|b| gap > b.2) {
                best = Some((g, to, gap));
            }
        }
    }
    let (g, to, _) = best?;
    Some(LeaderMove { volume: g.record.name.clone(), from: g.leader, to, counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<VolumeRecord> {
        (0..n)
            .map(|i| VolumeRecord { name: format!("v{i}"), voters: vec![1, 2, 3], ..Default::default() })
            .collect()
    }

    #[test]
    fn a_gap_of_two_moves_one_leadership_to_the_least_loaded_holder() {
        let r = records(3);
        let groups: Vec<Led> = r.iter().map(|record| Led { record, leader: 1, clients: 0 }).collect();
        let usable = BTreeSet::from([1, 2, 3]);
        let m = plan_balance(&groups, &usable).expect("3 against 0");
        assert_eq!((m.volume.as_str(), m.from, m.to), ("v0", 1, 2), "first volume, lowest id among equals");
        assert_eq!(m.counts, BTreeMap::from([(1, 3), (2, 0), (3, 0)]));
        // 2-1-0 has a gap of two too; 1-1-1 and 2-1-1 have none.
        let leaders = |ls: &[u64]| -> Vec<Led> {
            r.iter().zip(ls).map(|(record, &leader)| Led { record, leader, clients: 0 }).collect()
        };
        assert_eq!(plan_balance(&leaders(&[1, 1, 2]), &usable).map(|m| m.to), Some(3));
        assert_eq!(plan_balance(&leaders(&[1, 2, 3]), &usable), None);
        let four = records(4);
        let groups: Vec<Led> = four
            .iter()
            .zip([1, 1, 2, 3])
            .map(|(record, leader)| Led { record, leader, clients: 0 })
            .collect();
        assert_eq!(plan_balance(&groups, &usable), None);
    }

    #[test]
    fn clients_pin_elections_wait_and_unusable_nodes_take_nothing() {
        let r = records(3);
        let usable = BTreeSet::from([1, 2, 3]);
        let with_clients: Vec<Led> = r.iter().map(|record| Led { record, leader: 1, clients: 1 }).collect();
        assert_eq!(plan_balance(&with_clients, &usable), None, "a client's leader stays");
        let mut electing: Vec<Led> = r.iter().map(|record| Led { record, leader: 1, clients: 0 }).collect();
        electing[2].leader = 0;
        assert_eq!(plan_balance(&electing, &usable), None, "an election is under way");
        let groups: Vec<Led> = r.iter().map(|record| Led { record, leader: 1, clients: 0 }).collect();
        let m = plan_balance(&groups, &BTreeSet::from([1, 3])).expect("node 3 can take one");
        assert_eq!(m.to, 3, "node 2 is not usable (dead, cordoned...)");
        assert_eq!(plan_balance(&groups, &BTreeSet::from([1])), None);
    }
}
