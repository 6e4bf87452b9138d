//! `cocoon up`: a signaling server on loopback and a worker, in one process,
//! for trying cocoon on this machine.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
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
    /// The browser client's built files, served at /. Default: the first of
    /// `<exe>/../../examples/web/dist` and `./examples/web/dist` that holds an
    /// index.html.
    #[arg(long, env = "COCOON_WEB_ROOT", value_name = "DIR")]
    pub web_root: Option<PathBuf>,
    /// WebRTC settings.
    #[command(flatten)]
    pub rtc: RtcArgs,
}

/// How to build the browser client from a checkout.
const BUILD_WEB_CLIENT: &str =
    "npm --prefix examples/web ci && npm --prefix examples/web run build";

/// Runs both halves until `shutdown`.
pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let mut config = Config::new(listen, args.data_dir.join("signaling"));
    config.dev_owner = Some(UserId::new(LOCAL_OWNER));
    config.web_root = args.web_root.or_else(default_web_root);
    let web_client = config.web_root.is_some();
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let token = server.hub().tokens().mint(
        TokenKind::Access,
        &UserId::new(LOCAL_OWNER),
        Duration::from_secs(30 * 86_400),
    );
    let hub = server.hub().clone();
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
        exec: args.limits.exec_policy(&worker_dir),
        pty: args.limits.pty_config(&worker_dir),
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
    if !web_client {
        println!("   No browser client built; to serve one, run: {BUILD_WEB_CLIENT}");
    }
    // The link comes last, once the worker is online, so it is what a
    // newcomer sees. The token rides in the fragment, which browsers never send.
    let browser_line = web_client.then(|| {
        let hub = hub.clone();
        let link = format!("👉 Open the browser terminal: http://{addr}/#token={token}");
        tokio::spawn(async move {
            while hub.counts().0 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!("{link}");
        })
    });
    let worker_result = worker::run(worker_config, shutdown.clone()).await;
    if let Some(task) = browser_line {
        task.abort();
    }
    shutdown.cancel();
    server_task.await??;
    worker_result
}

/// The built client next to a cargo build (`target/<profile>/cocoon`) or
/// under the current directory, whichever comes first with an index.html.
fn default_web_root() -> Option<PathBuf> {
    let next_to_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("../../examples/web/dist")));
    next_to_exe
        .into_iter()
        .chain([PathBuf::from("examples/web/dist")])
        .find(|dir| has_index(dir))
}

fn has_index(dir: &Path) -> bool {
    dir.join("index.html").is_file()
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
