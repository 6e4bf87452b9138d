//! The client's side of a session with one device: requests and replies on
//! the control stream, terminals on streams of their own, every byte
//! acknowledged and resent when it stalls.
//!
//! [`Session`] is a handle; a driver task owns the link and the streams.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use cocoon_signaling::protocol::service::{
    AttachPty, Execute, ExecuteOutput, Request, Response, SessionId,
};
use cocoon_signaling::protocol::{DeviceId, Secret};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::link::rtc::{Path, RtcConfig};
use driver::{Dial, Driver};

mod driver;

/// Output chunks queued for a terminal's reader.
const EVENT_QUEUE: usize = 256;
/// How long a request may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A reply, or why none will come (the link was reset under the request).
type Reply = Result<Response, String>;

/// Why a session ended, once it has.
type EndReason = Arc<Mutex<Option<String>>>;

/// How a session rides out a lost link or device.
#[derive(Clone)]
pub struct SessionOptions {
    /// With it, traffic starts on the relay and moves to a WebRTC data
    /// channel as soon as one opens.
    pub rtc: Option<RtcConfig>,
    /// How long to keep reconnecting to the signaling server after the
    /// connection drops (a restart, a network change) before giving up.
    pub rejoin_within: Duration,
    /// How long terminals wait for a device that went offline to come back
    /// (its worker reconnecting) before the session ends.
    pub offline_grace: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            rtc: None,
            rejoin_within: Duration::from_secs(60),
            offline_grace: Duration::from_secs(20),
        }
    }
}

/// What a terminal produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Output bytes, in order, each exactly once.
    Output(Bytes),
    /// This many bytes of output were dropped because the client stopped
    /// acknowledging for too long; output continues after the gap.
    Skipped(u64),
    /// The program ended with this code; no output follows.
    Exited(i32),
    /// After a resume that missed more than the worker keeps: reset the
    /// terminal and write `screen` to redraw it; output continues at `offset`.
    Snapshot {
        /// Escape sequences that redraw the screen.
        screen: Bytes,
        /// Where the output continues.
        offset: u64,
    },
}

enum Command {
    Request {
        request: Request,
        id: String,
        reply: oneshot::Sender<Reply>,
        /// Where a streamed `execute`'s output goes.
        output: Option<mpsc::Sender<ExecuteOutput>>,
    },
    Attach {
        request: AttachPty,
        id: String,
        reply: oneshot::Sender<Reply>,
        events: mpsc::Sender<PtyEvent>,
        ended: EndReason,
    },
    Resume {
        request: Request,
        id: String,
        stream: u32,
        offset: u64,
        reply: oneshot::Sender<Reply>,
        events: mpsc::Sender<PtyEvent>,
        ended: EndReason,
    },
    Input {
        stream: u32,
        bytes: Vec<u8>,
    },
    Send(Request),
    Ping(oneshot::Sender<Duration>),
    Path(oneshot::Sender<PathStatus>),
}

/// Which path a session's frames take, and how it got there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathStatus {
    /// The path now.
    pub path: Path,
    /// The ICE timeout passed without a direct path: the session stays on
    /// the relay.
    pub settled_on_relay: bool,
    /// The selected candidate pair's types (local, remote), once connected.
    pub candidates: Option<(String, String)>,
    /// The remote (worker's) candidate's address, `IP:PORT`, once connected.
    pub remote_address: Option<String>,
    /// Peer-to-peer connections offered so far (retries and new paths after
    /// a lost one included).
    pub offers: u32,
}

/// A session with one device. It outlives its links: when the connection
/// to the signaling server drops (the server restarts, the network
/// changes) it reconnects and takes its terminals back, and when the device
/// goes offline it waits a while for it; not a byte of terminal input or
/// output is lost or doubled. Requests in flight at such a moment fail.
pub struct Session {
    commands: mpsc::Sender<Command>,
    next_id: AtomicU64,
    next_stream: AtomicU32,
    ended: EndReason,
}

impl Session {
    /// Authenticates with `token` and opens a relay-only session with `device`.
    pub async fn connect(
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
        device: &DeviceId,
    ) -> anyhow::Result<Self> {
        Self::connect_with(url, token, tls, device, None).await
    }

    /// Like [`Session::connect`]; with `rtc`, traffic starts on the relay
    /// and moves to a WebRTC data channel as soon as one opens.
    pub async fn connect_with(
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
        device: &DeviceId,
        rtc: Option<RtcConfig>,
    ) -> anyhow::Result<Self> {
        let options = SessionOptions {
            rtc,
            ..SessionOptions::default()
        };
        Self::connect_opts(url, token, tls, device, options).await
    }

    /// Like [`Session::connect`], with every option.
    pub async fn connect_opts(
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
        device: &DeviceId,
        options: SessionOptions,
    ) -> anyhow::Result<Self> {
        let dial = Dial {
            url: url.to_owned(),
            token: token.clone(),
            tls,
        };
        let (link, refresh_ice) = dial.connect(options.rtc.as_ref()).await?;
        let (commands, queue) = mpsc::channel(256);
        let ended = EndReason::default();
        let driver = Driver::new(
            link,
            dial,
            device.to_string(),
            options,
            refresh_ice,
            ended.clone(),
        );
        tokio::spawn(driver.run(queue));
        Ok(Self {
            commands,
            next_id: AtomicU64::new(1),
            next_stream: AtomicU32::new(1),
            ended,
        })
    }

