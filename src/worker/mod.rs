//! The worker: keeps one registered connection to the signaling server,
//! reconnecting with backoff, and hands client requests to the services.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cocoon_signaling::protocol::{ErrorCode, FromServer, Secret, ToServer};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Services as ServiceList, WorkerArgs};
use crate::identity::{Identity, check_data_dir, explain_mismatch};
use crate::link::rtc::RtcConfig;
use crate::link::ws::WsLink;
use crate::services::Services;
use crate::services::exec::{ExecPolicy, Executor};
use crate::services::process::EnvPolicy;
use crate::services::proxy::{Proxy, ProxyConfig};
use crate::services::pty::{PtyConfig, PtyManager};
use crate::services::query::{Queries, QueryConfig};
use crate::services::tasks::TaskStore;
use connection::{Ended, Node};

mod connection;
pub mod health;

/// How long the worker waits for the server's answer to `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the worker needs, resolved from flags, environment and defaults.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Signaling server URL.
    pub url: String,
    /// `COCOON_SECRET`, if set.
    pub secret: Option<Secret>,
    /// `COCOON_SETUP_TOKEN`, if set.
    pub setup_token: Option<Secret>,
    /// Display name.
    pub name: Option<String>,
    /// Proxyable local services.
    pub services: ServiceList,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Extra trusted CA file for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// `execute` policy.
    pub exec: ExecPolicy,
    /// PTY settings.
    pub pty: PtyConfig,
    /// What children's environments may hold.
    pub env: EnvPolicy,
    /// Proxy settings (besides the service list).
    pub proxy_timeout: Duration,
    /// Query settings.
    pub queries: QueryConfig,
    /// WebRTC settings; `None` keeps every session on the relay.
    pub rtc: Option<RtcConfig>,
}

impl TryFrom<WorkerArgs> for WorkerConfig {
    type Error = anyhow::Error;

    fn try_from(args: WorkerArgs) -> anyhow::Result<Self> {
        let queries = args.limits.query_config(&args.data_dir);
        let rtc = args.rtc.config()?;
        let secret = match &args.secret_file {
            Some(file) if args.secret.is_none() => Some(read_secret_file(file, "secret")?),
            _ => args.secret,
        };
        let setup_token = match &args.setup_token_file {
            Some(file) if args.setup_token.is_none() => {
                Some(read_secret_file(file, "setup token")?)
            }
            _ => args.setup_token,
        };
        Ok(Self {
            url: args.url,
            secret,
            setup_token,
            name: args.name,
            services: args.services,
            exec: args.limits.exec_policy(&args.data_dir),
            pty: args.limits.pty_config(&args.data_dir),
            data_dir: args.data_dir,
            ca_file: args.ca_file,
            env: args.limits.env_policy(),
            proxy_timeout: args.limits.proxy_timeout,
            queries,
            rtc,
        })
    }
}

fn read_secret_file(path: &std::path::Path, what: &str) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    Ok(Secret::new(text.trim()))
}

/// Replies waiting for the signaling connection.
const OUTBOUND_QUEUE: usize = 256;

/// Runs the worker until `shutdown` fires or the server refuses it for good.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    println!("🐛 Cocoon starting");
    check_data_dir(&config.data_dir)?;
    if let Some(sandbox) = &config.exec.sandbox {
        sandbox.check()?;
    }
    let mut identity = Identity::load(&config.data_dir, config.secret.clone())?;
    let tls = crate::tls::client_config(config.ca_file.as_deref())?;
    let mut node = start_services(&config)?;
    warn_if_plaintext(&config.url);
    println!("🔗 Connecting to signaling server: {}", config.url);
    let mut backoff = Backoff::default();
    // Connecting from now until registered, however many tries it takes.
    health::record(&config.data_dir, health::State::Connecting).await;
    loop {
        match connect_once(&config, &mut identity, tls.clone(), &mut node, &shutdown).await {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Lost) => {
                // It had registered: the next failure starts from a short delay.
                backoff.reset();
                health::record(&config.data_dir, health::State::Connecting).await;
                tracing::warn!("signaling connection lost");
            }
            Err(Failure::Fatal(err)) => return Err(err),
            Err(Failure::Retry(err)) => tracing::warn!(
                err = format!("{err:#}"),
                "cannot reach the signaling server"
            ),
        }
        let delay = backoff.next_delay();
        tracing::info!(?delay, "reconnecting");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

enum Failure {
    /// Retrying cannot help (the server refused the identity).
    Fatal(anyhow::Error),
    /// The network or the server failed; try again later.
    Retry(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Retry(err)
    }
}

