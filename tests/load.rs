//! Load: a thousand workers on one signaling server, a hundred terminals and
//! fifty proxy requests at once on one worker. The assertions are on
//! correctness and zero errors; latency percentiles are printed (see them
//! with `-- --nocapture`), never asserted: timing targets belong to the
//! benchmarks (`bench/`, BENCHMARKS.md), not to tests.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cocoon::link::ws::{Incoming, WsLink};
use cocoon::session::client::{PtyEvent, Session};
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::service::{
    Encoding, HeaderValues, Headers, ProxyHttp, Request, Response,
};
use cocoon_signaling::protocol::{DeviceId, FromServer, Secret, ToServer, UserId};
use common::http::upstream;
use common::measure::{Latencies, eventually, health, raise_fd_limit, running_tasks};
use common::*;
use tokio::sync::{Barrier, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One load test at a time: on two cores, two of them would measure each
/// other and the figures would mean nothing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest any phase of a load test may take (they take seconds).
const PHASE_DEADLINE: Duration = Duration::from_secs(120);

/// Waits for every task (within [`PHASE_DEADLINE`]); returns what the
/// successful ones returned and how the others failed.
async fn join_all<T>(tasks: Vec<JoinHandle<anyhow::Result<T>>>) -> (Vec<T>, Vec<String>) {
    let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
    let mut done = Vec::with_capacity(tasks.len());
    let mut errors = Vec::new();
    for task in tasks {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Ok(value))) => done.push(value),
            Ok(Ok(Err(err))) => errors.push(format!("{err:#}")),
            Ok(Err(panic)) => errors.push(format!("task panicked: {panic}")),
            Err(_) => panic!("the tasks did not finish within {PHASE_DEADLINE:?}"),
        }
    }
    (done, errors)
}

fn assert_no_errors(what: &str, total: usize, errors: &[String]) {
    assert!(
        errors.is_empty(),
        "{} of {total} {what} failed; the first: {:#?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
}

// ---------------------------------------------------------------------------
// A thousand workers on one server.

const WORKERS: usize = 1000;
/// Workers dialling and registering at the same moment.
const OPENING_AT_ONCE: usize = 50;
const FLEET_OWNER: &str = "fleet";

/// A registered worker: its id and how long connecting and registering took.
type Opened = anyhow::Result<(DeviceId, Duration)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_workers_register_stay_listed_and_leave() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // Each worker holds two sockets in this process (its own and the
    // server's end), besides what the runtime and the store use.
    raise_fd_limit(2 * WORKERS as u64 + 1024);
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let setup = server.token(TokenKind::Setup, FLEET_OWNER);
    let tls = plain_tls();
    let opening = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let leave = CancellationToken::new();
    let (opened_tx, mut opened) = mpsc::channel::<Opened>(WORKERS);

    let started = Instant::now();
    let fleet: Vec<_> = (0..WORKERS)
        .map(|n| {
            let worker = FakeWorker {
                url: server.url(),
                tls: tls.clone(),
                setup: setup.clone(),
                name: format!("load-{n:04}"),
            };
            tokio::spawn(worker.run(opening.clone(), opened_tx.clone(), leave.clone()))
        })
        .collect();
    drop(opened_tx);

    let mut latencies = Latencies::default();
    let mut ids = HashSet::new();
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
    for _ in 0..WORKERS {
        match tokio::time::timeout_at(deadline, opened.recv()).await {
            Ok(Some(Ok((device_id, latency)))) => {
                latencies.push(latency);
                ids.insert(device_id);
            }
            Ok(Some(Err(err))) => errors.push(format!("{err:#}")),
            Ok(None) => break,
            Err(_) => panic!("{} workers registered in {PHASE_DEADLINE:?}", ids.len()),
        }
    }
    let registering = started.elapsed();
    assert_no_errors("registrations", WORKERS, &errors);
    assert_eq!(
        ids.len(),
        WORKERS,
        "every worker got a device id of its own"
    );
    latencies.report("registration (connect + register → registered)");
    println!("{WORKERS} workers registered in {registering:.2?}, {OPENING_AT_ONCE} at a time");

    assert_eq!(server.hub.counts(), (WORKERS, 0));
    assert_eq!(health(server.addr).await["devices_online"], WORKERS);

    // The owner sees every one of them, online.
    let mut owner = server.client(FLEET_OWNER).await;
    let listing = Instant::now();
    let devices = owner.list_devices().await.expect("device_list");
    println!(
        "list_devices of {} devices: {:.2?}",
        devices.len(),
        listing.elapsed()
    );
    assert_eq!(devices.len(), WORKERS);
    assert!(devices.iter().all(|d| d.online), "all online");
    let listed: HashSet<_> = devices.iter().map(|d| d.device_id.clone()).collect();
    assert_eq!(listed, ids);
    let names: Vec<_> = devices.iter().filter_map(|d| d.name.clone()).collect();
    let expected: Vec<_> = (0..WORKERS).map(|n| format!("load-{n:04}")).collect();
    assert_eq!(names, expected, "listed by name, each with its own");
    drop(owner);

    // Everyone leaves; the routes go with them.
    let leaving = Instant::now();
    leave.cancel();
    let (left, errors) = join_all(fleet).await;
    assert_no_errors("held connections", WORKERS, &errors);
    assert_eq!(left.len(), WORKERS);
    let hub = server.hub.clone();
    assert!(
        eventually(PHASE_DEADLINE, async || hub.counts() == (0, 0)).await,
        "routes left behind: {:?}",
        hub.counts()
    );
    println!("{WORKERS} workers left in {:.2?}", leaving.elapsed());
    let health = health(server.addr).await;
    assert_eq!(health["devices_online"], 0, "{health}");
    assert_eq!(health["clients"], 0, "{health}");
    server.stop().await;
}

