//! A simulated Internet with two NATs, made of network namespaces, with
//! coturn in its middle — removed when dropped.
//!
//! ```text
//!  wk 10.10.0.2 ── natw ── 10.90.0.2 ┐                ┌ 10.91.0.2 ── natc ── cl 10.20.0.2
//!      (worker)   10.10.0.1         10.90.0.1 ─ pub ─ 10.91.0.1         10.20.0.1 (client)
//!                                          coturn │
//!                                                 └ 10.99.0.1 ── sink 10.99.0.2 (drops all)
//! ```
//!
//! `pub` is "the Internet": coturn (and, in later tests, the signaling
//! server) listen on [`NatNet::PUB_IP`], which hosts behind both NATs
//! reach. `pub` forwards between the two NATs unless direct UDP is
//! blocked. Its default route leads into `sink`, which drops everything:
//! coturn closes a relay socket when a send fails with ENETUNREACH, and
//! ICE makes it send to private addresses that lead nowhere.
//!
//! Every link is created inside the namespaces, so nothing here ever
//! touches this machine's own interfaces; the addresses are the same in
//! every instance because namespaces isolate them.

use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use tokio::net::UdpSocket;
use webrtc::stun::agent::TransactionId;
use webrtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Getter, Message};
use webrtc::stun::xoraddr::XorMappedAddress;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How the network starts out.
#[derive(Clone, Copy, Debug, Default)]
pub struct NatOptions {
    /// The worker's NAT picks a random public port for every new flow
    /// (`--random-fully`), so STUN-learned ports are useless to peers.
    /// Otherwise it is an "easy" full-cone NAT: one mapping per inside port,
    /// reachable from anywhere (RFC 4787 endpoint-independent mapping and
    /// filtering) — a plain Linux MASQUERADE is not enough, because a peer's
    /// early probe claims the port that the inside host's mapping needs.
    pub worker_nat_hard: bool,
    /// The same for the client's NAT.
    pub client_nat_hard: bool,
    /// `pub` drops UDP between the two NATs: only TURN can carry data.
    pub block_direct_udp: bool,
}

/// A machine of the simulated network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// "The Internet": coturn and the signaling server.
    Pub,
    /// The worker's NAT router.
    NatW,
    /// The client's NAT router.
    NatC,
    /// The worker's host, behind `NatW`.
    Worker,
    /// The client's host, behind `NatC`.
    Client,
}

impl Host {
    const ALL: [Host; 5] = [
        Host::Pub,
        Host::NatW,
        Host::NatC,
        Host::Worker,
        Host::Client,
    ];

    fn suffix(self) -> &'static str {
        match self {
            Host::Pub => "pub",
            Host::NatW => "natw",
            Host::NatC => "natc",
            Host::Worker => "wk",
            Host::Client => "cl",
        }
    }
}

/// The network; dropping it kills coturn and deletes every namespace
/// (threads of [`NatNet::spawn_in`] still running keep theirs alive,
/// nameless, until they end).
pub struct NatNet {
    /// Namespace names in the order of [`Host::ALL`], then the sink.
    names: Vec<String>,
    /// Holds coturn's configuration (with the secret), database and log.
    dir: tempfile::TempDir,
    coturn: Mutex<Option<Child>>,
}

/// Where and how coturn listens and relays.
const COTURN_ARGS: &[&str] = &[
    "--listening-ip=10.90.0.1",
    "--relay-ip=10.90.0.1",
    "--listening-port=3478",
    // With one listening IP coturn has no RFC 5780 alternative port
    // (`--alt-listening-port` is ignored); an auxiliary server is a second
    // full STUN/TURN port on the same address.
    "--aux-server=10.90.0.1:3479",
    "--min-port=49152",
    "--max-port=49400",
    "--use-auth-secret",
    "--realm=cocoon.test",
    "--no-tls",
    "--no-dtls",
    "--no-cli",
    "--fingerprint",
    // Never rotate the log file (given with `--log-file=`; it is appended
    // to across restarts). `--log-file=stdout` would be block-buffered
    // into a file and lost when coturn is killed.
    "--simple-log",
    "--no-software-attribute",
];

