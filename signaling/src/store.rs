//! What the server remembers across restarts: the HMAC salt, the token key
//! (files in the data dir) and the devices with their owners (SQLite) — or,
//! for an instance of a fleet, the devices in NATS ([`crate::cluster`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};

use crate::auth::{TokenKey, unix_now};
use crate::cluster::DeviceBucket;
use crate::files::{read_trimmed, write_private};
use crate::protocol::{DeviceId, UserId};

const SALT_FILE: &str = "hmac_salt";
const TOKEN_KEY_FILE: &str = "token_key";
const DB_FILE: &str = "signaling.db";

/// Loads the HMAC salt: `HMAC_SALT` when given, else the one saved in the
/// data dir, else a new one that is saved there (with a warning, since device
/// ids depend on it).
pub fn load_salt(data_dir: &Path, from_env: Option<&str>) -> anyhow::Result<Vec<u8>> {
    if let Some(salt) = from_env.filter(|s| !s.is_empty()) {
        return Ok(salt.as_bytes().to_vec());
    }
    let path = data_dir.join(SALT_FILE);
    if let Some(salt) = read_trimmed(&path)?.filter(|s| !s.is_empty()) {
        return Ok(salt.into_bytes());
    }
    let salt = random_hex(32);
    write_private(&path, salt.as_bytes())?;
    tracing::warn!(
        path = %path.display(),
        "HMAC_SALT is not set: generated a salt and saved it; device ids depend on it, keep the data dir"
    );
    Ok(salt.into_bytes())
}

/// Loads the token signing key from the data dir, creating it on first use.
pub fn load_token_key(data_dir: &Path) -> anyhow::Result<TokenKey> {
    let path = data_dir.join(TOKEN_KEY_FILE);
    let key = match read_trimmed(&path)?.filter(|s| !s.is_empty()) {
        Some(key) => key,
        None => {
            let key = random_hex(32);
            write_private(&path, key.as_bytes())?;
            key
        }
    };
    Ok(TokenKey::new(key.into_bytes()))
}

/// `bytes` random bytes in hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex(&buf)
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    /// The device.
    pub device_id: DeviceId,
    /// Its owner, once claimed.
    pub owner: Option<UserId>,
    /// The name it last registered with.
    pub name: Option<String>,
    /// Unix seconds of its last registration or disconnect.
    pub last_seen: u64,
}

/// The device records: the embedded database (the default), or the fleet's
/// shared buckets on NATS. Cheap to clone.
#[derive(Clone)]
pub struct Store(Backend);