/// A worker as far as the server can tell: it dials, registers with a fresh
/// strong secret and a setup token exactly as `cocoon run` does (through
/// the worker's own [`WsLink`]), then holds its connection, answering the
/// server's pings, until told to leave.
struct FakeWorker {
    url: String,
    tls: Arc<rustls::ClientConfig>,
    setup: Secret,
    name: String,
}

impl FakeWorker {
    async fn run(
        self,
        opening: Arc<Semaphore>,
        opened: mpsc::Sender<Opened>,
        leave: CancellationToken,
    ) -> anyhow::Result<()> {
        let registered = {
            let _turn = opening.acquire().await?;
            self.register().await
        };
        let (mut link, device_id, latency) = match registered {
            Ok(registered) => registered,
            Err(err) => {
                let _ = opened
                    .send(Err(anyhow::anyhow!("{}: {err:#}", self.name)))
                    .await;
                return Ok(());
            }
        };
        opened.send(Ok((device_id, latency))).await?;
        drop(opened);
        loop {
            tokio::select! {
                _ = leave.cancelled() => break,
                incoming = link.recv_any() => match incoming? {
                    Some(Incoming::Message(FromServer::ClientLeft { .. })) => {}
                    Some(other) => bail!("{}: unexpected {other:?}", self.name),
                    None => bail!("{}: the server closed a held connection", self.name),
                },
            }
        }
        link.close().await;
        Ok(())
    }

    async fn register(&self) -> anyhow::Result<(WsLink, DeviceId, Duration)> {
        let secret = generate_secret();
        let started = Instant::now();
        let mut link = WsLink::connect(&self.url, self.tls.clone()).await?;
        link.send(&ToServer::Register {
            secret,
            device_id: None,
            setup_token: Some(self.setup.clone()),
            name: Some(self.name.clone()),
        })
        .await?;
        let reply = tokio::time::timeout(DEADLINE, link.recv())
            .await
            .context("no reply to register in time")??;
        match reply {
            Some(FromServer::Registered { device_id, owner })
                if owner == Some(UserId::new(FLEET_OWNER)) =>
            {
                Ok((link, device_id, started.elapsed()))
            }
            other => bail!("expected registered (claimed), got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// A hundred terminals on one worker.

const TERMINALS: usize = 100;
/// The terminals are spread over this many sessions (client connections).
const SESSIONS: usize = 5;
const ROUNDS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_terminals_echo_every_line_exactly() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let rig = Rig::start(&[]).await;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(Arc::new(rig.session().await));
    }
    assert_eq!(running_tasks(&sessions[0]).await, 0);

    // The terminals and this test meet twice: when all are ready (the
    // worker must then run every one of them), and to start typing.
    let ready = Arc::new(Barrier::new(TERMINALS + 1));
    let go = Arc::new(Barrier::new(TERMINALS + 1));
    let terminals: Vec<_> = (0..TERMINALS)
        .map(|n| {
            let session = sessions[n % SESSIONS].clone();
            tokio::spawn(echo_terminal(n, session, ready.clone(), go.clone()))
        })
        .collect();
    if tokio::time::timeout(PHASE_DEADLINE, ready.wait())
        .await
        .is_err()
    {
        let (_, errors) = join_all(terminals).await;
        panic!("the terminals never all got ready: {errors:#?}");
    }
    assert_eq!(running_tasks(&sessions[0]).await, TERMINALS as u64);
    go.wait().await;
    let (results, errors) = join_all(terminals).await;
    assert_no_errors("terminals", TERMINALS, &errors);

    let mut attaching = Latencies::default();
    let mut echoes = Latencies::default();
    for (attach, rounds) in results {
        attaching.push(attach);
        echoes.extend(rounds);
    }
    assert_eq!(echoes.len(), TERMINALS * ROUNDS);
    attaching.report("attach_pty → program's first output");
    echoes.report(&format!(
        "echo of a line, {TERMINALS} terminals typing at once over {SESSIONS} sessions"
    ));

    // Every terminal is gone from the worker.
    let session = sessions[0].clone();
    assert!(
        eventually(DEADLINE, async || running_tasks(&session).await == 0).await,
        "terminals still running on the worker"
    );
}

/// Attaches a terminal and waits for its program; once all are ready and
/// told to go, types [`ROUNDS`] unique lines one after the other, each of
/// which must come back exactly once. Returns the time to the program's
/// first output and each echo's.
async fn echo_terminal(
    n: usize,
    session: Arc<Session>,
    ready: Arc<Barrier>,
    go: Arc<Barrier>,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let attaching = Instant::now();
    let mut pty = session
        .attach_pty(attach_request(Some(ECHO_TERMINAL)))
        .await
        .with_context(|| format!("terminal {n}"))?;
    expect_exactly(&mut pty, b"READY\r\n")
        .await
        .with_context(|| format!("terminal {n} starting"))?;
    let attach = attaching.elapsed();
    for meeting in [ready, go] {
        tokio::time::timeout(PHASE_DEADLINE, meeting.wait())
            .await
            .context("the other terminals never got ready")?;
    }
    let mut echoes = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        // Unique per terminal and round, and of varying length.
        let line = format!("terminal {n:03} round {round} {}", "x".repeat(n % 40));
        let typed = Instant::now();
        pty.write(format!("{line}\n").as_bytes()).await?;
        expect_exactly(&mut pty, format!("{line}\r\n").as_bytes())
            .await
            .with_context(|| format!("terminal {n} round {round}"))?;
        echoes.push(typed.elapsed());
    }
    pty.close().await?;
    match tokio::time::timeout(DEADLINE, pty.next()).await {
        Ok(Some(PtyEvent::Exited(_))) => Ok((attach, echoes)),
        Ok(other) => bail!("terminal {n}: expected its exit after close, got {other:?}"),
        Err(_) => bail!("terminal {n}: no exit after close"),
    }
}

// ---------------------------------------------------------------------------
// Fifty proxy requests at once through one worker.

const PROXY_AT_ONCE: usize = 50;
const PROXY_ROUNDS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_proxy_requests_at_once_all_answered_right() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let upstream = upstream().await;
    let services = format!("web:{}", upstream.addr.port());
    let rig = Rig::start(&[("COCOON_SERVICES", &services)]).await;
    let session = Arc::new(rig.session().await);

