//! Byte patterns written and checked through NBD clients and on the copies' files,
//! shared by the cluster tests.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::{poll, qemu_io, run, sha256_of_stream, Cluster, Out};

/// `len` bytes of `byte` at `off`.
#[derive(Debug, Clone, Copy)]
pub struct Pat {
    /// The byte repeated.
    pub byte: u8,
    /// Where the run starts.
    pub off: u64,
    /// Its length.
    pub len: u64,
}

/// Shorthand for a [`Pat`].
pub const fn pat(byte: u8, off: u64, len: u64) -> Pat {
    Pat { byte, off, len }
}

impl Pat {
    /// The qemu-io command writing it.
    pub fn write(&self) -> String {
        format!("write -P {:#04x} {} {}", self.byte, self.off, self.len)
    }

    /// The qemu-io command checking it.
    pub fn read(&self) -> String {
        format!("read -P {:#04x} {} {}", self.byte, self.off, self.len)
    }
}

/// Writes every pattern through `uri` (one qemu-io run: each write acknowledged or it fails).
#[track_caller]
pub fn write_patterns(uri: &str, pats: &[Pat]) {
    let cmds: Vec<String> = pats.iter().map(Pat::write).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(uri, &cmds).ok();
}

/// Reads every pattern back through `uri` with qemu-io's pattern check.
#[track_caller]
pub fn read_patterns(uri: &str, pats: &[Pat]) -> Out {
    let cmds: Vec<String> = pats.iter().map(Pat::read).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(uri, &cmds)
}

/// Asserts that every pattern reads back through `uri`.
#[track_caller]
pub fn assert_patterns_read(uri: &str, pats: &[Pat]) {
    let out = read_patterns(uri, pats);
    assert!(out.success() && !out.stdout.contains("verification failed"), "pattern check failed: {out}");
}

/// Checks a node's copy directly on disk: `pats` must be in `<uuid>.img`.
#[track_caller]
pub fn assert_image_holds(image: &Path, pats: &[Pat]) {
    let f = File::open(image).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
    for p in pats {
        let mut buf = vec![0u8; p.len as usize];
        f.read_exact_at(&mut buf, p.off).unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        if let Some(i) = buf.iter().position(|&b| b != p.byte) {
            panic!(
                "{} at byte {} holds {:#04x}, expected {:#04x} (pattern {p:?})",
                image.display(),
                p.off + i as u64,
                buf[i],
                p.byte
            );
        }
    }
}

/// sha256 of a file (a node's copy).
pub fn sha_of_file(path: &Path) -> String {
    let out = run("sha256sum", &[path]);
    out.ok().split_whitespace().next().expect("digest").to_string()
}

/// sha256 of the whole volume read through `uri`.
pub fn sha_via_nbd(uri: &str) -> String {
    sha256_of_stream(&format!("nbdcopy '{uri}' -"))
}

/// Waits until `<uuid>.applied` on node `id` records at least `index` (checkpoints are periodic).
pub fn wait_checkpoint(c: &Cluster, id: u64, uuid: &str, index: u64) -> u64 {
    let path = c.node(id).applied_path(uuid);
    poll(&format!("{} to record index {index}", path.display()), Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        match text.trim().parse::<u64>() {
            Ok(i) if i >= index => Ok(i),
            _ => Err(format!("{text:?}")),
        }
    })
}
