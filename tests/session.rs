//! The session layer over the signaling relay: terminals on their own
//! streams, requests on the control stream, every byte once and in order.

mod common;

use std::time::Duration;

use cocoon::session::client::{Pty, PtyEvent};
use cocoon_signaling::protocol::service::{Request, Response};
use common::*;

async fn read_until(pty: &mut Pty, needle: &str) -> Vec<u8> {
    let mut output = Vec::new();
    while !String::from_utf8_lossy(&output).contains(needle) {
        match tokio::time::timeout(DEADLINE, pty.next())
            .await
            .expect("output in time")
        {
            Some(PtyEvent::Output(bytes)) => output.extend_from_slice(&bytes),
            other => panic!("expected output with {needle:?}, got {other:?}"),
        }
    }
    output
}

#[tokio::test]
async fn a_long_stream_arrives_byte_exact_over_the_relay() {
    let rig = Rig::start(&[]).await;
    let session = rig.session().await;
    let mut pty = session
        .attach_pty(attach_request(Some("seq 1 300000")))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    assert_eq!(code, 0);
    let expected: String = (1..=300_000).map(|n| format!("{n}\r\n")).collect();
    assert_eq!(output.len(), expected.len());
    assert!(
        output == expected.as_bytes(),
        "byte-exact, in order, no duplicates"
    );
    let (relayed_bytes, _) = rig.server.hub.relayed();
    assert!(
        relayed_bytes as usize > expected.len(),
        "it went through the relay"
    );
}

#[tokio::test]
async fn typing_resizing_and_closing_a_terminal() {
    let rig = Rig::start(&[]).await;
    let session = rig.session().await;
    let mut pty = session
        .attach_pty(attach_request(Some(
            "PS1='PROMPT> ' exec bash --norc --noprofile",
        )))
        .await
        .unwrap();
    read_until(&mut pty, "PROMPT> ").await;
    pty.write(b"echo $((6*7))\n").await.unwrap();
    read_until(&mut pty, "42\r\n").await;
    pty.resize(120, 40).await.unwrap();
    pty.write(b"stty size\n").await.unwrap();
    read_until(&mut pty, "40 120").await;
    let rtt = session.ping().await.unwrap();
    assert!(rtt < Duration::from_secs(5));
    pty.close().await.unwrap();
    let (_, code) = drain_pty(&mut pty).await;
    assert_ne!(code, 0, "closed by a signal");
}

#[tokio::test]
async fn results_larger_than_a_frame_arrive_intact() {
    let rig = Rig::start(&[]).await;
    let session = rig.session().await;
    let response = session
        .request(Request::Execute(execute_request(
            "head -c 200000 /dev/zero | tr '\\0' x",
        )))
        .await
        .unwrap();
    let Response::ExecuteResult(result) = response else {
        panic!("execute_result, got {response:?}")
    };
    assert_eq!(result.data.stdout.len(), 200_000);
    assert!(result.data.stdout.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn terminals_on_one_session_stay_apart() {
    let rig = Rig::start(&[]).await;
    let session = rig.session().await;
    let mut terminals = Vec::new();
    for n in 0..5 {
        terminals.push((
            n,
            session
                .attach_pty(attach_request(Some(&format!("seq {n} 3 20000"))))
                .await
                .unwrap(),
        ));
    }
    for (n, mut pty) in terminals {
        let (output, code) = drain_pty(&mut pty).await;
        assert_eq!(code, 0);
        let expected: String = (n..=20000).step_by(3).map(|i| format!("{i}\r\n")).collect();
        assert!(
            output == expected.as_bytes(),
            "terminal {n} got its own bytes"
        );
    }
}
