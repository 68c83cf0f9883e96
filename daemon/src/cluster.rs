//! The answering side of the control protocol ([`crate::control`]): which part of the
//! node handles each request. And the loops that keep a node in line with the cluster.
//!
//! Volume records live in the cluster catalog ([`crate::cluster_catalog`]): a change is
//! committed there first (`CatalogPropose` to the catalog leader), then pushed to the
//! nodes concerned (`Upsert`, `Delete`) so they act on it at once. Every node also follows
//! its own catalog replica ([`reconcile_loop`]), which is how a node that was down, or
//! missed a push, catches up. Tombstones keep a deleted volume from coming back.
//!
//! Membership travels the same way: a node that accepts a join ([`accept_join`]) tells
//! every other member (`AddPeer`), and the sync loop also pulls every peer's member list
//! (`Members`) and adds the nodes it lacks, so a member that was down during a join
//! learns the new node within one [`SYNC_INTERVAL`] of coming back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use raftblk_replication::node::ReplicationNode;

use crate::cluster_catalog::settings::{SettingView, SETTINGS};
use crate::cluster_catalog::ClusterCatalog;
use crate::control::{send, Answer, ErrorKind, Request};
use crate::membership::{Change, JoinAnswer, JoinRequest, Membership, MembershipError};
use crate::model::{CatalogOp, Member, NodeRecord};
use crate::volumes::VolumeManager;

/// How often each node pulls its peers' volume records.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// How long a sync waits for one peer.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a join waits for each member to confirm the new node, and for a member
/// whose id the joiner claims at another address to show it is still alive.
const JOIN_CONTROL_TIMEOUT: Duration = Duration::from_secs(3);

/// Makes `volumes` (volume messages) and `membership` (membership messages) answer
/// peers' control messages.
pub fn install_handler(node: &ReplicationNode, volumes: Arc<VolumeManager>, membership: Arc<Membership>) {
    node.set_control_handler(Arc::new(move |payload: Bytes| {
        let volumes = volumes.clone();
        let membership = membership.clone();
        Box::pin(async move {
            let answer = match Request::decode(&payload) {
                Ok(Request::Heartbeat { report, admin }) => match volumes.nodes() {
                    Some(dir) => {
                        absorb(dir, report, &admin);
                        Answer::Heartbeat { report: dir.my_report(), admin: dir.table.admin_entries() }
                    }
                    None => Answer::error(ErrorKind::Invalid, "this node keeps no node table"),
                },
                Ok(Request::AddPeer { id, peer_addr }) => match membership.add(id, peer_addr) {
                    Ok(_) => Answer::Ok,
                    Err(e) => Answer::error(ErrorKind::Internal, e.to_string()),
                },
                Ok(Request::Members) => Answer::Members(members_of(&membership)),
                Ok(Request::CatalogPropose(proposal)) => match volumes.cluster_catalog() {
                    Some(catalog) => match catalog.propose_here(&proposal).await {
                        Ok((outcome, index)) => Answer::Catalog { outcome, index },
                        Err(e) => Answer::Error(e),
                    },
                    None => Answer::error(ErrorKind::Invalid, "this node has no catalog replica"),
                },
                Ok(request) => volumes.on_control(request).await,
                Err(e) => Answer::Error(e.into()),
            };
            answer.encode()
        })
    }));
}

/// This node and every peer it knows, by id.
pub fn members_of(membership: &Membership) -> Vec<Member> {
    let mut members = membership.peers();
    if let Some(node) = membership.node() {
        members.push(Member { id: membership.node_id(), peer_addr: node.peer_listen() });
    }
    members.sort_unstable();
    members
}

/// Why a join was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The id or address belongs to another live member.
    #[error("{0}")]
    Conflict(String),
    /// This node cannot accept joins (it runs alone).
    #[error("{0}")]
    NotClustered(String),
    /// Recording the new member failed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// Accepts node `req.node_id` at `req.peer_addr` into the cluster: records it here,
