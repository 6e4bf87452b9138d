//! Worker settings: flags > environment > defaults, gathered into one struct.

use std::path::PathBuf;

use cocoon_signaling::protocol::Secret;

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
    /// Secret for a persistent device id (else <data-dir>/.secret). Prefer the
    /// environment variable: flags show in process lists.
    #[arg(long, env = "COCOON_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub secret: Option<Secret>,
    /// Setup token that claims this worker for its owner.
    #[arg(long = "token", env = "COCOON_SETUP_TOKEN", hide_env_values = true, value_parser = parse_secret)]
    pub setup_token: Option<Secret>,
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
    /// STUN/TURN server URLs, comma-separated.
    #[arg(long, env = "WEBRTC_ICE_SERVERS", default_value = DEFAULT_ICE_SERVERS)]
    pub ice_servers: String,
    /// Username for the TURN servers.
    #[arg(long, env = "WEBRTC_TURN_USERNAME")]
    pub turn_username: Option<String>,
    /// Credential for the TURN servers.
    #[arg(long, env = "WEBRTC_TURN_CREDENTIAL", hide_env_values = true, value_parser = parse_secret)]
    pub turn_credential: Option<Secret>,
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
}
