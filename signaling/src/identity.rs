//! Device identity: the secret-strength rules both sides enforce, secret
//! generation, and the HMAC that turns a secret into a device id.

use std::fmt;

use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::protocol::{DeviceId, Secret};

/// Shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 32;
/// Fewest distinct characters a secret must contain.
pub const MIN_DISTINCT_CHARS: usize = 10;
/// Length of a generated secret: 36 random bytes in base64, 288 bits.
pub const GENERATED_SECRET_LEN: usize = 48;
/// Substrings (compared case-insensitively) that mark a secret as guessable.
pub const WEAK_PATTERNS: &[&str] = &[
    "password", "secret", "admin", "12345", "qwerty", "test", "example",
];
/// A run of this many identical characters makes a secret repetitive.
const MAX_RUN: usize = 4;

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeakSecret {
    /// Shorter than [`MIN_SECRET_LEN`].
    TooShort(usize),
    /// Fewer than [`MIN_DISTINCT_CHARS`] distinct characters.
    TooFewDistinct(usize),
    /// Digits only.
    OnlyDigits,
    /// Lowercase letters only.
    OnlyLowercase,
    /// A long run of one character, or one short chunk repeated.
    Repetitive,
    /// Contains one of [`WEAK_PATTERNS`].
    WeakPattern(&'static str),
}

impl fmt::Display for WeakSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(len) => write!(
                f,
                "secret is {len} characters long; at least {MIN_SECRET_LEN} are required"
            ),
            Self::TooFewDistinct(n) => write!(
                f,
                "secret has only {n} distinct characters; at least {MIN_DISTINCT_CHARS} are required"
            ),
            Self::OnlyDigits => f.write_str("secret consists only of digits"),
            Self::OnlyLowercase => f.write_str("secret consists only of lowercase letters"),
            Self::Repetitive => f.write_str("secret is repetitive"),
            Self::WeakPattern(pattern) => {
                write!(f, "secret contains the guessable pattern {pattern:?}")
            }
        }?;
        f.write_str(" (generate one with: openssl rand -base64 36)")
    }
}

impl std::error::Error for WeakSecret {}

/// Checks every strength rule; the first one broken is reported.
pub fn check_secret_strength(secret: &str) -> Result<(), WeakSecret> {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < MIN_SECRET_LEN {
        return Err(WeakSecret::TooShort(chars.len()));
    }
    if chars.iter().all(char::is_ascii_digit) {
        return Err(WeakSecret::OnlyDigits);
    }
    if chars.iter().all(char::is_ascii_lowercase) {
        return Err(WeakSecret::OnlyLowercase);
    }
    if is_repetitive(&chars) {
        return Err(WeakSecret::Repetitive);
    }
    let mut distinct = chars.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < MIN_DISTINCT_CHARS {
        return Err(WeakSecret::TooFewDistinct(distinct.len()));
    }
    let lower = secret.to_lowercase();
    if let Some(pattern) = WEAK_PATTERNS.iter().find(|p| lower.contains(*p)) {
        return Err(WeakSecret::WeakPattern(pattern));
    }
    Ok(())
}

/// A run of [`MAX_RUN`] equal characters, or the whole secret being one
/// chunk of at most a third of its length repeated ("Ab1!Ab1!Ab1!…").
fn is_repetitive(chars: &[char]) -> bool {
    if chars.windows(MAX_RUN).any(|w| w.iter().all(|c| *c == w[0])) {
        return true;
    }
    // Any period up to a third exists exactly when the shortest one is that
    // short. (Trying every period was quadratic: minutes of CPU for one
    // `register` with a secret of a megabyte.)
    !chars.is_empty() && shortest_period(chars) <= chars.len() / 3
}

/// The least `p > 0` with `chars[i] == chars[i + p]` wherever both exist:
/// the length minus the longest border (a proper prefix that is also a
/// suffix), from the Knuth–Morris–Pratt failure function in linear time.
fn shortest_period(chars: &[char]) -> usize {
    let mut border = vec![0; chars.len()];
    let mut k = 0;
    for i in 1..chars.len() {
        while k > 0 && chars[i] != chars[k] {
            k = border[k - 1];
        }
        if chars[i] == chars[k] {
            k += 1;
        }
        border[i] = k;
    }
    chars.len() - border.last().copied().unwrap_or(0)
}

/// A fresh secret: 36 random bytes as 48 base64 characters (288 bits).
/// Draws again in the rare case the draw breaks a rule (e.g. spells "test").
pub fn generate_secret() -> Secret {
    loop {
        let mut bytes = [0u8; GENERATED_SECRET_LEN / 4 * 3];
        rand::rng().fill_bytes(&mut bytes);
        let secret = base64::engine::general_purpose::STANDARD.encode(bytes);
        if check_secret_strength(&secret).is_ok() {
            return Secret::new(secret);
        }
    }
}

