//! Addon manifests: the policy an operator sets for one addon in `addons/<name>.toml`.
//!
//! Deny by default: without a manifest an addon gets the defaults below, which are
//! small, and no capability beyond the `sockhost:addon` world. A manifest can only be
//! right or refused: an unknown key, a value of the wrong type or a value out of range
//! means the addon is not mounted, and the log names the file, the key and the problem.
//! It names them by line, column and key, never by quoting the file: a manifest holds
//! secrets (`[config]` values, a misplaced key), and a typo must not copy one into the
//! log or `sockhost check` (`crate::toml_error`); for the same reason messages made here
//! about a value's type or unit do not quote the value.
//!
//! | key | default | what it bounds |
//! |---|---|---|
//! | `memory_limit` | `"32MiB"` | linear memory of one instance |
//! | `max_host_resources` | `memory_limit` / 32 KiB, at most 4096 (1024 for 32 MiB) | resources (WASI and `wasi:http` handles) one instance holds on the host; at most max(`memory_limit`, 2 MiB) / 32 KiB, so host-side buffers stay within that (`crate::host`) |
//! | `cpu_limit_ms` | `1000` | guest run time of one callback (host waits excluded) |
//! | `max_connections` | `1000` | open connections to this addon |
//! | `max_message_bytes` | `"64KiB"` | one client message |
//! | `messages_per_second` | `20` (`0` = no limit) | client messages per connection, sustained |
//! | `message_burst` | `40` | client messages per connection, in a burst |
//! | `idle_timeout_s` | `600` | time without a client message before the host closes |
//! | `ping_interval_s` | `30` | silence before the host pings; a ping unanswered as long again means the peer is gone |
//! | `send_timeout_s` | `10` | how long one `send` may wait for a client that does not read |
//! | `orphan_callback_grace_ms` | the server's `limits.orphan_callback_grace_ms` (5000) | how long a callback may run on after its client has gone, before the host abandons it (`crate::connection`); up to an hour. An addon whose replies must finish without their client (aikefu keeps them for a resume) sets it long enough |
//! | `hibernate_after_ms` | `30000` for a component that exports `hibernation`; never without it (`0` = never) | time with no callback running before an idle connection's instance is hibernated (`crate::connection`) |
//! | `hibernate_max_state_bytes` | `"16KiB"` | largest state `hibernate` may return; a larger one keeps the instance live |
//! | `allowed_origins` | `[]` (any) | `Origin` header allow-list for browser clients |
//!
//! Grants (capabilities beyond the session and log), all off by default:
//!
//! | key | grants |
//! |---|---|
//! | `kv = true` | the `kv` interface: this addon's namespace of the server's store |
//! | `kv_max_keys` / `kv_max_bytes` | how much that namespace may hold: 100,000 keys / 256 MiB (keys' and values' bytes) |
//! | `outbound_hosts = ["https://api.example.com"]` | outbound HTTP to exactly these origins (`*.` for subdomains) |
//! | `outbound_connect_timeout_ms` / `_first_byte_` / `_between_bytes_` | caps on outbound waits: 5000 / 60000 / 60000 |
//! | `outbound_max_requests` | outbound requests one instance may have open at once: 4 |
//! | `[config]` | settings the addon reads with `config.get`; `{ env = "NAME" }` reads a variable |
//! | `[auth]` | token verification (`auth.verify-token`): HS256 JWT, secret from the environment |
//! | `[channels]` | `subscribe` / `publish` patterns (`"room:*"`), and `max_message_bytes` (64 KiB), `max_subscriptions` (64), `inbox` (256) |

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::host::auth::{AuthSection, JwtVerifier};
use crate::host::channels::{ChannelGrants, ChannelsSection};
use crate::host::config::{AddonConfig, EnvLookup};
use crate::host::outbound::OutboundPolicy;

