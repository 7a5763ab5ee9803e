//! The listener: accepting TCP (or TLS) connections, routing by path, and starting one
//! task per connection.
//!
//! Routes:
//! - `/ws`: the built-in test endpoint ([`crate::builtin`]): a `system` greeting naming the
//!   mounted addons, then an echo of every message, within `[builtin]`'s limits;
//! - `/ws/<name>`: the addon mounted as `<name>`, one instance per connection;
//! - `/healthz`: `200` while the process serves (liveness);
//! - `/readyz`: `200` when ready for traffic (addons are loaded before the listener
//!   accepts), `503` while draining after SIGTERM, so a load balancer stops sending;
//! - `/metrics`: Prometheus text format ([`crate::metrics`]), unless the admin listener
//!   ([`crate::admin`]) is set: then it is served there instead;
//! - `/` and the other paths of [`crate::web`]: the chat page when `[web] enabled`, and
//!   the dashboard too unless the admin listener has it; `404` when off, and to a
//!   WebSocket upgrade (they are not WebSocket endpoints);
//! - anything else: `404 Not Found`, without upgrading.
//!
//! Before an addon connection is upgraded the server checks, in order: the request is a
//! valid upgrade (4xx), the `Origin` is allowed (403), the addon and the server have a
//! free connection slot (503), the instance pool has a free slot
//! (`limits.max_live_instances`; 503 `instance_capacity`), and an instance can be made
//! (503). Each refusal is counted
//! and logged, within bounds, as the client decides how many there are and what they
//! carry (`crate::log_limits`): text from the client (the `Origin`, a path, the error
//! about a head) is cut to 256 bytes, and each addon (the server, for what fails before
//! an addon is known) logs at most 10 lines per failure kind per 10 s, then one line with
//! the count of those left out.
//!
//! The mounted addons can change while the server runs ([`crate::reload`]); a connection
//! takes the current version once, when it is routed, and keeps it to its end.
//!
//! Shutdown ([`Server::run_until`]): tell every connection to close with 1001, wait up to
//! the drain timeout for them to finish (each runs its `on-close`). While draining the
//! listener still answers `/healthz`, `/readyz` (503) and `/metrics`, and refuses new
//! WebSocket connections with 503. With `server.reuse_port` the port is shared with the
//! process that replaces this one, so the listener is closed instead and new connections
//! go to that process.
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::addons::{self, AddonSet, InstantiateError, LoadedAddon, Loader};
use crate::admin::Admin;
use crate::bindings::ConnectionInfo;
use crate::builtin::BuiltinSlots;
use crate::cache::CompileCache;
use crate::capacity::{Machine, Plan};
use crate::channels::Channels;
use crate::client_stream::ClientStream;
use crate::cluster::RedisLink;
use crate::config::Config;
use crate::connection::{AddonConnection, InstanceSlots, Live};
use crate::error::{FailureCounts, FailureKind};
use crate::handshake::{self, Answer, HeadError, Rejection, RequestHead};
use crate::host::kv::KvStore;
use crate::host::kv_redis::RedisKvBackend;
use crate::host::{self, HostServices, HostState};
use crate::log_limits::{LogLimiter, client_text};
use crate::metrics::Metrics;
use crate::reload::{Mounted, Watcher};
use crate::shutdown::Shutdown;
use crate::tls::Tls;

/// Largest message a client may send to the built-in `/ws` endpoint; addons set their own.
const BUILTIN_MAX_MESSAGE: usize = 64 << 10;

/// A bound, loaded server, ready to [`run`](Server::run_until).
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    watcher: Option<Watcher>,
    /// The admin listener, when `[admin] listen` is set.
    admin: Option<(TcpListener, Arc<Admin>)>,
}

/// What every connection task reads.
struct Shared {
    addons: Arc<Mounted>,
    /// The settings in force; [`ServerHandle::reload_config`] replaces the ones that can
    /// change while running.
    config: RwLock<Arc<Config>>,
    ws_config: WebSocketConfig,
    next_connection_id: AtomicU64,
    /// WebSocket connections (addons and `/ws`) open now, against `limits.max_connections`.
    open_connections: AtomicU32,
    /// Addon instances alive now, against `limits.max_live_instances` (the pool's slots).
    live_instances: Arc<InstanceSlots>,
    /// WebSocket connections by client address, against `limits.max_connections_per_ip`.
    per_ip: IpSlots,
    /// `/ws` connections, against `[builtin] max_connections`.
    builtin_slots: BuiltinSlots,
    failures: Arc<FailureCounts>,
    metrics: Arc<Metrics>,
    /// What every instance may be granted: the kv store.
    services: HostServices,
    /// `wss://` when set.
    tls: Option<Arc<Tls>>,
    /// Triggered when the server shuts down: every connection closes with 1001.
    shutdown: Arc<Shutdown>,
    /// Set when draining starts: `/readyz` answers 503 and new WebSockets are refused.
    draining: AtomicBool,
    /// Every connection task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Whether `/metrics` is on the admin listener rather than here.
    metrics_on_admin: bool,
    /// Bounds the lines logged about requests refused before an addon is known (head
    /// not sent in time, malformed, failed TLS); those about an addon's connections are
    /// bounded by its [`crate::metrics::AddonStats`]. See `crate::log_limits`.
    log_limits: LogLimiter,
}

