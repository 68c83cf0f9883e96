//! raftblkd's settings: the embedded default, overlaid by a TOML file, then by
//! environment variables and flags (clap gives flags precedence over env).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::size::parse_size;

/// The embedded default configuration (also the documentation of every key).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default.toml");

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The config file is not valid TOML or has unknown keys or wrong types.
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value is syntactically fine but unusable.
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Which I/O engine the block store (`storage.io_engine`) or the WAL (`storage.wal_engine`) uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoEngineSetting {
    /// io_uring if available, else sync.
    Auto,
    /// io_uring or fail (`io_uring` is accepted too).
    #[serde(alias = "io_uring")]
    #[value(alias = "io_uring")]
    Uring,
    /// pread/pwrite on blocking threads.
    Sync,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// NBD listener settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    /// TCP address.
    pub listen: SocketAddr,
    /// Unix socket path; empty means `<data_dir>/nbd.sock`.
    pub socket: String,
}

/// HTTP API settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP address of the HTTP API.
    pub listen: SocketAddr,
}

/// One other node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSetting {
    /// Its node id.
    pub id: u64,
    /// Its `cluster.peer_listen` address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for PeerSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("peer {s:?} is not ID@HOST:PORT, e.g. 2@127.0.0.1:10821"))?;
        let id: u64 = id.parse().map_err(|_| format!("peer {s:?}: node id {id:?} is not a number"))?;
        let addr =
            addr.parse().map_err(|_| format!("peer {s:?}: {addr:?} is not HOST:PORT with an IP address"))?;
        Ok(PeerSetting { id, addr })
    }
}

/// Cluster membership and Raft timing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: u64,
    /// Node-to-node listen address.
    pub peer_listen: SocketAddr,
    /// Other nodes, "ID@HOST:PORT".
    pub peers: Vec<String>,
    /// A member's HTTP API address to join the cluster through (empty: no join).
    pub join: String,
    /// How long a join retries an unreachable member before giving up.
    pub join_timeout_ms: u64,
    /// Raft tick length.
    pub tick_ms: u64,
    /// Election timeout in ticks.
    pub election_ticks: usize,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Longest wait for a leader before a client request fails.
    pub io_timeout_ms: u64,
    /// Whether `POST /v1/debug/faults` may partition this node (tests only).
    pub fault_injection: bool,
    /// Move a volume's leader to the node its NBD client uses, when that node holds a copy.
    pub leader_follows_client: bool,
    /// This node's zone label: copies of a volume spread across zones (empty: none).
    #[serde(default)]
    pub zone: String,
    /// Other labels of this node (rack, room, hardware...), shown by `raftblk node list`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds without a heartbeat after which a node is dead and its copies are replaced.
    #[serde(default = "default_node_dead_after_s")]
    pub node_dead_after_s: u64,
    /// Log entries each volume keeps below what its store has durably applied.
    pub log_retain_entries: u64,
    /// Most MiB of such entries kept per volume.
    pub log_retain_mib: u64,
    /// Most MiB/s a replica being rebuilt copies from its peers (0: unlimited).
    pub rebuild_rate_mib_s: u64,
    /// Single-copy volumes acknowledge writes before they are synced, durable at FLUSH/FUA.
    #[serde(default = "default_true")]
    pub single_copy_write_back: bool,
    /// Hours between background scrubs of each volume (0: no background scrub).
    #[serde(default = "default_scrub_interval_h")]
    pub scrub_interval_h: u64,
    /// Most MiB/s of allocated data a scrub reads (0: unlimited).
    #[serde(default = "default_scrub_rate_mib_s")]
    pub scrub_rate_mib_s: u64,
}

fn default_true() -> bool {
    true
}

fn default_scrub_interval_h() -> u64 {
    crate::scrub::SCRUB_INTERVAL_H_DEFAULT
}

fn default_scrub_rate_mib_s() -> u64 {
    crate::scrub::SCRUB_RATE_MIB_S_DEFAULT
}

fn default_node_dead_after_s() -> u64 {
    60
}

impl ClusterConfig {
    /// The parsed peer list (validated at load).
    pub fn peer_list(&self) -> Vec<PeerSetting> {
        self.peers.iter().filter_map(|p| p.parse().ok()).collect()
    }
}

