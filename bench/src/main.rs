//! `cocoon-bench`: cocoon against a raw PTY and its peers, measured in one
//! run on one machine, the systems interleaved round by round (A B C A B C …)
//! so that drift hits all alike. See BENCHMARKS.md for the method and the
//! committed results.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

mod bare;
mod chromium;
mod fleet;
mod hop;
mod peers;
mod stats;
mod systems;
mod term;

use peers::{Peer, Peers};
use stats::{median, percentile};
use systems::{Cocoon, cpu_seconds, loopback_rtc, rss};
use term::Terminal;

#[derive(Parser, Debug)]
#[command(about = "cocoon's end-to-end benchmarks")]
struct Args {
    /// Rounds; each runs every system once, in turn.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// One-byte echoes per round and system.
    #[arg(long, default_value_t = 1000)]
    echoes: usize,
    /// Megabytes of output per throughput run.
    #[arg(long, default_value_t = 200)]
    megabytes: u64,
    /// Which systems, comma-separated (the peers need `bench/peers/install`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,webrtc,dc,relay,hop,ws,chromium,ssh,terminado,wetty"
    )]
    systems: Vec<System>,
    /// Where cocoon and cocoon-signaling are (a cargo profile dir).
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// Write the raw figures here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A quick run that proves the harness works (1 round, few echoes, 4 MB).
    #[arg(long)]
    smoke: bool,
    /// Idle workers registered for the signaling server's memory figure.
    #[arg(long, default_value_t = 1000)]
    idle_workers: usize,
    /// Internal: be the other end of the `webrtc` system (see bare.rs).
    #[arg(long, hide = true)]
    bare_peer: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
enum System {
    /// A shell on a local PTY: the limit.
    Raw,
    /// A webrtc-rs data channel alone, set up as cocoon's, no PTY: the
    /// stack's own limit.
    Webrtc,
    /// cocoon, Rust client, WebRTC data channel.
    Dc,
    /// cocoon, Rust client, the signaling server's WebSocket relay.
    Relay,
    /// The signaling server's relay hop alone: 1-byte session frames and
    /// 16 KiB ones between two WebSockets of the harness (hop.rs).
    Hop,
    /// The same traffic over one direct loopback WebSocket: `hop`'s
    /// baseline.
    Ws,
    /// `hop` across two signaling instances of a NATS fleet (fleet.rs;
    /// needs `nats-server`): against `hop`, what the fleet adds.
    Fleet,
    /// cocoon's browser terminal (xterm.js) in Chromium, data channel.
    Chromium,
    /// OpenSSH (Debian's), `ssh -tt` to an `sshd` of our own.
    Ssh,
    /// terminado (PyPI), its WebSocket JSON protocol.
    Terminado,
    /// WeTTY (npm), socket.io.
    Wetty,
}

impl System {
    fn label(self) -> &'static str {
        match self {
            System::Raw => "raw PTY, no network (the limit)",
            System::Webrtc => "webrtc-rs data channel alone, no PTY",
            System::Dc => "cocoon, data channel (Rust client)",
            System::Relay => "cocoon, WebSocket relay (Rust client)",
            System::Hop => "signaling server's relay hop alone (frames, no PTY)",
            System::Ws => "one direct loopback WebSocket (the hop's baseline)",
            System::Fleet => "relay hop across two instances on NATS (frames, no PTY)",
            // Its throughput runs are shorter: chromium::MAX_MEGABYTES.
            System::Chromium => "cocoon in Chromium (xterm.js, data channel; ≤ 50 MB runs)",
            System::Ssh => "OpenSSH",
            System::Terminado => "terminado (Python, WebSocket)",
            System::Wetty => "WeTTY (Node.js, socket.io)",
        }
    }

    /// Not a terminal: frames between two WebSocket ends (hop.rs).
    fn frames_only(self) -> bool {
        matches!(self, System::Hop | System::Ws | System::Fleet)
    }

    fn peer(self) -> Option<Peer> {
        match self {
            System::Ssh => Some(Peer::Ssh),
            System::Terminado => Some(Peer::Terminado),
            System::Wetty => Some(Peer::Wetty),
            _ => None,
        }
    }
}

