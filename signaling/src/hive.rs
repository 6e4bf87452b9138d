//! Hives: processes that start workers on demand for their owner.
//!
//! A hive registers with a *hive token* (its owner mints it) and a name unique
//! among the owner's hives. Clients of that owner — and nobody else — send it
//! `spawn_cocoon`, `terminate_cocoon` and `list_cocoons` through the server;
//! the hive's answers go back to the client that asked, and only while that
//! request is outstanding.
//!
//! A hive never sees a user's setup token. For every spawn the server mints a
//! short-lived, single-use setup token carrying a spawn id; the worker that
//! registers with it is claimed by the owner, and the hive is told which
//! device that was (`cocoon_registered`).
//!
//! In a fleet, a hive on another instance is listed and asked like a local
//! one; see [`crate::cluster::hives`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::auth::{Claims, TokenKind, unix_now};
use crate::cluster::presence::HeldHive;
use crate::cluster::{HiveMail, Hold};
use crate::hub::{Hub, Outbound, Outbox, Reject};
use crate::protocol::{
    ClientId, DeviceId, ErrorCode, FromServer, HiveInfo, HiveKind, Secret, UserId,
};
use crate::store::random_hex;

/// How long a spawn's setup token is valid.
pub const SPAWN_TOKEN_TTL: Duration = Duration::from_secs(600);
/// Requests one hive may have outstanding.
const MAX_PENDING_PER_HIVE: usize = 256;
/// Spawn tokens issued and not yet used, across all hives.
const MAX_OPEN_SPAWNS: usize = 16_384;
/// Kinds one hive may offer.
const MAX_KINDS: usize = 64;
/// Longest hive name, kind id or request id.
const MAX_ID_LEN: usize = 128;

/// A client's request for one of its owner's hives.
pub struct HiveRequest<'a> {
    /// The client's owner.
    pub owner: &'a UserId,
    /// The client.
    pub client_id: &'a ClientId,
    /// The hive it named, if any.
    pub hive: Option<&'a str>,
    /// What it asks.
    pub ask: Ask,
    /// Its handle for the answer.
    pub request_id: &'a str,
    /// For a spawn: the kind the hive must offer.
    pub kind: Option<&'a str>,
}

/// What a client asked a hive for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ask {
    /// `spawn_cocoon`.
    Spawn,
    /// `terminate_cocoon`.
    Terminate,
    /// `list_cocoons`.
    List,
}

pub(crate) struct HiveRoute {
    conn: u64,
    kinds: Vec<HiveKind>,
    outbox: Outbox,
    /// Outstanding requests: (client, request id) → what was asked.
    pending: HashMap<(ClientId, String), Ask>,
    /// With a fleet backend: the revision of this instance's presence entry.
    presence: Option<u64>,
}

/// A spawn token that has not claimed a device yet.
pub(crate) struct OpenSpawn {
    owner: UserId,
    hive: String,
    expires: Instant,
}

/// Hives and open spawns, part of the hub's routing table.
#[derive(Default)]
pub(crate) struct HiveRoutes {
    hives: HashMap<(UserId, String), HiveRoute>,
    /// Without a fleet backend: spawn tokens not used yet.
    spawns: HashMap<String, OpenSpawn>,
}

impl HiveRoutes {
    /// The hives, for presence to check that the fleet still sees them:
    /// (hive, connection).
    pub(crate) fn holds(&self) -> impl Iterator<Item = (Hold, u64)> + '_ {
        self.hives.iter().map(|((owner, name), route)| {
            let hold = Hold::Hive(owner.clone(), name.clone(), route.kinds.clone());
            (hold, route.conn)
        })
    }

    /// Presence announced a hive again: withdrawing goes by `revision`.
    pub(crate) fn reannounced(&mut self, owner: &UserId, name: &str, conn: u64, revision: u64) {
        if let Some(route) = self.hives.get_mut(&(owner.clone(), name.to_owned()))
            && route.conn == conn
        {
            route.presence = Some(revision);
        }
    }
}

