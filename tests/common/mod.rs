//! Test harness: a real signaling server on loopback port 0, real worker
//! processes, and raw WebSocket peers for sending what clients should not.

#![allow(dead_code)]

pub mod http;
pub mod natnet;
pub mod netns;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use cocoon::client::{Client, ServerError};
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::hub::Hub;
use cocoon_signaling::protocol::{ErrorCode, FromServer, Secret, ToServer, UserId};
use cocoon_signaling::{Config, Server, TlsFiles};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// How long any awaited event may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A signaling server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    pub hub: Arc<Hub>,
    pub tls: bool,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    /// Set when started with `start_restartable`: the address clients use
    /// and the data dir to come back with.
    door: Option<(FrontDoor, PathBuf)>,
}

impl TestServer {
    /// Starts on 127.0.0.1:0 with `data_dir`.
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(Config::new(([127, 0, 0, 1], 0).into(), data_dir.to_owned())).await
    }

    /// Starts behind a [`FrontDoor`], for a test that restarts the server:
    /// clients and workers keep one address across [`halt`](Self::halt) and
    /// [`Halted::start`], and that port is never given back to the kernel —
    /// a port released, even one outside the ephemeral range, is anyone's
    /// to take before the server binds it again.
    pub async fn start_restartable(data_dir: &Path) -> Self {
        Self::start_behind(FrontDoor::open().await, data_dir).await
    }

    async fn start_behind(door: FrontDoor, data_dir: &Path) -> Self {
        let mut server = Self::start(data_dir).await;
        door.lead_to(Some(server.addr));
        server.addr = door.addr;
        server.door = Some((door, data_dir.to_owned()));
        server
    }

    /// Stops the server like [`stop`](Self::stop), keeping its address:
    /// until [`Halted::start`], connections to it are closed at once.
    pub async fn halt(mut self) -> Halted {
        let (door, data_dir) = self
            .door
            .take()
            .expect("only a server from start_restartable can be halted");
        door.lead_to(None);
        self.stop().await;
        Halted { door, data_dir }
    }

    /// Starts with a full configuration.
    pub async fn start_with(config: Config) -> Self {
        let tls = config.tls.is_some();
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.local_addr();
        let hub = server.hub().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            hub,
            tls,
            shutdown,
            task: Some(task),
            door: None,
        }
    }

    /// The `/ws` URL (`wss://localhost:…` when serving TLS).
    pub fn url(&self) -> String {
        if self.tls {
            format!("wss://localhost:{}/ws", self.addr.port())
        } else {
            format!("ws://{}/ws", self.addr)
        }
    }

    /// Mints a token signed by this server.
    pub fn token(&self, kind: TokenKind, owner: &str) -> Secret {
        Secret::new(
            self.hub
                .tokens()
                .mint(kind, &UserId::new(owner), Duration::from_secs(3600)),
        )
    }

    /// An authenticated client of `owner`.
    pub async fn client(&self, owner: &str) -> Client {
        Client::connect(
            &self.url(),
            &self.token(TokenKind::Access, owner),
            plain_tls(),
        )
        .await
        .expect("client authenticates")
    }

    /// Stops the server and waits until every connection is closed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A signaling server stopped by [`TestServer::halt`].
pub struct Halted {
    door: FrontDoor,
    data_dir: PathBuf,
}

impl Halted {
    /// Starts the server again, at the same address, on the same data dir.
    pub async fn start(self) -> TestServer {
        TestServer::start_behind(self.door, &self.data_dir).await
    }
}

