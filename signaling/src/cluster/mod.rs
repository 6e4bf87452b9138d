//! The fleet backend: several signaling servers acting as one, on NATS.
//!
//! Without it (the default) a server keeps everything in its own process and
//! data dir. With `--nats-url`, every instance shares, through NATS:
//!
//! - **secrets** (JetStream key-value bucket `cocoon_config`): the HMAC salt
//!   and the token key, each created once with an atomic `create`, so
//!   concurrent instances agree and derive the same device ids and verify
//!   the same tokens;
//! - **devices** (buckets `cocoon_devices` and `cocoon_owners`, see
//!   [`devices`]): records and claims, changed only by compare-and-set;
//! - **presence** (bucket `cocoon_presence`, see [`presence`]): which instance
//!   holds each online device and hive, and a heartbeat per instance; every instance
//!   mirrors the bucket in memory and sweeps out the devices of an instance
//!   that stopped beating;
//! - **routing** (core NATS subjects): `cocoon.device.<device_id>` is
//!   subscribed by the instance holding that device, `cocoon.client.<client_id>`
//!   by the instance holding that client. A message carries the same JSON
//!   (`sync_data`, `client_left`) or binary relay message that the WebSocket
//!   would, with headers naming its kind and the owner it speaks for; the
//!   receiving instance checks that owner against its own route;
//! - **hives** (see [`hives`]): requests for a hive on another instance go to
//!   that instance, and spawn tokens are single-use across the fleet;
//! - **failures** (subject `cocoon.failures`): every failed registration or
//!   authentication, by source address, so that each instance's rate limit
//!   counts the whole fleet's (a guesser spread over the instances by a
//!   load balancer gets no more tries than against one).
//!
//! Routing stays local when both ends are on one instance; NATS carries only
//! what crosses instances.

pub mod devices;
pub mod hives;
pub mod presence;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKey;
use crate::hub::{Hub, Outbound, Outbox};
use crate::protocol::{ClientId, DeviceId, FromServer, UserId, decode_relay};
use crate::store::random_hex;

pub use devices::DeviceBucket;
pub use hives::HiveMail;
pub use presence::{Hold, Presence};

const CONFIG_BUCKET: &str = "cocoon_config";
const SALT_KEY: &str = "hmac_salt";
const TOKEN_KEY: &str = "token_key";

/// Where instances report failed registrations and authentications.
const FAILURES: &str = "cocoon.failures";

const KIND: &str = "Cocoon-Kind";
const OWNER: &str = "Cocoon-Owner";
const FROM: &str = "Cocoon-From";

/// How to reach the NATS cluster.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port`, or several separated by commas.
    pub url: String,
    /// Replicas of each key-value bucket (at most the cluster's size).
    pub replicas: usize,
}

impl NatsOptions {
    /// One replica (a single `nats-server`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            replicas: 1,
        }
    }
}

/// What routes a message between instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A JSON [`FromServer`] message.
    Message,
    /// A binary relay message.
    Relay,
    /// A client left; the payload is its id.
    ClientLeft,
    /// A [`HiveMail`] in JSON.
    HiveMail,
    /// A failed registration or authentication; the payload is the address.
    Failure,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Message => "message",
            Kind::Relay => "relay",
            Kind::ClientLeft => "client_left",
            Kind::HiveMail => "hive_mail",
            Kind::Failure => "failure",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "message" => Some(Kind::Message),
            "relay" => Some(Kind::Relay),
            "client_left" => Some(Kind::ClientLeft),
            "hive_mail" => Some(Kind::HiveMail),
            "failure" => Some(Kind::Failure),
            _ => None,
        }
    }
}

/// Messages waiting to be handed to the NATS connection, across all routes.
const PUBLISH_QUEUE: usize = 4096;

