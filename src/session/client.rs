//! The client's side of a session with one device: requests and replies on
//! the control stream, terminals on streams of their own, every byte
//! acknowledged and resent when it stalls.
//!
//! [`Session`] is a handle; a driver task owns the link and the streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame};
use cocoon_signaling::protocol::service::{AttachPty, Request, Response, SessionId};
use cocoon_signaling::protocol::{DeviceId, Secret};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, interval};

use super::stream::{InStream, MessageReader, OutStream, frame_message};
use crate::client::Client;
use crate::link::ws::{Incoming, WsLink};

/// Resend what is unacknowledged after this long without progress.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(1000);
/// Unacknowledged bytes kept per outgoing stream.
const STREAM_BUFFER: usize = 4 * 1024 * 1024;
/// Output chunks queued for a terminal's reader.
const EVENT_QUEUE: usize = 256;
/// How long a request may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a terminal produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Output bytes, in order, each exactly once.
    Output(Bytes),
    /// The program ended with this code; no output follows.
    Exited(i32),
}

enum Command {
    Request {
        request: Request,
        id: String,
        reply: oneshot::Sender<Response>,
    },
    Attach {
        request: AttachPty,
        id: String,
        reply: oneshot::Sender<Response>,
        events: mpsc::Sender<PtyEvent>,
    },
    Input {
        stream: u32,
        bytes: Vec<u8>,
    },
    Send(Request),
    Ping(oneshot::Sender<Duration>),
}

/// A session with one device.
pub struct Session {
    commands: mpsc::Sender<Command>,
    next_id: AtomicU64,
    next_stream: AtomicU32,
}

impl Session {
    /// Authenticates with `token` and opens a session with `device`.
    pub async fn connect(
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
        device: &DeviceId,
    ) -> anyhow::Result<Self> {
        let client = Client::connect(url, token, tls).await?;
        let (commands, queue) = mpsc::channel(256);
        let driver = Driver {
            link: client.into_link(),
            device: device.to_string(),
            control_out: OutStream::new(CONTROL_STREAM, STREAM_BUFFER),
            control_in: InStream::default(),
            reader: MessageReader::default(),
            pending: HashMap::new(),
            terminals: HashMap::new(),
            pings: HashMap::new(),
            last_progress: Instant::now(),
        };
        tokio::spawn(driver.run(queue));
        Ok(Self {
            commands,
            next_id: AtomicU64::new(1),
            next_stream: AtomicU32::new(1),
        })
    }

    fn next_id(&self) -> String {
        format!("s{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends a request that has one reply (execute, proxy, query) and waits
    /// for it. Ids are filled in when missing.
    pub async fn request(&self, mut request: Request) -> anyhow::Result<Response> {
        let id = match &mut request {
            Request::Execute(execute) => execute
                .request_id
                .get_or_insert_with(|| self.next_id())
                .clone(),
            Request::ProxyHttp(proxy) => proxy.request_id.clone(),
            Request::QueryLocal(query) => query.query_id.clone(),
            _ => bail!("this request has no reply; use the terminal's methods"),
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Request { request, id, reply })
            .await
            .context("the session has ended")?;
        wait(answer).await
    }

    /// Starts a terminal whose bytes travel on a stream of their own.
    pub async fn attach_pty(&self, mut request: AttachPty) -> anyhow::Result<Pty> {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let id = request
            .request_id
            .get_or_insert_with(|| self.next_id())
            .clone();
        request.stream = Some(stream);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Attach {
                request,
                id,
                reply,
                events: events_tx,
            })
            .await
            .context("the session has ended")?;
        match wait(answer).await? {
            Response::PtyCreated { session_id, .. } => Ok(Pty {
                session_id,
                stream,
                commands: self.commands.clone(),
                events,
            }),
            Response::Error { code, message, .. } => {
                bail!("attach_pty failed ({code:?}): {message}")
            }
            other => bail!("unexpected reply to attach_pty: {other:?}"),
        }
    }

    /// Round-trip time of a PING through the current link.
    pub async fn ping(&self) -> anyhow::Result<Duration> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Ping(reply))
            .await
            .context("the session has ended")?;
        wait(answer).await
    }
}

async fn wait<T>(answer: oneshot::Receiver<T>) -> anyhow::Result<T> {
    tokio::time::timeout(REPLY_TIMEOUT, answer)
        .await
        .context("no reply in time")?
        .context("the session has ended")
}

