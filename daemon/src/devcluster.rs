//! `raftblk dev-cluster`: a local cluster of raftblkd processes on loopback, each
//! with its own data directory and ports, for demos, tests and the README.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Ports of node `i` (1-based) are `base + 10*(i-1)` + 0 (NBD), 1 (API), 2 (peer).
pub const PORT_STRIDE: u16 = 10;
/// Largest dev cluster.
pub const DEV_CLUSTER_NODES_MAX: u16 = 9;

/// Why the dev cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevClusterError {
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// A process or directory operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// A node did not come up.
    #[error("node {node} did not become healthy within {secs} s; its log is {log}")]
    NotHealthy { node: u16, secs: u64, log: String },
}

/// One node's addresses.
#[derive(Debug, Clone)]
pub struct DevNode {
    /// Node id (1-based).
    pub id: u16,
    /// NBD TCP port.
    pub nbd_port: u16,
    /// HTTP API port.
    pub api_port: u16,
    /// Peer port.
    pub peer_port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
}

/// The layout of an `n`-node cluster under `base_dir` with ports from `base_port`.
pub fn layout(n: u16, base_dir: &Path, base_port: u16) -> Result<Vec<DevNode>, DevClusterError> {
    if n == 0 || n > DEV_CLUSTER_NODES_MAX {
        return Err(DevClusterError::Invalid(format!(
            "--nodes {n} is out of range; use 1 to {DEV_CLUSTER_NODES_MAX}"
        )));
    }
    let top = base_port as u32 + PORT_STRIDE as u32 * (n as u32 - 1) + 2;
    if top > u16::MAX as u32 || base_port < 1024 {
        return Err(DevClusterError::Invalid(format!(
            "--base-port {base_port} leaves no room for {n} nodes; use 1024 to {}",
            u16::MAX as u32 - PORT_STRIDE as u32 * (n as u32 - 1) - 2
        )));
    }
    Ok((1..=n)
        .map(|id| {
            let p = base_port + PORT_STRIDE * (id - 1);
            DevNode {
                id,
                nbd_port: p,
                api_port: p + 1,
                peer_port: p + 2,
                data_dir: base_dir.join(format!("node{id}")),
            }
        })
        .collect())
}

/// The raftblkd arguments of `node` in `nodes`.
pub fn node_args(node: &DevNode, nodes: &[DevNode]) -> Vec<String> {
    let peers: Vec<String> = nodes
        .iter()
        .filter(|n| n.id != node.id)
        .map(|n| format!("{}@127.0.0.1:{}", n.id, n.peer_port))
        .collect();
    vec![
        "--node-id".into(),
        node.id.to_string(),
        "--data-dir".into(),
        node.data_dir.display().to_string(),
        "--nbd-listen".into(),
        format!("127.0.0.1:{}", node.nbd_port),
        "--api-listen".into(),
        format!("127.0.0.1:{}", node.api_port),
        "--peer-listen".into(),
        format!("127.0.0.1:{}", node.peer_port),
        format!("--peers={}", peers.join(",")),
        "--bootstrap-volumes".into(),
        "none".into(),
    ]
}

/// The dev cluster's KEK file in `base_dir` (one for every node, as a real cluster needs),
/// made (32 random bytes, mode 0600) on first use, so encrypted volumes work out of the box.
pub fn dev_kek(base_dir: &Path) -> Result<PathBuf, DevClusterError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = base_dir.join("kek");
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(base_dir)
        .map_err(|source| DevClusterError::Io { what: format!("creating {}", base_dir.display()), source })?;
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key)
        .map_err(|e| DevClusterError::Invalid(format!("no randomness for the dev KEK: {e}")))?;
    let io = |source| DevClusterError::Io { what: format!("writing {}", path.display()), source };
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).map_err(io)?;
    f.write_all(&key).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(path)
}

/// A running dev cluster; dropping it stops every node.
pub struct DevCluster {
    /// The nodes, in id order.
    pub nodes: Vec<DevNode>,
    children: Vec<Option<Child>>,
}

impl DevCluster {
    /// Starts every node (`raftblkd` at `daemon`) and waits until each answers `/healthz`.
    pub fn start(daemon: &Path, nodes: Vec<DevNode>) -> Result<DevCluster, DevClusterError> {
        let mut cluster = DevCluster { children: Vec::new(), nodes: nodes.clone() };
        let base = nodes.first().and_then(|n| n.data_dir.parent()).map(Path::to_path_buf).unwrap_or_default();
        let kek = dev_kek(&base)?;
        for node in &nodes {
            std::fs::create_dir_all(&node.data_dir).map_err(|source| DevClusterError::Io {
                what: format!("creating {}", node.data_dir.display()),
                source,
            })?;
            let log_path = node.data_dir.join("raftblkd.log");
            let log =
                std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|source| {
                    DevClusterError::Io { what: format!("opening {}", log_path.display()), source }
                })?;
            let err =
                log.try_clone().map_err(|source| DevClusterError::Io { what: "log file".into(), source })?;
            let child = Command::new(daemon)
                .args(node_args(node, &nodes))
                .arg("--kek-file")
                .arg(&kek)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(err)
                .spawn()
                .map_err(|source| DevClusterError::Io {
                    what: format!("starting {}", daemon.display()),
                    source,
                })?;
            cluster.children.push(Some(child));
        }
        for node in &nodes {
            wait_healthy(node, Duration::from_secs(30))?;
        }
        Ok(cluster)
    }

    /// Node ids whose process has exited, with the exit status.
    pub fn exited(&mut self) -> Vec<(u16, String)> {
        let mut out = Vec::new();
        for (node, child) in self.nodes.iter().zip(self.children.iter_mut()) {
            if let Some(c) = child {
                if let Ok(Some(status)) = c.try_wait() {
                    out.push((node.id, status.to_string()));
                    *child = None;
                }
            }
        }
        out
    }

    /// Sends SIGTERM to every node and waits up to `grace` for them to exit.
    pub fn stop(&mut self, grace: Duration) {
        for c in self.children.iter_mut().flatten() {
            // SIGTERM lets each node finish in-flight requests and flush.
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        }
        let deadline = Instant::now() + grace;
        for c in self.children.iter_mut().flatten() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

fn wait_healthy(node: &DevNode, limit: Duration) -> Result<(), DevClusterError> {
    let deadline = Instant::now() + limit;
    let url = format!("http://127.0.0.1:{}/healthz", node.api_port);
    while Instant::now() < deadline {
        if ureq::get(&url).timeout(Duration::from_secs(1)).call().is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(DevClusterError::NotHealthy {
        node: node.id,
        secs: limit.as_secs(),
        log: node.data_dir.join("raftblkd.log").display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spaces_ports_and_refuses_bad_counts() {
        let nodes = layout(3, Path::new("/tmp/x"), 10809).unwrap();
        assert_eq!(nodes[2].nbd_port, 10829);
        assert_eq!(nodes[2].peer_port, 10831);
        assert_eq!(nodes[1].data_dir, PathBuf::from("/tmp/x/node2"));
        let args = node_args(&nodes[0], &nodes);
        assert!(args.contains(&"--peers=2@127.0.0.1:10821,3@127.0.0.1:10831".to_string()), "{args:?}");
        assert!(layout(0, Path::new("/tmp"), 10809).is_err());
        assert!(layout(10, Path::new("/tmp"), 10809).unwrap_err().to_string().contains("1 to 9"));
        assert!(layout(3, Path::new("/tmp"), 65530).unwrap_err().to_string().contains("--base-port"));
    }
}
