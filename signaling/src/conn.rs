//! One WebSocket connection: a reader loop that owns the connection's state
//! (pending → worker or client) and a writer task that drains its outbox.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::hive::{Ask, HiveGuard, HiveRequest};
use crate::hub::{ClientGuard, DeviceGuard, Hub, OUTBOX_CAPACITY, Outbound, Outbox, Reject};
use crate::protocol::{
    ClientId, DeviceId, ErrorCode, FromServer, ToServer, decode_relay, decode_to_server,
};

/// The clock of a connection's liveness.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Time allowed between connecting and the first `register`/`authenticate`.
    pub handshake: Duration,
    /// The server pings this often.
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            idle: Duration::from_secs(60),
        }
    }
}

/// Who the connection turned out to be.
enum Role {
    Pending,
    Worker(DeviceGuard),
    Client(ClientGuard),
    Hive(HiveGuard),
}

/// Serves one upgraded socket until it closes or the server shuts down.
pub async fn serve(
    hub: Arc<Hub>,
    socket: WebSocket,
    peer: IpAddr,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) {
    let (sink, mut stream) = socket.split();
    let (outbox, queue) = mpsc::channel(OUTBOX_CAPACITY);
    let writer = tokio::spawn(write_loop(
        sink,
        queue,
        timeouts.ping_interval,
        shutdown.clone(),
    ));
    let mut role = Role::Pending;
    let mut deadline = Instant::now() + timeouts.handshake;
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            frame = timeout_at(deadline, stream.next()) => frame,
        };
        let text = match frame {
            Err(_) if matches!(role, Role::Pending) => {
                let _ = outbox.try_send(Outbound::Close(FromServer::error(
                    ErrorCode::HandshakeTimeout,
                    "no register or authenticate message in time",
                )));
                break;
            }
            Err(_) => {
                tracing::debug!("closing idle connection");
                break;
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Binary(bytes)))) => {
                if let Err(reject) = relay(&mut role, bytes).await {
                    reply(&outbox, reject);
                }
                extend_idle(&role, &mut deadline, timeouts.idle);
                continue;
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {
                extend_idle(&role, &mut deadline, timeouts.idle);
                continue;
            }
        };
        let message = match decode_to_server(&text) {
            Ok(message) => message,
            Err(err) => {
                reply(
                    &outbox,
                    Reject {
                        code: err.code,
                        message: err.message,
                    },
                );
                continue;
            }
        };
        let handled = match &mut role {
            Role::Pending => match hub.check_attempts(peer) {
                Ok(()) => {
                    let result = handshake(&hub, &outbox, message, &mut role).await;
                    if result
                        .as_ref()
                        .is_err_and(|reject| reject.code.is_credential_failure())
                    {
                        hub.record_failure(peer);
                    }
                    result
                }
                Err(reject) => Err(reject),
            },
            Role::Worker(device) => from_worker(device, &outbox, message),
            Role::Client(client) => from_client(client, &outbox, message).await,
            Role::Hive(hive) => from_hive(hive, &outbox, message).await,
        };
        match handled {
            Ok(()) => {}
            Err(reject) if reject.code.is_fatal() => {
                let _ = outbox.try_send(Outbound::Close(reject.into_message()));
                break;
            }
            Err(reject) => reply(&outbox, reject),
        }
        extend_idle(&role, &mut deadline, timeouts.idle);
    }
    // Routes go down before the writer finishes, so nobody routes to a dead
    // outbox for long.
    drop(role);
    drop(outbox);
    let _ = writer.await;
}

/// Any frame from an identified peer proves it alive; a pending one keeps
/// its handshake deadline.
fn extend_idle(role: &Role, deadline: &mut Instant, idle: Duration) {
    if !matches!(role, Role::Pending) {
        *deadline = Instant::now() + idle;
    }
}

/// Routes a binary relay message from an identified peer.
async fn relay(role: &mut Role, message: bytes::Bytes) -> Result<(), Reject> {
    let (address, frame) = decode_relay(message).map_err(|err| Reject {
        code: err.code,
        message: err.message,
    })?;
    match role {
        Role::Pending => Err(Reject {
            code: ErrorCode::NotAuthenticated,
            message:
                "send register (workers), authenticate (clients) or register_hive (hives) first"
                    .into(),
        }),
        Role::Worker(device) => device.relay_to_client(&ClientId::new(address), &frame),
        Role::Client(client) => {
            let device_id = (!address.is_empty()).then(|| DeviceId::new(address));
            client.relay_to_device(device_id, &frame).await
        }
        Role::Hive(_) => Err(Reject {
            code: ErrorCode::InvalidMessage,
            message: "hives do not relay session frames".into(),
        }),
    }
}

