//! The task store: every `execute` and PTY session is a task, kept in SQLite
//! in the data dir so `query_local` can list, count and search them.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use cocoon_signaling::auth::unix_now;
use rusqlite::{Connection, params};
use serde::Serialize;

/// What kind of work a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A one-shot `execute`.
    Execute,
    /// An interactive PTY session.
    Pty,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted, not started.
    Pending,
    /// Running.
    Running,
    /// Ended with exit code 0.
    Completed,
    /// Ended otherwise.
    Failed,
}

impl TaskStatus {
    /// Every status, in display order.
    pub const ALL: [TaskStatus; 4] = [Self::Pending, Self::Running, Self::Completed, Self::Failed];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
        }
    }

    /// Parses a stored or requested name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A task as returned by queries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    /// Its id.
    pub id: i64,
    /// `execute` or `pty`.
    pub kind: String,
    /// The command line (for PTYs, the program).
    pub command: String,
    /// pending, running, completed or failed.
    pub status: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, once ended.
    pub finished_at: Option<u64>,
    /// The exit code, once ended.
    pub exit_code: Option<i32>,
}

/// A handle to a task being run.
#[derive(Debug, Clone, Copy)]
pub struct TaskId(Option<i64>);

/// The store. Cheap to clone; calls run on the blocking pool. A failure to
/// record a task is logged, never fatal to the work itself.
#[derive(Clone)]
pub struct TaskStore {
    db: Arc<Mutex<Connection>>,
}

/// Longest command text stored.
const MAX_COMMAND_CHARS: usize = 4096;

impl TaskStore {
    /// Opens `tasks.db` in `data_dir`. Tasks left running by a previous
    /// worker process are marked failed: nobody will finish them.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("tasks.db");
        // Every command run is in here: for the worker's user only.
        cocoon_signaling::files::make_db_private(&path)?;
        let db =
            Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS tasks (
                 id          INTEGER PRIMARY KEY AUTOINCREMENT,
                 kind        TEXT NOT NULL,
                 command     TEXT NOT NULL,
                 status      TEXT NOT NULL,
                 created_at  INTEGER NOT NULL,
                 finished_at INTEGER,
                 exit_code   INTEGER
             );
             CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
             UPDATE tasks SET status = 'failed', finished_at = strftime('%s','now')
                 WHERE status IN ('pending', 'running');",
        )
        .with_context(|| format!("cannot initialise {}", path.display()))?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
        })
    }

    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&db)
        })
        .await?
        .context("task store")
    }

    /// Records a task that starts running now.
    pub async fn start(&self, kind: TaskKind, command: &str) -> TaskId {
        let kind = match kind {
            TaskKind::Execute => "execute",
            TaskKind::Pty => "pty",
        };
        let command: String = command.chars().take(MAX_COMMAND_CHARS).collect();
        let inserted = self
            .with_db(move |db| {
                db.execute(
                    "INSERT INTO tasks (kind, command, status, created_at) VALUES (?1, ?2, 'running', ?3)",
                    params![kind, command, unix_now() as i64],
                )?;
                Ok(db.last_insert_rowid())
            })
            .await;
        TaskId(log_failure(inserted))
    }

    /// Records how a task ended.
    pub async fn finish(&self, task: TaskId, status: TaskStatus, exit_code: Option<i32>) {
        let Some(id) = task.0 else { return };
        let updated = self
            .with_db(move |db| {
                db.execute(
                    "UPDATE tasks SET status = ?2, finished_at = ?3, exit_code = ?4 WHERE id = ?1",
                    params![id, status.as_str(), unix_now() as i64, exit_code],
                )
            })
            .await;
        log_failure(updated);
    }

    /// Tasks newest first, optionally of one status and/or whose command
    /// contains `search` (case-insensitive), with the total that matched.
    pub async fn list(
        &self,
        status: Option<TaskStatus>,
        search: Option<String>,
        limit: u32,
    ) -> anyhow::Result<(Vec<Task>, u64)> {
        self.with_db(move |db| {
            let status = status.map(TaskStatus::as_str);
            let pattern = search.map(|s| format!("%{}%", escape_like(&s)));
            let filter =
                "(?1 IS NULL OR status = ?1) AND (?2 IS NULL OR command LIKE ?2 ESCAPE '\\')";
            let total: i64 = db.query_row(
                &format!("SELECT COUNT(*) FROM tasks WHERE {filter}"),
                params![status, pattern],
                |row| row.get(0),
            )?;
            let mut stmt = db.prepare(&format!(
                "SELECT id, kind, command, status, created_at, finished_at, exit_code FROM tasks
                 WHERE {filter} ORDER BY id DESC LIMIT ?3"
            ))?;
            let tasks = stmt
                .query_map(params![status, pattern, limit], |row| {
                    Ok(Task {
                        id: row.get(0)?,
                        kind: row.get(1)?,
                        command: row.get(2)?,
                        status: row.get(3)?,
                        created_at: row.get::<_, i64>(4)?.max(0) as u64,
                        finished_at: row.get::<_, Option<i64>>(5)?.map(|t| t.max(0) as u64),
                        exit_code: row.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((tasks, total.max(0) as u64))
        })
        .await
    }

    /// How many tasks are in each status.
    pub async fn counts(&self) -> anyhow::Result<Vec<(TaskStatus, u64)>> {
        self.with_db(|db| {
            TaskStatus::ALL
                .into_iter()
                .map(|status| {
                    let n: i64 = db.query_row(
                        "SELECT COUNT(*) FROM tasks WHERE status = ?1",
                        params![status.as_str()],
                        |row| row.get(0),
                    )?;
                    Ok((status, n.max(0) as u64))
                })
                .collect()
        })
        .await
    }
}

fn escape_like(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

fn log_failure<T>(result: anyhow::Result<T>) -> Option<T> {
    result
        .map_err(|err| tracing::warn!(err = format!("{err:#}"), "cannot record a task"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_lists_counts_and_searches() {
        let dir = tempfile::tempdir().unwrap();
        let store = TaskStore::open(dir.path()).unwrap();
        let a = store.start(TaskKind::Execute, "echo 100%").await;
        store.finish(a, TaskStatus::Completed, Some(0)).await;
        let b = store.start(TaskKind::Execute, "false").await;
        store.finish(b, TaskStatus::Failed, Some(1)).await;
        let _c = store.start(TaskKind::Pty, "bash").await;

        let (all, total) = store.list(None, None, 10).await.unwrap();
        assert_eq!(total, 3);
        assert_eq!(all[0].command, "bash");
        let (failed, _) = store
            .list(Some(TaskStatus::Failed), None, 10)
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].exit_code, Some(1));
        let (found, _) = store.list(None, Some("100%".into()), 10).await.unwrap();
        assert_eq!(found.len(), 1);
        let (none, _) = store.list(None, Some("_".into()), 10).await.unwrap();
        assert!(none.is_empty(), "LIKE wildcards are escaped");
        let counts = store.counts().await.unwrap();
        assert_eq!(counts[1], (TaskStatus::Running, 1));

        drop(store);
        let reopened = TaskStore::open(dir.path()).unwrap();
        let (running, _) = reopened
            .list(Some(TaskStatus::Running), None, 10)
            .await
            .unwrap();
        assert!(running.is_empty(), "a restart fails orphaned tasks");
    }
}
