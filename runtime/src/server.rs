//! The listener: accepting TCP connections, routing by path, and starting one task per
//! connection.
//!
//! Routes:
//! - `/ws`: the built-in test endpoint ([`serve_builtin`]): a `system` greeting naming the
//!   mounted addons, then an echo of every message;
//! - `/ws/<name>`: the addon mounted as `<name>`, one instance per connection;
//! - anything else: `404 Not Found`, without upgrading.
//!
//! Before an addon connection is upgraded the server checks, in order: the request is a
//! valid upgrade (4xx), the `Origin` is allowed (403), the addon and the server have a
//! free connection slot (503), and an instance can be made (503). Each refusal is logged
//! and counted.
//!
//! Shutdown ([`Server::run_until`]): stop accepting, tell every connection to close with
//! 1001, wait up to the drain timeout for them to finish (each runs its `on-close`).
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::addons::{self, AddonSet, LoadedAddon};
use crate::bindings::ConnectionInfo;
use crate::config::Config;
use crate::connection::AddonConnection;
use crate::engine::EpochCounter;
use crate::error::{Envelope, FailureCounts, FailureKind};
use crate::handshake::{self, HeadError, Rejection, RequestHead};
use crate::host::kv::KvStore;
use crate::host::{self, HostServices, HostState};

/// tungstenite reads into a buffer of this size. Its 128 KiB default is zero-filled on
/// every read: it cost ~134 KB per connection and ~18% CPU when measured on a 2-core
/// machine; 4 KiB costs ~7 KB and nothing measurable.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Largest message a client may send to the built-in `/ws` endpoint; addons set their own.
const BUILTIN_MAX_MESSAGE: usize = 64 << 10;

/// A bound, loaded server, ready to [`run`](Server::run_until).
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// What every connection task reads.
struct Shared {
    addons: AddonSet,
    config: Config,
    ws_config: WebSocketConfig,
    next_connection_id: AtomicU64,
    /// Addon connections open now, against `limits.max_connections`.
    open_connections: AtomicU32,
    failures: Arc<FailureCounts>,
    epoch: EpochCounter,
    /// What every instance may be granted: the kv store.
    services: HostServices,
    /// Cancelled when the server shuts down: every connection closes with 1001.
    shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    tasks: TaskTracker,
}

impl Server {
    /// Binds the listen address, then loads every addon in the addons directory.
    /// Addons that fail to load are logged and skipped; only an unusable listen address
    /// or engine is an error.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        // Bind first: a busy port should fail in milliseconds, not after compiling addons.
        let listener =
            TcpListener::bind(config.listen).await.map_err(|err| bind_error(config.listen, err))?;
        let local = listener.local_addr()?;

        let (engine, epoch) = crate::engine::build(&config.limits)?;
        let linker = host::linker(&engine).map_err(anyhow::Error::from).context("linking host interfaces")?;
        let dir = config.addons_dir.clone();
        let outcome = tokio::task::spawn_blocking(move || addons::load_dir(&engine, &linker, &dir))
            .await
            .context("addon loader panicked")?;
        let addons = match outcome {
            Ok(outcome) => {
                for rejected in &outcome.rejected {
                    tracing::error!(file = %rejected.path.display(), "addon not mounted: {}", rejected.error);
                }
                outcome.addons
            }
            Err(err) => {
                tracing::warn!(dir = %config.addons_dir.display(), "cannot read the addons directory ({err}); only /ws is served");
                AddonSet::default()
            }
        };

