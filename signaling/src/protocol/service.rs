//! The messages between a client and a worker's services: the `payload` of
//! `sync_data`. The signaling server never decodes these; workers and
//! clients do.
//!
//! Text travels as JSON strings. Bytes that are not valid UTF-8 travel in
//! base64 with `"encoding": "base64"` next to them; without that field a
//! string is the bytes' UTF-8 text.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

string_id!(
    /// One PTY session on a worker.
    SessionId
);

/// How a `data`, `body` or file `content` string holds its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// The string is the bytes (valid UTF-8).
    #[default]
    Utf8,
    /// The string is the bytes in standard base64.
    Base64,
}

impl Encoding {
    fn is_utf8(&self) -> bool {
        *self == Self::Utf8
    }

    /// Encodes bytes: as text when they are UTF-8, else as base64.
    pub fn encode(bytes: &[u8]) -> (String, Self) {
        match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_owned(), Self::Utf8),
            Err(_) => (B64.encode(bytes), Self::Base64),
        }
    }

    /// Encodes bytes as base64, whatever they are.
    pub fn encode_binary(bytes: &[u8]) -> (String, Self) {
        (B64.encode(bytes), Self::Base64)
    }

    /// The bytes a string stands for.
    pub fn decode(self, text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        match self {
            Self::Utf8 => Ok(text.as_bytes().to_vec()),
            Self::Base64 => B64.decode(text),
        }
    }
}

/// The `type` names [`Request`] accepts.
const REQUEST_TYPES: &[&str] = &[
    "rtc_offer",
    "rtc_candidate",
    "execute",
    "attach_pty",
    "pty_input",
    "pty_ack",
    "pty_resize",
    "pty_close",
    "pty_resume",
    "proxy_http",
    "query_local",
];

impl Request {
    /// Decodes a `sync_data` payload, telling an unknown request from a
    /// malformed one.
    pub fn decode(payload: Value) -> Result<Self, (ServiceErrorCode, String)> {
        let kind = match payload.get("type") {
            Some(Value::String(kind)) => kind.clone(),
            _ => {
                return Err((
                    ServiceErrorCode::InvalidJson,
                    "expected a JSON object with a string \"type\"".into(),
                ));
            }
        };
        if !REQUEST_TYPES.contains(&kind.as_str()) {
            return Err((
                ServiceErrorCode::UnknownType,
                format!("unknown request type {kind:?}"),
            ));
        }
        serde_json::from_value(payload).map_err(|err| {
            (
                ServiceErrorCode::InvalidRequest,
                format!("invalid {kind:?} request: {err}"),
            )
        })
    }
}

/// An ICE candidate, as the browser's `RTCIceCandidateInit` has it (with
/// snake_case names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IceCandidate {
    /// The `candidate:` attribute line.
    pub candidate: String,
    /// The media stream's id.
    #[serde(default)]
    pub sdp_mid: Option<String>,
    /// The media line's index.
    #[serde(default)]
    pub sdp_mline_index: Option<u16>,
    /// The ICE username fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// What a client asks of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Session layer only: a WebRTC offer for a data channel to this worker.
    RtcOffer {
        /// The offer's SDP.
        sdp: String,
    },
    /// Session layer only: one of the client's ICE candidates.
    RtcCandidate(IceCandidate),
    /// Run a command to completion.
    Execute(Execute),
    /// Start an interactive terminal.
    AttachPty(AttachPty),
    /// Keystrokes for a session.
    PtyInput {
        /// The session.
        session_id: SessionId,
        /// The bytes, per `encoding`.
        data: String,
        /// How `data` holds the bytes.
        #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
        encoding: Encoding,
    },
    /// With flow control: the client has consumed output up to `offset`.
    PtyAck {
        /// The session.
        session_id: SessionId,
        /// Stream offset just past the last byte the client has taken in.
        offset: u64,
    },
    /// The client's terminal changed size.
    PtyResize {
        /// The session.
        session_id: SessionId,
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// End a session (its process group is killed).
    PtyClose {
        /// The session.
        session_id: SessionId,
    },
    /// Take over a running session (after a reconnect): its output comes to
    /// this client from `offset` on — replayed exactly when the worker still
    /// has it, else as a screen snapshot followed by live output.
    PtyResume {
        /// The session.
        session_id: SessionId,
        /// Offset just past the last output byte this client has.
        offset: u64,
        /// Echoed in `pty_resumed`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// On a session-layer control stream: the stream for the terminal's bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<u32>,
    },
    /// An HTTP request to a configured local service.
    ProxyHttp(ProxyHttp),
    /// A query of the worker's local data.
    QueryLocal(QueryLocal),
}

