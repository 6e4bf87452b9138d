//! The HTTP side: `/ws` (workers and clients), `/health`, the browser client
//! at every other path ([`crate::web`]), optional TLS, and the accept loop
//! with its connection cap and shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::cluster::{Cluster, NatsOptions};
use crate::conn::{self, Timeouts};
use crate::files::ensure_writable_dir;
use crate::hub::Hub;
use crate::ice::IceSettings;
use crate::protocol::{MAX_MESSAGE_BYTES, UserId};
use crate::store::{Store, load_salt, load_token_key};
use crate::web;

/// Frames above this size close the connection outright; between
/// [`MAX_MESSAGE_BYTES`] and this they get a `message_too_large` reply.
const HARD_FRAME_LIMIT: usize = 4 * MAX_MESSAGE_BYTES;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a signaling server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Where the salt, token key and device database live.
    pub data_dir: PathBuf,
    /// `HMAC_SALT`; when unset, one is generated and kept in the data dir.
    pub hmac_salt: Option<String>,
    /// Development mode: unclaimed devices are claimed by this owner. Only
    /// allowed on a loopback address.
    pub dev_owner: Option<UserId>,
    /// Serve HTTPS/WSS with this certificate chain and key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Browser origins allowed besides the server's own.
    pub allowed_origins: Vec<String>,
    /// Most simultaneous TCP connections.
    pub max_connections: usize,
    /// Handshake, ping and idle timeouts of WebSocket connections.
    pub timeouts: Timeouts,
    /// A directory of built browser-client files to serve at `/`.
    pub web_root: Option<PathBuf>,
    /// The STUN/TURN servers handed to workers and clients.
    pub ice: IceSettings,
    /// Share secrets, devices, presence and routing with the other instances
    /// of a fleet through NATS (see [`crate::cluster`]); the data dir is then
    /// unused.
    pub nats: Option<NatsOptions>,
}

impl Config {
    /// Defaults for everything but the address and data dir.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            hmac_salt: None,
            dev_owner: None,
            tls: None,
            allowed_origins: Vec::new(),
            max_connections: 10_000,
            timeouts: Timeouts::default(),
            web_root: None,
            ice: IceSettings::default(),
            nats: None,
        }
    }
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    allowed_origins: Arc<[String]>,
    timeouts: Timeouts,
    /// Development mode: `/ws` answers only requests addressed to a loopback
    /// host name (see [`loopback_host`]).
    loopback_hosts_only: bool,
}

/// A bound, ready server. Call [`Server::run`] to serve.
pub struct Server {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    hub: Arc<Hub>,
    allowed_origins: Arc<[String]>,
    max_connections: usize,
    timeouts: Timeouts,
    web_root: Option<PathBuf>,
    loopback_hosts_only: bool,
}

impl Server {
    /// Opens the data dir and binds the listener.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        if config.dev_owner.is_some() && !config.listen.ip().is_loopback() {
            bail!(
                "development mode serves only loopback addresses; {} is not one",
                config.listen
            );
        }
        config.ice.validate()?;
        if let Some(root) = &config.web_root {
            check_web_root(root).await?;
        }
        let loopback_hosts_only = config.dev_owner.is_some();
        let hub = match &config.nats {
            Some(nats) => {
                let joined = Cluster::connect(nats, config.hmac_salt.as_deref()).await?;
                let store = Store::shared(joined.devices);
                Hub::new(
                    store,
                    joined.salt,
                    joined.tokens,
                    config.dev_owner,
                    config.ice,
                )
                .with_cluster(joined.cluster)
            }
            None => {
                ensure_writable_dir(&config.data_dir, "data dir")?;
                let salt = load_salt(&config.data_dir, config.hmac_salt.as_deref())?;
                let tokens = load_token_key(&config.data_dir)?;
                let store = Store::open(&config.data_dir)?;
                Hub::new(store, salt, tokens, config.dev_owner, config.ice)
            }
        };
        let tls = config.tls.as_ref().map(tls_acceptor).transpose()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let hub = Arc::new(hub);
        hub.join();
        Ok(Self {
            listener,
            tls,
            hub,
            allowed_origins: config.allowed_origins.into(),
            max_connections: config.max_connections,
            timeouts: config.timeouts,
            web_root: config.web_root,
            loopback_hosts_only,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The hub (tests and the all-in-one command mint tokens with it).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Serves until `shutdown` fires, then closes every connection and waits
    /// for their tasks.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let state = AppState {
            hub: self.hub.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            allowed_origins: self.allowed_origins.clone(),
            timeouts: self.timeouts,
            loopback_hosts_only: self.loopback_hosts_only,
        };
        let app = router(state, self.web_root.clone());
        let slots = Arc::new(Semaphore::new(self.max_connections));
        tracing::info!(addr = %self.local_addr(), tls = self.tls.is_some(), "signaling server listening");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit?,
            };
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            tracker.spawn(serve_tcp(
                tcp,
                peer,
                self.tls.clone(),
                app.clone(),
                shutdown.clone(),
                permit,
            ));
        }
        drop(self.listener);
        tracker.close();
        tracker.wait().await;
        if let Some(cluster) = self.hub.cluster() {
            cluster.leave().await;
        }
        Ok(())
    }
}

