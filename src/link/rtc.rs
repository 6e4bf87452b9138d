//! WebRTC data channels as a link: ICE configuration, a peer connection
//! whose callbacks only forward events into a bounded queue, and a sender
//! that respects the channel's buffered amount.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cocoon_signaling::protocol::service::IceCandidate;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc};
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice::udp_network::{EphemeralUDP, UDPNetwork};
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

/// The data channel's label.
pub const CHANNEL_LABEL: &str = "cocoon";
/// Data-channel messages queued from one peer connection's callbacks;
/// beyond this they are dropped (and resent by the session layer).
const MESSAGE_QUEUE: usize = 1024;
/// Other events (candidates, open, close, state) queued; kept apart from
/// messages so that a flood of data never crowds out a state change.
const SIGNAL_QUEUE: usize = 256;
/// Sending waits while more than this is buffered in the channel.
const HIGH_WATER: usize = 1024 * 1024;
/// …and resumes once it drains below this.
const LOW_WATER: usize = 256 * 1024;
/// A channel that stays above the high water mark this long is stalled.
const STALL: Duration = Duration::from_secs(2);

/// A STUN or TURN server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, …
    #[serde(deserialize_with = "one_or_many")]
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(default)]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default)]
    pub credential: Option<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(url) => vec![url],
        OneOrMany::Many(urls) => urls,
    })
}

/// Parses `WEBRTC_ICE_SERVERS`: comma-separated URLs (the spec's form, with
/// `WEBRTC_TURN_USERNAME`/`WEBRTC_TURN_CREDENTIAL` applied to `turn:` URLs),
/// or a JSON array of `{urls, username, credential}`.
pub fn parse_ice_servers(
    text: &str,
    username: Option<&str>,
    credential: Option<&str>,
) -> Result<Vec<IceServer>, String> {
    let text = text.trim();
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(|err| format!("invalid ICE server JSON: {err}"));
    }
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            let scheme = url.split(':').next().unwrap_or("");
            if !matches!(scheme, "stun" | "stuns" | "turn" | "turns") {
                return Err(format!(
                    "ICE server {url:?} must start with stun:, stuns:, turn: or turns:"
                ));
            }
            let turn = scheme.starts_with("turn");
            Ok(IceServer {
                urls: vec![url.to_owned()],
                username: username.filter(|_| turn).map(str::to_owned),
                credential: credential.filter(|_| turn).map(str::to_owned),
            })
        })
        .collect()
}

/// How a side sets up WebRTC.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// STUN and TURN servers.
    pub ice_servers: Vec<IceServer>,
    /// Gather loopback candidates (single-host setups and tests).
    pub include_loopback: bool,
    /// Gather candidates only on these addresses or networks (empty: all).
    pub allowed_networks: Vec<(IpAddr, u8)>,
    /// Local UDP port range.
    pub port_range: Option<(u16, u16)>,
    /// Public addresses of a 1:1 NAT to announce as host candidates.
    pub nat_1to1_ips: Vec<String>,
    /// Use only TURN relay candidates.
    pub relay_only: bool,
    /// Give up on a direct path after this long and stay on the relay.
    pub ice_timeout: Duration,
    /// Strict: no service traffic on the relay until the data channel is
    /// open or the ICE timeout has passed (the spec's literal behaviour);
    /// only WebRTC signaling uses the relay before that.
    pub strict: bool,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            include_loopback: false,
            allowed_networks: Vec::new(),
            port_range: None,
            nat_1to1_ips: Vec::new(),
            relay_only: false,
            ice_timeout: Duration::from_secs(30),
            strict: false,
        }
    }
}

/// Parses `ADDRESS[/PREFIX]`.
pub fn parse_network(text: &str) -> Result<(IpAddr, u8), String> {
    let (ip, prefix) = text.split_once('/').unwrap_or((text, ""));
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("invalid address {text:?}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("invalid prefix in {text:?}"))?
    };
    Ok((ip, prefix))
}

