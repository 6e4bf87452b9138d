//! `execute` through the real signaling server and a real worker process.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cocoon_signaling::identity::generate_secret;
use cocoon_signaling::protocol::service::{
    Encoding, Execute, ExecuteResult, OutputStream, Request, Response, ServiceErrorCode,
};
use common::*;
use serde_json::json;

async fn run(rig: &mut Rig, request: Execute) -> ExecuteResult {
    rig.send(&Request::Execute(request)).await;
    match rig.recv().await {
        Response::ExecuteResult(result) => result,
        other => panic!("expected execute_result, got {other:?}"),
    }
}

#[tokio::test]
async fn exit_codes_stdin_and_stderr() {
    let mut rig = Rig::start(&[]).await;
    let ok = run(&mut rig, execute_request("echo out; echo err >&2")).await;
    assert!(ok.success);
    assert_eq!(ok.data.exit_code, Some(0));
    assert_eq!(ok.data.stdout, "out\n");
    assert_eq!(ok.data.stderr, "err\n");

    let failed = run(&mut rig, execute_request("exit 3")).await;
    assert!(!failed.success);
    assert_eq!(failed.data.exit_code, Some(3));
    assert_eq!(failed.data.error, None);

    let mut with_input = execute_request("tr a-z A-Z");
    with_input.input = Some("hello\n".into());
    with_input.request_id = Some("r-1".into());
    let upper = run(&mut rig, with_input).await;
    assert_eq!(upper.data.stdout, "HELLO\n");
    assert_eq!(upper.request_id.as_deref(), Some("r-1"));

    let binary = run(&mut rig, execute_request(r"printf '\377\376'")).await;
    assert_eq!(binary.data.stdout_encoding, Encoding::Base64);
    assert_eq!(
        Encoding::Base64.decode(&binary.data.stdout).unwrap(),
        vec![0xff, 0xfe]
    );
}

#[tokio::test]
async fn the_spec_example_works_as_shown() {
    let mut rig = Rig::start(&[]).await;
    rig.send_json(
        json!({"type": "execute", "command": "echo 'Hello from cocoon!'", "input": null}),
    )
    .await;
    let Response::ExecuteResult(result) = rig.recv().await else {
        panic!("execute_result")
    };
    assert_eq!(result.data.stdout, "Hello from cocoon!\n");
    assert!(result.files.is_empty());
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let mut rig = Rig::start(&[]).await;
    let mut request = execute_request("sleep 1000 & echo $!; sleep 1000");
    request.timeout_secs = Some(1);
    let started = Instant::now();
    let result = run(&mut rig, request).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!result.success);
    assert_eq!(result.data.error.as_deref(), Some("timeout"));
    let pid: u32 = result
        .data
        .stdout
        .trim()
        .parse()
        .expect("the background pid");
    assert!(
        wait_gone(pid).await,
        "background process {pid} survived the timeout"
    );
}

/// Whether a process is gone (or a zombie) within the deadline.
async fn wait_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    false
}

#[tokio::test]
async fn output_is_capped_and_flagged() {
    let mut rig = Rig::start(&[]).await;
    let result = run(
        &mut rig,
        execute_request("head -c 2000000 /dev/zero | tr '\\0' a; echo done >&2"),
    )
    .await;
    assert!(result.success);
    assert!(result.data.truncated);
    assert_eq!(result.data.stdout.len(), 256 * 1024);
    assert_eq!(result.data.stderr, "done\n");
}