/// Block store settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// I/O engine choice.
    pub io_engine: IoEngineSetting,
    /// Number of io_uring threads.
    pub ring_threads: usize,
    /// How the replication WAL writes: io_uring (auto: when available) or pwrite + fdatasync.
    pub wal_engine: IoEngineSetting,
    /// MiB of block metadata each volume keeps in memory.
    #[serde(default = "default_metadata_cache_mib")]
    pub metadata_cache_mib: u64,
}

fn default_metadata_cache_mib() -> u64 {
    64
}

/// Encryption keys.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// The cluster's key-encryption key: a file of 32 bytes (or 64 hex digits), mode 0600,
    /// owned by the daemon's user. Empty: no KEK; encrypted volumes cannot be created or
    /// served on this node.
    #[serde(default)]
    pub kek_file: PathBuf,
}

/// Kernel attach (`raftblk volume attach`): timeouts the kernel NBD client is configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachConfig {
    /// Seconds before the kernel resends a request that got no answer.
    #[serde(default = "default_request_timeout_s")]
    pub request_timeout_s: u64,
    /// Seconds an attached device queues its I/O while this daemon is away (restart, upgrade).
    #[serde(default = "default_dead_conn_timeout_s")]
    pub dead_conn_timeout_s: u64,
}

fn default_request_timeout_s() -> u64 {
    60
}

fn default_dead_conn_timeout_s() -> u64 {
    600
}

impl Default for AttachConfig {
    fn default() -> Self {
        AttachConfig {
            request_timeout_s: default_request_timeout_s(),
            dead_conn_timeout_s: default_dead_conn_timeout_s(),
        }
    }
}

/// Async runtime settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 = CPU cores minus ring threads, at least 1.
    pub worker_threads: usize,
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// Default filter when RUST_LOG is unset.
    pub level: String,
}

/// A volume created on the first start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootstrapVolume {
    /// Volume name.
    pub name: String,
    /// Size with units, e.g. `1G`.
    pub size: String,
}

/// Every setting of raftblkd.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// NBD listeners.
    pub nbd: NbdConfig,
    /// HTTP API.
    pub api: ApiConfig,
    /// Cluster membership and Raft timing.
    pub cluster: ClusterConfig,
    /// Block store.
    pub storage: StorageConfig,
    /// Async runtime.
    pub runtime: RuntimeConfig,
    /// Encryption keys.
    #[serde(default)]
    pub security: SecurityConfig,
    /// Kernel attach.
    #[serde(default)]
    pub attach: AttachConfig,
    /// Logging.
    pub log: LogConfig,
    /// Volumes made on first start.
    #[serde(default)]
    pub bootstrap_volumes: Vec<BootstrapVolume>,
}