/// tells every other member, and answers with the cluster id and every member.
///
/// A re-join with the same id and address changes nothing and answers the same. A known
/// id at a new address moves the member, unless the node at the old address still
/// answers as that id: then two live nodes would share an id and the join is refused.
/// A silent old address is taken as the node having moved (or having been replaced);
/// a node that is merely partitioned away at that moment loses its address, which is
/// why the refusal needs a live answer rather than a guess.
pub async fn accept_join(membership: &Membership, req: JoinRequest) -> Result<JoinAnswer, JoinError> {
    let Some(node) = membership.node() else {
        return Err(JoinError::NotClustered(
            "this node runs alone (no cluster.peers), so it has no cluster to join and no replication to extend; join through a node of a cluster (or start the first nodes with --peers)".into(),
        ));
    };
    let me = membership.node_id();
    if req.node_id == 0 {
        return Err(JoinError::Invalid(
            "node id 0 is reserved; give the joining node --node-id 1 or more".into(),
        ));
    }
    if req.node_id == me {
        return Err(JoinError::Conflict(format!(
            "node id {me} is the id of the member answering this join ({}); give the joining node another --node-id",
            node.peer_listen()
        )));
    }
    if req.peer_addr.ip().is_unspecified() || req.peer_addr.port() == 0 {
        return Err(JoinError::Invalid(format!(
            "peer address {} cannot be connected to; the joining node must give its reachable --peer-listen HOST:PORT",
            req.peer_addr
        )));
    }
    if req.peer_addr == node.peer_listen() {
        return Err(JoinError::Conflict(format!(
            "peer address {} is this member's (node {me}); give the joining node its own --peer-listen",
            req.peer_addr
        )));
    }
    if let Some(other) = membership.member_at(req.peer_addr).filter(|&id| id != req.node_id) {
        return Err(JoinError::Conflict(format!(
            "peer address {} belongs to node {other}; give the joining node its own --peer-listen",
            req.peer_addr
        )));
    }
    if let Some(old) = membership.addr_of(req.node_id).filter(|&a| a != req.peer_addr) {
        // The transport still points id N at `old`, so an answer can only come from there.
        if send(node, req.node_id, &Request::Members, JOIN_CONTROL_TIMEOUT).await.is_ok() {
            return Err(JoinError::Conflict(format!(
                "node id {} is a live member at {old}; give the joining node another --node-id, or stop that node first if it is moving to {}",
                req.node_id, req.peer_addr
            )));
        }
    }
    let change = membership.add(req.node_id, req.peer_addr)?;
    tracing::info!(node = req.node_id, peer_addr = %req.peer_addr, ?change, "join accepted");
    // Tell the others, including on a re-join, which repairs members that missed it.
    // A member that does not confirm catches up through the sync loop's Members pull.
    let msg = Request::AddPeer { id: req.node_id, peer_addr: req.peer_addr };
    for peer in node.peer_ids().into_iter().filter(|&p| p != req.node_id) {
        if let Err(e) = send(node, peer, &msg, JOIN_CONTROL_TIMEOUT).await {
            tracing::warn!(peer, joined = req.node_id, error = %e, "member did not confirm the new node; it will learn it at its next sync");
        }
    }
    if change == Change::Unchanged {
        tracing::debug!(node = req.node_id, "re-join of a known member");
    }
    let catalog_voters = membership.catalog_voters()?;
    Ok(JoinAnswer { cluster_id: membership.cluster_id(), members: members_of(membership), catalog_voters })
}

/// Pulls every peer's member list once and adds the members this node lacks.
pub async fn sync_members_once(membership: &Membership) {
    let Some(node) = membership.node() else { return };
    for peer in node.peer_ids() {
        match send(node, peer, &Request::Members, SYNC_TIMEOUT).await {
            Ok(Answer::Members(members)) => {
                for m in members {
                    // Only unknown ids: an address change travels with AddPeer from the
                    // member that accepted it, and without versions a pulled list cannot
                    // tell an old address from a new one.
                    if m.id != membership.node_id() && membership.addr_of(m.id).is_none() {
                        if let Err(e) = membership.add(m.id, m.peer_addr) {
                            tracing::warn!(peer, member = m.id, error = %e, "cannot add a member a peer knows");
                        }
                    }
                }
            }
            Ok(other) => tracing::debug!(peer, ?other, "unexpected answer to Members"),
            Err(e) => tracing::debug!(peer, error = %e, "membership sync with peer failed"),
        }
    }
}

