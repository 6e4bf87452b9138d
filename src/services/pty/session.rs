//! One PTY session: a task that owns the terminal master, the program, and
//! the output ring, and that never stops draining the terminal.
//!
//! Backpressure applies only on the hop to the viewer: output is read as
//! fast as the program writes it into a bounded ring; the viewer is sent
//! what its outbound queue (and, with flow control, its ack window) allows.
//! A viewer that falls further behind than the ring holds skips ahead; the
//! jump in `offset` tells it so.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use cocoon_signaling::protocol::ClientId;
use cocoon_signaling::protocol::frame::MAX_DATA;
use cocoon_signaling::protocol::service::{Encoding, Response, SessionId};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::PtyConfig;
use super::sys::{self, Spawned};
use crate::services::process::exit_code;
use crate::services::ring::{OutputRing, utf8_cut};
use crate::services::{Outgoing, ReplyTo};

/// Most bytes read from the terminal at once.
const READ_BYTES: usize = 64 * 1024;
/// Most bytes of output in one message.
const CHUNK_BYTES: usize = 16 * 1024;
/// Input waiting for the program to read it.
const MAX_PENDING_INPUT: usize = 64 * 1024;
/// How long the start of a character may wait for the rest of it.
const HOLD_PARTIAL: Duration = Duration::from_millis(30);
/// After the program exits, how long to wait for the terminal's last output.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
/// After the program exits, how long to try to deliver what is left.
const FLUSH_AFTER_EXIT: Duration = Duration::from_secs(3);
/// A viewer that acknowledges nothing for this long no longer holds the
/// program up.
const STALL_LIMIT: Duration = Duration::from_secs(5);
/// Between SIGHUP and SIGKILL when a session is closed.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the manager tells a session.
#[derive(Debug)]
pub enum Control {
    /// Bytes to type.
    Input(Vec<u8>),
    /// New terminal size.
    Resize(u16, u16),
    /// The viewer has consumed output up to this offset.
    Ack(ClientId, u64),
    /// End the session.
    Close,
    /// A client disconnected.
    ClientLeft(ClientId),
    /// Another client takes over the output from `offset` on.
    Attach {
        /// Where output goes now.
        to: ReplyTo,
        /// Its session-layer stream, if any.
        stream: Option<u32>,
        /// What the client already has.
        offset: u64,
        /// Echoed in `pty_resumed`.
        request_id: Option<String>,
    },
    /// The link changed: send again everything not acknowledged.
    Rewind(ClientId),
}

/// Where output goes and how much may be in flight.
struct Viewer {
    /// The client and its queue; `None` while detached.
    to: Option<ReplyTo>,
    /// Session-layer stream of the output; `None`: `pty_output` messages.
    stream: Option<u32>,
    sent: u64,
    acked: u64,
    flow_control: bool,
    /// When the viewer last acknowledged progress.
    last_ack: Instant,
}

/// Timers, each optional; a timer that fired is cleared (and, where it
/// matters later, leaves a flag behind).
#[derive(Default)]
struct Deadlines {
    hold: Option<Instant>,
    detach: Option<Instant>,
    drain: Option<Instant>,
    flush: Option<Instant>,
    kill: Option<Instant>,
}

/// Timers that fired and still matter.
#[derive(Default)]
struct Expired {
    /// A held partial character goes out as it is.
    hold: bool,
    /// Stop waiting for the terminal's last output.
    drain: bool,
    /// Stop trying to deliver what is left.
    flush: bool,
}

impl Deadlines {
    fn next(&self) -> Option<Instant> {
        [self.hold, self.detach, self.drain, self.flush, self.kill]
            .into_iter()
            .flatten()
            .min()
    }
}

/// A running session.
pub struct Session {
    id: SessionId,
    config: Arc<PtyConfig>,
    child: tokio::process::Child,
    pid: u32,
    ring: OutputRing,
    viewer: Viewer,
    pending_input: VecDeque<u8>,
    /// Input bytes taken from every client so far (dropped ones included:
    /// nobody resends those), told to a client that resumes.
    input_taken: u64,
    /// A terminal emulator fed every output byte as it leaves the ring:
    /// with the ring's contents on top, the screen to redraw for a client
    /// that missed more than the ring holds. (Parsing only what leaves the
    /// ring costs nothing for sessions that never print a megabyte.)
    screen: vt100::Parser,
    /// Output offset up to which `screen` has parsed.
    parsed: u64,
    /// The next stream send starts after a gap the client must skip.
    skip_pending: bool,
    /// `ring.end()` when a partial character was held back.
    held_at: Option<u64>,
    eof: bool,
    exit_code: Option<i32>,
    deadlines: Deadlines,
    expired: Expired,
}

