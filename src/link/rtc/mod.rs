//! WebRTC data channels as a link: ICE configuration, a peer connection
//! whose callbacks only forward events into a bounded queue, and a sender
//! that respects the channel's buffered amount.

mod config;
mod peer;

use std::sync::Arc;

use anyhow::Context;
use cocoon_signaling::protocol::service::IceCandidate;
use webrtc::data_channel::RTCDataChannel;

pub use config::{IceServer, IssuedIce, RtcConfig, in_network, parse_ice_servers, parse_network};
pub use peer::{CHANNEL_LABEL, ChannelSender, Events, RtcEvent, RtcPeer};

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
        self.fall_back();
        let (peer, events) = RtcPeer::new(config).await?;
        let sdp = peer.offer().await?;
        self.peer = Some(peer);
        self.events = Some(events);
        Ok(sdp)
    }

    /// Answerer: a new connection for this offer, and the answer.
    pub async fn answer(&mut self, config: &RtcConfig, offer: String) -> anyhow::Result<String> {
        self.fall_back();
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

    /// Gives the connection up (its path failed, or a new one replaces it):
    /// it is closed in the background and never used again. Closing one
    /// that never connected or whose path died can take seconds, and the
    /// task that drives a session must not stop sending and acknowledging
    /// meanwhile. A channel that lived through an outage is not trusted
    /// either: its SCTP association may sit out retransmission backoffs of
    /// many seconds; a fresh connection is offered instead.
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

    /// The selected candidate pair's types and the remote candidate's
    /// address, when a channel is open.
    pub async fn selected_pair(&self) -> Option<((String, String), String)> {
        self.peer.as_ref()?.selected_pair().await
    }

    /// Tears the connection down and waits for it (a session that ends).
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
