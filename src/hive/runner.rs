//! Starting and stopping one worker with its kind's runner: a process on
//! this host (`script`) or a container (`docker`, `podman`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::Secret;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::container::{Runtime, Seed, WorkerSpec};
use crate::kinds::{ContainerConfig, Engine, Kind, Runner, ScriptConfig};

/// The hive's environment variables that a script worker must not inherit:
/// the hive's own credentials and settings that would confuse the worker.
const NOT_INHERITED: &[&str] = &[
    "COCOON_HIVE_TOKEN",
    "COCOON_HIVE_TOKEN_FILE",
    "COCOON_ACCESS_TOKEN",
    "COCOON_SECRET",
    "COCOON_SECRET_FILE",
    "COCOON_SETUP_TOKEN",
    "COCOON_SETUP_TOKEN_FILE",
    "COCOON_KINDS",
    "COCOON_HIVE_POOL",
    "COCOON_DATA_DIR",
    "COCOON_NAME",
    "COCOON_CONFIG",
];

/// What a worker is started with.
pub struct Launch<'a> {
    /// Its kind.
    pub kind: &'a Kind,
    /// The hive's name for it.
    pub service_name: &'a str,
    /// The client's request id (`pool` for pre-warmed workers).
    pub request_id: &'a str,
    /// Its device name.
    pub device_name: &'a str,
    /// The signaling server it registers with.
    pub url: &'a str,
    /// The single-use setup token that claims it.
    pub setup_token: &'a Secret,
    /// The hive's name (a container label).
    pub hive: &'a str,
    /// Where script workers keep their data: `<state_dir>/<service_name>`.
    pub state_dir: &'a Path,
}

/// A started worker.
pub enum Started {
    /// A process; the hive waits on it.
    Process {
        /// The child (in its own process group).
        child: Child,
        /// Its data dir, removed when it is terminated.
        data_dir: PathBuf,
    },
    /// A container and its volume.
    Container {
        /// The engine.
        runtime: Runtime,
        /// Container name.
        name: String,
        /// Its `/cocoon` volume.
        volume: String,
    },
}

/// Fills in the spec's placeholders.
pub fn interpolate(text: &str, launch: &Launch) -> String {
    text.replace("{kind}", &launch.kind.id)
        .replace("{service_name}", launch.service_name)
        .replace("{request_id}", launch.request_id)
}

/// Starts a worker.
pub async fn start(launch: &Launch<'_>) -> anyhow::Result<Started> {
    match &launch.kind.runner {
        Runner::Script(config) => start_script(config, launch).await,
        Runner::Container(engine, config) => start_container(*engine, config, launch).await,
    }
}

async fn start_script(config: &ScriptConfig, launch: &Launch<'_>) -> anyhow::Result<Started> {
    let data_dir = launch.state_dir.join(launch.service_name);
    let working_dir = config
        .working_dir
        .as_ref()
        .map(|dir| PathBuf::from(interpolate(dir, launch)));
    // Directories and the log file off the runtime's threads. The process
    // itself is spawned from this (runtime) thread: PDEATHSIG fires when the
    // spawning thread ends, and blocking-pool threads end when idle.
    let (working_dir, log) = {
        let (data_dir, working_dir) = (data_dir.clone(), working_dir);
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            create_private_dir(&data_dir)?;
            let working_dir = match working_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir).with_context(|| {
                        format!("cannot create the working dir {}", dir.display())
                    })?;
                    dir
                }
                None => data_dir.clone(),
            };
            Ok((
                working_dir,
                std::fs::File::create(data_dir.join("worker.log"))?,
            ))
        })
        .await??
    };
    let mut command = tokio::process::Command::new(interpolate(&config.command, launch));
    command
        .args(config.args.iter().map(|arg| interpolate(arg, launch)))
        .current_dir(&working_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes one
    // async-signal-safe system call. Script workers get SIGTERM when the
    // hive dies, even by SIGKILL, so a crashed hive leaves none behind.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            Ok(())
        });
    }
    for name in NOT_INHERITED {
        command.env_remove(name);
    }
    // The spec's injected environment. The secret is fresh for every worker
    // and visible only to this user (/proc/PID/environ), never on a command
    // line.
    command
        .env("SIGNALING_SERVER_URL", launch.url)
        .env("COCOON_SETUP_TOKEN", launch.setup_token.expose())
        .env("COCOON_SECRET", generate_secret().expose())
        .env("COCOON_KIND", &launch.kind.id)
        .env("COCOON_NAME", launch.device_name)
        .env("COCOON_DATA_DIR", &data_dir);
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {:?}", config.command))?;
    Ok(Started::Process { child, data_dir })
}

async fn start_container(
    engine: Engine,
    config: &ContainerConfig,
    launch: &Launch<'_>,
) -> anyhow::Result<Started> {
    let runtime = match engine {
        Engine::Docker => Runtime::Docker,
        Engine::Podman => Runtime::Podman,
    };
    let name = launch.service_name.to_owned();
    let volume = crate::start::volume_name(&name);
    // The worker makes its own secret inside its volume; only the setup
    // token travels, on stdin.
    let seed = Seed {
        secret: None,
        setup_token: Some(launch.setup_token.clone()),
    };
    runtime.seed(&config.image, &volume, &seed).await?;
    let mut env: Vec<String> = config
        .environment
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    env.push(format!("COCOON_KIND={}", launch.kind.id));
    env.push(format!("COCOON_NAME={}", launch.device_name));
    let spec = WorkerSpec {
        name: name.clone(),
        image: config.image.clone(),
        volume: volume.clone(),
        url: launch.url.to_owned(),
        restart: Some("unless-stopped".into()),
        network: None,
        labels: vec![
            format!("dev.cocoon.hive={}", launch.hive),
            format!("dev.cocoon.kind={}", launch.kind.id),
        ],
        env,
        volumes: config.volumes.clone(),
        ports: config.ports.clone(),
    };
    if let Err(err) = runtime.run_worker(&spec, true).await {
        let _ = runtime.remove(&name, Some(&volume)).await;
        return Err(err);
    }
    Ok(Started::Container {
        runtime,
        name,
        volume,
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Signals a script worker's process group (its pid is the group's id). The
/// caller makes sure the process has not been reaped yet.
pub fn signal_group(pid: u32, signal: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = killpg(Pid::from_raw(raw), signal);
    }
}

/// Removes a terminated script worker's data dir (a few small files).
pub fn remove_data_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(dir = %dir.display(), %err, "cannot remove a worker's data dir");
        }
        _ => {}
    }
}
