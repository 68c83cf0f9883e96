//! The node's attachments (`<data_dir>/attachments.json`): which volume each `/dev/nbdN`
//! this daemon configured serves, so a restarted daemon knows what to reattach. Written
//! atomically before the kernel is told about a new device and after it forgets one, so
//! a crash between the two leaves a record for a device that may not exist (the restart
//! connects it again) rather than a device nobody serves.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AttachmentError;

/// File name in the data directory.
pub const ATTACHMENTS_FILE: &str = "attachments.json";

/// One kernel device this node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The volume's name.
    pub volume: String,
    /// The volume's uuid (a volume deleted and re-created under the name is not the same one).
    pub uuid: String,
    /// `/dev/nbd<index>`.
    pub index: u32,
    /// Writes refused (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// The attachment generation this device writes with (0: not fenced).
    #[serde(default)]
    pub generation: u64,
}

impl Attachment {
    /// `/dev/nbd<index>`.
    pub fn device(&self) -> String {
        raftblk_blockdev::kernel_nbd::device_path(self.index)
    }

    /// The identifier the kernel keeps for the device (`/sys/block/nbdN/backend`).
    pub fn backend(&self) -> String {
        format!("raftblk:{}:{}", self.volume, self.uuid)
    }
}

/// The records, as kept on disk.
#[derive(Debug)]
pub struct AttachmentFile {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    attachments: Vec<Attachment>,
}

impl AttachmentFile {
    /// The file in `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        AttachmentFile { path: data_dir.join(ATTACHMENTS_FILE) }
    }

    /// Every record (none when the file does not exist yet).
    pub fn load(&self) -> Result<Vec<Attachment>, AttachmentError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(AttachmentError::Record(format!("reading {}: {e}", self.path.display()))),
        };
        let disk: OnDisk = serde_json::from_slice(&text).map_err(|e| {
            AttachmentError::Record(format!(
                "{} is not valid ({e}); move it away to start without reattaching",
                self.path.display()
            ))
        })?;
        Ok(disk.attachments)
    }

    /// Replaces every record, durably.
    pub fn store(&self, attachments: &[Attachment]) -> Result<(), AttachmentError> {
        let disk = OnDisk { version: 1, attachments: attachments.to_vec() };
        let text = serde_json::to_vec_pretty(&disk)
            .map_err(|e| AttachmentError::Record(format!("encoding attachments: {e}")))?;
        raftblk_replication::durable_file::write(&self.path, &text)
            .map_err(|e| AttachmentError::Record(format!("writing {}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reload_and_a_broken_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = AttachmentFile::new(dir.path());
        assert!(file.load().expect("empty").is_empty());
        let a =
            Attachment { volume: "db".into(), uuid: "u1".into(), index: 3, read_only: false, generation: 7 };
        file.store(std::slice::from_ref(&a)).expect("store");
        assert_eq!(file.load().expect("load"), vec![a]);
        std::fs::write(dir.path().join(ATTACHMENTS_FILE), b"{nope").expect("write");
        let e = file.load().expect_err("broken");
        assert!(e.to_string().contains(ATTACHMENTS_FILE), "{e}");
    }
}
