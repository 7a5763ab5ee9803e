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
//! - [`config`]: flags, environment and `sockhost.toml` → [`Config`]; `toml_error`:
//!   describing a file's TOML errors without quoting its text (it may hold secrets);
//! - [`engine`]: the wasmtime engine (pooling, async, epochs); [`capacity`]: what its pool
//!   reserves and maps, against what the machine allows;
//! - [`addons`]: scanning, checking and compiling addon files;
//! - [`cache`]: compiled code on disk, checked before it is trusted; `private_files`:
//!   the modes and owner checks that keep the cache and the kv file to the server's user;
//! - [`reload`]: hot reload of the addons directory;
//! - [`check`]: `sockhost check`, validating addons without serving;
//! - [`cluster`]: the link to Redis that lets several nodes act as one;
//! - [`metrics`]: the Prometheus metrics behind `/metrics`;
//! - [`tls`]: `wss://` and certificate reloading;
//! - [`channels`]: the channel bus, in-process or across nodes; `admin`: the admin
//!   listener with `POST /api/publish`;
//! - [`policy`]: addon manifests (`<name>.toml`): limits and grants;
//! - [`sandbox`]: memory and CPU limits inside an instance's store;
//! - [`server`]: listener and routing; `handshake`: HTTP head and upgrade;
//! - `connection`: one connection's life, from upgrade to `on-close`;
//! - [`host`]: the capabilities addons import (session, log, WASI);
//! - [`error`]: failure kinds, error frames and close codes; `log_limits`: log lines that
//!   clients cause, bounded in size and number.

pub mod addons;
mod admin;
mod bindings;
pub mod builtin;
pub mod cache;
pub mod capacity;
pub mod channels;
pub mod check;
mod client_stream;
pub mod cluster;
pub mod config;
mod connection;
pub mod engine;
pub mod error;
mod file_stamp;
mod handshake;
pub mod host;
pub mod instance_heap;
mod log_limits;
pub mod metrics;
pub mod policy;
mod private_files;
pub mod reload;
pub mod sandbox;
pub mod scaffold;
pub mod server;
mod shutdown;
#[doc(hidden)]
pub mod testing;
pub mod tls;
mod toml_error;
mod web;

pub use config::{AdminConfig, ApiKey, Cli, Command, Config, LogFormat, ServerLimits, TlsFiles};
pub use error::{FailureCounts, FailureKind};
pub use server::{Server, ServerHandle};

// The unit tests run with the server's allocator (instance_heap.rs), as the binary does.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: instance_heap::SegregatingAllocator = instance_heap::SegregatingAllocator;

/// Installs the log subscriber on stderr, filtered by `RUST_LOG` (default `info`):
/// human-readable lines, or one JSON object per line. Connection events happen inside a
/// `conn` span with the fields `addon` and `conn`: text lines show them as a prefix, JSON
/// lines under `"span"`.
///
/// Text lines are coloured only when stderr is a terminal and `NO_COLOR` is unset, as
/// ripgrep and cargo do: a log that goes to a file, a pipe or journald gets plain text an
/// operator can grep, instead of escape codes between every field name and its value.
/// It is also cheaper: the `conn` span's fields are formatted when a connection opens,
/// and without colours that takes about 1.1k fewer instructions per connection
/// (bench/README.md, the night of 2026-12-02).
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
}

/// What the binary does with its command line: serve (the default) or `check`.
/// Returns the process's exit code.
pub async fn main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    if let Some(Command::Check { paths }) = &cli.command {
        // The server's settings decide the pool the addons must fit and the arithmetic
        // printed. A config file that does not parse is one more failure of the check,
        // which goes on with the default limits.
        let limits = Config::from_cli(cli.clone()).map(|config| config.limits);
        return Ok(check::run(paths, limits, &mut std::io::stdout()));
    }
    if let Some(Command::New { name, lang, dir, sdk }) = &cli.command {
        let new =
            scaffold::NewAddon { name: name.clone(), lang: *lang, addons_dir: dir.clone(), sdk: sdk.clone() };
        let created = scaffold::create(&new)?;
        print!("{}", scaffold::describe(&new, &created));
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let config = Config::from_cli(cli.clone())?;
    init_logging(config.log_format);
    raise_open_file_limit();
    let server = Server::start(config).await?;
    reload_config_on_sighup(server.handle(), cli);
    server.run_until(shutdown_signal()).await;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Raises the soft limit on open files to the hard limit, and logs both. Every connection
/// is a descriptor, and the soft default (often 1,024) would refuse connections long
/// before any of the server's own limits; the hard limit is what the operator allowed.
fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            tracing::warn!("cannot read the open-file limit: {}", std::io::Error::last_os_error());
            return;
        }
        let soft = limit.rlim_cur;
        if soft < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
                tracing::warn!(
                    soft,
                    hard = limit.rlim_max,
                    "cannot raise the open-file limit: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
        tracing::info!(
            was = soft,
            now = limit.rlim_cur,
            hard = limit.rlim_max,
            "open-file limit (RLIMIT_NOFILE)"
        );
    }
}

/// On SIGHUP, reads the settings again (flags and environment as given at start, the
/// config file as it is now) and applies what can change while running. A file that no
/// longer parses changes nothing, and the log says why.
fn reload_config_on_sighup(handle: ServerHandle, cli: Cli) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; configuration reload is unavailable");
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reading the configuration again");
            match Config::from_cli(cli.clone()) {
                Ok(config) => {
                    handle.reload_config(config);
                }
                Err(err) => tracing::error!("configuration not reloaded: {err:#}; the running settings stay"),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (handle, cli);
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
