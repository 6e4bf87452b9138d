//! The peers cocoon is compared with, as real servers on loopback: OpenSSH
//! (`sshd`, reached by the `ssh` client), terminado (Python, tornado,
//! WebSocket + JSON) and WeTTY (Node.js, socket.io). `bench/peers/install`
//! puts them in place; each runs here as a child process on 127.0.0.1 with a
//! port of its own, in a temporary directory, and is killed with [`Peers`].
//!
//! Every peer's terminal is the same shell as the raw PTY's: `bash --norc
//! --noprofile` with `PS1='$ '`, 80×24, `TERM=xterm-256color`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::term::Terminal;

const QUEUE: usize = 256;
/// How long a server may take to listen, or a session to come up.
const START: Duration = Duration::from_secs(30);
/// The shell every peer runs, and its environment.
const SHELL: &[&str] = &["bash", "--norc", "--noprofile"];
const PROMPT: &str = "$ ";
const TERM: &str = "xterm-256color";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// WeTTY's base path (its socket.io is under it).
const WETTY_BASE: &str = "/wetty";

/// One of the peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// OpenSSH: `ssh -tt` to a `sshd` of our own.
    Ssh,
    /// terminado: tornado's WebSocket, JSON messages.
    Terminado,
    /// WeTTY: Node.js, socket.io over WebSocket.
    Wetty,
}

impl Peer {
    pub const ALL: [Peer; 3] = [Peer::Ssh, Peer::Terminado, Peer::Wetty];

    pub fn name(self) -> &'static str {
        match self {
            Peer::Ssh => "ssh",
            Peer::Terminado => "terminado",
            Peer::Wetty => "wetty",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Peer {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Peer> {
        Peer::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| format!("no peer {s:?} (ssh, terminado, wetty)"))
    }
}

/// A running server.
struct Server {
    child: Child,
    pid: u32,
    port: u16,
}

/// The peers' servers, running until dropped. One at a time: as root, the
/// first made `/run/sshd` (sshd's privilege separation directory) if it was
/// missing, and removes it when dropped.
pub struct Peers {
    dir: TempDir,
    user: String,
    home: PathBuf,
    /// The client's key for sshd (and WeTTY when it goes through ssh).
    key: PathBuf,
    ssh: Option<Server>,
    terminado: Option<Server>,
    wetty: Option<Server>,
    wetty_via_ssh: bool,
    /// `/run/sshd` was made here, to be removed at the end.
    made_privsep_dir: bool,
}

impl Peers {
    /// Starts some of the peers. WeTTY runs the shell itself when this runs
    /// as root; otherwise it can only reach one through ssh, and sshd is
    /// started for it as well.
    pub async fn start_only(repo: &Path, which: &[Peer]) -> anyhow::Result<Peers> {
        Self::start_with(repo, which, false).await
    }

    /// [`Peers::start_only`], with WeTTY going through ssh (to our sshd)
    /// even as root when `wetty_via_ssh`: the way it is mostly deployed.
    pub async fn start_with(
        repo: &Path,
        which: &[Peer],
        wetty_via_ssh: bool,
    ) -> anyhow::Result<Peers> {
        let repo = std::path::absolute(repo)?;
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())?
            .context("this user has no passwd entry")?;
        let root = me.uid.is_root();
        let wetty_via_ssh = which.contains(&Peer::Wetty) && (wetty_via_ssh || !root);
        let mut peers = Peers {
            dir: TempDir::new()?,
            user: me.name,
            home: me.dir,
            key: PathBuf::new(),
            ssh: None,
            terminado: None,
            wetty: None,
            wetty_via_ssh,
            made_privsep_dir: false,
        };
        peers.key = peers.dir.0.join("client_ed25519");
        if which.contains(&Peer::Ssh) || wetty_via_ssh {
            peers.start_sshd().await.context("starting sshd")?;
        }
        if which.contains(&Peer::Terminado) {
            peers
                .start_terminado(&repo)
                .await
                .context("starting terminado")?;
        }
        if which.contains(&Peer::Wetty) {
            peers.start_wetty(&repo).await.context("starting wetty")?;
        }
        Ok(peers)
    }