/// A message for another instance.
struct Publish {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// The publishing queue was full: NATS (or the network to it) is not
/// keeping up, and the message was dropped.
#[derive(Debug)]
pub struct Backlogged;

/// One instance's membership in the fleet.
pub struct Cluster {
    client: async_nats::Client,
    /// Feeds the one task that publishes, in order: NATS keeps the order of
    /// one connection's messages, and the session layer counts on it.
    publish: mpsc::Sender<Publish>,
    instance: String,
    presence: Presence,
    /// Used spawn ids.
    spawns: kv::Store,
    /// Mail for this instance's hives and the fleet's failures, until
    /// [`Cluster::start`] reads them.
    inboxes: Mutex<Option<Inboxes>>,
    /// Stops the background tasks (the presence watcher and heartbeat).
    stop: CancellationToken,
}

/// What [`Cluster::connect`] hands the server: the membership and the shared
/// state it reads from NATS.
pub struct Joined {
    /// The membership.
    pub cluster: Arc<Cluster>,
    /// The shared HMAC salt.
    pub salt: Vec<u8>,
    /// The shared token key.
    pub tokens: TokenKey,
    /// The shared device records.
    pub devices: DeviceBucket,
}

impl Cluster {
    /// Connects, creates the buckets if needed and reads (or creates) the
    /// shared secrets. `salt_override` is an operator's `HMAC_SALT`, which
    /// wins over the shared one (every instance must then be given the same).
    pub async fn connect(
        options: &NatsOptions,
        salt_override: Option<&str>,
    ) -> anyhow::Result<Joined> {
        let client = async_nats::ConnectOptions::new()
            .name("cocoon-signaling")
            .connection_timeout(Duration::from_secs(5))
            .connect(options.url.as_str())
            .await
            .with_context(|| format!("cannot connect to NATS at {}", options.url))?;
        let js = jetstream::new(client.clone());
        let config = bucket(&js, CONFIG_BUCKET, options.replicas, Keep::OnDisk).await?;
        let salt = match salt_override.filter(|s| !s.is_empty()) {
            Some(salt) => salt.as_bytes().to_vec(),
            None => shared_secret(&config, SALT_KEY).await?,
        };
        let tokens = TokenKey::new(shared_secret(&config, TOKEN_KEY).await?);
        let devices = DeviceBucket::open(&js, options.replicas).await?;
        let presence = Presence::open(&js, options.replicas).await?;
        let spawns = bucket(
            &js,
            hives::SPAWNS_BUCKET,
            options.replicas,
            Keep::OnDiskFor(hives::SPAWNS_KEPT),
        )
        .await?;
        let instance = format!("i-{}", random_hex(8));
        let inboxes = Inboxes {
            hive_mail: client
                .subscribe(hives::subject(&instance))
                .await
                .context("cannot subscribe to hive mail")?,
            failures: client
                .subscribe(FAILURES)
                .await
                .context("cannot subscribe to failures")?,
        };
        tracing::info!(%instance, url = %options.url, "joined the NATS fleet");
        let stop = CancellationToken::new();
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publish_loop(client.clone(), queue, stop.clone()));
        let cluster = Arc::new(Self {
            client,
            publish,
            instance,
            presence,
            spawns,
            inboxes: Mutex::new(Some(inboxes)),
            stop,
        });
        Ok(Joined {
            cluster,
            salt,
            tokens,
            devices,
        })
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Starts mirroring presence and beating the heartbeat, and reading hive
    /// mail and the fleet's failures; `hub` is told about devices appearing
    /// and vanishing elsewhere.
    pub fn start(self: &Arc<Self>, hub: Weak<Hub>) {
        if let Some(inboxes) = self.inboxes.lock().unwrap().take() {
            self.deliver(
                inboxes.hive_mail,
                hub.clone(),
                hives::decode,
                Hub::hive_mail,
            );
            let instance = self.instance.clone();
            let failure = move |message: &async_nats::Message| failure(message, &instance);
            self.deliver(
                inboxes.failures,
                hub.clone(),
                failure,
                Hub::failed_elsewhere,
            );
        }
        self.presence
            .start(self.instance.clone(), hub, self.stop.clone());
    }

