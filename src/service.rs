//! `cocoon service`: the worker as a per-user system service — a systemd
//! user unit on Linux, a launchd agent on macOS — restarted when it fails,
//! with the settings of the environment it was installed from.
//!
//! Nothing secret goes into the unit or the agent's command line: the
//! secret lives in `~/.config/cocoon/secret` and the other settings (a setup
//! token among them) in `~/.config/cocoon/worker.env`, both mode 0600. With
//! `COCOON_SERVICE_DRY_RUN=1` the `systemctl`/`launchctl` invocations are
//! printed instead of run (that is how the tests see them: these machines
//! run neither).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cocoon_signaling::files::write_private;
use cocoon_signaling::identity::{check_secret_strength, generate_secret};

/// `cocoon service` subcommands.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write the unit (or agent), the settings and the secret; start it.
    Install,
    /// Stop it and remove the unit; the secret and data stay.
    Uninstall,
    /// Start it.
    Start,
    /// Stop it.
    Stop,
    /// Restart it.
    Restart,
    /// Show whether it runs.
    Status,
    /// Follow its log.
    Logs,
}

/// Which service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Systemd,
    Launchd,
}

/// The launchd label (and the systemd unit's base name).
const LABEL: &str = "com.cocoon.worker";
const UNIT: &str = "cocoon.service";

/// Worker settings carried from the installing shell into the service.
/// (`COCOON_SECRET` becomes the secret file; the data dir is the service's.)
fn carried(name: &str) -> bool {
    let prefixed = ["COCOON_", "WEBRTC_"].iter().any(|p| name.starts_with(p));
    let own = matches!(
        name,
        "COCOON_SECRET"
            | "COCOON_SECRET_FILE"
            | "COCOON_DATA_DIR"
            | "COCOON_SERVICE_DRY_RUN"
            | "COCOON_SERVICE_PLATFORM"
            | "COCOON_ACCESS_TOKEN"
            | "COCOON_CONFIG"
    );
    (prefixed && !own) || matches!(name, "SIGNALING_SERVER_URL" | "RUST_LOG")
}

/// Paths of one user's installation.
struct Layout {
    home: PathBuf,
    config: PathBuf,
}

impl Layout {
    fn from_env() -> anyhow::Result<Self> {
        let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map_or_else(|| home.join(".config"), PathBuf::from);
        Ok(Self { home, config })
    }
    fn secret(&self) -> PathBuf {
        self.config.join("cocoon").join("secret")
    }
    fn env_file(&self) -> PathBuf {
        self.config.join("cocoon").join("worker.env")
    }
    fn data_dir(&self) -> PathBuf {
        self.home.join(".local/share/cocoon/worker")
    }
    fn unit(&self) -> PathBuf {
        self.config.join("systemd/user").join(UNIT)
    }
    fn plist(&self) -> PathBuf {
        self.home
            .join("Library/LaunchAgents")
            .join(format!("{LABEL}.plist"))
    }
    fn mac_log(&self) -> PathBuf {
        self.home.join("Library/Logs/cocoon.log")
    }
}

fn platform() -> Platform {
    match std::env::var("COCOON_SERVICE_PLATFORM").as_deref() {
        Ok("launchd") => Platform::Launchd,
        Ok("systemd") => Platform::Systemd,
        _ if cfg!(target_os = "macos") => Platform::Launchd,
        _ => Platform::Systemd,
    }
}

/// Runs `cocoon service ACTION`.
pub fn run(action: Action) -> anyhow::Result<i32> {
    let layout = Layout::from_env()?;
    let platform = platform();
    if action == Action::Install {
        install(&layout, platform)?;
    }
    if action == Action::Uninstall {
        for command in commands(action, platform, &layout) {
            invoke(&command)?;
        }
        let file = match platform {
            Platform::Systemd => layout.unit(),
            Platform::Launchd => layout.plist(),
        };
        if file.exists() {
            std::fs::remove_file(&file)
                .with_context(|| format!("cannot remove {}", file.display()))?;
        }
        println!(
            "Removed {} (the secret and data stay in {} and {})",
            file.display(),
            layout.secret().display(),
            layout.data_dir().display()
        );
        return Ok(0);
    }
    let mut code = 0;
    for command in commands(action, platform, &layout) {
        code = invoke(&command)?;
    }
    Ok(code)
}

/// Writes the secret (kept if present), the settings and the unit/agent.
fn install(layout: &Layout, platform: Platform) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot tell where this cocoon binary is")?;
    let secret_path = layout.secret();
    match std::env::var("COCOON_SECRET") {
        Ok(secret) => {
            check_secret_strength(&secret)
                .map_err(|weak| anyhow::anyhow!("COCOON_SECRET is too weak: {weak}"))?;
            write_file(&secret_path, secret.as_bytes())?;
        }
        Err(_) if secret_path.exists() => {}
        Err(_) => write_file(&secret_path, generate_secret().expose().as_bytes())?,
    }
    let mut settings: Vec<(String, String)> =
        std::env::vars().filter(|(k, _)| carried(k)).collect();
    settings.sort();
    settings.push((
        "COCOON_DATA_DIR".into(),
        layout.data_dir().display().to_string(),
    ));
    settings.push((
        "COCOON_SECRET_FILE".into(),
        secret_path.display().to_string(),
    ));
    write_file(&layout.env_file(), env_file(&settings).as_bytes())?;
    match platform {
        Platform::Systemd => {
            let unit = systemd_unit(&exe, &layout.env_file());
            write_file(&layout.unit(), unit.as_bytes())?;
            println!("Wrote {}", layout.unit().display());
        }
        Platform::Launchd => {
            let plist = launchd_plist(&exe, &settings, &layout.mac_log());
            write_file(&layout.plist(), plist.as_bytes())?;
            println!("Wrote {}", layout.plist().display());
        }
    }
    println!(
        "Settings in {} and the secret in {} (both mode 0600)",
        layout.env_file().display(),
        secret_path.display()
    );
    Ok(())
}