/// Overrides from flags and environment variables; `None` keeps the file's value.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// Data directory [env: RAFTBLK_DATA_DIR]
    #[arg(long, env = "RAFTBLK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NBD TCP listen address [env: RAFTBLK_NBD_LISTEN]
    #[arg(long, env = "RAFTBLK_NBD_LISTEN")]
    pub nbd_listen: Option<SocketAddr>,
    /// NBD unix socket path [env: RAFTBLK_NBD_SOCKET]
    #[arg(long, env = "RAFTBLK_NBD_SOCKET")]
    pub nbd_socket: Option<String>,
    /// HTTP API listen address [env: RAFTBLK_API_LISTEN]
    #[arg(long, env = "RAFTBLK_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// This node's id [env: RAFTBLK_NODE_ID]
    #[arg(long, env = "RAFTBLK_NODE_ID")]
    pub node_id: Option<u64>,
    /// Node-to-node listen address [env: RAFTBLK_PEER_LISTEN]
    #[arg(long, env = "RAFTBLK_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Other nodes, ID@HOST:PORT, comma-separated [env: RAFTBLK_PEERS]
    #[arg(long, env = "RAFTBLK_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Join a cluster through a member's HTTP API address (its api.listen), HOST:PORT
    /// [env: RAFTBLK_JOIN]
    #[arg(long, env = "RAFTBLK_JOIN")]
    pub join: Option<String>,
    /// How long --join retries an unreachable member, ms [env: RAFTBLK_JOIN_TIMEOUT_MS]
    #[arg(long, env = "RAFTBLK_JOIN_TIMEOUT_MS")]
    pub join_timeout_ms: Option<u64>,
    /// Longest wait for a leader before a request fails with EIO, ms [env: RAFTBLK_IO_TIMEOUT_MS]
    #[arg(long, env = "RAFTBLK_IO_TIMEOUT_MS")]
    pub io_timeout_ms: Option<u64>,
    /// Allow POST /v1/debug/faults to partition this node (tests only) [env: RAFTBLK_FAULT_INJECTION]
    #[arg(long, env = "RAFTBLK_FAULT_INJECTION")]
    pub fault_injection: Option<bool>,
    /// This node's zone label [env: RAFTBLK_ZONE]
    #[arg(long, env = "RAFTBLK_ZONE")]
    pub zone: Option<String>,
    /// A label of this node, KEY=VALUE (repeatable, e.g. --label rack=r12) [env: RAFTBLK_LABELS, comma-separated]
    #[arg(long = "label", env = "RAFTBLK_LABELS", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Seconds of silence before a node is dead and its copies are replaced [env: RAFTBLK_NODE_DEAD_AFTER_S]
    #[arg(long, env = "RAFTBLK_NODE_DEAD_AFTER_S")]
    pub node_dead_after_s: Option<u64>,
    /// Move a volume's leader to the node its client uses [env: RAFTBLK_LEADER_FOLLOWS_CLIENT]
    #[arg(long, env = "RAFTBLK_LEADER_FOLLOWS_CLIENT")]
    pub leader_follows_client: Option<bool>,
    /// Log entries kept per volume for lagging peers [env: RAFTBLK_LOG_RETAIN_ENTRIES]
    #[arg(long, env = "RAFTBLK_LOG_RETAIN_ENTRIES")]
    pub log_retain_entries: Option<u64>,
    /// MiB of log kept per volume for lagging peers [env: RAFTBLK_LOG_RETAIN_MIB]
    #[arg(long, env = "RAFTBLK_LOG_RETAIN_MIB")]
    pub log_retain_mib: Option<u64>,
    /// Rebuild copy rate limit in MiB/s, 0 = unlimited [env: RAFTBLK_REBUILD_RATE_MIB_S]
    #[arg(long, env = "RAFTBLK_REBUILD_RATE_MIB_S")]
    pub rebuild_rate_mib_s: Option<u64>,
    /// Hours between background scrubs, 0 = none [env: RAFTBLK_SCRUB_INTERVAL_H]
    #[arg(long, env = "RAFTBLK_SCRUB_INTERVAL_H")]
    pub scrub_interval_h: Option<u64>,
    /// Raft tick length in ms [env: RAFTBLK_TICK_MS]
    #[arg(long, env = "RAFTBLK_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// I/O engine [env: RAFTBLK_IO_ENGINE]
    #[arg(long, env = "RAFTBLK_IO_ENGINE", value_enum)]
    pub io_engine: Option<IoEngineSetting>,
    /// WAL engine (auto, uring, sync) [env: RAFTBLK_WAL_ENGINE]
    #[arg(long, env = "RAFTBLK_WAL_ENGINE", value_enum)]
    pub wal_engine: Option<IoEngineSetting>,
    /// Number of io_uring threads [env: RAFTBLK_RING_THREADS]
    #[arg(long, env = "RAFTBLK_RING_THREADS")]
    pub ring_threads: Option<usize>,
    /// Async worker threads, 0 = cores minus ring threads [env: RAFTBLK_WORKER_THREADS]
    #[arg(long, env = "RAFTBLK_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log format [env: RAFTBLK_LOG_FORMAT]
    #[arg(long, env = "RAFTBLK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log level filter, e.g. info or raftblk_blockdev=debug [env: RAFTBLK_LOG_LEVEL]
    #[arg(long, env = "RAFTBLK_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Volumes to create on first start, NAME:SIZE, comma-separated; "none" for none
    /// The key-encryption key file (security.kek_file) [env: RAFTBLK_KEK_FILE]
    #[arg(long, env = "RAFTBLK_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// [env: RAFTBLK_BOOTSTRAP_VOLUMES]
    #[arg(long, env = "RAFTBLK_BOOTSTRAP_VOLUMES", value_delimiter = ',')]
    pub bootstrap_volumes: Option<Vec<String>>,
}

