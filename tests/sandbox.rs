//! `COCOON_SANDBOX=bwrap`: every command and terminal runs in a bubblewrap
//! sandbox — the machine read-only, the worker's data dir (its secret)
//! hidden, no capabilities, its own PIDs, writable only where the operator
//! says — and still works as a terminal and a command runner.

mod common;

use cocoon::session::client::PtyEvent;
use cocoon_signaling::protocol::service::{ExecuteResult, Request, Response};
use common::*;

async fn run(rig: &mut Rig, command: &str) -> ExecuteResult {
    rig.send(&Request::Execute(execute_request(command))).await;
    match rig.recv().await {
        Response::ExecuteResult(result) => result,
        other => panic!("expected execute_result, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxed_commands_see_a_read_only_machine_without_the_workers_secrets() {
    let writable = tempfile::tempdir().unwrap();
    let writable_dir = writable.path().to_str().unwrap().to_owned();
    let mut rig = Rig::start(&[
        ("COCOON_SANDBOX", "bwrap"),
        ("COCOON_SANDBOX_WRITABLE", &writable_dir),
    ])
    .await;
    let data = rig.worker_dir.path().to_str().unwrap().to_owned();
    assert!(rig.worker_dir.path().join(".secret").exists());

    let secret = run(&mut rig, &format!("cat {data}/.secret")).await;
    assert!(!secret.success, "{secret:?}");
    assert!(secret.data.stdout.is_empty(), "{secret:?}");

    let marker = format!("/etc/cocoon-sandbox-{}", std::process::id());
    let system = run(&mut rig, &format!("touch {marker}")).await;
    assert!(!system.success);
    assert!(
        system.data.stderr.contains("Read-only file system"),
        "{system:?}"
    );
    assert!(!std::path::Path::new(&marker).exists());

    let allowed = run(&mut rig, &format!("echo kept > {writable_dir}/note")).await;
    assert!(allowed.success, "{allowed:?}");
    assert_eq!(
        std::fs::read_to_string(writable.path().join("note")).unwrap(),
        "kept\n"
    );

    // Output files still come back; /tmp is the sandbox's own.
    let private = format!("/tmp/cocoon-sandbox-{}", std::process::id());
    let files = run(
        &mut rig,
        &format!("echo out > \"$COCOON_OUTPUT_DIR/result.txt\" && echo tmp > {private}"),
    )
    .await;
    assert!(files.success, "{files:?}");
    assert_eq!(files.files.len(), 1, "{files:?}");
    assert_eq!(files.files[0].content, "out\n");
    assert!(!std::path::Path::new(&private).exists());

    // No capabilities, and the worker is not among the visible processes.
    let caps = run(&mut rig, "grep CapEff /proc/self/status").await;
    assert!(caps.data.stdout.contains("0000000000000000"), "{caps:?}");
    let kill = format!("kill -0 {}", rig.worker.pid());
    let worker = run(&mut rig, &kill).await;
    assert!(!worker.success, "{worker:?}");

    // A timeout still ends the whole sandbox.
    let mut slow = execute_request("sleep 30");
    slow.timeout_secs = Some(1);
    rig.send(&Request::Execute(slow)).await;
    match rig.recv().await {
        Response::ExecuteResult(result) => assert!(!result.success, "{result:?}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_terminal_is_a_real_terminal() {
    let rig = Rig::start(&[("COCOON_SANDBOX", "bwrap")]).await;
    let data = rig.worker_dir.path().to_str().unwrap().to_owned();
    let session = rig.session().await;
    let script =
        format!("tty; stty size; ls -A {data} | wc -l; cat /proc/1/cmdline; echo; echo $((6*7))");
    let mut pty = session
        .attach_pty(attach_request(Some(&script)))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    let text = String::from_utf8_lossy(&output);
    assert_eq!(code, 0, "{text}");
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    // bubblewrap shows the terminal as /dev/console (its /dev is its own).
    assert!(lines[0].starts_with("/dev/"), "{text}");
    assert_eq!(lines[1], "24 80", "{text}");
    assert_eq!(lines[2], "0", "the data dir is empty inside: {text}");
    assert!(
        lines[3].starts_with("bwrap"),
        "PID 1 is the sandbox's: {text}"
    );
    assert_eq!(lines[4], "42", "{text}");

    // An interactive shell, typed into.
    let mut shell = session.attach_pty(attach_request(None)).await.unwrap();
    shell.write(b"echo sum=$((40+2)); exit\n").await.unwrap();
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(DEADLINE, shell.next()).await {
            Ok(Some(PtyEvent::Output(bytes))) => seen.extend_from_slice(&bytes),
            Ok(Some(PtyEvent::Exited(code))) => {
                assert_eq!(code, 0);
                break;
            }
            other => panic!("{other:?} after {}", String::from_utf8_lossy(&seen)),
        }
    }
    assert!(String::from_utf8_lossy(&seen).contains("sum=42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_network_a_sandbox_cannot_reach_even_loopback() {
    let mut rig = Rig::start(&[
        ("COCOON_SANDBOX", "bwrap"),
        ("COCOON_SANDBOX_NO_NETWORK", "true"),
    ])
    .await;
    let probe = format!(
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{}' && echo reached",
        rig.server.addr.port()
    );
    let cut = run(&mut rig, &probe).await;
    assert!(
        !cut.success && !cut.data.stdout.contains("reached"),
        "{cut:?}"
    );

    let mut rig = Rig::start(&[("COCOON_SANDBOX", "bwrap")]).await;
    let probe = format!(
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{}' && echo reached",
        rig.server.addr.port()
    );
    let open = run(&mut rig, &probe).await;
    assert!(
        open.success && open.data.stdout.contains("reached"),
        "{open:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_works_for_an_unprivileged_worker() {
    let mut rig = Rig::start_as(&[("COCOON_SANDBOX", "bwrap")], true).await;
    let who = run(&mut rig, "id -un; grep CapEff /proc/self/status").await;
    assert!(who.success, "{who:?}");
    assert!(who.data.stdout.starts_with("nobody"), "{who:?}");
}

#[tokio::test]
async fn a_sandbox_that_cannot_run_stops_the_worker_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut worker = WorkerProcess::spawn(
        "ws://127.0.0.1:9/ws",
        dir.path(),
        &[("COCOON_SANDBOX", "bwrap"), ("PATH", "/nonexistent")],
    );
    let line = worker.expect_line("needs bubblewrap").await;
    assert!(line.contains("apt install bubblewrap"), "{line}");
}
