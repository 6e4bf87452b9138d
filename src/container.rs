//! Workers in containers, through the `docker` or `podman` command line:
//! what `cocoon start` and the hive's container runners share.
//!
//! Secrets never appear on a command line or in a container's configuration
//! (`docker inspect`): a short-lived container of the same image receives
//! them on stdin and writes them into the worker's volume (`cocoon seed`),
//! and the worker reads them from there.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use cocoon_signaling::files::write_private;
use cocoon_signaling::protocol::Secret;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// The label on every container cocoon starts; `cocoon ls` lists by it and
/// `stop`/`restart`/`logs`/`rm` refuse containers without it.
pub const LABEL: &str = "dev.cocoon.worker";
/// Where the images keep the worker's data (their `VOLUME`).
pub const DATA_DIR: &str = "/cocoon";
/// The setup token's file inside the volume.
const SETUP_TOKEN_FILE: &str = ".setup_token";
/// The binary's path in the images.
const BINARY: &str = "/usr/local/bin/cocoon";

/// The container engine's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    /// `docker`.
    Docker,
    /// `podman` (rootless works the same).
    Podman,
}

/// What `cocoon seed` reads on stdin.
#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// The worker's secret (else the worker generates one in the volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// A setup token that claims the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_token: Option<Secret>,
}

impl Seed {
    fn is_empty(&self) -> bool {
        self.secret.is_none() && self.setup_token.is_none()
    }
}

/// A worker container to start.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Container name (also the device name unless `env` sets COCOON_NAME).
    pub name: String,
    /// The image.
    pub image: String,
    /// Named volume (or host path) mounted at `/cocoon`.
    pub volume: String,
    /// Signaling server URL.
    pub url: String,
    /// Restart policy, e.g. `unless-stopped`; none when `None`.
    pub restart: Option<String>,
    /// `--network`, if any.
    pub network: Option<String>,
    /// Extra labels, `key=value`.
    pub labels: Vec<String>,
    /// Extra environment (never secrets), `KEY=value`.
    pub env: Vec<String>,
    /// Extra `-v` arguments.
    pub volumes: Vec<String>,
    /// `-p` arguments.
    pub ports: Vec<String>,
}

impl Runtime {
    /// The program's name.
    pub fn program(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }

