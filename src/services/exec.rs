//! `execute`: run `sh -c COMMAND` to completion with a timeout, output caps,
//! resource limits and a fresh output directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use cocoon_signaling::protocol::MAX_MESSAGE_BYTES;
use cocoon_signaling::protocol::service::{
    Encoding, Execute, ExecuteData, ExecuteOutput, ExecuteResult, OutputFile, OutputStream,
    Response, ServiceErrorCode,
};
use nix::sys::signal::Signal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::process::{EnvPolicy, Limits, Sandbox, exit_code, prepare, signal_group};
use super::tasks::{TaskKind, TaskStatus, TaskStore};
use super::{ReplyTo, ServiceError};

/// Operator policy for `execute`.
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    /// Timeout when the request names none.
    pub default_timeout: Duration,
    /// Longest timeout a request may ask for.
    pub max_timeout: Duration,
    /// Bytes of stdout kept; the rest is read and dropped.
    pub max_stdout: usize,
    /// Bytes of stderr kept.
    pub max_stderr: usize,
    /// Most output files returned.
    pub max_files: usize,
    /// Largest output file returned, bytes.
    pub max_file_bytes: u64,
    /// Most bytes of output files returned in all.
    pub max_files_total: u64,
    /// Most commands running at once.
    pub max_concurrent: usize,
    /// Resource limits of the command.
    pub limits: Limits,
    /// Bubblewrap isolation, when the operator enables it.
    pub sandbox: Option<Sandbox>,
}

impl Default for ExecPolicy {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(3600),
            max_stdout: 256 * 1024,
            max_stderr: 64 * 1024,
            max_files: 32,
            max_file_bytes: 256 * 1024,
            max_files_total: 256 * 1024,
            max_concurrent: 32,
            limits: Limits::defaults(),
            sandbox: None,
        }
    }
}

/// After the command exits, how long its output pipes may stay open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Room left in a relay message for everything but the result itself.
const REPLY_BUDGET: usize = MAX_MESSAGE_BYTES - 16 * 1024;

/// Runs `execute` requests.
pub struct Executor {
    policy: ExecPolicy,
    env: EnvPolicy,
    output_root: PathBuf,
    tasks: TaskStore,
    slots: Arc<Semaphore>,
}

impl Executor {
    /// An executor whose output directories live under `output_root`.
    pub fn new(policy: ExecPolicy, env: EnvPolicy, output_root: PathBuf, tasks: TaskStore) -> Self {
        let slots = Arc::new(Semaphore::new(policy.max_concurrent));
        Self {
            policy,
            env,
            output_root,
            tasks,
            slots,
        }
    }

    /// Runs one request to completion, recording it as a task. A streamed
    /// request's output goes to `reply` as it comes.
    pub async fn execute(&self, request: Execute, reply: &ReplyTo) -> Response {
        let request_id = request.request_id.clone();
        let sink = request.stream.then_some(reply);
        match self.run(request, true, &[], sink).await {
            Ok(result) => Response::ExecuteResult(result),
            Err(err) => err.into_response(request_id, None),
        }
    }

    /// Runs a command of the worker's own (a query handler) with extra
    /// variables of the worker's choosing; not recorded as a task.
    pub async fn run_untracked(
        &self,
        request: Execute,
        fixed_env: &[(&str, &str)],
    ) -> Result<ExecuteResult, ServiceError> {
        self.run(request, false, fixed_env, None).await
    }

