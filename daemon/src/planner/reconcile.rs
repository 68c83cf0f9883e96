//! What this node does with its copies when the catalog says something new: a record it has
//! not seen, a newer generation of one it holds, a delete, a file no record owns. The loop in
//! `cluster.rs` (and a record committed here) feeds these; `volumes/` carries them out.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::VolumeRecord;

/// What to do with a record this node learned (from its catalog replica or a peer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordAction {
    /// Nothing new: an older or the same generation, or a deleted volume's record.
    Nothing,
    /// A volume this node does not have open yet: open it, and `create` this node's copy
    /// (empty; it takes the log or a snapshot from its peers) where the record places one.
    Open {
        /// Make a new copy here.
        create: bool,
    },
    /// The copy holders changed: reopen the volume with the new record, and start
    /// (`gains`) or stop and delete (`loses`) this node's copy.
    ChangeCopies {
        /// This node holds a copy now and did not before.
        gains: bool,
        /// This node held a copy and no longer does.
        loses: bool,
    },
    /// Keep the merged record (newer fields, the larger size); `grows` when its size is larger.
    Update {
        /// The record to hold from now on.
        record: Box<VolumeRecord>,
        /// The volume grew.
        grows: bool,
    },
    /// A different volume (another uuid) goes by this name here.
    NameTaken,
}

/// Whether `record` places a copy on node `me` (`None`: a node alone holds every copy).
pub fn holds_copy(me: Option<u64>, record: &VolumeRecord) -> bool {
    me.is_none_or(|me| record.voters.contains(&me))
}

/// What to do with `incoming` given the record this node holds under its name (`current`),
/// whether its uuid was deleted, and whether this node made it (`made_here`: its copy is new
/// even where the record would not say so).
pub fn plan_record(
    me: Option<u64>,
    current: Option<&VolumeRecord>,
    incoming: &VolumeRecord,
    deleted: bool,
    made_here: bool,
) -> RecordAction {
    if deleted {
        return RecordAction::Nothing;
    }
    let Some(current) = current else {
        // A volume new to this node: its copy here (if any) is new too.
        return RecordAction::Open { create: made_here || holds_copy(me, incoming) };
    };
    if current.uuid != incoming.uuid {
        return RecordAction::NameTaken;
    }
    if incoming.generation < current.generation {
        return RecordAction::Nothing; // from a node that was away
    }
    if incoming.generation > current.generation && incoming.voters != current.voters {
        let (had, has) = (holds_copy(me, current), holds_copy(me, incoming));
        return RecordAction::ChangeCopies { gains: has && !had, loses: had && !has };
    }
    let mut merged = current.clone();
    let mut changed = false;
    if incoming.generation > current.generation {
        // What a newer record may change besides size and copies.
        merged.scrubbed_unix_s = incoming.scrubbed_unix_s;
        merged.damaged_copies = incoming.damaged_copies.clone();
        merged.wrapped_keys = incoming.wrapped_keys.clone();
        merged.labels = incoming.labels.clone();
        merged.publications = incoming.publications.clone();
        merged.fence = current.fence.max(incoming.fence);
        merged.generation = incoming.generation;
        changed = true;
    }
    // A grow may reach a node before the generation that made it (a size is never taken
    // back, so the larger one always wins).
    let grows = incoming.size_bytes > current.size_bytes;
    if grows {
        merged.size_bytes = incoming.size_bytes;
        changed = true;
    }
    if changed {
        RecordAction::Update { record: Box::new(merged), grows }
    } else {
        RecordAction::Nothing
    }
}

/// What a pass over the catalog replica asks of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogPass {
    /// Uuids of volumes this node has open that the catalog deleted.
    pub deletes: Vec<String>,
    /// Records that differ from what this node holds (each then goes through
    /// [`plan_record`]).
    pub records: Vec<VolumeRecord>,
}

/// Compares the catalog's `records` and `deleted` uuids with what this node holds (`held`,
/// by name).
pub fn plan_pass(
    held: &BTreeMap<String, VolumeRecord>,
    records: Vec<VolumeRecord>,
    deleted: &BTreeSet<String>,
) -> CatalogPass {
    let deletes = held.values().filter(|r| deleted.contains(&r.uuid)).map(|r| r.uuid.clone()).collect();
    let records = records.into_iter().filter(|r| held.get(&r.name) != Some(r)).collect();
    CatalogPass { deletes, records }
}

/// The suffixes of a copy's files in the volumes directory.
pub const COPY_FILE_SUFFIXES: [&str; 4] = [".img", ".meta", ".applied", ".rebuild"];

