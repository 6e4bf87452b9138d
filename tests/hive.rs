//! The hive: authenticated registration, routing of spawn/terminate/list
//! between an owner's clients and hives only, single-use spawn tokens, and
//! the real `cocoon hive run` with its script runner and pool starting real
//! workers that register and are claimed by the owner who asked.

mod common;

use std::path::Path;
use std::time::Duration;

use cocoon::client::Client;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::protocol::service::{Request, Response};
use cocoon_signaling::protocol::{
    CocoonInfo, DeviceId, ErrorCode, FromServer, HiveKind, Secret, ToServer,
};
use common::*;
use tokio::process::Command;

const HIVE_WAIT: Duration = Duration::from_secs(60);

fn native_kind() -> Vec<HiveKind> {
    vec![HiveKind {
        id: "native".into(),
        runner_type: "script".into(),
    }]
}

async fn register_hive(server: &TestServer, owner: &str, name: &str) -> RawPeer {
    let mut hive = RawPeer::connect(&server.url()).await;
    hive.send(&ToServer::RegisterHive {
        hive_token: server.token(TokenKind::Hive, owner),
        name: name.into(),
        kinds: native_kind(),
    })
    .await;
    match hive.recv().await {
        Some(FromServer::HiveRegistered { name: n, owner: o }) => {
            assert_eq!((n.as_str(), o.as_str()), (name, owner));
        }
        other => panic!("expected hive_registered, got {other:?}"),
    }
    hive
}

fn spawn(request_id: &str, kind: &str) -> ToServer {
    ToServer::SpawnCocoon {
        request_id: request_id.into(),
        kind: kind.into(),
        name: None,
        setup_token: None,
        hive: None,
    }
}

/// The next message that is not a device status change.
async fn next(client: &mut Client) -> FromServer {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("connection open");
        if !matches!(message, FromServer::DeviceStatus { .. }) {
            return message;
        }
    }
}

/// Registers a worker with `setup_token`; returns its device id and the
/// server's notice about the token, if any.
async fn register_worker(
    server: &TestServer,
    setup_token: &Secret,
) -> (DeviceId, Option<ErrorCode>) {
    let (worker, device_id, notice) = RawPeer::register(&server.url(), setup_token).await;
    // Keep the worker online for the rest of the test.
    std::mem::forget(worker);
    (device_id, notice)
}

