//! Several signaling servers acting as one, on NATS: a real `nats-server`
//! with JetStream on a loopback port, three instances in this process (each
//! with its own data dir, sharing nothing but NATS), and real workers.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cocoon::link::rtc::Path as LinkPath;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::cluster::NatsOptions;
use cocoon_signaling::hub::Hub;
use cocoon_signaling::protocol::{
    DeviceId, ErrorCode, FromServer, HiveKind, Secret, ToServer, UserId,
};
use cocoon_signaling::{Config, Server};
use common::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// A `nats-server` with JetStream, on loopback behind a front door (its
/// address stays when it restarts), killed on drop.
struct NatsServer {
    child: Child,
    url: String,
    door: FrontDoor,
    store: tempfile::TempDir,
}

impl NatsServer {
    async fn start() -> Self {
        let store = tempfile::tempdir().unwrap();
        let door = FrontDoor::open().await;
        let child = Self::spawn(&door, store.path()).await;
        Self {
            child,
            url: format!("nats://{}", door.addr),
            door,
            store,
        }
    }

    /// Kills it and starts it again, at the same address, on the same store.
    async fn restart(&mut self) {
        self.door.lead_to(None);
        let _ = self.child.kill().await;
        self.child = Self::spawn(&self.door, self.store.path()).await;
    }

