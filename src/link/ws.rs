//! The signaling WebSocket, typed: `send(ToServer)` and `recv() -> FromServer`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cocoon_signaling::protocol::{
    FromServer, MAX_MESSAGE_BYTES, ToServer, decode_relay, encode_relay,
};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// Time allowed for TCP, TLS and the WebSocket handshake together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What arrives from the signaling server.
#[derive(Debug)]
pub enum Incoming {
    /// A protocol message.
    Message(FromServer),
    /// A relayed session frame and who sent it (a device id for clients, a
    /// client id for workers).
    Relay {
        /// The sender.
        from: String,
        /// The frame.
        frame: Bytes,
    },
}

/// A connection to the signaling server.
pub struct WsLink {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsLink {
    /// Connects to a `ws://` or `wss://` URL.
    pub async fn connect(url: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let config = WebSocketConfig::default()
            .max_message_size(Some(4 * MAX_MESSAGE_BYTES))
            .max_frame_size(Some(4 * MAX_MESSAGE_BYTES));
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            url,
            Some(config),
            true,
            Some(Connector::Rustls(tls)),
        );
        let (stream, _) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .with_context(|| format!("connecting to {url} timed out"))?
            .with_context(|| format!("cannot connect to {url}"))?;
        Ok(Self { stream })
    }

    /// Sends one message.
    pub async fn send(&mut self, message: &ToServer) -> anyhow::Result<()> {
        let text = serde_json::to_string(message).expect("protocol messages serialize");
        self.stream
            .send(Message::text(text))
            .await
            .context("signaling connection lost")
    }

    /// Relays a session frame to `to` (see [`encode_relay`]).
    pub async fn send_relay(&mut self, to: &str, frame: &[u8]) -> anyhow::Result<()> {
        self.stream
            .send(Message::Binary(encode_relay(to, frame)))
            .await
            .context("signaling connection lost")
    }

    /// The next message or relayed frame; `None` when the server closed the
    /// connection. Control frames are answered by the WebSocket layer and
    /// skipped here. Cancel-safe.
    pub async fn recv_any(&mut self) -> anyhow::Result<Option<Incoming>> {
        loop {
            let frame = match self.stream.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(frame) => frame.context("signaling connection lost")?,
            };
            match frame {
                Message::Text(text) => {
                    let message = serde_json::from_str(&text).with_context(|| {
                        format!("unexpected message from the server: {}", text.as_str())
                    })?;
                    return Ok(Some(Incoming::Message(message)));
                }
                Message::Binary(bytes) => {
                    let (from, frame) =
                        decode_relay(bytes).map_err(|err| anyhow::anyhow!(err.message))?;
                    return Ok(Some(Incoming::Relay { from, frame }));
                }
                _ => continue,
            }
        }
    }

    /// The next protocol message, skipping relayed frames.
    pub async fn recv(&mut self) -> anyhow::Result<Option<FromServer>> {
        loop {
            match self.recv_any().await? {
                Some(Incoming::Message(message)) => return Ok(Some(message)),
                Some(Incoming::Relay { .. }) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}