impl NatNet {
    /// The "Internet" address where coturn and the signaling server listen.
    pub const PUB_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
    /// The worker host's private address.
    pub const WORKER_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
    /// The client host's private address.
    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 2);
    /// The public address of the worker's NAT.
    pub const WORKER_NAT_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 2);
    /// The public address of the client's NAT.
    pub const CLIENT_NAT_IP: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 2);
    /// coturn's STUN/TURN port (UDP and TCP).
    pub const TURN_PORT: u16 = 3478;
    /// coturn's second STUN/TURN port (an auxiliary server), same address.
    pub const TURN_ALT_PORT: u16 = 3479;
    /// coturn's realm.
    pub const REALM: &'static str = "cocoon.test";

    /// Builds the network (needs root). Panics if a step fails, after
    /// removing what was already built.
    pub fn create(options: NatOptions) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("cn{}x{n}", std::process::id() % 100_000);
        let mut names: Vec<String> = Host::ALL
            .iter()
            .map(|host| format!("{prefix}{}", host.suffix()))
            .collect();
        names.push(format!("{prefix}sink"));
        // Built step by step into `net`, so that a failing step drops it.
        let mut net = Self {
            names: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("natnet")
                .tempdir()
                .expect("temp dir"),
            coturn: Mutex::new(None),
        };
        for name in names {
            run(&["ip", "netns", "add", &name]);
            net.names.push(name);
            sh(net.names.last().unwrap(), "ip link set lo up");
        }
        net.wire();
        net.route(options);
        net
    }

    fn sink(&self) -> &str {
        &self.names[Host::ALL.len()]
    }

    /// Joins the namespaces with veth pairs, each made inside its two
    /// namespaces (interface names need only be unique within one).
    fn wire(&self) {
        use Host::*;
        let (sink, [pub_ns, natw, natc, wk, cl]) = (
            self.sink(),
            [Pub, NatW, NatC, Worker, Client].map(|h| self.ns(h)),
        );
        let links = [
            (
                [pub_ns, "pw", "10.90.0.1/24"],
                [natw, "wan", "10.90.0.2/24"],
            ),
            (
                [pub_ns, "pc", "10.91.0.1/24"],
                [natc, "wan", "10.91.0.2/24"],
            ),
            ([pub_ns, "ps", "10.99.0.1/30"], [sink, "sk", "10.99.0.2/30"]),
            ([natw, "lan", "10.10.0.1/24"], [wk, "wk0", "10.10.0.2/24"]),
            ([natc, "lan", "10.20.0.1/24"], [cl, "cl0", "10.20.0.2/24"]),
        ];
        for (a, b) in links {
            run(&[
                "ip", "-n", a[0], "link", "add", a[1], "type", "veth", "peer", "name", b[1],
                "netns", b[0],
            ]);
            for [ns, dev, ip] in [a, b] {
                run(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]);
                run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            }
        }
    }

    /// Routes, forwarding, NAT and the sink's drop rule.
    fn route(&self, options: NatOptions) {
        use Host::*;
        for (host, via) in [
            (Pub, "10.99.0.2"),
            (NatW, "10.90.0.1"),
            (NatC, "10.91.0.1"),
            (Worker, "10.10.0.1"),
            (Client, "10.20.0.1"),
        ] {
            self.sh(host, &format!("ip route add default via {via}"));
        }
        for host in [Pub, NatW, NatC] {
            self.sh(host, "sysctl -qw net.ipv4.ip_forward=1");
        }
        sh(self.sink(), "iptables -w -t raw -A PREROUTING -j DROP");
        self.set_nat_hard(NatW, options.worker_nat_hard);
        self.set_nat_hard(NatC, options.client_nat_hard);
        if options.block_direct_udp {
            self.block_direct_udp();
        }
    }

    /// The namespace's name, for `ip netns exec NAME …`.
    pub fn ns(&self, host: Host) -> &str {
        &self.names[host as usize]
    }

    /// Every namespace this network made (the sink included).
    pub fn namespaces(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Runs a command in `host`'s namespace; panics unless it succeeds.
    pub fn exec(&self, host: Host, args: &[&str]) {
        exec_in(self.ns(host), args);
    }

    fn sh(&self, host: Host, command: &str) {
        sh(self.ns(host), command);
    }

    /// `pub` drops UDP between the two NATs (both ways); idempotent.
    pub fn block_direct_udp(&self) {
        for rule in direct_udp_rules() {
            if !self.has_rule(Host::Pub, &rule) {
                self.exec(Host::Pub, &iptables("-A", &rule));
            }
        }
    }

    /// `pub` forwards UDP between the NATs again; idempotent.
    pub fn unblock_direct_udp(&self) {
        for rule in direct_udp_rules() {
            while self.has_rule(Host::Pub, &rule) {
                self.exec(Host::Pub, &iptables("-D", &rule));
            }
        }
    }

    fn has_rule(&self, host: Host, rule: &[&str]) -> bool {
        let mut args = vec!["ip", "netns", "exec", self.ns(host)];
        args.extend(iptables("-C", rule));
        succeeds(&args)
    }

    /// Makes the worker's NAT port-randomising (`true`) or port-preserving.
    /// Existing flows keep their mapping unless the `conntrack` tool is
    /// installed (then its table is flushed): use a new socket after this.
    pub fn set_worker_nat_hard(&self, hard: bool) {
        self.set_nat_hard(Host::NatW, hard);
    }

    /// The same for the client's NAT.
    pub fn set_client_nat_hard(&self, hard: bool) {
        self.set_nat_hard(Host::NatC, hard);
    }

    /// Replaces `nat`'s rules (on its `wan` interface): a port-randomising
    /// MASQUERADE when hard; else MASQUERADE plus every inbound UDP port
    /// forwarded to the one host behind it (full cone).
    fn set_nat_hard(&self, nat: Host, hard: bool) {
        self.sh(nat, "iptables -w -t nat -F POSTROUTING");
        self.sh(nat, "iptables -w -t nat -F PREROUTING");
        let masquerade = "iptables -w -t nat -A POSTROUTING -o wan -j MASQUERADE";
        if hard {
            self.sh(nat, &format!("{masquerade} --random-fully"));
        } else {
            self.sh(nat, masquerade);
            let inside = match nat {
                Host::NatW => Self::WORKER_IP,
                _ => Self::CLIENT_IP,
            };
            self.sh(
                nat,
                &format!(
                    "iptables -w -t nat -A PREROUTING -i wan -p udp -j DNAT --to-destination {inside}"
                ),
            );
        }
        if succeeds(&["conntrack", "--version"]) {
            quietly(&["ip", "netns", "exec", self.ns(nat), "conntrack", "-F"]);
        }
    }

    /// Runs `f()` to completion on a new OS thread inside `host`'s network
    /// namespace, on its own tokio current-thread runtime (all drivers on):
    /// every socket it opens — and every child process it starts — lives in
    /// that namespace, and `tokio::spawn` inside runs on the same runtime
    /// (tasks still pending when `f()` returns are dropped). Sockets keep
    /// their namespace: a `std::net` socket made there may be returned and
    /// used from any thread. A panic in `f` comes back through `join()`.
    pub fn spawn_in<F, Fut>(&self, host: Host, f: F) -> JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let name = self.ns(host).to_owned();
        let path = format!("/var/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {name}: {e}"));
                drop(file);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
                    .block_on(f())
            })
            .expect("thread starts")
    }

    /// [`NatNet::spawn_in`] for async callers: awaits the result without
    /// blocking the caller's runtime; a panic in `f` is resumed here.
    pub async fn run_in<F, Fut>(&self, host: Host, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = self.spawn_in(host, move || async move {
            let _ = tx.send(f().await);
        });
        match rx.await {
            Ok(output) => output,
            Err(_) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the thread sends before it ends"),
            },
        }
    }

    /// Starts coturn in `pub` with TURN REST credentials (`use-auth-secret`)
    /// for `secret`, and waits until both STUN ports answer. The secret goes
    /// in a 0600 config file, never on the command line.
    pub fn start_coturn(&mut self, secret: &str) {
        assert!(!self.coturn_running(), "coturn is already running");
        let dir = self.dir.path();
        let config = dir.join("turnserver.conf");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&config)
            .expect("coturn config");
        assert!(!secret.contains(['\n', '\r']), "a one-line secret");
        writeln!(file, "static-auth-secret={secret}").expect("coturn config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("coturn.log"))
            .expect("coturn log");
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns(Host::Pub), "turnserver", "-c"])
            .arg(&config)
            .args(COTURN_ARGS)
            .arg(format!("--log-file={}", dir.join("coturn.log").display()))
            .arg(format!(
                "--pidfile={}",
                dir.join("turnserver.pid").display()
            ))
            .arg(format!("--userdb={}", dir.join("turndb").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("coturn log"))
            .stderr(log)
            .spawn()
            .expect("turnserver starts");
        *self.coturn.get_mut().unwrap() = Some(child);
        self.wait_for_coturn();
    }

    fn wait_for_coturn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let child = self.coturn.get_mut().unwrap().as_mut();
            if let Some(status) = child.and_then(|child| child.try_wait().ok().flatten()) {
                panic!("turnserver exited ({status}):\n{}", self.coturn_log());
            }
            let answered = self
                .spawn_in(Host::Pub, || async {
                    let socket = UdpSocket::bind("0.0.0.0:0").await.expect("bind");
                    for port in [NatNet::TURN_PORT, NatNet::TURN_ALT_PORT] {
                        let server = SocketAddr::from((NatNet::PUB_IP, port));
                        if stun_query(&socket, server, Duration::from_millis(200), 1)
                            .await
                            .is_none()
                        {
                            return false;
                        }
                    }
                    true
                })
                .join()
                .expect("probe thread");
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "coturn did not answer STUN in 10 s:\n{}",
                self.coturn_log()
            );
        }
    }

    /// Kills coturn and waits for it; nothing happens if it is not running.
    pub fn stop_coturn(&mut self) {
        if let Some(mut child) = self.coturn.get_mut().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether coturn was started and has not exited.
    pub fn coturn_running(&self) -> bool {
        let mut coturn = self.coturn.lock().unwrap();
        coturn
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Everything coturn printed, across restarts.
    pub fn coturn_log(&self) -> String {
        std::fs::read(self.dir.path().join("coturn.log"))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for NatNet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.coturn_log();
            if !log.is_empty() {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!("--- coturn log (last lines) ---\n{}", tail.join("\n"));
            }
        }
        self.stop_coturn();
        // Deleting a namespace deletes its veth ends, and so the pairs.
        for name in &self.names {
            quietly(&["ip", "netns", "del", name]);
        }
    }
}

