//! The worker's state on disk, for `cocoon health` (a container's
//! `HEALTHCHECK`, a service manager): whether it is registered with its
//! signaling server right now, since when, and which process it is.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file in the data dir.
const FILE: &str = "health";

/// Where the worker stands with its signaling server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Dialling, registering, or waiting to try again.
    Connecting,
    /// Registered: clients can reach it.
    Registered,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    state: State,
    /// Unix seconds when the state began.
    since: u64,
    pid: u32,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Records a state change (atomically, fsynced on a blocking thread; a
/// failure is only logged).
pub async fn record(data_dir: &Path, state: State) {
    let record = Record {
        state,
        since: now(),
        pid: std::process::id(),
    };
    let json = serde_json::to_vec(&record).expect("records serialize");
    let path = data_dir.join(FILE);
    let write = move || cocoon_signaling::files::write_private(&path, &json);
    let failure = match tokio::task::spawn_blocking(write).await {
        Ok(Ok(())) => return,
        Ok(Err(err)) => format!("{err:#}"),
        Err(err) => err.to_string(),
    };
    tracing::warn!(err = failure, "cannot record the worker's health");
}

/// Healthy: the worker of `data_dir` runs and is registered, or has been
/// trying for at most `grace`. Says why in either case.
pub fn check(data_dir: &Path, grace: Duration) -> Result<String, String> {
    let path = data_dir.join(FILE);
    let text = std::fs::read(&path).map_err(|err| {
        format!(
            "no worker state in {} ({err}); has a worker run with this data dir?",
            path.display()
        )
    })?;
    let record: Record = serde_json::from_slice(&text)
        .map_err(|err| format!("{} is damaged: {err}", path.display()))?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(record.pid).unwrap_or(i32::MAX));
    // Signal 0 only asks whether the process exists (EPERM: it does).
    if let Err(nix::errno::Errno::ESRCH) = nix::sys::signal::kill(pid, None) {
        return Err(format!("the worker (pid {}) is not running", record.pid));
    }
    let age = now().saturating_sub(record.since);
    match record.state {
        State::Registered => Ok(format!("registered for {age} s (pid {})", record.pid)),
        State::Connecting if age <= grace.as_secs() => Ok(format!(
            "connecting for {age} s, within the {} s grace (pid {})",
            grace.as_secs(),
            record.pid
        )),
        State::Connecting => Err(format!(
            "not registered with the signaling server for {age} s (pid {})",
            record.pid
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registered_is_healthy_and_a_long_wait_is_not() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            check(dir.path(), Duration::ZERO)
                .unwrap_err()
                .contains("no worker state")
        );
        record(dir.path(), State::Connecting).await;
        assert!(check(dir.path(), Duration::from_secs(60)).is_ok());
        let stale = Record {
            state: State::Connecting,
            since: now() - 120,
            pid: std::process::id(),
        };
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&stale).unwrap()).unwrap();
        assert!(
            check(dir.path(), Duration::from_secs(60))
                .unwrap_err()
                .contains("120 s")
        );
        record(dir.path(), State::Registered).await;
        assert!(
            check(dir.path(), Duration::ZERO)
                .unwrap()
                .starts_with("registered")
        );
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        assert!(
            check(dir.path(), Duration::ZERO)
                .unwrap_err()
                .contains("damaged")
        );
    }
}
