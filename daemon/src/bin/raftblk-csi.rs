//! `raftblk-csi`: the CSI plugin of raftblk (driver `blk.raftblk.io`). A client of the
//! local (node mode) or any (controller mode) raftblkd's HTTP API; see
//! `raftblk_daemon::csi`.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Parser;
use raftblk_daemon::csi::{self, node::NodeService, Mode};

/// raftblk's CSI plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Services to run
    #[arg(long, value_enum, env = "RAFTBLK_CSI_MODE", default_value = "all")]
    mode: Mode,
    /// Where the sidecars and kubelet connect: unix:///PATH or a path
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// raftblkd's HTTP API (node mode: this node's own)
    #[arg(long, env = "RAFTBLK_API", default_value = "http://127.0.0.1:10810")]
    api: String,
    /// The CSI node id (default: the local raftblkd's node id)
    #[arg(long, env = "RAFTBLK_CSI_NODE_ID")]
    node_id: Option<String>,
    /// This node's zone for topology (default: what raftblkd reports)
    #[arg(long, env = "RAFTBLK_CSI_ZONE")]
    zone: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let socket = PathBuf::from(args.endpoint.strip_prefix("unix://").unwrap_or(&args.endpoint));
    if args.endpoint.contains("://") && !args.endpoint.starts_with("unix://") {
        return Err(anyhow!("--endpoint {}: only unix:// endpoints are served", args.endpoint));
    }
    let api = csi::daemon_api::daemon_api(&args.api);
    let node = if args.mode == Mode::Controller {
        None
    } else {
        // The node's identity comes from its raftblkd, which may still be starting.
        let mut tries = 0;
        let (id, zone) = loop {
            match csi::node::local_identity(&api).await {
                Ok(found) => break found,
                Err(e) if tries < 60 => {
                    tracing::warn!(error = %e, "raftblkd not answering yet; retrying");
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
                Err(e) => {
                    return Err(anyhow!("cannot learn this node's id from raftblkd at {}: {e}", args.api))
                }
            }
        };
        Some(NodeService {
            api: api.clone(),
            node_id: args.node_id.clone().unwrap_or(id),
            zone: args.zone.clone().unwrap_or(zone),
        })
    };
    tracing::info!(mode = ?args.mode, socket = %socket.display(), api = %args.api, "raftblk-csi serving");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    csi::serve(args.mode, &socket, api, node, shutdown)
        .await
        .map_err(|e| anyhow!(e))
        .context("raftblk-csi")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