/// Records a peer's heartbeat (or answer) and merges its operator decisions.
fn absorb(
    dir: &crate::nodes::NodeDirectory,
    report: crate::model::NodeReport,
    admin: &std::collections::BTreeMap<u64, crate::model::AdminEntry>,
) {
    dir.table.heard(report, std::time::Instant::now());
    if let Err(e) = dir.table.merge_admin(admin) {
        tracing::warn!(error = %e, "cannot record a peer's node decisions");
    }
}

/// Sends this node's heartbeat to every peer each [`crate::nodes::HEARTBEAT_INTERVAL`]
/// (all at once), recording their answers, until `stop`.
pub async fn heartbeat_loop(
    node: ReplicationNode,
    dir: Arc<crate::nodes::NodeDirectory>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let msg = Request::Heartbeat { report: dir.my_report(), admin: dir.table.admin_entries() };
        let sends = node.peer_ids().into_iter().map(|peer| {
            let (node, msg, dir) = (&node, &msg, &dir);
            async move {
                match send(node, peer, msg, crate::nodes::HEARTBEAT_INTERVAL).await {
                    Ok(Answer::Heartbeat { report, admin }) => absorb(dir, report, &admin),
                    Ok(other) => tracing::debug!(peer, ?other, "unexpected answer to a heartbeat"),
                    Err(e) => tracing::trace!(peer, error = %e, "no heartbeat answer"),
                }
            }
        });
        futures::future::join_all(sends).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(crate::nodes::HEARTBEAT_INTERVAL) => {}
        }
    }
}

/// Brings this node's volumes in line with its catalog replica: deleted volumes go, new
/// or changed records are applied (each only if newer than what the node has, see
/// [`VolumeManager::upsert`]), and operators' decisions reach the node table.
pub async fn reconcile_once(volumes: &VolumeManager, catalog: &ClusterCatalog) {
    let machine = catalog.machine();
    let (records, deleted) = match (machine.volumes(), machine.deleted()) {
        (Ok(r), Ok(d)) => (r, d),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot read the catalog replica");
            return;
        }
    };
    let held = volumes.records().into_iter().map(|r| (r.name.clone(), r)).collect();
    let pass = crate::planner::reconcile::plan_pass(&held, records, &deleted.into_iter().collect());
    for uuid in pass.deletes {
        if let Err(e) = volumes.delete_uuid(&uuid).await {
            tracing::warn!(%uuid, error = %e, "cannot apply a delete from the catalog");
        }
    }
    for record in pass.records {
        let name = record.name.clone();
        if let Err(e) = volumes.upsert(record).await {
            tracing::warn!(volume = %name, error = %e, "cannot apply a volume record from the catalog");
        }
    }
    reconcile_admin(volumes, catalog);
    if let (Some(dir), Ok(nodes)) = (volumes.nodes(), machine.nodes()) {
        dir.table.set_registered(nodes.into_iter().map(|(id, n)| (id, n.report)).collect());
    }
    apply_settings(volumes, catalog);
}

/// Puts the cluster settings made in the catalog into effect on this node.
pub fn apply_settings(volumes: &VolumeManager, catalog: &ClusterCatalog) {
    let settings = match catalog.machine().settings() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "cannot read the cluster settings"),
    };
    if let (Some(dir), Some(s)) =
        (volumes.nodes(), settings.get("node_dead_after_s").and_then(|v| v.as_u64()))
    {
        dir.table.set_dead_after(Some(Duration::from_secs(s)));
    }
    if let Some(mib) = settings.get("rebuild_rate_mib_s").and_then(|v| v.as_u64()) {
        catalog.node().set_rebuild_rate(mib.saturating_mul(1 << 20));
    }
    if let Some(on) = settings.get("leader_follows_client").and_then(|v| v.as_bool()) {
        volumes.set_leader_follows_client(on);
    }
    if let Some(h) = settings.get("scrub_interval_h").and_then(|v| v.as_u64()) {
        volumes.set_scrub_interval_h(h);
    }
    if let Some(mib) = settings.get("scrub_rate_mib_s").and_then(|v| v.as_u64()) {
        volumes.set_scrub_rate_mib_s(mib);
    }
}

