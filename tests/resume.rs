//! A client that reconnects takes its terminals back: missed output is
//! replayed exactly, or — when more was missed than the worker keeps — the
//! current screen is redrawn from a snapshot.

mod common;

use std::time::{Duration, Instant};

use cocoon::session::client::{Pty, PtyEvent};
use common::*;

async fn next(pty: &mut Pty) -> PtyEvent {
    tokio::time::timeout(DEADLINE, pty.next())
        .await
        .expect("an event in time")
        .expect("the session is alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_output_is_replayed_exactly() {
    let rig = Rig::start(&[]).await;
    let first = rig.session().await;
    let paced = "for i in $(seq 1 40); do seq $((i*1000-999)) $((i*1000)); sleep 0.05; done";
    let mut pty = first.attach_pty(attach_request(Some(paced))).await.unwrap();
    let mut output = Vec::new();
    while output.len() < 20_000 {
        match next(&mut pty).await {
            PtyEvent::Output(bytes) => output.extend_from_slice(&bytes),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (session_id, offset) = (pty.session_id.clone(), pty.offset());
    assert_eq!(offset, output.len() as u64);
    drop(pty);
    drop(first);

    let second = rig.session().await;
    let mut pty = second.resume_pty(&session_id, offset).await.unwrap();
    let code = loop {
        match next(&mut pty).await {
            PtyEvent::Output(bytes) => output.extend_from_slice(&bytes),
            PtyEvent::Exited(code) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, 0);
    let expected: String = (1..=40_000).map(|n| format!("{n}\r\n")).collect();
    assert!(
        output == expected.as_bytes(),
        "every byte once, in order, across the reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_missed_too_much_gets_the_current_screen() {
    let rig = Rig::start(&[]).await;
    let marker = rig.worker_dir.path().join("drawn");
    // A full-screen program: alternate screen, a flood far bigger than the
    // worker keeps, then its final screen.
    let program = format!(
        "printf '\\033[?1049h\\033[2J'; seq 1 400000; printf '\\033[2J\\033[3;5HREDRAWN SCREEN\\033[10;1Hstatus: ok'; touch {}; sleep 1000",
        marker.display()
    );
    let first = rig.session().await;
    let mut pty = first
        .attach_pty(attach_request(Some(&program)))
        .await
        .unwrap();
    let PtyEvent::Output(_) = next(&mut pty).await else {
        panic!("output first")
    };
    let (session_id, offset) = (pty.session_id.clone(), pty.offset());
    drop(pty);
    drop(first);

    let deadline = Instant::now() + DEADLINE;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the program never finished drawing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = rig.session().await;
    let mut pty = second.resume_pty(&session_id, offset).await.unwrap();
    let PtyEvent::Snapshot {
        screen,
        offset: from,
    } = next(&mut pty).await
    else {
        panic!("a snapshot comes first")
    };
    assert!(
        from > offset + (1 << 20),
        "the gap was larger than the ring"
    );
    let mut terminal = vt100::Parser::new(24, 80, 0);
    terminal.process(&screen);
    let contents = terminal.screen().contents();
    let rows: Vec<&str> = contents.lines().collect();
    assert_eq!(
        rows.get(2).map(|r| r.trim()),
        Some("REDRAWN SCREEN"),
        "{contents}"
    );
    assert_eq!(
        rows.get(9).map(|r| r.trim()),
        Some("status: ok"),
        "{contents}"
    );
    assert!(
        !contents.contains("399999"),
        "the flood is gone from the screen"
    );

    // The session is the resumed client's now: closing it works.
    pty.close().await.unwrap();
    loop {
        if let PtyEvent::Exited(_) = next(&mut pty).await {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_session_ends_after_the_detach_timeout() {
    use cocoon_signaling::protocol::service::Response;
    use serde_json::json;

    let mut rig = Rig::start(&[("COCOON_DETACH_TIMEOUT", "1s")]).await;
    let session = rig.session().await;
    let pty = session
        .attach_pty(attach_request(Some("sleep 1000")))
        .await
        .unwrap();
    drop(pty);
    drop(session);
    let deadline = Instant::now() + DEADLINE;
    loop {
        rig.send_json(json!({"type": "query_local", "query_id": "q", "query_type": "ListTasks", "params": {"status": "running"}}))
            .await;
        let Response::QueryResult { data, .. } = rig.recv().await else {
            panic!("query_result")
        };
        if data["total"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the detached session is still running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