/// A registered hive's hold on its route; dropping it takes the route down
/// and fails the requests it had not answered.
pub struct HiveGuard {
    hub: Arc<Hub>,
    /// The owner the hive spawns workers for.
    pub owner: UserId,
    /// The hive's name.
    pub name: String,
    conn: u64,
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Reject {
    Reject {
        code,
        message: message.into(),
    }
}

fn check_id(what: &str, id: &str) -> Result<(), Reject> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(reject(
            ErrorCode::InvalidMessage,
            format!("invalid {what} {id:?}: 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 - _ . :"),
        ))
    }
}

/// The reply a client gets when its request can no longer be answered.
fn failure(ask: Ask, request_id: String, hive: String, error: String) -> FromServer {
    match ask {
        Ask::Spawn => FromServer::SpawnCocoonResult {
            request_id,
            hive,
            success: false,
            service_name: None,
            device_id: None,
            error: Some(error),
        },
        Ask::Terminate => FromServer::TerminateCocoonResult {
            request_id,
            hive,
            success: false,
            error: Some(error),
        },
        Ask::List => FromServer::Error {
            code: ErrorCode::NoHive,
            message: format!("list_cocoons {request_id}: {error}"),
        },
    }
}

/// Closes a hive's connection that a newer registration replaced, and
/// tells the clients of its outstanding requests.
fn replaced(hub: &Hub, owner: &UserId, name: &str, route: HiveRoute) {
    let _ = route.outbox.try_send(Outbound::Close(FromServer::error(
        ErrorCode::Replaced,
        "a newer registration of this hive took over",
    )));
    fail_pending(hub, owner, name, route.pending);
}

/// Tells the clients of a hive's outstanding requests that it went away.
fn fail_pending(hub: &Hub, owner: &UserId, name: &str, pending: HashMap<(ClientId, String), Ask>) {
    for ((client_id, request_id), ask) in pending {
        let message = failure(
            ask,
            request_id,
            name.to_owned(),
            format!("hive {name} disconnected before answering"),
        );
        let _ = hub.route_to_client(Some(owner), &client_id, Outbound::Message(message));
    }
}

impl Hub {
    /// Checks a hive's token and puts its route up, replacing an older
    /// connection of the same owner and name (on any instance).
    pub async fn register_hive(
        self: &Arc<Self>,
        outbox: Outbox,
        token: &Secret,
        name: String,
        kinds: Vec<HiveKind>,
    ) -> Result<HiveGuard, Reject> {
        let claims = self.tokens().verify(token.expose(), TokenKind::Hive)?;
        check_id("hive name", &name)?;
        if kinds.len() > MAX_KINDS {
            return Err(reject(
                ErrorCode::InvalidMessage,
                format!("a hive offers at most {MAX_KINDS} kinds"),
            ));
        }
        for kind in &kinds {
            check_id("kind", &kind.id)?;
            check_id("runner type", &kind.runner_type)?;
        }
        let conn = self.next_conn();
        // Announced before its route is up: a put of an older registration
        // elsewhere, seen later, must find the newer revision here.
        let presence = match self.cluster() {
            Some(cluster) => {
                let hold = Hold::Hive(claims.sub.clone(), name.clone(), kinds.clone());
                let revision = cluster.announce(&hold, conn).await.map_err(|err| {
                    Reject::internal(err.context("cannot announce the hive to the fleet"))
                })?;
                Some(revision)
            }
            None => None,
        };
        let key = (claims.sub.clone(), name.clone());
        let route = HiveRoute {
            conn,
            kinds,
            outbox,
            pending: HashMap::new(),
            presence,
        };
        let old = self.routes().hive.hives.insert(key, route);
        if let Some(old) = old {
            tracing::info!(hive = %name, "hive registration replaced an older connection");
            replaced(self, &claims.sub, &name, old);
        }
        Ok(HiveGuard {
            hub: self.clone(),
            owner: claims.sub,
            name,
            conn,
        })
    }

    /// The owner's online hives.
    pub fn list_hives(&self, owner: &UserId) -> Vec<HiveInfo> {
        let mut hives: Vec<HiveInfo> = self
            .hives_of(owner)
            .into_iter()
            .map(|(name, kinds, _)| HiveInfo { name, kinds })
            .collect();
        hives.sort_by(|a, b| a.name.cmp(&b.name));
        hives
    }