/// Writes a 0600 file, making its directory (0700) when missing.
fn write_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.parent().expect("a file in a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    write_private(path, contents)
}

/// `KEY="value"` lines, as systemd's `EnvironmentFile=` reads them.
fn env_file(settings: &[(String, String)]) -> String {
    let mut out = String::from("# cocoon worker settings, written by `cocoon service install`\n");
    for (key, value) in settings {
        let escaped = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = writeln!(out, "{key}=\"{escaped}\"");
    }
    out
}

fn systemd_unit(exe: &Path, env_file: &Path) -> String {
    format!(
        "[Unit]\n\
         Description=cocoon worker\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={exe} run\n\
         EnvironmentFile={env}\n\
         Restart=always\n\
         RestartSec=2\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        exe = exe.display(),
        env = env_file.display(),
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn launchd_plist(exe: &Path, settings: &[(String, String)], log: &Path) -> String {
    let mut env = String::new();
    for (key, value) in settings {
        let _ = write!(
            env,
            "\n      <key>{}</key><string>{}</string>",
            xml_escape(key),
            xml_escape(value)
        );
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
  <dict>
    <key>Label</key><string>{LABEL}</string>
    <key>ProgramArguments</key>
    <array><string>{exe}</string><string>run</string></array>
    <key>EnvironmentVariables</key>
    <dict>{env}
    </dict>
    <key>RunAtLoad</key><true/>
    <key>KeepAlive</key><true/>
    <key>ThrottleInterval</key><integer>2</integer>
    <key>StandardOutPath</key><string>{log}</string>
    <key>StandardErrorPath</key><string>{log}</string>
  </dict>
</plist>
"#,
        exe = xml_escape(&exe.display().to_string()),
        log = xml_escape(&log.display().to_string()),
    )
}

/// The service manager's commands for an action.
fn commands(action: Action, platform: Platform, layout: &Layout) -> Vec<Vec<String>> {
    let owned = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match platform {
        Platform::Systemd => {
            let ctl = |args: &[&str]| owned(&[&["systemctl", "--user"], args].concat());
            match action {
                Action::Install => vec![ctl(&["daemon-reload"]), ctl(&["enable", "--now", UNIT])],
                Action::Uninstall => vec![ctl(&["disable", "--now", UNIT])],
                Action::Start => vec![ctl(&["start", UNIT])],
                Action::Stop => vec![ctl(&["stop", UNIT])],
                Action::Restart => vec![ctl(&["restart", UNIT])],
                Action::Status => vec![ctl(&["status", "--no-pager", UNIT])],
                Action::Logs => vec![owned(&["journalctl", "--user", "-u", UNIT, "-f"])],
            }
        }
        Platform::Launchd => {
            let uid = nix::unistd::getuid();
            let domain = format!("gui/{uid}");
            let target = format!("{domain}/{LABEL}");
            let plist = layout.plist().display().to_string();
            match action {
                Action::Install | Action::Start => {
                    vec![owned(&["launchctl", "bootstrap", &domain, &plist])]
                }
                Action::Uninstall | Action::Stop => {
                    vec![owned(&["launchctl", "bootout", &target])]
                }
                Action::Restart => vec![owned(&["launchctl", "kickstart", "-k", &target])],
                Action::Status => vec![owned(&["launchctl", "print", &target])],
                Action::Logs => vec![owned(&[
                    "tail",
                    "-f",
                    &layout.mac_log().display().to_string(),
                ])],
            }
        }
    }
}

/// Runs a command (or prints it in a dry run); its exit code.
fn invoke(command: &[String]) -> anyhow::Result<i32> {
    if std::env::var_os("COCOON_SERVICE_DRY_RUN").is_some_and(|v| v == "1") {
        println!("would run: {}", command.join(" "));
        return Ok(0);
    }
    let status = std::process::Command::new(&command[0])
        .args(&command[1..])
        .status()
        .with_context(|| format!("cannot run {}", command[0]))?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_worker_settings_are_carried() {
        for name in [
            "SIGNALING_SERVER_URL",
            "COCOON_NAME",
            "WEBRTC_ICE_SERVERS",
            "RUST_LOG",
        ] {
            assert!(carried(name), "{name}");
        }
        for name in [
            "COCOON_SECRET",
            "COCOON_DATA_DIR",
            "HOME",
            "PATH",
            "COCOON_ACCESS_TOKEN",
        ] {
            assert!(!carried(name), "{name}");
        }
    }

    #[test]
    fn env_files_quote_values() {
        let file = env_file(&[("A".into(), "x \"y\" \\z".into())]);
        assert!(file.ends_with("A=\"x \\\"y\\\" \\\\z\"\n"), "{file}");
    }
}
