//! The signaling server's relay hop alone, and the same traffic over one
//! direct WebSocket: what the hop adds.
//!
//! Two WebSocket connections of the harness speak the real protocol to the
//! stage's `cocoon-signaling` process: a *far end* that registers as a worker
//! (a fresh device, claimed with the stage's setup token) and a *near end*
//! that authenticates as its owner's client. They exchange relay messages
//! (`[address][session frame]`, PROTOCOL.md section 7) through the server.
//! The baseline is the same near end on one loopback WebSocket to a server
//! of the harness's own (tokio-tungstenite), the same messages each way.
//! Both far ends run [`answer`]:
//!
//! - a DATA frame of stream [`ECHO`] goes straight back (the 1-byte
//!   ping-pong);
//! - DATA frames of stream [`BULK`] are counted and acknowledged every
//!   [`ACK_EVERY`] frames and at FIN. The near end keeps at most [`WINDOW`]
//!   bytes unacknowledged: the relay drops a message (`peer_backlogged`)
//!   rather than wait when the receiver's queue is full, so a sender must
//!   be windowed, as cocoon's session layer is.
//!
//! No PTY, no session layer: the far end is not a worker, only the protocol's
//! handshake and framing.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use cocoon_signaling::identity::{derive_device_id, generate_secret};
use cocoon_signaling::protocol::frame::{Frame, MAX_DATA};
use cocoon_signaling::protocol::{FromServer, Secret, ToServer, decode_relay, encode_relay};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::systems::Aborting;
use crate::term::STALL;

/// The stream whose DATA frames the far end echoes.
const ECHO: u32 = 1;
/// The stream whose DATA frames the far end counts and acknowledges.
const BULK: u32 = 2;
/// Frames of [`BULK`] per acknowledgement.
const ACK_EVERY: u64 = 16;
/// Unacknowledged bytes at most: 64 full frames, well under the 256
/// messages of the server's queue per connection.
const WINDOW: u64 = 64 * MAX_DATA as u64;
/// A throughput run that takes longer has failed.
const BULK_LIMIT: Duration = Duration::from_secs(120);
/// The signaling server's WebSocket read buffer, given to the direct
/// server too.
const READ_BUFFER: usize = 16 * 1024;

type Near = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A near end connected to a far end, through the relay or directly.
pub struct Pair {
    near: Near,
    /// What the near end's messages are addressed to: the far end's device
    /// id (on the direct WebSocket, an id of the same length, unread).
    address: String,
    /// The far end's task.
    _far: Aborting,
}

impl Pair {
    /// A far end registered as a worker with `setup` (so the owner of
    /// `access` owns it) and a near end authenticated with `access`, both on
    /// the signaling server at `url`.
    pub async fn through_relay(url: &str, access: &Secret, setup: &Secret) -> anyhow::Result<Self> {
        Self::across(url, url, access, setup).await
    }

    /// Like [`Pair::through_relay`], with the near end on the server at
    /// `near_url` and the far end on the one at `far_url` (two instances of
    /// a fleet, see fleet.rs).
    pub async fn across(
        near_url: &str,
        far_url: &str,
        access: &Secret,
        setup: &Secret,
    ) -> anyhow::Result<Self> {
        let mut far = connect(far_url).await?;
        let register = ToServer::Register {
            secret: generate_secret(),
            device_id: None,
            setup_token: Some(setup.clone()),
            name: Some("cocoon-bench relay hop".into()),
        };
        send_json(&mut far, &register).await?;
        let device_id = match first_reply(&mut far).await? {
            FromServer::Registered {
                device_id,
                owner: Some(_),
            } => device_id,
            other => anyhow::bail!("the far end's registration: {other:?}"),
        };
        let mut near = connect(near_url).await?;
        let authenticate = ToServer::Authenticate {
            access_token: access.clone(),
        };
        send_json(&mut near, &authenticate).await?;
        match first_reply(&mut near).await? {
            FromServer::Authenticated { .. } => {}
            other => anyhow::bail!("the near end's authentication: {other:?}"),
        }
        let far = tokio::spawn(async move {
            let _ = answer(far).await;
        });
        Ok(Self {
            near,
            address: device_id.as_str().to_owned(),
            _far: Aborting(vec![far]),
        })
    }