fn reply(outbox: &Outbox, reject: Reject) {
    // The connection's own queue is full only when its peer stopped reading;
    // dropping the error is then the right thing.
    let _ = outbox.try_send(Outbound::Message(reject.into_message()));
}

fn send(outbox: &Outbox, message: FromServer) {
    let _ = outbox.try_send(Outbound::Message(message));
}

async fn handshake(
    hub: &Arc<Hub>,
    outbox: &Outbox,
    message: ToServer,
    role: &mut Role,
) -> Result<(), Reject> {
    match message {
        ToServer::Register {
            secret,
            device_id,
            setup_token,
            name,
        } => {
            let (guard, notice) = hub
                .register(
                    outbox.clone(),
                    &secret,
                    device_id.as_ref(),
                    setup_token.as_ref(),
                    name,
                )
                .await?;
            tracing::info!(device_id = %guard.device_id, owner = ?guard.owner, "device registered");
            if let Some(notice) = notice {
                reply(outbox, notice);
            }
            send(
                outbox,
                FromServer::Registered {
                    device_id: guard.device_id.clone(),
                    owner: guard.owner.clone(),
                },
            );
            *role = Role::Worker(guard);
            Ok(())
        }
        ToServer::Authenticate { access_token } => {
            let guard = hub.authenticate(outbox.clone(), &access_token).await?;
            tracing::info!(client_id = %guard.client_id, user_id = %guard.owner, "client authenticated");
            send(
                outbox,
                FromServer::Authenticated {
                    user_id: guard.owner.clone(),
                    client_id: guard.client_id.clone(),
                },
            );
            *role = Role::Client(guard);
            Ok(())
        }
        ToServer::RegisterHive {
            hive_token,
            name,
            kinds,
        } => {
            let guard = hub
                .register_hive(outbox.clone(), &hive_token, name, kinds)
                .await?;
            tracing::info!(hive = %guard.name, owner = %guard.owner, "hive registered");
            send(
                outbox,
                FromServer::HiveRegistered {
                    name: guard.name.clone(),
                    owner: guard.owner.clone(),
                },
            );
            *role = Role::Hive(guard);
            Ok(())
        }
        _ => Err(Reject {
            code: ErrorCode::NotAuthenticated,
            message:
                "send register (workers), authenticate (clients) or register_hive (hives) first"
                    .into(),
        }),
    }
}

fn from_worker(device: &DeviceGuard, outbox: &Outbox, message: ToServer) -> Result<(), Reject> {
    match message {
        ToServer::GetIceServers {} => {
            send(outbox, device.hub().ice_servers(device.device_id.as_str()));
            Ok(())
        }
        ToServer::SyncData {
            payload,
            client_id: Some(client_id),
            ..
        } => device.send_to_client(&client_id, payload),
        ToServer::SyncData {
            client_id: None, ..
        } => Err(Reject {
            code: ErrorCode::InvalidMessage,
            message: "a worker's sync_data must name its client_id".into(),
        }),
        ToServer::Register { .. }
        | ToServer::Authenticate { .. }
        | ToServer::RegisterHive { .. } => Err(already()),
        _ => Err(not_for("workers")),
    }
}

async fn from_client(
    client: &mut ClientGuard,
    outbox: &Outbox,
    message: ToServer,
) -> Result<(), Reject> {
    match message {
        ToServer::GetIceServers {} => {
            send(outbox, client.hub().ice_servers(client.owner.as_str()));
            Ok(())
        }
        ToServer::ListDevices {} => {
            let devices = client.list_devices().await?;
            send(outbox, FromServer::DeviceList { devices });
            Ok(())
        }
        ToServer::SelectDevice { device_id } => {
            client.select(device_id.clone()).await?;
            send(outbox, FromServer::DeviceSelected { device_id });
            Ok(())
        }
        ToServer::SyncData {
            payload, device_id, ..
        } => client.send_to_device(device_id, payload).await,
        ToServer::ListHives {} => {
            let hives = client.hub().list_hives(&client.owner);
            send(outbox, FromServer::HiveList { hives });
            Ok(())
        }
        ToServer::SpawnCocoon {
            request_id,
            kind,
            name,
            setup_token,
            hive,
        } => {
            if let Some(token) = setup_token {
                client.check_own_setup_token(&token)?;
            }
            let request = HiveRequest {
                kind: Some(&kind),
                ..client.hive_request(hive.as_deref(), Ask::Spawn, &request_id)
            };
            let (hub, owner, client_id) = (client.hub(), &client.owner, &client.client_id);
            hub.ask_hive(request, |hive| {
                let (setup_token, spawn_id) = hub.issue_spawn_token(owner, hive)?;
                Ok(FromServer::SpawnCocoon {
                    request_id: request_id.clone(),
                    client_id: client_id.clone(),
                    kind: kind.clone(),
                    name,
                    setup_token,
                    spawn_id,
                })
            })
        }
        ToServer::TerminateCocoon {
            request_id,
            service_name,
            hive,
        } => client.hub().ask_hive(
            client.hive_request(hive.as_deref(), Ask::Terminate, &request_id),
            |_| {
                Ok(FromServer::TerminateCocoon {
                    request_id: request_id.clone(),
                    client_id: client.client_id.clone(),
                    service_name,
                })
            },
        ),
        ToServer::ListCocoons { request_id, hive } => client.hub().ask_hive(
            client.hive_request(hive.as_deref(), Ask::List, &request_id),
            |_| {
                Ok(FromServer::ListCocoons {
                    request_id: request_id.clone(),
                    client_id: client.client_id.clone(),
                })
            },
        ),
        ToServer::Register { .. }
        | ToServer::Authenticate { .. }
        | ToServer::RegisterHive { .. } => Err(already()),
        _ => Err(not_for("clients")),
    }
}

