//! Small files that must survive a crash whole (checkpoints, rebuild markers, membership):
//! write a temporary file beside the target, fsync it, rename it over the target, fsync the
//! directory. A crash leaves the old contents or the new, never a mix.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The temporary beside `path`: its whole name, a number no other write in this process
/// uses, and `.tmp`. Files that differ only in extension (`<uuid>.applied`,
/// `<uuid>.rebuild`) never share one, and neither do two writes of the same file at once (a
/// rebuild task and the Raft runner both write a copy's marker): with one shared name, the
/// first rename took the other's temporary away and its rename failed.
fn temporary(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{n}.tmp"));
    path.with_file_name(name)
}

/// Replaces the contents of `path` with `bytes`, durably and atomically.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Removes `path` durably; a missing file is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A rename or removal is durable only once its directory is synced.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_and_removes_tolerate_absence() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("v.applied");
        let b = dir.path().join("v.rebuild");
        write(&a, b"1\n").unwrap();
        write(&b, b"rebuild 1 0\n").unwrap();
        write(&a, b"22\n").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"22\n");
        assert_eq!(std::fs::read(&b).unwrap(), b"rebuild 1 0\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary left behind");
        remove(&a).unwrap();
        remove(&a).unwrap();
        assert!(!a.exists());
    }

    #[test]
    fn concurrent_writes_of_one_file_all_succeed_and_leave_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.rebuild");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let path = &path;
                s.spawn(move || {
                    for i in 0..200u32 {
                        write(path, format!("rebuild {t} {i}\n").as_bytes()).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("rebuild ") && text.ends_with("199\n"), "{text:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left behind");
    }
}