fn in_network(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// What a peer connection reports, in order.
pub enum RtcEvent {
    /// A local candidate to send to the other side.
    Candidate(IceCandidate),
    /// The data channel is open.
    Open(Arc<RTCDataChannel>),
    /// A message on the data channel.
    Message(Bytes),
    /// The data channel closed.
    Closed,
    /// The connection's state changed.
    State(RTCPeerConnectionState),
}

/// One WebRTC peer connection.
pub struct RtcPeer {
    /// The connection.
    pub pc: Arc<RTCPeerConnection>,
    senders: Senders,
}

/// Where a connection's callbacks put what they see.
#[derive(Clone)]
struct Senders {
    signals: mpsc::Sender<RtcEvent>,
    messages: mpsc::Sender<Bytes>,
}

/// What a connection's callbacks saw, in two queues.
pub struct Events {
    signals: mpsc::Receiver<RtcEvent>,
    messages: mpsc::Receiver<Bytes>,
}

impl Events {
    /// The next event; signals first.
    pub async fn recv(&mut self) -> Option<RtcEvent> {
        tokio::select! {
            biased;
            signal = self.signals.recv() => signal,
            message = self.messages.recv() => message.map(RtcEvent::Message),
        }
    }
}

impl RtcPeer {
    /// A new connection whose events go to the returned queue.
    pub async fn new(config: &RtcConfig) -> anyhow::Result<(Self, Events)> {
        let mut engine = SettingEngine::default();
        // Notice a dead path in 2 s (defaults: 5 s, failed after 25 s) so
        // traffic falls back to the relay quickly.
        engine.set_ice_timeouts(
            Some(Duration::from_secs(2)),
            Some(Duration::from_secs(6)),
            Some(Duration::from_millis(500)),
        );
        engine.set_include_loopback_candidate(config.include_loopback);
        engine.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
        engine.set_network_types(vec![NetworkType::Udp4, NetworkType::Udp6]);
        if !config.allowed_networks.is_empty() {
            let allowed = config.allowed_networks.clone();
            engine.set_ip_filter(Box::new(move |ip| {
                allowed.iter().any(|net| in_network(ip, *net))
            }));
        }
        if let Some((min, max)) = config.port_range {
            let ephemeral = EphemeralUDP::new(min, max).context("invalid UDP port range")?;
            engine.set_udp_network(UDPNetwork::Ephemeral(ephemeral));
        }
        if !config.nat_1to1_ips.is_empty() {
            engine.set_nat_1to1_ips(config.nat_1to1_ips.clone(), RTCIceCandidateType::Host);
        }
        let api = APIBuilder::new().with_setting_engine(engine).build();
        let rtc_config = RTCConfiguration {
            ice_servers: config
                .ice_servers
                .iter()
                .map(|server| RTCIceServer {
                    urls: server.urls.clone(),
                    username: server.username.clone().unwrap_or_default(),
                    credential: server.credential.clone().unwrap_or_default(),
                })
                .collect(),
            ice_transport_policy: if config.relay_only {
                RTCIceTransportPolicy::Relay
            } else {
                RTCIceTransportPolicy::All
            },
            ..Default::default()
        };
        let pc = Arc::new(api.new_peer_connection(rtc_config).await?);
        let (signals, signals_rx) = mpsc::channel(SIGNAL_QUEUE);
        let (messages, messages_rx) = mpsc::channel(MESSAGE_QUEUE);
        let senders = Senders { signals, messages };
        let tx = senders.signals.clone();
        pc.on_ice_candidate(Box::new(move |candidate| {
            let tx = tx.clone();
            Box::pin(async move {
                if let Some(candidate) = candidate.and_then(|c| c.to_json().ok()) {
                    let _ = tx.try_send(RtcEvent::Candidate(to_protocol(candidate)));
                }
            })
        }));
        let tx = senders.signals.clone();
        pc.on_peer_connection_state_change(Box::new(move |state| {
            let _ = tx.try_send(RtcEvent::State(state));
            Box::pin(async {})
        }));
        let tx = senders.clone();
        pc.on_data_channel(Box::new(move |channel| {
            wire(channel, tx.clone());
            Box::pin(async {})
        }));
        let events = Events {
            signals: signals_rx,
            messages: messages_rx,
        };
        Ok((Self { pc, senders }, events))
    }

    /// Offerer: opens the channel and makes the offer.
    pub async fn offer(&self) -> anyhow::Result<String> {
        let init = RTCDataChannelInit {
            ordered: Some(true),
            ..Default::default()
        };
        let channel = self
            .pc
            .create_data_channel(CHANNEL_LABEL, Some(init))
            .await?;
        wire(channel, self.senders.clone());
        let offer = self.pc.create_offer(None).await?;
        self.pc.set_local_description(offer.clone()).await?;
        Ok(offer.sdp)
    }

    /// Answerer: takes the offer and returns the answer.
    pub async fn answer(&self, offer: String) -> anyhow::Result<String> {
        self.pc
            .set_remote_description(RTCSessionDescription::offer(offer)?)
            .await?;
        let answer = self.pc.create_answer(None).await?;
        self.pc.set_local_description(answer.clone()).await?;
        Ok(answer.sdp)
    }

    /// Offerer: takes the answer.
    pub async fn accept_answer(&self, answer: String) -> anyhow::Result<()> {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer)?)
            .await?;
        Ok(())
    }

    /// Adds a remote candidate.
    pub async fn add_candidate(&self, candidate: IceCandidate) -> anyhow::Result<()> {
        self.pc
            .add_ice_candidate(RTCIceCandidateInit {
                candidate: candidate.candidate,
                sdp_mid: candidate.sdp_mid,
                sdp_mline_index: candidate.sdp_mline_index,
                username_fragment: candidate.username_fragment,
            })
            .await?;
        Ok(())
    }

    /// The kind of path in use: `Some(true)` through a TURN relay,
    /// `Some(false)` direct, `None` when no pair is selected.
    pub async fn relayed(&self) -> Option<bool> {
        let pair = self
            .pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await?;
        Some(
            pair.local.typ == RTCIceCandidateType::Relay
                || pair.remote.typ == RTCIceCandidateType::Relay,
        )
    }

    /// The selected pair's candidate types, e.g. `("host", "host")`.
    pub async fn selected_types(&self) -> Option<(String, String)> {
        let pair = self
            .pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await?;
        Some((pair.local.typ.to_string(), pair.remote.typ.to_string()))
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

fn to_protocol(candidate: RTCIceCandidateInit) -> IceCandidate {
    IceCandidate {
        candidate: candidate.candidate,
        sdp_mid: candidate.sdp_mid,
        sdp_mline_index: candidate.sdp_mline_index,
        username_fragment: candidate.username_fragment,
    }
}

/// Forwards a channel's events into the queue; nothing else happens in the
/// callbacks (a full queue drops a message, which the session layer resends).
fn wire(channel: Arc<RTCDataChannel>, senders: Senders) {
    let tx = senders.signals.clone();
    let opened = channel.clone();
    channel.on_open(Box::new(move || {
        let _ = tx.try_send(RtcEvent::Open(opened));
        Box::pin(async {})
    }));
    let tx = senders.messages;
    channel.on_message(Box::new(move |message| {
        let _ = tx.try_send(message.data);
        Box::pin(async {})
    }));
    let tx = senders.signals;
    channel.on_close(Box::new(move || {
        let _ = tx.try_send(RtcEvent::Closed);
        Box::pin(async {})
    }));
}

/// Sends on a data channel, waiting while too much is buffered.
pub struct ChannelSender {
    channel: Arc<RTCDataChannel>,
    drained: Arc<Notify>,
}

impl ChannelSender {
    /// A sender for an open channel.
    pub async fn new(channel: Arc<RTCDataChannel>) -> Self {
        let drained = Arc::new(Notify::new());
        channel.set_buffered_amount_low_threshold(LOW_WATER).await;
        let notify = drained.clone();
        channel
            .on_buffered_amount_low(Box::new(move || {
                notify.notify_waiters();
                Box::pin(async {})
            }))
            .await;
        Self { channel, drained }
    }

    /// Sends one message. Backpressure: waits while over the high water
    /// mark, but not longer than 2 s: a channel that does not drain
    /// has lost its path, and the caller moves to the relay.
    pub async fn send(&self, message: &Bytes) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STALL;
        while self.channel.buffered_amount().await > HIGH_WATER {
            let drained = self.drained.notified();
            if self.channel.buffered_amount().await <= HIGH_WATER {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the data channel stalled"
            );
            // The low-water callback wakes us; the timeout guards a missed one.
            let _ = tokio::time::timeout(Duration::from_millis(50), drained).await;
        }
        tokio::time::timeout_at(deadline, self.channel.send(message))
            .await
            .map_err(|_| anyhow::anyhow!("the data channel stalled"))??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_servers_in_both_forms() {
        let servers = parse_ice_servers(
            "stun:stun.l.google.com:19302, turn:turn.example.com:3478",
            Some("u"),
            Some("p"),
        )
        .unwrap();
        assert_eq!(servers[0].username, None, "credentials go to TURN only");
        assert_eq!(servers[1].username.as_deref(), Some("u"));
        let json = r#"[{"urls": "stun:a:3478"}, {"urls": ["turn:b:3478?transport=udp"], "username": "x", "credential": "y"}]"#;
        let servers = parse_ice_servers(json, None, None).unwrap();
        assert_eq!(servers[1].urls, vec!["turn:b:3478?transport=udp"]);
        assert_eq!(servers[1].credential.as_deref(), Some("y"));
        assert!(parse_ice_servers("http://x", None, None).is_err());
        assert!(parse_ice_servers("[{\"urls\": 5}]", None, None).is_err());
        assert!(parse_ice_servers("", None, None).unwrap().is_empty());
    }

    #[test]
    fn networks() {
        let lo = parse_network("127.0.0.0/8").unwrap();
        assert!(in_network("127.0.0.1".parse().unwrap(), lo));
        assert!(!in_network("10.0.0.1".parse().unwrap(), lo));
        let one = parse_network("10.1.2.3").unwrap();
        assert!(in_network("10.1.2.3".parse().unwrap(), one));
        assert!(!in_network("10.1.2.4".parse().unwrap(), one));
        assert!(in_network(
            "::1".parse().unwrap(),
            parse_network("::1/128").unwrap()
        ));
        assert!(parse_network("10.0.0.0/33").is_err());
        assert!(parse_network("nope").is_err());
    }
}

/// Which path carries a session's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    /// The signaling server's WebSocket relay.
    Relay,
    /// A direct peer-to-peer data channel.
    Direct,
    /// A data channel through a TURN server.
    Turn,
}

