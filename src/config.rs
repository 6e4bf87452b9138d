//! Worker settings: flags > environment > defaults, gathered into one struct.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use cocoon_signaling::parse_duration;
use cocoon_signaling::protocol::Secret;

use crate::link::rtc::{RtcConfig, parse_ice_servers, parse_network};
use crate::services::exec::ExecPolicy;
use crate::services::process::{EnvPolicy, Limits, Sandbox};
use crate::services::pty::PtyConfig;
use crate::services::query::QueryConfig;

/// The spec's default: Google's public STUN server. Unreachable on closed
/// networks; nothing waits on it.
pub const DEFAULT_ICE_SERVERS: &str = "stun:stun.l.google.com:19302";

/// `cocoon run` options. Every flag has the environment variable of the spec.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Signaling server WebSocket URL.
    #[arg(
        long,
        env = "SIGNALING_SERVER_URL",
        default_value = "ws://localhost:8080/ws"
    )]
    pub url: String,
    /// Secret for a persistent device id (else DATA_DIR/.secret). Prefer the
    /// environment variable: flags show in process lists.
    #[arg(long, env = "COCOON_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub secret: Option<Secret>,
    /// A file holding the secret (what `cocoon service` installs), used when
    /// COCOON_SECRET is unset.
    #[arg(long, env = "COCOON_SECRET_FILE", conflicts_with = "secret")]
    pub secret_file: Option<PathBuf>,
    /// Setup token that claims this worker for its owner.
    #[arg(long = "token", env = "COCOON_SETUP_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub setup_token: Option<Secret>,
    /// A file holding the setup token (what `cocoon start` puts in the
    /// container's volume), used when COCOON_SETUP_TOKEN is unset.
    #[arg(long, env = "COCOON_SETUP_TOKEN_FILE", conflicts_with = "setup_token")]
    pub setup_token_file: Option<PathBuf>,
    /// Name shown in device lists.
    #[arg(long, env = "COCOON_NAME")]
    pub name: Option<String>,
    /// Local HTTP services reachable through the proxy: "name:port,…".
    #[arg(long, env = "COCOON_SERVICES", value_parser = parse_services, default_value = "")]
    pub services: Services,
    /// Where the secret, device id and task store are kept.
    #[arg(long, env = "COCOON_DATA_DIR", default_value = "/cocoon")]
    pub data_dir: PathBuf,
    /// Extra CA certificates (PEM) to trust for wss:// URLs.
    #[arg(long, env = "COCOON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// WebRTC settings.
    #[command(flatten)]
    pub rtc: RtcArgs,
    /// Limits on what clients may run.
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// WebRTC settings, for workers and clients alike.
#[derive(clap::Args, Debug, Clone)]
pub struct RtcArgs {
    /// STUN/TURN server URLs, comma-separated, or a JSON array of
    /// {"urls", "username", "credential"}.
    #[arg(long, env = "WEBRTC_ICE_SERVERS", default_value = DEFAULT_ICE_SERVERS)]
    pub ice_servers: String,
    /// Username for the TURN servers of a comma-separated list.
    #[arg(long, env = "WEBRTC_TURN_USERNAME")]
    pub turn_username: Option<String>,
    /// Credential for the TURN servers of a comma-separated list.
    #[arg(long, env = "WEBRTC_TURN_CREDENTIAL", hide_env_values = true, value_parser = parse_secret)]
    pub turn_credential: Option<Secret>,
    /// How long to wait for a peer-to-peer path before settling on the relay.
    #[arg(long, env = "WEBRTC_ICE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub ice_timeout: Duration,
    /// Turn WebRTC off: everything goes through the signaling relay.
    #[arg(long, env = "COCOON_NO_WEBRTC", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_webrtc: bool,
    /// Offer loopback candidates (one-machine setups, tests).
    #[arg(long, env = "COCOON_WEBRTC_LOOPBACK", value_parser = clap::builder::BoolishValueParser::new())]
    pub webrtc_loopback: bool,
    /// Gather candidates only on these addresses or networks (CIDR, comma-separated).
    #[arg(long, env = "COCOON_WEBRTC_NETWORKS", value_delimiter = ',')]
    pub webrtc_networks: Vec<String>,
    /// Local UDP ports for WebRTC, "MIN-MAX" (open them in your firewall).
    #[arg(long, env = "COCOON_WEBRTC_PORTS")]
    pub webrtc_ports: Option<String>,
    /// Public IPs of a 1:1 NAT (a container's host, a cloud VM) to announce.
    #[arg(long, env = "COCOON_WEBRTC_NAT_IPS", value_delimiter = ',')]
    pub webrtc_nat_ips: Vec<String>,
    /// Use only TURN relay candidates.
    #[arg(long, env = "COCOON_WEBRTC_RELAY_ONLY", value_parser = clap::builder::BoolishValueParser::new())]
    pub webrtc_relay_only: bool,
    /// Strict: no terminal or service traffic through the signaling relay
    /// until a data channel opens or the ICE timeout passes.
    #[arg(long, env = "COCOON_STRICT_P2P", value_parser = clap::builder::BoolishValueParser::new())]
    pub strict_p2p: bool,
}