/// A loopback port a test holds for its whole run, forwarding each
/// connection to whatever listens behind it now: a server restarts behind
/// it on a new port while its peers keep the old address. With nothing
/// behind it, a connection is closed as soon as it is accepted.
pub struct FrontDoor {
    pub addr: SocketAddr,
    backend: Arc<std::sync::Mutex<Option<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl FrontDoor {
    pub async fn open() -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
        let current = backend.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let Some(behind) = *current.lock().unwrap() else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(behind).await {
                        let _ = up.set_nodelay(true);
                        let _ = down.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        Self {
            addr,
            backend,
            task,
        }
    }

    /// Sends new connections to `backend` (none: closes them).
    pub fn lead_to(&self, backend: Option<SocketAddr>) {
        *self.backend.lock().unwrap() = backend;
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TLS settings with only the system roots.
pub fn plain_tls() -> Arc<rustls::ClientConfig> {
    cocoon::tls::client_config(None).unwrap()
}

/// Writes a CA and a server certificate for `localhost`/127.0.0.1 into
/// `dir`; returns the server's TLS files and the CA file.
pub fn make_certificates(dir: &Path) -> (TlsFiles, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (files, ca_file)
}

/// A `cocoon run` child process whose stdout is read line by line.
pub struct WorkerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

/// Environment variables a test worker must not inherit from the test run.
const WORKER_ENV: &[&str] = &[
    "SIGNALING_SERVER_URL",
    "COCOON_SECRET",
    "COCOON_SETUP_TOKEN",
    "COCOON_NAME",
    "COCOON_SERVICES",
    "COCOON_DATA_DIR",
    "COCOON_CA_FILE",
];

impl WorkerProcess {
    /// Starts `cocoon run --url URL --data-dir DIR` with extra environment.
    pub fn spawn(url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(
            Command::new(env!("CARGO_BIN_EXE_cocoon")),
            url,
            data_dir,
            env,
        )
    }

    /// Like [`WorkerProcess::spawn`], as the unprivileged user `nobody`
    /// (needs root; the data dir is handed to that user).
    pub fn spawn_as_nobody(url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        std::os::unix::fs::chown(data_dir, Some(65534), Some(65534)).expect("chown the data dir");
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_cocoon"));
        Self::spawn_with(command, url, data_dir, env)
    }

    /// Like [`WorkerProcess::spawn`], inside a network namespace.
    pub fn spawn_in(ns: &netns::Netns, url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_in_named(&ns.name, url, data_dir, env)
    }

    /// Like [`WorkerProcess::spawn`], inside the named network namespace.
    pub fn spawn_in_named(ns: &str, url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_cocoon"));
        Self::spawn_with(command, url, data_dir, env)
    }

    fn spawn_with(mut command: Command, url: &str, data_dir: &Path, env: &[(&str, &str)]) -> Self {
        command
            .arg("run")
            .arg("--url")
            .arg(url)
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn");
        Self::from_command(command, env)
    }

    /// Starts any cocoon command, its output collected line by line like a
    /// worker's.
    pub fn from_command(mut command: Command, env: &[(&str, &str)]) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for key in WORKER_ENV {
            command.env_remove(key);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("cocoon binary starts");
        let (tx, lines) = mpsc::unbounded_channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    pub async fn expect_line(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "worker output ended before {needle:?}; saw {:#?}",
                    self.seen
                ),
                Err(_) => panic!("no line with {needle:?} in time; saw {:#?}", self.seen),
            }
        }
    }

    /// Expects these lines, in this order (other lines may come between).
    pub async fn expect_lines(&mut self, needles: &[&str]) {
        for needle in needles {
            self.expect_line(needle).await;
        }
    }

    /// Waits for the process to exit; returns its status and all output.
    pub async fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("worker exits in time")
            .unwrap();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(2), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        (status, self.seen.join("\n"))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Asks the process to stop (SIGTERM) and waits for it to exit.
    pub async fn terminate(self) -> (ExitStatus, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.wait_exit().await
    }

    /// Kills the process and waits for it.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }
}

impl Drop for WorkerProcess {
    /// A failing test shows what the process said last.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        let tail = &self.seen[self.seen.len().saturating_sub(60)..];
        eprintln!("--- the process's last lines ---\n{}", tail.join("\n"));
    }
}

/// A WebSocket peer that can send anything.
pub struct RawPeer {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl RawPeer {
    pub async fn connect(url: &str) -> Self {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("raw connect");
        Self { stream }
    }

