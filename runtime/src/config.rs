//! Server configuration: `sockhost.toml`, environment variables and command-line flags,
//! merged into one validated [`Config`].
//!
//! Precedence, highest first: flags, environment variables (`SOCKHOST_*`), the config
//! file, built-in defaults. The defaults are the seed server's: listen on `0.0.0.0:8080`,
//! print URLs with `localhost`, serve `./addons`. Every file key is checked: an unknown key
//! or a value of the wrong type stops start-up with a message that names it: the file, line,
//! column and key, never the line's text or the value, which may be a secret typed under
//! the wrong key (`crate::toml_error`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

/// The default config file, read when it exists and no other file is named.
pub const DEFAULT_CONFIG_FILE: &str = "sockhost.toml";

/// The default compiled-code cache directory, relative to the working directory.
pub const DEFAULT_CACHE_DIR: &str = ".sockhost-cache";

/// Command-line interface of the `sockhost` binary.
#[derive(Debug, Parser, Default, Clone)]
#[command(
    name = "sockhost",
    version,
    about = "Serve sandboxed WebAssembly addons over WebSockets.",
    long_about = "Serve sandboxed WebAssembly addons over WebSockets.\n\n\
        Every addons/<name>.wasm is mounted at ws://<host>:<port>/ws/<name>, with one \
        sandboxed instance per connection. /ws is a built-in test endpoint that greets \
        and echoes.\n\n\
        Settings come from flags, then SOCKHOST_* environment variables, then the config \
        file (sockhost.toml by default), then the defaults shown."
)]
pub struct Cli {
    /// Config file to read. Without this flag, ./sockhost.toml is read if it exists.
    #[arg(long, short = 'c', env = "SOCKHOST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// IP address to listen on [file: server.listen] [default: 0.0.0.0]
    #[arg(long, env = "SOCKHOST_LISTEN", value_name = "IP")]
    pub listen: Option<IpAddr>,

    /// TCP port to listen on; 0 picks a free one [file: server.port] [default: 8080]
    #[arg(long, short = 'p', env = "SOCKHOST_PORT")]
    pub port: Option<u16>,

    /// Host name used in the URLs printed at start-up [file: server.public_host] [default: localhost]
    #[arg(long, env = "SOCKHOST_PUBLIC_HOST", value_name = "HOST")]
    pub public_host: Option<String>,

    /// Share the port with another sockhost process (SO_REUSEPORT), for restarts without
    /// downtime: start the new process, then stop the old one [file: server.reuse_port] [default: off]
    #[arg(long, env = "SOCKHOST_REUSE_PORT")]
    pub reuse_port: bool,

    /// Directory scanned for <name>.wasm addons [file: server.addons_dir] [default: ./addons]
    #[arg(long, env = "SOCKHOST_ADDONS_DIR", value_name = "DIR")]
    pub addons_dir: Option<PathBuf>,

    /// Directory for the server's own data: the kv store's file [file: server.data_dir] [default: ./data]
    #[arg(long, env = "SOCKHOST_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of the compiled-code cache [file: server.cache_dir] [default: ./.sockhost-cache]
    #[arg(long, env = "SOCKHOST_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Compile every addon at start-up instead of using the cache [file: server.compile_cache = false]
    #[arg(long)]
    pub no_compile_cache: bool,

    /// Log format: text (human-readable) or json (one object per line) [file: log.format] [default: text]
    #[arg(long, env = "SOCKHOST_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// TLS certificate chain (PEM); serves wss:// with --tls-key [file: tls.cert]
    #[arg(long, env = "SOCKHOST_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert [file: tls.key]
    #[arg(long, env = "SOCKHOST_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// Redis shared by several sockhost nodes, for channels and kv across them, e.g.
    /// redis://127.0.0.1:6379 [file: cluster.redis_url] [default: none, all in-process]
    #[arg(long, env = "SOCKHOST_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Address of the admin listener (POST /api/publish, /metrics), apart from the public
    /// port, e.g. 127.0.0.1:9090 [file: admin.listen] [default: none, off]
    #[arg(long, env = "SOCKHOST_ADMIN_LISTEN", value_name = "IP:PORT")]
    pub admin_listen: Option<SocketAddr>,