/// A terminal on the device.
pub struct Pty {
    /// The worker's id for it.
    pub session_id: SessionId,
    stream: u32,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<PtyEvent>,
}

impl Pty {
    /// Types bytes.
    pub async fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.command(Command::Input {
            stream: self.stream,
            bytes: bytes.to_vec(),
        })
        .await
    }

    /// Changes the terminal size.
    pub async fn resize(&self, cols: u16, rows: u16) -> anyhow::Result<()> {
        self.command(Command::Send(Request::PtyResize {
            session_id: self.session_id.clone(),
            cols,
            rows,
        }))
        .await
    }

    /// Ends the program; [`PtyEvent::Exited`] follows.
    pub async fn close(&self) -> anyhow::Result<()> {
        self.command(Command::Send(Request::PtyClose {
            session_id: self.session_id.clone(),
        }))
        .await
    }

    /// The next output or the exit; `None` once the session is gone.
    pub async fn next(&mut self) -> Option<PtyEvent> {
        self.events.recv().await
    }

    async fn command(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .await
            .context("the session has ended")
    }
}

struct Terminal {
    session_id: Option<SessionId>,
    output: InStream,
    input: OutStream,
    events: mpsc::Sender<PtyEvent>,
    fin: Option<u64>,
    exit: Option<i32>,
    last_progress: Instant,
}