async fn from_hive(hive: &HiveGuard, outbox: &Outbox, message: ToServer) -> Result<(), Reject> {
    let hive_name = hive.name.clone();
    match message {
        ToServer::SpawnCocoonResult {
            request_id,
            client_id,
            success,
            service_name,
            device_id,
            error,
        } => {
            let reply = FromServer::SpawnCocoonResult {
                request_id: request_id.clone(),
                hive: hive_name,
                success,
                service_name,
                device_id,
                error,
            };
            hive.answer(client_id, request_id, Ask::Spawn, reply).await
        }
        ToServer::TerminateCocoonResult {
            request_id,
            client_id,
            success,
            error,
        } => {
            let reply = FromServer::TerminateCocoonResult {
                request_id: request_id.clone(),
                hive: hive_name,
                success,
                error,
            };
            hive.answer(client_id, request_id, Ask::Terminate, reply)
                .await
        }
        ToServer::CocoonList {
            request_id,
            client_id,
            cocoons,
        } => {
            let reply = FromServer::CocoonList {
                request_id: request_id.clone(),
                hive: hive_name,
                cocoons,
            };
            hive.answer(client_id, request_id, Ask::List, reply).await
        }
        ToServer::IssueSetupToken { request_id } => {
            send(outbox, hive.issue_setup_token(request_id)?);
            Ok(())
        }
        ToServer::Register { .. }
        | ToServer::Authenticate { .. }
        | ToServer::RegisterHive { .. } => Err(already()),
        _ => Err(not_for("hives")),
    }
}

fn not_for(role: &str) -> Reject {
    Reject {
        code: ErrorCode::InvalidMessage,
        message: format!("this message type is not for {role}"),
    }
}

fn already() -> Reject {
    Reject {
        code: ErrorCode::AlreadyAuthenticated,
        message: "this connection has already registered or authenticated".into(),
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Outbound>,
    ping_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        let result = tokio::select! {
            item = queue.recv() => match item {
                Some(Outbound::Message(message)) => sink.send(encode(&message)).await,
                Some(Outbound::Binary(bytes)) => sink.send(Message::Binary(bytes)).await,
                Some(Outbound::Close(message)) => {
                    let _ = sink.send(encode(&message)).await;
                    break;
                }
                None => break,
            },
            _ = ping.tick() => sink.send(Message::Ping(Default::default())).await,
            _ = shutdown.cancelled() => break,
        };
        if result.is_err() {
            break;
        }
    }
    let close = if shutdown.is_cancelled() {
        // Peers reconnect sooner when they know this was no network fault.
        let _ = sink.send(encode(&FromServer::ServerRestarting {})).await;
        Some(CloseFrame {
            code: SERVICE_RESTART,
            reason: "server restarting".into(),
        })
    } else {
        None
    };
    let _ = sink.send(Message::Close(close)).await;
    let _ = sink.close().await;
}

/// WebSocket close code 1012, "Service Restart" (IANA's registry of close
/// codes).
const SERVICE_RESTART: u16 = 1012;

fn encode(message: &FromServer) -> Message {
    Message::Text(
        serde_json::to_string(message)
            .expect("server messages always serialize")
            .into(),
    )
}

/// Runs `serve` inside a span named after the peer address.
pub async fn serve_logged(
    hub: Arc<Hub>,
    socket: WebSocket,
    timeouts: Timeouts,
    shutdown: CancellationToken,
    peer: SocketAddr,
) {
    serve(hub, socket, peer.ip(), timeouts, shutdown)
        .instrument(tracing::info_span!("ws", %peer))
        .await
}