    /// Hands what arrives on `subscriber` to the hub, as `decode` reads it
    /// (what it cannot read is dropped), until the instance leaves.
    fn deliver<T: 'static>(
        &self,
        mut subscriber: async_nats::Subscriber,
        hub: Weak<Hub>,
        decode: impl Fn(&async_nats::Message) -> Option<T> + Send + 'static,
        handle: fn(&Hub, T),
    ) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = subscriber.next() => match message {
                        Some(message) => message,
                        None => break,
                    },
                };
                let Some(item) = decode(&message) else {
                    continue;
                };
                match hub.upgrade() {
                    Some(hub) => handle(&hub, item),
                    None => break,
                }
            }
        });
    }

    /// Tells the other instances that `ip` failed to register or
    /// authenticate here (dropped when NATS is not keeping up).
    pub fn failed(&self, ip: IpAddr) {
        let payload = Bytes::from(ip.to_string());
        if self
            .publish(FAILURES.to_owned(), Kind::Failure, None, payload)
            .is_err()
        {
            tracing::debug!("a failure report dropped: the NATS queue is full");
        }
    }

    /// The presence mirror.
    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// Publishes that a device or hive is held here, by connection `conn`.
    /// Returns the revision to withdraw it by.
    pub async fn announce(&self, hold: &Hold, conn: u64) -> anyhow::Result<u64> {
        self.presence.announce(&self.instance, hold, conn).await
    }

    /// Withdraws this instance's presence of a device or hive (unless
    /// another instance took it over since).
    pub fn withdraw(&self, hold: &Hold, revision: u64) {
        self.presence.withdraw(hold, revision);
    }

    /// Forwards what other instances send to a local device into its outbox
    /// until the returned token is cancelled (or dropped with its guard).
    pub async fn attach_device(
        &self,
        device_id: &DeviceId,
        owner: Option<UserId>,
        outbox: Outbox,
    ) -> anyhow::Result<CancellationToken> {
        let subject = format!("cocoon.device.{device_id}");
        self.attach(subject, owner, outbox, true).await
    }

    /// Forwards what other instances send to a local client into its outbox.
    pub async fn attach_client(
        &self,
        client_id: &ClientId,
        owner: UserId,
        outbox: Outbox,
    ) -> anyhow::Result<CancellationToken> {
        let subject = format!("cocoon.client.{client_id}");
        self.attach(subject, Some(owner), outbox, false).await
    }

    /// Subscribes to `subject` and forwards into `outbox`. A device's
    /// forwarder (`device`) also remembers which instance each of its
    /// clients is on, and tells the device those clients left when their
    /// instance dies (nobody else could: their `client_left` died with it).
    async fn attach(
        &self,
        subject: String,
        owner: Option<UserId>,
        outbox: Outbox,
        device: bool,
    ) -> anyhow::Result<CancellationToken> {
        let mut subscriber = self
            .client
            .subscribe(subject.clone())
            .await
            .with_context(|| format!("cannot subscribe to {subject}"))?;
        let mut dead = self.presence.deaths();
        let done = self.stop.child_token();
        let stop = done.clone();
        tokio::spawn(async move {
            let mut clients = HashMap::new();
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    instance = dead.recv(), if device => {
                        if let Ok(instance) = instance {
                            left_with(&mut clients, &instance, &outbox);
                        }
                        continue;
                    }
                    message = subscriber.next() => match message {
                        Some(message) => message,
                        None => break,
                    },
                };
                let Some(outbound) = inbound(&message, owner.as_ref()) else {
                    continue;
                };
                if device {
                    track_client(&mut clients, &message, &outbound);
                }
                if outbox.try_send(outbound).is_err() {
                    // Full (its peer is not reading) or closed: as with a
                    // local route, the message is dropped, never awaited.
                    tracing::debug!(%subject, "dropped a message for a backlogged peer");
                }
            }
        });
        Ok(done)
    }

    /// Sends a message to a device held by another instance, as `owner`.
    pub fn to_device(
        &self,
        device_id: &DeviceId,
        owner: &UserId,
        outbound: &Outbound,
    ) -> Result<(), Backlogged> {
        self.send(format!("cocoon.device.{device_id}"), owner, outbound)
    }

    /// Sends a message to a client held by another instance, as the device
    /// owner `owner`.
    pub fn to_client(
        &self,
        client_id: &ClientId,
        owner: &UserId,
        outbound: &Outbound,
    ) -> Result<(), Backlogged> {
        self.send(format!("cocoon.client.{client_id}"), owner, outbound)
    }

    /// Tells a device held elsewhere that a client left.
    pub fn client_left(&self, device_id: &DeviceId, owner: &UserId, client_id: &ClientId) {
        let payload = Bytes::from(client_id.to_string());
        let subject = format!("cocoon.device.{device_id}");
        if self
            .publish(subject, Kind::ClientLeft, Some(owner), payload)
            .is_err()
        {
            tracing::warn!(%device_id, "client_left dropped: the NATS queue is full");
        }
    }

    fn send(&self, subject: String, owner: &UserId, outbound: &Outbound) -> Result<(), Backlogged> {
        let (kind, payload) = match outbound {
            Outbound::Message(message) => (
                Kind::Message,
                Bytes::from(serde_json::to_vec(message).expect("server messages serialize")),
            ),
            Outbound::Binary(bytes) => (Kind::Relay, bytes.clone()),
            Outbound::Close(_) => return Ok(()),
        };
        self.publish(subject, kind, Some(owner), payload)
    }

    /// Queues a message for the publishing task without waiting; a full
    /// queue drops it, as a full outbox does. `owner` is whom it speaks for.
    fn publish(
        &self,
        subject: String,
        kind: Kind,
        owner: Option<&UserId>,
        payload: Bytes,
    ) -> Result<(), Backlogged> {
        let mut headers = HeaderMap::new();
        headers.insert(KIND, kind.as_str());
        if let Some(owner) = owner {
            headers.insert(OWNER, owner.as_str());
        }
        headers.insert(FROM, self.instance.as_str());
        self.publish
            .try_send(Publish {
                subject,
                headers,
                payload,
            })
            .map_err(|_| Backlogged)
    }

    /// Stops the background tasks and waits until what was published has
    /// reached the NATS server.
    pub async fn leave(&self) {
        // What the closed connections queued last (`client_left`) goes out
        // first, for a bounded while.
        let drained = async {
            while self.publish.capacity() < self.publish.max_capacity() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
        self.stop.cancel();
        self.presence.leave(&self.instance).await;
        let _ = self.client.flush().await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Hands queued messages to the NATS connection, one at a time, in order.
/// async-nats buffers them and writes them out in batches.
async fn publish_loop(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<Publish>,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = queue.recv() => match message {
                Some(message) => message,
                None => break,
            },
        };
        if let Err(err) = client
            .publish_with_headers(message.subject.clone(), message.headers, message.payload)
            .await
        {
            tracing::warn!(%err, subject = %message.subject, "cannot publish to NATS");
        }
    }
}

