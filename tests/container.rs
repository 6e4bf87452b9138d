//! Workers in containers.
//!
//! - `cocoon start docker` and `ls`/`logs`/`stop`/`restart`/`rm`, up to the
//!   boundary: no Docker engine runs on these machines, so a stand-in
//!   `docker` on PATH records the exact invocations and their stdin.
//! - The debian image for real: built with Debian's podman from a base made
//!   by debootstrap (`images/build-local`), started by `cocoon start docker
//!   --runtime podman`; the worker inside registers as its non-root user,
//!   serves a terminal, passes its HEALTHCHECK and keeps its device id across
//!   a restart.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::DeviceId;
use common::*;
use tokio::process::Command;

/// A `docker` that logs each call (its arguments separated by `|`, then its
/// stdin, if any) and answers like an engine that has the containers
/// `cocoon-worker` (ours) and `other` (not ours).
const FAKE_DOCKER: &str = r#"#!/bin/sh
log="$(dirname "$0")/calls.log"
( IFS='|'; printf 'ARGS %s\n' "$*" ) >>"$log"
case "$1 $2" in
  "run --rm") printf 'STDIN ' >>"$log"; cat >>"$log"; printf '\n' >>"$log" ;;
  "run -d") echo 0123456789abcdef0123456789 ;;
  "ps -a")
    case "$*" in
      *label=*) printf 'cocoon-worker\tUp 2 minutes\tgit.the-ihor.com/adi/cocoon:latest\n' ;;
      *) printf 'cocoon-worker\nother\n' ;;
    esac ;;
  "inspect --type")
    for last; do :; done
    case "$last" in cocoon-*) echo 1 ;; *) echo '<no value>' ;; esac ;;
  "logs "*) echo "worker log line" ;;
esac
exit 0
"#;

struct FakeDocker {
    dir: tempfile::TempDir,
}

impl FakeDocker {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker");
        std::fs::write(&path, FAKE_DOCKER).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    async fn cocoon(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap()
        );
        Command::new(env!("CARGO_BIN_EXE_cocoon"))
            .args(args)
            .env_clear()
            .env("PATH", path)
            .env("HOME", self.dir.path())
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap()
    }

    /// The calls so far, and forget them.
    fn take_calls(&self) -> String {
        let log = self.dir.path().join("calls.log");
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(log);
        calls
    }
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn start_docker_names_workers_and_keeps_secrets_out_of_the_container_config() {
    let docker = FakeDocker::new();
    let token = "eyJhbGciOiJIUzI1NiJ9.setup-token.sig";
    let secret = generate_secret();
    let out = docker
        .cocoon(
            &[
                "start",
                "docker",
                "--url",
                "wss://signal.example/ws",
                "--token",
                token,
                "-e",
                "COCOON_NO_WEBRTC=1",
            ],
            &[("COCOON_SECRET", secret.expose())],
        )
        .await;
    assert!(stdout(&out).contains("Started cocoon-worker-2"), "{out:?}");
    let image = "git.the-ihor.com/adi/cocoon:latest";
    let calls = docker.take_calls();
    let expected = format!(
        "ARGS ps|-a|--format|{{{{.Names}}}}\n\
         ARGS run|--rm|-i|--network|none|--entrypoint|/usr/local/bin/cocoon|-v|cocoon-worker-2-data:/cocoon|{image}|seed\n\
         STDIN {{\"secret\":\"{}\",\"setup_token\":\"{token}\"}}\n\
         ARGS run|-d|--init|--name|cocoon-worker-2|--restart|unless-stopped|--label|dev.cocoon.worker=1|\
         -v|cocoon-worker-2-data:/cocoon|-e|SIGNALING_SERVER_URL=wss://signal.example/ws|\
         -e|COCOON_DATA_DIR=/cocoon|-e|COCOON_SETUP_TOKEN_FILE=/cocoon/.setup_token|\
         -e|COCOON_NAME=cocoon-worker-2|-e|COCOON_NO_WEBRTC=1|{image}\n",
        secret.expose()
    );
    assert_eq!(calls, expected);
    // Secrets only ever on stdin, never in arguments.
    for line in calls.lines().filter(|l| l.starts_with("ARGS")) {
        assert!(
            !line.contains(token) && !line.contains(secret.expose()),
            "{line}"
        );
    }

    // --name beats COCOON_NAME beats auto-naming; no secrets, no seeding.
    let out = docker
        .cocoon(&["start", "docker"], &[("COCOON_NAME", "from-env")])
        .await;
    assert!(stdout(&out).contains("Started from-env"));
    let out = docker
        .cocoon(
            &["start", "docker", "--name", "from-flag"],
            &[("COCOON_NAME", "from-env")],
        )
        .await;
    assert!(stdout(&out).contains("Started from-flag"));
    let calls = docker.take_calls();
    assert_eq!(calls.lines().count(), 2, "{calls}");
    assert!(calls.contains("--name|from-env|") && calls.contains("--name|from-flag|"));
    assert!(calls.contains("SIGNALING_SERVER_URL=ws://localhost:8080/ws"));
    assert!(!calls.contains("SETUP_TOKEN_FILE"));

    // A secret passed as plain environment is refused.
    let out = docker
        .cocoon(&["start", "docker", "-e", "COCOON_SECRET=x"], &[])
        .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("docker inspect"));
    assert_eq!(docker.take_calls(), "");

    // The management commands act only on containers cocoon started.
    for (args, call) in [
        (vec!["stop", "cocoon-worker"], "ARGS stop|cocoon-worker\n"),
        (
            vec!["restart", "cocoon-worker"],
            "ARGS restart|cocoon-worker\n",
        ),
        (
            vec!["logs", "cocoon-worker", "-f"],
            "ARGS logs|-f|cocoon-worker\n",
        ),
        (
            vec!["rm", "cocoon-worker", "--volume"],
            "ARGS rm|-f|cocoon-worker\nARGS volume|rm|-f|cocoon-worker-data\n",
        ),
    ] {
        stdout(&docker.cocoon(&args, &[]).await);
        let inspect = "ARGS inspect|--type|container|--format|{{index .Config.Labels \"dev.cocoon.worker\"}}|cocoon-worker\n";
        assert_eq!(docker.take_calls(), format!("{inspect}{call}"), "{args:?}");
    }
    let out = docker.cocoon(&["stop", "other"], &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not started by cocoon"));
    assert!(!docker.take_calls().contains("ARGS stop"));

    let listed = stdout(&docker.cocoon(&["ls"], &[]).await);
    assert!(listed.contains("cocoon-worker  Up 2 minutes"), "{listed}");
    assert!(
        docker
            .take_calls()
            .contains("--filter|label=dev.cocoon.worker|")
    );
}

