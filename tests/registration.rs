//! Worker identity and registration against a real signaling server.

mod common;

use std::os::unix::fs::PermissionsExt;

use cocoon_signaling::Config;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::hub::MISMATCH_MESSAGE;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::{DeviceId, ErrorCode, FromServer, Secret, ToServer};
use common::*;

#[tokio::test]
async fn first_registration_restart_and_server_restart() {
    let server_dir = tempfile::tempdir().unwrap();
    let worker_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_restartable(server_dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");

    let mut worker = WorkerProcess::spawn(
        &server.url(),
        worker_dir.path(),
        &[("COCOON_SETUP_TOKEN", setup.expose())],
    );
    worker
        .expect_lines(&[
            "🐛 Cocoon starting",
            "🆕 Generated new strong secret (48 characters, 288 bits entropy)",
            "💾 Saved secret to",
            "🔗 Connecting to signaling server: ws://127.0.0.1:",
            "⏳ Waiting for derived device ID (first registration)...",
            "✅ Registration confirmed",
        ])
        .await;
    let id_line = worker.expect_line("🆔 Device ID: ").await;
    assert!(id_line.ends_with("(HMAC-derived from secret)"), "{id_line}");
    let device_id = device_id_in(&id_line).to_string();
    worker.expect_line("💾 Saved device ID to").await;

    let secret_path = worker_dir.path().join(".secret");
    let secret = std::fs::read_to_string(&secret_path).unwrap();
    assert_eq!(secret.len(), 48);
    let mode = std::fs::metadata(&secret_path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::read_to_string(worker_dir.path().join(".device_id")).unwrap(),
        device_id
    );
    assert!(
        !worker.seen.iter().any(|line| line.contains(&secret)),
        "the secret never appears in the output"
    );
    worker.kill().await;

    // A worker restart verifies the saved id and keeps it.
    let mut worker = WorkerProcess::spawn(&server.url(), worker_dir.path(), &[]);
    worker
        .expect_lines(&[
            "🐛 Cocoon starting",
            "🔑 Loaded existing secret from",
            "📱 Loaded existing device ID from",
            "⏳ Reconnecting with device ID verification...",
            "✅ Registration confirmed",
        ])
        .await;
    let id_line = worker.expect_line("🆔 Device ID: ").await;
    assert_eq!(device_id_in(&id_line).to_string(), device_id);
    assert!(
        id_line.ends_with("(verified - secret matches!)"),
        "{id_line}"
    );

    // The server restarts at the same address and data dir: the worker comes
    // back by itself with the same id, and the claim is still there.
    let server = server.halt().await.start().await;
    worker.expect_line("✅ Registration confirmed").await;
    let id_line = worker.expect_line("🆔 Device ID: ").await;
    assert_eq!(device_id_in(&id_line).to_string(), device_id);

    let mut alice = server.client("alice").await;
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id.as_str(), device_id);
    assert!(devices[0].online);
}

#[tokio::test]
async fn weak_secrets_are_refused_by_worker_and_server() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(server_dir.path()).await;
    let weak = [
        ("kX9mP2vR8nQ4sT6wY1zC3hF5jL7", "characters long"),
        ("12345678901234567890123456789012", "only of digits"),
        ("abcdefghijklmnopqrstuvwxyzabcdefgh", "only of lowercase"),
        ("kX9mP2vR8nQ4sT6wY1zC3hFFFFjL7dN0bM9p", "repetitive"),
        (
            "AbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAb1212",
            "distinct characters",
        ),
        (
            "kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0bAdmin",
            "guessable pattern \"admin\"",
        ),
        (
            "kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0bQwerty",
            "guessable pattern \"qwerty\"",
        ),
    ];
    for (secret, reason) in weak {
        let dir = tempfile::tempdir().unwrap();
        let worker = WorkerProcess::spawn(&server.url(), dir.path(), &[("COCOON_SECRET", secret)]);
        let (status, output) = worker.wait_exit().await;
        assert!(!status.success(), "{secret}: worker must exit");
        assert!(output.contains("COCOON_SECRET is too weak"), "{output}");
        assert!(output.contains(reason), "{secret}: {output}");
        assert!(
            !output.contains(secret),
            "the weak secret is not echoed: {output}"
        );

        let mut peer = RawPeer::connect(&server.url()).await;
        peer.send(&ToServer::Register {
            secret: Secret::new(secret),
            device_id: None,
            setup_token: None,
            name: None,
        })
        .await;
        let message = peer.expect_error(ErrorCode::WeakSecret).await;
        assert!(message.contains(reason), "{message}");
        peer.expect_closed().await;
    }
}

