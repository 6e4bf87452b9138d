//! Links: the ways session frames travel between a worker and a client —
//! the signaling server's WebSocket relay, and WebRTC data channels.

pub mod rtc;
pub mod ws;