/// The Binding request's mapped address (XOR-MAPPED-ADDRESS) as `server`
/// sees `socket`: waits ~1 s for the answer and retries once; `None` if
/// none came.
pub async fn stun_mapped(socket: &UdpSocket, server: SocketAddr) -> Option<SocketAddr> {
    stun_query(socket, server, Duration::from_secs(1), 2).await
}

async fn stun_query(
    socket: &UdpSocket,
    server: SocketAddr,
    wait: Duration,
    tries: u32,
) -> Option<SocketAddr> {
    let mut request = Message::new();
    request
        .build(&[Box::new(TransactionId::new()), Box::new(BINDING_REQUEST)])
        .expect("a binding request");
    let mut buf = [0u8; 1500];
    for _ in 0..tries {
        if socket.send_to(&request.raw, server).await.is_err() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Ok((len, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if from == server
                && let Some(mapped) = mapped_address(&buf[..len], request.transaction_id)
            {
                return Some(mapped);
            }
        }
    }
    None
}

/// The mapped address in a Binding success response to `id`.
fn mapped_address(datagram: &[u8], id: TransactionId) -> Option<SocketAddr> {
    let mut response = Message::new();
    response.raw = datagram.to_vec();
    response.decode().ok()?;
    if response.typ != BINDING_SUCCESS || response.transaction_id != id {
        return None;
    }
    let mut mapped = XorMappedAddress::default();
    mapped.get_from(&response).ok()?;
    Some(SocketAddr::new(mapped.ip, mapped.port))
}

/// `pub`'s FORWARD rules that drop UDP between the NATs' networks.
fn direct_udp_rules() -> [[&'static str; 9]; 2] {
    let rule = |from, to| ["FORWARD", "-p", "udp", "-s", from, "-d", to, "-j", "DROP"];
    [
        rule("10.90.0.0/24", "10.91.0.0/24"),
        rule("10.91.0.0/24", "10.90.0.0/24"),
    ]
}

/// `iptables -w ACTION RULE…` (filter table; `-w` waits for the lock).
fn iptables<'a>(action: &'a str, rule: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["iptables", "-w", action];
    args.extend_from_slice(rule);
    args
}

/// [`exec_in`] of a command line split at whitespace.
fn sh(ns: &str, command: &str) {
    exec_in(ns, &command.split_whitespace().collect::<Vec<_>>());
}

/// Runs a command in the namespace `ns`; panics unless it succeeds.
fn exec_in(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all);
}

/// Runs a command; panics with its stderr unless it succeeds.
fn run(args: &[&str]) {
    let output = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Whether a command runs and succeeds (its output is discarded).
fn succeeds(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Runs a best-effort clean-up command, ignoring whether it worked.
fn quietly(args: &[&str]) {
    let _ = succeeds(args);
}
