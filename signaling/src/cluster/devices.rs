//! Device records and claims in JetStream key-value buckets.
//!
//! `cocoon_devices` maps a device id to its record (JSON); `cocoon_owners`
//! maps `o<hex of the owner>` to the ids of the devices it claimed. Every
//! change is a compare-and-set on the key's revision, retried on conflict,
//! so two instances claiming one device at once agree on the first owner.
//! A claim adds the device to the owner's index before it writes the owner
//! into the record: an instance lost in between leaves an index entry that
//! listing ignores, never a claimed device that its owner cannot list.

use anyhow::{Context, bail};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Keep, bucket, live};
use crate::auth::unix_now;
use crate::protocol::{DeviceId, UserId};
use crate::store::DeviceRecord;

const DEVICES_BUCKET: &str = "cocoon_devices";
const OWNERS_BUCKET: &str = "cocoon_owners";
/// Compare-and-set attempts before giving up on a busy key.
const ATTEMPTS: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    owner: Option<String>,
    name: Option<String>,
    first_seen: u64,
    last_seen: u64,
}

impl Stored {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("records serialize"))
    }
}

/// The shared device records. Cheap to clone.
#[derive(Clone)]
pub struct DeviceBucket {
    devices: kv::Store,
    owners: kv::Store,
}

/// A key's current value (if any) and the revision to update it against.
struct Current<T> {
    value: Option<T>,
    revision: u64,
}

impl<T: serde::de::DeserializeOwned> Current<T> {
    /// From a bucket entry: a deleted or purged key has no value but keeps
    /// its revision; a missing one is revision 0.
    fn of(entry: Option<kv::Entry>, what: impl FnOnce() -> String) -> anyhow::Result<Self> {
        Ok(match entry {
            Some(entry) if live(&entry) => Self {
                value: Some(serde_json::from_slice(&entry.value).with_context(what)?),
                revision: entry.revision,
            },
            Some(entry) => Self {
                value: None,
                revision: entry.revision,
            },
            None => Self {
                value: None,
                revision: 0,
            },
        })
    }
}

impl DeviceBucket {
    /// Opens (creating if needed) the buckets.
    pub async fn open(js: &jetstream::Context, replicas: usize) -> anyhow::Result<Self> {
        Ok(Self {
            devices: bucket(js, DEVICES_BUCKET, replicas, Keep::OnDisk).await?,
            owners: bucket(js, OWNERS_BUCKET, replicas, Keep::OnDisk).await?,
        })
    }

    async fn current(&self, device_id: &DeviceId) -> anyhow::Result<Current<Stored>> {
        let entry = self
            .devices
            .entry(device_id.as_str())
            .await
            .with_context(|| format!("cannot read device {device_id}"))?;
        Current::of(entry, || format!("device {device_id}: bad record"))
    }

    /// Writes `value` if the key is still at `revision`; `false` when another
    /// writer came first.
    async fn write(
        store: &kv::Store,
        key: &str,
        value: Bytes,
        revision: u64,
    ) -> anyhow::Result<bool> {
        let result = if revision == 0 {
            store.create(key, value).await.map(|_| ()).map_err(|err| {
                (
                    err.kind() == kv::CreateErrorKind::AlreadyExists,
                    anyhow::Error::new(err),
                )
            })
        } else {
            store
                .update(key, value, revision)
                .await
                .map(|_| ())
                .map_err(|err| {
                    (
                        err.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        anyhow::Error::new(err),
                    )
                })
        };
        match result {
            Ok(()) => Ok(true),
            Err((true, _)) => Ok(false),
            Err((false, err)) => Err(err.context(format!("cannot write {key}"))),
        }
    }

