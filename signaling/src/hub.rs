//! The hub: who is connected, who owns what, and routing between them.
//!
//! Each connection owns an *outbox*, a bounded queue drained by its writer
//! task. The hub keeps one outbox per online device and per authenticated
//! client. Routing never waits on a receiver: when an outbox is full the
//! message is dropped and the sender is told (`peer_backlogged`), so one slow
//! reader cannot stall anyone else's connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::auth::{Claims, TokenError, TokenKey, TokenKind};
use crate::cluster::presence::Held;
use crate::cluster::{Cluster, Hold};
use crate::hive::{Ask, HiveRequest, HiveRoutes};
use crate::ice::IceSettings;
use crate::identity::{check_secret_strength, constant_time_eq, derive_device_id};
use crate::limit::FailureLimiter;
use crate::protocol::{
    ClientId, DeviceId, DeviceInfo, ErrorCode, FromServer, Secret, UserId, encode_relay,
};
use crate::store::{Store, random_hex};

/// Messages queued for one connection's writer.
pub const OUTBOX_CAPACITY: usize = 256;

/// What a connection's writer task is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Send this message.
    Message(FromServer),
    /// Send this binary relay message.
    Binary(bytes::Bytes),
    /// Send this (fatal) error, then close the socket.
    Close(FromServer),
}

/// The sending half of a connection's outbox.
pub type Outbox = mpsc::Sender<Outbound>;

/// A refusal to send back to the peer as an `error` message.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// The stable code.
    pub code: ErrorCode,
    /// What happened, for a human.
    pub message: String,
}

impl Reject {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn internal(err: anyhow::Error) -> Self {
        tracing::error!(err = format!("{err:#}"), "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }

    /// The reply to send.
    pub fn into_message(self) -> FromServer {
        FromServer::error(self.code, self.message)
    }
}

impl From<TokenError> for Reject {
    fn from(err: TokenError) -> Self {
        let code = match err {
            TokenError::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::InvalidToken,
        };
        Self::new(code, err.to_string())
    }
}

/// The spec's words for a device id that does not match its secret.
pub const MISMATCH_MESSAGE: &str =
    "Registration rejected - device_id does not match secret. Possible stolen secret attack.";

struct DeviceRoute {
    conn: u64,
    owner: Option<UserId>,
    outbox: Outbox,
    /// With a fleet backend: the revision of this instance's presence entry.
    presence: Option<u64>,
}

/// Where a message for a device goes.
enum Target {
    /// A connection of this instance.
    Local(Outbox),
    /// A connection of another instance of the fleet.
    Remote(Arc<Cluster>, DeviceId, UserId),
}

/// A device's membership in the fleet, held by its guard.
struct FleetHold {
    cluster: Arc<Cluster>,
    /// The presence entry's first revision (the route keeps the current).
    revision: u64,
    /// Another instance held the device when it registered here.
    moved: bool,
    /// Stops forwarding what other instances send the device.
    _attached: tokio_util::sync::DropGuard,
}

struct ClientRoute {
    owner: UserId,
    outbox: Outbox,
}

#[derive(Default)]
pub(crate) struct Routes {
    devices: HashMap<DeviceId, DeviceRoute>,
    clients: HashMap<ClientId, ClientRoute>,
    pub(crate) hive: HiveRoutes,
}

/// Shared state of one signaling server.
pub struct Hub {
    routes: Mutex<Routes>,
    next_conn: AtomicU64,
    /// Bytes of binary relay messages delivered (the relay's traffic).
    relayed_bytes: AtomicU64,
    /// `sync_data` and relay messages delivered.
    relayed_messages: AtomicU64,
    store: Store,
    salt: Vec<u8>,
    tokens: TokenKey,
    /// In development mode, unclaimed devices are claimed by this owner.
    dev_owner: Option<UserId>,
    /// Failed registrations and authentications per address.
    failures: Mutex<FailureLimiter>,
    /// The STUN/TURN servers handed out.
    ice: IceSettings,
    /// The fleet this instance is part of, if any.
    cluster: Option<Arc<Cluster>>,
}

/// A registered device's hold on its route. Dropping it takes the route down,
/// but only while the route is still this connection's: a replaced socket's
/// late close never removes its successor.
pub struct DeviceGuard {
    hub: Arc<Hub>,
    /// The device.
    pub device_id: DeviceId,
    /// Its owner at registration.
    pub owner: Option<UserId>,
    conn: u64,
    fleet: Option<FleetHold>,
}

/// An authenticated client's hold on its route.
pub struct ClientGuard {
    hub: Arc<Hub>,
    /// This connection's id.
    pub client_id: ClientId,
    /// The owner the client speaks for.
    pub owner: UserId,
    /// Devices this client sent data to; told when it leaves.
    talked_to: Vec<DeviceId>,
    /// Where `sync_data` without a `device_id` goes.
    selected: Option<DeviceId>,
    /// Stops forwarding what other instances send the client.
    _attached: Option<tokio_util::sync::DropGuard>,
}

impl Hub {
    /// A hub over a store, with the salt and token key it verifies with.
    pub fn new(
        store: Store,
        salt: Vec<u8>,
        tokens: TokenKey,
        dev_owner: Option<UserId>,
        ice: IceSettings,
    ) -> Self {
        Self {
            routes: Mutex::default(),
            next_conn: AtomicU64::new(1),
            relayed_bytes: AtomicU64::new(0),
            relayed_messages: AtomicU64::new(0),
            store,
            salt,
            tokens,
            dev_owner,
            failures: Mutex::default(),
            ice,
            cluster: None,
        }
    }