impl Session {
    /// A session for a just-started program, shown to `client`; returns it
    /// and the terminal master it runs with.
    pub fn new(
        id: SessionId,
        config: Arc<PtyConfig>,
        spawned: Spawned,
        size: (u16, u16),
        to: ReplyTo,
        stream: Option<u32>,
        flow_control: bool,
    ) -> (Self, AsyncFd<OwnedFd>) {
        let (cols, rows) = size;
        let session = Self {
            id,
            ring: OutputRing::new(config.ring_bytes),
            config,
            child: spawned.child,
            pid: spawned.pid,
            viewer: Viewer {
                to: Some(to),
                stream,
                sent: 0,
                acked: 0,
                flow_control,
                last_ack: Instant::now(),
            },
            pending_input: VecDeque::new(),
            input_taken: 0,
            screen: vt100::Parser::new(rows, cols, 0),
            parsed: 0,
            skip_pending: false,
            held_at: None,
            eof: false,
            exit_code: None,
            deadlines: Deadlines::default(),
            expired: Expired::default(),
        };
        (session, spawned.master)
    }

    /// Runs until the program has exited and its output is delivered (or
    /// given up on). Returns the exit code.
    pub async fn run(
        mut self,
        master: AsyncFd<OwnedFd>,
        mut controls: mpsc::Receiver<Control>,
    ) -> i32 {
        let mut buf = vec![0u8; READ_BYTES];
        let mut controls_open = true;
        loop {
            if self.finished() {
                break;
            }
            let can_send = self.can_send();
            // The viewer may change between turns; the sender is cheap to clone.
            let out = self.viewer.to.as_ref().map(|to| to.out.clone());
            let paused = self.paused();
            let timer = self.deadlines.next().into_iter().chain(paused).min();
            tokio::select! {
                ready = master.readable(), if !self.eof && paused.is_none() => match ready {
                    Ok(guard) => self.read_output(guard, &mut buf),
                    Err(_) => self.eof = true,
                },
                ready = master.writable(), if !self.pending_input.is_empty() => {
                    if let Ok(guard) = ready {
                        self.write_input(guard);
                    }
                }
                control = controls.recv(), if controls_open => match control {
                    Some(control) => self.control(&master, control),
                    None => {
                        controls_open = false;
                        self.hang_up();
                    }
                },
                permit = reserve(out.as_ref()), if can_send => match permit {
                    Ok(permit) => self.send_output(permit),
                    // The viewer's queue is gone (its peer ended): detached.
                    Err(_) => self.detach(),
                },
                status = self.child.wait(), if self.exit_code.is_none() => {
                    self.exited(status.map_or(-1, exit_code));
                }
                _ = sleep_until(timer.unwrap_or_else(Instant::now)), if timer.is_some() => {
                    self.on_timer();
                }
            }
        }
        let code = self.exit_code.unwrap_or(-1);
        if let Some(to) = self.viewer.to.take() {
            let deliver = async {
                if let Some(stream) = self.viewer.stream {
                    let end = Outgoing::StreamEnd {
                        client: to.client.clone(),
                        stream,
                        offset: self.viewer.sent,
                    };
                    let _ = to.out.send(end).await;
                }
                to.send(Response::PtyExited {
                    session_id: self.id.clone(),
                    exit_code: code,
                })
                .await;
            };
            let _ = tokio::time::timeout(FLUSH_AFTER_EXIT, deliver).await;
        }
        code
    }

    /// Done when the program has exited, its output has been read (or the
    /// drain time is up), and the viewer has it all (or the flush time is up).
    fn finished(&self) -> bool {
        self.exit_code.is_some()
            && (self.eof || self.expired.drain)
            && (self.delivered() || self.expired.flush)
    }

    /// Whether the viewer has everything: acknowledged, with flow control
    /// (what is only sent may still need resending); sent, without.
    fn delivered(&self) -> bool {
        match &self.viewer.to {
            None => true,
            Some(_) if self.viewer.flow_control => self.viewer.acked >= self.ring.end(),
            Some(_) => !self.has_unsent(),
        }
    }

    /// A live viewer that acknowledges gets every byte: while the ring holds
    /// all it has not acknowledged, reading pauses (the program waits, as
    /// behind any terminal). A viewer silent for [`STALL_LIMIT`] stops
    /// holding the program up: the ring then drops its oldest bytes.
    /// Returns when the pause ends by itself.
    fn paused(&self) -> Option<Instant> {
        let viewer = &self.viewer;
        let full = (self.ring.end() - viewer.acked) as usize + READ_BYTES > self.ring.capacity();
        let until = viewer.last_ack + STALL_LIMIT;
        (viewer.to.is_some() && viewer.flow_control && full && until > Instant::now())
            .then_some(until)
    }

    fn has_unsent(&self) -> bool {
        self.viewer.to.is_some() && self.ring.end() > self.viewer.sent.max(self.ring.start())
    }

