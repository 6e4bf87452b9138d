//! PTY sessions: start programs on pseudo-terminals and route keystrokes,
//! resizes and closes to them. Each session is its own task
//! (`session::Session`); the manager only keeps their control queues.

mod session;
#[doc(hidden)]
pub mod sys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_signaling::protocol::ClientId;
use cocoon_signaling::protocol::service::{AttachPty, Response, ServiceErrorCode, SessionId};
use tokio::sync::{Semaphore, mpsc};

use super::process::{EnvPolicy, Limits, Sandbox};
use super::tasks::{TaskKind, TaskStatus, TaskStore};
use super::{ReplyTo, ServiceError};
pub use session::Control;
use session::Session;

/// Largest terminal accepted, in columns and rows.
pub const MAX_TERMINAL_SIDE: u16 = 1000;
/// Control messages queued per session.
const CONTROL_QUEUE: usize = 256;

/// Operator settings for PTY sessions.
#[derive(Debug, Clone)]
pub struct PtyConfig {
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Output kept per session for a viewer that falls behind.
    pub ring_bytes: usize,
    /// With flow control, most unacknowledged output in flight.
    pub window_bytes: usize,
    /// How long a session lives with nobody attached.
    pub detach_timeout: Duration,
    /// Resource limits of the session's programs.
    pub limits: Limits,
    /// Bubblewrap isolation, when the operator enables it.
    pub sandbox: Option<Sandbox>,
}

impl Default for PtyConfig {
    fn default() -> Self {
        Self {
            max_sessions: 256,
            ring_bytes: 1024 * 1024,
            window_bytes: 256 * 1024,
            detach_timeout: Duration::from_secs(600),
            limits: Limits::defaults(),
            sandbox: None,
        }
    }
}

/// All PTY sessions of a worker.
pub struct PtyManager {
    config: Arc<PtyConfig>,
    env: EnvPolicy,
    tasks: TaskStore,
    shell: String,
    sessions: Arc<Mutex<HashMap<SessionId, mpsc::Sender<Control>>>>,
    slots: Arc<Semaphore>,
}

impl PtyManager {
    /// A manager of no sessions yet.
    pub fn new(config: PtyConfig, env: EnvPolicy, tasks: TaskStore) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_sessions));
        Self {
            config: Arc::new(config),
            env,
            tasks,
            shell: login_shell(),
            sessions: Arc::default(),
            slots,
        }
    }

    /// Starts a session whose output goes where `reply` points.
    pub async fn attach(
        &self,
        reply: ReplyTo,
        request: AttachPty,
    ) -> Result<Response, ServiceError> {
        for (side, value) in [("cols", request.cols), ("rows", request.rows)] {
            if value == 0 || value > MAX_TERMINAL_SIDE {
                return Err(ServiceError::new(
                    ServiceErrorCode::InvalidRequest,
                    format!("{side} must be between 1 and {MAX_TERMINAL_SIDE}, not {value}"),
                ));
            }
        }
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ServiceError::new(
                ServiceErrorCode::Busy,
                "too many terminal sessions on this worker",
            )
        })?;
        let env = self.env.build(
            request.env.as_ref(),
            &[("TERM", "xterm-256color"), ("COLORTERM", "truecolor")],
        )?;
        let (program, args, label) = match &request.command {
            Some(command) => (
                "/bin/sh".to_owned(),
                vec!["-c".to_owned(), command.clone()],
                command.clone(),
            ),
            None => (
                self.shell.clone(),
                vec!["-l".to_owned()],
                self.shell.clone(),
            ),
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let cwd = request.cwd.as_deref().map(Path::new).or(home.as_deref());
        let spawned = sys::spawn(
            sys::Program {
                program: &program,
                args,
                env,
                cwd,
                limits: self.config.limits.clone(),
                sandbox: self.config.sandbox.as_ref(),
            },
            request.cols,
            request.rows,
        )
        .map_err(|err| {
            ServiceError::new(
                ServiceErrorCode::SpawnFailed,
                format!("cannot start {label}: {err}"),
            )
        })?;

        let id = SessionId::new(uuid::Uuid::new_v4().to_string());
        let (controls, queue) = mpsc::channel(CONTROL_QUEUE);
        self.sessions.lock().unwrap().insert(id.clone(), controls);
        let task = self.tasks.start(TaskKind::Pty, &label).await;
        let (session, master) = Session::new(
            id.clone(),
            self.config.clone(),
            spawned,
            (request.cols, request.rows),
            reply,
            request.stream,
            request.flow_control || request.stream.is_some(),
        );
        let sessions = self.sessions.clone();
        let tasks = self.tasks.clone();
        let session_id = id.clone();
        tokio::spawn(async move {
            let code = session.run(master, queue).await;
            sessions.lock().unwrap().remove(&session_id);
            let status = if code == 0 {
                TaskStatus::Completed
            } else {
                TaskStatus::Failed
            };
            // The slot first: a client that attaches right after the exit
            // must not be told the worker is busy.
            drop(slot);
            tasks.finish(task, status, Some(code)).await;
        });
        Ok(Response::PtyCreated {
            session_id: id,
            request_id: request.request_id,
            stream: request.stream,
        })
    }

    /// Queues a control message for a session.
    pub fn control(&self, session_id: &SessionId, control: Control) -> Result<(), ServiceError> {
        let sender = self.sessions.lock().unwrap().get(session_id).cloned();
        let sender = sender.ok_or_else(|| {
            ServiceError::new(
                ServiceErrorCode::UnknownSession,
                format!("no session {session_id}"),
            )
        })?;
        sender.try_send(control).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => ServiceError::new(
                ServiceErrorCode::Busy,
                "the session is not keeping up with input",
            ),
            mpsc::error::TrySendError::Closed(_) => ServiceError::new(
                ServiceErrorCode::UnknownSession,
                format!("session {session_id} has ended"),
            ),
        })
    }

    /// Tells every session that a client is gone.
    pub fn client_left(&self, client: &ClientId) {
        let senders: Vec<_> = self.sessions.lock().unwrap().values().cloned().collect();
        for sender in senders {
            let _ = sender.try_send(Control::ClientLeft(client.clone()));
        }
    }

    /// Sessions running now.
    pub fn count(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }
}

/// The user's login shell from the password database, else bash, else sh.
fn login_shell() -> String {
    let from_passwd = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|user| user.shell)
        .filter(|shell| {
            shell.is_file() && !shell.ends_with("nologin") && !shell.ends_with("false")
        });
    from_passwd
        .or_else(|| {
            ["/bin/bash", "/usr/bin/bash"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
        .to_string_lossy()
        .into_owned()
}
