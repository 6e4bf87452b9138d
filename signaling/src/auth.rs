//! Signed tokens (JWT, RFC 7519) for ownership: *setup* tokens claim a worker
//! for an owner, *access* tokens let a client reach that owner's devices.
//!
//! Only HS256 is accepted: the algorithm is pinned, so `alg: none` and
//! algorithm-confusion tokens fail before any signature is looked at.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::protocol::UserId;

/// What a token is for. A token of one kind is never accepted as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// Lets a client list and reach the owner's devices.
    Access,
    /// Lets a worker be claimed by the owner when it registers.
    Setup,
    /// Lets a hive register and spawn workers for the owner.
    Hive,
}

/// The claims cocoon puts in a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The owner.
    pub sub: UserId,
    /// The token's kind.
    pub kind: TokenKind,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// On setup tokens the server minted for a hive: the spawn it belongs
    /// to. Such a token claims one device, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<String>,
    /// With `spawn`: the name of the hive that asked for the token, told
    /// when the worker registers (on whichever instance of a fleet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hive: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON, or the wrong header.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm other than HS256.
    #[error("token algorithm {0:?} is not accepted; only HS256 is")]
    Algorithm(String),
    /// The signature does not verify with the server's key.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token is past its `exp`.
    #[error("token expired")]
    Expired,
    /// A valid token of the other kind.
    #[error("expected a{} {expected:?} token", if matches!(expected, TokenKind::Access) { "n" } else { "" })]
    WrongKind {
        /// The kind the caller needed.
        expected: TokenKind,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
}

/// The server's signing key. Its `Debug` shows nothing.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A key from raw bytes (at least 32 are expected).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }

    /// Mints a token of `kind` for `owner`, valid for `ttl` from now.
    pub fn mint(&self, kind: TokenKind, owner: &UserId, ttl: Duration) -> String {
        let iat = unix_now();
        self.sign(&Claims {
            sub: owner.clone(),
            kind,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
            spawn: None,
            hive: None,
        })
    }

    /// Signs arbitrary claims (tests use it to make expired tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "HS256".into(),
            typ: Some("JWT".into()),
        };
        let header = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let signature = B64.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// Verifies a token's algorithm, signature, expiry and kind.
    pub fn verify(&self, token: &str, expected: TokenKind) -> Result<Claims, TokenError> {
        let (signing_input, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (header, payload) = signing_input
            .split_once('.')
            .filter(|(_, payload)| !payload.contains('.'))
            .ok_or(TokenError::Malformed)?;
        let header: Header = decode_part(header)?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let signature = B64.decode(signature).map_err(|_| TokenError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = decode_part(payload)?;
        if claims.exp <= unix_now() {
            return Err(TokenError::Expired);
        }
        if claims.kind != expected {
            return Err(TokenError::WrongKind { expected });
        }
        Ok(claims)
    }
}

fn decode_part<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123456789abcdef".to_vec())
    }

    fn alice() -> UserId {
        UserId::new("alice")
    }

    #[test]
    fn round_trip() {
        let token = key().mint(TokenKind::Access, &alice(), Duration::from_secs(60));
        let claims = key().verify(&token, TokenKind::Access).unwrap();
        assert_eq!(claims.sub, alice());
    }

    #[test]
    fn wrong_kind_is_refused() {
        let token = key().mint(TokenKind::Setup, &alice(), Duration::from_secs(60));
        assert_eq!(
            key().verify(&token, TokenKind::Access),
            Err(TokenError::WrongKind {
                expected: TokenKind::Access
            })
        );
    }

    #[test]
    fn forged_and_foreign_tokens_are_refused() {
        let token = key().mint(TokenKind::Access, &alice(), Duration::from_secs(60));
        let other = TokenKey::new(b"another key entirely, 32 bytes!!".to_vec());
        assert_eq!(
            other.verify(&token, TokenKind::Access),
            Err(TokenError::BadSignature)
        );
        // Swap in claims for another owner, keep the signature.
        let (head, rest) = token.split_once('.').unwrap();
        let signature = rest.split_once('.').unwrap().1;
        let forged_claims = B64.encode(
            serde_json::to_vec(&Claims {
                sub: UserId::new("mallory"),
                kind: TokenKind::Access,
                iat: 0,
                exp: u64::MAX,
                spawn: None,
                hive: None,
            })
            .unwrap(),
        );
        let forged = format!("{head}.{forged_claims}.{signature}");
        assert_eq!(
            key().verify(&forged, TokenKind::Access),
            Err(TokenError::BadSignature)
        );
        for junk in ["", "a.b", "a.b.c.d", "!!.!!.!!"] {
            assert_eq!(
                key().verify(junk, TokenKind::Access),
                Err(TokenError::Malformed)
            );
        }
    }

    #[test]
    fn alg_none_and_confusion_are_refused() {
        let claims = B64.encode(
            serde_json::to_vec(&Claims {
                sub: alice(),
                kind: TokenKind::Access,
                iat: 0,
                exp: u64::MAX,
                spawn: None,
                hive: None,
            })
            .unwrap(),
        );
        for alg in ["none", "None", "HS512", "RS256"] {
            let header = B64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            let token = format!("{header}.{claims}.");
            assert_eq!(
                key().verify(&token, TokenKind::Access),
                Err(TokenError::Algorithm(alg.into()))
            );
        }
    }

    #[test]
    fn expired_is_refused() {
        let token = key().sign(&Claims {
            sub: alice(),
            kind: TokenKind::Access,
            iat: 1,
            exp: unix_now() - 1,
            spawn: None,
            hive: None,
        });
        assert_eq!(
            key().verify(&token, TokenKind::Access),
            Err(TokenError::Expired)
        );
    }
}
