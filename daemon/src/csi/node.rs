//! The CSI Node service: NodeStage attaches the volume through the local raftblkd (a
//! `/dev/nbdN` it serves and keeps across its own restarts) and, for file system volumes,
//! makes the file system only when the device is empty (`blkid`), checks it (`fsck`) and
//! mounts it at the staging path; NodePublish bind-mounts that (or the device, for raw
//! block volumes) into the pod. The plugin keeps no state of its own: what is staged is
//! what the kernel's mount table and raftblkd's attachments say, so a restarted plugin
//! finds every volume where it was.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};
use tokio::process::Command;
use tonic::{Request, Response, Status};

use super::access;
use super::controller::{condition_of, GENERATION_KEY};
use super::daemon_api::{segment, DaemonApi};
use super::proto::v1::node_server::Node;
use super::proto::v1::*;
use super::{need, ZONE_KEY};
use crate::mounts;

/// The Node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    /// The raftblkd on this node.
    pub api: DaemonApi,
    /// This node's raftblk id (the CSI node id).
    pub node_id: String,
    /// This node's zone (empty: none).
    pub zone: String,
}

/// Runs a tool; its exit code and output.
async fn run(program: &str, args: &[&str]) -> Result<(i32, String), Status> {
    let out =
        Command::new(program).args(args).output().await.map_err(|e| {
            Status::internal(format!("cannot run {program}: {e} (is it installed on the node?)"))
        })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text.trim().to_string()))
}

async fn run_ok(program: &str, args: &[&str]) -> Result<String, Status> {
    let (code, text) = run(program, args).await?;
    if code == 0 {
        Ok(text)
    } else {
        Err(Status::internal(format!("{program} {} failed (exit {code}): {text}", args.join(" "))))
    }
}

/// The file system on a device (`None`: the device is empty).
async fn fs_on(device: &str) -> Result<Option<String>, Status> {
    let (code, text) = run("blkid", &["-p", "-s", "TYPE", "-o", "value", device]).await?;
    match code {
        0 if !text.is_empty() => Ok(Some(text.lines().next().unwrap_or_default().to_string())),
        // blkid exits 2 when it finds nothing: an empty device.
        0 | 2 => Ok(None),
        _ => Err(Status::internal(format!("blkid {device} failed (exit {code}): {text}"))),
    }
}

impl NodeService {
    /// The local device raftblkd serves `volume` on, if attached.
    async fn device_of(&self, volume: &str) -> Result<Option<String>, Status> {
        let list = self.api.call("GET", "/v1/attachments".into(), None).await.map_err(|e| e.to_status())?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["volume"].as_str() == Some(volume))
            .and_then(|a| a["device"].as_str().map(str::to_string)))
    }

    async fn attach(&self, volume: &str, read_only: bool, generation: u64) -> Result<String, Status> {
        let body = json!({ "read_only": read_only, "generation": generation });
        let a = self
            .api
            .call("POST", format!("/v1/volumes/{}/attach", segment(volume)), Some(body))
            .await
            .map_err(|e| e.to_status())?;
        a["device"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Status::internal("attach answered without a device"))
    }
}

