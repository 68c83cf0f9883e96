//! raftblkd: the raftblk node daemon. With no arguments it runs a single node
//! from the embedded default configuration (see `raftblkd --print-default-config`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use raftblk_blockdev::nbd::NbdServer;
use raftblk_blockdev::seal::NonceSource;
use raftblk_blockdev::store::{EngineKind, IoEngine};
use raftblk_daemon::api::{self, ApiState, NodeInfo};
use raftblk_daemon::cluster_catalog::machine::CatalogMachine;
use raftblk_daemon::cluster_catalog::ClusterCatalog;
use raftblk_daemon::config::{
    join_target, Config, IoEngineSetting, LogFormat, Overrides, DEFAULT_CONFIG_TOML,
};
use raftblk_daemon::keys::{CatalogReserver, FileReserver, Keyring};
use raftblk_daemon::membership::{JoinAnswer, JoinRequest, Membership};
use raftblk_daemon::metrics::Metrics;
use raftblk_daemon::size::parse_size;
use raftblk_daemon::volumes::{Security, VolumeManager};
use raftblk_replication::node::{NodeConfig, ReplicationNode};
use raftblk_replication::transport::ClusterId;
use raftblk_replication::wal::disk::WalEngine;
use raftblk_replication::wal::record::NodeId;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Identifies raftblk clusters on the peer transport. Every cluster formed from static
/// peer lists uses this one value (nodes started independently have no way to agree on
/// another); a node that joins takes whatever id the member it joined through answers,
/// and keeps it in `<data_dir>/cluster.json`.
const CLUSTER_ID: u64 = 0x7261_6674_626c_6b31;

/// How long one join attempt waits for the member's answer (the member may spend a few
/// seconds telling every other member before it answers).
const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between join attempts.
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A node that is already a member retries a join only this long before starting with
/// the members it remembers: the join then only refreshes them.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long shutdown waits for in-flight NBD requests before giving up on them.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(name = "raftblkd", version, about = "raftblk node daemon: serves volumes over NBD")]
struct Args {
    /// TOML file laid over the embedded default [env: RAFTBLK_CONFIG]
    #[arg(long, short, env = "RAFTBLK_CONFIG")]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit
    #[arg(long)]
    print_default_config: bool,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return Ok(());
    }
    let config = Config::load(args.config.as_deref(), &args.overrides)?;
    init_logging(&config)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads(cores))
        .enable_all()
        .thread_name("raftblkd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(config))
}