    /// Makes this hub an instance of a fleet. Call [`Hub::join`] once it is
    /// in an `Arc`.
    pub fn with_cluster(mut self, cluster: Arc<Cluster>) -> Self {
        self.cluster = Some(cluster);
        self
    }

    /// Starts following the fleet's presence (no-op without a fleet).
    pub fn join(self: &Arc<Self>) {
        if let Some(cluster) = &self.cluster {
            cluster.start(Arc::downgrade(self));
        }
    }

    /// The fleet this instance is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub(crate) fn routes(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap()
    }

    pub(crate) fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `owner` owns `device_id`.
    pub(crate) async fn owns(&self, owner: &UserId, device_id: &DeviceId) -> Result<bool, Reject> {
        let record = self.store.get(device_id).await.map_err(Reject::internal)?;
        Ok(record.and_then(|r| r.owner).as_ref() == Some(owner))
    }

    /// The `ice_servers` reply for a device or an owner.
    pub fn ice_servers(&self, id: &str) -> FromServer {
        self.ice.issue(id, std::time::SystemTime::now())
    }

    /// Refuses an address that failed too often lately.
    pub fn check_attempts(&self, ip: IpAddr) -> Result<(), Reject> {
        if self.failures.lock().unwrap().allowed(ip) {
            Ok(())
        } else {
            Err(Reject::new(
                ErrorCode::RateLimited,
                "too many failed attempts from this address; try again in a minute",
            ))
        }
    }

    /// Counts a failed registration or authentication of an address, here
    /// and on the fleet's other instances.
    pub fn record_failure(&self, ip: IpAddr) {
        self.failures.lock().unwrap().failed(ip);
        if let Some(cluster) = &self.cluster {
            cluster.failed(ip);
        }
    }

    /// Counts a failure another instance of the fleet saw.
    pub(crate) fn failed_elsewhere(&self, ip: IpAddr) {
        self.failures.lock().unwrap().failed(ip);
    }

    /// The key that signs and verifies tokens.
    pub fn tokens(&self) -> &TokenKey {
        &self.tokens
    }

    /// Online devices and clients, for `/health`.
    pub fn counts(&self) -> (usize, usize) {
        let routes = self.routes.lock().unwrap();
        (routes.devices.len(), routes.clients.len())
    }

    /// Relay traffic so far: binary bytes, and messages of either kind.
    pub fn relayed(&self) -> (u64, u64) {
        (
            self.relayed_bytes.load(Ordering::Relaxed),
            self.relayed_messages.load(Ordering::Relaxed),
        )
    }

