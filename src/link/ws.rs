//! The signaling WebSocket, typed: `send(ToServer)` and `recv() -> FromServer`.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// When the server last sent anything, its pings included.
    last_heard: Instant,
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
        Ok(Self {
            stream,
            last_heard: Instant::now(),
        })
    }

    /// How long the server has sent nothing at all (it pings every 20 s);
    /// updated while [`WsLink::recv_any`] or [`WsLink::recv`] waits.
    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
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
            self.last_heard = Instant::now();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that only pings (as the signaling server does when there is
    /// nothing to say) is not silent: a worker must not take it for dead.
    #[tokio::test]
    async fn pings_count_as_hearing_from_the_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            for _ in 0..100 {
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let tls = crate::tls::client_config(None).unwrap();
        let mut link = WsLink::connect(&format!("ws://{addr}/ws"), tls)
            .await
            .unwrap();
        let listen = tokio::time::sleep(Duration::from_millis(600));
        tokio::pin!(listen);
        tokio::select! {
            incoming = link.recv_any() => panic!("only pings were sent: {incoming:?}"),
            _ = &mut listen => {}
        }
        assert!(
            link.silent_for() < Duration::from_millis(300),
            "{:?} since the last ping",
            link.silent_for()
        );
    }
}
