//! What a worker does for its clients. Requests arrive as `sync_data`
//! payloads ([`Request`]); replies and output go back, as [`Outgoing`]
//! messages, to the client they concern.
//!
//! Requests are served concurrently: `execute`, `proxy_http` and
//! `query_local` each run in their own task, and PTY traffic goes straight
//! to its session's queue, so a slow request never delays a keystroke.

pub mod exec;
pub mod process;
pub mod proxy;
pub mod pty;
pub mod query;
pub mod ring;
pub mod tasks;

use std::sync::Arc;

use bytes::Bytes;
use cocoon_signaling::protocol::ClientId;
use cocoon_signaling::protocol::service::{Request, Response, ServiceErrorCode, SessionId};
use serde_json::Value;
use tokio::sync::mpsc;

use exec::Executor;
use proxy::Proxy;
use pty::{Control, PtyManager};
use query::Queries;

/// Something on its way to a client: through the signaling connection
/// (JSON responses and relay frames) or through the client's session-layer
/// peer (responses for its control stream and terminal stream bytes).
#[derive(Debug)]
pub enum Outgoing {
    /// A response.
    Response {
        /// Who it is for.
        client: ClientId,
        /// What it is.
        response: Response,
    },
    /// Terminal bytes for a session-layer stream.
    Stream {
        /// Who it is for.
        client: ClientId,
        /// The stream.
        stream: u32,
        /// Offset of the first byte.
        offset: u64,
        /// The bytes.
        bytes: Bytes,
        /// Output before `offset` was dropped (the viewer fell behind).
        skip: bool,
    },
    /// A session-layer stream ends at `offset`.
    StreamEnd {
        /// Who it is for.
        client: ClientId,
        /// The stream.
        stream: u32,
        /// Its length.
        offset: u64,
    },
    /// An encoded session frame for the relay.
    Frame {
        /// Who it is for.
        client: ClientId,
        /// The frame.
        frame: Bytes,
    },
}

impl Outgoing {
    /// A response for a client.
    pub fn new(client: ClientId, response: Response) -> Self {
        Self::Response { client, response }
    }
}

/// Where replies to a request go: the client, and the queue that reaches it
/// (the signaling connection, or the client's session-layer peer).
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// The client.
    pub client: ClientId,
    /// The queue.
    pub out: mpsc::Sender<Outgoing>,
}

impl ReplyTo {
    /// Queues a small reply without waiting; a full queue drops it (the
    /// link is down or far behind, and the client will time out).
    pub fn try_send(&self, response: Response) {
        if self
            .out
            .try_send(Outgoing::new(self.client.clone(), response))
            .is_err()
        {
            tracing::warn!(client_id = %self.client, "reply dropped: the outbound queue is full");
        }
    }

    /// Sends a reply, waiting for room.
    pub async fn send(&self, response: Response) {
        let _ = self
            .out
            .send(Outgoing::new(self.client.clone(), response))
            .await;
    }
}

/// A request that failed, as the error reply to send.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceError {
    /// The stable code.
    pub code: ServiceErrorCode,
    /// What went wrong.
    pub message: String,
}

impl ServiceError {
    /// An error with a code and message.
    pub fn new(code: ServiceErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The `error` response, tagged with what it answers.
    pub fn into_response(
        self,
        request_id: Option<String>,
        session_id: Option<SessionId>,
    ) -> Response {
        Response::Error {
            code: self.code,
            message: self.message,
            request_id,
            session_id,
        }
    }
}

/// The worker's services, shared by the tasks that serve requests.
pub struct Services {
    exec: Arc<Executor>,
    ptys: PtyManager,
    proxy: Proxy,
    queries: Queries,
}

impl Services {
    /// Services that send their replies to `out`.
    pub fn new(exec: Arc<Executor>, ptys: PtyManager, proxy: Proxy, queries: Queries) -> Arc<Self> {
        Arc::new(Self {
            exec,
            ptys,
            proxy,
            queries,
        })
    }