        let base = format!("ws://{}:{}", config.public_host, local.port());
        tracing::info!("listening on {local}; test endpoint {base}/ws");
        for addon in addons.iter() {
            let name = addon.name();
            let grants = addon.policy().grants();
            let grants = if grants.is_empty() { "none".to_owned() } else { grants.join("; ") };
            tracing::info!(addon = name, "mounted {base}/ws/{name} (grants: {grants})");
            for (key, var) in &addon.policy().config.missing_env {
                tracing::warn!(
                    addon = name,
                    "config key `{key}` names ${var}, which is not set; the key is absent"
                );
            }
        }
        if addons.is_empty() {
            tracing::warn!(dir = %config.addons_dir.display(), "no addons mounted");
        }

        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_BYTES)
            .max_message_size(Some(BUILTIN_MAX_MESSAGE))
            .max_frame_size(Some(BUILTIN_MAX_MESSAGE));
        let services = HostServices { kv: Arc::new(KvStore::new(&config.data_dir)) };
        let shared = Shared {
            addons,
            services,
            config,
            ws_config,
            next_connection_id: AtomicU64::new(1),
            open_connections: AtomicU32::new(0),
            failures: Arc::new(FailureCounts::default()),
            epoch,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        Ok(Server { listener, shared: Arc::new(shared) })
    }

    /// The address the server listens on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Names of the mounted addons, sorted.
    pub fn addon_names(&self) -> Vec<String> {
        self.shared.addons.names().map(str::to_owned).collect()
    }

    /// Failures counted by kind since start.
    pub fn failures(&self) -> Arc<FailureCounts> {
        self.shared.failures.clone()
    }

    /// Serves until `shutdown` completes, then drains: stops accepting, closes every
    /// connection with 1001 (each addon's `on-close` runs), and returns when they are
    /// done or the drain timeout has passed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut purge = tokio::time::interval(KV_PURGE_INTERVAL);
        purge.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = purge.tick() => self.shared.services.kv.purge_expired().await,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        self.shared.tasks.spawn(handle_tcp(self.shared.clone(), stream, peer));
                    }
                    Err(err) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::error!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(self.listener);
        let open = self.shared.tasks.len();
        let timeout = self.shared.config.limits.drain_timeout;
        tracing::info!(
            open,
            timeout_ms = timeout.as_millis() as u64,
            "shutting down: closing connections with 1001"
        );
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        match tokio::time::timeout(timeout, self.shared.tasks.wait()).await {
            Ok(()) => tracing::info!("all connections closed"),
            Err(_) => tracing::warn!(
                left = self.shared.tasks.len(),
                "drain timeout passed; exiting with connections open"
            ),
        }
    }
}

/// How often expired kv entries are reclaimed (reads already ignore them).
const KV_PURGE_INTERVAL: Duration = Duration::from_secs(300);

fn bind_error(addr: SocketAddr, err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::AddrInUse {
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
    NotFound,
}

fn route(path: &str) -> Route<'_> {
    match path.strip_prefix("/ws") {
        Some("") => Route::Builtin,
        Some(rest) => match rest.strip_prefix('/') {
            Some(name) if addons::is_valid_name(name) => Route::Addon(name),
            _ => Route::NotFound,
        },
        None => Route::NotFound,
    }
}

async fn handle_tcp(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    // Streamed replies are many small frames: send each at once.
    let _ = stream.set_nodelay(true);
    let read =
        tokio::time::timeout(shared.config.limits.handshake_timeout, handshake::read_head(&mut stream)).await;
    let (head, leftover) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(err)) => {
            tracing::debug!(%peer, "bad request head: {err}");
            let rejection = match err {
                HeadError::TooLarge => Rejection::new(431, err.to_string()),
                HeadError::Malformed(_) => Rejection::new(400, err.to_string()),
                HeadError::Eof | HeadError::Io(_) => return,
            };
            shared.failures.record(FailureKind::BadRequest);
            let _ = handshake::write_rejection(&mut stream, &rejection).await;
            return;
        }
        Err(_) => {
            shared.failures.record(FailureKind::HandshakeTimeout);
            let kind = FailureKind::HandshakeTimeout.code();
            tracing::info!(%peer, kind, "request head not received in time; dropped");
            let rejection = Rejection::new(408, "request head not received in time");
            let _ = handshake::write_rejection(&mut stream, &rejection).await;
            return;
        }
    };

    let result = match route(&head.path) {
        Route::Builtin => serve_builtin(&shared, stream, &head, leftover).await,
        Route::Addon(name) => match shared.addons.get(name) {
            Some(addon) => serve_addon(&shared, addon.clone(), stream, peer, &head, leftover).await,
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
        },
        Route::NotFound => {
            reject(
                &mut stream,
                Rejection::new(
                    404,
                    format!("nothing at {}; WebSocket endpoints are /ws and /ws/<addon>", head.path),
                ),
            )
            .await
        }
    };
    if let Err(err) = result {
        tracing::debug!(%peer, path = %head.path, "connection ended early: {err}");
    }
}

async fn reject(stream: &mut TcpStream, rejection: Rejection) -> std::io::Result<()> {
    handshake::write_rejection(stream, &rejection).await
}

fn mounted_list(shared: &Shared) -> String {
    let names: Vec<&str> = shared.addons.names().collect();
    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
}

