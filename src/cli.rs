//! The `cocoon` command line.

use std::path::PathBuf;

use anyhow::Context;
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
    /// Run the worker as a user service (systemd on Linux, launchd on macOS).
    Service {
        /// What to do.
        #[command(subcommand)]
        action: crate::service::Action,
    },
    /// Start a worker in a container: `cocoon start docker` (or podman).
    Start(crate::start::StartArgs),
    /// List the worker containers cocoon started.
    Ls(crate::start::LsArgs),
    /// Show a worker container's log.
    Logs(crate::start::LogsArgs),
    /// Stop a worker container.
    Stop(crate::start::NameArgs),
    /// Restart a worker container.
    Restart(crate::start::NameArgs),
    /// Remove a worker container (and with --volume, its identity).
    Rm(crate::start::RmArgs),
    /// Run a hive: start workers of configured kinds for your clients.
    Hive(crate::hive::HiveCommand),
    /// Inside a container: store the secret and setup token read from stdin
    /// in the data dir (what `cocoon start` uses).
    #[command(hide = true)]
    Seed {
        /// The worker's data dir.
        #[arg(long, env = "COCOON_DATA_DIR", default_value = "/cocoon")]
        data_dir: PathBuf,
    },
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

/// How a client command reaches the signaling server. Each setting comes
/// from its flag, else its environment variable, else the config file
/// (`~/.config/cocoon/config`, see [`ClientConfig`]).
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Signaling server WebSocket URL [default: ws://localhost:8080/ws].
    #[arg(long, env = "SIGNALING_SERVER_URL")]
    pub url: Option<String>,
    /// Access token.
    #[arg(long, env = "COCOON_ACCESS_TOKEN", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret::new(s)))]
    pub access_token: Option<Secret>,
    /// Extra CA certificates (PEM) to trust for wss:// URLs.
    #[arg(long, env = "COCOON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The client config file [default: $XDG_CONFIG_HOME/cocoon/config].
    #[arg(long, env = "COCOON_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Client settings, resolved.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Signaling server WebSocket URL.
    pub url: String,
    /// Access token.
    pub access_token: Secret,
    /// Extra CA certificates.
    pub ca_file: Option<PathBuf>,
}

impl ClientArgs {
    /// Resolves the settings and connects as an authenticated client.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let config = self.resolve()?;
        let tls = crate::tls::client_config(config.ca_file.as_deref())?;
        Client::connect(&config.url, &config.access_token, tls).await
    }

    /// Flags and environment first, then the config file: lines of
    /// `url = …`, `access_token = …`, `ca_file = …` (`#` comments). The file
    /// holds a token, so it must not be readable by others.
    pub fn resolve(&self) -> anyhow::Result<ClientConfig> {
        let path = self.config.clone().or_else(default_config_path);
        let file = match &path {
            Some(path) if path.exists() || self.config.is_some() => read_config(path)?,
            _ => Default::default(),
        };
        let access_token = self
            .access_token
            .clone()
            .or_else(|| file.get("access_token").map(|t| Secret::new(t.as_str())))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no access token: pass --access-token, set COCOON_ACCESS_TOKEN, or put \
                     access_token = … in {}",
                    path.map_or("~/.config/cocoon/config".into(), |p| p
                        .display()
                        .to_string())
                )
            })?;
        Ok(ClientConfig {
            url: self
                .url
                .clone()
                .or_else(|| file.get("url").cloned())
                .unwrap_or_else(|| "ws://localhost:8080/ws".into()),
            access_token,
            ca_file: self
                .ca_file
                .clone()
                .or_else(|| file.get("ca_file").map(PathBuf::from)),
        })
    }
}

fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    Some(base.join("cocoon").join("config"))
}

fn read_config(
    path: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let mode = std::fs::metadata(path)?.permissions().mode();
    anyhow::ensure!(
        mode & 0o077 == 0,
        "{} holds a token but others may read it (mode {:o}): chmod 600 it",
        path.display(),
        mode & 0o777
    );
    let mut settings = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{}:{}: expected key = value", path.display(), n + 1))?;
        let key = key.trim();
        anyhow::ensure!(
            matches!(key, "url" | "access_token" | "ca_file"),
            "{}:{}: unknown setting {key:?} (url, access_token, ca_file)",
            path.display(),
            n + 1
        );
        let value = value.trim().trim_matches('"');
        settings.insert(key.to_owned(), value.to_owned());
    }
    Ok(settings)
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
            Command::Service { action } => {
                // Files and systemctl/launchctl: blocking work, off the runtime.
                return tokio::task::spawn_blocking(move || crate::service::run(action)).await?;
            }
            Command::Health(args) => {
                let check = move || crate::worker::health::check(&args.data_dir, args.grace);
                return Ok(match tokio::task::spawn_blocking(check).await? {
                    Ok(status) => {
                        println!("healthy: {status}");
                        0
                    }
                    Err(problem) => {
                        println!("unhealthy: {problem}");
                        1
                    }
                });
            }
            Command::Forward(args) => {
                return tokio::select! {
                    code = crate::remote::forward(args) => code,
                    _ = shutdown.cancelled() => Ok(0),
                };
            }
            Command::Start(args) => crate::start::start(args).await?,
            Command::Ls(args) => crate::start::list(args).await?,
            Command::Logs(args) => return crate::start::logs(args).await,
            Command::Stop(args) => crate::start::stop(args).await?,
            Command::Restart(args) => crate::start::restart(args).await?,
            Command::Rm(args) => crate::start::remove(args).await?,
            Command::Hive(command) => return crate::hive::run(command, shutdown).await,
            Command::Seed { data_dir } => {
                tokio::task::spawn_blocking(move || {
                    // A secret and a token: a few hundred bytes; refuse more.
                    let mut input = Vec::new();
                    let stdin = std::io::Read::take(std::io::stdin().lock(), 64 * 1024 + 1);
                    std::io::Read::read_to_end(&mut { stdin }, &mut input)?;
                    anyhow::ensure!(input.len() <= 64 * 1024, "cocoon seed: input over 64 KiB");
                    crate::container::store_seed(&data_dir, &input)
                })
                .await??;
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
            Command::Hive(ref command) if command.is_server() => "info",
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
    let mut client = args.connect().await?;
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
