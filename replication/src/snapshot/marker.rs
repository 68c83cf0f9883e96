//! The rebuild marker: a small file beside a replica's data file that exists exactly while
//! the store is being (re)built from a peer, and the pure decision of what a replica does
//! when it opens.
//!
//! Contents: `rebuild <index> <offset>\n`: the store is being filled with the volume as of
//! log index `index` (at least), and everything below `offset` has been copied and flushed.
//! Written through [`crate::durable_file`], so it is either the old or the new one.

use std::path::Path;

/// What a marker says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// The snapshot index the copy is for.
    pub index: u64,
    /// Bytes from the start of the volume already copied and flushed.
    pub offset: u64,
}

/// How a replica starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPlan {
    /// The store holds the volume as of `applied`; the log replays from there.
    Replay { applied: u64 },
    /// The store must be (re)built from a peer as of `index`, continuing at `offset`; the
    /// local log replays what follows `index` afterwards.
    Rebuild { index: u64, offset: u64 },
}

/// Decides how a replica opens. `checkpointed`: the applied index recorded for the store
/// (0 if none, e.g. the data file was lost); `snapshot_index`: the log starts after it;
/// `commit`: the durable commit index; `marker`: an interrupted rebuild, if any.
///
/// * An interrupted rebuild resumes where it stopped if its index is still usable: entries
///   after it are in the local log (index ≥ `snapshot_index`) and it is committed. Chunks
///   already copied came from stores that had applied at least `index`, so they stay valid.
/// * Otherwise, a store that does not reach the log start cannot be replayed into: rebuild
///   from scratch at the log start.
/// * Otherwise, replay from the checkpoint.
pub fn plan_open(checkpointed: u64, snapshot_index: u64, commit: u64, marker: Option<Marker>) -> OpenPlan {
    if let Some(m) = marker {
        if m.index >= snapshot_index && m.index <= commit {
            return OpenPlan::Rebuild { index: m.index, offset: m.offset };
        }
        if m.index > commit && checkpointed >= snapshot_index {
            // Written just before a snapshot install that never became durable: no byte
            // was copied yet (copying starts after the WAL sync), the store is intact.
            return OpenPlan::Replay { applied: checkpointed.min(commit) };
        }
        return OpenPlan::Rebuild { index: snapshot_index, offset: 0 };
    }
    if checkpointed < snapshot_index {
        return OpenPlan::Rebuild { index: snapshot_index, offset: 0 };
    }
    OpenPlan::Replay { applied: checkpointed.min(commit) }
}

/// Reads a marker; `None` if there is none.
pub fn read(path: &Path) -> std::io::Result<Option<Marker>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = || std::io::Error::other(format!("{} is corrupt: {text:?}", path.display()));
    let mut words = text.split_whitespace();
    if words.next() != Some("rebuild") {
        return Err(bad());
    }
    let index = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    let offset = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
    Ok(Some(Marker { index, offset }))
}

/// Writes a marker durably.
pub fn write(path: &Path, marker: Marker) -> std::io::Result<()> {
    crate::durable_file::write(path, format!("rebuild {} {}\n", marker.index, marker.offset).as_bytes())
}

/// Removes a marker durably (absent is fine).
pub fn remove(path: &Path) -> std::io::Result<()> {
    crate::durable_file::remove(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_plans() {
        // Normal restart: replay from the checkpoint, capped by the durable commit.
        assert_eq!(plan_open(50, 10, 60, None), OpenPlan::Replay { applied: 50 });
        assert_eq!(plan_open(70, 10, 60, None), OpenPlan::Replay { applied: 60 });
        // Data file lost (checkpoint 0) after compaction: rebuild at the log start.
        assert_eq!(plan_open(0, 10, 60, None), OpenPlan::Rebuild { index: 10, offset: 0 });
        // Never compacted and lost: replay the whole log.
        assert_eq!(plan_open(0, 0, 60, None), OpenPlan::Replay { applied: 0 });
        // Interrupted rebuild resumes.
        let m = Marker { index: 40, offset: 1 << 20 };
        assert_eq!(plan_open(5, 40, 60, Some(m)), OpenPlan::Rebuild { index: 40, offset: 1 << 20 });
        // Marker for a snapshot whose install never became durable: store intact.
        let m = Marker { index: 90, offset: 0 };
        assert_eq!(plan_open(50, 10, 60, Some(m)), OpenPlan::Replay { applied: 50 });
        // Marker older than the log start (another snapshot replaced it): start over.
        let m = Marker { index: 5, offset: 4096 };
        assert_eq!(plan_open(5, 10, 60, Some(m)), OpenPlan::Rebuild { index: 10, offset: 0 });
    }

    #[test]
    fn markers_round_trip_and_garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("raftblk-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("v.rebuild");
        assert_eq!(read(&p).unwrap(), None);
        write(&p, Marker { index: 7, offset: 4096 }).unwrap();
        assert_eq!(read(&p).unwrap(), Some(Marker { index: 7, offset: 4096 }));
        std::fs::write(&p, "rebuild x").unwrap();
        assert!(read(&p).is_err());
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(read(&p).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
