//! The CSI plugin's client of raftblkd's HTTP API, with each answer's HTTP status mapped to
//! the gRPC code the CSI spec asks for.

use serde_json::Value;
use tonic::{Code, Status};

/// A raftblkd API endpoint (`http://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct DaemonApi {
    base: String,
    agent: ureq::Agent,
}

/// A failed call: the HTTP status (0 when raftblkd was not reached) and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    /// HTTP status; 0 when the daemon could not be reached.
    pub status: u16,
    /// raftblkd's message.
    pub message: String,
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

impl DaemonApi {
    /// A client of `base` (`http://127.0.0.1:10810`, or `HOST:PORT`).
    pub fn new(base: &str) -> Self {
        let base = if base.contains("://") { base.to_string() } else { format!("http://{base}") };
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(120)).build();
        DaemonApi { base: base.trim_end_matches('/').to_string(), agent }
    }

    /// Calls the API off the async runtime.
    pub async fn call(
        &self,
        method: &'static str,
        path: String,
        body: Option<Value>,
    ) -> Result<Value, ApiFailure> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.call_blocking(method, &path, body)).await.unwrap_or_else(|e| {
            Err(ApiFailure { status: 500, message: format!("API call task failed: {e}") })
        })
    }

    fn call_blocking(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ApiFailure> {
        let url = format!("{}{}", self.base, path);
        let req = self.agent.request(method, &url);
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(resp) => {
                let text = resp.into_string().unwrap_or_default();
                if text.trim().is_empty() {
                    return Ok(Value::Null);
                }
                serde_json::from_str(&text).map_err(|e| ApiFailure {
                    status: 500,
                    message: format!("raftblkd answered non-JSON ({e}): {text}"),
                })
            }
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or(text);
                Err(ApiFailure { status, message })
            }
            Err(e) => {
                Err(ApiFailure { status: 0, message: format!("cannot reach raftblkd at {}: {e}", self.base) })
            }
        }
    }
}

/// A path segment for a volume name (names are validated by raftblkd; this only keeps the
/// URL well-formed for any input).
pub fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
