//! The CSI plugin's client of raftblkd's HTTP API ([`crate::api_client`]), with each
//! failure's HTTP status mapped to the gRPC code the CSI spec asks for.

use tonic::{Code, Status};

pub use crate::api_client::{segment, ApiClient as DaemonApi, ApiFailure};

/// How long one API call of the plugin may take.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A client of raftblkd at `base` for the plugin.
pub fn daemon_api(base: &str) -> DaemonApi {
    DaemonApi::new(base, CALL_TIMEOUT)
}

impl ApiFailure {
    /// The gRPC status for this failure.
    pub fn to_status(&self) -> Status {
        let code = match self.status {
            400 => Code::InvalidArgument,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            412 => Code::FailedPrecondition,
            501 => Code::FailedPrecondition,
            507 => Code::ResourceExhausted,
            0 | 503 => Code::Unavailable,
            _ => Code::Internal,
        };
        Status::new(code, self.message.clone())
    }
}