/// What the systems run on: cocoon's processes and the peers' servers.
struct Stage {
    cocoon: Cocoon,
    peers: Option<Peers>,
    /// The browser's own server, worker and network, if it runs.
    chromium: Option<chromium::Chromium>,
    /// Two signaling instances on NATS, if `fleet` runs.
    fleet: Option<fleet::Fleet>,
    worker_pid: u32,
    server_pid: u32,
    /// The process at the other end of the current `webrtc` terminal.
    bare_peer_pid: AtomicU32,
}

impl Stage {
    /// The processes doing a system's server-side work, whose CPU and
    /// memory count.
    fn server_pids(&self, system: System) -> Vec<u32> {
        match (system, system.peer(), &self.peers) {
            (System::Raw, ..) => Vec::new(),
            (System::Webrtc, ..) => vec![self.bare_peer_pid.load(Ordering::Relaxed)],
            (System::Dc, ..) => vec![self.worker_pid],
            (System::Relay, ..) => vec![self.worker_pid, self.server_pid],
            (System::Hop, ..) => vec![self.server_pid],
            (System::Fleet, ..) => self.fleet.iter().flat_map(fleet::Fleet::pids).collect(),
            (System::Chromium, ..) => self.chromium.iter().map(|c| c.worker_pid()).collect(),
            (_, Some(peer), Some(peers)) => peers.server_side_pids(peer),
            _ => Vec::new(),
        }
    }

    /// A new terminal at its first prompt, and how long that took (for
    /// cocoon: connect → prompt).
    async fn open(&self, system: System) -> anyhow::Result<(Terminal, Option<Duration>)> {
        if let Some(peer) = system.peer() {
            let peers = self.peers.as_ref().context("the peers were not started")?;
            return Ok((peers.terminal(peer).await?, None));
        }
        let start = Instant::now();
        let mut terminal = match system {
            System::Raw => systems::raw_pty()?,
            System::Webrtc => {
                let (terminal, pid) = bare::terminal().await?;
                self.bare_peer_pid.store(pid, Ordering::Relaxed);
                terminal
            }
            System::Dc => self.cocoon.terminal(Some(loopback_rtc())).await?,
            _ => self.cocoon.terminal(None).await?,
        };
        // The first output is the prompt.
        tokio::time::timeout(term::STALL, terminal.output.recv())
            .await
            .context("no prompt")?
            .context("closed before the prompt")?;
        Ok((terminal, Some(start.elapsed())))
    }
}

