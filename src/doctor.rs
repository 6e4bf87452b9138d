//! `cocoon doctor`: why this machine does or does not get peer-to-peer
//! paths, with one verdict at the end.
//!
//! The checks run in order — signaling, ICE servers (name resolution),
//! STUN mapping, TURN allocation, the local UDP settings — and each prints
//! lines marked ✅, ⚠️ or ❌. Probing is I/O; what it found goes into
//! [`Findings`], and the conclusions ([`classify_nat`], [`verdict`]) are pure
//! functions. Every probe is bounded by `--timeout`, so the doctor never
//! hangs on a dead server or a resolver without internet.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cocoon_signaling::parse_duration;
use cocoon_signaling::protocol::{ErrorCode, FromServer, Secret, ToServer};
use futures_util::future::join_all;
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep_until, timeout};
use webrtc::stun::agent::TransactionId;
use webrtc::stun::fingerprint::FINGERPRINT;
use webrtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Getter, Message, is_message};
use webrtc::stun::xoraddr::XorMappedAddress;
use webrtc::turn::client::{Client as TurnClient, ClientConfig};
use webrtc::util::Conn;

use crate::client::{Client, ServerError};
use crate::config::RtcArgs;
use crate::link::rtc::{RtcConfig, in_network};
use crate::link::ws::WsLink;

/// `cocoon doctor` options: the worker's signaling and WebRTC settings.
#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Signaling server WebSocket URL.
    #[arg(
        long,
        env = "SIGNALING_SERVER_URL",
        default_value = "ws://localhost:8080/ws"
    )]
    pub url: String,
    /// Access token: authenticates and fetches the server's STUN/TURN servers.
    #[arg(long, env = "COCOON_ACCESS_TOKEN", hide_env_values = true, value_parser = |s: &str| Ok::<_, String>(Secret::new(s)))]
    pub access_token: Option<Secret>,
    /// Extra CA certificates (PEM) to trust for wss:// URLs.
    #[arg(long, env = "COCOON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Time allowed to each probe.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// WebRTC settings, as the worker takes them.
    #[command(flatten)]
    pub rtc: RtcArgs,
}

/// The conclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The signaling server is unreachable or refused the token.
    Offline,
    /// Direct paths are likely.
    P2p,
    /// Sessions will be relayed by TURN.
    Turn,
    /// Sessions will use the signaling server's WebSocket relay.
    Relay,
}

impl Verdict {
    /// The word printed after `Verdict: `.
    pub fn word(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::P2p => "p2p",
            Self::Turn => "turn",
            Self::Relay => "relay",
        }
    }
}

/// What STUN says about the NAT in front of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Nat {
    /// No STUN server answered.
    NoAnswer,
    /// The mapped address is this machine's own.
    None,
    /// Only one server address answered: stable or not, nobody can tell.
    Unknown(SocketAddr),
    /// Several server addresses saw the same mapping.
    Stable(SocketAddr),
    /// The mapping changes per destination.
    Hard(Vec<SocketAddr>),
}

/// One STUN answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The server address asked.
    pub server: SocketAddr,
    /// The address the server saw.
    pub mapped: SocketAddr,
    /// The local address packets to that server leave from, when known.
    pub local: Option<SocketAddr>,
}

/// Compares the mappings that distinct server addresses reported.
pub fn classify_nat(mappings: &[Mapping]) -> Nat {
    if mappings.iter().any(|m| m.local == Some(m.mapped)) {
        return Nat::None;
    }
    let mut by_server = BTreeMap::new();
    for m in mappings {
        by_server.entry(m.server).or_insert(m.mapped);
    }
    let mut seen: Vec<SocketAddr> = by_server.values().copied().collect();
    seen.sort();
    seen.dedup();
    match (by_server.len(), seen.as_slice()) {
        (0, _) => Nat::NoAnswer,
        (1, [one]) => Nat::Unknown(*one),
        (_, [one]) => Nat::Stable(*one),
        _ => Nat::Hard(seen),
    }
}

/// Everything the verdict depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Findings {
    /// The signaling server answered (and accepted the token, if any).
    pub signaling: bool,
    /// `COCOON_NO_WEBRTC`.
    pub webrtc_off: bool,
    /// `COCOON_WEBRTC_RELAY_ONLY`.
    pub relay_only: bool,
    /// The STUN conclusion.
    pub nat: Nat,
    /// At least one TURN allocation succeeded.
    pub turn: bool,
    /// 1:1 NAT addresses are announced and the port range has free ports.
    pub published: bool,
}