#[tokio::test]
async fn streamed_output_arrives_in_order_uncapped_and_binary_safe() {
    let mut rig = Rig::start(&[]).await;
    let mut request = execute_request(
        "echo one; echo two >&2; head -c 600000 /dev/zero | tr '\\0' b; printf '\\377'; exit 5",
    );
    request.request_id = Some("st-1".into());
    request.stream = true;
    rig.send(&Request::Execute(request)).await;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let result = loop {
        match rig.recv().await {
            Response::ExecuteOutput(piece) => {
                assert_eq!(piece.request_id.as_deref(), Some("st-1"));
                assert!(piece.data.len() < 1024 * 1024);
                let bytes = piece.encoding.decode(&piece.data).unwrap();
                match piece.stream {
                    OutputStream::Stdout => stdout.extend(bytes),
                    OutputStream::Stderr => stderr.extend(bytes),
                }
            }
            Response::ExecuteResult(result) => break result,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(result.request_id.as_deref(), Some("st-1"));
    assert_eq!(result.data.exit_code, Some(5));
    assert!(!result.success && !result.data.truncated);
    // The output went out in pieces, none of it again in the result.
    assert_eq!(
        (result.data.stdout.as_str(), result.data.stderr.as_str()),
        ("", "")
    );
    assert_eq!(stderr, b"two\n");
    assert_eq!(&stdout[..4], b"one\n");
    assert_eq!(stdout.len(), 4 + 600_000 + 1);
    assert_eq!(stdout.last(), Some(&0xff));
}

#[tokio::test]
async fn output_files_come_back_once_and_are_cleaned() {
    let mut rig = Rig::start(&[]).await;
    let script = r#"cd "$COCOON_OUTPUT_DIR" && echo hi > a.txt && printf '\377\376' > b.bin \
        && mkdir d && echo x > d/c.txt && ln -s /etc/passwd link && ln -s / root"#;
    let result = run(&mut rig, execute_request(script)).await;
    assert!(result.success, "{result:?}");
    let files: BTreeMap<_, _> = result
        .files
        .iter()
        .map(|f| (f.path.as_str(), (f.size, f.content.as_str(), f.encoding)))
        .collect();
    assert_eq!(
        files,
        BTreeMap::from([
            ("a.txt", (3, "hi\n", Encoding::Utf8)),
            ("b.bin", (2, "//4=", Encoding::Base64)),
            ("d/c.txt", (2, "x\n", Encoding::Utf8)),
        ]),
        "symlinks are never followed"
    );
    let again = run(&mut rig, execute_request(r#"ls -A "$COCOON_OUTPUT_DIR""#)).await;
    assert_eq!(again.data.stdout, "");
    assert!(again.files.is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(rig.worker_dir.path().join("output"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "output directories are removed: {leftovers:?}"
    );
}

#[tokio::test]
async fn resource_limits_are_enforced() {
    let mut rig = Rig::start(&[
        ("COCOON_LIMIT_MEMORY_MB", "256"),
        ("COCOON_LIMIT_CPU_SECS", "1"),
        ("COCOON_LIMIT_NOFILE", "32"),
    ])
    .await;
    let memory = run(
        &mut rig,
        execute_request("python3 -c 'b = bytearray(1024 * 1024 * 1024)'"),
    )
    .await;
    assert!(!memory.success);
    assert!(memory.data.stderr.contains("MemoryError"), "{memory:?}");

    let files = run(
        &mut rig,
        execute_request(
            "python3 -c \"import os; [os.open('/dev/null', os.O_RDONLY) for _ in range(100)]\"",
        ),
    )
    .await;
    assert!(!files.success);
    assert!(
        files.data.stderr.contains("Too many open files"),
        "{files:?}"
    );

    let mut spin = execute_request("while :; do :; done");
    spin.timeout_secs = Some(60);
    let started = Instant::now();
    let cpu = run(&mut rig, spin).await;
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(cpu.data.error.as_deref(), Some("limit_exceeded"), "{cpu:?}");

    let fine = run(&mut rig, execute_request("echo within limits")).await;
    assert!(fine.success);
}

#[tokio::test]
async fn process_limit_is_enforced() {
    // RLIMIT_NPROC does not bind root, so the worker runs as `nobody` here
    // (when the tests run as root) or as the unprivileged test user.
    let as_nobody = nix::unistd::geteuid().is_root();
    let mut rig = Rig::start_as(&[("COCOON_LIMIT_NPROC", "1")], as_nobody).await;
    let result = run(&mut rig, execute_request("sleep 0 & wait; echo forked")).await;
    assert!(!result.success, "{result:?}");
    assert_eq!(result.data.stdout, "", "the shell could not fork");
    assert!(result.data.stderr.contains("Cannot fork"), "{result:?}");

    // Within the limit the same worker runs commands fine.
    let plain = run(&mut rig, execute_request("echo ok")).await;
    assert_eq!(plain.data.stdout, "ok\n");
}

#[tokio::test]
async fn children_never_see_the_workers_secrets() {
    let secret = generate_secret();
    let mut rig = Rig::start(&[
        ("COCOON_SECRET", secret.expose()),
        ("WEBRTC_TURN_CREDENTIAL", "turn-credential-value"),
    ])
    .await;
    let result = run(&mut rig, execute_request("env")).await;
    assert!(result.data.stdout.contains("COCOON_OUTPUT_DIR="));
    assert!(!result.data.stdout.contains(secret.expose()));
    assert!(!result.data.stdout.contains("COCOON_SECRET"));
    assert!(!result.data.stdout.contains("COCOON_SETUP_TOKEN"));
    assert!(!result.data.stdout.contains("turn-credential-value"));

    let mut hijack = execute_request("true");
    hijack.env = Some(BTreeMap::from([(
        "LD_PRELOAD".to_string(),
        "/tmp/x.so".to_string(),
    )]));
    rig.send(&Request::Execute(hijack)).await;
    assert!(matches!(
        rig.recv().await,
        Response::Error {
            code: ServiceErrorCode::EnvRefused,
            ..
        }
    ));

    let mut fine = execute_request("echo $GREETING");
    fine.env = Some(BTreeMap::from([("GREETING".to_string(), "hi".to_string())]));
    assert_eq!(run(&mut rig, fine).await.data.stdout, "hi\n");
}

#[tokio::test]
async fn spawn_failures_and_bad_requests_get_clear_errors() {
    let mut rig = Rig::start(&[]).await;
    let mut nowhere = execute_request("true");
    nowhere.cwd = Some("/nonexistent/dir".into());
    let result = run(&mut rig, nowhere).await;
    assert_eq!(result.data.error.as_deref(), Some("spawn_failed"));
    assert!(result.data.stderr.contains("cannot start"), "{result:?}");

    for (payload, code) in [
        (json!({"type": "execute"}), ServiceErrorCode::InvalidRequest),
        (
            json!({"type": "execute", "command": 5}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "execute", "command": "x", "bogus": 1}),
            ServiceErrorCode::InvalidRequest,
        ),
        (json!({"type": "launch"}), ServiceErrorCode::UnknownType),
        (json!("just a string"), ServiceErrorCode::InvalidJson),
        (
            json!({"type": "pty_input", "session_id": "nope", "data": "x"}),
            ServiceErrorCode::UnknownSession,
        ),
    ] {
        rig.send_json(payload.clone()).await;
        match rig.recv().await {
            Response::Error { code: got, .. } => assert_eq!(got, code, "{payload}"),
            other => panic!("{payload}: expected an error, got {other:?}"),
        }
    }
    assert!(
        run(&mut rig, execute_request("true")).await.success,
        "the worker is unharmed"
    );
}

#[tokio::test]
async fn a_slow_command_does_not_delay_a_quick_one() {
    let mut rig = Rig::start(&[]).await;
    let mut slow = execute_request("sleep 3; echo slow");
    slow.request_id = Some("slow".into());
    let mut quick = execute_request("echo quick");
    quick.request_id = Some("quick".into());
    rig.send(&Request::Execute(slow)).await;
    rig.send(&Request::Execute(quick)).await;
    let Response::ExecuteResult(first) = rig.recv().await else {
        panic!("a result")
    };
    assert_eq!(first.request_id.as_deref(), Some("quick"));
    let Response::ExecuteResult(second) = rig.recv().await else {
        panic!("a result")
    };
    assert_eq!(second.request_id.as_deref(), Some("slow"));
}
