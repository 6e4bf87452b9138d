//! The operating-system side of a PTY session: open the pair, start the
//! program on it, resize it, kill its whole session.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::pty::{Winsize, openpty};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::process::Child;

use crate::services::process::{Limits, Sandbox, command, prepare};

nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, Winsize);

fn winsize(cols: u16, rows: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A started program and the master side of its terminal.
pub struct Spawned {
    /// The master, non-blocking, registered with the runtime.
    pub master: AsyncFd<OwnedFd>,
    /// The program (session leader).
    pub child: Child,
    /// Its pid, which is also its session and process-group id.
    pub pid: u32,
}

/// What to start.
pub struct Program<'a> {
    /// The executable.
    pub program: &'a str,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<&'a Path>,
    /// Resource limits.
    pub limits: Limits,
    /// Bubblewrap isolation, if any.
    pub sandbox: Option<&'a Sandbox>,
}

/// Opens a PTY of the given size and starts the program on it as the leader
/// of a new session with the PTY as its controlling terminal.
pub fn spawn(program: Program<'_>, cols: u16, rows: u16) -> std::io::Result<Spawned> {
    let pair = openpty(Some(&winsize(cols, rows)), None)?;
    for fd in [&pair.master, &pair.slave] {
        fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    let mut command = command(
        program.program,
        &program.args,
        program.sandbox,
        None,
        program.cwd,
        true,
    );
    command
        .env_clear()
        .envs(program.env)
        .stdin(Stdio::from(pair.slave.try_clone()?))
        .stdout(Stdio::from(pair.slave.try_clone()?))
        .stderr(Stdio::from(pair.slave.try_clone()?))
        .kill_on_drop(true);
    prepare(&mut command, program.limits, true);
    let child = command.spawn()?;
    // The parent's copies of the slave must go, or reads never see EOF.
    drop(pair.slave);
    drop(command);
    let pid = child.id().expect("a just-spawned child has a pid");
    let flags = OFlag::from_bits_truncate(fcntl(pair.master.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(
        pair.master.as_fd(),
        FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
    )?;
    // SAFETY: `OwnedFd` always returns the fd it owns, which stays open
    // until the `AsyncFd` (its only owner) is dropped.
    let master = unsafe { AsyncFd::register(pair.master) }.map_err(std::io::Error::from)?;
    Ok(Spawned { master, child, pid })
}

/// Tells the terminal (and so the program, by SIGWINCH) its new size.
pub fn resize(master: &AsyncFd<OwnedFd>, cols: u16, rows: u16) -> std::io::Result<()> {
    // SAFETY: the fd is a PTY master we own; the pointer is to a local.
    unsafe { set_winsize(master.get_ref().as_raw_fd(), &winsize(cols, rows)) }?;
    Ok(())
}

/// Sends `signal` to every process of the session led by `sid`: the shell,
/// its jobs in their own process groups, and anything they started. Scans
/// /proc, so call it off the async runtime.
pub fn signal_session(sid: u32, signal: Signal) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if session_of(pid) == Some(sid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// The session id of a process, from /proc/PID/stat.
fn session_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: skip past it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields after the name: state ppid pgrp session ...
    after_name.split_whitespace().nth(3)?.parse().ok()
}