fn init_logging(config: &Config) -> Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v).context("RUST_LOG is not a valid filter")?,
        _ => EnvFilter::try_new(&config.log.level)
            .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn run(config: Config) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let kind = match config.storage.io_engine {
        IoEngineSetting::Auto => EngineKind::Auto,
        IoEngineSetting::Uring => EngineKind::Uring,
        IoEngineSetting::Sync => EngineKind::Sync,
    };
    let engine = IoEngine::start(kind, config.storage.ring_threads).context("starting the I/O engine")?;
    raftblk_blockdev::store::sealed::set_cache_pages(
        (config.storage.metadata_cache_mib.saturating_mul(256)) as usize,
    );
    tracing::info!(engine = engine.name(), ring_threads = config.storage.ring_threads, "I/O engine ready");

    let metrics = Arc::new(Metrics::new()?);
    let membership = Arc::new(
        Membership::open(&config.data_dir, config.cluster.node_id, CLUSTER_ID)
            .context("loading the cluster membership")?,
    );
    // Asked before the static peers are recorded, which creates the file on a new node.
    let was_member = membership.was_member();
    membership.merge_static(&config.cluster.peer_list()).context("recording cluster.peers")?;
    if !config.cluster.join.is_empty() {
        join(&config, &membership, was_member).await?;
    }
    let replication = start_replication(&config, &membership).await?;
    let (security, catalog_slot) = security(&config, replication.is_some())?;
    let volumes =
        VolumeManager::open(&config.data_dir, engine, metrics.clone(), replication.clone(), security)
            .await
            .with_context(|| format!("opening volumes in {}", config.data_dir.display()))?;
    volumes.set_leader_follows_client(config.cluster.leader_follows_client);
    volumes.set_scrub_interval_h(config.cluster.scrub_interval_h);
    volumes.set_scrub_rate_mib_s(config.cluster.scrub_rate_mib_s);
    let shutdown = CancellationToken::new();
    tokio::spawn(raftblk_daemon::healer::scrub_loop(volumes.clone(), shutdown.clone()));
    let mut sync_task = None;
    if let Some(node) = &replication {
        membership.attach(node.clone());
        raftblk_daemon::cluster::install_handler(node, volumes.clone(), membership.clone());
        let timing = raftblk_daemon::nodes::LivenessTiming {
            suspect_after: raftblk_daemon::nodes::HEARTBEAT_INTERVAL * 4,
            dead_after: Duration::from_secs(config.cluster.node_dead_after_s),
        };
        let table = raftblk_daemon::nodes::NodeTable::open(
            config.cluster.node_id,
            timing,
            Some(config.data_dir.join(raftblk_daemon::nodes::NODES_FILE)),
            std::time::Instant::now(),
        )
        .context("loading the node table")?;
        let dir = Arc::new(
            raftblk_daemon::nodes::NodeDirectory::new(
                table,
                config.cluster.zone.clone(),
                config.api.listen.to_string(),
                config.data_dir.clone(),
            )
            .with_labels(config.cluster.labels.clone()),
        );
        volumes.attach_nodes(dir.clone());
        tokio::spawn(raftblk_daemon::cluster::heartbeat_loop(node.clone(), dir.clone(), shutdown.clone()));
        let catalog = open_cluster_catalog(&config, &membership, node, &volumes).await?;
        volumes.attach_catalog(catalog.clone());
        if let Some(slot) = &catalog_slot {
            let _ = slot.set(catalog.clone());
        }
        tokio::spawn(raftblk_daemon::cluster::reconcile_loop(
            volumes.clone(),
            catalog.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(raftblk_daemon::cluster::register_loop(dir.clone(), catalog, shutdown.clone()));
        tokio::spawn(raftblk_daemon::healer::catalog_loop(volumes.clone(), dir.clone(), shutdown.clone()));
        tokio::spawn(raftblk_daemon::healer::heal_loop(volumes.clone(), dir, shutdown.clone()));
        sync_task =
            Some(tokio::spawn(raftblk_daemon::cluster::sync_loop(membership.clone(), shutdown.clone())));
    }
    if volumes.is_empty() && !config.bootstrap_volumes.is_empty() {
        let mut wanted = Vec::new();
        for v in &config.bootstrap_volumes {
            wanted.push((v.name.clone(), parse_size(&v.size)?));
        }
        if replication.is_none() {
            ensure_volumes(&volumes, &wanted).await?;
        } else {
            // In a cluster the create waits for the catalog's quorum, which may be a while
            // (the other nodes are starting too); the node serves meanwhile.
            let volumes = volumes.clone();
            tokio::spawn(async move {
                while let Err(e) = ensure_volumes(&volumes, &wanted).await {
                    tracing::warn!(error = %e, "bootstrap volumes not created yet; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            });
        }
    }

    let nbd = Arc::new(NbdServer::new(volumes.clone()));
    let tcp = tokio::net::TcpListener::bind(config.nbd.listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", config.nbd.listen))?;
    let socket_path = config.nbd_socket_path();
    let unix = bind_unix(&socket_path)?;
    let api_listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen for the API on {}", config.api.listen))?;

    let attacher = raftblk_daemon::attach::Attacher::new(
        nbd.clone(),
        volumes.clone(),
        &config.data_dir,
        raftblk_daemon::attach::AttachTiming {
            request_timeout_s: config.attach.request_timeout_s,
            dead_conn_timeout_s: config.attach.dead_conn_timeout_s,
        },
        shutdown.clone(),
    );
    // Devices attached before a restart are queued in the kernel: serve them again first.
    if let Err(e) = attacher.restore().await {
        tracing::error!(error = %e, "kernel devices attached before this start are not served");
    }
    let state = Arc::new(ApiState {
        volumes: volumes.clone(),
        metrics: metrics.clone(),
        node: NodeInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            io_engine: volumes.engine_name().to_string(),
            nbd_listen: config.nbd.listen.to_string(),
            nbd_socket: socket_path.display().to_string(),
            data_dir: config.data_dir.display().to_string(),
            node_id: replication.as_ref().map(|n| n.node_id().0),
            // Filled in per request from the membership (nodes join while this runs).
            peers: Vec::new(),
            cluster_id: None,
            keks: Vec::new(),
            current_kek: None,
        },
        fault_injection: config.cluster.fault_injection,
        cluster: replication.as_ref().map(|_| membership.clone()),
        attacher: attacher.clone(),
    });
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, api::router(state))
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await
    });
    let (n1, s1) = (nbd.clone(), shutdown.clone());
    let tcp_task = tokio::spawn(async move { n1.serve_tcp(tcp, s1).await });
    let (n2, s2) = (nbd.clone(), shutdown.clone());
    let unix_task = tokio::spawn(async move { n2.serve_unix(unix, s2).await });

    tracing::info!(
        nbd = %config.nbd.listen,
        nbd_socket = %socket_path.display(),
        api = %config.api.listen,
        data_dir = %config.data_dir.display(),
        "raftblkd ready"
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: no new connections; finishing in-flight requests");
    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, async {
        let (a, b) = tokio::join!(tcp_task, unix_task);
        a??;
        b??;
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(r) => r?,
        Err(_) => tracing::warn!("in-flight requests did not finish within {SHUTDOWN_DRAIN_TIMEOUT:?}"),
    }
    // Attached devices' in-flight requests are answered; the kernel queues the rest for
    // the next start (the devices stay configured).
    attacher.join().await;
    if let Some(t) = sync_task {
        let _ = t.await;
    }
    volumes.flush_all().await?;
    if let Some(node) = &replication {
        node.shutdown().await;
    }
    let _ = std::fs::remove_file(&socket_path);
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    tracing::info!("flushed every volume; bye");
    Ok(())
}

/// Where the catalog goes once open, for a cluster node's nonce reservations.
type CatalogSlot = Arc<std::sync::OnceLock<Arc<ClusterCatalog>>>;

/// The node's KEKs (refusing to start with a KEK file others may read) and its nonces:
/// runs reserved durably in the data directory (a node alone) or granted by the cluster
/// catalog (a node in a cluster).
fn security(config: &Config, clustered: bool) -> Result<(Security, Option<CatalogSlot>)> {
    let keys = Keyring::load(&config.security.kek_file, Some(&config.data_dir))
        .context("loading the key-encryption key (security.kek_file)")?;
    let prefix = u32::try_from(config.cluster.node_id)
        .context("cluster.node_id must fit 32 bits (it prefixes every nonce this node makes)")?;
    let local = FileReserver::new(config.data_dir.join(raftblk_daemon::keys::NONCE_FILE));
    let batch = raftblk_blockdev::seal::nonce::RESERVE_BATCH_DEFAULT;
    let (nonces, slot) = if clustered {
        let reserver = CatalogReserver::new(config.cluster.node_id, local);
        let slot = reserver.catalog_slot();
        (NonceSource::new(prefix, Arc::new(reserver), batch), Some(slot))
    } else {
        (NonceSource::new(prefix, Arc::new(local), batch), None)
    };
    Ok((Security { keys: Arc::new(keys), nonces }, slot))
}

/// Creates each `(name, size)` unless it exists.
async fn ensure_volumes(volumes: &VolumeManager, wanted: &[(String, u64)]) -> Result<()> {
    for (name, size) in wanted {
        if volumes.ensure(name, *size).await? {
            tracing::info!(volume = %name, size, "bootstrap volume created");
        }
    }
    Ok(())
}

/// Opens this node's replica of the cluster catalog (a tree in the node's sled database).
async fn open_cluster_catalog(
    config: &Config,
    membership: &Membership,
    node: &ReplicationNode,
    volumes: &VolumeManager,
) -> Result<Arc<ClusterCatalog>> {
    let machine =
        CatalogMachine::open(volumes.sled_db(), "cluster_catalog").context("opening the catalog replica")?;
    let voters = membership.catalog_voters().context("recording the catalog's voters")?;
    let catalog = ClusterCatalog::open(
        node.clone(),
        Arc::new(machine),
        voters.clone(),
        config.data_dir.join("cluster_catalog.rebuild"),
    )
    .await
    .context("starting the catalog replica")?;
    tracing::info!(initial_voters = ?voters, "cluster catalog replica open");
    Ok(Arc::new(catalog))
}

/// Starts the replication engine when the node has peers (static, joined or
/// remembered); a node alone serves its volumes straight from their files.
async fn start_replication(config: &Config, membership: &Membership) -> Result<Option<ReplicationNode>> {
    let peers = membership.peers();
    if peers.is_empty() {
        return Ok(None);
    }
    let c = &config.cluster;
    let node_config = NodeConfig {
        node_id: NodeId(c.node_id),
        cluster: ClusterId(membership.cluster_id()),
        peer_listen: c.peer_listen,
        peers: peers.iter().map(|p| (NodeId(p.id), p.peer_addr)).collect(),
        wal_dir: config.data_dir.join("wal"),
        wal_engine: match config.storage.wal_engine {
            IoEngineSetting::Auto => WalEngine::Auto,
            IoEngineSetting::Uring => WalEngine::Uring,
            IoEngineSetting::Sync => WalEngine::Sync,
        },
        tick: Duration::from_millis(c.tick_ms),
        election_ticks: c.election_ticks,
        heartbeat_ticks: c.heartbeat_ticks,
        io_timeout: Duration::from_millis(c.io_timeout_ms),
        log_retain_entries: c.log_retain_entries,
        log_retain_bytes: c.log_retain_mib.saturating_mul(1 << 20),
        rebuild_rate_bytes_per_s: c.rebuild_rate_mib_s.saturating_mul(1 << 20),
        snapshot_chunk_bytes: raftblk_replication::snapshot::CHUNK_BYTES_DEFAULT,
        write_back: c.single_copy_write_back,
    };
    let node = ReplicationNode::start(node_config)
        .await
        .with_context(|| format!("starting replication (node {}, peers on {})", c.node_id, c.peer_listen))?;
    let peers: Vec<String> = peers.iter().map(|p| format!("{}@{}", p.id, p.peer_addr)).collect();
    tracing::info!(node_id = c.node_id, peer_listen = %c.peer_listen, ?peers, "replication started");
    Ok(Some(node))
}

/// Joins the cluster through the member API named by `cluster.join` and records the
/// members it answers with. An unreachable member is retried with backoff for
/// `cluster.join_timeout_ms`; a refusal (a 4xx answer) ends at once, since asking
/// again would get the same answer. A node that was a member before this start
/// (`was_member`: it had `cluster.json`) tries only briefly and otherwise starts with
/// what it remembers.
async fn join(config: &Config, membership: &Membership, was_member: bool) -> Result<()> {
    let c = &config.cluster;
    let base = join_target(&c.join).map_err(|e| anyhow::anyhow!("cluster.join: {e}"))?;
    let budget = if was_member {
        REJOIN_TIMEOUT.min(Duration::from_millis(c.join_timeout_ms))
    } else {
        Duration::from_millis(c.join_timeout_ms)
    };
    let request = JoinRequest { node_id: c.node_id, peer_addr: c.peer_listen };
    tracing::info!(via = %base, node_id = c.node_id, peer_addr = %c.peer_listen, "joining the cluster");
    let url = format!("{base}/v1/cluster/join");
    let attempt = tokio::task::spawn_blocking(move || join_with_retries(&url, request, budget))
        .await
        .context("the join task failed")?;
    let mut answer = match attempt {
        Ok(answer) => answer,
        Err(JoinFailure::Unreachable(e)) if was_member => {
            tracing::warn!(
                via = %base,
                error = %e,
                "cannot reach the member to re-join; starting with the members in cluster.json"
            );
            return Ok(());
        }
        Err(JoinFailure::Unreachable(e)) => bail!(
            "cannot join through {base}: no answer within {budget:?} (last error: {e}). Check that \
             cluster.join / --join is a running member's HTTP API address (its api.listen, default \
             port 10810, not its peer_listen), that the member's API listens on an address this host \
             can reach (the default 127.0.0.1 only takes local connections), and that no firewall is in the way"
        ),
        Err(JoinFailure::Refused(e)) => bail!("the member at {base} refused the join: {e}"),
    };
    if was_member && answer.cluster_id != membership.cluster_id() {
        bail!(
            "the member at {base} is in cluster {:#x}, but this data directory belongs to cluster {:#x} \
             ({}); use an empty data directory to join another cluster",
            answer.cluster_id,
            membership.cluster_id(),
            config.data_dir.join(raftblk_daemon::membership::MEMBERSHIP_FILE).display()
        );
    }
    // A member that listens on 0.0.0.0 reports that as its own address; the host the
    // join went to is the best guess at where it is reachable.
    let join_host: Option<std::net::IpAddr> = base
        .trim_start_matches("http://")
        .rsplit_once(':')
        .and_then(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').parse().ok());
    for m in &mut answer.members {
        if m.peer_addr.ip().is_unspecified() {
            match join_host {
                Some(ip) => m.peer_addr.set_ip(ip),
                None => {
                    tracing::warn!(member = m.id, addr = %m.peer_addr, "member reports an unspecified peer address; it will be unreachable until it is given a real one")
                }
            }
        }
    }
    membership.adopt(&answer).context("recording the cluster members")?;
    let peers: Vec<String> = membership.peers().iter().map(|p| format!("{}@{}", p.id, p.peer_addr)).collect();
    tracing::info!(via = %base, cluster_id = answer.cluster_id, ?peers, "joined the cluster");
    Ok(())
}

/// Why [`join_with_retries`] gave up.
enum JoinFailure {
    /// No answer (or a 5xx) until the budget ran out.
    Unreachable(String),
    /// The member answered with a refusal.
    Refused(String),
}

fn join_with_retries(url: &str, request: JoinRequest, budget: Duration) -> Result<JoinAnswer, JoinFailure> {
    let agent = ureq::AgentBuilder::new().timeout(JOIN_ATTEMPT_TIMEOUT).build();
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        let last = match agent.post(url).send_json(request) {
            Ok(resp) => {
                return resp
                    .into_json::<JoinAnswer>()
                    .map_err(|e| JoinFailure::Refused(format!("its answer is not a member list: {e}")))
            }
            Err(ureq::Error::Status(code, resp)) if code < 500 => {
                let body = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(body);
                return Err(JoinFailure::Refused(format!("HTTP {code}: {message}")));
            }
            Err(ureq::Error::Status(code, resp)) => {
                format!("HTTP {code}: {}", resp.into_string().unwrap_or_default())
            }
            Err(e) => e.to_string(),
        };
        let Some(left) = budget.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) else {
            return Err(JoinFailure::Unreachable(last));
        };
        // The last pause is cut short so one more attempt lands at the deadline.
        let wait = pause.min(left);
        tracing::info!(error = %last, retry_in = ?wait, "join attempt failed; retrying");
        std::thread::sleep(wait);
        pause = (pause * 2).min(JOIN_BACKOFF_MAX);
    }
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        // A socket left by a killed daemon; refuse if someone still listens on it.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another process is serving NBD on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen for NBD on {}", path.display()))
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}
