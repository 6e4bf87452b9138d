//! What every child process gets: a scrubbed environment, its own process
//! group, resource limits, and a way to be killed with all its descendants.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use cocoon_signaling::protocol::service::ServiceErrorCode;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::ServiceError;

/// Variables of the worker's own environment that children never see: they
/// configure or authenticate the worker itself.
fn is_worker_secret(name: &str) -> bool {
    name.starts_with("COCOON_")
        || name.starts_with("SIGNALING_")
        || name.starts_with("WEBRTC_")
        || name == "HMAC_SALT"
}

/// Variables that make a program load or run code of the caller's choosing.
fn is_hijacking(name: &str) -> bool {
    name.starts_with("LD_")
        || name.starts_with("DYLD_")
        || matches!(
            name,
            "BASH_ENV" | "ENV" | "PROMPT_COMMAND" | "SHELLOPTS" | "BASHOPTS" | "PS4" | "IFS"
        )
}

/// Resource limits applied to every child (rlimits; `None` leaves it as is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Address space, bytes (RLIMIT_AS).
    pub memory_bytes: Option<u64>,
    /// CPU time, seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL.
    pub cpu_secs: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes of the user (RLIMIT_NPROC; not enforced for root).
    pub processes: Option<u64>,
    /// Largest file it may write, bytes (RLIMIT_FSIZE): SIGXFSZ.
    pub file_bytes: Option<u64>,
}

impl Limits {
    /// Safe defaults for a shared machine: 4 GiB of address space, 4096
    /// files, 1 GiB files; CPU and process count left to the operator.
    pub fn defaults() -> Self {
        Self {
            memory_bytes: Some(4 << 30),
            cpu_secs: None,
            open_files: Some(4096),
            processes: None,
            file_bytes: Some(1 << 30),
        }
    }

    /// Applies the limits to the calling process. Runs between fork and exec,
    /// so it only makes system calls.
    fn apply(&self) -> std::io::Result<()> {
        let pairs = [
            (Resource::RLIMIT_AS, self.memory_bytes),
            (Resource::RLIMIT_CPU, self.cpu_secs),
            (Resource::RLIMIT_NOFILE, self.open_files),
            (Resource::RLIMIT_NPROC, self.processes),
            (Resource::RLIMIT_FSIZE, self.file_bytes),
        ];
        for (resource, limit) in pairs {
            if let Some(limit) = limit {
                // CPU: SIGXCPU at the soft limit (reported as limit_exceeded),
                // SIGKILL a second later for programs that ignore it.
                let wanted_hard = if resource == Resource::RLIMIT_CPU {
                    limit + 1
                } else {
                    limit
                };
                // Never above the current hard limit: only root may raise it.
                let (_, current_hard) = getrlimit(resource)?;
                let hard = wanted_hard.min(current_hard);
                setrlimit(resource, limit.min(hard), hard)?;
            }
        }
        Ok(())
    }
}

/// Bubblewrap isolation of every child (`bwrap`, Debian's `bubblewrap`): a
/// read-only view of the machine with its own `/tmp`, `/dev` and `/proc`,
/// the paths in `hidden` (the worker's data dir) replaced by empty ones,
/// writable only where the operator says, in PID, IPC and UTS namespaces of
/// its own, with no capabilities, and optionally without the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// Paths the programs may write to (bound read-write).
    pub writable: Vec<PathBuf>,
    /// Paths the programs must not see (an empty tmpfs over each).
    pub hidden: Vec<PathBuf>,
    /// Whether the programs share the machine's network.
    pub network: bool,
}

