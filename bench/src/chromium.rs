//! cocoon in Chromium: the browser terminal (`examples/web`, xterm.js over a
//! WebRTC data channel) in Debian's Chromium, driven by playwright-core from
//! `bench/browser/bench.mjs`, which times everything inside the page.
//!
//! Chromium gathers WebRTC candidates on every interface it sees, so it runs
//! in a network namespace of the bench's own, joined to this one by a veth
//! pair (as `tests/browser.rs` does). Its signaling server and worker are a
//! second pair beside the loopback one of the other systems — the same
//! binaries and settings but for the address: listening on this side of the
//! link, the worker's ICE on that address only — so the other systems stay on
//! loopback exactly as before, and this one's worker serves nobody else.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::stats::percentile;
use crate::systems::{Cocoon, TempDir, cpu_seconds, rss};
use crate::{Round, mb, us};

/// At most this many MB per throughput run: xterm.js parses and draws every
/// byte, a few MB/s, so the other systems' 200 MB would take a minute or
/// more per round.
pub const MAX_MEGABYTES: u64 = 50;

/// A safety net over the page's own timeouts (30 s without progress).
const HUNG: Duration = Duration::from_secs(600);

/// How long the page stops reading during a flood, as the other systems'
/// clients do.
const STALL: Duration = Duration::from_secs(5);

/// A line of `bench.mjs`: where it is. After `Throughput`, `StallOpen` and
/// `Stalled` it waits for a line back.
#[derive(Debug, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
enum Step {
    /// The throughput run starts on our word.
    Throughput,
    ThroughputDone,
    /// A fresh terminal is at its prompt.
    StallOpen,
    /// A flood runs and the page has just stopped reading, for longer than
    /// [`STALL`].
    Stalled,
    /// The end.
    Figures(Figures),
}

/// What the page measured (on its own clock).
#[derive(Debug, Deserialize)]
struct Figures {
    first_prompt_ms: f64,
    echo_rendered_us: Vec<f64>,
    echo_parsed_us: Vec<f64>,
    frame_ms: f64,
    throughput_ms: f64,
}

/// What was read of the worker meanwhile.
#[derive(Debug, Default)]
struct Worker {
    cpu_s: Option<f64>,
    rss_open: Option<u64>,
    rss_after_stall: Option<u64>,
}

/// The page's server and worker, and the namespace Chromium runs in.
pub struct Chromium {
    #[allow(dead_code)] // held for its processes, never read
    cocoon: Cocoon,
    worker_pid: u32,
    /// The page's URL, with an access token in its fragment.
    page: String,
    script: PathBuf,
    /// Fields drop in order: whatever still runs in the namespace ends
    /// before its temporary files go.
    netns: Netns,
    /// Chromium's profile and temporary files (its TMPDIR), removed
    /// whatever happens.
    tmp: TempDir,
}

impl Chromium {
    /// Checks that everything is there, builds the namespace and starts the
    /// page's server and worker facing it. Paths are relative to the
    /// repository root, the bench's working directory.
    pub async fn start(bin: &Path) -> anyhow::Result<Self> {
        let root = std::env::current_dir()?;
        let web = root.join("examples/web");
        anyhow::ensure!(
            web.join("dist/index.html").is_file()
                && web.join("dist/app.js").is_file()
                && web.join("node_modules/playwright-core").is_dir(),
            "the browser client is not built: \
             npm --prefix examples/web ci && npm --prefix examples/web run build"
        );
        anyhow::ensure!(
            Path::new("/usr/bin/chromium").is_file(),
            "no /usr/bin/chromium (apt-get install chromium)"
        );
        let script = root.join("bench/browser/bench.mjs");
        anyhow::ensure!(script.is_file(), "no {}", script.display());
        let netns = Netns::create()?;
        let cocoon = Cocoon::start_on(bin, netns.host_ip.into(), Some(&web.join("dist"))).await?;
        let base = cocoon
            .url
            .strip_suffix("/ws")
            .and_then(|url| url.strip_prefix("ws://"))
            .context("a ws:// URL")?;
        let page = format!("http://{base}/#token={}", cocoon.access.expose());
        let tmp = TempDir(
            std::env::temp_dir().join(format!("cocoon-bench-{}-chromium", std::process::id())),
        );
        std::fs::create_dir_all(&tmp.0)?;
        Ok(Self {
            worker_pid: cocoon.worker.id().context("worker running")?,
            cocoon,
            page,
            script,
            netns,
            tmp,
        })
    }