/// Which of `files` (names in the volumes directory) belong to no volume in `known` (uuids):
/// left by a create or delete that was cut short. Files that are not a copy's are kept.
pub fn orphans<'a>(known: &BTreeSet<String>, files: &'a [String]) -> Vec<&'a str> {
    files
        .iter()
        .filter(|f| {
            COPY_FILE_SUFFIXES
                .iter()
                .find_map(|s| f.strip_suffix(s))
                .is_some_and(|uuid| !known.contains(uuid))
        })
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uuid: &str, generation: u64, voters: &[u64]) -> VolumeRecord {
        VolumeRecord {
            name: "v".into(),
            uuid: uuid.into(),
            generation,
            voters: voters.to_vec(),
            size_bytes: 1 << 30,
            ..VolumeRecord::default()
        }
    }

    #[test]
    fn a_new_record_creates_a_copy_only_where_it_places_one() {
        let r = rec("u", 1, &[1, 2]);
        assert_eq!(plan_record(Some(1), None, &r, false, false), RecordAction::Open { create: true });
        assert_eq!(plan_record(Some(3), None, &r, false, false), RecordAction::Open { create: false });
        assert_eq!(
            plan_record(Some(3), None, &r, false, true),
            RecordAction::Open { create: true },
            "made here"
        );
        assert_eq!(plan_record(None, None, &r, false, false), RecordAction::Open { create: true }, "alone");
        assert_eq!(plan_record(Some(1), None, &r, true, false), RecordAction::Nothing, "deleted");
    }

    #[test]
    fn older_or_same_records_change_nothing_and_another_uuid_is_refused() {
        let held = rec("u", 5, &[1, 2]);
        assert_eq!(
            plan_record(Some(1), Some(&held), &rec("u", 4, &[1]), false, false),
            RecordAction::Nothing
        );
        assert_eq!(plan_record(Some(1), Some(&held), &held, false, false), RecordAction::Nothing);
        assert_eq!(
            plan_record(Some(1), Some(&held), &rec("w", 9, &[1, 2]), false, false),
            RecordAction::NameTaken
        );
        // A volume re-created under the same name after a delete: the old one's delete
        // comes first (its uuid is deleted), then the new record opens.
        assert_eq!(plan_record(Some(1), Some(&held), &held, true, false), RecordAction::Nothing);
    }

    #[test]
    fn copies_gained_and_lost_reopen_the_volume() {
        let held = rec("u", 5, &[1, 2]);
        let moved = rec("u", 6, &[2, 3]);
        assert_eq!(
            plan_record(Some(1), Some(&held), &moved, false, false),
            RecordAction::ChangeCopies { gains: false, loses: true }
        );
        assert_eq!(
            plan_record(Some(3), Some(&held), &moved, false, false),
            RecordAction::ChangeCopies { gains: true, loses: false }
        );
        assert_eq!(
            plan_record(Some(2), Some(&held), &moved, false, false),
            RecordAction::ChangeCopies { gains: false, loses: false }
        );
        // The same copies at an older generation change nothing.
        assert_eq!(plan_record(Some(1), Some(&moved), &held, false, false), RecordAction::Nothing);
    }

    #[test]
    fn a_newer_record_brings_its_fields_and_a_larger_size_wins_at_any_generation() {
        let held = VolumeRecord {
            fence: 7,
            labels: [("a".to_string(), "1".to_string())].into(),
            ..rec("u", 5, &[1, 2])
        };
        let newer = VolumeRecord {
            fence: 3,
            labels: [("b".to_string(), "2".to_string())].into(),
            damaged_copies: vec![2],
            ..rec("u", 6, &[1, 2])
        };
        let RecordAction::Update { record, grows } = plan_record(Some(1), Some(&held), &newer, false, false)
        else {
            panic!("a newer record updates");
        };
        assert!(!grows);
        assert_eq!(
            (record.generation, record.fence, record.damaged_copies.clone()),
            (6, 7, vec![2]),
            "fences only rise"
        );
        assert_eq!(record.labels, newer.labels);
        let grown = VolumeRecord { size_bytes: 2 << 30, ..held.clone() };
        let RecordAction::Update { record, grows } = plan_record(Some(1), Some(&held), &grown, false, false)
        else {
            panic!("a grow updates");
        };
        assert!(grows);
        assert_eq!((record.size_bytes, record.generation), (2 << 30, 5));
        let shrunk = VolumeRecord { size_bytes: 1 << 20, ..held.clone() };
        assert_eq!(plan_record(Some(1), Some(&held), &shrunk, false, false), RecordAction::Nothing);
    }

    #[test]
    fn a_pass_picks_held_deletes_and_records_that_differ() {
        let a = VolumeRecord { name: "a".into(), ..rec("ua", 1, &[1]) };
        let b = VolumeRecord { name: "b".into(), ..rec("ub", 1, &[1]) };
        let held: BTreeMap<String, VolumeRecord> =
            [a.clone(), b.clone()].into_iter().map(|r| (r.name.clone(), r)).collect();
        let b2 = VolumeRecord { generation: 2, ..b.clone() };
        let c = VolumeRecord { name: "c".into(), ..rec("uc", 1, &[2]) };
        let deleted: BTreeSet<String> = ["ua".to_string(), "gone".to_string()].into();
        let pass = plan_pass(&held, vec![b2.clone(), c.clone()], &deleted);
        assert_eq!(pass.deletes, vec!["ua".to_string()], "only held volumes are deleted here");
        assert_eq!(pass.records, vec![b2, c]);
        assert_eq!(plan_pass(&held, vec![a, b], &BTreeSet::new()), CatalogPass::default());
    }

    #[test]
    fn only_copy_files_of_unknown_volumes_are_orphans() {
        let known: BTreeSet<String> = ["u1".to_string()].into();
        let files: Vec<String> =
            ["u1.img", "u1.meta", "u2.img", "u2.applied", "u3.rebuild", "notes.txt", "u4.img.tmp"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        assert_eq!(orphans(&known, &files), vec!["u2.img", "u2.applied", "u3.rebuild"]);
    }
}
