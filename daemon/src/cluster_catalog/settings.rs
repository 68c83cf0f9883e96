//! Cluster-wide settings, kept in the catalog so that every node uses the same value (a
//! node's configuration gives the value until the setting is first made).

use serde_json::Value;

/// One setting: its key, what it means, and how its value is checked.
pub struct SettingDef {
    /// The key (`raftblk cluster set KEY VALUE`).
    pub key: &'static str,
    /// What it does, for `raftblk cluster settings` and error messages.
    pub help: &'static str,
    check: fn(&Value) -> Result<(), String>,
}

fn seconds_at_least_5(v: &Value) -> Result<(), String> {
    match v.as_u64() {
        Some(s) if (5..=86_400).contains(&s) => Ok(()),
        _ => Err(format!("{v} is not a number of seconds from 5 to 86400")),
    }
}

fn mib_per_s(v: &Value) -> Result<(), String> {
    v.as_u64().map(|_| ()).ok_or_else(|| format!("{v} is not a whole number of MiB/s (0: unlimited)"))
}

fn hours(v: &Value) -> Result<(), String> {
    match v.as_u64() {
        Some(h) if h <= 8760 => Ok(()),
        _ => Err(format!("{v} is not a number of hours from 0 (never) to 8760 (a year)")),
    }
}

fn boolean(v: &Value) -> Result<(), String> {
    v.as_bool().map(|_| ()).ok_or_else(|| format!("{v} is not true or false"))
}

/// Every setting there is.
pub const SETTINGS: &[SettingDef] = &[
    SettingDef {
        key: "node_dead_after_s",
        help: "seconds without a heartbeat before a node is dead and its copies are replaced (5 to 86400)",
        check: seconds_at_least_5,
    },
    SettingDef {
        key: "rebuild_rate_mib_s",
        help: "most MiB/s a copy being rebuilt pulls from its peers (0: unlimited); applies to rebuilds that start later",
        check: mib_per_s,
    },
    SettingDef {
        key: "scrub_interval_h",
        help: "hours between background scrubs of each volume (0: none; 0 to 8760)",
        check: hours,
    },
    SettingDef {
        key: "scrub_rate_mib_s",
        help: "most MiB/s of allocated data a scrub reads on each copy (0: unlimited)",
        check: mib_per_s,
    },
    SettingDef {
        key: "leader_follows_client",
        help: "whether a volume's leader moves to the node its NBD client stays connected to (true or false)",
        check: boolean,
    },
];

/// Checks `value` for setting `key`; the error lists the keys or says what a good value is.
pub fn validate(key: &str, value: &Value) -> Result<(), String> {
    let Some(def) = SETTINGS.iter().find(|d| d.key == key) else {
        let keys: Vec<&str> = SETTINGS.iter().map(|d| d.key).collect();
        return Err(format!("no cluster setting {key:?}; the settings are {}", keys.join(", ")));
    };
    (def.check)(value).map_err(|why| format!("{key}: {why}; it is the {}", def.help))
}

/// A setting as `GET /v1/cluster/settings` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SettingView {
    /// The key.
    pub key: String,
    /// The value in force on the answering node.
    pub value: Value,
    /// "cluster" when set in the catalog, else "node configuration".
    pub source: String,
    /// What it does.
    pub help: String,
}

/// Parses a value typed on the command line: a number or a boolean, as JSON would.
pub fn parse_cli_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_and_errors_say_what_fits() {
        assert!(validate("node_dead_after_s", &parse_cli_value("120")).is_ok());
        let e = validate("node_dead_after_s", &parse_cli_value("2")).unwrap_err();
        assert!(e.contains("5 to 86400"), "{e}");
        assert!(validate("rebuild_rate_mib_s", &parse_cli_value("0")).is_ok());
        assert!(validate("rebuild_rate_mib_s", &parse_cli_value("fast")).is_err());
        assert!(validate("leader_follows_client", &parse_cli_value("true")).is_ok());
        assert!(validate("leader_follows_client", &parse_cli_value("1")).is_err());
        let e = validate("dead_after", &Value::from(1)).unwrap_err();
        assert!(e.contains("node_dead_after_s") && e.contains("rebuild_rate_mib_s"), "{e}");
    }
}
