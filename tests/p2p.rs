//! Sessions that move from the relay to a WebRTC data channel, on loopback.

mod common;

use std::time::Duration;

use cocoon::link::rtc::Path;
use cocoon::session::client::PtyEvent;
use cocoon_signaling::protocol::service::{ProxyHttp, Request, Response};
use common::netns::Netns;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_bytes_flow_on_a_direct_data_channel() {
    let web = common::http::upstream().await;
    let services = format!("web:{}", web.addr.port());
    let mut env = LOOPBACK_RTC_ENV.to_vec();
    env.push(("COCOON_SERVICES", &services));
    let rig = Rig::start(&env).await;
    let session = rig.rtc_session(loopback_rtc()).await;
    let status = session
        .wait_for_path(Path::Direct, Duration::from_secs(15))
        .await
        .expect("a direct path on loopback");
    // Direct: host candidates on both ends (a peer-reflexive candidate is a
    // host address learned from a connectivity check before its signaling).
    let (local, remote) = status.candidates.expect("a selected pair");
    for kind in [&local, &remote] {
        assert!(
            kind == "host" || kind == "prflx",
            "pair {local}/{remote} is not direct"
        );
    }

    let (relayed_before, _) = rig.server.hub.relayed();
    let mut pty = session
        .attach_pty(attach_request(Some("seq 1 300000")))
        .await
        .unwrap();
    let (output, code) = drain_pty(&mut pty).await;
    assert_eq!(code, 0);
    let expected: String = (1..=300_000).map(|n| format!("{n}\r\n")).collect();
    assert!(
        output == expected.as_bytes(),
        "byte-exact over the data channel"
    );
    let (relayed_after, _) = rig.server.hub.relayed();
    assert!(
        relayed_after - relayed_before < 16 * 1024,
        "the relay carried {} bytes of a {}-byte stream",
        relayed_after - relayed_before,
        expected.len()
    );

    let response = session
        .request(Request::Execute(execute_request(
            "head -c 100000 /dev/zero | tr '\\0' y",
        )))
        .await
        .unwrap();
    let Response::ExecuteResult(result) = response else {
        panic!("execute_result")
    };
    assert_eq!(
        result.data.stdout.len(),
        100_000,
        "larger than a frame, intact"
    );

    let response = session
        .request(Request::ProxyHttp(ProxyHttp {
            request_id: "big".into(),
            service_name: "web".into(),
            method: "GET".into(),
            path: "/big".into(),
            headers: Default::default(),
            body: None,
            body_encoding: Default::default(),
        }))
        .await
        .unwrap();
    let Response::ProxyResult(result) = response else {
        panic!("proxy_result")
    };
    assert_eq!(result.status_code, 200);
    assert_eq!(result.body.as_deref().map(str::len), Some(200_000));
    assert!(result.body.unwrap().bytes().all(|b| b == b'z'));
    assert_eq!(
        session.path().await.unwrap().path,
        Path::Direct,
        "still on the data channel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_prompt_does_not_wait_for_ice() {
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    // A client whose candidates can never reach the worker: ICE cannot
    // succeed, yet the terminal works at once over the relay.
    let mut unreachable = loopback_rtc();
    unreachable.allowed_networks = vec![cocoon::link::rtc::parse_network("192.0.2.1/32").unwrap()];
    unreachable.include_loopback = false;
    unreachable.ice_timeout = Duration::from_secs(2);
    let session = rig.rtc_session(unreachable).await;
    let mut pty = session
        .attach_pty(attach_request(Some("echo first-prompt")))
        .await
        .unwrap();
    let (output, _) = drain_pty(&mut pty).await;
    assert_eq!(output, b"first-prompt\r\n");
    let status = session.path().await.unwrap();
    assert_eq!(status.path, Path::Relay);
    assert!(!status.settled_on_relay);
    wait_settled(&session).await;
    let mut pty = session
        .attach_pty(attach_request(Some("echo still-here")))
        .await
        .unwrap();
    assert_eq!(drain_pty(&mut pty).await.0, b"still-here\r\n");
}

/// Prints `seq 1 3000000` in 60 slices a tenth of a second apart, so the
/// stream lasts long enough for the path to change under it.
const PACED_SEQ: &str =
    "for i in $(seq 1 60); do seq $((i*50000-49999)) $((i*50000)); sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_survives_switching_paths_both_ways() {
    let ns = Netns::create();
    let rig = Rig::start_in(&ns, &[]).await;
    let rtc = netns_rtc(&ns);

    // UDP blocked between the peers: the session starts on the relay.
    ns.block_udp();
    let session = rig.rtc_session(rtc).await;
    let mut pty = session
        .attach_pty(attach_request(Some(PACED_SEQ)))
        .await
        .unwrap();

    // Phases: 0 relay → (unblock) 1 waiting for P2P → 2 on P2P →
    // (block) 3 waiting for the relay → 4 back on the relay.
    let mut phase = 0;
    let mut up_at = 0;
    let mut output = Vec::new();
    let mut next_check = 0;
    let code = loop {
        let Ok(next) = tokio::time::timeout(DEADLINE, pty.next()).await else {
            panic!(
                "output stalled after {} bytes in phase {phase}",
                output.len()
            );
        };
        match next {
            Some(PtyEvent::Output(bytes)) => output.extend_from_slice(&bytes),
            Some(PtyEvent::Exited(code)) => break code,
            other => panic!("a live client got {other:?}"),
        }
        if output.len() < next_check {
            continue;
        }
        next_check = output.len() + 32 * 1024;
        let path = session.path().await.unwrap().path;
        match phase {
            0 if output.len() > 1 << 20 => {
                assert_eq!(path, Path::Relay);
                ns.unblock_udp();
                phase = 1;
            }
            1 if path == Path::Direct => {
                up_at = output.len();
                phase = 2;
            }
            2 if output.len() > up_at + (2 << 20) => {
                ns.block_udp();
                phase = 3;
            }
            3 if path == Path::Relay => phase = 4,
            _ => {}
        }
    };
    assert_eq!(phase, 4, "both switches happened while the stream ran");
    assert_eq!(code, 0);
    let expected: String = (1..=3_000_000).map(|n| format!("{n}\r\n")).collect();
    assert_eq!(output.len(), expected.len(), "no byte lost or duplicated");
    assert!(output == expected.as_bytes(), "and in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_the_relay_serves_from_the_first_keystroke() {
    let ns = Netns::create();
    ns.block_udp();
    let rig = Rig::start_in(&ns, &[]).await;
    let mut rtc = netns_rtc(&ns);
    rtc.ice_timeout = Duration::from_secs(3);
    let session = rig.rtc_session(rtc).await;
    let mut pty = session
        .attach_pty(attach_request(Some(
            "PS1='PROMPT> ' exec bash --norc --noprofile",
        )))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut typed = false;
    while !String::from_utf8_lossy(&seen).contains("42\r\n") {
        let Ok(Some(PtyEvent::Output(bytes))) = tokio::time::timeout(DEADLINE, pty.next()).await
        else {
            panic!(
                "no answer over the relay: {:?}",
                String::from_utf8_lossy(&seen)
            );
        };
        seen.extend_from_slice(&bytes);
        if !typed && String::from_utf8_lossy(&seen).contains("PROMPT> ") {
            pty.write(b"echo $((6*7))\n").await.unwrap();
            typed = true;
        }
    }
    assert_eq!(session.path().await.unwrap().path, Path::Relay);
    wait_settled(&session).await;
    pty.write(b"echo $((7*7))\n").await.unwrap();
    let mut after = Vec::new();
    while !String::from_utf8_lossy(&after).contains("49\r\n") {
        let Ok(Some(PtyEvent::Output(bytes))) = tokio::time::timeout(DEADLINE, pty.next()).await
        else {
            panic!("the relay stopped serving");
        };
        after.extend_from_slice(&bytes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_client_sends_its_terminal_over_the_data_channel_only() {
    let rig = Rig::start(LOOPBACK_RTC_ENV).await;
    let mut rtc = loopback_rtc();
    rtc.strict = true;
    let session = rig.rtc_session(rtc).await;
    // The attach waits for the data channel instead of using the relay.
    let mut pty = session
        .attach_pty(attach_request(Some("echo strict-$((2+2))")))
        .await
        .unwrap();
    assert_eq!(session.path().await.unwrap().path, Path::Direct);
    let (output, code) = drain_pty(&mut pty).await;
    assert_eq!((output.as_slice(), code), (&b"strict-4\r\n"[..], 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_worker_serves_the_relay_only_after_the_ice_timeout() {
    let ns = Netns::create();
    ns.block_udp();
    let rig = Rig::start_in(
        &ns,
        &[("COCOON_STRICT_P2P", "true"), ("WEBRTC_ICE_TIMEOUT", "2s")],
    )
    .await;
    let session = rig.rtc_session(netns_rtc(&ns)).await;
    let started = std::time::Instant::now();
    let mut pty = session
        .attach_pty(attach_request(Some("echo late")))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the worker held the request until its ICE timeout ({:?})",
        started.elapsed()
    );
    let (output, _) = drain_pty(&mut pty).await;
    assert_eq!(output, b"late\r\n");
    assert_eq!(session.path().await.unwrap().path, Path::Relay);
}

/// Types a command and reads until `needle` appears.
async fn run_in(pty: &mut cocoon::session::client::Pty, command: &str, needle: &str) {
    pty.write(command.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let Ok(Some(PtyEvent::Output(bytes))) = tokio::time::timeout(DEADLINE, pty.next()).await
        else {
            panic!("no {needle:?} in {:?}", String::from_utf8_lossy(&seen));
        };
        seen.extend_from_slice(&bytes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_direct_path_falls_back_and_comes_back() {
    let ns = Netns::create();
    let rig = Rig::start_in(&ns, &[]).await;
    let session = rig.rtc_session(netns_rtc(&ns)).await;
    let mut pty = session
        .attach_pty(attach_request(Some(
            "PS1='PROMPT> ' exec bash --norc --noprofile",
        )))
        .await
        .unwrap();
    session.wait_for_path(Path::Direct, DEADLINE).await.unwrap();
    run_in(&mut pty, "echo one-$((1))\n", "one-1\r\n").await;

    ns.block_udp();
    session.wait_for_path(Path::Relay, DEADLINE).await.unwrap();
    run_in(&mut pty, "echo two-$((2))\n", "two-2\r\n").await;

    ns.unblock_udp();
    session.wait_for_path(Path::Direct, DEADLINE).await.unwrap();
    run_in(&mut pty, "echo three-$((3))\n", "three-3\r\n").await;
}

/// A first attempt that fails (here: UDP blocked) is not the end of the ICE
/// timeout: the client tries again, and a path that opens meanwhile is
/// used long before the timeout would have settled on the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_attempt_is_tried_again_within_the_ice_timeout() {
    tried_again_after(Netns::block_udp, Netns::unblock_udp).await;
}

/// ICE can succeed and a handshake above it still hang — here every
/// datagram too big for a STUN check is dropped, so the checks pass and
/// DTLS's certificate flight never arrives — with no connection state to
/// say so: the client gives such an attempt up after a while and tries
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_stuck_above_ice_is_tried_again() {
    tried_again_after(Netns::block_large_udp, Netns::unblock_large_udp).await;
}

/// With the worker's namespace hampered by `block`, the client's first
/// attempt goes nowhere; it must make a second one (30 s at most, on the
/// relay until then), which takes the direct path once `unblock` lifts the
/// hindrance — long before the ICE timeout would have settled on the relay.
async fn tried_again_after(block: fn(&Netns), unblock: fn(&Netns)) {
    let ns = Netns::create();
    block(&ns);
    let rig = Rig::start_in(&ns, &[]).await;
    let mut rtc = netns_rtc(&ns);
    rtc.ice_timeout = Duration::from_secs(60);
    let session = rig.rtc_session(rtc).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = session.path().await.unwrap();
        assert_eq!(status.path, Path::Relay);
        if status.offers >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no second attempt after the first went nowhere: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unblock(&ns);
    session
        .wait_for_path(Path::Direct, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!session.path().await.unwrap().settled_on_relay);
}

/// Polls the session until it reports that it settled on the relay.
async fn wait_settled(session: &cocoon::session::client::Session) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while !session.path().await.unwrap().settled_on_relay {
        assert!(
            std::time::Instant::now() < deadline,
            "never settled on the relay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