    async fn run(
        &self,
        request: Execute,
        track: bool,
        fixed_env: &[(&str, &str)],
        sink: Option<&ReplyTo>,
    ) -> Result<ExecuteResult, ServiceError> {
        let timeout = request
            .timeout_secs
            .map_or(self.policy.default_timeout, Duration::from_secs)
            .min(self.policy.max_timeout);
        let _slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ServiceError::new(
                ServiceErrorCode::Busy,
                "too many commands running; try again",
            )
        })?;
        let run_id = uuid::Uuid::new_v4().to_string();
        let out_dir = self.output_root.join(&run_id);
        let out_dir_text = out_dir.to_string_lossy().into_owned();
        let mut fixed = vec![("COCOON_OUTPUT_DIR", out_dir_text.as_str())];
        fixed.extend_from_slice(fixed_env);
        let env = self.env.build(request.env.as_ref(), &fixed)?;
        create_private_dir(&out_dir).await.map_err(|err| {
            ServiceError::new(
                ServiceErrorCode::Internal,
                format!("cannot create the output directory: {err}"),
            )
        })?;
        let task = match track {
            true => Some(self.tasks.start(TaskKind::Execute, &request.command).await),
            false => None,
        };
        let mut result = self
            .spawn_and_wait(&request, env, &out_dir, timeout, sink)
            .await;
        let (files, files_truncated) = collect_files(&out_dir, &self.policy).await;
        result.files = files;
        result.data.truncated |= files_truncated;
        remove_dir(&out_dir).await;
        fit_to_budget(&mut result, REPLY_BUDGET);
        result.request_id = request.request_id;
        let status = if result.success {
            TaskStatus::Completed
        } else {
            TaskStatus::Failed
        };
        if let Some(task) = task {
            self.tasks.finish(task, status, result.data.exit_code).await;
        }
        Ok(result)
    }

    async fn spawn_and_wait(
        &self,
        request: &Execute,
        env: Vec<(String, String)>,
        out_dir: &Path,
        timeout: Duration,
        sink: Option<&ReplyTo>,
    ) -> ExecuteResult {
        let mut command = super::process::command(
            "sh",
            &["-c".into(), request.command.clone()],
            self.policy.sandbox.as_ref(),
            Some(out_dir),
            request.cwd.as_deref().map(Path::new),
            false,
        );
        command
            .env_clear()
            .envs(env)
            .stdin(if request.input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        prepare(&mut command, self.policy.limits.clone(), false);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(err) => return failed_to_spawn(&err),
        };
        let pid = child.id().expect("a just-spawned child has a pid");
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), request.input.clone()) {
            // A command that never reads its input must not block us.
            tokio::spawn(async move {
                let _ = stdin.write_all(input.as_bytes()).await;
            });
        }
        let exited = CancellationToken::new();
        let read = |pipe: Box<dyn AsyncRead + Unpin + Send>, which, cap| match sink {
            Some(reply) => tokio::spawn(forward(
                pipe,
                which,
                request.request_id.clone(),
                reply.clone(),
                exited.clone(),
            )),
            None => tokio::spawn(read_capped(pipe, cap)),
        };
        let stdout = read(
            Box::new(child.stdout.take().expect("piped")),
            OutputStream::Stdout,
            self.policy.max_stdout,
        );
        let stderr = read(
            Box::new(child.stderr.take().expect("piped")),
            OutputStream::Stderr,
            self.policy.max_stderr,
        );

        let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => (status, false),
            Err(_) => {
                signal_group(pid, Signal::SIGKILL);
                (child.wait().await, true)
            }
        };
        // Whatever the command left running in its group goes with it; that
        // also closes pipes held by stragglers.
        signal_group(pid, Signal::SIGKILL);
        exited.cancel();
        let (stdout, out_truncated) = join_output(stdout, sink.is_some()).await;
        let (stderr, err_truncated) = join_output(stderr, sink.is_some()).await;
        let exit_code = status.ok().map(exit_code);
        let error = if timed_out {
            Some("timeout")
        } else if matches!(exit_code, Some(code) if code == 128 + Signal::SIGXCPU as i32 || code == 128 + Signal::SIGXFSZ as i32)
        {
            Some("limit_exceeded")
        } else {
            None
        };
        let (stdout, stdout_encoding) = Encoding::encode(&stdout);
        let (stderr, stderr_encoding) = Encoding::encode(&stderr);
        ExecuteResult {
            request_id: None,
            success: error.is_none() && exit_code == Some(0),
            data: ExecuteData {
                stdout,
                stderr,
                exit_code,
                stdout_encoding,
                stderr_encoding,
                truncated: out_truncated || err_truncated,
                error: error.map(str::to_owned),
            },
            files: Vec::new(),
        }
    }
}

fn failed_to_spawn(err: &std::io::Error) -> ExecuteResult {
    ExecuteResult {
        request_id: None,
        success: false,
        data: ExecuteData {
            stdout: String::new(),
            stderr: format!("cannot start the command: {err}"),
            exit_code: None,
            stdout_encoding: Encoding::Utf8,
            stderr_encoding: Encoding::Utf8,
            truncated: false,
            error: Some("spawn_failed".into()),
        },
        files: Vec::new(),
    }
}

/// Reads everything, keeping the first `cap` bytes. Reading on past the cap
/// keeps the command from blocking on a full pipe.
async fn read_capped(mut reader: impl AsyncRead + Unpin, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut truncated = false;
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

/// Sends everything as `execute_output` messages, waiting for room in the
/// client's queue (so a slow client slows the command, through its pipe).
/// Once the command has exited, a pipe that stays silent for the drain
/// grace is given up: a process outside the group holds it.
async fn forward(
    mut reader: Box<dyn AsyncRead + Unpin + Send>,
    stream: OutputStream,
    request_id: Option<String>,
    reply: ReplyTo,
    exited: CancellationToken,
) -> (Vec<u8>, bool) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let read = if exited.is_cancelled() {
            match tokio::time::timeout(DRAIN_GRACE, reader.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => return (Vec::new(), true),
            }
        } else {
            // Reads are cancel-safe: nothing is lost when the exit wins.
            tokio::select! {
                read = reader.read(&mut buf) => read,
                _ = exited.cancelled() => continue,
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return (Vec::new(), false),
            Ok(n) => n,
        };
        let (data, encoding) = Encoding::encode(&buf[..n]);
        let output = ExecuteOutput {
            request_id: request_id.clone(),
            stream,
            data,
            encoding,
        };
        reply.send(Response::ExecuteOutput(output)).await;
    }
}

