//! `cocoon up`: a signaling server on loopback and a worker, in one process,
//! for trying cocoon on this machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::protocol::UserId;
use cocoon_signaling::{Config, Server};
use tokio_util::sync::CancellationToken;

use crate::config::{LimitArgs, RtcArgs, Services};
use crate::worker::{self, WorkerConfig};

/// The owner that development mode gives every local worker to.
pub const LOCAL_OWNER: &str = "local";

/// `cocoon up` options.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Where the server's and the worker's state is kept.
    #[arg(long, env = "COCOON_DATA_DIR", default_value_os_t = cocoon_signaling::default_data_dir("local"))]
    pub data_dir: PathBuf,
    /// Local HTTP services reachable through the proxy: "name:port,…".
    #[arg(long, env = "COCOON_SERVICES", value_parser = crate::config::parse_services, default_value = "")]
    pub services: Services,
    /// Limits on what clients may run.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// WebRTC settings.
    #[command(flatten)]
    pub rtc: RtcArgs,
}

/// Runs both halves until `shutdown`.
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let mut config = Config::new(listen, args.data_dir.join("signaling"));
    config.dev_owner = Some(UserId::new(LOCAL_OWNER));
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let token = server.hub().tokens().mint(
        TokenKind::Access,
        &UserId::new(LOCAL_OWNER),
        Duration::from_secs(30 * 86_400),
    );
    let server_task = tokio::spawn(server.run(shutdown.clone()));
    let url = format!("ws://{addr}/ws");
    let worker_dir = args.data_dir.join("worker");
    let worker_config = WorkerConfig {
        url: url.clone(),
        secret: None,
        setup_token: None,
        name: Some(hostname()),
        services: args.services,
        data_dir: worker_dir.clone(),
        ca_file: None,
        exec: args.limits.exec_policy(),
        pty: args.limits.pty_config(),
        env: args.limits.env_policy(),
        proxy_timeout: args.limits.proxy_timeout,
        queries: args.limits.query_config(&worker_dir),
        rtc: args.rtc.config()?,
    };
    println!("🚀 Signaling server (development mode, loopback only): http://{addr}");
    println!("   Client access token (owner \"{LOCAL_OWNER}\", 30 days):");
    println!("   {token}");
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "cocoon".into());
    println!("   List your devices: {exe} devices --url {url} --access-token <token>");
    let worker_result = worker::run(worker_config, shutdown.clone()).await;
    shutdown.cancel();
    server_task.await??;
    worker_result
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
