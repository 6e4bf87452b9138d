//! Which instance holds which device, shared through the `cocoon_presence`
//! key-value bucket (in memory on the NATS servers: it describes live
//! connections, nothing worth keeping across a restart of the cluster).
//!
//! - `d.<device_id>` → `{"instance": …, "owner": …, "conn": …}`, put by the instance
//!   that registered the device and deleted by it (compare-and-set on its own
//!   revision, so a takeover by another instance is never undone) when the
//!   connection ends;
//! - `i.<instance>` → put every [`HEARTBEAT`] by each live instance.
//!
//! Every instance watches the whole bucket into a [`Mirror`], so routing and
//! `list_devices` never wait on NATS. An instance not heard from for
//! [`STALE`] is presumed dead: its devices are swept out of every mirror
//! (their owners' clients are told they went offline) and out of the bucket.
//! A put for a device this instance also holds means the device registered
//! elsewhere since: the local connection is closed as `replaced`.
//!
//! The fleet heals: an instance announces again its devices whose entries
//! were swept while it could not reach NATS, and all of them when the
//! bucket itself was lost (NATS restarted; the bucket is made again and its
//! creation time changes), after which every watch starts over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;

use super::bucket;
use crate::hub::Hub;
use crate::protocol::{DeviceId, UserId};

const PRESENCE_BUCKET: &str = "cocoon_presence";
/// How often an instance says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Silence after which an instance is presumed dead.
pub const STALE: Duration = Duration::from_secs(6);

#[derive(Serialize, Deserialize)]
struct Value {
    instance: String,
    owner: Option<String>,
    /// The holding connection, within its instance: a new one is a new
    /// registration (the worker forgot its sessions), the same one a
    /// re-announcement.
    #[serde(default)]
    conn: u64,
}

/// A device held by some instance.
#[derive(Debug, Clone)]
pub struct Held {
    /// The instance holding its connection.
    pub instance: String,
    /// Its owner when it registered.
    pub owner: Option<UserId>,
    /// The holding connection, within its instance.
    pub conn: u64,
    /// The presence entry's revision.
    pub revision: u64,
}

/// The in-memory copy of the bucket.
#[derive(Default)]
struct Mirror {
    devices: HashMap<DeviceId, Held>,
    /// When each instance was last heard from.
    instances: HashMap<String, Instant>,
}

/// Presence: the bucket and this instance's mirror of it.
#[derive(Clone)]
pub struct Presence {
    kv: kv::Store,
    /// To make the bucket again when NATS lost it (it lives in memory).
    js: jetstream::Context,
    replicas: usize,
    mirror: Arc<Mutex<Mirror>>,
    /// Makes the watch start over (the bucket was lost).
    reset: Arc<Notify>,
    /// Announces instances presumed dead or gone.
    deaths: broadcast::Sender<String>,
}

/// What a change in the bucket means to the hub.
enum Change {
    /// Put up elsewhere; `moved` when it was already up (somewhere): its
    /// worker reconnected and forgot every session.
    Up(DeviceId, Held, bool),
    Down(DeviceId, Held),
}

