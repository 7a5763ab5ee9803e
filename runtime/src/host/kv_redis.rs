//! The Redis kv backend: with `[cluster] redis_url` set, every node of a cluster sees the
//! same kv data, through the same [`KvBackend`] trait and with the same semantics as the
//! redb file.
//!
//! Commands go over the process's one [`RedisLink`]: the `redis` crate's
//! `ConnectionManager` speaks the protocol and reconnects; this module only chooses the
//! commands. Every command is bounded by [`RedisLink::run`].
//!
//! ## Layout
//!
//! | Redis key | type | holds |
//! |---|---|---|
//! | `sockhost:kv:<namespace>:<key>` | string | the value; a TTL is Redis's own (`SET … PX`) |
//! | `sockhost:kv-index:<namespace>` | sorted set | every key of the namespace, score 0 |
//! | `sockhost:kv-namespaces` | set | the namespaces that have an index, for the purge |
//! | `sockhost:kv-sizes:<namespace>` | hash | each key's size (key + value bytes), for the quota |
//! | `sockhost:kv-usage:<namespace>` | hash | `keys` and `bytes` the namespace holds, against its quota |
//!
//! A namespace is an addon's name, which never contains `:`, so `a:b` + `c` cannot be
//! mistaken for `a` + `b:c`, and no value key can be an index key (`kv:` vs `kv-`).
//!
//! ## Why an index
//!
//! `list-keys` promises keys in byte order, after a cursor, a page at a time. `SCAN` is
//! unordered and walks the whole database (every addon's keys and anything else in it),
//! so paging with it would mean reading everything on every call. A sorted set whose
//! members all score 0 is ordered by bytes, and `ZRANGEBYLEX` answers a prefix and a
//! cursor directly (`[prefix` or `(start_after`, up to the prefix's successor).
//!
//! The index lists keys; the value keys say which are live. Redis expires a value by
//! itself, but not its index member, so a listing checks each member's value and skips
//! (and removes) the ones that are gone; [`KvBackend::purge_expired`] removes the rest,
//! in batches of [`PURGE_BATCH`], so no single command holds Redis for long.
//!
//! ## What is atomic
//!
//! - `set` and `compare-and-swap` are one Lua script ([`WRITE`]): the comparison, the quota
//!   check, `SET`, `ZADD`, `SADD` and the usage counters; `delete` is another ([`DELETE`]).
//!   Another node never sees a value without its index member, nor the reverse, except
//!   for members whose value expired, which readers treat as absent.
//! - Removing a stale member is a Lua script that checks the value and removes the
//!   member in one step. Checking first and removing after, in two commands, could remove
//!   the member of a key another node has just set again, and that key would vanish from
//!   listings while its value lives.
//!
//! The script is sent with `EVAL` (Redis caches it by its hash): the `redis` crate's
//! `Script`, which would send `EVALSHA`, needs a feature this crate does not enable, and
//! the script is a few hundred bytes.
//!
//! ## Redis down
//!
//! Each call fails within [`crate::cluster::COMMAND_TIMEOUT`] with a `backend` error that
//! names Redis and the cause (aikefu answers `storage_error`); nothing waits for Redis to
//! return. Meanwhile the connection manager reconnects with backoff, and the first call
//! after Redis is back works again, on the same backend, with no restart. Redis's own
//! durability (RDB, AOF) is its operator's choice: what a `set` that returned `ok`
//! survives is what that Redis is configured to survive.

use std::sync::Arc;
use std::time::Duration;

use super::kv::{BackendError, KvBackend, KvFuture, Quota, QuotaFull};
use crate::cluster::{RedisLink, RedisUnavailable};

/// How many index members one purge step checks: small, so the script that checks and
/// removes them holds Redis for microseconds, not for the length of a whole index.
pub const PURGE_BATCH: usize = 100;
/// The most index members one listing step fetches and checks.
const LIST_BATCH: usize = 1000;
/// The longest TTL sent to Redis (about a century). Redis refuses an expiry past its
/// clock's range, where redb saturates; a century is "never" for every practical purpose,
/// so a larger TTL is sent as this one rather than failing.
const MAX_TTL_MS: u128 = 100 * 365 * 24 * 3600 * 1000;