/// One round's figures of one system.
#[derive(Debug, Default, Clone, Serialize)]
struct Round {
    echo_p50_us: f64,
    echo_p99_us: f64,
    mb_per_s: f64,
    /// Server-side CPU seconds per 100 MB streamed (worker, or worker plus
    /// signaling server on the relay path; the peers' server processes).
    cpu_s_per_100mb: Option<f64>,
    /// The worker's part of that on the relay path.
    worker_cpu_s_per_100mb: Option<f64>,
    first_output_ms: Option<f64>,
    /// Server-side memory with one terminal open, and after its client
    /// stopped reading for 5 s during a flood.
    rss_open_mb: Option<f64>,
    rss_after_stall_mb: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    rounds: BTreeMap<System, Vec<Round>>,
    worker_rss_idle_mb: f64,
    worker_rss_per_session_mb: f64,
    /// The worker's CPU use, 2–7 s after the last measured client left.
    worker_idle_cpu_percent_after: f64,
    worker_fds_after: usize,
    relay_to_p2p_ms: Vec<f64>,
    signaling_rss_idle_mb: f64,
    signaling_kb_per_idle_worker: f64,
    /// What the signaling server's relay hop adds to a round trip: the
    /// `hop` system's echo p50 less the `ws` system's (medians over rounds).
    relay_hop_added_p50_us: Option<f64>,
    /// What crossing two instances of a NATS fleet adds to the relay hop's
    /// round trip: the `fleet` system's echo p50 less the `hop` system's.
    fleet_added_p50_us: Option<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.bare_peer {
        // Exits at once: a runtime shutting down would wait for the
        // blocking read of stdin forever.
        let result = bare::serve().await;
        if let Err(err) = &result {
            eprintln!("bare peer: {err:#}");
        }
        std::process::exit(i32::from(result.is_err()));
    }
    // Off unless asked for: RUST_LOG=webrtc_ice=debug etc. traces the
    // harness's own clients (to stderr).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if args.smoke {
        args.rounds = 1;
        args.echoes = 50;
        args.megabytes = 4;
        args.idle_workers = 50;
    }
    // Interrupted, the run is dropped rather than the process ended, so
    // what it made (processes, Chromium's network namespace) is undone.
    let report = tokio::select! {
        report = run(&args) => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    print_report(&args, &report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<Report> {
    let cocoon = Cocoon::start(&args.bin).await?;
    let peer_systems: Vec<Peer> = args.systems.iter().filter_map(|s| s.peer()).collect();
    let peers = match peer_systems.is_empty() {
        true => None,
        false => Some(Peers::start_only(&std::env::current_dir()?, &peer_systems).await?),
    };
    let chromium = match args.systems.contains(&System::Chromium) {
        true => Some(chromium::Chromium::start(&args.bin).await?),
        false => None,
    };
    let fleet = match args.systems.contains(&System::Fleet) {
        true => Some(fleet::Fleet::start(&args.bin).await?),
        false => None,
    };
    let stage = Stage {
        chromium,
        fleet,
        worker_pid: cocoon.worker.id().context("worker running")?,
        server_pid: cocoon.server.id().context("server running")?,
        cocoon,
        peers,
        bare_peer_pid: AtomicU32::new(0),
    };
    let mut report = Report::default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.worker_rss_idle_mb = mb(rss(stage.worker_pid)?);

    for round in 0..args.rounds {
        for &system in &args.systems {
            eprintln!("round {}/{}: {}", round + 1, args.rounds, system.label());
            let figures = measure(args, &stage, system)
                .await
                .with_context(|| format!("{system:?}, round {}", round + 1))?;
            report.rounds.entry(system).or_default().push(figures);
        }
    }
    report.relay_hop_added_p50_us = match (
        report.rounds.get(&System::Hop),
        report.rounds.get(&System::Ws),
    ) {
        (Some(hop), Some(ws)) => {
            let p50 = |rounds: &Vec<Round>| median(rounds.iter().map(|r| r.echo_p50_us));
            Some(p50(hop) - p50(ws))
        }
        _ => None,
    };
    report.fleet_added_p50_us = match (
        report.rounds.get(&System::Fleet),
        report.rounds.get(&System::Hop),
    ) {
        (Some(fleet), Some(hop)) => {
            let p50 = |rounds: &Vec<Round>| median(rounds.iter().map(|r| r.echo_p50_us));
            Some(p50(fleet) - p50(hop))
        }
        _ => None,
    };

    // Once every client is gone, the worker should be idle again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(stage.worker_pid)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    report.worker_idle_cpu_percent_after = (cpu_seconds(stage.worker_pid)? - cpu) / 5.0 * 100.0;
    report.worker_fds_after = std::fs::read_dir(format!("/proc/{}/fd", stage.worker_pid))?.count();

    // Relay → P2P: from connecting to the data channel carrying the session.
    for _ in 0..args.rounds {
        let start = Instant::now();
        let session = stage.cocoon.session(Some(loopback_rtc())).await?;
        session
            .wait_for_path(cocoon::link::rtc::Path::Direct, Duration::from_secs(20))
            .await?;
        report.relay_to_p2p_ms.push(ms(start.elapsed()));
    }

    per_session_memory(args, &stage, &mut report).await?;
    signaling_memory(args, &stage.cocoon, stage.server_pid, &mut report).await?;
    Ok(report)
}

/// CPU seconds the processes have used (those that still exist).
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&pid| cpu_seconds(pid).unwrap_or(0.0))
        .sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| rss(pid).unwrap_or(0)).sum()
}

