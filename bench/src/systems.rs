//! The systems of our own: a raw local PTY (the limit) and cocoon, its
//! signaling server and worker as real processes on loopback, reached by the
//! Rust client over a data channel or over the relay.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cocoon::link::rtc::{self, RtcConfig};
use cocoon::services::process::Limits;
use cocoon::services::pty::sys;
use cocoon::session::client::{Pty, PtyEvent, Session};
use cocoon_signaling::protocol::service::AttachPty;
use cocoon_signaling::protocol::{DeviceId, Secret};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::term::Terminal;

const QUEUE: usize = 256;

/// A shell on a PTY of this process: no network, no server.
pub fn raw_pty() -> anyhow::Result<Terminal> {
    let env = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HOME".into(), std::env::var("HOME").unwrap_or_default()),
        ("TERM".into(), "xterm-256color".into()),
        ("PS1".into(), "$ ".into()),
    ];
    let spawned = sys::spawn(
        sys::Program {
            program: "bash",
            args: vec!["--norc".into(), "--noprofile".into()],
            env,
            cwd: None,
            limits: Limits::defaults(),
            sandbox: None,
        },
        80,
        24,
    )?;
    let master = Arc::new(spawned.master);
    let (input, mut keys) = mpsc::channel::<Bytes>(QUEUE);
    let (screen, output) = mpsc::channel(QUEUE);
    let writer = {
        let master = master.clone();
        tokio::spawn(async move {
            while let Some(bytes) = keys.recv().await {
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let Ok(mut ready) = master.writable().await else {
                        return;
                    };
                    match ready.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), rest)?)) {
                        Ok(Ok(n)) => rest = &rest[n..],
                        Ok(Err(_)) => return,
                        Err(_would_block) => continue,
                    }
                }
            }
        })
    };
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut ready) = master.readable().await else {
                return;
            };
            match ready.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), &mut buf)?)) {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(n)) => {
                    if screen
                        .send(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_would_block) => continue,
            }
        }
    });
    let guard = (spawned.child, Aborting(vec![writer, reader]));
    Ok(Terminal {
        input,
        output,
        guard: Box::new(guard),
    })
}

/// Aborts its tasks when dropped.
pub(crate) struct Aborting(pub Vec<tokio::task::JoinHandle<()>>);

impl Drop for Aborting {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A signaling server and a worker, as processes.
pub struct Cocoon {
    pub url: String,
    pub access: Secret,
    /// Claims a device for the owner of `access` (the relay hop's far end).
    pub setup: Secret,
    pub device: DeviceId,
    pub server: Child,
    pub worker: Child,
    _dir: TempDir,
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Loopback-only WebRTC: a STUN server that never answers (nothing listens
/// on port 9), loopback candidates.
pub const DEAD_STUN: &str = "stun:127.0.0.1:9";

/// The client's WebRTC settings matching the worker's.
pub fn loopback_rtc() -> RtcConfig {
    RtcConfig {
        ice_servers: rtc::parse_ice_servers(DEAD_STUN, None, None).expect("valid"),
        include_loopback: true,
        allowed_networks: vec![rtc::parse_network("127.0.0.1/32").expect("valid")],
        ..Default::default()
    }
}

/// A port nothing listens on now.
pub(crate) fn free_port(host: IpAddr) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

async fn token(bin: &Path, data: &Path, kind: &str) -> anyhow::Result<Secret> {
    let out = Command::new(bin.join("cocoon-signaling"))
        .arg("--data-dir")
        .arg(data)
        .args(["token", kind, "--owner", "bench", "--ttl", "24h"])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "token: {out:?}");
    Ok(Secret::new(String::from_utf8(out.stdout)?.trim()))
}

/// Waits for a line containing `needle` on the child's stdout (the rest is
/// drained in the background so the child never blocks on it).
async fn wait_line(child: &mut Child, needle: &'static str) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(());
            }
        }
        anyhow::bail!("ended before {needle:?}")
    })
    .await
    .with_context(|| format!("no {needle:?} in time"))?
}