    /// Serve no web pages on the public port: no chat page at /, and no dashboard there
    /// (an admin listener still has its dashboard) [file: web.enabled = false] [default: on]
    #[arg(long, env = "SOCKHOST_NO_WEB")]
    pub no_web: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the binary does; without a subcommand it serves.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Validate addons without serving: each file's component, world, imports and
    /// manifest, with its granted capabilities and limits. Exits non-zero on a problem.
    Check {
        /// Addon files (<name>.wasm) or directories of them
        #[arg(required = true, value_name = "FILE.wasm|DIR")]
        paths: Vec<PathBuf>,
    },
    /// Create a working addon to start from: <addons-dir>/NAME/ (source, a unit test) and
    /// its manifest <addons-dir>/NAME.toml (nothing granted); prints how to build, run and
    /// connect to it.
    New {
        /// The addon's name, also its URL path /ws/NAME: lowercase letters, digits, '-', '_'
        name: String,
        /// The language to write it in
        #[arg(long, value_enum, default_value_t = crate::scaffold::Lang::Rust)]
        lang: crate::scaffold::Lang,
        /// The directory the addon goes into (the server's addons directory)
        #[arg(long = "dir", value_name = "DIR", default_value = "addons")]
        dir: PathBuf,
        /// sockhost's addon-sdk directory, which the addon depends on [default: ./addon-sdk]
        #[arg(long, value_name = "DIR", default_value = "addon-sdk")]
        sdk: PathBuf,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the span fields (addon, conn) of each event.
    Json,
}

/// The config file's shape. Every section and key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    log: FileLog,
    tls: Option<FileTls>,
    #[serde(default)]
    builtin: crate::builtin::FileBuiltin,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    web: FileWeb,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWeb {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<SocketAddr>,
    api_key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    format: Option<LogFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    listen: Option<IpAddr>,
    port: Option<u16>,
    public_host: Option<String>,
    reuse_port: Option<bool>,
    addons_dir: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    compile_cache: Option<bool>,
    reload_poll_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    read_buffer_bytes: Option<usize>,
    orphan_callback_grace_ms: Option<u64>,
    max_connections_per_ip: Option<u32>,
    max_live_instances: Option<u32>,
    memory_reservation: Option<crate::policy::ByteSize>,
    async_stack_bytes: Option<crate::policy::ByteSize>,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Host name used in the URLs the server prints.
    pub public_host: String,
    /// Whether the listening socket shares its port with other processes that ask the
    /// same (SO_REUSEPORT), so a new sockhost can start on the port before the old one
    /// stops. With it, a process that starts draining closes its listener at once, so
    /// every new connection reaches the process still serving; without it, the draining
    /// process keeps the port and answers 503 (see [`crate::Server::run_until`]). Off by
    /// default: two servers started on one port by mistake would silently share the
    /// traffic. File key `server.reuse_port`, flag `--reuse-port`; default `false`.
    pub reuse_port: bool,
    /// Directory scanned for `<name>.wasm` addons.
    pub addons_dir: PathBuf,
    /// Directory for data the server keeps: `kv.redb`, the kv store (created on first
    /// use by an addon granted `kv`). Made 0700 and the file 0600, as it holds what
    /// addons keep about their users; an existing directory open to others is warned
    /// about, not changed.
    pub data_dir: PathBuf,
    /// Server-wide limits.
    pub limits: ServerLimits,
    /// Directory of the compiled-code cache; `None` compiles every addon at start-up.
    /// Used only while owned by the server's user and writable by no one else (see
    /// [`crate::cache`]).
    /// File keys `server.cache_dir` and `server.compile_cache`; default `./.sockhost-cache`.
    pub cache_dir: Option<PathBuf>,
    /// How often the addons directory is checked for changes; `None` turns hot reload
    /// off. File key `server.reload_poll_ms` (`0` = off); default 250 ms.
    pub reload_poll: Option<Duration>,
    /// File key `log.format`; default text.
    pub log_format: LogFormat,
    /// Certificate and key for `wss://`; `None` serves plain `ws://`. File keys
    /// `tls.cert` and `tls.key`.
    pub tls: Option<TlsFiles>,
    /// Redis shared by the nodes of a cluster: channels go through its pub/sub and kv is
    /// kept in it. `None` keeps both in this process (kv in `data_dir`). File key
    /// `cluster.redis_url`, flag `--redis-url`, env `SOCKHOST_REDIS_URL`.
    pub redis_url: Option<String>,
    /// The admin listener; `None` (the default) runs none.
    pub admin: Option<AdminConfig>,
    /// The built-in `/ws` endpoint's limits, or that it is off. Section `[builtin]`.
    pub builtin: crate::builtin::BuiltinConfig,
    /// Whether the public port serves web pages ([`crate::web`]): the chat page at `/`,
    /// and the dashboard at `/dashboard` unless an admin listener has it. Off, those
    /// paths answer 404 as any unknown path does. File key `web.enabled`, flag
    /// `--no-web`, env `SOCKHOST_NO_WEB=true`; default on.
    pub web_enabled: bool,
}

/// The admin listener: `POST /api/publish` for the shop's backend, and `/metrics`, on an
/// address apart from the public port (keep it on loopback or a private network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// File key `admin.listen`, flag `--admin-listen`, env `SOCKHOST_ADMIN_LISTEN`.
    pub listen: SocketAddr,
    /// The environment variable that holds the API key (`Authorization: Bearer <key>`).
    /// When it is unset or empty, `/api/publish` does not exist and the log says so.
    /// File key `admin.api_key_env`; default `SOCKHOST_API_KEY`.
    pub api_key_env: String,
    /// The key read from `api_key_env` when the configuration was built. Never in a
    /// file: keys belong in the environment (or a secret manager that sets it).
    pub api_key: Option<ApiKey>,
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The default of `admin.api_key_env`.
pub const DEFAULT_API_KEY_ENV: &str = "SOCKHOST_API_KEY";

/// Where the TLS certificate chain and private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Server-wide limits. Per-addon limits come from each addon's manifest.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// WebSocket connections (sockets, to addons and `/ws`) open at once; one more is
    /// answered 503. A socket costs a file descriptor and some host memory, nothing in
    /// the instance pool: that is [`ServerLimits::max_live_instances`].
    /// File key `limits.max_connections`; default 10,000.
    pub max_connections: u32,
    /// Addon instances alive at once: the slots of the pooling allocator, which reserves
    /// address space (`memory_reservation` + a 64 KiB guard, and an async stack) and
    /// memory mappings for each slot at start-up. A new addon connection when every slot
    /// is taken is answered 503 (`capacity`). Start-up refuses a value the machine cannot
    /// map (see README, "Running at scale").
    /// The pool has `min(max_live_instances, max_connections)` slots.
    /// File key `limits.max_live_instances`; default `max_connections`, at most 10,000.
    pub max_live_instances: u32,
    /// Address space reserved for each instance's linear memory, which is also the most
    /// any addon's `memory_limit` may be: an addon asking for more is not mounted. `None`
    /// derives it at start-up from the addons present: twice the largest `memory_limit`
    /// (headroom for reloads that raise it), at least 64 MiB, at most 4 GiB. Below
    /// 4 GiB, compiled code checks bounds explicitly (see ARCHITECTURE.md, engine).
    /// File key `limits.memory_reservation` (a size: `"256MiB"`); 1 MiB to 4 GiB.
    pub memory_reservation: Option<u64>,
    /// The stack each instance's guest code and host calls run on (one per live
    /// instance, from the pool). Guest code may use 512 KiB of it (wasmtime's
    /// `max_wasm_stack`); the rest is for host calls made from the guest.
    /// File key `limits.async_stack_bytes`; default 2 MiB (wasmtime's); 1 MiB to 64 MiB.
    pub async_stack_bytes: usize,
    /// How long a client may take to send its complete HTTP upgrade request.
    /// File key `limits.handshake_timeout_ms`; default 10 s.
    pub handshake_timeout: Duration,
    /// On SIGINT/SIGTERM, how long open connections get to close (1001, then each
    /// addon's `on-close`) before the process exits anyway.
    /// File key `limits.drain_timeout_ms`; default 10 s.
    pub drain_timeout: Duration,
    /// The most bytes read from a client's socket in one system call, and the read
    /// buffer every connection keeps while idle. tungstenite zero-fills this many bytes
    /// before each read, so it is paid on every message. The default suits chat-sized
    /// messages: against 4 KiB it saves about 3 KB per idle connection and a little CPU
    /// per small message, while a 16 KiB message costs about 40% more CPU (more reads;
    /// see `bench/README.md`). Raise it for addons that take large binary messages.
    /// File key `limits.read_buffer_bytes`; default 1,024; 256 to 1 MiB.
    pub read_buffer_bytes: usize,
    /// How long a callback may go on once its client has gone (closed, or TCP gone)
    /// before the host abandons it and drops the instance, skipping `on-close`. A reply
    /// nobody will read should not hold memory and a slot; long enough for an addon to
    /// notice failed sends and finish its bookkeeping.
    /// File key `limits.orphan_callback_grace_ms`; default 5,000; 0 to 3,600,000.
    pub orphan_callback_grace: Duration,
    /// WebSocket connections (to addons and `/ws`) from one IP address at once; one more
    /// is answered 503. High enough for carrier-grade NAT, where many phones share an
    /// address, low enough that one host cannot take the whole server.
    /// File key `limits.max_connections_per_ip`; default 1,000.
    pub max_connections_per_ip: u32,
}

