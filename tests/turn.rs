//! Workers behind NAT, on a simulated network (see `common::natnet`): the
//! worker and the client sit behind two port-randomising NATs, coturn and
//! the signaling server on "the Internet" between them. The server hands
//! out ephemeral TURN credentials; sessions use TURN when nothing else
//! works, outlive their credentials, fall back to the WebSocket relay when
//! coturn is gone, and go peer to peer when the network allows.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cocoon::link::rtc::{Path, RtcConfig};
use cocoon::session::client::{PtyEvent, Session};
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::hub::Hub;
use cocoon_signaling::ice::IceSettings;
use cocoon_signaling::protocol::{DeviceId, Secret, UserId};
use cocoon_signaling::{Config, Server};
use common::natnet::{Host, NatNet, NatOptions};
use common::{DEADLINE, WorkerProcess, attach_request, device_id_in, plain_tls};
use tokio_util::sync::CancellationToken;

/// One simulated network at a time: each runs coturn, a server, a worker
/// and clients on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// coturn's `static-auth-secret`, shared with the signaling server.
const TURN_SECRET: &str = "coturn-and-the-signaling-server-share-this";

/// The signaling server, running in `pub` on a thread of its own.
struct PubServer {
    url: String,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl PubServer {
    fn start(net: &NatNet, ttl: Duration, web_root: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(SocketAddr::from((NatNet::PUB_IP, 0)), dir.path().to_owned());
        let turn = format!("{}:{}", NatNet::PUB_IP, NatNet::TURN_PORT);
        let alt = format!("{}:{}", NatNet::PUB_IP, NatNet::TURN_ALT_PORT);
        config.ice = IceSettings {
            urls: vec![
                format!("stun:{turn}"),
                format!("stun:{alt}"),
                format!("turn:{turn}?transport=udp"),
            ],
            turn_secret: Some(Secret::new(TURN_SECRET)),
            ttl,
        };
        if web_root {
            config.web_root = Some(common::web_root());
        }
        let shutdown = CancellationToken::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = shutdown.clone();
        let thread = net.spawn_in(Host::Pub, move || async move {
            let server = Server::bind(config).await.expect("server binds");
            tx.send((server.local_addr(), server.hub().clone()))
                .unwrap();
            server.run(stop).await.expect("server runs");
        });
        let (addr, hub) = rx.recv_timeout(DEADLINE).expect("the server starts");
        Self {
            url: format!("ws://{addr}/ws"),
            hub,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn token(&self, kind: TokenKind) -> Secret {
        Secret::new(
            self.hub
                .tokens()
                .mint(kind, &UserId::new("alice"), Duration::from_secs(3600)),
        )
    }
}

impl Drop for PubServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The network, coturn, the server and a worker behind its NAT.
struct World {
    server: PubServer,
    worker: WorkerProcess,
    device: DeviceId,
    _worker_dir: tempfile::TempDir,
    // Last: the namespaces go after everything that runs in them.
    net: NatNet,
}

impl World {
    async fn start(options: NatOptions, ttl: Duration, worker_env: &[(&str, &str)]) -> Self {
        let mut net = NatNet::create(options);
        net.start_coturn(TURN_SECRET);
        let server = PubServer::start(&net, ttl, false);
        Self::with(net, server, worker_env).await
    }

    async fn with(net: NatNet, server: PubServer, worker_env: &[(&str, &str)]) -> Self {
        // What the client and the worker said shows when a test fails.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
        let worker_dir = tempfile::tempdir().unwrap();
        let setup = server.token(TokenKind::Setup);
        // Only what the server issues: no configured STUN server at all.
        let mut env = vec![
            ("COCOON_SETUP_TOKEN", setup.expose()),
            ("WEBRTC_ICE_SERVERS", ""),
            ("RUST_LOG", "info"),
        ];
        env.extend_from_slice(worker_env);
        let mut worker = WorkerProcess::spawn_in_named(
            net.ns(Host::Worker),
            &server.url,
            worker_dir.path(),
            &env,
        );
        let device = device_id_in(&worker.expect_line("🆔 Device ID: ").await);
        Self {
            server,
            worker,
            device,
            _worker_dir: worker_dir,
            net,
        }
    }

    /// Runs `scenario` with a session from the client's host.
    async fn client<F, Fut, T>(&self, scenario: F) -> T
    where
        F: FnOnce(Session) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let url = self.server.url.clone();
        let token = self.server.token(TokenKind::Access);
        let device = self.device.clone();
        self.net
            .run_in(Host::Client, move || async move {
                scenario(connect(&url, &token, &device).await).await
            })
            .await
    }
}

/// A session with WebRTC and no ICE servers but the ones the server issues.
async fn connect(url: &str, token: &Secret, device: &DeviceId) -> Session {
    Session::connect_with(url, token, plain_tls(), device, Some(RtcConfig::default()))
        .await
        .expect("session connects")
}

/// `cocoon doctor` on the worker's host, with the server's ICE servers
/// only; returns the word after `Verdict: `.
async fn doctor(world: &World) -> String {
    let token = world.server.token(TokenKind::Access);
    let output = tokio::process::Command::new("ip")
        .args(["netns", "exec", world.net.ns(Host::Worker)])
        .arg(env!("CARGO_BIN_EXE_cocoon"))
        .args(["doctor", "--url", &world.server.url, "--timeout", "2s"])
        .env("COCOON_ACCESS_TOKEN", token.expose())
        .env("WEBRTC_ICE_SERVERS", "")
        .env_remove("SIGNALING_SERVER_URL")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the doctor finishes")
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(!text.contains(token.expose()), "the token never shows");
    text.lines()
        .find_map(|line| line.strip_prefix("Verdict: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no verdict in {text}"))
        .trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_owned()
}

/// Waits until the session's path is `want`; returns the candidate types.
async fn wait_for_path(session: &Session, want: Path) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = session.path().await.unwrap();
        if status.path == want {
            return status.candidates.unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "still {:?} instead of {want:?}: {status:?}",
            status.path
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types `command` into a fresh shell and waits for `answer` on a line.
async fn echo(session: &Session, command: &str, answer: &str) {
    let mut pty = session
        .attach_pty(attach_request(Some("exec bash --norc --noprofile")))
        .await
        .unwrap();
    pty.write(format!("{command}\n").as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    // The typed line shows the expression, never its value.
    let wanted = format!("{answer}\r\n");
    while !String::from_utf8_lossy(&seen).contains(&wanted) {
        match tokio::time::timeout(DEADLINE, pty.next()).await {
            Ok(Some(PtyEvent::Output(bytes))) => seen.extend_from_slice(&bytes),
            other => panic!(
                "no {answer:?}: {other:?} after {:?}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    pty.close().await.unwrap();
}

#[tokio::test]
async fn a_session_through_turn_outlives_its_credentials() {
    let _one = ONE_AT_A_TIME.lock().await;
    const TTL: Duration = Duration::from_secs(20);
    let world = World::start(
        NatOptions {
            worker_nat_hard: true,
            client_nat_hard: true,
            block_direct_udp: true,
        },
        TTL,
        &[],
    )
    .await;
    // A line every 100 ms for two minutes past the credentials' lifetime.
    let lines = (TTL + Duration::from_secs(125)).as_millis() / 100;
    let printer =
        format!("i=0; while [ $i -lt {lines} ]; do echo line-$i; i=$((i+1)); sleep 0.1; done");
    let (output, turn_after_expiry, relayed_pair) = world
        .client(move |session| async move {
            let mut pty = session
                .attach_pty(attach_request(Some(&printer)))
                .await
                .unwrap();
            let pair = wait_for_path(&session, Path::Turn).await;
            let started = Instant::now();
            let mut output = Vec::new();
            let mut turn_after_expiry = false;
            let mut next_check = Instant::now();
            loop {
                match tokio::time::timeout(DEADLINE, pty.next()).await {
                    Ok(Some(PtyEvent::Output(bytes))) => output.extend_from_slice(&bytes),
                    Ok(Some(PtyEvent::Exited(code))) => {
                        assert_eq!(code, 0);
                        break;
                    }
                    other => panic!("the session broke: {other:?}"),
                }
                if Instant::now() >= next_check {
                    next_check = Instant::now() + Duration::from_secs(1);
                    let path = session.path().await.unwrap().path;
                    if started.elapsed() > TTL + Duration::from_secs(60) && path == Path::Turn {
                        turn_after_expiry = true;
                    }
                }
            }
            (output, turn_after_expiry, pair)
        })
        .await;
    assert!(
        relayed_pair.0 == "relay" || relayed_pair.1 == "relay",
        "{relayed_pair:?}"
    );
    // Every line exactly once, in order: nothing lost or repeated while the
    // connection was replaced with fresh credentials.
    let text = String::from_utf8(output).unwrap();
    let got: Vec<&str> = text.lines().map(str::trim_end).collect();
    let want: Vec<String> = (0..lines).map(|i| format!("line-{i}")).collect();
    assert_eq!(got, want);
    assert!(
        turn_after_expiry,
        "TURN carried the session again long after the first credentials expired"
    );
    drop(world.worker);
}

#[tokio::test]
async fn without_coturn_sessions_use_the_relay_and_come_back_to_turn() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut world = World::start(
        NatOptions {
            worker_nat_hard: true,
            client_nat_hard: true,
            block_direct_udp: true,
        },
        Duration::from_secs(3600),
        &[],
    )
    .await;
    let (to_client, mut from_test) = tokio::sync::mpsc::channel::<()>(1);
    let (to_test, mut from_client) = tokio::sync::mpsc::channel::<()>(1);
    let url = world.server.url.clone();
    let token = world.server.token(TokenKind::Access);
    let device = world.device.clone();
    let first = world.net.spawn_in(Host::Client, move || async move {
        let session = connect(&url, &token, &device).await;
        wait_for_path(&session, Path::Turn).await;
        echo(&session, "echo $((6*7))", "42").await;
        to_test.send(()).await.unwrap();
        // coturn is stopped now: back to the relay, and still working.
        from_test.recv().await.unwrap();
        wait_for_path(&session, Path::Relay).await;
        echo(&session, "echo $((7*7))", "49").await;
        to_test.send(()).await.unwrap();
    });
    from_client.recv().await.unwrap();
    assert_eq!(
        doctor(&world).await,
        "turn",
        "hard NATs, a working TURN server"
    );
    world.net.stop_coturn();
    to_client.send(()).await.unwrap();
    from_client.recv().await.unwrap();
    first.join().expect("the first session kept working");
    assert_eq!(doctor(&world).await, "relay", "hard NATs and no TURN");

    // coturn is back: a new session uses it again.
    world.net.start_coturn(TURN_SECRET);
    world
        .client(|session| async move {
            wait_for_path(&session, Path::Turn).await;
            echo(&session, "echo $((8*8))", "64").await;
        })
        .await;
}

#[tokio::test]
async fn without_the_udp_block_sessions_go_peer_to_peer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let world = World::start(
        NatOptions {
            worker_nat_hard: false,
            client_nat_hard: false,
            block_direct_udp: false,
        },
        Duration::from_secs(3600),
        &[],
    )
    .await;
    let pair = world
        .client(|session| async move {
            let pair = wait_for_path(&session, Path::Direct).await;
            echo(&session, "echo $((6*7))", "42").await;
            pair
        })
        .await;
    assert!(pair.0 != "relay" && pair.1 != "relay", "{pair:?}");
    assert_eq!(doctor(&world).await, "p2p", "easy NATs");
}

#[tokio::test]
async fn chromium_behind_a_nat_gets_its_terminal_through_turn() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut net = NatNet::create(NatOptions {
        worker_nat_hard: true,
        client_nat_hard: true,
        block_direct_udp: true,
    });
    net.start_coturn(TURN_SECRET);
    let server = PubServer::start(&net, Duration::from_secs(3600), true);
    let world = World::with(net, server, &[]).await;
    let base = world
        .server
        .url
        .replace("ws://", "http://")
        .replace("/ws", "");
    let token = world.server.token(TokenKind::Access);
    common::drive_browser(world.net.ns(Host::Client), &base, &token, "turn").await;
}

#[tokio::test]
async fn a_pinned_port_range_and_a_one_to_one_nat_give_a_direct_path() {
    let _one = ONE_AT_A_TIME.lock().await;
    // A container's case: the worker's NAT randomises ports, but forwards a
    // published range to the worker, which announces the public address.
    let mut net = NatNet::create(NatOptions {
        worker_nat_hard: true,
        client_nat_hard: true,
        block_direct_udp: false,
    });
    let public = NatNet::WORKER_NAT_IP.to_string();
    net.exec(
        Host::NatW,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &public,
            "-p",
            "udp",
            "--dport",
            "40000:40009",
            "-j",
            "DNAT",
            "--to-destination",
            &NatNet::WORKER_IP.to_string(),
        ],
    );
    net.start_coturn(TURN_SECRET);
    let server = PubServer::start(&net, Duration::from_secs(3600), false);
    // No TURN for this worker: only its own announced address can work.
    net.stop_coturn();
    let world = World::with(
        net,
        server,
        &[
            ("COCOON_WEBRTC_PORTS", "40000-40009"),
            ("COCOON_WEBRTC_NAT_IPS", &public),
        ],
    )
    .await;
    let (pair, remote) = world
        .client(|session| async move {
            let pair = wait_for_path(&session, Path::Direct).await;
            echo(&session, "echo $((6*7))", "42").await;
            (pair, session.path().await.unwrap().remote_address.unwrap())
        })
        .await;
    let (ip, port) = remote.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    assert_eq!(
        ip, public,
        "the announced address carries the session ({pair:?})"
    );
    assert!(
        (40000..=40009).contains(&port),
        "port {port} is in the range"
    );
}