/// The set of namespaces with an index: what the purge walks. Never pruned; it holds a
/// few addon names.
const NAMESPACES: &str = "sockhost:kv-namespaces";

/// Set or compare-and-swap, with the namespace's quota, in one step: nothing can come
/// between the comparison, the quota check and the write.
/// KEYS = value, index, namespaces, sizes, usage. ARGV = mode (`set` or `cas`),
/// has-expected (0/1), expected, new value, TTL in ms (0 = none), key, namespace,
/// max keys, max bytes. Answers 1 when it stored, 0 when `cas` found another value, -1
/// or -2 when the write would pass the key or byte quota (nothing written). An expired
/// value is already absent to GET, as the redb backend treats it; its size stays counted
/// until the purge removes its index member, as in redb.
const WRITE: &str = r#"
if ARGV[1] == 'cas' then
  local current = redis.call('GET', KEYS[1])
  local matches
  if ARGV[2] == '1' then matches = (current == ARGV[3]) else matches = (current == false) end
  if not matches then return 0 end
end
local size = string.len(ARGV[6]) + string.len(ARGV[4])
local old = redis.call('HGET', KEYS[4], ARGV[6])
local keys = tonumber(redis.call('HGET', KEYS[5], 'keys') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[5], 'bytes') or '0')
local added = 1
local old_size = 0
if old then added = 0; old_size = tonumber(old) end
if added == 1 and keys >= tonumber(ARGV[8]) then return -1 end
if size > old_size and bytes - old_size + size > tonumber(ARGV[9]) then return -2 end
if ARGV[5] == '0' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
end
redis.call('ZADD', KEYS[2], 0, ARGV[6])
redis.call('SADD', KEYS[3], ARGV[7])
redis.call('HSET', KEYS[4], ARGV[6], size)
redis.call('HINCRBY', KEYS[5], 'keys', added)
redis.call('HINCRBY', KEYS[5], 'bytes', size - old_size)
return 1
"#;

/// Delete, giving the entry's size back to the namespace's usage; with has-expected, only
/// when the live value is the expected one (compare-and-delete).
/// KEYS = value, index, sizes, usage. ARGV = key, has-expected (0/1), expected. Answers 1
/// when a live value was removed.
const DELETE: &str = r#"
if ARGV[2] == '1' and redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end
local removed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local size = redis.call('HGET', KEYS[3], ARGV[1])
if size then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'keys', -1)
  redis.call('HINCRBY', KEYS[4], 'bytes', -tonumber(size))
end
return removed
"#;

/// Per member of `ARGV` (whose value key is `KEYS[i + 3]`): `1` when the value is live,
/// `0` when it is gone and this call removed the member from the index `KEYS[1]` (and
/// gave its size back: sizes `KEYS[2]`, usage `KEYS[3]`), `-1` when it is gone and the
/// member was already removed (another node got there first).
const CHECK_AND_PRUNE: &str = r"
local answers = {}
for i, member in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 3]) == 1 then
    answers[i] = 1
  else
    answers[i] = redis.call('ZREM', KEYS[1], member) - 1
    if answers[i] == 0 then
      local size = redis.call('HGET', KEYS[2], member)
      if size then
        redis.call('HDEL', KEYS[2], member)
        redis.call('HINCRBY', KEYS[3], 'keys', -1)
        redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(size))
      end
    end
  end
end
return answers
";

/// The kv backend on Redis: see the module documentation.
pub struct RedisKvBackend {
    link: Arc<RedisLink>,
}

impl RedisKvBackend {
    /// A backend on the process's Redis link. Nothing connects until the first call.
    pub fn new(link: Arc<RedisLink>) -> RedisKvBackend {
        RedisKvBackend { link }
    }

