//! `cocoon-signaling`: serve, or mint tokens.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cocoon_signaling::auth::TokenKind;
use cocoon_signaling::cluster::{Cluster, NatsOptions};
use cocoon_signaling::ice::IceSettings;
use cocoon_signaling::protocol::{Secret, UserId};
use cocoon_signaling::{Config, Server, TlsFiles, default_data_dir, parse_duration, store};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cocoon-signaling",
    version,
    about = "The cocoon signaling server"
)]
struct Cli {
    /// Where the salt, token key and device database are kept.
    #[arg(long, env = "SIGNALING_DATA_DIR", global = true, default_value_os_t = default_data_dir("signaling"))]
    data_dir: PathBuf,
    /// Run as one instance of a fleet: share devices, claims, presence and
    /// the secrets through this NATS cluster (JetStream enabled) instead of
    /// the data dir. `nats://host:port`, several separated by commas.
    #[arg(long, env = "SIGNALING_NATS_URL", global = true, value_name = "URL")]
    nats_url: Option<String>,
    /// Replicas of each NATS key-value bucket (at most the cluster's size).
    #[arg(
        long,
        env = "SIGNALING_NATS_REPLICAS",
        global = true,
        default_value_t = 1
    )]
    nats_replicas: usize,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Mint a token signed with this server's key (same --data-dir).
    Token {
        /// `access` for clients, `setup` to claim workers, `hive` for a hive
        /// that spawns workers for the owner.
        kind: Kind,
        /// The owner the token speaks for.
        #[arg(long)]
        owner: String,
        /// How long it is valid: 90s, 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Access,
    Setup,
    Hive,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, env = "SIGNALING_HOST", default_value = "0.0.0.0")]
    host: IpAddr,
    /// Salt for device ids; generated and saved in the data dir when unset.
    #[arg(long, env = "HMAC_SALT", hide_env_values = true)]
    hmac_salt: Option<String>,
    /// TLS certificate chain (PEM); serves wss:// with --tls-key.
    #[arg(long, env = "SIGNALING_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "SIGNALING_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Browser origins allowed to open /ws besides the server's own.
    #[arg(
        long = "allowed-origin",
        env = "SIGNALING_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Serve the browser client's built files from this directory at /.
    #[arg(long, env = "SIGNALING_WEB_ROOT", value_name = "DIR")]
    web_root: Option<PathBuf>,
    /// Development mode: loopback only; unclaimed devices belong to this owner.
    #[arg(long, value_name = "OWNER")]
    dev: Option<String>,
    /// STUN/TURN URLs handed to workers and clients (`get_ice_servers`);
    /// TURN ones get ephemeral credentials made with the TURN secret, which
    /// is read from the file named here or from `TURN_SECRET` (never a flag:
    /// process lists show flags).
    #[arg(long = "ice-url", env = "SIGNALING_ICE_URLS", value_delimiter = ',')]
    ice_urls: Vec<String>,
    /// A file holding coturn's `static-auth-secret` (else `TURN_SECRET`).
    #[arg(long, value_name = "PATH")]
    turn_secret_file: Option<PathBuf>,
    /// How long issued TURN credentials are valid: 90s, 30m, 12h.
    #[arg(long, env = "TURN_CREDENTIAL_TTL", default_value = "12h", value_parser = parse_duration)]
    turn_ttl: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cocoon_signaling::logs::init("info");
    let cli = Cli::parse();
    let nats = cli.nats_url.map(|url| NatsOptions {
        url,
        replicas: cli.nats_replicas,
    });
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.data_dir, nats, cli.serve).await,
        Command::Token { kind, owner, ttl } => {
            let key = match &nats {
                Some(nats) => Cluster::connect(nats, None).await?.tokens,
                None => {
                    cocoon_signaling::files::ensure_writable_dir(&cli.data_dir, "data dir")?;
                    store::load_token_key(&cli.data_dir)?
                }
            };
            let kind = match kind {
                Kind::Access => TokenKind::Access,
                Kind::Setup => TokenKind::Setup,
                Kind::Hive => TokenKind::Hive,
            };
            println!("{}", key.mint(kind, &UserId::new(owner), ttl));
            Ok(())
        }
    }
}

async fn serve(
    data_dir: PathBuf,
    nats: Option<NatsOptions>,
    args: ServeArgs,
) -> anyhow::Result<()> {
    let mut config = Config::new(SocketAddr::new(args.host, args.port), data_dir);
    config.nats = nats;
    config.hmac_salt = args.hmac_salt;
    config.allowed_origins = args.allowed_origins;
    config.dev_owner = args.dev.map(UserId::new);
    config.web_root = args.web_root;
    config.ice = IceSettings {
        urls: args.ice_urls,
        turn_secret: turn_secret(args.turn_secret_file.as_deref())?,
        ttl: args.turn_ttl,
    };
    config.tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| TlsFiles { cert, key });
    let server = Server::bind(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    server.run(shutdown).await.context("server failed")
}

/// The TURN secret from its file, else from `TURN_SECRET`.
fn turn_secret(file: Option<&std::path::Path>) -> anyhow::Result<Option<Secret>> {
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the TURN secret from {}", file.display()))?;
        let secret = text.trim();
        anyhow::ensure!(!secret.is_empty(), "{} is empty", file.display());
        return Ok(Some(Secret::new(secret)));
    }
    Ok(std::env::var("TURN_SECRET")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Secret::new(s.trim())))
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
