//! raftblk: the command-line client of raftblkd's HTTP API. Human tables by
//! default, `--json` for scripts.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use raftblk_daemon::api::NodeInfo;
use raftblk_daemon::api_client::{ApiClient, ApiFailure};
use raftblk_daemon::cluster_catalog::settings::SettingView;
use raftblk_daemon::cluster_catalog::CatalogStatus;
use raftblk_daemon::scrub::ScrubStatus;
use raftblk_daemon::size::{format_size, parse_size};
use raftblk_daemon::volumes::{NodeStatus, VolumeHealth, VolumeStatus};
use serde_json::{json, Value};

/// Writes to stdout as `print!`/`println!` do, but a closed stdout (`raftblk volume list |
/// head`) ends the process quietly instead of panicking, and another write error is reported.
macro_rules! out {
    (@write $how:ident, $($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = $how!(stdout, $($arg)*).and_then(|()| stdout.flush()) {
            stdout_failed(e);
        }
    }};
    () => { out!(@write writeln,) };
    ($($arg:tt)*) => { out!(@write writeln, $($arg)*) };
}

/// As [`out!`], without the newline.
macro_rules! out_part {
    ($($arg:tt)*) => { out!(@write write, $($arg)*) };
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

#[derive(Debug, Parser)]
#[command(name = "raftblk", version, about = "Manage raftblk volumes")]
struct Cli {
    /// raftblkd API address [env: RAFTBLK_API]
    #[arg(long, global = true, env = "RAFTBLK_API", default_value = "http://127.0.0.1:10810")]
    api: String,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage volumes
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Show the nodes, the volumes and their health at a glance
    Status,
    /// Manage nodes: list, cordon, drain, remove
    #[command(subcommand)]
    Node(NodeCommand),
    /// Cluster-wide settings, kept in the cluster catalog
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Run a local cluster of raftblkd processes on loopback until Ctrl-C
    DevCluster {
        /// Number of nodes
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// Parent of the nodes' data directories (node1, node2, ...)
        #[arg(long, default_value = "/var/lib/raftblk/dev-cluster")]
        base_dir: std::path::PathBuf,
        /// Node i listens on BASE+10(i-1) (NBD), +1 (API), +2 (peers)
        #[arg(long, default_value_t = 10809)]
        base_port: u16,
        /// Size of the volume "vol0" created on the first start ("0" for none)
        #[arg(long, default_value = "1G")]
        volume_size: String,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Every cluster setting, its value in force and where it comes from
    Settings,
    /// Set a cluster setting for every node, e.g. `cluster set node_dead_after_s 120`
    Set {
        /// Setting (see `raftblk cluster settings`)
        key: String,
        /// Value: a number, true or false
        value: String,
    },
    /// Rewrap every encrypted volume's data key with a new key-encryption key, online:
    /// every node must have the new key file at the same path (mode 0600)
    RotateKek {
        /// The new KEK file (32 bytes or 64 hex digits)
        #[arg(long)]
        key_file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Every node: alive or not, operator state, zone, free space, copies held
    List,
    /// Place no new copies on NODE (its copies stay)
    Cordon {
        /// Node id
        node: u64,
    },
    /// Undo cordon or drain: NODE takes copies again
    Uncordon {
        /// Node id
        node: u64,
    },
    /// Move every copy off NODE (I/O keeps running); waits and shows progress unless --no-wait
    Drain {
        /// Node id
        node: u64,
        /// Return once the drain is recorded
        #[arg(long)]
        no_wait: bool,
    },
    /// Take NODE out of the cluster: its copies move away first (it may be dead already)
    Remove {
        /// Node id
        node: u64,
        /// Return once the removal is recorded
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a thin-provisioned volume
    Create {
        /// Volume name (also its NBD export name)
        name: String,
        /// Size, e.g. 10G, 512M (powers of 1024)
        #[arg(long, short)]
        size: String,
        /// Serve the volume read-only
        #[arg(long)]
        read_only: bool,
        /// Extra copies on other nodes (0 to 4); a cluster of at least replicas+1 nodes is needed
        #[arg(long, short, default_value_t = 0)]
        replicas: u8,
        /// A label KEY=VALUE kept with the volume (repeat for more)
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Encrypt the volume at rest (AES-256-GCM under a data key of its own, wrapped by
        /// the cluster KEK: every node needs security.kek_file)
        #[arg(long)]
        encrypted: bool,
    },
    /// Add a copy on NODE: it joins as a learner, catches up from the log, then votes
    AddReplica {
        /// Volume name
        name: String,
        /// Node id
        node: u64,
    },
    /// Remove the copy on NODE (leadership moves away first if NODE leads)
    RemoveReplica {
        /// Volume name
        name: String,
        /// Node id
        node: u64,
    },
    /// Move the copy on FROM to TO (add on TO, then remove from FROM)
    MoveReplica {
        /// Volume name
        name: String,
        /// Node that gives up its copy
        from: u64,
        /// Node that receives a copy
        to: u64,
    },
    /// Move the volume's Raft leader (its primary) to NODE, which must hold a copy
    TransferLeader {
        /// Volume name
        name: String,
        /// Node id
        node: u64,
    },
    /// List volumes
    #[command(alias = "ls")]
    List,
    /// Show one volume in detail
    Inspect {
        /// Volume name
        name: String,
        /// Keep showing rebuild progress (a bar per copy being rebuilt) until none is left
        #[arg(long)]
        watch: bool,
    },
    /// Read and check every block of every copy; repair damage from good copies
    Scrub {
        /// Volume name
        name: String,
        /// Start it and return (`volume scrub NAME --status` shows how it goes)
        #[arg(long)]
        no_wait: bool,
        /// Show the running (or last) scrub instead of starting one
        #[arg(long)]
        status: bool,
    },
    /// Grow a volume (shrinking is refused)
    #[command(alias = "grow")]
    Resize {
        /// Volume name
        name: String,
        /// New size, e.g. 20G
        size: String,
    },
    /// Attach a volume as a local kernel block device (/dev/nbdN), served by this node's
    /// raftblkd; it stays attached across restarts of the daemon
    Attach {
        /// Volume name
        name: String,
        /// Attach read-only (writes fail with EPERM)
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a volume's local kernel device (refused while it is mounted, unless --force)
    Detach {
        /// Volume name or device (/dev/nbd0)
        target: String,
        /// Detach even while mounted (its file system then gets I/O errors)
        #[arg(long)]
        force: bool,
    },
    /// List this node's kernel attachments
    Attachments,
    /// Publish a volume to a node (what CSI ControllerPublish does): read-write is one node
    /// at a time; the answer's generation fences older attachments' writes
    Publish {
        /// Volume name
        name: String,
        /// Node id
        #[arg(long)]
        node: u64,
        /// Read-only (many nodes may hold it so)
        #[arg(long)]
        read_only: bool,
        /// Take it over from a live holder (an operator's force-detach; the holder's writes are then refused)
        #[arg(long)]
        force: bool,
    },
    /// Remove a node's publication of a volume (idempotent)
    Unpublish {
        /// Volume name
        name: String,
        /// Node id
        #[arg(long)]
        node: u64,
    },
    /// Delete a volume and its data
    #[command(alias = "rm")]
    Delete {
        /// Volume name
        name: String,
        /// Delete even while NBD clients are connected (their I/O then fails)
        #[arg(long)]
        force: bool,
    },
}

struct Client {
    api: ApiClient,
}

impl Client {
    fn new(api: &str) -> Self {
        Client { api: ApiClient::new(api, std::time::Duration::from_secs(600)) }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        match self.api.call_blocking(method, path, body) {
            Ok(v) => Ok(v),
            Err(ApiFailure { status: 0, message }) => Err(anyhow!(
                "{message}; is it running? Start it with `raftblkd` or point --api / RAFTBLK_API at it"
            )),
            Err(ApiFailure { status, message }) => Err(anyhow!("{message} (HTTP {status})")),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let client = Client::new(&cli.api);
    match &cli.command {
        Command::Status => {
            let node: NodeInfo = serde_json::from_value(client.call("GET", "/v1/node", None)?)?;
            let volumes: Vec<VolumeStatus> =
                serde_json::from_value(client.call("GET", "/v1/volumes", None)?)?;
            // A node alone has no node table; that is not an error for a status view.
            let nodes: Vec<NodeStatus> = client
                .call("GET", "/v1/nodes", None)
                .ok()
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default();
            let catalog: Option<CatalogStatus> =
                client.call("GET", "/v1/catalog", None).ok().and_then(|v| serde_json::from_value(v).ok());
            if cli.json {
                out!("{:#}", json!({ "node": node, "nodes": nodes, "catalog": catalog, "volumes": volumes }));
            } else {
                out!(
                    "raftblkd {}  engine {}  nbd {} and {}  data {}",
                    node.version,
                    node.io_engine,
                    node.nbd_listen,
                    node.nbd_socket,
                    node.data_dir
                );
                if !nodes.is_empty() {
                    out!();
                    print_nodes(&nodes);
                }
                if let Some(c) = &catalog {
                    let leader = if c.leader == 0 {
                        "none (no quorum)".to_string()
                    } else {
                        format!("node {}", c.leader)
                    };
                    out!(
                        "\ncatalog: leader {leader}, term {}, voters {:?}, learners {:?}, applied {} of {}",
                        c.term,
                        c.voters,
                        c.learners,
                        c.applied_index,
                        c.commit_index
                    );
                }
                out!();
                print_volumes(&volumes);
                let count = |h: VolumeHealth| volumes.iter().filter(|v| v.health == h).count();
                out!(
                    "\n{} volume{}: {} healthy, {} rebuilding, {} degraded",
                    volumes.len(),
                    if volumes.len() == 1 { "" } else { "s" },
                    count(VolumeHealth::Healthy),
                    count(VolumeHealth::Rebuilding),
                    count(VolumeHealth::Degraded)
                );
            }
        }
        Command::Node(cmd) => node_command(cli, &client, cmd)?,
        Command::Cluster(cmd) => {
            let v = match cmd {
                ClusterCommand::Settings => client.call("GET", "/v1/cluster/settings", None)?,
                ClusterCommand::Set { key, value } => {
                    let value = raftblk_daemon::cluster_catalog::settings::parse_cli_value(value);
                    client.call("PUT", "/v1/cluster/settings", Some(json!({ key.as_str(): value })))?
                }
                ClusterCommand::RotateKek { key_file } => {
                    let path = std::fs::canonicalize(key_file)
                        .with_context(|| format!("--key-file {}: no such file here", key_file.display()))?;
                    let v =
                        client.call("POST", "/v1/cluster/rotate-kek", Some(json!({ "key_file": path })))?;
                    if cli.json {
                        out!("{v:#}");
                    } else {
                        out!(
                            "KEK rotated to {}: {} encrypted volume(s) rewrapped on nodes {}\n{}",
                            v["kek"].as_str().unwrap_or("?"),
                            v["volumes_rewrapped"],
                            v["nodes"],
                            v["next"].as_str().unwrap_or("")
                        );
                    }
                    return Ok(());
                }
            };
            if cli.json {
                out!("{v:#}");
            } else {
                let settings: Vec<SettingView> = serde_json::from_value(v)?;
                out!("{:<24} {:<8} {:<20} MEANING", "SETTING", "VALUE", "FROM");
                for s in settings {
                    out!("{:<24} {:<8} {:<20} {}", s.key, s.value.to_string(), s.source, s.help);
                }
            }
        }
        Command::Volume(cmd) => volume(cli, &client, cmd)?,
        Command::DevCluster { nodes, base_dir, base_port, volume_size } => {
            dev_cluster(*nodes, base_dir, *base_port, volume_size)?
        }
    }
    Ok(())
}

fn dev_cluster(n: u16, base_dir: &std::path::Path, base_port: u16, volume_size: &str) -> Result<()> {
    use raftblk_daemon::devcluster::{layout, DevCluster};
    let size = parse_size(volume_size).map_err(|e| anyhow!("--volume-size: {e}"))?;
    let exe = std::env::current_exe().context("locating the raftblk executable")?;
    let daemon = exe.with_file_name("raftblkd");
    if !daemon.exists() {
        bail!(
            "raftblkd not found next to raftblk ({}); build both with `cargo build --release`",
            daemon.display()
        );
    }
    let nodes = layout(n, base_dir, base_port)?;
    let mut cluster = DevCluster::start(&daemon, nodes)?;
    let first = &cluster.nodes[0];
    let client = Client::new(&format!("127.0.0.1:{}", first.api_port));
    if size > 0 && client.call("GET", "/v1/volumes/vol0", None).is_err() {
        let replicas = (n - 1).min(2);
        client.call(
            "POST",
            "/v1/volumes",
            Some(json!({"name": "vol0", "size": size, "replicas": replicas})),
        )?;
        out!("created volume vol0 ({}, replicas={replicas})", format_size(size));
    }
    out!("{:<5} {:<24} {:<24} {:<16} DATA", "NODE", "NBD", "API", "PEER");
    for node in &cluster.nodes {
        out!(
            "{:<5} {:<24} {:<24} {:<16} {}",
            node.id,
            format!("nbd://127.0.0.1:{}/", node.nbd_port),
            format!("http://127.0.0.1:{}", node.api_port),
            format!("127.0.0.1:{}", node.peer_port),
            node.data_dir.display()
        );
    }
    out!("every node serves every volume; e.g. nbdinfo nbd://127.0.0.1:{}/vol0", first.nbd_port);
    out!("logs: <data dir>/raftblkd.log; Ctrl-C stops the cluster");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        signal_hook_flag(sig, stop.clone())?;
    }
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for (id, status) in cluster.exited() {
            eprintln!("node {id} exited ({status}); the others keep running");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    out!("stopping the cluster");
    cluster.stop(std::time::Duration::from_secs(30));
    Ok(())
}

/// Sets `flag` when `sig` arrives.
fn signal_hook_flag(sig: libc::c_int, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    signal_hook::flag::register(sig, flag).map(|_| ()).context("installing a signal handler")
}

fn volume(cli: &Cli, client: &Client, cmd: &VolumeCommand) -> Result<()> {
    match cmd {
        VolumeCommand::Create { name, size, read_only, replicas, labels, encrypted } => {
            let bytes = parse_size(size).map_err(|e| anyhow!("--size: {e}"))?;
            let labels: std::collections::BTreeMap<String, String> = labels
                .iter()
                .map(|l| raftblk_daemon::model::parse_label(l).map_err(|e| anyhow!("--label: {e}")))
                .collect::<Result<_>>()?;
            let mut body = json!({"name": name, "size": bytes, "read_only": read_only, "replicas": replicas, "labels": labels});
            if *encrypted {
                // Only when asked for: a daemon from before encryption refuses the field.
                body["encrypted"] = json!(true);
            }
            let v = client.call("POST", "/v1/volumes", Some(body))?;
            show_one(cli, v, "created")?;
        }
        VolumeCommand::List => {
            let v = client.call("GET", "/v1/volumes", None)?;
            if cli.json {
                out!("{v:#}");
            } else {
                print_volumes(&serde_json::from_value::<Vec<VolumeStatus>>(v)?);
            }
        }
        VolumeCommand::Inspect { name, watch } => {
            let path = format!("/v1/volumes/{}", path_segment(name)?);
            let v = client.call("GET", &path, None)?;
            show_one(cli, v.clone(), "")?;
            if *watch && !cli.json {
                watch_rebuilds(client, &path, v)?;
            }
        }
        VolumeCommand::Scrub { name, no_wait, status } => {
            let path = format!("/v1/volumes/{}/scrub", path_segment(name)?);
            let v =
                if *status { client.call("GET", &path, None)? } else { client.call("POST", &path, None)? };
            let v = if *no_wait || *status { v } else { watch_scrub(client, &path, v, cli.json)? };
            let s: ScrubStatus = serde_json::from_value(v.clone())?;
            if cli.json {
                out!("{:#}", serde_json::to_value(&s.summary)?);
            } else {
                print_scrub(name, &s);
            }
            if !s.running && s.summary.as_ref().is_some_and(|x| !x.bad_copies().is_empty()) {
                std::process::exit(3);
            }
        }
        VolumeCommand::Resize { name, size } => {
            let bytes = parse_size(size).map_err(|e| anyhow!("size: {e}"))?;
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/resize", path_segment(name)?),
                Some(json!({"size": bytes})),
            )?;
            show_one(cli, v, "resized")?;
        }
        VolumeCommand::Attach { name, read_only } => {
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/attach", path_segment(name)?),
                Some(json!({"read_only": read_only})),
            )?;
            if cli.json {
                out!("{v:#}");
            } else {
                out!("{}", v["device"].as_str().unwrap_or("?"));
            }
        }
        VolumeCommand::Detach { target, force } => {
            let v = client.call("POST", "/v1/detach", Some(json!({"target": target, "force": force})))?;
            if cli.json {
                out!("{v:#}");
            } else {
                out!(
                    "detached {} ({})",
                    v["volume"].as_str().unwrap_or("?"),
                    v["device"].as_str().unwrap_or("?")
                );
            }
        }
        VolumeCommand::Publish { name, node, read_only, force } => {
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/publish", path_segment(name)?),
                Some(json!({"node": node, "read_only": read_only, "force": force})),
            )?;
            if cli.json {
                out!("{v:#}");
            } else {
                out!(
                    "published {name} to node {node} ({}), generation {}",
                    if v["read_only"].as_bool().unwrap_or(false) { "read-only" } else { "read-write" },
                    v["generation"].as_u64().unwrap_or(0)
                );
            }
        }
        VolumeCommand::Unpublish { name, node } => {
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/unpublish", path_segment(name)?),
                Some(json!({"node": node})),
            )?;
            if cli.json {
                out!("{v:#}");
            } else {
                out!("unpublished {name} from node {node}");
            }
        }
        VolumeCommand::Attachments => {
            let v = client.call("GET", "/v1/attachments", None)?;
            if cli.json {
                out!("{v:#}");
            } else {
                out!("{:<12} {:<20} {:<10} {:>10}", "DEVICE", "VOLUME", "MODE", "GENERATION");
                for a in v.as_array().into_iter().flatten() {
                    out!(
                        "{:<12} {:<20} {:<10} {:>10}",
                        a["device"].as_str().unwrap_or("?"),
                        a["volume"].as_str().unwrap_or("?"),
                        if a["read_only"].as_bool().unwrap_or(false) { "ro" } else { "rw" },
                        a["generation"].as_u64().unwrap_or(0)
                    );
                }
            }
        }
        VolumeCommand::AddReplica { name, node } => {
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/replicas", path_segment(name)?),
                Some(json!({"add": node})),
            )?;
            show_one(cli, v, "added a copy to")?;
        }
        VolumeCommand::RemoveReplica { name, node } => {
            let v = client.call(
                "POST",
                &format!("/v1/volumes/{}/replicas", path_segment(name)?),
                Some(json!({"remove": node})),
            )?;
            show_one(cli, v, "removed a copy from")?;
        }
        VolumeCommand::MoveReplica { name, from, to } => {
            let path = format!("/v1/volumes/{}/replicas", path_segment(name)?);
            client.call("POST", &path, Some(json!({"add": to})))?;
            let v = client.call("POST", &path, Some(json!({"remove": from})))?;
            show_one(cli, v, &format!("moved the copy on node {from} to node {to} of"))?;
        }
        VolumeCommand::TransferLeader { name, node } => {
            client.call(
                "POST",
                &format!("/v1/volumes/{}/transfer-leader", path_segment(name)?),
                Some(json!({"to": node})),
            )?;
            if cli.json {
                out!("{}", json!({"volume": name, "transfer_to": node}));
            } else {
                out!("asked the leader of {name} to hand over to node {node}; `raftblk volume inspect {name}` shows the leader");
            }
        }
        VolumeCommand::Delete { name, force } => {
            client.call("DELETE", &format!("/v1/volumes/{}?force={force}", path_segment(name)?), None)?;
            if cli.json {
                out!("{}", json!({"deleted": name}));
            } else {
                out!("deleted volume {name}");
            }
        }
    }
    Ok(())
}

/// Volume names never need escaping; anything that would is refused here with the rule.
fn path_segment(name: &str) -> Result<&str> {
    if name.is_empty()
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        || name.starts_with('.')
    {
        bail!("volume name {name:?} is not allowed; names use letters, digits, '.', '-' and '_', starting with a letter or digit");
    }
    Ok(name)
}

fn show_one(cli: &Cli, v: Value, verb: &str) -> Result<()> {
    if cli.json {
        out!("{v:#}");
        return Ok(());
    }
    let s: VolumeStatus = serde_json::from_value(v)?;
    if !verb.is_empty() {
        out!("{verb} volume {}", s.name);
    }
    let rows = [
        ("name", s.name.clone()),
        ("uuid", s.uuid.clone()),
        ("size", format!("{} ({} bytes)", format_size(s.size_bytes), s.size_bytes)),
        ("allocated", format!("{} ({} bytes)", format_size(s.allocated_bytes), s.allocated_bytes)),
        ("read-only", s.read_only.to_string()),
        ("connections", s.connections.to_string()),
        ("replicas", format!("{} (copies on nodes {:?})", s.replicas, s.voters)),
        ("health", s.health.label().to_string()),
        ("encrypted", if s.encrypted { "yes (AES-256-GCM)".to_string() } else { "no".to_string() }),
        ("export", format!("nbd://127.0.0.1/{}", s.name)),
    ];
    for (k, val) in rows {
        out!("{k:<12} {val}");
    }
    if let Some(why) = &s.locked {
        out!("{:<12} locked on this node: {why}", "state");
    }
    if !s.labels.is_empty() {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out!("{:<12} {}", "labels", labels.join(", "));
    }
    if let Some(r) = &s.replication {
        let leader = if r.leader == 0 { "none".to_string() } else { format!("node {}", r.leader) };
        out!("{:<12} {leader}", "leader");
        if r.term > 0 {
            out!(
                "{:<12} term {}, commit {}, applied here {}",
                "raft",
                r.term,
                r.commit_index,
                r.applied_index
            );
        }
        for (node, matched) in &r.progress {
            let behind = r.commit_index.saturating_sub(*matched);
            let role = if r.learners.contains(node) { "learner, catching up" } else { "voter" };
            out!("{:<12} node {node}: matched {matched} ({behind} behind commit; {role})", "replica");
        }
        if r.log_first_index > 1 {
            out!("{:<12} entries from {} on (older ones compacted)", "log here", r.log_first_index);
        }
        for b in &r.rebuilds {
            let pct = (b.done_bytes * 100).checked_div(b.total_bytes).unwrap_or(0);
            let source = if b.source == 0 {
                "waiting for a source".to_string()
            } else {
                format!("from node {}", b.source)
            };
            out!(
                "{:<12} node {}: {} {pct}% ({} of {}; {} of data copied {source}, {} s, snapshot index {})",
                "rebuilding",
                b.node,
                bar(b.done_bytes, b.total_bytes, 20),
                format_size(b.done_bytes),
                format_size(b.total_bytes),
                format_size(b.copied_bytes),
                b.elapsed_s,
                b.index
            );
        }
    }
    Ok(())
}

/// A text progress bar of `width` cells for `done` of `total`.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = ((done as u128 * width as u128).checked_div(total as u128).unwrap_or(0) as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), " ".repeat(width - filled))
}

/// Redraws one line per copy being rebuilt until none is left.
fn watch_rebuilds(client: &Client, path: &str, mut v: Value) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let s: VolumeStatus = serde_json::from_value(v)?;
        let rebuilds = s.replication.map(|r| r.rebuilds).unwrap_or_default();
        if rebuilds.is_empty() {
            out!("{}no copy is being rebuilt; health: {}", if tty { "\r" } else { "" }, s.health.label());
            return Ok(());
        }
        let line: Vec<String> = rebuilds
            .iter()
            .map(|b| {
                format!(
                    "node {} {} {}/{}",
                    b.node,
                    bar(b.done_bytes, b.total_bytes, 20),
                    format_size(b.done_bytes),
                    format_size(b.total_bytes)
                )
            })
            .collect();
        if tty {
            out_part!("\r{}   ", line.join("   "));
            std::io::Write::flush(&mut std::io::stdout())?;
        } else {
            out!("{}", line.join("   "));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        v = client.call("GET", path, None)?;
    }
}

/// Shows a progress bar until the scrub finishes; returns its final status.
fn watch_scrub(client: &Client, path: &str, mut v: Value, quiet: bool) -> Result<Value> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout()) && !quiet;
    loop {
        let s: ScrubStatus = serde_json::from_value(v.clone())?;
        if !s.running {
            if tty {
                out!();
            }
            return Ok(v);
        }
        if tty {
            out_part!(
                "\rscrub {} {}/{}   ",
                bar(s.done_bytes, s.total_bytes, 30),
                format_size(s.done_bytes),
                format_size(s.total_bytes)
            );
            std::io::Write::flush(&mut std::io::stdout())?;
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        v = client.call("GET", path, None)?;
    }
}