    /// Runs the [`WRITE`] script: a set (`expected` is `None`) or a compare-and-swap.
    async fn write(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<Option<Vec<u8>>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
        quota: Quota,
    ) -> Result<Result<bool, QuotaFull>, BackendError> {
        let mode = if expected.is_some() { "cas" } else { "set" };
        let expected = expected.flatten();
        let mut script = redis::cmd("EVAL");
        script.arg(WRITE).arg(5).arg(value_key(namespace, key)).arg(index_key(namespace)).arg(NAMESPACES);
        script.arg(sizes_key(namespace)).arg(usage_key(namespace));
        script.arg(mode).arg(u8::from(expected.is_some())).arg(expected.unwrap_or_default()).arg(value);
        script.arg(ttl.map_or(0, |ttl| ttl.as_millis().clamp(1, MAX_TTL_MS) as u64));
        script.arg(key).arg(namespace).arg(quota.max_keys).arg(quota.max_bytes);
        Ok(match self.query::<i64>(&script).await? {
            -1 => Err(QuotaFull::Keys),
            -2 => Err(QuotaFull::Bytes),
            answer => Ok(answer == 1),
        })
    }

    /// Runs the [`DELETE`] script: a delete, or with `expected` a compare-and-delete.
    async fn remove(
        &self,
        namespace: &str,
        key: &str,
        expected: Option<Vec<u8>>,
    ) -> Result<bool, BackendError> {
        // DEL counts only a live value: Redis expires a stale one first.
        let mut script = redis::cmd("EVAL");
        script.arg(DELETE).arg(4).arg(value_key(namespace, key)).arg(index_key(namespace));
        script.arg(sizes_key(namespace)).arg(usage_key(namespace)).arg(key);
        script.arg(u8::from(expected.is_some())).arg(expected.unwrap_or_default());
        let removed: i64 = self.query(&script).await?;
        Ok(removed == 1)
    }

    /// Runs `command` on the shared connection, bounded by the link's timeout.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, BackendError> {
        let mut connection = self.link.connection();
        self.link.run(command.query_async(&mut connection)).await.map_err(backend_error)
    }

    /// Checks `members` of `namespace`'s index against their values and removes the stale
    /// ones; per member, the script's answer (see [`CHECK_AND_PRUNE`]).
    async fn check_and_prune(&self, namespace: &str, members: &[String]) -> Result<Vec<i64>, BackendError> {
        let mut script = redis::cmd("EVAL");
        script.arg(CHECK_AND_PRUNE).arg(members.len() + 3).arg(index_key(namespace));
        script.arg(sizes_key(namespace)).arg(usage_key(namespace));
        for member in members {
            script.arg(value_key(namespace, member));
        }
        script.arg(members);
        let answers: Vec<i64> = self.query(&script).await?;
        if answers.len() != members.len() {
            return Err(BackendError(format!(
                "kv store: redis answered {} of {} index checks",
                answers.len(),
                members.len()
            )));
        }
        Ok(answers)
    }

    /// Purges one namespace's index, a batch at a time; how many members it removed.
    async fn purge_namespace(&self, namespace: &str) -> Result<u64, BackendError> {
        let index = index_key(namespace);
        let mut min = "-".to_owned().into_bytes();
        let mut purged = 0;
        loop {
            let members: Vec<String> = self
                .query(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(PURGE_BATCH),
                )
                .await?;
            let Some(last) = members.last() else { return Ok(purged) };
            let answers = self.check_and_prune(namespace, &members).await?;
            purged += answers.iter().filter(|&&answer| answer == 0).count() as u64;
            if members.len() < PURGE_BATCH {
                return Ok(purged);
            }
            min = exclusive(last.as_bytes());
        }
    }
}

fn value_key(namespace: &str, key: &str) -> String {
    format!("sockhost:kv:{namespace}:{key}")
}

fn index_key(namespace: &str) -> String {
    format!("sockhost:kv-index:{namespace}")
}

