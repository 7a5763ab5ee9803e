//! The link to Redis, when `[cluster] redis_url` is set: what lets several sockhost nodes
//! serve one addon as if they were one server.
//!
//! Two capabilities go through it: channels (Redis pub/sub, see [`crate::channels`]) and
//! kv (see [`crate::host::kv`]'s Redis backend). Both share this one [`RedisLink`]: a
//! `redis` crate `ConnectionManager`, which multiplexes every command of the process
//! over one connection and reconnects by itself, with backoff, after Redis goes away.
//! The pub/sub subscription needs a connection of its own, which the channels module
//! makes from [`RedisLink::client`].
//!
//! Without `redis_url` none of this exists and every capability stays in-process.
//!
//! Redis down never stops the node: a command fails within [`COMMAND_TIMEOUT`] with a
//! [`RedisUnavailable`] that names the cause, callers turn it into their own error
//! (`kv` answers `backend`, `publish` answers `unavailable`), and the link's state is
//! shown on `/readyz` and as `sockhost_cluster_up` in `/metrics`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long one Redis command may take before the caller gets [`RedisUnavailable`]. On
/// loopback or a LAN a command takes well under a millisecond; waiting longer only
/// stalls the addon that asked while Redis is down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest pause between reconnection attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Redis could not answer: it is down, unreachable or too slow. The text names the cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("redis at {url} is unavailable: {cause}")]
pub struct RedisUnavailable {
    pub url: String,
    pub cause: String,
}

/// The process's connection to Redis, shared by every capability that uses it.
pub struct RedisLink {
    client: redis::Client,
    manager: ConnectionManager,
    /// The URL without a password, for messages and logs.
    display_url: String,
    /// Whether the last command (or the pub/sub connection) reached Redis.
    up: AtomicBool,
}

impl RedisLink {
    /// Checks the URL and prepares the link. Nothing connects yet: a node starts, and
    /// serves what needs no Redis, while Redis is still down.
    pub fn new(url: &str) -> anyhow::Result<RedisLink> {
        let client = redis::Client::open(url)
            .map_err(|err| anyhow::anyhow!("invalid cluster.redis_url (--redis-url): {err}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_max_delay(MAX_RECONNECT_DELAY)
            .set_number_of_retries(2);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|err| anyhow::anyhow!("cannot prepare the redis connection: {err}"))?;
        let display_url = redact(url);
        Ok(RedisLink { client, manager, display_url, up: AtomicBool::new(false) })
    }

    /// The client, for connections of their own (pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.display_url
    }

    /// Whether Redis answered last time it was asked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Records what a connection other than the shared one (pub/sub) found.
    pub fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                tracing::info!(redis = %self.display_url, "redis reachable");
            } else {
                tracing::warn!(redis = %self.display_url, "redis unreachable; retrying with backoff");
            }
        }
    }

    /// A handle on the shared connection; cheap to clone, commands on it are multiplexed.
    pub fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// Runs one command (or pipeline, or script) made with [`RedisLink::connection`],
    /// bounded by [`COMMAND_TIMEOUT`], and keeps the link's up/down state current.
    pub async fn run<T>(
        &self,
        command: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisUnavailable> {
        match tokio::time::timeout(COMMAND_TIMEOUT, command).await {
            Ok(Ok(value)) => {
                self.set_up(true);
                Ok(value)
            }
            Ok(Err(err)) if is_reply_error(&err) => {
                // Redis answered, so it is up: the command itself was wrong.
                self.set_up(true);
                Err(self.unavailable(err.to_string()))
            }
            Ok(Err(err)) => {
                self.set_up(false);
                Err(self.unavailable(err.to_string()))
            }
            Err(_) => {
                self.set_up(false);
                Err(self.unavailable(format!("no answer within {} ms", COMMAND_TIMEOUT.as_millis())))
            }
        }
    }

    /// A [`RedisUnavailable`] for this link.
    pub fn unavailable(&self, cause: impl Into<String>) -> RedisUnavailable {
        RedisUnavailable { url: self.display_url.clone(), cause: cause.into() }
    }
}

/// Whether Redis itself answered with an error (the connection is fine).
fn is_reply_error(err: &redis::RedisError) -> bool {
    !(err.is_io_error() || err.is_timeout() || err.is_connection_dropped() || err.is_connection_refusal())
}

/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://***@{host}"),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_the_log() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://u:hunter2@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://:hunter2@h:1"), "redis://:***@h:1");
        assert_eq!(redact("redis://hunter2@h:1"), "redis://***@h:1");
    }

    #[test]
    fn a_bad_url_is_refused_naming_the_key() {
        let err = RedisLink::new("http://nope").err().expect("refused").to_string();
        assert!(err.contains("cluster.redis_url"), "{err}");
    }
}
