//! The HTTP control API: JSON volume management under `/v1`, Prometheus text at
//! `/metrics`, liveness at `/healthz`. Every error is `{"error": "..."}` with a
//! message that says what to fix.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::attach::{Attacher, AttachmentError};
use crate::cluster::JoinError;
use crate::membership::{JoinRequest, Membership};
use crate::metrics::Metrics;
use crate::size::parse_size;
use crate::volumes::{VolumeError, VolumeManager};

/// What the handlers share.
pub struct ApiState {
    /// The node's volumes.
    pub volumes: Arc<VolumeManager>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Facts about this node for `GET /v1/node`.
    pub node: NodeInfo,
    /// Whether `POST /v1/debug/faults` is allowed.
    pub fault_injection: bool,
    /// The cluster membership (`None` when the node runs alone).
    pub cluster: Option<Arc<Membership>>,
    /// The node's kernel attachments.
    pub attacher: Arc<Attacher>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    /// Nodes to cut off in both directions.
    #[serde(default)]
    block: Vec<u64>,
    /// Nodes whose messages to this node are dropped (this node still reaches them).
    #[serde(default)]
    block_inbound: Vec<u64>,
}

/// Static facts about the running node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// raftblkd version.
    pub version: String,
    /// The I/O engine in use.
    pub io_engine: String,
    /// NBD TCP address.
    pub nbd_listen: String,
    /// NBD unix socket.
    pub nbd_socket: String,
    /// Data directory.
    pub data_dir: String,
    /// Cluster node id (absent when running alone).
    #[serde(default)]
    pub node_id: Option<u64>,
    /// Other nodes, "ID@HOST:PORT", sorted by id: the static ones and those that joined.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The cluster's transport id (absent when running alone).
    #[serde(default)]
    pub cluster_id: Option<u64>,
    /// Ids of the key-encryption keys this node holds (never the keys).
    #[serde(default)]
    pub keks: Vec<String>,
    /// The KEK new encrypted volumes are wrapped by.
    #[serde(default)]
    pub current_kek: Option<String>,
}

/// A size given either as bytes or as a string with units.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeArg {
    Bytes(u64),
    Text(String),
}

impl SizeArg {
    fn bytes(&self) -> Result<u64, ApiError> {
        match self {
            SizeArg::Bytes(b) => Ok(*b),
            SizeArg::Text(s) => parse_size(s).map_err(|e| ApiError::bad_request(e.to_string())),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: String,
    size: SizeArg,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    replicas: u8,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    encrypted: bool,
    /// Zones the copies must go to (empty: any).
    #[serde(default)]
    zones: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaRequest {
    #[serde(default)]
    add: Option<u64>,
    #[serde(default)]
    remove: Option<u64>,
    /// Seconds to wait for a new copy to catch up before answering.
    #[serde(default)]
    timeout_s: Option<u64>,
}

/// How long adding a copy waits for it to catch up, unless the request says otherwise.
const REPLICA_CATCH_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    to: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeRequest {
    size: SizeArg,
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message }
    }
}

impl From<VolumeError> for ApiError {
    fn from(e: VolumeError) -> Self {
        let status = match &e {
            VolumeError::Invalid(_) => StatusCode::BAD_REQUEST,
            VolumeError::NotFound(_) => StatusCode::NOT_FOUND,
            VolumeError::NoPlacement(_) => StatusCode::INSUFFICIENT_STORAGE,
            VolumeError::Exists(_) | VolumeError::InUse { .. } => StatusCode::CONFLICT,
            VolumeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            VolumeError::Catalog(_) | VolumeError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            VolumeError::Remote { error, .. } => status_of_refusal(error.kind),
        };
        ApiError { status, message: e.to_string() }
    }
}

/// The HTTP status for another node's refusal of `kind`, so a refusal keeps its meaning
/// however many nodes it crossed.
fn status_of_refusal(kind: crate::control::ErrorKind) -> StatusCode {
    use crate::control::ErrorKind as K;
    match kind {
        K::Invalid | K::Malformed => StatusCode::BAD_REQUEST,
        K::NotFound => StatusCode::NOT_FOUND,
        K::Exists | K::Conflict => StatusCode::CONFLICT,
        K::Unavailable | K::NotLeader { .. } => StatusCode::SERVICE_UNAVAILABLE,
        K::Unsupported => StatusCode::NOT_IMPLEMENTED,
        K::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8], example: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("request body is not valid: {e}; expected e.g. {example}"))
    })
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/node", get(node))
        .route("/v1/volumes", get(list).post(create))
        .route("/v1/volumes/{name}", get(inspect).delete(delete))
        .route("/v1/volumes/{name}/resize", post(resize))
        .route("/v1/volumes/{name}/scrub", post(scrub_start).get(scrub_status))
        .route("/v1/volumes/{name}/transfer-leader", post(transfer_leader))
        .route("/v1/volumes/{name}/replicas", post(replicas))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/attachments", get(attachments))
        .route("/v1/volumes/{name}/publish", post(publish))
        .route("/v1/volumes/{name}/unpublish", post(unpublish))
        .route("/v1/detach", post(detach))
        .route("/v1/cluster/join", post(join))
        .route("/v1/nodes", get(nodes))
        .route("/v1/catalog", get(catalog))
        .route("/v1/cluster/settings", get(cluster_settings).put(set_cluster_settings))
        .route("/v1/cluster/rotate-kek", post(rotate_kek))
        .route("/v1/nodes/{id}/{action}", post(node_action))
        .route("/v1/debug/faults", post(faults))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint; see /v1/volumes, /v1/attachments, /v1/nodes, /v1/node, /v1/cluster/join, /metrics, /healthz"
                    .into(),
            }
        })
        .with_state(state)
}

