//! Serving one registered signaling connection: requests in, replies and
//! relayed session frames out, one peer task per session-layer client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cocoon_signaling::protocol::{ClientId, FromServer, ToServer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::link::rtc::RtcConfig;
use crate::link::ws::{Incoming, WsLink};
use crate::services::{Outgoing, ReplyTo, Services};
use crate::session::peer::PeerHandle;

/// With no frame from the server (it pings every 20 s) for this long, the
/// connection is presumed dead.
const SERVER_SILENCE: Duration = Duration::from_secs(60);
/// Most session-layer clients at once.
const MAX_PEERS: usize = 1024;

/// What the worker keeps across signaling connections.
pub struct Node {
    /// The services.
    pub services: Arc<Services>,
    /// Where replies for the signaling connection are queued.
    pub out: mpsc::Sender<Outgoing>,
    /// The other end of `out`.
    pub outbound: mpsc::Receiver<Outgoing>,
    /// WebRTC settings for peers.
    pub rtc: Option<Arc<RtcConfig>>,
}

/// Why serving stopped.
pub enum Ended {
    /// Shutdown was requested.
    Shutdown,
    /// The connection dropped.
    Lost,
}

/// Serves a registered connection until it drops or shutdown. Sessions of
/// the clients it served are detached when it ends (they resume later).
pub async fn serve(link: &mut WsLink, node: &mut Node, shutdown: &CancellationToken) -> Ended {
    let mut peers: HashMap<ClientId, PeerHandle> = HashMap::new();
    let ended = serve_loop(link, node, &mut peers, shutdown).await;
    for client in peers.keys() {
        node.services.client_left(client);
    }
    ended
}

async fn serve_loop(
    link: &mut WsLink,
    node: &mut Node,
    peers: &mut HashMap<ClientId, PeerHandle>,
    shutdown: &CancellationToken,
) -> Ended {
    let mut silence = tokio::time::interval(SERVER_SILENCE / 12);
    // Ask for the server's STUN/TURN servers now and again at half their
    // credentials' lifetime (a server without any answers with an empty list).
    let mut ask_ice_at = node.rtc.as_ref().map(|_| Instant::now());
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = sleep_until_some(ask_ice_at) => {
                ask_ice_at = None;
                if let Err(err) = link.send(&ToServer::GetIceServers {}).await {
                    tracing::warn!(err = format!("{err:#}"), "signaling connection failed");
                    return Ended::Lost;
                }
                continue;
            }
            _ = silence.tick() => {
                if link.silent_for() >= SERVER_SILENCE {
                    tracing::warn!("the signaling server went silent");
                    return Ended::Lost;
                }
                continue;
            }
            incoming = link.recv_any() => incoming,
            Some(outgoing) = node.outbound.recv() => {
                if let Err(err) = send(link, outgoing).await {
                    tracing::warn!(err = format!("{err:#}"), "signaling connection failed");
                    return Ended::Lost;
                }
                continue;
            }
        };
        let incoming = match incoming {
            Ok(Some(incoming)) => incoming,
            Ok(None) => return Ended::Lost,
            Err(err) => {
                tracing::warn!(err = format!("{err:#}"), "signaling connection failed");
                return Ended::Lost;
            }
        };
        match incoming {
            Incoming::Message(FromServer::IceServers {
                ice_servers,
                ttl_secs,
            }) => {
                if let Some(rtc) = &node.rtc {
                    tracing::info!(
                        servers = ice_servers.len(),
                        ttl_secs,
                        "ICE servers from the signaling server"
                    );
                    rtc.issued
                        .set(ice_servers.into_iter().map(Into::into).collect());
                    let refresh = Duration::from_secs(ttl_secs.max(10) / 2);
                    ask_ice_at = Some(Instant::now() + refresh);
                }
            }
            Incoming::Message(FromServer::ServerRestarting {}) => {
                tracing::info!("the signaling server is restarting; reconnecting");
                return Ended::Lost;
            }
            Incoming::Message(message) => on_message(node, peers, message),
            Incoming::Relay { from, frame } => {
                let client = ClientId::new(from);
                if !peers.contains_key(&client) && peers.len() >= MAX_PEERS {
                    tracing::warn!(client_id = %client, "too many session clients; frame dropped");
                    continue;
                }
                let peer = peers.entry(client.clone()).or_insert_with(|| {
                    PeerHandle::spawn(
                        client,
                        node.services.clone(),
                        node.out.clone(),
                        node.rtc.clone(),
                    )
                });
                peer.deliver(frame);
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn on_message(node: &Node, peers: &mut HashMap<ClientId, PeerHandle>, message: FromServer) {
    match message {
        FromServer::SyncData {
            payload,
            client_id: Some(client),
            ..
        } => {
            let reply = ReplyTo {
                client,
                out: node.out.clone(),
            };
            node.services.handle(reply, payload);
        }
        FromServer::ClientLeft { client_id } => {
            peers.remove(&client_id);
            node.services.client_left(&client_id);
        }
        FromServer::Error { code, message } => {
            tracing::debug!(?code, %message, "error from the signaling server");
        }
        other => tracing::debug!(?other, "ignoring message"),
    }
}

async fn send(link: &mut WsLink, outgoing: Outgoing) -> anyhow::Result<()> {
    match outgoing {
        Outgoing::Response { client, response } => {
            let payload = serde_json::to_value(&response).expect("responses serialize");
            link.send(&ToServer::SyncData {
                payload,
                device_id: None,
                client_id: Some(client),
            })
            .await
        }
        Outgoing::Frame { client, frame } => link.send_relay(client.as_str(), &frame).await,
        Outgoing::Stream { .. } | Outgoing::StreamEnd { .. } => {
            tracing::warn!("stream data without a session peer dropped");
            Ok(())
        }
    }
}
