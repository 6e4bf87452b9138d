//! Which instance holds which device, shared through the `cocoon_presence`
//! key-value bucket (in memory on the NATS servers: it describes live
//! connections, nothing worth keeping across a restart of the cluster).
//!
//! - `d.<device_id>` → `{"instance": …, "owner": …, "conn": …}`, put by the instance
//!   that registered the device and deleted by it (compare-and-set on its own
//!   revision, so a takeover by another instance is never undone) when the
//!   connection ends;
//! - `h.o<hex owner>.n<hex name>` → `{"instance": …, "owner": …, "name": …,
//!   "kinds": […], "conn": …}`, the same for each registered hive;
//! - `i.<instance>` → put every [`HEARTBEAT`] by each live instance.
//!
//! Every instance watches the whole bucket into a [`Mirror`], so routing and
//! `list_devices` never wait on NATS. An instance not heard from for
//! [`STALE`] is presumed dead: its devices are swept out of every mirror
//! (their owners' clients are told they went offline) and out of the bucket.
//! A put for a device (or hive) this instance also holds means it
//! registered elsewhere since: the local connection is closed as `replaced`.
//!
//! The fleet heals: an instance announces again its devices and hives whose entries
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

use super::{Keep, bucket};
use crate::hub::Hub;
use crate::protocol::{DeviceId, HiveKind, UserId};
use crate::store::hex;

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

#[derive(Serialize, Deserialize)]
struct HiveValue {
    instance: String,
    kinds: Vec<HiveKind>,
    conn: u64,
}

/// What an instance announces it holds.
#[derive(Debug, Clone)]
pub enum Hold {
    /// A registered worker and its owner at registration.
    Device(DeviceId, Option<UserId>),
    /// A registered hive: its owner, name and kinds.
    Hive(UserId, String, Vec<HiveKind>),
}

impl Hold {
    fn key(&self) -> String {
        match self {
            Hold::Device(device_id, _) => device_key(device_id),
            Hold::Hive(owner, name, _) => hive_key(owner, name),
        }
    }

    fn value(&self, instance: &str, conn: u64) -> Bytes {
        let json = match self {
            Hold::Device(_, owner) => serde_json::to_vec(&Value {
                instance: instance.to_owned(),
                owner: owner.as_ref().map(UserId::to_string),
                conn,
            }),
            Hold::Hive(_, _, kinds) => serde_json::to_vec(&HiveValue {
                instance: instance.to_owned(),
                kinds: kinds.clone(),
                conn,
            }),
        };
        Bytes::from(json.expect("presence serializes"))
    }
}

/// A hive held by some instance.
#[derive(Debug, Clone)]
pub struct HeldHive {
    /// The instance holding its connection.
    pub instance: String,
    /// What it offers.
    pub kinds: Vec<HiveKind>,
    /// The presence entry's revision.
    pub revision: u64,
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
    /// Hives by owner and name.
    hives: HashMap<(UserId, String), HeldHive>,
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
    /// A hive put up elsewhere.
    HiveUp(UserId, String, HeldHive),
    /// A hive of a dead instance, by key and revision.
    HiveDown(String, u64),
}