impl RtcArgs {
    /// The WebRTC configuration, or `None` when WebRTC is off.
    pub fn config(&self) -> anyhow::Result<Option<RtcConfig>> {
        if self.no_webrtc {
            return Ok(None);
        }
        let ice_servers = parse_ice_servers(
            &self.ice_servers,
            self.turn_username.as_deref(),
            self.turn_credential.as_ref().map(Secret::expose),
        )
        .map_err(anyhow::Error::msg)?;
        let allowed_networks = self
            .webrtc_networks
            .iter()
            .map(|n| parse_network(n))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        let port_range = self
            .webrtc_ports
            .as_deref()
            .map(|range| {
                let (min, max) = range.split_once('-').unwrap_or((range, range));
                match (min.trim().parse::<u16>(), max.trim().parse::<u16>()) {
                    (Ok(min), Ok(max)) if min > 0 && min <= max => Ok((min, max)),
                    _ => Err(anyhow::anyhow!(
                        "invalid WebRTC port range {range:?}: use MIN-MAX"
                    )),
                }
            })
            .transpose()?;
        Ok(Some(RtcConfig {
            ice_servers,
            include_loopback: self.webrtc_loopback,
            allowed_networks,
            port_range,
            nat_1to1_ips: self.webrtc_nat_ips.clone(),
            relay_only: self.webrtc_relay_only,
            strict: self.strict_p2p,
            ice_timeout: self.ice_timeout,
            issued: Default::default(),
        }))
    }
}

/// Limits on what clients may run.
#[derive(clap::Args, Debug, Clone)]
pub struct LimitArgs {
    /// Default `execute` timeout (90s, 30m, …); requests may ask for less or more.
    #[arg(long, env = "COCOON_EXEC_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub exec_timeout: Duration,
    /// Longest `execute` timeout a request may ask for.
    #[arg(long, env = "COCOON_EXEC_MAX_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub exec_max_timeout: Duration,
    /// Address-space limit of each command and session, MiB (0: none).
    #[arg(long, env = "COCOON_LIMIT_MEMORY_MB", default_value_t = 4096)]
    pub limit_memory_mb: u64,
    /// CPU-time limit of each command and session, seconds (0: none).
    #[arg(long, env = "COCOON_LIMIT_CPU_SECS", default_value_t = 0)]
    pub limit_cpu_secs: u64,
    /// Open-file limit of each command and session (0: none).
    #[arg(long, env = "COCOON_LIMIT_NOFILE", default_value_t = 4096)]
    pub limit_nofile: u64,
    /// Process limit of the user running commands (0: none; root is exempt).
    #[arg(long, env = "COCOON_LIMIT_NPROC", default_value_t = 0)]
    pub limit_nproc: u64,
    /// Environment variables clients may set although they can hijack a
    /// program (LD_PRELOAD, …), comma-separated.
    #[arg(long, env = "COCOON_ALLOW_ENV", value_delimiter = ',')]
    pub allow_env: Vec<String>,
    /// Time allowed to a proxied HTTP request (then 504).
    #[arg(long, env = "COCOON_PROXY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub proxy_timeout: Duration,
    /// Directory of text files searched by SearchKnowledgebase queries
    /// (default: DATA_DIR/knowledge).
    #[arg(long, env = "COCOON_KNOWLEDGE_DIR")]
    pub knowledge_dir: Option<PathBuf>,
    /// Custom query handlers as a JSON object {"name": "shell command"}; the
    /// command reads the params as JSON on stdin and prints JSON.
    #[arg(long, env = "COCOON_QUERY_HANDLERS", value_parser = parse_handlers, default_value = "{}")]
    pub query_handlers: Handlers,
    /// Most PTY sessions at once.
    #[arg(long, env = "COCOON_MAX_SESSIONS", default_value_t = 256)]
    pub max_sessions: usize,
    /// How long a PTY session lives with nobody attached.
    #[arg(long, env = "COCOON_DETACH_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub detach_timeout: Duration,
    /// Isolate every command and terminal: `bwrap` runs them in a
    /// bubblewrap sandbox (a read-only machine, a private /tmp, the data
    /// dir hidden, no capabilities); `none` does not.
    #[arg(long, env = "COCOON_SANDBOX", default_value = "none", value_parser = ["none", "bwrap"])]
    pub sandbox: String,
    /// Paths sandboxed programs may write to, comma-separated.
    #[arg(long, env = "COCOON_SANDBOX_WRITABLE", value_delimiter = ',')]
    pub sandbox_writable: Vec<PathBuf>,
    /// Sandboxed programs get no network.
    #[arg(long, env = "COCOON_SANDBOX_NO_NETWORK", value_parser = clap::builder::BoolishValueParser::new())]
    pub sandbox_no_network: bool,
}