/// key → its entry's size (key + value bytes), for the quota: kept until the key is
/// deleted or purged, since Redis drops an expired value without a word.
fn sizes_key(namespace: &str) -> String {
    format!("sockhost:kv-sizes:{namespace}")
}

/// `keys` and `bytes`: what the namespace holds, against its quota.
fn usage_key(namespace: &str) -> String {
    format!("sockhost:kv-usage:{namespace}")
}

fn backend_error(err: RedisUnavailable) -> BackendError {
    BackendError(format!("kv store: {err}"))
}

/// A `ZRANGEBYLEX` bound that includes `from`.
fn inclusive(from: &[u8]) -> Vec<u8> {
    [b"[", from].concat()
}

/// A `ZRANGEBYLEX` bound that excludes `from`.
fn exclusive(from: &[u8]) -> Vec<u8> {
    [b"(", from].concat()
}

/// The `ZRANGEBYLEX` upper bound of the keys that start with `prefix`: up to, not
/// including, the first byte string after all of them (`+`, the end, for an empty prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return exclusive(&end);
        }
    }
    b"+".to_vec()
}

impl KvBackend for RedisKvBackend {
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            // Redis never returns an expired value, and removes it itself.
            self.query(redis::cmd("GET").arg(value_key(namespace, key))).await
        })
    }

    fn set<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
        quota: Quota,
    ) -> KvFuture<'a, Result<(), QuotaFull>> {
        // SET without KEEPTTL clears an earlier TTL, as a redb set replaces the expiry.
        Box::pin(async move { Ok(self.write(namespace, key, None, value, ttl, quota).await?.map(drop)) })
    }

    fn compare_and_swap<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
        quota: Quota,
    ) -> KvFuture<'a, Result<bool, QuotaFull>> {
        Box::pin(async move { self.write(namespace, key, Some(expected), value, ttl, quota).await })
    }

    fn delete<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, bool> {
        Box::pin(async move { self.remove(namespace, key, None).await })
    }

    fn compare_and_delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        expected: Vec<u8>,
    ) -> KvFuture<'a, bool> {
        Box::pin(async move { self.remove(namespace, key, Some(expected)).await })
    }

    fn list_keys<'a>(
        &'a self,
        namespace: &'a str,
        prefix: &'a str,
        start_after: Option<&'a str>,
        limit: u32,
    ) -> KvFuture<'a, Vec<String>> {
        Box::pin(async move {
            let index = index_key(namespace);
            let mut min = match start_after {
                Some(after) if after >= prefix => exclusive(after.as_bytes()),
                _ => inclusive(prefix.as_bytes()),
            };
            let max = prefix_end(prefix.as_bytes());
            let limit = limit as usize;
            let mut keys = Vec::new();
            // The first step asks for exactly a page: with no expired keys in the way, that
            // is the whole listing. Each further step asks for twice as many, so a page
            // behind many expired keys takes a few steps, not one per key.
            let mut step = limit.min(LIST_BATCH);
            while keys.len() < limit {
                let members: Vec<String> = self
                    .query(
                        redis::cmd("ZRANGEBYLEX")
                            .arg(&index)
                            .arg(&min)
                            .arg(&max)
                            .arg("LIMIT")
                            .arg(0)
                            .arg(step),
                    )
                    .await?;
                let Some(last) = members.last() else { break };
                min = exclusive(last.as_bytes());
                let answers = self.check_and_prune(namespace, &members).await?;
                let fetched = members.len();
                let live = members.into_iter().zip(answers).filter(|(_, answer)| *answer == 1);
                keys.extend(live.map(|(key, _)| key).take(limit - keys.len()));
                if fetched < step {
                    break;
                }
                step = (step * 2).min(LIST_BATCH);
            }
            Ok(keys)
        })
    }

    fn purge_expired(&self) -> KvFuture<'_, u64> {
        Box::pin(async move {
            // Every namespace that was ever written; a few addon names.
            let namespaces: Vec<String> = self.query(redis::cmd("SMEMBERS").arg(NAMESPACES)).await?;
            let mut purged = 0;
            for namespace in namespaces {
                purged += self.purge_namespace(&namespace).await?;
            }
            Ok(purged)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::bindings::sockhost::addon::kv::KvError;
    use crate::host::kv::{KvAccess, KvStore, Unlimited};
    use crate::testing::RedisServer;

    fn backend(server: &RedisServer) -> (Arc<RedisLink>, RedisKvBackend) {
        let link = Arc::new(RedisLink::new(&server.url()).unwrap());
        (link.clone(), RedisKvBackend::new(link))
    }

    /// A plain connection, to look at what the backend left in Redis.
    fn inspect(server: &RedisServer) -> redis::Connection {
        redis::Client::open(server.url()).unwrap().get_connection().unwrap()
    }

    #[test]
    fn the_index_range_ends_after_the_prefix() {
        assert_eq!(prefix_end(b"h/"), b"(h0");
        assert_eq!(prefix_end(b""), b"+");
        assert_eq!(prefix_end(&[b'a', 0xFF]), b"(b");
        assert_eq!(prefix_end(&[0xFF, 0xFF]), b"+");
    }

    /// The layout the module documentation describes, which operators may rely on.
    #[tokio::test]
    async fn values_and_their_index_live_under_sockhost_kv() {
        let server = RedisServer::start();
        let (_, kv) = backend(&server);
        kv.put("chat", "history/1", b"v".to_vec(), Some(Duration::from_secs(60))).await.unwrap();
        kv.put("chat", "forever", b"w".to_vec(), None).await.unwrap();

        let mut redis = inspect(&server);
        let value: Vec<u8> = redis::cmd("GET").arg("sockhost:kv:chat:history/1").query(&mut redis).unwrap();
        assert_eq!(value, b"v");
        let ttl: i64 = redis::cmd("PTTL").arg("sockhost:kv:chat:history/1").query(&mut redis).unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
        let ttl: i64 = redis::cmd("PTTL").arg("sockhost:kv:chat:forever").query(&mut redis).unwrap();
        assert_eq!(ttl, -1, "no TTL");
        let index: Vec<String> =
            redis::cmd("ZRANGE").arg("sockhost:kv-index:chat").arg(0).arg(-1).query(&mut redis).unwrap();
        assert_eq!(index, ["forever", "history/1"]);
        let namespaces: Vec<String> = redis::cmd("SMEMBERS").arg(NAMESPACES).query(&mut redis).unwrap();
        assert_eq!(namespaces, ["chat"]);

        assert!(kv.delete("chat", "forever").await.unwrap());
        let index: Vec<String> =
            redis::cmd("ZRANGE").arg("sockhost:kv-index:chat").arg(0).arg(-1).query(&mut redis).unwrap();
        assert_eq!(index, ["history/1"], "a delete takes the index member with it");
    }

    /// Many expired keys: a listing still fills its page, the purge takes several batches,
    /// and both leave only live keys in the index.
    #[tokio::test]
    async fn stale_index_members_are_pruned_in_batches() {
        let server = RedisServer::start();
        let (_, kv) = backend(&server);
        let expired = 2 * PURGE_BATCH + 10;
        let keys: Vec<String> = (0..expired).map(|i| format!("old/{i:04}")).collect();
        let sets = keys.iter().map(|key| kv.put("ns", key, vec![1], Some(Duration::from_millis(50))));
        futures_util::future::try_join_all(sets).await.unwrap();
        for key in ["a", "new/1", "new/2", "z"] {
            kv.put("ns", key, vec![1], None).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;

        let mut redis = inspect(&server);
        let members = |redis: &mut redis::Connection| -> usize {
            redis::cmd("ZCARD").arg("sockhost:kv-index:ns").query(redis).unwrap()
        };
        assert_eq!(members(&mut redis), expired + 4, "Redis expired the values, not their members");

        // The listing walks past the expired keys to fill its page, removing what it passed.
        assert_eq!(kv.list_keys("ns", "", Some("a"), 3).await.unwrap(), ["new/1", "new/2", "z"]);
        assert_eq!(members(&mut redis), 4, "the listing pruned what it walked past");

        // Expired keys nobody lists are the purge's, a batch at a time.
        let sets = keys.iter().map(|key| kv.put("ns", key, vec![1], Some(Duration::from_millis(50))));
        futures_util::future::try_join_all(sets).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(members(&mut redis), expired + 4);
        assert_eq!(kv.purge_expired().await.unwrap(), expired as u64);
        assert_eq!(members(&mut redis), 4);
        assert_eq!(kv.list_keys("ns", "", None, 100).await.unwrap(), ["a", "new/1", "new/2", "z"]);
    }

    /// The check and the removal are one step: a member whose key was set again between a
    /// listing's range read and its check stays.
    #[tokio::test]
    async fn pruning_keeps_a_key_that_was_set_again() {
        let server = RedisServer::start();
        let (_, kv) = backend(&server);
        kv.put("ns", "k", vec![1], Some(Duration::from_millis(50))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        // What a listing on another node read before this node set "k" again.
        let read_before = vec!["k".to_owned()];
        kv.put("ns", "k", vec![2], None).await.unwrap();
        assert_eq!(kv.check_and_prune("ns", &read_before).await.unwrap(), [1]);
        assert_eq!(kv.list_keys("ns", "", None, 10).await.unwrap(), ["k"]);
        // Gone for real: removed once, then already removed.
        kv.put("ns", "k", vec![1], Some(Duration::from_millis(50))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(kv.check_and_prune("ns", &read_before).await.unwrap(), [0]);
        assert_eq!(kv.check_and_prune("ns", &read_before).await.unwrap(), [-1]);
    }

    /// Redis going away fails calls with a `backend` error that says so, within the
    /// command timeout; Redis coming back makes them work again, on the same backend.
    #[tokio::test]
    async fn redis_down_is_a_named_backend_error_and_back_is_back() {
        let mut server = RedisServer::start();
        let (link, kv) = backend(&server);
        let access = KvAccess {
            store: Some(Arc::new(KvStore::with_backend(Arc::new(kv)))),
            namespace: "ns".into(),
            quota: Quota::default(),
        };
        access.set("k", b"before".to_vec(), None).await.unwrap();
        assert!(link.is_up());

        server.kill();
        // Well past COMMAND_TIMEOUT: a call must fail, not wait for Redis.
        let bound = crate::cluster::COMMAND_TIMEOUT + Duration::from_secs(3);
        for attempt in 0..3 {
            let started = Instant::now();
            let failed = tokio::time::timeout(bound, access.get("k")).await.expect("a bounded failure");
            match failed {
                Err(KvError::Backend(text)) => {
                    assert!(
                        text.contains("redis at redis://127.0.0.1:") && text.contains("unavailable"),
                        "{text}"
                    );
                    assert!(text.contains(&server.port().to_string()), "{text}");
                }
                other => panic!("attempt {attempt}: expected a backend error, got {other:?}"),
            }
            assert!(started.elapsed() < bound);
        }
        assert!(!link.is_up(), "the link knows Redis is down");
        let err = access.set("k", b"x".to_vec(), None).await.expect_err("still down");
        assert!(matches!(err, KvError::Backend(_)), "{err:?}");

        server.start_again();
        // The connection manager reconnects with backoff; no new backend, no restart.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match access.set("k", b"after".to_vec(), None).await {
                Ok(()) => break,
                Err(err) if Instant::now() < deadline => {
                    tracing::debug!("not yet reconnected: {err:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("no reconnection to the restarted redis-server: {err:?}"),
            }
        }
        assert_eq!(access.get("k").await.unwrap(), Some(b"after".to_vec()));
        assert_eq!(access.list_keys("", None, 10).await.unwrap(), ["k"]);
        assert!(link.is_up());
    }
}