impl Presence {
    /// Opens (creating if needed) the bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Self> {
        Ok(Self {
            kv: bucket(js, PRESENCE_BUCKET, replicas, true).await?,
            js: js.clone(),
            replicas,
            mirror: Arc::default(),
            reset: Arc::default(),
            deaths: broadcast::channel(64).0,
        })
    }

    /// Hears of every instance presumed dead or gone from now on.
    pub fn deaths(&self) -> broadcast::Receiver<String> {
        self.deaths.subscribe()
    }

    /// Puts this instance's hold on a device; returns the entry's revision.
    pub async fn announce(
        &self,
        instance: &str,
        device_id: &DeviceId,
        owner: Option<&UserId>,
        conn: u64,
    ) -> anyhow::Result<u64> {
        let value = Value {
            instance: instance.to_owned(),
            owner: owner.map(UserId::to_string),
            conn,
        };
        let value = Bytes::from(serde_json::to_vec(&value).expect("presence serializes"));
        Ok(self.kv.put(device_key(device_id), value).await?)
    }

    /// Deletes a device's entry if it is still at `revision`, in the
    /// background.
    pub fn withdraw(&self, device_id: &DeviceId, revision: u64) {
        let kv = self.kv.clone();
        let key = device_key(device_id);
        tokio::spawn(async move {
            // A wrong revision means another instance took the device over.
            let _ = kv.delete_expect_revision(key, Some(revision)).await;
        });
    }

    /// Where a device is held, when it is held by an instance other than
    /// `local`.
    pub fn elsewhere(&self, device_id: &DeviceId, local: &str) -> Option<Held> {
        let mirror = self.mirror.lock().unwrap();
        mirror
            .devices
            .get(device_id)
            .filter(|held| held.instance != local)
            .cloned()
    }

    /// The devices of `owner` held by instances other than `local`.
    pub fn owned_elsewhere(&self, owner: &UserId, local: &str) -> Vec<DeviceId> {
        let mirror = self.mirror.lock().unwrap();
        mirror
            .devices
            .iter()
            .filter(|(_, held)| held.instance != local && held.owner.as_ref() == Some(owner))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Starts the watcher and the heartbeat.
    pub(super) fn start(&self, instance: String, hub: Weak<Hub>, stop: CancellationToken) {
        let watcher = self.clone();
        let (me, to_hub, until) = (instance.clone(), hub.clone(), stop.clone());
        tokio::spawn(async move {
            while !until.is_cancelled() {
                if let Err(err) = watcher.watch(&me, &to_hub, &until).await {
                    tracing::warn!(err = format!("{err:#}"), "presence watch failed; retrying");
                }
                tokio::select! {
                    _ = until.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        let beater = self.clone();
        tokio::spawn(async move {
            let (mut missing, mut born) = (HashMap::new(), None);
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let lost = beater.beat(&instance, &mut born).await;
                beater.sweep(&instance, &hub);
                beater.heal(&instance, &hub, &mut missing, lost).await;
            }
        });
    }

    /// Puts this instance's heartbeat. Returns whether the bucket lost its
    /// contents (NATS restarted without it, and it was made again: its
    /// creation time, `born`, changed); the watch then starts over too.
    async fn beat(&self, instance: &str, born: &mut Option<i128>) -> bool {
        let now = Bytes::from(crate::auth::unix_now().to_string());
        match self.kv.put(instance_key(instance), now).await {
            Ok(_) => {
                let Ok(stream) = self.js.get_stream(format!("KV_{PRESENCE_BUCKET}")).await else {
                    return false;
                };
                let created = stream.cached_info().created.unix_timestamp_nanos();
                let lost = born.is_some_and(|before| before != created);
                *born = Some(created);
                if lost {
                    tracing::warn!(
                        "the presence bucket was lost; announcing this instance's devices again"
                    );
                    self.reset.notify_one();
                }
                lost
            }
            Err(err) => {
                tracing::warn!(%err, "cannot beat the presence heartbeat");
                // NATS may have restarted without the bucket: make it again.
                let made = bucket(&self.js, PRESENCE_BUCKET, self.replicas, true).await;
                if let Err(err) = made {
                    tracing::warn!(err = format!("{err:#}"), "cannot make the presence bucket");
                }
                false
            }
        }
    }

    /// Announces again the devices of this instance that the fleet lost:
    /// every one when the bucket was `lost`, else those missing from the
    /// mirror at two heartbeats running (swept while this instance could not
    /// reach NATS), so that a put the watch has not shown yet is not taken
    /// for a loss.
    async fn heal(
        &self,
        local: &str,
        hub: &Weak<Hub>,
        missing: &mut HashMap<DeviceId, u64>,
        lost: bool,
    ) {
        let Some(devices) = hub.upgrade().map(|hub| hub.fleet_devices()) else {
            return;
        };
        let gone: Vec<_> = {
            let mirror = self.mirror.lock().unwrap();
            devices
                .into_iter()
                // One held elsewhere is newer and closes ours, or older
                // and replaced once the watch shows our put.
                .filter(|(id, ..)| lost || !mirror.devices.contains_key(id))
                .collect()
        };
        let mut still = HashMap::new();
        for (device_id, owner, conn) in gone {
            if !lost && missing.get(&device_id) != Some(&conn) {
                still.insert(device_id, conn);
                continue;
            }
            match self.announce(local, &device_id, owner.as_ref(), conn).await {
                Ok(revision) => {
                    tracing::info!(%device_id, "announced a device the fleet had lost");
                    if let Some(hub) = hub.upgrade() {
                        hub.reannounced(&device_id, conn, revision);
                    }
                }
                Err(err) => tracing::warn!(%err, "cannot announce a device again"),
            }
        }
        *missing = still;
    }

    /// Follows the bucket from its current contents on.
    async fn watch(
        &self,
        local: &str,
        hub: &Weak<Hub>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut entries = self.kv.watch_with_history(">").await?;
        // The bucket's history rebuilds the mirror; what NATS lost meanwhile
        // its holders announce again (see `heal`).
        self.mirror.lock().unwrap().devices.clear();
        loop {
            let entry = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = self.reset.notified() => anyhow::bail!("the bucket was lost"),
                entry = entries.next() => match entry {
                    Some(entry) => entry?,
                    None => anyhow::bail!("the watch ended"),
                },
            };
            let changes = self.apply(&entry, local);
            let Some(hub) = hub.upgrade() else {
                return Ok(());
            };
            for change in changes {
                notify(&hub, change);
            }
        }
    }

    /// Applies one entry to the mirror; returns what the hub must hear of
    /// devices held elsewhere.
    fn apply(&self, entry: &kv::Entry, local: &str) -> Vec<Change> {
        let mut mirror = self.mirror.lock().unwrap();
        let put = entry.operation == kv::Operation::Put;
        if let Some(instance) = entry.key.strip_prefix("i.") {
            if put {
                mirror.instances.insert(instance.to_owned(), Instant::now());
                return Vec::new();
            }
            // A clean leave: its devices are gone with it.
            mirror.instances.remove(instance);
            let _ = self.deaths.send(instance.to_owned());
            return take_instance(&mut mirror, instance);
        }
        let Some(device_id) = entry.key.strip_prefix("d.").map(DeviceId::new) else {
            return Vec::new();
        };
        if !put {
            return match mirror.devices.remove(&device_id) {
                Some(held) if held.instance != local => vec![Change::Down(device_id, held)],
                _ => Vec::new(),
            };
        }
        let Ok(value) = serde_json::from_slice::<Value>(&entry.value) else {
            tracing::warn!(key = %entry.key, "ignored a malformed presence entry");
            return Vec::new();
        };
        let held = Held {
            instance: value.instance,
            owner: value.owner.map(UserId::new),
            conn: value.conn,
            revision: entry.revision,
        };
        // An instance first heard of through a device gets the same grace
        // as one that just beat.
        mirror
            .instances
            .entry(held.instance.clone())
            .or_insert_with(Instant::now);
        let before = mirror.devices.insert(device_id.clone(), held.clone());
        if held.instance == local {
            Vec::new()
        } else {
            let moved = before
                .is_some_and(|before| before.instance != held.instance || before.conn != held.conn);
            vec![Change::Up(device_id, held, moved)]
        }
    }

    /// Drops the instances not heard from for [`STALE`], with their devices.
    fn sweep(&self, local: &str, hub: &Weak<Hub>) {
        let (changes, dead) = {
            let mut mirror = self.mirror.lock().unwrap();
            let dead: Vec<String> = mirror
                .instances
                .iter()
                .filter(|(id, seen)| *id != local && seen.elapsed() > STALE)
                .map(|(id, _)| id.clone())
                .collect();
            let mut changes = Vec::new();
            for instance in &dead {
                tracing::warn!(%instance, "instance presumed dead; its devices are offline");
                mirror.instances.remove(instance);
                let _ = self.deaths.send(instance.clone());
                changes.extend(take_instance(&mut mirror, instance));
            }
            (changes, dead)
        };
        for change in &changes {
            if let Change::Down(device_id, held) = change {
                self.withdraw(device_id, held.revision);
            }
        }
        for instance in dead {
            let kv = self.kv.clone();
            tokio::spawn(async move {
                let _ = kv.delete(instance_key(&instance)).await;
            });
        }
        if let Some(hub) = hub.upgrade() {
            for change in changes {
                notify(&hub, change);
            }
        }
    }

    /// Says goodbye: deletes this instance's heartbeat, so the others sweep
    /// its devices at once.
    pub(super) async fn leave(&self, instance: &str) {
        let _ = self.kv.delete(instance_key(instance)).await;
    }
}

fn take_instance(mirror: &mut Mirror, instance: &str) -> Vec<Change> {
    let gone: Vec<DeviceId> = mirror
        .devices
        .iter()
        .filter(|(_, held)| held.instance == instance)
        .map(|(id, _)| id.clone())
        .collect();
    gone.into_iter()
        .filter_map(|id| {
            let held = mirror.devices.remove(&id)?;
            Some(Change::Down(id, held))
        })
        .collect()
}

fn notify(hub: &Hub, change: Change) {
    match change {
        Change::Up(device_id, held, moved) => hub.device_up_elsewhere(&device_id, &held, moved),
        Change::Down(device_id, held) => hub.device_down_elsewhere(&device_id, &held),
    }
}

fn device_key(device_id: &DeviceId) -> String {
    format!("d.{device_id}")
}

fn instance_key(instance: &str) -> String {
    format!("i.{instance}")
}