#[tokio::test]
async fn only_hive_tokens_register_hives_and_requests_stay_within_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;

    // Access and setup tokens are not hive tokens.
    for kind in [TokenKind::Access, TokenKind::Setup] {
        let mut peer = RawPeer::connect(&server.url()).await;
        peer.send(&ToServer::RegisterHive {
            hive_token: server.token(kind, "alice"),
            name: "box".into(),
            kinds: native_kind(),
        })
        .await;
        peer.expect_error(ErrorCode::InvalidToken).await;
    }
    // A hive cannot pose as a client or a worker once registered.
    let mut hive = register_hive(&server, "alice", "box").await;
    hive.send(&ToServer::ListDevices {}).await;
    hive.expect_error(ErrorCode::InvalidMessage).await;

    // Bob sees no hive and cannot reach alice's.
    let mut bob = server.client("bob").await;
    assert!(bob.list_hives().await.unwrap().is_empty());
    bob.send_raw(&spawn("b-1", "native")).await.unwrap();
    match next(&mut bob).await {
        FromServer::Error { code, .. } => assert_eq!(code, ErrorCode::NoHive),
        other => panic!("{other:?}"),
    }

    // Alice's spawn, in the spec's JSON, with a setup token of her own: the
    // hive gets a fresh single-use token instead of hers.
    let mut alice = server.client("alice").await;
    let hives = alice.list_hives().await.unwrap();
    assert_eq!(hives.len(), 1);
    assert_eq!(hives[0].kinds, native_kind());
    let own_token = server.token(TokenKind::Setup, "alice");
    let spec_json = format!(
        r#"{{"type": "spawn_cocoon", "request_id": "req-123", "kind": "native", "setup_token": "{}", "name": "worker-1"}}"#,
        own_token.expose()
    );
    let message: ToServer = serde_json::from_str(&spec_json).unwrap();
    alice.send_raw(&message).await.unwrap();
    let (client_id, token, spawn_id) = match hive.recv().await {
        Some(FromServer::SpawnCocoon {
            request_id,
            client_id,
            kind,
            name,
            setup_token,
            spawn_id,
        }) => {
            assert_eq!(request_id, "req-123");
            assert_eq!(kind, "native");
            assert_eq!(name.as_deref(), Some("worker-1"));
            assert_ne!(
                setup_token, own_token,
                "the user's token never reaches a hive"
            );
            assert_eq!(client_id, alice.client_id);
            (client_id, setup_token, spawn_id)
        }
        other => panic!("expected spawn_cocoon, got {other:?}"),
    };
    // Bob's setup token is refused in alice's request.
    let mut with_bobs = spawn("req-x", "native");
    if let ToServer::SpawnCocoon { setup_token, .. } = &mut with_bobs {
        *setup_token = Some(server.token(TokenKind::Setup, "bob"));
    }
    alice.send_raw(&with_bobs).await.unwrap();
    match next(&mut alice).await {
        FromServer::Error { code, .. } => assert_eq!(code, ErrorCode::AccessDenied),
        other => panic!("{other:?}"),
    }

    // The worker registering with the spawn token is alice's, and the hive
    // learns which device it is.
    let (device_id, notice) = register_worker(&server, &token).await;
    assert_eq!(notice, None);
    match hive.recv().await {
        Some(FromServer::CocoonRegistered {
            spawn_id: s,
            device_id: d,
        }) => assert_eq!((s, d), (spawn_id, device_id.clone())),
        other => panic!("expected cocoon_registered, got {other:?}"),
    }
    let devices = alice.list_devices().await.unwrap();
    assert!(devices.iter().any(|d| d.device_id == device_id && d.online));
    // The spawn token is single-use: a second worker is not claimed.
    let (second, notice) = register_worker(&server, &token).await;
    assert_eq!(notice, Some(ErrorCode::InvalidToken));
    let devices = alice.list_devices().await.unwrap();
    assert!(!devices.iter().any(|d| d.device_id == second));

    // Answers: only to outstanding requests, once.
    let answer = |request_id: &str, device_id: Option<DeviceId>| ToServer::SpawnCocoonResult {
        request_id: request_id.into(),
        client_id: client_id.clone(),
        success: true,
        service_name: Some("cocoon-native-1".into()),
        device_id,
        error: None,
    };
    hive.send(&answer("req-999", None)).await;
    hive.expect_error(ErrorCode::InvalidMessage).await;
    hive.send(&answer("req-123", Some(device_id.clone()))).await;
    match next(&mut alice).await {
        FromServer::SpawnCocoonResult {
            request_id,
            hive,
            success,
            device_id: d,
            ..
        } => {
            assert_eq!(
                (request_id.as_str(), hive.as_str(), success),
                ("req-123", "box", true)
            );
            assert_eq!(d, Some(device_id.clone()));
        }
        other => panic!("{other:?}"),
    }
    hive.send(&answer("req-123", None)).await;
    hive.expect_error(ErrorCode::InvalidMessage).await;

    // A hive naming a device its owner does not own fails the spawn.
    alice.send_raw(&spawn("req-2", "native")).await.unwrap();
    assert!(matches!(
        hive.recv().await,
        Some(FromServer::SpawnCocoon { .. })
    ));
    let (bobs_device, _) = register_worker(&server, &server.token(TokenKind::Setup, "bob")).await;
    hive.send(&answer("req-2", Some(bobs_device))).await;
    match next(&mut alice).await {
        FromServer::SpawnCocoonResult {
            success, device_id, ..
        } => assert_eq!((success, device_id), (false, None)),
        other => panic!("{other:?}"),
    }

    // Unknown kinds are refused by the server; a hive that goes away fails
    // what it had not answered.
    alice.send_raw(&spawn("req-3", "gpu")).await.unwrap();
    match next(&mut alice).await {
        FromServer::Error { code, .. } => assert_eq!(code, ErrorCode::NoHive),
        other => panic!("{other:?}"),
    }
    alice.send_raw(&spawn("req-4", "native")).await.unwrap();
    assert!(matches!(
        hive.recv().await,
        Some(FromServer::SpawnCocoon { .. })
    ));
    drop(hive);
    match next(&mut alice).await {
        FromServer::SpawnCocoonResult {
            request_id,
            success,
            error,
            ..
        } => {
            assert_eq!((request_id.as_str(), success), ("req-4", false));
            assert!(error.unwrap().contains("disconnected"));
        }
        other => panic!("{other:?}"),
    }
    assert!(alice.list_hives().await.unwrap().is_empty());
}

