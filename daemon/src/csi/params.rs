//! StorageClass parameters the driver accepts (`CreateVolume.parameters`), and the
//! capacity rule. Keys with the `csi.storage.k8s.io/` prefix belong to the sidecars and are
//! ignored; any other unknown key is refused, so a typo in a StorageClass fails loudly
//! instead of creating a volume without the copies or the encryption it asked for.

use crate::model::{REPLICAS_MAX, VOLUME_SIZE_ALIGN_BYTES, VOLUME_SIZE_MAX_BYTES};

/// Extra copies (`"0"` to `"4"`).
pub const REPLICAS: &str = "replicas";
/// `"true"` or `"false"`: AES-256-GCM at rest.
pub const ENCRYPTED: &str = "encrypted";
/// Every key the driver itself accepts.
pub const ACCEPTED: [&str; 2] = [REPLICAS, ENCRYPTED];
/// Prefix of the keys external-provisioner passes or strips.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";
/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE_BYTES: u64 = 1 << 30;

/// What the parameters ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeParams {
    /// Extra copies.
    pub replicas: u8,
    /// Encrypted at rest.
    pub encrypted: bool,
}

/// Parses StorageClass parameters; the error says which key is wrong and what is accepted.
pub fn parse<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<VolumeParams, String> {
    let mut out = VolumeParams::default();
    for (key, value) in params {
        match key {
            REPLICAS => {
                out.replicas = value.trim().parse::<u8>().ok().filter(|r| *r <= REPLICAS_MAX).ok_or_else(|| {
                    format!("parameter {REPLICAS}={value:?} is not allowed; use an integer from 0 to {REPLICAS_MAX} (extra copies)")
                })?;
            }
            ENCRYPTED => {
                out.encrypted = match value.trim() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(format!(
                            "parameter {ENCRYPTED}={value:?} is not allowed; use \"true\" or \"false\""
                        ))
                    }
                };
            }
            k if k.starts_with(SIDECAR_PREFIX) => {}
            other => {
                return Err(format!(
                    "unknown parameter {other:?}; raftblk accepts {} (and csi.storage.k8s.io/* keys)",
                    ACCEPTED.join(", ")
                ))
            }
        }
    }
    Ok(out)
}

/// The size for a capacity range (`0` means unset), rounded up to whole 4 KiB blocks.
pub fn size_for(required: i64, limit: i64) -> Result<u64, CapacityError> {
    if required < 0 || limit < 0 {
        return Err(CapacityError::Invalid(format!(
            "capacity range has a negative bound (required_bytes {required}, limit_bytes {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(CapacityError::Invalid(format!(
            "capacity range limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let wanted = if required == 0 {
        DEFAULT_SIZE_BYTES.min(if limit == 0 { u64::MAX } else { limit })
    } else {
        required
    };
    let size = wanted.div_ceil(VOLUME_SIZE_ALIGN_BYTES) * VOLUME_SIZE_ALIGN_BYTES;
    if size == 0 || size > VOLUME_SIZE_MAX_BYTES {
        return Err(CapacityError::OutOfRange(format!(
            "{wanted} bytes is outside what a volume can be (4096 to {VOLUME_SIZE_MAX_BYTES} bytes)"
        )));
    }
    if limit != 0 && size > limit {
        return Err(CapacityError::OutOfRange(format!(
            "no size in whole 4 KiB blocks fits between required_bytes {required} and limit_bytes {limit}"
        )));
    }
    Ok(size)
}

/// Whether an existing volume of `size` satisfies a capacity range.
pub fn fits(size: u64, required: i64, limit: i64) -> bool {
    size >= required.max(0) as u64 && (limit <= 0 || size <= limit as u64)
}

/// Why a capacity range cannot be met.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    /// Malformed (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// Unsatisfiable (OUT_OF_RANGE).
    #[error("{0}")]
    OutOfRange(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_parsed_and_unknown_or_malformed_ones_refused() {
        assert_eq!(parse([]), Ok(VolumeParams::default()));
        assert_eq!(
            parse([("replicas", "2"), ("encrypted", "true"), ("csi.storage.k8s.io/fstype", "ext4")]),
            Ok(VolumeParams { replicas: 2, encrypted: true })
        );
        for bad in
            [("replicas", "x"), ("replicas", "5"), ("replicas", "-1"), ("encrypted", "yes"), ("copies", "2")]
        {
            let e = parse([bad]).expect_err("refused");
            assert!(e.contains(bad.0), "{e}");
        }
    }

    #[test]
    fn capacity_ranges_round_up_and_refuse_what_cannot_fit() {
        assert_eq!(size_for(0, 0), Ok(DEFAULT_SIZE_BYTES));
        assert_eq!(size_for(0, 8192), Ok(8192));
        assert_eq!(size_for(1, 0), Ok(4096));
        assert_eq!(size_for(10 << 20, 20 << 20), Ok(10 << 20));
        assert!(matches!(size_for(10, 5), Err(CapacityError::Invalid(_))));
        assert!(matches!(size_for(-1, 0), Err(CapacityError::Invalid(_))));
        assert!(matches!(size_for(4097, 4100), Err(CapacityError::OutOfRange(_))));
        assert!(matches!(size_for(VOLUME_SIZE_MAX_BYTES as i64 + 1, 0), Err(CapacityError::OutOfRange(_))));
        assert!(fits(4096, 4096, 0) && !fits(4096, 8192, 0) && !fits(8192, 0, 4096));
    }

    /// The StorageClasses in deploy/kubernetes use exactly what this parser accepts.
    #[test]
    fn the_deployed_storage_classes_are_accepted() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/kubernetes/storageclasses.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/kubernetes/storageclasses.yaml");
        let mut seen = Vec::new();
        for doc in text.split("\n---") {
            if !doc.lines().any(|l| l.trim() == "kind: StorageClass") {
                continue;
            }
            let name = doc
                .lines()
                .find_map(|l| l.trim().strip_prefix("name:"))
                .map(|n| n.trim().trim_matches('"').to_string())
                .expect("a name");
            // The `parameters:` block: the indented `key: value` lines after it.
            let mut params = Vec::new();
            let mut lines = doc.lines().skip_while(|l| l.trim_end() != "parameters:").skip(1);
            for l in lines.by_ref() {
                if !l.starts_with("  ") || l.trim().is_empty() {
                    break;
                }
                if l.trim_start().starts_with('#') {
                    continue;
                }
                let l = l.split(" #").next().unwrap_or(l);
                let (k, v) = l.trim().split_once(':').expect("key: value");
                params.push((k.trim().trim_matches('"').to_string(), v.trim().trim_matches('"').to_string()));
            }
            let parsed = parse(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .unwrap_or_else(|e| panic!("StorageClass {name}: {e}"));
            seen.push((name, parsed));
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            vec![
                ("storage-for-acceptance".to_string(), VolumeParams { replicas: 1, encrypted: false }),
                ("storage-for-dev-and-test".to_string(), VolumeParams { replicas: 0, encrypted: false }),
                ("storage-for-production".to_string(), VolumeParams { replicas: 2, encrypted: true }),
            ]
        );
    }
}