impl Config {
    /// Loads the embedded default, overlays `file` (if any), then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut merged: toml::Table = parse_table("embedded default", DEFAULT_CONFIG_TOML)?;
        // Whether the operator set the node id and peer address (file or flag) rather than
        // inheriting the defaults: a joining node with the default id 1 would collide with
        // the first node of almost every cluster, so --join insists on both.
        let mut explicit =
            Explicit { node_id: overrides.node_id.is_some(), peer_listen: overrides.peer_listen.is_some() };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
            let user = parse_table(&path.display().to_string(), &text)?;
            if let Some(toml::Value::Table(c)) = user.get("cluster") {
                explicit.node_id |= c.contains_key("node_id");
                explicit.peer_listen |= c.contains_key("peer_listen");
            }
            overlay(&mut merged, user);
        }
        let source = file.map_or("embedded default".to_string(), |p| p.display().to_string());
        let mut config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: source, message: e.to_string() })?;
        config.apply(overrides)?;
        config.validate()?;
        config.validate_join(explicit)?;
        Ok(config)
    }

    /// Checks the `cluster.join` settings: a usable member address, and an id and peer
    /// address of this node's own (see [`Explicit`]).
    fn validate_join(&self, explicit: Explicit) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.join.is_empty() {
            return Ok(());
        }
        join_target(&c.join).map_err(|message| ConfigError::Invalid { key: "cluster.join", message })?;
        if !explicit.node_id {
            return Err(ConfigError::Invalid {
                key: "cluster.node_id",
                message: "--join needs this node's own id: give --node-id N (RAFTBLK_NODE_ID, or cluster.node_id in the config file), unique in the cluster".into(),
            });
        }
        if !explicit.peer_listen {
            return Err(ConfigError::Invalid {
                key: "cluster.peer_listen",
                message: "--join needs the address other nodes reach this one at: give --peer-listen HOST:PORT (RAFTBLK_PEER_LISTEN, or cluster.peer_listen)".into(),
            });
        }
        if c.peer_listen.ip().is_unspecified() || c.peer_listen.port() == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.peer_listen",
                message: format!(
                    "{} is not an address other nodes can connect to, and a joining node announces it to them; give this host's IP and a fixed port",
                    c.peer_listen
                ),
            });
        }
        if c.join_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.join_timeout_ms",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.kek_file {
            self.security.kek_file = v.clone();
        }
        if let Some(v) = o.nbd_listen {
            self.nbd.listen = v;
        }
        if let Some(v) = &o.nbd_socket {
            self.nbd.socket = v.clone();
        }
        if let Some(v) = o.api_listen {
            self.api.listen = v;
        }
        if let Some(v) = o.node_id {
            self.cluster.node_id = v;
        }
        if let Some(v) = o.peer_listen {
            self.cluster.peer_listen = v;
        }
        if let Some(v) = &o.peers {
            self.cluster.peers = v.iter().filter(|p| !p.is_empty()).cloned().collect();
        }
        if let Some(v) = &o.join {
            self.cluster.join = v.trim().to_string();
        }
        if let Some(v) = o.join_timeout_ms {
            self.cluster.join_timeout_ms = v;
        }
        if let Some(v) = o.io_timeout_ms {
            self.cluster.io_timeout_ms = v;
        }
        if let Some(v) = o.fault_injection {
            self.cluster.fault_injection = v;
        }
        if let Some(v) = &o.zone {
            self.cluster.zone = v.clone();
        }
        if let Some(v) = &o.labels {
            for l in v.iter().filter(|l| !l.is_empty()) {
                let (key, value) = crate::model::parse_label(l)
                    .map_err(|message| ConfigError::Invalid { key: "cluster.labels", message })?;
                self.cluster.labels.insert(key, value);
            }
        }
        if let Some(v) = o.node_dead_after_s {
            self.cluster.node_dead_after_s = v;
        }
        if let Some(v) = o.leader_follows_client {
            self.cluster.leader_follows_client = v;
        }
        if let Some(v) = o.tick_ms {
            self.cluster.tick_ms = v;
        }
        if let Some(v) = o.log_retain_entries {
            self.cluster.log_retain_entries = v;
        }
        if let Some(v) = o.log_retain_mib {
            self.cluster.log_retain_mib = v;
        }
        if let Some(v) = o.rebuild_rate_mib_s {
            self.cluster.rebuild_rate_mib_s = v;
        }
        if let Some(v) = o.scrub_interval_h {
            self.cluster.scrub_interval_h = v;
        }
        if let Some(v) = o.io_engine {
            self.storage.io_engine = v;
        }
        if let Some(v) = o.wal_engine {
            self.storage.wal_engine = v;
        }
        if let Some(v) = o.ring_threads {
            self.storage.ring_threads = v;
        }
        if let Some(v) = o.worker_threads {
            self.runtime.worker_threads = v;
        }
        if let Some(v) = o.log_format {
            self.log.format = v;
        }
        if let Some(v) = &o.log_level {
            self.log.level = v.clone();
        }
        if let Some(list) = &o.bootstrap_volumes {
            self.bootstrap_volumes = parse_bootstrap_list(list)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=16).contains(&self.storage.ring_threads) {
            return Err(ConfigError::Invalid {
                key: "storage.ring_threads",
                message: format!("{} is out of range; use 1 to 16", self.storage.ring_threads),
            });
        }
        if self.attach.request_timeout_s == 0 {
            // 0 would make the kernel wait forever for a request in flight when the daemon died.
            return Err(ConfigError::Invalid {
                key: "attach.request_timeout_s",
                message: "0 would leave requests in flight at a restart waiting forever; use 1 or more"
                    .into(),
            });
        }
        let c = &self.cluster;
        if c.node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.node_id",
                message: "0 is reserved; use 1 or more".into(),
            });
        }
        let mut ids = vec![c.node_id];
        for p in &c.peers {
            let peer: PeerSetting =
                p.parse().map_err(|message| ConfigError::Invalid { key: "cluster.peers", message })?;
            if ids.contains(&peer.id) {
                return Err(ConfigError::Invalid {
                    key: "cluster.peers",
                    message: format!(
                        "node id {} appears twice (this node is {}); every node needs its own id",
                        peer.id, c.node_id
                    ),
                });
            }
            ids.push(peer.id);
        }
        if c.tick_ms == 0 || c.heartbeat_ticks == 0 || c.election_ticks <= c.heartbeat_ticks {
            return Err(ConfigError::Invalid {
                key: "cluster.tick_ms/election_ticks/heartbeat_ticks",
                message: "tick_ms and heartbeat_ticks must be at least 1 and election_ticks larger than heartbeat_ticks".into(),
            });
        }
        if c.node_dead_after_s < 5 {
            return Err(ConfigError::Invalid {
                key: "cluster.node_dead_after_s",
                message: format!(
                    "{} s would declare nodes dead over a few missed heartbeats (one a second); use 5 or more",
                    c.node_dead_after_s
                ),
            });
        }
        if c.io_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "cluster.io_timeout_ms",
                message: "must be at least 1".into(),
            });
        }
        if self.runtime.worker_threads > 256 {
            return Err(ConfigError::Invalid {
                key: "runtime.worker_threads",
                message: format!("{} is out of range; use 0 (automatic) to 256", self.runtime.worker_threads),
            });
        }
        for v in &self.bootstrap_volumes {
            parse_size(&v.size).map_err(|e| ConfigError::Invalid {
                key: "bootstrap_volumes.size",
                message: format!("volume {:?}: {e}", v.name),
            })?;
        }
        Ok(())
    }

    /// Worker threads to start, with the automatic default (0) resolved for `cores`.
    pub fn worker_threads(&self, cores: usize) -> usize {
        match self.runtime.worker_threads {
            0 => cores.saturating_sub(self.storage.ring_threads).max(1),
            n => n,
        }
    }

    /// The unix socket path, with the empty default resolved.
    pub fn nbd_socket_path(&self) -> PathBuf {
        if self.nbd.socket.is_empty() {
            self.data_dir.join("nbd.sock")
        } else {
            PathBuf::from(&self.nbd.socket)
        }
    }
}

