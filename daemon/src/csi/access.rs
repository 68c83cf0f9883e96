//! Which volume capabilities raftblk serves: block or mount (ext4, xfs) access, by one node
//! read-write or by any number of nodes read-only. Multi-node writers are refused: a raftblk
//! volume is a plain block device with no cluster file system above it.

use super::proto::v1::volume_capability::access_mode::Mode;
use super::proto::v1::volume_capability::AccessType;
use super::proto::v1::VolumeCapability;

/// File systems NodeStage makes and mounts.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
/// The file system used when a mount capability names none.
pub const DEFAULT_FS: &str = "ext4";

/// Ok when raftblk can serve `c`; otherwise what is wrong with it.
pub fn check(c: &VolumeCapability) -> Result<(), String> {
    match &c.access_type {
        None => return Err("volume capability has no access type (block or mount)".into()),
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() && !FS_TYPES.contains(&m.fs_type.as_str()) => {
            return Err(format!("file system {:?} is not supported; use one of {FS_TYPES:?}", m.fs_type));
        }
        Some(_) => {}
    }
    let mode = c.access_mode.as_ref().map(|m| m.mode).ok_or("volume capability has no access mode")?;
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::MultiNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => Ok(()),
        Ok(m @ (Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter)) => Err(format!(
            "access mode {} is not supported: a raftblk volume has one writer node",
            m.as_str_name()
        )),
        _ => Err(format!("access mode {mode} is unknown")),
    }
}

/// Whether the capability only reads.
pub fn read_only(c: &VolumeCapability) -> bool {
    matches!(
        c.access_mode.as_ref().and_then(|m| Mode::try_from(m.mode).ok()),
        Some(Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    )
}

/// Whether it is raw block access.
pub fn is_block(c: &VolumeCapability) -> bool {
    matches!(c.access_type, Some(AccessType::Block(_)))
}

/// The file system and mount flags of a mount capability (`None` for block).
pub fn mount_of(c: &VolumeCapability) -> Option<(String, Vec<String>)> {
    match &c.access_type {
        Some(AccessType::Mount(m)) => {
            let fs = if m.fs_type.is_empty() { DEFAULT_FS.to_string() } else { m.fs_type.clone() };
            Some((fs, m.mount_flags.clone()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::v1::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use super::*;

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability { access_mode: Some(AccessMode { mode: mode as i32 }), access_type: access }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    #[test]
    fn single_writers_and_many_readers_pass_others_are_refused() {
        assert!(check(&cap(Mode::SingleNodeWriter, mount("ext4"))).is_ok());
        assert!(check(&cap(Mode::MultiNodeReaderOnly, Some(AccessType::Block(BlockVolume {})))).is_ok());
        assert!(check(&cap(Mode::MultiNodeMultiWriter, mount("ext4"))).is_err());
        assert!(check(&cap(Mode::SingleNodeWriter, mount("btrfs"))).is_err());
        assert!(check(&cap(Mode::SingleNodeWriter, None)).is_err());
        assert!(check(&VolumeCapability { access_mode: None, access_type: mount("") }).is_err());
        assert!(check(&VolumeCapability {
            access_mode: Some(AccessMode { mode: 99 }),
            access_type: mount("")
        })
        .is_err());
        assert!(read_only(&cap(Mode::MultiNodeReaderOnly, mount(""))));
        assert!(!read_only(&cap(Mode::SingleNodeWriter, mount(""))));
        assert_eq!(mount_of(&cap(Mode::SingleNodeWriter, mount(""))), Some(("ext4".into(), vec![])));
    }
}
