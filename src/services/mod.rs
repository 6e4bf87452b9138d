//! What a worker does for its clients. Requests arrive as `sync_data`
//! payloads; every reply goes back to the client that asked.

use serde::Serialize;
use serde_json::Value;

/// The reply to a payload the worker does not understand.
#[derive(Debug, Serialize)]
struct PayloadError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    message: &'a str,
}

/// Answers a payload that no service handles.
pub fn unsupported(_payload: &Value) -> Value {
    serde_json::to_value(PayloadError {
        kind: "error",
        code: "unsupported",
        message: "this worker does not handle that request",
    })
    .expect("a static error serializes")
}