async fn metrics(State(s): State<Arc<ApiState>>) -> Response {
    let volumes = s.volumes.clone();
    let _ = tokio::task::spawn_blocking(move || volumes.refresh_gauges()).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn node(State(s): State<Arc<ApiState>>) -> Json<NodeInfo> {
    let mut info = s.node.clone();
    // Peers change as nodes join, so they are read now rather than at start-up.
    if let Some(m) = &s.cluster {
        info.peers = m.peers().iter().map(|p| format!("{}@{}", p.id, p.peer_addr)).collect();
        info.cluster_id = Some(m.cluster_id());
    }
    let (keks, current) = s.volumes.kek_ids();
    info.keks = keks;
    info.current_kek = current;
    Json(info)
}

async fn join(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: JoinRequest = parse_json(&body, r#"{"node_id": 4, "peer_addr": "10.0.0.4:10811"}"#)?;
    let Some(membership) = &s.cluster else {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "this node runs alone (no cluster.peers), so there is no cluster to join; join through a node of a cluster (start the first nodes with --peers)".into(),
        });
    };
    match crate::cluster::accept_join(membership, req).await {
        Ok(answer) => Ok(Json(answer).into_response()),
        Err(e) => {
            let status = match &e {
                JoinError::Invalid(_) => StatusCode::BAD_REQUEST,
                JoinError::Conflict(_) | JoinError::NotClustered(_) => StatusCode::CONFLICT,
                JoinError::Membership(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError { status, message: e.to_string() })
        }
    }
}

async fn list(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(s.volumes.list()).into_response())
}