    /// A protocol-level worker registered with a fresh secret and
    /// `setup_token`, and the server's notice about the token if it refused
    /// it.
    pub async fn register(
        url: &str,
        setup_token: &Secret,
    ) -> (
        Self,
        cocoon_signaling::protocol::DeviceId,
        Option<ErrorCode>,
    ) {
        let mut device = Self::connect(url).await;
        device
            .send(&ToServer::Register {
                secret: cocoon_signaling::identity::generate_secret(),
                device_id: None,
                setup_token: Some(setup_token.clone()),
                name: None,
            })
            .await;
        let mut notice = None;
        loop {
            match device.recv().await {
                Some(FromServer::Error { code, .. }) => notice = Some(code),
                Some(FromServer::Registered { device_id, .. }) => {
                    return (device, device_id, notice);
                }
                other => panic!("expected registered, got {other:?}"),
            }
        }
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.stream.send(Message::text(text.into())).await.unwrap();
    }

    pub async fn send(&mut self, message: &ToServer) {
        self.send_text(serde_json::to_string(message).unwrap())
            .await;
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.stream.send(Message::binary(bytes)).await.unwrap();
    }

    /// The next protocol message; `None` when the server closed.
    pub async fn recv(&mut self) -> Option<FromServer> {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.stream.next())
                .await
                .expect("a frame in time");
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next message must be an error with `code`; returns its text.
    pub async fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.recv().await {
            Some(FromServer::Error { code: got, message }) if got == code => message,
            other => panic!("expected a {code:?} error, got {other:?}"),
        }
    }

    /// Every message up to the server's close frame, and its close code.
    pub async fn until_closed(&mut self) -> (Vec<FromServer>, Option<u16>) {
        let mut messages = Vec::new();
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.stream.next())
                .await
                .expect("a frame in time");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    messages.push(serde_json::from_str(&text).unwrap())
                }
                Some(Ok(Message::Close(frame))) => {
                    return (messages, frame.map(|frame| frame.code.into()));
                }
                None | Some(Err(_)) => return (messages, None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// After a fatal error the server closes the connection.
    pub async fn expect_closed(&mut self) {
        assert_eq!(self.recv().await, None, "connection should be closed");
    }
}

/// The error code inside an `anyhow` error from the client library.
pub fn server_error_code(err: &anyhow::Error) -> Option<ErrorCode> {
    err.downcast_ref::<ServerError>().map(|e| e.code)
}

/// A worker process registered with a test server and claimed by `owner`,
/// plus an authenticated client of that owner.
pub struct Rig {
    pub server: TestServer,
    pub worker: WorkerProcess,
    pub client: Client,
    pub device_id: cocoon_signaling::protocol::DeviceId,
    pub worker_dir: tempfile::TempDir,
    _server_dir: tempfile::TempDir,
}

