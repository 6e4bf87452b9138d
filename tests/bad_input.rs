//! Malformed, unknown, oversized and out-of-order messages get an error reply
//! and the connection stays usable.

mod common;

use std::time::Duration;

use cocoon_signaling::Config;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::protocol::{ErrorCode, FromServer, MAX_MESSAGE_BYTES, ToServer};
use common::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[tokio::test]
async fn bad_frames_get_errors_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut peer = RawPeer::connect(&server.url()).await;

    let cases: Vec<(String, ErrorCode)> = vec![
        ("{not json".into(), ErrorCode::InvalidJson),
        ("[]".into(), ErrorCode::InvalidJson),
        (r#"{"no_type": 1}"#.into(), ErrorCode::InvalidJson),
        (r#"{"type": "format_disk"}"#.into(), ErrorCode::UnknownType),
        (r#"{"type": "register"}"#.into(), ErrorCode::InvalidMessage),
        (
            r#"{"type": "authenticate", "access_token": 5}"#.into(),
            ErrorCode::InvalidMessage,
        ),
        (
            r#"{"type": "list_devices"}"#.into(),
            ErrorCode::NotAuthenticated,
        ),
        (
            r#"{"type": "sync_data", "payload": {}}"#.into(),
            ErrorCode::NotAuthenticated,
        ),
        (
            format!(
                r#"{{"type":"sync_data","payload":"{}"}}"#,
                "x".repeat(MAX_MESSAGE_BYTES + 512 * 1024)
            ),
            ErrorCode::MessageTooLarge,
        ),
    ];
    for (text, code) in cases {
        peer.send_text(text).await;
        peer.expect_error(code).await;
    }
    peer.send_binary(vec![0, 1, 2]).await;
    peer.expect_error(ErrorCode::NotAuthenticated).await;
    peer.send_binary(Vec::new()).await;
    peer.expect_error(ErrorCode::InvalidMessage).await;
    peer.send_binary(vec![200, b'a']).await;
    peer.expect_error(ErrorCode::InvalidMessage).await;
    peer.send_binary(vec![1; cocoon_signaling::protocol::MAX_RELAY_BYTES + 1])
        .await;
    peer.expect_error(ErrorCode::MessageTooLarge).await;
    peer.send_text("").await;
    peer.expect_error(ErrorCode::InvalidJson).await;

    // Still alive: authenticate and use it.
    peer.send(&ToServer::Authenticate {
        access_token: server.token(TokenKind::Access, "alice"),
    })
    .await;
    assert!(matches!(
        peer.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
    peer.send(&ToServer::Authenticate {
        access_token: server.token(TokenKind::Access, "alice"),
    })
    .await;
    peer.expect_error(ErrorCode::AlreadyAuthenticated).await;
    peer.send_text(r#"{"type": "sync_data", "payload": null, "device_id": 12}"#)
        .await;
    peer.expect_error(ErrorCode::InvalidMessage).await;
    peer.send(&ToServer::ListDevices {}).await;
    assert!(matches!(
        peer.recv().await,
        Some(FromServer::DeviceList { .. })
    ));
}

#[tokio::test]
async fn foreign_browser_origins_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut request = server.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", HeaderValue::from_static("https://evil.example"));
    let err = tokio_tungstenite::connect_async(request)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");

    let mut request = server.url().into_client_request().unwrap();
    let own = format!("http://{}", server.addr);
    request
        .headers_mut()
        .insert("Origin", HeaderValue::from_str(&own).unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .expect("same origin is fine");
}

#[tokio::test]
async fn health_reports_counts() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let _client = server.client("alice").await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""status":"ok""#), "{response}");
    assert!(response.contains(r#""clients":1"#), "{response}");
}

#[tokio::test]
async fn development_mode_refuses_non_loopback_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(([0, 0, 0, 0], 0).into(), dir.path().to_owned());
    config.dev_owner = Some(cocoon_signaling::protocol::UserId::new("local"));
    let err = cocoon_signaling::Server::bind(config)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("loopback"), "{err}");
}

fn fast_timeouts(dir: &std::path::Path) -> Config {
    let mut config = Config::new(([127, 0, 0, 1], 0).into(), dir.to_owned());
    config.timeouts = cocoon_signaling::conn::Timeouts {
        handshake: Duration::from_millis(300),
        ping_interval: Duration::from_millis(100),
        idle: Duration::from_millis(600),
    };
    config
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fast_timeouts(dir.path())).await;
    let mut peer = RawPeer::connect(&server.url()).await;
    peer.expect_error(ErrorCode::HandshakeTimeout).await;
    peer.expect_closed().await;
}

#[tokio::test]
async fn keepalive_holds_a_reading_peer_and_drops_a_dead_one() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fast_timeouts(dir.path())).await;
    let token = server.token(TokenKind::Access, "alice");
    let (mut ws, _) = tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    let auth = serde_json::to_string(&ToServer::Authenticate {
        access_token: token,
    })
    .unwrap();
    futures_util::SinkExt::send(&mut ws, Message::text(auth))
        .await
        .unwrap();

    // Reading answers pings with pongs: alive well past the idle timeout.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Text(_))) => {}
            other => panic!("connection ended while the peer was answering: {other:?}"),
        }
    }
    assert!(pings >= 5, "only {pings} pings");

    // Not reading means no pongs: the server gives up on the connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server must close a silent connection");
}

#[tokio::test]
async fn guessing_tokens_or_secrets_gets_an_address_rate_limited() {
    use cocoon_signaling::limit::MAX_FAILURES;
    use cocoon_signaling::protocol::Secret;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let mut peer = RawPeer::connect(&server.url()).await;
    for n in 0..MAX_FAILURES {
        peer.send(&ToServer::Authenticate {
            access_token: Secret::new(format!("guess-{n}")),
        })
        .await;
        peer.expect_error(ErrorCode::InvalidToken).await;
    }
    // Even a valid token is refused now, and the connection closed.
    peer.send(&ToServer::Authenticate {
        access_token: server.token(TokenKind::Access, "alice"),
    })
    .await;
    peer.expect_error(ErrorCode::RateLimited).await;
    peer.expect_closed().await;

    let mut worker = RawPeer::connect(&server.url()).await;
    worker
        .send(&ToServer::Register {
            secret: cocoon_signaling::identity::generate_secret(),
            device_id: None,
            setup_token: None,
            name: None,
        })
        .await;
    worker.expect_error(ErrorCode::RateLimited).await;
}
