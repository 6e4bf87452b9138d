//! The NAT + TURN test network itself: NAT behaviour as STUN sees it, the
//! switch for direct UDP between the NATs, coturn restarts, clean-up.

mod common;

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::natnet::*;
use tokio::net::UdpSocket;

/// The addresses coturn's two STUN ports map one new socket in `host` to.
fn mapped_pair(net: &NatNet, host: Host) -> (Option<SocketAddr>, Option<SocketAddr>) {
    net.spawn_in(host, || async {
        let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let main = stun_mapped(&socket, (NatNet::PUB_IP, NatNet::TURN_PORT).into()).await;
        let alt = stun_mapped(&socket, (NatNet::PUB_IP, NatNet::TURN_ALT_PORT).into()).await;
        (main, alt)
    })
    .join()
    .unwrap()
}

/// Both STUN ports answer one socket from `host` with `nat_ip`; returns the
/// two mapped ports.
fn mapped_ports(net: &NatNet, host: Host, nat_ip: std::net::Ipv4Addr) -> (u16, u16) {
    let (main, alt) = mapped_pair(net, host);
    let (main, alt) = (
        main.expect("port 3478 answers"),
        alt.expect("port 3479 answers"),
    );
    assert_eq!(main.ip(), nat_ip, "{host:?} is seen at its NAT");
    assert_eq!(alt.ip(), nat_ip, "{host:?} is seen at its NAT");
    (main.port(), alt.port())
}

/// Drops the network and checks that none of its namespaces is left.
fn drop_and_check(net: NatNet) {
    let names = net.namespaces();
    drop(net);
    let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&output.stdout);
    for line in listed.lines() {
        let listed_name = line.split_whitespace().next().unwrap_or_default();
        assert!(
            !names.iter().any(|n| n == listed_name),
            "{listed_name} is left"
        );
    }
}

#[test]
fn stun_sees_hard_and_easy_nats() {
    let mut net = NatNet::create(NatOptions {
        worker_nat_hard: true,
        client_nat_hard: false,
        block_direct_udp: true,
    });
    net.start_coturn("natnet-test-secret");

    let (main, alt) = mapped_ports(&net, Host::Worker, NatNet::WORKER_NAT_IP);
    assert_ne!(
        main, alt,
        "a hard NAT maps each destination to its own port"
    );

    net.set_worker_nat_hard(false);
    let (main, alt) = mapped_ports(&net, Host::Worker, NatNet::WORKER_NAT_IP);
    assert_eq!(main, alt, "an easy NAT keeps one mapping per socket");

    // The client side reaches the Internet's coturn too, direct UDP blocked
    // or not (that only stops traffic between the NATs).
    let (main, alt) = mapped_ports(&net, Host::Client, NatNet::CLIENT_NAT_IP);
    assert_eq!(main, alt, "the client's NAT is easy");

    drop_and_check(net);
}

/// A UDP socket made inside `host`'s namespace (it stays there).
fn socket_in(net: &NatNet, host: Host, addr: SocketAddr) -> StdUdpSocket {
    net.spawn_in(
        host,
        move || async move { StdUdpSocket::bind(addr).unwrap() },
    )
    .join()
    .unwrap()
}

/// Whether a datagram from the worker host reaches the client's NAT.
fn direct_udp_arrives(net: &NatNet) -> bool {
    let receiver = socket_in(net, Host::NatC, (NatNet::CLIENT_NAT_IP, 0).into());
    receiver
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let sender = socket_in(net, Host::Worker, ([0, 0, 0, 0], 0).into());
    sender
        .send_to(b"direct", receiver.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 16];
    match receiver.recv_from(&mut buf) {
        Ok((len, from)) => {
            assert_eq!(&buf[..len], b"direct");
            assert_eq!(from.ip(), NatNet::WORKER_NAT_IP, "sent through the NAT");
            true
        }
        Err(_) => false,
    }
}