impl Shared {
    fn config(&self) -> Arc<Config> {
        self.config.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// A handle on a running server, for what happens beside serving: reloading settings.
#[derive(Clone)]
pub struct ServerHandle(Arc<Shared>);

impl Server {
    /// Binds the listen address, then loads every addon in the addons directory.
    /// Addons that fail to load are logged and skipped; only an unusable listen address,
    /// engine or TLS certificate is an error. With `server.reuse_port` the socket starts
    /// listening only once the addons are loaded.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        // Bind first: a busy port should fail in milliseconds, not after compiling addons.
        let socket = bind(config.listen, config.reuse_port).map_err(|err| bind_error(&config, err))?;
        let local = socket.local_addr()?;
        // Without reuse_port, listen at once: a client that connects while the addons
        // load waits in the queue instead of being refused. With it, listen only once
        // loaded: until then the kernel keeps giving new connections to the process
        // this one replaces, which can serve them now.
        let socket = if config.reuse_port {
            BoundSocket::Bound(socket)
        } else {
            BoundSocket::Listening(socket.listen(LISTEN_BACKLOG)?)
        };
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(Tls::load(files)?)),
            None => None,
        };

        // The pool is sized and checked against the machine before it is reserved: a
        // configuration that cannot fit stops here, naming what to change.
        let files = addons::wasm_files(&config.addons_dir).unwrap_or_default();
        let plan = Plan::new(&config.limits, files.iter().map(PathBuf::as_path));
        let assessment = plan.assess(&Machine::read());
        for line in &assessment.lines {
            tracing::info!("capacity: {line}");
        }
        for warning in &assessment.warnings {
            tracing::warn!("capacity: {warning}");
        }
        if !assessment.problems.is_empty() {
            anyhow::bail!(
                "this configuration does not fit this machine:\n  - {}",
                assessment.problems.join("\n  - ")
            );
        }
        let engine = crate::engine::build(&plan)?;
        let linkers =
            host::linker(&engine).map_err(anyhow::Error::from).context("linking host interfaces")?;
        let cache = config.cache_dir.as_deref().map(|dir| CompileCache::open(dir, &engine));
        let failures = Arc::new(FailureCounts::default());
        let mut metrics = Metrics::new(failures.clone());
        let link = match &config.redis_url {
            Some(url) => {
                metrics.register_cluster();
                let link = Arc::new(RedisLink::new(url)?);
                tracing::info!(redis = %link.url(), "cluster: channels and kv go through redis");
                Some(link)
            }
            None => None,
        };
        let metrics = Arc::new(metrics);
        // Bound before the addons load, like the public port: a busy address fails fast.
        let admin_listener = match &config.admin {
            Some(admin) => Some(TcpListener::bind(admin.listen).await.with_context(|| {
                format!("cannot listen on admin.listen {} (--admin-listen)", admin.listen)
            })?),
            None => None,
        };
        let loader = Arc::new(Loader::new(engine, plan.memory_reservation, linkers, cache, metrics.clone()));
        let dir = config.addons_dir.clone();
        let scan = loader.clone();
        let outcome = tokio::task::spawn_blocking(move || scan.load_dir(&dir))
            .await
            .context("addon loader panicked")?;
        let (addons, rejected) = match outcome {
            Ok(outcome) => {
                for rejected in &outcome.rejected {
                    tracing::error!(file = %rejected.path.display(), "addon not mounted: {}", rejected.error);
                }
                let rejected = outcome.rejected.into_iter().map(|r| (r.path, r.fingerprint)).collect();
                (outcome.addons, rejected)
            }
            Err(err) => {
                tracing::warn!(dir = %config.addons_dir.display(), "cannot read the addons directory ({err}); only /ws is served");
                (AddonSet::default(), Vec::new())
            }
        };

        // Compiling addons freed more than serving will use for a while: give it back
        // now rather than when the allocator next looks.
        crate::instance_heap::give_back_freed_memory();

        let listener = socket.listen()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let base = format!("{scheme}://{}:{}", config.public_host, local.port());
        match admin_listener.as_ref().and_then(|l| l.local_addr().ok()) {
            Some(admin) => {
                tracing::info!("listening on {local}; test endpoint {base}/ws; admin listener http://{admin}")
            }
            None => tracing::info!("listening on {local}; test endpoint {base}/ws"),
        }
        if config.web_enabled {
            let http = if tls.is_some() { "https" } else { "http" };
            let site = format!("{http}://{}:{}", config.public_host, local.port());
            let dashboard = if config.admin.is_some() {
                "on the admin listener".to_owned()
            } else {
                format!("{site}/dashboard")
            };
            tracing::info!("web: chat page {site}/, dashboard {dashboard} (--no-web turns them off)");
        }
        for addon in addons.iter() {
            let name = addon.name();
            tracing::info!(addon = name, version = %addon.version(), "mounted {base}/ws/{name}{}", addon.grants_note());
            addon.warn_missing_env();
        }
        if addons.is_empty() {
            tracing::warn!(dir = %config.addons_dir.display(), "no addons mounted");
        }
        metrics.set_mounted(addons.len());
        metrics.set_instance_slots(plan.slots);
        let mounted = Arc::new(Mounted::new(addons));
        let watcher = config.reload_poll.map(|interval| Watcher {
            loader,
            dir: config.addons_dir.clone(),
            mounted: mounted.clone(),
            interval,
            base_url: base,
            rejected,
        });