struct Driver {
    link: WsLink,
    device: String,
    control_out: OutStream,
    control_in: InStream,
    reader: MessageReader,
    pending: HashMap<String, oneshot::Sender<Response>>,
    terminals: HashMap<u32, Terminal>,
    pings: HashMap<u64, (Instant, oneshot::Sender<Duration>)>,
    last_progress: Instant,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = interval(RETRANSMIT_AFTER / 4);
        loop {
            let result = tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => break,
                },
                incoming = self.link.recv_any() => match incoming {
                    Ok(Some(Incoming::Relay { from, frame })) if from == self.device => self.on_frame(frame).await,
                    Ok(Some(Incoming::Relay { .. })) => Ok(()),
                    Ok(Some(Incoming::Message(message))) => {
                        tracing::debug!(?message, "message from the signaling server");
                        Ok(())
                    }
                    Ok(None) => break,
                    Err(err) => Err(err),
                },
                _ = tick.tick() => self.on_tick().await,
            };
            if let Err(err) = result {
                tracing::warn!(err = format!("{err:#}"), "session link failed");
                break;
            }
        }
    }

    async fn send(&mut self, frame: Frame) -> anyhow::Result<()> {
        self.link.send_relay(&self.device, &frame.encode()).await
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(frame) = self.control_out.next_frame() {
            self.send(frame).await?;
        }
        let mut frames = Vec::new();
        for terminal in self.terminals.values_mut() {
            while let Some(frame) = terminal.input.next_frame() {
                frames.push(frame);
            }
        }
        for frame in frames {
            self.send(frame).await?;
        }
        Ok(())
    }

    fn queue_request(&mut self, request: &Request) -> anyhow::Result<()> {
        let message = frame_message(&serde_json::to_vec(request).expect("requests serialize"));
        anyhow::ensure!(
            message.len() <= self.control_out.room(),
            "the control stream is backed up"
        );
        if !self.control_out.in_flight() {
            self.last_progress = Instant::now();
        }
        self.control_out.push(&message);
        Ok(())
    }

    async fn on_command(&mut self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::Request { request, id, reply } => {
                self.queue_request(&request)?;
                self.pending.insert(id, reply);
            }
            Command::Attach {
                request,
                id,
                reply,
                events,
            } => {
                let stream = request.stream.expect("set by attach_pty");
                self.queue_request(&Request::AttachPty(request))?;
                self.pending.insert(id, reply);
                self.terminals.insert(
                    stream,
                    Terminal {
                        session_id: None,
                        output: InStream::default(),
                        input: OutStream::new(stream, STREAM_BUFFER),
                        events,
                        fin: None,
                        exit: None,
                        last_progress: Instant::now(),
                    },
                );
            }
            Command::Input { stream, bytes } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    anyhow::ensure!(
                        bytes.len() <= terminal.input.room(),
                        "terminal input is backed up"
                    );
                    if !terminal.input.in_flight() {
                        terminal.last_progress = Instant::now();
                    }
                    terminal.input.push(&bytes);
                }
            }
            Command::Send(request) => self.queue_request(&request)?,
            Command::Ping(reply) => {
                let nonce = rand::random();
                self.pings.insert(nonce, (Instant::now(), reply));
                self.send(Frame::Ping(nonce)).await?;
            }
        }
        self.flush().await
    }

    async fn on_frame(&mut self, bytes: Bytes) -> anyhow::Result<()> {
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(err) => {
                tracing::debug!(%err, "dropping a malformed frame");
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
                    self.read_responses()?;
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
                // Take the bytes only if the reader has room; otherwise they
                // are resent later.
                if terminal.events.capacity() > 0 {
                    if let Some(fresh) = terminal.output.accept(offset, bytes) {
                        let _ = terminal.events.try_send(PtyEvent::Output(fresh));
                    }
                }
                let ack = terminal.output.take_ack(stream, true);
                self.finish_if_done(stream);
                if let Some(ack) = ack {
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
                    if terminal.input.ack(offset) {
                        terminal.last_progress = Instant::now();
                    }
                }
            }
            Frame::Fin { stream, offset } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    terminal.fin = Some(offset);
                }
                self.finish_if_done(stream);
            }
            Frame::Ping(nonce) => self.send(Frame::Pong(nonce)).await?,
            Frame::Pong(nonce) => {
                if let Some((sent, reply)) = self.pings.remove(&nonce) {
                    let _ = reply.send(sent.elapsed());
                }
            }
        }
        Ok(())
    }

    fn read_responses(&mut self) -> anyhow::Result<()> {
        while let Some(message) = self
            .reader
            .next_message()
            .map_err(|len| anyhow::anyhow!("control message of {len} bytes is too large"))?
        {
            let response: Response = match serde_json::from_slice(&message) {
                Ok(response) => response,
                Err(err) => {
                    tracing::warn!(%err, "undecodable response");
                    continue;
                }
            };
            self.on_response(response);
        }
        Ok(())
    }

    fn on_response(&mut self, response: Response) {
        let id = match &response {
            Response::ExecuteResult(result) => result.request_id.clone(),
            Response::ProxyResult(result) => Some(result.request_id.clone()),
            Response::QueryResult { query_id, .. } => Some(query_id.clone()),
            Response::PtyCreated {
                request_id,
                session_id,
                stream,
            } => {
                if let Some(terminal) = stream.and_then(|s| self.terminals.get_mut(&s)) {
                    terminal.session_id = Some(session_id.clone());
                }
                request_id.clone()
            }
            Response::Error { request_id, .. } => request_id.clone(),
            Response::PtyExited {
                session_id,
                exit_code,
            } => {
                let stream = self
                    .terminals
                    .iter()
                    .find(|(_, t)| t.session_id.as_ref() == Some(session_id))
                    .map(|(stream, _)| *stream);
                if let Some(stream) = stream {
                    self.terminals.get_mut(&stream).expect("found").exit = Some(*exit_code);
                    self.finish_if_done(stream);
                }
                None
            }
            Response::PtyOutput { .. } => None,
        };
        match id.and_then(|id| self.pending.remove(&id)) {
            Some(reply) => {
                let _ = reply.send(response);
            }
            None => tracing::debug!(?response, "unsolicited response"),
        }
    }

    /// Reports the exit once every byte up to the stream's end arrived.
    fn finish_if_done(&mut self, stream: u32) {
        let Some(terminal) = self.terminals.get(&stream) else {
            return;
        };
        let complete = terminal
            .fin
            .is_some_and(|fin| terminal.output.position() >= fin);
        if let (Some(code), true) = (terminal.exit, complete) {
            if terminal.events.try_send(PtyEvent::Exited(code)).is_ok() {
                self.terminals.remove(&stream);
            }
        }
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.control_out.in_flight() && now - self.last_progress >= RETRANSMIT_AFTER {
            self.control_out.rewind();
            self.last_progress = now;
        }
        for terminal in self.terminals.values_mut() {
            if terminal.input.in_flight() && now - terminal.last_progress >= RETRANSMIT_AFTER {
                terminal.input.rewind();
                terminal.last_progress = now;
            }
        }
        let stalled: Vec<u32> = self
            .terminals
            .iter()
            .filter(|(_, t)| t.exit.is_some())
            .map(|(s, _)| *s)
            .collect();
        for stream in stalled {
            self.finish_if_done(stream);
        }
        self.flush().await
    }
}