/// Clients one device forwarder remembers at most.
const MAX_TRACKED_CLIENTS: usize = 4096;

/// Remembers the instance of the client a message for a device came from.
fn track_client(
    clients: &mut HashMap<ClientId, String>,
    message: &async_nats::Message,
    outbound: &Outbound,
) {
    let Some(from) = message.headers.as_ref().and_then(|h| h.get(FROM)) else {
        return;
    };
    let client_id = match outbound {
        Outbound::Binary(bytes) => match decode_relay(bytes.clone()) {
            Ok((address, _)) => ClientId::new(address),
            Err(_) => return,
        },
        Outbound::Message(FromServer::SyncData {
            client_id: Some(client_id),
            ..
        }) => client_id.clone(),
        Outbound::Message(FromServer::ClientLeft { client_id }) => {
            clients.remove(client_id);
            return;
        }
        _ => return,
    };
    if clients.len() < MAX_TRACKED_CLIENTS || clients.contains_key(&client_id) {
        clients.insert(client_id, from.as_str().to_owned());
    }
}

/// Tells a device that the clients it had on a dead instance left.
fn left_with(clients: &mut HashMap<ClientId, String>, instance: &str, outbox: &Outbox) {
    clients.retain(|client_id, on| {
        if on != instance {
            return true;
        }
        let left = FromServer::ClientLeft {
            client_id: client_id.clone(),
        };
        let _ = outbox.try_send(Outbound::Message(left));
        false
    });
}

