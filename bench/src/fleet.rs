//! Two signaling servers acting as one on NATS (`--nats-url`), for the
//! `fleet` system: the relay hop of hop.rs with its near end on one instance
//! and its far end on the other, so every message crosses NATS. Against the
//! `hop` system (both ends on one server) it gives what a fleet adds.
//!
//! The NATS server is Debian's `nats-server` with JetStream, on loopback,
//! with its store in the stage's temporary directory.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use cocoon_signaling::protocol::Secret;
use tokio::process::{Child, Command};

use crate::systems::{TempDir, free_port};

/// A NATS server and two signaling instances sharing it.
pub struct Fleet {
    /// The instance the near end (the client) talks to.
    pub near_url: String,
    /// The instance the far end (the worker) talks to.
    pub far_url: String,
    pub access: Secret,
    pub setup: Secret,
    /// The NATS server, then the two instances.
    processes: Vec<Child>,
    _dir: TempDir,
}

impl Fleet {
    /// Starts `nats-server` and two `cocoon-signaling` from `bin`.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let dir = TempDir(
            std::env::temp_dir().join(format!("cocoon-bench-fleet-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0)?;
        let nats_port = free_port(Ipv4Addr::LOCALHOST.into())?;
        let nats = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-sd",
            ])
            .arg(dir.0.join("nats"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start nats-server (apt-get install nats-server)")?;
        listening(nats_port).await.context("nats-server")?;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let mut processes = vec![nats];
        let mut urls = Vec::new();
        for name in ["near", "far"] {
            let port = free_port(Ipv4Addr::LOCALHOST.into())?;
            let server = Command::new(bin.join("cocoon-signaling"))
                .arg("--data-dir")
                .arg(dir.0.join(name))
                .args(["--nats-url", &nats_url])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start cocoon-signaling (build it first)")?;
            processes.push(server);
            listening(port)
                .await
                .context("cocoon-signaling --nats-url")?;
            urls.push(format!("ws://127.0.0.1:{port}/ws"));
        }
        let setup = token(bin, &nats_url, "setup").await?;
        let access = token(bin, &nats_url, "access").await?;
        let far_url = urls.pop().expect("two instances");
        let near_url = urls.pop().expect("two instances");
        Ok(Self {
            near_url,
            far_url,
            access,
            setup,
            processes,
            _dir: dir,
        })
    }

    /// The processes relaying: both instances and the NATS server.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().filter_map(Child::id).collect()
    }
}

async fn listening(port: u16) -> anyhow::Result<()> {
    let ready = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < ready, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A token signed with the fleet's shared key (kept in NATS).
async fn token(bin: &Path, nats_url: &str, kind: &str) -> anyhow::Result<Secret> {
    let out = Command::new(bin.join("cocoon-signaling"))
        .args(["--nats-url", nats_url])
        .args(["token", kind, "--owner", "bench", "--ttl", "24h"])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "token: {out:?}");
    Ok(Secret::new(String::from_utf8(out.stdout)?.trim()))
}
