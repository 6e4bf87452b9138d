//! ICE configuration: STUN/TURN servers in the spec's comma form or as
//! JSON, and the network knobs real deployments need.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

use serde::Deserialize;

/// A STUN or TURN server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, …
    #[serde(deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(default)]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default)]
    pub credential: Option<String>,
}

impl From<cocoon_signaling::protocol::IceServer> for IceServer {
    fn from(server: cocoon_signaling::protocol::IceServer) -> Self {
        Self {
            urls: server.urls,
            username: server.username,
            credential: server.credential,
        }
    }
}

/// The ICE servers a signaling server issued (TURN with ephemeral
/// credentials), replaced whenever they are refreshed and shared by every
/// connection made from the same [`RtcConfig`].
#[derive(Debug, Clone, Default)]
pub struct IssuedIce(Arc<Issued>);

#[derive(Debug, Default)]
struct Issued {
    servers: RwLock<Vec<IceServer>>,
    /// Set by the first issue (or a wait for it in vain).
    known: AtomicBool,
    arrived: Notify,
}

impl IssuedIce {
    /// Replaces the issued servers.
    pub fn set(&self, servers: Vec<IceServer>) {
        *self.0.servers.write().unwrap() = servers;
        self.0.known.store(true, Ordering::Release);
        self.0.arrived.notify_waiters();
    }

    /// The issued servers now.
    pub fn get(&self) -> Vec<IceServer> {
        self.0.servers.read().unwrap().clone()
    }

    /// Waits, at most `within`, for the first issue: a connection made just
    /// before it would gather no STUN or TURN candidate at all (a worker
    /// that a client reaches the moment it registers). A wait in vain (a
    /// server that issues nothing) is not repeated.
    pub async fn first(&self, within: Duration) {
        let arrived = self.0.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if !self.0.known.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(within, arrived).await;
            self.0.known.store(true, Ordering::Release);
        }
    }
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

/// Parses `WEBRTC_ICE_SERVERS`: comma-separated URLs (the spec's form, with
/// `WEBRTC_TURN_USERNAME`/`WEBRTC_TURN_CREDENTIAL` applied to `turn:` URLs),
/// or a JSON array of `{urls, username, credential}`.
pub fn parse_ice_servers(
    text: &str,
    username: Option<&str>,
    credential: Option<&str>,
) -> Result<Vec<IceServer>, String> {
    let text = text.trim();
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(|err| format!("invalid ICE server JSON: {err}"));
    }
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            let scheme = url.split(':').next().unwrap_or("");
            if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
                return Err(format!(
                    "ICE server {url:?} must start with stun:, stuns:, turn: or turns:"
                ));
            }
            let turn = scheme.starts_with("turn");
            Ok(IceServer {
                urls: vec![url.to_owned()],
                username: username.filter(|_| turn).map(str::to_owned),
                credential: credential.filter(|_| turn).map(str::to_owned),
            })
        })
        .collect()
}

/// How a side sets up WebRTC.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// STUN and TURN servers of the local configuration.
    pub ice_servers: Vec<IceServer>,
    /// STUN and TURN servers issued by the signaling server.
    pub issued: IssuedIce,
    /// Gather loopback candidates (single-host setups and tests).
    pub include_loopback: bool,
    /// Gather candidates only on these addresses or networks (empty: all).
    pub allowed_networks: Vec<(IpAddr, u8)>,
    /// Local UDP port range.
    pub port_range: Option<(u16, u16)>,
    /// Public addresses of a 1:1 NAT to announce as host candidates.
    pub nat_1to1_ips: Vec<String>,
    /// Use only TURN relay candidates.
    pub relay_only: bool,
    /// Give up on a direct path after this long and stay on the relay.
    pub ice_timeout: Duration,
    /// Strict: no service traffic on the relay until the data channel is
    /// open or the ICE timeout has passed (the spec's literal behaviour);
    /// only WebRTC signaling uses the relay before that.
    pub strict: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            issued: IssuedIce::default(),
            include_loopback: false,
            allowed_networks: Vec::new(),
            port_range: None,
            nat_1to1_ips: Vec::new(),
            relay_only: false,
            ice_timeout: Duration::from_secs(30),
            strict: false,
        }
    }
}