/// `cocoon hive run` offering a script kind that runs this cocoon binary.
fn start_hive(url: &str, token: &Secret, state: &Path, extra: &[&str]) -> WorkerProcess {
    let kinds = format!(
        r#"native:script:{{"command":"{}","args":["run"],"working_dir":"{}/{{service_name}}"}}"#,
        env!("CARGO_BIN_EXE_cocoon"),
        state.join("work").display()
    );
    let mut command = Command::new(env!("CARGO_BIN_EXE_cocoon"));
    command
        .args(["hive", "run", "--url", url, "--name", "box", "--state-dir"])
        .arg(state.join("state"))
        .args(extra)
        .env("RUST_LOG", "info");
    WorkerProcess::from_command(
        command,
        &[
            ("COCOON_HIVE_TOKEN", token.expose()),
            ("COCOON_KINDS", &kinds),
            ("COCOON_NO_WEBRTC", "1"),
        ],
    )
}

async fn list_cocoons(client: &mut Client) -> Vec<CocoonInfo> {
    let reply = client
        .hive_call(
            ToServer::ListCocoons {
                request_id: "l".into(),
                hive: None,
            },
            "l",
            DEADLINE,
        )
        .await
        .unwrap();
    match reply {
        FromServer::CocoonList { cocoons, .. } => cocoons,
        other => panic!("{other:?}"),
    }
}

async fn spawn_ok(client: &mut Client, request_id: &str, name: Option<&str>) -> (String, DeviceId) {
    let message = ToServer::SpawnCocoon {
        request_id: request_id.into(),
        kind: "native".into(),
        name: name.map(Into::into),
        setup_token: None,
        hive: None,
    };
    match client
        .hive_call(message, request_id, HIVE_WAIT)
        .await
        .unwrap()
    {
        FromServer::SpawnCocoonResult {
            success: true,
            service_name: Some(service),
            device_id: Some(device),
            ..
        } => (service, device),
        other => panic!("spawn failed: {other:?}"),
    }
}

fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn pid_of(info: &CocoonInfo) -> u32 {
    info.handle
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {info:?}"))
}

