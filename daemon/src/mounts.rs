//! This process's mount table (`/proc/self/mountinfo`): what is mounted where, for the
//! checks that must not detach a mounted device or mount a path twice.

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mounted device as `major:minor`.
    pub device: String,
    /// Where it is mounted.
    pub point: String,
    /// Its file system type.
    pub fs_type: String,
}

/// The mounts in a mountinfo text (lines that do not parse are skipped).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // Optional fields end with a lone "-"; the file system type follows it.
            let dash = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                device: fields.get(2)?.to_string(),
                point: fields.get(4)?.to_string(),
                fs_type: fields.get(dash + 1)?.to_string(),
            })
        })
        .collect()
}

fn read() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse(&t)).unwrap_or_default()
}

/// What is mounted at `path`, if anything.
pub fn at(path: &str) -> Option<Mount> {
    let path = path.trim_end_matches('/');
    read().into_iter().find(|m| m.point == path)
}

/// Where the block device at `device` (a path such as `/dev/nbd0`) is mounted, if anywhere.
pub fn of_device(device: &str) -> Option<Mount> {
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(device).ok()?);
    // glibc's encoding of dev_t (gnu_dev_major / gnu_dev_minor).
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    let want = format!("{major}:{minor}");
    read().into_iter().find(|m| m.device == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_device_point_and_type() {
        let text =
            "36 35 43:0 / /var/lib/kubelet/plugins/x/staging rw,relatime shared:1 - ext4 /dev/nbd0 rw\n\
                    37 35 0:22 / /proc rw,nosuid - proc proc rw\n\
                    garbage\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            Mount {
                device: "43:0".into(),
                point: "/var/lib/kubelet/plugins/x/staging".into(),
                fs_type: "ext4".into()
            }
        );
        assert_eq!(m[1].fs_type, "proc");
        assert!(of_device("/nonexistent/device").is_none());
    }
}