impl Presence {
    /// Opens (creating if needed) the bucket.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Self> {
        Ok(Self {
            kv: bucket(js, PRESENCE_BUCKET, replicas, Keep::InMemory).await?,
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

    /// Puts this instance's hold on a device or hive; returns the entry's
    /// revision.
    pub async fn announce(&self, instance: &str, hold: &Hold, conn: u64) -> anyhow::Result<u64> {
        Ok(self.kv.put(hold.key(), hold.value(instance, conn)).await?)
    }

    /// Deletes the entry of a device or hive if it is still at `revision`,
    /// in the background.
    pub fn withdraw(&self, hold: &Hold, revision: u64) {
        self.withdraw_key(hold.key(), revision);
    }

    fn withdraw_key(&self, key: String, revision: u64) {
        let kv = self.kv.clone();
        tokio::spawn(async move {
            // A wrong revision means another instance took it over.
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

    /// The hives of `owner` held by instances other than `local`, by name.
    pub fn hives_elsewhere(&self, owner: &UserId, local: &str) -> Vec<(String, HeldHive)> {
        let mirror = self.mirror.lock().unwrap();
        mirror
            .hives
            .iter()
            .filter(|((o, _), held)| o == owner && held.instance != local)
            .map(|((_, name), held)| (name.clone(), held.clone()))
            .collect()
    }

    /// Where a hive is held, when it is held by an instance other than
    /// `local`.
    pub fn hive_elsewhere(&self, owner: &UserId, name: &str, local: &str) -> Option<HeldHive> {
        let mirror = self.mirror.lock().unwrap();
        mirror
            .hives
            .get(&(owner.clone(), name.to_owned()))
            .filter(|held| held.instance != local)
            .cloned()
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
                let made = bucket(&self.js, PRESENCE_BUCKET, self.replicas, Keep::InMemory).await;
                if let Err(err) = made {
                    tracing::warn!(err = format!("{err:#}"), "cannot make the presence bucket");
                }
                false
            }
        }
    }

    /// Announces again the devices and hives of this instance that the
    /// fleet lost: every one when the bucket was `lost`, else those missing
    /// from the mirror at two heartbeats running (swept while this instance
    /// could not reach NATS), so that a put the watch has not shown yet is
    /// not taken for a loss.
    async fn heal(
        &self,
        local: &str,
        hub: &Weak<Hub>,
        missing: &mut HashMap<String, u64>,
        lost: bool,
    ) {
        let Some(holds) = hub.upgrade().map(|hub| hub.fleet_holds()) else {
            return;
        };
        let gone: Vec<_> = {
            let mirror = self.mirror.lock().unwrap();
            holds
                .into_iter()
                // One held elsewhere is newer and closes ours, or older
                // and replaced once the watch shows our put.
                .filter(|(hold, _)| lost || !mirror.has(hold))
                .collect()
        };
        let mut still = HashMap::new();
        for (hold, conn) in gone {
            let key = hold.key();
            if !lost && missing.get(&key) != Some(&conn) {
                still.insert(key, conn);
                continue;
            }
            match self.announce(local, &hold, conn).await {
                Ok(revision) => {
                    tracing::info!(%key, "announced again what the fleet had lost");
                    if let Some(hub) = hub.upgrade() {
                        hub.reannounced(&hold, conn, revision);
                    }
                }
                Err(err) => tracing::warn!(%err, %key, "cannot announce again"),
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
        {
            let mut mirror = self.mirror.lock().unwrap();
            mirror.devices.clear();
            mirror.hives.clear();
        }
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
        if let Some(rest) = entry.key.strip_prefix("h.") {
            return apply_hive(&mut mirror, rest, entry, local);
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
        mirror.heard_of(&held.instance);
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
            match change {
                Change::Down(device_id, held) => {
                    self.withdraw_key(device_key(device_id), held.revision);
                }
                Change::HiveDown(key, revision) => self.withdraw_key(key.clone(), *revision),
                _ => {}
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

impl Mirror {
    /// An instance first heard of through an entry gets the same grace as
    /// one that just beat.
    fn heard_of(&mut self, instance: &str) {
        if !self.instances.contains_key(instance) {
            self.instances.insert(instance.to_owned(), Instant::now());
        }
    }

    /// Whether the mirror shows `hold` (held by any instance).
    fn has(&self, hold: &Hold) -> bool {
        match hold {
            Hold::Device(device_id, _) => self.devices.contains_key(device_id),
            Hold::Hive(owner, name, _) => self.hives.contains_key(&(owner.clone(), name.clone())),
        }
    }
}

/// Applies a hive's entry (its key after `h.`) to the mirror.
fn apply_hive(mirror: &mut Mirror, key: &str, entry: &kv::Entry, local: &str) -> Vec<Change> {
    let Some(id) = parse_hive_key(key) else {
        tracing::warn!(key = %entry.key, "ignored a malformed presence key");
        return Vec::new();
    };
    if entry.operation != kv::Operation::Put {
        mirror.hives.remove(&id);
        return Vec::new();
    }
    let Ok(value) = serde_json::from_slice::<HiveValue>(&entry.value) else {
        tracing::warn!(key = %entry.key, "ignored a malformed presence entry");
        return Vec::new();
    };
    let held = HeldHive {
        instance: value.instance,
        kinds: value.kinds,
        revision: entry.revision,
    };
    mirror.heard_of(&held.instance);
    mirror.hives.insert(id.clone(), held.clone());
    if held.instance == local {
        Vec::new()
    } else {
        vec![Change::HiveUp(id.0, id.1, held)]
    }
}

fn take_instance(mirror: &mut Mirror, instance: &str) -> Vec<Change> {
    let mut changes = Vec::new();
    mirror.devices.retain(|id, held| {
        let keep = held.instance != instance;
        if !keep {
            changes.push(Change::Down(id.clone(), held.clone()));
        }
        keep
    });
    mirror.hives.retain(|(owner, name), held| {
        let keep = held.instance != instance;
        if !keep {
            changes.push(Change::HiveDown(hive_key(owner, name), held.revision));
        }
        keep
    });
    changes
}

fn notify(hub: &Hub, change: Change) {
    match change {
        Change::Up(device_id, held, moved) => hub.device_up_elsewhere(&device_id, &held, moved),
        Change::Down(device_id, held) => hub.device_down_elsewhere(&device_id, &held),
        Change::HiveUp(owner, name, held) => hub.hive_up_elsewhere(&owner, &name, &held),
        // Its requests were pending on the dead instance; nothing to tell.
        Change::HiveDown(..) => {}
    }
}

fn device_key(device_id: &DeviceId) -> String {
    format!("d.{device_id}")
}

/// Owners and hive names may hold characters a key may not: both go in hex,
/// after a letter (a key's tokens are never empty).
fn hive_key(owner: &UserId, name: &str) -> String {
    format!(
        "h.o{}.n{}",
        hex(owner.as_str().as_bytes()),
        hex(name.as_bytes())
    )
}

fn parse_hive_key(key: &str) -> Option<(UserId, String)> {
    let (owner, name) = key.split_once('.')?;
    let owner = unhex(owner.strip_prefix('o')?)?;
    Some((UserId::new(owner), unhex(name.strip_prefix('n')?)?))
}

fn unhex(text: &str) -> Option<String> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

fn instance_key(instance: &str) -> String {
    format!("i.{instance}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_keys_hold_any_owner_and_name_and_read_back() {
        for (owner, name) in [("alice", "rack"), ("a.b c/ü\u{0}", "x:y.z"), ("", "n")] {
            let key = hive_key(&UserId::new(owner), name);
            assert!(
                key.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
                "{key}"
            );
            assert!(key.split('.').all(|token| !token.is_empty()), "{key}");
            let parsed = parse_hive_key(key.strip_prefix("h.").unwrap());
            assert_eq!(parsed, Some((UserId::new(owner), name.to_owned())));
        }
        for bad in [
            "", "o61", "o6.n61", "61.61", "ozz.n61", "o616.n61", "off.n61", "o61.61",
        ] {
            assert_eq!(parse_hive_key(bad), None, "{bad:?}");
        }
    }
}