fn print_scrub(name: &str, s: &ScrubStatus) {
    let Some(sum) = &s.summary else {
        out!("volume {name} was never scrubbed; `raftblk volume scrub {name}` runs one");
        return;
    };
    let state = if s.running { "running" } else { "finished" };
    out!(
        "scrub of {name} {state}: {} blocks checked on each copy, {} of data",
        sum.blocks_checked,
        format_size(sum.data_bytes)
    );
    if let Some(e) = &sum.error {
        out!("stopped early: {e}");
    }
    let rows: Vec<Vec<String>> = sum
        .copies
        .iter()
        .map(|(node, f)| {
            vec![
                if *node == 0 { "this node".to_string() } else { node.to_string() },
                f.damaged.to_string(),
                f.repaired.to_string(),
                f.unrepaired.to_string(),
                f.mismatched.to_string(),
                f.chunks_missed.to_string(),
                if f.is_clean() { "ok" } else { "DAMAGED" }.to_string(),
            ]
        })
        .collect();
    print_table(
        &["COPY", "DAMAGED", "REPAIRED", "UNREPAIRED", "MISMATCHED", "CHUNKS MISSED", "STATE"],
        &rows,
    );
    for (node, f) in &sum.copies {
        if !f.unrepaired_blocks.is_empty() {
            out!("copy {node}: unrepaired blocks (4 KiB each) {:?}", f.unrepaired_blocks);
        }
    }
}