/// Upgrades the socket; the request has already been checked.
async fn upgrade(
    mut stream: TcpStream,
    key: &str,
    leftover: Vec<u8>,
    config: WebSocketConfig,
) -> std::io::Result<WebSocketStream<TcpStream>> {
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
    mut stream: TcpStream,
    peer: SocketAddr,
    head: &RequestHead,
    leftover: Vec<u8>,
) -> std::io::Result<()> {
    let key = match handshake::check_upgrade(head) {
        Ok(key) => key.to_owned(),
        Err(rejection) => {
            shared.failures.record(FailureKind::BadRequest);
            return reject(&mut stream, rejection).await;
        }
    };
    let policy = addon.policy();
    let origin = head.header("origin");
    if !policy.allows_origin(origin) {
        shared.failures.record(FailureKind::Origin);
        let origin = origin.unwrap_or_default();
        tracing::warn!(addon = addon.name(), %peer, origin, kind = FailureKind::Origin.code(), "origin not allowed; answering 403");
        let rejection =
            Rejection::new(403, format!("origin {origin} may not connect to addon '{}'", addon.name()));
        return reject(&mut stream, rejection).await;
    }
    let max = shared.config.limits.max_connections;
    let Some(_server_slot) = ServerSlot::reserve(&shared.open_connections, max) else {
        shared.failures.record(FailureKind::Capacity);
        tracing::warn!(addon = addon.name(), %peer, max, kind = FailureKind::Capacity.code(), "server connection limit reached; answering 503");
        let rejection =
            Rejection::new(503, format!("the server is at its limit of {max} connections; retry later"));
        return reject(&mut stream, rejection).await;
    };
    let Some(_addon_slot) = addon.reserve_connection() else {
        shared.failures.record(FailureKind::Capacity);
        let max = policy.max_connections;
        tracing::warn!(addon = addon.name(), %peer, max, kind = FailureKind::Capacity.code(), "addon connection limit reached; answering 503");
        let rejection = Rejection::new(
            503,
            format!("addon '{}' is at its limit of {max} connections; retry later", addon.name()),
        );
        return reject(&mut stream, rejection).await;
    };

    let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", addon = addon.name(), conn = id);
    let info = ConnectionInfo {
        id,
        addon: addon.name().to_owned(),
        path: head.path.clone(),
        query: head.query.clone(),
        remote_address: peer.to_string(),
        headers: head.forwarded_headers(),
    };

    // The instance is made before the upgrade, so a failure is an HTTP 503 the client
    // can act on, not a socket that opens and dies.
    let (store, instance) = match addon
        .instantiate(HostState::new(info, policy, &shared.services, shared.epoch.clone()))
        .instrument(span.clone())
        .await
    {
        Ok(made) => made,
        Err(err) => {
            let cause = crate::connection::describe(&err);
            span.in_scope(
                || tracing::error!(cause = %cause, "cannot create an addon instance; answering 503"),
            );
            let rejection = Rejection::new(
                503,
                format!("addon '{}' cannot take a connection now: {cause}", addon.name()),
            );
            return reject(&mut stream, rejection).await;
        }
    };
    let ws_config = shared
        .ws_config
        .max_message_size(Some(policy.max_message_bytes))
        .max_frame_size(Some(policy.max_message_bytes));
    let ws = upgrade(stream, &key, leftover, ws_config).await?;
    let policy = Arc::new(policy.clone());
    AddonConnection::new(store, instance, ws, policy, shared.failures.clone(), shared.shutdown.clone())
        .serve()
        .instrument(span)
        .await;
    Ok(())
}

/// The built-in `/ws` endpoint: greets with the mounted addons, then echoes.
async fn serve_builtin(
    shared: &Shared,
    mut stream: TcpStream,
    head: &RequestHead,
    leftover: Vec<u8>,
) -> std::io::Result<()> {
    let key = match handshake::check_upgrade(head) {
        Ok(key) => key.to_owned(),
        Err(rejection) => return reject(&mut stream, rejection).await,
    };
    let mut ws = upgrade(stream, &key, leftover, shared.ws_config).await?;
    let greeting = format!(
        "sockhost test endpoint: messages you send are echoed back. Mounted addons: {} (connect to /ws/<addon>).",
        mounted_list(shared)
    );
    let greeting = Envelope::System { message: &greeting }.to_json();
    if ws.send(WsMessage::text(greeting)).await.is_err() {
        return Ok(());
    }
    loop {
        let message = tokio::select! {
            _ = shared.shutdown.cancelled() => {
                let frame = CloseFrame { code: CloseCode::Away, reason: "server shutting down".into() };
                let _ = ws.close(Some(frame)).await;
                // Let the client answer the close before the socket goes.
                let _ = tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = ws.next().await {} }).await;
                return Ok(());
            }
            message = ws.next() => message,
        };
        let reply = match message {
            Some(Ok(message @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => message,
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/ws"), Route::Builtin));
        assert!(matches!(route("/ws/echo"), Route::Addon("echo")));
        for path in ["/", "/ws/", "/wsx", "/ws/echo/", "/ws/Echo", "/ws/a/b", "/other"] {
            assert!(matches!(route(path), Route::NotFound), "{path}");
        }
    }
}