#[tokio::test]
async fn script_runner_spawns_real_workers_for_the_owner_who_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut hive = start_hive(
        &server.url(),
        &server.token(TokenKind::Hive, "alice"),
        dir.path(),
        &[],
    );
    hive.expect_line("registered for alice").await;

    let mut alice = server.client("alice").await;
    let (service, device) = spawn_ok(&mut alice, "s-1", Some("worker-1")).await;
    let devices = alice.list_devices().await.unwrap();
    let listed = devices
        .iter()
        .find(|d| d.device_id == device)
        .expect("claimed by alice");
    assert!(listed.online);
    assert_eq!(listed.name.as_deref(), Some("worker-1"));

    // It is a working worker, started in the kind's working dir.
    let exec = Request::Execute(execute_request("pwd"));
    alice
        .send(Some(&device), serde_json::to_value(&exec).unwrap())
        .await
        .unwrap();
    match recv_response(&mut alice).await {
        Response::ExecuteResult(result) => {
            let work_dir = dir.path().join("work").join(&service);
            assert_eq!(
                result.data.stdout,
                format!("{}\n", work_dir.display()),
                "{result:?}"
            );
        }
        other => panic!("{other:?}"),
    }

    // Nobody else sees it or the hive.
    let mut bob = server.client("bob").await;
    assert!(bob.list_hives().await.unwrap().is_empty());
    assert!(
        !bob.list_devices()
            .await
            .unwrap()
            .iter()
            .any(|d| d.device_id == device)
    );

    let cocoons = list_cocoons(&mut alice).await;
    assert_eq!(cocoons.len(), 1);
    assert_eq!(cocoons[0].service_name, service);
    assert_eq!(cocoons[0].state, "running");
    assert_eq!(cocoons[0].device_id.as_ref(), Some(&device));
    let pid = pid_of(&cocoons[0]);
    assert!(process_alive(pid));
    // The spec's injected environment, and none of the hive's credentials.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    let has = |prefix: &str| environ.iter().any(|v| v.starts_with(prefix));
    assert!(environ.contains(&"COCOON_KIND=native".to_owned()));
    assert!(environ.contains(&format!("SIGNALING_SERVER_URL={}", server.url())));
    assert!(has("COCOON_SETUP_TOKEN=") && has("COCOON_SECRET="));
    assert!(!has("COCOON_HIVE_TOKEN=") && !has("COCOON_KINDS="));

    // Terminate: the process ends, the device goes offline, its data goes.
    let reply = alice
        .hive_call(
            ToServer::TerminateCocoon {
                request_id: "t-1".into(),
                service_name: service.clone(),
                hive: None,
            },
            "t-1",
            DEADLINE,
        )
        .await
        .unwrap();
    assert!(
        matches!(
            reply,
            FromServer::TerminateCocoonResult { success: true, .. }
        ),
        "{reply:?}"
    );
    assert!(!process_alive(pid));
    assert!(!dir.path().join("state").join(&service).exists());
    wait_offline(&mut alice, &[device]).await;
    assert!(list_cocoons(&mut alice).await.is_empty());

    // The CLI: kinds, spawn, list, terminate.
    let client_env = [
        ("SIGNALING_SERVER_URL", server.url()),
        (
            "COCOON_ACCESS_TOKEN",
            server.token(TokenKind::Access, "alice").expose().to_owned(),
        ),
    ];
    let cli = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cocoon"));
        command
            .arg("hive")
            .args(args)
            .env("HOME", dir.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("COCOON_CONFIG")
            .envs(client_env.iter().map(|(k, v)| (*k, v.as_str())));
        let what = format!("{args:?}");
        async move {
            let out = command.output().await.unwrap();
            assert!(out.status.success(), "{what}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        }
    };
    assert_eq!(cli(&["kinds"]).await, "native (script)  on box\n");
    let spawned = cli(&["spawn", "native"]).await;
    let (device, service) = spawned.trim().split_once("  box:").expect(&spawned);
    let listed = cli(&["list"]).await;
    assert!(
        listed.contains(&format!("box:{service}  running")),
        "{listed}"
    );
    assert!(listed.contains(device), "{listed}");
    assert_eq!(
        cli(&["terminate", service]).await,
        format!("terminated {service}\n")
    );

    let (status, _) = hive.terminate().await;
    assert!(status.success());
}

#[tokio::test]
async fn a_pool_hands_out_ready_workers_and_refills() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server")).await;
    let mut hive = start_hive(
        &server.url(),
        &server.token(TokenKind::Hive, "alice"),
        dir.path(),
        &["--pool", "native=1"],
    );
    hive.expect_line("registered for alice").await;
    let mut alice = server.client("alice").await;

    // The pooled worker registers before anyone asks.
    let pooled = wait_for_pooled(&mut alice, None).await;
    let (service, device) = spawn_ok(&mut alice, "s-1", None).await;
    assert_eq!(service, pooled.service_name);
    assert_eq!(Some(&device), pooled.device_id.as_ref());

    // Handed out → running; a new one fills the pool.
    let refill = wait_for_pooled(&mut alice, Some(&service)).await;
    let cocoons = list_cocoons(&mut alice).await;
    let handed = cocoons.iter().find(|c| c.service_name == service).unwrap();
    assert_eq!(handed.state, "running");

    // Stopping the hive stops its workers.
    let pids = [pid_of(handed), pid_of(&refill)];
    let (status, _) = hive.terminate().await;
    assert!(status.success());
    for pid in pids {
        assert!(!process_alive(pid), "worker {pid} outlived the hive");
    }
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 2, "{devices:?}");
    let ids: Vec<DeviceId> = devices.into_iter().map(|d| d.device_id).collect();
    wait_offline(&mut alice, &ids).await;
}

/// Waits until these devices are listed offline (their processes are gone;
/// the server notices their sockets closing).
async fn wait_offline(client: &mut Client, ids: &[DeviceId]) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let devices = client.list_devices().await.unwrap();
        if devices
            .iter()
            .filter(|d| ids.contains(&d.device_id))
            .all(|d| !d.online)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still online: {devices:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a pooled, registered worker other than `except`.
async fn wait_for_pooled(client: &mut Client, except: Option<&str>) -> CocoonInfo {
    let deadline = tokio::time::Instant::now() + HIVE_WAIT;
    loop {
        let cocoons = list_cocoons(client).await;
        if let Some(found) = cocoons.into_iter().find(|c| {
            c.state == "pooled" && c.device_id.is_some() && Some(c.service_name.as_str()) != except
        }) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pooled worker in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
