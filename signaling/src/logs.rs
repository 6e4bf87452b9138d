//! Logging for the binaries: `RUST_LOG` (or a default) to stderr, except
//! what would put message contents in a log.
//!
//! tungstenite logs every WebSocket message whole at TRACE: registrations
//! with their secret, tokens, relayed keystrokes. Its TRACE events are
//! dropped whatever `RUST_LOG` says, so no filter setting can leak them.

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Log targets whose TRACE events carry message contents.
const CONTENT_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Whether an event of `target` at `level` may carry message contents.
pub fn carries_contents(target: &str, level: &Level) -> bool {
    *level == Level::TRACE
        && CONTENT_TARGETS.iter().any(|crate_name| {
            target
                .strip_prefix(crate_name)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Installs the global subscriber: `RUST_LOG`, else `default`, to stderr.
pub fn init(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let no_contents = filter_fn(|meta| !carries_contents(meta.target(), meta.level()));
    tracing_subscriber::registry()
        .with(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter.and(no_contents)),
        )
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_trace_of_the_content_loggers_is_held_back() {
        assert!(carries_contents("tungstenite::protocol", &Level::TRACE));
        assert!(carries_contents("tungstenite", &Level::TRACE));
        assert!(carries_contents("tokio_tungstenite::compat", &Level::TRACE));
        assert!(!carries_contents("tungstenite::protocol", &Level::DEBUG));
        assert!(!carries_contents("tungstenite_extra", &Level::TRACE));
        assert!(!carries_contents("cocoon_signaling::conn", &Level::TRACE));
    }
}
