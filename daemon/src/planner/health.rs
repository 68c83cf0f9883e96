//! Whether a volume has all its copies, from its record, how the nodes are seen and whether
//! a copy is being added or copied.

use crate::model::{AdminState, Liveness, VolumeHealth, VolumeRecord};

/// Healthy: every copy is on a live node that keeps it, caught up. Rebuilding: a copy is
/// being added or copied from a snapshot (`copying`). Degraded: a copy is damaged beyond
/// repair, sits on a node that is not heard from or is being drained or removed, or copies
/// are missing. `state` is how this node sees a node (`None`: a node alone, whose only copy
/// is judged by its damage alone).
pub fn health_of(
    record: &VolumeRecord,
    state: Option<&dyn Fn(u64) -> (Liveness, AdminState)>,
    copying: bool,
) -> VolumeHealth {
    // A copy a scrub could not repair (0: a node alone's only copy).
    if record.damaged_copies.iter().any(|n| *n == 0 || record.voters.contains(n)) {
        return VolumeHealth::Degraded;
    }
    let Some(state) = state else { return VolumeHealth::Healthy };
    let bad = record.voters.iter().any(|&id| {
        let (liveness, admin) = state(id);
        liveness != Liveness::Alive || admin.evicts_copies()
    });
    if bad || record.voters.len() < record.replicas as usize + 1 {
        return VolumeHealth::Degraded;
    }
    if copying {
        return VolumeHealth::Rebuilding;
    }
    VolumeHealth::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;
    use AdminState::*;
    use Liveness::*;

    fn record(voters: &[u64], replicas: u8, damaged: &[u64]) -> VolumeRecord {
        VolumeRecord {
            voters: voters.to_vec(),
            replicas,
            damaged_copies: damaged.to_vec(),
            ..VolumeRecord::default()
        }
    }

    fn judge(r: &VolumeRecord, nodes: &[(u64, Liveness, AdminState)], copying: bool) -> VolumeHealth {
        let state = |id: u64| nodes.iter().find(|n| n.0 == id).map_or((Suspect, Active), |n| (n.1, n.2));
        health_of(r, Some(&state), copying)
    }

    #[test]
    fn every_copy_live_and_kept_is_healthy_and_a_copy_being_made_is_rebuilding() {
        let all = [(1, Alive, Active), (2, Alive, Active), (3, Alive, Active)];
        assert_eq!(judge(&record(&[1, 2, 3], 2, &[]), &all, false), VolumeHealth::Healthy);
        assert_eq!(judge(&record(&[1, 2, 3], 2, &[]), &all, true), VolumeHealth::Rebuilding);
    }

    #[test]
    fn a_copy_on_a_node_down_leaving_or_missing_degrades() {
        let r = record(&[1, 2, 3], 2, &[]);
        for bad in [(3, Dead, Active), (3, Suspect, Active), (3, Alive, Draining), (3, Alive, Removed)] {
            let nodes = [(1, Alive, Active), (2, Alive, Active), bad];
            assert_eq!(judge(&r, &nodes, false), VolumeHealth::Degraded, "{bad:?}");
        }
        let nodes = [(1, Alive, Active), (2, Alive, Active), (3, Alive, Cordoned)];
        assert_eq!(judge(&r, &nodes, false), VolumeHealth::Healthy, "a cordoned node keeps its copies");
        let short = record(&[1, 2], 2, &[]);
        assert_eq!(judge(&short, &nodes, true), VolumeHealth::Degraded, "a copy is missing");
        assert_eq!(
            judge(&record(&[1, 2, 4], 2, &[]), &nodes, false),
            VolumeHealth::Degraded,
            "node 4 is unknown"
        );
    }

    #[test]
    fn damage_degrades_only_while_the_damaged_copy_is_there() {
        let nodes = [(1, Alive, Active), (2, Alive, Active)];
        assert_eq!(judge(&record(&[1, 2], 1, &[2]), &nodes, false), VolumeHealth::Degraded);
        assert_eq!(
            judge(&record(&[1, 2], 1, &[3]), &nodes, false),
            VolumeHealth::Healthy,
            "node 3's copy went"
        );
        assert_eq!(health_of(&record(&[1], 0, &[0]), None, false), VolumeHealth::Degraded, "alone, damaged");
        assert_eq!(health_of(&record(&[1], 0, &[]), None, true), VolumeHealth::Healthy, "alone");
    }
}