/// Where a rig's worker runs.
#[derive(Clone, Copy)]
enum Place<'a> {
    Here,
    Nobody,
    Netns(&'a netns::Netns),
    Facing(&'a netns::Netns),
    /// As `Facing`, with the server serving the browser client.
    Browser(&'a netns::Netns),
}

/// The device id on a worker's "🆔 Device ID: …" line.
pub fn device_id_in(line: &str) -> cocoon_signaling::protocol::DeviceId {
    line.split("Device ID: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(cocoon_signaling::protocol::DeviceId::new)
        .expect("a device id on the line")
}

/// The client side of [`Rig::start_in`]: candidates on this side of the link.
pub fn netns_rtc(ns: &netns::Netns) -> cocoon::link::rtc::RtcConfig {
    cocoon::link::rtc::RtcConfig {
        allowed_networks: vec![
            cocoon::link::rtc::parse_network(&format!("{}/32", ns.host_ip)).unwrap(),
        ],
        ..Default::default()
    }
}

impl Rig {
    /// Like [`Rig::start_facing`], with the server serving the browser
    /// client from `examples/web/dist` (built by `./scripts/test`).
    pub async fn start_for_browser(ns: &netns::Netns, env: &[(&str, &str)]) -> Self {
        Self::start_at(env, Place::Browser(ns)).await
    }

    /// Starts a server, a worker (with extra environment) and a client.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_as(env, false).await
    }

    /// Like [`Rig::start`], with the worker running as `nobody` if asked.
    pub async fn start_as(env: &[(&str, &str)], nobody: bool) -> Self {
        let place = if nobody { Place::Nobody } else { Place::Here };
        Self::start_at(env, place).await
    }

    /// A rig whose worker runs in a namespace and reaches the server (and
    /// the test's clients) over the namespace's veth link only, WebRTC
    /// included (see [`netns_rtc`] for the client side).
    pub async fn start_in(ns: &netns::Netns, env: &[(&str, &str)]) -> Self {
        Self::start_at(env, Place::Netns(ns)).await
    }

    /// A rig whose server and worker stay here but use only this side of a
    /// namespace's link — for a client that runs inside the namespace.
    pub async fn start_facing(ns: &netns::Netns, env: &[(&str, &str)]) -> Self {
        Self::start_at(env, Place::Facing(ns)).await
    }

    async fn start_at(env: &[(&str, &str)], place: Place<'_>) -> Self {
        let server_dir = tempfile::tempdir().unwrap();
        let worker_dir = tempfile::tempdir().unwrap();
        let listen = match place {
            Place::Netns(ns) | Place::Facing(ns) | Place::Browser(ns) => (ns.host_ip, 0).into(),
            _ => ([127, 0, 0, 1], 0).into(),
        };
        let mut config = Config::new(listen, server_dir.path().to_owned());
        if let Place::Browser(_) = place {
            config.web_root = Some(web_root());
        }
        let server = TestServer::start_with(config).await;
        let setup = server.token(TokenKind::Setup, "alice");
        let mut all_env = vec![("COCOON_SETUP_TOKEN", setup.expose())];
        let networks = match place {
            Place::Netns(ns) => format!("{}/32", ns.ns_ip),
            Place::Facing(ns) | Place::Browser(ns) => format!("{}/32", ns.host_ip),
            _ => String::new(),
        };
        if let Place::Netns(_) | Place::Facing(_) | Place::Browser(_) = place {
            all_env.extend([
                ("WEBRTC_ICE_SERVERS", ""),
                ("COCOON_WEBRTC_NETWORKS", networks.as_str()),
            ]);
        }
        all_env.extend_from_slice(env);
        let url = server.url();
        let mut worker = match place {
            Place::Here | Place::Facing(_) | Place::Browser(_) => {
                WorkerProcess::spawn(&url, worker_dir.path(), &all_env)
            }
            Place::Nobody => WorkerProcess::spawn_as_nobody(&url, worker_dir.path(), &all_env),
            Place::Netns(ns) => WorkerProcess::spawn_in(ns, &url, worker_dir.path(), &all_env),
        };
        let line = worker.expect_line("🆔 Device ID: ").await;
        let device_id = device_id_in(&line);
        let client = server.client("alice").await;
        Self {
            server,
            worker,
            client,
            device_id,
            worker_dir,
            _server_dir: server_dir,
        }
    }

    /// Sends a request to the worker.
    pub async fn send(&mut self, request: &cocoon_signaling::protocol::service::Request) {
        let payload = serde_json::to_value(request).unwrap();
        self.client
            .send(Some(&self.device_id), payload)
            .await
            .unwrap();
    }

    /// Sends a raw JSON payload to the worker.
    pub async fn send_json(&mut self, payload: serde_json::Value) {
        self.client
            .send(Some(&self.device_id), payload)
            .await
            .unwrap();
    }

    /// The next response from the worker.
    pub async fn recv(&mut self) -> cocoon_signaling::protocol::service::Response {
        recv_response(&mut self.client).await
    }

    /// Skips responses until an error, which must have `code`.
    pub async fn expect_error(
        &mut self,
        code: cocoon_signaling::protocol::service::ServiceErrorCode,
    ) {
        use cocoon_signaling::protocol::service::Response;
        let response = self
            .recv_until(|r| matches!(r, Response::Error { .. }).then_some(r))
            .await;
        assert!(
            matches!(&response, Response::Error { code: got, .. } if *got == code),
            "expected a {code:?} error, got {response:?}"
        );
    }

    /// The first response `pick` accepts; others are skipped.
    pub async fn recv_until<T>(
        &mut self,
        mut pick: impl FnMut(cocoon_signaling::protocol::service::Response) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let response = tokio::time::timeout_at(deadline, self.recv())
                .await
                .expect("the expected response in time");
            if let Some(found) = pick(response) {
                return found;
            }
        }
    }
}

/// The next service response a client receives.
pub async fn recv_response(client: &mut Client) -> cocoon_signaling::protocol::service::Response {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("connection open");
        match message {
            FromServer::SyncData { payload, .. } => {
                return serde_json::from_value(payload.clone())
                    .unwrap_or_else(|e| panic!("{e}: {payload}"));
            }
            FromServer::Error { code, message } => panic!("server error {code:?}: {message}"),
            _ => continue,
        }
    }
}