/// Every cluster setting with the value in force on this node.
pub fn settings_view(volumes: &VolumeManager, catalog: &ClusterCatalog) -> Vec<SettingView> {
    let set = catalog.machine().settings().unwrap_or_default();
    SETTINGS
        .iter()
        .map(|def| {
            let here = match def.key {
                "node_dead_after_s" => volumes.nodes().map(|d| d.table.timing().dead_after.as_secs()).into(),
                "rebuild_rate_mib_s" => (catalog.node().rebuild_rate() >> 20).into(),
                "scrub_interval_h" => volumes.scrub_interval_h().into(),
                "scrub_rate_mib_s" => volumes.scrub_rate_mib_s().into(),
                _ => volumes.leader_follows_client().into(),
            };
            let (value, source) = match set.get(def.key) {
                Some(v) => (v.clone(), "cluster"),
                None => (here, "node configuration"),
            };
            SettingView { key: def.key.into(), value, source: source.into(), help: def.help.into() }
        })
        .collect()
}

/// How often a node compares its registration in the catalog with what it reports.
const REGISTER_INTERVAL: Duration = Duration::from_secs(10);

/// Whether `registered` no longer describes the node: anything but free space changed, or
/// free space moved by more than 1 % of the capacity (so the log does not grow with every
/// byte written).
fn registration_stale(registered: &NodeRecord, now: &NodeRecord) -> bool {
    let (a, b) = (&registered.report, &now.report);
    let moved = a.free_bytes.abs_diff(b.free_bytes) > b.capacity_bytes / 100;
    registered.peer_addr != now.peer_addr
        || a.zone != b.zone
        || a.labels != b.labels
        || a.api_addr != b.api_addr
        || a.capacity_bytes != b.capacity_bytes
        || moved
}

/// Keeps this node's registration in the catalog current (every [`REGISTER_INTERVAL`]).
pub async fn register_loop(
    dir: Arc<crate::nodes::NodeDirectory>,
    catalog: Arc<ClusterCatalog>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let mine =
            NodeRecord { report: dir.my_report(), peer_addr: catalog.node().peer_listen().to_string() };
        let registered = catalog.machine().nodes().ok().and_then(|mut n| n.remove(&mine.report.id));
        if registered.is_none_or(|r| registration_stale(&r, &mine)) {
            match catalog.propose(CatalogOp::PutNode { node: mine }).await {
                Ok(_) => tracing::debug!("registration in the catalog updated"),
                Err(e) => tracing::debug!(error = %e, "cannot register in the catalog yet; retrying"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REGISTER_INTERVAL) => {}
        }
    }
}

/// Takes operators' decisions about nodes from the catalog replica into the node table.
pub fn reconcile_admin(volumes: &VolumeManager, catalog: &ClusterCatalog) {
    match (volumes.nodes(), catalog.machine().admin()) {
        (Some(dir), Ok(admin)) => {
            if let Err(e) = dir.table.merge_admin(&admin) {
                tracing::warn!(error = %e, "cannot record operators' decisions from the catalog");
            }
        }
        (_, Err(e)) => tracing::warn!(error = %e, "cannot read operators' decisions from the catalog"),
        (None, _) => {}
    }
}

/// Runs [`reconcile_once`] whenever the catalog replica applies something (and every
/// [`SYNC_INTERVAL`], to retry what failed) until `stop`.
pub async fn reconcile_loop(
    volumes: Arc<VolumeManager>,
    catalog: Arc<ClusterCatalog>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut changed = catalog.machine().subscribe();
    loop {
        reconcile_once(&volumes, &catalog).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = changed.changed() => {}
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
}

/// Runs [`sync_members_once`] every [`SYNC_INTERVAL`] until `stop`.
pub async fn sync_loop(membership: Arc<Membership>, stop: tokio_util::sync::CancellationToken) {
    loop {
        sync_members_once(&membership).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SYNC_INTERVAL) => {}
        }
    }
}