/// `execute`: run `sh -c command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Execute {
    /// Echoed in the result so concurrent runs can be told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The shell command.
    pub command: String,
    /// Standard input.
    #[serde(default)]
    pub input: Option<String>,
    /// Seconds before the process group is killed (the worker caps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Send the output as it comes, in `execute_output` messages, instead
    /// of in the result (no output caps then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// Which output of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// `execute_output`: a piece of a streamed command's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteOutput {
    /// From the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Where it was written.
    pub stream: OutputStream,
    /// The bytes (see `encoding`).
    pub data: String,
    /// How `data` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub encoding: Encoding,
}

/// `attach_pty`: start a program on a new pseudo-terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachPty {
    /// Echoed in `pty_created`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// What to run through `sh -c`; the login shell when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Send at most a window of output ahead of the client's `pty_ack`s
    /// (see "Flow control" in docs/PROTOCOL.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flow_control: bool,
    /// On a session-layer control stream: the stream number that carries
    /// this terminal's bytes (output from the worker, input to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
}

/// A header value: one string, or several for repeated headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValues {
    /// A single value.
    One(String),
    /// A header that appears several times (e.g. `Set-Cookie`).
    Many(Vec<String>),
}

impl HeaderValues {
    /// The values, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let slice = match self {
            Self::One(value) => std::slice::from_ref(value),
            Self::Many(values) => values.as_slice(),
        };
        slice.iter().map(String::as_str)
    }
}

/// Header names to values.
pub type Headers = BTreeMap<String, HeaderValues>;

/// `proxy_http`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyHttp {
    /// Echoed in the result.
    pub request_id: String,
    /// A name from `COCOON_SERVICES`.
    pub service_name: String,
    /// GET, POST, PUT, DELETE, PATCH, HEAD or OPTIONS.
    pub method: String,
    /// Origin-form path with query, starting with `/`.
    pub path: String,
    /// Request headers.
    #[serde(default)]
    pub headers: Headers,
    /// Request body, per `body_encoding`.
    #[serde(default)]
    pub body: Option<String>,
    /// How `body` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub body_encoding: Encoding,
}

/// `query_local`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryLocal {
    /// Echoed in every result.
    pub query_id: String,
    /// What to query.
    pub query_type: QueryType,
    /// Query parameters.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub params: Value,
}

/// The queries a worker answers. Both `"ListTasks"` and `"list_tasks"` work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryType {
    /// Tasks, newest first; params `status`, `limit`.
    #[serde(alias = "list_tasks")]
    ListTasks,
    /// Counts by status.
    #[serde(alias = "get_task_stats")]
    GetTaskStats,
    /// Tasks whose command matches params `query`.
    #[serde(alias = "search_tasks")]
    SearchTasks,
    /// Knowledge-base files matching params `query`.
    #[serde(alias = "search_knowledgebase")]
    SearchKnowledgebase,
    /// An operator-configured handler.
    #[serde(alias = "custom")]
    Custom {
        /// The handler's name.
        query_name: String,
    },
}

/// What a worker sends back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The answer to `rtc_offer`.
    RtcAnswer {
        /// The answer's SDP.
        sdp: String,
    },
    /// One of the worker's ICE candidates.
    RtcCandidate(IceCandidate),
    /// The outcome of `execute`.
    ExecuteResult(ExecuteResult),
    /// Output of a streamed `execute`, before its result.
    ExecuteOutput(ExecuteOutput),
    /// A session was started.
    PtyCreated {
        /// The new session.
        session_id: SessionId,
        /// From the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// From the request: the stream of the terminal's bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<u32>,
    },
    /// Terminal output, in order.
    PtyOutput {
        /// The session.
        session_id: SessionId,
        /// The bytes, per `encoding`.
        data: String,
        /// How `data` holds the bytes.
        #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
        encoding: Encoding,
        /// Stream offset of the first byte of `data`. A jump past the end
        /// of the previous chunk means output was dropped in between.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// The client now receives the session's output.
    PtyResumed {
        /// The session.
        session_id: SessionId,
        /// Output continues from this offset.
        offset: u64,
        /// When the requested offset was no longer held: escape sequences
        /// that redraw the current screen. Reset the terminal, write them,
        /// then the output from `offset`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
        /// How many input bytes the terminal has taken so far, from every
        /// client: a client that typed before it lost its link resends its
        /// unacknowledged input from here on, so no keystroke is lost or
        /// doubled.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_offset: Option<u64>,
        /// From the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// From the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<u32>,
    },
    /// The session's program ended.
    PtyExited {
        /// The session.
        session_id: SessionId,
        /// Its exit code (128 + signal when killed by one).
        exit_code: i32,
    },
    /// The outcome of `proxy_http`.
    ProxyResult(ProxyResult),
    /// An answer to `query_local`.
    QueryResult {
        /// From the request.
        query_id: String,
        /// The answer.
        data: Value,
        /// Whether more results follow for this query.
        is_final: bool,
    },
    /// A request failed.
    Error {
        /// A stable, machine-readable code.
        code: ServiceErrorCode,
        /// What went wrong.
        message: String,
        /// The request it answers, when it had an id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// The session it concerns.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<SessionId>,
    },
}

