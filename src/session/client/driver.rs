//! The driver task of a client session: owns the link and the streams,
//! and turns commands from [`Session`](super::Session) and [`Pty`](super::Pty)
//! handles into frames, and frames into events.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame};
use cocoon_signaling::protocol::service::{ExecuteOutput, Request, Response, SessionId};
use cocoon_signaling::protocol::{ErrorCode, FromServer, IceServer, Secret, ToServer};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, interval};

use super::{Command, EndReason, PathStatus, PtyEvent, Reply, SessionOptions};
use crate::client::{Client, ServerError};
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
/// After an attempt fails before it ever worked, the next one starts this
/// much later, while the ICE timeout leaves time for it.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// An attempt whose data channel has not opened this long after its offer
/// is given up for a fresh one: ICE may succeed and the DTLS or SCTP
/// handshake above it still hang, which no connection state reports.
const ATTEMPT_WITHIN: Duration = Duration::from_secs(10);
/// Reconnecting to the signaling server: the first try after about this
/// long, then twice as long each time up to the cap.
const REJOIN_FIRST: Duration = Duration::from_millis(250);
const REJOIN_MAX: Duration = Duration::from_secs(5);
/// With nothing from the server (it pings every 20 s) for this long, the
/// connection is presumed dead.
const SERVER_SILENCE: Duration = Duration::from_secs(60);

/// How to reach the signaling server again.
pub(super) struct Dial {
    pub(super) url: String,
    pub(super) token: Secret,
    pub(super) tls: Arc<rustls::ClientConfig>,
}

impl Dial {
    /// Connects and authenticates; with `rtc`, also fetches the server's
    /// ICE servers into it and says when to ask again.
    pub(super) async fn connect(
        &self,
        rtc: Option<&RtcConfig>,
    ) -> anyhow::Result<(WsLink, Option<Duration>)> {
        let mut client = Client::connect(&self.url, &self.token, self.tls.clone()).await?;
        let mut refresh_ice = None;
        if let Some(rtc) = rtc {
            // Servers that hand out none answer with an empty list; older
            // ones with an error, which changes nothing.
            match client.ice_servers().await {
                Ok((servers, ttl)) => {
                    rtc.issued
                        .set(servers.into_iter().map(Into::into).collect());
                    refresh_ice = Some(ttl / 2);
                }
                Err(err) => tracing::debug!(err = format!("{err:#}"), "no ICE servers issued"),
            }
        }
        Ok((client.into_link(), refresh_ice))
    }
}

/// The request ids of the session's own resumes start with this (the
/// session's other ids start with `s`).
const RESUME_ID: &str = "resume-";

fn resume_id(stream: u32) -> String {
    format!("{RESUME_ID}{stream}")
}

/// Reconnecting to the signaling server.
struct Rejoin {
    since: Instant,
    delay: Duration,
    next_try: Instant,
}

/// `delay`, give or take a quarter, so that clients do not come back in
/// lockstep.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.75 + rand::random::<f64>() / 2.0)
}

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
    /// The terminal's input offset of this stream's offset 0 (input
    /// offsets count every byte the terminal took, from any client).
    input_base: u64,
    /// Input waiting for a resume to say where the terminal's input stands:
    /// its terminal offset and the bytes (unacknowledged when the link was
    /// reset, or typed since).
    carry: Option<(u64, Vec<u8>)>,
    /// Why it ended, for the [`Pty`](super::Pty).
    ended: EndReason,
}

impl Terminal {
    fn new(
        stream: u32,
        offset: u64,
        events: mpsc::Sender<PtyEvent>,
        resuming: bool,
        ended: EndReason,
    ) -> Self {
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
            input_base: 0,
            carry: None,
            ended,
        }
    }

    /// Takes everything unacknowledged out of the input stream (to resend
    /// after a resume) and starts a fresh one, whose offsets start at 0.
    fn carry_input(&mut self) {
        // Already carrying (reset again before the resume was answered):
        // input went to the carry since, the stream is empty.
        if self.carry.is_none() {
            let start = self.input_base + self.input.acked();
            self.carry = Some((start, self.input.take_unacknowledged()));
            self.input = OutStream::new(self.input.id(), STREAM_BUFFER);
        }
    }

    /// The resume's answer: input resent from where the terminal stands.
    fn resumed_input(&mut self, input_offset: Option<u64>) {
        match self.carry.take() {
            Some((start, bytes)) => {
                // A worker that does not say gets everything unacknowledged.
                let taken = input_offset.map_or(0, |at| at.saturating_sub(start));
                let skip = (taken as usize).min(bytes.len());
                self.input_base = start + skip as u64;
                self.input.push(&bytes[skip..]);
            }
            None => self.input_base = input_offset.unwrap_or(0),
        }
    }
}