/// The manifest file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    memory_limit: Option<ByteSize>,
    max_host_resources: Option<u32>,
    cpu_limit_ms: Option<u64>,
    max_connections: Option<u32>,
    max_message_bytes: Option<ByteSize>,
    messages_per_second: Option<f64>,
    message_burst: Option<u32>,
    idle_timeout_s: Option<u64>,
    ping_interval_s: Option<u64>,
    send_timeout_s: Option<u64>,
    orphan_callback_grace_ms: Option<u64>,
    hibernate_after_ms: Option<u64>,
    hibernate_max_state_bytes: Option<ByteSize>,
    allowed_origins: Option<Vec<String>>,
    kv: Option<bool>,
    kv_max_keys: Option<u64>,
    kv_max_bytes: Option<ByteSize>,
    outbound_hosts: Option<Vec<String>>,
    outbound_connect_timeout_ms: Option<u64>,
    outbound_first_byte_timeout_ms: Option<u64>,
    outbound_between_bytes_timeout_ms: Option<u64>,
    outbound_max_requests: Option<u32>,
    config: Option<toml::Table>,
    auth: Option<AuthSection>,
    channels: Option<ChannelsSection>,
}

/// A byte count written as an integer or as a string with a unit: `"64KiB"`, `"32 MiB"`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ByteSize(pub(crate) u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Bytes(n) => Ok(ByteSize(n)),
            Raw::Text(text) => parse_size(&text).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    // The messages do not quote the text: they go through serde into an error that is
    // logged, and a value in the wrong key may be a secret (see `crate::toml_error`).
    let number: u64 =
        number.parse().map_err(|_| "not a size; expected a size like `64KiB` or `65536`".to_owned())?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        _ => return Err("unknown size unit; expected `B`, `KiB`, `MiB` or `GiB`".to_owned()),
    };
    number.checked_mul(factor).ok_or_else(|| "too large a size".to_owned())
}

/// A token-bucket rate for client messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageRate {
    pub per_second: f64,
    pub burst: u32,
}

/// The validated policy of one addon.
#[derive(Debug, Clone, PartialEq)]
pub struct AddonPolicy {
    /// Largest linear memory one instance may have, in bytes.
    pub memory_limit: usize,
    /// Most resources (WASI and `wasi:http` handles: fields, requests, bodies, streams,
    /// pollables) one instance may hold in its host-side table at once.
    pub max_host_resources: usize,
    /// Guest run time one callback may use.
    pub cpu_limit: Duration,
    /// Most open connections to this addon.
    pub max_connections: u32,
    /// Largest client message, in bytes.
    pub max_message_bytes: usize,
    /// Client message rate per connection; `None` means unlimited.
    pub message_rate: Option<MessageRate>,
    /// Time without a client message after which the host closes the connection.
    pub idle_timeout: Duration,
    /// Silence after which the host pings; an unanswered ping for as long again ends it.
    pub ping_interval: Duration,
    /// How long one `send` may wait for a client that does not read.
    pub send_timeout: Duration,
    /// How long a callback may run on after its client has gone; `None` keeps the
    /// server's `limits.orphan_callback_grace_ms`.
    pub orphan_callback_grace: Option<Duration>,
    /// `hibernate_after_ms` as the manifest sets it; the loader resolves it against the
    /// component's exports ([`AddonPolicy::hibernate_after`]).
    pub hibernate_after_ms: Option<u64>,
    /// Largest state `hibernate` may return.
    pub hibernate_max_state_bytes: usize,
    /// Allowed `Origin` values; empty means any.
    pub allowed_origins: Vec<String>,
    /// Whether the addon may use the kv store.
    pub kv: bool,
    /// How much the addon's kv namespace may hold (`kv_max_keys`, `kv_max_bytes`).
    pub kv_quota: crate::host::kv::Quota,
    /// Where the addon may send HTTP requests, and how long it may wait.
    pub outbound: Arc<OutboundPolicy>,
    /// The `[config]` table, resolved.
    pub config: Arc<AddonConfig>,
    /// The token verifier, when `[auth]` is set.
    pub auth: Option<Arc<JwtVerifier>>,
    /// What the addon may do with channels (`[channels]`), and their limits.
    pub channels: Arc<ChannelGrants>,
}