    fn command(self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.program());
        command.kill_on_drop(true);
        command
    }

    /// Runs the engine with `args` and returns its stdout; a failure carries
    /// its stderr.
    pub async fn output(self, args: &[&str]) -> anyhow::Result<String> {
        self.output_with_input(args, None).await
    }

    async fn output_with_input(
        self,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> anyhow::Result<String> {
        let mut child = self
            .command()
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {} (is it installed?)", self.program()))?;
        if let Some(input) = input {
            let mut stdin = child.stdin.take().expect("stdin was piped");
            stdin.write_all(input).await?;
            drop(stdin);
        }
        let output = child.wait_with_output().await?;
        let verb = args.first().copied().unwrap_or_default();
        anyhow::ensure!(
            output.status.success(),
            "{} {verb} failed ({}): {}",
            self.program(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Names of all containers, running or not.
    pub async fn container_names(self) -> anyhow::Result<Vec<String>> {
        let out = self.output(&["ps", "-a", "--format", "{{.Names}}"]).await?;
        Ok(out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Writes secrets into a worker's volume through a throwaway container
    /// of its image, on stdin.
    pub async fn seed(self, image: &str, volume: &str, seed: &Seed) -> anyhow::Result<()> {
        if seed.is_empty() {
            return Ok(());
        }
        let mount = format!("{volume}:{DATA_DIR}");
        let input = serde_json::to_vec(seed)?;
        self.output_with_input(
            &[
                "run",
                "--rm",
                "-i",
                "--network",
                "none",
                "--entrypoint",
                BINARY,
                "-v",
                &mount,
                image,
                "seed",
            ],
            Some(&input),
        )
        .await
        .context("cannot write the secrets into the worker's volume")?;
        Ok(())
    }

    /// Starts a worker container detached; returns the engine's container id.
    /// With `token`, the worker reads its setup token from the volume (call
    /// [`Runtime::seed`] first).
    pub async fn run_worker(self, spec: &WorkerSpec, token: bool) -> anyhow::Result<String> {
        let args = run_args(spec, token);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(self.output(&args).await?.trim().to_owned())
    }

    /// Whether `name` is a container cocoon started.
    pub async fn is_ours(self, name: &str) -> anyhow::Result<bool> {
        let template = format!("{{{{index .Config.Labels \"{LABEL}\"}}}}");
        let out = self
            .output(&[
                "inspect",
                "--type",
                "container",
                "--format",
                &template,
                name,
            ])
            .await?;
        Ok(out.trim() == "1")
    }

    /// Removes a container and its volume (force: running or not).
    pub async fn remove(self, name: &str, volume: Option<&str>) -> anyhow::Result<()> {
        self.output(&["rm", "-f", name]).await?;
        if let Some(volume) = volume {
            self.output(&["volume", "rm", "-f", volume]).await?;
        }
        Ok(())
    }
}

/// The `run` invocation for a worker: no secret in it.
pub fn run_args(spec: &WorkerSpec, token: bool) -> Vec<String> {
    // --init: the worker is not PID 1, so orphans of what users run get
    // reaped.
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--init".into(),
        "--name".into(),
        spec.name.clone(),
    ];
    if let Some(restart) = &spec.restart {
        args.extend(["--restart".into(), restart.clone()]);
    }
    if let Some(network) = &spec.network {
        args.extend(["--network".into(), network.clone()]);
    }
    args.extend(["--label".into(), format!("{LABEL}=1")]);
    for label in &spec.labels {
        args.extend(["--label".into(), label.clone()]);
    }
    args.extend(["-v".into(), format!("{}:{DATA_DIR}", spec.volume)]);
    for volume in &spec.volumes {
        args.extend(["-v".into(), volume.clone()]);
    }
    for port in &spec.ports {
        args.extend(["-p".into(), port.clone()]);
    }
    let mut env = vec![
        format!("SIGNALING_SERVER_URL={}", spec.url),
        format!("COCOON_DATA_DIR={DATA_DIR}"),
    ];
    if token {
        env.push(format!(
            "COCOON_SETUP_TOKEN_FILE={DATA_DIR}/{SETUP_TOKEN_FILE}"
        ));
    }
    if !spec.env.iter().any(|e| e.starts_with("COCOON_NAME=")) {
        env.push(format!("COCOON_NAME={}", spec.name));
    }
    env.extend(spec.env.iter().cloned());
    for e in env {
        args.extend(["-e".into(), e]);
    }
    args.push(spec.image.clone());
    args
}

/// Environment variables that carry secrets: never passed with `-e`.
pub fn is_secret_variable(name: &str) -> bool {
    matches!(
        name,
        "COCOON_SECRET" | "COCOON_SETUP_TOKEN" | "COCOON_ACCESS_TOKEN" | "COCOON_HIVE_TOKEN"
    ) || name.contains("CREDENTIAL")
        || name.contains("PASSWORD")
        || name.ends_with("_TOKEN")
        || name.ends_with("_SECRET")
}

/// `cocoon seed`: inside a container, stores what arrives on stdin in the
/// data dir, each file 0600 and written atomically. A different secret than
/// the stored one starts a new identity (the saved device id is dropped).
pub fn store_seed(data_dir: &Path, input: &[u8]) -> anyhow::Result<()> {
    let seed: Seed = serde_json::from_slice(input)
        .context("cocoon seed reads one JSON object {\"secret\"?, \"setup_token\"?} on stdin")?;
    if let Some(secret) = &seed.secret {
        cocoon_signaling::identity::check_secret_strength(secret.expose())
            .map_err(|weak| anyhow::anyhow!("the secret is too weak: {weak}"))?;
        let path = data_dir.join(".secret");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current.trim() != secret.expose() {
            write_private(&path, secret.expose().as_bytes())?;
            match std::fs::remove_file(data_dir.join(".device_id")) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
                _ => {}
            }
        }
    }
    if let Some(token) = &seed.setup_token {
        write_private(&data_dir.join(SETUP_TOKEN_FILE), token.expose().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_arguments_carry_no_secret() {
        let spec = WorkerSpec {
            name: "cocoon-worker-2".into(),
            image: "img:tag".into(),
            volume: "cocoon-worker-2-data".into(),
            url: "wss://example.com/ws".into(),
            restart: Some("unless-stopped".into()),
            network: None,
            labels: vec![],
            env: vec!["COCOON_NO_WEBRTC=1".into()],
            volumes: vec![],
            ports: vec![],
        };
        let args = run_args(&spec, true).join(" ");
        assert_eq!(
            args,
            "run -d --init --name cocoon-worker-2 --restart unless-stopped --label dev.cocoon.worker=1 \
             -v cocoon-worker-2-data:/cocoon -e SIGNALING_SERVER_URL=wss://example.com/ws \
             -e COCOON_DATA_DIR=/cocoon -e COCOON_SETUP_TOKEN_FILE=/cocoon/.setup_token \
             -e COCOON_NAME=cocoon-worker-2 -e COCOON_NO_WEBRTC=1 img:tag"
        );
    }

    #[test]
    fn seed_writes_private_files_and_resets_identity_on_a_new_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".device_id"), "old").unwrap();
        let secret = "kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0bM9pK8gV4aS2=";
        let input = format!(r#"{{"secret":"{secret}","setup_token":"tok.en.x"}}"#);
        store_seed(dir.path(), input.as_bytes()).unwrap();
        for file in [".secret", ".setup_token"] {
            let meta = std::fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
        assert!(!dir.path().join(".device_id").exists());
        // The same secret again keeps the identity.
        std::fs::write(dir.path().join(".device_id"), "id").unwrap();
        store_seed(dir.path(), input.as_bytes()).unwrap();
        assert!(dir.path().join(".device_id").exists());
        // Weak secrets and unknown fields are refused.
        assert!(store_seed(dir.path(), br#"{"secret":"short"}"#).is_err());
        assert!(store_seed(dir.path(), br#"{"token":"x"}"#).is_err());
    }
}