impl LimitArgs {
    /// The resource limits these flags describe.
    pub fn limits(&self) -> Limits {
        let nonzero = |v: u64| (v > 0).then_some(v);
        Limits {
            memory_bytes: nonzero(self.limit_memory_mb).map(|mb| mb << 20),
            cpu_secs: nonzero(self.limit_cpu_secs),
            open_files: nonzero(self.limit_nofile),
            processes: nonzero(self.limit_nproc),
            ..Limits::defaults()
        }
    }

    /// The sandbox these flags describe; it hides the worker's `data_dir`.
    pub fn sandbox(&self, data_dir: &std::path::Path) -> Option<Sandbox> {
        // bwrap's paths are absolute.
        let absolute = |path: &std::path::Path| std::path::absolute(path).unwrap_or(path.into());
        (self.sandbox == "bwrap").then(|| Sandbox {
            writable: self.sandbox_writable.iter().map(|p| absolute(p)).collect(),
            hidden: vec![absolute(data_dir)],
            network: !self.sandbox_no_network,
        })
    }

    /// The `execute` policy of a worker whose data dir is `data_dir`.
    pub fn exec_policy(&self, data_dir: &std::path::Path) -> ExecPolicy {
        ExecPolicy {
            default_timeout: self.exec_timeout,
            max_timeout: self.exec_max_timeout,
            limits: self.limits(),
            sandbox: self.sandbox(data_dir),
            ..ExecPolicy::default()
        }
    }

    /// The PTY settings of a worker whose data dir is `data_dir`.
    pub fn pty_config(&self, data_dir: &std::path::Path) -> PtyConfig {
        PtyConfig {
            max_sessions: self.max_sessions,
            detach_timeout: self.detach_timeout,
            limits: self.limits(),
            sandbox: self.sandbox(data_dir),
            ..PtyConfig::default()
        }
    }

    /// The query settings; the knowledge base defaults to a folder of the
    /// data dir.
    pub fn query_config(&self, data_dir: &std::path::Path) -> QueryConfig {
        QueryConfig {
            knowledge_dir: Some(
                self.knowledge_dir
                    .clone()
                    .unwrap_or_else(|| data_dir.join("knowledge")),
            ),
            handlers: self.query_handlers.0.clone(),
        }
    }

    /// The environment policy.
    pub fn env_policy(&self) -> EnvPolicy {
        EnvPolicy {
            allow: self.allow_env.clone(),
        }
    }
}

/// Custom query handlers: name to command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handlers(pub BTreeMap<String, String>);

fn parse_handlers(text: &str) -> Result<Handlers, String> {
    serde_json::from_str(text)
        .map(Handlers)
        .map_err(|err| format!("expected a JSON object of query names to commands: {err}"))
}

fn parse_secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// Named local services, from `"name:port,name:port"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services(pub Vec<(String, u16)>);

/// Parses `COCOON_SERVICES`; an error names the bad entry.
pub fn parse_services(text: &str) -> Result<Services, String> {
    let mut services: Vec<(String, u16)> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, port) = entry
            .rsplit_once(':')
            .ok_or_else(|| format!("service {entry:?} is not name:port"))?;
        let name = name.trim();
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(format!(
                "service {entry:?}: names use letters, digits, '-', '_' and '.'"
            ));
        }
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("service {entry:?}: port must be 1-65535"))?;
        if services.iter().any(|(n, _)| n == name) {
            return Err(format!("service {name:?} is listed twice"));
        }
        services.push((name.to_owned(), port));
    }
    Ok(Services(services))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse() {
        assert_eq!(
            parse_services("flowmap-api:8092, postgres:5432,redis:6379"),
            Ok(Services(vec![
                ("flowmap-api".into(), 8092),
                ("postgres".into(), 5432),
                ("redis".into(), 6379)
            ]))
        );
        assert_eq!(parse_services(""), Ok(Services::default()));
        for bad in [
            "api",
            "api:http",
            "api:0",
            "api:70000",
            ":80",
            "a b:80",
            "x:1,x:2",
        ] {
            let err = parse_services(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }

    /// The proxy's target is always 127.0.0.1: a service is a port, and no
    /// spelling of a host gets into the list.
    #[test]
    fn services_never_name_a_host() {
        for host in [
            "meta:169.254.169.254:80",
            "meta:169.254.169.254",
            "meta:[::]:80",
            "meta:[::ffff:a9fe:a9fe]:80",
            "meta:0.0.0.0:80",
            "meta:localhost:80",
            "meta:2852039166",
            "meta:0xa9fe",
            "meta:http://169.254.169.254/",
        ] {
            assert!(parse_services(host).is_err(), "{host}");
        }
        // Something that looks like an address is just a name: the service
        // "169.254.169.254" on 127.0.0.1:80.
        assert_eq!(
            parse_services("169.254.169.254:80"),
            Ok(Services(vec![("169.254.169.254".into(), 80)]))
        );
    }
}
