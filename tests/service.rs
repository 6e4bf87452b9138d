//! `cocoon service`: the generated systemd unit, launchd agent, settings and
//! secret files, and the exact `systemctl`/`launchctl` invocations (dry run:
//! neither runs on these machines) — and the installed settings start a
//! real worker that registers.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cocoon_signaling::auth::TokenKind;
use common::{TestServer, WorkerProcess};
use tokio::process::Command;

/// `cocoon service ARGS` with HOME at `home`, in a dry run.
async fn service(home: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    command
        .arg("service")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", home)
        .env("COCOON_SERVICE_DRY_RUN", "1")
        .envs(env.iter().copied());
    let output = command.output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The `KEY="value"` lines of an env file.
fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').replace("\\\"", "\"")))
        .collect()
}

#[tokio::test]
async fn systemd_install_writes_private_settings_and_a_unit_that_runs_a_worker() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(server_dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let home = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("SIGNALING_SERVER_URL", url.as_str()),
        ("COCOON_SETUP_TOKEN", setup.expose()),
        ("COCOON_NAME", "service-box"),
        ("WEBRTC_ICE_SERVERS", ""),
        ("HOSTILE_OTHER", "not carried"),
    ];
    let out = service(home.path(), &env, &["install"]).await;
    assert!(
        out.contains("would run: systemctl --user daemon-reload\n"),
        "{out}"
    );
    assert!(
        out.contains("would run: systemctl --user enable --now cocoon.service\n"),
        "{out}"
    );

    let config = home.path().join(".config");
    let unit = std::fs::read_to_string(config.join("systemd/user/cocoon.service")).unwrap();
    let exe = env!("CARGO_BIN_EXE_cocoon");
    assert!(unit.contains(&format!("ExecStart={exe} run\n")), "{unit}");
    assert!(unit.contains("Restart=always\n") && unit.contains("WantedBy=default.target"));
    assert!(!unit.contains(setup.expose()), "no token in the unit");
    let env_path = config.join("cocoon/worker.env");
    let secret_path = config.join("cocoon/secret");
    assert_eq!((mode(&env_path), mode(&secret_path)), (0o600, 0o600));
    assert!(unit.contains(&format!("EnvironmentFile={}\n", env_path.display())));
    let settings = parse_env_file(&std::fs::read_to_string(&env_path).unwrap());
    let get = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("SIGNALING_SERVER_URL").as_deref(), Some(url.as_str()));
    assert_eq!(get("COCOON_NAME").as_deref(), Some("service-box"));
    assert_eq!(get("HOSTILE_OTHER"), None);
    assert_eq!(
        get("COCOON_SECRET_FILE").unwrap(),
        secret_path.display().to_string()
    );
    let secret = std::fs::read_to_string(&secret_path).unwrap();
    cocoon_signaling::identity::check_secret_strength(&secret).unwrap();

    // Installing again keeps the secret (and so the device id).
    service(home.path(), &env, &["install"]).await;
    assert_eq!(std::fs::read_to_string(&secret_path).unwrap(), secret);

    // What systemd would start: the unit's command with the settings file.
    let data_dir = std::path::PathBuf::from(get("COCOON_DATA_DIR").unwrap());
    let pairs: Vec<(&str, &str)> = settings
        .iter()
        .filter(|(k, _)| k != "COCOON_DATA_DIR" && k != "SIGNALING_SERVER_URL")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut worker = WorkerProcess::spawn(&url, &data_dir, &pairs);
    worker.expect_line("👤 Claimed by: alice").await;

    for (action, want) in [
        ("start", "systemctl --user start cocoon.service"),
        ("stop", "systemctl --user stop cocoon.service"),
        ("restart", "systemctl --user restart cocoon.service"),
        (
            "status",
            "systemctl --user status --no-pager cocoon.service",
        ),
        ("logs", "journalctl --user -u cocoon.service -f"),
        ("uninstall", "systemctl --user disable --now cocoon.service"),
    ] {
        let out = service(home.path(), &[], &[action]).await;
        assert!(
            out.contains(&format!("would run: {want}\n")),
            "{action}: {out}"
        );
    }
    assert!(!config.join("systemd/user/cocoon.service").exists());
    assert!(secret_path.exists(), "uninstall keeps the secret");
}

#[tokio::test]
async fn launchd_install_writes_an_agent_and_drives_launchctl() {
    let home = tempfile::tempdir().unwrap();
    let env = [
        ("COCOON_SERVICE_PLATFORM", "launchd"),
        ("SIGNALING_SERVER_URL", "wss://signal.example.com/ws"),
        ("COCOON_NAME", "mac & cheese"),
    ];
    let out = service(home.path(), &env, &["install"]).await;
    let uid = nix::unistd::getuid();
    let plist_path = home
        .path()
        .join("Library/LaunchAgents/com.cocoon.worker.plist");
    assert!(
        out.contains(&format!(
            "would run: launchctl bootstrap gui/{uid} {}\n",
            plist_path.display()
        )),
        "{out}"
    );
    let plist = std::fs::read_to_string(&plist_path).unwrap();
    assert_eq!(mode(&plist_path), 0o600);
    let exe = env!("CARGO_BIN_EXE_cocoon");
    assert!(plist.contains(&format!(
        "<array><string>{exe}</string><string>run</string></array>"
    )));
    assert!(plist.contains("<key>KeepAlive</key><true/>"));
    assert!(plist.contains("<key>COCOON_NAME</key><string>mac &amp; cheese</string>"));
    assert!(plist.contains("<key>COCOON_SECRET_FILE</key>"));
    for (action, want) in [
        (
            "restart",
            format!("launchctl kickstart -k gui/{uid}/com.cocoon.worker"),
        ),
        (
            "status",
            format!("launchctl print gui/{uid}/com.cocoon.worker"),
        ),
        (
            "uninstall",
            format!("launchctl bootout gui/{uid}/com.cocoon.worker"),
        ),
    ] {
        let out = service(home.path(), &env[..1], &[action]).await;
        assert!(
            out.contains(&format!("would run: {want}\n")),
            "{action}: {out}"
        );
    }
    assert!(!plist_path.exists());
}
