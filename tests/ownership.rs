//! Setup-token claims, access tokens, and routing between clients and devices.

mod common;

use std::time::Duration;

use cocoon::client::Client;
use cocoon_signaling::auth::{Claims, TokenKey, TokenKind, unix_now};
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::{
    ClientId, DeviceId, ErrorCode, FromServer, Secret, ToServer, UserId,
};
use common::*;
use serde_json::json;

/// Registers a raw device; returns it and its id.
async fn raw_device(server: &TestServer, setup_token: Option<Secret>) -> (RawPeer, DeviceId) {
    let mut device = RawPeer::connect(&server.url()).await;
    device
        .send(&ToServer::Register {
            secret: generate_secret(),
            device_id: None,
            setup_token,
            name: Some("raw".into()),
        })
        .await;
    loop {
        match device.recv().await {
            Some(FromServer::Registered { device_id, .. }) => return (device, device_id),
            Some(FromServer::Error { .. }) => continue,
            other => panic!("registration failed: {other:?}"),
        }
    }
}

async fn connect_err(server: &TestServer, token: &str) -> ErrorCode {
    let err = Client::connect(&server.url(), &Secret::new(token), plain_tls())
        .await
        .err()
        .expect("the token is refused");
    server_error_code(&err).unwrap_or_else(|| panic!("not a server error: {err:#}"))
}

#[tokio::test]
async fn a_claimed_device_is_reachable_only_by_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (mut device, device_id) =
        raw_device(&server, Some(server.token(TokenKind::Setup, "alice"))).await;

    let mut alice = server.client("alice").await;
    let devices = alice.list_devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].device_id, device_id);
    assert_eq!(devices[0].name.as_deref(), Some("raw"));

    let mut bob = server.client("bob").await;
    assert!(bob.list_devices().await.unwrap().is_empty());
    bob.send(
        Some(&device_id),
        json!({"type": "execute", "command": "id"}),
    )
    .await
    .unwrap();
    assert!(matches!(
        bob.recv().await.unwrap(),
        Some(FromServer::Error {
            code: ErrorCode::AccessDenied,
            ..
        })
    ));
    bob.send_raw(&ToServer::SelectDevice {
        device_id: device_id.clone(),
    })
    .await
    .unwrap();
    assert!(matches!(
        bob.recv().await.unwrap(),
        Some(FromServer::Error {
            code: ErrorCode::AccessDenied,
            ..
        })
    ));
    // Unknown devices look exactly like other owners' devices.
    bob.send(Some(&DeviceId::new("f".repeat(64))), json!(1))
        .await
        .unwrap();
    assert!(matches!(
        bob.recv().await.unwrap(),
        Some(FromServer::Error {
            code: ErrorCode::AccessDenied,
            ..
        })
    ));

    // Nothing of Bob's reached the device; Alice's does.
    alice.send(Some(&device_id), json!("hello")).await.unwrap();
    match device.recv().await {
        Some(FromServer::SyncData {
            payload, client_id, ..
        }) => {
            assert_eq!(payload, json!("hello"));
            assert_eq!(client_id, Some(alice.client_id.clone()));
        }
        other => panic!("expected Alice's data first, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_expired_and_misused_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;

    let foreign = TokenKey::new(b"not the server's key, not at all".to_vec());
    let forged = foreign.mint(
        TokenKind::Access,
        &UserId::new("alice"),
        Duration::from_secs(60),
    );
    assert_eq!(connect_err(&server, &forged).await, ErrorCode::InvalidToken);

    let expired = server.hub.tokens().sign(&Claims {
        sub: UserId::new("alice"),
        kind: TokenKind::Access,
        iat: unix_now() - 100,
        exp: unix_now() - 10,
        spawn: None,
        hive: None,
    });
    assert_eq!(
        connect_err(&server, &expired).await,
        ErrorCode::TokenExpired
    );

    let setup = server.token(TokenKind::Setup, "alice");
    assert_eq!(
        connect_err(&server, setup.expose()).await,
        ErrorCode::InvalidToken
    );
    assert_eq!(
        connect_err(&server, "garbage").await,
        ErrorCode::InvalidToken
    );
    let unsigned = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImtpbmQiOiJhY2Nlc3MiLCJpYXQiOjAsImV4cCI6OTk5OTk5OTk5OTl9.";
    assert_eq!(
        connect_err(&server, unsigned).await,
        ErrorCode::InvalidToken
    );

    // A worker with a forged or expired setup token registers unclaimed.
    for bad in [
        Secret::new(foreign.mint(
            TokenKind::Setup,
            &UserId::new("alice"),
            Duration::from_secs(60),
        )),
        Secret::new(server.hub.tokens().sign(&Claims {
            sub: UserId::new("alice"),
            kind: TokenKind::Setup,
            iat: 0,
            exp: unix_now() - 1,
            spawn: None,
            hive: None,
        })),
    ] {
        let mut device = RawPeer::connect(&server.url()).await;
        device
            .send(&ToServer::Register {
                secret: generate_secret(),
                device_id: None,
                setup_token: Some(bad),
                name: None,
            })
            .await;
        let notice = device.recv().await;
        assert!(
            matches!(&notice, Some(FromServer::Error { code, message })
                if matches!(code, ErrorCode::InvalidToken | ErrorCode::TokenExpired)
                    && message.contains("not claimed")),
            "{notice:?}"
        );
        assert!(matches!(
            device.recv().await,
            Some(FromServer::Registered { owner: None, .. })
        ));
    }
    let mut alice = server.client("alice").await;
    assert!(alice.list_devices().await.unwrap().is_empty());
}

#[tokio::test]
async fn replies_reach_only_the_client_that_asked() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let (mut device, device_id) =
        raw_device(&server, Some(server.token(TokenKind::Setup, "alice"))).await;
    let mut tab_a = server.client("alice").await;
    let mut tab_b = server.client("alice").await;

    tab_a.send(Some(&device_id), json!({"n": 1})).await.unwrap();
    let Some(FromServer::SyncData {
        client_id: Some(asker),
        ..
    }) = device.recv().await
    else {
        panic!("the device gets the request")
    };
    assert_eq!(asker, tab_a.client_id);
    device
        .send(&ToServer::SyncData {
            payload: json!({"answer": 1}),
            device_id: None,
            client_id: Some(asker),
        })
        .await;
    match tab_a.recv().await.unwrap() {
        Some(FromServer::SyncData {
            payload,
            device_id: from,
            ..
        }) => {
            assert_eq!(payload, json!({"answer": 1}));
            assert_eq!(from, Some(device_id.clone()));
        }
        other => panic!("tab A gets the answer, got {other:?}"),
    }
    // The answer was queued for A before A read it; had it also been queued
    // for B, it would come before B's device list.
    tab_b.send_raw(&ToServer::ListDevices {}).await.unwrap();
    assert!(matches!(
        tab_b.recv().await.unwrap(),
        Some(FromServer::DeviceList { .. })
    ));

    // A device cannot write to another owner's client, nor to nobody.
    let bob = server.client("bob").await;
    device
        .send(&ToServer::SyncData {
            payload: json!("spam"),
            device_id: None,
            client_id: Some(bob.client_id.clone()),
        })
        .await;
    device.expect_error(ErrorCode::ClientGone).await;
    device
        .send(&ToServer::SyncData {
            payload: json!("spam"),
            device_id: None,
            client_id: Some(ClientId::new("c-nobody")),
        })
        .await;
    device.expect_error(ErrorCode::ClientGone).await;

    // When a tab closes, the device hears about it.
    let tab_a_id = tab_a.client_id.clone();
    drop(tab_a);
    match device.recv().await {
        Some(FromServer::ClientLeft { client_id }) => assert_eq!(client_id, tab_a_id),
        other => panic!("expected client_left, got {other:?}"),
    }
}

