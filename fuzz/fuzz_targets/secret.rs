//! Device secrets: the strength rules (`check_secret_strength`) the server
//! applies to every `register` (before any other check, to anyone who
//! connects) and the worker to `COCOON_SECRET` and its secret file, and the
//! device id derived from a secret.
//!
//! The rules are restated here as plainly as possible; the real check must
//! agree with them on every input.
#![no_main]

use cocoon_signaling::identity::{
    MIN_DISTINCT_CHARS, MIN_SECRET_LEN, WEAK_PATTERNS, WeakSecret, check_secret_strength,
    constant_time_eq, derive_device_id,
};
use cocoon_signaling::protocol::Secret;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert_eq!(check_secret_strength(text), rules(text), "{text:?}");

    let id = derive_device_id(b"salt", &Secret::new(text));
    assert_eq!(id.as_str().len(), 64);
    assert!(
        id.as_str()
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    );

    let half = (0..=text.len() / 2)
        .rev()
        .find(|i| text.is_char_boundary(*i));
    let (a, b) = text.split_at(half.unwrap());
    assert_eq!(constant_time_eq(a, b), a == b);
    assert!(constant_time_eq(text, text));
});

/// The rules in the order they are reported.
fn rules(secret: &str) -> Result<(), WeakSecret> {
    let chars: Vec<char> = secret.chars().collect();
    let n = chars.len();
    if n < MIN_SECRET_LEN {
        return Err(WeakSecret::TooShort(n));
    }
    if chars.iter().all(char::is_ascii_digit) {
        return Err(WeakSecret::OnlyDigits);
    }
    if chars.iter().all(char::is_ascii_lowercase) {
        return Err(WeakSecret::OnlyLowercase);
    }
    // Four equal characters in a row, or the whole secret a repetition of
    // a chunk at most a third as long.
    let run = (0..n.saturating_sub(3)).any(|i| chars[i..i + 4].iter().all(|c| *c == chars[i]));
    let periodic = (1..=n / 3).any(|p| (p..n).all(|i| chars[i] == chars[i - p]));
    if run || periodic {
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