    async fn start_sshd(&mut self) -> anyhow::Result<()> {
        let dir = &self.dir.0;
        let host_key = dir.join("host_ed25519");
        keygen(&host_key).await?;
        keygen(&self.key).await?;
        let authorized = dir.join("authorized_keys");
        std::fs::copy(self.key.with_extension("pub"), &authorized)?;
        // sshd's privilege separation needs its empty directory; Debian makes
        // it when its service starts, which ours never does.
        let privsep = Path::new("/run/sshd");
        if nix::unistd::getuid().is_root() && !privsep.exists() {
            std::fs::DirBuilder::new().mode(0o755).create(privsep)?;
            self.made_privsep_dir = true;
        }
        let port = free_port()?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress 127.0.0.1\n\
                 Port {port}\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {authorized}\n\
                 AuthenticationMethods publickey\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 HostbasedAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 AllowUsers {user}\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PidFile none\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 PrintLastLog no\n\
                 PermitUserEnvironment no\n\
                 X11Forwarding no\n\
                 AllowAgentForwarding no\n\
                 AllowTcpForwarding no\n\
                 LogLevel INFO\n",
                host_key = host_key.display(),
                authorized = authorized.display(),
                user = self.user,
            ),
        )?;
        let log = dir.join("sshd.log");
        // sshd re-executes itself, so it must be named by its absolute path.
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .env_clear()
            .env("PATH", PATH)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("no /usr/sbin/sshd: run bench/peers/install")?;
        let server = listening(child, port, &log).await?;
        self.ssh = Some(server);
        Ok(())
    }

    async fn start_terminado(&mut self, repo: &Path) -> anyhow::Result<()> {
        let python = repo.join("target/bench-venv/bin/python");
        let script = repo.join("bench/peers/terminado_server.py");
        anyhow::ensure!(
            python.exists(),
            "no {}: run bench/peers/install",
            python.display()
        );
        let log = self.dir.0.join("terminado.log");
        let mut command = Command::new(&python);
        command.arg(&script).arg("0").args(SHELL);
        self.shell_env(&mut command);
        let mut child = command
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()?;
        // It says its port once it listens.
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let line = tokio::time::timeout(START, lines.next_line())
            .await
            .with_context(|| format!("terminado did not listen: {}", read_log(&log)))?
            .context("reading terminado's stdout")?
            .with_context(|| format!("terminado exited: {}", read_log(&log)))?;
        let port: u16 = line
            .strip_prefix("LISTENING ")
            .with_context(|| format!("terminado said {line:?}"))?
            .parse()?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let pid = child.id().context("terminado exited")?;
        self.terminado = Some(Server { child, pid, port });
        Ok(())
    }

    async fn start_wetty(&mut self, repo: &Path) -> anyhow::Result<()> {
        let main = repo.join("target/bench-node/node_modules/wetty/build/main.js");
        anyhow::ensure!(
            main.exists(),
            "no {}: run bench/peers/install",
            main.display()
        );
        let port = free_port()?;
        let log = self.dir.0.join("wetty.log");
        let mut command = Command::new("node");
        command
            .arg(&main)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--base", WETTY_BASE, "--log-level", "warn"])
            .args(["--title", "cocoon-bench"]);
        if self.wetty_via_ssh {
            // WeTTY runs `ssh -t` to our sshd on a PTY of its own (its only
            // way when not root).
            let ssh = self.ssh.as_ref().context("no sshd for wetty")?;
            command
                .args(["--force-ssh", "--ssh-host", "127.0.0.1"])
                .args(["--ssh-port", &ssh.port.to_string()])
                .args(["--ssh-user", &self.user, "--ssh-auth", "publickey"])
                .arg("--ssh-key")
                .arg(&self.key)
                .args(["--ssh-config", "/dev/null", "--known-hosts", "/dev/null"])
                .args(["--command", &remote_shell()]);
        } else {
            // As root with the ssh host on loopback, WeTTY spawns the command
            // itself on a PTY (`/usr/bin/env -S <command>`), no ssh at all.
            command
                .args(["--ssh-host", "127.0.0.1"])
                .args(["--command", &SHELL.join(" ")]);
        }
        self.shell_env(&mut command);
        let child = command
            .env("NODE_ENV", "production")
            .current_dir(&self.dir.0)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(self.dir.0.join("wetty.err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("no node")?;
        let server = listening(child, port, &log).await?;
        self.wetty = Some(server);
        Ok(())
    }

    /// The environment of a server whose shell inherits it.
    fn shell_env(&self, command: &mut Command) {
        command
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &self.home)
            .env("USER", &self.user)
            .env("LOGNAME", &self.user)
            .env("SHELL", "/bin/bash")
            .env("TERM", TERM)
            .env("PS1", PROMPT);
    }

    fn server(&self, which: Peer) -> Option<&Server> {
        match which {
            Peer::Ssh => self.ssh.as_ref(),
            Peer::Terminado => self.terminado.as_ref(),
            Peer::Wetty => self.wetty.as_ref(),
        }
    }

    /// A peer's server and all its descendants: for sshd the per-connection
    /// `sshd` processes, and for every peer the shells and what they run.
    pub fn session_pids(&self, which: Peer) -> Vec<u32> {
        self.server(which)
            .map(|s| process_tree(s.pid, |_| true))
            .unwrap_or_default()
    }

    /// A peer's server-side processes alone: its server and those of its
    /// descendants that run the same program (sshd's per-connection
    /// processes; none for terminado and WeTTY, which serve every session
    /// in their one process), not the shells.
    pub fn server_side_pids(&self, which: Peer) -> Vec<u32> {
        let Some(server) = self.server(which) else {
            return Vec::new();
        };
        let exe = std::fs::read_link(format!("/proc/{}/exe", server.pid)).ok();
        process_tree(server.pid, |pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).ok() == exe
        })
    }

    /// A new terminal of a peer, its shell at its first prompt, the output
    /// so far read.
    pub async fn terminal(&self, which: Peer) -> anyhow::Result<Terminal> {
        let server = self
            .server(which)
            .with_context(|| format!("{which} was not started"))?;
        let mut terminal = match which {
            Peer::Ssh => self.ssh_terminal(server.port)?,
            Peer::Terminado => terminado_terminal(server.port).await?,
            Peer::Wetty => wetty_terminal(server.port).await?,
        };
        settle(&mut terminal)
            .await
            .with_context(|| format!("{which}'s shell did not come up"))?;
        Ok(terminal)
    }

    fn ssh_terminal(&self, port: u16) -> anyhow::Result<Terminal> {
        let mut child = Command::new("ssh")
            .arg("-tt")
            .args(["-F", "/dev/null", "-i"])
            .arg(&self.key)
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "LogLevel=ERROR"])
            .args(["-o", "BatchMode=yes"])
            .args(["-o", "IdentitiesOnly=yes"])
            // Every byte typed goes through, `~.` included.
            .args(["-o", "EscapeChar=none"])
            .args(["-p", &port.to_string()])
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(remote_shell())
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &self.home)
            .env("TERM", TERM)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("no ssh: run bench/peers/install")?;
        let mut stdin = child.stdin.take().context("no stdin")?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let (input, mut keys) = mpsc::channel::<Bytes>(QUEUE);
        let (screen, output) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(bytes) = keys.recv().await {
                if stdin.write_all(&bytes).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdout.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if screen
                            .send(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Terminal {
            input,
            output,
            guard: Box::new((child, Aborting(vec![writer, reader]))),
        })
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // What the servers run (sshd's sessions, the shells), then, once
        // their parents have reaped them, the servers.
        let mut killed = Vec::new();
        for which in Peer::ALL {
            for pid in self.session_pids(which).into_iter().skip(1) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                killed.push(pid);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while killed
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for server in [&mut self.ssh, &mut self.terminado, &mut self.wetty]
            .into_iter()
            .flatten()
        {
            let _ = server.child.start_kill();
        }
        // Reaped here, not left to a runtime that may be ending.
        let deadline = Instant::now() + Duration::from_secs(2);
        for server in [&mut self.ssh, &mut self.terminado, &mut self.wetty]
            .into_iter()
            .flatten()
        {
            while matches!(server.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if self.made_privsep_dir {
            let _ = std::fs::remove_dir("/run/sshd");
        }
    }
}

/// The command ssh runs: the benchmark's shell, whatever the login shell.
fn remote_shell() -> String {
    format!("exec env PS1='{PROMPT}' TERM={TERM} {}", SHELL.join(" "))
}

/// Waits for the shell: sets the size (ssh's client has no terminal to take
/// it from), has it print a marker, and reads until it is quiet again.
async fn settle(terminal: &mut Terminal) -> anyhow::Result<()> {
    terminal
        .type_bytes(b"stty cols 80 rows 24; echo SHELL''_UP\r")
        .await?;
    tokio::time::timeout(START, terminal.read_until(b"SHELL_UP"))
        .await
        .context("no marker")??;
    while let Ok(chunk) =
        tokio::time::timeout(Duration::from_millis(200), terminal.output.recv()).await
    {
        chunk.context("the terminal's output ended")?;
    }
    Ok(())
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> anyhow::Result<Ws> {
    // No Nagle, as browsers and cocoon's own client.
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    let (ws, _) = tokio::time::timeout(START, connect)
        .await
        .with_context(|| format!("connecting to {url}"))?
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ws)
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        let message = tokio::time::timeout(START, ws.next())
            .await
            .context("the server said nothing")?
            .context("the server closed")??;
        match message {
            Message::Text(text) => return Ok(text.as_str().to_owned()),
            Message::Close(frame) => bail!("the server closed: {frame:?}"),
            _ => {}
        }
    }
}

/// terminado: `["stdin", text]` up, `["stdout", text]` down, after
/// `["setup", {}]`; `["disconnect", 1]` when the shell exits.
async fn terminado_terminal(port: u16) -> anyhow::Result<Terminal> {
    let mut ws = connect(&format!("ws://127.0.0.1:{port}/websocket")).await?;
    loop {
        let text = next_text(&mut ws).await?;
        let message: serde_json::Value = serde_json::from_str(&text)?;
        if message[0] == "setup" {
            break;
        }
    }
    ws.send(Message::text(r#"["set_size",24,80]"#)).await?;
    let (mut sink, mut stream) = ws.split();
    let (input, mut keys) = mpsc::channel::<Bytes>(QUEUE);
    let (screen, output) = mpsc::channel(QUEUE);
    let writer = tokio::spawn(async move {
        let mut utf8 = Utf8Carry::default();
        while let Some(bytes) = keys.recv().await {
            let text = utf8.push(&bytes);
            if text.is_empty() {
                continue;
            }
            let message = serde_json::json!(["stdin", text]).to_string();
            if sink.send(Message::text(message)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let Ok(serde_json::Value::Array(message)) = serde_json::from_str(text.as_str()) else {
                continue;
            };
            let mut message = message.into_iter();
            match (message.next(), message.next()) {
                (Some(kind), Some(serde_json::Value::String(out))) if kind == "stdout" => {
                    let sent = screen.send(Bytes::from(out.into_bytes())).await;
                    if sent.is_err() {
                        return;
                    }
                }
                (Some(kind), _) if kind == "disconnect" => return,
                _ => {}
            }
        }
    });
    Ok(Terminal {
        input,
        output,
        guard: Box::new(Aborting(vec![writer, reader])),
    })
}

/// WeTTY's socket.io (4) as a client on a WebSocket (Engine.IO 4): the
/// server opens with `0{…}`, we join the main namespace with `40`; events
/// are `42[name, …]`: `input` up, `data` (text), `login` and `logout` down;
/// the server pings (`2`), we answer (`3`). WeTTY pauses its PTY when 2 MB
/// of output are unacknowledged, so, as its browser client does, we send
/// `commit` for every 256 KiB delivered.
async fn wetty_terminal(port: u16) -> anyhow::Result<Terminal> {
    const ACK: usize = 262_144;
    let url = format!("ws://127.0.0.1:{port}{WETTY_BASE}/socket.io/?EIO=4&transport=websocket");
    let mut ws = connect(&url).await?;
    let open = next_text(&mut ws).await?;
    anyhow::ensure!(open.starts_with('0'), "wetty opened with {open:?}");
    ws.send(Message::text("40")).await?;
    // Joined (`40{…}`), then `login` once the shell runs: WeTTY listens for
    // input only from then on, and drops what comes before.
    let mut pending = VecDeque::new();
    loop {
        let text = next_text(&mut ws).await?;
        if text.starts_with("44") {
            bail!("wetty refused the connection: {text}");
        }
        if text == "1" || text.starts_with("41") {
            bail!("wetty closed the connection");
        }
        if text == "2" {
            ws.send(Message::text("3")).await?;
        }
        match wetty_event(&text) {
            Some(WettyEvent::Login) => break,
            Some(WettyEvent::Data(bytes, units)) => pending.push_back((bytes, units)),
            Some(WettyEvent::Logout) => bail!("wetty's shell exited at once"),
            None => {}
        }
    }
    ws.send(Message::text(r#"42["resize",{"cols":80,"rows":24}]"#))
        .await?;
    let (mut sink, mut stream) = ws.split();
    let (input, mut keys) = mpsc::channel::<Bytes>(QUEUE);
    let (screen, output) = mpsc::channel(QUEUE);
    // What the reader has to send: pongs and commits.
    let (control, mut controls) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut utf8 = Utf8Carry::default();
        loop {
            let message = tokio::select! {
                key = keys.recv() => match key {
                    Some(bytes) => {
                        let text = utf8.push(&bytes);
                        if text.is_empty() {
                            continue;
                        }
                        format!("42{}", serde_json::json!(["input", text]))
                    }
                    None => break,
                },
                message = controls.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            if sink.send(Message::text(message)).await.is_err() {
                return;
            }
        }
        let _ = sink.send(Message::text("41")).await;
        let _ = sink.close().await;
    });
    let reader = tokio::spawn(async move {
        // `pending` holds output read but not yet taken by the terminal's
        // reader: the WebSocket is read on meanwhile, so pings are answered
        // in time.
        let mut unacknowledged = 0usize;
        let mut ended = false;
        loop {
            tokio::select! {
                message = stream.next(), if !ended => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_)) | Err(_)) | None => {
                            ended = true;
                            continue;
                        }
                        Some(Ok(_)) => continue,
                    };
                    let text = text.as_str();
                    if text == "2" {
                        let _ = control.send("3".into());
                    } else if text == "1" || text.starts_with("41") {
                        ended = true;
                    } else {
                        match wetty_event(text) {
                            Some(WettyEvent::Data(bytes, units)) => pending.push_back((bytes, units)),
                            Some(WettyEvent::Logout) => ended = true,
                            Some(WettyEvent::Login) | None => {}
                        }
                    }
                }
                permit = screen.reserve(), if !pending.is_empty() => {
                    let Ok(permit) = permit else { return };
                    let (bytes, units) = pending.pop_front().expect("pending");
                    permit.send(bytes);
                    unacknowledged += units;
                    while unacknowledged >= ACK {
                        unacknowledged -= ACK;
                        let _ = control.send(format!("42[\"commit\",{ACK}]"));
                    }
                }
                else => return,
            }
        }
    });
    Ok(Terminal {
        input,
        output,
        guard: Box::new(Aborting(vec![writer, reader])),
    })
}

