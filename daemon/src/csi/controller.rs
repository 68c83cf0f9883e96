//! The CSI Identity and Controller services: volumes are raftblk volumes (the CSI volume id
//! is the volume's name), publications are the volume record's (see [`crate::publish`]);
//! every call is a call of raftblkd's HTTP API.

use std::collections::HashMap;

use serde_json::{json, Value};
use tonic::{Code, Request, Response, Status};

use super::daemon_api::{segment, DaemonApi};
use super::params::{self, CapacityError};
use super::proto::v1::controller_server::Controller;
use super::proto::v1::identity_server::Identity;
use super::proto::v1::*;
use super::{access, need, ZONE_KEY};

/// The driver's name (the CSIDriver object and the StorageClasses' provisioner).
pub const DRIVER_NAME: &str = "blk.raftblk.io";
/// publish_context key carrying the attachment generation to NodeStage.
pub const GENERATION_KEY: &str = "raftblk.io/generation";

/// Identity: who the plugin is and whether raftblkd answers.
#[derive(Debug, Clone)]
pub struct IdentityService {
    /// raftblkd.
    pub api: DaemonApi,
    /// Whether this plugin runs the Controller service (advertised as a capability).
    pub controller: bool,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        let mut types = vec![Type::VolumeAccessibilityConstraints];
        if self.controller {
            types.push(Type::ControllerService);
        }
        let mut capabilities: Vec<PluginCapability> = types
            .into_iter()
            .map(|t| PluginCapability {
                r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
                    r#type: t as i32,
                })),
            })
            .collect();
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32,
            })),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        match self.api.call("GET", "/v1/node".into(), None).await {
            Ok(_) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Err(e) => Err(Status::failed_precondition(format!("raftblkd is not answering: {}", e.message))),
        }
    }
}

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    /// raftblkd (any node of the cluster).
    pub api: DaemonApi,
}

fn capacity_status(e: CapacityError) -> Status {
    match e {
        CapacityError::Invalid(m) => Status::invalid_argument(m),
        CapacityError::OutOfRange(m) => Status::out_of_range(m),
    }
}

/// The volume's state as CSI shows it.
fn volume_of(v: &Value, zones: &[String]) -> Volume {
    let mut context = HashMap::new();
    if let Some(r) = v["replicas"].as_u64() {
        context.insert(params::REPLICAS.to_string(), r.to_string());
    }
    context.insert(params::ENCRYPTED.to_string(), v["encrypted"].as_bool().unwrap_or(false).to_string());
    Volume {
        capacity_bytes: v["size_bytes"].as_i64().unwrap_or(0),
        volume_id: v["name"].as_str().unwrap_or_default().to_string(),
        volume_context: context,
        content_source: None,
        accessible_topology: zones
            .iter()
            .map(|z| Topology { segments: HashMap::from([(ZONE_KEY.to_string(), z.clone())]) })
            .collect(),
    }
}

/// Degraded or rebuilding volumes are abnormal, with what is going on.
pub fn condition_of(v: &Value) -> VolumeCondition {
    let health = v["health"].as_str().unwrap_or("unknown");
    if let Some(locked) = v["locked"].as_str() {
        return VolumeCondition { abnormal: true, message: format!("locked on this node: {locked}") };
    }
    match health {
        "healthy" => VolumeCondition { abnormal: false, message: "healthy: every copy on a live node, caught up".into() },
        "rebuilding" => VolumeCondition {
            abnormal: true,
            message: "rebuilding: a copy is being made on another node; I/O is served meanwhile".into(),
        },
        "degraded" => VolumeCondition {
            abnormal: true,
            message: "degraded: a copy is on a node that is down or drained, or missing; `raftblk volume inspect` shows which"
                .into(),
        },
        other => VolumeCondition { abnormal: true, message: format!("health {other:?}") },
    }
}

fn published_nodes(v: &Value) -> Vec<String> {
    v["publications"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["node"].as_u64())
        .map(|n| n.to_string())
        .collect()
}

impl ControllerService {
    async fn volume(&self, id: &str) -> Result<Value, Status> {
        self.api.call("GET", format!("/v1/volumes/{}", segment(id)), None).await.map_err(|e| e.to_status())
    }