async fn measure(args: &Args, stage: &Stage, system: System) -> anyhow::Result<Round> {
    if system == System::Chromium {
        // Not a `Terminal`: the page times itself (chromium.rs).
        let chromium = stage.chromium.as_ref().context("Chromium was not set up")?;
        let megabytes = args.megabytes.min(chromium::MAX_MEGABYTES);
        return chromium.measure(args.echoes, megabytes * 1_000_000).await;
    }
    if system.frames_only() {
        return measure_frames(args, stage, system).await;
    }
    let mut round = Round::default();
    let (mut terminal, first) = stage.open(system).await.context("opening")?;
    round.first_output_ms = first.filter(|_| system != System::Raw).map(ms);
    terminal.prepare_echo().await.context("preparing")?;
    let times = terminal.echo(args.echoes).await.context("echoes")?;
    round.echo_p50_us = us(percentile(&times, 50.0));
    round.echo_p99_us = us(percentile(&times, 99.0));
    terminal.close().await;

    let (mut terminal, _) = stage.open(system).await.context("reopening")?;
    let pids = stage.server_pids(system);
    let bytes = args.megabytes * 1_000_000;
    let cpu_before = cpu_of(&pids);
    let worker_before = cpu_of(&[stage.worker_pid]);
    let took = terminal.throughput(bytes).await.context("throughput")?;
    let cpu = cpu_of(&pids) - cpu_before;
    if system == System::Relay {
        let worker = cpu_of(&[stage.worker_pid]) - worker_before;
        round.worker_cpu_s_per_100mb = Some(worker * 100e6 / bytes as f64);
    }
    round.mb_per_s = bytes as f64 / 1e6 / took.as_secs_f64();
    if system != System::Raw {
        round.cpu_s_per_100mb = Some(cpu * 100e6 / bytes as f64);
    }
    terminal.close().await;

    // A client that stops reading during a flood: the server side must
    // hold at most its window. (The bare peer runs no program to flood.)
    if !matches!(system, System::Raw | System::Webrtc) {
        let (mut terminal, _) = stage.open(system).await.context("opening for the stall")?;
        round.rss_open_mb = Some(mb(rss_of(&stage.server_pids(system))));
        terminal.type_bytes(b"yes\r").await?;
        terminal.read_until(b"y\r\ny\r\n").await.context("flood")?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        round.rss_after_stall_mb = Some(mb(rss_of(&stage.server_pids(system))));
        terminal.close().await;
    }
    Ok(round)
}

/// The relay hop (`hop`) or its baseline (`ws`): a fresh pair of ends per
/// measurement, as the terminals are fresh.
async fn measure_frames(args: &Args, stage: &Stage, system: System) -> anyhow::Result<Round> {
    let open = || async move {
        match system {
            System::Hop => {
                let cocoon = &stage.cocoon;
                hop::Pair::through_relay(&cocoon.url, &cocoon.access, &cocoon.setup).await
            }
            System::Fleet => {
                let fleet = stage.fleet.as_ref().context("the fleet was not started")?;
                hop::Pair::across(&fleet.near_url, &fleet.far_url, &fleet.access, &fleet.setup)
                    .await
            }
            _ => hop::Pair::direct().await,
        }
    };
    let mut round = Round::default();
    let times = open()
        .await?
        .ping_pong(args.echoes)
        .await
        .context("echoes")?;
    round.echo_p50_us = us(percentile(&times, 50.0));
    round.echo_p99_us = us(percentile(&times, 99.0));
    let mut pair = open().await?;
    let pids = stage.server_pids(system);
    let bytes = args.megabytes * 1_000_000;
    let cpu_before = cpu_of(&pids);
    let took = pair.bulk(bytes).await.context("throughput")?;
    round.mb_per_s = bytes as f64 / 1e6 / took.as_secs_f64();
    if !pids.is_empty() {
        round.cpu_s_per_100mb = Some((cpu_of(&pids) - cpu_before) * 100e6 / bytes as f64);
    }
    Ok(round)
}