impl Rig {
    /// A session-layer connection to the rig's worker, as its owner.
    pub async fn session(&self) -> cocoon::session::client::Session {
        cocoon::session::client::Session::connect(
            &self.server.url(),
            &self.server.token(TokenKind::Access, "alice"),
            plain_tls(),
            &self.device_id,
        )
        .await
        .expect("session connects")
    }
}

/// A STUN server that never answers (nothing listens there): gathering
/// must not wait for it, as with the unreachable default on closed networks.
pub const DEAD_STUN: &str = "stun:127.0.0.1:9";

/// Worker environment for WebRTC on loopback only (a dead STUN server, no
/// other interface is ever used).
pub const LOOPBACK_RTC_ENV: &[(&str, &str)] = &[
    ("WEBRTC_ICE_SERVERS", DEAD_STUN),
    ("COCOON_WEBRTC_LOOPBACK", "true"),
    ("COCOON_WEBRTC_NETWORKS", "127.0.0.1/32"),
];

/// The client side of [`LOOPBACK_RTC_ENV`].
pub fn loopback_rtc() -> cocoon::link::rtc::RtcConfig {
    cocoon::link::rtc::RtcConfig {
        ice_servers: cocoon::link::rtc::parse_ice_servers(DEAD_STUN, None, None).unwrap(),
        include_loopback: true,
        allowed_networks: vec![cocoon::link::rtc::parse_network("127.0.0.1/32").unwrap()],
        ..Default::default()
    }
}

impl Rig {
    /// A session that moves to a WebRTC data channel when it can.
    pub async fn rtc_session(
        &self,
        rtc: cocoon::link::rtc::RtcConfig,
    ) -> cocoon::session::client::Session {
        cocoon::session::client::Session::connect_with(
            &self.server.url(),
            &self.server.token(TokenKind::Access, "alice"),
            plain_tls(),
            &self.device_id,
            Some(rtc),
        )
        .await
        .expect("session connects")
    }
}

/// Everything a terminal prints until it exits, and its exit code; a gap
/// or a snapshot fails the test (a live client gets every byte).
pub async fn drain_pty(pty: &mut cocoon::session::client::Pty) -> (Vec<u8>, i32) {
    use cocoon::session::client::PtyEvent;
    let mut output = Vec::new();
    loop {
        let Ok(next) = tokio::time::timeout(DEADLINE, pty.next()).await else {
            panic!("output stalled after {} bytes", output.len());
        };
        match next.expect("the session is alive") {
            PtyEvent::Output(bytes) => output.extend_from_slice(&bytes),
            PtyEvent::Exited(code) => return (output, code),
            other => panic!("a live client got {other:?}"),
        }
    }
}

