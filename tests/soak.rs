//! Soak: one worker serves session after session for `COCOON_SOAK_SECS`
//! seconds (20 by default; `COCOON_SOAK_SECS=1800 cargo test --release
//! --test soak -- --nocapture` is the half-hour run). Each round opens a
//! session (over the relay, or over a WebRTC data channel every other
//! round), streams a terminal's output, types into another, runs an
//! `execute` and a proxy request, and closes it all. After a warm-up and at
//! the end the worker's memory, file descriptors and threads are sampled at
//! rest, as are this process's descriptors (the signaling server runs
//! here): none may have grown beyond a small tolerance, and the server's
//! routes must be back to the rig's own.

mod common;

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use cocoon::link::rtc::Path;
use cocoon::session::client::{PtyEvent, Session};
use cocoon_signaling::protocol::service::{Encoding, Headers, ProxyHttp, Request, Response};
use common::http::upstream;
use common::measure::{Latencies, ProcStats, eventually, running_tasks, udp_sockets};
use common::*;

const DEFAULT_SECS: u64 = 20;
/// The warm-up: at least this many rounds, and a quarter of the run up to
/// this long.
const WARM_UP_ROUNDS: usize = 3;
const WARM_UP_MAX: Duration = Duration::from_secs(60);
/// Growth allowed between the warm-up sample and the end.
const RSS_TOLERANCE_KIB: u64 = 8 * 1024;
const FD_TOLERANCE: usize = 4;
const THREAD_TOLERANCE: u64 = 2;
/// How long each WebRTC peer's STUN query socket gets to close: webrtc-ice
/// keeps it for its 5 s gathering timeout even after the peer has closed
/// when the STUN server does not answer (the rig's never does).
const SETTLE: Duration = Duration::from_secs(20);
/// Threads are counted once their number has held this long: tokio ends an
/// idle thread of its blocking pool 10 s after its last job, and under load
/// the pool keeps as many as were ever busy at once.
const THREADS_HELD: Duration = Duration::from_secs(11);
/// How often a long run prints how it goes.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Lines of the streamed terminal.
const SEQ: usize = 20_000;

fn soak_duration() -> Duration {
    let secs = match std::env::var("COCOON_SOAK_SECS") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("COCOON_SOAK_SECS={value:?} is not a number of seconds")),
        Err(_) => DEFAULT_SECS,
    };
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serving_sessions_for_a_while_leaks_nothing() {
    // The client's side of a failing round shows with the failure.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn,cocoon=info")
        .try_init();
    let upstream = upstream().await;
    let services = format!("web:{}", upstream.addr.port());
    let mut env = LOOPBACK_RTC_ENV.to_vec();
    env.push(("COCOON_SERVICES", &services));
    let mut rig = Rig::start(&env).await;
    let worker = rig.worker.pid();
    assert_eq!(rig.server.hub.counts(), RIG_ROUTES);
    let at_start = at_rest(&rig).await;
    println!("at start: {at_start}");

    let duration = soak_duration();
    let warm_up = (duration / 4).min(WARM_UP_MAX);
    let started = Instant::now();
    // A bound on rounds besides the clock (a round takes well over 10 ms).
    let max_rounds = duration.as_millis() as usize / 10 + WARM_UP_ROUNDS + 1;
    let mut rounds = Latencies::default();
    let mut baseline = None;
    let mut last_report = Instant::now();
    for round in 0..max_rounds {
        let began = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), one_round(&mut rig, round))
            .await
            .unwrap_or_else(|_| panic!("round {round} hung"))
            .unwrap_or_else(|err| panic!("round {round}: {err:#}"));
        rounds.push(began.elapsed());
        if last_report.elapsed() >= REPORT_EVERY {
            last_report = Instant::now();
            println!(
                "{:.0?}: {} rounds, worker {} (busy)",
                started.elapsed(),
                round + 1,
                ProcStats::of(worker)
            );
        }
        if baseline.is_none() && round + 1 >= WARM_UP_ROUNDS && started.elapsed() >= warm_up {
            let sample = at_rest(&rig).await;
            println!(
                "after warm-up ({} rounds, {:.1?}): {sample}",
                round + 1,
                started.elapsed()
            );
            // Sampling at rest takes a while; the run goes on for the
            // rest of its duration after it.
            baseline = Some((sample, Instant::now()));
        }
        if baseline
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= duration - warm_up)
        {
            break;
        }
    }
    let (before, _) = baseline.expect("the warm-up ended");
    rounds.report("soak round (session, 2 terminals, execute, proxy)");

    let after = at_rest(&rig).await;
    println!(
        "at the end ({} rounds, {:.1?}): {after}",
        rounds.len(),
        started.elapsed(),
    );
    assert!(
        after.worker.threads <= before.worker.threads + THREAD_TOLERANCE,
        "the worker's threads grew: {before} → {after}"
    );
    assert!(
        after.worker.fds <= before.worker.fds + FD_TOLERANCE,
        "the worker's descriptors grew: {before} → {after}"
    );
    assert!(
        after.worker.rss_kib <= before.worker.rss_kib + RSS_TOLERANCE_KIB,
        "the worker's memory grew: {before} → {after}"
    );
    assert!(
        after.own_fds <= before.own_fds + FD_TOLERANCE,
        "this process's (server's and clients') descriptors grew: {before} → {after}"
    );
    let proxied = upstream.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(proxied, rounds.len(), "one proxy request a round");
}

