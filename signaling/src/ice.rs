//! The STUN and TURN servers handed to workers and clients, with ephemeral
//! TURN credentials: the TURN REST scheme that coturn implements with
//! `use-auth-secret`. The username is `EXPIRY:ID` (Unix seconds, and who
//! asked); the credential is the base64 HMAC-SHA1 of the username keyed by
//! the secret coturn shares with this server. coturn checks both, so nobody
//! needs an account on it and a leaked credential dies on its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::protocol::{FromServer, IceServer, Secret};

/// What the server hands out.
#[derive(Debug, Clone)]
pub struct IceSettings {
    /// `stun:`/`stuns:` and `turn:`/`turns:` URLs.
    pub urls: Vec<String>,
    /// coturn's `static-auth-secret`; TURN URLs need it.
    pub turn_secret: Option<Secret>,
    /// How long issued credentials are valid.
    pub ttl: Duration,
}

impl Default for IceSettings {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            turn_secret: None,
            ttl: Duration::from_secs(12 * 3600),
        }
    }
}

impl IceSettings {
    /// Checks the URLs: known schemes, and a secret when there are TURN URLs.
    pub fn validate(&self) -> anyhow::Result<()> {
        for url in &self.urls {
            let scheme = url.split(':').next().unwrap_or("");
            anyhow::ensure!(
                matches!(scheme, "stun" | "stuns" | "turn" | "turns")
                    && url.len() > scheme.len() + 1,
                "ICE URL {url:?} must be stun:HOST[:PORT] or turn:HOST[:PORT][?transport=udp|tcp]"
            );
            anyhow::ensure!(
                !scheme.starts_with("turn") || self.turn_secret.is_some(),
                "TURN URL {url:?} needs the TURN secret (TURN_SECRET or --turn-secret-file)"
            );
        }
        anyhow::ensure!(
            self.ttl >= Duration::from_secs(10),
            "the TURN credential lifetime must be at least 10 s"
        );
        Ok(())
    }

    /// The `ice_servers` reply for `id` (a device id or an owner) at `now`.
    pub fn issue(&self, id: &str, now: SystemTime) -> FromServer {
        let (turn, stun): (Vec<String>, Vec<String>) = self
            .urls
            .iter()
            .cloned()
            .partition(|url| url.starts_with("turn"));
        let mut ice_servers = Vec::new();
        if !stun.is_empty() {
            ice_servers.push(IceServer {
                urls: stun,
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (turn.is_empty(), &self.turn_secret) {
            let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            let username = format!("{}:{id}", (since_epoch + self.ttl).as_secs());
            let credential = turn_credential(secret, &username);
            ice_servers.push(IceServer {
                urls: turn,
                username: Some(username),
                credential: Some(credential),
            });
        }
        FromServer::IceServers {
            ice_servers,
            ttl_secs: self.ttl.as_secs(),
        }
    }
}

/// base64(HMAC-SHA1(secret, username)), as coturn computes it.
pub fn turn_credential(secret: &Secret, username: &str) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.expose().as_bytes()).expect("HMAC takes any key");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_match_coturns_scheme() {
        // echo -n "1700000000:alice" | openssl dgst -binary -sha1 -hmac s3cret | base64
        assert_eq!(
            turn_credential(&Secret::new("s3cret"), "1700000000:alice"),
            OPENSSL_VECTOR
        );
    }

    const OPENSSL_VECTOR: &str = "TtElzSjT0GdnTQ9xdcRNxx96yQs=";

    #[test]
    fn issues_stun_as_is_and_turn_with_an_expiring_credential() {
        let settings = IceSettings {
            urls: vec![
                "stun:turn.example.com:3478".into(),
                "turn:turn.example.com:3478?transport=udp".into(),
            ],
            turn_secret: Some(Secret::new("s3cret")),
            ttl: Duration::from_secs(600),
        };
        settings.validate().unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let FromServer::IceServers {
            ice_servers,
            ttl_secs,
        } = settings.issue("alice", now)
        else {
            panic!("not ice_servers");
        };
        assert_eq!(ttl_secs, 600);
        assert_eq!(ice_servers[0].urls, ["stun:turn.example.com:3478"]);
        assert_eq!(ice_servers[0].username, None);
        let turn = &ice_servers[1];
        assert_eq!(turn.username.as_deref(), Some("1700000600:alice"));
        assert_eq!(
            turn.credential.as_deref(),
            Some(turn_credential(&Secret::new("s3cret"), "1700000600:alice").as_str())
        );
    }

    #[test]
    fn refuses_turn_without_a_secret_and_unknown_schemes() {
        let mut settings = IceSettings {
            urls: vec!["turn:example.com".into()],
            ..IceSettings::default()
        };
        assert!(settings.validate().is_err());
        settings.urls = vec!["http://example.com".into()];
        assert!(settings.validate().is_err());
        settings.urls = vec!["stun:".into()];
        assert!(settings.validate().is_err());
        settings.urls = vec!["stun:example.com:3478".into()];
        settings.validate().unwrap();
        assert_eq!(
            settings.issue("x", SystemTime::now()),
            FromServer::IceServers {
                ice_servers: vec![IceServer {
                    urls: vec!["stun:example.com:3478".into()],
                    username: None,
                    credential: None
                }],
                ttl_secs: 12 * 3600
            }
        );
    }
}
