//! The browser terminal in real Chromium (Debian's, driven by playwright-core)
//! inside a network namespace, against a real server and worker on this side
//! of the namespace's link. Each test runs one scenario of
//! `tests/browser/driver.mjs`; screenshots land in
//! `target/tmp/browser-artifacts/` (never committed).

mod common;

use cocoon_signaling::auth::TokenKind;
use common::Rig;
use common::netns::Netns;

/// Runs a driver scenario in Chromium inside `ns` against `rig`'s server.
async fn drive(ns: &Netns, rig: &Rig, scenario: &str) {
    let token = rig.server.token(TokenKind::Access, "alice");
    let base = format!("http://{}", rig.server.addr);
    common::drive_browser(&ns.name, &base, &token, scenario).await;
}

/// A namespace for the browser and a rig facing it.
async fn setup(env: &[(&str, &str)]) -> (Netns, Rig) {
    common::web_root();
    let ns = Netns::create();
    ns.default_route();
    let rig = Rig::start_for_browser(&ns, env).await;
    (ns, rig)
}

#[tokio::test]
async fn answers_over_p2p_and_follows_the_window() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "p2p").await;
}

#[tokio::test]
async fn works_over_the_relay_when_udp_is_blocked() {
    let (ns, rig) = setup(&[]).await;
    ns.block_udp();
    drive(&ns, &rig, "relay").await;
}

#[tokio::test]
async fn tries_again_when_an_attempt_stalls_above_ice() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "stalled").await;
}

#[tokio::test]
async fn vim_survives_a_reload() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "vim").await;
}

#[tokio::test]
async fn ctrl_c_stops_a_flood_at_once() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "flood").await;
}

#[tokio::test]
async fn resumes_after_the_connection_drops() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "reconnect").await;
}

#[tokio::test]
async fn survives_a_network_outage() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "outage").await;
}

#[tokio::test]
async fn resumes_after_the_worker_reconnects() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "worker").await;
}

#[tokio::test]
async fn copies_and_pastes() {
    let (ns, rig) = setup(&[]).await;
    drive(&ns, &rig, "clipboard").await;
}

#[tokio::test]
async fn runs_commands_and_opens_services() {
    let upstream = common::http::upstream().await;
    let services = format!("web:{}", upstream.addr.port());
    let (ns, rig) = setup(&[("COCOON_SERVICES", &services)]).await;
    drive(&ns, &rig, "tools").await;
}
