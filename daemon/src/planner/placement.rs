//! Where new copies go: a pure choice among the nodes as this node sees them.

use std::collections::BTreeMap;

use crate::model::{AdminState, Liveness, NodeView};

/// Picks `count` nodes for new copies among `nodes`: not dead, taking copies, not in
/// `exclude`; spread across zones (a zone already holding fewer of the volume's copies
/// first, counting those in `exclude`), then nodes heard from lately before suspect ones
/// (right after a start every peer is suspect until its first heartbeat), then `prefer`
/// (the node creating a volume: usually where it will be used, and its leader then serves
/// locally), then the most free space, then the lowest id. The error says why the request
/// cannot be met.
pub fn place(
    nodes: &[NodeView],
    count: usize,
    exclude: &[u64],
    prefer: Option<u64>,
) -> Result<Vec<u64>, String> {
    place_with_load(nodes, count, exclude, prefer, &BTreeMap::new())
}

/// [`place`], where `load` counts the copies each node is about to receive (a plan that
/// places many copies at once): after zones and liveness, the node receiving fewer comes
/// first, so a dead node's copies spread over the others instead of all going to the
/// roomiest one.
pub fn place_with_load(
    nodes: &[NodeView],
    count: usize,
    exclude: &[u64],
    prefer: Option<u64>,
    load: &BTreeMap<u64, usize>,
) -> Result<Vec<u64>, String> {
    let mut zones: BTreeMap<String, usize> = BTreeMap::new();
    for n in nodes.iter().filter(|n| exclude.contains(&n.id)) {
        *zones.entry(n.report.zone.clone()).or_default() += 1;
    }
    let mut pool: Vec<&NodeView> = nodes.iter().filter(|n| !exclude.contains(&n.id) && usable(n)).collect();
    if pool.len() < count {
        let unusable: Vec<String> = nodes
            .iter()
            .filter(|n| !exclude.contains(&n.id) && !usable(n))
            .map(|n| format!("node {} is {}", n.id, describe(n)))
            .collect();
        let held = if exclude.is_empty() {
            String::new()
        } else {
            format!(" besides nodes {exclude:?} that already hold one")
        };
        return Err(format!(
            "{count} copies need {count} distinct nodes{held}, but only {} can take one{}{}; add nodes, uncordon one, or ask for fewer replicas",
            pool.len(),
            if unusable.is_empty() { "" } else { " (" },
            if unusable.is_empty() { String::new() } else { unusable.join(", ") + ")" },
        ));
    }
    let mut chosen = Vec::new();
    while chosen.len() < count {
        pool.sort_by(|a, b| {
            let za = zones.get(&a.report.zone).copied().unwrap_or(0);
            let zb = zones.get(&b.report.zone).copied().unwrap_or(0);
            let (sa, sb) = (a.liveness != Liveness::Alive, b.liveness != Liveness::Alive);
            let (pa, pb) = (Some(a.id) != prefer, Some(b.id) != prefer);
            let (la, lb) = (load.get(&a.id).copied().unwrap_or(0), load.get(&b.id).copied().unwrap_or(0));
            za.cmp(&zb)
                .then(sa.cmp(&sb))
                .then(la.cmp(&lb))
                .then(pa.cmp(&pb))
                .then(b.report.free_bytes.cmp(&a.report.free_bytes))
                .then(a.id.cmp(&b.id))
        });
        let pick = pool.remove(0);
        *zones.entry(pick.report.zone.clone()).or_default() += 1;
        chosen.push(pick.id);
    }
    Ok(chosen)
}

fn usable(n: &NodeView) -> bool {
    n.liveness != Liveness::Dead && n.admin.takes_copies()
}

fn describe(n: &NodeView) -> String {
    match (n.liveness, n.admin) {
        (_, AdminState::Cordoned) => "cordoned".into(),
        (_, AdminState::Draining) => "draining".into(),
        (_, AdminState::Removed) => "removed".into(),
        (Liveness::Dead, _) => "dead".into(),
        (Liveness::Suspect, _) => "not heard from lately".into(),
        (Liveness::Alive, _) => "available".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeReport;

    fn views(specs: &[(u64, &str, u64, Liveness, AdminState)]) -> Vec<NodeView> {
        specs
            .iter()
            .map(|&(id, zone, free, liveness, admin)| NodeView {
                id,
                liveness,
                admin,
                report: NodeReport::sample(id, zone, free),
                last_heard_ms: Some(0),
            })
            .collect()
    }

    #[test]
    fn placement_spreads_zones_then_free_space_and_explains_refusals() {
        use AdminState::*;
        use Liveness::*;
        let nodes = views(&[
            (1, "a", 50, Alive, Active),
            (2, "a", 90, Alive, Active),
            (3, "b", 10, Alive, Active),
            (4, "c", 20, Alive, Active),
            (5, "c", 80, Dead, Active),
            (6, "b", 99, Alive, Cordoned),
        ]);
        assert_eq!(place(&nodes, 3, &[], None).unwrap(), vec![2, 4, 3], "one per zone, roomiest first");
        assert_eq!(place(&nodes, 3, &[], Some(1)).unwrap(), vec![1, 4, 3], "the creating node first");
        assert_eq!(place(&nodes, 1, &[2, 3], None).unwrap(), vec![4], "the zone without a copy");
        assert_eq!(place(&nodes, 4, &[], None).unwrap(), vec![2, 4, 3, 1]);
        let e = place(&nodes, 5, &[], None).unwrap_err();
        assert!(
            e.contains("only 4") && e.contains("node 5 is dead") && e.contains("node 6 is cordoned"),
            "{e}"
        );
        let no_zones = views(&[(1, "", 5, Alive, Active), (2, "", 7, Alive, Active)]);
        assert_eq!(place(&no_zones, 2, &[], None).unwrap(), vec![2, 1]);
        assert!(place(&no_zones, 3, &[], None).unwrap_err().contains("3 copies need 3 distinct nodes"));
        let mut starting = no_zones.clone();
        starting[1].liveness = Liveness::Suspect;
        assert_eq!(place(&starting, 1, &[], None).unwrap(), vec![1], "nodes heard from first");
        assert_eq!(place(&starting, 2, &[], None).unwrap(), vec![1, 2], "suspect ones still count");
    }

    #[test]
    fn copies_placed_together_spread_by_load_within_a_zone() {
        use Liveness::Alive;
        let nodes = views(&[
            (1, "a", 90, Alive, AdminState::Active),
            (2, "a", 50, Alive, AdminState::Active),
            (3, "a", 10, Alive, AdminState::Active),
        ]);
        let mut load = BTreeMap::new();
        assert_eq!(place_with_load(&nodes, 1, &[], None, &load).unwrap(), vec![1], "roomiest first");
        load.insert(1, 1);
        assert_eq!(place_with_load(&nodes, 1, &[], None, &load).unwrap(), vec![2], "then the next one");
        load.insert(2, 1);
        load.insert(3, 1);
        assert_eq!(place_with_load(&nodes, 1, &[], None, &load).unwrap(), vec![1], "all equal: room again");
    }
}