        // Frames an addon sends in one go are corked: tungstenite writes its buffer out
        // once it passes CORK_BYTES, else the connection task flushes when the guest stops.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.limits.read_buffer_bytes)
            .write_buffer_size(crate::host::session::CORK_BYTES)
            .max_message_size(Some(BUILTIN_MAX_MESSAGE))
            .max_frame_size(Some(BUILTIN_MAX_MESSAGE));
        let channels = match &link {
            Some(link) => Channels::clustered(link.clone(), metrics.clone()),
            None => Channels::in_process(metrics.clone()),
        };
        let kv = match &link {
            Some(link) => KvStore::with_backend(Arc::new(RedisKvBackend::new(link.clone()))),
            None => KvStore::new(&config.data_dir),
        };
        let services = HostServices { kv: Arc::new(kv), channels: channels.clone() };
        let admin = match (admin_listener, &config.admin) {
            (Some(listener), Some(settings)) => {
                let admin = Admin::new(mounted.clone(), channels, metrics.clone(), settings);
                Some((listener, Arc::new(admin)))
            }
            _ => None,
        };
        let metrics_on_admin = admin.is_some();
        let live_instances = Arc::new(InstanceSlots::new(config.limits.max_live_instances));
        let shared = Shared {
            addons: mounted,
            services,
            config: RwLock::new(Arc::new(config)),
            ws_config,
            next_connection_id: AtomicU64::new(1),
            open_connections: AtomicU32::new(0),
            live_instances,
            per_ip: IpSlots::default(),
            builtin_slots: BuiltinSlots::default(),
            failures,
            metrics,
            tls,
            shutdown: Arc::default(),
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            metrics_on_admin,
            log_limits: LogLimiter::default(),
        };
        Ok(Server { listener, shared: Arc::new(shared), watcher, admin })
    }

    /// The admin listener's address, when there is one (useful with port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Names of the mounted addons, sorted.
    pub fn addon_names(&self) -> Vec<String> {
        self.shared.addons.get().names().map(str::to_owned).collect()
    }

    /// Failures counted by kind since start.
    pub fn failures(&self) -> Arc<FailureCounts> {
        self.shared.failures.clone()
    }

    /// A handle that outlives [`Server::run_until`]'s borrow, for reloading settings.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(self.shared.clone())
    }

    /// Serves until `shutdown` completes, then drains: closes every connection with 1001
    /// (each addon's `on-close` runs) and returns when they are done or the drain timeout
    /// has passed. Meanwhile the addons directory and the TLS certificate are watched.
    ///
    /// While draining, the listener keeps answering (`/readyz` 503, new WebSockets 503)
    /// so a load balancer sees the server going; with `server.reuse_port` it is closed
    /// at once, because the process sharing the port serves new connections.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let Server { listener, shared, watcher, admin } = self;
        if let Some(watcher) = watcher {
            tokio::spawn(watcher.run(shared.shutdown.token().clone()));
        }
        if let Some((listener, admin)) = admin {
            // It stops with the drain's start: the backend should publish to nodes that serve.
            tokio::spawn(admin.run(listener, shared.shutdown.token().clone()));
        }
        if let Some(tls) = &shared.tls {
            tokio::spawn(tls.clone().watch(shared.shutdown.token().clone()));
        }
        tokio::spawn(crate::connection::give_back_freed_memory(shared.shutdown.token().clone()));
        tokio::pin!(shutdown);
        let mut accept_errors = AcceptErrors::default();
        let mut purge = tokio::time::interval(KV_PURGE_INTERVAL);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Reports the log lines left out by the limiters once their window is over, even
        // if no further failure of that kind comes to report it.
        let mut log_flush = tokio::time::interval(Duration::from_secs(1));
        log_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = purge.tick() => shared.services.kv.purge_expired().await,
                _ = log_flush.tick() => {
                    shared.log_limits.flush("server");
                    shared.metrics.flush_log_limits();
                }
                accepted = listener.accept() => spawn_connection(&shared, accepted, &mut accept_errors).await,
            }
        }
        shared.draining.store(true, Ordering::Release);
        let open = shared.tasks.len();
        let config = shared.config();
        let timeout_ms = config.limits.drain_timeout.as_millis() as u64;
        let listener = if config.reuse_port {
            // Another process shares the port: closing ours sends every new connection
            // there instead of answering it 503 for the rest of the drain.
            drop(listener);
            tracing::info!(
                open,
                timeout_ms,
                "shutting down: listener closed, so new connections go to the other processes on this port \
                 (server.reuse_port); closing connections with 1001"
            );
            None
        } else {
            tracing::info!(
                open,
                timeout_ms,
                "shutting down: closing connections with 1001; /readyz answers 503"
            );
            Some(listener)
        };
        shared.shutdown.trigger();
        shared.tasks.close();
        let deadline = tokio::time::sleep(config.limits.drain_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = shared.tasks.wait() => {
                    tracing::info!("all connections closed");
                    break;
                }
                _ = &mut deadline => {
                    tracing::warn!(left = shared.tasks.len(), "drain timeout passed; exiting with connections open");
                    break;
                }
                // Probes keep getting answers (503 on /readyz) until the process exits.
                accepted = accept(listener.as_ref()) => spawn_connection(&shared, accepted, &mut accept_errors).await,
            }
        }
    }
}