#[tokio::test]
async fn stolen_secret_cannot_take_over_a_device() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(server_dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let secret = generate_secret();

    let mut owner = RawPeer::connect(&server.url()).await;
    owner
        .send(&ToServer::Register {
            secret: secret.clone(),
            device_id: None,
            setup_token: Some(setup),
            name: None,
        })
        .await;
    let Some(FromServer::Registered { device_id, .. }) = owner.recv().await else {
        panic!("registration")
    };

    // Wrong device id.
    let mut thief = RawPeer::connect(&server.url()).await;
    thief
        .send(&ToServer::Register {
            secret: secret.clone(),
            device_id: Some(DeviceId::new("0".repeat(64))),
            setup_token: None,
            name: None,
        })
        .await;
    assert_eq!(
        thief.expect_error(ErrorCode::DeviceIdMismatch).await,
        MISMATCH_MESSAGE
    );
    thief.expect_closed().await;

    // No device id at all, for a device the server knows.
    let mut thief = RawPeer::connect(&server.url()).await;
    thief
        .send(&ToServer::Register {
            secret: secret.clone(),
            device_id: None,
            setup_token: None,
            name: None,
        })
        .await;
    thief.expect_error(ErrorCode::DeviceIdRequired).await;
    thief.expect_closed().await;

    // The owner's route is untouched: a client still reaches it.
    let mut alice = server.client("alice").await;
    alice
        .send(Some(&device_id), serde_json::json!({"ping": 1}))
        .await
        .unwrap();
    match owner.recv().await {
        Some(FromServer::SyncData {
            payload, client_id, ..
        }) => {
            assert_eq!(payload, serde_json::json!({"ping": 1}));
            assert_eq!(client_id.as_ref(), Some(&alice.client_id));
        }
        other => panic!("expected the client's data, got {other:?}"),
    }
}

#[tokio::test]
async fn a_second_registration_with_secret_and_id_takes_over_and_the_old_close_is_harmless() {
    let server_dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(server_dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let secret = generate_secret();
    let register = |device_id: Option<DeviceId>| ToServer::Register {
        secret: secret.clone(),
        device_id,
        setup_token: Some(setup.clone()),
        name: None,
    };

    let mut first = RawPeer::connect(&server.url()).await;
    first.send(&register(None)).await;
    let Some(FromServer::Registered { device_id, .. }) = first.recv().await else {
        panic!("registration")
    };
    let mut second = RawPeer::connect(&server.url()).await;
    second.send(&register(Some(device_id.clone()))).await;
    assert!(matches!(
        second.recv().await,
        Some(FromServer::Registered { .. })
    ));
    first.expect_error(ErrorCode::Replaced).await;
    first.expect_closed().await;
    drop(first);

    let mut alice = server.client("alice").await;
    for n in 0..3 {
        alice
            .send(Some(&device_id), serde_json::json!(n))
            .await
            .unwrap();
        match second.recv().await {
            Some(FromServer::SyncData { payload, .. }) => assert_eq!(payload, serde_json::json!(n)),
            other => panic!("the new route must stay up, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn worker_registers_over_wss_with_an_operator_ca() {
    let server_dir = tempfile::tempdir().unwrap();
    let certs_dir = tempfile::tempdir().unwrap();
    let (tls, ca_file) = make_certificates(certs_dir.path());
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), server_dir.path().to_owned());
    config.tls = Some(tls);
    let server = TestServer::start_with(config).await;
    assert!(server.url().starts_with("wss://"));

    // Without the CA the certificate is not trusted.
    let err = cocoon::client::Client::connect(
        &server.url(),
        &server.token(TokenKind::Access, "alice"),
        plain_tls(),
    )
    .await
    .err()
    .expect("an untrusted certificate is refused");
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );

    let worker_dir = tempfile::tempdir().unwrap();
    let ca = ca_file.to_str().unwrap();
    let mut worker =
        WorkerProcess::spawn(&server.url(), worker_dir.path(), &[("COCOON_CA_FILE", ca)]);
    worker.expect_line("✅ Registration confirmed").await;
    assert!(
        !worker
            .seen
            .iter()
            .any(|l| l.contains("INSECURE") || l.contains("WARNING")),
        "no plaintext warning for wss: {:#?}",
        worker.seen
    );
}

#[tokio::test]
async fn an_unwritable_data_dir_is_named_in_a_clear_error() {
    let worker = WorkerProcess::spawn(
        "ws://127.0.0.1:9/ws",
        std::path::Path::new("/proc/cocoon-data"),
        &[],
    );
    let (status, output) = worker.wait_exit().await;
    assert!(!status.success());
    assert!(
        output.contains("/proc/cocoon-data is not writable"),
        "{output}"
    );
}