/// Default of `limits.max_live_instances` (and its cap when derived from
/// `limits.max_connections`).
pub const DEFAULT_MAX_LIVE_INSTANCES: u32 = 10_000;
/// Default of `limits.async_stack_bytes`: wasmtime's.
pub const DEFAULT_ASYNC_STACK_BYTES: usize = 2 << 20;
/// Bounds of `limits.async_stack_bytes`: above the 512 KiB guests may use, with room for
/// host calls.
const ASYNC_STACK_BYTES: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 20);
/// Bounds of `limits.memory_reservation`.
pub const MEMORY_RESERVATION: std::ops::RangeInclusive<u64> = (1 << 20)..=(4 << 30);

/// Bounds of `limits.read_buffer_bytes`.
const READ_BUFFER_BYTES: std::ops::RangeInclusive<usize> = 256..=(1 << 20);

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 10_000,
            max_live_instances: 10_000,
            memory_reservation: None,
            async_stack_bytes: DEFAULT_ASYNC_STACK_BYTES,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            read_buffer_bytes: 1024,
            orphan_callback_grace: Duration::from_secs(5),
            max_connections_per_ip: 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080),
            public_host: "localhost".to_owned(),
            reuse_port: false,
            addons_dir: PathBuf::from("addons"),
            data_dir: PathBuf::from("data"),
            limits: ServerLimits::default(),
            cache_dir: Some(PathBuf::from(DEFAULT_CACHE_DIR)),
            reload_poll: Some(Duration::from_millis(250)),
            log_format: LogFormat::Text,
            tls: None,
            redis_url: None,
            admin: None,
            builtin: crate::builtin::BuiltinConfig::default(),
            web_enabled: true,
        }
    }
}