    /// The worker serving the page: the server side whose CPU counts (the
    /// signaling server only relays until the data channel is up).
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }

    /// One round in a fresh Chromium: connect → prompt, `echoes` echoes,
    /// `bytes` of output, and a page that stops reading during a flood.
    pub async fn measure(&self, echoes: usize, bytes: u64) -> anyhow::Result<Round> {
        let result = self.run_page(echoes, bytes).await;
        // Whatever went wrong, no Chromium outlives its round.
        self.netns.end_processes();
        let (figures, worker) = result?;
        self.wait_idle().await?;
        anyhow::ensure!(
            figures.echo_rendered_us.len() == echoes,
            "{} echoes of {echoes}",
            figures.echo_rendered_us.len()
        );
        // p50 and p99 in µs, by the harness's one definition.
        let quantiles = |micros: &[f64]| {
            let times: Vec<Duration> = micros
                .iter()
                .map(|&micros| Duration::from_secs_f64(micros / 1e6))
                .collect();
            [50.0, 99.0].map(|p| us(percentile(&times, p)))
        };
        let [p50, p99] = quantiles(&figures.echo_rendered_us);
        let [parsed_p50, parsed_p99] = quantiles(&figures.echo_parsed_us);
        eprintln!(
            "  in the page: echo in the buffer p50 {parsed_p50:.0} / p99 {parsed_p99:.0} µs, \
             on screen p50 {p50:.0} / p99 {p99:.0} µs (a frame every {:.1} ms); \
             {} MB in {:.1} s",
            figures.frame_ms,
            bytes / 1_000_000,
            figures.throughput_ms / 1e3,
        );
        let cpu = worker.cpu_s.context("no throughput run")?;
        Ok(Round {
            echo_p50_us: p50,
            echo_p99_us: p99,
            mb_per_s: bytes as f64 / 1e6 / (figures.throughput_ms / 1e3),
            cpu_s_per_100mb: Some(cpu * 100e6 / bytes as f64),
            first_output_ms: Some(figures.first_prompt_ms),
            rss_open_mb: worker.rss_open.map(mb),
            rss_after_stall_mb: worker.rss_after_stall.map(mb),
            ..Round::default()
        })
    }

    /// Waits (up to 5 s) for the worker to have no programs left: a
    /// terminal of the page still running (`yes`…) would cost it CPU in the
    /// next system's measurements.
    async fn wait_idle(&self) -> anyhow::Result<()> {
        let children = || -> anyhow::Result<usize> {
            let mut count = 0;
            for task in std::fs::read_dir(format!("/proc/{}/task", self.worker_pid))? {
                let list = std::fs::read_to_string(task?.path().join("children"))?;
                count += list.split_whitespace().count();
            }
            Ok(count)
        };
        for _ in 0..50 {
            if children()? == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the page's terminals still run on the worker after the round")
    }

    /// Runs `bench.mjs` in the namespace; reads the worker's CPU time and
    /// memory at the steps the script announces.
    async fn run_page(&self, echoes: usize, bytes: u64) -> anyhow::Result<(Figures, Worker)> {
        let mut node = Command::new("ip")
            .args(["netns", "exec", &self.netns.name, "node"])
            .arg(&self.script)
            .env("COCOON_PAGE", &self.page)
            .env("BENCH_ECHOES", echoes.to_string())
            .env("BENCH_BYTES", bytes.to_string())
            // The page reads again a second after the worker's memory was.
            .env("BENCH_STALL_MS", (STALL.as_millis() + 1000).to_string())
            .env("TMPDIR", &self.tmp.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run node")?;
        let mut stdin = node.stdin.take().context("stdin is piped")?;
        let mut lines = BufReader::new(node.stdout.take().context("stdout is piped")?).lines();
        let mut next = async || -> anyhow::Result<String> {
            match tokio::time::timeout(HUNG, lines.next_line()).await {
                Ok(Ok(Some(line))) => Ok(line),
                Ok(Ok(None)) => anyhow::bail!("bench.mjs failed (its output is above)"),
                Ok(Err(err)) => Err(err.into()),
                Err(_) => anyhow::bail!("bench.mjs hung"),
            }
        };
        let pid = self.worker_pid;
        let mut worker = Worker::default();
        let mut cpu_before = 0.0;
        let figures = loop {
            let line = next().await?;
            let step: Step =
                serde_json::from_str(&line).with_context(|| format!("from bench.mjs: {line}"))?;
            let waits = matches!(step, Step::Throughput | Step::StallOpen | Step::Stalled);
            match step {
                Step::Throughput => cpu_before = cpu_seconds(pid)?,
                Step::ThroughputDone => worker.cpu_s = Some(cpu_seconds(pid)? - cpu_before),
                Step::StallOpen => worker.rss_open = Some(rss(pid)?),
                Step::Stalled => {
                    tokio::time::sleep(STALL).await;
                    worker.rss_after_stall = Some(rss(pid)?);
                }
                Step::Figures(figures) => break figures,
            }
            if waits {
                stdin.write_all(b"go\n").await?;
                stdin.flush().await?;
            }
        };
        let status = tokio::time::timeout(HUNG, node.wait())
            .await
            .context("bench.mjs did not end")??;
        anyhow::ensure!(status.success(), "bench.mjs: {status}");
        Ok((figures, worker))
    }
}

/// A network namespace joined to this one by a veth pair on 10.251.X.0/24
/// (X from the process id, away from the tests' 10.213.X.0/24). Inside, only
/// loopback and the link are reachable. Removed, with anything still running
/// in it, when dropped.
struct Netns {
    name: String,
    host_if: String,
    /// This side's address on the link: the server's and the worker's.
    host_ip: Ipv4Addr,
}

/// Runs a command and checks that it succeeded.
fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    fn create() -> anyhow::Result<Self> {
        let pid = std::process::id();
        let name = format!("cocoon-bench-{pid}");
        let subnet = (pid % 256) as u8;
        let host_ip = Ipv4Addr::new(10, 251, subnet, 1);
        let ns_ip = Ipv4Addr::new(10, 251, subnet, 2);
        let ns_if = format!("cbn{}", pid % 100_000);
        run(&["ip", "netns", "add", &name])?;
        // From here on, dropping it undoes whatever was made.
        let netns = Self {
            name,
            host_if: format!("cbh{}", pid % 100_000),
            host_ip,
        };
        let (name, host_if, ns_if) = (netns.name.as_str(), netns.host_if.as_str(), ns_if.as_str());
        let (host_cidr, ns_cidr) = (format!("{host_ip}/24"), format!("{ns_ip}/24"));
        let link = format!("10.251.{subnet}.0/24");
        let host = host_ip.to_string();
        run(&[
            "ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if,
        ])?;
        run(&["ip", "link", "set", ns_if, "netns", name])?;
        run(&["ip", "addr", "add", &host_cidr, "dev", host_if])?;
        run(&["ip", "link", "set", host_if, "up"])?;
        for command in [
            &["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"][..],
            &["ip", "addr", "add", &ns_cidr, "dev", ns_if],
            &["ip", "link", "set", ns_if, "up"],
            &["ip", "link", "set", "lo", "up"],
            // Chromium offers no host candidates without a default route…
            &["ip", "route", "add", "default", "via", &host],
            // …but nothing may leave the link (this side forwards packets).
            &["iptables", "-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
            &["iptables", "-A", "OUTPUT", "-d", &link, "-j", "ACCEPT"],
            &["iptables", "-A", "OUTPUT", "-j", "DROP"],
        ] {
            run(&[&["ip", "netns", "exec", name][..], command].concat())?;
        }
        Ok(netns)
    }

    /// Kills whatever still runs in the namespace: only what the bench
    /// started there (node and its Chromium).
    fn end_processes(&self) {
        let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return;
        };
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.end_processes();
        // Deleting the namespace deletes its end of the pair, and so both;
        // the second is for a namespace that never got its end.
        let quietly = |args: &[&str]| {
            let _ = std::process::Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quietly(&["netns", "del", &self.name]);
        quietly(&["link", "del", &self.host_if]);
    }
}
