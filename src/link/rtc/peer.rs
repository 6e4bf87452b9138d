//! One WebRTC peer connection whose callbacks only forward events into
//! bounded queues, and a data-channel sender that respects the buffered
//! amount.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cocoon_signaling::protocol::service::IceCandidate;
use tokio::sync::{Notify, mpsc};
use webrtc::api::APIBuilder;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice::udp_network::{EphemeralUDP, UDPNetwork};
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_pair::RTCIceCandidatePair;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;

use super::config::{RtcConfig, in_network};

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
        // A peer-reflexive pair is usually the peer's host address whose
        // check came in before its trickled candidate: nominate it as soon
        // as a host pair would be (default: after 1 s, which made every
        // other upgrade to P2P take a second longer; see BENCHMARKS.md).
        engine.set_prflx_acceptance_min_wait(Some(Duration::ZERO));
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
                .all_ice_servers()
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
        let pair = self.selected().await?;
        Some(
            pair.local.typ == RTCIceCandidateType::Relay
                || pair.remote.typ == RTCIceCandidateType::Relay,
        )
    }

    /// The selected pair's candidate types, e.g. `("host", "host")`, and
    /// the remote candidate's address (`IP:PORT`).
    pub async fn selected_pair(&self) -> Option<((String, String), String)> {
        let pair = self.selected().await?;
        Some((
            (pair.local.typ.to_string(), pair.remote.typ.to_string()),
            format!("{}:{}", pair.remote.address, pair.remote.port),
        ))
    }

    async fn selected(&self) -> Option<RTCIceCandidatePair> {
        self.pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await
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
    stall: Duration,
}

impl ChannelSender {
    /// A sender for an open channel that gives up after 2 s without
    /// progress.
    pub async fn new(channel: Arc<RTCDataChannel>) -> Self {
        Self::with_stall(channel, STALL).await
    }

    /// A sender that gives up after `stall` without progress (a benchmark's
    /// bare channel has no relay to move to, so it waits).
    pub async fn with_stall(channel: Arc<RTCDataChannel>, stall: Duration) -> Self {
        let drained = Arc::new(Notify::new());
        channel.set_buffered_amount_low_threshold(LOW_WATER).await;
        let notify = drained.clone();
        channel
            .on_buffered_amount_low(Box::new(move || {
                notify.notify_waiters();
                Box::pin(async {})
            }))
            .await;
        Self {
            channel,
            drained,
            stall,
        }
    }

    /// Sends one message. Backpressure: waits while over the high water
    /// mark, but not longer than the stall time: a channel that does not
    /// drain has lost its path, and the caller moves to the relay.
    pub async fn send(&self, message: &Bytes) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.stall;
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