    /// The owner's online hives, here and on other instances: name, kinds,
    /// and the instance holding it when that is not this one.
    fn hives_of(&self, owner: &UserId) -> Vec<(String, Vec<HiveKind>, Option<String>)> {
        let mut hives: Vec<_> = self
            .routes()
            .hive
            .hives
            .iter()
            .filter(|((o, _), _)| o == owner)
            .map(|((_, name), route)| (name.clone(), route.kinds.clone(), None))
            .collect();
        if let Some(cluster) = self.cluster() {
            for (name, held) in cluster
                .presence()
                .hives_elsewhere(owner, cluster.instance())
            {
                // Both for a moment when it moved: the newer closes the other.
                if !hives.iter().any(|(n, ..)| *n == name) {
                    hives.push((name, held.kinds, Some(held.instance)));
                }
            }
        }
        hives
    }

    /// Forwards a client's request to one of its owner's hives (see
    /// [`Hub::pick_hive`]); `make` builds the message for the chosen hive.
    /// The request stays outstanding until the hive answers.
    pub fn ask_hive(
        &self,
        request: HiveRequest<'_>,
        make: impl FnOnce(&str) -> Result<FromServer, Reject>,
    ) -> Result<(), Reject> {
        let HiveRequest {
            owner,
            client_id,
            hive,
            ask,
            request_id,
            kind,
        } = request;
        check_id("request_id", request_id)?;
        let (name, elsewhere) = self.pick_hive(owner, hive, kind)?;
        // Built without the routing lock: minting a spawn token takes it.
        let message = make(&name)?;
        let (Some(instance), Some(cluster)) = (elsewhere, self.cluster()) else {
            return self.deliver_ask(owner, &name, client_id, request_id, ask, message);
        };
        let mail = HiveMail::Ask {
            owner: owner.clone(),
            hive: name.clone(),
            client_id: client_id.clone(),
            request_id: request_id.to_owned(),
            ask,
            message,
        };
        cluster.send_hive_mail(&instance, &mail).map_err(|_| {
            reject(
                ErrorCode::PeerBacklogged,
                format!("hive {name} is not reachable right now; the request was dropped"),
            )
        })
    }

    /// Hands a request to a hive of this instance and keeps it outstanding.
    fn deliver_ask(
        &self,
        owner: &UserId,
        name: &str,
        client_id: &ClientId,
        request_id: &str,
        ask: Ask,
        message: FromServer,
    ) -> Result<(), Reject> {
        let mut routes = self.routes();
        let route = routes
            .hive
            .hives
            .get_mut(&(owner.clone(), name.to_owned()))
            .ok_or_else(|| reject(ErrorCode::NoHive, format!("hive {name} just went offline")))?;
        if route.pending.len() >= MAX_PENDING_PER_HIVE {
            return Err(reject(
                ErrorCode::PeerBacklogged,
                format!("hive {name} has too many requests outstanding"),
            ));
        }
        let key = (client_id.clone(), request_id.to_owned());
        if route.pending.contains_key(&key) {
            return Err(reject(
                ErrorCode::InvalidMessage,
                format!("request {request_id} is already outstanding"),
            ));
        }
        route
            .outbox
            .try_send(Outbound::Message(message))
            .map_err(|_| {
                reject(
                    ErrorCode::PeerBacklogged,
                    format!("hive {name} is not keeping up; the request was dropped"),
                )
            })?;
        route.pending.insert(key, ask);
        Ok(())
    }

    /// The hive a request goes to: the one named, else the only one (or,
    /// for a spawn, the first in name order offering the kind). With the
    /// instance holding it, when that is not this one.
    fn pick_hive(
        &self,
        owner: &UserId,
        hive: Option<&str>,
        kind: Option<&str>,
    ) -> Result<(String, Option<String>), Reject> {
        let offers = |kinds: &[HiveKind]| kind.is_none_or(|k| kinds.iter().any(|x| x.id == k));
        let mut candidates: Vec<(String, Option<String>)> = self
            .hives_of(owner)
            .into_iter()
            .filter(|(name, kinds, _)| hive.is_none_or(|h| h == name) && offers(kinds))
            .map(|(name, _, instance)| (name, instance))
            .collect();
        candidates.sort();
        match (candidates.as_slice(), hive, kind) {
            ([one], _, _) | ([one, ..], _, Some(_)) => Ok(one.clone()),
            ([_, _, ..], _, None) => Err(reject(
                ErrorCode::NoHive,
                "you have several online hives: name one with \"hive\"",
            )),
            ([], Some(h), Some(k)) => Err(reject(
                ErrorCode::NoHive,
                format!("no online hive {h:?} of yours offers kind {k:?}"),
            )),
            ([], Some(h), None) => Err(reject(
                ErrorCode::NoHive,
                format!("no online hive {h:?} of yours"),
            )),
            ([], None, Some(k)) => Err(reject(
                ErrorCode::NoHive,
                format!("none of your online hives offers kind {k:?}"),
            )),
            ([], None, None) => Err(reject(ErrorCode::NoHive, "you have no online hive")),
        }
    }

