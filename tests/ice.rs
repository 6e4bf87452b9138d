//! `get_ice_servers`: the STUN/TURN servers a signaling server hands to its
//! workers and clients, with ephemeral TURN credentials in coturn's scheme.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocoon_signaling::Config;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::ice::{IceSettings, turn_credential};
use cocoon_signaling::protocol::{ErrorCode, FromServer, IceServer, Secret, ToServer};
use common::{RawPeer, TestServer};

const TURN_SECRET: &str = "shared-with-coturn";

async fn server_with_ice(dir: &std::path::Path) -> TestServer {
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.to_owned());
    config.ice = IceSettings {
        urls: vec![
            "stun:127.0.0.1:3478".into(),
            "turn:127.0.0.1:3478?transport=udp".into(),
        ],
        turn_secret: Some(Secret::new(TURN_SECRET)),
        ttl: Duration::from_secs(600),
    };
    TestServer::start_with(config).await
}

/// Checks an `ice_servers` reply: STUN as configured, TURN with a valid
/// credential for `id` that expires in about `ttl`.
fn check_issued(reply: Option<FromServer>, id: &str) {
    let Some(FromServer::IceServers {
        ice_servers,
        ttl_secs,
    }) = reply
    else {
        panic!("expected ice_servers, got {reply:?}");
    };
    assert_eq!(ttl_secs, 600);
    assert_eq!(
        ice_servers[0],
        IceServer {
            urls: vec!["stun:127.0.0.1:3478".into()],
            username: None,
            credential: None,
        }
    );
    let turn = &ice_servers[1];
    assert_eq!(turn.urls, ["turn:127.0.0.1:3478?transport=udp"]);
    let username = turn.username.as_deref().unwrap();
    let (expiry, who) = username.split_once(':').unwrap();
    assert_eq!(who, id);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(
        turn.credential.as_deref(),
        Some(turn_credential(&Secret::new(TURN_SECRET), username).as_str())
    );
}

#[tokio::test]
async fn clients_and_workers_get_fresh_turn_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_with_ice(dir.path()).await;

    // Nobody gets TURN credentials before saying who they are.
    let mut stranger = RawPeer::connect(&server.url()).await;
    stranger.send(&ToServer::GetIceServers {}).await;
    stranger.expect_error(ErrorCode::NotAuthenticated).await;

    let mut client = RawPeer::connect(&server.url()).await;
    client
        .send(&ToServer::Authenticate {
            access_token: server.token(TokenKind::Access, "alice"),
        })
        .await;
    assert!(matches!(
        client.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
    client.send(&ToServer::GetIceServers {}).await;
    check_issued(client.recv().await, "alice");

    let mut worker = RawPeer::connect(&server.url()).await;
    worker
        .send(&ToServer::Register {
            secret: Secret::new("kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0bM9pK8gV4aS2="),
            device_id: None,
            setup_token: None,
            name: None,
        })
        .await;
    let Some(FromServer::Registered { device_id, .. }) = worker.recv().await else {
        panic!("registration");
    };
    worker.send(&ToServer::GetIceServers {}).await;
    check_issued(worker.recv().await, device_id.as_str());
}

#[tokio::test]
async fn a_server_without_ice_settings_hands_out_an_empty_list() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut client = server.client("alice").await;
    let (servers, _) = client.ice_servers().await.unwrap();
    assert!(servers.is_empty());
}

#[tokio::test]
async fn turn_urls_without_a_secret_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.path().to_owned());
    config.ice.urls = vec!["turn:127.0.0.1:3478".into()];
    let err = cocoon_signaling::Server::bind(config)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("TURN secret"), "{err:#}");
}
