//! A typed client of the signaling server: authenticate, list devices, talk
//! to a device. The CLI's client commands and the tests use it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cocoon_signaling::protocol::{
    ClientId, DeviceId, DeviceInfo, ErrorCode, FromServer, HiveInfo, IceServer, Secret, ToServer,
    UserId,
};
use serde_json::Value;

use crate::link::ws::WsLink;

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// An `error` reply from the server, kept typed so callers can match on
/// the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The stable code.
    pub code: ErrorCode,
    /// The server's explanation.
    pub message: String,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for ServerError {}

/// An authenticated client connection.
pub struct Client {
    link: WsLink,
    /// Who the token speaks for.
    pub user_id: UserId,
    /// This connection's id.
    pub client_id: ClientId,
}

impl Client {
    /// Connects and authenticates with an access token.
    pub async fn connect(
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let mut link = WsLink::connect(url, tls).await?;
        link.send(&ToServer::Authenticate {
            access_token: token.clone(),
        })
        .await?;
        match recv_reply(&mut link).await? {
            FromServer::Authenticated { user_id, client_id } => Ok(Self {
                link,
                user_id,
                client_id,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// The owner's devices.
    pub async fn list_devices(&mut self) -> anyhow::Result<Vec<DeviceInfo>> {
        self.link.send(&ToServer::ListDevices {}).await?;
        loop {
            match recv_reply(&mut self.link).await? {
                FromServer::DeviceList { devices } => return Ok(devices),
                FromServer::DeviceStatus { .. } | FromServer::SyncData { .. } => continue,
                other => return Err(unexpected(other)),
            }
        }
    }

    /// The STUN/TURN servers the server hands out (with fresh TURN
    /// credentials), and how long the credentials last.
    pub async fn ice_servers(&mut self) -> anyhow::Result<(Vec<IceServer>, Duration)> {
        self.link.send(&ToServer::GetIceServers {}).await?;
        loop {
            match recv_reply(&mut self.link).await? {
                FromServer::IceServers {
                    ice_servers,
                    ttl_secs,
                } => return Ok((ice_servers, Duration::from_secs(ttl_secs))),
                FromServer::DeviceStatus { .. } | FromServer::SyncData { .. } => continue,
                other => return Err(unexpected(other)),
            }
        }
    }

    /// The owner's online hives.
    pub async fn list_hives(&mut self) -> anyhow::Result<Vec<HiveInfo>> {
        self.link.send(&ToServer::ListHives {}).await?;
        loop {
            match recv_reply(&mut self.link).await? {
                FromServer::HiveList { hives } => return Ok(hives),
                FromServer::DeviceStatus { .. } | FromServer::SyncData { .. } => continue,
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Sends a request for a hive and waits up to `timeout` for the answer
    /// carrying `request_id` (an error reply fails it).
    pub async fn hive_call(
        &mut self,
        message: ToServer,
        request_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<FromServer> {
        self.link.send(&message).await?;
        let wait = async {
            loop {
                let message = self
                    .link
                    .recv()
                    .await?
                    .context("the server closed the connection")?;
                match message {
                    FromServer::SpawnCocoonResult {
                        request_id: ref r, ..
                    }
                    | FromServer::TerminateCocoonResult {
                        request_id: ref r, ..
                    }
                    | FromServer::CocoonList {
                        request_id: ref r, ..
                    } if r == request_id => {
                        return Ok(message);
                    }
                    FromServer::Error { code, message } => {
                        return Err(ServerError { code, message }.into());
                    }
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .context("no answer from the hive in time")?
    }

    /// Sends a payload to a device (`None`: the selected or only device).
    pub async fn send(
        &mut self,
        device_id: Option<&DeviceId>,
        payload: Value,
    ) -> anyhow::Result<()> {
        self.link
            .send(&ToServer::SyncData {
                payload,
                device_id: device_id.cloned(),
                client_id: None,
            })
            .await
    }

    /// Sends any message (tests use it to send what a client should not).
    pub async fn send_raw(&mut self, message: &ToServer) -> anyhow::Result<()> {
        self.link.send(message).await
    }

    /// The connection itself, for a session driver.
    pub fn into_link(self) -> WsLink {
        self.link
    }

    /// The next message from the server; `None` once it closed.
    pub async fn recv(&mut self) -> anyhow::Result<Option<FromServer>> {
        self.link.recv().await
    }
}

/// The next message, with a deadline; `error` replies become [`ServerError`].
async fn recv_reply(link: &mut WsLink) -> anyhow::Result<FromServer> {
    let message = tokio::time::timeout(REPLY_TIMEOUT, link.recv())
        .await
        .context("the server did not answer in time")??
        .context("the server closed the connection")?;
    match message {
        FromServer::Error { code, message } => Err(ServerError { code, message }.into()),
        other => Ok(other),
    }
}

fn unexpected(message: FromServer) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from the server: {message:?}")
}