pub(super) struct Driver {
    /// The signaling connection; `None` while reconnecting.
    link: Option<WsLink>,
    dial: Dial,
    rejoin: Option<Rejoin>,
    /// The link was lost or the device came back: the session layer starts
    /// over (a new control stream, terminals resumed) for this reason.
    reset_because: Option<String>,
    /// Since when the device has been offline.
    offline_since: Option<Instant>,
    rejoin_within: Duration,
    offline_grace: Duration,
    /// Set when the session must end, and why.
    end: Option<String>,
    ended: EndReason,
    device: String,
    control: ControlStream,
    pending: HashMap<String, oneshot::Sender<Reply>>,
    /// Streamed executes' output, by request id.
    outputs: HashMap<String, mpsc::Sender<ExecuteOutput>>,
    terminals: HashMap<u32, Terminal>,
    pings: HashMap<u64, (Instant, oneshot::Sender<Duration>)>,
    rtc_config: Option<RtcConfig>,
    rtc: RtcSide,
    rtc_deadline: Option<Instant>,
    settled_on_relay: bool,
    reoffer_at: Option<Instant>,
    /// When the current attempt counts as stalled if no channel opened.
    attempt_until: Option<Instant>,
    /// Peer-to-peer connections offered so far.
    offers: u32,
    /// Commands held in strict mode.
    held: Vec<Command>,
    /// When to ask the server for fresh ICE servers (TURN credentials).
    ask_ice_at: Option<Instant>,
}

