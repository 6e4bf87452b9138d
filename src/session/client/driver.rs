//! The driver task of a client session: owns the link and the streams,
//! and turns commands from [`Session`](super::Session) and [`Pty`](super::Pty)
//! handles into frames, and frames into events.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame};
use cocoon_signaling::protocol::service::{ExecuteOutput, Request, Response, SessionId};
use cocoon_signaling::protocol::{FromServer, IceServer, ToServer};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, interval};

use super::{Command, PathStatus, PtyEvent};
use crate::link::rtc::{Path, RtcConfig, RtcEvent, RtcSide};
use crate::link::ws::{Incoming, WsLink};
use crate::session::stream::{ControlStream, InStream, OutStream};

/// Resend what is unacknowledged after this long without progress.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(1000);
/// Unacknowledged bytes kept per outgoing stream.
pub(super) const STREAM_BUFFER: usize = 4 * 1024 * 1024;
/// Unanswered pings kept at most.
const MAX_PINGS: usize = 64;
/// After a working direct path fails, a new one is offered this much later.
const REOFFER_AFTER: Duration = Duration::from_secs(3);

struct Terminal {
    session_id: Option<SessionId>,
    output: InStream,
    /// Output received but not yet taken by the reader, with its offsets;
    /// at most the worker's window, since acknowledgements follow the reader.
    pending: VecDeque<(u64, Bytes)>,
    /// Offset up to which the reader has the output.
    delivered: u64,
    /// The last offset acknowledged.
    acked: u64,
    input: OutStream,
    events: mpsc::Sender<PtyEvent>,
    /// Waiting for `pty_resumed`: nothing is delivered yet.
    resuming: bool,
    /// A screen to deliver before any more output.
    snapshot: Option<Bytes>,
    fin: Option<u64>,
    exit: Option<i32>,
}

impl Terminal {
    fn new(stream: u32, offset: u64, events: mpsc::Sender<PtyEvent>, resuming: bool) -> Self {
        let mut output = InStream::default();
        output.skip_to(offset);
        Self {
            session_id: None,
            output,
            pending: VecDeque::new(),
            delivered: offset,
            acked: offset,
            input: OutStream::new(stream, STREAM_BUFFER),
            events,
            resuming,
            snapshot: None,
            fin: None,
            exit: None,
        }
    }
}

pub(super) struct Driver {
    link: WsLink,
    device: String,
    control: ControlStream,
    pending: HashMap<String, oneshot::Sender<Response>>,
    /// Streamed executes' output, by request id.
    outputs: HashMap<String, mpsc::Sender<ExecuteOutput>>,
    terminals: HashMap<u32, Terminal>,
    pings: HashMap<u64, (Instant, oneshot::Sender<Duration>)>,
    rtc_config: Option<RtcConfig>,
    rtc: RtcSide,
    rtc_deadline: Option<Instant>,
    settled_on_relay: bool,
    reoffer_at: Option<Instant>,
    /// Commands held in strict mode.
    held: Vec<Command>,
    /// When to ask the server for fresh ICE servers (TURN credentials).
    ask_ice_at: Option<Instant>,
}