#[test]
fn direct_udp_can_be_blocked_and_coturn_restarted() {
    let mut net = NatNet::create(NatOptions {
        worker_nat_hard: true,
        client_nat_hard: true,
        block_direct_udp: true,
    });
    assert!(!direct_udp_arrives(&net), "pub drops UDP between the NATs");
    net.unblock_direct_udp();
    assert!(direct_udp_arrives(&net), "pub forwards UDP again");
    net.block_direct_udp();
    assert!(!direct_udp_arrives(&net), "and drops it again");

    net.start_coturn("natnet-test-secret");
    assert!(net.coturn_running());
    net.stop_coturn();
    assert!(!net.coturn_running());
    let answer = net
        .spawn_in(Host::Worker, || async {
            let socket = UdpSocket::bind("0.0.0.0:0").await.unwrap();
            stun_mapped(&socket, (NatNet::PUB_IP, NatNet::TURN_PORT).into()).await
        })
        .join()
        .unwrap();
    assert_eq!(answer, None, "no STUN answer from a stopped coturn");
    net.start_coturn("natnet-test-secret");
    assert!(net.coturn_running());
    mapped_ports(&net, Host::Worker, NatNet::WORKER_NAT_IP);
    let started = "Relay ports initialization done";
    assert_eq!(
        net.coturn_log().matches(started).count(),
        2,
        "the log spans restarts"
    );

    drop_and_check(net);
}

/// A secret only this file uses, to look for in the process list.
const SECRET: &str = "natnet-turn-secret-7f3a";

/// Allocates a relay on coturn with REST credentials made from `secret`,
/// sends one datagram from it to `peer`, and keeps the allocation until
/// `done` fires; returns the relayed address.
async fn relay_to(
    secret: &str,
    peer: SocketAddr,
    done: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<SocketAddr> {
    use webrtc::turn::auth::generate_long_term_credentials;
    use webrtc::turn::client::{Client, ClientConfig};
    use webrtc::util::Conn;

    let (username, password) = generate_long_term_credentials(secret, Duration::from_secs(600))?;
    let server = format!("{}:{}", NatNet::PUB_IP, NatNet::TURN_PORT);
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.clone(),
        turn_serv_addr: server,
        username,
        password,
        realm: NatNet::REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(UdpSocket::bind("0.0.0.0:0").await?),
        vnet: None,
    })
    .await?;
    client.listen().await?;
    let relay = client.allocate().await?;
    let relayed = relay.local_addr()?;
    relay.send_to(b"relayed", peer).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
    client.close().await?;
    Ok(relayed)
}

#[test]
fn coturn_relays_with_rest_credentials_only() {
    let mut net = NatNet::create(NatOptions {
        worker_nat_hard: true,
        client_nat_hard: true,
        block_direct_udp: true,
    });
    net.start_coturn(SECRET);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(SECRET), "the secret is on a command line");
    }

    // From the worker host, through its NAT, to the client's NAT: the relay
    // carries what direct UDP cannot.
    let peer = socket_in(&net, Host::NatC, (NatNet::CLIENT_NAT_IP, 0).into());
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (done, done_rx) = tokio::sync::oneshot::channel();
    let relay = net.spawn_in(Host::Worker, move || relay_to(SECRET, peer_addr, done_rx));
    let mut buf = [0u8; 16];
    let received = peer.recv_from(&mut buf);
    let _ = done.send(());
    let relayed = relay
        .join()
        .unwrap()
        .expect("a relay with the right secret");
    assert_eq!(relayed.ip(), NatNet::PUB_IP);
    assert!((49152..=49400).contains(&relayed.port()), "{relayed}");
    let (len, from) = received.expect("the relayed datagram arrives");
    assert_eq!((&buf[..len], from), (&b"relayed"[..], relayed));

    let (_done, done_rx) = tokio::sync::oneshot::channel();
    let wrong = net
        .spawn_in(Host::Worker, move || {
            relay_to("not-the-secret", peer_addr, done_rx)
        })
        .join()
        .unwrap();
    let wrong = wrong.expect_err("a wrong secret gets no relay");
    assert!(wrong.to_string().contains("401"), "{wrong}");

    drop_and_check(net);
}

#[tokio::test]
async fn run_in_awaits_a_thread_inside_the_namespace() {
    use futures_util::FutureExt;

    let net = tokio::task::spawn_blocking(|| NatNet::create(NatOptions::default()))
        .await
        .unwrap();
    // Only the client host has this address to bind.
    let bound = net
        .run_in(Host::Client, || async {
            let socket = UdpSocket::bind((NatNet::CLIENT_IP, 0)).await.unwrap();
            // Spawned tasks run on that thread's runtime, in the namespace.
            tokio::spawn(async move { socket.local_addr().unwrap() })
                .await
                .unwrap()
        })
        .await;
    assert_eq!(bound.ip(), NatNet::CLIENT_IP);
    let panicked = std::panic::AssertUnwindSafe(net.run_in(Host::Client, || async {
        panic!("a failure inside the namespace")
    }))
    .catch_unwind()
    .await;
    assert!(panicked.is_err(), "the panic reaches the caller");
    tokio::task::spawn_blocking(move || drop_and_check(net))
        .await
        .unwrap();
}