    fn count_relayed(&self, outbound: &Outbound) {
        if let Outbound::Binary(bytes) = outbound {
            self.relayed_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        self.relayed_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Checks a worker's registration and puts its route up. Returns the
    /// guard, the reply, and a notice about the setup token if it was refused.
    pub async fn register(
        self: &Arc<Self>,
        outbox: Outbox,
        secret: &Secret,
        device_id: Option<&DeviceId>,
        setup_token: Option<&Secret>,
        name: Option<String>,
    ) -> Result<(DeviceGuard, Option<Reject>), Reject> {
        check_secret_strength(secret.expose()).map_err(|weak| {
            Reject::new(
                ErrorCode::WeakSecret,
                format!("Registration rejected - {weak}"),
            )
        })?;
        let expected = derive_device_id(&self.salt, secret);
        match device_id {
            Some(given) if !constant_time_eq(given.as_str(), expected.as_str()) => {
                return Err(Reject::new(ErrorCode::DeviceIdMismatch, MISMATCH_MESSAGE));
            }
            Some(_) => self
                .store
                .upsert_seen(&expected, name)
                .await
                .map_err(Reject::internal)?,
            None => {
                let fresh = self
                    .store
                    .insert_new(&expected, name)
                    .await
                    .map_err(Reject::internal)?;
                if !fresh {
                    return Err(Reject::new(
                        ErrorCode::DeviceIdRequired,
                        "Registration rejected - this device is already registered; \
                         reconnect with the device_id saved at its first registration",
                    ));
                }
            }
        }
        let (owner, notice, spawn) = self.settle_owner(&expected, setup_token).await?;
        let conn = self.next_conn();
        let fleet = match &self.cluster {
            Some(cluster) => Some(
                join_fleet(cluster, &expected, owner.as_ref(), conn, &outbox)
                    .await
                    .map_err(Reject::internal)?,
            ),
            None => None,
        };
        let replaced = {
            let mut routes = self.routes.lock().unwrap();
            let old = routes.devices.insert(
                expected.clone(),
                DeviceRoute {
                    conn,
                    owner: owner.clone(),
                    outbox,
                    presence: fleet.as_ref().map(|hold| hold.revision),
                },
            );
            if let Some(owner) = &owner {
                if fleet.as_ref().is_some_and(|hold| hold.moved) {
                    // It reconnected here while another instance held it.
                    broadcast_status(&routes, owner, &expected, false);
                }
                broadcast_status(&routes, owner, &expected, true);
            }
            old
        };
        if let Some(old) = replaced {
            tracing::info!(device_id = %expected, "registration replaced an older connection");
            let _ = old.outbox.try_send(Outbound::Close(FromServer::error(
                ErrorCode::Replaced,
                "a newer registration of this device took over",
            )));
        }
        if let (Some(owner), Some((hive, spawn_id))) = (&owner, spawn) {
            self.spawn_registered(owner, &hive, spawn_id, expected.clone());
        }
        let guard = DeviceGuard {
            hub: self.clone(),
            device_id: expected,
            owner,
            conn,
            fleet,
        };
        Ok((guard, notice))
    }

    /// Claims the device with the setup token (or for the development owner)
    /// and returns its owner, and the hive and spawn id when a hive's spawn
    /// token claimed it. A bad setup token does not fail the registration: a
    /// worker keeps its token in its environment long after the claim, when
    /// the token has expired.
    async fn settle_owner(
        &self,
        device_id: &DeviceId,
        setup_token: Option<&Secret>,
    ) -> Result<(Option<UserId>, Option<Reject>, Option<(String, String)>), Reject> {
        let mut notice = None;
        let mut spawn = None;
        let claimant = match setup_token.map(|t| self.tokens.verify(t.expose(), TokenKind::Setup)) {
            Some(Ok(Claims {
                sub,
                spawn: Some(spawn_id),
                hive,
                ..
            })) => match self.take_spawn(&spawn_id, &sub, hive.as_deref()).await? {
                Some(hive) => {
                    spawn = Some((hive, spawn_id));
                    Some(sub)
                }
                // A used spawn token claims nothing more; the worker it
                // claimed reconnects with it harmlessly.
                None => {
                    if !self.owns(&sub, device_id).await? {
                        notice = Some(Reject::new(
                            ErrorCode::InvalidToken,
                            "setup token refused (this spawn token was already used); \
                             the device was not claimed",
                        ));
                    }
                    None
                }
            },
            Some(Ok(claims)) => Some(claims.sub),
            Some(Err(err)) => {
                let reject = Reject::from(err);
                notice = Some(Reject::new(
                    reject.code,
                    format!(
                        "setup token refused ({}); the device was not claimed",
                        reject.message
                    ),
                ));
                None
            }
            None => None,
        };
        let Some(claimant) = claimant.or_else(|| self.dev_owner.clone()) else {
            let record = self.store.get(device_id).await.map_err(Reject::internal)?;
            return Ok((record.and_then(|r| r.owner), notice, None));
        };
        let owner = self
            .store
            .claim(device_id, &claimant)
            .await
            .map_err(Reject::internal)?;
        if setup_token.is_some() && notice.is_none() && owner.as_ref() != Some(&claimant) {
            notice = Some(Reject::new(
                ErrorCode::AccessDenied,
                "the device is already claimed by another owner; the setup token was not used",
            ));
            spawn = None;
        }
        Ok((owner, notice, spawn))
    }

    /// Checks a client's access token and puts its route up.
    pub async fn authenticate(
        self: &Arc<Self>,
        outbox: Outbox,
        token: &Secret,
    ) -> Result<ClientGuard, Reject> {
        let claims = self.tokens.verify(token.expose(), TokenKind::Access)?;
        let client_id = ClientId::new(format!("c-{}", random_hex(12)));
        let attached = match &self.cluster {
            Some(cluster) => Some(
                cluster
                    .attach_client(&client_id, claims.sub.clone(), outbox.clone())
                    .await
                    .map_err(Reject::internal)?
                    .drop_guard(),
            ),
            None => None,
        };
        self.routes.lock().unwrap().clients.insert(
            client_id.clone(),
            ClientRoute {
                owner: claims.sub.clone(),
                outbox,
            },
        );
        Ok(ClientGuard {
            hub: self.clone(),
            client_id,
            owner: claims.sub,
            talked_to: Vec::new(),
            selected: None,
            _attached: attached,
        })
    }

    /// The owner's devices with their online status.
    pub async fn list_devices(&self, owner: &UserId) -> Result<Vec<DeviceInfo>, Reject> {
        let records = self
            .store
            .list_owned(owner)
            .await
            .map_err(Reject::internal)?;
        let routes = self.routes.lock().unwrap();
        Ok(records
            .into_iter()
            .map(|r| DeviceInfo {
                online: routes.devices.contains_key(&r.device_id)
                    || self.held_elsewhere(&r.device_id).is_some(),
                device_id: r.device_id,
                name: r.name,
                last_seen: r.last_seen,
            })
            .collect())
    }

    /// Where a device is held, when another instance of the fleet holds it.
    fn held_elsewhere(&self, device_id: &DeviceId) -> Option<Held> {
        let cluster = self.cluster.as_ref()?;
        cluster.presence().elsewhere(device_id, cluster.instance())
    }

    /// Where to send to a device the caller owns, or why it cannot be
    /// reached. Devices of other owners and unknown devices look the same.
    async fn owned_device_target(
        &self,
        owner: &UserId,
        device_id: &DeviceId,
    ) -> Result<Target, Reject> {
        let online = {
            let routes = self.routes.lock().unwrap();
            routes
                .devices
                .get(device_id)
                .map(|route| (route.owner.as_ref() == Some(owner), route.outbox.clone()))
        };
        match online {
            Some((true, outbox)) => Ok(Target::Local(outbox)),
            Some((false, _)) => Err(access_denied(device_id)),
            None => {
                if let (Some(cluster), Some(held)) = (&self.cluster, self.held_elsewhere(device_id))
                {
                    return if held.owner.as_ref() == Some(owner) {
                        Ok(Target::Remote(
                            cluster.clone(),
                            device_id.clone(),
                            owner.clone(),
                        ))
                    } else {
                        Err(access_denied(device_id))
                    };
                }
                let record = self.store.get(device_id).await.map_err(Reject::internal)?;
                if record.and_then(|r| r.owner).as_ref() == Some(owner) {
                    Err(Reject::new(
                        ErrorCode::DeviceOffline,
                        format!("device {device_id} is offline"),
                    ))
                } else {
                    Err(access_denied(device_id))
                }
            }
        }
    }

    /// The only online device of `owner`, if there is exactly one.
    fn sole_online_device(&self, owner: &UserId) -> Option<DeviceId> {
        let elsewhere = match &self.cluster {
            Some(cluster) => cluster
                .presence()
                .owned_elsewhere(owner, cluster.instance()),
            None => Vec::new(),
        };
        let routes = self.routes.lock().unwrap();
        let mut owned = routes
            .devices
            .iter()
            .filter(|(_, route)| route.owner.as_ref() == Some(owner))
            .map(|(id, _)| id)
            .chain(
                elsewhere
                    .iter()
                    .filter(|id| !routes.devices.contains_key(*id)),
            );
        match (owned.next(), owned.next()) {
            (Some(id), None) => Some(id.clone()),
            _ => None,
        }
    }

    /// Another instance put a device up: a connection of it here is an older
    /// one, replaced; the owner's clients here hear it is online — after
    /// hearing it went offline when it `moved` (was up already), so that
    /// their sessions start over with the reconnected worker.
    pub(crate) fn device_up_elsewhere(&self, device_id: &DeviceId, held: &Held, moved: bool) {
        let mut routes = self.routes.lock().unwrap();
        if let Some(route) = routes.devices.get(device_id) {
            if route.presence.is_some_and(|ours| ours > held.revision) {
                // News older than our own registration.
                return;
            }
            if let Some(old) = routes.devices.remove(device_id) {
                tracing::info!(%device_id, instance = %held.instance, "device registered on another instance; closing its connection here");
                let _ = old.outbox.try_send(Outbound::Close(FromServer::error(
                    ErrorCode::Replaced,
                    "a newer registration of this device took over",
                )));
            }
        }
        if let Some(owner) = &held.owner {
            if moved {
                broadcast_status(&routes, owner, device_id, false);
            }
            broadcast_status(&routes, owner, device_id, true);
        }
    }

    /// This instance's devices and hives, for presence to check that the
    /// fleet still sees them: (what, connection).
    pub(crate) fn fleet_holds(&self) -> Vec<(Hold, u64)> {
        let routes = self.routes.lock().unwrap();
        let devices = routes.devices.iter().map(|(id, route)| {
            let hold = Hold::Device(id.clone(), route.owner.clone());
            (hold, route.conn)
        });
        devices.chain(routes.hive.holds()).collect()
    }

    /// Presence announced a device or hive of this instance again (the
    /// fleet had lost its entry): withdrawing goes by the new revision.
    pub(crate) fn reannounced(&self, hold: &Hold, conn: u64, revision: u64) {
        let mut routes = self.routes.lock().unwrap();
        match hold {
            Hold::Device(device_id, _) => {
                if let Some(route) = routes.devices.get_mut(device_id)
                    && route.conn == conn
                {
                    route.presence = Some(revision);
                }
            }
            Hold::Hive(owner, name, _) => routes.hive.reannounced(owner, name, conn, revision),
        }
    }

    /// A device another instance held went away (or that instance did).
    pub(crate) fn device_down_elsewhere(&self, device_id: &DeviceId, held: &Held) {
        let routes = self.routes.lock().unwrap();
        if routes.devices.contains_key(device_id) {
            return;
        }
        if let Some(owner) = &held.owner {
            broadcast_status(&routes, owner, device_id, false);
        }
    }

    fn client_outbox(&self, client_id: &ClientId, owner: Option<&UserId>) -> Option<Outbox> {
        let routes = self.routes.lock().unwrap();
        routes
            .clients
            .get(client_id)
            .filter(|route| Some(&route.owner) == owner)
            .map(|route| route.outbox.clone())
    }

    /// Sends to a client of `owner` wherever it is connected. Not here: the
    /// instance holding the client (if any) checks the owner; a client that
    /// is gone everywhere drops it unheard.
    pub(crate) fn route_to_client(
        &self,
        owner: Option<&UserId>,
        client_id: &ClientId,
        outbound: Outbound,
    ) -> Result<(), Reject> {
        let gone = || {
            Reject::new(
                ErrorCode::ClientGone,
                format!("client {client_id} is not connected"),
            )
        };
        match (self.client_outbox(client_id, owner), &self.cluster, owner) {
            (Some(outbox), ..) => deliver(self, &outbox, outbound, gone()),
            (None, Some(cluster), Some(owner)) => {
                self.count_relayed(&outbound);
                cluster
                    .to_client(client_id, owner, &outbound)
                    .map_err(|_| backlogged())
            }
            _ => Err(gone()),
        }
    }
}

fn access_denied(device_id: &DeviceId) -> Reject {
    Reject::new(
        ErrorCode::AccessDenied,
        format!("device {device_id} is not one of yours"),
    )
}

fn broadcast_status(routes: &Routes, owner: &UserId, device_id: &DeviceId, online: bool) {
    for client in routes.clients.values().filter(|c| &c.owner == owner) {
        let _ = client
            .outbox
            .try_send(Outbound::Message(FromServer::DeviceStatus {
                device_id: device_id.clone(),
                online,
            }));
    }
}

/// Subscribes to what other instances send a device, then announces that
/// this instance holds it (in that order: once others see it here, their
/// messages arrive).
async fn join_fleet(
    cluster: &Arc<Cluster>,
    device_id: &DeviceId,
    owner: Option<&UserId>,
    conn: u64,
    outbox: &Outbox,
) -> anyhow::Result<FleetHold> {
    let moved = cluster
        .presence()
        .elsewhere(device_id, cluster.instance())
        .is_some();
    let attached = cluster
        .attach_device(device_id, owner.cloned(), outbox.clone())
        .await?;
    let hold = Hold::Device(device_id.clone(), owner.cloned());
    let revision = cluster.announce(&hold, conn).await?;
    Ok(FleetHold {
        cluster: cluster.clone(),
        revision,
        moved,
        _attached: attached.drop_guard(),
    })
}

/// Sends to a device wherever it is held.
fn deliver_to(hub: &Hub, target: Target, outbound: Outbound, gone: Reject) -> Result<(), Reject> {
    match target {
        Target::Local(outbox) => deliver(hub, &outbox, outbound, gone),
        Target::Remote(cluster, device_id, owner) => {
            hub.count_relayed(&outbound);
            cluster
                .to_device(&device_id, &owner, &outbound)
                .map_err(|_| backlogged())
        }
    }
}

/// Queues a message without waiting; a full queue is reported, not awaited.
fn deliver(hub: &Hub, outbox: &Outbox, outbound: Outbound, gone: Reject) -> Result<(), Reject> {
    hub.count_relayed(&outbound);
    outbox.try_send(outbound).map_err(|err| match err {
        mpsc::error::TrySendError::Full(_) => backlogged(),
        mpsc::error::TrySendError::Closed(_) => gone,
    })
}

fn backlogged() -> Reject {
    Reject::new(
        ErrorCode::PeerBacklogged,
        "the receiver is not keeping up; the message was dropped",
    )
}

impl DeviceGuard {
    /// The hub this device is registered with.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Sends a worker's `sync_data` to one client of the device's owner.
    pub fn send_to_client(&self, client_id: &ClientId, payload: Value) -> Result<(), Reject> {
        let message = FromServer::SyncData {
            payload,
            device_id: Some(self.device_id.clone()),
            client_id: None,
        };
        self.route_to_client(client_id, Outbound::Message(message))
    }

    /// Relays a session frame to one client of the device's owner.
    pub fn relay_to_client(&self, client_id: &ClientId, frame: &[u8]) -> Result<(), Reject> {
        let message = encode_relay(self.device_id.as_str(), frame);
        self.route_to_client(client_id, Outbound::Binary(message))
    }

    fn route_to_client(&self, client_id: &ClientId, outbound: Outbound) -> Result<(), Reject> {
        self.hub
            .route_to_client(self.owner.as_ref(), client_id, outbound)
    }
}

impl Drop for DeviceGuard {
    fn drop(&mut self) {
        let mut routes = self.hub.routes.lock().unwrap();
        let ours = routes
            .devices
            .get(&self.device_id)
            .is_some_and(|route| route.conn == self.conn);
        if !ours {
            return;
        }
        let route = routes.devices.remove(&self.device_id);
        if let (Some(fleet), Some(revision)) = (&self.fleet, route.and_then(|r| r.presence)) {
            let hold = Hold::Device(self.device_id.clone(), None);
            fleet.cluster.withdraw(&hold, revision);
        }
        if let Some(owner) = &self.owner {
            broadcast_status(&routes, owner, &self.device_id, false);
        }
        drop(routes);
        let store = self.hub.store.clone();
        let device_id = self.device_id.clone();
        tokio::spawn(async move {
            if let Err(err) = store.touch(&device_id).await {
                tracing::warn!(err = format!("{err:#}"), "cannot record last_seen");
            }
        });
    }
}

impl ClientGuard {
    /// The hub this client is connected to.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Lists the owner's devices.
    pub async fn list_devices(&self) -> Result<Vec<DeviceInfo>, Reject> {
        self.hub.list_devices(&self.owner).await
    }

    /// A request of this client for one of its owner's hives.
    pub fn hive_request<'a>(
        &'a self,
        hive: Option<&'a str>,
        ask: Ask,
        request_id: &'a str,
    ) -> HiveRequest<'a> {
        HiveRequest {
            owner: &self.owner,
            client_id: &self.client_id,
            hive,
            ask,
            request_id,
            kind: None,
        }
    }