/// The generation ControllerPublish put in the publish context (0 when there was none).
fn generation_of(ctx: &HashMap<String, String>) -> Result<u64, Status> {
    match ctx.get(GENERATION_KEY) {
        None => Ok(0),
        Some(g) => g.parse().map_err(|_| {
            Status::invalid_argument(format!("publish_context {GENERATION_KEY}={g:?} is not a number"))
        }),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("staging_target_path", &req.staging_target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
        access::check(cap).map_err(Status::invalid_argument)?;
        let generation = generation_of(&req.publish_context)?;
        let read_only = access::read_only(cap)
            || req.publish_context.get("raftblk.io/read-only").is_some_and(|v| v == "true");
        let device = self.attach(&req.volume_id, read_only, generation).await?;
        let Some((fs, flags)) = access::mount_of(cap) else {
            // Raw block: NodePublish binds the device itself.
            return Ok(Response::new(NodeStageVolumeResponse {}));
        };
        let staging = req.staging_target_path.as_str();
        if let Some(mounted) = mounts::at(staging) {
            if mounted.fs_type != fs {
                return Err(Status::already_exists(format!(
                    "{staging} has {} mounted, not {fs}",
                    mounted.fs_type
                )));
            }
            return Ok(Response::new(NodeStageVolumeResponse {}));
        }
        std::fs::create_dir_all(staging).map_err(|e| Status::internal(format!("creating {staging}: {e}")))?;
        match fs_on(&device).await? {
            None if read_only => {
                return Err(Status::failed_precondition(format!(
                    "{} has no file system and is published read-only",
                    req.volume_id
                )))
            }
            None => {
                let mkfs = format!("mkfs.{fs}");
                let args: &[&str] = if fs == "xfs" { &["-q", &device] } else { &["-q", "-F", &device] };
                run_ok(&mkfs, args).await?;
                tracing::info!(volume = %req.volume_id, %device, %fs, "file system made on an empty volume");
            }
            Some(found) if found != fs => {
                return Err(Status::failed_precondition(format!(
                    "{} holds a {found} file system, not the {fs} asked for; it is left as it is",
                    req.volume_id
                )));
            }
            Some(_) if fs == "ext4" && !read_only => {
                // e2fsck -p: 0 clean, 1 errors fixed, 2 fixed and a reboot suggested (a
                // mount is fine); 4 and up: left uncorrected or failed.
                let (code, text) = run("e2fsck", &["-p", &device]).await?;
                if code >= 4 {
                    return Err(Status::failed_precondition(format!(
                        "e2fsck {device} found errors it could not fix (exit {code}): {text}; repair the file system by hand"
                    )));
                }
            }
            Some(_) => {}
        }
        let mut options: Vec<String> = flags;
        if read_only {
            options.push("ro".into());
        }
        let mut args = vec!["-t", fs.as_str()];
        let joined = options.join(",");
        if !joined.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        args.extend([device.as_str(), staging]);
        run_ok("mount", &args).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("staging_target_path", &req.staging_target_path)?;
        if mounts::at(&req.staging_target_path).is_some() {
            run_ok("umount", &[&req.staging_target_path]).await?;
        }
        match self.api.call("POST", "/v1/detach".into(), Some(json!({ "target": req.volume_id }))).await {
            Ok(_) => {}
            Err(e) if e.status == 404 => {}
            Err(e) => return Err(e.to_status()),
        }
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("target_path", &req.target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
        access::check(cap).map_err(Status::invalid_argument)?;
        let target = req.target_path.as_str();
        if mounts::at(target).is_some() {
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        let source = if access::is_block(cap) {
            let device = self.device_of(&req.volume_id).await?.ok_or_else(|| {
                Status::failed_precondition(format!("{} is not staged on this node", req.volume_id))
            })?;
            if let Some(parent) = Path::new(target).parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Status::internal(format!("creating {}: {e}", parent.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(target)
                .map_err(|e| Status::internal(format!("creating {target}: {e}")))?;
            device
        } else {
            need("staging_target_path", &req.staging_target_path)?;
            if mounts::at(&req.staging_target_path).is_none() {
                return Err(Status::failed_precondition(format!(
                    "{} is not staged at {}",
                    req.volume_id, req.staging_target_path
                )));
            }
            std::fs::create_dir_all(target)
                .map_err(|e| Status::internal(format!("creating {target}: {e}")))?;
            req.staging_target_path.clone()
        };
        run_ok("mount", &["--bind", &source, target]).await?;
        if req.readonly {
            run_ok("mount", &["-o", "remount,bind,ro", target]).await?;
        }
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("target_path", &req.target_path)?;
        if mounts::at(&req.target_path).is_some() {
            run_ok("umount", &[&req.target_path]).await?;
        }
        let p = Path::new(&req.target_path);
        if p.is_dir() {
            let _ = std::fs::remove_dir(p);
        } else if p.exists() {
            let _ = std::fs::remove_file(p);
        }
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("volume_path", &req.volume_path)?;
        let path = Path::new(&req.volume_path);
        if !path.exists() {
            return Err(Status::not_found(format!("{} does not exist", req.volume_path)));
        }
        let v = self
            .api
            .call("GET", format!("/v1/volumes/{}", segment(&req.volume_id)), None)
            .await
            .map_err(|e| e.to_status())?;
        let condition = Some(condition_of(&v));
        let usage = if path.is_dir() {
            let st = rustix::fs::statvfs(path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", req.volume_path)))?;
            let block = st.f_frsize as i64;
            vec![
                VolumeUsage {
                    available: st.f_bavail as i64 * block,
                    total: st.f_blocks as i64 * block,
                    used: (st.f_blocks - st.f_bfree) as i64 * block,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: st.f_favail as i64,
                    total: st.f_files as i64,
                    used: (st.f_files - st.f_ffree) as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            vec![VolumeUsage {
                available: 0,
                total: v["size_bytes"].as_i64().unwrap_or(0),
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse { usage, volume_condition: condition }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("volume_path", &req.volume_path)?;
        let device = self
            .device_of(&req.volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("{} is not attached on this node", req.volume_id)))?;
        let sysfs = format!("/sys/block/{}/size", device.trim_start_matches("/dev/"));
        let device_size = || {
            std::fs::read_to_string(&sysfs)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .map_or(0, |s| s * 512)
        };
        // raftblkd passes a grown volume's size to the kernel within a second or so; the
        // file system can only grow once the device has.
        let volume = self
            .api
            .call("GET", format!("/v1/volumes/{}", segment(&req.volume_id)), None)
            .await
            .map_err(|e| e.to_status())?;
        let wanted = volume["size_bytes"].as_i64().unwrap_or(0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while device_size() < wanted {
            if std::time::Instant::now() > deadline {
                return Err(Status::unavailable(format!(
                    "{device} is still {} bytes, the volume {wanted}; retry",
                    device_size()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let size = device_size();
        let block = req.volume_capability.as_ref().is_some_and(access::is_block);
        if !block {
            match mounts::at(&req.volume_path) {
                None => return Err(Status::not_found(format!("nothing is mounted at {}", req.volume_path))),
                Some(m) if m.fs_type == "xfs" => {
                    run_ok("xfs_growfs", &[&req.volume_path]).await?;
                }
                Some(_) => {
                    run_ok("resize2fs", &[&device]).await?;
                }
            }
        }
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: size }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc {
                r#type: t as i32,
            })),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let accessible_topology = (!self.zone.is_empty())
            .then(|| Topology { segments: HashMap::from([(ZONE_KEY.to_string(), self.zone.clone())]) });
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology,
        }))
    }
}

/// This node's raftblk id and zone, from its raftblkd.
pub async fn local_identity(api: &DaemonApi) -> Result<(String, String), String> {
    let node = api.call("GET", "/v1/node".into(), None).await.map_err(|e| e.message)?;
    let id = node["node_id"].as_u64().unwrap_or(0);
    let zone = match api.call("GET", "/v1/nodes".into(), None).await {
        Ok(Value::Array(nodes)) => nodes
            .iter()
            .find(|n| n["id"].as_u64() == Some(id))
            .and_then(|n| n["report"]["zone"].as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    };
    Ok((id.to_string(), zone))
}
