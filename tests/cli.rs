//! The `cocoon` command line: the all-in-one `up` (the README's main
//! command) and the client commands.

mod common;

use std::process::Stdio;

use cocoon_signaling::auth::TokenKind;
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_a_server_and_a_registered_worker_and_prints_a_working_token() {
    let dir = tempfile::tempdir().unwrap();
    let web = tempfile::tempdir().unwrap();
    let index = "<!doctype html><title>cocoon terminal</title>\n";
    std::fs::write(web.path().join("index.html"), index).unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(["up", "--port", "0", "--data-dir"])
        .arg(dir.path())
        .arg("--web-root")
        .arg(web.path())
        .env("WEBRTC_ICE_SERVERS", "")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut url = None;
    let mut token = None;
    let mut browser = None;
    let mut registered = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !(registered && url.is_some() && token.is_some() && browser.is_some()) {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("up prints its lines in time")
            .unwrap()
            .expect("up keeps running");
        if let Some(rest) = line.split("--url ").nth(1) {
            url = rest.split_whitespace().next().map(str::to_owned);
        } else if line.trim().starts_with("eyJ") {
            token = Some(line.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("👉 Open the browser terminal: ") {
            assert!(url.is_some(), "the browser line comes after the others");
            browser = Some(rest.to_owned());
        } else if line.contains("✅ Registration confirmed") {
            registered = true;
        }
    }
    let url = url.unwrap();
    assert!(url.starts_with("ws://127.0.0.1:"), "loopback only: {url}");
    let token = token.unwrap();

    // The browser line opens the served client, the token in the fragment.
    let browser = browser.unwrap();
    let (page, fragment) = browser.split_once('#').expect("a fragment");
    let host = url
        .strip_prefix("ws://")
        .unwrap()
        .strip_suffix("/ws")
        .unwrap();
    assert_eq!(page, format!("http://{host}/"));
    assert_eq!(fragment, format!("token={token}"));
    let served = http_get(host, "/").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.ends_with(index), "{served}");

    // The printed command works.
    let devices = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(["devices", "--url", &url])
        .env("COCOON_ACCESS_TOKEN", token)
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8_lossy(&devices.stdout);
    assert!(devices.status.success(), "{listing}");
    assert!(listing.contains("online"), "{listing}");
}

/// A raw GET; the whole response as text.
async fn http_get(host: &str, path: &str) -> String {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(host).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };
    tokio::time::timeout(DEADLINE, exchange)
        .await
        .expect("the server answers in time")
}

#[tokio::test]
async fn devices_lists_only_the_callers_devices() {
    let rig = Rig::start(&[("COCOON_NAME", "build-box")]).await;
    let list = |owner: &'static str| {
        let token = rig.server.token(TokenKind::Access, owner);
        let url = rig.server.url();
        async move {
            Command::new(env!("CARGO_BIN_EXE_cocoon"))
                .args(["devices", "--url", &url])
                .env("COCOON_ACCESS_TOKEN", token.expose())
                .output()
                .await
                .unwrap()
        }
    };
    let alice = list("alice").await;
    let text = String::from_utf8_lossy(&alice.stdout);
    assert!(
        text.contains(rig.device_id.as_str())
            && text.contains("build-box")
            && text.contains("online"),
        "{text}"
    );
    let bob = list("bob").await;
    assert_eq!(
        String::from_utf8_lossy(&bob.stdout).trim(),
        "no devices for bob"
    );

    let bad = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .args(["devices", "--url", &rig.server.url()])
        .env("COCOON_ACCESS_TOKEN", "not-a-token")
        .output()
        .await
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid_token")
            || String::from_utf8_lossy(&bad.stderr).contains("InvalidToken")
    );
}

/// `cocoon health --data-dir DIR --grace GRACE`: exit code and output.
async fn health(dir: &std::path::Path, grace: &str) -> (i32, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .arg("health")
        .arg("--data-dir")
        .arg(dir)
        .args(["--grace", grace])
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn health_follows_the_worker() {
    let rig = common::Rig::start(&[]).await;
    let dir = rig.worker_dir.path().to_owned();
    // The worker records "registered" just after the server confirmed it,
    // which is when the rig returns: wait for the record, not a moment.
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let (code, text) = health(&dir, "0s").await;
        assert_eq!(code, 0, "{text}");
        if text.starts_with("healthy: registered") {
            break;
        }
        assert!(text.starts_with("healthy: connecting"), "{text}");
        assert!(
            std::time::Instant::now() < deadline,
            "never registered: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // The server goes away: the worker is reconnecting, healthy only
    // within the grace.
    let common::Rig { server, worker, .. } = rig;
    server.stop().await;
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let (code, text) = health(&dir, "0s").await;
        if code == 1 {
            assert!(text.contains("not registered"), "{text}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {text}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(health(&dir, "1h").await.0, 0);

    worker.kill().await;
    let (code, text) = health(&dir, "1h").await;
    assert_eq!(code, 1);
    assert!(text.contains("is not running"), "{text}");
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(health(empty.path(), "1h").await.0, 1);
}

#[tokio::test]
async fn client_settings_come_from_a_private_config_file() {
    use std::os::unix::fs::PermissionsExt;
    let rig = Rig::start(&[]).await;
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("cocoon").join("config");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let token = rig.server.token(TokenKind::Access, "alice");
    std::fs::write(
        &config,
        format!(
            "# written by hand\nurl = \"{}\"\naccess_token = {}\n",
            rig.server.url(),
            token.expose()
        ),
    )
    .unwrap();
    let devices = || {
        Command::new(env!("CARGO_BIN_EXE_cocoon"))
            .arg("devices")
            .env("XDG_CONFIG_HOME", home.path())
            .env_remove("SIGNALING_SERVER_URL")
            .env_remove("COCOON_ACCESS_TOKEN")
            .output()
    };
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let open = devices().await.unwrap();
    assert!(!open.status.success());
    assert!(String::from_utf8_lossy(&open.stderr).contains("chmod 600"));

    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let listed = devices().await.unwrap();
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(rig.device_id.as_str()));

    // Flags and the environment come first: a bad token in the environment
    // wins over the good one in the file.
    let overridden = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .arg("devices")
        .env("XDG_CONFIG_HOME", home.path())
        .env("COCOON_ACCESS_TOKEN", "not-a-token")
        .output()
        .await
        .unwrap();
    assert!(!overridden.status.success());

    let nowhere = Command::new(env!("CARGO_BIN_EXE_cocoon"))
        .arg("devices")
        .env("XDG_CONFIG_HOME", tempfile::tempdir().unwrap().path())
        .env_remove("COCOON_ACCESS_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&nowhere.stderr).contains("no access token"));
}
