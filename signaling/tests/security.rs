//! Security regressions of the signaling server on its own (SECURITY.md
//! names the promise each test proves): tokens at every entry point and the
//! pinned algorithm, device takeover and racing registrations, rate limits,
//! hostile JSON, connections that try to exhaust the server, bounded queues,
//! browser origins in development mode, relay routing across owners, and
//! secrets kept out of the server's logs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use cocoon_signaling::auth::{Claims, TokenKey, TokenKind, unix_now};
use cocoon_signaling::hub::Hub;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::limit::MAX_FAILURES;
use cocoon_signaling::protocol::{
    ClientId, DeviceId, ErrorCode, FromServer, HiveKind, MAX_MESSAGE_BYTES, Secret, ToServer,
    UserId,
};
use cocoon_signaling::{Config, Server};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// How long any awaited event may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A server on a free loopback port, stopped when dropped.
struct TestServer {
    addr: SocketAddr,
    hub: Arc<Hub>,
    data: tempfile::TempDir,
    shutdown: CancellationToken,
    _task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::new(([127, 0, 0, 1], 0).into(), data.path().to_owned());
        adjust(&mut config);
        let server = Server::bind(config).await.expect("server binds");
        let addr = server.local_addr();
        let hub = server.hub().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        Self {
            addr,
            hub,
            data,
            shutdown,
            _task: task,
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

    /// The server's signing key, as kept in its data dir.
    fn key_bytes(&self) -> Vec<u8> {
        std::fs::read_to_string(self.data.path().join("token_key"))
            .unwrap()
            .trim()
            .as_bytes()
            .to_vec()
    }

    /// An authenticated client of `owner`.
    async fn client(&self, owner: &str) -> Peer {
        self.client_with_id(owner).await.0
    }

    /// An authenticated client of `owner`, and its client id.
    async fn client_with_id(&self, owner: &str) -> (Peer, ClientId) {
        let mut peer = Peer::connect(&self.url()).await;
        peer.send(&ToServer::Authenticate {
            access_token: self.token(TokenKind::Access, owner),
        })
        .await;
        match peer.recv().await {
            Some(FromServer::Authenticated { client_id, .. }) => (peer, client_id),
            other => panic!("{owner} cannot authenticate: {other:?}"),
        }
    }

    /// A registered device (claimed by `owner` when given) and its id.
    async fn device(&self, owner: Option<&str>) -> (Peer, DeviceId) {
        let mut peer = Peer::connect(&self.url()).await;
        peer.send(&register(
            &generate_secret(),
            None,
            owner.map(|o| self.token(TokenKind::Setup, o)),
        ))
        .await;
        match peer.recv().await {
            Some(FromServer::Registered { device_id, .. }) => (peer, device_id),
            other => panic!("registration failed: {other:?}"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn register(secret: &Secret, device_id: Option<DeviceId>, setup: Option<Secret>) -> ToServer {
    ToServer::Register {
        secret: secret.clone(),
        device_id,
        setup_token: setup,
        name: None,
    }
}

fn register_hive(token: Secret) -> ToServer {
    ToServer::RegisterHive {
        hive_token: token,
        name: "box".into(),
        kinds: vec![HiveKind {
            id: "native".into(),
            runner_type: "script".into(),
        }],
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket peer that can send anything.
struct Peer {
    ws: Ws,
}

impl Peer {
    async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connects");
        Self { ws }
    }

    /// Connects from another loopback address (127.0.0.x), as a different
    /// source address would.
    async fn connect_from(url: &str, server: SocketAddr, source: [u8; 4]) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let tcp = socket.connect(server).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
            .await
            .expect("connects");
        Self { ws }
    }

    async fn send_text(&mut self, text: impl Into<String>) {
        self.ws.send(Message::text(text.into())).await.unwrap();
    }

    async fn send(&mut self, message: &ToServer) {
        self.send_text(serde_json::to_string(message).unwrap())
            .await;
    }

    async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.unwrap();
    }

    /// The next text or binary message; `None` once the server closed.
    async fn recv_any(&mut self) -> Option<Message> {
        loop {
            let frame = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame in time");
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                    return Some(message);
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next protocol message (relay frames skipped); `None` once closed.
    async fn recv(&mut self) -> Option<FromServer> {
        loop {
            match self.recv_any().await? {
                Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
                _ => continue,
            }
        }
    }

    /// The next protocol message that is not a device status change.
    async fn recv_skipping_status(&mut self) -> Option<FromServer> {
        loop {
            match self.recv().await? {
                FromServer::DeviceStatus { .. } => continue,
                other => return Some(other),
            }
        }
    }

    async fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.recv_skipping_status().await {
            Some(FromServer::Error { code: got, message }) if got == code => message,
            other => panic!("expected a {code:?} error, got {other:?}"),
        }
    }

    async fn expect_closed(&mut self) {
        assert_eq!(self.recv().await, None, "the connection should be closed");
    }
}

/// A token whose header and claims are exactly these, HMAC-SHA256-signed
/// with `key` whatever the header says.
fn hand_made(key: &[u8], header: &str, claims: &serde_json::Value) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims.to_string()));
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// Every kind of bad token, for `kind`, with the code the server answers.
fn bad_tokens(server: &TestServer, kind: TokenKind) -> Vec<(&'static str, String, ErrorCode)> {
    let key = server.key_bytes();
    let kind_name = serde_json::to_value(kind).unwrap();
    let claims = serde_json::json!({
        "sub": "alice", "kind": kind_name, "iat": 0, "exp": unix_now() + 3600
    });
    let valid = server.token(kind, "alice").expose().to_owned();
    let (head, rest) = valid.split_once('.').unwrap();
    let signature = rest.split_once('.').unwrap().1;
    let other_owner = B64.encode(
        serde_json::json!({"sub": "mallory", "kind": kind_name, "iat": 0, "exp": u64::MAX})
            .to_string(),
    );
    let foreign = TokenKey::new(b"a key that is not the server's one".to_vec());
    let wrong_kind = if kind == TokenKind::Access {
        TokenKind::Setup
    } else {
        TokenKind::Access
    };
    let invalid = ErrorCode::InvalidToken;
    vec![
        ("empty", String::new(), invalid),
        ("garbage", "not-a-token".into(), invalid),
        ("two parts", format!("{head}.{signature}"), invalid),
        (
            "truncated signature",
            valid[..valid.len() - 2].into(),
            invalid,
        ),
        ("appended byte", format!("{valid}A"), invalid),
        (
            "claims of another owner under the real signature",
            format!("{head}.{other_owner}.{signature}"),
            invalid,
        ),
        (
            "signed by another key",
            foreign.mint(kind, &UserId::new("alice"), Duration::from_secs(60)),
            invalid,
        ),
        (
            "expired",
            server.hub.tokens().sign(&Claims {
                sub: UserId::new("alice"),
                kind,
                iat: unix_now() - 100,
                exp: unix_now() - 1,
                spawn: None,
                hive: None,
            }),
            ErrorCode::TokenExpired,
        ),
        (
            "another kind",
            server.token(wrong_kind, "alice").expose().to_owned(),
            invalid,
        ),
        (
            "alg none, unsigned",
            format!(
                "{}.{}.",
                B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
                B64.encode(claims.to_string())
            ),
            invalid,
        ),
        // Algorithm confusion: a header naming another algorithm over a MAC
        // that is valid with the server's key. The algorithm is pinned, so
        // the header alone refuses it.
        (
            "alg none, signed",
            hand_made(&key, r#"{"alg":"none"}"#, &claims),
            invalid,
        ),
        (
            "alg HS512",
            hand_made(&key, r#"{"alg":"HS512"}"#, &claims),
            invalid,
        ),
        (
            "alg RS256",
            hand_made(&key, r#"{"alg":"RS256"}"#, &claims),
            invalid,
        ),
        (
            "alg ES256",
            hand_made(&key, r#"{"alg":"ES256"}"#, &claims),
            invalid,
        ),
        (
            "alg hs256",
            hand_made(&key, r#"{"alg":"hs256"}"#, &claims),
            invalid,
        ),
        (
            "no alg",
            hand_made(&key, r#"{"typ":"JWT"}"#, &claims),
            invalid,
        ),
        (
            "no exp",
            hand_made(
                &key,
                r#"{"alg":"HS256"}"#,
                &serde_json::json!({"sub": "alice", "kind": kind_name, "iat": 0}),
            ),
            invalid,
        ),
    ]
}

#[tokio::test]
async fn bad_access_tokens_never_authenticate() {
    let server = TestServer::start().await;
    // A correctly signed hand-made token passes: the table's refusals are
    // about what each case changes, not about how it was made.
    let key = server.key_bytes();
    let good = hand_made(
        &key,
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &serde_json::json!({"sub": "alice", "kind": "access", "iat": 0, "exp": unix_now() + 60}),
    );
    let mut peer = Peer::connect(&server.url()).await;
    peer.send(&ToServer::Authenticate {
        access_token: Secret::new(good),
    })
    .await;
    assert!(matches!(
        peer.recv().await,
        Some(FromServer::Authenticated { .. })
    ));

    let cases = bad_tokens(&server, TokenKind::Access);
    assert!(
        cases.len() < MAX_FAILURES as usize,
        "stay under the rate limit"
    );
    let mut peer = Peer::connect(&server.url()).await;
    peer.send_text(r#"{"type": "authenticate"}"#).await;
    peer.expect_error(ErrorCode::InvalidMessage).await;
    for (what, token, code) in cases {
        peer.send(&ToServer::Authenticate {
            access_token: Secret::new(token.clone()),
        })
        .await;
        let message = match peer.recv().await {
            Some(FromServer::Error { code: got, message }) if got == code => message,
            other => panic!("{what}: expected {code:?}, got {other:?}"),
        };
        assert!(
            token.len() < 8 || !message.contains(&token),
            "{what}: the token is not echoed: {message}"
        );
        // Still nobody: nothing a client may do works.
        peer.send(&ToServer::ListDevices {}).await;
        peer.expect_error(ErrorCode::NotAuthenticated).await;
        peer.send_binary(vec![0, 1, 2, 3]).await;
        peer.expect_error(ErrorCode::NotAuthenticated).await;
    }
}

#[tokio::test]
async fn bad_hive_tokens_never_register_a_hive() {
    let server = TestServer::start().await;
    let cases = bad_tokens(&server, TokenKind::Hive);
    assert!(
        cases.len() < MAX_FAILURES as usize,
        "stay under the rate limit"
    );
    let mut peer = Peer::connect(&server.url()).await;
    for (what, token, code) in cases {
        peer.send(&register_hive(Secret::new(token))).await;
        match peer.recv().await {
            Some(FromServer::Error { code: got, .. }) if got == code => {}
            other => panic!("{what}: expected {code:?}, got {other:?}"),
        }
    }
    let mut alice = server.client("alice").await;
    alice.send(&ToServer::ListHives {}).await;
    assert_eq!(
        alice.recv().await,
        Some(FromServer::HiveList { hives: vec![] }),
        "no hive was registered"
    );
}

#[tokio::test]
async fn bad_setup_tokens_never_claim_a_device() {
    let server = TestServer::start().await;
    for (what, token, code) in bad_tokens(&server, TokenKind::Setup) {
        let mut device = Peer::connect(&server.url()).await;
        device
            .send(&register(
                &generate_secret(),
                None,
                Some(Secret::new(token)),
            ))
            .await;
        match device.recv().await {
            Some(FromServer::Error { code: got, message }) if got == code => {
                assert!(message.contains("not claimed"), "{what}: {message}");
            }
            other => panic!("{what}: expected a {code:?} notice, got {other:?}"),
        }
        assert!(
            matches!(
                device.recv().await,
                Some(FromServer::Registered { owner: None, .. })
            ),
            "{what}: registered, unclaimed"
        );
    }
    // Another owner's valid setup token cannot take a claimed device.
    let secret = generate_secret();
    let mut first = Peer::connect(&server.url()).await;
    first
        .send(&register(
            &secret,
            None,
            Some(server.token(TokenKind::Setup, "alice")),
        ))
        .await;
    let Some(FromServer::Registered { device_id, owner }) = first.recv().await else {
        panic!("registration")
    };
    assert_eq!(owner, Some(UserId::new("alice")));
    drop(first);
    let mut again = Peer::connect(&server.url()).await;
    again
        .send(&register(
            &secret,
            Some(device_id.clone()),
            Some(server.token(TokenKind::Setup, "mallory")),
        ))
        .await;
    again.expect_error(ErrorCode::AccessDenied).await;
    assert!(matches!(
        again.recv().await,
        Some(FromServer::Registered { owner: Some(o), .. }) if o == UserId::new("alice")
    ));

    for owner in ["alice", "mallory"] {
        let mut client = server.client(owner).await;
        client.send(&ToServer::ListDevices {}).await;
        let Some(FromServer::DeviceList { devices }) = client.recv_skipping_status().await else {
            panic!("device list")
        };
        let ids: Vec<_> = devices.into_iter().map(|d| d.device_id).collect();
        match owner {
            "alice" => assert_eq!(ids, vec![device_id.clone()]),
            _ => assert!(ids.is_empty(), "mallory owns nothing: {ids:?}"),
        }
    }
}

#[tokio::test]
async fn takeover_attempts_fail_and_racing_registrations_leave_one_owner_and_one_route() {
    let server = TestServer::start().await;
    let secret = generate_secret();
    let owners = ["alice", "bob", "carol", "dave", "erin", "frank"];

    // First registrations of one secret, all at once, each claiming for
    // another owner: exactly one wins.
    let attempts = owners.map(|owner| {
        let (url, secret) = (server.url(), secret.clone());
        let token = server.token(TokenKind::Setup, owner);
        tokio::spawn(async move {
            let mut peer = Peer::connect(&url).await;
            peer.send(&register(&secret, None, Some(token))).await;
            let reply = peer.recv().await;
            (owner, peer, reply)
        })
    });
    let mut winners = Vec::new();
    for attempt in attempts {
        let (owner, peer, reply) = attempt.await.unwrap();
        match reply {
            Some(FromServer::Registered {
                device_id,
                owner: claimed,
            }) => {
                assert_eq!(claimed, Some(UserId::new(owner)));
                winners.push((owner, peer, device_id));
            }
            Some(FromServer::Error {
                code: ErrorCode::DeviceIdRequired,
                ..
            }) => {}
            other => panic!("{owner}: {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one first registration wins");
    let (owner, mut holder, device_id) = winners.pop().unwrap();

    // Without the secret, or without the saved id, nobody takes it over;
    // none of this disturbs the holder.
    let required = ErrorCode::DeviceIdRequired;
    let mismatch = ErrorCode::DeviceIdMismatch;
    let upper = DeviceId::new(device_id.as_str().to_uppercase());
    let spaced = DeviceId::new(format!("{device_id} "));
    let takeovers = [
        ("no device_id", register(&secret, None, None), required),
        (
            "an empty device_id",
            register(&secret, Some(DeviceId::new("")), None),
            mismatch,
        ),
        (
            "the id in upper case",
            register(&secret, Some(upper), None),
            mismatch,
        ),
        (
            "the id with a trailing space",
            register(&secret, Some(spaced), None),
            mismatch,
        ),
        (
            "the id without the secret",
            register(&generate_secret(), Some(device_id.clone()), None),
            mismatch,
        ),
    ];
    for (what, message, code) in takeovers {
        let mut thief = Peer::connect(&server.url()).await;
        thief.send(&message).await;
        match thief.recv().await {
            Some(FromServer::Error { code: got, .. }) if got == code => {}
            other => panic!("{what}: expected {code:?}, got {other:?}"),
        }
        thief.expect_closed().await;
    }
    let mut client = server.client(owner).await;
    client
        .send(&ToServer::SyncData {
            payload: serde_json::json!("still yours"),
            device_id: Some(device_id.clone()),
            client_id: None,
        })
        .await;
    assert!(matches!(
        holder.recv().await,
        Some(FromServer::SyncData { payload, .. }) if payload == "still yours"
    ));

    // Reconnections with secret and id, all at once: the last one holds the
    // route, every other one is told it was replaced and closed.
    let reconnects = (0..6).map(|_| {
        let (url, secret, id) = (server.url(), secret.clone(), device_id.clone());
        tokio::spawn(async move {
            let mut peer = Peer::connect(&url).await;
            peer.send(&register(&secret, Some(id), None)).await;
            assert!(matches!(
                peer.recv().await,
                Some(FromServer::Registered { .. })
            ));
            peer
        })
    });
    let mut peers = vec![holder];
    for reconnect in reconnects {
        peers.push(reconnect.await.unwrap());
    }
    let mut live = Vec::new();
    for mut peer in peers {
        // Replaced connections get the notice at once; the live one gets
        // the probe below, so a second client message tells them apart.
        client
            .send(&ToServer::SyncData {
                payload: serde_json::json!("probe"),
                device_id: Some(device_id.clone()),
                client_id: None,
            })
            .await;
        match peer.recv().await {
            Some(FromServer::Error {
                code: ErrorCode::Replaced,
                ..
            }) => peer.expect_closed().await,
            Some(FromServer::SyncData { .. }) => live.push(peer),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(live.len(), 1, "one route, on a live connection");
    let (devices_online, _) = server.hub.counts();
    assert_eq!(devices_online, 1);
}

#[tokio::test]
async fn failed_registrations_are_rate_limited_per_address() {
    let server = TestServer::start().await;
    let secret = generate_secret();
    let (_holder, device_id) = {
        let mut peer = Peer::connect(&server.url()).await;
        peer.send(&register(&secret, None, None)).await;
        let Some(FromServer::Registered { device_id, .. }) = peer.recv().await else {
            panic!("registration")
        };
        (peer, device_id)
    };
    for n in 0..MAX_FAILURES {
        let mut thief = Peer::connect(&server.url()).await;
        let wrong = DeviceId::new(format!("{n:064x}"));
        thief.send(&register(&secret, Some(wrong), None)).await;
        thief.expect_error(ErrorCode::DeviceIdMismatch).await;
    }
    // Now even the right id is refused from this address…
    let mut thief = Peer::connect(&server.url()).await;
    thief
        .send(&register(&secret, Some(device_id.clone()), None))
        .await;
    thief.expect_error(ErrorCode::RateLimited).await;
    thief.expect_closed().await;
    let mut guesser = Peer::connect(&server.url()).await;
    guesser
        .send(&ToServer::Authenticate {
            access_token: server.token(TokenKind::Access, "alice"),
        })
        .await;
    guesser.expect_error(ErrorCode::RateLimited).await;

    // …but not from another one.
    let mut other = Peer::connect_from(&server.url(), server.addr, [127, 0, 0, 2]).await;
    other
        .send(&ToServer::Authenticate {
            access_token: server.token(TokenKind::Access, "alice"),
        })
        .await;
    assert!(matches!(
        other.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
}

/// `[[[…]]]` nested `depth` deep.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn deeply_nested_and_oversized_json_is_refused_and_harmless() {
    let server = TestServer::start().await;
    let (mut device, device_id) = server.device(Some("alice")).await;
    let mut alice = server.client("alice").await;

    // Nesting far beyond serde_json's recursion limit, inside the size limit,
    // in every place a message can hold it.
    let deep = nested(400_000);
    assert!(deep.len() < MAX_MESSAGE_BYTES);
    for text in [
        deep.clone(),
        format!(r#"{{"type": "sync_data", "payload": {deep}}}"#),
        format!(r#"{{"payload": {deep}, "type": "sync_data"}}"#),
        format!(r#"{{"type": {deep}}}"#),
        format!(r#"{{"type": "list_devices", "x": {deep}}}"#),
    ] {
        alice.send_text(text).await;
        match alice.recv_skipping_status().await {
            Some(FromServer::Error { code, .. }) => assert!(
                matches!(code, ErrorCode::InvalidJson | ErrorCode::InvalidMessage),
                "{code:?}"
            ),
            other => panic!("expected an error, got {other:?}"),
        }
    }
    // A payload nested within the limit is routed as it is.
    let fine = serde_json::from_str::<serde_json::Value>(&nested(100)).unwrap();
    alice
        .send(&ToServer::SyncData {
            payload: fine.clone(),
            device_id: Some(device_id.clone()),
            client_id: None,
        })
        .await;
    assert!(matches!(
        device.recv().await,
        Some(FromServer::SyncData { payload, .. }) if payload == fine
    ));

    // Over the limit: an error and the connection stays; far over it: closed.
    alice
        .send_text(format!(
            r#"{{"type":"sync_data","payload":"{}"}}"#,
            "x".repeat(MAX_MESSAGE_BYTES)
        ))
        .await;
    alice.expect_error(ErrorCode::MessageTooLarge).await;
    alice.send(&ToServer::ListDevices {}).await;
    assert!(matches!(
        alice.recv_skipping_status().await,
        Some(FromServer::DeviceList { .. })
    ));
    // The server may close before the whole frame is written.
    let _ = alice
        .ws
        .send(Message::text("x".repeat(4 * MAX_MESSAGE_BYTES + 1)))
        .await;
    alice.expect_closed().await;
    let mut again = server.client("alice").await;
    again.send(&ToServer::ListDevices {}).await;
    assert!(matches!(
        again.recv_skipping_status().await,
        Some(FromServer::DeviceList { devices }) if devices.len() == 1
    ));
}

/// Reads until the server closes `tcp`, which must happen `within`.
async fn expect_closed_within(mut tcp: TcpStream, within: Duration) {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the server kept a slow connection open for {within:?}"),
        }
    }
}

#[tokio::test]
async fn idle_and_slow_connections_cannot_exhaust_the_server() {
    let server = TestServer::start_with(|config| {
        config.max_connections = 4;
        config.timeouts.handshake = Duration::from_millis(500);
    })
    .await;
    // Every slot taken by upgraded WebSockets that never say who they are…
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(Peer::connect(&server.url()).await);
    }
    // …a fifth peer still gets in, once the handshake timeout frees a slot.
    let started = Instant::now();
    let mut late = tokio::time::timeout(DEADLINE, Peer::connect(&server.url()))
        .await
        .expect("a slot frees up");
    late.send(&ToServer::Authenticate {
        access_token: server.token(TokenKind::Access, "alice"),
    })
    .await;
    assert!(matches!(
        late.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    for peer in &mut silent {
        peer.expect_error(ErrorCode::HandshakeTimeout).await;
        peer.expect_closed().await;
    }
    drop(late);

    // Raw TCP that never finishes its request headers, or sends nothing at
    // all: the server's header timeout closes both.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let nothing = TcpStream::connect(server.addr).await.unwrap();
    tokio::join!(
        expect_closed_within(partial, Duration::from_secs(15)),
        expect_closed_within(nothing, Duration::from_secs(15)),
    );
}

#[tokio::test]
async fn a_receiver_that_stops_reading_gets_a_bounded_queue() {
    let server = TestServer::start().await;
    let (mut device, device_id) = server.device(Some("alice")).await;
    // The client keeps its socket's buffers small and never reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut stalled, _) =
        tokio_tungstenite::client_async(server.url(), MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
    stalled
        .send(Message::text(
            serde_json::to_string(&ToServer::Authenticate {
                access_token: server.token(TokenKind::Access, "alice"),
            })
            .unwrap(),
        ))
        .await
        .unwrap();
    let client_id = loop {
        match stalled.next().await {
            Some(Ok(Message::Text(text))) => {
                if let FromServer::Authenticated { client_id, .. } =
                    serde_json::from_str(&text).unwrap()
                {
                    break client_id;
                }
            }
            other => panic!("{other:?}"),
        }
    };
    // The device must learn of the client before it may answer it.
    let mut alice = server.client("alice").await;
    alice
        .send(&ToServer::SyncData {
            payload: serde_json::json!(0),
            device_id: Some(device_id),
            client_id: None,
        })
        .await;
    assert!(matches!(
        device.recv().await,
        Some(FromServer::SyncData { .. })
    ));

    // The device writes 64 KiB messages to the stalled client until the
    // server says the queue is full.
    let chunk = serde_json::json!("y".repeat(64 * 1024));
    let (mut sink, mut replies) = device.ws.split();
    let mut sent = 0;
    let refused = loop {
        assert!(sent < 2_000, "no backpressure after {sent} messages");
        let message = ToServer::SyncData {
            payload: chunk.clone(),
            device_id: None,
            client_id: Some(client_id.clone()),
        };
        sink.send(Message::text(serde_json::to_string(&message).unwrap()))
            .await
            .unwrap();
        sent += 1;
        // Replies come only on errors: look without waiting.
        if let Some(Some(Ok(Message::Text(text)))) =
            futures_util::FutureExt::now_or_never(replies.next())
        {
            break serde_json::from_str::<FromServer>(&text).unwrap();
        }
    };
    assert!(
        matches!(
            refused,
            FromServer::Error {
                code: ErrorCode::PeerBacklogged,
                ..
            }
        ),
        "{refused:?}"
    );
    // Other clients are not held up by the stalled one.
    alice.send(&ToServer::ListDevices {}).await;
    assert!(matches!(
        alice.recv_skipping_status().await,
        Some(FromServer::DeviceList { .. })
    ));
}

/// A WebSocket upgrade with these `Host` and `Origin` headers; the HTTP
/// status it gets.
async fn upgrade_status(server: &TestServer, host: &str, origin: Option<&str>) -> u16 {
    let mut request = server.url().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Host", HeaderValue::from_str(host).unwrap());
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("{err}"),
    }
}

#[tokio::test]
async fn web_pages_cannot_use_the_development_server() {
    let server = TestServer::start_with(|config| {
        config.dev_owner = Some(UserId::new("local"));
    })
    .await;
    let port = server.addr.port();
    let own = format!("127.0.0.1:{port}");
    // The browser client served by the server itself, and local programs
    // (which send no Origin), get in.
    assert_eq!(
        upgrade_status(&server, &own, Some(&format!("http://{own}"))).await,
        101
    );
    assert_eq!(
        upgrade_status(
            &server,
            &format!("localhost:{port}"),
            Some(&format!("http://localhost:{port}"))
        )
        .await,
        101
    );
    assert_eq!(upgrade_status(&server, &own, None).await, 101);
    // A page from anywhere else does not: foreign origins, `null` (sandboxed
    // frames, files), and a DNS-rebinding page whose Host and Origin agree
    // on a name that happens to point at loopback.
    for (host, origin) in [
        (own.clone(), "https://evil.example".to_owned()),
        (own.clone(), "null".to_owned()),
        (own.clone(), format!("http://{own}.evil.example")),
        (
            format!("rebind.evil.example:{port}"),
            format!("http://rebind.evil.example:{port}"),
        ),
    ] {
        assert_eq!(
            upgrade_status(&server, &host, Some(&origin)).await,
            403,
            "{host} {origin}"
        );
    }

    // Binding to loopback is not authentication: a local program without a
    // token reaches nothing.
    let mut local = Peer::connect(&server.url()).await;
    local
        .send(&ToServer::SyncData {
            payload: serde_json::json!({"type": "execute", "command": "id"}),
            device_id: None,
            client_id: None,
        })
        .await;
    local.expect_error(ErrorCode::NotAuthenticated).await;
    local
        .send(&ToServer::Authenticate {
            access_token: Secret::new("local"),
        })
        .await;
    local.expect_error(ErrorCode::InvalidToken).await;
}

#[tokio::test]
async fn relay_frames_and_replies_stay_within_the_owner() {
    let server = TestServer::start().await;
    let (mut device, device_id) = server.device(Some("alice")).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    let relay = |address: &str, frame: &[u8]| {
        let mut message = vec![address.len() as u8];
        message.extend_from_slice(address.as_bytes());
        message.extend_from_slice(frame);
        message
    };

    // Bob's frames to Alice's device: named, or through the "only device"
    // default (Bob has none).
    bob.send_binary(relay(device_id.as_str(), b"\x04bob's ping"))
        .await;
    bob.expect_error(ErrorCode::AccessDenied).await;
    bob.send_binary(relay("", b"\x04bob's ping")).await;
    bob.expect_error(ErrorCode::NoTarget).await;
    bob.send(&ToServer::SelectDevice {
        device_id: device_id.clone(),
    })
    .await;
    bob.expect_error(ErrorCode::AccessDenied).await;

    // Alice's frame arrives first at the device: nothing of Bob's did.
    alice.send_binary(relay(device_id.as_str(), b"alice")).await;
    let Some(Message::Binary(got)) = device.recv_any().await else {
        panic!("the device gets Alice's frame")
    };
    let alice_id = {
        let len = got[0] as usize;
        assert_eq!(&got[1 + len..], b"alice");
        String::from_utf8(got[1..1 + len].to_vec()).unwrap()
    };

    // The device can answer Alice, and nobody else: not Bob's client (a
    // malicious device might learn or guess its id), not another device,
    // not an invented id.
    let (_bob_again, bob_client) = server.client_with_id("bob").await;
    let (_other_device, other_device_id) = server.device(Some("alice")).await;
    for target in [
        bob_client.as_str(),
        other_device_id.as_str(),
        "c-000000000000000000000000",
    ] {
        device.send_binary(relay(target, b"leak")).await;
        device.expect_error(ErrorCode::ClientGone).await;
    }
    device.send_binary(relay(&alice_id, b"answer")).await;
    loop {
        match alice.recv_any().await {
            Some(Message::Binary(frame)) => {
                assert!(frame.ends_with(b"answer"));
                break;
            }
            Some(_) => continue,
            None => panic!("alice's connection closed"),
        }
    }
}

/// The `cocoon-signaling` binary, with its output collected.
struct ServerProcess {
    child: tokio::process::Child,
    output: Arc<std::sync::Mutex<String>>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl ServerProcess {
    fn spawn(data_dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_cocoon-signaling"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cocoon-signaling starts");
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let pipes: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for pipe in pipes {
            let (tx, output) = (tx.clone(), output.clone());
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut reader = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    output.lock().unwrap().push_str(&line);
                    output.lock().unwrap().push('\n');
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            output,
            lines,
        }
    }

    /// The address from the "listening" line.
    async fn addr(&mut self) -> SocketAddr {
        loop {
            let line = tokio::time::timeout(DEADLINE, self.lines.recv())
                .await
                .expect("the server starts in time")
                .expect("the server is running");
            if let Some(rest) = line.split("addr=").nth(1) {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    }

    /// Stops it (SIGTERM) and returns everything it printed.
    async fn stop(mut self) -> String {
        let pid = self.child.id().unwrap();
        std::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap();
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the server stops")
            .unwrap();
        // The pipes close with the process; their readers end on their own.
        while tokio::time::timeout(DEADLINE, self.lines.recv())
            .await
            .expect("the output ends")
            .is_some()
        {}
        self.output.lock().unwrap().clone()
    }
}

/// A token minted by the binary itself, as an operator would.
fn mint(data_dir: &std::path::Path, kind: &str, owner: &str) -> Secret {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_cocoon-signaling"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["token", kind, "--owner", owner])
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    Secret::new(String::from_utf8(output.stdout).unwrap().trim())
}

#[tokio::test]
async fn secrets_never_reach_the_server_logs() {
    let data = tempfile::tempdir().unwrap();
    let salt = "pepper-b1f0c2e9d8a7b6c5d4e3f2a1b0c9d8e7";
    let turn_secret = "turn-static-auth-secret-5e4d3c2b1a";
    let access = mint(data.path(), "access", "alice");
    let setup = mint(data.path(), "setup", "alice");
    let hive = mint(data.path(), "hive", "alice");
    let mut server = ServerProcess::spawn(
        data.path(),
        &[
            // Everything the server and its libraries log, at every level.
            ("RUST_LOG", "trace"),
            ("NO_COLOR", "1"),
            ("HMAC_SALT", salt),
            ("TURN_SECRET", turn_secret),
        ],
        &["--ice-url", "turn:127.0.0.1:3478"],
    );
    let addr = server.addr().await;
    let url = format!("ws://{addr}/ws");

    // A worker registers, claims itself, and fails a registration…
    let secret = generate_secret();
    let mut worker = Peer::connect(&url).await;
    worker
        .send(&register(&secret, None, Some(setup.clone())))
        .await;
    let Some(FromServer::Registered { device_id, .. }) = worker.recv().await else {
        panic!("registration")
    };
    worker.send(&ToServer::GetIceServers {}).await;
    let Some(FromServer::IceServers { ice_servers, .. }) = worker.recv().await else {
        panic!("ice servers")
    };
    let turn_credential = ice_servers
        .iter()
        .find_map(|server| server.credential.clone())
        .expect("a TURN credential");
    let mut thief = Peer::connect(&url).await;
    let wrong_id = DeviceId::new("0".repeat(64));
    thief.send(&register(&secret, Some(wrong_id), None)).await;
    thief.expect_error(ErrorCode::DeviceIdMismatch).await;
    let weak = "Tr0ub4dor&3-is-not-long-enough";
    let mut weakling = Peer::connect(&url).await;
    weakling
        .send(&register(&Secret::new(weak), None, None))
        .await;
    let refusal = weakling.expect_error(ErrorCode::WeakSecret).await;
    assert!(!refusal.contains(weak), "{refusal}");

    // …a client authenticates, talks to it, and a guess fails…
    let mut client = Peer::connect(&url).await;
    client
        .send(&ToServer::Authenticate {
            access_token: access.clone(),
        })
        .await;
    assert!(matches!(
        client.recv().await,
        Some(FromServer::Authenticated { .. })
    ));
    client
        .send(&ToServer::SyncData {
            payload: serde_json::json!({"type": "execute", "command": "true"}),
            device_id: Some(device_id),
            client_id: None,
        })
        .await;
    assert!(matches!(
        worker.recv().await,
        Some(FromServer::SyncData { .. })
    ));
    let forged = format!("{}x", access.expose());
    let mut guesser = Peer::connect(&url).await;
    guesser
        .send(&ToServer::Authenticate {
            access_token: Secret::new(forged.clone()),
        })
        .await;
    guesser.expect_error(ErrorCode::InvalidToken).await;

    // …and a hive registers.
    let mut hive_peer = Peer::connect(&url).await;
    hive_peer.send(&register_hive(hive.clone())).await;
    assert!(matches!(
        hive_peer.recv().await,
        Some(FromServer::HiveRegistered { .. })
    ));
    drop((worker, client, guesser, hive_peer));

    let logs = server.stop().await;
    // Everything the server keeps is its user's alone.
    for entry in std::fs::read_dir(data.path()).unwrap() {
        let entry = entry.unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&entry.metadata().unwrap().permissions());
        assert_eq!(
            mode & 0o077,
            0,
            "{:?} has mode {:o}",
            entry.file_name(),
            mode & 0o777
        );
    }
    assert!(
        logs.contains("device registered"),
        "the logs were captured: {logs}"
    );
    let key = std::fs::read_to_string(data.path().join("token_key")).unwrap();
    for (what, value) in [
        ("the device secret", secret.expose()),
        ("a weak secret", weak),
        ("the access token", access.expose()),
        ("the setup token", setup.expose()),
        ("the hive token", hive.expose()),
        ("a guessed token", forged.as_str()),
        ("the HMAC salt", salt),
        ("the token key", key.trim()),
        ("the TURN secret", turn_secret),
        ("an issued TURN credential", turn_credential.as_str()),
    ] {
        assert!(!logs.contains(value), "{what} is in the server's logs");
        // The signature alone would be enough to replay a token.
        if let Some((_, signature)) = value.rsplit_once('.') {
            assert!(
                signature.len() < 16 || !logs.contains(signature),
                "{what}'s signature is in the server's logs"
            );
        }
    }
}