    /// Mints a single-use setup token for a worker that `hive` will start for
    /// `owner`.
    pub fn issue_spawn_token(
        &self,
        owner: &UserId,
        hive: &str,
    ) -> Result<(Secret, String), Reject> {
        let spawn_id = format!("s-{}", random_hex(12));
        let now = Instant::now();
        // A fleet keeps nothing until the token is used (`take_spawn`).
        if self.cluster().is_none() {
            let mut routes = self.routes();
            let spawns = &mut routes.hive.spawns;
            if spawns.len() >= MAX_OPEN_SPAWNS {
                spawns.retain(|_, open| open.expires > now);
            }
            if spawns.len() >= MAX_OPEN_SPAWNS {
                return Err(reject(
                    ErrorCode::PeerBacklogged,
                    "too many spawns are waiting for their workers",
                ));
            }
            spawns.insert(
                spawn_id.clone(),
                OpenSpawn {
                    owner: owner.clone(),
                    hive: hive.to_owned(),
                    expires: now + SPAWN_TOKEN_TTL,
                },
            );
        }
        let iat = unix_now();
        let token = self.tokens().sign(&Claims {
            sub: owner.clone(),
            kind: TokenKind::Setup,
            iat,
            exp: iat + SPAWN_TOKEN_TTL.as_secs(),
            spawn: Some(spawn_id.clone()),
            hive: Some(hive.to_owned()),
        });
        Ok((Secret::new(token), spawn_id))
    }

    /// Uses up a spawn token's id (from its verified claims): the hive that
    /// asked for it, if the token was not used before (anywhere in the
    /// fleet) and, without a fleet, its owner matches the open spawn.
    pub(crate) async fn take_spawn(
        &self,
        spawn_id: &str,
        owner: &UserId,
        hive: Option<&str>,
    ) -> Result<Option<String>, Reject> {
        if let Some(cluster) = self.cluster() {
            let first = cluster
                .use_spawn(spawn_id)
                .await
                .map_err(Reject::internal)?;
            return Ok(hive.filter(|_| first).map(str::to_owned));
        }
        let mut routes = self.routes();
        let Some(open) = routes.hive.spawns.remove(spawn_id) else {
            return Ok(None);
        };
        Ok((open.owner == *owner && open.expires > Instant::now()).then_some(open.hive))
    }

    /// Tells a hive (on whichever instance) that the worker of one of its
    /// spawns registered.
    pub(crate) fn spawn_registered(
        &self,
        owner: &UserId,
        hive: &str,
        spawn_id: String,
        device_id: DeviceId,
    ) {
        let message = FromServer::CocoonRegistered {
            spawn_id: spawn_id.clone(),
            device_id: device_id.clone(),
        };
        if self.tell_hive(owner, hive, message) {
            return;
        }
        let Some(cluster) = self.cluster() else {
            return;
        };
        if let Some(held) = cluster
            .presence()
            .hive_elsewhere(owner, hive, cluster.instance())
        {
            let mail = HiveMail::Registered {
                owner: owner.clone(),
                hive: hive.to_owned(),
                spawn_id,
                device_id,
            };
            if cluster.send_hive_mail(&held.instance, &mail).is_err() {
                tracing::warn!(%hive, "cocoon_registered dropped: the NATS queue is full");
            }
        }
    }

    /// Sends a message to a hive of this instance; false if it is not here.
    fn tell_hive(&self, owner: &UserId, hive: &str, message: FromServer) -> bool {
        let routes = self.routes();
        let Some(route) = routes.hive.hives.get(&(owner.clone(), hive.to_owned())) else {
            return false;
        };
        let _ = route.outbox.try_send(Outbound::Message(message));
        true
    }