    fn can_send(&self) -> bool {
        let window_open = !self.viewer.flow_control
            || self.viewer.sent - self.viewer.acked < self.config.window_bytes as u64;
        let holding = self.held_at == Some(self.ring.end());
        self.has_unsent() && window_open && !holding
    }

    fn read_output(
        &mut self,
        mut guard: tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>,
        buf: &mut [u8],
    ) {
        match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(std::io::Error::from))
        {
            Ok(Ok(0)) => self.eof = true,
            Ok(Ok(n)) => {
                let (screen, parsed) = (&mut self.screen, &mut self.parsed);
                let mut at = self.ring.start();
                self.ring.push_with(&buf[..n], |gone| {
                    // Bytes a snapshot already parsed are not parsed again.
                    let fresh = (*parsed).saturating_sub(at).min(gone.len() as u64) as usize;
                    screen.process(&gone[fresh..]);
                    at += gone.len() as u64;
                    *parsed = (*parsed).max(at);
                });
            }
            // EIO: every copy of the slave is closed.
            Ok(Err(err)) if err.raw_os_error() == Some(Errno::EIO as i32) => self.eof = true,
            Ok(Err(err)) => {
                tracing::warn!(session_id = %self.id, %err, "terminal read failed");
                self.eof = true;
            }
            Err(_would_block) => {}
        }
    }

    fn write_input(&mut self, mut guard: tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>) {
        let (front, _) = self.pending_input.as_slices();
        match guard
            .try_io(|fd| nix::unistd::write(fd.get_ref(), front).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => {
                self.pending_input.drain(..n);
            }
            Ok(Err(err)) => {
                tracing::debug!(session_id = %self.id, %err, "terminal write failed");
                self.pending_input.clear();
            }
            Err(_would_block) => {}
        }
    }

    fn send_output(&mut self, permit: mpsc::Permit<'_, Outgoing>) {
        let Some(client) = self.viewer.to.as_ref().map(|to| to.client.clone()) else {
            return;
        };
        if let Some(stream) = self.viewer.stream {
            // Raw bytes: no character boundaries to respect.
            let (from, bytes) = self.ring.read(self.viewer.sent, MAX_DATA);
            let skip = from > self.viewer.sent || std::mem::take(&mut self.skip_pending);
            self.skip_to(from);
            self.viewer.sent = from + bytes.len() as u64;
            permit.send(Outgoing::Stream {
                client,
                stream,
                offset: from,
                bytes: bytes.into(),
                skip,
            });
            return;
        }
        let (from, bytes) = self.ring.read(self.viewer.sent, CHUNK_BYTES);
        let force = self.expired.hold || self.exit_code.is_some();
        let (n, is_text) = utf8_cut(&bytes, force);
        if n == 0 {
            // Only the start of a character so far: wait briefly for the rest.
            self.held_at = Some(self.ring.end());
            self.deadlines
                .hold
                .get_or_insert(Instant::now() + HOLD_PARTIAL);
            return;
        }
        self.held_at = None;
        self.deadlines.hold = None;
        self.expired.hold = false;
        self.skip_to(from);
        let chunk = &bytes[..n];
        let (data, encoding) = if is_text {
            (String::from_utf8_lossy(chunk).into_owned(), Encoding::Utf8)
        } else {
            Encoding::encode_binary(chunk)
        };
        self.viewer.sent = from + n as u64;
        permit.send(Outgoing::new(
            client,
            Response::PtyOutput {
                session_id: self.id.clone(),
                data,
                encoding,
                offset: Some(from),
            },
        ));
    }

    /// Output up to `from` fell out of the ring before it was sent: what
    /// was in flight stays in flight; the skipped bytes will never be acked.
    fn skip_to(&mut self, from: u64) {
        if from > self.viewer.sent {
            let in_flight = self.viewer.sent - self.viewer.acked;
            self.viewer.acked = from - in_flight;
        }
    }

    fn control(&mut self, master: &AsyncFd<OwnedFd>, control: Control) {
        match control {
            Control::Input(bytes) => {
                self.input_taken += bytes.len() as u64;
                let room = MAX_PENDING_INPUT.saturating_sub(self.pending_input.len());
                if bytes.len() > room {
                    tracing::warn!(session_id = %self.id, "input dropped: the program is not reading");
                }
                self.pending_input.extend(&bytes[..bytes.len().min(room)]);
            }
            Control::Resize(cols, rows) => {
                if let Err(err) = sys::resize(master, cols, rows) {
                    tracing::warn!(session_id = %self.id, %err, "resize failed");
                }
                self.screen.screen_mut().set_size(rows, cols);
            }
            // Acks and rewinds of a client that is no longer the viewer
            // (the session was resumed elsewhere) are ignored.
            Control::Ack(client, offset) if self.is_viewer(&client) => {
                let offset = offset.min(self.viewer.sent);
                if offset > self.viewer.acked {
                    self.viewer.acked = offset;
                    self.viewer.last_ack = Instant::now();
                }
            }
            Control::Close => self.hang_up(),
            Control::ClientLeft(client) => {
                if self.is_viewer(&client) {
                    self.detach();
                }
            }
            Control::Rewind(client) if self.is_viewer(&client) => {
                self.viewer.sent = self.viewer.acked
            }
            Control::Ack(..) | Control::Rewind(_) => {}
            Control::Attach {
                to,
                stream,
                offset,
                request_id,
            } => self.attach(to, stream, offset, request_id),
        }
    }

    /// Nobody watches any more; the session lives on until the detach
    /// timeout.
    fn detach(&mut self) {
        self.viewer.to = None;
        self.deadlines.detach = Some(Instant::now() + self.config.detach_timeout);
    }

    fn is_viewer(&self, client: &ClientId) -> bool {
        self.viewer
            .to
            .as_ref()
            .is_some_and(|to| &to.client == client)
    }

    /// Hands the output to another client: from `offset` when the ring
    /// still has it, else from now on after a snapshot of the screen.
    fn attach(
        &mut self,
        to: ReplyTo,
        stream: Option<u32>,
        offset: u64,
        request_id: Option<String>,
    ) {
        let (start, snapshot) = if (self.ring.start()..=self.ring.end()).contains(&offset) {
            (offset, None)
        } else {
            // Bring the emulator up to the newest byte.
            let (a, b) = self.ring.contents();
            let unparsed = self.parsed.saturating_sub(self.ring.start()) as usize;
            let held = [a, b].concat();
            self.screen.process(&held[unparsed.min(held.len())..]);
            self.parsed = self.ring.end();
            let mut screen = b"\x1b[H\x1b[2J".to_vec();
            screen.extend(self.screen.screen().state_formatted());
            (
                self.ring.end(),
                Some(String::from_utf8_lossy(&screen).into_owned()),
            )
        };
        tracing::info!(session_id = %self.id, client_id = %to.client, offset, start, "session resumed");
        to.try_send(Response::PtyResumed {
            session_id: self.id.clone(),
            offset: start,
            snapshot,
            input_offset: Some(self.input_taken),
            request_id,
            stream,
        });
        self.skip_pending = start > offset;
        self.viewer = Viewer {
            to: Some(to),
            stream,
            sent: start,
            acked: start,
            flow_control: stream.is_some() || self.viewer.flow_control,
            last_ack: Instant::now(),
        };
        self.held_at = None;
        self.deadlines.detach = None;
    }

    /// Hangs up the terminal: SIGHUP to the whole session now, SIGKILL to
    /// what is left after a grace period.
    fn hang_up(&mut self) {
        if self.deadlines.kill.is_some() || self.exit_code.is_some() {
            return;
        }
        signal_session(self.pid, Signal::SIGHUP);
        self.deadlines.kill = Some(Instant::now() + CLOSE_GRACE);
    }

    fn exited(&mut self, code: i32) {
        self.exit_code = Some(code);
        // Jobs the shell left behind go with their terminal.
        signal_session(self.pid, Signal::SIGKILL);
        let now = Instant::now();
        self.deadlines.drain = Some(now + DRAIN_AFTER_EXIT);
        self.deadlines.flush = Some(now + FLUSH_AFTER_EXIT);
        self.deadlines.kill = None;
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let fired = |deadline: &mut Option<Instant>| {
            let fired = deadline.is_some_and(|d| d <= now);
            if fired {
                *deadline = None;
            }
            fired
        };
        if fired(&mut self.deadlines.kill) {
            signal_session(self.pid, Signal::SIGKILL);
        }
        if fired(&mut self.deadlines.detach) {
            tracing::info!(session_id = %self.id, "detached session timed out");
            self.hang_up();
        }
        if fired(&mut self.deadlines.hold) {
            self.held_at = None;
            self.expired.hold = true;
        }
        self.expired.drain |= fired(&mut self.deadlines.drain);
        self.expired.flush |= fired(&mut self.deadlines.flush);
    }
}

/// Waits for room in the viewer's queue (forever when there is no viewer;
/// the caller only asks when there is one).
async fn reserve(
    out: Option<&mpsc::Sender<Outgoing>>,
) -> Result<mpsc::Permit<'_, Outgoing>, mpsc::error::SendError<()>> {
    match out {
        Some(out) => out.reserve().await,
        None => std::future::pending().await,
    }
}

/// Signals the session's processes from the blocking pool (it scans /proc),
/// and its process group at once.
fn signal_session(pid: u32, signal: Signal) {
    crate::services::process::signal_group(pid, signal);
    tokio::task::spawn_blocking(move || sys::signal_session(pid, signal));
}
