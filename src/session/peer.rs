//! The worker's side of one client's session: a task that turns session
//! frames into service requests and terminal input, and service replies and
//! terminal output into frames, on whichever link is live.
//!
//! Reliability: the control stream keeps what it sent until acknowledged;
//! terminal output is kept by its PTY session's ring, so the peer asks the
//! session to resend ([`Control::Rewind`]) when acknowledgements stall.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cocoon_signaling::protocol::ClientId;
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame};
use cocoon_signaling::protocol::service::{Request, Response, ServiceErrorCode, SessionId};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, interval};

use super::stream::{ControlStream, InStream};
use crate::link::rtc::{RtcConfig, RtcEvent, RtcSide};
use crate::services::pty::Control;
use crate::services::{Outgoing, ReplyTo, ServiceError, Services};

/// Frames queued from the links to one peer; beyond this they are dropped
/// (and resent by the client).
const FRAME_QUEUE: usize = 256;
/// Replies and terminal output queued for one peer.
const OUT_QUEUE: usize = 64;
/// Unacknowledged control-stream bytes kept for resending.
const CONTROL_BUFFER: usize = 8 * 1024 * 1024;
/// Requests held at most in strict mode.
const MAX_HELD: usize = 64;
/// An offer that comes as the worker registers waits this long at most for
/// the signaling server's ICE servers.
const ISSUED_WITHIN: Duration = Duration::from_secs(2);
/// Resend what is unacknowledged after this long without progress.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(1000);

/// The frames of one client, on their way to its peer task.
#[derive(Clone)]
pub struct PeerHandle {
    frames: mpsc::Sender<Bytes>,
}

impl PeerHandle {
    /// Starts the peer of `client`; its frames go out through `relay`, or a
    /// data channel once the client has negotiated one (with `rtc`).
    pub fn spawn(
        client: ClientId,
        services: Arc<Services>,
        relay: mpsc::Sender<Outgoing>,
        rtc: Option<Arc<RtcConfig>>,
    ) -> Self {
        let (frames, inbox) = mpsc::channel(FRAME_QUEUE);
        let (out, replies) = mpsc::channel(OUT_QUEUE);
        let peer = Peer {
            reply_to: ReplyTo {
                client: client.clone(),
                out,
            },
            client,
            services,
            relay,
            control: ControlStream::new(CONTROL_BUFFER),
            terminals: HashMap::new(),
            strict_until: rtc
                .as_ref()
                .filter(|config| config.strict)
                .map(|config| Instant::now() + config.ice_timeout),
            held: Vec::new(),
            rtc_config: rtc,
            rtc: RtcSide::default(),
        };
        tokio::spawn(peer.run(inbox, replies));
        Self { frames }
    }

    /// Hands a frame to the peer without waiting; a full queue drops it
    /// (the client resends).
    pub fn deliver(&self, frame: Bytes) {
        if self.frames.try_send(frame).is_err() {
            tracing::debug!("peer busy; frame dropped");
        }
    }
}

/// A terminal bound to a stream of this peer.
struct Terminal {
    session_id: SessionId,
    input: InStream,
    /// Output offsets: sent through us, and acknowledged by the client.
    sent: u64,
    acked: u64,
    last_progress: Instant,
}

struct Peer {
    client: ClientId,
    services: Arc<Services>,
    relay: mpsc::Sender<Outgoing>,
    reply_to: ReplyTo,
    control: ControlStream,
    terminals: HashMap<u32, Terminal>,
    rtc_config: Option<Arc<RtcConfig>>,
    rtc: RtcSide,
    /// Strict mode: until when requests wait for the data channel.
    strict_until: Option<Instant>,
    /// Requests waiting for the data channel.
    held: Vec<Request>,
}