/// The verdict from the findings.
pub fn verdict(f: &Findings) -> Verdict {
    let direct = matches!(f.nat, Nat::None | Nat::Stable(_) | Nat::Unknown(_)) || f.published;
    match () {
        _ if !f.signaling => Verdict::Offline,
        _ if f.webrtc_off => Verdict::Relay,
        _ if direct && !f.relay_only => Verdict::P2p,
        _ if f.turn => Verdict::Turn,
        _ => Verdict::Relay,
    }
}

/// The sentence after the verdict: what it means and what to do.
pub fn advice(v: Verdict, f: &Findings) -> String {
    match v {
        Verdict::Offline => "the signaling server is unreachable or refused the token, so nothing \
            else matters yet: check the URL, COCOON_CA_FILE and the access token."
            .into(),
        Verdict::P2p if f.turn => {
            "direct peer-to-peer paths are likely; TURN works as the backup.".into()
        }
        Verdict::P2p => "direct peer-to-peer paths are likely; where the other side's network \
            blocks them, sessions fall back to the signaling relay (configure TURN for a faster \
            backup: ice-config/README.md)."
            .into(),
        Verdict::Turn if f.relay_only => {
            "relay-only mode: sessions will be relayed by TURN.".into()
        }
        Verdict::Turn => "direct paths are unlikely here, but TURN works: sessions will be \
            relayed by TURN."
            .into(),
        Verdict::Relay if f.webrtc_off => "WebRTC is off (COCOON_NO_WEBRTC): sessions use the \
            signaling server's WebSocket relay."
            .into(),
        Verdict::Relay => "no direct path is likely and no TURN server works: sessions will use \
            the signaling server's WebSocket relay (works everywhere, more latency); configure \
            TURN to do better (ice-config/README.md)."
            .into(),
    }
}

/// A parsed `stun:`/`turn:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceUrl {
    /// `turn:`/`turns:`.
    pub turn: bool,
    /// `stuns:`/`turns:` or `?transport=tcp`: webrtc-rs cannot use these.
    pub unusable: bool,
    /// Host name or address (without brackets).
    pub host: String,
    /// Port (3478, or 5349 for the TLS schemes, when absent).
    pub port: u16,
}

/// Parses `stun:HOST[:PORT]`, `turn:HOST[:PORT][?transport=udp|tcp]`, …
pub fn parse_ice_url(url: &str) -> Result<IceUrl, String> {
    let bad = || format!("{url:?} is not stun:HOST[:PORT] or turn:HOST[:PORT][?transport=…]");
    let (scheme, rest) = url.split_once(':').ok_or_else(bad)?;
    let (turn, secure) = match scheme {
        "stun" => (false, false),
        "stuns" => (false, true),
        "turn" => (true, false),
        "turns" => (true, true),
        _ => return Err(bad()),
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let tcp = query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("transport=tcp"));
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':').ok_or_else(bad)?)),
            }
        }
        None => match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        },
    };
    let port = match port {
        Some(port) => port.parse().ok().filter(|p| *p > 0).ok_or_else(bad)?,
        None if secure => 5349,
        None => 3478,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(IceUrl {
        turn,
        unusable: secure || tcp,
        host: host.to_owned(),
        port,
    })
}

/// One URL to probe, configured here or handed out by the server.
struct Entry {
    url: String,
    parsed: Result<IceUrl, String>,
    username: Option<String>,
    credential: Option<Secret>,
    from_server: bool,
    addr: Option<SocketAddr>,
}

/// Prints lines, never a secret.
struct Report {
    secrets: Vec<String>,
}

impl Report {
    fn ok(&self, text: &str) {
        self.print("✅", text);
    }

    fn warn(&self, text: &str) {
        self.print("⚠️", text);
    }

    fn fail(&self, text: &str) {
        self.print("❌", text);
    }

    fn print(&self, mark: &str, text: &str) {
        let mut text = text.to_owned();
        for secret in self.secrets.iter().filter(|s| s.len() >= 6) {
            text = text.replace(secret.as_str(), "<redacted>");
        }
        println!("{mark} {text}");
    }
}

