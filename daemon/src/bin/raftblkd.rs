//! raftblkd: the raftblk node daemon. With no arguments it runs a single node
//! from the embedded default configuration (see `raftblkd --print-default-config`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use raftblk_blockdev::nbd::NbdServer;
use raftblk_blockdev::store::{EngineKind, IoEngine};
use raftblk_daemon::api::{self, ApiState, NodeInfo};
use raftblk_daemon::config::{Config, IoEngineSetting, LogFormat, Overrides, DEFAULT_CONFIG_TOML};
use raftblk_daemon::metrics::Metrics;
use raftblk_daemon::size::parse_size;
use raftblk_daemon::volumes::VolumeManager;
use raftblk_replication::node::{NodeConfig, ReplicationNode};
use raftblk_replication::transport::ClusterId;
use raftblk_replication::wal::disk::WalEngine;
use raftblk_replication::wal::record::NodeId;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Identifies raftblk clusters on the peer transport (one cluster per peer list).
const CLUSTER_ID: u64 = 0x7261_6674_626c_6b31;

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
    tracing::info!(engine = engine.name(), ring_threads = config.storage.ring_threads, "I/O engine ready");

    let metrics = Arc::new(Metrics::new()?);
    let replication = start_replication(&config).await?;
    let volumes = VolumeManager::open(&config.data_dir, engine, metrics.clone(), replication.clone())
        .await
        .with_context(|| format!("opening volumes in {}", config.data_dir.display()))?;
    volumes.set_leader_follows_client(config.cluster.leader_follows_client);
    let shutdown = CancellationToken::new();
    let mut sync_task = None;
    if let Some(node) = &replication {
        raftblk_daemon::cluster::install_handler(node, volumes.clone());
        sync_task = Some(tokio::spawn(raftblk_daemon::cluster::sync_loop(
            node.clone(),
            volumes.clone(),
            shutdown.clone(),
        )));
    }
    if volumes.is_empty() {
        for v in &config.bootstrap_volumes {
            let size = parse_size(&v.size)?;
            if volumes.ensure(&v.name, size).await? {
                tracing::info!(volume = %v.name, size = %v.size, "bootstrap volume created");
            }
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
            peers: config.cluster.peers.clone(),
        },
        fault_injection: config.cluster.fault_injection,
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

/// Starts the replication engine when the node has peers; a node alone serves its
/// volumes straight from their files.
async fn start_replication(config: &Config) -> Result<Option<ReplicationNode>> {
    let peers = config.cluster.peer_list();
    if peers.is_empty() {
        return Ok(None);
    }
    let c = &config.cluster;
    let node_config = NodeConfig {
        node_id: NodeId(c.node_id),
        cluster: ClusterId(CLUSTER_ID),
        peer_listen: c.peer_listen,
        peers: peers.iter().map(|p| (NodeId(p.id), p.addr)).collect(),
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
    };
    let node = ReplicationNode::start(node_config)
        .await
        .with_context(|| format!("starting replication (node {}, peers on {})", c.node_id, c.peer_listen))?;
    tracing::info!(node_id = c.node_id, peer_listen = %c.peer_listen, peers = ?c.peers, "replication started");
    Ok(Some(node))
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