impl RtcConfig {
    /// Every server a new connection uses: the configured ones, then the
    /// issued ones.
    pub fn all_ice_servers(&self) -> Vec<IceServer> {
        let mut all = self.ice_servers.clone();
        all.extend(self.issued.get());
        all
    }
}

/// Parses `ADDRESS[/PREFIX]`.
pub fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (ip, prefix) = text.split_once('/').unwrap_or((text, ""));
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("invalid address {text:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid prefix in {text:?}"))?
    };
    Ok((ip, prefix))
}

/// Whether `ip` lies in the network `(address, prefix length)`; the two
/// address families never match each other.
pub fn in_network(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_in_both_forms() {
        let servers = parse_ice_servers(
            "stun:stun.l.google.com:19302, turn:turn.example.com:3478",
            Some("u"),
            Some("p"),
        )
        .unwrap();
        assert_eq!(servers[0].username, None, "credentials go to TURN only");
        assert_eq!(servers[1].username.as_deref(), Some("u"));
        let json = r#"[{"urls": "stun:a:3478"}, {"urls": ["turn:b:3478?transport=udp"], "username": "x", "credential": "y"}]"#;
        let servers = parse_ice_servers(json, None, None).unwrap();
        assert_eq!(servers[1].urls, vec!["turn:b:3478?transport=udp"]);
        assert_eq!(servers[1].credential.as_deref(), Some("y"));
        assert!(parse_ice_servers("http://x", None, None).is_err());
        assert!(parse_ice_servers("[{\"urls\": 5}]", None, None).is_err());
        assert!(parse_ice_servers("", None, None).unwrap().is_empty());
    }

    #[test]
    fn networks() {
        let lo = parse_network("127.0.0.0/8").unwrap();
        assert!(in_network("127.0.0.1".parse().unwrap(), lo));
        assert!(!in_network("10.0.0.1".parse().unwrap(), lo));
        let one = parse_network("10.1.2.3").unwrap();
        assert!(in_network("10.1.2.3".parse().unwrap(), one));
        assert!(!in_network("10.1.2.4".parse().unwrap(), one));
        assert!(in_network(
            "::1".parse().unwrap(),
            parse_network("::1/128").unwrap()
        ));
        let any = parse_network("0.0.0.0/0").unwrap();
        assert!(in_network("10.9.9.9".parse().unwrap(), any));
        assert!(
            !in_network("::1".parse().unwrap(), any),
            "families never mix"
        );
        assert!(parse_network("10.0.0.0/33").is_err());
        assert!(parse_network("nope").is_err());
    }

    #[tokio::test]
    async fn a_connection_waits_for_the_first_issue_only() {
        let issued = IssuedIce::default();
        let later = issued.clone();
        let server = IceServer {
            urls: vec!["stun:10.0.0.1:3478".into()],
            username: None,
            credential: None,
        };
        let arriving = server.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            later.set(vec![arriving]);
        });
        issued.first(Duration::from_secs(60)).await;
        assert_eq!(issued.get(), vec![server], "waited for the issue");
        // Known now: no more waiting.
        let start = tokio::time::Instant::now();
        issued.first(Duration::from_secs(60)).await;
        assert!(start.elapsed() < Duration::from_secs(1));

        // A server that issues nothing costs one wait, once.
        let silent = IssuedIce::default();
        let start = tokio::time::Instant::now();
        silent.first(Duration::from_millis(200)).await;
        assert!(start.elapsed() >= Duration::from_millis(200));
        let again = tokio::time::Instant::now();
        silent.first(Duration::from_secs(60)).await;
        assert!(again.elapsed() < Duration::from_secs(1));
    }
}