/// Runs every check, prints the report and returns the verdict.
pub async fn run(args: DoctorArgs) -> anyhow::Result<Verdict> {
    let mut rtc_args = args.rtc.clone();
    rtc_args.no_webrtc = false;
    let rtc = rtc_args
        .config()?
        .expect("WebRTC settings exist when it is on");
    let wait = args.timeout;
    let mut report = Report {
        secrets: args
            .access_token
            .iter()
            .map(|t| t.expose().to_owned())
            .collect(),
    };
    report
        .secrets
        .extend(rtc.ice_servers.iter().filter_map(|s| s.credential.clone()));
    println!("cocoon doctor: {} (each probe {})", args.url, human(wait));

    let (signaling, issued) = check_signaling(&args, &report).await;
    let mut entries = entries(&rtc, issued);
    report.secrets.extend(
        entries
            .iter()
            .filter_map(|e| e.credential.as_ref().map(|c| c.expose().to_owned())),
    );
    resolve_all(&mut entries, wait, &report).await;

    let (socket, port_note) = bind_probe_socket(rtc.port_range).await?;
    let targets = stun_targets(&entries);
    let turn_probes = entries.iter().filter(|e| testable_turn(e)).map(|e| {
        let password = e.credential.as_ref().map_or("", |c| c.expose());
        allocate(
            e.addr.unwrap(),
            e.username.clone().unwrap_or_default(),
            password,
            wait,
        )
    });
    let (answers, turns) = tokio::join!(stun_probe(&socket, &targets, wait), join_all(turn_probes));
    let port = socket.local_addr()?.port();
    drop(socket);

    let mappings = report_stun(&entries, &targets, &answers, port, port_note, &report);
    let nat = classify_nat(&mappings);
    report_nat(&nat, &report);
    let turn = report_turn(&entries, &turns, &report);
    let published = report_local(&rtc, &mappings, &report);
    let findings = Findings {
        signaling,
        webrtc_off: args.rtc.no_webrtc,
        relay_only: rtc.relay_only,
        nat,
        turn,
        published,
    };
    if findings.webrtc_off {
        report
            .warn("WebRTC: turned off (COCOON_NO_WEBRTC): every session uses the signaling relay");
    } else if findings.relay_only {
        report.warn(
            "WebRTC: relay only (COCOON_WEBRTC_RELAY_ONLY): only TURN candidates are offered",
        );
    }
    let v = verdict(&findings);
    println!("Verdict: {} — {}", v.word(), advice(v, &findings));
    Ok(v)
}

/// Check 1: the signaling server. Returns whether it is usable and the ICE
/// servers it hands out.
async fn check_signaling(
    args: &DoctorArgs,
    report: &Report,
) -> (bool, Vec<cocoon_signaling::protocol::IceServer>) {
    let url = &args.url;
    let tls = match crate::tls::client_config(args.ca_file.as_deref()) {
        Ok(tls) => tls,
        Err(err) => {
            report.fail(&format!("Signaling: {}", chain(&err)));
            return (false, Vec::new());
        }
    };
    let Some(token) = &args.access_token else {
        return (
            probe_anonymous(url, tls, args.timeout, report).await,
            Vec::new(),
        );
    };
    let mut client = match timeout(args.timeout, Client::connect(url, token, tls)).await {
        Err(_) => {
            report.fail(&format!(
                "Signaling: {url} did not answer within {}",
                human(args.timeout)
            ));
            return (false, Vec::new());
        }
        Ok(Err(err)) => {
            match err.downcast_ref::<ServerError>() {
                Some(e) if matches!(e.code, ErrorCode::InvalidToken | ErrorCode::TokenExpired) => {
                    report.fail(&format!(
                        "Signaling: {url} refused the access token ({}: {})",
                        code_name(e.code),
                        e.message
                    ))
                }
                _ => report.fail(&format!("Signaling: {}", chain(&err))),
            }
            return (false, Vec::new());
        }
        Ok(Ok(client)) => client,
    };
    let user = client.user_id.to_string();
    match timeout(args.timeout, client.ice_servers()).await {
        Ok(Ok((servers, ttl))) => {
            let urls: usize = servers.iter().map(|s| s.urls.len()).sum();
            let credentials = servers.iter().any(|s| s.credential.is_some());
            let ttl = if credentials {
                format!(", TURN credentials valid for {}", human(ttl))
            } else {
                String::new()
            };
            report.ok(&format!(
                "Signaling: {url}: authenticated as {user}; the server hands out {urls} STUN/TURN URL(s){ttl}"
            ));
            (true, servers)
        }
        Ok(Err(err)) => {
            let why = match err.downcast_ref::<ServerError>() {
                Some(e) if e.code == ErrorCode::UnknownType => {
                    "this server predates get_ice_servers".to_owned()
                }
                _ => chain(&err),
            };
            report.ok(&format!(
                "Signaling: {url}: authenticated as {user}; no STUN/TURN servers from it ({why})"
            ));
            (true, Vec::new())
        }
        Err(_) => {
            report.ok(&format!(
                "Signaling: {url}: authenticated as {user}; it did not list its STUN/TURN servers in time"
            ));
            (true, Vec::new())
        }
    }
}

