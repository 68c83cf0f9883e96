//! A client of raftblkd's HTTP API (`/v1`), shared by the `raftblk` CLI and the CSI plugin:
//! every answer is JSON, every refusal `{"error": "..."}` with an HTTP status.

use serde_json::Value;

/// A raftblkd API endpoint (`http://HOST:PORT`).
#[derive(Debug, Clone)]
pub struct ApiClient {
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

impl ApiClient {
    /// A client of `base` (`http://127.0.0.1:10810`, or `HOST:PORT`) whose calls give up
    /// after `timeout`.
    pub fn new(base: &str, timeout: std::time::Duration) -> Self {
        let base = if base.contains("://") { base.to_string() } else { format!("http://{base}") };
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        ApiClient { base: base.trim_end_matches('/').to_string(), agent }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
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

    /// Calls the API on this thread.
    pub fn call_blocking(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ApiFailure> {
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
