//! What the load and soak tests measure: latency percentiles, a process's
//! memory, file descriptors and threads, the server's `/health`, and the
//! worker's running tasks.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cocoon::session::client::Session;
use cocoon_signaling::protocol::service::{QueryLocal, QueryType, Request, Response};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Durations of one kind of operation, summarised as percentiles.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    pub fn push(&mut self, sample: Duration) {
        self.samples.push(sample);
    }

    pub fn extend(&mut self, samples: impl IntoIterator<Item = Duration>) {
        self.samples.extend(samples);
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// The nearest-rank percentile `p` (0–100); zero when empty.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let Some(last) = sorted.len().checked_sub(1) else {
            return Duration::ZERO;
        };
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.saturating_sub(1).min(last)]
    }

    /// Prints `label: n=…, p50=…, p99=…, max=…` (seen with `--nocapture`).
    pub fn report(&self, label: &str) {
        println!(
            "{label}: n={} p50={:.2?} p99={:.2?} max={:.2?}",
            self.len(),
            self.percentile(50.0),
            self.percentile(99.0),
            self.percentile(100.0)
        );
    }
}

/// Raises this process's soft limit on open files to at least `needed`; a
/// hard limit below that fails the test (nothing is skipped silently).
pub fn raise_fd_limit(needed: u64) {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test needs {needed} open files; the hard limit is {hard} (raise it with ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, needed, hard).expect("setrlimit");
}

/// A process's resident memory, open file descriptors and threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub fds: usize,
    pub threads: u64,
}

impl ProcStats {
    /// Reads `/proc/PID/status` and `/proc/PID/fd`.
    pub fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|err| panic!("process {pid} is gone: {err}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("/proc/PID/fd is readable")
            .count();
        Self {
            rss_kib: field("VmRSS:"),
            fds,
            threads: field("Threads:"),
        }
    }
}

impl fmt::Display for ProcStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rss {:.1} MiB, {} fds, {} threads",
            self.rss_kib as f64 / 1024.0,
            self.fds,
            self.threads
        )
    }
}

/// The server's `/health` document.
pub async fn health(addr: SocketAddr) -> serde_json::Value {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(super::DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("/health answers in time")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let (_, body) = response.split_once("\r\n\r\n").expect("a body");
    serde_json::from_str(body).unwrap_or_else(|err| panic!("{err}: {body}"))
}

static NEXT_QUERY: AtomicU64 = AtomicU64::new(1);

/// How many tasks (executes and terminals) the worker has running.
pub async fn running_tasks(session: &Session) -> u64 {
    let response = session
        .request(Request::QueryLocal(QueryLocal {
            query_id: format!("stats-{}", NEXT_QUERY.fetch_add(1, Ordering::Relaxed)),
            query_type: QueryType::GetTaskStats,
            params: serde_json::Value::Null,
        }))
        .await
        .expect("the worker answers GetTaskStats");
    match response {
        Response::QueryResult { data, .. } => data["running"]
            .as_u64()
            .unwrap_or_else(|| panic!("no running count in {data}")),
        other => panic!("expected a query_result, got {other:?}"),
    }
}

/// Polls `check` every 20 ms until it holds; false if `within` passes first.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many UDP sockets (WebRTC's) process `pid` has open.
pub fn udp_sockets(pid: u32) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for table in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …
        inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().nth(9).map(str::to_owned)),
        );
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd is readable")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?.to_owned();
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .filter(|inode| inodes.contains(inode))
        .count()
}