/// The next connection on `listener`; without one, never.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// How often expired kv entries are reclaimed (reads already ignore them).
const KV_PURGE_INTERVAL: Duration = Duration::from_secs(300);
/// Starts the task for an accepted connection.
async fn spawn_connection(
    shared: &Arc<Shared>,
    accepted: std::io::Result<(TcpStream, SocketAddr)>,
    errors: &mut AcceptErrors,
) {
    match accepted {
        Ok((stream, peer)) => {
            errors.succeeded();
            shared.tasks.spawn(handle_tcp(shared.clone(), stream, peer));
        }
        Err(err) => errors.failed(err).await,
    }
}

/// Failed accepts (usually: out of file descriptors). Each backs off longer, up to a
/// second, instead of spinning; the log gets one line per interval with a count, not one
/// per failure (which at the limit was ten lines a second, forever).
#[derive(Default)]
struct AcceptErrors {
    /// Failures since the last success.
    streak: u32,
    /// Failures not yet logged, and when the last line was written.
    unlogged: u64,
    logged_at: Option<tokio::time::Instant>,
}

/// At most one log line per this long about failed accepts.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl AcceptErrors {
    fn succeeded(&mut self) {
        self.streak = 0;
    }

    async fn failed(&mut self, err: std::io::Error) {
        self.streak = self.streak.saturating_add(1);
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.logged_at.is_none_or(|at| now >= at + ACCEPT_ERROR_LOG_INTERVAL) {
            tracing::error!(
                failures = self.unlogged,
                "accept failed: {err} (failures since the last such line; at most one line per {} s)",
                ACCEPT_ERROR_LOG_INTERVAL.as_secs()
            );
            self.unlogged = 0;
            self.logged_at = Some(now);
        }
        // 10 ms, doubling, up to 1 s.
        let backoff = Duration::from_millis(10u64 << self.streak.min(7)).min(Duration::from_secs(1));
        tokio::time::sleep(backoff).await;
    }
}

impl ServerHandle {
    /// Applies the settings of `new` that can change while running (the handshake and
    /// drain timeouts, the TLS certificate and key files) and logs, by key, those that
    /// differ but need a restart. Returns the keys that need a restart.
    pub fn reload_config(&self, new: Config) -> Vec<&'static str> {
        let current = self.0.config();
        let mut restart = Vec::new();
        let mut check = |key: &'static str, same: bool| {
            if !same {
                restart.push(key);
            }
        };
        check("server.listen / server.port", new.listen == current.listen);
        check("server.public_host", new.public_host == current.public_host);
        check("server.reuse_port", new.reuse_port == current.reuse_port);
        check("server.addons_dir", new.addons_dir == current.addons_dir);
        check("server.data_dir", new.data_dir == current.data_dir);
        check("server.cache_dir / server.compile_cache", new.cache_dir == current.cache_dir);
        check("server.reload_poll_ms", new.reload_poll == current.reload_poll);
        check("limits.max_connections", new.limits.max_connections == current.limits.max_connections);
        check(
            "limits.max_live_instances",
            new.limits.max_live_instances == current.limits.max_live_instances,
        );
        check(
            "limits.memory_reservation",
            new.limits.memory_reservation == current.limits.memory_reservation,
        );
        check("limits.async_stack_bytes", new.limits.async_stack_bytes == current.limits.async_stack_bytes);
        check("limits.read_buffer_bytes", new.limits.read_buffer_bytes == current.limits.read_buffer_bytes);
        check("log.format", new.log_format == current.log_format);
        check("cluster.redis_url", new.redis_url == current.redis_url);
        check("admin.listen / admin.api_key_env / the API key", new.admin == current.admin);
        check("tls (switching TLS on or off)", new.tls.is_some() == current.tls.is_some());

        let mut next = Config::clone(&current);
        next.limits.handshake_timeout = new.limits.handshake_timeout;
        next.limits.drain_timeout = new.limits.drain_timeout;
        next.limits.orphan_callback_grace = new.limits.orphan_callback_grace;
        // Read on each request: turning the pages on or off needs no restart.
        next.web_enabled = new.web_enabled;
        if let (Some(tls), Some(files)) = (&self.0.tls, &new.tls) {
            tls.set_files(files.clone());
            next.tls = new.tls.clone();
        }
        tracing::info!(
            handshake_timeout_ms = next.limits.handshake_timeout.as_millis() as u64,
            drain_timeout_ms = next.limits.drain_timeout.as_millis() as u64,
            tls_cert = ?next.tls.as_ref().map(|t| t.cert.display().to_string()),
            web_enabled = next.web_enabled,
            "configuration reloaded"
        );
        if !restart.is_empty() {
            tracing::warn!("changed settings that need a restart were not applied: {}", restart.join(", "));
        }
        *self.0.config.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(next);
        restart
    }
}

/// Connections the kernel queues for [`TcpListener::accept`]. std's listeners ask for
/// 128; after a restart or a network blip thousands of mobile clients reconnect at once,
/// and with a short queue the kernel drops their SYNs, so each waits a second or more to
/// retry. The kernel caps this at `net.core.somaxconn` (4096 on current Linux).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the server's socket. With `reuse_port` (`server.reuse_port`) the port is
/// shared with other processes that ask the same, so a new sockhost can start on it
/// before the old one stops (see [`Server::run_until`]). A conflict shows here, before
/// listening.
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As std does for listeners: a restarted server can bind while old connections
    // to the port are still in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    Ok(socket)
}