/// Which cluster settings the operator gave rather than inherited from the defaults.
#[derive(Debug, Clone, Copy)]
struct Explicit {
    node_id: bool,
    peer_listen: bool,
}

/// The base URL of the member API named by `cluster.join`: `HOST:PORT` or
/// `http://HOST:PORT` (a trailing `/` is dropped). The port is required because the API
/// and the peer transport listen on different ports and guessing would pick the wrong one.
pub fn join_target(join: &str) -> Result<String, String> {
    let hint = "use the HTTP API address (api.listen) of a running member, HOST:PORT, e.g. 10.0.0.1:10810";
    if join.starts_with("https://") {
        return Err(format!("join address {join:?}: raftblkd's API speaks plain HTTP; {hint}"));
    }
    let rest = join.strip_prefix("http://").unwrap_or(join).trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains(char::is_whitespace) {
        return Err(format!("join address {join:?} is not HOST:PORT; {hint}"));
    }
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if !port_ok {
        return Err(format!("join address {join:?} has no port; {hint}"));
    }
    Ok(format!("http://{rest}"))
}

fn parse_bootstrap_list(list: &[String]) -> Result<Vec<BootstrapVolume>, ConfigError> {
    if list.len() == 1 && (list[0] == "none" || list[0].is_empty()) {
        return Ok(Vec::new());
    }
    list.iter()
        .map(|item| match item.split_once(':') {
            Some((name, size)) if !name.is_empty() && !size.is_empty() => {
                Ok(BootstrapVolume { name: name.to_string(), size: size.to_string() })
            }
            _ => Err(ConfigError::Invalid {
                key: "bootstrap_volumes",
                message: format!("{item:?} is not NAME:SIZE (e.g. vol0:1G), or \"none\""),
            }),
        })
        .collect()
}

