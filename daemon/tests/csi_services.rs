//! The CSI services driven over their unix socket by a real gRPC client (tonic), against a
//! real raftblkd: what csi-sanity checks, group by group (Identity; Controller: create and
//! delete idempotency, capacity ranges, parameters, list pagination, validate, expand,
//! get volume, publish/unpublish and read-write exclusivity; Node: the calls that need no
//! kernel NBD driver, and the refusals of bad requests), with the gRPC codes the spec
//! requires. The Node service's work with a kernel (attach, mkfs only when empty, mount,
//! restage without mkfs, expand, raw block, the fence) runs for real in the guest
//! (tests/vm/csi-kernel.sh runs this binary there) and is skipped, with a message, on a
//! kernel without the NBD driver.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftblk_daemon::csi::daemon_api::daemon_api;
use raftblk_daemon::csi::node::NodeService;
use raftblk_daemon::csi::proto::v1::controller_client::ControllerClient;
use raftblk_daemon::csi::proto::v1::identity_client::IdentityClient;
use raftblk_daemon::csi::proto::v1::node_client::NodeClient;
use raftblk_daemon::csi::proto::v1::volume_capability::access_mode::Mode;
use raftblk_daemon::csi::proto::v1::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use raftblk_daemon::csi::proto::v1::*;
use raftblk_daemon::csi::{self, Mode as CsiMode};
use tonic::transport::Channel;
use tonic::Code;

struct Raftblkd {
    child: Child,
    api: String,
    _dir: tempfile::TempDir,
}

