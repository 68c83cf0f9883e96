//! The CSI (Container Storage Interface, spec 1.12) driver `blk.raftblk.io` that Kubernetes
//! uses to provision, publish and mount raftblk volumes. It runs as its own binary,
//! `raftblk-csi` (controller mode: Identity + Controller; node mode: Identity + Node), and
//! is a client of raftblkd's HTTP API: the data path and the devices belong to raftblkd,
//! so the plugin can restart or be upgraded without touching I/O, and raftblkd can restart
//! under mounted volumes without the plugin (see `crate::attach`).
//!
//! Flow: CreateVolume → `POST /v1/volumes`; ControllerPublish → `POST .../publish` (the
//! record's publications and fence, [`crate::publish`]) whose generation travels in the
//! publish context to NodeStage → `POST .../attach` on the node's own raftblkd → mkfs only
//! if empty, fsck, mount; NodePublish → bind mount; the reverse on the way down.

pub mod access;
pub mod controller;
pub mod daemon_api;
pub mod node;
pub mod params;
pub mod proto;

/// The topology key of a node's zone (its raftblk `cluster.zone`).
pub const ZONE_KEY: &str = "topology.blk.raftblk.io/zone";

use std::path::Path;

use proto::v1::controller_server::ControllerServer;
use proto::v1::identity_server::IdentityServer;
use proto::v1::node_server::NodeServer;

/// INVALID_ARGUMENT naming `field` when a required string field is empty.
fn need(field: &str, value: &str) -> Result<(), tonic::Status> {
    if value.is_empty() {
        Err(tonic::Status::invalid_argument(format!("{field} is missing")))
    } else {
        Ok(())
    }
}

/// Which services the plugin runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller (one per cluster, with the provisioner/attacher/resizer sidecars).
    Controller,
    /// Identity + Node (on every node, beside raftblkd).
    Node,
    /// All three (tests, single-machine setups).
    All,
}

/// Serves the chosen services on a unix socket until `shutdown` resolves.
pub async fn serve(
    mode: Mode,
    socket: &Path,
    api: daemon_api::DaemonApi,
    node: Option<node::NodeService>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    if socket.exists() {
        std::fs::remove_file(socket)
            .map_err(|e| format!("removing the old socket {}: {e}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(socket).map_err(|e| format!("binding {}: {e}", socket.display()))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let identity = controller::IdentityService { api: api.clone(), controller: mode != Mode::Node };
    let router = tonic::transport::Server::builder().add_service(IdentityServer::new(identity));
    let mut router = match mode {
        Mode::Node => router.add_optional_service(None::<ControllerServer<controller::ControllerService>>),
        _ => router.add_optional_service(Some(ControllerServer::new(controller::ControllerService {
            api: api.clone(),
        }))),
    };
    if mode != Mode::Controller {
        let node = node.ok_or("node mode needs the node's identity")?;
        router = router.add_service(NodeServer::new(node));
    }
    router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(|e| format!("gRPC server: {e}"))
}
