//! PTY sessions through the real signaling server and a real worker.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cocoon_signaling::protocol::service::{
    AttachPty, Encoding, Request, Response, ServiceErrorCode, SessionId,
};
use common::*;
use serde_json::json;

/// Output and exit codes of every session seen by one client.
#[derive(Default)]
struct Terminals {
    output: HashMap<SessionId, Vec<u8>>,
    next_offset: HashMap<SessionId, u64>,
    exits: HashMap<SessionId, i32>,
    encodings: Vec<Encoding>,
    errors: Vec<Response>,
    /// Bytes reported skipped (offset jumps).
    skipped: u64,
}

/// A shell with a prompt the tests can recognise.
const MARKED_SHELL: &str = "PS1='PROMPT> ' exec bash --norc --noprofile";

impl Terminals {
    async fn open(&mut self, rig: &mut Rig, request: AttachPty) -> SessionId {
        rig.send(&Request::AttachPty(request)).await;
        loop {
            match rig.recv().await {
                Response::PtyCreated { session_id, .. } => {
                    self.output.entry(session_id.clone()).or_default();
                    return session_id;
                }
                other => self.file(other),
            }
        }
    }

    fn file(&mut self, response: Response) {
        match response {
            Response::PtyOutput {
                session_id,
                data,
                encoding,
                offset,
            } => {
                let offset = offset.expect("the worker always sends offsets");
                let expected = self.next_offset.entry(session_id.clone()).or_default();
                assert!(offset >= *expected, "output went backwards");
                self.skipped += offset - *expected;
                let bytes = encoding.decode(&data).unwrap();
                *expected = offset + bytes.len() as u64;
                self.encodings.push(encoding);
                self.output.entry(session_id).or_default().extend(bytes);
            }
            Response::PtyExited {
                session_id,
                exit_code,
            } => {
                self.exits.insert(session_id, exit_code);
            }
            other => self.errors.push(other),
        }
    }

    async fn pump(&mut self, rig: &mut Rig) {
        let response = rig.recv().await;
        self.file(response);
    }

    async fn wait_output(&mut self, rig: &mut Rig, id: &SessionId, needle: &str) {
        let deadline = Instant::now() + DEADLINE;
        while !contains(&self.output[id], needle.as_bytes()) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {:?}",
                String::from_utf8_lossy(&self.output[id])
            );
            self.pump(rig).await;
        }
    }

    async fn wait_exit(&mut self, rig: &mut Rig, id: &SessionId) -> i32 {
        while !self.exits.contains_key(id) {
            self.pump(rig).await;
        }
        self.exits[id]
    }

    fn clear(&mut self, id: &SessionId) {
        self.output.get_mut(id).unwrap().clear();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn type_in(rig: &mut Rig, id: &SessionId, text: &str) {
    rig.send(&Request::PtyInput {
        session_id: id.clone(),
        data: text.into(),
        encoding: Encoding::Utf8,
    })
    .await;
}

#[tokio::test]
async fn the_login_shell_runs_commands() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    rig.send_json(json!({"type": "attach_pty", "cols": 80, "rows": 24, "env": {}}))
        .await;
    let id = match rig.recv().await {
        Response::PtyCreated { session_id, .. } => session_id,
        other => panic!("expected pty_created, got {other:?}"),
    };
    terms.output.insert(id.clone(), Vec::new());
    type_in(&mut rig, &id, "echo hel''lo; echo TERM=$TERM\n").await;
    terms.wait_output(&mut rig, &id, "hello\r\n").await;
    terms
        .wait_output(&mut rig, &id, "TERM=xterm-256color\r\n")
        .await;
}

#[tokio::test]
async fn resize_is_seen_by_the_program() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let id = terms
        .open(&mut rig, attach_request(Some(MARKED_SHELL)))
        .await;
    type_in(&mut rig, &id, "stty size\n").await;
    terms.wait_output(&mut rig, &id, "24 80").await;
    rig.send(&Request::PtyResize {
        session_id: id.clone(),
        cols: 100,
        rows: 30,
    })
    .await;
    type_in(&mut rig, &id, "stty size\n").await;
    terms.wait_output(&mut rig, &id, "30 100").await;

    for (cols, rows) in [(0, 30), (100, 0), (5000, 30)] {
        rig.send_json(json!({"type": "pty_resize", "session_id": id, "cols": cols, "rows": rows}))
            .await;
        rig.expect_error(ServiceErrorCode::InvalidRequest).await;
    }
    rig.send_json(json!({"type": "attach_pty", "cols": 0, "rows": 24}))
        .await;
    rig.expect_error(ServiceErrorCode::InvalidRequest).await;
}