impl Peer {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Bytes>,
        mut replies: mpsc::Receiver<Outgoing>,
    ) {
        let mut tick = interval(RETRANSMIT_AFTER / 4);
        loop {
            let sent = tokio::select! {
                frame = inbox.recv() => match frame {
                    Some(frame) => self.on_frame(frame).await,
                    None => break,
                },
                Some(outgoing) = replies.recv() => self.on_outgoing(outgoing).await,
                event = self.rtc.next_event() => self.on_rtc(event).await,
                _ = tick.tick() => self.on_tick().await,
            };
            if sent.is_err() {
                break;
            }
        }
        self.rtc.close().await;
        tracing::debug!(client_id = %self.client, "peer ended");
    }

    /// Sends a frame on the data channel when one is open, else the relay.
    async fn send(&mut self, frame: Frame) -> Result<(), ()> {
        let encoded = frame.encode();
        if let Some(channel) = self.rtc.channel() {
            match channel.send(&encoded).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::info!(client_id = %self.client, %err, "data channel failed; back to the relay");
                    self.switch_link(false);
                }
            }
        }
        let outgoing = Outgoing::Frame {
            client: self.client.clone(),
            frame: encoded,
        };
        self.relay.send(outgoing).await.map_err(|_| ())
    }

    /// Moves to the data channel (`up`) or back to the relay: everything
    /// unacknowledged is sent again on the new link; the receiver drops
    /// what it already has.
    fn switch_link(&mut self, up: bool) {
        if !up {
            self.rtc.fall_back();
        }
        self.control.rewind();
        for terminal in self.terminals.values_mut() {
            terminal.sent = terminal.acked;
            terminal.last_progress = Instant::now();
            let _ = self
                .services
                .ptys()
                .control(&terminal.session_id, Control::Rewind(self.client.clone()));
        }
    }

    async fn on_rtc(&mut self, event: Option<RtcEvent>) -> Result<(), ()> {
        match event {
            Some(RtcEvent::Candidate(candidate)) => {
                self.reply(Response::RtcCandidate(candidate)).await
            }
            Some(RtcEvent::Open(channel)) => {
                tracing::info!(client_id = %self.client, "data channel open; traffic moves to it");
                self.rtc.opened(channel).await;
                self.switch_link(true);
                self.release_held();
                self.flush_control().await
            }
            Some(RtcEvent::Message(frame)) => self.on_frame(frame).await,
            Some(RtcEvent::State(state)) => {
                use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState as S;
                if matches!(state, S::Failed | S::Closed | S::Disconnected) && self.rtc.active() {
                    tracing::info!(client_id = %self.client, ?state, "peer connection lost; back to the relay");
                    self.switch_link(false);
                    self.flush_control().await?;
                }
                Ok(())
            }
            Some(RtcEvent::Closed) => {
                if self.rtc.channel().is_some() {
                    self.switch_link(false);
                    self.flush_control().await?;
                }
                Ok(())
            }
            None => {
                self.rtc.fall_back();
                self.switch_link(false);
                self.flush_control().await
            }
        }
    }

    /// Queues a response on the control stream and sends it.
    async fn reply(&mut self, response: Response) -> Result<(), ()> {
        let message = serde_json::to_vec(&response).expect("responses serialize");
        if !self.control.queue(&message) {
            tracing::warn!(client_id = %self.client, "control stream backlog full; response dropped");
            return Ok(());
        }
        self.flush_control().await
    }

    async fn flush_control(&mut self) -> Result<(), ()> {
        // Frames are taken one by one: `send` may switch links midway.
        while let Some(frame) = self.control.next_frame() {
            self.send(frame).await?;
        }
        Ok(())
    }

    async fn on_frame(&mut self, bytes: Bytes) -> Result<(), ()> {
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!(client_id = %self.client, %err, "dropping a malformed frame");
                return Ok(());
            }
        };
        match frame {
            Frame::Data {
                stream: CONTROL_STREAM,
                offset,
                bytes,
            } => {
                let (ack, messages) = self.control.receive(offset, bytes);
                for message in messages {
                    if let Some(request) = self.decode_request(&message) {
                        self.on_request(request).await?;
                    }
                }
                self.send(ack).await?;
            }
            Frame::Data {
                stream,
                offset,
                bytes,
            } => {
                let Some(terminal) = self.terminals.get_mut(&stream) else {
                    return Ok(());
                };
                if let Some(fresh) = terminal.input.accept(offset, bytes) {
                    let start = terminal.input.position() - fresh.len() as u64;
                    let control = Control::Input(fresh.to_vec());
                    match self.services.ptys().control(&terminal.session_id, control) {
                        Ok(()) => {}
                        // The session's queue is full: the client resends.
                        Err(err) if err.code == ServiceErrorCode::Busy => {
                            terminal.input.unaccept(start)
                        }
                        Err(err) => self
                            .reply_to
                            .try_send(err.into_response(None, Some(terminal.session_id.clone()))),
                    }
                }
                let ack = terminal.input.ack(stream);
                self.send(ack).await?;
            }
            Frame::Ack {
                stream: CONTROL_STREAM,
                offset,
            } => {
                self.control.acked(offset);
            }
            Frame::Ack { stream, offset } => {
                if let Some(terminal) = self.terminals.get_mut(&stream)
                    && offset > terminal.acked
                {
                    terminal.acked = offset;
                    terminal.last_progress = Instant::now();
                    let _ = self.services.ptys().control(
                        &terminal.session_id,
                        Control::Ack(self.client.clone(), offset),
                    );
                }
            }
            Frame::Fin { .. } | Frame::Pong(_) | Frame::Skip { .. } => {}
            Frame::Ping(nonce) => self.send(Frame::Pong(nonce)).await?,
        }
        Ok(())
    }

    /// Decodes a control message; an undecodable one is answered with an
    /// error here.
    fn decode_request(&self, message: &[u8]) -> Option<Request> {
        let decoded = serde_json::from_slice::<Value>(message)
            .map_err(|err| {
                (
                    ServiceErrorCode::InvalidJson,
                    format!("control message is not JSON: {err}"),
                )
            })
            .and_then(Request::decode);
        match decoded {
            Ok(request) => Some(request),
            Err((code, message)) => {
                self.reply_to
                    .try_send(ServiceError::new(code, message).into_response(None, None));
                None
            }
        }
    }

    /// WebRTC signaling is the peer's own business; the rest goes to the
    /// services.
    async fn on_request(&mut self, request: Request) -> Result<(), ()> {
        match request {
            Request::RtcOffer { sdp } => {
                let Some(config) = self.rtc_config.clone() else {
                    let err = ServiceError::new(
                        ServiceErrorCode::InvalidRequest,
                        "WebRTC is disabled on this worker",
                    );
                    return self.reply(err.into_response(None, None)).await;
                };
                config.issued.first(ISSUED_WITHIN).await;
                match self.rtc.answer(&config, sdp).await {
                    Ok(sdp) => self.reply(Response::RtcAnswer { sdp }).await,
                    Err(err) => {
                        let err = ServiceError::new(
                            ServiceErrorCode::InvalidRequest,
                            format!("cannot answer the offer: {err:#}"),
                        );
                        self.reply(err.into_response(None, None)).await
                    }
                }
            }
            Request::RtcCandidate(candidate) => {
                self.rtc.add_candidate(candidate).await;
                Ok(())
            }
            other if self.holding() => {
                // Strict mode: service traffic waits for the data channel.
                if self.held.len() < MAX_HELD {
                    self.held.push(other);
                } else {
                    let err = ServiceError::new(
                        ServiceErrorCode::Busy,
                        "too many requests waiting for the data channel",
                    );
                    self.reply_to.try_send(err.into_response(None, None));
                }
                Ok(())
            }
            other => {
                self.services.handle_request(self.reply_to.clone(), other);
                Ok(())
            }
        }
    }

    /// Strict mode holds requests until the data channel opens or the ICE
    /// timeout passes.
    fn holding(&self) -> bool {
        self.strict_until
            .is_some_and(|until| Instant::now() < until)
            && self.rtc.channel().is_none()
    }

    fn release_held(&mut self) {
        for request in std::mem::take(&mut self.held) {
            self.services.handle_request(self.reply_to.clone(), request);
        }
    }

    async fn on_outgoing(&mut self, outgoing: Outgoing) -> Result<(), ()> {
        match outgoing {
            Outgoing::Response { response, .. } => {
                self.track(&response);
                self.reply(response).await
            }
            Outgoing::Stream {
                stream,
                offset,
                bytes,
                skip,
                ..
            } => {
                if skip {
                    self.send(Frame::Skip { stream, offset }).await?;
                }
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    if terminal.sent <= terminal.acked {
                        terminal.last_progress = Instant::now();
                    }
                    terminal.sent = terminal.sent.max(offset + bytes.len() as u64);
                }
                self.send(Frame::Data {
                    stream,
                    offset,
                    bytes,
                })
                .await
            }
            Outgoing::StreamEnd { stream, offset, .. } => {
                self.send(Frame::Fin { stream, offset }).await
            }
            Outgoing::Frame { frame, .. } => {
                let outgoing = Outgoing::Frame {
                    client: self.client.clone(),
                    frame,
                };
                self.relay.send(outgoing).await.map_err(|_| ())
            }
        }
    }

    /// Learns which stream carries which terminal from the replies.
    fn track(&mut self, response: &Response) {
        match response {
            Response::PtyCreated {
                session_id,
                stream: Some(stream),
                ..
            } => {
                self.terminals.insert(
                    *stream,
                    Terminal {
                        session_id: session_id.clone(),
                        input: InStream::default(),
                        sent: 0,
                        acked: 0,
                        last_progress: Instant::now(),
                    },
                );
            }
            Response::PtyResumed {
                session_id,
                offset,
                stream: Some(stream),
                ..
            } => {
                self.terminals.retain(|_, t| &t.session_id != session_id);
                self.terminals.insert(
                    *stream,
                    Terminal {
                        session_id: session_id.clone(),
                        input: InStream::default(),
                        sent: *offset,
                        acked: *offset,
                        last_progress: Instant::now(),
                    },
                );
            }
            Response::PtyExited { session_id, .. } => {
                self.terminals.retain(|_, t| &t.session_id != session_id);
            }
            _ => {}
        }
    }

    /// Resends what stalled: control bytes from here, terminal bytes from
    /// their session's ring.
    async fn on_tick(&mut self) -> Result<(), ()> {
        let now = Instant::now();
        if !self.held.is_empty() && !self.holding() {
            self.release_held();
        }
        if self.control.resend_if_stalled(RETRANSMIT_AFTER) {
            self.flush_control().await?;
        }
        for terminal in self.terminals.values_mut() {
            if terminal.sent > terminal.acked && now - terminal.last_progress >= RETRANSMIT_AFTER {
                terminal.last_progress = now;
                terminal.sent = terminal.acked;
                let _ = self
                    .services
                    .ptys()
                    .control(&terminal.session_id, Control::Rewind(self.client.clone()));
            }
        }
        Ok(())
    }
}