    /// A near end on one loopback WebSocket to a far end of its own.
    pub async fn direct() -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let url = format!("ws://{}/", listener.local_addr()?);
        let far = tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            // As the signaling server has its connections.
            let _ = tcp.set_nodelay(true);
            let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
            if let Ok(ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await {
                let _ = answer(ws).await;
            }
        });
        let near = connect(&url).await?;
        // Addressed like a relay message, so the same bytes go each way.
        let address = derive_device_id(b"cocoon-bench", &generate_secret());
        Ok(Self {
            near,
            address: address.as_str().to_owned(),
            _far: Aborting(vec![far]),
        })
    }

    /// `count` round trips of a 1-byte DATA frame and its echo.
    pub async fn ping_pong(&mut self, count: usize) -> anyhow::Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(count);
        for i in 0..count as u64 {
            let ping = Frame::Data {
                stream: ECHO,
                offset: i,
                bytes: Bytes::from_static(b"a"),
            };
            let message = encode_relay(&self.address, &ping.encode());
            let start = Instant::now();
            self.near.send(Message::Binary(message)).await?;
            match self.next_frame().await.context("an echo never came")? {
                Frame::Data {
                    stream: ECHO,
                    offset,
                    ..
                } if offset == i => {}
                other => anyhow::bail!("expected the echo of {i}, got {other:?}"),
            }
            times.push(start.elapsed());
        }
        Ok(times)
    }

    /// Sends `total` bytes in full DATA frames (16 KiB with the header) and
    /// waits for the far end to acknowledge them all; returns how long that
    /// took.
    pub async fn bulk(&mut self, total: u64) -> anyhow::Result<Duration> {
        // One message sent again and again: the far end counts bytes and
        // ignores offsets, and the harness spends its time on the sockets.
        let full = self.bulk_message(MAX_DATA);
        let start = Instant::now();
        let (mut sent, mut acked, mut fin) = (0u64, 0u64, false);
        let run = async {
            while acked < total {
                while sent < total && sent - acked < WINDOW {
                    let n = (total - sent).min(MAX_DATA as u64) as usize;
                    let message = match n {
                        MAX_DATA => full.clone(),
                        _ => self.bulk_message(n),
                    };
                    self.near.send(Message::Binary(message)).await?;
                    sent += n as u64;
                }
                if sent == total && !fin {
                    let end = Frame::Fin {
                        stream: BULK,
                        offset: total,
                    };
                    let message = encode_relay(&self.address, &end.encode());
                    self.near.send(Message::Binary(message)).await?;
                    fin = true;
                }
                if let Frame::Ack {
                    stream: BULK,
                    offset,
                } = self.next_frame().await?
                {
                    acked = acked.max(offset);
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(BULK_LIMIT, run)
            .await
            .with_context(|| format!("{total} bytes took over {BULK_LIMIT:?}"))??;
        Ok(start.elapsed())
    }

    fn bulk_message(&self, len: usize) -> Bytes {
        let frame = Frame::Data {
            stream: BULK,
            offset: 0,
            bytes: Bytes::from(vec![b'a'; len]),
        };
        encode_relay(&self.address, &frame.encode())
    }

    /// The next session frame for the near end; the server's text messages
    /// are skipped, unless one is an error.
    async fn next_frame(&mut self) -> anyhow::Result<Frame> {
        loop {
            let message = tokio::time::timeout(STALL, self.near.next())
                .await
                .with_context(|| format!("nothing within {STALL:?}"))?
                .context("the connection ended")??;
            match message {
                Message::Binary(message) => {
                    let (_, frame) =
                        decode_relay(message).map_err(|e| anyhow::anyhow!(e.message))?;
                    return Ok(Frame::decode(frame)?);
                }
                Message::Text(text) => {
                    if let Ok(FromServer::Error { code, message }) = serde_json::from_str(&text) {
                        anyhow::bail!("the server refused: {code:?}: {message}");
                    }
                }
                Message::Close(_) => anyhow::bail!("the connection was closed"),
                _ => {}
            }
        }
    }
}

/// The far end: echoes [`ECHO`], counts and acknowledges [`BULK`], replying
/// to whoever the message came from. Ends with the connection.
async fn answer<S>(mut ws: WebSocketStream<S>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut frames, mut received) = (0u64, 0u64);
    while let Some(message) = ws.next().await {
        let Message::Binary(message) = message? else {
            continue;
        };
        let (from, frame) = decode_relay(message).map_err(|e| anyhow::anyhow!(e.message))?;
        let ack = |received| {
            Frame::Ack {
                stream: BULK,
                offset: received,
            }
            .encode()
        };
        let reply = match Frame::decode(frame.clone())? {
            Frame::Data { stream: ECHO, .. } => Some(frame),
            Frame::Data {
                stream: BULK,
                bytes,
                ..
            } => {
                received += bytes.len() as u64;
                frames += 1;
                (frames % ACK_EVERY == 0).then(|| ack(received))
            }
            Frame::Fin { stream: BULK, .. } => Some(ack(received)),
            _ => None,
        };
        if let Some(reply) = reply {
            ws.send(Message::Binary(encode_relay(&from, &reply)))
                .await?;
        }
    }
    Ok(())
}

/// A client WebSocket without Nagle's delay, as cocoon's own.
async fn connect(url: &str) -> anyhow::Result<Near> {
    let connect = tokio_tungstenite::connect_async_with_config(url, None, true);
    let (ws, _) = tokio::time::timeout(STALL, connect)
        .await
        .with_context(|| format!("connecting to {url} timed out"))?
        .with_context(|| format!("cannot connect to {url}"))?;
    Ok(ws)
}

async fn send_json<S>(ws: &mut WebSocketStream<S>, message: &ToServer) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let text = serde_json::to_string(message)?;
    Ok(ws.send(Message::text(text)).await?)
}

/// The server's first text message.
async fn first_reply<S>(ws: &mut WebSocketStream<S>) -> anyhow::Result<FromServer>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(STALL, async {
        loop {
            match ws.next().await.context("the connection ended")?? {
                Message::Text(text) => return Ok(serde_json::from_str(&text)?),
                Message::Close(frame) => anyhow::bail!("closed: {frame:?}"),
                _ => {}
            }
        }
    })
    .await
    .context("no reply in time")?
}