/// What WeTTY's server tells its client.
enum WettyEvent {
    /// The shell runs: input is taken from now on.
    Login,
    /// The shell exited.
    Logout,
    /// Output, and its length as WeTTY counts it (UTF-16 units).
    Data(Bytes, usize),
}

/// A socket.io event (`42[name, …]`) of WeTTY's.
fn wetty_event(text: &str) -> Option<WettyEvent> {
    let serde_json::Value::Array(event) = serde_json::from_str(text.strip_prefix("42")?).ok()?
    else {
        return None;
    };
    let mut event = event.into_iter();
    match (event.next()?, event.next()) {
        (name, Some(serde_json::Value::String(data))) if name == "data" => {
            let units = if data.is_ascii() {
                data.len()
            } else {
                data.encode_utf16().count()
            };
            Some(WettyEvent::Data(Bytes::from(data.into_bytes()), units))
        }
        (name, _) if name == "login" => Some(WettyEvent::Login),
        (name, _) if name == "logout" => Some(WettyEvent::Logout),
        _ => None,
    }
}

/// Turns typed bytes into text for the JSON protocols, holding back a
/// character split between two sends.
#[derive(Default)]
struct Utf8Carry(Vec<u8>);

impl Utf8Carry {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.0.extend_from_slice(bytes);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.0) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.0.clear();
                    return text;
                }
                Err(error) => {
                    let good = error.valid_up_to();
                    text.push_str(std::str::from_utf8(&self.0[..good]).expect("valid"));
                    match error.error_len() {
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.0.drain(..good);
                            return text;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.0.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }
}

