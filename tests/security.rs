//! Security regressions with a real server, real workers, real PTYs and
//! real WebRTC on loopback (SECURITY.md names the promise each test
//! proves): nothing runs without the owner's token, session ids are
//! useless to other owners, a wrong DTLS fingerprint opens no channel,
//! empty frames everywhere, SSRF in every encoding, hijacking environment
//! variables, paths that try to leave their directory, hostile JSON on the
//! control stream, closing terminals under pressure, caps on commands and
//! terminals, and secrets kept out of logs, process lists, files and
//! children.

mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cocoon::client::Client;
use cocoon::link::rtc::{Events, RtcEvent, RtcPeer};
use cocoon::link::ws::{Incoming, WsLink};
use cocoon::session::stream::ControlStream;
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::frame::{CONTROL_STREAM, Frame, MAX_DATA};
use cocoon_signaling::protocol::service::{
    Encoding, HeaderValues, Headers, ProxyHttp, ProxyResult, Request, Response, ServiceErrorCode,
    SessionId,
};
use cocoon_signaling::protocol::{ClientId, ErrorCode, FromServer, Secret, ToServer};
use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;
use webrtc::data_channel::RTCDataChannel;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;

/// What a hand-made session client sees.
enum Seen {
    /// A response on the control stream.
    Response(Response),
    /// Something from its own WebRTC peer connection.
    Rtc(RtcEvent),
    /// A frame that is neither control data nor an acknowledgement.
    Frame(Frame),
}

/// A session-layer client written out by hand, so that a test can send
/// what the real client never would: tampered SDP, empty and malformed
/// frames, raw control bytes.
struct RawSession {
    link: WsLink,
    client_id: ClientId,
    device: String,
    /// The worker's side of the control stream, as received.
    control: ControlStream,
    /// Where the next byte this client sends on the control stream goes
    /// (the relay and the data channel lose nothing in these tests, so
    /// nothing is kept for resending).
    control_offset: u64,
    rtc: Option<(RtcPeer, Events)>,
    seen: VecDeque<Seen>,
}

impl RawSession {
    async fn connect(rig: &Rig) -> Self {
        Self::connect_as(rig, "alice").await
    }

    async fn connect_as(rig: &Rig, owner: &str) -> Self {
        let client = Client::connect(
            &rig.server.url(),
            &rig.server.token(TokenKind::Access, owner),
            plain_tls(),
        )
        .await
        .unwrap();
        let client_id = client.client_id.clone();
        Self {
            link: client.into_link(),
            client_id,
            device: rig.device_id.to_string(),
            control: ControlStream::new(0),
            control_offset: 0,
            rtc: None,
            seen: VecDeque::new(),
        }
    }

    async fn send_relay(&mut self, bytes: &[u8]) {
        self.link.send_relay(&self.device, bytes).await.unwrap();
    }

    async fn send_frame(&mut self, frame: Frame) {
        self.send_relay(&frame.encode()).await;
    }

    /// Sends bytes on the control stream as they are (no length prefix).
    async fn send_control_bytes(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(MAX_DATA) {
            let frame = Frame::Data {
                stream: CONTROL_STREAM,
                offset: self.control_offset,
                bytes: Bytes::copy_from_slice(chunk),
            };
            self.control_offset += chunk.len() as u64;
            self.send_frame(frame).await;
        }
    }