    /// The PTY sessions.
    pub fn ptys(&self) -> &PtyManager {
        &self.ptys
    }

    /// Handles one payload without waiting for slow work; replies go to `reply`.
    pub fn handle(self: &Arc<Self>, reply: ReplyTo, payload: Value) {
        match Request::decode(payload) {
            Ok(request) => self.handle_request(reply, request),
            Err((code, message)) => {
                reply.try_send(ServiceError::new(code, message).into_response(None, None))
            }
        }
    }

    /// Handles one decoded request.
    pub fn handle_request(self: &Arc<Self>, reply: ReplyTo, request: Request) {
        match request {
            Request::RtcOffer { .. } | Request::RtcCandidate(_) => {
                let err = ServiceError::new(
                    ServiceErrorCode::InvalidRequest,
                    "WebRTC signaling travels on a session's control stream",
                );
                reply.try_send(err.into_response(None, None));
            }
            Request::Execute(request) => {
                let services = self.clone();
                tokio::spawn(async move {
                    reply
                        .send(services.exec.execute(request, &reply).await)
                        .await;
                });
            }
            Request::AttachPty(request) => {
                let services = self.clone();
                tokio::spawn(async move {
                    let request_id = request.request_id.clone();
                    let response = services
                        .ptys
                        .attach(reply.clone(), request)
                        .await
                        .unwrap_or_else(|err| err.into_response(request_id, None));
                    reply.send(response).await;
                });
            }
            Request::PtyInput {
                session_id,
                data,
                encoding,
            } => match encoding.decode(&data) {
                Ok(bytes) => self.pty_control(&reply, session_id, Control::Input(bytes)),
                Err(err) => {
                    let err = ServiceError::new(
                        ServiceErrorCode::InvalidEncoding,
                        format!("bad base64 input: {err}"),
                    );
                    reply.try_send(err.into_response(None, Some(session_id)));
                }
            },
            Request::PtyAck { session_id, offset } => self.pty_control(
                &reply,
                session_id,
                Control::Ack(reply.client.clone(), offset),
            ),
            Request::PtyResize {
                session_id,
                cols,
                rows,
            } => {
                if cols == 0
                    || rows == 0
                    || cols > pty::MAX_TERMINAL_SIDE
                    || rows > pty::MAX_TERMINAL_SIDE
                {
                    let err = ServiceError::new(
                        ServiceErrorCode::InvalidRequest,
                        format!(
                            "terminal size {cols}x{rows} is out of range 1..={}",
                            pty::MAX_TERMINAL_SIDE
                        ),
                    );
                    return reply.try_send(err.into_response(None, Some(session_id)));
                }
                self.pty_control(&reply, session_id, Control::Resize(cols, rows))
            }
            Request::PtyResume {
                session_id,
                offset,
                request_id,
                stream,
            } => {
                let control = Control::Attach {
                    to: reply.clone(),
                    stream,
                    offset,
                    request_id: request_id.clone(),
                };
                if let Err(err) = self.ptys.control(&session_id, control) {
                    reply.try_send(err.into_response(request_id, Some(session_id)));
                }
            }
            Request::PtyClose { session_id } => {
                self.pty_control(&reply, session_id, Control::Close)
            }
            Request::ProxyHttp(request) => {
                let services = self.clone();
                tokio::spawn(async move {
                    reply
                        .send(Response::ProxyResult(services.proxy.handle(request).await))
                        .await;
                });
            }
            Request::QueryLocal(request) => {
                let services = self.clone();
                tokio::spawn(async move {
                    reply.send(services.queries.handle(request).await).await;
                });
            }
        }
    }

    /// A client disconnected: its sessions are detached.
    pub fn client_left(&self, client: &ClientId) {
        self.ptys.client_left(client);
    }

    fn pty_control(&self, reply: &ReplyTo, session_id: SessionId, control: Control) {
        if let Err(err) = self.ptys.control(&session_id, control) {
            reply.try_send(err.into_response(None, Some(session_id)));
        }
    }
}