    /// Checks that a setup token the client passes along is a valid one of
    /// its own owner.
    pub fn check_own_setup_token(&self, token: &Secret) -> Result<(), Reject> {
        let claims = self.hub.tokens.verify(token.expose(), TokenKind::Setup)?;
        if claims.sub != self.owner {
            return Err(Reject::new(
                ErrorCode::AccessDenied,
                "the setup token belongs to another owner",
            ));
        }
        Ok(())
    }

    /// Makes `device_id` the target of `sync_data` without a `device_id`.
    pub async fn select(&mut self, device_id: DeviceId) -> Result<(), Reject> {
        self.hub
            .owned_device_target(&self.owner, &device_id)
            .await?;
        self.selected = Some(device_id);
        Ok(())
    }

    /// Sends a client's `sync_data` to a device it owns: the one named, else
    /// the selected one, else its only online device.
    pub async fn send_to_device(
        &mut self,
        device_id: Option<DeviceId>,
        payload: Value,
    ) -> Result<(), Reject> {
        let message = FromServer::SyncData {
            payload,
            device_id: None,
            client_id: Some(self.client_id.clone()),
        };
        self.route_to_device(device_id, Outbound::Message(message))
            .await
    }

    /// Relays a session frame to a device it owns (addressed as for
    /// [`ClientGuard::send_to_device`]).
    pub async fn relay_to_device(
        &mut self,
        device_id: Option<DeviceId>,
        frame: &[u8],
    ) -> Result<(), Reject> {
        let message = encode_relay(self.client_id.as_str(), frame);
        self.route_to_device(device_id, Outbound::Binary(message))
            .await
    }