fn parse_table(path: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse { path: path.to_string(), message: e.to_string() })
}

/// Lays `top` over `base`: tables merge key by key, everything else replaces.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn embedded_default_loads() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.nbd.listen.to_string(), "127.0.0.1:10809");
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:10810");
        assert_eq!(c.nbd_socket_path(), PathBuf::from("/var/lib/raftblk/nbd.sock"));
        assert_eq!(c.bootstrap_volumes.len(), 1);
    }

    #[test]
    fn file_overlays_default_and_flags_override_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "data_dir = \"/srv/rb\"\n[api]\nlisten = \"127.0.0.1:9999\"").unwrap();
        let o = Overrides { api_listen: Some("127.0.0.1:7777".parse().unwrap()), ..Default::default() };
        let c = Config::load(Some(f.path()), &o).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/srv/rb"));
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:7777");
        // Keys the file did not mention keep their defaults.
        assert_eq!(c.nbd.listen.to_string(), "127.0.0.1:10809");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_key() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[nbd]\nlisten_addr = \"x\"").unwrap();
        let e = Config::load(Some(f.path()), &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("listen_addr"), "{e}");
        let o = Overrides { ring_threads: Some(0), ..Default::default() };
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("ring_threads"), "{e}");
        let o = Overrides { bootstrap_volumes: Some(vec!["vol0".into()]), ..Default::default() };
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("NAME:SIZE"), "{e}");
    }

    #[test]
    fn automatic_worker_threads_leave_cores_to_the_rings() {
        let mut c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.worker_threads(2), 1);
        assert_eq!(c.worker_threads(8), 7);
        assert_eq!(c.worker_threads(1), 1);
        c.runtime.worker_threads = 3;
        assert_eq!(c.worker_threads(2), 3);
    }

    #[test]
    fn peers_parse_and_bad_peers_say_what_to_write() {
        let o = Overrides {
            node_id: Some(2),
            peers: Some(vec!["1@127.0.0.1:10811".into(), "3@127.0.0.1:10831".into()]),
            ..Default::default()
        };
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.cluster.peer_list().len(), 2);
        assert_eq!(c.cluster.peer_list()[1].id, 3);
        for (bad, hint) in
            [("127.0.0.1:1", "ID@HOST:PORT"), ("x@127.0.0.1:1", "not a number"), ("2@nowhere", "HOST:PORT")]
        {
            let o = Overrides { peers: Some(vec![bad.into()]), ..Default::default() };
            let e = Config::load(None, &o).unwrap_err().to_string();
            assert!(e.contains(hint), "{bad}: {e}");
        }
        let o = Overrides { peers: Some(vec!["1@127.0.0.1:1".into()]), ..Default::default() };
        assert!(Config::load(None, &o).unwrap_err().to_string().contains("appears twice"));
        let o = Overrides { node_id: Some(0), ..Default::default() };
        assert!(Config::load(None, &o).unwrap_err().to_string().contains("node_id"));
    }

    #[test]
    fn wal_engine_defaults_to_auto_and_can_be_set_by_file_or_flag() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.storage.wal_engine, IoEngineSetting::Auto);
        for (text, expect) in [("sync", IoEngineSetting::Sync), ("io_uring", IoEngineSetting::Uring)] {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            writeln!(f, "[storage]\nwal_engine = \"{text}\"").unwrap();
            let c = Config::load(Some(f.path()), &Overrides::default()).unwrap();
            assert_eq!(c.storage.wal_engine, expect, "{text}");
            assert_eq!(c.storage.io_engine, IoEngineSetting::Auto, "the block store's engine is separate");
        }
        let o = Overrides { wal_engine: Some(IoEngineSetting::Uring), ..Default::default() };
        assert_eq!(Config::load(None, &o).unwrap().storage.wal_engine, IoEngineSetting::Uring);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[storage]\nwal_engine = \"aio\"").unwrap();
        let e = Config::load(Some(f.path()), &Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("aio"), "{e}");
    }

    #[test]
    fn join_parses_from_flags_and_file_and_needs_an_id_and_peer_address() {
        let o = Overrides {
            node_id: Some(4),
            peer_listen: Some("127.0.0.1:10841".parse().unwrap()),
            join: Some("127.0.0.1:10810".into()),
            ..Default::default()
        };
        let c = Config::load(None, &o).unwrap();
        assert_eq!(c.cluster.join, "127.0.0.1:10810");
        assert_eq!(c.cluster.join_timeout_ms, 60_000);
        assert_eq!(join_target(&c.cluster.join).unwrap(), "http://127.0.0.1:10810");
        assert_eq!(join_target("http://node1.example:10810/").unwrap(), "http://node1.example:10810");

        // From the file: the file's node id and peer address count as given.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "[cluster]\nnode_id = 5\npeer_listen = \"10.0.0.5:10811\"\njoin = \"10.0.0.1:10810\"\njoin_timeout_ms = 500"
        )
        .unwrap();
        let c = Config::load(Some(f.path()), &Overrides::default()).unwrap();
        assert_eq!(
            (c.cluster.node_id, c.cluster.join.as_str(), c.cluster.join_timeout_ms),
            (5, "10.0.0.1:10810", 500)
        );
        // The default is no join.
        assert!(Config::load(None, &Overrides::default()).unwrap().cluster.join.is_empty());

        let join_only = Overrides { join: Some("127.0.0.1:10810".into()), ..Default::default() };
        let e = Config::load(None, &join_only).unwrap_err().to_string();
        assert!(e.contains("--node-id"), "{e}");
        let no_peer_listen = Overrides { node_id: Some(4), ..join_only.clone() };
        let e = Config::load(None, &no_peer_listen).unwrap_err().to_string();
        assert!(e.contains("--peer-listen"), "{e}");
        let unspecified =
            Overrides { peer_listen: Some("0.0.0.0:10841".parse().unwrap()), ..no_peer_listen.clone() };
        let e = Config::load(None, &unspecified).unwrap_err().to_string();
        assert!(e.contains("cannot connect") || e.contains("can connect"), "{e}");
        for (bad, hint) in [
            ("127.0.0.1", "no port"),
            ("https://a:1", "plain HTTP"),
            ("a:1/v1", "not HOST:PORT"),
            (":10810", "no port"),
        ] {
            let o = Overrides { join: Some(bad.into()), ..o.clone() };
            let e = Config::load(None, &o).unwrap_err().to_string();
            assert!(e.contains("cluster.join") && e.contains(hint), "{bad}: {e}");
        }
    }

    #[test]
    fn zone_and_dead_timeout_have_defaults_flags_and_a_floor() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!((c.cluster.zone.as_str(), c.cluster.node_dead_after_s), ("", 60));
        let o = Overrides { zone: Some("rack-a".into()), node_dead_after_s: Some(30), ..Default::default() };
        let c = Config::load(None, &o).unwrap();
        assert_eq!((c.cluster.zone.as_str(), c.cluster.node_dead_after_s), ("rack-a", 30));
        let o = Overrides { labels: Some(vec!["rack=r1".into(), "disk=ssd".into()]), ..Default::default() };
        let labels = Config::load(None, &o).unwrap().cluster.labels;
        assert_eq!(labels.get("rack").map(String::as_str), Some("r1"));
        assert_eq!(labels.len(), 2);
        let o = Overrides { labels: Some(vec!["rack".into()]), ..Default::default() };
        assert!(Config::load(None, &o).unwrap_err().to_string().contains("KEY=VALUE"));
        let o = Overrides { node_dead_after_s: Some(2), ..Default::default() };
        let e = Config::load(None, &o).unwrap_err().to_string();
        assert!(e.contains("cluster.node_dead_after_s") && e.contains("5 or more"), "{e}");
    }

    #[test]
    fn bootstrap_none_clears_the_list() {
        let o = Overrides { bootstrap_volumes: Some(vec!["none".into()]), ..Default::default() };
        assert!(Config::load(None, &o).unwrap().bootstrap_volumes.is_empty());
    }
}