/// The server's socket during start-up: bound, and listening or not yet.
enum BoundSocket {
    Bound(TcpSocket),
    Listening(TcpListener),
}

impl BoundSocket {
    /// Starts listening, if it has not yet.
    fn listen(self) -> std::io::Result<TcpListener> {
        match self {
            BoundSocket::Bound(socket) => socket.listen(LISTEN_BACKLOG),
            BoundSocket::Listening(listener) => Ok(listener),
        }
    }
}

fn bind_error(config: &Config, err: std::io::Error) -> anyhow::Error {
    let addr = config.listen;
    if err.kind() == std::io::ErrorKind::AddrInUse && config.reuse_port {
        anyhow::anyhow!(
            "cannot listen on {addr}: the address is in use by a process that does not share it; \
             server.reuse_port (--reuse-port) only shares a port between processes that all set it"
        )
    } else if err.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "cannot listen on {addr}: the address is already in use by another process; \
             pick another port with --port, SOCKHOST_PORT or server.port in sockhost.toml"
        )
    } else {
        anyhow::anyhow!("cannot listen on {addr}: {err}")
    }
}

/// Where a request path leads.
enum Route<'a> {
    Builtin,
    Addon(&'a str),
    Health,
    Ready,
    Metrics,
    Web(crate::web::Resource),
    NotFound,
}

fn route(path: &str) -> Route<'_> {
    match path {
        "/healthz" => return Route::Health,
        "/readyz" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        _ => {}
    }
    if let Some(resource) = crate::web::Resource::from_path(path) {
        return Route::Web(resource);
    }
    match path.strip_prefix("/ws") {
        Some("") => Route::Builtin,
        Some(rest) => match rest.strip_prefix('/') {
            Some(name) if addons::is_valid_name(name) => Route::Addon(name),
            _ => Route::NotFound,
        },
        None => Route::NotFound,
    }
}

async fn handle_tcp(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    // Streamed replies are many small frames: send each at once.
    let _ = tcp.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + shared.config().limits.handshake_timeout;
    let timed_out = |shared: &Shared| {
        shared.failures.record(FailureKind::HandshakeTimeout);
        if shared.log_limits.admit(FailureKind::HandshakeTimeout, "server") {
            let kind = FailureKind::HandshakeTimeout.code();
            tracing::info!(%peer, kind, "request head not received in time; dropped");
        }
    };
    let mut stream: ClientStream = match &shared.tls {
        None => ClientStream::plain(tcp, shared.metrics.socket_writes()),
        // The handshake futures are boxed: they live only until the head is read, and
        // inline they would size every connection's task for its whole life (the TLS
        // accept and the head reader's 2 KiB buffer are the largest states here).
        Some(tls) => match tokio::time::timeout_at(deadline, Box::pin(tls.acceptor().accept(tcp))).await {
            Ok(Ok(tls)) => ClientStream::tls(tls, shared.metrics.socket_writes()),
            Ok(Err(err)) => {
                shared.failures.record(FailureKind::BadRequest);
                if shared.log_limits.admit(FailureKind::BadRequest, "server") {
                    let err = client_text(&err.to_string()).to_string();
                    tracing::debug!(%peer, kind = FailureKind::BadRequest.code(), "TLS handshake failed: {err}");
                }
                return;
            }
            Err(_) => return timed_out(&shared),
        },
    };
    let read_head = Box::pin(handshake::read_head(&mut stream));
    let read = tokio::time::timeout_at(deadline, read_head).await;
    let (head, leftover) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(err)) => {
            // The error can quote the head (a header's name), which the client chose.
            if shared.log_limits.admit(FailureKind::BadRequest, "server") {
                tracing::debug!(%peer, "bad request head: {}", client_text(&err.to_string()));
            }
            let rejection = match err {
                HeadError::TooLarge => Rejection::new(431, err.to_string()),
                HeadError::Malformed(_) => Rejection::new(400, err.to_string()),
                HeadError::Eof | HeadError::Io(_) => return,
            };
            shared.failures.record(FailureKind::BadRequest);
            let _ = Box::pin(handshake::write_rejection(&mut stream, &rejection)).await;
            return;
        }
        Err(_) => {
            timed_out(&shared);
            let rejection = Rejection::new(408, "request head not received in time");
            let _ = Box::pin(handshake::write_rejection(&mut stream, &rejection)).await;
            return;
        }
    };

    let draining = shared.draining.load(Ordering::Acquire);
    // For the log line below: the head itself goes to the WebSocket paths by value, so
    // they can drop it once they have what they need.
    let path = head.path.clone();
    let result = match route(&path) {
        Route::Health => {
            Box::pin(handshake::write_response(&mut stream, 200, "text/plain; charset=utf-8", &[], "ok\n"))
                .await
        }
        Route::Ready if draining => {
            reject(&mut stream, Rejection::new(503, "draining: the server is shutting down")).await
        }
        Route::Ready => {
            let mut body = format!("ready: {} addons mounted\n", shared.addons.get().len());
            if let Some(link) = shared.services.channels.cluster() {
                // Still 200: Redis is shared by every node, so taking this one out of the
                // load balancer would not help; what needs no Redis still works here.
                let state =
                    if link.is_up() { "up" } else { "DOWN (reconnecting; channels and kv fail meanwhile)" };
                body.push_str(&format!("cluster: redis {} {state}\n", link.url()));
            }
            Box::pin(handshake::write_response(&mut stream, 200, "text/plain; charset=utf-8", &[], &body))
                .await
        }
        Route::Metrics if shared.metrics_on_admin => {
            reject(
                &mut stream,
                Rejection::new(404, "/metrics is served on the admin listener (admin.listen)"),
            )
            .await
        }
        Route::Metrics => {
            if let Some(link) = shared.services.channels.cluster() {
                shared.metrics.set_cluster_up(link.is_up());
            }
            let body = shared.metrics.encode();
            Box::pin(handshake::write_response(&mut stream, 200, crate::metrics::CONTENT_TYPE, &[], &body))
                .await
        }
        Route::Builtin | Route::Addon(_) if draining => {
            let rejection = Rejection::new(503, "the server is shutting down; connect again shortly");
            reject(&mut stream, rejection).await
        }
        Route::Builtin if !shared.config().builtin.enabled => {
            reject(
                &mut stream,
                Rejection::new(404, "the test endpoint /ws is turned off ([builtin] enabled = false)"),
            )
            .await
        }
        // Each path is boxed: a task's future is as large as its largest branch, and every
        // connection would carry that room for its life (the built-in `/ws` went from
        // 10.5 to 5.4 KB per idle connection).
        Route::Builtin => {
            // Made in its own statement: a temporary in the `.await`'s statement would
            // keep its room in this future too.
            let serve = Box::pin(serve_builtin(&shared, stream, peer, head, leftover));
            serve.await
        }
        Route::Addon(name) => {
            // The version mounted now serves this connection to its end, whatever reloads follow.
            let addon = shared.addons.get().get(name).cloned();
            match addon {
                Some(addon) => {
                    let serve = Box::pin(serve_addon(&shared, addon, stream, peer, head, leftover));
                    serve.await
                }
                None => {
                    reject(
                        &mut stream,
                        Rejection::new(
                            404,
                            format!(
                                "no addon named '{name}' is mounted here; mounted: {}",
                                mounted_list(&shared)
                            ),
                        ),
                    )
                    .await
                }
            }
        }
        Route::Web(resource) => Box::pin(web_answer(&shared, &head, resource).write(&mut stream)).await,
        Route::NotFound => reject(&mut stream, not_found(&shared, &head.path)).await,
    };
    if let Err(err) = result {
        tracing::debug!(%peer, path = %client_text(&path), "connection ended early: {err}");
    }
}