async fn create(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: CreateRequest = parse_json(&body, r#"{"name": "db", "size": "10G", "replicas": 2}"#)?;
    let size = req.size.bytes()?;
    let spec = crate::volumes::VolumeSpec {
        name: req.name,
        size_bytes: size,
        read_only: req.read_only,
        replicas: req.replicas,
        labels: req.labels,
        encrypted: req.encrypted,
        zones: req.zones,
    };
    let status = s.volumes.create(&spec).await?;
    Ok((StatusCode::CREATED, Json(status)).into_response())
}

async fn inspect(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(Json(s.volumes.inspect(&name).await?).into_response())
}

async fn resize(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ResizeRequest = parse_json(&body, r#"{"size": "20G"}"#)?;
    let size = req.size.bytes()?;
    Ok(Json(s.volumes.resize(&name, size).await?).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttachRequest {
    #[serde(default)]
    read_only: bool,
    /// The attachment generation the device writes with (from ControllerPublish).
    #[serde(default)]
    generation: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DetachRequest {
    /// A volume name or a device (`/dev/nbd3`, `nbd3`).
    target: String,
    #[serde(default)]
    force: bool,
}

impl From<AttachmentError> for ApiError {
    fn from(e: AttachmentError) -> Self {
        use raftblk_blockdev::kernel_nbd::AttachError;
        let status = match &e {
            AttachmentError::Volume(_) | AttachmentError::NotFound(_) => StatusCode::NOT_FOUND,
            AttachmentError::Conflict(_) | AttachmentError::Busy(_) => StatusCode::CONFLICT,
            AttachmentError::Kernel(AttachError::NoDriver) => StatusCode::NOT_IMPLEMENTED,
            AttachmentError::Kernel(_) | AttachmentError::Record(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: e.to_string() }
    }
}

/// An attachment as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttachmentView {
    /// `/dev/nbdN`.
    pub device: String,
    /// The record.
    #[serde(flatten)]
    pub attachment: crate::attach::Attachment,
}

fn view(a: crate::attach::Attachment) -> AttachmentView {
    AttachmentView { device: a.device(), attachment: a }
}

async fn attach(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: AttachRequest = if body.is_empty() {
        AttachRequest::default()
    } else {
        parse_json(&body, r#"{"read_only": false}"#)?
    };
    let a = s.attacher.attach(&name, req.read_only, req.generation).await?;
    Ok(Json(view(a)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    node: u64,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnpublishBody {
    node: u64,
}

impl From<crate::volumes::PublishError> for ApiError {
    fn from(e: crate::volumes::PublishError) -> Self {
        use crate::publish::PublishRefusal;
        use crate::volumes::PublishError;
        match e {
            PublishError::Volume(v) => v.into(),
            PublishError::Refused(r) => {
                let status = match r {
                    PublishRefusal::OtherMode { .. } => StatusCode::CONFLICT,
                    _ => StatusCode::PRECONDITION_FAILED,
                };
                ApiError { status, message: r.to_string() }
            }
        }
    }
}

async fn publish(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: PublishBody = parse_json(&body, r#"{"node": 2, "read_only": false}"#)?;
    let req = crate::publish::PublishRequest { node: req.node, read_only: req.read_only, force: req.force };
    Ok(Json(s.volumes.publish(&name, req).await?).into_response())
}

async fn unpublish(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: UnpublishBody = parse_json(&body, r#"{"node": 2}"#)?;
    s.volumes.unpublish(&name, req.node).await?;
    Ok(Json(serde_json::json!({ "unpublished": name, "node": req.node })).into_response())
}

async fn attachments(State(s): State<Arc<ApiState>>) -> Json<Vec<AttachmentView>> {
    Json(s.attacher.list().await.into_iter().map(view).collect())
}

async fn detach(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: DetachRequest = parse_json(&body, r#"{"target": "/dev/nbd0"}"#)?;
    Ok(Json(view(s.attacher.detach(&req.target, req.force).await?)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKekRequest {
    key_file: std::path::PathBuf,
}

async fn rotate_kek(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let req: RotateKekRequest = parse_json(&body, r#"{"key_file": "/etc/raftblk/kek.new"}"#)?;
    Ok(Json(s.volumes.rotate_kek(&req.key_file).await?).into_response())
}

async fn scrub_start(State(s): State<Arc<ApiState>>, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok((StatusCode::ACCEPTED, Json(s.volumes.start_scrub(&name)?)).into_response())
}

async fn scrub_status(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(s.volumes.scrub_status(&name)?).into_response())
}

async fn nodes(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    if s.volumes.nodes().is_none() {
        return Err(ApiError::bad_request(
            "this node runs alone (no cluster.peers): there is no node table; start a cluster (raftblk dev-cluster)".into(),
        ));
    }
    Ok(Json(s.volumes.node_statuses()).into_response())
}

/// `GET /v1/catalog`: the cluster catalog's Raft group as this node sees it.
async fn catalog(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    Ok(Json(cluster_catalog(&s)?.view()).into_response())
}

/// The cluster catalog, or the refusal a node running alone gives.
fn cluster_catalog(s: &ApiState) -> Result<&Arc<crate::cluster_catalog::ClusterCatalog>, ApiError> {
    s.volumes.cluster_catalog().ok_or_else(|| {
        ApiError::bad_request(
            "this node runs alone (no cluster.peers): it has no cluster catalog or settings (its own catalog and configuration apply); start a cluster (raftblk dev-cluster)"
                .into(),
        )
    })
}

/// `GET /v1/cluster/settings`: every cluster setting and the value in force here.
async fn cluster_settings(State(s): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    let catalog = cluster_catalog(&s)?;
    Ok(Json(crate::cluster::settings_view(&s.volumes, catalog)).into_response())
}

/// `PUT /v1/cluster/settings` with `{"KEY": VALUE, ...}`: every value is checked before any
/// is committed to the catalog.
async fn set_cluster_settings(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    let catalog = cluster_catalog(&s)?;
    let wanted: std::collections::BTreeMap<String, serde_json::Value> =
        parse_json(&body, r#"{"node_dead_after_s": 120}"#)?;
    if wanted.is_empty() {
        return Err(ApiError::bad_request(
            r#"no setting given; send e.g. {"node_dead_after_s": 120}"#.into(),
        ));
    }
    for (key, value) in &wanted {
        crate::cluster_catalog::settings::validate(key, value).map_err(ApiError::bad_request)?;
    }
    for (key, value) in wanted {
        let op = crate::model::CatalogOp::SetSetting { key, value };
        catalog.propose(op).await.map_err(crate::volumes::VolumeError::from)?;
    }
    crate::cluster::apply_settings(&s.volumes, catalog);
    tracing::info!(body = %String::from_utf8_lossy(&body), "cluster settings changed by an operator");
    Ok(Json(crate::cluster::settings_view(&s.volumes, catalog)).into_response())
}

/// `POST /v1/nodes/ID/cordon|uncordon|drain|remove`: records the operator decision; the
/// acting node moves copies off drained and removed nodes (see `crate::healer`).
async fn node_action(
    State(s): State<Arc<ApiState>>,
    Path((id, action)): Path<(u64, String)>,
) -> Result<Response, ApiError> {
    use crate::model::AdminState;
    let state = match action.as_str() {
        "cordon" => AdminState::Cordoned,
        "uncordon" => AdminState::Active,
        "drain" => AdminState::Draining,
        "remove" => AdminState::Removed,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown node action {other:?}; use cordon, uncordon, drain or remove"
            )))
        }
    };
    let Some(dir) = s.volumes.nodes() else {
        return Err(ApiError::bad_request(
            "this node runs alone (no cluster.peers): there are no nodes to manage".into(),
        ));
    };
    let mut known = s.volumes.peer_ids();
    known.extend(s.volumes.node_id());
    if !known.contains(&id) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no node {id}; nodes are {known:?}"),
        });
    }
    if state.evicts_copies() {
        // Refuse what cannot finish: the copies need somewhere to go.
        let views = dir.views(&s.volumes.peer_ids());
        for r in s.volumes.records().into_iter().filter(|r| r.voters.contains(&id)) {
            if let Err(why) = crate::planner::placement::place(&views, 1, &r.voters, None) {
                return Err(ApiError {
                    status: StatusCode::CONFLICT,
                    message: format!(
                        "cannot {action} node {id}: volume {:?} has no other node for its copy: {why}",
                        r.name
                    ),
                });
            }
        }
    }
    if let Some(catalog) = s.volumes.cluster_catalog() {
        let op = crate::model::CatalogOp::SetNodeAdmin { node: id, state };
        catalog.propose(op).await.map_err(crate::volumes::VolumeError::from)?;
        // This node's table follows its catalog replica, which the leader's answer means
        // has applied the decision or is about to: take it over now so the answer shows it.
        crate::cluster::reconcile_admin(&s.volumes, catalog);
    } else {
        dir.table
            .set_admin(id, state)
            .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string() })?;
    }
    tracing::info!(node = id, ?state, "node state set by an operator");
    Ok(Json(s.volumes.node_statuses()).into_response())
}

async fn transfer_leader(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: TransferRequest = parse_json(&body, r#"{"to": 2}"#)?;
    s.volumes.transfer_leader(&name, req.to).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn replicas(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ReplicaRequest =
        parse_json(&body, r#"{"add": 4} or {"remove": 2} (a move is an add, then a remove)"#)?;
    let timeout = req.timeout_s.map_or(REPLICA_CATCH_UP_TIMEOUT, std::time::Duration::from_secs);
    let status = match (req.add, req.remove) {
        (Some(n), None) => s.volumes.add_replica(&name, n, timeout).await?,
        (None, Some(n)) => s.volumes.remove_replica(&name, n, timeout).await?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"add\" or \"remove\" with a node id".into(),
            ))
        }
    };
    Ok(Json(status).into_response())
}

async fn faults(State(s): State<Arc<ApiState>>, body: Bytes) -> Result<Response, ApiError> {
    if !s.fault_injection {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: "fault injection is off; start raftblkd with --fault-injection true (tests only)".into(),
        });
    }
    let req: FaultRequest =
        parse_json(&body, r#"{"block": [2, 3], "block_inbound": [4]} (both empty or left out: heal)"#)?;
    s.volumes.set_partition(&req.block, &req.block_inbound)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<Response, ApiError> {
    s.volumes.delete(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