impl Default for AddonPolicy {
    fn default() -> Self {
        AddonPolicy {
            memory_limit: 32 << 20,
            max_host_resources: default_host_resources(32 << 20),
            cpu_limit: Duration::from_millis(1000),
            max_connections: 1000,
            max_message_bytes: 64 << 10,
            message_rate: Some(MessageRate { per_second: 20.0, burst: 40 }),
            idle_timeout: Duration::from_secs(600),
            ping_interval: Duration::from_secs(30),
            send_timeout: Duration::from_secs(10),
            orphan_callback_grace: None,
            hibernate_after_ms: None,
            hibernate_max_state_bytes: DEFAULT_HIBERNATE_STATE,
            allowed_origins: Vec::new(),
            kv: false,
            kv_quota: crate::host::kv::Quota::default(),
            outbound: Arc::default(),
            config: Arc::default(),
            auth: None,
            channels: Arc::default(),
        }
    }
}

/// How long a connection of an addon that exports `hibernation` idles before it is
/// hibernated, unless its manifest says otherwise: long enough that a chat between
/// turns stays live, short enough that a page left open does not hold an instance.
const DEFAULT_HIBERNATE_AFTER_MS: u64 = 30_000;
/// Largest `orphan_callback_grace_ms`: an hour, as the server-wide limit.
const MAX_ORPHAN_CALLBACK_GRACE_MS: u64 = 3_600_000;

/// Largest `hibernate_after_ms`: a day.
const MAX_HIBERNATE_AFTER_MS: u64 = 86_400_000;
/// `hibernate_max_state_bytes` by default, and its largest value: what a hibernated
/// connection keeps is meant to be far smaller than a live instance.
const DEFAULT_HIBERNATE_STATE: usize = 16 << 10;
const MAX_HIBERNATE_STATE: u64 = 1 << 20;

/// Largest memory limit a manifest may set (the pool reserves 4 GiB per slot).
const MAX_MEMORY_LIMIT: u64 = 4 << 30;
/// Fewest host resources a manifest may allow: a Rust instance holds a few for its
/// standard streams, and an outbound request about a dozen.
const MIN_HOST_RESOURCES: usize = 16;
/// Most host resources the default allows, whatever the memory limit.
const DEFAULT_MAX_HOST_RESOURCES: usize = 4096;

/// How many host resources an instance with `memory_limit` may hold at most: their worst
/// case ([`crate::host::HOST_BYTES_PER_RESOURCE`] each) fits in `memory_limit`, or in
/// 2 MiB for smaller limits (64 resources).
fn max_host_resources_for(memory_limit: usize) -> usize {
    memory_limit.max(2 << 20) / crate::host::HOST_BYTES_PER_RESOURCE
}

/// `max_host_resources` when the manifest does not set it.
fn default_host_resources(memory_limit: usize) -> usize {
    max_host_resources_for(memory_limit).min(DEFAULT_MAX_HOST_RESOURCES)
}

/// Largest message limit a manifest may set.
const MAX_MESSAGE_LIMIT: u64 = 16 << 20;

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid manifest {file}: {problem}")]
pub struct ManifestError {
    pub file: String,
    pub problem: String,
}

