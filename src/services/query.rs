//! `query_local`: questions about the worker's own data — its tasks, its
//! knowledge base (text files in a directory) and operator-defined queries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocoon_signaling::protocol::service::{
    Execute, QueryLocal, QueryType, Response, ServiceErrorCode,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ServiceError;
use super::exec::Executor;
use super::tasks::{Task, TaskStatus, TaskStore};

/// Tells clients where the data came from.
const SOURCE: &str = "cocoon-local";
/// Default and largest number of results.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 1000;
/// Knowledge-base files larger than this are not searched.
const MAX_KNOWLEDGE_FILE: u64 = 1024 * 1024;
/// Most knowledge-base files looked at per search.
const MAX_KNOWLEDGE_FILES: usize = 5000;
/// Time allowed to a custom query handler.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// Operator settings for queries.
#[derive(Debug, Clone, Default)]
pub struct QueryConfig {
    /// Directory of text files that `SearchKnowledgebase` searches.
    pub knowledge_dir: Option<PathBuf>,
    /// `Custom` query names and the shell commands that answer them: the
    /// command gets the params as JSON on stdin and prints JSON.
    pub handlers: BTreeMap<String, String>,
}

/// Answers `query_local`.
pub struct Queries {
    config: QueryConfig,
    tasks: TaskStore,
    exec: Arc<Executor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    status: Option<String>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchParams {
    query: String,
    limit: Option<u32>,
    status: Option<String>,
}

#[derive(Serialize)]
struct TaskList {
    tasks: Vec<Task>,
    total: u64,
    source: &'static str,
}

#[derive(Serialize)]
struct TaskStats {
    pending: u64,
    running: u64,
    completed: u64,
    failed: u64,
    total: u64,
    source: &'static str,
}

#[derive(Serialize)]
struct KnowledgeHit {
    path: String,
    line: usize,
    text: String,
}

#[derive(Serialize)]
struct KnowledgeResults {
    results: Vec<KnowledgeHit>,
    total: usize,
    source: &'static str,
}

impl Queries {
    /// Queries over a task store, running custom handlers with `exec`.
    pub fn new(config: QueryConfig, tasks: TaskStore, exec: Arc<Executor>) -> Self {
        Self {
            config,
            tasks,
            exec,
        }
    }

    /// Answers one query.
    pub async fn handle(&self, query: QueryLocal) -> Response {
        let query_id = query.query_id.clone();
        match self.answer(query).await {
            Ok(data) => Response::QueryResult {
                query_id,
                data,
                is_final: true,
            },
            Err(err) => err.into_response(Some(query_id), None),
        }
    }

    async fn answer(&self, query: QueryLocal) -> Result<Value, ServiceError> {
        match query.query_type {
            QueryType::ListTasks => {
                let params: ListParams = params(query.params)?;
                self.task_list(params.status, None, params.limit).await
            }
            QueryType::SearchTasks => {
                let params: SearchParams = params(query.params)?;
                self.task_list(params.status, Some(params.query), params.limit)
                    .await
            }
            QueryType::GetTaskStats => self.task_stats().await,
            QueryType::SearchKnowledgebase => {
                let params: SearchParams = params(query.params)?;
                self.search_knowledge(params.query, params.limit).await
            }
            QueryType::Custom { query_name } => self.custom(&query_name, query.params).await,
        }
    }

    async fn task_list(
        &self,
        status: Option<String>,
        search: Option<String>,
        limit: Option<u32>,
    ) -> Result<Value, ServiceError> {
        let status = status
            .map(|s| {
                TaskStatus::parse(&s).ok_or_else(|| {
                    invalid(format!(
                        "unknown status {s:?}: use pending, running, completed or failed"
                    ))
                })
            })
            .transpose()?;
        let limit = limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
        let (tasks, total) = self
            .tasks
            .list(status, search, limit)
            .await
            .map_err(internal)?;
        Ok(to_value(TaskList {
            tasks,
            total,
            source: SOURCE,
        }))
    }

    async fn task_stats(&self) -> Result<Value, ServiceError> {
        let counts = self.tasks.counts().await.map_err(internal)?;
        let count = |status| {
            counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n)
        };
        Ok(to_value(TaskStats {
            pending: count(TaskStatus::Pending),
            running: count(TaskStatus::Running),
            completed: count(TaskStatus::Completed),
            failed: count(TaskStatus::Failed),
            total: counts.iter().map(|(_, n)| n).sum(),
            source: SOURCE,
        }))
    }