#[tokio::test]
async fn close_ends_a_busy_session_promptly_without_disturbing_others() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let busy = terms
        .open(&mut rig, attach_request(Some(MARKED_SHELL)))
        .await;
    let other = terms
        .open(&mut rig, attach_request(Some(MARKED_SHELL)))
        .await;
    type_in(&mut rig, &busy, "sleep 1000\n").await;
    terms.wait_output(&mut rig, &busy, "sleep 1000\r\n").await;

    let started = Instant::now();
    rig.send(&Request::PtyClose {
        session_id: busy.clone(),
    })
    .await;
    type_in(&mut rig, &other, "echo still' 'here\n").await;
    terms.wait_output(&mut rig, &other, "still here\r\n").await;
    terms.wait_exit(&mut rig, &busy).await;
    assert!(started.elapsed() < Duration::from_secs(10));

    let sleeping = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 1000$"])
        .output()
        .unwrap();
    assert!(sleeping.stdout.is_empty(), "the session's jobs are gone");

    terms.clear(&other);
    type_in(&mut rig, &other, "echo ag''ain\n").await;
    terms.wait_output(&mut rig, &other, "again\r\n").await;
    rig.send(&Request::PtyInput {
        session_id: busy.clone(),
        data: "x".into(),
        encoding: Encoding::Utf8,
    })
    .await;
    rig.expect_error(ServiceErrorCode::UnknownSession).await;
}

#[tokio::test]
async fn a_natural_exit_reports_the_real_code() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let id = terms
        .open(&mut rig, attach_request(Some(MARKED_SHELL)))
        .await;
    type_in(&mut rig, &id, "echo b''ye; exit 3\n").await;
    assert_eq!(terms.wait_exit(&mut rig, &id).await, 3);
    assert!(
        contains(&terms.output[&id], b"bye\r\n"),
        "output comes before the exit"
    );
}

#[tokio::test]
async fn twenty_sessions_at_once() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            terms
                .open(&mut rig, attach_request(Some(MARKED_SHELL)))
                .await,
        );
    }
    for (n, id) in ids.iter().enumerate() {
        type_in(&mut rig, id, &format!("echo session-$((1000 + {n}))\n")).await;
    }
    for (n, id) in ids.iter().enumerate() {
        terms
            .wait_output(&mut rig, id, &format!("session-{}\r\n", 1000 + n))
            .await;
    }
}

#[tokio::test]
async fn multibyte_characters_are_never_split_and_raw_bytes_survive() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let id = terms
        .open(
            &mut rig,
            attach_request(Some("python3 -c \"print('€' * 100000 + 'END')\"")),
        )
        .await;
    terms.wait_exit(&mut rig, &id).await;
    let text = String::from_utf8(terms.output[&id].clone()).expect("valid UTF-8");
    assert_eq!(text, format!("{}END\r\n", "€".repeat(100_000)));
    assert!(
        terms.encodings.iter().all(|e| *e == Encoding::Utf8),
        "no chunk split a character"
    );
    assert!(
        terms.encodings.len() > 1,
        "the output spanned several messages"
    );

    let raw = terms
        .open(&mut rig, attach_request(Some(r"printf 'a\377\376b'")))
        .await;
    terms.wait_exit(&mut rig, &raw).await;
    assert_eq!(terms.output[&raw], b"a\xff\xfeb");

    // Raw bytes in: base64 input reaches the program byte for byte.
    let echo = terms
        .open(&mut rig, attach_request(Some("head -c 3 | od -An -tx1")))
        .await;
    rig.send(&Request::PtyInput {
        session_id: echo.clone(),
        data: "//4K".into(),
        encoding: Encoding::Base64,
    })
    .await;
    terms.wait_output(&mut rig, &echo, "ff fe 0a").await;
}

/// Resident memory of a process, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The bound the worker's memory must stay under during a flood that its
/// client does not read (see docs/PROTOCOL.md, "Flow control").
const FLOOD_RSS_BOUND_KIB: u64 = 32 * 1024;