/// podman with the settings `images/build-local` writes for this machine.
fn podman(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("podman");
    command.args(args).env("CONTAINERS_CONF", containers_conf());
    command
}

fn containers_conf() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/images/containers.conf")
}

fn run_ok(mut command: std::process::Command) -> String {
    let output = command.output().expect("the command runs");
    assert!(output.status.success(), "{command:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds localhost/cocoon:debian around this build's binary.
fn build_debian_image() -> &'static str {
    let root = env!("CARGO_MANIFEST_DIR");
    let binary = Path::new(env!("CARGO_BIN_EXE_cocoon"))
        .strip_prefix(root)
        .expect("the binary is built inside the repository");
    let mut command = std::process::Command::new(Path::new(root).join("images/build-local"));
    command.env("COCOON_BINARY", binary);
    let image = run_ok(command);
    assert_eq!(image.trim(), "localhost/cocoon:debian");
    "localhost/cocoon:debian"
}

/// Removes the test's container and volume even when the test fails.
struct Cleanup(&'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "1", self.0]).output();
        let _ = podman(&["volume", "rm", "-f", &format!("{}-data", self.0)]).output();
    }
}

async fn wait_online(client: &mut cocoon::client::Client, name: &str) -> DeviceId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let devices = client.list_devices().await.unwrap();
        if let Some(device) = devices
            .iter()
            .find(|d| d.online && d.name.as_deref() == Some(name))
        {
            return device.device_id.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} did not come online: {devices:?}\n{}",
            String::from_utf8_lossy(&podman(&["logs", name]).output().unwrap().stderr)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn the_debian_image_runs_a_worker_with_podman() {
    const NAME: &str = "cocoon-test-debian";
    let image = tokio::task::spawn_blocking(build_debian_image)
        .await
        .unwrap();
    drop(Cleanup(NAME)); // leftovers of an earlier run
    let _cleanup = Cleanup(NAME);

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let url = server.url();
    let mut command = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    command
        .args(["start", "docker", "--runtime", "podman", "--name", NAME])
        .args(["--image", image, "--network", "host", "--url", &url])
        .args(["-e", "COCOON_NO_WEBRTC=1"])
        .env("COCOON_SETUP_TOKEN", setup.expose())
        .env("CONTAINERS_CONF", containers_conf());
    let out = command.output().await.unwrap();
    assert!(stdout(&out).contains(&format!("Started {NAME}")));

    // Registered and claimed through the token in its volume.
    let mut alice = server.client("alice").await;
    let device = wait_online(&mut alice, NAME).await;

    // Nothing secret in the container's configuration.
    let inspect = run_ok(podman(&["inspect", NAME]));
    assert!(!inspect.contains(setup.expose()));
    assert!(inspect.contains("COCOON_SETUP_TOKEN_FILE=/cocoon/.setup_token"));

    // A terminal, as the image's non-root user.
    let session = cocoon::session::client::Session::connect(
        &url,
        &server.token(TokenKind::Access, "alice"),
        plain_tls(),
        &device,
    )
    .await
    .unwrap();
    let mut pty = session
        .attach_pty(attach_request(Some("id -un; id -u; pwd; exit 7")))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    let output = String::from_utf8_lossy(&output);
    assert_eq!(code, 7, "{output}");
    assert!(
        output.contains("cocoon\r\n1000\r\n/home/cocoon"),
        "{output:?}"
    );
    drop(session);

    // The image's HEALTHCHECK passes (podman runs it on demand here: no
    // systemd timer), and so does the command it names.
    run_ok(podman(&["healthcheck", "run", NAME]));
    run_ok(podman(&["exec", NAME, "cocoon", "health"]));

    // Restarted, it comes back as the same device: the volume kept its
    // secret and id.
    let mut restart = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    restart
        .args(["restart", NAME, "--runtime", "podman"])
        .env("CONTAINERS_CONF", containers_conf());
    stdout(&restart.output().await.unwrap());
    assert_eq!(wait_online(&mut alice, NAME).await, device);
    let logs = podman(&["logs", NAME]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("Loaded existing device ID"), "{logs}");
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 1, "{devices:?}");

    let listed = {
        let mut ls = Command::new(env!("CARGO_BIN_EXE_cocoon"));
        ls.args(["ls", "--runtime", "podman"])
            .env("CONTAINERS_CONF", containers_conf());
        stdout(&ls.output().await.unwrap())
    };
    assert!(listed.contains(NAME), "{listed}");
}