/// Without a token: a cocoon server answers `list_devices` with
/// `not_authenticated`.
async fn probe_anonymous(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    wait: Duration,
    report: &Report,
) -> bool {
    let exchange = async {
        let mut link = WsLink::connect(url, tls).await?;
        link.send(&ToServer::ListDevices {}).await?;
        let reply = link.recv().await;
        link.close().await;
        reply
    };
    match timeout(wait, exchange).await {
        Err(_) => report.fail(&format!(
            "Signaling: {url} did not answer within {}",
            human(wait)
        )),
        Ok(Err(err)) => report.fail(&format!("Signaling: {}", chain(&err))),
        Ok(Ok(Some(FromServer::Error {
            code: ErrorCode::NotAuthenticated,
            ..
        }))) => {
            report.ok(&format!(
                "Signaling: {url} speaks the cocoon protocol (no access token: its STUN/TURN \
                 servers were not fetched; set COCOON_ACCESS_TOKEN)"
            ));
            return true;
        }
        Ok(Ok(other)) => report.fail(&format!(
            "Signaling: {url} answered, but not as a cocoon server does: {other:?}"
        )),
    }
    false
}

/// The union of the configured servers and the server's, one per URL.
fn entries(rtc: &RtcConfig, issued: Vec<cocoon_signaling::protocol::IceServer>) -> Vec<Entry> {
    let configured = rtc.ice_servers.iter().flat_map(|s| {
        s.urls.iter().map(move |url| Entry {
            url: url.clone(),
            parsed: parse_ice_url(url),
            username: s.username.clone(),
            credential: s.credential.clone().map(Secret::new),
            from_server: false,
            addr: None,
        })
    });
    let issued = issued.into_iter().flat_map(|s| {
        s.urls.into_iter().map(move |url| Entry {
            parsed: parse_ice_url(&url),
            url,
            username: s.username.clone(),
            credential: s.credential.clone().map(Secret::new),
            from_server: true,
            addr: None,
        })
    });
    configured.chain(issued).collect()
}

/// Check 2: resolves every usable URL's host (IPv4), each within `wait`.
async fn resolve_all(entries: &mut [Entry], wait: Duration, report: &Report) {
    if entries.is_empty() {
        report.fail("ICE servers: none configured (WEBRTC_ICE_SERVERS) or handed out");
        return;
    }
    let results = join_all(entries.iter().map(|e| async move {
        match &e.parsed {
            Ok(url) if !url.unusable => Some(resolve(&url.host, url.port, wait).await),
            _ => None,
        }
    }))
    .await;
    for (entry, result) in entries.iter_mut().zip(results) {
        let origin = if entry.from_server {
            "from the server"
        } else {
            "configured"
        };
        let what = format!("ICE server {} ({origin})", entry.url);
        match (&entry.parsed, result) {
            (Err(err), _) => report.fail(&format!("{what}: {err}")),
            (Ok(_), None) => report.warn(&format!(
                "{what}: skipped: webrtc-rs cannot use stuns:/turns: or transport=tcp"
            )),
            (Ok(_), Some(Ok(addr))) => {
                report.ok(&format!("{what} → {addr}"));
                entry.addr = Some(addr);
            }
            (Ok(_), Some(Err(err))) => report.fail(&format!("{what}: {err}")),
        }
    }
}

/// Resolves on a detached thread: a stuck resolver costs `wait`, never more,
/// and never holds up the process's exit.
async fn resolve(host: &str, port: u16, wait: Duration) -> Result<SocketAddr, String> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(SocketAddr::from((ip, port)));
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = host.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send((name.as_str(), port).to_socket_addrs().map(Vec::from_iter));
    });
    match timeout(wait, rx).await {
        Ok(Ok(Ok(addrs))) => addrs
            .iter()
            .copied()
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| {
                if addrs.is_empty() {
                    format!("{host} is unresolvable")
                } else {
                    format!("{host} has only IPv6 addresses; the doctor probes IPv4")
                }
            }),
        Ok(Ok(Err(err))) => Err(format!("{host} is unresolvable ({err})")),
        Ok(Err(_)) => Err(format!("{host} is unresolvable")),
        Err(_) => Err(format!(
            "{host}: no answer from the resolver within {}",
            human(wait)
        )),
    }
}