impl Cocoon {
    /// Starts `cocoon-signaling` and `cocoon run` from `bin` (a cargo
    /// target dir such as target/release), both on loopback.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        Self::start_on(bin, Ipv4Addr::LOCALHOST.into(), None).await
    }

    /// Like [`Cocoon::start`], with the server listening on `host` and the
    /// worker's WebRTC using only that address (off loopback: for a client
    /// behind a link of ours, see chromium.rs); the server also serves the
    /// browser client from `web_root`.
    pub async fn start_on(
        bin: &Path,
        host: IpAddr,
        web_root: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let dir = TempDir(
            std::env::temp_dir().join(format!("cocoon-bench-{}-{host}", std::process::id())),
        );
        let (server_dir, worker_dir) = (dir.0.join("server"), dir.0.join("worker"));
        std::fs::create_dir_all(&worker_dir)?;
        let port = free_port(host)?;
        let url = format!("ws://{host}:{port}/ws");
        let mut server = Command::new(bin.join("cocoon-signaling"))
            .arg("--data-dir")
            .arg(&server_dir)
            .args(["--host", &host.to_string(), "--port", &port.to_string()])
            .envs(web_root.map(|dir| ("SIGNALING_WEB_ROOT", dir)))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start cocoon-signaling (build it first)")?;
        let ready = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect((host, port)).await.is_err() {
            anyhow::ensure!(Instant::now() < ready, "the signaling server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = server.stdout.take();
        let setup = token(bin, &server_dir, "setup").await?;
        let access = token(bin, &server_dir, "access").await?;
        let mut worker = Command::new(bin.join("cocoon"))
            .arg("run")
            .args(["--url", &url, "--data-dir"])
            .arg(&worker_dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("SHELL", "/bin/bash")
            .env("COCOON_SETUP_TOKEN", setup.expose())
            // Off loopback, as the browser tests' workers: no STUN server,
            // host candidates on that address only.
            .env(
                "WEBRTC_ICE_SERVERS",
                if host.is_loopback() { DEAD_STUN } else { "" },
            )
            .envs(
                host.is_loopback()
                    .then_some(("COCOON_WEBRTC_LOOPBACK", "1")),
            )
            .env("COCOON_WEBRTC_NETWORKS", format!("{host}/32"))
            .env("RUST_LOG", "error")
            // Runtime experiments (COCOON_RUNTIME_THREADS) reach the worker.
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("COCOON_RUNTIME")))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start cocoon (build it first)")?;
        wait_line(&mut worker, "Registration confirmed").await?;
        let tls = cocoon::tls::client_config(None)?;
        let mut client = cocoon::client::Client::connect(&url, &access, tls).await?;
        let device = client
            .list_devices()
            .await?
            .into_iter()
            .next()
            .context("the worker is not listed")?
            .device_id;
        Ok(Self {
            url,
            access,
            setup,
            device,
            server,
            worker,
            _dir: dir,
        })
    }

    /// A session, on a data channel (`rtc`) or the relay (`None`).
    pub async fn session(&self, rtc: Option<RtcConfig>) -> anyhow::Result<Session> {
        let tls = cocoon::tls::client_config(None)?;
        Session::connect_with(&self.url, &self.access, tls, &self.device, rtc).await
    }

    /// A terminal on a new session; with `rtc`, once the data channel
    /// carries it.
    pub async fn terminal(&self, rtc: Option<RtcConfig>) -> anyhow::Result<Terminal> {
        let direct = rtc.is_some();
        let session = self.session(rtc).await?;
        if direct {
            session
                .wait_for_path(rtc::Path::Direct, Duration::from_secs(20))
                .await?;
        }
        let pty = session.attach_pty(attach()).await?;
        Ok(adapt(session, pty))
    }
}

/// An 80x24 terminal running the shell every system runs (not the login
/// shell, whose profile scripts would count in connect → prompt).
pub fn attach() -> AttachPty {
    AttachPty {
        request_id: None,
        command: Some("exec bash --norc --noprofile".into()),
        cols: 80,
        rows: 24,
        env: Some([("PS1".to_owned(), "$ ".to_owned())].into()),
        cwd: None,
        // What `cocoon attach` and the browser do.
        flow_control: true,
        stream: None,
    }
}

/// Runs a terminal of a session as a [`Terminal`].
pub fn adapt(session: Session, mut pty: Pty) -> Terminal {
    let (input, mut keys) = mpsc::channel::<Bytes>(QUEUE);
    let (screen, output) = mpsc::channel(QUEUE);
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                key = keys.recv() => match key {
                    Some(bytes) => if pty.write(&bytes).await.is_err() { return },
                    None => return,
                },
                event = pty.next() => match event {
                    Some(PtyEvent::Output(bytes)) => {
                        if screen.send(bytes).await.is_err() { return }
                    }
                    Some(PtyEvent::Exited(_)) | None => return,
                    Some(_) => {}
                },
            }
        }
    });
    Terminal {
        input,
        output,
        guard: Box::new((session, Aborting(vec![task]))),
    }
}

/// Resident memory of a process, bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// CPU time (user + system) a process itself has used, seconds; not its
/// children's (the shell and what it runs are the same work everywhere).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| fields[i].parse::<u64>().unwrap_or(0))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / hz)
}
