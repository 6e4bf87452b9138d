//! The hive: registers with the signaling server with a hive token and
//! starts workers of its kinds (`COCOON_KINDS`) when its owner's clients ask,
//! optionally from a pool of pre-warmed ones.
//!
//! Everything the hive knows lives in one task: the server's requests, the
//! runners' outcomes and timers arrive as messages and are handled in turn,
//! so no state is shared between tasks. The workers it started outlive a
//! lost signaling connection, and stop with the hive.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cocoon_signaling::auth::unix_now;
use cocoon_signaling::protocol::{
    ClientId, CocoonInfo, DeviceId, ErrorCode, FromServer, HiveKind, Secret, ToServer,
};
use nix::sys::signal::Signal;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::ClientArgs;
use crate::client::ServerError;
use crate::container::Runtime;
use crate::kinds::Kind;
use crate::link::ws::WsLink;
use crate::worker::Backoff;
use runner::{Launch, Started};

pub mod runner;

/// A stopped script worker gets this long between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Exited workers `list_cocoons` still shows.
const KEEP_EXITED: usize = 32;
/// Largest pool per kind.
const MAX_POOL: usize = 64;
/// Most workers one hive runs at once (pooled ones included).
const MAX_WORKERS: usize = 256;

/// `cocoon hive`.
#[derive(clap::Args, Debug, Clone)]
pub struct HiveCommand {
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Action {
    /// Register with the signaling server and start workers on request.
    Run(HiveArgs),
    /// The kinds your online hives offer (--local: what COCOON_KINDS here
    /// defines).
    Kinds {
        #[command(flatten)]
        client: ClientArgs,
        /// Parse this machine's COCOON_KINDS instead of asking the server.
        #[arg(long)]
        local: bool,
        /// The kinds to parse with --local.
        #[arg(long, env = "COCOON_KINDS", default_value = "")]
        kinds: String,
    },
    /// The workers a hive runs.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Which hive (needed when you have several).
        #[arg(long)]
        hive: Option<String>,
    },
    /// Start a worker of KIND on a hive and print its device id.
    Spawn {
        #[command(flatten)]
        client: ClientArgs,
        /// The kind.
        kind: String,
        /// The new device's name.
        #[arg(long)]
        name: Option<String>,
        /// Which hive (default: the first offering KIND).
        #[arg(long)]
        hive: Option<String>,
        /// How long to wait for the worker to register.
        #[arg(long, default_value = "180s", value_parser = cocoon_signaling::parse_duration)]
        timeout: Duration,
    },
    /// Stop a worker a hive started.
    Terminate {
        #[command(flatten)]
        client: ClientArgs,
        /// Its service name (from `spawn` or `list`).
        service_name: String,
        /// Which hive (needed when you have several).
        #[arg(long)]
        hive: Option<String>,
    },
}

impl HiveCommand {
    /// Whether this runs the hive itself (which logs like a server).
    pub fn is_server(&self) -> bool {
        matches!(self.action, Action::Run(_))
    }
}

/// `cocoon hive run` options.
#[derive(clap::Args, Debug, Clone)]
pub struct HiveArgs {
    /// Signaling server WebSocket URL.
    #[arg(
        long,
        env = "SIGNALING_SERVER_URL",
        default_value = "ws://localhost:8080/ws"
    )]
    url: String,
    /// The hive token (`cocoon-signaling token hive --owner …`).
    #[arg(long, env = "COCOON_HIVE_TOKEN", hide_env_values = true, value_parser = secret)]
    hive_token: Option<Secret>,
    /// A file holding the hive token.
    #[arg(long, env = "COCOON_HIVE_TOKEN_FILE", conflicts_with = "hive_token")]
    hive_token_file: Option<PathBuf>,
    /// This hive's name, unique among its owner's hives [default: hostname].
    #[arg(long, env = "COCOON_HIVE_NAME")]
    name: Option<String>,
    /// The kinds it starts (four formats; see the README). Empty: the
    /// default Docker kinds.
    #[arg(long, env = "COCOON_KINDS", default_value = "")]
    kinds: String,
    /// Pre-warmed workers per kind: "kind=N,…".
    #[arg(long, env = "COCOON_HIVE_POOL", default_value = "")]
    pool: String,
    /// The signaling URL handed to workers [default: --url].
    #[arg(long, env = "COCOON_HIVE_WORKER_URL")]
    worker_url: Option<String>,
    /// Where script workers keep their data.
    #[arg(long, env = "COCOON_HIVE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// How long a new worker has to register before it counts as failed.
    #[arg(long, default_value = "120s", value_parser = cocoon_signaling::parse_duration)]
    register_timeout: Duration,
    /// Extra CA certificates (PEM) to trust for wss:// URLs.
    #[arg(long, env = "COCOON_CA_FILE")]
    ca_file: Option<PathBuf>,
}