    async fn search_knowledge(
        &self,
        query: String,
        limit: Option<u32>,
    ) -> Result<Value, ServiceError> {
        if query.trim().is_empty() {
            return Err(invalid("query must not be empty".into()));
        }
        let limit = limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT) as usize;
        let Some(dir) = self.config.knowledge_dir.clone() else {
            return Ok(to_value(KnowledgeResults {
                results: Vec::new(),
                total: 0,
                source: SOURCE,
            }));
        };
        let (results, total) = tokio::task::spawn_blocking(move || search_dir(&dir, &query, limit))
            .await
            .map_err(|err| internal(err.into()))?;
        Ok(to_value(KnowledgeResults {
            results,
            total,
            source: SOURCE,
        }))
    }

    async fn custom(&self, name: &str, params: Value) -> Result<Value, ServiceError> {
        let command = self.config.handlers.get(name).ok_or_else(|| {
            ServiceError::new(
                ServiceErrorCode::UnknownQuery,
                format!("no query handler named {name:?}"),
            )
        })?;
        let request = Execute {
            request_id: None,
            command: command.clone(),
            input: Some(if params.is_null() {
                "{}".to_owned()
            } else {
                params.to_string()
            }),
            timeout_secs: Some(HANDLER_TIMEOUT.as_secs()),
            stream: false,
            env: None,
            cwd: None,
        };
        let result = self
            .exec
            .run_untracked(request, &[("COCOON_QUERY_NAME", name)])
            .await?;
        let failed = |why: String| {
            ServiceError::new(
                ServiceErrorCode::QueryFailed,
                format!("query {name:?}: {why}"),
            )
        };
        if !result.success {
            return Err(failed(format!(
                "handler exited with {:?}: {}",
                result.data.exit_code,
                result.data.stderr.trim()
            )));
        }
        serde_json::from_str(&result.data.stdout)
            .map_err(|err| failed(format!("handler did not print JSON: {err}")))
    }
}

fn params<T: DeserializeOwned>(params: Value) -> Result<T, ServiceError> {
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    serde_json::from_value(params).map_err(|err| invalid(format!("invalid params: {err}")))
}

fn invalid(message: String) -> ServiceError {
    ServiceError::new(ServiceErrorCode::InvalidRequest, message)
}

fn internal(err: anyhow::Error) -> ServiceError {
    tracing::warn!(err = format!("{err:#}"), "query failed");
    ServiceError::new(
        ServiceErrorCode::Internal,
        "the worker could not answer the query",
    )
}

fn to_value(value: impl Serialize) -> Value {
    serde_json::to_value(value).expect("query results serialize")
}

/// Case-insensitive line search of the UTF-8 files under `dir`. Symlinks
/// are never followed, so nothing outside the directory is read.
fn search_dir(dir: &Path, query: &str, limit: usize) -> (Vec<KnowledgeHit>, usize) {
    let needle = query.to_lowercase();
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files, 0);
    files.sort();
    let mut results = Vec::new();
    let mut total = 0;
    for relative in files {
        let Ok(text) = std::fs::read_to_string(dir.join(&relative)) else {
            continue;
        };
        for (number, line) in text.lines().enumerate() {
            if line.to_lowercase().contains(&needle) {
                total += 1;
                if results.len() < limit {
                    results.push(KnowledgeHit {
                        path: relative.clone(),
                        line: number + 1,
                        text: line.chars().take(500).collect(),
                    });
                }
            }
        }
    }
    (results, total)
}

fn collect_files(root: &Path, dir: &Path, found: &mut Vec<String>, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if found.len() >= MAX_KNOWLEDGE_FILES {
            return;
        }
        let path = entry.path();
        let Ok(meta) = path.symlink_metadata() else {
            continue;
        };
        if meta.is_dir() && depth < 16 {
            collect_files(root, &path, found, depth + 1);
        } else if meta.is_file()
            && meta.len() <= MAX_KNOWLEDGE_FILE
            && let Ok(relative) = path.strip_prefix(root)
        {
            found.push(relative.to_string_lossy().into_owned());
        }
    }
}