/// The answer to a path nothing is at: names what is here, the client's path cut.
fn not_found(shared: &Shared, path: &str) -> Rejection {
    let web = if shared.config().web_enabled { ", and the chat page at /" } else { "" };
    Rejection::new(
        404,
        format!(
            "nothing at {}; WebSocket endpoints are /ws and /ws/<addon>; also /healthz, /readyz, /metrics{web}",
            client_text(path)
        ),
    )
}

/// A path of [`crate::web`]: answered when this port serves it now (`[web] enabled`;
/// the dashboard only without an admin listener), else 404 as an unknown path, naming
/// why. None of them is a WebSocket endpoint: an upgrade request gets 404 too, so a
/// client that mistyped its URL learns it at once instead of getting a page.
fn web_answer(shared: &Shared, head: &RequestHead, resource: crate::web::Resource) -> Answer {
    use crate::web::Audience;
    if head.wants_websocket() {
        return Answer::text(404, not_found(shared, &head.path).message);
    }
    if !shared.config().web_enabled {
        return Answer::text(
            404,
            format!(
                "nothing at {}: web pages are off on this server ([web] enabled = false, or --no-web); \
                 WebSocket endpoints are /ws and /ws/<addon>",
                head.path
            ),
        );
    }
    if resource.audience() == Audience::Dashboard && shared.metrics_on_admin {
        return Answer::text(
            404,
            "the dashboard is served on the admin listener (admin.listen), beside /metrics",
        );
    }
    let sources = crate::web::Sources {
        mounted: &shared.addons,
        metrics: &shared.metrics,
        dashboard_here: !shared.metrics_on_admin,
    };
    crate::web::answer(&head.method, resource, &sources)
}

fn reject<S: AsyncWrite + Unpin>(
    stream: &mut S,
    rejection: Rejection,
) -> std::pin::Pin<Box<impl Future<Output = std::io::Result<()>> + '_>> {
    // Boxed, as every rare answer in the connection paths is: a task's future is as large
    // as its largest await point, and every connection would carry this one's room for
    // its whole life (`tests::the_accept_task_stays_small`).
    Box::pin(async move { handshake::write_rejection(stream, &rejection).await })
}

fn mounted_list(shared: &Shared) -> String {
    let addons = shared.addons.get();
    let names: Vec<&str> = addons.names().collect();
    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
}

/// Upgrades the socket; the request has already been checked.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &str,
    leftover: Vec<u8>,
    config: WebSocketConfig,
) -> std::io::Result<WebSocketStream<S>> {
    handshake::write_switching_protocols(&mut stream, key).await?;
    Ok(WebSocketStream::from_partially_read(stream, leftover, Role::Server, Some(config)).await)
}

/// One of the server's `limits.max_connections` slots, held for a connection's life.
struct ServerSlot<'a>(&'a AtomicU32);