/// The probe socket: in the WebRTC port range when one is set (where the
/// worker's candidates live), else any port.
async fn bind_probe_socket(
    range: Option<(u16, u16)>,
) -> anyhow::Result<(UdpSocket, Option<String>)> {
    if let Some((min, max)) = range {
        let count = u32::from(max - min) + 1;
        let start = rand::random::<u32>() % count;
        for i in 0..count.min(256) {
            let port = min + ((start + i) % count) as u16;
            if let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).await {
                return Ok((socket, None));
            }
        }
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
        let note = format!("no free port in {min}-{max}: probed from an ephemeral port");
        return Ok((socket, Some(note)));
    }
    Ok((UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?, None))
}

/// The distinct addresses of every resolved STUN and TURN server.
fn stun_targets(entries: &[Entry]) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = entries.iter().filter_map(|e| e.addr).collect();
    targets.sort();
    targets.dedup();
    targets
}

fn testable_turn(e: &Entry) -> bool {
    matches!(&e.parsed, Ok(url) if url.turn && !url.unusable)
        && e.addr.is_some()
        && e.username.is_some()
        && e.credential.is_some()
}

/// When the probe resends unanswered Binding requests, from its start.
const RETRANSMITS: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(1500)];

/// Check 3's I/O: one Binding request per target from one socket, resent
/// at 500 ms and 1.5 s, all within `wait`. Returns each target's mapped
/// address or why there is none.
pub async fn stun_probe(
    socket: &UdpSocket,
    targets: &[SocketAddr],
    wait: Duration,
) -> BTreeMap<SocketAddr, Result<SocketAddr, String>> {
    let start = Instant::now();
    let deadline = start + wait;
    let mut pending: BTreeMap<SocketAddr, Message> = BTreeMap::new();
    let mut results = BTreeMap::new();
    for &target in targets {
        let mut msg = Message::new();
        match msg.build(&[
            Box::new(TransactionId::new()),
            Box::new(BINDING_REQUEST),
            Box::new(FINGERPRINT),
        ]) {
            Ok(()) => drop(pending.insert(target, msg)),
            Err(err) => drop(results.insert(target, Err(err.to_string()))),
        }
    }
    let mut resends = RETRANSMITS.iter().map(|d| start + *d);
    let mut next = Some(start);
    let mut buf = vec![0u8; 1500];
    while !pending.is_empty() {
        let wake = next.unwrap_or(deadline).min(deadline);
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = received
                    && let Some((target, answer)) = stun_answer(&buf[..n], from, &pending) {
                        pending.remove(&target);
                        results.insert(target, answer);
                    }
            }
            _ = sleep_until(wake) => {
                if wake >= deadline {
                    break;
                }
                for (target, msg) in &pending {
                    if let Err(err) = socket.send_to(&msg.raw, target).await {
                        results.insert(*target, Err(format!("cannot send to it: {err}")));
                    }
                }
                next = resends.next();
            }
        }
    }
    for target in pending.into_keys() {
        results
            .entry(target)
            .or_insert_with(|| Err(format!("no answer within {}", human(wait))));
    }
    results
}

/// Matches a datagram to the request it answers.
fn stun_answer(
    data: &[u8],
    from: SocketAddr,
    pending: &BTreeMap<SocketAddr, Message>,
) -> Option<(SocketAddr, Result<SocketAddr, String>)> {
    if !is_message(data) {
        return None;
    }
    let mut msg = Message::new();
    msg.raw = data.to_vec();
    msg.decode().ok()?;
    let (target, _) = pending
        .iter()
        .find(|(t, req)| **t == from && req.transaction_id == msg.transaction_id)?;
    if msg.typ != BINDING_SUCCESS {
        return Some((*target, Err(format!("it answered {}", msg.typ))));
    }
    let mut xor = XorMappedAddress::default();
    let answer = match xor.get_from(&msg) {
        Ok(()) => Ok(SocketAddr::new(xor.ip, xor.port)),
        Err(err) => Err(format!("its answer has no XOR-MAPPED-ADDRESS: {err}")),
    };
    Some((*target, answer))
}

/// The local address the kernel would send from to `target`.
fn local_ip_towards(target: SocketAddr) -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Prints check 3's per-server lines; returns the mappings seen.
fn report_stun(
    entries: &[Entry],
    targets: &[SocketAddr],
    answers: &BTreeMap<SocketAddr, Result<SocketAddr, String>>,
    port: u16,
    note: Option<String>,
    report: &Report,
) -> Vec<Mapping> {
    if let Some(note) = note {
        report.warn(&format!("STUN: {note}"));
    }
    if targets.is_empty() {
        report.fail(
            "STUN: no reachable STUN or TURN server to ask for this machine's public address",
        );
    }
    let mut mappings = Vec::new();
    for target in targets {
        let urls: Vec<&str> = entries
            .iter()
            .filter(|e| e.addr == Some(*target))
            .map(|e| e.url.as_str())
            .collect();
        let what = format!("STUN {target} ({})", urls.join(", "));
        match &answers[target] {
            Ok(mapped) => {
                report.ok(&format!(
                    "{what}: mapped address {mapped} (local port {port})"
                ));
                let local = local_ip_towards(*target).map(|ip| SocketAddr::new(ip, port));
                mappings.push(Mapping {
                    server: *target,
                    mapped: *mapped,
                    local,
                });
            }
            Err(err) => report.fail(&format!("{what}: {err}")),
        }
    }
    mappings
}