/// A reader task's output. Capped readers are given up after the drain
/// grace (a process outside the group still holds the pipe); forwarders
/// bound their own wait.
async fn join_output(
    reader: tokio::task::JoinHandle<(Vec<u8>, bool)>,
    streaming: bool,
) -> (Vec<u8>, bool) {
    let joined = if streaming {
        Ok(reader.await)
    } else {
        tokio::time::timeout(DRAIN_GRACE, reader).await
    };
    match joined {
        Ok(Ok(output)) => output,
        _ => (Vec::new(), true),
    }
}

async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .await
}

async fn remove_dir(dir: &Path) {
    let dir = dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}

/// The regular files under `dir` (symlinks are never followed), within the
/// policy's caps; `true` when some were left out.
async fn collect_files(dir: &Path, policy: &ExecPolicy) -> (Vec<OutputFile>, bool) {
    let dir = dir.to_owned();
    let (max_files, max_file, max_total) = (
        policy.max_files,
        policy.max_file_bytes,
        policy.max_files_total,
    );
    tokio::task::spawn_blocking(move || {
        // The command may have replaced its directory with a link to
        // somewhere else: only a real directory is walked.
        if !std::fs::symlink_metadata(&dir).is_ok_and(|meta| meta.is_dir()) {
            return (Vec::new(), false);
        }
        let mut found = Vec::new();
        walk(&dir, &dir, &mut found, 0);
        found.sort();
        let mut files = Vec::new();
        let mut total = 0u64;
        let mut truncated = false;
        for (relative, size) in found {
            if files.len() == max_files || size > max_file || total + size > max_total {
                truncated = true;
                continue;
            }
            let Ok(bytes) = read_regular(&dir.join(&relative), max_file) else {
                truncated = true;
                continue;
            };
            if bytes.len() as u64 > max_file || total + bytes.len() as u64 > max_total {
                truncated = true;
                continue;
            }
            total += bytes.len() as u64;
            let (content, encoding) = Encoding::encode(&bytes);
            files.push(OutputFile {
                path: relative,
                size: bytes.len() as u64,
                content,
                encoding,
            });
        }
        (files, truncated)
    })
    .await
    .unwrap_or_default()
}

/// Reads a regular file, at most `cap + 1` bytes of it. A link or a FIFO
/// put in its place since the walk (by something the command left running)
/// is refused, not followed or waited on.
fn read_regular(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Collects `(relative path, size)` of regular files, at most 8 levels deep.
fn walk(root: &Path, dir: &Path, found: &mut Vec<(String, u64)>, depth: usize) {
    const MAX_DEPTH: usize = 8;
    const MAX_ENTRIES: usize = 10_000;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if found.len() >= MAX_ENTRIES {
            return;
        }
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let path = entry.path();
        if meta.is_dir() && depth < MAX_DEPTH {
            walk(root, &path, found, depth + 1);
        } else if meta.is_file()
            && let Ok(relative) = path.strip_prefix(root)
        {
            found.push((relative.to_string_lossy().into_owned(), meta.len()));
        }
    }
}

/// Shrinks a result until its JSON fits in `budget` bytes: files go first,
/// then output is cut, each step marking the result truncated.
fn fit_to_budget(result: &mut ExecuteResult, budget: usize) {
    let size = |r: &ExecuteResult| serde_json::to_vec(r).map_or(usize::MAX, |v| v.len());
    while size(result) > budget && !result.files.is_empty() {
        result.files.pop();
        result.data.truncated = true;
    }
    while size(result) > budget {
        result.data.truncated = true;
        let data = &mut result.data;
        let (longest, encoding) = if data.stdout.len() >= data.stderr.len() {
            (&mut data.stdout, data.stdout_encoding)
        } else {
            (&mut data.stderr, data.stderr_encoding)
        };
        if longest.is_empty() {
            return;
        }
        let mut cut = longest.len() / 2;
        if encoding == Encoding::Base64 {
            cut -= cut % 4;
        }
        while !longest.is_char_boundary(cut) {
            cut -= 1;
        }
        longest.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_at_most_one_byte_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_regular(&file, 100).unwrap(), b"0123456789");
        assert_eq!(read_regular(&file, 4).unwrap(), b"01234");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read_regular(&link, 100).is_err(), "a link is not followed");
        // A FIFO with no writer would block an ordinary open forever.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_regular(&fifo, 100).is_err(), "a FIFO is not read");
    }

    #[test]
    fn oversized_results_are_cut_to_fit() {
        let mut result = failed_to_spawn(&std::io::Error::other("x"));
        result.data.stdout = "\u{1}".repeat(400_000);
        result.files.push(OutputFile {
            path: "a".into(),
            size: 300_000,
            content: "b".repeat(300_000),
            encoding: Encoding::Utf8,
        });
        fit_to_budget(&mut result, 100_000);
        assert!(serde_json::to_vec(&result).unwrap().len() <= 100_000);
        assert!(result.data.truncated);
        assert!(result.files.is_empty());
    }
}