    /// Why the session ended (the device stayed offline, the server could
    /// not be reached, the token was refused), once it has.
    pub fn ended_reason(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
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
            .send(Command::Request {
                request,
                id,
                reply,
                output: None,
            })
            .await
            .context("the session has ended")?;
        wait_reply(answer).await
    }

    /// Runs a command with its output streamed: pieces arrive from
    /// [`StreamingExec::next`] as the command writes them, then
    /// [`StreamingExec::result`] has its exit status.
    pub async fn execute_streaming(&self, mut execute: Execute) -> anyhow::Result<StreamingExec> {
        execute.stream = true;
        let id = execute
            .request_id
            .get_or_insert_with(|| self.next_id())
            .clone();
        let (output, pieces) = mpsc::channel(64);
        let (reply, result) = oneshot::channel();
        self.commands
            .send(Command::Request {
                request: Request::Execute(execute),
                id,
                reply,
                output: Some(output),
            })
            .await
            .context("the session has ended")?;
        Ok(StreamingExec { pieces, result })
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
        let ended = EndReason::default();
        self.commands
            .send(Command::Attach {
                request,
                id,
                reply,
                events: events_tx,
                ended: ended.clone(),
            })
            .await
            .context("the session has ended")?;
        match wait_reply(answer).await? {
            Response::PtyCreated { session_id, .. } => Ok(Pty {
                session_id,
                stream,
                commands: self.commands.clone(),
                events,
                offset: 0,
                ended,
            }),
            Response::Error { code, message, .. } => {
                bail!("attach_pty failed ({code:?}): {message}")
            }
            other => bail!("unexpected reply to attach_pty: {other:?}"),
        }
    }

    /// Takes over a running terminal (after a reconnect, from another
    /// client) having its output up to `offset`: the rest is replayed, or a
    /// [`PtyEvent::Snapshot`] comes first when the worker no longer has it.
    pub async fn resume_pty(&self, session_id: &SessionId, offset: u64) -> anyhow::Result<Pty> {
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id();
        let request = Request::PtyResume {
            session_id: session_id.clone(),
            offset,
            request_id: Some(id.clone()),
            stream: Some(stream),
        };
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (reply, answer) = oneshot::channel();
        let ended = EndReason::default();
        self.commands
            .send(Command::Resume {
                request,
                id,
                stream,
                offset,
                reply,
                events: events_tx,
                ended: ended.clone(),
            })
            .await
            .context("the session has ended")?;
        match wait_reply(answer).await? {
            Response::PtyResumed { session_id, .. } => Ok(Pty {
                session_id,
                stream,
                commands: self.commands.clone(),
                events,
                offset,
                ended,
            }),
            Response::Error { code, message, .. } => {
                bail!("pty_resume failed ({code:?}): {message}")
            }
            other => bail!("unexpected reply to pty_resume: {other:?}"),
        }
    }

    /// The path the session's frames take now.
    pub async fn path(&self) -> anyhow::Result<PathStatus> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Path(reply))
            .await
            .context("the session has ended")?;
        wait(answer).await
    }

    /// Waits until the session's frames take `path` (or the deadline).
    pub async fn wait_for_path(&self, path: Path, within: Duration) -> anyhow::Result<PathStatus> {
        let deadline = Instant::now() + within;
        loop {
            let status = self.path().await?;
            if status.path == path {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "still on {:?} after {within:?}",
                status.path
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
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

async fn wait_reply(answer: oneshot::Receiver<Reply>) -> anyhow::Result<Response> {
    wait(answer).await?.map_err(anyhow::Error::msg)
}

/// A streamed `execute` in progress.
pub struct StreamingExec {
    pieces: mpsc::Receiver<ExecuteOutput>,
    result: oneshot::Receiver<Reply>,
}

impl StreamingExec {
    /// The next piece of output; `None` once the command's output has ended.
    pub async fn next(&mut self) -> Option<ExecuteOutput> {
        self.pieces.recv().await
    }

    /// The result (`execute_result` without the output, or an error), after
    /// the output.
    pub async fn result(self) -> anyhow::Result<Response> {
        wait_reply(self.result).await
    }
}

/// A terminal on the device.
pub struct Pty {
    /// The worker's id for it.
    pub session_id: SessionId,
    stream: u32,
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<PtyEvent>,
    offset: u64,
    ended: EndReason,
}

impl Pty {
    /// Why the terminal ended without an exit (its session ended, or it
    /// could not be resumed after a reconnect), once [`Pty::next`] returned
    /// `None`.
    pub fn ended_reason(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Offset just past the output taken so far (what to resume from).
    pub fn offset(&self) -> u64 {
        self.offset
    }

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
        let event = self.events.recv().await?;
        match &event {
            PtyEvent::Output(bytes) => self.offset += bytes.len() as u64,
            PtyEvent::Skipped(n) => self.offset += n,
            PtyEvent::Snapshot { offset, .. } => self.offset = *offset,
            PtyEvent::Exited(_) => {}
        }
        Some(event)
    }

    async fn command(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .await
            .context("the session has ended")
    }
}