impl Driver {
    pub(super) fn new(
        link: WsLink,
        device: String,
        rtc: Option<RtcConfig>,
        refresh_ice: Option<Duration>,
    ) -> Self {
        Self {
            link,
            device,
            control: ControlStream::new(STREAM_BUFFER),
            pending: HashMap::new(),
            outputs: HashMap::new(),
            terminals: HashMap::new(),
            pings: HashMap::new(),
            rtc_config: rtc,
            rtc: RtcSide::default(),
            rtc_deadline: None,
            settled_on_relay: false,
            reoffer_at: None,
            held: Vec::new(),
            ask_ice_at: refresh_ice.map(|after| Instant::now() + after),
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        if let Err(err) = self.start_rtc().await {
            tracing::warn!(
                err = format!("{err:#}"),
                "WebRTC unavailable; staying on the relay"
            );
        }
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
                    Ok(Some(Incoming::Message(FromServer::IceServers { ice_servers, ttl_secs }))) => {
                        self.on_ice_servers(ice_servers, ttl_secs).await
                    }
                    Ok(Some(Incoming::Message(message))) => {
                        tracing::debug!(?message, "message from the signaling server");
                        Ok(())
                    }
                    Ok(None) => break,
                    Err(err) => Err(err),
                },
                event = self.rtc.next_event() => self.on_rtc(event).await,
                _ = tick.tick() => self.on_tick().await,
            };
            if let Err(err) = result {
                tracing::warn!(err = format!("{err:#}"), "session link failed");
                break;
            }
        }
        self.rtc.close().await;
    }

    /// Offers a data channel; traffic stays on the relay meanwhile.
    async fn start_rtc(&mut self) -> anyhow::Result<()> {
        let Some(config) = self.rtc_config.clone() else {
            return Ok(());
        };
        let sdp = self.rtc.offer(&config).await?;
        self.rtc_deadline = Some(Instant::now() + config.ice_timeout);
        self.queue_request(&Request::RtcOffer { sdp })?;
        self.flush().await
    }

    async fn on_rtc(&mut self, event: Option<RtcEvent>) -> anyhow::Result<()> {
        match event {
            Some(RtcEvent::Candidate(candidate)) => {
                self.queue_request(&Request::RtcCandidate(candidate))?;
                self.flush().await
            }
            Some(RtcEvent::Open(channel)) => {
                tracing::info!("data channel open; traffic moves to it");
                self.rtc.opened(channel).await;
                self.rtc_deadline = None;
                self.switch_link(true);
                self.release_held().await?;
                self.flush().await
            }
            Some(RtcEvent::Message(frame)) => self.on_frame(frame).await,
            Some(RtcEvent::State(state)) => {
                use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState as S;
                if matches!(state, S::Failed | S::Closed | S::Disconnected)
                    && self.rtc.channel().is_some()
                {
                    tracing::info!(?state, "peer connection lost; back to the relay");
                    self.switch_link(false);
                    self.flush().await?;
                }
                Ok(())
            }
            Some(RtcEvent::Closed) | None => {
                if self.rtc.channel().is_some() {
                    self.switch_link(false);
                    self.flush().await?;
                }
                Ok(())
            }
        }
    }

    /// Fresh ICE servers: new connections use them; a connection relayed by
    /// TURN is replaced at once (an ICE restart with the new credentials)
    /// rather than left to die when its allocation can no longer be refreshed.
    async fn on_ice_servers(
        &mut self,
        servers: Vec<IceServer>,
        ttl_secs: u64,
    ) -> anyhow::Result<()> {
        let Some(config) = &self.rtc_config else {
            return Ok(());
        };
        config
            .issued
            .set(servers.into_iter().map(Into::into).collect());
        self.ask_ice_at = Some(Instant::now() + Duration::from_secs(ttl_secs.max(10) / 2));
        if self.rtc.path().await == Path::Turn {
            tracing::info!("TURN credentials refreshed; moving to a fresh connection");
            self.switch_link(false);
            self.reoffer_at = Some(Instant::now());
            self.flush().await?;
        }
        Ok(())
    }

    /// Moves to the data channel (`up`) or back to the relay, resending
    /// everything unacknowledged on the new link.
    fn switch_link(&mut self, up: bool) {
        if !up {
            self.rtc.fall_back();
            // A path that worked and died: offer a fresh one soon.
            self.reoffer_at = Some(Instant::now() + REOFFER_AFTER);
        }
        self.control.rewind();
        for terminal in self.terminals.values_mut() {
            terminal.input.rewind();
            // Acks sent on the old link may be lost: send them again.
            terminal.acked = 0;
        }
    }

    /// Sends a frame on the data channel when one is open, else the relay.
    async fn send(&mut self, frame: Frame) -> anyhow::Result<()> {
        let encoded = frame.encode();
        if let Some(channel) = self.rtc.channel() {
            match channel.send(&encoded).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::info!(%err, "data channel failed; back to the relay");
                    self.switch_link(false);
                }
            }
        }
        self.link.send_relay(&self.device, &encoded).await
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        while let Some(frame) = self.control.next_frame() {
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
        let message = serde_json::to_vec(request).expect("requests serialize");
        anyhow::ensure!(
            self.control.queue(&message),
            "the control stream is backed up"
        );
        Ok(())
    }

    /// Strict mode: requests wait until the data channel opens or the ICE
    /// timeout passes; only WebRTC signaling uses the relay before that.
    fn holding(&self) -> bool {
        self.rtc_config.as_ref().is_some_and(|c| c.strict)
            && self.rtc_deadline.is_some()
            && self.rtc.channel().is_none()
    }

    async fn release_held(&mut self) -> anyhow::Result<()> {
        for command in std::mem::take(&mut self.held) {
            self.on_command(command).await?;
        }
        Ok(())
    }

    async fn on_command(&mut self, command: Command) -> anyhow::Result<()> {
        let waits = matches!(
            command,
            Command::Request { .. }
                | Command::Attach { .. }
                | Command::Resume { .. }
                | Command::Send(_)
        );
        if waits && self.holding() {
            anyhow::ensure!(
                self.held.len() < 256,
                "too many requests waiting for the data channel"
            );
            self.held.push(command);
            return Ok(());
        }
        match command {
            Command::Request {
                request,
                id,
                reply,
                output,
            } => {
                self.queue_request(&request)?;
                if let Some(output) = output {
                    self.outputs.insert(id.clone(), output);
                }
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
                self.terminals
                    .insert(stream, Terminal::new(stream, 0, events, false));
            }
            Command::Resume {
                request,
                id,
                stream,
                offset,
                reply,
                events,
            } => {
                self.queue_request(&request)?;
                self.pending.insert(id, reply);
                self.terminals
                    .insert(stream, Terminal::new(stream, offset, events, true));
            }
            Command::Input { stream, bytes } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    anyhow::ensure!(
                        bytes.len() <= terminal.input.room(),
                        "terminal input is backed up"
                    );
                    terminal.input.push(&bytes);
                }
            }
            Command::Send(request) => self.queue_request(&request)?,
            Command::Ping(reply) => {
                let nonce = rand::random();
                // Pings lost with a dead link are forgotten, oldest first.
                if self.pings.len() >= MAX_PINGS {
                    let oldest = self
                        .pings
                        .iter()
                        .min_by_key(|(_, (at, _))| *at)
                        .map(|(n, _)| *n);
                    self.pings.remove(&oldest.expect("not empty"));
                }
                self.pings.insert(nonce, (Instant::now(), reply));
                self.send(Frame::Ping(nonce)).await?;
            }
            Command::Path(reply) => {
                let pair = self.rtc.selected_pair().await;
                let _ = reply.send(PathStatus {
                    path: self.rtc.path().await,
                    settled_on_relay: self.settled_on_relay,
                    remote_address: pair.as_ref().map(|(_, address)| address.clone()),
                    candidates: pair.map(|(types, _)| types),
                });
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
                let (ack, messages) = self.control.receive(offset, bytes);
                self.read_responses(messages).await;
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
                let fresh = terminal.output.accept(offset, bytes);
                let duplicate = fresh.is_none();
                if let Some(fresh) = fresh {
                    let start = terminal.output.position() - fresh.len() as u64;
                    terminal.pending.push_back((start, fresh));
                }
                // A duplicate means the worker missed an ACK: repeat it.
                self.deliver(stream, duplicate).await?;
            }
            Frame::Ack {
                stream: CONTROL_STREAM,
                offset,
            } => {
                self.control.acked(offset);
            }
            Frame::Ack { stream, offset } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    terminal.input.ack(offset);
                }
            }
            Frame::Skip { stream, offset } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    terminal.output.skip_to(offset);
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

    async fn read_responses(&mut self, messages: Vec<Bytes>) {
        for message in messages {
            let response: Response = match serde_json::from_slice(&message) {
                Ok(response) => response,
                Err(err) => {
                    tracing::warn!(%err, "undecodable response");
                    continue;
                }
            };
            match response {
                Response::RtcAnswer { sdp } => {
                    if let Err(err) = self.rtc.accept_answer(sdp).await {
                        tracing::warn!(err = format!("{err:#}"), "WebRTC answer refused");
                    }
                }
                Response::RtcCandidate(candidate) => self.rtc.add_candidate(candidate).await,
                Response::ExecuteOutput(output) => {
                    // Waiting here holds the session back while the reader
                    // catches up: the worker then slows the command down.
                    let id = output.request_id.clone().unwrap_or_default();
                    if let Some(pieces) = self.outputs.get(&id) {
                        let _ = pieces.send(output).await;
                    }
                }
                response => self.on_response(response),
            }
        }
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
            Response::PtyResumed {
                session_id,
                offset,
                snapshot,
                request_id,
                stream,
            } => {
                if let Some(terminal) = stream.and_then(|s| self.terminals.get_mut(&s)) {
                    terminal.session_id = Some(session_id.clone());
                    terminal.snapshot = snapshot.as_ref().map(|s| Bytes::from(s.clone()));
                    if *offset > terminal.delivered {
                        terminal.output.skip_to(*offset);
                        terminal.delivered = *offset;
                        terminal.pending.retain(|(at, _)| *at >= *offset);
                    }
                    terminal.resuming = false;
                }
                request_id.clone()
            }
            Response::PtyOutput { .. }
            | Response::RtcAnswer { .. }
            | Response::RtcCandidate(_)
            | Response::ExecuteOutput(_) => None,
        };
        if let Some(id) = &id {
            // The result follows the last piece of output.
            self.outputs.remove(id);
        }
        match id.and_then(|id| self.pending.remove(&id)) {
            Some(reply) => {
                let _ = reply.send(response);
            }
            None => tracing::debug!(?response, "unsolicited response"),
        }
    }

    /// Hands pending output to the reader as far as it has room, and
    /// acknowledges what it took.
    async fn deliver(&mut self, stream: u32, force_ack: bool) -> anyhow::Result<()> {
        let Some(terminal) = self.terminals.get_mut(&stream) else {
            return Ok(());
        };
        if terminal.resuming {
            return Ok(());
        }
        if let Some(screen) = terminal.snapshot.take() {
            let event = PtyEvent::Snapshot {
                screen: screen.clone(),
                offset: terminal.delivered,
            };
            if terminal.events.try_send(event).is_err() {
                terminal.snapshot = Some(screen);
                return Ok(());
            }
        }
        while let Some((offset, bytes)) = terminal.pending.front() {
            if *offset > terminal.delivered {
                let gap = offset - terminal.delivered;
                if terminal.events.try_send(PtyEvent::Skipped(gap)).is_err() {
                    break;
                }
                terminal.delivered = *offset;
            }
            if terminal
                .events
                .try_send(PtyEvent::Output(bytes.clone()))
                .is_err()
            {
                break;
            }
            terminal.delivered = offset + bytes.len() as u64;
            terminal.pending.pop_front();
        }
        const ACK_EVERY: u64 = 16 * 1024;
        let due = force_ack
            || (terminal.delivered > terminal.acked
                && (terminal.pending.is_empty()
                    || terminal.delivered - terminal.acked >= ACK_EVERY));
        let ack = due.then(|| {
            terminal.acked = terminal.delivered;
            Frame::Ack {
                stream,
                offset: terminal.delivered,
            }
        });
        self.finish_if_done(stream);
        if let Some(ack) = ack {
            self.send(ack).await?;
        }
        Ok(())
    }

    /// Reports the exit once every byte up to the stream's end was taken.
    fn finish_if_done(&mut self, stream: u32) {
        let Some(terminal) = self.terminals.get(&stream) else {
            return;
        };
        let complete = terminal.fin.is_some_and(|fin| terminal.delivered >= fin);
        if let (Some(code), true) = (terminal.exit, complete) {
            if terminal.events.try_send(PtyEvent::Exited(code)).is_ok() {
                self.terminals.remove(&stream);
            }
        }
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        if self.ask_ice_at.is_some_and(|at| at <= now) {
            self.ask_ice_at = None;
            self.link.send(&ToServer::GetIceServers {}).await?;
        }
        // A caller that stopped waiting (its reply timed out) is forgotten.
        self.pending.retain(|_, reply| !reply.is_closed());
        self.outputs.retain(|_, pieces| !pieces.is_closed());
        if self.rtc_deadline.is_some_and(|deadline| deadline <= now) {
            tracing::info!("no peer-to-peer path within the ICE timeout; settled on the relay");
            self.rtc_deadline = None;
            self.settled_on_relay = true;
            self.rtc.close().await;
            self.release_held().await?;
        }
        if self.reoffer_at.is_some_and(|at| at <= now) {
            self.reoffer_at = None;
            tracing::info!("offering a new peer-to-peer path");
            if let Err(err) = self.start_rtc().await {
                tracing::warn!(
                    err = format!("{err:#}"),
                    "WebRTC unavailable; staying on the relay"
                );
            }
        }
        self.control.resend_if_stalled(RETRANSMIT_AFTER);
        for terminal in self.terminals.values_mut() {
            terminal.input.resend_if_stalled(RETRANSMIT_AFTER);
        }
        let streams: Vec<u32> = self.terminals.keys().copied().collect();
        for stream in streams {
            self.deliver(stream, false).await?;
        }
        self.flush().await
    }
}
