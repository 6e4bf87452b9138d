//! `cocoon start docker|podman` and the commands that manage the containers
//! it started: `ls`, `logs`, `stop`, `restart`, `rm`.

use anyhow::Context;
use cocoon_signaling::protocol::Secret;

use crate::container::{LABEL, Runtime, Seed, WorkerSpec, is_secret_variable};

/// The image `cocoon start` runs unless told otherwise.
pub const DEFAULT_IMAGE: &str = "git.the-ihor.com/adi/cocoon:latest";
/// Auto-naming: `cocoon-worker`, then `cocoon-worker-2`, …
const BASE_NAME: &str = "cocoon-worker";

/// `cocoon start` options.
#[derive(clap::Args, Debug, Clone)]
pub struct StartArgs {
    /// The container engine (`docker`; `podman` works the same).
    #[arg(value_enum)]
    mode: Runtime,
    /// Use this engine instead of the one named first (`start docker
    /// --runtime podman`).
    #[arg(long, value_enum, env = "COCOON_RUNTIME")]
    runtime: Option<Runtime>,
    /// Container name (default: cocoon-worker, cocoon-worker-2, …).
    #[arg(long, env = "COCOON_NAME")]
    name: Option<String>,
    /// Signaling server URL.
    #[arg(
        long,
        env = "SIGNALING_SERVER_URL",
        default_value = "ws://localhost:8080/ws"
    )]
    url: String,
    /// Setup token that claims the worker (stored in its volume, never in
    /// the container's configuration).
    #[arg(long, env = "COCOON_SETUP_TOKEN", hide_env_values = true, value_parser = secret)]
    token: Option<Secret>,
    /// A pre-generated secret for the device id (else the worker makes one in
    /// its volume).
    #[arg(long, env = "COCOON_SECRET", hide_env_values = true, value_parser = secret)]
    secret: Option<Secret>,
    /// The image.
    #[arg(long, env = "COCOON_IMAGE", default_value = DEFAULT_IMAGE)]
    image: String,
    /// Restart policy.
    #[arg(long, default_value = "unless-stopped")]
    restart: String,
    /// Container network (`host` to reach a server on this machine's
    /// loopback).
    #[arg(long)]
    network: Option<String>,
    /// Extra environment for the worker, KEY=VALUE (not for secrets).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
}

/// Options of the commands that act on one started container.
#[derive(clap::Args, Debug, Clone)]
pub struct NameArgs {
    /// The container's name.
    name: String,
    /// The container engine.
    #[arg(long, value_enum, env = "COCOON_RUNTIME", default_value = "docker")]
    runtime: Runtime,
}

/// `cocoon logs` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LogsArgs {
    #[command(flatten)]
    target: NameArgs,
    /// Keep following the log.
    #[arg(short, long)]
    follow: bool,
}

/// `cocoon rm` options.
#[derive(clap::Args, Debug, Clone)]
pub struct RmArgs {
    #[command(flatten)]
    target: NameArgs,
    /// Also delete its volume: its secret and device id are gone for good.
    #[arg(long)]
    volume: bool,
}

/// `cocoon ls` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LsArgs {
    /// The container engine.
    #[arg(long, value_enum, env = "COCOON_RUNTIME", default_value = "docker")]
    runtime: Runtime,
}

fn secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// The volume that holds a worker's `/cocoon`.
pub fn volume_name(container: &str) -> String {
    format!("{container}-data")
}

/// The first of `cocoon-worker`, `cocoon-worker-2`, … not taken.
pub fn next_free_name(taken: &[String]) -> String {
    std::iter::once(BASE_NAME.to_owned())
        .chain((2..).map(|n| format!("{BASE_NAME}-{n}")))
        .find(|name| !taken.contains(name))
        .expect("the names never run out")
}