fn secret(text: &str) -> Result<Secret, String> {
    Ok(Secret::new(text))
}

/// Runs a `cocoon hive` command; returns the exit code.
pub async fn run(command: HiveCommand, shutdown: CancellationToken) -> anyhow::Result<i32> {
    match command.action {
        Action::Run(args) => serve(args, shutdown).await.map(|()| 0),
        Action::Kinds {
            client,
            local,
            kinds,
        } => {
            if local {
                for kind in crate::kinds::parse(&kinds).map_err(anyhow::Error::msg)? {
                    println!("{} ({})", kind.id, kind.runner_type());
                }
            } else {
                let mut client = client.connect().await?;
                let hives = client.list_hives().await?;
                if hives.is_empty() {
                    println!("no online hives for {}", client.user_id);
                }
                for hive in hives {
                    for kind in hive.kinds {
                        println!("{} ({})  on {}", kind.id, kind.runner_type, hive.name);
                    }
                }
            }
            Ok(0)
        }
        Action::List { client, hive } => {
            let mut client = client.connect().await?;
            let request_id = request_id();
            let reply = client
                .hive_call(
                    ToServer::ListCocoons {
                        request_id: request_id.clone(),
                        hive,
                    },
                    &request_id,
                    Duration::from_secs(10),
                )
                .await?;
            let FromServer::CocoonList { hive, cocoons, .. } = reply else {
                anyhow::bail!("unexpected reply: {reply:?}");
            };
            if cocoons.is_empty() {
                println!("hive {hive} runs no workers");
            }
            for c in cocoons {
                println!(
                    "{}:{}  {:8}  {} ({})  {}",
                    hive,
                    c.service_name,
                    c.state,
                    c.handle,
                    c.kind,
                    c.device_id.as_ref().map_or("-", DeviceId::as_str)
                );
            }
            Ok(0)
        }
        Action::Spawn {
            client,
            kind,
            name,
            hive,
            timeout,
        } => {
            let mut client = client.connect().await?;
            let request_id = request_id();
            let message = ToServer::SpawnCocoon {
                request_id: request_id.clone(),
                kind,
                name,
                setup_token: None,
                hive,
            };
            match client.hive_call(message, &request_id, timeout).await? {
                FromServer::SpawnCocoonResult {
                    success: true,
                    hive,
                    service_name,
                    device_id,
                    ..
                } => {
                    println!(
                        "{}  {}:{}",
                        device_id.as_ref().map_or("-", DeviceId::as_str),
                        hive,
                        service_name.as_deref().unwrap_or("-")
                    );
                    Ok(0)
                }
                FromServer::SpawnCocoonResult { error, .. } => {
                    anyhow::bail!("spawn failed: {}", error.unwrap_or_default())
                }
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Action::Terminate {
            client,
            service_name,
            hive,
        } => {
            let mut client = client.connect().await?;
            let request_id = request_id();
            let message = ToServer::TerminateCocoon {
                request_id: request_id.clone(),
                service_name: service_name.clone(),
                hive,
            };
            match client
                .hive_call(message, &request_id, STOP_GRACE * 3)
                .await?
            {
                FromServer::TerminateCocoonResult { success: true, .. } => {
                    println!("terminated {service_name}");
                    Ok(0)
                }
                FromServer::TerminateCocoonResult { error, .. } => {
                    anyhow::bail!("terminate failed: {}", error.unwrap_or_default())
                }
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn request_id() -> String {
    format!("r-{}", random_hex(8))
}

/// Parses "kind=N,…" against the configured kinds.
pub fn parse_pool(text: &str, kinds: &[Kind]) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut pool = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (kind, size) = entry
            .split_once('=')
            .with_context(|| format!("pool entry {entry:?}: expected kind=N"))?;
        let size: usize = size
            .trim()
            .parse()
            .with_context(|| format!("pool entry {entry:?}: N is not a number"))?;
        anyhow::ensure!(
            size <= MAX_POOL,
            "pool entry {entry:?}: at most {MAX_POOL} per kind"
        );
        let kind = kind.trim();
        anyhow::ensure!(
            kinds.iter().any(|k| k.id == kind),
            "pool entry {entry:?}: no kind {kind:?} is configured"
        );
        pool.insert(kind.to_owned(), size);
    }
    Ok(pool)
}

/// Runs the hive until shutdown, reconnecting as needed; stops the workers
/// it started on the way out.
async fn serve(args: HiveArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let kinds =
        crate::kinds::parse(&args.kinds).map_err(|err| anyhow::anyhow!("COCOON_KINDS: {err}"))?;
    let pool = parse_pool(&args.pool, &kinds)?;
    let token = match (&args.hive_token, &args.hive_token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(file)) => Secret::new(
            std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .trim(),
        ),
        (None, None) => anyhow::bail!(
            "no hive token: set COCOON_HIVE_TOKEN or COCOON_HIVE_TOKEN_FILE \
             (mint one with `cocoon-signaling token hive --owner …`)"
        ),
    };
    let name = args.name.clone().unwrap_or_else(crate::up::hostname);
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| cocoon_signaling::default_data_dir("hive"));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let tls = crate::tls::client_config(args.ca_file.as_deref())?;
    let (events_tx, mut events) = mpsc::channel(256);
    let mut hive = Hive {
        worker_url: args.worker_url.clone().unwrap_or_else(|| args.url.clone()),
        name,
        kinds: kinds
            .into_iter()
            .map(|k| (k.id.clone(), Arc::new(k)))
            .collect(),
        pool,
        state_dir,
        register_timeout: args.register_timeout,
        services: BTreeMap::new(),
        spawns: HashMap::new(),
        pool_requests: HashMap::new(),
        events: events_tx,
        next_request: 0,
    };
    println!(
        "🐝 Hive {} offers: {}",
        hive.name,
        hive.kinds
            .values()
            .map(|k| format!("{} ({})", k.id, k.runner_type()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut backoff = Backoff::default();
    let result = loop {
        match hive.connect(&args.url, &token, tls.clone()).await {
            Ok(mut link) => {
                backoff.reset();
                if hive.serve(&mut link, &mut events, &shutdown).await {
                    break Ok(());
                }
                tracing::warn!("signaling connection lost");
            }
            Err(err) if is_fatal(&err) => break Err(err),
            Err(err) => tracing::warn!(err = format!("{err:#}"), "cannot register the hive"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    hive.stop_all(&mut events).await;
    result
}

fn is_fatal(err: &anyhow::Error) -> bool {
    err.downcast_ref::<ServerError>().is_some_and(|e| {
        e.code.is_credential_failure()
            || matches!(e.code, ErrorCode::InvalidMessage | ErrorCode::AccessDenied)
    })
}

/// Where a started worker is.
enum Handle {
    Process {
        pid: u32,
        data_dir: PathBuf,
    },
    Container {
        runtime: Runtime,
        name: String,
        volume: String,
    },
}

impl Handle {
    fn describe(&self) -> String {
        match self {
            Handle::Process { pid, .. } => format!("pid {pid}"),
            Handle::Container { runtime, name, .. } => format!("{} {name}", runtime.program()),
        }
    }
}

/// A client waiting for an answer.
struct Asker {
    client_id: ClientId,
    request_id: String,
}

struct Service {
    kind: String,
    handle: Option<Handle>,
    device_id: Option<DeviceId>,
    started_at: u64,
    /// Started for the pool and not handed out yet.
    pooled: bool,
    /// The client whose spawn waits for this worker to register.
    spawn_asker: Option<Asker>,
    /// The client whose terminate waits for this worker to stop.
    stop_asker: Option<Asker>,
    stopping: bool,
    exit: Option<String>,
}

impl Service {
    fn state(&self) -> &'static str {
        match (&self.exit, self.stopping, &self.device_id, self.pooled) {
            (Some(_), ..) => "exited",
            (None, true, ..) => "stopping",
            (None, false, None, _) => "starting",
            (None, false, Some(_), true) => "pooled",
            (None, false, Some(_), false) => "running",
        }
    }

    fn alive(&self) -> bool {
        self.exit.is_none() && !self.stopping
    }
}

/// What the hive's tasks and timers report.
enum Event {
    Started {
        service: String,
        result: Result<Handle, String>,
    },
    Exited {
        service: String,
        status: String,
    },
    Removed {
        service: String,
        result: Result<(), String>,
    },
    RegisterDeadline {
        service: String,
    },
    KillDeadline {
        service: String,
    },
}

struct Hive {
    name: String,
    worker_url: String,
    kinds: BTreeMap<String, Arc<Kind>>,
    pool: BTreeMap<String, usize>,
    state_dir: PathBuf,
    register_timeout: Duration,
    services: BTreeMap<String, Service>,
    /// Spawn ids whose worker has not registered yet → service name.
    spawns: HashMap<String, String>,
    /// Outstanding `issue_setup_token` requests → kind.
    pool_requests: HashMap<String, String>,
    events: mpsc::Sender<Event>,
    next_request: u64,
}

impl Hive {
    async fn connect(
        &self,
        url: &str,
        token: &Secret,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<WsLink> {
        let mut link = WsLink::connect(url, tls).await?;
        link.send(&ToServer::RegisterHive {
            hive_token: token.clone(),
            name: self.name.clone(),
            kinds: self
                .kinds
                .values()
                .map(|k| HiveKind {
                    id: k.id.clone(),
                    runner_type: k.runner_type().into(),
                })
                .collect(),
        })
        .await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), link.recv())
            .await
            .context("the server did not answer register_hive in time")??
            .context("the server closed the connection")?;
        match reply {
            FromServer::HiveRegistered { name, owner } => {
                println!("✅ Hive {name} registered for {owner}");
                Ok(link)
            }
            FromServer::Error { code, message } => Err(ServerError { code, message }.into()),
            other => anyhow::bail!("unexpected reply to register_hive: {other:?}"),
        }
    }

    /// Serves one registered connection; true when shutdown was requested.
    async fn serve(
        &mut self,
        link: &mut WsLink,
        events: &mut mpsc::Receiver<Event>,
        shutdown: &CancellationToken,
    ) -> bool {
        // Token requests of a previous connection will never be answered.
        self.pool_requests.clear();
        let mut out = Vec::new();
        self.refill(&mut out);
        loop {
            for message in out.drain(..) {
                if link.send(&message).await.is_err() {
                    return false;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                message = link.recv() => match message {
                    Ok(Some(message)) => self.on_message(message, &mut out),
                    Ok(None) => return false,
                    Err(err) => {
                        tracing::warn!(err = format!("{err:#}"), "signaling connection failed");
                        return false;
                    }
                },
                Some(event) = events.recv() => self.on_event(event, &mut out),
            }
        }
    }

    fn on_message(&mut self, message: FromServer, out: &mut Vec<ToServer>) {
        match message {
            FromServer::SpawnCocoon {
                request_id,
                client_id,
                kind,
                name,
                setup_token,
                spawn_id,
            } => {
                let asker = Asker {
                    client_id,
                    request_id,
                };
                self.spawn(asker, &kind, name, setup_token, spawn_id, out)
            }
            FromServer::TerminateCocoon {
                request_id,
                client_id,
                service_name,
            } => {
                let asker = Asker {
                    client_id,
                    request_id,
                };
                self.terminate(asker, &service_name, out)
            }
            FromServer::ListCocoons {
                request_id,
                client_id,
            } => out.push(ToServer::CocoonList {
                request_id,
                client_id,
                cocoons: self.list(),
            }),
            FromServer::SetupTokenIssued {
                request_id,
                setup_token,
                spawn_id,
            } => {
                if let Some(kind) = self.pool_requests.remove(&request_id) {
                    self.launch(&kind, None, "pool", None, &setup_token, spawn_id);
                }
            }
            FromServer::CocoonRegistered {
                spawn_id,
                device_id,
            } => self.registered(&spawn_id, device_id, out),
            FromServer::Error { code, message } => {
                tracing::warn!(?code, message, "the server refused a hive message")
            }
            other => tracing::debug!(?other, "ignoring a message not meant for hives"),
        }
    }

    fn spawn(
        &mut self,
        asker: Asker,
        kind: &str,
        name: Option<String>,
        setup_token: Secret,
        spawn_id: String,
        out: &mut Vec<ToServer>,
    ) {
        if !self.kinds.contains_key(kind) {
            out.push(spawn_failed(asker, None, format!("unknown kind {kind:?}")));
            return;
        }
        let running = self.services.values().filter(|s| s.exit.is_none()).count();
        let ready = self
            .services
            .values()
            .any(|s| s.kind == kind && s.pooled && s.alive() && s.device_id.is_some());
        if running >= MAX_WORKERS && !ready {
            out.push(spawn_failed(
                asker,
                None,
                format!("this hive already runs {MAX_WORKERS} workers"),
            ));
            return;
        }
        // A pre-warmed worker of this kind, registered and waiting?
        let ready = self
            .services
            .iter_mut()
            .find(|(_, s)| s.kind == kind && s.pooled && s.alive() && s.device_id.is_some());
        if let Some((service_name, service)) = ready {
            service.pooled = false;
            tracing::info!(service = %service_name, "handing out a pre-warmed worker");
            out.push(ToServer::SpawnCocoonResult {
                request_id: asker.request_id,
                client_id: asker.client_id,
                success: true,
                service_name: Some(service_name.clone()),
                device_id: service.device_id.clone(),
                error: None,
            });
            self.refill(out);
            return;
        }
        let request_id = asker.request_id.clone();
        self.launch(kind, name, &request_id, Some(asker), &setup_token, spawn_id);
    }

    /// Starts a worker in the background; its outcome arrives as events.
    fn launch(
        &mut self,
        kind: &str,
        name: Option<String>,
        request_id: &str,
        asker: Option<Asker>,
        setup_token: &Secret,
        spawn_id: String,
    ) {
        let Some(kind) = self.kinds.get(kind).cloned() else {
            return;
        };
        let safe_kind: String = kind
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        let service_name = format!("cocoon-{safe_kind}-{}", random_hex(3));
        let pooled = asker.is_none();
        self.services.insert(
            service_name.clone(),
            Service {
                kind: kind.id.clone(),
                handle: None,
                device_id: None,
                started_at: unix_now(),
                pooled,
                spawn_asker: asker,
                stop_asker: None,
                stopping: false,
                exit: None,
            },
        );
        self.spawns.insert(spawn_id, service_name.clone());
        let (events, url, hive, state_dir) = (
            self.events.clone(),
            self.worker_url.clone(),
            self.name.clone(),
            self.state_dir.clone(),
        );
        let (request_id, setup_token) = (request_id.to_owned(), setup_token.clone());
        let timeout = self.register_timeout;
        tokio::spawn(async move {
            let device_name = name.unwrap_or_else(|| service_name.clone());
            let launch = Launch {
                kind: &kind,
                service_name: &service_name,
                request_id: &request_id,
                device_name: &device_name,
                url: &url,
                setup_token: &setup_token,
                hive: &hive,
                state_dir: &state_dir,
            };
            let result = match runner::start(&launch).await {
                Ok(Started::Process {
                    mut child,
                    data_dir,
                }) => {
                    let pid = child.id().unwrap_or_default();
                    let (events, service) = (events.clone(), service_name.clone());
                    tokio::spawn(async move {
                        let status = match child.wait().await {
                            Ok(status) => status.to_string(),
                            Err(err) => err.to_string(),
                        };
                        let _ = events.send(Event::Exited { service, status }).await;
                    });
                    Ok(Handle::Process { pid, data_dir })
                }
                Ok(Started::Container {
                    runtime,
                    name,
                    volume,
                }) => Ok(Handle::Container {
                    runtime,
                    name,
                    volume,
                }),
                Err(err) => Err(format!("{err:#}")),
            };
            let service = service_name.clone();
            let _ = events.send(Event::Started { service, result }).await;
            tokio::time::sleep(timeout).await;
            let _ = events
                .send(Event::RegisterDeadline {
                    service: service_name,
                })
                .await;
        });
    }

    fn registered(&mut self, spawn_id: &str, device_id: DeviceId, out: &mut Vec<ToServer>) {
        let Some(service_name) = self.spawns.remove(spawn_id) else {
            return;
        };
        let Some(service) = self.services.get_mut(&service_name) else {
            return;
        };
        tracing::info!(service = %service_name, %device_id, "worker registered");
        service.device_id = Some(device_id.clone());
        if let Some(asker) = service.spawn_asker.take() {
            out.push(ToServer::SpawnCocoonResult {
                request_id: asker.request_id,
                client_id: asker.client_id,
                success: true,
                service_name: Some(service_name),
                device_id: Some(device_id),
                error: None,
            });
        }
    }

    fn terminate(&mut self, asker: Asker, service_name: &str, out: &mut Vec<ToServer>) {
        let Some(service) = self.services.get_mut(service_name) else {
            out.push(terminate_result(
                asker,
                Err(format!("no worker {service_name:?} on this hive")),
            ));
            return;
        };
        if service.exit.is_some() {
            self.forget(service_name);
            out.push(terminate_result(asker, Ok(())));
            return;
        }
        if service.stopping || service.handle.is_none() {
            out.push(terminate_result(
                asker,
                Err(format!("{service_name} is {}; try again", service.state())),
            ));
            return;
        }
        service.stop_asker = Some(asker);
        self.stop(service_name);
    }

    /// Begins stopping a worker; the outcome arrives as an event.
    fn stop(&mut self, service_name: &str) {
        let Some(service) = self.services.get_mut(service_name) else {
            return;
        };
        service.stopping = true;
        let events = self.events.clone();
        let service = service_name.to_owned();
        match &self.services[service_name].handle {
            Some(Handle::Process { pid, .. }) => {
                runner::signal_group(*pid, Signal::SIGTERM);
                tokio::spawn(async move {
                    tokio::time::sleep(STOP_GRACE).await;
                    let _ = events.send(Event::KillDeadline { service }).await;
                });
            }
            Some(Handle::Container {
                runtime,
                name,
                volume,
            }) => {
                let (runtime, name, volume) = (*runtime, name.clone(), volume.clone());
                tokio::spawn(async move {
                    let result = runtime
                        .remove(&name, Some(&volume))
                        .await
                        .map_err(|err| format!("{err:#}"));
                    let _ = events.send(Event::Removed { service, result }).await;
                });
            }
            None => {}
        }
    }

    fn on_event(&mut self, event: Event, out: &mut Vec<ToServer>) {
        match event {
            Event::Started { service, result } => {
                let Some(s) = self.services.get_mut(&service) else {
                    return;
                };
                match result {
                    Ok(handle) => {
                        tracing::info!(service, handle = handle.describe(), "worker started");
                        s.handle = Some(handle);
                    }
                    Err(err) => {
                        tracing::warn!(service, err, "cannot start a worker");
                        if let Some(asker) = s.spawn_asker.take() {
                            out.push(spawn_failed(asker, Some(service.clone()), err));
                        }
                        self.forget(&service);
                        self.refill(out);
                    }
                }
            }
            Event::Exited { service, status } => {
                let Some(s) = self.services.get_mut(&service) else {
                    return;
                };
                tracing::info!(service, status, "worker exited");
                s.exit = Some(status.clone());
                if s.stop_asker.is_some() {
                    // The answer waits until its data is gone too.
                    if let Some(Handle::Process { data_dir, .. }) = s.handle.take() {
                        let events = self.events.clone();
                        tokio::spawn(async move {
                            let removal = move || runner::remove_data_dir(&data_dir);
                            let _ = tokio::task::spawn_blocking(removal).await;
                            let result = Ok(());
                            let _ = events.send(Event::Removed { service, result }).await;
                        });
                    }
                } else if let Some(asker) = s.spawn_asker.take() {
                    let log = match &s.handle {
                        Some(Handle::Process { data_dir, .. }) => {
                            format!("; its log was {}", data_dir.join("worker.log").display())
                        }
                        _ => String::new(),
                    };
                    out.push(spawn_failed(
                        asker,
                        Some(service.clone()),
                        format!("the worker exited ({status}) before registering{log}"),
                    ));
                } else if s.pooled || s.stopping {
                    self.forget(&service);
                }
                self.trim_exited();
                self.refill(out);
            }
            Event::Removed { service, result } => {
                if let Some(asker) = self
                    .services
                    .get_mut(&service)
                    .and_then(|s| s.stop_asker.take())
                {
                    out.push(terminate_result(asker, result));
                }
                self.forget(&service);
                self.refill(out);
            }
            Event::RegisterDeadline { service } => {
                let Some(s) = self.services.get_mut(&service) else {
                    return;
                };
                if s.device_id.is_none() && s.alive() {
                    tracing::warn!(service, "worker did not register in time; stopping it");
                    if let Some(asker) = s.spawn_asker.take() {
                        out.push(spawn_failed(
                            asker,
                            Some(service.clone()),
                            format!(
                                "the worker did not register within {:?}",
                                self.register_timeout
                            ),
                        ));
                    }
                    self.stop(&service);
                }
            }
            Event::KillDeadline { service } => {
                if let Some(Service {
                    handle: Some(Handle::Process { pid, .. }),
                    exit: None,
                    ..
                }) = self.services.get(&service)
                {
                    tracing::warn!(service, "worker ignored SIGTERM; killing it");
                    runner::signal_group(*pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Drops a service from the table, and a script worker's data with it.
    fn forget(&mut self, service_name: &str) {
        let Some(service) = self.services.remove(service_name) else {
            return;
        };
        self.spawns.retain(|_, s| s != service_name);
        if let Some(Handle::Process { data_dir, .. }) = service.handle {
            tokio::task::spawn_blocking(move || runner::remove_data_dir(&data_dir));
        }
    }

    fn trim_exited(&mut self) {
        let exited: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.exit.is_some() && s.stop_asker.is_none())
            .map(|(name, _)| name.clone())
            .collect();
        for name in exited.iter().take(exited.len().saturating_sub(KEEP_EXITED)) {
            self.forget(name);
        }
    }

    /// Asks for setup tokens for the pre-warmed workers each kind lacks.
    fn refill(&mut self, out: &mut Vec<ToServer>) {
        // Pools never take the hive past its worker limit.
        let mut room = MAX_WORKERS.saturating_sub(
            self.services.values().filter(|s| s.exit.is_none()).count() + self.pool_requests.len(),
        );
        for (kind, &want) in &self.pool {
            let have = self
                .services
                .values()
                .filter(|s| &s.kind == kind && s.pooled && s.alive())
                .count()
                + self.pool_requests.values().filter(|k| *k == kind).count();
            for _ in have..want {
                if room == 0 {
                    return;
                }
                room -= 1;
                self.next_request += 1;
                let request_id = format!("pool-{}", self.next_request);
                self.pool_requests.insert(request_id.clone(), kind.clone());
                out.push(ToServer::IssueSetupToken { request_id });
            }
        }
    }

    fn list(&self) -> Vec<CocoonInfo> {
        self.services
            .iter()
            .map(|(name, s)| CocoonInfo {
                service_name: name.clone(),
                kind: s.kind.clone(),
                state: s.state().into(),
                handle: s
                    .handle
                    .as_ref()
                    .map_or_else(|| "-".into(), Handle::describe),
                device_id: s.device_id.clone(),
                started_at: s.started_at,
            })
            .collect()
    }

    /// Stops every worker the hive started and waits (boundedly) for them.
    async fn stop_all(&mut self, events: &mut mpsc::Receiver<Event>) {
        // No refills from here on.
        self.pool.clear();
        let names: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.alive() && s.handle.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        if names.is_empty() {
            return;
        }
        println!("🛑 Stopping {} worker(s)", names.len());
        for name in &names {
            self.stop(name);
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_secs(5);
        let mut sink = Vec::new();
        while self
            .services
            .values()
            .any(|s| s.stopping && s.exit.is_none())
        {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => self.on_event(event, &mut sink),
                _ => break,
            }
        }
        let leftovers: Vec<String> = self.services.keys().cloned().collect();
        for name in leftovers {
            self.forget(&name);
        }
    }
}

fn spawn_failed(asker: Asker, service_name: Option<String>, error: String) -> ToServer {
    ToServer::SpawnCocoonResult {
        request_id: asker.request_id,
        client_id: asker.client_id,
        success: false,
        service_name,
        device_id: None,
        error: Some(error),
    }
}

fn terminate_result(asker: Asker, result: Result<(), String>) -> ToServer {
    ToServer::TerminateCocoonResult {
        request_id: asker.request_id,
        client_id: asker.client_id,
        success: result.is_ok(),
        error: result.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_sizes_parse_against_the_kinds() {
        let kinds = crate::kinds::parse("native:script:cocoon,ubuntu:img").unwrap();
        let pool = parse_pool(" native=2 , ubuntu=0", &kinds).unwrap();
        assert_eq!(pool.get("native"), Some(&2));
        assert_eq!(pool.get("ubuntu"), Some(&0));
        assert!(parse_pool("", &kinds).unwrap().is_empty());
        for bad in ["gpu=1", "native", "native=x", "native=1000"] {
            assert!(parse_pool(bad, &kinds).is_err(), "{bad}");
        }
    }
}