/// The routes of the rig itself: its worker and its client.
const RIG_ROUTES: (usize, usize) = (1, 1);

/// The worker's and this process's numbers at rest.
struct Sample {
    worker: ProcStats,
    own_fds: usize,
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "worker {}; test process {} fds",
            self.worker, self.own_fds
        )
    }
}

/// Waits until nothing of ours is left anywhere — no task running on the
/// worker, only the rig's routes on the server, every WebRTC peer's UDP
/// sockets closed on both sides (see [`SETTLE`]) — then samples.
async fn at_rest(rig: &Rig) -> Sample {
    let worker = rig.worker.pid();
    let own = std::process::id();
    let session = rig.session().await;
    assert!(
        eventually(DEADLINE, async || running_tasks(&session).await == 0).await,
        "tasks still running on the worker"
    );
    drop(session);
    let hub = rig.server.hub.clone();
    assert!(
        eventually(DEADLINE, async || hub.counts() == RIG_ROUTES).await,
        "routes left behind: {:?}",
        hub.counts()
    );
    assert!(
        eventually(SETTLE, async || udp_sockets(worker) + udp_sockets(own) == 0).await,
        "WebRTC sockets stay open: {} in the worker, {} here",
        udp_sockets(worker),
        udp_sockets(own)
    );
    let threads = settled_threads(worker).await;
    Sample {
        worker: ProcStats {
            threads,
            ..ProcStats::of(worker)
        },
        own_fds: ProcStats::of(own).fds,
    }
}

/// The worker's thread count once it has held for [`THREADS_HELD`] (a
/// minute at most).
async fn settled_threads(pid: u32) -> u64 {
    let give_up = Instant::now() + Duration::from_secs(60);
    let mut count = ProcStats::of(pid).threads;
    let mut since = Instant::now();
    while since.elapsed() < THREADS_HELD && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = ProcStats::of(pid).threads;
        if now != count {
            (count, since) = (now, Instant::now());
        }
    }
    count
}

/// One session's life: two terminals (one streaming, one typed into), an
/// `execute` and a proxy request, then everything closed. Every other
/// session moves to a WebRTC data channel first (on loopback).
async fn one_round(rig: &mut Rig, round: usize) -> anyhow::Result<()> {
    // The rig's own client reads (and so answers the server's pings).
    let devices = rig.client.list_devices().await?;
    ensure!(devices.len() == 1 && devices[0].online, "{devices:?}");
    let session = if round.is_multiple_of(2) {
        rig.session().await
    } else {
        let session = rig.rtc_session(loopback_rtc()).await;
        session.wait_for_path(Path::Direct, DEADLINE).await?;
        session
    };
    let mut stream = session
        .attach_pty(attach_request(Some(&format!("seq 1 {SEQ}"))))
        .await?;
    let mut typed = session
        .attach_pty(attach_request(Some(ECHO_TERMINAL)))
        .await?;

    let (output, code) = drain_pty(&mut stream).await;
    ensure!(code == 0, "seq exited with {code}");
    let expected: String = (1..=SEQ).map(|n| format!("{n}\r\n")).collect();
    ensure!(output == expected.as_bytes(), "the stream arrived changed");

    expect_exactly(&mut typed, b"READY\r\n").await?;
    typed.write(format!("round {round}\n").as_bytes()).await?;
    expect_exactly(&mut typed, format!("round {round}\r\n").as_bytes()).await?;
    typed.close().await?;
    match tokio::time::timeout(DEADLINE, typed.next()).await {
        Ok(Some(PtyEvent::Exited(_))) => {}
        other => bail!("expected the typed terminal's exit, got {other:?}"),
    }

    execute(&session, round).await?;
    proxy(&session, round).await?;
    drop((stream, typed, session));
    let hub = rig.server.hub.clone();
    ensure!(
        eventually(DEADLINE, async || hub.counts() == RIG_ROUTES).await,
        "the session's route stayed: {:?}",
        hub.counts()
    );
    Ok(())
}

async fn execute(session: &Session, round: usize) -> anyhow::Result<()> {
    let response = session
        .request(Request::Execute(execute_request(&format!(
            "echo round {round}"
        ))))
        .await?;
    let Response::ExecuteResult(result) = response else {
        bail!("expected execute_result, got {response:?}");
    };
    ensure!(result.success, "{result:?}");
    ensure!(
        result.data.stdout == format!("round {round}\n"),
        "{result:?}"
    );
    Ok(())
}

async fn proxy(session: &Session, round: usize) -> anyhow::Result<()> {
    let body = format!("soak round {round}");
    let response = session
        .request(Request::ProxyHttp(ProxyHttp {
            request_id: format!("soak-{round}"),
            service_name: "web".into(),
            method: "POST".into(),
            path: "/echo".into(),
            headers: Headers::new(),
            body: Some(body.clone()),
            body_encoding: Encoding::Utf8,
        }))
        .await
        .context("proxy_http")?;
    let Response::ProxyResult(result) = response else {
        bail!("expected proxy_result, got {response:?}");
    };
    ensure!(result.status_code == 200, "{result:?}");
    ensure!(result.body.as_deref() == Some(body.as_str()), "{result:?}");
    Ok(())
}