impl Drop for Raftblkd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn start_raftblkd() -> Raftblkd {
    let dir = tempfile::Builder::new().prefix("raftblk-csi-test.").tempdir().expect("tempdir");
    let api_port = free_port();
    let api = format!("127.0.0.1:{api_port}");
    let log = std::fs::File::create(dir.path().join("raftblkd.log")).expect("log");
    // In the guest the binary is wherever the harness copied it.
    let bin = std::env::var("RAFTBLKD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_raftblkd").to_string());
    let child = Command::new(bin)
        .args(["--data-dir", &dir.path().join("data").display().to_string()])
        .args(["--nbd-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &api])
        .args(["--nbd-socket", &dir.path().join("nbd.sock").display().to_string()])
        .args(["--bootstrap-volumes", "none"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("raftblkd");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&api).is_err() {
        assert!(Instant::now() < deadline, "raftblkd did not listen on {api}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Raftblkd { child, api: format!("http://{api}"), _dir: dir }
}

/// The plugin (all services) on a unix socket of its own, and clients connected to it.
struct Plugin {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    _socket_dir: tempfile::TempDir,
}

async fn start_plugin(api: &str) -> Plugin {
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket: PathBuf = socket_dir.path().join("csi.sock");
    let daemon = daemon_api(api);
    let (node_id, zone) = csi::node::local_identity(&daemon).await.expect("local identity");
    let node = NodeService { api: daemon.clone(), node_id, zone };
    let path = socket.clone();
    tokio::spawn(async move {
        csi::serve(CsiMode::All, &path, daemon, Some(node), std::future::pending()).await.expect("serve");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "plugin socket never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("unix://{}", socket.display());
    let channel = tonic::transport::Endpoint::try_from(url).expect("uri").connect().await.expect("connect");
    Plugin {
        identity: IdentityClient::new(channel.clone()),
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        _socket_dir: socket_dir,
    }
}

fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
    }
}

fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create(name: &str, required: i64, limit: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange { required_bytes: required, limit_bytes: limit }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(ok) => panic!("expected an error, got {ok:?}"),
        Err(s) => {
            assert!(!s.message().is_empty(), "a {:?} without a message", s.code());
            s.code()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_controller_follow_the_spec() {
    let daemon = start_raftblkd();
    let mut p = start_plugin(&daemon.api).await;

    // Identity
    let info = p.identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.name, "blk.raftblk.io");
    assert!(!info.vendor_version.is_empty());
    let caps =
        p.identity.get_plugin_capabilities(GetPluginCapabilitiesRequest {}).await.expect("caps").into_inner();
    assert!(caps.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(plugin_capability::Type::Service(s)) if s.r#type == plugin_capability::service::Type::ControllerService as i32
    )));
    assert_eq!(p.identity.probe(ProbeRequest {}).await.expect("probe").into_inner().ready, Some(true));

    // CreateVolume: bad requests
    let c = &mut p.controller;
    assert_eq!(code(c.create_volume(create("", 0, 0, &[])).await), Code::InvalidArgument);
    let no_caps = CreateVolumeRequest { volume_capabilities: vec![], ..create("a", 0, 0, &[]) };
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let multi_writer = CreateVolumeRequest {
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        ..create("a", 0, 0, &[])
    };
    assert_eq!(code(c.create_volume(multi_writer).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(create("a", 0, 0, &[("copies", "2")])).await), Code::InvalidArgument);
    assert_eq!(
        code(c.create_volume(create("a", 0, 0, &[("replicas", "many")])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.create_volume(create("a", 0, 0, &[("encrypted", "yes")])).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.create_volume(create("a", 2 << 20, 1 << 20, &[])).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(create("a", 1 << 50, 0, &[])).await), Code::OutOfRange);
    assert_eq!(code(c.create_volume(create("a", 0, 0, &[("replicas", "2")])).await), Code::ResourceExhausted);
    assert_eq!(code(c.create_volume(create("a b", 0, 0, &[])).await), Code::InvalidArgument);

    // CreateVolume: idempotent by name, capacity rounded up to 4 KiB blocks
    let params = [("replicas", "0"), ("encrypted", "false"), ("csi.storage.k8s.io/fstype", "ext4")];
    let v = c.create_volume(create("pvc-a", 10_000_000, 0, &params)).await.expect("create").into_inner();
    let vol = v.volume.expect("volume");
    assert_eq!((vol.volume_id.as_str(), vol.capacity_bytes), ("pvc-a", 10_002_432));
    let again = c.create_volume(create("pvc-a", 10_000_000, 0, &params)).await.expect("again").into_inner();
    assert_eq!(again.volume.expect("volume"), vol);
    assert_eq!(code(c.create_volume(create("pvc-a", 20 << 20, 0, &params)).await), Code::AlreadyExists);
    assert_eq!(
        code(c.create_volume(create("pvc-a", 10_000_000, 0, &[("encrypted", "true")])).await),
        Code::AlreadyExists
    );
    for name in ["pvc-b", "pvc-c"] {
        c.create_volume(create(name, 0, 0, &[])).await.expect("create");
    }

    // ListVolumes: pages of 2, then the rest; a token it never gave is ABORTED
    let first = c
        .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: String::new() })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    let rest = c
        .list_volumes(ListVolumesRequest { max_entries: 2, starting_token: first.next_token.clone() })
        .await
        .expect("list")
        .into_inner();
    let mut names: Vec<String> = first
        .entries
        .iter()
        .chain(&rest.entries)
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
        .collect();
    names.sort();
    assert_eq!(names, ["pvc-a", "pvc-b", "pvc-c"]);
    assert!(rest.next_token.is_empty());
    let bad = ListVolumesRequest { max_entries: 0, starting_token: "zzz".into() };
    assert_eq!(code(c.list_volumes(bad).await), Code::Aborted);
    let negative = ListVolumesRequest { max_entries: -1, starting_token: String::new() };
    assert_eq!(code(c.list_volumes(negative).await), Code::InvalidArgument);

    // GetCapacity, ControllerGetCapabilities
    let cap = c.get_capacity(GetCapacityRequest::default()).await.expect("capacity").into_inner();
    assert!(cap.maximum_volume_size.unwrap_or(0) > 0);
    let bad_params =
        GetCapacityRequest { parameters: HashMap::from([("nope".into(), "1".into())]), ..Default::default() };
    assert_eq!(code(c.get_capacity(bad_params).await), Code::InvalidArgument);
    let ccaps =
        c.controller_get_capabilities(ControllerGetCapabilitiesRequest {}).await.expect("caps").into_inner();
    assert!(ccaps.capabilities.len() >= 5);

    // ValidateVolumeCapabilities
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_eq!(
        code(c.validate_volume_capabilities(validate("", vec![mount_cap(Mode::SingleNodeWriter)])).await),
        Code::InvalidArgument
    );
    assert_eq!(code(c.validate_volume_capabilities(validate("pvc-a", vec![])).await), Code::InvalidArgument);
    assert_eq!(
        code(c.validate_volume_capabilities(validate("nope", vec![mount_cap(Mode::SingleNodeWriter)])).await),
        Code::NotFound
    );
    let ok = c
        .validate_volume_capabilities(validate("pvc-a", vec![block_cap(Mode::SingleNodeWriter)]))
        .await
        .expect("ok");
    assert!(ok.into_inner().confirmed.is_some());
    let no = c
        .validate_volume_capabilities(validate("pvc-a", vec![mount_cap(Mode::MultiNodeMultiWriter)]))
        .await
        .expect("answer");
    let no = no.into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());

    // ControllerExpandVolume
    let expand = |id: &str, range: Option<CapacityRange>| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range,
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    let grown = c
        .controller_expand_volume(expand(
            "pvc-a",
            Some(CapacityRange { required_bytes: 32 << 20, limit_bytes: 0 }),
        ))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 32 << 20);
    assert!(grown.node_expansion_required);
    assert_eq!(code(c.controller_expand_volume(expand("pvc-a", None)).await), Code::InvalidArgument);
    assert_eq!(
        code(
            c.controller_expand_volume(expand("", Some(CapacityRange { required_bytes: 1, limit_bytes: 0 })))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.controller_expand_volume(expand(
                "nope",
                Some(CapacityRange { required_bytes: 1 << 20, limit_bytes: 0 })
            ))
            .await
        ),
        Code::NotFound
    );

    // ControllerPublish: read-write exclusive, repeats idempotent, readers refused meanwhile
    let publish = |node: &str, cap: VolumeCapability, readonly: bool| ControllerPublishVolumeRequest {
        volume_id: "pvc-a".into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    };
    let a = c
        .controller_publish_volume(publish("0", mount_cap(Mode::SingleNodeWriter), false))
        .await
        .expect("publish")
        .into_inner();
    let generation = a.publish_context.get("raftblk.io/generation").cloned().expect("generation");
    let again = c
        .controller_publish_volume(publish("0", mount_cap(Mode::SingleNodeWriter), false))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(again.publish_context.get("raftblk.io/generation"), Some(&generation));
    assert_eq!(
        code(c.controller_publish_volume(publish("7", mount_cap(Mode::SingleNodeWriter), false)).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.controller_publish_volume(publish("0", mount_cap(Mode::SingleNodeReaderOnly), true)).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.controller_publish_volume(publish("x", mount_cap(Mode::SingleNodeWriter), false)).await),
        Code::NotFound
    );
    let mut missing = publish("0", mount_cap(Mode::SingleNodeWriter), false);
    missing.volume_capability = None;
    assert_eq!(code(c.controller_publish_volume(missing).await), Code::InvalidArgument);
    let mut unknown = publish("0", mount_cap(Mode::SingleNodeWriter), false);
    unknown.volume_id = "nope".into();
    assert_eq!(code(c.controller_publish_volume(unknown).await), Code::NotFound);
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest { volume_id: "pvc-a".into() })
        .await
        .expect("get")
        .into_inner();
    let status = got.status.expect("status");
    assert_eq!(status.published_node_ids, vec!["0".to_string()]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));
    assert_eq!(
        code(c.controller_get_volume(ControllerGetVolumeRequest { volume_id: "nope".into() }).await),
        Code::NotFound
    );
    let unpublish = |node: &str| ControllerUnpublishVolumeRequest {
        volume_id: "pvc-a".into(),
        node_id: node.into(),
        ..Default::default()
    };
    c.controller_unpublish_volume(unpublish("0")).await.expect("unpublish");
    c.controller_unpublish_volume(unpublish("0")).await.expect("unpublish again");
    let b = c
        .controller_publish_volume(publish("7", mount_cap(Mode::SingleNodeWriter), false))
        .await
        .expect("node 7 after unpublish")
        .into_inner();
    let newer: u64 = b.publish_context["raftblk.io/generation"].parse().expect("number");
    assert!(newer > generation.parse::<u64>().expect("number"), "a new writer gets a newer generation");
    c.controller_unpublish_volume(unpublish("7")).await.expect("unpublish 7");
    // Block volumes may be published read-only to many nodes.
    for node in ["1", "2", "3"] {
        c.controller_publish_volume(publish(node, block_cap(Mode::MultiNodeReaderOnly), true))
            .await
            .expect("reader");
    }
    assert_eq!(
        code(c.controller_publish_volume(publish("4", block_cap(Mode::SingleNodeWriter), false)).await),
        Code::FailedPrecondition
    );

    // DeleteVolume: idempotent
    assert_eq!(
        code(c.delete_volume(DeleteVolumeRequest { volume_id: String::new(), ..Default::default() }).await),
        Code::InvalidArgument
    );
    c.delete_volume(DeleteVolumeRequest { volume_id: "pvc-b".into(), ..Default::default() })
        .await
        .expect("delete");
    c.delete_volume(DeleteVolumeRequest { volume_id: "pvc-b".into(), ..Default::default() })
        .await
        .expect("delete again");
    c.delete_volume(DeleteVolumeRequest { volume_id: "never-was".into(), ..Default::default() })
        .await
        .expect("delete unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_service_answers_and_refuses_bad_requests() {
    let daemon = start_raftblkd();
    let mut p = start_plugin(&daemon.api).await;
    p.controller.create_volume(create("pvc-n", 8 << 20, 0, &[])).await.expect("create");
    let n = &mut p.node;

    let info = n.node_get_info(NodeGetInfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.node_id, "0", "a node alone is node 0");
    let caps = n.node_get_capabilities(NodeGetCapabilitiesRequest {}).await.expect("caps").into_inner();
    let has = |t: node_service_capability::rpc::Type| {
        caps.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(node_service_capability::Type::Rpc(r)) if r.r#type == t as i32))
    };
    assert!(has(node_service_capability::rpc::Type::StageUnstageVolume));
    assert!(has(node_service_capability::rpc::Type::ExpandVolume));

    let scratch = tempfile::tempdir().expect("tempdir");
    let staging = scratch.path().join("staging").display().to_string();
    let stage = |id: &str, path: &str, cap: Option<VolumeCapability>| NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
        volume_capability: cap,
        ..Default::default()
    };
    assert_eq!(
        code(n.node_stage_volume(stage("", &staging, Some(mount_cap(Mode::SingleNodeWriter)))).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(n.node_stage_volume(stage("pvc-n", "", Some(mount_cap(Mode::SingleNodeWriter)))).await),
        Code::InvalidArgument
    );
    assert_eq!(code(n.node_stage_volume(stage("pvc-n", &staging, None)).await), Code::InvalidArgument);
    assert_eq!(
        code(n.node_stage_volume(stage("nope", &staging, Some(mount_cap(Mode::SingleNodeWriter)))).await),
        Code::NotFound
    );
    let mut bad_generation = stage("pvc-n", &staging, Some(mount_cap(Mode::SingleNodeWriter)));
    bad_generation.publish_context.insert("raftblk.io/generation".into(), "x".into());
    assert_eq!(code(n.node_stage_volume(bad_generation).await), Code::InvalidArgument);
    if !Path::new("/sys/module/nbd").exists() {
        // Here the kernel has no NBD driver: staging is refused with a precondition, not a crash.
        let r = n.node_stage_volume(stage("pvc-n", &staging, Some(mount_cap(Mode::SingleNodeWriter)))).await;
        let s = r.expect_err("no nbd driver");
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("nbd"), "{s:?}");
    }

    // Unstage and unpublish of what is not there succeed (idempotent).
    n.node_unstage_volume(NodeUnstageVolumeRequest {
        volume_id: "pvc-n".into(),
        staging_target_path: staging.clone(),
    })
    .await
    .expect("unstage");
    assert_eq!(
        code(
            n.node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: "pvc-n".into(),
                staging_target_path: String::new()
            })
            .await
        ),
        Code::InvalidArgument
    );
    let target = scratch.path().join("target").display().to_string();
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: "pvc-n".into(),
        target_path: target.clone(),
    })
    .await
    .expect("unpublish");
    let publish = NodePublishVolumeRequest {
        volume_id: "pvc-n".into(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    assert_eq!(code(n.node_publish_volume(publish.clone()).await), Code::FailedPrecondition, "not staged");
    assert_eq!(
        code(n.node_publish_volume(NodePublishVolumeRequest { target_path: String::new(), ..publish }).await),
        Code::InvalidArgument
    );

    // Stats: a missing path is NOT_FOUND; a directory gets bytes and inodes and a condition.
    let stats = |path: &str| NodeGetVolumeStatsRequest {
        volume_id: "pvc-n".into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(code(n.node_get_volume_stats(stats(&format!("{target}/nope"))).await), Code::NotFound);
    let dir = scratch.path().display().to_string();
    let s = n.node_get_volume_stats(stats(&dir)).await.expect("stats").into_inner();
    assert_eq!(s.usage.len(), 2);
    assert!(s.usage.iter().all(|u| u.total > 0));
    assert_eq!(s.volume_condition.map(|c| c.abnormal), Some(false));
    let expand =
        NodeExpandVolumeRequest { volume_id: "pvc-n".into(), volume_path: dir, ..Default::default() };
    assert_eq!(code(n.node_expand_volume(expand).await), Code::NotFound, "nothing attached here");
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

async fn attachments(api: &str) -> Vec<serde_json::Value> {
    let v = daemon_api(api).call("GET", "/v1/attachments".into(), None).await.expect("attachments");
    v.as_array().cloned().unwrap_or_default()
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_stage_mkfs_restage_expand_raw_block_and_fence() {
    if !Path::new("/sys/module/nbd").exists() {
        eprintln!("SKIPPED: this kernel has no NBD driver (modprobe nbd); tests/vm/csi-kernel.sh runs this test in the guest");
        return;
    }
    let daemon = start_raftblkd();
    let mut p = start_plugin(&daemon.api).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let staging = scratch.path().join("staging").display().to_string();
    let target = scratch.path().join("target").display().to_string();
    let cap = mount_cap(Mode::SingleNodeWriter);

    p.controller.create_volume(create("pvc-k", 64 << 20, 0, &[])).await.expect("create");
    let publish = |id: &str, cap: VolumeCapability| ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: "0".into(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    let ctx = p
        .controller
        .controller_publish_volume(publish("pvc-k", cap.clone()))
        .await
        .expect("publish")
        .into_inner();
    let stage = NodeStageVolumeRequest {
        volume_id: "pvc-k".into(),
        publish_context: ctx.publish_context.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let node_publish = NodePublishVolumeRequest {
        volume_id: "pvc-k".into(),
        publish_context: ctx.publish_context.clone(),
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    p.node.node_stage_volume(stage.clone()).await.expect("stage: attach, mkfs, mount");
    // A restarted plugin (a new process would be the same: it keeps no state) finds the
    // volume staged: the repeat is answered from the mount table and raftblkd's attachments.
    let mut p = start_plugin(&daemon.api).await;
    p.node.node_stage_volume(stage.clone()).await.expect("stage again through a new plugin: idempotent");
    p.node.node_publish_volume(node_publish.clone()).await.expect("publish: bind mount");
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4u8)
        .map(|i| (Path::new(&target).join(format!("f{i}")), pattern(i, 300_000 + usize::from(i) * 4096)))
        .collect();
    for (path, data) in &files {
        write_synced(path, data).expect("write through the mounted volume");
    }
    let unpublish = NodeUnpublishVolumeRequest { volume_id: "pvc-k".into(), target_path: target.clone() };
    let unstage =
        NodeUnstageVolumeRequest { volume_id: "pvc-k".into(), staging_target_path: staging.clone() };
    p.node.node_unpublish_volume(unpublish.clone()).await.expect("unpublish");
    p.node.node_unstage_volume(unstage.clone()).await.expect("unstage: unmount, detach");
    assert!(attachments(&daemon.api).await.is_empty(), "the device is still attached after unstage");

    // Staged again: the file system is found (no mkfs) and the files are there.
    p.node.node_stage_volume(stage.clone()).await.expect("restage");
    p.node.node_publish_volume(node_publish.clone()).await.expect("republish");
    for (path, data) in &files {
        assert_eq!(
            &std::fs::read(path).expect("read back"),
            data,
            "{} changed across unstage/stage",
            path.display()
        );
    }

    // Online grow: the controller grows the volume, the node the mounted ext4.
    let before = rustix::fs::statvfs(Path::new(&target)).expect("statvfs");
    let expand = ControllerExpandVolumeRequest {
        volume_id: "pvc-k".into(),
        capacity_range: Some(CapacityRange { required_bytes: 128 << 20, limit_bytes: 0 }),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    p.controller.controller_expand_volume(expand).await.expect("controller expand");
    let grown = p
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "pvc-k".into(),
            volume_path: target.clone(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect("node expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 << 20);
    let after = rustix::fs::statvfs(Path::new(&target)).expect("statvfs");
    assert!(
        after.f_blocks * after.f_frsize > (before.f_blocks * before.f_frsize) * 3 / 2,
        "ext4 did not grow"
    );
    let stats = p
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "pvc-k".into(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert!(stats.usage.iter().any(|u| u.unit == volume_usage::Unit::Bytes as i32 && u.total > 100 << 20));

    // Raw block: the device itself is bound at the target; bytes written there are the volume's.
    let block = block_cap(Mode::SingleNodeWriter);
    p.controller.create_volume(create("pvc-raw", 16 << 20, 0, &[])).await.expect("create raw");
    let ctx_raw = p
        .controller
        .controller_publish_volume(publish("pvc-raw", block.clone()))
        .await
        .expect("publish raw")
        .into_inner();
    let raw_target = scratch.path().join("raw-dev").display().to_string();
    p.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: "pvc-raw".into(),
            publish_context: ctx_raw.publish_context.clone(),
            staging_target_path: scratch.path().join("raw-staging").display().to_string(),
            volume_capability: Some(block.clone()),
            ..Default::default()
        })
        .await
        .expect("stage raw");
    p.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-raw".into(),
            publish_context: ctx_raw.publish_context,
            target_path: raw_target.clone(),
            volume_capability: Some(block.clone()),
            ..Default::default()
        })
        .await
        .expect("publish raw");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let data = pattern(0x5a, 1 << 20);
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&raw_target)
            .expect("open the bound device");
        dev.seek(SeekFrom::Start(4096)).expect("seek");
        dev.write_all(&data).expect("write raw");
        dev.sync_all().expect("sync raw");
        let mut back = vec![0u8; data.len()];
        dev.seek(SeekFrom::Start(4096)).expect("seek");
        dev.read_exact(&mut back).expect("read raw");
        assert_eq!(back, data);
    }
    p.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "pvc-raw".into(),
            target_path: raw_target,
        })
        .await
        .expect("unpublish raw");

    // The fence: another node takes pvc-k over (forced, as an operator would for a node that
    // is gone), and this node's still-mounted device has its writes refused.
    let api = daemon_api(&daemon.api);
    api.call(
        "POST",
        "/v1/volumes/pvc-k/publish".into(),
        Some(serde_json::json!({ "node": 7, "force": true })),
    )
    .await
    .expect("forced takeover by node 7");
    let late = write_synced(&Path::new(&target).join("late"), &pattern(9, 1 << 20));
    assert!(late.is_err(), "a write from the fenced-out attachment reached the volume");
    p.node.node_unpublish_volume(unpublish).await.expect("unpublish after the fence");
    p.node.node_unstage_volume(unstage).await.expect("unstage after the fence");
    eprintln!("CSI-KERNEL: PASS");
}

/// The `raftblk-csi` binary itself: flags, its socket, and a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_binary_serves_its_socket_and_stops_on_sigterm() {
    let daemon = start_raftblkd();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_raftblk-csi"))
        .args(["--mode", "controller", "--endpoint", &format!("unix://{}", socket.display())])
        .args(["--api", &daemon.api])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("raftblk-csi");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "raftblk-csi never made its socket");
        assert!(child.try_wait().expect("wait").is_none(), "raftblk-csi exited early");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let info =
        IdentityClient::new(channel.clone()).get_plugin_info(GetPluginInfoRequest {}).await.expect("info");
    assert_eq!(info.into_inner().name, "blk.raftblk.io");
    // Controller mode serves no Node service.
    let node = NodeClient::new(channel).node_get_info(NodeGetInfoRequest {}).await;
    assert_eq!(node.expect_err("no node service").code(), Code::Unimplemented);
    let bad = Command::new(env!("CARGO_BIN_EXE_raftblk-csi"))
        .args(["--endpoint", "tcp://127.0.0.1:1"])
        .output()
        .expect("raftblk-csi");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unix://"), "{bad:?}");
    // SIGTERM: the plugin exits 0 and removes its socket.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "raftblk-csi did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket was left behind");
}