impl Driver {
    pub(super) fn new(
        link: WsLink,
        dial: Dial,
        device: String,
        options: SessionOptions,
        refresh_ice: Option<Duration>,
        ended: EndReason,
    ) -> Self {
        Self {
            link: Some(link),
            dial,
            rejoin: None,
            reset_because: None,
            offline_since: None,
            rejoin_within: options.rejoin_within,
            offline_grace: options.offline_grace,
            end: None,
            ended,
            device,
            control: ControlStream::new(STREAM_BUFFER),
            pending: HashMap::new(),
            outputs: HashMap::new(),
            terminals: HashMap::new(),
            pings: HashMap::new(),
            rtc_config: options.rtc,
            rtc: RtcSide::default(),
            rtc_deadline: None,
            settled_on_relay: false,
            reoffer_at: None,
            attempt_until: None,
            offers: 0,
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
                incoming = recv(&mut self.link) => match incoming {
                    Ok(Some(Incoming::Relay { from, frame })) if from == self.device => self.on_frame(frame).await,
                    Ok(Some(Incoming::Relay { .. })) => Ok(()),
                    Ok(Some(Incoming::Message(message))) => self.on_message(message).await,
                    Ok(None) => {
                        self.link_lost("the signaling server closed the connection");
                        Ok(())
                    }
                    Err(err) => {
                        self.link_lost(format!("{err:#}"));
                        Ok(())
                    }
                },
                event = self.rtc.next_event() => self.on_rtc(event).await,
                _ = tick.tick() => self.on_tick().await,
            };
            if let Err(err) = result {
                tracing::warn!(err = format!("{err:#}"), "session failed");
                self.end.get_or_insert(format!("{err:#}"));
            }
            if let Some(why) = self.reset_because.take() {
                self.reset(&why).await;
            }
            if let Some(reason) = self.end.take() {
                tracing::warn!(%reason, "session ended");
                for terminal in self.terminals.values() {
                    terminal.ended.lock().unwrap().get_or_insert(reason.clone());
                }
                *self.ended.lock().unwrap() = Some(reason);
                break;
            }
        }
        self.rtc.close().await;
    }

    async fn on_message(&mut self, message: FromServer) -> anyhow::Result<()> {
        match message {
            FromServer::IceServers {
                ice_servers,
                ttl_secs,
            } => return self.on_ice_servers(ice_servers, ttl_secs).await,
            FromServer::ServerRestarting {} => self.link_lost("the signaling server is restarting"),
            FromServer::DeviceStatus { device_id, online } if device_id.as_str() == self.device => {
                self.on_device_status(online)
            }
            // What the server says to frames sent while the device is away.
            FromServer::Error {
                code: ErrorCode::DeviceOffline,
                ..
            } => self.on_device_status(false),
            message => tracing::debug!(?message, "message from the signaling server"),
        }
        Ok(())
    }

    /// The connection to the signaling server is gone: reconnect soon and
    /// start the session layer over.
    fn link_lost(&mut self, why: impl Into<String>) {
        if self.link.take().is_none() {
            return;
        }
        let why = why.into();
        tracing::warn!(%why, "signaling connection lost; reconnecting");
        let now = Instant::now();
        self.rejoin = Some(Rejoin {
            since: now,
            delay: REJOIN_FIRST,
            next_try: now + jittered(REJOIN_FIRST),
        });
        self.reset_because = Some(why);
    }

    fn on_device_status(&mut self, online: bool) {
        if !online && self.offline_since.is_none() {
            tracing::warn!(device = %self.device, "device offline; waiting for it");
            self.offline_since = Some(Instant::now());
            self.fail_pending(&format!("device {} is offline", self.device));
        } else if online && self.offline_since.take().is_some() {
            // Its worker reconnected: it knows nothing of this session.
            tracing::info!(device = %self.device, "device back online; resuming");
            self.reset_because = Some("the device reconnected".into());
        }
    }

    /// Fails every request waiting for a reply.
    fn fail_pending(&mut self, why: &str) {
        let message = format!("{why}; no reply (the request may or may not have run)");
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(message.clone()));
        }
        self.outputs.clear();
        self.pings.clear();
    }

    /// Starts the session layer over on a new link or with a device that
    /// reconnected: a fresh control stream, and every terminal resumed
    /// where its output and input stand, so nothing is lost or doubled.
    /// Terminals still starting fail with their request.
    async fn reset(&mut self, why: &str) {
        self.rtc.fall_back();
        self.rtc_deadline = None;
        self.reoffer_at = None;
        self.attempt_until = None;
        self.control = ControlStream::new(STREAM_BUFFER);
        self.fail_pending(why);
        self.terminals.retain(|_, terminal| {
            let keep = terminal.session_id.is_some()
                && terminal.exit.is_none()
                && !terminal.events.is_closed();
            if !keep && let Some(code) = terminal.exit {
                // Its program is gone: there is nothing left to resume.
                let reason = format!("{why} as the program exited (code {code})");
                terminal.ended.lock().unwrap().get_or_insert(reason);
            }
            keep
        });
        let mut resumes = Vec::new();
        for (stream, terminal) in &mut self.terminals {
            terminal.carry_input();
            terminal.resuming = true;
            terminal.acked = 0;
            resumes.push(Request::PtyResume {
                session_id: terminal.session_id.clone().expect("kept above"),
                offset: terminal.output.position(),
                request_id: Some(resume_id(*stream)),
                stream: Some(*stream),
            });
        }
        for request in &resumes {
            // A fresh control stream has room for a few small requests.
            let _ = self.queue_request(request);
        }
        if self.link.is_some() {
            self.restart_rtc().await;
            let _ = self.flush().await;
        }
    }

    async fn restart_rtc(&mut self) {
        if let Err(err) = self.start_rtc().await {
            tracing::warn!(
                err = format!("{err:#}"),
                "WebRTC unavailable; staying on the relay"
            );
        }
    }

    /// One try at reconnecting, when it is due.
    async fn try_rejoin(&mut self) {
        let Some(rejoin) = &self.rejoin else {
            return;
        };
        if Instant::now() < rejoin.next_try {
            return;
        }
        match self.dial.connect(self.rtc_config.as_ref()).await {
            Ok((link, refresh_ice)) => {
                tracing::info!("reconnected to the signaling server");
                self.link = Some(link);
                self.rejoin = None;
                self.ask_ice_at = refresh_ice.map(|after| Instant::now() + after);
                self.restart_rtc().await;
                let _ = self.flush().await;
            }
            Err(err) => {
                let refused = err
                    .downcast_ref::<ServerError>()
                    .is_some_and(|err| err.code.is_credential_failure());
                let rejoin = self.rejoin.as_mut().expect("checked above");
                if refused || rejoin.since.elapsed() >= self.rejoin_within {
                    self.end = Some(format!("cannot reconnect to the signaling server: {err:#}"));
                    return;
                }
                tracing::debug!(err = format!("{err:#}"), "reconnecting failed");
                rejoin.delay = (rejoin.delay * 2).min(REJOIN_MAX);
                rejoin.next_try = Instant::now() + jittered(rejoin.delay);
            }
        }
    }

    /// Offers a data channel; traffic stays on the relay meanwhile.
    async fn start_rtc(&mut self) -> anyhow::Result<()> {
        let Some(config) = self.rtc_config.clone() else {
            return Ok(());
        };
        let sdp = self.rtc.offer(&config).await?;
        self.offers += 1;
        self.attempt_until = Some(Instant::now() + ATTEMPT_WITHIN);
        // A retry keeps the first attempt's deadline.
        self.rtc_deadline
            .get_or_insert_with(|| Instant::now() + config.ice_timeout);
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
                self.attempt_until = None;
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
                } else if state == S::Failed && self.rtc.channel().is_none() {
                    // Checks can fail early (a NAT mapping, a TURN allocation
                    // or the peer's candidates not ready yet).
                    self.retry("failed");
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

    /// Gives up an attempt that never opened a channel and offers the next
    /// one soon, while the ICE timeout leaves time for it: the timeout is
    /// for trying.
    fn retry(&mut self, why: &str) {
        self.attempt_until = None;
        let now = Instant::now();
        if self.reoffer_at.is_none()
            && self
                .rtc_deadline
                .is_some_and(|deadline| deadline > now + 2 * RETRY_AFTER)
        {
            tracing::info!("peer-to-peer attempt {why}; trying again");
            self.reoffer_at = Some(now + RETRY_AFTER);
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
        // Without a link the frame waits in its stream for the next one.
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        if let Err(err) = link.send_relay(&self.device, &encoded).await {
            self.link_lost(format!("{err:#}"));
        }
        Ok(())
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
        if self.offline_since.is_some() {
            let offline = format!("device {} is offline", self.device);
            match command {
                Command::Request { reply, .. }
                | Command::Attach { reply, .. }
                | Command::Resume { reply, .. } => {
                    let _ = reply.send(Err(offline));
                    return Ok(());
                }
                _ => {}
            }
        }
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
                ended,
            } => {
                let stream = request.stream.expect("set by attach_pty");
                self.queue_request(&Request::AttachPty(request))?;
                self.pending.insert(id, reply);
                self.terminals
                    .insert(stream, Terminal::new(stream, 0, events, false, ended));
            }
            Command::Resume {
                request,
                id,
                stream,
                offset,
                reply,
                events,
                ended,
            } => {
                self.queue_request(&request)?;
                self.pending.insert(id, reply);
                self.terminals
                    .insert(stream, Terminal::new(stream, offset, events, true, ended));
            }
            Command::Input { stream, bytes } => {
                if let Some(terminal) = self.terminals.get_mut(&stream) {
                    match &mut terminal.carry {
                        // Held until the resume says where input stands.
                        Some((_, carried)) => {
                            anyhow::ensure!(
                                carried.len() + bytes.len() <= STREAM_BUFFER,
                                "terminal input is backed up"
                            );
                            carried.extend_from_slice(&bytes);
                        }
                        None => {
                            anyhow::ensure!(
                                bytes.len() <= terminal.input.room(),
                                "terminal input is backed up"
                            );
                            terminal.input.push(&bytes);
                        }
                    }
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
                    offers: self.offers,
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
            Response::Error {
                request_id: Some(id),
                message,
                ..
            } if id.starts_with(RESUME_ID) => {
                // The terminal could not be taken back (it ended meanwhile,
                // or the worker restarted and it is gone).
                let stream = self
                    .terminals
                    .keys()
                    .copied()
                    .find(|stream| resume_id(*stream) == *id);
                if let Some(terminal) = stream.and_then(|s| self.terminals.remove(&s)) {
                    let reason = format!("the terminal could not be resumed: {message}");
                    tracing::warn!(%reason);
                    *terminal.ended.lock().unwrap() = Some(reason);
                }
                None
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
                input_offset,
                request_id,
                stream,
            } => {
                if let Some(terminal) = stream.and_then(|s| self.terminals.get_mut(&s)) {
                    terminal.session_id = Some(session_id.clone());
                    terminal.resumed_input(*input_offset);
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
                let _ = reply.send(Ok(response));
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
        if let (Some(code), true) = (terminal.exit, complete)
            && terminal.events.try_send(PtyEvent::Exited(code)).is_ok()
        {
            self.terminals.remove(&stream);
        }
    }

    async fn on_tick(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        if self
            .offline_since
            .is_some_and(|since| now - since >= self.offline_grace)
        {
            self.end = Some(format!("device {} is offline", self.device));
            return Ok(());
        }
        if self.link.is_none() {
            self.try_rejoin().await;
        }
        if self
            .link
            .as_ref()
            .is_some_and(|link| link.silent_for() >= SERVER_SILENCE)
        {
            self.link_lost("the signaling server went silent");
        }
        if let Some(link) = &mut self.link
            && self.ask_ice_at.is_some_and(|at| at <= now)
        {
            self.ask_ice_at = None;
            if let Err(err) = link.send(&ToServer::GetIceServers {}).await {
                self.link_lost(format!("{err:#}"));
            }
        }
        // A caller that stopped waiting (its reply timed out) is forgotten.
        self.pending.retain(|_, reply| !reply.is_closed());
        self.outputs.retain(|_, pieces| !pieces.is_closed());
        if self.rtc_deadline.is_some_and(|deadline| deadline <= now) {
            tracing::info!("no peer-to-peer path within the ICE timeout; settled on the relay");
            self.rtc_deadline = None;
            self.attempt_until = None;
            self.settled_on_relay = true;
            self.rtc.fall_back();
            self.release_held().await?;
        }
        if self.rtc.channel().is_none() && self.attempt_until.is_some_and(|until| until <= now) {
            self.retry("stalled");
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

/// The next message or frame; pending forever while there is no link.
async fn recv(link: &mut Option<WsLink>) -> anyhow::Result<Option<Incoming>> {
    match link {
        Some(link) => link.recv_any().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terminal() -> Terminal {
        let (events, _) = mpsc::channel(1);
        Terminal::new(1, 0, events, false, EndReason::default())
    }

    fn sent_input(terminal: &mut Terminal) -> Vec<u8> {
        let mut bytes = Vec::new();
        while let Some(Frame::Data {
            offset, bytes: b, ..
        }) = terminal.input.next_frame()
        {
            assert_eq!(offset, bytes.len() as u64, "a fresh stream starts at 0");
            bytes.extend_from_slice(&b);
        }
        bytes
    }

    /// Input the terminal took but never acknowledged (the link died first)
    /// is not typed twice; input typed while reconnecting follows it.
    #[test]
    fn a_resume_resends_input_from_where_the_terminal_stands() {
        let mut terminal = terminal();
        terminal.input.push(b"echo one\n");
        sent_input(&mut terminal);
        terminal.input.ack(5);
        terminal.carry_input();
        // Typed meanwhile, and a second reset before the resume's answer.
        terminal
            .carry
            .as_mut()
            .unwrap()
            .1
            .extend_from_slice(b"ls\n");
        terminal.carry_input();
        // The terminal took 7 bytes: "echo on".
        terminal.resumed_input(Some(7));
        assert_eq!(sent_input(&mut terminal), b"e\nls\n");
        assert_eq!(terminal.input_base, 7);

        // Offsets carry on from there at the next reset.
        terminal.input.ack(2);
        terminal.carry_input();
        assert_eq!(terminal.carry.as_ref().unwrap().0, 9);
    }

    #[test]
    fn a_worker_that_does_not_say_gets_everything_unacknowledged() {
        let mut terminal = terminal();
        terminal.input.push(b"abc");
        sent_input(&mut terminal);
        terminal.carry_input();
        terminal.resumed_input(None);
        assert_eq!(sent_input(&mut terminal), b"abc");
    }
}
