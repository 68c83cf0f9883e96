//! The CSI gRPC API (package `csi.v1`, CSI spec v1.12.0): messages, clients and servers for the
//! Identity, Controller and Node services.
//!
//! `csi.v1.rs` beside this file is generated from daemon/proto/csi.proto by tonic-prost-build and
//! checked in, so building needs no protoc; daemon/tests/csi_proto.rs fails when it no longer
//! matches the proto, and regenerates it with
//! `RAFTBLK_REGEN_CSI=1 cargo test -p raftblk-daemon --test csi_proto`.
//!
//! The server traits have default methods that answer UNIMPLEMENTED, so an implementation only
//! overrides the RPCs it supports.

/// Everything in the spec's `csi.v1` package.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    clippy::unwrap_used,
    missing_docs,
    rustdoc::all,
    unused_qualifications
)]
pub mod v1 {
    include!("csi.v1.rs");
}

#[cfg(test)]
mod tests {
    use super::v1::controller_client::ControllerClient;
    use super::v1::controller_server::{Controller, ControllerServer};
    use super::v1::identity_client::IdentityClient;
    use super::v1::identity_server::{Identity, IdentityServer};
    use super::v1::*;
    use prost::Message;
    use tonic::{Code, Request, Response, Status};

    struct TestIdentity;

    #[tonic::async_trait]
    impl Identity for TestIdentity {
        async fn get_plugin_info(
            &self,
            _request: Request<GetPluginInfoRequest>,
        ) -> Result<Response<GetPluginInfoResponse>, Status> {
            Ok(Response::new(GetPluginInfoResponse {
                name: "test.csi".into(),
                vendor_version: "1".into(),
                manifest: Default::default(),
            }))
        }

        async fn get_plugin_capabilities(
            &self,
            _request: Request<GetPluginCapabilitiesRequest>,
        ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
            Ok(Response::new(GetPluginCapabilitiesResponse { capabilities: vec![] }))
        }

        async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
            Ok(Response::new(ProbeResponse { ready: Some(true) }))
        }
    }

    /// Implements no RPC: every call gets the generated UNIMPLEMENTED answer.
    struct NoController;

    impl Controller for NoController {}

    #[tokio::test]
    async fn client_and_server_talk_over_a_unix_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("csi.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(TestIdentity))
                .add_service(ControllerServer::new(NoController))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );

        let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut identity = IdentityClient::new(channel.clone());
        let info = identity.get_plugin_info(GetPluginInfoRequest {}).await.expect("GetPluginInfo");
        assert_eq!(info.get_ref().name, "test.csi");
        let probe = identity.probe(ProbeRequest {}).await.expect("Probe");
        assert_eq!(probe.get_ref().ready, Some(true));

        let mut controller = ControllerClient::new(channel);
        let err = controller
            .create_volume(CreateVolumeRequest { name: "v".into(), ..Default::default() })
            .await
            .expect_err("CreateVolume is not implemented");
        assert_eq!(err.code(), Code::Unimplemented);
        server.abort();
    }

    /// A few encodings pinned by hand, so a renumbered field shows up even if the proto and the
    /// generated code were changed together.
    #[test]
    fn field_numbers_on_the_wire() {
        // CreateVolumeRequest.name = 1 (string), mutable_parameters = 8 (map).
        let req = CreateVolumeRequest {
            name: "v".into(),
            mutable_parameters: [("k".to_string(), "x".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'v', 0x42, 6, 0x0a, 1, b'k', 0x12, 1, b'x']);

        // Snapshot.ready_to_use = 5 (bool), group_snapshot_id = 6 (string).
        let snap = Snapshot { ready_to_use: true, group_snapshot_id: "g".into(), ..Default::default() };
        assert_eq!(snap.encode_to_vec(), [0x28, 1, 0x32, 1, b'g']);

        // VolumeCapability: mount = 2 in the access_type oneof, access_mode = 3.
        let cap = VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
            access_mode: Some(volume_capability::AccessMode {
                mode: volume_capability::access_mode::Mode::SingleNodeMultiWriter as i32,
            }),
        };
        assert_eq!(cap.encode_to_vec(), [0x12, 6, 0x0a, 4, b'e', b'x', b't', b'4', 0x1a, 2, 0x08, 7]);

        // ControllerServiceCapability.RPC.Type values.
        use controller_service_capability::rpc::Type as Rpc;
        assert_eq!(Rpc::ModifyVolume as i32, 14);
        assert_eq!(Rpc::GetSnapshot as i32, 15);
        use node_service_capability::rpc::Type as NodeRpc;
        assert_eq!(NodeRpc::VolumeMountGroup as i32, 6);

        // NodeExpandVolumeRequest.secrets = 6; GetCapacityResponse.minimum_volume_size = 3.
        let ne = NodeExpandVolumeRequest {
            secrets: [("a".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(ne.encode_to_vec()[0], 0x32);
        let gc = GetCapacityResponse { minimum_volume_size: Some(5), ..Default::default() };
        assert_eq!(gc.encode_to_vec(), [0x1a, 2, 0x08, 5]);
    }
}