    /// The zones raftblk nodes are in (every node serves every volume, so a volume is
    /// reachable from all of them).
    async fn zones(&self) -> Vec<String> {
        let Ok(nodes) = self.api.call("GET", "/v1/nodes".into(), None).await else { return Vec::new() };
        let mut zones: Vec<String> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["report"]["zone"].as_str())
            .filter(|z| !z.is_empty())
            .map(str::to_string)
            .collect();
        zones.sort();
        zones.dedup();
        zones
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        need("name", &req.name)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is missing"));
        }
        for c in &req.volume_capabilities {
            access::check(c).map_err(Status::invalid_argument)?;
        }
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source is not supported: raftblk has no snapshots or clones yet",
            ));
        }
        let wanted = params::parse(req.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(Status::invalid_argument)?;
        let (required, limit) =
            req.capacity_range.as_ref().map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        let size = params::size_for(required, limit).map_err(capacity_status)?;
        let zones = self.zones().await;
        let topology = requested_zones(req.accessibility_requirements.as_ref());
        if !topology.is_empty() && !zones.is_empty() && !topology.iter().any(|z| zones.contains(z)) {
            return Err(Status::resource_exhausted(format!(
                "no raftblk node is in the requested zone(s) {topology:?}; nodes are in {zones:?}"
            )));
        }
        // Copies go to nodes in the requisite zones (every node of the cluster can serve the
        // volume, but its data then stays where the workload may run).
        let placement: Vec<String> = requisite_zones(req.accessibility_requirements.as_ref())
            .into_iter()
            .filter(|z| zones.contains(z))
            .collect();
        let reachable: Vec<String> = if topology.is_empty() {
            zones.clone()
        } else {
            zones.iter().filter(|z| topology.contains(z)).cloned().collect()
        };
        let body = json!({
            "name": req.name,
            "size": size,
            "replicas": wanted.replicas,
            "encrypted": wanted.encrypted,
            "labels": { "csi.raftblk.io/provisioned": "true" },
            "zones": placement,
        });
        let created = match self.api.call("POST", "/v1/volumes".into(), Some(body)).await {
            Ok(v) => v,
            Err(e) if e.status == 409 => {
                // Idempotent by name: the same request again gets the same volume.
                let v = self.volume(&req.name).await?;
                let same = params::fits(v["size_bytes"].as_u64().unwrap_or(0), required, limit)
                    && v["replicas"].as_u64() == Some(u64::from(wanted.replicas))
                    && v["encrypted"].as_bool().unwrap_or(false) == wanted.encrypted;
                if !same {
                    return Err(Status::already_exists(format!(
                        "a volume named {:?} exists with other parameters ({} bytes, replicas {}, encrypted {}); pick another name",
                        req.name, v["size_bytes"], v["replicas"], v["encrypted"]
                    )));
                }
                v
            }
            Err(e) => return Err(e.to_status()),
        };
        Ok(Response::new(CreateVolumeResponse { volume: Some(volume_of(&created, &reachable)) }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        match self.api.call("DELETE", format!("/v1/volumes/{}", segment(&req.volume_id)), None).await {
            Ok(_) => Ok(Response::new(DeleteVolumeResponse {})),
            Err(e) if e.status == 404 => Ok(Response::new(DeleteVolumeResponse {})),
            Err(e) if e.status == 409 => Err(Status::failed_precondition(e.message)),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        need("node_id", &req.node_id)?;
        let capability = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is missing"))?;
        access::check(capability).map_err(Status::invalid_argument)?;
        let node: u64 = req
            .node_id
            .parse()
            .map_err(|_| Status::not_found(format!("node {:?} is not a raftblk node id", req.node_id)))?;
        let v = self.volume(&req.volume_id).await?;
        if node != 0 {
            if let Ok(nodes) = self.api.call("GET", "/v1/nodes".into(), None).await {
                let known = nodes.as_array().into_iter().flatten().any(|n| n["id"].as_u64() == Some(node));
                if !known {
                    return Err(Status::not_found(format!("node {node} is not in the raftblk cluster")));
                }
            }
        }
        let read_only =
            req.readonly || access::read_only(capability) || v["read_only"].as_bool().unwrap_or(false);
        let body = json!({ "node": node, "read_only": read_only });
        let publication = self
            .api
            .call("POST", format!("/v1/volumes/{}/publish", segment(&req.volume_id)), Some(body))
            .await
            .map_err(|e| e.to_status())?;
        let generation = publication["generation"].as_u64().unwrap_or(0);
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: HashMap::from([
                (GENERATION_KEY.to_string(), generation.to_string()),
                ("raftblk.io/read-only".to_string(), read_only.to_string()),
            ]),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        let path = format!("/v1/volumes/{}/unpublish", segment(&req.volume_id));
        let v = match self.volume(&req.volume_id).await {
            Ok(v) => v,
            Err(s) if s.code() == Code::NotFound => {
                return Ok(Response::new(ControllerUnpublishVolumeResponse {}))
            }
            Err(s) => return Err(s),
        };
        // An empty node id means every node.
        let nodes: Vec<u64> = if req.node_id.is_empty() {
            published_nodes(&v).iter().filter_map(|n| n.parse().ok()).collect()
        } else {
            match req.node_id.parse() {
                Ok(n) => vec![n],
                Err(_) => return Ok(Response::new(ControllerUnpublishVolumeResponse {})),
            }
        };
        for node in nodes {
            match self.api.call("POST", path.clone(), Some(json!({ "node": node }))).await {
                Ok(_) => {}
                Err(e) if e.status == 404 => {}
                Err(e) => return Err(e.to_status()),
            }
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is missing"));
        }
        let v = self.volume(&req.volume_id).await?;
        if let Err(e) = params::parse(req.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse { confirmed: None, message: e }));
        }
        for c in &req.volume_capabilities {
            if let Err(why) = access::check(c) {
                return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                }));
            }
            if v["read_only"].as_bool().unwrap_or(false) && !access::read_only(c) {
                return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: "the volume is read-only".into(),
                }));
            }
        }
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries is negative"));
        }
        let start: usize = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token.parse().map_err(|_| {
                Status::aborted(format!(
                    "starting_token {:?} is not one this driver gave",
                    req.starting_token
                ))
            })?
        };
        let all = self.api.call("GET", "/v1/volumes".into(), None).await.map_err(|e| e.to_status())?;
        let mut volumes: Vec<Value> = all.as_array().cloned().unwrap_or_default();
        volumes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        if start > volumes.len() {
            return Err(Status::aborted(format!(
                "starting_token {start} is past the end ({} volumes)",
                volumes.len()
            )));
        }
        let take = if req.max_entries == 0 { usize::MAX } else { req.max_entries as usize };
        let zones = self.zones().await;
        let page: Vec<_> = volumes.iter().skip(start).take(take).collect();
        let next = start + page.len();
        let entries = page
            .into_iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(volume_of(v, &zones)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition_of(v)),
                }),
            })
            .collect();
        let next_token = if next < volumes.len() { next.to_string() } else { String::new() };
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        let wanted = params::parse(req.parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(Status::invalid_argument)?;
        let zones = requested_zones_of(req.accessible_topology.as_ref());
        // Each copy goes to a different node, so a volume of N+1 copies fits in the
        // (N+1)-th largest free space among the nodes (in the requested zone, if any).
        let nodes = self.api.call("GET", "/v1/nodes".into(), None).await.unwrap_or(Value::Null);
        let mut free: Vec<u64> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["liveness"].as_str() != Some("dead"))
            .filter(|n| zones.is_empty() || zones.iter().any(|z| n["report"]["zone"].as_str() == Some(z)))
            .filter_map(|n| n["report"]["free_bytes"].as_u64())
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        let available = free.get(usize::from(wanted.replicas)).copied().unwrap_or(0);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(crate::model::VOLUME_SIZE_MAX_BYTES as i64),
            minimum_volume_size: Some(crate::model::VOLUME_SIZE_ALIGN_BYTES as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::ExpandVolume,
            Type::ListVolumesPublishedNodes,
            Type::VolumeCondition,
            Type::GetVolume,
            Type::PublishReadonly,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: t as i32,
            })),
        })
        .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is missing"))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(Status::invalid_argument(
                "capacity_range has neither required_bytes nor limit_bytes",
            ));
        }
        let size = params::size_for(range.required_bytes, range.limit_bytes).map_err(capacity_status)?;
        let v = self.volume(&req.volume_id).await?;
        let current = v["size_bytes"].as_u64().unwrap_or(0);
        let size = if current >= size {
            current
        } else {
            let path = format!("/v1/volumes/{}/resize", segment(&req.volume_id));
            let grown = self
                .api
                .call("POST", path, Some(json!({ "size": size })))
                .await
                .map_err(|e| e.to_status())?;
            grown["size_bytes"].as_u64().unwrap_or(size)
        };
        let block = req.volume_capability.as_ref().is_some_and(access::is_block);
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: size as i64,
            node_expansion_required: !block,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        need("volume_id", &req.volume_id)?;
        let v = self.volume(&req.volume_id).await?;
        let zones = self.zones().await;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume_of(&v, &zones)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&v),
                volume_condition: Some(condition_of(&v)),
            }),
        }))
    }
}

fn zones_of(topologies: &[Topology]) -> Vec<String> {
    topologies.iter().filter_map(|t| t.segments.get(ZONE_KEY).cloned()).collect()
}

/// Zones named by a CreateVolume's requirements (requisite, else preferred).
fn requested_zones(req: Option<&TopologyRequirement>) -> Vec<String> {
    let Some(r) = req else { return Vec::new() };
    let zones = zones_of(&r.requisite);
    if zones.is_empty() {
        zones_of(&r.preferred)
    } else {
        zones
    }
}

/// Zones a CreateVolume requires (its requisite topologies only).
fn requisite_zones(req: Option<&TopologyRequirement>) -> Vec<String> {
    req.map(|r| zones_of(&r.requisite)).unwrap_or_default()
}

fn requested_zones_of(t: Option<&Topology>) -> Vec<String> {
    t.map(|t| zones_of(std::slice::from_ref(t))).unwrap_or_default()
}