#[tokio::test]
async fn selected_or_sole_device_is_the_default_target() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let setup = server.token(TokenKind::Setup, "alice");
    let (mut first, first_id) = raw_device(&server, Some(setup.clone())).await;
    let mut alice = server.client("alice").await;

    // The spec's quick test: sync_data with no device_id, one device online.
    alice
        .send_raw(&serde_json::from_str(
            r#"{"type": "sync_data", "payload": {"type": "execute", "command": "echo 'Hello from cocoon!'", "input": null}}"#,
        ).unwrap())
        .await
        .unwrap();
    assert!(matches!(
        first.recv().await,
        Some(FromServer::SyncData { .. })
    ));

    // With two devices online the target must be named or selected.
    let (mut second, second_id) = raw_device(&server, Some(setup)).await;
    alice.send(None, json!(2)).await.unwrap();
    loop {
        match alice.recv().await.unwrap() {
            Some(FromServer::DeviceStatus { .. }) => continue,
            Some(FromServer::Error { code, .. }) => {
                assert_eq!(code, ErrorCode::NoTarget);
                break;
            }
            other => panic!("expected no_target, got {other:?}"),
        }
    }
    alice
        .send_raw(&ToServer::SelectDevice {
            device_id: second_id.clone(),
        })
        .await
        .unwrap();
    assert!(matches!(
        alice.recv().await.unwrap(),
        Some(FromServer::DeviceSelected { device_id }) if device_id == second_id
    ));
    alice.send(None, json!(3)).await.unwrap();
    assert!(
        matches!(second.recv().await, Some(FromServer::SyncData { payload, .. }) if payload == json!(3))
    );

    // A device going away is announced to its owner, and then reported offline.
    drop(first);
    loop {
        match alice.recv().await.unwrap() {
            Some(FromServer::DeviceStatus {
                device_id,
                online: false,
            }) if device_id == first_id => break,
            Some(FromServer::DeviceStatus { .. }) => continue,
            other => panic!("expected the offline status, got {other:?}"),
        }
    }
    alice.send(Some(&first_id), json!(4)).await.unwrap();
    assert!(matches!(
        alice.recv().await.unwrap(),
        Some(FromServer::Error {
            code: ErrorCode::DeviceOffline,
            ..
        })
    ));
}
