//! # cocoon-signaling
//!
//! The rendezvous point of cocoon: workers connect out to it and register;
//! clients authenticate and reach the devices they own; it routes their
//! messages and relays their traffic when no peer-to-peer path exists.
//!
//! ## Layout
//!
//! - [`protocol`]: the wire types, shared by server, worker and clients.
//! - [`identity`]: secret-strength rules and the HMAC that makes device ids
//!   (both sides use the same code).
//! - [`auth`]: signed setup and access tokens.
//! - [`store`]: salt, token key and device ownership, kept across restarts.
//! - [`cluster`]: the optional fleet backend on NATS: the same, shared by
//!   several instances, plus presence and routing between them.
//! - [`hub`]: online devices and clients, and routing between them.
//! - [`hive`]: hives that start workers for their owner, and their requests.
//! - [`conn`]: one WebSocket connection's reader and writer.
//! - [`server`]: HTTP, TLS, the accept loop, shutdown.
//! - [`web`]: the browser client's static files, served at `/`.
//! - [`logs`]: the binaries' logging, which never carries message contents.
//!
//! The data flows `server` → `conn` → `hub` → another connection's outbox.

#![warn(missing_docs)]

pub mod auth;
pub mod cluster;
pub mod conn;
pub mod files;
pub mod hive;
pub mod hub;
pub mod ice;
pub mod identity;
pub mod limit;
pub mod logs;
pub mod protocol;
pub mod server;
pub mod store;
pub mod web;

pub use server::{Config, Server, TlsFiles};

use std::path::PathBuf;
use std::time::Duration;

/// `$XDG_DATA_HOME/cocoon/<name>`, else `~/.local/share/cocoon/<name>`.
pub fn default_data_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("cocoon").join(name)
}

/// Parses durations like `90s`, `30m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 90s, 30m, 24h, 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {text:?}: use s, m, h or d"
            ));
        }
    };
    number
        .checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
