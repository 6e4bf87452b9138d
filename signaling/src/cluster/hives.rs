//! Hives across the fleet.
//!
//! A hive is held by one instance, as a device is, and announced in the
//! presence bucket (see [`super::presence`]) so every instance lists it and
//! can pick it. What must reach it from elsewhere goes to its instance on
//! `cocoon.hives.<instance>` as a [`HiveMail`]: a client's request, or the
//! news that the worker of one of its spawns registered. The hive's answers
//! go back on the asking client's own subject, like any message for a
//! client.
//!
//! Spawn tokens carry their spawn id and hive in their signed claims; that
//! each claims one device, once, across the fleet, is kept by an atomic
//! `create` of `u.<spawn id>` in the `cocoon_spawns` bucket (whose entries
//! outlive the tokens, then expire).

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Backlogged, Cluster, Kind};
use crate::hive::{Ask, SPAWN_TOKEN_TTL};
use crate::protocol::{ClientId, DeviceId, FromServer, UserId};

pub(super) const SPAWNS_BUCKET: &str = "cocoon_spawns";
/// How long a used spawn id is remembered: longer than any token lives.
pub(super) const SPAWNS_KEPT: Duration = Duration::from_secs(SPAWN_TOKEN_TTL.as_secs() + 300);

/// What one instance tells another about a hive the other holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HiveMail {
    /// A client's request.
    Ask {
        /// The client's owner, and the hive's.
        owner: UserId,
        /// The hive's name.
        hive: String,
        /// The client that asked, on the sending instance.
        client_id: ClientId,
        /// The client's handle for the answer.
        request_id: String,
        /// What it asked.
        ask: Ask,
        /// What the hive is sent.
        message: FromServer,
    },
    /// The worker of one of the hive's spawns registered.
    Registered {
        /// The hive's owner, who now owns the worker.
        owner: UserId,
        /// The hive's name.
        hive: String,
        /// The spawn whose token the worker used.
        spawn_id: String,
        /// The worker.
        device_id: DeviceId,
    },
}

pub(super) fn subject(instance: &str) -> String {
    format!("cocoon.hives.{instance}")
}

impl Cluster {
    /// Sends `mail` to the instance holding the hive.
    pub fn send_hive_mail(&self, instance: &str, mail: &HiveMail) -> Result<(), Backlogged> {
        let owner = match mail {
            HiveMail::Ask { owner, .. } | HiveMail::Registered { owner, .. } => owner,
        };
        let payload = Bytes::from(serde_json::to_vec(mail).expect("hive mail serializes"));
        self.publish(subject(instance), Kind::HiveMail, Some(owner), payload)
    }

    /// Uses up a spawn id: true the first time, anywhere in the fleet.
    pub async fn use_spawn(&self, spawn_id: &str) -> anyhow::Result<bool> {
        // Spawn ids are ours ("s-" and hex, in a signed token); anything
        // else cannot be a key, and claims nothing.
        if spawn_id.is_empty()
            || !spawn_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Ok(false);
        }
        match self
            .spawns
            .create(format!("u.{spawn_id}"), Bytes::from_static(b"used"))
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err.into()),
        }
    }
}

/// Decodes a mail from another instance.
pub(super) fn decode(message: &async_nats::Message) -> Option<HiveMail> {
    let headers = message.headers.as_ref()?;
    if Kind::parse(headers.get(super::KIND)?.as_str())? != Kind::HiveMail {
        return None;
    }
    serde_json::from_slice(&message.payload).ok()
}
