//! `query_local`: a client's query, decoded as the worker decodes it and
//! answered by the real handler over a task store and a knowledge base whose
//! contents the target knows, so every answer can be checked.
//!
//! No custom handler is configured: no input ever runs a command.
#![no_main]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cocoon::services::exec::{ExecPolicy, Executor};
use cocoon::services::process::EnvPolicy;
use cocoon::services::query::{Queries, QueryConfig};
use cocoon::services::tasks::{TaskKind, TaskStatus, TaskStore};
use cocoon_signaling::protocol::service::{
    QueryLocal, QueryType, Request, Response, ServiceErrorCode,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The tasks in the store: commands with LIKE's special characters, and
/// their final status.
const TASKS: &[(&str, TaskStatus)] = &[
    ("ls -la", TaskStatus::Completed),
    ("grep 100% report.txt", TaskStatus::Failed),
    ("echo a_b", TaskStatus::Completed),
    (r"printf 'C:\temp'", TaskStatus::Running),
    ("Make Build", TaskStatus::Pending),
    ("sleep 1 # ÄÖÜ", TaskStatus::Completed),
];

/// The knowledge base's files.
const FILES: &[(&str, &str)] = &[
    (
        "notes.md",
        "Deploy with make\nRestart the API\n100% done_now\n",
    ),
    ("ops/runbook.txt", "ÄRGER: disk full\nmake clean\n"),
];

struct World {
    runtime: tokio::runtime::Runtime,
    queries: Queries,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = data_dir();
        let knowledge = dir.join("knowledge");
        for (path, text) in FILES {
            let path = knowledge.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        std::fs::write(knowledge.join("binary.bin"), b"make \xff\xfe").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tasks = TaskStore::open(&dir).unwrap();
        runtime.block_on(async {
            for (command, status) in TASKS {
                let id = tasks.start(TaskKind::Execute, command).await;
                if *status != TaskStatus::Running {
                    tasks.finish(id, *status, None).await;
                }
            }
        });
        let env = EnvPolicy { allow: Vec::new() };
        let exec = Executor::new(ExecPolicy::default(), env, dir.join("out"), tasks.clone());
        let config = QueryConfig {
            knowledge_dir: Some(knowledge),
            handlers: BTreeMap::new(),
        };
        let queries = Queries::new(config, tasks, Arc::new(exec));
        World { runtime, queries }
    })
}

/// A fresh directory next to the fuzz binaries (inside the target dir),
/// one per process; those of finished processes are removed.
fn data_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let root = exe.parent().unwrap().join("query-data");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let pid = entry.file_name();
            if !PathBuf::from("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = root.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice(data) else {
        return;
    };
    let Ok(Request::QueryLocal(query)) = Request::decode(value) else {
        return;
    };
    let world = world();
    match world.runtime.block_on(world.queries.handle(query.clone())) {
        Response::QueryResult {
            query_id,
            data,
            is_final,
        } => {
            assert_eq!(query_id, query.query_id);
            assert!(is_final);
            answered(&query, &data);
        }
        Response::Error {
            code,
            message,
            request_id,
            session_id,
        } => {
            assert_eq!(request_id, Some(query.query_id.clone()));
            assert_eq!(session_id, None);
            let want = match query.query_type {
                QueryType::Custom { .. } => ServiceErrorCode::UnknownQuery,
                _ => ServiceErrorCode::InvalidRequest,
            };
            assert_eq!(code, want, "{message}");
        }
        other => panic!("{other:?}"),
    }
});

/// Checks an answer against what the store and directory hold.
fn answered(query: &QueryLocal, data: &Value) {
    let params = &query.params;
    let limit = params["limit"].as_u64().unwrap_or(50).min(1000) as usize;
    let status = params["status"].as_str();
    let text = params["query"].as_str();
    match query.query_type {
        QueryType::ListTasks | QueryType::SearchTasks => {
            let search = (query.query_type == QueryType::SearchTasks).then(|| text.unwrap());
            let matching: Vec<usize> = (0..TASKS.len())
                .rev()
                .filter(|i| status.is_none_or(|s| s == TASKS[*i].1.as_str()))
                .filter(|i| search.is_none_or(|s| like(TASKS[*i].0, s)))
                .collect();
            assert_eq!(data["total"], matching.len());
            let tasks = data["tasks"].as_array().unwrap();
            let commands: Vec<&str> = tasks
                .iter()
                .map(|t| t["command"].as_str().unwrap())
                .collect();
            let want: Vec<&str> = matching.iter().take(limit).map(|i| TASKS[*i].0).collect();
            assert_eq!(commands, want, "newest first, at most the limit");
        }
        QueryType::GetTaskStats => {
            for status in TaskStatus::ALL {
                let count = TASKS.iter().filter(|(_, s)| *s == status).count();
                assert_eq!(data[status.as_str()], count);
            }
            assert_eq!(data["total"], TASKS.len());
        }
        QueryType::SearchKnowledgebase => {
            let needle = text.unwrap().to_lowercase();
            assert!(!needle.trim().is_empty(), "an empty query is refused");
            let hits: Vec<(&str, &str)> = FILES
                .iter()
                .flat_map(|(path, text)| text.lines().map(move |line| (*path, line)))
                .filter(|(_, line)| line.to_lowercase().contains(&needle))
                .collect();
            assert_eq!(data["total"], hits.len());
            let results = data["results"].as_array().unwrap();
            let got: Vec<(&str, &str)> = results
                .iter()
                .map(|r| (r["path"].as_str().unwrap(), r["text"].as_str().unwrap()))
                .collect();
            let want: Vec<(&str, &str)> = hits.into_iter().take(limit).collect();
            assert_eq!(got, want);
        }
        QueryType::Custom { .. } => panic!("no handler is configured"),
    }
}

/// SQL `LIKE '%needle%'` with the needle's `%`, `_` and `\` taken
/// literally: ASCII letters match either case, other characters only
/// themselves.
fn like(command: &str, needle: &str) -> bool {
    command
        .to_ascii_lowercase()
        .contains(&needle.to_ascii_lowercase())
}