impl<'a> ServerSlot<'a> {
    fn reserve(open: &'a AtomicU32, max: u32) -> Option<ServerSlot<'a>> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ServerSlot(open))
    }
}

impl Drop for ServerSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_addon(
    shared: &Shared,
    addon: Arc<LoadedAddon>,
    mut stream: ClientStream,
    peer: SocketAddr,
    head: RequestHead,
    leftover: Vec<u8>,
) -> std::io::Result<()> {
    let key = match handshake::check_upgrade(&head) {
        Ok(key) => key.to_owned(),
        Err(rejection) => {
            addon.stats().failure(FailureKind::BadRequest);
            return reject(&mut stream, rejection).await;
        }
    };
    // The id comes first, so every line about this connection, refusals included,
    // carries the addon and the connection id (the `conn` span).
    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", addon = addon.name(), conn = id);
    let policy = addon.policy();
    let origin = head.header("origin");
    if !policy.allows_origin(origin) {
        addon.stats().failure(FailureKind::Origin);
        let origin = origin.unwrap_or_default();
        // The header is the client's: up to the whole head (16 KiB), and as many as it
        // sends requests. Both are bounded (`crate::log_limits`).
        if addon.stats().log_limits.admit(FailureKind::Origin, addon.name()) {
            let origin = client_text(origin);
            span.in_scope(|| tracing::warn!(%peer, %origin, kind = FailureKind::Origin.code(), "origin not allowed; answering 403"));
        }
        let rejection =
            Rejection::new(403, format!("origin {origin} may not connect to addon '{}'", addon.name()));
        return reject(&mut stream, rejection).await;
    }
    let per_ip = shared.config().limits.max_connections_per_ip;
    let Some(_ip_slot) = shared.per_ip.reserve(peer.ip(), per_ip) else {
        addon.stats().failure(FailureKind::Capacity);
        return refuse_busy_ip(stream, peer, per_ip).instrument(span).await;
    };
    let max = shared.config().limits.max_connections;
    let Some(_server_slot) = ServerSlot::reserve(&shared.open_connections, max) else {
        addon.stats().failure(FailureKind::Capacity);
        if addon.stats().log_limits.admit(FailureKind::Capacity, addon.name()) {
            span.in_scope(|| tracing::warn!(%peer, max, kind = FailureKind::Capacity.code(), "server connection limit reached; answering 503"));
        }
        let rejection =
            Rejection::new(503, format!("the server is at its limit of {max} connections; retry later"));
        return reject(&mut stream, rejection).await;
    };
    let Some(_addon_slot) = addon.reserve_connection() else {
        addon.stats().failure(FailureKind::Capacity);
        let max = policy.max_connections;
        if addon.stats().log_limits.admit(FailureKind::Capacity, addon.name()) {
            span.in_scope(|| tracing::warn!(%peer, max, kind = FailureKind::Capacity.code(), "addon connection limit reached; answering 503"));
        }
        let rejection = Rejection::new(
            503,
            format!("addon '{}' is at its limit of {max} connections; retry later", addon.name()),
        );
        return reject(&mut stream, rejection).await;
    };

    // A slot of the instance pool; without one, the pool would refuse anyway.
    let slots = shared.live_instances.max();
    let Some(lease) = shared.live_instances.lease_or_make_room(addon.stats()).await else {
        let kind = FailureKind::InstanceCapacity;
        addon.stats().failure(kind);
        if addon.stats().log_limits.admit(kind, addon.name()) {
            span.in_scope(|| tracing::warn!(%peer, max = slots, kind = kind.code(), "every instance slot is taken (limits.max_live_instances); answering 503"));
        }
        let rejection = Rejection::new(
            503,
            format!("the server is at its limit of {slots} live addon instances; retry later"),
        );
        return reject(&mut stream, rejection).await;
    };

    let info = ConnectionInfo {
        id,
        addon: addon.name().to_owned(),
        path: head.path.clone(),
        query: head.query.clone(),
        remote_address: peer.to_string(),
        headers: head.forwarded_headers(),
    };
    // What the connection needs of the request is in `info` now; the parsed head (its
    // headers, a few hundred bytes to 16 KiB) is not kept for the connection's life.
    drop(head);

    // The instance is made before the upgrade, so a failure is an HTTP 503 the client
    // can act on, not a socket that opens and dies.
    // Boxed for the reason given in `handle_tcp`: this future would otherwise stay in
    // the connection's state for its whole life.
    let instantiate = Box::pin(addon.instantiate(HostState::new(info, policy, &shared.services)));
    let (store, instance) = match instantiate.instrument(span.clone()).await {
        Ok(made) => made,
        Err(InstantiateError { kind, cause }) => {
            addon.stats().failure(kind);
            if addon.stats().log_limits.admit(kind, addon.name()) {
                span.in_scope(|| {
                    tracing::error!(kind = kind.code(), cause = %cause, "cannot create an addon instance; answering 503")
                });
            }
            let rejection = Rejection::new(
                503,
                format!("addon '{}' cannot take a connection now: it {cause}", addon.name()),
            );
            return reject(&mut stream, rejection).await;
        }
    };
    let ws_config = shared
        .ws_config
        .max_message_size(Some(policy.max_message_bytes))
        .max_frame_size(Some(policy.max_message_bytes));
    let upgrade = Box::pin(upgrade(stream, &key, leftover, ws_config));
    let ws = upgrade.await?;
    addon.stats().connections.inc();
    // The connection is a local and `serve` borrows it: an async fn keeps its by-value
    // arguments' room in its future besides where it moves them, so `serve(self)`
    // would hold the connection twice for as long as the connection is open.
    let mut connection = AddonConnection::new(
        Live { store, exports: instance, lease },
        span,
        ws,
        addon.clone(),
        shared.live_instances.clone(),
        shared.shutdown.listen(),
        shared.config().limits.orphan_callback_grace,
    );
    connection.serve().await;
    Ok(())
}