impl AddonPolicy {
    /// Reads `<name>.toml` beside `wasm`, or returns the defaults when there is none.
    pub fn for_addon(wasm: &Path) -> Result<AddonPolicy, ManifestError> {
        let manifest = wasm.with_extension("toml");
        match std::fs::read_to_string(&manifest) {
            Ok(text) => AddonPolicy::parse(&text)
                .map_err(|problem| ManifestError { file: manifest.display().to_string(), problem }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(AddonPolicy::default()),
            Err(err) => Err(ManifestError {
                file: manifest.display().to_string(),
                problem: format!("cannot read it: {err}"),
            }),
        }
    }

    /// Parses a manifest's text, reading `{ env = ... }` references from the process's
    /// environment; the error names the key and the problem.
    pub fn parse(text: &str) -> Result<AddonPolicy, String> {
        AddonPolicy::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// [`AddonPolicy::parse`] with a given environment.
    pub fn parse_with_env(text: &str, env: EnvLookup<'_>) -> Result<AddonPolicy, String> {
        // Never the error's Display: it quotes the line, and a manifest's lines hold secrets.
        let file: ManifestFile =
            toml::from_str(text).map_err(|err| crate::toml_error::describe(&err, text))?;
        let mut policy = AddonPolicy::default();
        let bad = |key: &str, problem: String| format!("key `{key}`: {problem}");

        if let Some(ByteSize(bytes)) = file.memory_limit {
            if !((1 << 20)..=MAX_MEMORY_LIMIT).contains(&bytes) {
                return Err(bad("memory_limit", format!("{bytes} bytes is outside 1MiB..=4GiB")));
            }
            policy.memory_limit = bytes as usize;
        }
        let most = max_host_resources_for(policy.memory_limit);
        policy.max_host_resources = match file.max_host_resources {
            Some(n) if !(MIN_HOST_RESOURCES..=most).contains(&(n as usize)) => {
                return Err(bad(
                    "max_host_resources",
                    format!(
                        "{n} is outside {MIN_HOST_RESOURCES}..={most}: each host resource may hold up to {} \
                         outside linear memory, and together they may hold at most memory_limit \
                         ({}, or 2MiB if it is smaller); raise memory_limit for more",
                        format_size(crate::host::HOST_BYTES_PER_RESOURCE as u64),
                        format_size(policy.memory_limit as u64),
                    ),
                ));
            }
            Some(n) => n as usize,
            None => default_host_resources(policy.memory_limit),
        };
        if let Some(ms) = file.cpu_limit_ms {
            if !(10..=3_600_000).contains(&ms) {
                return Err(bad("cpu_limit_ms", format!("{ms} is outside 10..=3600000")));
            }
            policy.cpu_limit = Duration::from_millis(ms);
        }
        if let Some(max) = file.max_connections {
            if max == 0 {
                return Err(bad("max_connections", "must be at least 1".into()));
            }
            policy.max_connections = max;
        }
        if let Some(ByteSize(bytes)) = file.max_message_bytes {
            if !(1..=MAX_MESSAGE_LIMIT).contains(&bytes) {
                return Err(bad("max_message_bytes", format!("{bytes} bytes is outside 1..=16MiB")));
            }
            policy.max_message_bytes = bytes as usize;
        }
        let burst = match file.message_burst {
            Some(0) => return Err(bad("message_burst", "must be at least 1".into())),
            Some(burst) => Some(burst),
            None => None,
        };
        match file.messages_per_second {
            Some(rate) if !rate.is_finite() || rate < 0.0 => {
                return Err(bad("messages_per_second", format!("{rate} is not a rate (use 0 for no limit)")));
            }
            Some(0.0) => policy.message_rate = None,
            Some(rate) => {
                let burst = burst.unwrap_or((rate * 2.0).ceil().max(1.0) as u32);
                policy.message_rate = Some(MessageRate { per_second: rate, burst });
            }
            None => {
                if let (Some(burst), Some(rate)) = (burst, policy.message_rate.as_mut()) {
                    rate.burst = burst;
                }
            }
        }
        for (key, value, target) in [
            ("idle_timeout_s", file.idle_timeout_s, &mut policy.idle_timeout),
            ("ping_interval_s", file.ping_interval_s, &mut policy.ping_interval),
            ("send_timeout_s", file.send_timeout_s, &mut policy.send_timeout),
        ] {
            if let Some(seconds) = value {
                if !(1..=86_400).contains(&seconds) {
                    return Err(bad(key, format!("{seconds} is outside 1..=86400")));
                }
                *target = Duration::from_secs(seconds);
            }
        }
        if let Some(ms) = file.orphan_callback_grace_ms {
            if ms > MAX_ORPHAN_CALLBACK_GRACE_MS {
                return Err(bad(
                    "orphan_callback_grace_ms",
                    format!("{ms} is outside 0..={MAX_ORPHAN_CALLBACK_GRACE_MS}"),
                ));
            }
            policy.orphan_callback_grace = Some(Duration::from_millis(ms));
        }
        if let Some(ms) = file.hibernate_after_ms {
            if ms > MAX_HIBERNATE_AFTER_MS {
                return Err(bad(
                    "hibernate_after_ms",
                    format!("{ms} is outside 0..={MAX_HIBERNATE_AFTER_MS} (0 = never)"),
                ));
            }
            policy.hibernate_after_ms = Some(ms);
        }
        if let Some(size) = file.hibernate_max_state_bytes {
            if size.0 > MAX_HIBERNATE_STATE {
                return Err(bad("hibernate_max_state_bytes", "is over 1MiB".to_owned()));
            }
            policy.hibernate_max_state_bytes = size.0 as usize;
        }
        if let Some(origins) = file.allowed_origins {
            for origin in &origins {
                let valid = (origin.starts_with("https://") || origin.starts_with("http://"))
                    && !origin.split_once("://").map(|(_, host)| host).unwrap_or("").contains(['/', ' '])
                    && !origin.ends_with("://");
                if !valid {
                    return Err(bad(
                        "allowed_origins",
                        format!("{origin:?} is not an origin like \"https://shop.example.com\""),
                    ));
                }
            }
            policy.allowed_origins = origins;
        }
        policy.kv = file.kv.unwrap_or(false);
        if let Some(keys) = file.kv_max_keys {
            if !(1..=100_000_000).contains(&keys) {
                return Err(bad("kv_max_keys", format!("{keys} is outside 1..=100000000")));
            }
            policy.kv_quota.max_keys = keys;
        }
        if let Some(ByteSize(bytes)) = file.kv_max_bytes {
            if !((1 << 10)..=(1 << 40)).contains(&bytes) {
                return Err(bad("kv_max_bytes", format!("{bytes} bytes is outside 1KiB..=1TiB")));
            }
            policy.kv_quota.max_bytes = bytes;
        }
        policy.outbound = Arc::new(
            OutboundPolicy::from_manifest(
                file.outbound_hosts,
                file.outbound_connect_timeout_ms,
                file.outbound_first_byte_timeout_ms,
                file.outbound_between_bytes_timeout_ms,
            )?
            .with_max_requests(file.outbound_max_requests)?,
        );
        policy.config = Arc::new(AddonConfig::from_manifest(file.config.unwrap_or_default(), env)?);
        if let Some(section) = file.auth {
            policy.auth = Some(Arc::new(JwtVerifier::from_manifest(section, env)?));
        }
        if let Some(section) = file.channels {
            policy.channels = Arc::new(ChannelGrants::from_manifest(section)?);
        }
        Ok(policy)
    }

    /// The capabilities this policy grants beyond the session and log, one line each,
    /// for operators (the load log line and `sockhost check`). Secrets are never shown.
    pub fn grants(&self) -> Vec<String> {
        let mut grants = self.capabilities();
        grants.extend(self.config.describe().into_iter().map(|line| format!("config {line}")));
        grants
    }

    /// [`AddonPolicy::grants`] without the `[config]` values: kv, outbound HTTP, auth.
    pub fn capabilities(&self) -> Vec<String> {
        let mut grants = Vec::new();
        if self.kv {
            grants.push("kv".to_owned());
        }
        if self.outbound.is_granted() {
            grants.push(format!("outbound HTTP to {}", self.outbound.hosts().join(", ")));
        }
        if let Some(auth) = &self.auth {
            grants.push(format!("auth: {}", auth.describe()));
        }
        if self.channels.is_granted() {
            grants.push(self.channels.describe());
        }
        grants
    }

    /// Whether a browser request from `origin` may connect. Requests without an
    /// `Origin` header (native and mini-program clients) are not browser cross-site
    /// requests and are allowed.
    pub fn allows_origin(&self, origin: Option<&str>) -> bool {
        match origin {
            Some(origin) if !self.allowed_origins.is_empty() => {
                self.allowed_origins.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin))
            }
            _ => true,
        }
    }
}

