//! sockhost: a WebSocket server that hosts sandboxed WebAssembly addons.
//!
//! Every `addons/<name>.wasm` (a component of the `sockhost:addon` world, see
//! `wit/addon.wit`) is mounted at `/ws/<name>`; each connection gets its own instance.
//! `/ws` is a built-in test endpoint. See `ARCHITECTURE.md` for the data path.
//!
//! The `sockhost` binary is a thin shell over this library: [`Cli`] and [`Config`] for
//! settings, [`Server`] to bind, load and serve. Tests drive the same API in-process.
//!
//! Module map:
//! - [`config`]: flags, environment and `sockhost.toml` → [`Config`];
//! - [`engine`]: the wasmtime engine (pooling, async, epochs);
//! - [`addons`]: scanning, checking and compiling addon files;
//! - [`policy`]: addon manifests (`<name>.toml`): limits and grants;
//! - [`sandbox`]: memory and CPU limits inside an instance's store;
//! - [`server`]: listener and routing; `handshake`: HTTP head and upgrade;
//! - `connection`: one connection's life, from upgrade to `on-close`;
//! - [`host`]: the capabilities addons import (session, log, WASI);
//! - [`error`]: failure kinds, error frames and close codes.

pub mod addons;
mod bindings;
pub mod config;
mod connection;
pub mod engine;
pub mod error;
mod handshake;
pub mod host;
pub mod policy;
pub mod sandbox;
pub mod server;

pub use config::{Cli, Config, ServerLimits};
pub use error::{FailureCounts, FailureKind};
pub use server::Server;

/// Installs the log subscriber: human-readable lines on stderr, filtered by `RUST_LOG`
/// (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