    async fn spawn(door: &FrontDoor, store: &Path) -> Child {
        let port = free_port_addr().port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server runs (Debian's nats-server package; scripts/test installs it)");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server listens"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        door.lead_to(Some(SocketAddr::from(([127, 0, 0, 1], port))));
        child
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A signaling instance on a runtime of its own, so that it can die the way
/// a process does: every task and socket dropped at once, nothing said to
/// NATS or to its peers.
struct Instance {
    addr: SocketAddr,
    hub: Arc<Hub>,
    /// `true` kills, `false` shuts down cleanly.
    stop: Option<oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    async fn start(config: Config) -> Self {
        let (ready, started) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let server = Server::bind(config).await.expect("instance binds");
                let _ = ready.send((server.local_addr(), server.hub().clone()));
                let shutdown = CancellationToken::new();
                let run = tokio::spawn(server.run(shutdown.clone()));
                if !stopped.await.unwrap_or(false) {
                    shutdown.cancel();
                    let _ = run.await;
                }
            });
            runtime.shutdown_background();
        });
        let (addr, hub) = started.await.expect("instance starts");
        Self {
            addr,
            hub,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn token(&self, kind: TokenKind, owner: &str) -> Secret {
        Secret::new(
            self.hub
                .tokens()
                .mint(kind, &UserId::new(owner), Duration::from_secs(3600)),
        )
    }

    async fn client(&self, owner: &str) -> cocoon::client::Client {
        cocoon::client::Client::connect(
            &self.url(),
            &self.token(TokenKind::Access, owner),
            plain_tls(),
        )
        .await
        .expect("client authenticates")
    }

    /// A relay session of `owner`'s with `device_id`, through this instance.
    async fn session(&self, owner: &str, device_id: &DeviceId) -> cocoon::session::client::Session {
        cocoon::session::client::Session::connect(
            &self.url(),
            &self.token(TokenKind::Access, owner),
            plain_tls(),
            device_id,
        )
        .await
        .expect("a session through this instance")
    }

    /// Devices connected to this instance.
    fn devices_here(&self) -> usize {
        self.hub.counts().0
    }

    async fn end(&mut self, kill: bool) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(kill);
        }
        if let Some(thread) = self.thread.take() {
            tokio::task::spawn_blocking(move || thread.join())
                .await
                .unwrap()
                .expect("the instance's thread ends cleanly");
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// A plain TCP load balancer: each connection goes to the next backend
/// that accepts it, round robin, no stickiness.
struct Balancer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((mut down, _)) = listener.accept().await {
                let first = next;
                next += 1;
                let backends = backends.clone();
                tokio::spawn(async move {
                    for i in 0..backends.len() {
                        let backend = backends[(first + i) % backends.len()];
                        if let Ok(mut up) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three instances of one fleet.
struct Fleet {
    nats: NatsServer,
    instances: Vec<Instance>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    async fn start() -> Self {
        let nats = NatsServer::start().await;
        let mut instances = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.path().to_owned());
            config.nats = Some(NatsOptions::new(nats.url.clone()));
            instances.push(Instance::start(config).await);
            dirs.push(dir);
        }
        Self {
            nats,
            instances,
            _dirs: dirs,
        }
    }

    async fn stop(mut self) {
        for instance in &mut self.instances {
            instance.end(false).await;
        }
        self.nats.stop().await;
    }
}

/// Polls `owner`'s device list on `server` until `device_id` shows with
/// `online`.
async fn until_listed(server: &Instance, owner: &str, device_id: &DeviceId, online: bool) {
    let mut client = server.client(owner).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let devices = client.list_devices().await.unwrap();
        if devices
            .iter()
            .any(|d| &d.device_id == device_id && d.online == online)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{device_id} never listed with online={online} at {}: {devices:?}",
            server.url()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `device_status` of `device_id` with `online`.
async fn expect_status(client: &mut cocoon::client::Client, device_id: &DeviceId, online: bool) {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("device_status in time")
            .unwrap()
            .expect("the server keeps the client");
        if let FromServer::DeviceStatus {
            device_id: about,
            online: now,
        } = message
            && &about == device_id
            && now == online
        {
            return;
        }
    }
}

/// A worker registered on `server` with a setup token for alice.
async fn worker_on(
    server: &Instance,
    setup: &Secret,
    dir: &Path,
    env: &[(&str, &str)],
) -> (WorkerProcess, DeviceId) {
    let mut all_env = vec![("COCOON_SETUP_TOKEN", setup.expose())];
    all_env.extend_from_slice(env);
    let mut worker = WorkerProcess::spawn(&server.url(), dir, &all_env);
    let line = worker.expect_line("🆔 Device ID: ").await;
    (worker, device_id_in(&line))
}

#[tokio::test]
async fn secrets_claims_and_presence_are_the_same_on_every_instance() {
    let fleet = Fleet::start().await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    // Alice's client on C hears of her devices on other instances.
    let mut watcher = c.client("alice").await;
    // A setup token minted by A claims a worker registering on B.
    let setup = a.token(TokenKind::Setup, "alice");
    let worker_dir = tempfile::tempdir().unwrap();
    let (worker, device_id) = worker_on(b, &setup, worker_dir.path(), &[]).await;
    expect_status(&mut watcher, &device_id, true).await;
    for server in [a, b, c] {
        until_listed(server, "alice", &device_id, true).await;
        let mut bob = server.client("bob").await;
        assert!(
            bob.list_devices().await.unwrap().is_empty(),
            "bob sees none of alice's devices"
        );
    }
    // An access token minted by C works on A.
    let token = c.token(TokenKind::Access, "alice");
    let claims = a
        .hub
        .tokens()
        .verify(token.expose(), TokenKind::Access)
        .expect("tokens verify on every instance");
    assert_eq!(claims.sub, UserId::new("alice"));

    // Offline everywhere once the worker stops…
    worker.terminate().await;
    expect_status(&mut watcher, &device_id, false).await;
    for server in [a, b, c] {
        until_listed(server, "alice", &device_id, false).await;
    }
    // …and the same device, still alice's, when it reconnects to C: the
    // salt is shared, and so is the claim (no setup token this time).
    let mut worker = WorkerProcess::spawn(&c.url(), worker_dir.path(), &[]);
    let line = worker.expect_line("🆔 Device ID: ").await;
    assert_eq!(
        device_id_in(&line),
        device_id,
        "same id on another instance"
    );
    for server in [a, b, c] {
        until_listed(server, "alice", &device_id, true).await;
    }
    worker.terminate().await;
    fleet.stop().await;
}

#[tokio::test]
async fn a_terminal_on_one_instance_reaches_a_worker_on_another_over_the_relay() {
    let fleet = Fleet::start().await;
    let [a, b, _] = &fleet.instances[..] else {
        unreachable!()
    };
    let worker_dir = tempfile::tempdir().unwrap();
    let setup = b.token(TokenKind::Setup, "alice");
    let (worker, device_id) = worker_on(b, &setup, worker_dir.path(), &[]).await;
    until_listed(a, "alice", &device_id, true).await;

    let session = a.session("alice", &device_id).await;
    let mut pty = session
        .attach_pty(attach_request(Some("seq 1 20000")))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    assert_eq!(code, 0);
    let expected: String = (1..=20_000).map(|n| format!("{n}\r\n")).collect();
    assert_eq!(output.len(), expected.len());
    assert!(output == expected.as_bytes(), "byte-exact, in order");
    // The output went from B to A through NATS.
    let (from_worker, _) = b.hub.relayed();
    assert!(
        from_worker as usize > expected.len(),
        "B relayed the output"
    );
    let (from_client, _) = a.hub.relayed();
    assert!(from_client > 0, "A relayed the client's frames");
    drop(session);
    worker.terminate().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_signaling_crosses_instances() {
    let fleet = Fleet::start().await;
    let [_, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    let worker_dir = tempfile::tempdir().unwrap();
    let setup = b.token(TokenKind::Setup, "alice");
    let (worker, device_id) = worker_on(b, &setup, worker_dir.path(), LOOPBACK_RTC_ENV).await;
    until_listed(c, "alice", &device_id, true).await;
    let session = cocoon::session::client::Session::connect_with(
        &c.url(),
        &c.token(TokenKind::Access, "alice"),
        plain_tls(),
        &device_id,
        Some(loopback_rtc()),
    )
    .await
    .expect("a session through C");
    session
        .wait_for_path(LinkPath::Direct, Duration::from_secs(15))
        .await
        .expect("a direct path, negotiated through C, NATS and B");
    let mut pty = session
        .attach_pty(attach_request(Some("seq 1 5000")))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    assert_eq!(code, 0);
    let expected: String = (1..=5_000).map(|n| format!("{n}\r\n")).collect();
    assert!(
        output == expected.as_bytes(),
        "byte-exact on the data channel"
    );
    drop(session);
    worker.terminate().await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_survives_the_death_of_its_workers_instance() {
    let fleet = Fleet::start().await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    // The worker reaches the fleet through a load balancer: B first, and C
    // when it reconnects after B dies.
    let balancer = Balancer::start(vec![b.addr, c.addr, a.addr]).await;
    let worker_dir = tempfile::tempdir().unwrap();
    let mut worker = WorkerProcess::spawn(
        &balancer.url(),
        worker_dir.path(),
        &[(
            "COCOON_SETUP_TOKEN",
            a.token(TokenKind::Setup, "alice").expose(),
        )],
    );
    let device_id = device_id_in(&worker.expect_line("🆔 Device ID: ").await);
    assert_eq!(b.devices_here(), 1, "the worker is on B");
    until_listed(a, "alice", &device_id, true).await;

    let session = a.session("alice", &device_id).await;
    let paced = "for i in $(seq 1 60); do seq $((i*1000-999)) $((i*1000)); sleep 0.05; done";
    let mut pty = session
        .attach_pty(attach_request(Some(paced)))
        .await
        .unwrap();
    let mut output = Vec::new();
    while output.len() < 20_000 {
        match tokio::time::timeout(DEADLINE, pty.next()).await {
            Ok(Some(cocoon::session::client::PtyEvent::Output(bytes))) => {
                output.extend_from_slice(&bytes)
            }
            other => panic!("output first, got {other:?}"),
        }
    }

    // B dies mid-stream.
    let mut instances = fleet.instances;
    instances[1].end(true).await;
    let (rest, code) = drain_pty(&mut pty).await;
    output.extend_from_slice(&rest);
    assert_eq!(code, 0);
    let expected: String = (1..=60_000).map(|n| format!("{n}\r\n")).collect();
    assert_eq!(output.len(), expected.len());
    assert!(
        output == expected.as_bytes(),
        "every byte once, in order, across the death of B"
    );
    assert_eq!(instances[2].devices_here(), 1, "the worker moved to C");
    for instance in [&instances[0], &instances[2]] {
        until_listed(instance, "alice", &device_id, true).await;
    }
    drop(session);
    worker.terminate().await;
    let fleet = Fleet {
        nats: fleet.nats,
        instances,
        _dirs: fleet._dirs,
    };
    fleet.stop().await;
}

/// A protocol-level worker registered on `instance` for `owner`.
async fn register_raw(instance: &Instance, owner: &str) -> (RawPeer, DeviceId) {
    let (device, device_id, notice) =
        RawPeer::register(&instance.url(), &instance.token(TokenKind::Setup, owner)).await;
    assert_eq!(notice, None, "the setup token claims the device");
    (device, device_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_hears_its_clients_left_when_their_instance_dies() {
    let mut fleet = Fleet::start().await;
    // A protocol-level worker on B, a client of its owner on A.
    let b = &fleet.instances[1];
    let (mut device, device_id) = register_raw(b, "alice").await;
    let a = &fleet.instances[0];
    until_listed(a, "alice", &device_id, true).await;
    let mut client = a.client("alice").await;
    client
        .send(Some(&device_id), serde_json::json!({"type": "hello"}))
        .await
        .unwrap();
    let client_id = loop {
        match device.recv().await {
            Some(FromServer::SyncData {
                client_id: Some(client_id),
                ..
            }) => break client_id,
            Some(_) => continue,
            None => panic!("B closed the device"),
        }
    };
    // A dies: nobody is left to say the client left, but B notices.
    fleet.instances[0].end(true).await;
    loop {
        match device.recv().await {
            Some(FromServer::ClientLeft { client_id: gone }) if gone == client_id => break,
            Some(_) => continue,
            None => panic!("B closed the device"),
        }
    }
    drop(client);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_heals_when_nats_restarts() {
    let mut fleet = Fleet::start().await;
    let b = &fleet.instances[1];
    let (mut device, device_id) = register_raw(b, "alice").await;
    let _hive = hive_on(b, "alice", "rack").await;
    until_listed(&fleet.instances[0], "alice", &device_id, true).await;
    until_hives(&fleet.instances[0], "alice", &["rack"]).await;
    // Presence lives in NATS's memory: a restart loses it, the claims (on
    // disk) stay; B announces its device and hive again, and messages flow
    // again.
    fleet.nats.restart().await;
    let a = &fleet.instances[0];
    until_listed(a, "alice", &device_id, true).await;
    until_hives(a, "alice", &["rack"]).await;
    // An instance added now knows only what is in NATS.
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.path().to_owned());
    config.nats = Some(NatsOptions::new(fleet.nats.url.clone()));
    let mut added = Instance::start(config).await;
    until_listed(&added, "alice", &device_id, true).await;
    added.end(false).await;
    let mut client = a.client("alice").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        client
            .send(Some(&device_id), serde_json::json!({"type": "hello"}))
            .await
            .unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(500), device.recv()).await;
        if let Ok(Some(FromServer::SyncData { .. })) = heard {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device never heard the client after the restart"
        );
    }
    drop(client);
    fleet.stop().await;
}

/// A hive of `owner` registered on `server`, offering `native`.
async fn hive_on(server: &Instance, owner: &str, name: &str) -> RawPeer {
    let mut hive = RawPeer::connect(&server.url()).await;
    hive.send(&ToServer::RegisterHive {
        hive_token: server.token(TokenKind::Hive, owner),
        name: name.into(),
        kinds: vec![HiveKind {
            id: "native".into(),
            runner_type: "script".into(),
        }],
    })
    .await;
    match hive.recv().await {
        Some(FromServer::HiveRegistered { .. }) => hive,
        other => panic!("expected hive_registered, got {other:?}"),
    }
}

/// Polls `owner`'s hive list on `server` until it names exactly `names`.
async fn until_hives(server: &Instance, owner: &str, names: &[&str]) {
    let mut client = server.client(owner).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let hives = client.list_hives().await.unwrap();
        if hives
            .iter()
            .map(|h| h.name.as_str())
            .eq(names.iter().copied())
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{owner}'s hives at {} never became {names:?}: {hives:?}",
            server.url()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_native(request_id: &str) -> ToServer {
    ToServer::SpawnCocoon {
        request_id: request_id.into(),
        kind: "native".into(),
        name: None,
        setup_token: None,
        hive: None,
    }
}

/// The next message for a client that is not a device status change.
async fn next_reply(client: &mut cocoon::client::Client) -> FromServer {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("a reply in time")
            .unwrap()
            .expect("the server keeps the client");
        if !matches!(message, FromServer::DeviceStatus { .. }) {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_on_one_instance_serves_clients_on_the_others() {
    let fleet = Fleet::start().await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    let mut hive = hive_on(a, "alice", "rack").await;
    until_hives(b, "alice", &["rack"]).await;
    until_hives(c, "alice", &["rack"]).await;
    // Bob, on B, sees no hive and reaches none.
    let mut bob = b.client("bob").await;
    assert!(bob.list_hives().await.unwrap().is_empty());
    bob.send_raw(&spawn_native("b-1")).await.unwrap();
    match next_reply(&mut bob).await {
        FromServer::Error { code, .. } => assert_eq!(code, ErrorCode::NoHive),
        other => panic!("{other:?}"),
    }

    // Alice, on B, spawns: the hive on A gets the request and a fresh
    // single-use setup token.
    let mut alice = b.client("alice").await;
    alice.send_raw(&spawn_native("r-1")).await.unwrap();
    let (client_id, setup_token, spawn_id) = match hive.recv().await {
        Some(FromServer::SpawnCocoon {
            request_id,
            client_id,
            setup_token,
            spawn_id,
            ..
        }) => {
            assert_eq!(request_id, "r-1");
            assert_eq!(client_id, alice.client_id);
            (client_id, setup_token, spawn_id)
        }
        other => panic!("expected spawn_cocoon, got {other:?}"),
    };
    // Its worker registers on C: claimed by alice, and the hive on A hears
    // which device that was.
    let (_worker, device_id, notice) = RawPeer::register(&c.url(), &setup_token).await;
    assert_eq!(notice, None);
    match hive.recv().await {
        Some(FromServer::CocoonRegistered {
            spawn_id: registered,
            device_id: registered_device,
        }) => {
            assert_eq!(registered, spawn_id);
            assert_eq!(registered_device, device_id);
        }
        other => panic!("expected cocoon_registered, got {other:?}"),
    }
    until_listed(b, "alice", &device_id, true).await;
    // The token is spent on every instance: on B it claims nothing more.
    let (_thief, other_id, notice) = RawPeer::register(&b.url(), &setup_token).await;
    assert_eq!(notice, Some(ErrorCode::InvalidToken));
    let listed = alice.list_devices().await.unwrap();
    assert!(listed.iter().all(|d| d.device_id != other_id), "{listed:?}");

    // The hive's answer reaches alice on B.
    hive.send(&ToServer::SpawnCocoonResult {
        request_id: "r-1".into(),
        client_id,
        success: true,
        service_name: Some("cocoon-1".into()),
        device_id: Some(device_id.clone()),
        error: None,
    })
    .await;
    match next_reply(&mut alice).await {
        FromServer::SpawnCocoonResult {
            request_id,
            hive,
            success,
            device_id: answered,
            ..
        } => {
            assert_eq!((request_id.as_str(), hive.as_str()), ("r-1", "rack"));
            assert!(success);
            assert_eq!(answered, Some(device_id));
        }
        other => panic!("expected spawn_cocoon_result, got {other:?}"),
    }

    // A request outstanding when the hive goes away fails at once, and the
    // hive leaves every list.
    alice
        .send_raw(&ToServer::ListCocoons {
            request_id: "r-2".into(),
            hive: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        hive.recv().await,
        Some(FromServer::ListCocoons { .. })
    ));
    drop(hive);
    match next_reply(&mut alice).await {
        FromServer::Error { code, message } => {
            assert_eq!(code, ErrorCode::NoHive);
            assert!(
                message.contains("disconnected before answering"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    until_hives(c, "alice", &[]).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hive_registering_on_another_instance_replaces_its_old_connection() {
    let fleet = Fleet::start().await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!()
    };
    let mut old = hive_on(a, "alice", "rack").await;
    until_hives(c, "alice", &["rack"]).await;
    let mut new = hive_on(b, "alice", "rack").await;
    let (said, _) = old.until_closed().await;
    assert!(
        said.iter().any(|m| matches!(
            m,
            FromServer::Error {
                code: ErrorCode::Replaced,
                ..
            }
        )),
        "{said:?}"
    );
    // Requests from C now reach the new connection (once C's copy of
    // presence shows it: until then they fail, never hang).
    let mut alice = c.client("alice").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for n in 0.. {
        let request_id = format!("l-{n}");
        alice
            .send_raw(&ToServer::ListCocoons {
                request_id: request_id.clone(),
                hive: Some("rack".into()),
            })
            .await
            .unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(500), new.recv()).await;
        if let Ok(Some(FromServer::ListCocoons {
            request_id: asked,
            client_id,
        })) = heard
        {
            assert_eq!(asked, request_id);
            new.send(&ToServer::CocoonList {
                request_id: asked,
                client_id,
                cocoons: Vec::new(),
            })
            .await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new hive never heard from C"
        );
    }
    loop {
        match next_reply(&mut alice).await {
            FromServer::CocoonList { hive, cocoons, .. } => {
                assert_eq!(hive, "rack");
                assert!(cocoons.is_empty());
                break;
            }
            // Earlier tries, refused while C's copy caught up.
            FromServer::Error { code, .. } => assert_eq!(code, ErrorCode::NoHive),
            other => panic!("{other:?}"),
        }
    }
    // The old connection's end withdrew nothing: the hive is still listed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for server in [a, b, c] {
        until_hives(server, "alice", &["rack"]).await;
    }
    drop(new);
    fleet.stop().await;
}

/// Failed logins count across the fleet: a guesser whose connections a
/// load balancer spreads over the instances gets no more tries than
/// against one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited_across_the_fleet() {
    use cocoon_signaling::limit::MAX_FAILURES;

    let fleet = Fleet::start().await;
    let [a, b, c] = &fleet.instances[..] else {
        unreachable!("three instances")
    };
    for n in 0..MAX_FAILURES {
        let instance = if n % 2 == 0 { a } else { b };
        let mut peer = RawPeer::connect(&instance.url()).await;
        peer.send(&ToServer::Authenticate {
            access_token: Secret::new(format!("guess-{n}")),
        })
        .await;
        peer.expect_error(ErrorCode::InvalidToken).await;
    }
    // Each of A and B saw half of the failures, C none: all refuse now,
    // even a valid token.
    for instance in [c, a, b] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let mut peer = RawPeer::connect(&instance.url()).await;
            peer.send(&ToServer::Authenticate {
                access_token: instance.token(TokenKind::Access, "alice"),
            })
            .await;
            match peer.recv().await {
                Some(FromServer::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }) => break,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} still lets the address in: {other:?}",
                    instance.url()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    fleet.stop().await;
}