    /// Sends one control message: its length, then its bytes.
    async fn send_control(&mut self, message: &[u8]) {
        let mut framed = (message.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(message);
        self.send_control_bytes(&framed).await;
    }

    async fn request(&mut self, request: &Request) {
        self.send_control(&serde_json::to_vec(request).unwrap())
            .await;
    }

    /// Starts a WebRTC connection whose offer goes through `edit` first.
    async fn offer(&mut self, edit: impl FnOnce(String) -> String) {
        if let Some((old, _)) = self.rtc.take() {
            old.close().await;
        }
        let (peer, events) = RtcPeer::new(&loopback_rtc()).await.unwrap();
        let sdp = edit(peer.offer().await.unwrap());
        self.rtc = Some((peer, events));
        self.request(&Request::RtcOffer { sdp }).await;
    }

    /// The next thing seen, with WebRTC signaling handled on the way: the
    /// answer goes through `edit_answer`, candidates are exchanged.
    async fn next(&mut self, edit_answer: &dyn Fn(String) -> String) -> Seen {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(seen) = self.seen.pop_front() {
                match seen {
                    Seen::Response(Response::RtcAnswer { sdp }) => {
                        let (peer, _) = self.rtc.as_ref().expect("an offer was made");
                        peer.accept_answer(edit_answer(sdp)).await.unwrap();
                    }
                    Seen::Response(Response::RtcCandidate(candidate)) => {
                        let (peer, _) = self.rtc.as_ref().expect("an offer was made");
                        let _ = peer.add_candidate(candidate).await;
                    }
                    Seen::Rtc(RtcEvent::Candidate(candidate)) => {
                        self.request(&Request::RtcCandidate(candidate)).await;
                    }
                    Seen::Rtc(RtcEvent::Message(bytes)) => self.take_frame(bytes).await,
                    other => return other,
                }
                continue;
            }
            let rtc_event = async {
                match &mut self.rtc {
                    Some((_, events)) => events.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                incoming = self.link.recv_any() => match incoming.unwrap() {
                    Some(Incoming::Relay { frame, .. }) => self.take_frame(frame).await,
                    Some(Incoming::Message(FromServer::Error { code, message })) => {
                        panic!("server error {code:?}: {message}")
                    }
                    Some(Incoming::Message(_)) => {}
                    None => panic!("the server closed the connection"),
                },
                Some(event) = rtc_event => self.seen.push_back(Seen::Rtc(event)),
                _ = tokio::time::sleep_until(deadline) => panic!("nothing happened in time"),
            }
        }
    }

    async fn take_frame(&mut self, bytes: Bytes) {
        let Ok(frame) = Frame::decode(bytes) else {
            return;
        };
        match frame {
            Frame::Data {
                stream: CONTROL_STREAM,
                offset,
                bytes,
            } => {
                let (ack, messages) = self.control.receive(offset, bytes);
                self.send_frame(ack).await;
                for message in messages {
                    let response = serde_json::from_slice(&message)
                        .unwrap_or_else(|err| panic!("{err}: {message:?}"));
                    self.seen.push_back(Seen::Response(response));
                }
            }
            Frame::Ack {
                stream: CONTROL_STREAM,
                ..
            } => {}
            other => self.seen.push_back(Seen::Frame(other)),
        }
    }

    /// The next control-stream response (other things are dropped).
    async fn response(&mut self) -> Response {
        loop {
            if let Seen::Response(response) = self.next(&|sdp| sdp).await {
                return response;
            }
        }
    }

    /// Runs `command` and returns its result.
    async fn execute(
        &mut self,
        command: &str,
    ) -> cocoon_signaling::protocol::service::ExecuteResult {
        let mut request = execute_request(command);
        request.request_id = Some(format!("x{}", self.seen.len()));
        self.request(&Request::Execute(request)).await;
        loop {
            match self.response().await {
                Response::ExecuteResult(result) => return result,
                Response::Error { code, message, .. } => panic!("{code:?}: {message}"),
                _ => continue,
            }
        }
    }
}

/// Replaces every hex digit of the SDP's certificate fingerprints with
/// another: the same format, a different certificate.
fn tamper_fingerprint(sdp: String) -> String {
    let mut changed = false;
    let lines: Vec<String> = sdp
        .split("\r\n")
        .map(|line| match line.strip_prefix("a=fingerprint:") {
            Some(rest) => {
                let (algorithm, value) = rest.split_once(' ').expect("algorithm and value");
                let flipped: String = value
                    .chars()
                    .map(|c| match c.to_digit(16) {
                        Some(d) => char::from_digit(15 - d, 16).unwrap().to_ascii_uppercase(),
                        None => c,
                    })
                    .collect();
                changed = true;
                format!("a=fingerprint:{algorithm} {flipped}")
            }
            None => line.to_owned(),
        })
        .collect();
    assert!(changed, "the SDP has a fingerprint: {sdp}");
    lines.join("\r\n")
}

/// A worker whose session-layer peers log at info (the channel opening and
/// the connection failing are what these tests watch for).
async fn rtc_rig() -> Rig {
    let mut env = LOOPBACK_RTC_ENV.to_vec();
    env.extend([("RUST_LOG", "warn,cocoon::session=info"), ("NO_COLOR", "1")]);
    Rig::start(&env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_dtls_fingerprint_opens_no_data_channel() {
    let mut rig = rtc_rig().await;

    // The offer carries a fingerprint that is not the client's certificate:
    // the worker must refuse the DTLS handshake.
    let mut forged_offer = RawSession::connect(&rig).await;
    forged_offer.offer(tamper_fingerprint).await;
    let id = forged_offer.client_id.to_string();
    let failure = async {
        loop {
            let line = rig.worker.expect_line("peer connection lost").await;
            if line.contains(&id) {
                return line;
            }
        }
    };
    let line = tokio::select! {
        line = failure => line,
        _ = async {
            loop {
                if let Seen::Rtc(RtcEvent::Open(_)) = forged_offer.next(&|sdp| sdp).await {
                    return;
                }
            }
        } => panic!("a data channel opened with a wrong fingerprint"),
    };
    assert!(line.contains("Failed"), "{line}");
    // The session carries on over the relay.
    let result = forged_offer.execute("echo still here").await;
    assert_eq!(result.data.stdout, "still here\n");

    // The answer carries a fingerprint that is not the worker's: the client
    // must refuse it the same way.
    let mut forged_answer = RawSession::connect(&rig).await;
    forged_answer.offer(|sdp| sdp).await;
    loop {
        match forged_answer.next(&tamper_fingerprint).await {
            Seen::Rtc(RtcEvent::State(RTCPeerConnectionState::Failed)) => break,
            Seen::Rtc(RtcEvent::Open(_)) => {
                panic!("a data channel opened with a wrong fingerprint")
            }
            _ => continue,
        }
    }

    // The same exchange without tampering opens a channel: the refusals
    // above are the fingerprints', not the harness's.
    let mut honest = RawSession::connect(&rig).await;
    honest.offer(|sdp| sdp).await;
    loop {
        if let Seen::Rtc(RtcEvent::Open(_)) = honest.next(&|sdp| sdp).await {
            break;
        }
    }
    let honest_id = honest.client_id.to_string();
    loop {
        let line = rig.worker.expect_line("data channel open").await;
        if line.contains(&honest_id) {
            break;
        }
    }
    assert!(
        !rig.worker
            .seen
            .iter()
            .any(|line| line.contains("data channel open") && !line.contains(&honest_id)),
        "no other channel opened: {:#?}",
        rig.worker.seen
    );
    let result = honest.execute("echo over the channel").await;
    assert_eq!(result.data.stdout, "over the channel\n");
}

/// One relay message: `[address length][address][frame]`.
fn relay_message(address: &str, frame: &[u8]) -> Vec<u8> {
    let mut message = vec![address.len() as u8];
    message.extend_from_slice(address.as_bytes());
    message.extend_from_slice(frame);
    message
}

/// A session-layer DATA frame on the control stream carrying one request.
fn control_frame(request: &Value) -> Vec<u8> {
    let message = serde_json::to_vec(request).unwrap();
    let mut bytes = (message.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&message);
    Frame::Data {
        stream: CONTROL_STREAM,
        offset: 0,
        bytes: bytes.into(),
    }
    .encode()
    .to_vec()
}

/// A raw HTTP request to the server; the status line it gets.
async fn http_status(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn no_request_runs_without_the_owners_access_token() {
    let mut rig = Rig::start(&[]).await;
    let marks = tempfile::tempdir().unwrap();
    let touch = |name: &str| format!("touch {}/{name}", marks.path().display());
    let execute = |name: &str| json!({"type": "execute", "command": touch(name)});
    let victim = rig.device_id.clone();

    // Nobody: the WebSocket without authenticating, as text and as relay.
    let mut nobody = RawPeer::connect(&rig.server.url()).await;
    nobody
        .send(&ToServer::SyncData {
            payload: execute("nobody"),
            device_id: Some(victim.clone()),
            client_id: None,
        })
        .await;
    nobody.expect_error(ErrorCode::NotAuthenticated).await;
    nobody
        .send_binary(relay_message(
            victim.as_str(),
            &control_frame(&execute("nobody-relay")),
        ))
        .await;
    nobody.expect_error(ErrorCode::NotAuthenticated).await;

    // Tokens that are not Alice's access token.
    for token in [
        rig.server.token(TokenKind::Setup, "alice"),
        rig.server.token(TokenKind::Hive, "alice"),
        Secret::new(format!(
            "{}x",
            rig.server.token(TokenKind::Access, "alice").expose()
        )),
    ] {
        let err = Client::connect(&rig.server.url(), &token, plain_tls())
            .await
            .err()
            .expect("refused");
        assert_eq!(server_error_code(&err), Some(ErrorCode::InvalidToken));
    }

    // Another owner, through every way a client addresses a device.
    let mut bob = rig.server.client("bob").await;
    for payload in [
        execute("bob"),
        json!({"type": "attach_pty", "cols": 80, "rows": 24, "command": touch("bob-pty")}),
        json!({"type": "query_local", "query_id": "q", "query_type": "ListTasks"}),
        json!({"type": "proxy_http", "request_id": "p", "service_name": "web", "method": "GET",
            "path": "/", "headers": {}, "body": null}),
    ] {
        bob.send(Some(&victim), payload).await.unwrap();
        assert_eq!(next_error(&mut bob).await, ErrorCode::AccessDenied);
    }
    bob.send_raw(&ToServer::SelectDevice {
        device_id: victim.clone(),
    })
    .await
    .unwrap();
    assert_eq!(next_error(&mut bob).await, ErrorCode::AccessDenied);
    let mut bob_session = RawSession::connect_as(&rig, "bob").await;
    bob_session
        .send_relay(&control_frame(&execute("bob-relay")))
        .await;
    match bob_session.link.recv().await.unwrap() {
        Some(FromServer::Error { code, .. }) => assert_eq!(code, ErrorCode::AccessDenied),
        other => panic!("{other:?}"),
    }

    // A worker of Mallory's cannot pass requests on: workers only answer
    // clients, by client id.
    let mut rogue = RawPeer::connect(&rig.server.url()).await;
    rogue
        .send(&ToServer::Register {
            secret: generate_secret(),
            device_id: None,
            setup_token: Some(rig.server.token(TokenKind::Setup, "mallory")),
            name: None,
        })
        .await;
    assert!(matches!(
        rogue.recv().await,
        Some(FromServer::Registered { .. })
    ));
    rogue
        .send(&ToServer::SyncData {
            payload: execute("rogue"),
            device_id: Some(victim.clone()),
            client_id: None,
        })
        .await;
    rogue.expect_error(ErrorCode::InvalidMessage).await;
    rogue
        .send(&ToServer::SyncData {
            payload: execute("rogue-as-client"),
            device_id: None,
            client_id: Some(ClientId::new(victim.as_str())),
        })
        .await;
    rogue.expect_error(ErrorCode::ClientGone).await;
    rogue
        .send_binary(relay_message(
            victim.as_str(),
            &control_frame(&execute("rogue-relay")),
        ))
        .await;
    rogue.expect_error(ErrorCode::ClientGone).await;

    // A hive of Mallory's cannot either.
    let mut hive = RawPeer::connect(&rig.server.url()).await;
    hive.send(&ToServer::RegisterHive {
        hive_token: rig.server.token(TokenKind::Hive, "mallory"),
        name: "h".into(),
        kinds: vec![],
    })
    .await;
    assert!(matches!(
        hive.recv().await,
        Some(FromServer::HiveRegistered { .. })
    ));
    hive.send(&ToServer::SyncData {
        payload: execute("hive"),
        device_id: Some(victim.clone()),
        client_id: None,
    })
    .await;
    hive.expect_error(ErrorCode::InvalidMessage).await;

    // Plain HTTP has no way in: the server's only HTTP routes are /ws (an
    // upgrade), /health and static files.
    let addr = rig.server.addr;
    for request in [
        format!(
            "POST /ws HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ),
        format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        format!(
            "POST /execute HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
        format!(
            "GET /api/devices/{victim}/execute?command=id HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ),
    ] {
        let status = http_status(addr, &request).await;
        assert!(!status.contains(" 2"), "{status}: {request}");
    }

    // Every refusal came back before anything could have run; Alice's own
    // request runs, and is the only mark.
    let result = run_as_owner(&mut rig, &touch("alice")).await;
    assert!(result.success, "{result:?}");
    let marks: Vec<_> = std::fs::read_dir(marks.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(marks, vec!["alice".to_owned()]);
}

/// The next error a client gets (other messages are skipped).
async fn next_error(client: &mut Client) -> ErrorCode {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.recv())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("connection open");
        if let FromServer::Error { code, .. } = message {
            return code;
        }
    }
}

async fn run_as_owner(
    rig: &mut Rig,
    command: &str,
) -> cocoon_signaling::protocol::service::ExecuteResult {
    rig.send(&Request::Execute(execute_request(command))).await;
    rig.recv_until(|response| match response {
        Response::ExecuteResult(result) => Some(result),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn session_ids_are_useless_to_other_owners() {
    let mut rig = Rig::start(&[]).await;
    rig.send(&Request::AttachPty(attach_request(Some(
        "PS1='PROMPT> ' exec sh",
    ))))
    .await;
    let session_id = rig
        .recv_until(|response| match response {
            Response::PtyCreated { session_id, .. } => Some(session_id),
            _ => None,
        })
        .await;
    // 122 random bits: nothing to enumerate.
    let uuid = uuid::Uuid::parse_str(session_id.as_str()).expect("a UUID");
    assert_eq!(uuid.get_version_num(), 4);

    // Bob has a worker of his own.
    let bob_dir = tempfile::tempdir().unwrap();
    let setup = rig.server.token(TokenKind::Setup, "bob");
    let mut bob_worker = WorkerProcess::spawn(
        &rig.server.url(),
        bob_dir.path(),
        &[("COCOON_SETUP_TOKEN", setup.expose())],
    );
    let bob_device = device_id_in(&bob_worker.expect_line("🆔 Device ID: ").await);
    let mut bob = rig.server.client("bob").await;

    let with_id = |session_id: &SessionId| {
        [
            json!({"type": "pty_input", "session_id": session_id, "data": "echo bob was here\n"}),
            json!({"type": "pty_resize", "session_id": session_id, "cols": 10, "rows": 10}),
            json!({"type": "pty_ack", "session_id": session_id, "offset": 0}),
            json!({"type": "pty_resume", "session_id": session_id, "offset": 0}),
            json!({"type": "pty_close", "session_id": session_id}),
        ]
    };
    for payload in with_id(&session_id) {
        // At Alice's worker: refused by the server before it gets there.
        bob.send(Some(&rig.device_id), payload.clone())
            .await
            .unwrap();
        assert_eq!(
            next_error(&mut bob).await,
            ErrorCode::AccessDenied,
            "{payload}"
        );
        // At his own: the id means nothing there.
        bob.send(Some(&bob_device), payload.clone()).await.unwrap();
        let response = recv_response(&mut bob).await;
        assert!(
            matches!(
                &response,
                Response::Error {
                    code: ServiceErrorCode::UnknownSession,
                    ..
                }
            ),
            "{payload}: {response:?}"
        );
    }

    // Alice's terminal is untouched: same size, nothing typed, still open.
    rig.send(&Request::PtyInput {
        session_id: session_id.clone(),
        data: "stty size; echo al''ive\n".into(),
        encoding: Encoding::Utf8,
    })
    .await;
    let mut output = String::new();
    while !output.contains("alive") {
        match rig.recv().await {
            Response::PtyOutput { data, .. } => output.push_str(&data),
            Response::PtyExited { .. } => panic!("the session ended: {output}"),
            _ => {}
        }
    }
    assert!(output.contains("24 80"), "{output}");
    assert!(!output.contains("bob was here"), "{output}");
    bob_worker.kill().await;
}

enum EmptyMessage {
    Binary,
    Text,
}

/// Offers a new WebRTC connection and waits for its data channel.
async fn open_channel(session: &mut RawSession) -> Arc<RTCDataChannel> {
    session.offer(|sdp| sdp).await;
    loop {
        if let Seen::Rtc(RtcEvent::Open(channel)) = session.next(&|sdp| sdp).await {
            return channel;
        }
    }
}

/// Whether a process is still running (not exited, not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// The next frame of `kind` the session sees (responses are dropped).
async fn next_frame(session: &mut RawSession, wanted: impl Fn(&Frame) -> bool) -> Frame {
    loop {
        if let Seen::Frame(frame) = session.next(&|sdp| sdp).await
            && wanted(&frame)
        {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_zero_length_frames_on_every_channel() {
    let mut rig = rtc_rig().await;
    let worker_pid = rig.worker.pid();

    // The relay and the session layer: an empty relay message, empty and
    // truncated frames of every kind, frames for streams that do not exist.
    let mut session = RawSession::connect(&rig).await;
    session.send_relay(&[]).await;
    for frame in [
        Frame::Data {
            stream: CONTROL_STREAM,
            offset: 0,
            bytes: Bytes::new(),
        },
        Frame::Data {
            stream: 9,
            offset: 0,
            bytes: Bytes::new(),
        },
        Frame::Data {
            stream: 9,
            offset: u64::MAX,
            bytes: Bytes::from_static(b"x"),
        },
        Frame::Ack {
            stream: CONTROL_STREAM,
            offset: 0,
        },
        Frame::Ack {
            stream: CONTROL_STREAM,
            offset: u64::MAX,
        },
        Frame::Ack {
            stream: 9,
            offset: 0,
        },
        Frame::Fin {
            stream: 9,
            offset: 0,
        },
        Frame::Skip {
            stream: CONTROL_STREAM,
            offset: 0,
        },
    ] {
        session.send_frame(frame).await;
    }
    for raw in [&[0u8][..], &[1], &[2, 0, 0], &[4], &[7], &[0xff; 3]] {
        session.send_relay(raw).await;
    }
    session.send_frame(Frame::Ping(1)).await;
    assert_eq!(
        next_frame(&mut session, |f| matches!(f, Frame::Pong(_))).await,
        Frame::Pong(1)
    );

    // The control stream: a zero-length message, and empty JSON of every
    // shape, each answered with an error.
    for message in [
        &b""[..],
        b"{}",
        b"\"\"",
        b"null",
        b"[]",
        b"0",
        b"{\"type\": \"\"}",
    ] {
        session.send_control(message).await;
        match session.response().await {
            Response::Error { code, .. } => assert!(
                matches!(
                    code,
                    ServiceErrorCode::InvalidJson | ServiceErrorCode::UnknownType
                ),
                "{:?}: {code:?}",
                String::from_utf8_lossy(message)
            ),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(message)),
        }
    }
    // Empty commands, input and terminal bytes.
    let mut empty = execute_request("");
    empty.input = Some(String::new());
    session.request(&Request::Execute(empty)).await;
    match session.response().await {
        Response::ExecuteResult(result) => assert!(result.success, "{result:?}"),
        other => panic!("{other:?}"),
    }
    let mut terminal = attach_request(Some("cat"));
    terminal.stream = Some(1);
    session.request(&Request::AttachPty(terminal)).await;
    assert!(matches!(
        session.response().await,
        Response::PtyCreated { .. }
    ));
    session
        .send_frame(Frame::Data {
            stream: 1,
            offset: 0,
            bytes: Bytes::new(),
        })
        .await;
    session
        .send_frame(Frame::Data {
            stream: 1,
            offset: 0,
            bytes: Bytes::from_static(b"ping\n"),
        })
        .await;
    let mut echoed = Vec::new();
    while !echoed.windows(6).any(|w| w == b"ping\r\n") {
        if let Frame::Data { bytes, .. } =
            next_frame(&mut session, |f| matches!(f, Frame::Data { stream: 1, .. })).await
        {
            echoed.extend_from_slice(&bytes);
        }
    }

    // A data channel. webrtc-rs reads an empty message as the end of the
    // channel and closes it: the session must carry on over the relay, and
    // a new connection must work (see SECURITY.md, known limits).
    for empty in [EmptyMessage::Binary, EmptyMessage::Text] {
        let channel = open_channel(&mut session).await;
        match empty {
            EmptyMessage::Binary => channel.send(&Bytes::new()).await.unwrap(),
            EmptyMessage::Text => channel.send_text(String::new()).await.unwrap(),
        };
        loop {
            if let Seen::Rtc(RtcEvent::Closed) = session.next(&|sdp| sdp).await {
                break;
            }
        }
        session.send_frame(Frame::Ping(2)).await;
        assert_eq!(
            next_frame(&mut session, |f| matches!(f, Frame::Pong(_))).await,
            Frame::Pong(2),
            "the session carries on over the relay"
        );
    }
    let channel = open_channel(&mut session).await;
    channel.send(&Frame::Ping(3).encode()).await.unwrap();
    assert_eq!(
        next_frame(&mut session, |f| matches!(f, Frame::Pong(_))).await,
        Frame::Pong(3)
    );

    // The classic protocol: empty payloads and empty terminal input.
    for payload in [
        json!({}),
        json!(""),
        json!(null),
        json!([]),
        json!({"type": ""}),
    ] {
        rig.send_json(payload.clone()).await;
        match rig.recv().await {
            Response::Error { code, .. } => assert!(
                matches!(
                    code,
                    ServiceErrorCode::InvalidJson | ServiceErrorCode::UnknownType
                ),
                "{payload}: {code:?}"
            ),
            other => panic!("{payload}: {other:?}"),
        }
    }
    rig.send(&Request::AttachPty(attach_request(Some("cat"))))
        .await;
    let id = rig
        .recv_until(|r| match r {
            Response::PtyCreated { session_id, .. } => Some(session_id),
            _ => None,
        })
        .await;
    for (data, encoding) in [
        ("", Encoding::Utf8),
        ("", Encoding::Base64),
        ("pong\n", Encoding::Utf8),
    ] {
        rig.send(&Request::PtyInput {
            session_id: id.clone(),
            data: data.into(),
            encoding,
        })
        .await;
    }
    let mut output = String::new();
    while !output.contains("pong\r\n") {
        if let Response::PtyOutput { data, .. } = rig.recv().await {
            output.push_str(&data);
        }
    }
    assert!(running(worker_pid), "the worker lives");
    assert!(session.execute("echo fine").await.success);
}

/// A TCP listener that counts connections and never answers: where an
/// SSRF would land.
async fn canary() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (port, hits)
}

/// An HTTP service that answers everything with a redirect to `location`,
/// echoing the path and `Host` it got; counts requests.
async fn redirecting_service(location: String) -> (u16, Arc<AtomicUsize>) {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (counter, location) = (counter.clone(), location.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let host = request
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap_or("").to_owned())
                        .unwrap_or_default();
                    let path = request.uri().to_string();
                    let response = hyper::Response::builder()
                        .status(302)
                        .header("location", location.clone())
                        .header("x-host", host)
                        .header("x-path", path)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, hits)
}

fn proxy_request(service: &str, path: &str, headers: Headers) -> ProxyHttp {
    ProxyHttp {
        request_id: format!("{service} {path}"),
        service_name: service.into(),
        method: "GET".into(),
        path: path.into(),
        headers,
        body: None,
        body_encoding: Encoding::Utf8,
    }
}

async fn proxy(rig: &mut Rig, request: ProxyHttp) -> ProxyResult {
    let id = request.request_id.clone();
    rig.send(&Request::ProxyHttp(request)).await;
    rig.recv_until(|response| match response {
        Response::ProxyResult(result) if result.request_id == id => Some(result),
        _ => None,
    })
    .await
}

fn one_header<'a>(result: &'a ProxyResult, name: &str) -> &'a str {
    match result.headers.get(name) {
        Some(HeaderValues::One(value)) => value,
        other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn proxy_ssrf_vectors_never_leave_the_named_local_port() {
    let (canary_port, canary_hits) = canary().await;
    let (port, upstream_hits) =
        redirecting_service(format!("http://127.0.0.1:{canary_port}/admin")).await;
    let services = format!("web:{port}");
    let mut rig = Rig::start(&[("COCOON_SERVICES", &services)]).await;
    let c = canary_port;

    // Targets in the path, in every spelling of "elsewhere": refused before
    // anything is sent.
    let hostile = [
        format!("http://0.0.0.0:{c}/"),
        format!("http://[::]:{c}/"),
        format!("http://[::ffff:127.0.0.1]:{c}/"),
        "http://[::ffff:169.254.169.254]/latest/meta-data/".into(),
        "http://[::ffff:a9fe:a9fe]/".into(),
        "http://169.254.169.254/latest/meta-data/".into(),
        "http://2852039166/".into(),
        "http://0xa9fea9fe/".into(),
        "http://0251.0376.0251.0376/".into(),
        "http://169.254.43518/".into(),
        format!("http://localhost:{c}/"),
        format!("http://127.0.0.1:{c}/"),
        format!("http://127.1:{c}/"),
        "http://metadata.google.internal/computeMetadata/v1/".into(),
        "//169.254.169.254/".into(),
        format!("//0.0.0.0:{c}/"),
        "\\\\169.254.169.254\\x".into(),
        "/\\169.254.169.254/".into(),
        "@169.254.169.254/".into(),
        "169.254.169.254:80/".into(),
        format!("0.0.0.0:{c}"),
        format!("[::]:{c}/"),
        "*".into(),
        "http:/169.254.169.254/".into(),
        "/\t//169.254.169.254/".into(),
        "/x\r\nHost: 169.254.169.254".into(),
        "/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\nGET http://169.254.169.254/".into(),
        "/#@169.254.169.254".into(),
    ];
    for path in &hostile {
        let result = proxy(&mut rig, proxy_request("web", path, Headers::new())).await;
        assert_eq!(result.status_code, 400, "{path:?}");
    }
    assert_eq!(upstream_hits.load(Ordering::SeqCst), 0, "nothing was sent");

    // Look-alikes that are paths: they reach the named service, as paths,
    // and nothing else.
    for path in [
        "/http://169.254.169.254/",
        "/@169.254.169.254",
        "/%2F%2F169.254.169.254/",
        "/..%2F..%2F169.254.169.254",
        "/a/../../169.254.169.254",
    ] {
        let result = proxy(&mut rig, proxy_request("web", path, Headers::new())).await;
        assert_eq!(result.status_code, 302, "{path}");
        assert_eq!(one_header(&result, "x-path"), path);
        assert_eq!(one_header(&result, "x-host"), format!("127.0.0.1:{port}"));
    }

    // Headers that name another host change nothing.
    let headers = Headers::from([
        ("Host".into(), HeaderValues::One("169.254.169.254".into())),
        (
            "X-Forwarded-Host".into(),
            HeaderValues::One("0.0.0.0".into()),
        ),
        (
            "Forwarded".into(),
            HeaderValues::One("host=\"[::]\"".into()),
        ),
        (
            "X-Original-URL".into(),
            HeaderValues::One("http://169.254.169.254/".into()),
        ),
    ]);
    let result = proxy(&mut rig, proxy_request("web", "/", headers)).await;
    assert_eq!(one_header(&result, "x-host"), format!("127.0.0.1:{port}"));
    let bad_name = Headers::from([(
        ":authority".into(),
        HeaderValues::One("169.254.169.254".into()),
    )]);
    assert_eq!(
        proxy(&mut rig, proxy_request("web", "/", bad_name))
            .await
            .status_code,
        400
    );

    // Service names are names, never addresses.
    for service in [
        "169.254.169.254:80".to_owned(),
        format!("127.0.0.1:{c}"),
        format!("localhost:{c}"),
        "0.0.0.0".into(),
        "[::]:80".into(),
        format!("web:{c}"),
        "web@169.254.169.254".into(),
        "../web".into(),
        "WEB".into(),
        "web ".into(),
        String::new(),
    ] {
        let result = proxy(&mut rig, proxy_request(&service, "/", Headers::new())).await;
        assert_eq!(result.status_code, 404, "{service:?}");
    }

    // A redirect from the service is passed back, never followed.
    let result = proxy(&mut rig, proxy_request("web", "/go", Headers::new())).await;
    assert_eq!(result.status_code, 302);
    assert_eq!(
        one_header(&result, "location"),
        format!("http://127.0.0.1:{c}/admin")
    );
    assert_eq!(
        canary_hits.load(Ordering::SeqCst),
        0,
        "the canary was never reached"
    );
}

/// Variables that make a program load or run code of the caller's choice,
/// and the worker's own settings and secrets.
const REFUSED_ENV: &[&str] = &[
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_DEBUG_OUTPUT",
    "DYLD_INSERT_LIBRARIES",
    "DYLD_LIBRARY_PATH",
    "BASH_ENV",
    "ENV",
    "PROMPT_COMMAND",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "IFS",
    "COCOON_SECRET",
    "COCOON_SETUP_TOKEN",
    "COCOON_ALLOW_ENV",
    "SIGNALING_SERVER_URL",
    "WEBRTC_TURN_CREDENTIAL",
    "HMAC_SALT",
];

#[tokio::test]
async fn hijacking_environment_variables_are_refused_unless_the_operator_allows_them() {
    let marks = tempfile::tempdir().unwrap();
    let mark = |name: &str| marks.path().join(name);
    let script = marks.path().join("hook.sh");
    std::fs::write(&script, format!("touch {}\n", mark("sourced").display())).unwrap();
    let script = script.display().to_string();
    let prompt = format!("touch {}", mark("prompt").display());
    let mut rig = Rig::start(&[
        ("COCOON_ALLOW_ENV", "LD_LIBRARY_PATH"),
        // The worker's own environment carries hijackers too.
        ("BASH_ENV", script.as_str()),
        ("ENV", script.as_str()),
        ("PROMPT_COMMAND", prompt.as_str()),
        ("LD_LIBRARY_PATH", "/nonexistent/inherited"),
    ])
    .await;

    let with_env = |name: &str, value: &str| Some(BTreeMap::from([(name.into(), value.into())]));
    for name in REFUSED_ENV {
        let mut execute = execute_request("true");
        execute.env = with_env(name, "/tmp/evil");
        rig.send(&Request::Execute(execute)).await;
        rig.expect_error(ServiceErrorCode::EnvRefused).await;
        let mut attach = attach_request(None);
        attach.env = with_env(name, "/tmp/evil");
        rig.send(&Request::AttachPty(attach)).await;
        rig.expect_error(ServiceErrorCode::EnvRefused).await;
    }
    for (name, value) in [("", "x"), ("A=B", "x"), ("A\0B", "x"), ("OK", "a\0b")] {
        let mut execute = execute_request("true");
        execute.env = with_env(name, value);
        rig.send(&Request::Execute(execute)).await;
        rig.expect_error(ServiceErrorCode::InvalidRequest).await;
    }

    // What the operator allows goes through.
    let mut allowed = execute_request("printf %s \"$LD_LIBRARY_PATH\"");
    allowed.env = with_env("LD_LIBRARY_PATH", "/opt/allowed/lib");
    rig.send(&Request::Execute(allowed)).await;
    let result = rig
        .recv_until(|r| match r {
            Response::ExecuteResult(result) => Some(result),
            _ => None,
        })
        .await;
    assert_eq!(result.data.stdout, "/opt/allowed/lib");

    // Inherited hijackers never reach children: not in their environment,
    // not run by bash (BASH_ENV), sh (ENV) or an interactive shell's prompt.
    let result = run_as_owner(
        &mut rig,
        "env; bash -c true; sh -ic true </dev/null 2>/dev/null",
    )
    .await;
    for name in [
        "BASH_ENV=",
        "\nENV=",
        "PROMPT_COMMAND=",
        "/nonexistent/inherited",
    ] {
        assert!(
            !result.data.stdout.contains(name),
            "{name} in {}",
            result.data.stdout
        );
    }
    let mut attach = attach_request(None);
    attach.request_id = Some("login".into());
    rig.send(&Request::AttachPty(attach)).await;
    let session_id = rig
        .recv_until(|r| match r {
            Response::PtyCreated { session_id, .. } => Some(session_id),
            _ => None,
        })
        .await;
    rig.send(&Request::PtyInput {
        session_id,
        data: "echo do''ne\n".into(),
        encoding: Encoding::Utf8,
    })
    .await;
    let mut output = String::new();
    while !output.contains("done") {
        if let Response::PtyOutput { data, .. } = rig.recv().await {
            output.push_str(&data);
        }
    }
    for name in ["sourced", "prompt"] {
        assert!(!mark(name).exists(), "an inherited hook ran ({name})");
    }
}

#[tokio::test]
async fn output_files_and_the_knowledge_search_stay_inside_their_directories() {
    let mut rig = Rig::start(&[]).await;
    let outside = tempfile::tempdir().unwrap();
    let o = outside.path().display().to_string();
    std::fs::write(outside.path().join("secret.txt"), "outside needle\n").unwrap();
    std::fs::create_dir(outside.path().join("dir")).unwrap();
    std::fs::write(outside.path().join("dir/keep.txt"), "keep\n").unwrap();

    // The output directory itself swapped for a link to elsewhere.
    let swapped = run_as_owner(
        &mut rig,
        &format!(r#"rmdir "$COCOON_OUTPUT_DIR" && ln -s {o} "$COCOON_OUTPUT_DIR""#),
    )
    .await;
    assert!(swapped.success, "{swapped:?}");
    assert!(
        swapped.files.is_empty(),
        "files from outside: {:?}",
        swapped.files
    );
    // Links inside it, to files and to directories.
    let linked = run_as_owner(
        &mut rig,
        &format!(
            r#"cd "$COCOON_OUTPUT_DIR" && ln -s {o}/secret.txt s.txt && ln -s {o}/dir d \
               && ln -s ../../.. up && mkfifo pipe && echo mine > real.txt"#
        ),
    )
    .await;
    let paths: Vec<_> = linked.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["real.txt"]);
    // Cleaning up followed no link either.
    for kept in ["secret.txt", "dir/keep.txt"] {
        assert!(outside.path().join(kept).is_file(), "{kept} was deleted");
    }

    // The knowledge base: links to outside files and directories are not
    // read, and a query is a substring, never a path.
    let knowledge = rig.worker_dir.path().join("knowledge");
    std::fs::create_dir_all(&knowledge).unwrap();
    std::fs::write(knowledge.join("notes.txt"), "inside needle\n").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        knowledge.join("linked.txt"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), knowledge.join("up")).unwrap();
    let search = |query: &str| json!({"type": "query_local", "query_id": query, "query_type": "SearchKnowledgebase", "params": {"query": query}});
    for (query, hits) in [("needle", 1), ("../secret.txt", 0), ("outside", 0)] {
        rig.send_json(search(query)).await;
        let data = rig
            .recv_until(|r| match r {
                Response::QueryResult { data, .. } => Some(data),
                _ => None,
            })
            .await;
        assert_eq!(data["total"], hits, "{query}: {data}");
        if hits == 1 {
            assert_eq!(data["results"][0]["path"], "notes.txt");
        }
    }
    rig.send_json(
        json!({"type": "query_local", "query_id": "p", "query_type": "SearchKnowledgebase",
        "params": {"query": "needle", "path": "../"}}),
    )
    .await;
    rig.expect_error(ServiceErrorCode::InvalidRequest).await;
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn deeply_nested_and_oversized_control_messages_are_refused_and_harmless() {
    let rig = Rig::start(&[]).await;
    let worker_pid = rig.worker.pid();
    let mut session = RawSession::connect(&rig).await;
    let before = rss_kib(worker_pid);

    // Nesting far past serde_json's recursion limit, at the top and inside
    // a request, on the control stream (which the server does not parse).
    let deep = format!("{}{}", "[".repeat(300_000), "]".repeat(300_000));
    for message in [
        deep.clone(),
        format!(r#"{{"type": "execute", "command": "true", "env": {deep}}}"#),
        format!(
            r#"{{"type": "query_local", "query_id": "q", "query_type": "ListTasks", "params": {deep}}}"#
        ),
    ] {
        session.send_control(message.as_bytes()).await;
        match session.response().await {
            Response::Error { code, .. } => assert!(
                matches!(
                    code,
                    ServiceErrorCode::InvalidJson | ServiceErrorCode::InvalidRequest
                ),
                "{code:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    // Length prefixes past the 4 MiB limit: the reader drops them without
    // allocating, and the stream goes on with the next message.
    for claimed in [u32::MAX, 4 * 1024 * 1024 + 1] {
        session.send_control_bytes(&claimed.to_be_bytes()).await;
        assert_eq!(session.execute("echo next").await.data.stdout, "next\n");
    }
    let after = rss_kib(worker_pid);
    assert!(
        after < before + 64 * 1024,
        "the worker grew from {before} to {after} KiB"
    );
}

/// Responses to a rig's client, sorted by session: output, exits.
#[derive(Default)]
struct Terminals {
    output: HashMap<SessionId, String>,
    exited: HashMap<SessionId, i32>,
}

impl Terminals {
    fn take(&mut self, response: Response) -> Option<Response> {
        match response {
            Response::PtyOutput {
                session_id, data, ..
            } => self.output.entry(session_id).or_default().push_str(&data),
            Response::PtyExited {
                session_id,
                exit_code,
            } => {
                self.exited.insert(session_id, exit_code);
            }
            other => return Some(other),
        }
        None
    }

    /// Reads responses until `done` holds; returns the others seen.
    async fn until(&mut self, rig: &mut Rig, done: impl Fn(&Self) -> bool) -> Vec<Response> {
        let mut others = Vec::new();
        while !done(self) {
            if let Some(other) = self.take(rig.recv().await) {
                others.push(other);
            }
        }
        others
    }
}

/// Opens a terminal running `command`; its session id.
async fn open_terminal(
    rig: &mut Rig,
    terms: &mut Terminals,
    command: &str,
    flow: bool,
) -> SessionId {
    let id = format!("open {command}");
    let mut request = attach_request(Some(command));
    request.request_id = Some(id.clone());
    request.flow_control = flow;
    rig.send(&Request::AttachPty(request)).await;
    loop {
        let response = rig.recv().await;
        match terms.take(response) {
            Some(Response::PtyCreated {
                session_id,
                request_id,
                ..
            }) if request_id.as_deref() == Some(&id) => return session_id,
            Some(Response::Error { code, message, .. }) => panic!("{command}: {code:?} {message}"),
            _ => {}
        }
    }
}

/// Processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let output = std::process::Command::new("pgrep")
        .args(["-a", "-f", needle])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn closing_terminals_under_pressure_never_stalls_the_others() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let tag = format!("close-test-{}", std::process::id());
    // A flood nobody acknowledges, a program that ignores SIGHUP and
    // SIGTERM, a background job, and a row of idle terminals.
    let flood = open_terminal(&mut rig, &mut terms, &format!("yes {tag}"), true).await;
    let deaf = open_terminal(
        &mut rig,
        &mut terms,
        &format!("trap '' HUP TERM; echo ready; while :; do sleep 0.1; done # {tag}"),
        false,
    )
    .await;
    let jobs = open_terminal(
        &mut rig,
        &mut terms,
        &format!("sleep 1000 & echo ready; wait # {tag}"),
        false,
    )
    .await;
    let mut closing = vec![flood.clone(), deaf.clone(), jobs.clone()];
    for _ in 0..8 {
        closing.push(open_terminal(&mut rig, &mut terms, "cat", false).await);
    }
    terms
        .until(&mut rig, |t| {
            t.output.get(&flood).is_some_and(|o| o.len() > 64 * 1024)
                && [&deaf, &jobs]
                    .iter()
                    .all(|id| t.output.get(*id).is_some_and(|o| o.contains("ready")))
        })
        .await;

    // Close them all at once; a new terminal and a command must answer at
    // once meanwhile.
    let started = Instant::now();
    for session_id in &closing {
        rig.send(&Request::PtyClose {
            session_id: session_id.clone(),
        })
        .await;
    }
    let fresh = open_terminal(&mut rig, &mut terms, "cat", false).await;
    rig.send(&Request::PtyInput {
        session_id: fresh.clone(),
        data: "still-alive\n".into(),
        encoding: Encoding::Utf8,
    })
    .await;
    let mut quick = execute_request("echo quick");
    quick.request_id = Some("quick".into());
    rig.send(&Request::Execute(quick)).await;
    let mut answered = false;
    while !answered
        || !terms
            .output
            .get(&fresh)
            .is_some_and(|o| o.contains("still-alive\r\n"))
    {
        if let Some(Response::ExecuteResult(result)) = terms.take(rig.recv().await) {
            assert_eq!(result.data.stdout, "quick\n");
            answered = true;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the others waited {:?}",
        started.elapsed()
    );

    // Every closed terminal reports its end promptly, and nothing of theirs
    // is left running.
    terms
        .until(&mut rig, |t| {
            closing.iter().all(|id| t.exited.contains_key(id))
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closing took {:?}",
        started.elapsed()
    );
    assert!(!terms.exited.contains_key(&fresh));
    let deadline = Instant::now() + DEADLINE;
    while !processes_with(&tag).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left running: {:?}",
            processes_with(&tag)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn commands_and_terminals_are_capped() {
    let mut rig = Rig::start(&[("COCOON_MAX_SESSIONS", "2")]).await;
    // Three terminals at once: one is refused.
    for n in 0..3 {
        let mut request = attach_request(Some("cat"));
        request.request_id = Some(format!("t{n}"));
        rig.send(&Request::AttachPty(request)).await;
    }
    let (mut created, mut busy) = (Vec::new(), 0);
    while created.len() + busy < 3 {
        match rig.recv().await {
            Response::PtyCreated { session_id, .. } => created.push(session_id),
            Response::Error {
                code: ServiceErrorCode::Busy,
                ..
            } => busy += 1,
            _ => {}
        }
    }
    assert_eq!((created.len(), busy), (2, 1));

    // Thirty-three commands at once: one is refused.
    for n in 0..33 {
        let mut request = execute_request("sleep 30");
        request.request_id = Some(format!("e{n}"));
        request.timeout_secs = Some(2);
        rig.send(&Request::Execute(request)).await;
    }
    let (mut timed_out, mut busy) = (0, 0);
    while timed_out + busy < 33 {
        match rig.recv().await {
            Response::ExecuteResult(result) => {
                assert_eq!(result.data.error.as_deref(), Some("timeout"), "{result:?}");
                timed_out += 1;
            }
            Response::Error {
                code: ServiceErrorCode::Busy,
                request_id,
                ..
            } => {
                assert!(request_id.is_some_and(|id| id.starts_with('e')));
                busy += 1;
            }
            _ => {}
        }
    }
    assert_eq!((timed_out, busy), (32, 1));
    // Freed slots are usable again.
    rig.send(&Request::PtyClose {
        session_id: created[0].clone(),
    })
    .await;
    let mut terms = Terminals::default();
    terms
        .until(&mut rig, |t| t.exited.contains_key(&created[0]))
        .await;
    assert!(run_as_owner(&mut rig, "true").await.success);
    // The slot is released just after `pty_exited` is sent (once the task
    // is recorded): a new terminal may have to ask again, briefly.
    let deadline = Instant::now() + DEADLINE;
    loop {
        rig.send(&Request::AttachPty(attach_request(Some("cat"))))
            .await;
        match rig.recv().await {
            Response::PtyCreated { .. } => break,
            Response::Error {
                code: ServiceErrorCode::Busy,
                ..
            } if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// One variable of a process's environment (readable by its own user only).
fn environ_value(pid: u32, name: &str) -> String {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    environ
        .split(|b| *b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .find_map(|entry| entry.strip_prefix(&format!("{name}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("{name} is not set"))
}

/// Every process's command line, as any local user can read them.
fn all_command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{name}/cmdline")).ok()?;
            Some(String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_process_lists_files_and_children() {
    let secret = generate_secret();
    let turn_credential = "turn-credential-5d1e0a7c3b";
    let handlers = json!({
        "environment": "python3 -c 'import json, os; print(json.dumps(dict(os.environ)))'"
    })
    .to_string();
    let rig = Rig::start(&[
        ("COCOON_SECRET", secret.expose()),
        // Everything the worker and its libraries log, at every level.
        ("RUST_LOG", "trace"),
        ("NO_COLOR", "1"),
        ("WEBRTC_ICE_SERVERS", "stun:127.0.0.1:9,turn:127.0.0.1:9"),
        ("WEBRTC_TURN_USERNAME", "turn-user"),
        ("WEBRTC_TURN_CREDENTIAL", turn_credential),
        ("COCOON_WEBRTC_LOOPBACK", "true"),
        ("COCOON_WEBRTC_NETWORKS", "127.0.0.1/32"),
        ("COCOON_QUERY_HANDLERS", &handlers),
    ])
    .await;
    let setup_token = environ_value(rig.worker.pid(), "COCOON_SETUP_TOKEN");
    let secrets = [
        ("the device secret", secret.expose()),
        ("the setup token", setup_token.as_str()),
        ("the TURN credential", turn_credential),
    ];
    let leaks = |text: &str| -> Vec<&str> {
        secrets
            .iter()
            .filter(|(_, value)| text.contains(value))
            .map(|(what, _)| *what)
            .collect()
    };

    // A session on a data channel: a terminal, a command and a custom query
    // each look at their environment.
    let session = rig.rtc_session(loopback_rtc()).await;
    session
        .wait_for_path(cocoon::link::rtc::Path::Direct, Duration::from_secs(15))
        .await
        .expect("a direct path on loopback");
    let mut pty = session
        .attach_pty(attach_request(Some(
            "env; echo; tr '\\0' ' ' < /proc/$PPID/cmdline",
        )))
        .await
        .unwrap();
    let (output, _) = drain_pty(&mut pty).await;
    let output = String::from_utf8_lossy(&output).into_owned();
    assert!(output.contains("TERM=xterm-256color"), "{output}");
    assert!(
        leaks(&output).is_empty(),
        "a terminal saw {:?}",
        leaks(&output)
    );
    let Response::ExecuteResult(result) = session
        .request(Request::Execute(execute_request("env")))
        .await
        .unwrap()
    else {
        panic!("execute_result")
    };
    assert!(result.data.stdout.contains("COCOON_OUTPUT_DIR="));
    assert!(
        leaks(&result.data.stdout).is_empty(),
        "a command saw {:?}",
        leaks(&result.data.stdout)
    );
    let query = json!({"type": "query_local", "query_id": "env", "query_type": {"Custom": {"query_name": "environment"}}});
    let Response::QueryResult { data, .. } = session
        .request(serde_json::from_value(query).unwrap())
        .await
        .unwrap()
    else {
        panic!("query_result")
    };
    assert_eq!(data["COCOON_QUERY_NAME"], "environment");
    assert!(
        leaks(&data.to_string()).is_empty(),
        "a query handler saw {:?}",
        leaks(&data.to_string())
    );

    // Nothing in any process's command line, with a terminal running.
    let running = session
        .attach_pty(attach_request(Some("sleep 30")))
        .await
        .unwrap();
    for line in all_command_lines() {
        assert!(
            leaks(&line).is_empty(),
            "{:?} in the command line {line}",
            leaks(&line)
        );
    }
    running.close().await.unwrap();

    // Every file the worker wrote is its user's alone.
    let mut files = vec![rig.worker_dir.path().to_owned()];
    while let Some(path) = files.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            let mode = meta.permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
        }
    }

    // Nothing in the logs, at trace level.
    drop(session);
    let Rig { worker, .. } = rig;
    let (_, logs) = worker.terminate().await;
    assert!(
        logs.contains("TRACE"),
        "the logs were captured at trace level"
    );
    assert!(logs.contains("data channel open"), "{logs}");
    assert!(leaks(&logs).is_empty(), "the logs hold {:?}", leaks(&logs));
}

/// Inodes of the sockets among a process's open files.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.ok()?.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Inodes of the TCP sockets listening in this network namespace.
fn listening_tcp_inodes() -> Vec<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(3) == Some(&"0A")).then(|| fields.get(9)?.parse().ok())?
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_listens_on_no_tcp_port() {
    // Nothing local to re-point or to reach: the worker only dials out,
    // with a terminal and a data channel open as much as when idle.
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    let session = rig.rtc_session(loopback_rtc()).await;
    session
        .wait_for_path(cocoon::link::rtc::Path::Direct, Duration::from_secs(15))
        .await
        .expect("a direct path on loopback");
    let _pty = session
        .attach_pty(attach_request(Some("cat")))
        .await
        .unwrap();
    let listening = listening_tcp_inodes();
    let ours = socket_inodes(std::process::id());
    assert!(
        ours.iter().any(|inode| listening.contains(inode)),
        "the check sees the test's own signaling server listening"
    );
    let worker = socket_inodes(rig.worker.pid());
    assert!(!worker.is_empty(), "the worker has its sockets");
    assert!(
        !worker.iter().any(|inode| listening.contains(inode)),
        "the worker listens on a TCP port"
    );
}