/// The codes of a service [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceErrorCode {
    /// The payload is not a JSON object with a string `type`.
    InvalidJson,
    /// The `type` is not a request this worker knows.
    UnknownType,
    /// Fields are missing, mistyped or out of range.
    InvalidRequest,
    /// No session with that id.
    UnknownSession,
    /// Too many sessions or requests at once.
    Busy,
    /// The program could not be started.
    SpawnFailed,
    /// An environment variable the operator does not allow.
    EnvRefused,
    /// Input bytes could not be decoded (bad base64).
    InvalidEncoding,
    /// No query handler of that name is configured.
    UnknownQuery,
    /// A query handler failed.
    QueryFailed,
    /// The worker failed.
    Internal,
}

/// `execute_result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteResult {
    /// From the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Whether the command ran and exited with 0.
    pub success: bool,
    /// Output and status.
    pub data: ExecuteData,
    /// Files the command left in `$COCOON_OUTPUT_DIR`.
    #[serde(default)]
    pub files: Vec<OutputFile>,
}

/// The `data` of `execute_result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecuteData {
    /// Standard output (see `stdout_encoding`).
    pub stdout: String,
    /// Standard error (see `stderr_encoding`).
    pub stderr: String,
    /// The exit code; 128 + signal when killed by one; absent if it never ran.
    pub exit_code: Option<i32>,
    /// How `stdout` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub stdout_encoding: Encoding,
    /// How `stderr` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub stderr_encoding: Encoding,
    /// Output beyond the cap was dropped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Why the command failed to run or was stopped: `spawn_failed`,
    /// `timeout`, `limit_exceeded`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A file from the output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to the output directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// The content, per `encoding`.
    pub content: String,
    /// How `content` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub encoding: Encoding,
}

/// `proxy_result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyResult {
    /// From the request.
    pub request_id: String,
    /// The upstream's status, or 404/502/504 from the worker itself.
    pub status_code: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: Headers,
    /// Response body, per `body_encoding`.
    pub body: Option<String>,
    /// How `body` holds the bytes.
    #[serde(default, skip_serializing_if = "Encoding::is_utf8")]
    pub body_encoding: Encoding,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_types_take_both_spellings() {
        for (text, expected) in [
            (r#""ListTasks""#, QueryType::ListTasks),
            (r#""list_tasks""#, QueryType::ListTasks),
            (r#""get_task_stats""#, QueryType::GetTaskStats),
            (r#""SearchKnowledgebase""#, QueryType::SearchKnowledgebase),
            (
                r#"{"custom": {"query_name": "disk"}}"#,
                QueryType::Custom {
                    query_name: "disk".into(),
                },
            ),
            (
                r#"{"Custom": {"query_name": "disk"}}"#,
                QueryType::Custom {
                    query_name: "disk".into(),
                },
            ),
        ] {
            assert_eq!(
                serde_json::from_str::<QueryType>(text).unwrap(),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn bytes_round_trip() {
        for bytes in [&b"plain"[..], "é漢".as_bytes(), &[0xff, 0xfe, 0x00]] {
            let (text, encoding) = Encoding::encode(bytes);
            assert_eq!(encoding.decode(&text).unwrap(), bytes);
        }
        assert_eq!(Encoding::encode(&[0xff]).1, Encoding::Base64);
    }
}