    let mut latencies = Latencies::default();
    for round in 0..PROXY_ROUNDS {
        let requests: Vec<_> = (0..PROXY_AT_ONCE)
            .map(|n| tokio::spawn(proxy_echo(session.clone(), round, n)))
            .collect();
        let (done, errors) = join_all(requests).await;
        assert_no_errors("proxy requests", PROXY_AT_ONCE, &errors);
        latencies.extend(done);
    }
    assert_eq!(latencies.len(), PROXY_AT_ONCE * PROXY_ROUNDS);
    assert_eq!(
        upstream.requests.load(std::sync::atomic::Ordering::SeqCst),
        PROXY_AT_ONCE * PROXY_ROUNDS,
        "each request reached the service once"
    );
    latencies.report(&format!(
        "proxy_http POST round trip, {PROXY_AT_ONCE} at once"
    ));
}

/// POSTs a body unique to this request to the service's echo and checks
/// that exactly it came back, with status 200. Returns the round trip.
async fn proxy_echo(session: Arc<Session>, round: usize, n: usize) -> anyhow::Result<Duration> {
    let request_id = format!("load-{round}-{n}");
    let path = format!("/echo?round={round}&n={n}");
    let body = format!("{request_id} ").repeat(50 + n);
    let request = ProxyHttp {
        request_id: request_id.clone(),
        service_name: "web".into(),
        method: "POST".into(),
        path: path.clone(),
        headers: Headers::from([(
            "content-type".into(),
            HeaderValues::One("text/plain".into()),
        )]),
        body: Some(body.clone()),
        body_encoding: Encoding::Utf8,
    };
    let sent = Instant::now();
    let response = session.request(Request::ProxyHttp(request)).await?;
    let elapsed = sent.elapsed();
    let Response::ProxyResult(result) = response else {
        bail!("{request_id}: expected proxy_result, got {response:?}");
    };
    anyhow::ensure!(
        result.request_id == request_id,
        "{request_id}: got {}",
        result.request_id
    );
    anyhow::ensure!(
        result.status_code == 200,
        "{request_id}: status {} ({:?})",
        result.status_code,
        result.body
    );
    anyhow::ensure!(
        result.headers.get("x-path") == Some(&HeaderValues::One(path)),
        "{request_id}: headers {:?}",
        result.headers
    );
    anyhow::ensure!(result.body_encoding == Encoding::Utf8);
    anyhow::ensure!(
        result.body.as_deref() == Some(body.as_str()),
        "{request_id}: another body came back"
    );
    Ok(elapsed)
}