impl AddonPolicy {
    /// How long a connection idles before it is hibernated, for a component that
    /// exports `hibernation` (`None`: never). Without the export, never.
    pub fn hibernate_after(&self, exports_hibernation: bool) -> Option<Duration> {
        match (exports_hibernation, self.hibernate_after_ms) {
            (false, _) | (true, Some(0)) => None,
            (true, ms) => Some(Duration::from_millis(ms.unwrap_or(DEFAULT_HIBERNATE_AFTER_MS))),
        }
    }

    /// The policy as `(manifest key, value)` pairs, for `sockhost check` and operators:
    /// every limit and every grant, defaults included. A new manifest key adds its line
    /// here.
    pub fn describe(&self) -> Vec<(&'static str, String)> {
        let rate = match self.message_rate {
            Some(rate) => (rate.per_second.to_string(), rate.burst.to_string()),
            None => ("0 (no limit)".to_owned(), "-".to_owned()),
        };
        let origins = if self.allowed_origins.is_empty() {
            "any (no Origin check)".to_owned()
        } else {
            self.allowed_origins.join(", ")
        };
        vec![
            ("memory_limit", format_size(self.memory_limit as u64)),
            ("max_host_resources", self.max_host_resources.to_string()),
            ("cpu_limit_ms", self.cpu_limit.as_millis().to_string()),
            ("max_connections", self.max_connections.to_string()),
            ("max_message_bytes", format_size(self.max_message_bytes as u64)),
            ("messages_per_second", rate.0),
            ("message_burst", rate.1),
            ("idle_timeout_s", self.idle_timeout.as_secs().to_string()),
            ("ping_interval_s", self.ping_interval.as_secs().to_string()),
            ("send_timeout_s", self.send_timeout.as_secs().to_string()),
            (
                "hibernate_after_ms",
                match self.hibernate_after_ms {
                    Some(0) => "0 (never)".to_owned(),
                    Some(ms) => ms.to_string(),
                    None => format!("{DEFAULT_HIBERNATE_AFTER_MS} if the addon exports hibernation"),
                },
            ),
            ("hibernate_max_state_bytes", format_size(self.hibernate_max_state_bytes as u64)),
            ("allowed_origins", origins),
            ("kv_max_keys", self.kv_quota.max_keys.to_string()),
            ("kv_max_bytes", format_size(self.kv_quota.max_bytes)),
            ("channels.max_message_bytes", format_size(self.channels.limits.max_message_bytes as u64)),
            ("channels.max_subscriptions", self.channels.limits.max_subscriptions.to_string()),
            ("channels.inbox", self.channels.limits.inbox.to_string()),
        ]
    }
}