impl Sandbox {
    /// The `bwrap` arguments up to the program: `also_writable` is one more
    /// read-write path (an `execute`'s output directory), `cwd` where the
    /// program starts, `tty` whether it keeps the controlling terminal.
    fn args(&self, also_writable: Option<&Path>, cwd: Option<&Path>, tty: bool) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/tmp",
        ]
        .map(OsString::from)
        .into();
        if !self.network {
            args.push("--unshare-net".into());
        }
        // Later mounts go on top of earlier ones: hide first, then open up.
        for path in &self.hidden {
            args.extend(["--tmpfs".into(), path.into()]);
        }
        for path in self
            .writable
            .iter()
            .map(PathBuf::as_path)
            .chain(also_writable)
        {
            args.extend(["--bind".into(), path.into(), path.into()]);
        }
        if let Some(cwd) = cwd {
            args.extend(["--chdir".into(), cwd.into()]);
        }
        // A program without a terminal gets a session of its own, so it
        // cannot push input into the worker's (TIOCSTI).
        if !tty {
            args.push("--new-session".into());
        }
        args.push("--".into());
        args
    }

    /// Checks that bubblewrap is installed and can build a sandbox here
    /// (user namespaces allowed); the error says what to do.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut probe = std::process::Command::new("bwrap");
        probe
            .args(self.args(None, None, false))
            .arg("true")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let output = probe.output().map_err(|err| {
            anyhow::anyhow!("COCOON_SANDBOX=bwrap needs bubblewrap (apt install bubblewrap): {err}")
        })?;
        anyhow::ensure!(
            output.status.success(),
            "bubblewrap cannot build a sandbox on this machine ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

/// The command that runs `program` with `args`, in `sandbox` when there is
/// one (see [`Sandbox::args`] for `also_writable`, `cwd` and `tty`).
pub fn command(
    program: &str,
    args: &[String],
    sandbox: Option<&Sandbox>,
    also_writable: Option<&Path>,
    cwd: Option<&Path>,
    tty: bool,
) -> tokio::process::Command {
    match sandbox {
        None => {
            let mut command = tokio::process::Command::new(program);
            command.args(args);
            if let Some(cwd) = cwd {
                command.current_dir(cwd);
            }
            command
        }
        Some(sandbox) => {
            let mut command = tokio::process::Command::new("bwrap");
            command
                .args(sandbox.args(also_writable, cwd, tty))
                .arg(program)
                .args(args);
            command
        }
    }
}

/// Operator policy for children's environments.
#[derive(Debug, Clone, Default)]
pub struct EnvPolicy {
    /// Names of hijacking variables the operator allows anyway.
    pub allow: Vec<String>,
}

impl EnvPolicy {
    /// The environment of a child: the worker's own minus its secrets, plus
    /// the request's variables (checked), plus `fixed`.
    pub fn build(
        &self,
        requested: Option<&BTreeMap<String, String>>,
        fixed: &[(&str, &str)],
    ) -> Result<Vec<(String, String)>, ServiceError> {
        let mut env: BTreeMap<String, String> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .filter(|(name, _)| !is_worker_secret(name) && !is_hijacking(name))
            .collect();
        for (name, value) in requested.into_iter().flatten() {
            let valid = !name.is_empty() && !name.contains(['=', '\0']) && !value.contains('\0');
            if !valid {
                return Err(ServiceError::new(
                    ServiceErrorCode::InvalidRequest,
                    format!("invalid environment variable {name:?}"),
                ));
            }
            if (is_hijacking(name) || is_worker_secret(name))
                && !self.allow.iter().any(|a| a == name)
            {
                return Err(ServiceError::new(
                    ServiceErrorCode::EnvRefused,
                    format!("environment variable {name} is not allowed on this worker"),
                ));
            }
            env.insert(name.clone(), value.clone());
        }
        for (name, value) in fixed {
            env.insert((*name).to_owned(), (*value).to_owned());
        }
        Ok(env.into_iter().collect())
    }
}

/// Puts the child in its own session (so its process group can be killed
/// as a whole) and applies the limits. `controlling_tty` makes fd 0 the
/// session's terminal.
pub fn prepare(command: &mut tokio::process::Command, limits: Limits, controlling_tty: bool) {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe system calls (setsid, ioctl, setrlimit).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            if controlling_tty && libc_ioctl_set_ctty() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limits.apply()
        });
    }
}

fn libc_ioctl_set_ctty() -> i32 {
    nix::ioctl_write_int_bad!(tiocsctty, nix::libc::TIOCSCTTY);
    // SAFETY: fd 0 is the PTY slave, set up by the caller.
    match unsafe { tiocsctty(0, 0) } {
        Ok(_) => 0,
        Err(_) => -1,
    }
}

/// Sends `signal` to the whole process group led by `pid`. A group that is
/// already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// An exit status as one number: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_hijackers_are_kept_out() {
        let policy = EnvPolicy::default();
        let mut requested = BTreeMap::new();
        requested.insert("LD_PRELOAD".to_string(), "/tmp/evil.so".to_string());
        let err = policy.build(Some(&requested), &[]).unwrap_err();
        assert_eq!(err.code, ServiceErrorCode::EnvRefused);

        let allowed = EnvPolicy {
            allow: vec!["LD_PRELOAD".into()],
        };
        let env = allowed.build(Some(&requested), &[("X", "1")]).unwrap();
        assert!(env.contains(&("LD_PRELOAD".into(), "/tmp/evil.so".into())));
        assert!(env.contains(&("X".into(), "1".into())));
        assert!(env.iter().all(|(name, _)| !name.starts_with("COCOON_")));

        let mut bad = BTreeMap::new();
        bad.insert("A=B".to_string(), "x".to_string());
        assert_eq!(
            policy.build(Some(&bad), &[]).unwrap_err().code,
            ServiceErrorCode::InvalidRequest
        );
    }
}