    /// Records a device seen for the first time; `false` when it was known.
    pub async fn insert_new(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<bool> {
        let now = unix_now();
        let record = Stored {
            owner: None,
            name,
            first_seen: now,
            last_seen: now,
        };
        let current = self.current(device_id).await?;
        if current.value.is_some() {
            return Ok(false);
        }
        Self::write(
            &self.devices,
            device_id.as_str(),
            record.encode(),
            current.revision,
        )
        .await
    }

    /// Records a registration of a known device (or creates its record).
    pub async fn upsert_seen(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<()> {
        self.modify(device_id, true, |record| {
            record.last_seen = unix_now();
            if name.is_some() {
                record.name = name.clone();
            }
            true
        })
        .await
        .map(|_| ())
    }

    /// Updates `last_seen`.
    pub async fn touch(&self, device_id: &DeviceId) -> anyhow::Result<()> {
        self.modify(device_id, false, |record| {
            record.last_seen = unix_now();
            true
        })
        .await
        .map(|_| ())
    }

    /// Claims an unclaimed device for `owner`; returns the owner afterwards.
    pub async fn claim(
        &self,
        device_id: &DeviceId,
        owner: &UserId,
    ) -> anyhow::Result<Option<UserId>> {
        let current = self.current(device_id).await?;
        match current.value {
            None => return Ok(None),
            Some(Stored {
                owner: Some(first), ..
            }) => return Ok(Some(UserId::new(first))),
            Some(_) => {}
        }
        self.index(owner, device_id).await?;
        let record = self
            .modify(device_id, false, |record| {
                if record.owner.is_some() {
                    return false;
                }
                record.owner = Some(owner.to_string());
                true
            })
            .await?;
        Ok(record.and_then(|r| r.owner).map(UserId::new))
    }

    /// Applies `change` to the record with compare-and-set, creating it first
    /// when `create` is set. `change` returns whether to write. Returns the
    /// record afterwards.
    async fn modify(
        &self,
        device_id: &DeviceId,
        create: bool,
        mut change: impl FnMut(&mut Stored) -> bool,
    ) -> anyhow::Result<Option<Stored>> {
        for _ in 0..ATTEMPTS {
            let current = self.current(device_id).await?;
            let mut record = match current.value {
                Some(record) => record,
                None if create => {
                    let now = unix_now();
                    Stored {
                        owner: None,
                        name: None,
                        first_seen: now,
                        last_seen: now,
                    }
                }
                None => return Ok(None),
            };
            if !change(&mut record) {
                return Ok(Some(record));
            }
            let written = Self::write(
                &self.devices,
                device_id.as_str(),
                record.encode(),
                current.revision,
            )
            .await?;
            if written {
                return Ok(Some(record));
            }
        }
        bail!("device {device_id}: too many concurrent changes")
    }

    /// Adds a device to its owner's index.
    async fn index(&self, owner: &UserId, device_id: &DeviceId) -> anyhow::Result<()> {
        let key = owner_key(owner);
        for _ in 0..ATTEMPTS {
            let current = self.owned_ids(&key).await?;
            let mut ids = current.value.unwrap_or_default();
            if ids.iter().any(|id| id == device_id.as_str()) {
                return Ok(());
            }
            ids.push(device_id.to_string());
            let value = Bytes::from(serde_json::to_vec(&ids).expect("ids serialize"));
            if Self::write(&self.owners, &key, value, current.revision).await? {
                return Ok(());
            }
        }
        bail!("owner index: too many concurrent changes")
    }

    async fn owned_ids(&self, key: &str) -> anyhow::Result<Current<Vec<String>>> {
        let entry = self
            .owners
            .entry(key)
            .await
            .context("cannot read an owner's devices")?;
        Current::of(entry, || "bad owner index entry".to_owned())
    }

    /// One device, if known.
    pub async fn get(&self, device_id: &DeviceId) -> anyhow::Result<Option<DeviceRecord>> {
        let current = self.current(device_id).await?;
        Ok(current
            .value
            .map(|stored| to_record(device_id.clone(), stored)))
    }

    /// Every device of `owner`, by name then id.
    pub async fn list_owned(&self, owner: &UserId) -> anyhow::Result<Vec<DeviceRecord>> {
        let ids = self
            .owned_ids(&owner_key(owner))
            .await?
            .value
            .unwrap_or_default();
        let lookups = ids.into_iter().map(|id| async move {
            let id = DeviceId::new(id);
            self.get(&id).await
        });
        let mut records: Vec<DeviceRecord> = futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .filter(|record| record.owner.as_ref() == Some(owner))
            .collect();
        records.sort_by(|a, b| (&a.name, &a.device_id).cmp(&(&b.name, &b.device_id)));
        Ok(records)
    }
}

/// Owner ids are arbitrary text; keys allow only a few characters.
fn owner_key(owner: &UserId) -> String {
    format!("o{}", crate::store::hex(owner.as_str().as_bytes()))
}

fn to_record(device_id: DeviceId, stored: Stored) -> DeviceRecord {
    DeviceRecord {
        device_id,
        owner: stored.owner.map(UserId::new),
        name: stored.name,
        last_seen: stored.last_seen,
    }
}
