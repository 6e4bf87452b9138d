//! `cocoon doctor` against a real signaling server and a real coturn, all on
//! loopback: what it prints, its verdict, its exit code, that it stays within
//! its timeouts and that it never prints a secret.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cocoon_signaling::Config;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::ice::IceSettings;
use cocoon_signaling::protocol::Secret;
use common::*;
use tokio::net::UdpSocket;
use tokio::process::{Child, Command};

const TURN_USER: &str = "doctor-user";
const TURN_PASS: &str = "turn-pass-5b1e93";
const WRONG_PASS: &str = "wrong-pass-c07a41";
const REST_SECRET: &str = "rest-secret-8d2f60";

/// How coturn authenticates.
enum Auth {
    /// A long-term user `TURN_USER:TURN_PASS`.
    User,
    /// A user, and Binding requests ignored (a TURN-only server).
    UserNoStun,
    /// TURN REST credentials signed with `REST_SECRET`.
    RestSecret,
}

/// A `turnserver` on 127.0.0.1, killed on drop.
struct Coturn {
    port: u16,
    _child: Child,
    _dir: tempfile::TempDir,
}

impl Coturn {
    /// Starts coturn and waits until it answers. Secrets go in a 0600
    /// config file, not on the command line.
    async fn start(auth: Auth) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let relay = free_port();
        let config = dir.path().join("turnserver.conf");
        let lines = match auth {
            Auth::User | Auth::UserNoStun => {
                format!("lt-cred-mech\nuser={TURN_USER}:{TURN_PASS}\n")
            }
            Auth::RestSecret => format!("use-auth-secret\nstatic-auth-secret={REST_SECRET}\n"),
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&config)
            .unwrap();
        std::io::Write::write_all(&mut file, lines.as_bytes()).unwrap();
        let mut command = Command::new("turnserver");
        command
            .arg("-c")
            .arg(&config)
            .args([
                "--listening-ip=127.0.0.1",
                "--relay-ip=127.0.0.1",
                "--realm=test",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--fingerprint",
                "--log-file=stdout",
                "--simple-log",
            ])
            .arg(format!("--listening-port={port}"))
            .arg(format!("--min-port={relay}"))
            .arg(format!("--max-port={}", relay + 9))
            .arg(format!("--pidfile={}", dir.path().join("pid").display()))
            .arg(format!("--userdb={}", dir.path().join("turndb").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if matches!(auth, Auth::UserNoStun) {
            command.arg("--no-stun");
        }
        let mut child = command
            .spawn()
            .expect("turnserver runs (apt-get install coturn; scripts/test does)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + DEADLINE;
        while !answers(addr).await {
            assert!(child.try_wait().unwrap().is_none(), "turnserver exited");
            assert!(
                Instant::now() < deadline,
                "turnserver did not start in time"
            );
        }
        Self {
            port,
            _child: child,
            _dir: dir,
        }
    }
}

/// Whether coturn answers at `addr`: a bare Allocate request gets a 401
/// in every mode (Binding requests do not when STUN is off).
async fn answers(addr: SocketAddr) -> bool {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // 0x0003 Allocate, length 8, magic cookie, transaction id, then
    // REQUESTED-TRANSPORT (0x0019) = UDP (17).
    let mut request = vec![0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(&[7; 12]);
    request.extend_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
    socket.send_to(&request, addr).await.unwrap();
    let mut buf = [0u8; 1500];
    let reply = tokio::time::timeout(Duration::from_millis(200), socket.recv_from(&mut buf)).await;
    matches!(reply, Ok(Ok((n, _))) if n >= 20 && buf[4..8] == [0x21, 0x12, 0xa4, 0x42])
}

/// A port that was free on 127.0.0.1 for both UDP and TCP a moment ago.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if port < 65500 && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// What one `cocoon doctor` run gave.
struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn verdict(&self) -> &str {
        let last = self.stdout.lines().last().unwrap_or_default();
        assert!(last.starts_with("Verdict: "), "last line: {self}");
        last.trim_start_matches("Verdict: ")
            .split_whitespace()
            .next()
            .unwrap()
    }

    fn line(&self, starting: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(starting))
            .unwrap_or_else(|| panic!("no line starting with {starting:?}: {self}"))
    }

    /// No secret anywhere in the output.
    fn assert_no_secret(&self, secrets: &[&str]) {
        for secret in secrets {
            assert!(
                !self.stdout.contains(secret) && !self.stderr.contains(secret),
                "a secret was printed: {self}"
            );
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n--- stdout\n{}--- stderr\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `cocoon doctor` with only this environment.
async fn doctor(args: &[&str], env: &[(&str, &str)]) -> Run {
    let started = Instant::now();
    let output = tokio::time::timeout(
        DEADLINE,
        Command::new(env!("CARGO_BIN_EXE_cocoon"))
            .arg("doctor")
            .args(args)
            .env_clear()
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("doctor finishes in time")
    .unwrap();
    let run = Run {
        ok: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    };
    println!("{run}"); // shown when a test fails, or with --nocapture
    run
}

#[tokio::test]
async fn stun_and_turn_on_loopback_give_p2p() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let coturn = Coturn::start(Auth::User).await;
    let token = server.token(TokenKind::Access, "alice");
    let p = coturn.port;
    let ice = format!("stun:localhost:{p},turn:127.0.0.1:{p}?transport=udp");
    let run = doctor(
        &["--url", &server.url(), "--timeout", "2s"],
        &[
            ("COCOON_ACCESS_TOKEN", token.expose()),
            ("WEBRTC_ICE_SERVERS", &ice),
            ("WEBRTC_TURN_USERNAME", TURN_USER),
            ("WEBRTC_TURN_CREDENTIAL", TURN_PASS),
        ],
    )
    .await;
    assert!(run.ok, "{run}");
    assert!(
        run.line("✅ Signaling:").contains("authenticated as alice"),
        "{run}"
    );
    assert!(
        run.line(&format!("✅ ICE server stun:localhost:{p} (configured)"))
            .ends_with(&format!("→ 127.0.0.1:{p}")),
        "{run}"
    );
    // One Binding per server address, though two URLs name it.
    let stun = run.line(&format!("✅ STUN 127.0.0.1:{p} "));
    assert!(stun.contains("mapped address 127.0.0.1:"), "{run}");
    assert!(run.line("✅ NAT:").contains("no NAT"), "{run}");
    let turn = run.line(&format!("✅ TURN turn:127.0.0.1:{p}?transport=udp"));
    assert!(
        turn.contains("allocation ok, relayed address 127.0.0.1:"),
        "{run}"
    );
    assert_eq!(run.verdict(), "p2p", "{run}");
    run.assert_no_secret(&[token.expose(), TURN_PASS]);
}

#[tokio::test]
async fn a_wrong_turn_credential_is_reported_and_without_stun_the_verdict_is_relay() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let coturn = Coturn::start(Auth::User).await;
    let turn_only = Coturn::start(Auth::UserNoStun).await;
    let token = server.token(TokenKind::Access, "alice");
    let run_with = |ice: String| {
        let (url, token) = (server.url(), token.clone());
        async move {
            doctor(
                &["--url", &url, "--timeout", "1s"],
                &[
                    ("COCOON_ACCESS_TOKEN", token.expose()),
                    ("WEBRTC_ICE_SERVERS", &ice),
                    ("WEBRTC_TURN_USERNAME", TURN_USER),
                    ("WEBRTC_TURN_CREDENTIAL", WRONG_PASS),
                ],
            )
            .await
        }
    };

    // STUN works (no NAT on loopback): p2p, with the TURN line failing.
    let p = coturn.port;
    let run = run_with(format!("stun:127.0.0.1:{p},turn:127.0.0.1:{p}")).await;
    let turn = run.line(&format!("❌ TURN turn:127.0.0.1:{p}:"));
    assert!(turn.contains("401"), "{run}");
    assert_eq!(run.verdict(), "p2p", "{run}");
    assert!(run.ok, "{run}");
    run.assert_no_secret(&[token.expose(), WRONG_PASS]);

    // A dead STUN server and a TURN-only server refusing the credential.
    let q = turn_only.port;
    let run = run_with(format!("stun:127.0.0.1:9,turn:127.0.0.1:{q}?transport=udp")).await;
    assert!(
        run.line("❌ STUN 127.0.0.1:9 ")
            .contains("no answer within 1s"),
        "{run}"
    );
    assert!(run.line("❌ NAT:").contains("no STUN answer"), "{run}");
    assert!(
        run.line(&format!("❌ TURN turn:127.0.0.1:{q}?transport=udp"))
            .contains("401"),
        "{run}"
    );
    assert_eq!(run.verdict(), "relay", "{run}");
    assert!(run.stdout.contains("ice-config/README.md"), "{run}");
    assert!(run.ok, "relay still works: exit 0: {run}");
    run.assert_no_secret(&[token.expose(), WRONG_PASS]);
}

#[tokio::test]
async fn an_unreachable_signaling_server_is_offline_within_the_timeouts() {
    let closed = free_port();
    let url = format!("ws://127.0.0.1:{closed}/ws");
    // Dead STUN and TURN servers too: every probe must give up in time.
    let run = doctor(
        &["--url", &url, "--timeout", "1s"],
        &[
            ("WEBRTC_ICE_SERVERS", "stun:127.0.0.1:9,turn:127.0.0.1:9"),
            ("WEBRTC_TURN_USERNAME", TURN_USER),
            ("WEBRTC_TURN_CREDENTIAL", TURN_PASS),
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.line("❌ Signaling:").contains(&url), "{run}");
    assert!(
        run.line("❌ TURN turn:127.0.0.1:9")
            .contains("no answer within 1s"),
        "{run}"
    );
    assert_eq!(run.verdict(), "offline", "{run}");
    // Signaling, then STUN and TURN side by side: about 1 s, far under 3.
    assert!(run.took < Duration::from_secs(4), "took {:?}", run.took);
    run.assert_no_secret(&[TURN_PASS]);
}

#[tokio::test]
async fn a_refused_token_is_offline() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let bad = "not-a-token-3f9a7c21";
    let run = doctor(
        &["--url", &server.url(), "--timeout", "1s"],
        &[("COCOON_ACCESS_TOKEN", bad), ("WEBRTC_ICE_SERVERS", "")],
    )
    .await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.line("❌ Signaling:")
            .contains("refused the access token (invalid_token"),
        "{run}"
    );
    assert_eq!(run.verdict(), "offline", "{run}");
    run.assert_no_secret(&[bad]);
}

#[tokio::test]
async fn without_a_token_the_server_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let run = doctor(
        &["--url", &server.url(), "--timeout", "1s"],
        &[("WEBRTC_ICE_SERVERS", "")],
    )
    .await;
    assert!(
        run.line("✅ Signaling:")
            .contains("speaks the cocoon protocol"),
        "{run}"
    );
    assert!(run.line("❌ ICE servers:").contains("none"), "{run}");
    assert_eq!(run.verdict(), "relay", "{run}");
    assert!(run.ok, "{run}");
}

#[tokio::test]
async fn turn_credentials_issued_by_the_server_are_tested() {
    let coturn = Coturn::start(Auth::RestSecret).await;
    let p = coturn.port;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.path().to_owned());
    config.ice = IceSettings {
        urls: vec![
            format!("stun:127.0.0.1:{p}"),
            format!("turn:127.0.0.1:{p}?transport=udp"),
            format!("turns:127.0.0.1:{p}"),
        ],
        turn_secret: Some(Secret::new(REST_SECRET)),
        ttl: Duration::from_secs(3600),
    };
    let server = TestServer::start_with(config).await;
    let token = server.token(TokenKind::Access, "alice");
    let run = doctor(
        &["--url", &server.url(), "--timeout", "2s"],
        &[
            ("COCOON_ACCESS_TOKEN", token.expose()),
            ("WEBRTC_ICE_SERVERS", ""),
        ],
    )
    .await;
    assert!(
        run.line("✅ Signaling:")
            .contains("hands out 3 STUN/TURN URL(s), TURN credentials valid for 1h"),
        "{run}"
    );
    assert!(
        run.line(&format!(
            "⚠️ ICE server turns:127.0.0.1:{p} (from the server)"
        ))
        .contains("skipped"),
        "{run}"
    );
    assert!(
        run.line(&format!("✅ TURN turn:127.0.0.1:{p}?transport=udp"))
            .contains("allocation ok"),
        "{run}"
    );
    assert_eq!(run.verdict(), "p2p", "{run}");
    assert!(run.ok, "{run}");
    run.assert_no_secret(&[token.expose(), REST_SECRET]);
}