#[derive(Clone)]
enum Backend {
    Sqlite(Sqlite),
    /// Shared, and large (two JetStream handles): behind an `Arc`.
    Nats(Arc<DeviceBucket>),
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Sqlite::open(data_dir).map(|db| Self(Backend::Sqlite(db)))
    }

    /// The fleet's shared records.
    pub fn shared(bucket: DeviceBucket) -> Self {
        Self(Backend::Nats(Arc::new(bucket)))
    }

    /// Records a device seen for the first time. Returns `false` when the
    /// device was already known (nothing is changed then).
    pub async fn insert_new(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<bool> {
        match &self.0 {
            Backend::Sqlite(db) => db.insert_new(device_id, name).await,
            Backend::Nats(bucket) => bucket.insert_new(device_id, name).await,
        }
    }

    /// Records a registration of a known device (or one the server forgot
    /// whose id still verifies): upserts it with a fresh `last_seen`.
    pub async fn upsert_seen(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<()> {
        match &self.0 {
            Backend::Sqlite(db) => db.upsert_seen(device_id, name).await,
            Backend::Nats(bucket) => bucket.upsert_seen(device_id, name).await,
        }
    }

    /// Updates `last_seen` (on disconnect).
    pub async fn touch(&self, device_id: &DeviceId) -> anyhow::Result<()> {
        match &self.0 {
            Backend::Sqlite(db) => db.touch(device_id).await,
            Backend::Nats(bucket) => bucket.touch(device_id).await,
        }
    }

    /// Claims an unclaimed device for `owner`. Returns the owner afterwards:
    /// `owner` itself, or whoever claimed it first.
    pub async fn claim(
        &self,
        device_id: &DeviceId,
        owner: &UserId,
    ) -> anyhow::Result<Option<UserId>> {
        match &self.0 {
            Backend::Sqlite(db) => db.claim(device_id, owner).await,
            Backend::Nats(bucket) => bucket.claim(device_id, owner).await,
        }
    }

    /// One device, if known.
    pub async fn get(&self, device_id: &DeviceId) -> anyhow::Result<Option<DeviceRecord>> {
        match &self.0 {
            Backend::Sqlite(db) => db.get(device_id).await,
            Backend::Nats(bucket) => bucket.get(device_id).await,
        }
    }

    /// Every device of `owner`, by name then id.
    pub async fn list_owned(&self, owner: &UserId) -> anyhow::Result<Vec<DeviceRecord>> {
        match &self.0 {
            Backend::Sqlite(db) => db.list_owned(owner).await,
            Backend::Nats(bucket) => bucket.list_owned(owner).await,
        }
    }
}

/// The embedded database; every call runs on the blocking pool.
#[derive(Clone)]
struct Sqlite {
    db: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Sqlite {
    fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join(DB_FILE);
        crate::files::make_db_private(&path)?;
        let db = Connection::open(&path)
            .with_context(|| format!("cannot open database {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS devices (
                 device_id  TEXT PRIMARY KEY,
                 owner      TEXT,
                 name       TEXT,
                 first_seen INTEGER NOT NULL,
                 last_seen  INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS devices_owner ON devices(owner);",
        )
        .with_context(|| format!("cannot initialise database {}", path.display()))?;
        Ok(Self {
            db: Arc::new(Mutex::new(db)),
            path,
        })
    }

    async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&db)
        })
        .await?
        .with_context(|| format!("database {}", path.display()))
    }

    /// Records a device seen for the first time. Returns `false` when the
    /// device was already known (nothing is changed then).
    pub async fn insert_new(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<bool> {
        let id = device_id.to_string();
        self.with_db(move |db| {
            let now = unix_now() as i64;
            let inserted = db.execute(
                "INSERT INTO devices (device_id, name, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(device_id) DO NOTHING",
                params![id, name, now],
            )?;
            Ok(inserted == 1)
        })
        .await
    }

    /// Records a registration of a known device (or one the server forgot
    /// whose id still verifies): upserts it with a fresh `last_seen`.
    pub async fn upsert_seen(
        &self,
        device_id: &DeviceId,
        name: Option<String>,
    ) -> anyhow::Result<()> {
        let id = device_id.to_string();
        self.with_db(move |db| {
            let now = unix_now() as i64;
            db.execute(
                "INSERT INTO devices (device_id, name, first_seen, last_seen) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET last_seen = ?3, name = COALESCE(?2, name)",
                params![id, name, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Updates `last_seen` (on disconnect).
    pub async fn touch(&self, device_id: &DeviceId) -> anyhow::Result<()> {
        let id = device_id.to_string();
        self.with_db(move |db| {
            db.execute(
                "UPDATE devices SET last_seen = ?2 WHERE device_id = ?1",
                params![id, unix_now() as i64],
            )?;
            Ok(())
        })
        .await
    }

    /// Claims an unclaimed device for `owner`. Returns the owner afterwards:
    /// `owner` itself, or whoever claimed it first.
    pub async fn claim(
        &self,
        device_id: &DeviceId,
        owner: &UserId,
    ) -> anyhow::Result<Option<UserId>> {
        let id = device_id.to_string();
        let owner = owner.to_string();
        self.with_db(move |db| {
            db.execute(
                "UPDATE devices SET owner = ?2 WHERE device_id = ?1 AND owner IS NULL",
                params![id, owner],
            )?;
            db.query_row(
                "SELECT owner FROM devices WHERE device_id = ?1",
                params![id],
                |row| row.get::<_, Option<String>>(0),
            )
            .optional()
            .map(|owner| owner.flatten().map(UserId::new))
        })
        .await
    }

    /// One device, if known.
    pub async fn get(&self, device_id: &DeviceId) -> anyhow::Result<Option<DeviceRecord>> {
        let id = device_id.to_string();
        self.with_db(move |db| {
            db.query_row(
                "SELECT device_id, owner, name, last_seen FROM devices WHERE device_id = ?1",
                params![id],
                record_from_row,
            )
            .optional()
        })
        .await
    }

    /// Every device of `owner`, by name then id.
    pub async fn list_owned(&self, owner: &UserId) -> anyhow::Result<Vec<DeviceRecord>> {
        let owner = owner.to_string();
        self.with_db(move |db| {
            let mut stmt = db.prepare_cached(
                "SELECT device_id, owner, name, last_seen FROM devices WHERE owner = ?1
                 ORDER BY name, device_id",
            )?;
            stmt.query_map(params![owner], record_from_row)?.collect()
        })
        .await
    }
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: DeviceId::new(row.get::<_, String>(0)?),
        owner: row.get::<_, Option<String>>(1)?.map(UserId::new),
        name: row.get(2)?,
        last_seen: row.get::<_, i64>(3)?.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_persist_and_first_owner_wins() {
        let dir = tempfile::tempdir().unwrap();
        let id = DeviceId::new("d1");
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(store.insert_new(&id, Some("box".into())).await.unwrap());
            assert!(!store.insert_new(&id, None).await.unwrap());
            let alice = UserId::new("alice");
            assert_eq!(store.claim(&id, &alice).await.unwrap(), Some(alice.clone()));
            let bob = UserId::new("bob");
            assert_eq!(store.claim(&id, &bob).await.unwrap(), Some(alice));
        }
        let store = Store::open(dir.path()).unwrap();
        let record = store.get(&id).await.unwrap().unwrap();
        assert_eq!(record.owner, Some(UserId::new("alice")));
        assert_eq!(record.name.as_deref(), Some("box"));
        assert_eq!(
            store.list_owned(&UserId::new("alice")).await.unwrap().len(),
            1
        );
        assert!(
            store
                .list_owned(&UserId::new("bob"))
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn salt_is_generated_once_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_salt(dir.path(), None).unwrap();
        assert_eq!(load_salt(dir.path(), None).unwrap(), first);
        assert_eq!(load_salt(dir.path(), Some("given")).unwrap(), b"given");
    }
}
