//! A volume's record: what the catalog knows about one volume, and the rules a record's
//! name, size and labels follow.

use serde::{Deserialize, Serialize};

/// Volume sizes are multiples of this, so every volume holds whole 4 KiB blocks.
pub const VOLUME_SIZE_ALIGN_BYTES: u64 = 4096;
/// Largest volume: ext4's file size limit with 4 KiB blocks.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 16 << 40;
/// Longest volume name (it becomes a file name and an NBD export name).
pub const VOLUME_NAME_MAX_LEN: usize = 63;

/// What the catalog knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Unique name; also the NBD export name.
    pub name: String,
    /// Stable identity; the data file is named after it.
    pub uuid: String,
    /// Size in bytes (a multiple of [`VOLUME_SIZE_ALIGN_BYTES`]).
    pub size_bytes: u64,
    /// Whether NBD clients may only read.
    pub read_only: bool,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// Extra copies (0 to 4); the volume has `replicas + 1` voters.
    #[serde(default)]
    pub replicas: u8,
    /// Node ids holding a copy (empty on a node without peers: the local file is the volume).
    #[serde(default)]
    pub voters: Vec<u64>,
    /// The volume's Raft group id (0 on a node without peers).
    #[serde(default)]
    pub group_id: u64,
    /// The membership the group was created with (its state before log index 1). A node
    /// that joins later starts from it and replays the log, conf changes included.
    #[serde(default)]
    pub initial_voters: Vec<u64>,
    /// Bumped by every change of the record; a node applies a peer's record only if it is
    /// newer, so a node that returns with old records cannot undo changes made meanwhile
    /// (such as its copy being replaced).
    #[serde(default)]
    pub generation: u64,
    /// Operator's labels (e.g. `app=db`, a CSI driver's PVC name), shown and kept, not
    /// interpreted.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Blocks are encrypted (AES-256-GCM) under the volume's own data key; copies hold only
    /// ciphertext.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// The volume's data key wrapped by a cluster KEK (`WrappedKey::to_text`); more than one
    /// only while a rotation is under way. The KEK itself is never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wrapped_keys: Vec<String>,
    /// When the last scrub finished (seconds since the epoch; 0: never).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub scrubbed_unix_s: u64,
    /// Copies (node ids; 0 for a node alone) the last scrub left damaged or disagreeing:
    /// the volume is degraded until they are repaired or replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged_copies: Vec<u64>,
    /// The nodes the volume is published to (CSI ControllerPublish): who may attach it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publications: Vec<super::Publication>,
    /// The newest read-write attachment generation handed out: writes from attachments of
    /// an older generation are refused (the fence; 0: never published).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fence: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Most extra copies a volume may have.
pub const REPLICAS_MAX: u8 = 4;

/// Validates a volume name; the error says what a good name looks like.
pub fn validate_name(name: &str) -> Result<(), String> {
    let rule = "use 1 to 63 characters: letters, digits, '.', '-' and '_', starting with a letter or digit";
    if name.is_empty() || name.len() > VOLUME_NAME_MAX_LEN {
        return Err(format!("volume name {name:?} has {} characters; {rule}", name.len()));
    }
    let first_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !first_ok || !rest_ok {
        return Err(format!("volume name {name:?} is not allowed; {rule}"));
    }
    Ok(())
}

/// Most labels on one volume.
pub const LABELS_MAX: usize = 16;
/// Longest label key or value.
pub const LABEL_LEN_MAX: usize = 63;

/// Parses `KEY=VALUE` (a `--label` argument); the error says what a good label looks like.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} is not KEY=VALUE; write e.g. --label rack=r12"))?;
    check_label(key, value)?;
    Ok((key.to_string(), value.to_string()))
}

fn check_label(key: &str, value: &str) -> Result<(), String> {
    let word = |w: &str| w.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'));
    if key.is_empty() || key.len() > LABEL_LEN_MAX || !word(key) {
        return Err(format!(
            "label key {key:?} is not allowed; use 1 to {LABEL_LEN_MAX} letters, digits, '.', '-', '_' or '/'"
        ));
    }
    if value.len() > LABEL_LEN_MAX || !word(value) {
        return Err(format!(
            "label value {value:?} (key {key:?}) is not allowed; use up to {LABEL_LEN_MAX} letters, digits, '.', '-', '_' or '/'"
        ));
    }
    Ok(())
}

/// Validates a volume's labels.
pub fn validate_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > LABELS_MAX {
        return Err(format!("{} labels given; a volume takes at most {LABELS_MAX}", labels.len()));
    }
    labels.iter().try_for_each(|(k, v)| check_label(k, v))
}

/// Validates a volume size; the error says what to use instead.
pub fn validate_size(size_bytes: u64) -> Result<(), String> {
    if size_bytes == 0 {
        return Err("size must be larger than 0; e.g. --size 10G".into());
    }
    if !size_bytes.is_multiple_of(VOLUME_SIZE_ALIGN_BYTES) {
        let up = size_bytes.div_ceil(VOLUME_SIZE_ALIGN_BYTES) * VOLUME_SIZE_ALIGN_BYTES;
        return Err(format!(
            "size {size_bytes} is not a multiple of {VOLUME_SIZE_ALIGN_BYTES} bytes; use {up} (or a size in K, M, G)"
        ));
    }
    if size_bytes > VOLUME_SIZE_MAX_BYTES {
        return Err(format!(
            "size {size_bytes} exceeds the maximum of {VOLUME_SIZE_MAX_BYTES} bytes (16 TiB)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert_eq!(parse_label("app=db").unwrap(), ("app".into(), "db".into()));
        assert_eq!(parse_label("k8s.io/pvc=data-0").unwrap().0, "k8s.io/pvc");
        assert_eq!(parse_label("empty=").unwrap().1, "");
        assert!(parse_label("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_label("=x").unwrap_err().contains("key"));
        assert!(parse_label("a b=c").is_err());
        assert!(parse_label(&format!("k={}", "v".repeat(64))).unwrap_err().contains("value"));
        let many: std::collections::BTreeMap<String, String> =
            (0..17).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(validate_labels(&many).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("db-1.data_x").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(validate_name("a/b").unwrap_err().contains("letters, digits"));
    }

    #[test]
    fn sizes_are_checked_and_suggest_a_fix() {
        assert!(validate_size(10 << 30).is_ok());
        assert!(validate_size(0).is_err());
        assert!(validate_size(4097).unwrap_err().contains("use 8192"));
        assert!(validate_size(VOLUME_SIZE_MAX_BYTES + 4096).is_err());
    }
}

/// Whether a volume has all its copies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum VolumeHealth {
    /// Every copy on a live node, caught up.
    #[default]
    Healthy,
    /// A copy is being added or rebuilt.
    Rebuilding,
    /// A copy is on a node that is down, drained or removed, or missing.
    Degraded,
}

impl VolumeHealth {
    /// The lowercase name.
    pub fn label(self) -> &'static str {
        match self {
            VolumeHealth::Healthy => "healthy",
            VolumeHealth::Rebuilding => "rebuilding",
            VolumeHealth::Degraded => "degraded",
        }
    }
}
