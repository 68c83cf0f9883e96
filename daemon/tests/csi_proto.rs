//! The checked-in CSI code (daemon/src/csi/csi.v1.rs) is what tonic-prost-build makes of
//! daemon/proto/csi.proto, so `cargo build` needs no protoc and the two cannot drift apart.
//!
//! After editing the proto (or upgrading tonic/prost), regenerate with:
//!   RAFTBLK_REGEN_CSI=1 cargo test -p raftblk-daemon --test csi_proto
//! Needs `protoc` and the well-known .proto files (Debian: protobuf-compiler, which pulls in
//! libprotobuf-dev); without protoc the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

const REGEN_VAR: &str = "RAFTBLK_REGEN_CSI";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The protoc that prost-build will run: $PROTOC, else `protoc` on the PATH.
fn protoc_available() -> bool {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    Command::new(protoc).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs tonic-prost-build on csi.proto into `out_dir`; returns the generated file's path.
/// Client and server code both, with default trait methods answering UNIMPLEMENTED.
fn generate(out_dir: &Path) -> PathBuf {
    let proto_dir = manifest_dir().join("proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .generate_default_stubs(true)
        .emit_rerun_if_changed(false)
        .out_dir(out_dir)
        .compile_protos(&[proto_dir.join("csi.proto")], &[proto_dir])
        .unwrap_or_else(|e| {
            panic!(
                "tonic-prost-build failed on daemon/proto/csi.proto: {e}\n\
                 (google/protobuf/*.proto missing? install libprotobuf-dev)"
            )
        });
    out_dir.join("csi.v1.rs")
}

#[test]
fn generated_csi_code_matches_the_proto() {
    if !protoc_available() {
        eprintln!(
            "SKIPPED generated_csi_code_matches_the_proto: protoc not found (set PROTOC or \
             install protobuf-compiler); daemon/src/csi/csi.v1.rs was not checked against the proto"
        );
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let fresh = std::fs::read_to_string(generate(tmp.path())).expect("read generated code");
    let checked_in_path = manifest_dir().join("src/csi/csi.v1.rs");

    if std::env::var_os(REGEN_VAR).is_some_and(|v| !v.is_empty() && v != "0") {
        std::fs::write(&checked_in_path, &fresh).expect("write daemon/src/csi/csi.v1.rs");
        eprintln!("{REGEN_VAR}: wrote {}", checked_in_path.display());
        return;
    }

    let checked_in = std::fs::read_to_string(&checked_in_path).expect("read daemon/src/csi/csi.v1.rs");
    if checked_in != fresh {
        let first_diff = checked_in
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(fresh.lines().count()));
        panic!(
            "daemon/src/csi/csi.v1.rs is not what daemon/proto/csi.proto generates (first difference \
             at line {}); regenerate with {REGEN_VAR}=1 cargo test -p raftblk-daemon --test csi_proto",
            first_diff + 1
        );
    }
}
