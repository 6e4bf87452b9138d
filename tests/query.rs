//! `query_local` backed by the real task store, knowledge files and handlers.

mod common;

use cocoon_signaling::protocol::service::{Request, Response, ServiceErrorCode};
use common::*;
use serde_json::{Value, json};

async fn query(rig: &mut Rig, payload: Value) -> Value {
    rig.send_json(payload.clone()).await;
    match rig.recv().await {
        Response::QueryResult {
            query_id,
            data,
            is_final,
        } => {
            assert_eq!(Some(query_id.as_str()), payload["query_id"].as_str());
            assert!(is_final);
            data
        }
        other => panic!("{payload}: expected query_result, got {other:?}"),
    }
}

async fn query_error(rig: &mut Rig, payload: Value) -> ServiceErrorCode {
    rig.send_json(payload.clone()).await;
    match rig.recv().await {
        Response::Error { code, .. } => code,
        other => panic!("{payload}: expected an error, got {other:?}"),
    }
}

async fn execute(rig: &mut Rig, command: &str) {
    rig.send(&Request::Execute(execute_request(command))).await;
    assert!(matches!(rig.recv().await, Response::ExecuteResult(_)));
}

#[tokio::test]
async fn task_queries_return_real_data_in_both_spellings() {
    let mut rig = Rig::start(&[]).await;
    execute(&mut rig, "echo first").await;
    execute(&mut rig, "exit 4").await;
    execute(&mut rig, "echo needle-in-haystack").await;

    // The spec's example, exactly.
    let data = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "query-456", "query_type": "ListTasks", "params": {"status": "running", "limit": 10}}),
    )
    .await;
    assert_eq!(
        data,
        json!({"tasks": [], "total": 0, "source": "cocoon-local"})
    );

    for spelling in ["ListTasks", "list_tasks"] {
        let data = query(
            &mut rig,
            json!({"type": "query_local", "query_id": spelling, "query_type": spelling}),
        )
        .await;
        assert_eq!(data["total"], 3, "{spelling}");
        assert_eq!(data["tasks"][0]["command"], "echo needle-in-haystack");
        assert_eq!(data["tasks"][1]["status"], "failed");
        assert_eq!(data["tasks"][1]["exit_code"], 4);
        assert_eq!(data["tasks"][2]["status"], "completed");
        assert_eq!(data["tasks"][2]["kind"], "execute");
    }
    let failed = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "f", "query_type": "list_tasks", "params": {"status": "failed"}}),
    )
    .await;
    assert_eq!(failed["total"], 1);

    for spelling in ["GetTaskStats", "get_task_stats"] {
        let stats = query(
            &mut rig,
            json!({"type": "query_local", "query_id": "s", "query_type": spelling}),
        )
        .await;
        assert_eq!(stats["completed"], 2);
        assert_eq!(stats["failed"], 1);
        assert_eq!(stats["total"], 3);
    }
    for spelling in ["SearchTasks", "search_tasks"] {
        let found = query(
            &mut rig,
            json!({"type": "query_local", "query_id": "q", "query_type": spelling, "params": {"query": "NEEDLE"}}),
        )
        .await;
        assert_eq!(found["total"], 1, "{spelling}");
        assert_eq!(found["tasks"][0]["command"], "echo needle-in-haystack");
    }
}

#[tokio::test]
async fn knowledge_search_stays_inside_its_directory() {
    let mut rig = Rig::start(&[]).await;
    let knowledge = rig.worker_dir.path().join("knowledge");
    std::fs::create_dir_all(knowledge.join("notes")).unwrap();
    std::fs::write(
        knowledge.join("deploy.md"),
        "# Deploy\nRun the Migrations first.\n",
    )
    .unwrap();
    std::fs::write(
        knowledge.join("notes/db.txt"),
        "migrations live in db/\nnothing else\n",
    )
    .unwrap();
    std::fs::write(knowledge.join("binary.bin"), [0xffu8, 0xfe, b'm']).unwrap();
    std::os::unix::fs::symlink("/etc", knowledge.join("etc")).unwrap();

    for spelling in ["SearchKnowledgebase", "search_knowledgebase"] {
        let data = query(
            &mut rig,
            json!({"type": "query_local", "query_id": "k", "query_type": spelling, "params": {"query": "migrations"}}),
        )
        .await;
        assert_eq!(
            data,
            json!({
                "results": [
                    {"path": "deploy.md", "line": 2, "text": "Run the Migrations first."},
                    {"path": "notes/db.txt", "line": 1, "text": "migrations live in db/"}
                ],
                "total": 2,
                "source": "cocoon-local"
            })
        );
    }
    let outside = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "k", "query_type": "SearchKnowledgebase", "params": {"query": "root"}}),
    )
    .await;
    assert_eq!(
        outside["total"], 0,
        "symlinks out of the directory are not followed"
    );
}

#[tokio::test]
async fn custom_queries_run_operator_handlers() {
    let handlers = json!({
        "echo_params": "python3 -c 'import json,sys; print(json.dumps({\"got\": json.load(sys.stdin), \"name\": __import__(\"os\").environ[\"COCOON_QUERY_NAME\"]}))'",
        "broken": "echo not json",
        "failing": "echo oops >&2; exit 2"
    })
    .to_string();
    let mut rig = Rig::start(&[("COCOON_QUERY_HANDLERS", &handlers)]).await;
    let data = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "c", "query_type": {"Custom": {"query_name": "echo_params"}}, "params": {"a": [1, 2]}}),
    )
    .await;
    assert_eq!(data, json!({"got": {"a": [1, 2]}, "name": "echo_params"}));
    let lower = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "c2", "query_type": {"custom": {"query_name": "echo_params"}}}),
    )
    .await;
    assert_eq!(lower["got"], json!({}));

    let unknown = json!({"type": "query_local", "query_id": "u", "query_type": {"Custom": {"query_name": "nope"}}});
    assert_eq!(
        query_error(&mut rig, unknown).await,
        ServiceErrorCode::UnknownQuery
    );
    for name in ["broken", "failing"] {
        let payload = json!({"type": "query_local", "query_id": name, "query_type": {"Custom": {"query_name": name}}});
        assert_eq!(
            query_error(&mut rig, payload).await,
            ServiceErrorCode::QueryFailed
        );
    }
    // Handlers are the worker's own work: they are not tasks.
    let tasks = query(
        &mut rig,
        json!({"type": "query_local", "query_id": "t", "query_type": "ListTasks"}),
    )
    .await;
    assert_eq!(tasks["total"], 0);
}

#[tokio::test]
async fn bad_queries_get_clear_errors() {
    let mut rig = Rig::start(&[]).await;
    for payload in [
        json!({"type": "query_local", "query_id": "a", "query_type": "ListTasks", "params": {"status": "sleeping"}}),
        json!({"type": "query_local", "query_id": "b", "query_type": "ListTasks", "params": {"limit": "ten"}}),
        json!({"type": "query_local", "query_id": "c", "query_type": "SearchTasks"}),
        json!({"type": "query_local", "query_id": "d", "query_type": "SearchKnowledgebase", "params": {"query": " "}}),
    ] {
        assert_eq!(
            query_error(&mut rig, payload).await,
            ServiceErrorCode::InvalidRequest
        );
    }
    for payload in [
        json!({"type": "query_local", "query_id": "e", "query_type": "DropTables"}),
        json!({"type": "query_local", "query_type": "ListTasks"}),
    ] {
        assert_eq!(
            query_error(&mut rig, payload).await,
            ServiceErrorCode::InvalidRequest
        );
    }
}
