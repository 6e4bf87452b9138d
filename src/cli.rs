//! The `cocoon` command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cocoon_signaling::protocol::Secret;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::config::WorkerArgs;
use crate::up::UpArgs;

/// cocoon: terminals, command execution and HTTP access on remote machines.
#[derive(Parser, Debug)]
#[command(name = "cocoon", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a worker in the foreground.
    Run(WorkerArgs),
    /// Run a signaling server on loopback and a worker: cocoon on this machine.
    Up(UpArgs),
    /// List your devices.
    Devices(ClientArgs),
    /// Diagnose peer-to-peer connectivity: signaling, STUN, TURN, UDP ports.
    Doctor(crate::doctor::DoctorArgs),
    /// An interactive terminal on a device (Ctrl-] detaches).
    Attach(crate::remote::AttachArgs),
    /// Run one command on a device: its output and exit code.
    Exec(crate::remote::ExecArgs),
    /// Serve a device's HTTP service on a local port.
    Forward(crate::remote::ForwardArgs),
    /// Is the worker of this data dir running and registered? (Exit 0 if so.)
    Health(HealthArgs),
}

/// `cocoon health` options.
#[derive(clap::Args, Debug, Clone)]
pub struct HealthArgs {
    /// The worker's data dir.
    #[arg(long, env = "COCOON_DATA_DIR", default_value = "/cocoon")]
    pub data_dir: PathBuf,
    /// How long a worker may be reconnecting and still count as healthy.
    #[arg(long, default_value = "60s", value_parser = cocoon_signaling::parse_duration)]
    pub grace: std::time::Duration,
}

/// How a client command reaches the signaling server.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Signaling server WebSocket URL.
    #[arg(
        long,
        env = "SIGNALING_SERVER_URL",
        default_value = "ws://localhost:8080/ws"
    )]
    pub url: String,
    /// Access token.
    #[arg(long, env = "COCOON_ACCESS_TOKEN", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret::new(s)))]
    pub access_token: Secret,
    /// Extra CA certificates (PEM) to trust for wss:// URLs.
    #[arg(long, env = "COCOON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl Cli {
    /// Runs the chosen command until it ends or `shutdown` fires; returns
    /// the exit code (a remote program's, for `attach` and `exec`).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<i32> {
        match self.command {
            Command::Run(args) => crate::worker::run(args.try_into()?, shutdown).await?,
            Command::Up(args) => crate::up::run(args, shutdown).await?,
            Command::Devices(args) => devices(args).await?,
            Command::Doctor(args) => doctor(args, shutdown).await?,
            Command::Attach(args) => return crate::remote::attach(args).await,
            Command::Health(args) => {
                return Ok(
                    match crate::worker::health::check(&args.data_dir, args.grace) {
                        Ok(status) => {
                            println!("healthy: {status}");
                            0
                        }
                        Err(problem) => {
                            println!("unhealthy: {problem}");
                            1
                        }
                    },
                );
            }
            Command::Forward(args) => {
                return tokio::select! {
                    code = crate::remote::forward(args) => code,
                    _ = shutdown.cancelled() => Ok(0),
                };
            }
            Command::Exec(args) => {
                // Ctrl-C gives up waiting (the command may still finish there).
                return tokio::select! {
                    code = crate::remote::exec(args) => code,
                    _ = shutdown.cancelled() => Ok(130),
                };
            }
        }
        Ok(0)
    }

    /// Log filter when `RUST_LOG` is unset: client commands stay quiet (our
    /// warnings only), so nothing lands in the middle of a remote terminal
    /// or a command's output.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Run(_) | Command::Up(_) => "info",
            _ => "error,cocoon=warn,cocoon_signaling=warn",
        }
    }
}

/// Exits non-zero only when the signaling server is unusable: slow paths
/// still work.
async fn doctor(
    args: crate::doctor::DoctorArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let verdict = tokio::select! {
        verdict = crate::doctor::run(args) => verdict?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted"),
    };
    anyhow::ensure!(
        verdict != crate::doctor::Verdict::Offline,
        "the signaling server is unreachable or refused the token"
    );
    Ok(())
}

async fn devices(args: ClientArgs) -> anyhow::Result<()> {
    let tls = crate::tls::client_config(args.ca_file.as_deref())?;
    let mut client = Client::connect(&args.url, &args.access_token, tls).await?;
    let devices = client.list_devices().await?;
    if devices.is_empty() {
        println!("no devices for {}", client.user_id);
    }
    for device in devices {
        println!(
            "{}  {:7}  {}",
            device.device_id,
            if device.online { "online" } else { "offline" },
            device.name.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