impl Config {
    /// Builds the configuration from parsed flags (which already include the
    /// environment) and the config file they name, or `./sockhost.toml` if present.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Config> {
        let path = match &cli.config {
            Some(path) => Some(path.clone()),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => Some(PathBuf::from(DEFAULT_CONFIG_FILE)),
            None => None,
        };
        match path {
            Some(path) => {
                let file = read_file(&path)?;
                Config::merge(cli, file).with_context(|| format!("invalid config file {}", path.display()))
            }
            None => Config::merge(cli, FileConfig::default()),
        }
    }

    /// Parses a config file's text on its own (flags and environment not applied).
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|err| anyhow::anyhow!("invalid config: {}", crate::toml_error::describe(&err, text)))?;
        Config::merge(Cli::default(), file)
    }

    fn merge(cli: Cli, file: FileConfig) -> anyhow::Result<Config> {
        let defaults = Config::default();
        let listen_ip = cli.listen.or(file.server.listen).unwrap_or(defaults.listen.ip());
        let port = cli.port.or(file.server.port).unwrap_or(defaults.listen.port());
        let public_host = cli.public_host.or(file.server.public_host).unwrap_or(defaults.public_host);
        if public_host.is_empty() || public_host.contains(['/', ' ']) {
            bail!("invalid value for server.public_host (--public-host): {public_host:?} is not a host name");
        }
        let reuse_port = cli.reuse_port || file.server.reuse_port.unwrap_or(defaults.reuse_port);
        let addons_dir = cli.addons_dir.or(file.server.addons_dir).unwrap_or(defaults.addons_dir);
        let data_dir = cli.data_dir.or(file.server.data_dir).unwrap_or(defaults.data_dir);

        let mut limits = defaults.limits;
        if let Some(max) = file.limits.max_connections {
            if max == 0 {
                bail!("invalid value for limits.max_connections: must be at least 1");
            }
            limits.max_connections = max;
        }
        limits.max_live_instances = match file.limits.max_live_instances {
            Some(0) => bail!("invalid value for limits.max_live_instances: must be at least 1"),
            Some(max) => max,
            None => limits.max_connections.min(DEFAULT_MAX_LIVE_INSTANCES),
        };
        if let Some(crate::policy::ByteSize(bytes)) = file.limits.memory_reservation {
            if !MEMORY_RESERVATION.contains(&bytes) {
                bail!("invalid value for limits.memory_reservation: {bytes} bytes; use 1MiB to 4GiB");
            }
            limits.memory_reservation = Some(bytes.next_multiple_of(64 << 10));
        }
        if let Some(crate::policy::ByteSize(bytes)) = file.limits.async_stack_bytes {
            if !ASYNC_STACK_BYTES.contains(&bytes) {
                bail!("invalid value for limits.async_stack_bytes: {bytes} bytes; use 1MiB to 64MiB");
            }
            limits.async_stack_bytes = bytes as usize;
        }
        if let Some(ms) = file.limits.handshake_timeout_ms {
            if ms == 0 {
                bail!("invalid value for limits.handshake_timeout_ms: must be at least 1");
            }
            limits.handshake_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = file.limits.drain_timeout_ms {
            limits.drain_timeout = Duration::from_millis(ms);
        }
        if let Some(bytes) = file.limits.read_buffer_bytes {
            if !READ_BUFFER_BYTES.contains(&bytes) {
                bail!(
                    "invalid value for limits.read_buffer_bytes: {bytes}; use {} to {} bytes",
                    READ_BUFFER_BYTES.start(),
                    READ_BUFFER_BYTES.end()
                );
            }
            limits.read_buffer_bytes = bytes;
        }

        if let Some(max) = file.limits.max_connections_per_ip {
            if max == 0 {
                bail!("invalid value for limits.max_connections_per_ip: must be at least 1");
            }
            limits.max_connections_per_ip = max;
        }
        let builtin = crate::builtin::BuiltinConfig::from_file(file.builtin).map_err(anyhow::Error::msg)?;
        if let Some(ms) = file.limits.orphan_callback_grace_ms {
            if ms > 3_600_000 {
                bail!("invalid value for limits.orphan_callback_grace_ms: {ms}; use 0 to 3600000");
            }
            limits.orphan_callback_grace = Duration::from_millis(ms);
        }
        let compile_cache = !cli.no_compile_cache && file.server.compile_cache.unwrap_or(true);
        let cache_dir = cli.cache_dir.or(file.server.cache_dir).or(defaults.cache_dir);
        let cache_dir = if compile_cache { cache_dir } else { None };
        let reload_poll = match file.server.reload_poll_ms {
            Some(0) => None,
            Some(ms) if ms < 10 => {
                bail!("invalid value for server.reload_poll_ms: use 10 or more, or 0 for no hot reload")
            }
            Some(ms) => Some(Duration::from_millis(ms)),
            None => defaults.reload_poll,
        };
        let log_format = cli.log_format.or(file.log.format).unwrap_or_default();
        let tls = match (cli.tls_cert, cli.tls_key, file.tls) {
            (Some(cert), Some(key), _) => Some(TlsFiles { cert, key }),
            (None, None, Some(tls)) => Some(TlsFiles { cert: tls.cert, key: tls.key }),
            (None, None, None) => None,
            (Some(_), None, _) | (None, Some(_), _) => {
                bail!("--tls-cert and --tls-key (SOCKHOST_TLS_CERT, SOCKHOST_TLS_KEY) go together: give both")
            }
        };

        let redis_url = cli.redis_url.or(file.cluster.redis_url).filter(|url| !url.is_empty());
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
        {
            // Not quoted: a mistyped URL still holds its password (`redis://:pw@host`).
            bail!(
                "invalid value for cluster.redis_url (--redis-url): not a redis:// URL (use redis://, \
                 rediss:// or unix://)"
            );
        }
        let api_key_env = file.admin.api_key_env.unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_owned());
        if api_key_env.is_empty() || !api_key_env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            bail!("invalid value for admin.api_key_env: {api_key_env:?} is not an environment variable name");
        }
        let admin = cli.admin_listen.or(file.admin.listen).map(|listen| {
            let api_key = std::env::var(&api_key_env).ok().filter(|key| !key.is_empty()).map(ApiKey);
            AdminConfig { listen, api_key_env, api_key }
        });

        let web_enabled = !cli.no_web && file.web.enabled.unwrap_or(defaults.web_enabled);

        Ok(Config {
            listen: SocketAddr::new(listen_ip, port),
            public_host,
            reuse_port,
            addons_dir,
            data_dir,
            limits,
            cache_dir,
            reload_poll,
            log_format,
            tls,
            redis_url,
            admin,
            builtin,
            web_enabled,
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    // Not `with_context`: the toml error would stay in the chain, and its Display quotes
    // the offending line, which may hold a secret. See `crate::toml_error`.
    toml::from_str(&text).map_err(|err| {
        anyhow::anyhow!(
            "invalid config file {}: {}",
            path.display(),
            crate::toml_error::describe(&err, &text)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_servers() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.public_host, "localhost");
        assert_eq!(config.addons_dir, PathBuf::from("addons"));
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let file: FileConfig =
            toml::from_str("[server]\nport = 9000\nlisten = \"127.0.0.1\"\npublic_host = \"shop.example\"")
                .unwrap();
        let cli = Cli { port: Some(9100), ..Cli::default() };
        let config = Config::merge(cli, file).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(config.public_host, "shop.example");
    }

    #[test]
    fn operations_settings_parse() {
        let config = Config::from_toml(
            "[server]\ncache_dir = \"/var/cache/sockhost\"\nreload_poll_ms = 0\n[log]\nformat = \"json\"\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"",
        )
        .unwrap();
        assert_eq!(config.cache_dir, Some(PathBuf::from("/var/cache/sockhost")));
        assert_eq!(config.reload_poll, None);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.tls, Some(TlsFiles { cert: "c.pem".into(), key: "k.pem".into() }));
        assert_eq!(Config::from_toml("[server]\ncompile_cache = false").unwrap().cache_dir, None);
        let defaults = Config::from_toml("").unwrap();
        assert_eq!(defaults.cache_dir, Some(PathBuf::from(DEFAULT_CACHE_DIR)));
        assert_eq!(defaults.reload_poll, Some(Duration::from_millis(250)));
        let err = format!("{:#}", Config::from_toml("[tls]\ncert = \"c.pem\"").unwrap_err());
        assert!(err.contains("key"), "{err}");
        let cli = Cli { tls_cert: Some("c.pem".into()), ..Cli::default() };
        assert!(Config::merge(cli, FileConfig::default()).unwrap_err().to_string().contains("--tls-key"));
    }

    #[test]
    fn reuse_port_comes_from_the_file_or_the_flag() {
        assert!(!Config::from_toml("").unwrap().reuse_port);
        assert!(Config::from_toml("[server]\nreuse_port = true").unwrap().reuse_port);
        let cli = Cli { reuse_port: true, ..Cli::default() };
        assert!(Config::merge(cli, FileConfig::default()).unwrap().reuse_port);
        let err = format!("{:#}", Config::from_toml("[server]\nreuse_port = \"yes\"").unwrap_err());
        assert!(err.contains("reuse_port"), "{err}");
    }

    #[test]
    fn cluster_and_admin_are_off_unless_set() {
        let config = Config::from_toml("").unwrap();
        assert_eq!((config.redis_url, config.admin), (None, None));
        let config = Config::from_toml(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\n[admin]\nlisten = \"127.0.0.1:9090\"",
        )
        .unwrap();
        assert_eq!(config.redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
        let admin = config.admin.unwrap();
        assert_eq!(
            (admin.listen.to_string(), admin.api_key_env.as_str()),
            ("127.0.0.1:9090".into(), "SOCKHOST_API_KEY")
        );
        let cli = Cli { redis_url: Some("redis://h:1".into()), ..Cli::default() };
        let file = toml::from_str("[cluster]\nredis_url = \"redis://file:2\"").unwrap();
        assert_eq!(Config::merge(cli, file).unwrap().redis_url.as_deref(), Some("redis://h:1"));
        for (text, key) in [
            ("[cluster]\nredis_url = \"http://x\"", "cluster.redis_url"),
            ("[admin]\nlisten = \"127.0.0.1:9090\"\napi_key_env = \"A-B\"", "admin.api_key_env"),
            ("[admin]\nlisten = \"nowhere\"", "listen"),
            ("[cluster]\nredis = 1", "redis"),
        ] {
            let err = format!("{:#}", Config::from_toml(text).unwrap_err());
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn web_pages_are_on_unless_the_file_or_the_flag_turns_them_off() {
        assert!(Config::from_toml("").unwrap().web_enabled);
        assert!(Config::from_toml("[web]\nenabled = true").unwrap().web_enabled);
        assert!(!Config::from_toml("[web]\nenabled = false").unwrap().web_enabled);
        let cli = Cli { no_web: true, ..Cli::default() };
        let file = toml::from_str("[web]\nenabled = true").unwrap();
        assert!(!Config::merge(cli, file).unwrap().web_enabled, "the flag wins over the file");
        for text in ["[web]\nenabled = \"no\"", "[web]\nenable = false"] {
            let err = format!("{:#}", Config::from_toml(text).unwrap_err());
            assert!(err.contains("enable"), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = format!("{:#}", Config::from_toml("[server]\nprot = 1").unwrap_err());
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn wrong_types_are_named() {
        let err = format!("{:#}", Config::from_toml("[server]\nport = \"eighty\"").unwrap_err());
        assert!(err.contains("port"), "{err}");
        let err = format!("{:#}", Config::from_toml("[server]\nport = 70000").unwrap_err());
        assert!(err.contains("port"), "{err}");
        let err = format!("{:#}", Config::from_toml("[server]\nlisten = \"nowhere\"").unwrap_err());
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = Config::from_toml("[limits]\nmax_connections = 0").unwrap_err().to_string();
        assert!(err.contains("limits.max_connections"), "{err}");
        let err = Config::from_toml("[server]\npublic_host = \"\"").unwrap_err().to_string();
        assert!(err.contains("public_host"), "{err}");
        for bytes in [0, 255, (1 << 20) + 1] {
            let err =
                Config::from_toml(&format!("[limits]\nread_buffer_bytes = {bytes}")).unwrap_err().to_string();
            assert!(err.contains("limits.read_buffer_bytes") && err.contains("256 to 1048576"), "{err}");
        }
        let err = format!("{:#}", Config::from_toml("[limits]\nread_buffer_bytes = -1").unwrap_err());
        assert!(err.contains("read_buffer_bytes"), "{err}");
    }

    #[test]
    fn live_instances_default_to_the_connections_up_to_ten_thousand() {
        let limits = Config::from_toml("").unwrap().limits;
        assert_eq!((limits.max_connections, limits.max_live_instances), (10_000, 10_000));
        assert_eq!((limits.memory_reservation, limits.async_stack_bytes), (None, 2 << 20));
        let limits = Config::from_toml("[limits]\nmax_connections = 500").unwrap().limits;
        assert_eq!(limits.max_live_instances, 500);
        let limits = Config::from_toml("[limits]\nmax_connections = 200000").unwrap().limits;
        assert_eq!(limits.max_live_instances, 10_000);
        let limits = Config::from_toml(
            "[limits]\nmax_connections = 200000\nmax_live_instances = 50000\nmemory_reservation = \"100MiB\"\n\
             async_stack_bytes = \"1MiB\"",
        )
        .unwrap()
        .limits;
        assert_eq!(limits.max_live_instances, 50_000);
        assert_eq!(limits.memory_reservation, Some(100 << 20));
        assert_eq!(limits.async_stack_bytes, 1 << 20);
        for (text, key) in [
            ("max_live_instances = 0", "limits.max_live_instances"),
            ("memory_reservation = \"8GiB\"", "limits.memory_reservation"),
            ("memory_reservation = 1000", "limits.memory_reservation"),
            ("async_stack_bytes = \"64KiB\"", "limits.async_stack_bytes"),
        ] {
            let err = Config::from_toml(&format!("[limits]\n{text}")).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn the_read_buffer_is_small_by_default_and_can_be_raised() {
        assert_eq!(Config::from_toml("").unwrap().limits.read_buffer_bytes, 1024);
        let config = Config::from_toml("[limits]\nread_buffer_bytes = 16384").unwrap();
        assert_eq!(config.limits.read_buffer_bytes, 16384);
    }
}