/// An 80x24 `attach_pty` running `command` (the login shell for `None`).
pub fn attach_request(command: Option<&str>) -> cocoon_signaling::protocol::service::AttachPty {
    cocoon_signaling::protocol::service::AttachPty {
        request_id: None,
        command: command.map(str::to_owned),
        cols: 80,
        rows: 24,
        env: None,
        cwd: None,
        flow_control: false,
        stream: None,
    }
}

/// An `execute` of `command` with every option at its default.
pub fn execute_request(command: &str) -> cocoon_signaling::protocol::service::Execute {
    cocoon_signaling::protocol::service::Execute {
        request_id: None,
        command: command.into(),
        input: None,
        timeout_secs: None,
        env: None,
        cwd: None,
        stream: false,
    }
}

/// The built browser client; a clear failure when it was not built.
pub fn web_root() -> PathBuf {
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/web/dist");
    assert!(
        dist.join("index.html").is_file() && dist.join("app.js").is_file(),
        "the browser client is not built: run ./scripts/test, or \
         npm --prefix examples/web ci && npm --prefix examples/web run build"
    );
    dist
}

/// One Chromium at a time: on two cores, parallel browsers would make the
/// scenarios that check responsiveness measure each other.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a scenario of `tests/browser/driver.mjs` in Chromium inside the
/// network namespace `ns`, against the server at `base` (`http://IP:PORT`,
/// reachable from there), signed in with `token`. Its output goes to the
/// test's; a failing scenario fails the test.
pub async fn drive_browser(ns: &str, base: &str, token: &Secret, scenario: &str) {
    web_root();
    let _turn = ONE_BROWSER.lock().await;
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-artifacts");
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/driver.mjs");
    let status = Command::new("ip")
        .args(["netns", "exec", ns, "node"])
        .arg(&driver)
        .arg(scenario)
        .env("COCOON_PAGE", format!("{base}/#token={}", token.expose()))
        .env("COCOON_HEALTH", format!("{base}/health"))
        .env("COCOON_ARTIFACTS", &artifacts)
        .env(
            "COCOON_HOST_NETNS",
            format!("/proc/{}/ns/net", std::process::id()),
        )
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(120), status)
        .await
        .unwrap_or_else(|_| panic!("scenario {scenario} hung"))
        .expect("node runs");
    assert!(
        status.success(),
        "scenario {scenario} failed (its output is above)"
    );
}

/// A free loopback address for a program that must be told its port
/// (`nats-server`), below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`) so that no outgoing connection takes it
/// between this probe and the program's bind.
pub fn free_port_addr() -> SocketAddr {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let floor = 10_000.min(low / 2);
    let span = u32::from(low - floor);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    for attempt in 0..span {
        let port = floor + ((seed.wrapping_add(attempt.wrapping_mul(7919))) % span) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {floor}..{low}");
}

/// Percentiles, process statistics and health checks for the load and soak
/// tests.
pub mod measure;

/// Reads a terminal's output until exactly `expected` has come: other
/// bytes, more bytes, an event other than output, or nothing in time is an
/// error.
pub async fn expect_exactly(
    pty: &mut cocoon::session::client::Pty,
    expected: &[u8],
) -> anyhow::Result<()> {
    use cocoon::session::client::PtyEvent;
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match tokio::time::timeout(DEADLINE, pty.next()).await {
            Ok(Some(PtyEvent::Output(bytes))) => got.extend_from_slice(&bytes),
            Ok(other) => anyhow::bail!("expected output, got {other:?}"),
            Err(_) => anyhow::bail!(
                "stalled after {:?} of {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(expected)
            ),
        }
    }
    anyhow::ensure!(
        got == expected,
        "expected {:?}, got {:?}",
        String::from_utf8_lossy(expected),
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

/// A terminal that echoes each line it is typed once, and says `READY`
/// before it reads: `cat` with the terminal's own echo off.
pub const ECHO_TERMINAL: &str = "stty -echo && echo READY && exec cat";