#[tokio::test]
async fn a_flood_to_a_client_that_does_not_read_stays_bounded_and_ctrl_c_works() {
    let mut rig = Rig::start(&[]).await;
    let worker_pid = rig.worker.pid();
    let mut terms = Terminals::default();
    let mut request = attach_request(Some(MARKED_SHELL));
    request.flow_control = true;
    let id = terms.open(&mut rig, request).await;
    terms.wait_output(&mut rig, &id, "PROMPT> ").await;
    type_in(&mut rig, &id, "yes\n").await;

    // Ten seconds of not reading while `yes` writes as fast as it can.
    let baseline = rss_kib(worker_pid);
    let mut peak = baseline;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_kib(worker_pid));
    }
    eprintln!("worker RSS during the flood: baseline {baseline} KiB, peak {peak} KiB");
    assert!(
        peak < FLOOD_RSS_BOUND_KIB,
        "worker RSS grew to {peak} KiB (baseline {baseline} KiB)"
    );

    type_in(&mut rig, &id, "\u{3}").await;
    terms.clear(&id);
    // Read and acknowledge until the prompt is back.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let offset = terms.next_offset.get(&id).copied().unwrap_or(0);
        rig.send(&Request::PtyAck {
            session_id: id.clone(),
            offset,
        })
        .await;
        terms.pump(&mut rig).await;
        let tail = terms.output[&id].len().saturating_sub(64);
        if contains(&terms.output[&id][tail..], b"PROMPT> ") {
            break;
        }
        assert!(Instant::now() < deadline, "the prompt did not come back");
    }
    assert!(terms.skipped > 0, "a client this far behind skips output");
    type_in(&mut rig, &id, "echo al''ive\n").await;
    terms.clear(&id);
    loop {
        let offset = terms.next_offset[&id];
        rig.send(&Request::PtyAck {
            session_id: id.clone(),
            offset,
        })
        .await;
        terms.pump(&mut rig).await;
        if contains(&terms.output[&id], b"alive\r\n") {
            break;
        }
    }
}

#[tokio::test]
async fn bad_requests_get_errors_and_leave_sessions_alone() {
    let mut rig = Rig::start(&[]).await;
    let mut terms = Terminals::default();
    let id = terms
        .open(&mut rig, attach_request(Some(MARKED_SHELL)))
        .await;
    let ghost = "00000000-0000-0000-0000-000000000000";
    let cases = [
        (
            json!({"type": "attach_pty"}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "attach_pty", "cols": 80}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "attach_pty", "cols": 80, "rows": 70000}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "attach_pty", "cols": 2000, "rows": 24}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "attach_pty", "cols": -1, "rows": 24}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "attach_pty", "cols": 80, "rows": 24, "env": {"LD_PRELOAD": "x"}}),
            ServiceErrorCode::EnvRefused,
        ),
        (
            json!({"type": "attach_pty", "cols": 80, "rows": 24, "cwd": "/nonexistent"}),
            ServiceErrorCode::SpawnFailed,
        ),
        (
            json!({"type": "pty_input", "session_id": ghost, "data": "x"}),
            ServiceErrorCode::UnknownSession,
        ),
        (
            json!({"type": "pty_input", "session_id": id, "data": "%%", "encoding": "base64"}),
            ServiceErrorCode::InvalidEncoding,
        ),
        (
            json!({"type": "pty_input", "session_id": id, "data": "x", "encoding": "rot13"}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "pty_input", "session_id": id}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "pty_resize", "session_id": ghost, "cols": 80, "rows": 24}),
            ServiceErrorCode::UnknownSession,
        ),
        (
            json!({"type": "pty_resize", "session_id": id, "cols": 80}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "pty_close", "session_id": ghost}),
            ServiceErrorCode::UnknownSession,
        ),
        (
            json!({"type": "pty_close"}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "pty_ack", "session_id": ghost, "offset": 5}),
            ServiceErrorCode::UnknownSession,
        ),
        (
            json!({"type": "proxy_http", "request_id": "r"}),
            ServiceErrorCode::InvalidRequest,
        ),
        (
            json!({"type": "query_local", "query_id": "q"}),
            ServiceErrorCode::InvalidRequest,
        ),
    ];
    for (payload, code) in cases {
        rig.send_json(payload.clone()).await;
        let response = rig
            .recv_until(|r| matches!(r, Response::Error { .. }).then_some(r))
            .await;
        assert!(
            matches!(&response, Response::Error { code: got, .. } if *got == code),
            "{payload}: {response:?}"
        );
    }
    type_in(&mut rig, &id, "echo fi''ne\n").await;
    terms.wait_output(&mut rig, &id, "fine\r\n").await;
}