fn node_command(cli: &Cli, client: &Client, cmd: &NodeCommand) -> Result<()> {
    let (id, action, wait) = match cmd {
        NodeCommand::List => {
            let v = client.call("GET", "/v1/nodes", None)?;
            if cli.json {
                out!("{v:#}");
            } else {
                print_nodes(&serde_json::from_value::<Vec<NodeStatus>>(v)?);
            }
            return Ok(());
        }
        NodeCommand::Cordon { node } => (*node, "cordon", false),
        NodeCommand::Uncordon { node } => (*node, "uncordon", false),
        NodeCommand::Drain { node, no_wait } => (*node, "drain", !no_wait),
        NodeCommand::Remove { node, no_wait } => (*node, "remove", !no_wait),
    };
    let v = client.call("POST", &format!("/v1/nodes/{id}/{action}"), None)?;
    if !wait {
        if cli.json {
            out!("{v:#}");
        } else {
            out!("node {id}: {action} recorded");
        }
        return Ok(());
    }
    // Copies move one volume at a time; show how many are left until none is.
    let copies_on = |v: &Value| -> Result<usize> {
        let nodes: Vec<NodeStatus> = serde_json::from_value(v.clone())?;
        Ok(nodes.iter().find(|n| n.view.id == id).map_or(0, |n| n.copies))
    };
    let total = copies_on(&v)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut left = total;
    while left > 0 {
        if tty && !cli.json {
            let done = total - left;
            out_part!(
                "\r{action} node {id}: {} {done}/{total} copies moved",
                bar(done as u64, total as u64, 30)
            );
            std::io::Write::flush(&mut std::io::stdout())?;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        left = copies_on(&client.call("GET", "/v1/nodes", None)?)?;
    }
    if cli.json {
        out!("{:#}", client.call("GET", "/v1/nodes", None)?);
    } else {
        if tty {
            out!();
        }
        out!("node {id}: {action} done, {total} copies moved, none left on it");
    }
    Ok(())
}

fn print_nodes(nodes: &[NodeStatus]) {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let v = &n.view;
            vec![
                v.id.to_string(),
                format!("{:?}", v.liveness).to_lowercase(),
                format!("{:?}", v.admin).to_lowercase(),
                if v.report.zone.is_empty() { "-".into() } else { v.report.zone.clone() },
                if v.report.labels.is_empty() {
                    "-".into()
                } else {
                    v.report.labels.iter().map(|(k, val)| format!("{k}={val}")).collect::<Vec<_>>().join(",")
                },
                format_size(v.report.free_bytes),
                n.copies.to_string(),
                n.leads.to_string(),
                v.last_heard_ms.map_or("never".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0)),
            ]
        })
        .collect();
    print_table(&["NODE", "STATE", "ADMIN", "ZONE", "LABELS", "FREE", "COPIES", "LEADS", "HEARD"], &rows);
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn print_volumes(volumes: &[VolumeStatus]) {
    if volumes.is_empty() {
        out!("no volumes; create one with `raftblk volume create NAME --size 10G`");
        return;
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                if v.read_only { "ro" } else { "rw" }.to_string(),
                v.connections.to_string(),
                v.health.label().to_string(),
                match (v.encrypted, &v.locked) {
                    (_, Some(_)) => "locked",
                    (true, None) => "yes",
                    (false, None) => "no",
                }
                .to_string(),
                if v.voters.is_empty() { "-".into() } else { format!("{:?}", v.voters) },
            ]
        })
        .collect();
    print_table(
        &["NAME", "SIZE", "ALLOCATED", "MODE", "CONNECTIONS", "HEALTH", "ENCRYPTED", "COPIES ON"],
        &rows,
    );
}