/// Aborts its tasks when dropped.
struct Aborting(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Aborting {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A private directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "cocoon-bench-peers-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free on loopback now (the server binds it right after).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until a server accepts connections on its port.
async fn listening(mut child: Child, port: u16, log: &Path) -> anyhow::Result<Server> {
    let deadline = Instant::now() + START;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("it exited ({status}): {}", read_log(log));
        }
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            let pid = child.id().context("it exited")?;
            return Ok(Server { child, pid, port });
        }
        if Instant::now() > deadline {
            bail!("not listening on {port} after {START:?}: {}", read_log(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

async fn keygen(path: &Path) -> anyhow::Result<()> {
    let output = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "cocoon-bench", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .await
        .context("no ssh-keygen: run bench/peers/install")?;
    anyhow::ensure!(
        output.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// `root` and its descendants, descending only through processes `keep`
/// accepts (`root` is always in).
fn process_tree(root: u32, keep: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The parent is the second field after the command's ")".
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut tree = vec![root];
    let mut next = 0;
    while next < tree.len() {
        let pid = tree[next];
        next += 1;
        for &child in children.get(&pid).into_iter().flatten() {
            if keep(child) {
                tree.push(child);
            }
        }
    }
    tree
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_carry_holds_a_split_character() {
        let mut carry = Utf8Carry::default();
        let euro = "€".as_bytes();
        assert_eq!(carry.push(&euro[..1]), "");
        assert_eq!(carry.push(&euro[1..]), "€");
        assert_eq!(carry.push(b"a\xffb"), "a\u{fffd}b");
    }
}