    async fn route_to_device(
        &mut self,
        device_id: Option<DeviceId>,
        outbound: Outbound,
    ) -> Result<(), Reject> {
        let device_id = device_id
            .or_else(|| self.selected.clone())
            .or_else(|| self.hub.sole_online_device(&self.owner))
            .ok_or_else(|| {
                Reject::new(
                    ErrorCode::NoTarget,
                    "no device addressed: set device_id, or select_device first",
                )
            })?;
        let target = self
            .hub
            .owned_device_target(&self.owner, &device_id)
            .await?;
        let offline = Reject::new(
            ErrorCode::DeviceOffline,
            format!("device {device_id} is offline"),
        );
        deliver_to(&self.hub, target, outbound, offline)?;
        if !self.talked_to.contains(&device_id) {
            self.talked_to.push(device_id);
        }
        Ok(())
    }
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut routes = self.hub.routes.lock().unwrap();
        routes.clients.remove(&self.client_id);
        for device_id in &self.talked_to {
            if let Some(route) = routes.devices.get(device_id) {
                let _ = route
                    .outbox
                    .try_send(Outbound::Message(FromServer::ClientLeft {
                        client_id: self.client_id.clone(),
                    }));
            } else if let Some(cluster) = &self.hub.cluster {
                cluster.client_left(device_id, &self.owner, &self.client_id);
            }
        }
    }
}
