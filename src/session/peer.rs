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
use cocoon_signaling::protocol::service::{Response, ServiceErrorCode, SessionId};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::{Instant, interval};

use super::stream::{InStream, MessageReader, OutStream, frame_message};
use crate::services::pty::Control;
use crate::services::{Outgoing, ReplyTo, ServiceError, Services};

/// Frames queued from the links to one peer; beyond this they are dropped
/// (and resent by the client).
const FRAME_QUEUE: usize = 256;
/// Replies and terminal output queued for one peer.
const OUT_QUEUE: usize = 64;
/// Unacknowledged control-stream bytes kept for resending.
const CONTROL_BUFFER: usize = 8 * 1024 * 1024;
/// Resend what is unacknowledged after this long without progress.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(1000);

/// The frames of one client, on their way to its peer task.
#[derive(Clone)]
pub struct PeerHandle {
    frames: mpsc::Sender<Bytes>,
}

impl PeerHandle {
    /// Starts the peer of `client`; its frames go out through `relay`.
    pub fn spawn(client: ClientId, services: Arc<Services>, relay: mpsc::Sender<Outgoing>) -> Self {
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
            control_out: OutStream::new(CONTROL_STREAM, CONTROL_BUFFER),
            control_in: InStream::default(),
            reader: MessageReader::default(),
            terminals: HashMap::new(),
            last_progress: Instant::now(),
        };
        tokio::spawn(peer.run(inbox, replies));
        Self { frames }
    }

    /// Hands a frame to the peer without waiting; a full queue drops it.
    pub fn deliver(&self, frame: Bytes) -> bool {
        self.frames.try_send(frame).is_ok()
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
    control_out: OutStream,
    control_in: InStream,
    reader: MessageReader,
    terminals: HashMap<u32, Terminal>,
    last_progress: Instant,
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
                _ = tick.tick() => self.on_tick().await,
            };
            if sent.is_err() {
                break;
            }
        }
        tracing::debug!(client_id = %self.client, "peer ended");
    }

    async fn send(&self, frame: Frame) -> Result<(), ()> {
        let outgoing = Outgoing::Frame {
            client: self.client.clone(),
            frame: frame.encode(),
        };
        self.relay.send(outgoing).await.map_err(|_| ())
    }

    async fn flush_control(&mut self) -> Result<(), ()> {
        while let Some(frame) = self.control_out.next_frame() {
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
                if let Some(fresh) = self.control_in.accept(offset, bytes) {
                    self.reader.push(&fresh);
                    self.read_requests();
                }
                if let Some(ack) = self.control_in.take_ack(CONTROL_STREAM, true) {
                    self.send(ack).await?;
                }
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
                    let control = Control::Input(fresh.to_vec());
                    if let Err(err) = self.services.ptys().control(&terminal.session_id, control) {
                        self.reply_to
                            .try_send(err.into_response(None, Some(terminal.session_id.clone())));
                    }
                }
                if let Some(ack) = terminal.input.take_ack(stream, true) {
                    self.send(ack).await?;
                }
            }
            Frame::Ack {
                stream: CONTROL_STREAM,
                offset,
            } => {
                if self.control_out.ack(offset) {
                    self.last_progress = Instant::now();
                }
            }
            Frame::Ack { stream, offset } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    if offset > terminal.acked {
                        terminal.acked = offset;
                        terminal.last_progress = Instant::now();
                        let _ = self
                            .services
                            .ptys()
                            .control(&terminal.session_id, Control::Ack(offset));
                    }
                }
            }
            Frame::Fin { .. } | Frame::Pong(_) => {}
            Frame::Ping(nonce) => self.send(Frame::Pong(nonce)).await?,
        }
        Ok(())
    }

    /// Hands every complete control message to the services.
    fn read_requests(&mut self) {
        loop {
            match self.reader.next_message() {
                Ok(Some(message)) => match serde_json::from_slice::<Value>(&message) {
                    Ok(payload) => self.services.handle(self.reply_to.clone(), payload),
                    Err(err) => self.reply_to.try_send(
                        ServiceError::new(
                            ServiceErrorCode::InvalidJson,
                            format!("control message is not JSON: {err}"),
                        )
                        .into_response(None, None),
                    ),
                },
                Ok(None) => return,
                Err(len) => {
                    tracing::warn!(client_id = %self.client, len, "control message too large; resetting the stream");
                    self.reader = MessageReader::default();
                    return;
                }
            }
        }
    }

    async fn on_outgoing(&mut self, outgoing: Outgoing) -> Result<(), ()> {
        match outgoing {
            Outgoing::Response { response, .. } => {
                self.track(&response);
                let message =
                    frame_message(&serde_json::to_vec(&response).expect("responses serialize"));
                if message.len() > self.control_out.room() {
                    tracing::warn!(client_id = %self.client, "control stream backlog full; response dropped");
                    return Ok(());
                }
                if !self.control_out.in_flight() {
                    self.last_progress = Instant::now();
                }
                self.control_out.push(&message);
                self.flush_control().await
            }
            Outgoing::Stream {
                stream,
                offset,
                bytes,
                ..
            } => {
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
        if self.control_out.in_flight() && now - self.last_progress >= RETRANSMIT_AFTER {
            self.control_out.rewind();
            self.last_progress = now;
            self.flush_control().await?;
        }
        for terminal in self.terminals.values_mut() {
            if terminal.sent > terminal.acked && now - terminal.last_progress >= RETRANSMIT_AFTER {
                terminal.last_progress = now;
                terminal.sent = terminal.acked;
                let _ = self
                    .services
                    .ptys()
                    .control(&terminal.session_id, Control::Rewind);
            }
        }
        Ok(())
    }
}