fn router(state: AppState, web_root: Option<PathBuf>) -> Router {
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/health", get(health))
        .fallback_service(web::service(web_root))
        .with_state(state)
}

async fn check_web_root(root: &Path) -> anyhow::Result<()> {
    let meta = tokio::fs::metadata(root)
        .await
        .with_context(|| format!("cannot use web root {}", root.display()))?;
    if !meta.is_dir() {
        bail!("web root {} is not a directory", root.display());
    }
    let index = tokio::fs::metadata(root.join("index.html")).await;
    if !index.is_ok_and(|meta| meta.is_file()) {
        tracing::warn!(root = %root.display(), "web root has no index.html");
    }
    Ok(())
}

async fn serve_tcp(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => serve_http(tcp, peer, app, shutdown).await,
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => serve_http(stream, peer, app, shutdown).await,
                Ok(Err(err)) => tracing::debug!(%peer, %err, "tls handshake failed"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        }
    }
}

async fn serve_http<I>(io: I, peer: SocketAddr, app: Router, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(
        move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req
        },
    );
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    tokio::select! {
        result = connection => if let Err(err) = result {
            tracing::debug!(%peer, %err, "http connection ended with an error");
        },
        _ = shutdown.cancelled() => {}
    }
}

/// Each WebSocket's read buffer (see `cocoon-bench`: memory per idle worker).
const READ_BUFFER: usize = 16 * 1024;

async fn ws_upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin WebSocket refused\n").into_response();
    }
    if state.loopback_hosts_only && !loopback_host(&headers) {
        return (
            StatusCode::FORBIDDEN,
            "development mode answers only loopback host names\n",
        )
            .into_response();
    }
    upgrade
        .max_message_size(HARD_FRAME_LIMIT)
        .max_frame_size(HARD_FRAME_LIMIT)
        // The default 128 KiB read buffer is allocated per connection: most
        // of an idle worker's cost. Larger frames are read in several calls.
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| {
            state.tracker.track_future(conn::serve_logged(
                state.hub,
                socket,
                state.timeouts,
                state.shutdown,
                peer,
            ))
        })
}

/// Browsers always send `Origin` on WebSocket upgrades; other clients do not.
/// A browser page may connect only from the server's own origin or one the
/// operator allowed, so a foreign site cannot ride a user's session.
fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    host.is_some() && origin_host == host
}

/// Whether `Host` names a loopback address (`127.0.0.1`, `[::1]`, …) or
/// `localhost`. A DNS-rebinding page reaches a loopback server under a name
/// of its own, with `Origin` and `Host` agreeing on that name, so the origin
/// check alone lets it in; in development mode, where a local registration
/// is claimed without a token, the host name must be loopback too.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((name, rest)) if rest.is_empty() || rest.starts_with(':') => name,
            _ => return false,
        },
        None => host.split_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    devices_online: usize,
    clients: usize,
    relayed_bytes: u64,
    relayed_messages: u64,
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    let (devices_online, clients) = state.hub.counts();
    let (relayed_bytes, relayed_messages) = state.hub.relayed();
    Json(Health {
        status: "ok",
        devices_online,
        clients,
        relayed_bytes,
        relayed_messages,
    })
}

fn tls_acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("cannot read private key from {}", files.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("certificate and key do not form a usable pair")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    #[test]
    fn origins() {
        let allowed = ["https://console.example".to_string()];
        assert!(origin_allowed(&headers(None, "h:1"), &allowed));
        assert!(origin_allowed(
            &headers(Some("http://h:1"), "h:1"),
            &allowed
        ));
        assert!(origin_allowed(
            &headers(Some("https://console.example"), "h:1"),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(Some("https://evil.example"), "h:1"),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(Some("http://h:1.evil"), "h:1"),
            &allowed
        ));
        assert!(!origin_allowed(&headers(Some("null"), "h:1"), &allowed));
    }

    #[test]
    fn loopback_host_names() {
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "127.1.2.3:1",
            "localhost:8080",
            "LOCALHOST",
            "app.localhost:8080",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(loopback_host(&headers(None, host)), "{host}");
        }
        for host in [
            "rebind.evil.example:8080",
            "localhost.evil.example:8080",
            "127.0.0.1.evil.example",
            "10.0.0.1:8080",
            "0.0.0.0:8080",
            "[::]:8080",
            "[::ffff:127.0.0.1]x",
            "",
        ] {
            assert!(!loopback_host(&headers(None, host)), "{host}");
        }
        assert!(!loopback_host(&HeaderMap::new()), "no Host at all");
    }
}