/// The built-in `/ws` endpoint ([`crate::builtin`]), within its limits and the server's.
async fn serve_builtin(
    shared: &Shared,
    mut stream: ClientStream,
    peer: SocketAddr,
    head: RequestHead,
    leftover: Vec<u8>,
) -> std::io::Result<()> {
    let key = match handshake::check_upgrade(&head) {
        Ok(key) => key.to_owned(),
        Err(rejection) => return reject(&mut stream, rejection).await,
    };
    let config = shared.config();
    let Some(_ip_slot) = shared.per_ip.reserve(peer.ip(), config.limits.max_connections_per_ip) else {
        shared.failures.record(FailureKind::Capacity);
        return refuse_busy_ip(stream, peer, config.limits.max_connections_per_ip).await;
    };
    let max = config.limits.max_connections;
    let Some(_server_slot) = ServerSlot::reserve(&shared.open_connections, max) else {
        shared.failures.record(FailureKind::Capacity);
        tracing::warn!(%peer, max, kind = FailureKind::Capacity.code(), "server connection limit reached; /ws answered 503");
        let rejection =
            Rejection::new(503, format!("the server is at its limit of {max} connections; retry later"));
        return reject(&mut stream, rejection).await;
    };
    let max = config.builtin.max_connections;
    let Some(_builtin_slot) = shared.builtin_slots.reserve(max) else {
        shared.failures.record(FailureKind::Capacity);
        tracing::warn!(%peer, max, kind = FailureKind::Capacity.code(), "/ws connection limit reached; answering 503");
        let rejection = Rejection::new(
            503,
            format!("/ws is at its limit of {max} connections ([builtin] max_connections)"),
        );
        return reject(&mut stream, rejection).await;
    };
    let bytes = config.builtin.max_message_bytes;
    let ws_config = shared.ws_config.max_message_size(Some(bytes)).max_frame_size(Some(bytes));
    let ws = upgrade(stream, &key, leftover, ws_config).await?;
    let greeting = format!(
        "sockhost test endpoint: messages you send are echoed back. Mounted addons: {} (connect to /ws/<addon>).",
        mounted_list(shared)
    );
    crate::builtin::serve(ws, &config.builtin, &greeting, shared.shutdown.listen()).await;
    Ok(())
}

/// Answers 503 to a client address over `limits.max_connections_per_ip`.
async fn refuse_busy_ip(mut stream: ClientStream, peer: SocketAddr, max: u32) -> std::io::Result<()> {
    tracing::warn!(ip = %peer.ip(), max, kind = FailureKind::Capacity.code(), "per-address connection limit reached; answering 503");
    let rejection = Rejection::new(
        503,
        format!(
            "this address already has {max} connections open (limits.max_connections_per_ip); retry later"
        ),
    );
    reject(&mut stream, rejection).await
}

/// WebSocket connections open per client IP address. The map holds only addresses with
/// a connection open, so it is as large as the set of connected clients.
#[derive(Default)]
struct IpSlots(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>);

/// One connection's place in its address's count, given back on drop.
struct IpSlot<'a> {
    slots: &'a IpSlots,
    ip: std::net::IpAddr,
}

impl IpSlots {
    fn reserve(&self, ip: std::net::IpAddr, max: u32) -> Option<IpSlot<'_>> {
        let mut open = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= max {
            if *count == 0 {
                open.remove(&ip);
            }
            return None;
        }
        *count += 1;
        Some(IpSlot { slots: self, ip })
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an `fn(A, B, C) -> F` returns, without calling it.
    fn future_size<A, B, C, F: Future>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds `handle_tcp`'s future for the connection's life, and
    /// an async fn's future is as large as its largest await point. The WebSocket paths
    /// are boxed; so are the TLS accept, the head reader and every HTTP answer, which would
    /// otherwise size every WebSocket connection's task by a rare 404 (904 bytes before,
    /// 656 after, in a test build).
    #[test]
    fn the_accept_task_stays_small() {
        let accept = future_size(handle_tcp);
        assert!(accept <= 672, "the accept task's future is {accept} bytes: box the path that grew it");
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/ws"), Route::Builtin));
        assert!(matches!(route("/ws/echo"), Route::Addon("echo")));
        assert!(matches!(route("/healthz"), Route::Health));
        assert!(matches!(route("/readyz"), Route::Ready));
        assert!(matches!(route("/metrics"), Route::Metrics));
        assert!(matches!(route("/"), Route::Web(crate::web::Resource::ChatPage)));
        assert!(matches!(route("/dashboard"), Route::Web(crate::web::Resource::Dashboard)));
        for path in ["/ws/", "/wsx", "/ws/echo/", "/ws/Echo", "/ws/a/b", "/other", "/metrics/", "/dashboard/"]
        {
            assert!(matches!(route(path), Route::NotFound), "{path}");
        }
    }
}