/// Decodes a message from another instance for a local peer owned by
/// `owner`, or `None` when it is malformed or speaks for another owner.
fn inbound(message: &async_nats::Message, owner: Option<&UserId>) -> Option<Outbound> {
    let headers = message.headers.as_ref()?;
    let kind = Kind::parse(headers.get(KIND)?.as_str())?;
    let sender = headers.get(OWNER)?.as_str();
    if owner.map(UserId::as_str) != Some(sender) {
        tracing::debug!("dropped a message for another owner");
        return None;
    }
    match kind {
        Kind::Message => serde_json::from_slice::<FromServer>(&message.payload)
            .ok()
            .map(Outbound::Message),
        Kind::Relay => Some(Outbound::Binary(message.payload.clone())),
        Kind::ClientLeft => {
            let client_id = std::str::from_utf8(&message.payload).ok()?;
            Some(Outbound::Message(FromServer::ClientLeft {
                client_id: ClientId::new(client_id),
            }))
        }
        Kind::HiveMail | Kind::Failure => None,
    }
}

/// The subscriptions an instance reads for the hub rather than for a peer.
struct Inboxes {
    hive_mail: async_nats::Subscriber,
    failures: async_nats::Subscriber,
}

/// The address in another instance's failure report (`None` for this
/// instance's own reports, which NATS echoes back, and malformed ones).
fn failure(message: &async_nats::Message, instance: &str) -> Option<IpAddr> {
    let headers = message.headers.as_ref()?;
    if Kind::parse(headers.get(KIND)?.as_str())? != Kind::Failure
        || headers.get(FROM)?.as_str() == instance
    {
        return None;
    }
    std::str::from_utf8(&message.payload).ok()?.parse().ok()
}

/// Where a bucket's entries live, and for how long.
#[derive(Debug, Clone, Copy)]
enum Keep {
    /// In the NATS servers' memory (lost when they all restart).
    InMemory,
    /// On their disks, until deleted.
    OnDisk,
    /// On their disks, each entry for this long.
    OnDiskFor(Duration),
}

/// Opens a key-value bucket, creating it when missing. Creating one with the
/// same configuration is idempotent, so instances starting together agree.
///
/// The bucket's stream is made here, by the key-value conventions (stream
/// `KV_<bucket>` on `$KV.<bucket>.>`, one message per key, rollups, direct
/// gets), rather than by async-nats' `create_key_value`: that one first
/// reads account details which servers before 2.10 (Debian's) do not send.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    keep: Keep,
) -> anyhow::Result<kv::Store> {
    use jetstream::stream::{self, DiscardPolicy, StorageType};
    let (storage, max_age) = match keep {
        Keep::InMemory => (StorageType::Memory, Duration::ZERO),
        Keep::OnDisk => (StorageType::File, Duration::ZERO),
        Keep::OnDiskFor(age) => (StorageType::File, age),
    };
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage,
        max_age,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .with_context(|| format!("cannot create the NATS key-value bucket {name}"))?;
    js.get_key_value(name)
        .await
        .with_context(|| format!("cannot open the NATS key-value bucket {name}"))
}

/// A secret every instance shares: the one stored, else a new one created
/// atomically (when two instances race, the loser reads the winner's).
async fn shared_secret(bucket: &kv::Store, key: &str) -> anyhow::Result<Vec<u8>> {
    for _ in 0..8 {
        if let Some(value) = bucket
            .get(key)
            .await
            .with_context(|| format!("cannot read {key}"))?
            .filter(|v| !v.is_empty())
        {
            return Ok(value.to_vec());
        }
        let fresh = random_hex(32);
        match bucket.create(key, Bytes::from(fresh.clone())).await {
            Ok(_) => {
                tracing::info!(key, "created a shared secret in NATS");
                return Ok(fresh.into_bytes());
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err).with_context(|| format!("cannot create {key}")),
        }
    }
    anyhow::bail!("cannot agree on {key} with the other instances")
}

/// Whether a key-value entry holds a value (not a deletion marker).
fn live(entry: &kv::Entry) -> bool {
    entry.operation == kv::Operation::Put
}