/// The WebRTC half of a session's links: the peer connection, its events,
/// and the data channel once open. Candidates that arrive before the remote
/// description are kept until it is set.
#[derive(Default)]
pub struct RtcSide {
    peer: Option<RtcPeer>,
    events: Option<Events>,
    channel: Option<ChannelSender>,
    early_candidates: Vec<IceCandidate>,
    remote_ready: bool,
}

impl RtcSide {
    /// The next event; pending forever while there is no connection.
    pub async fn next_event(&mut self) -> Option<RtcEvent> {
        match &mut self.events {
            Some(events) => events.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Offerer: a new connection and its offer.
    pub async fn offer(&mut self, config: &RtcConfig) -> anyhow::Result<String> {
        self.close().await;
        let (peer, events) = RtcPeer::new(config).await?;
        let sdp = peer.offer().await?;
        self.peer = Some(peer);
        self.events = Some(events);
        Ok(sdp)
    }

    /// Answerer: a new connection for this offer, and the answer.
    pub async fn answer(&mut self, config: &RtcConfig, offer: String) -> anyhow::Result<String> {
        self.close().await;
        let (peer, events) = RtcPeer::new(config).await?;
        let sdp = peer.answer(offer).await?;
        self.peer = Some(peer);
        self.events = Some(events);
        self.remote_ready = true;
        self.flush_candidates().await;
        Ok(sdp)
    }

    /// Offerer: the answer arrived.
    pub async fn accept_answer(&mut self, answer: String) -> anyhow::Result<()> {
        let peer = self.peer.as_ref().context("an answer without an offer")?;
        peer.accept_answer(answer).await?;
        self.remote_ready = true;
        self.flush_candidates().await;
        Ok(())
    }

    /// A remote candidate: applied now, or once the remote description is set.
    pub async fn add_candidate(&mut self, candidate: IceCandidate) {
        const MAX_EARLY: usize = 64;
        match &self.peer {
            Some(peer) if self.remote_ready => {
                if let Err(err) = peer.add_candidate(candidate).await {
                    tracing::debug!(%err, "remote candidate refused");
                }
            }
            _ if self.early_candidates.len() < MAX_EARLY => self.early_candidates.push(candidate),
            _ => tracing::debug!("too many early candidates; one dropped"),
        }
    }

    async fn flush_candidates(&mut self) {
        for candidate in std::mem::take(&mut self.early_candidates) {
            self.add_candidate(candidate).await;
        }
    }

    /// The data channel opened: frames may go on it.
    pub async fn opened(&mut self, channel: Arc<RTCDataChannel>) {
        self.channel = Some(ChannelSender::new(channel).await);
    }

    /// Gives the connection up (its path failed): it is closed in the
    /// background and never used again. A channel that lived through an
    /// outage is not trusted: its SCTP association may sit out retransmission
    /// backoffs of many seconds; a fresh connection is offered instead.
    pub fn fall_back(&mut self) {
        self.channel = None;
        self.events = None;
        self.remote_ready = false;
        self.early_candidates.clear();
        if let Some(peer) = self.peer.take() {
            tokio::spawn(async move { peer.close().await });
        }
    }

    /// The open data channel, if any.
    pub fn channel(&self) -> Option<&ChannelSender> {
        self.channel.as_ref()
    }

    /// Whether a connection exists (open or still connecting).
    pub fn active(&self) -> bool {
        self.peer.is_some()
    }

    /// The path frames take now.
    pub async fn path(&self) -> Path {
        match (self.channel(), &self.peer) {
            (Some(_), Some(peer)) => match peer.relayed().await {
                Some(true) => Path::Turn,
                _ => Path::Direct,
            },
            _ => Path::Relay,
        }
    }

    /// The selected candidate pair's types, when a channel is open.
    pub async fn selected_types(&self) -> Option<(String, String)> {
        self.peer.as_ref()?.selected_types().await
    }

    /// Tears the connection down.
    pub async fn close(&mut self) {
        self.channel = None;
        self.events = None;
        self.remote_ready = false;
        self.early_candidates.clear();
        if let Some(peer) = self.peer.take() {
            peer.close().await;
        }
    }
}