/// Worker memory per extra terminal.
async fn per_session_memory(args: &Args, stage: &Stage, report: &mut Report) -> anyhow::Result<()> {
    let sessions = if args.smoke { 2 } else { 10 };
    let before = rss(stage.worker_pid)?;
    let mut open_terminals = Vec::new();
    for _ in 0..sessions {
        let (terminal, _) = stage.open(System::Relay).await?;
        open_terminals.push(terminal);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.worker_rss_per_session_mb =
        mb(rss(stage.worker_pid)?.saturating_sub(before)) / sessions as f64;
    for terminal in open_terminals {
        terminal.close().await;
    }
    Ok(())
}

/// The signaling server's memory with many idle registered workers.
async fn signaling_memory(
    args: &Args,
    cocoon: &Cocoon,
    server_pid: u32,
    report: &mut Report,
) -> anyhow::Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let before = rss(server_pid)?;
    report.signaling_rss_idle_mb = mb(before);
    let mut held = Vec::with_capacity(args.idle_workers);
    for _ in 0..args.idle_workers {
        let (mut ws, _) = tokio_tungstenite::connect_async(&cocoon.url).await?;
        let secret = cocoon_signaling::identity::generate_secret();
        let register = serde_json::json!({"type": "register", "secret": secret.expose()});
        ws.send(Message::text(register.to_string())).await?;
        let reply = ws.next().await.context("closed")??;
        anyhow::ensure!(
            reply.to_text().unwrap_or_default().contains("registered"),
            "registration failed: {reply:?}"
        );
        held.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss(server_pid)?;
    report.signaling_kb_per_idle_worker =
        after.saturating_sub(before) as f64 / 1024.0 / args.idle_workers as f64;
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1024.0 / 1024.0
}

fn print_report(args: &Args, report: &Report) {
    println!(
        "{} round(s), {} echoes and {} MB per system and round; medians over rounds\n",
        args.rounds, args.echoes, args.megabytes
    );
    println!(
        "| system | echo p50 / p99 µs | MB/s | server CPU s per 100 MB | server RSS open → after a 5 s stall, MB | connect → prompt, ms |"
    );
    println!("|---|---|---|---|---|---|");
    let raw_p50 = report
        .rounds
        .get(&System::Raw)
        .map(|r| median(r.iter().map(|x| x.echo_p50_us)));
    let ssh = report.rounds.get(&System::Ssh);
    let ssh_p50 = ssh.map(|r| median(r.iter().map(|x| x.echo_p50_us)));
    let ssh_mbs = ssh.map(|r| median(r.iter().map(|x| x.mb_per_s)));
    for (system, rounds) in &report.rounds {
        let of = |f: fn(&Round) -> Option<f64>| {
            let values: Vec<f64> = rounds.iter().filter_map(f).collect();
            (!values.is_empty()).then(|| median(values.into_iter()))
        };
        let p50 = median(rounds.iter().map(|r| r.echo_p50_us));
        let p99 = median(rounds.iter().map(|r| r.echo_p99_us));
        let mbs = median(rounds.iter().map(|r| r.mb_per_s));
        let dash = || "–".to_owned();
        let cpu = match (of(|r| r.cpu_s_per_100mb), of(|r| r.worker_cpu_s_per_100mb)) {
            (Some(all), Some(worker)) => format!("{all:.2} (worker {worker:.2})"),
            (all, _) => all.map_or_else(dash, |v| format!("{v:.2}")),
        };
        let memory = match (of(|r| r.rss_open_mb), of(|r| r.rss_after_stall_mb)) {
            (Some(open), Some(stall)) => format!("{open:.1} → {stall:.1}"),
            _ => dash(),
        };
        let first = of(|r| r.first_output_ms).map_or_else(dash, |v| format!("{v:.0}"));
        let mut ratios = Vec::new();
        let terminal = !system.frames_only();
        if let Some(raw) = raw_p50.filter(|_| terminal && *system != System::Raw) {
            ratios.push(format!("{:.1}× raw", p50 / raw));
        }
        if let Some(ssh) =
            ssh_p50.filter(|_| terminal && !matches!(system, System::Raw | System::Ssh))
        {
            ratios.push(format!("{:.2}× ssh", p50 / ssh));
        }
        let ratios = match ratios.is_empty() {
            true => String::new(),
            false => format!(" ({})", ratios.join(", ")),
        };
        let mbs_ratio = ssh_mbs
            .filter(|_| terminal && !matches!(system, System::Raw | System::Ssh))
            .map(|ssh| format!(" ({:.2}× ssh)", mbs / ssh))
            .unwrap_or_default();
        println!(
            "| {} | {p50:.0} / {p99:.0}{ratios} | {mbs:.0}{mbs_ratio} | {cpu} | {memory} | {first} |",
            system.label()
        );
    }
    println!();
    print_hop(report);
    print_fleet(report);
    println!(
        "relay → P2P: median {:.0} ms",
        median(report.relay_to_p2p_ms.iter().copied())
    );
    println!(
        "worker RSS: idle {:.1} MB; +{:.2} MB per open terminal",
        report.worker_rss_idle_mb, report.worker_rss_per_session_mb
    );
    println!(
        "worker after the rounds, every client gone: {:.1}% CPU, {} open fds",
        report.worker_idle_cpu_percent_after, report.worker_fds_after
    );
    println!(
        "signaling server RSS: {:.1} MB idle; {:.1} KB per idle registered worker ({} workers)",
        report.signaling_rss_idle_mb, report.signaling_kb_per_idle_worker, args.idle_workers
    );
}

/// The fleet's hop against one server's, when both ran.
fn print_fleet(report: &Report) {
    let (Some(added), Some(fleet), Some(hop)) = (
        report.fleet_added_p50_us,
        report.rounds.get(&System::Fleet),
        report.rounds.get(&System::Hop),
    ) else {
        return;
    };
    let p50 = |rounds: &Vec<Round>| median(rounds.iter().map(|r| r.echo_p50_us));
    let mbs = |rounds: &Vec<Round>| median(rounds.iter().map(|r| r.mb_per_s));
    println!(
        "fleet hop: {added:+.0} µs per round trip across two instances on NATS (echo p50 {:.0} vs {:.0} µs on one server); {:.0} vs {:.0} MB/s ({:.2}×)",
        p50(fleet),
        p50(hop),
        mbs(fleet),
        mbs(hop),
        mbs(fleet) / mbs(hop)
    );
}

/// The relay hop against its baseline, when both ran.
fn print_hop(report: &Report) {
    let (Some(added), Some(hop), Some(ws)) = (
        report.relay_hop_added_p50_us,
        report.rounds.get(&System::Hop),
        report.rounds.get(&System::Ws),
    ) else {
        return;
    };
    let p50 = |r: &Vec<Round>| median(r.iter().map(|x| x.echo_p50_us));
    let mbs = |r: &Vec<Round>| median(r.iter().map(|x| x.mb_per_s));
    println!(
        "relay hop: {added:+.0} µs per round trip (echo p50 {:.0} vs {:.0} µs on one direct WebSocket); {:.0} vs {:.0} MB/s ({:.2}×)",
        p50(hop),
        p50(ws),
        mbs(hop),
        mbs(ws),
        mbs(hop) / mbs(ws)
    );
}
