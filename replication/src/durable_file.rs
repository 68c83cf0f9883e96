//! Small files that must survive a crash whole (checkpoints, rebuild markers, membership):
//! write a temporary file beside the target, fsync it, rename it over the target, fsync the
//! directory. A crash leaves the old contents or the new, never a mix.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The temporary beside `path`: its whole name plus `.tmp`, so files that differ only in
/// extension (`<uuid>.applied`, `<uuid>.rebuild`) never share one.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
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
}