/// The device id of a secret: lowercase hex HMAC-SHA256 keyed by the salt.
pub fn derive_device_id(salt: &[u8], secret: &Secret) -> DeviceId {
    let mut mac = Hmac::<Sha256>::new_from_slice(salt).expect("HMAC takes keys of any length");
    mac.update(secret.expose().as_bytes());
    let digest = mac.finalize().into_bytes();
    DeviceId::new(crate::store::hex(&digest))
}

/// Compares two strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRONG: &str = "kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0bM9pK8gV4aS2=";

    #[test]
    fn accepts_the_spec_example() {
        assert_eq!(check_secret_strength(STRONG), Ok(()));
    }

    #[test]
    fn each_rule_rejects() {
        let cases: &[(&str, WeakSecret)] = &[
            ("kX9mP2vR8nQ4sT6wY1zC3hF5jL7dN0b", WeakSecret::TooShort(31)),
            ("12345678901234567890123456789012", WeakSecret::OnlyDigits),
            (
                "abcdefghijklmnopqrstuvwxyzabcdefgh",
                WeakSecret::OnlyLowercase,
            ),
            (
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                WeakSecret::OnlyLowercase,
            ),
            (
                "kX9mP2vR8nQ4sT6wY1zC3hFFFFjL7dN0bM9p",
                WeakSecret::Repetitive,
            ),
            (
                "Ab1!Cd2?Ab1!Cd2?Ab1!Cd2?Ab1!Cd2?Ab1!",
                WeakSecret::Repetitive,
            ),
            (
                "AbAbAbAbAbAbAbAbAbAbAbAbAbAbAbAb1212",
                WeakSecret::TooFewDistinct(4),
            ),
            (
                "kX9mP2vR8nQ4sPassWord6wY1zC3hF5jL7dN",
                WeakSecret::WeakPattern("password"),
            ),
            (
                "kX9mP2vR8nQ4sT6wY1zSECRET3hF5jL7dN0b",
                WeakSecret::WeakPattern("secret"),
            ),
            (
                "kX9mP2vR8nQ4sT6wY1zAdmin3hF5jL7dN0bM",
                WeakSecret::WeakPattern("admin"),
            ),
            (
                "kX9mP2vR8nQ4sT6wY1z12345hF5jL7dN0bMa",
                WeakSecret::WeakPattern("12345"),
            ),
            (
                "kX9mP2vR8nQ4sT6wY1zQwErTyhF5jL7dN0bM",
                WeakSecret::WeakPattern("qwerty"),
            ),
            (
                "kX9mP2vR8nQ4sT6wY1zTeSt3hF5jL7dN0bM9",
                WeakSecret::WeakPattern("test"),
            ),
            (
                "kX9mP2vR8nQ4sExample1zC3hF5jL7dN0bM9",
                WeakSecret::WeakPattern("example"),
            ),
        ];
        for (secret, expected) in cases {
            assert_eq!(
                check_secret_strength(secret).as_ref(),
                Err(expected),
                "{secret}"
            );
        }
    }

    /// Found while writing the `secret` fuzz target: the periodicity rule
    /// was quadratic in the secret's length, so one `register` of a
    /// megabyte held a server thread for minutes. The check must be quick
    /// (it takes milliseconds) for the longest secret a message can carry.
    #[test]
    fn long_almost_periodic_secrets_are_checked_quickly() {
        let mut secret = "Ab".repeat(crate::protocol::MAX_MESSAGE_BYTES / 2 - 64);
        secret.push_str("Cd0");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(check_secret_strength(&secret)));
        let verdict = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the strength check of a 1 MiB secret takes too long");
        assert_eq!(verdict, Err(WeakSecret::TooFewDistinct(5)));
    }

    #[test]
    fn periods_of_any_length_are_repetitive() {
        let chunk = "Ab1!Cd2?Ef3#";
        for len in 32..=72 {
            let secret: String = chunk.chars().cycle().take(len).collect();
            let periodic = len >= 3 * chunk.len();
            assert_eq!(
                is_repetitive(&secret.chars().collect::<Vec<_>>()),
                periodic,
                "{secret}"
            );
        }
        assert!(!is_repetitive(&[]));
    }

    #[test]
    fn generated_secrets_are_strong_and_distinct() {
        let a = generate_secret();
        let b = generate_secret();
        assert_eq!(a.expose().len(), GENERATED_SECRET_LEN);
        assert_eq!(check_secret_strength(a.expose()), Ok(()));
        assert_ne!(a, b);
    }

    #[test]
    fn device_id_is_a_keyed_hmac() {
        let secret = Secret::new(STRONG);
        let id = derive_device_id(b"salt-one", &secret);
        assert_eq!(id.as_str().len(), 64);
        assert_eq!(id, derive_device_id(b"salt-one", &secret));
        assert_ne!(id, derive_device_id(b"salt-two", &secret));
        // RFC 4231 test case 2 pins the construction: key "Jefe".
        let rfc = derive_device_id(b"Jefe", &Secret::new("what do ya want for nothing?"));
        assert_eq!(
            rfc.as_str(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