/// `33554432` → `"32MiB"`; sizes that are not whole KiB/MiB/GiB stay in bytes.
pub(crate) fn format_size(bytes: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_manifest_means_the_documented_defaults() {
        let policy = AddonPolicy::parse("").unwrap();
        assert_eq!(policy, AddonPolicy::default());
        assert_eq!(policy.memory_limit, 32 << 20);
        assert_eq!(policy.max_message_bytes, 64 << 10);
    }

    #[test]
    fn every_key_parses() {
        let policy = AddonPolicy::parse(
            r#"
            memory_limit = "16MiB"
            cpu_limit_ms = 250
            max_connections = 5
            max_message_bytes = 1024
            messages_per_second = 2.5
            message_burst = 3
            idle_timeout_s = 60
            ping_interval_s = 5
            send_timeout_s = 2
            orphan_callback_grace_ms = 120000
            allowed_origins = ["https://shop.example.com"]
            "#,
        )
        .unwrap();
        assert_eq!(policy.memory_limit, 16 << 20);
        assert_eq!(policy.cpu_limit, Duration::from_millis(250));
        assert_eq!(policy.max_connections, 5);
        assert_eq!(policy.max_message_bytes, 1024);
        assert_eq!(policy.message_rate, Some(MessageRate { per_second: 2.5, burst: 3 }));
        assert_eq!(policy.idle_timeout, Duration::from_secs(60));
        assert_eq!(policy.ping_interval, Duration::from_secs(5));
        assert_eq!(policy.send_timeout, Duration::from_secs(2));
        assert_eq!(policy.orphan_callback_grace, Some(Duration::from_secs(120)));
        assert!(policy.allows_origin(Some("https://shop.example.com")));
        assert!(!policy.allows_origin(Some("https://evil.example")));
        assert!(policy.allows_origin(None));
    }

    #[test]
    fn grants_are_off_by_default_and_parse_when_given() {
        let none = AddonPolicy::parse("").unwrap();
        assert!(!none.kv && !none.outbound.is_granted() && none.auth.is_none());
        assert!(none.grants().is_empty());
        let env = |name: &str| (name == "JWT").then(|| "s".repeat(32));
        let policy = AddonPolicy::parse_with_env(
            r#"
            kv = true
            outbound_hosts = ["https://api.example.com"]
            outbound_first_byte_timeout_ms = 1500
            [config]
            model = "m"
            [auth]
            jwt_hs256_secret = { env = "JWT" }
            "#,
            &env,
        )
        .unwrap();
        assert!(policy.kv);
        assert!(policy.outbound.allows(&"https://api.example.com/v1".parse().unwrap()));
        assert_eq!(policy.outbound.first_byte_timeout, Duration::from_millis(1500));
        assert_eq!(policy.config.get("model"), Some("m"));
        assert!(policy.auth.is_some());
        let grants = policy.grants().join("\n");
        assert!(
            grants.contains("kv") && grants.contains("api.example.com") && grants.contains("$JWT"),
            "{grants}"
        );
        assert!(!grants.contains(&"s".repeat(32)), "the secret is never shown");
    }

    #[test]
    fn describe_names_every_key_in_manifest_units() {
        let lines = AddonPolicy::default().describe();
        let get = |key| lines.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str()).unwrap();
        assert_eq!(get("memory_limit"), "32MiB");
        assert_eq!(get("max_message_bytes"), "64KiB");
        assert_eq!(get("messages_per_second"), "20");
        // Every key describe() prints parses back as a manifest key.
        for (key, _) in &lines {
            let err = AddonPolicy::parse(&format!("{key} = true")).unwrap_err();
            assert!(!err.contains("unknown field"), "{key}: {err}");
        }
    }

    #[test]
    fn host_resources_default_with_the_memory_limit_and_stay_within_it() {
        assert_eq!(AddonPolicy::default().max_host_resources, 1024);
        let policy = |text: &str| AddonPolicy::parse(text).map(|p| p.max_host_resources);
        assert_eq!(policy("memory_limit = \"64MiB\""), Ok(2048));
        assert_eq!(policy("memory_limit = \"1MiB\""), Ok(64), "2 MiB of host resources at least");
        assert_eq!(policy("memory_limit = \"4GiB\""), Ok(4096));
        assert_eq!(policy("max_host_resources = 16"), Ok(16));
        assert_eq!(policy("memory_limit = \"64MiB\"\nmax_host_resources = 2048"), Ok(2048));
        for text in [
            "max_host_resources = 15",
            "max_host_resources = 1025",
            "memory_limit = \"4MiB\"\nmax_host_resources = 200",
        ] {
            let err = policy(text).unwrap_err();
            assert!(err.contains("max_host_resources") && err.contains("memory_limit"), "{text}: {err}");
        }
        for memory_limit in [1usize << 20, 3 << 20, 32 << 20, 4 << 30] {
            let most = max_host_resources_for(memory_limit);
            assert!(most * crate::host::HOST_BYTES_PER_RESOURCE <= memory_limit.max(2 << 20));
        }
    }

    #[test]
    fn zero_rate_means_unlimited() {
        assert_eq!(AddonPolicy::parse("messages_per_second = 0").unwrap().message_rate, None);
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("memory_limt = 5", "memory_limt"),
            ("memory_limit = \"12 parsecs\"", "memory_limit"),
            ("memory_limit = 10", "memory_limit"),
            ("cpu_limit_ms = 0", "cpu_limit_ms"),
            ("cpu_limit_ms = \"fast\"", "cpu_limit_ms"),
            ("max_connections = 0", "max_connections"),
            ("max_connections = -1", "max_connections"),
            ("max_message_bytes = \"1GiB\"", "max_message_bytes"),
            ("messages_per_second = -3", "messages_per_second"),
            ("message_burst = 0", "message_burst"),
            ("idle_timeout_s = 0", "idle_timeout_s"),
            ("ping_interval_s = 100000", "ping_interval_s"),
            ("send_timeout_s = 0", "send_timeout_s"),
            ("orphan_callback_grace_ms = 3600001", "orphan_callback_grace_ms"),
            ("orphan_callback_grace_ms = -1", "orphan_callback_grace_ms"),
            ("allowed_origins = [\"shop.example.com\"]", "allowed_origins"),
            ("allowed_origins = \"https://a.example\"", "allowed_origins"),
            ("kv = \"yes\"", "kv"),
            ("outbound_hosts = [\"api.example.com\"]", "outbound_hosts"),
            ("outbound_between_bytes_timeout_ms = 0", "outbound_between_bytes_timeout_ms"),
            ("outbound_max_requests = 0", "outbound_max_requests"),
            ("[config]\nk = { env = 3 }", "config.k"),
            ("[auth]\njwt_hs256_secret = \"inline\"", "auth.jwt_hs256_secret"),
            ("[auth]\nsecret = 1", "secret"),
        ];
        for (text, key) in cases {
            let err = AddonPolicy::parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