    /// Mail from another instance for a hive of this one.
    pub(crate) fn hive_mail(&self, mail: HiveMail) {
        match mail {
            HiveMail::Ask {
                owner,
                hive,
                client_id,
                request_id,
                ask,
                message,
            } => {
                if let Err(err) =
                    self.deliver_ask(&owner, &hive, &client_id, &request_id, ask, message)
                {
                    let reply = failure(ask, request_id, hive, err.message);
                    let _ =
                        self.route_to_client(Some(&owner), &client_id, Outbound::Message(reply));
                }
            }
            HiveMail::Registered {
                owner,
                hive,
                spawn_id,
                device_id,
            } => {
                let message = FromServer::CocoonRegistered {
                    spawn_id,
                    device_id,
                };
                self.tell_hive(&owner, &hive, message);
            }
        }
    }

    /// A hive of this owner and name registered on another instance: if
    /// that is newer than ours, ours is closed as replaced.
    pub(crate) fn hive_up_elsewhere(&self, owner: &UserId, name: &str, held: &HeldHive) {
        let key = (owner.clone(), name.to_owned());
        let mut routes = self.routes();
        let newer = routes
            .hive
            .hives
            .get(&key)
            .is_some_and(|route| route.presence.is_none_or(|ours| ours < held.revision));
        if !newer {
            return;
        }
        let route = routes.hive.hives.remove(&key).expect("just seen");
        drop(routes);
        tracing::info!(hive = %name, instance = %held.instance, "hive registered on another instance; closing its connection here");
        replaced(self, owner, name, route);
    }
}

impl HiveGuard {
    /// The hub this hive is registered with.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Delivers the hive's answer to the client that asked, if the request
    /// is outstanding and the client still connected. A spawn result's device
    /// must belong to the owner.
    pub async fn answer(
        &self,
        client_id: ClientId,
        request_id: String,
        ask: Ask,
        mut message: FromServer,
    ) -> Result<(), Reject> {
        {
            let mut routes = self.hub.routes();
            let route = routes
                .hive
                .hives
                .get_mut(&(self.owner.clone(), self.name.clone()))
                .filter(|route| route.conn == self.conn)
                .ok_or_else(|| reject(ErrorCode::Replaced, "this hive connection was replaced"))?;
            let key = (client_id.clone(), request_id.clone());
            if route.pending.get(&key) != Some(&ask) {
                return Err(reject(
                    ErrorCode::InvalidMessage,
                    format!("no outstanding request {request_id} of client {client_id} to answer"),
                ));
            }
            route.pending.remove(&key);
        }
        if let FromServer::SpawnCocoonResult {
            device_id: device_id @ Some(_),
            success,
            error,
            ..
        } = &mut message
        {
            let id = device_id.as_ref().expect("matched Some");
            if !self.hub.owns(&self.owner, id).await? {
                tracing::warn!(hive = %self.name, device_id = %id, "hive named a device its owner does not own");
                *device_id = None;
                *success = false;
                *error = Some("the hive named a device that is not yours".into());
            }
        }
        self.hub
            .route_to_client(Some(&self.owner), &client_id, Outbound::Message(message))
    }

    /// A setup token for a worker this hive starts on its own (a pool).
    pub fn issue_setup_token(&self, request_id: String) -> Result<FromServer, Reject> {
        check_id("request_id", &request_id)?;
        let (setup_token, spawn_id) = self.hub.issue_spawn_token(&self.owner, &self.name)?;
        Ok(FromServer::SetupTokenIssued {
            request_id,
            setup_token,
            spawn_id,
        })
    }
}

impl Drop for HiveGuard {
    fn drop(&mut self) {
        let mut routes = self.hub.routes();
        let key = (self.owner.clone(), self.name.clone());
        if routes
            .hive
            .hives
            .get(&key)
            .is_none_or(|r| r.conn != self.conn)
        {
            return;
        }
        let route = routes.hive.hives.remove(&key).expect("just checked");
        drop(routes);
        if let (Some(cluster), Some(revision)) = (self.hub.cluster(), route.presence) {
            let hold = Hold::Hive(self.owner.clone(), self.name.clone(), Vec::new());
            cluster.withdraw(&hold, revision);
        }
        fail_pending(&self.hub, &self.owner, &self.name, route.pending);
    }
}
