//! Failed registrations and authentications, counted per source address, so
//! that secrets and tokens cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures allowed per address within [`WINDOW`].
pub const MAX_FAILURES: u32 = 20;
/// The window failures are counted in.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most; beyond this the oldest windows are forgotten.
const MAX_TRACKED: usize = 10_000;

/// Failure counts per address, each in a window that starts at its first
/// failure.
#[derive(Debug, Default)]
pub struct FailureLimiter {
    entries: HashMap<IpAddr, (Instant, u32)>,
}

impl FailureLimiter {
    /// Whether `ip` may try again now.
    pub fn allowed(&mut self, ip: IpAddr) -> bool {
        match self.entries.get(&ip) {
            Some((start, _)) if start.elapsed() >= WINDOW => {
                self.entries.remove(&ip);
                true
            }
            Some((_, count)) => *count < MAX_FAILURES,
            None => true,
        }
    }

    /// Counts a failure of `ip`.
    pub fn failed(&mut self, ip: IpAddr) {
        if self.entries.len() >= MAX_TRACKED && !self.entries.contains_key(&ip) {
            self.entries
                .retain(|_, (start, _)| start.elapsed() < WINDOW);
            if self.entries.len() >= MAX_TRACKED
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(ip, _)| *ip)
            {
                self.entries.remove(&oldest);
            }
        }
        let entry = self.entries.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_per_address_and_forgets_after_the_window() {
        let mut limiter = FailureLimiter::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(limiter.allowed(a));
            limiter.failed(a);
        }
        assert!(!limiter.allowed(a));
        assert!(limiter.allowed(b), "other addresses are not affected");
        tokio::time::advance(WINDOW).await;
        assert!(limiter.allowed(a));
    }
}