#[tokio::test]
async fn a_port_range_and_nat_ips_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let coturn = Coturn::start(Auth::User).await;
    let token = server.token(TokenKind::Access, "alice");
    let min = free_port();
    let range = format!("{min}-{min}");
    let run = doctor(
        &["--url", &server.url(), "--timeout", "2s"],
        &[
            ("COCOON_ACCESS_TOKEN", token.expose()),
            (
                "WEBRTC_ICE_SERVERS",
                &format!("stun:127.0.0.1:{}", coturn.port),
            ),
            ("COCOON_WEBRTC_PORTS", &range),
            ("COCOON_WEBRTC_NAT_IPS", "127.0.0.1"),
            ("COCOON_WEBRTC_NETWORKS", "127.0.0.0/8"),
        ],
    )
    .await;
    // The probe went out from the range, and the port is free again after.
    assert!(
        run.line("✅ STUN")
            .contains(&format!("mapped address 127.0.0.1:{min} ")),
        "{run}"
    );
    let ports = run.line("✅ Ports:");
    assert!(
        ports.contains("1 of 1 tried are free")
            && ports.contains(&format!("-p {range}:{range}/udp")),
        "{run}"
    );
    assert!(run.line("✅ NAT IPs:").contains("matches"), "{run}");
    assert!(run.line("✅ Networks:").contains("127.0.0.0/8"), "{run}");
    assert_eq!(run.verdict(), "p2p", "{run}");
}