/// Starts a worker container.
pub async fn start(args: StartArgs) -> anyhow::Result<()> {
    let runtime = args.runtime.unwrap_or(args.mode);
    for entry in &args.env {
        let (key, _) = entry
            .split_once('=')
            .with_context(|| format!("--env {entry:?}: expected KEY=VALUE"))?;
        anyhow::ensure!(
            !is_secret_variable(key),
            "--env {key}: secrets would show in `{} inspect`; use --secret/--token",
            runtime.program()
        );
    }
    let name = match args.name {
        Some(name) => name,
        None => next_free_name(&runtime.container_names().await?),
    };
    let volume = volume_name(&name);
    let seed = Seed {
        secret: args.secret,
        setup_token: args.token,
    };
    runtime.seed(&args.image, &volume, &seed).await?;
    let spec = WorkerSpec {
        name: name.clone(),
        image: args.image.clone(),
        volume: volume.clone(),
        url: args.url.clone(),
        restart: Some(args.restart),
        network: args.network,
        labels: Vec::new(),
        env: args.env,
        volumes: Vec::new(),
        ports: Vec::new(),
    };
    let id = runtime
        .run_worker(&spec, seed.setup_token.is_some())
        .await?;
    let program = runtime.program();
    println!("✅ Started {name} ({}), image {}", short(&id), args.image);
    println!("   data volume: {volume}; signaling server: {}", args.url);
    println!("   logs: cocoon logs {name} --runtime {program}   (or: {program} logs -f {name})");
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

async fn ensure_ours(target: &NameArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        target.runtime.is_ours(&target.name).await?,
        "{} was not started by cocoon (no {LABEL} label); not touching it",
        target.name
    );
    Ok(())
}

/// `cocoon stop`.
pub async fn stop(target: NameArgs) -> anyhow::Result<()> {
    ensure_ours(&target).await?;
    target.runtime.output(&["stop", &target.name]).await?;
    println!("stopped {}", target.name);
    Ok(())
}

/// `cocoon restart`.
pub async fn restart(target: NameArgs) -> anyhow::Result<()> {
    ensure_ours(&target).await?;
    target.runtime.output(&["restart", &target.name]).await?;
    println!("restarted {}", target.name);
    Ok(())
}

/// `cocoon rm`.
pub async fn remove(args: RmArgs) -> anyhow::Result<()> {
    ensure_ours(&args.target).await?;
    let volume = volume_name(&args.target.name);
    let runtime = args.target.runtime;
    runtime
        .remove(&args.target.name, args.volume.then_some(volume.as_str()))
        .await?;
    println!("removed {}", args.target.name);
    Ok(())
}

/// `cocoon logs`: the engine's own `logs`, attached to our terminal.
pub async fn logs(args: LogsArgs) -> anyhow::Result<i32> {
    ensure_ours(&args.target).await?;
    let mut command = tokio::process::Command::new(args.target.runtime.program());
    command.arg("logs");
    if args.follow {
        command.arg("-f");
    }
    let status = command.arg(&args.target.name).status().await?;
    Ok(status.code().unwrap_or(1))
}

/// `cocoon ls`: the containers cocoon started.
pub async fn list(args: LsArgs) -> anyhow::Result<()> {
    let filter = format!("label={LABEL}");
    let out = args
        .runtime
        .output(&[
            "ps",
            "-a",
            "--filter",
            &filter,
            "--format",
            "{{.Names}}\t{{.Status}}\t{{.Image}}",
        ])
        .await?;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('\t').collect())
        .collect();
    if rows.is_empty() {
        println!("no cocoon workers in {}", args.runtime.program());
        return Ok(());
    }
    let width = rows.iter().map(|r| r[0].len()).max().unwrap_or(4).max(4);
    println!("{:width$}  {:24}  IMAGE", "NAME", "STATUS");
    for row in rows {
        println!(
            "{:width$}  {:24}  {}",
            row[0],
            row.get(1).unwrap_or(&""),
            row.get(2).unwrap_or(&"")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_names_fill_the_first_gap() {
        let taken = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(next_free_name(&taken(&[])), "cocoon-worker");
        assert_eq!(next_free_name(&taken(&["other"])), "cocoon-worker");
        assert_eq!(
            next_free_name(&taken(&["cocoon-worker"])),
            "cocoon-worker-2"
        );
        assert_eq!(
            next_free_name(&taken(&[
                "cocoon-worker",
                "cocoon-worker-2",
                "cocoon-worker-4"
            ])),
            "cocoon-worker-3"
        );
    }
}