fn report_nat(nat: &Nat, report: &Report) {
    match nat {
        Nat::NoAnswer => report.fail(
            "NAT: no STUN answer: this machine's public address is unknown (UDP blocked?); direct paths are unlikely",
        ),
        Nat::None => report.ok("NAT: no NAT: the mapped address is this machine's own"),
        Nat::Unknown(mapped) => report.warn(&format!(
            "NAT: only one server address answered (seen as {mapped}): cannot tell whether the mapping is stable; add a second STUN server to find out"
        )),
        Nat::Stable(mapped) => report.ok(&format!(
            "NAT: the mapping is stable (every server sees {mapped}): direct paths are likely"
        )),
        Nat::Hard(seen) => report.warn(&format!(
            "NAT: hard NAT (the mapping changes per destination: {}): direct paths are unlikely, TURN is needed",
            seen.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Check 4's I/O: one real allocation, released at once.
async fn allocate(
    server: SocketAddr,
    username: String,
    password: &str,
    wait: Duration,
) -> Result<SocketAddr, String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|err| format!("cannot bind a UDP socket: {err}"))?;
    let client = TurnClient::new(ClientConfig {
        stun_serv_addr: String::new(),
        turn_serv_addr: server.to_string(),
        username,
        password: password.to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .map_err(|err| err.to_string())?;
    client.listen().await.map_err(|err| err.to_string())?;
    let outcome = match timeout(wait, client.allocate()).await {
        Ok(Ok(relay)) => {
            let relayed = relay.local_addr().map_err(|err| err.to_string());
            let _ = timeout(wait, relay.close()).await;
            relayed
        }
        Ok(Err(err)) => Err(turn_error(&err.to_string())),
        Err(_) => Err(format!(
            "no answer within {}: the server is unreachable or UDP to it is blocked",
            human(wait)
        )),
    };
    let _ = client.close().await;
    outcome
}

/// Explains a TURN error response.
fn turn_error(err: &str) -> String {
    let why = if err.contains("401") {
        "the server refused the credentials (401): wrong or expired username/credential"
    } else if err.contains("403") {
        "the server forbids this allocation (403)"
    } else if err.contains("486") || err.contains("508") {
        "the server is out of allocations or relay ports"
    } else if err.contains("attribute not found") {
        "the server's answer lacks the nonce and realm of an authentication challenge (a server without authentication? webrtc-rs cannot use one)"
    } else {
        "the allocation failed"
    };
    format!("{why} [{err}]")
}

/// Prints check 4; returns whether an allocation worked.
fn report_turn(entries: &[Entry], turns: &[Result<SocketAddr, String>], report: &Report) -> bool {
    let mut results = turns.iter();
    let mut any_ok = false;
    let mut tested = 0;
    for entry in entries {
        if testable_turn(entry) {
            tested += 1;
            match results.next() {
                Some(Ok(relayed)) => {
                    any_ok = true;
                    report.ok(&format!(
                        "TURN {}: allocation ok, relayed address {relayed}",
                        entry.url
                    ));
                }
                Some(Err(err)) => report.fail(&format!("TURN {}: {err}", entry.url)),
                None => {}
            }
        } else if matches!(&entry.parsed, Ok(url) if url.turn && !url.unusable)
            && entry.addr.is_some()
        {
            report.warn(&format!(
                "TURN {}: no username/credential (WEBRTC_TURN_USERNAME, WEBRTC_TURN_CREDENTIAL): not tested",
                entry.url
            ));
        }
    }
    if tested == 0 {
        report.warn("TURN: no usable TURN server (turn:…, UDP, with credentials) to test");
    }
    any_ok
}

/// Check 5: the port range, the 1:1 NAT addresses and the allowed
/// networks. Returns whether 1:1 NAT addresses come with usable ports.
fn report_local(rtc: &RtcConfig, mappings: &[Mapping], report: &Report) -> bool {
    let mut free_ports = false;
    if let Some((min, max)) = rtc.port_range {
        let (tried, free) = free_udp_ports(min, max);
        free_ports = free > 0;
        let text = format!(
            "Ports: COCOON_WEBRTC_PORTS {min}-{max}: {free} of {tried} tried are free; open or \
             publish exactly this UDP range (containers: -p {min}-{max}:{min}-{max}/udp)"
        );
        match free {
            0 => report.fail(&text),
            n if n < tried => report.warn(&text),
            _ => report.ok(&text),
        }
    }
    if !rtc.nat_1to1_ips.is_empty() {
        let ips = rtc.nat_1to1_ips.join(", ");
        let seen: Vec<IpAddr> = mappings.iter().map(|m| m.mapped.ip()).collect();
        let matched = seen
            .iter()
            .any(|ip| rtc.nat_1to1_ips.iter().any(|a| a.parse() == Ok(*ip)));
        match seen.first() {
            _ if matched => report.ok(&format!(
                "NAT IPs: {ips} announced; the STUN mapping matches"
            )),
            Some(ip) => report.warn(&format!(
                "NAT IPs: {ips} announced, but STUN sees this machine as {ip}: check COCOON_WEBRTC_NAT_IPS"
            )),
            None => report.warn(&format!("NAT IPs: {ips} announced; no STUN mapping to check them against")),
        }
        if rtc.port_range.is_none() {
            report.warn("NAT IPs: set COCOON_WEBRTC_PORTS and forward that UDP range, or the announced addresses lead nowhere");
        }
    }
    if !rtc.allowed_networks.is_empty() {
        report_networks(rtc, mappings, report);
    }
    !rtc.nat_1to1_ips.is_empty() && free_ports
}

/// Whether the routes to the STUN servers leave from an allowed network.
fn report_networks(rtc: &RtcConfig, mappings: &[Mapping], report: &Report) {
    let nets: Vec<String> = rtc
        .allowed_networks
        .iter()
        .map(|(ip, prefix)| format!("{ip}/{prefix}"))
        .collect();
    let outside: Vec<String> = mappings
        .iter()
        .filter_map(|m| m.local.map(|l| (m.server, l.ip())))
        .filter(|(_, ip)| !rtc.allowed_networks.iter().any(|n| in_network(*ip, *n)))
        .map(|(server, ip)| format!("{server} from {ip}"))
        .collect();
    if outside.is_empty() {
        report.ok(&format!("Networks: candidates only on {}", nets.join(", ")));
    } else {
        report.warn(&format!(
            "Networks: candidates only on {}, but traffic leaves outside them ({}): the worker offers no candidate there",
            nets.join(", "),
            outside.join(", ")
        ));
    }
}

/// Binds every port of the range, or 64 spread over it; (tried, free).
fn free_udp_ports(min: u16, max: u16) -> (usize, usize) {
    let count = usize::from(max - min) + 1;
    let sample = count.min(64);
    let ports = (0..sample).map(|i| {
        let step = if sample > 1 {
            i * (count - 1) / (sample - 1)
        } else {
            0
        };
        min + step as u16
    });
    let free = ports
        .filter(|port| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, *port)).is_ok())
        .count();
    (sample, free)
}

/// An error and its causes, each said once (tungstenite repeats the I/O
/// error it wraps).
fn chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain().map(ToString::to_string) {
        if !parts.last().is_some_and(|last| last.contains(&cause)) {
            parts.push(cause);
        }
    }
    parts.join(": ")
}

fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// 3s, 90s, 30m, 12h.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s >= 600 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn mapping(server: &str, mapped: &str) -> Mapping {
        Mapping {
            server: addr(server),
            mapped: addr(mapped),
            local: Some(addr("192.168.1.10:40000")),
        }
    }

    #[test]
    fn nat_from_mappings() {
        assert_eq!(classify_nat(&[]), Nat::NoAnswer);
        let one = mapping("1.1.1.1:3478", "203.0.113.5:6000");
        assert_eq!(classify_nat(&[one]), Nat::Unknown(one.mapped));
        let same_port = mapping("1.1.1.1:3479", "203.0.113.5:6000");
        assert_eq!(classify_nat(&[one, same_port]), Nat::Stable(one.mapped));
        let other = mapping("2.2.2.2:3478", "203.0.113.5:6001");
        assert_eq!(
            classify_nat(&[one, other]),
            Nat::Hard(vec![one.mapped, other.mapped])
        );
        // Two URLs of one server address are one server.
        let again = mapping("1.1.1.1:3478", "203.0.113.5:6000");
        assert_eq!(classify_nat(&[one, again]), Nat::Unknown(one.mapped));
        let direct = Mapping {
            local: Some(addr("203.0.113.5:6000")),
            ..one
        };
        assert_eq!(classify_nat(&[direct, other]), Nat::None);
        let unknown_local = Mapping { local: None, ..one };
        assert_eq!(classify_nat(&[unknown_local]), Nat::Unknown(one.mapped));
    }

    #[test]
    fn verdicts() {
        let mapped = addr("203.0.113.5:6000");
        let hard = Nat::Hard(vec![mapped, addr("203.0.113.5:6001")]);
        use Verdict::*;
        // (signaling, webrtc off, relay only, TURN works, 1:1 NAT with ports, NAT) → verdict
        #[rustfmt::skip]
        let cases = [
            (true, false, false, false, false, Nat::None, P2p),
            (true, false, false, false, false, Nat::Stable(mapped), P2p),
            (true, false, false, false, false, Nat::Unknown(mapped), P2p),
            (true, false, false, false, false, hard.clone(), Relay),
            (true, false, false, true, false, hard.clone(), Turn),
            (true, false, false, true, false, Nat::NoAnswer, Turn),
            (true, false, false, false, false, Nat::NoAnswer, Relay),
            (true, false, false, false, true, hard.clone(), P2p),
            (false, false, false, true, false, Nat::None, Offline),
            (true, true, false, true, false, Nat::None, Relay),
            (true, false, true, false, false, Nat::None, Relay),
            (true, false, true, true, false, Nat::None, Turn),
        ];
        for (signaling, webrtc_off, relay_only, turn, published, nat, expected) in cases {
            let f = Findings {
                signaling,
                webrtc_off,
                relay_only,
                nat,
                turn,
                published,
            };
            let v = verdict(&f);
            assert_eq!(v, expected, "{f:?}");
            assert!(!advice(v, &f).is_empty());
        }
    }

    #[test]
    fn ice_urls() {
        let url = parse_ice_url("stun:stun.l.google.com:19302").unwrap();
        assert_eq!(
            (url.turn, url.unusable, url.host.as_str(), url.port),
            (false, false, "stun.l.google.com", 19302)
        );
        let url = parse_ice_url("turn:127.0.0.1:3478?transport=udp").unwrap();
        assert_eq!((url.turn, url.unusable, url.port), (true, false, 3478));
        assert!(
            parse_ice_url("turn:t.example.com?transport=tcp")
                .unwrap()
                .unusable
        );
        let url = parse_ice_url("turns:t.example.com").unwrap();
        assert_eq!((url.unusable, url.port), (true, 5349));
        let url = parse_ice_url("stun:[2001:db8::1]:3479").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("2001:db8::1", 3479));
        assert_eq!(parse_ice_url("stun:h").unwrap().port, 3478);
        for bad in ["http://x", "stun:", "stun:h:0", "stun:h:x", "stun:[::1"] {
            assert!(parse_ice_url(bad).is_err(), "{bad}");
        }
    }

    /// Found by fuzzing (`ice_servers`): whatever followed a bracketed
    /// address other than `:PORT` was ignored, so `stun:[::1]3:478` was
    /// probed as `[::1]:3478`.
    #[test]
    fn nothing_but_a_port_follows_a_bracketed_address() {
        for bad in ["stun:[::1]3:478", "turn:[::1]x", "stun:[::1]:"] {
            assert!(parse_ice_url(bad).is_err(), "{bad}");
        }
        let url = parse_ice_url("turn:[::1]?transport=udp").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 3478));
    }

    #[test]
    fn durations() {
        assert_eq!(human(Duration::from_secs(3)), "3s");
        assert_eq!(human(Duration::from_secs(12 * 3600)), "12h");
        assert_eq!(human(Duration::from_millis(500)), "500ms");
    }

    #[tokio::test]
    async fn stun_probe_is_bounded_and_reads_answers() {
        // A fake STUN server on loopback that answers with a fixed mapping.
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let mut req = Message::new();
            req.raw = buf[..n].to_vec();
            req.decode().unwrap();
            let mut res = Message::new();
            let mapped = XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            };
            res.build(&[
                Box::new(req.transaction_id),
                Box::new(BINDING_SUCCESS),
                Box::new(mapped),
            ])
            .unwrap();
            server.send_to(&res.raw, from).await.unwrap();
        });
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let started = std::time::Instant::now();
        let answers = stun_probe(
            &socket,
            &[server_addr, silent_addr],
            Duration::from_millis(700),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(answers[&server_addr], Ok(socket.local_addr().unwrap()));
        assert!(
            answers[&silent_addr]
                .as_ref()
                .unwrap_err()
                .contains("no answer")
        );
    }
}