fn start_services(config: &WorkerConfig) -> anyhow::Result<Node> {
    let tasks = TaskStore::open(&config.data_dir)?;
    let (out, outbound) = mpsc::channel(OUTBOUND_QUEUE);
    let exec = Arc::new(Executor::new(
        config.exec.clone(),
        config.env.clone(),
        config.data_dir.join("output"),
        tasks.clone(),
    ));
    let ptys = PtyManager::new(config.pty.clone(), config.env.clone(), tasks.clone());
    let mut proxy = ProxyConfig::new(config.services.clone());
    proxy.timeout = config.proxy_timeout;
    let queries = Queries::new(config.queries.clone(), tasks, exec.clone());
    Ok(Node {
        services: Services::new(exec, ptys, Proxy::new(proxy), queries),
        out,
        outbound,
        rtc: config.rtc.clone().map(Arc::new),
    })
}

async fn connect_once(
    config: &WorkerConfig,
    identity: &mut Identity,
    tls: Arc<rustls::ClientConfig>,
    node: &mut Node,
    shutdown: &CancellationToken,
) -> Result<Ended, Failure> {
    let mut link = tokio::select! {
        link = WsLink::connect(&config.url, tls) => link?,
        _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
    };
    register(config, identity, &mut link).await?;
    health::record(&config.data_dir, health::State::Registered).await;
    let ended = connection::serve(&mut link, node, shutdown).await;
    if matches!(ended, Ended::Shutdown) {
        link.close().await;
    }
    Ok(ended)
}

/// Sends `register` and waits for `registered`, printing the spec's lines.
async fn register(
    config: &WorkerConfig,
    identity: &mut Identity,
    link: &mut WsLink,
) -> Result<(), Failure> {
    let reconnecting = identity.device_id.is_some();
    if reconnecting {
        println!("⏳ Reconnecting with device ID verification...");
    } else {
        println!("⏳ Waiting for derived device ID (first registration)...");
    }
    link.send(&ToServer::Register {
        secret: identity.secret.clone(),
        device_id: identity.device_id.clone(),
        setup_token: config.setup_token.clone(),
        name: config.name.clone(),
    })
    .await?;
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        let reply = tokio::time::timeout_at(deadline, link.recv())
            .await
            .context("the server did not answer the registration in time")??;
        match reply {
            Some(FromServer::Registered { device_id, owner }) => {
                println!("✅ Registration confirmed");
                if reconnecting && identity.device_id.as_ref() == Some(&device_id) {
                    println!("🆔 Device ID: {device_id} (verified - secret matches!)");
                } else {
                    println!("🆔 Device ID: {device_id} (HMAC-derived from secret)");
                }
                if let Some(owner) = owner {
                    println!("👤 Claimed by: {owner}");
                }
                identity.confirm(device_id).map_err(Failure::Fatal)?;
                return Ok(());
            }
            Some(FromServer::Error { code, message }) if code.is_fatal() => {
                eprintln!("❌ {message}");
                let err = match code {
                    ErrorCode::DeviceIdMismatch => explain_mismatch(identity),
                    _ => anyhow::anyhow!("registration rejected ({code:?}): {message}"),
                };
                return Err(Failure::Fatal(err));
            }
            Some(FromServer::Error { message, .. }) => {
                println!("⚠️  {message}");
            }
            Some(other) => tracing::debug!(?other, "ignoring a message before registration"),
            None => {
                return Err(Failure::Retry(anyhow::anyhow!(
                    "the server closed the connection"
                )));
            }
        }
    }
}

/// Warns when the secret would cross a network unencrypted.
fn warn_if_plaintext(url: &str) {
    if sends_secret_in_clear(url) {
        tracing::warn!(%url, "INSECURE: plain ws:// to a remote host; use wss://");
        eprintln!(
            "⚠️  WARNING: {url} is plain ws:// to a non-loopback host: \
             the device secret travels unencrypted. Use wss://."
        );
    }
}

/// Whether `url` is plain `ws://` to a host other than loopback.
fn sends_secret_in_clear(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("ws://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Exponential backoff with jitter: 0.5 s doubling to 15 s, each delay drawn
/// from its upper half so a fleet does not reconnect in lockstep.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_BASE
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_detection() {
        for url in [
            "ws://example.com/ws",
            "ws://10.0.0.1:8080/ws",
            "ws://[2001:db8::1]:80/ws",
            "ws://127.0.0.1@evil/ws",
        ] {
            assert!(sends_secret_in_clear(url), "{url}");
        }
        for url in [
            "wss://example.com/ws",
            "ws://localhost:8080/ws",
            "ws://127.0.0.1:1/ws",
            "ws://127.9.9.9/ws",
            "ws://[::1]:8080/ws",
        ] {
            assert!(!sends_secret_in_clear(url), "{url}");
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= BACKOFF_BASE / 2 && first <= BACKOFF_BASE);
        for _ in 0..20 {
            assert!(backoff.next_delay() <= BACKOFF_MAX);
        }
        assert!(backoff.next_delay() >= BACKOFF_MAX / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_BASE);
    }
}
