//! Signed tokens (`TokenKey::verify`), which arrive from clients, workers
//! and hives before anything else is checked, and the durations operators
//! give token TTLs and timeouts (`parse_duration`).
//!
//! Input: a token (the seeds are tokens signed with [`KEY`]); its bytes
//! also make the claims of a freshly signed token.
#![no_main]

use std::time::Duration;

use cocoon_signaling::auth::{Claims, TokenError, TokenKey, TokenKind, unix_now};
use cocoon_signaling::parse_duration;
use cocoon_signaling::protocol::UserId;
use libfuzzer_sys::fuzz_target;

/// The key the seed tokens are signed with.
const KEY: &[u8] = b"cocoon fuzz key, 32 bytes long!!";
const KINDS: [TokenKind; 3] = [TokenKind::Access, TokenKind::Setup, TokenKind::Hive];

fuzz_target!(|data: &[u8]| {
    let key = TokenKey::new(KEY.to_vec());
    if let Ok(text) = std::str::from_utf8(data) {
        for kind in KINDS {
            if let Ok(claims) = key.verify(text, kind) {
                // Only a token the key signed verifies, in one spelling.
                assert_eq!(key.sign(&claims), text);
                assert_eq!(claims.kind, kind);
                assert!(claims.exp > unix_now());
            }
        }
        duration(text);
    }
    signed(&key, data);
});

/// A token signed from the input's bytes verifies as itself, only for its
/// kind, and no longer once any byte of it changes.
fn signed(key: &TokenKey, data: &[u8]) {
    let kind = KINDS[data.len() % 3];
    let claims = Claims {
        sub: UserId::new(String::from_utf8_lossy(data)),
        kind,
        iat: data.len() as u64,
        exp: u64::MAX - data.len() as u64,
        spawn: (data.len() % 2 == 1).then(|| format!("s-{}", data.len())),
        hive: (data.len() % 4 == 1).then(|| String::from_utf8_lossy(data).into_owned()),
    };
    let token = key.sign(&claims);
    assert_eq!(key.verify(&token, kind).as_ref(), Ok(&claims));
    for other in KINDS.into_iter().filter(|k| *k != kind) {
        assert_eq!(
            key.verify(&token, other),
            Err(TokenError::WrongKind { expected: other })
        );
    }
    let mut forged = token.clone().into_bytes();
    let at = data.iter().map(|b| usize::from(*b)).sum::<usize>() % forged.len();
    let byte = data.first().map_or(b'x', |b| b % 128);
    forged[at] = if byte == forged[at] { byte ^ 1 } else { byte };
    let forged = String::from_utf8(forged).unwrap();
    assert!(
        key.verify(&forged, kind).is_err(),
        "{token} changed to {forged}"
    );

    let expired = Claims {
        exp: unix_now().min(claims.iat),
        ..claims
    };
    assert_eq!(
        key.verify(&key.sign(&expired), kind),
        Err(TokenError::Expired)
    );
}

fn duration(text: &str) {
    let Ok(parsed) = parse_duration(text) else {
        return;
    };
    assert_eq!(parsed.subsec_nanos(), 0);
    assert_eq!(
        parse_duration(&parsed.as_secs().to_string()),
        Ok(Duration::from_secs(parsed.as_secs()))
    );
}
