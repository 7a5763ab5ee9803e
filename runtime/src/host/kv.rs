//! `sockhost:addon/kv`: key-value storage shared by the connections of one addon.
//!
//! Addon globals die with their connection's instance, so anything that must outlive a
//! connection (aikefu's conversation history) lives here.
//!
//! - **Grant.** Deny by default: only an addon whose manifest says `kv = true` reaches the
//!   store; every call of any other addon fails with `denied`.
//! - **Namespaces.** Each addon has its own key space, named by the addon; the guest
//!   never sees or chooses the namespace, so two addons cannot read each other's keys.
//! - **Backend.** [`KvBackend`] is the seam: the default, [`RedbBackend`], keeps one
//!   crash-safe redb file, `<data_dir>/kv.redb`, which survives restarts. A shared
//!   backend (Redis) for several server nodes plugs in behind the same trait. The file
//!   opens on first use, so a server whose addons use no kv never touches the disk.
//! - **Limits** ([`MAX_KEY_BYTES`], [`MAX_VALUE_BYTES`], [`MAX_LIST`]): checked here,
//!   before the backend, with an `invalid` error that says which one.
//!
//! Expiry is stored with each value: reads treat an expired entry as absent and delete
//! it, and [`KvStore::purge_expired`] (run by the server every few minutes) reclaims the
//! rest.

use std::future::Future;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, TableDefinition};

use super::HostState;
use crate::bindings::sockhost::addon::kv::{Host, KvError};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most keys one `list-keys` call returns.
pub const MAX_LIST: u32 = 1000;

/// A failure inside a backend, reported to the guest as `backend(text)` and logged.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// A boxed future, so backends are object-safe and can be async (a network store) or
/// blocking work moved off the runtime (an embedded file).
pub type KvFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Where kv data lives. `namespace` is the addon's name; implementations keep
/// namespaces apart. Keys and values have already passed the limits above.
pub trait KvBackend: Send + Sync + 'static {
    /// The live value of `key`.
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>>;
    /// Stores `value`; with `ttl`, it expires that long from now.
    fn set<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> KvFuture<'a, ()>;
    /// Removes `key`; whether a live value was there.
    fn delete<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, bool>;
    /// Live keys starting with `prefix`, in byte order, after `start_after`, at most `limit`.
    fn list_keys<'a>(
        &'a self,
        namespace: &'a str,
        prefix: &'a str,
        start_after: Option<&'a str>,
        limit: u32,
    ) -> KvFuture<'a, Vec<String>>;
    /// Deletes expired entries; how many.
    fn purge_expired(&self) -> KvFuture<'_, u64>;
}

/// The server's kv store: a backend, opened on first use.
pub struct KvStore {
    path: PathBuf,
    backend: OnceLock<Result<Arc<dyn KvBackend>, BackendError>>,
}

impl KvStore {
    /// A store whose default backend is the redb file `<data_dir>/kv.redb`.
    pub fn new(data_dir: &Path) -> KvStore {
        KvStore { path: data_dir.join("kv.redb"), backend: OnceLock::new() }
    }

    /// A store over a given backend.
    pub fn with_backend(backend: Arc<dyn KvBackend>) -> KvStore {
        let store = KvStore { path: PathBuf::new(), backend: OnceLock::new() };
        let _ = store.backend.set(Ok(backend));
        store
    }

    /// The backend, opening the file the first time. A failure to open is kept: every
    /// later call reports the same cause rather than retrying a broken disk per message.
    pub fn backend(&self) -> Result<&Arc<dyn KvBackend>, BackendError> {
        self.backend
            .get_or_init(|| {
                let opened = RedbBackend::open(&self.path).map(|db| Arc::new(db) as Arc<dyn KvBackend>);
                match &opened {
                    Ok(_) => tracing::info!("kv store opened at {}", self.path.display()),
                    Err(err) => tracing::error!("kv store {} cannot be opened: {err}", self.path.display()),
                }
                opened
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Deletes expired entries, if the store was ever opened.
    pub async fn purge_expired(&self) {
        if let Some(Ok(backend)) = self.backend.get() {
            match backend.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!("kv: purged {n} expired entries"),
                Err(err) => tracing::warn!("kv: purging expired entries failed: {err}"),
            }
        }
    }
}

/// One table; keys are `namespace \0 key`, values `expiry-ms (u64 LE, 0 = never) ++ bytes`.
const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// The embedded backend: a redb file. Every call runs on tokio's blocking pool, since
/// a write commits (fsyncs) before it returns.
pub struct RedbBackend {
    db: Arc<redb::Database>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn full_key(namespace: &str, key: &str) -> Vec<u8> {
    let mut full = Vec::with_capacity(namespace.len() + 1 + key.len());
    full.extend_from_slice(namespace.as_bytes());
    full.push(0);
    full.extend_from_slice(key.as_bytes());
    full
}

/// The stored bytes' payload, unless expired at `now`.
fn live(stored: &[u8], now: u64) -> Option<&[u8]> {
    let (expiry, value) = stored.split_at_checked(8)?;
    let expiry = u64::from_le_bytes(expiry.try_into().ok()?);
    (expiry == 0 || expiry > now).then_some(value)
}

fn backend_error(err: impl Into<redb::Error>) -> BackendError {
    BackendError(format!("kv store: {}", err.into()))
}

impl RedbBackend {
    /// Opens (or creates) the file, creating its directory.
    pub fn open(path: &Path) -> Result<RedbBackend, BackendError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|err| {
                BackendError(format!("cannot create data directory {}: {err}", dir.display()))
            })?;
        }
        let db = redb::Database::create(path).map_err(backend_error)?;
        // Create the table up front, so readers never meet a missing table.
        let txn = db.begin_write().map_err(backend_error)?;
        txn.open_table(TABLE).map_err(backend_error)?;
        txn.commit().map_err(backend_error)?;
        Ok(RedbBackend { db: Arc::new(db) })
    }

    fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&redb::Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> KvFuture<'static, T> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&db))
                .await
                .map_err(|err| BackendError(format!("kv store task failed: {err}")))?
                .map_err(backend_error)
        })
    }
}

impl KvBackend for RedbBackend {
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>> {
        let full = full_key(namespace, key);
        self.blocking(move |db| {
            let now = now_ms();
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            let found = table.get(full.as_slice())?.map(|guard| live(guard.value(), now).map(<[u8]>::to_vec));
            Ok(match found {
                Some(Some(value)) => Some(value),
                // Expired (or unreadable): absent. Deleting it is left to the purge, so a
                // read never has to wait for a write transaction.
                _ => None,
            })
        })
    }

    fn set<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> KvFuture<'a, ()> {
        let full = full_key(namespace, key);
        self.blocking(move |db| {
            let expiry = ttl.map_or(0, |ttl| now_ms().saturating_add(ttl.as_millis() as u64).max(1));
            let mut stored = Vec::with_capacity(8 + value.len());
            stored.extend_from_slice(&expiry.to_le_bytes());
            stored.extend_from_slice(&value);
            let txn = db.begin_write()?;
            txn.open_table(TABLE)?.insert(full.as_slice(), stored.as_slice())?;
            txn.commit()?;
            Ok(())
        })
    }

    fn delete<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, bool> {
        let full = full_key(namespace, key);
        self.blocking(move |db| {
            let now = now_ms();
            let txn = db.begin_write()?;
            let was_live = txn
                .open_table(TABLE)?
                .remove(full.as_slice())?
                .is_some_and(|old| live(old.value(), now).is_some());
            txn.commit()?;
            Ok(was_live)
        })
    }

    fn list_keys<'a>(
        &'a self,
        namespace: &'a str,
        prefix: &'a str,
        start_after: Option<&'a str>,
        limit: u32,
    ) -> KvFuture<'a, Vec<String>> {
        let scan = full_key(namespace, prefix);
        let ns_len = namespace.len() + 1;
        let after = start_after.map(|after| full_key(namespace, after));
        self.blocking(move |db| {
            let now = now_ms();
            let txn = db.begin_read()?;
            let table = txn.open_table(TABLE)?;
            let start = match &after {
                Some(after) if after.as_slice() >= scan.as_slice() => Bound::Excluded(after.as_slice()),
                _ => Bound::Included(scan.as_slice()),
            };
            let mut keys = Vec::new();
            for entry in table.range::<&[u8]>((start, Bound::Unbounded))? {
                let (key, value) = entry?;
                let key = key.value();
                if !key.starts_with(&scan) || keys.len() >= limit as usize {
                    break;
                }
                if live(value.value(), now).is_some() {
                    keys.push(String::from_utf8_lossy(&key[ns_len..]).into_owned());
                }
            }
            Ok(keys)
        })
    }

    fn purge_expired(&self) -> KvFuture<'_, u64> {
        self.blocking(|db| {
            let now = now_ms();
            let txn = db.begin_write()?;
            let mut purged = 0;
            txn.open_table(TABLE)?.retain(|_, value| {
                let keep = live(value, now).is_some();
                purged += u64::from(!keep);
                keep
            })?;
            txn.commit()?;
            Ok(purged)
        })
    }
}

/// One instance's access: the server's store when the manifest grants kv, and the
/// addon's namespace.
pub(crate) struct KvAccess {
    pub(crate) store: Option<Arc<KvStore>>,
    pub(crate) namespace: Arc<str>,
}

impl KvAccess {
    fn backend(&self) -> Result<&Arc<dyn KvBackend>, KvError> {
        let store = self.store.as_ref().ok_or(KvError::Denied)?;
        store.backend().map_err(|err| KvError::Backend(err.0))
    }

    /// A backend's answer as the guest gets it; a failure is also logged.
    fn answer<T>(&self, result: Result<T, BackendError>) -> Result<T, KvError> {
        result.map_err(|err| {
            tracing::warn!(addon = &*self.namespace, "kv call failed: {err}");
            KvError::Backend(err.0)
        })
    }
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(KvError::Invalid(format!(
            "a key is 1 to {MAX_KEY_BYTES} bytes; this one is {}",
            key.len()
        )));
    }
    Ok(())
}

impl Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key)?;
        let backend = self.kv.backend()?;
        let result = backend.get(&self.kv.namespace, &key).await;
        self.kv.answer(result)
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        check_key(&key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(KvError::Invalid(format!(
                "a value is at most 1 MiB; this one is {} bytes",
                value.len()
            )));
        }
        if ttl_ms == Some(0) {
            return Err(KvError::Invalid("ttl-ms must be at least 1; leave it out for no expiry".into()));
        }
        let backend = self.kv.backend()?;
        let result = backend.set(&self.kv.namespace, &key, value, ttl_ms.map(Duration::from_millis)).await;
        self.kv.answer(result)
    }

    async fn delete(&mut self, key: String) -> Result<bool, KvError> {
        check_key(&key)?;
        let backend = self.kv.backend()?;
        let result = backend.delete(&self.kv.namespace, &key).await;
        self.kv.answer(result)
    }

    async fn list_keys(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<String>, KvError> {
        if prefix.len() > MAX_KEY_BYTES {
            return Err(KvError::Invalid(format!("a prefix is at most {MAX_KEY_BYTES} bytes")));
        }
        let backend = self.kv.backend()?;
        let result =
            backend.list_keys(&self.kv.namespace, &prefix, start_after.as_deref(), limit.min(MAX_LIST)).await;
        self.kv.answer(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> RedbBackend {
        RedbBackend::open(&dir.join("kv.redb")).unwrap()
    }

    #[tokio::test]
    async fn values_round_trip_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        kv.set("a", "k", b"one".to_vec(), None).await.unwrap();
        kv.set("b", "k", b"two".to_vec(), None).await.unwrap();
        assert_eq!(kv.get("a", "k").await.unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get("b", "k").await.unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(kv.get("c", "k").await.unwrap(), None);
        assert!(kv.delete("a", "k").await.unwrap());
        assert!(!kv.delete("a", "k").await.unwrap());
        assert_eq!(kv.get("a", "k").await.unwrap(), None);
        assert_eq!(kv.get("b", "k").await.unwrap().as_deref(), Some(&b"two"[..]));
    }

    #[tokio::test]
    async fn a_namespace_cannot_reach_into_another_by_key_tricks() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        kv.set("ab", "x", b"secret".to_vec(), None).await.unwrap();
        // "a" + "\0" + "b\0x" is not "ab" + "\0" + "x".
        assert_eq!(kv.get("a", "b\0x").await.unwrap(), None);
        assert_eq!(kv.list_keys("a", "", None, 100).await.unwrap(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn listing_pages_by_prefix_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        for key in ["h/2", "h/1", "h/3", "i/1", "g/9"] {
            kv.set("ns", key, vec![1], None).await.unwrap();
        }
        kv.set("other", "h/0", vec![1], None).await.unwrap();
        assert_eq!(kv.list_keys("ns", "h/", None, 100).await.unwrap(), ["h/1", "h/2", "h/3"]);
        assert_eq!(kv.list_keys("ns", "h/", None, 2).await.unwrap(), ["h/1", "h/2"]);
        assert_eq!(kv.list_keys("ns", "h/", Some("h/2"), 2).await.unwrap(), ["h/3"]);
        assert_eq!(kv.list_keys("ns", "", None, 100).await.unwrap().len(), 5);
    }

    #[tokio::test]
    async fn entries_expire() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        kv.set("ns", "fresh", b"x".to_vec(), Some(Duration::from_secs(60))).await.unwrap();
        kv.set("ns", "gone", b"x".to_vec(), Some(Duration::from_millis(1))).await.unwrap();
        kv.set("ns", "forever", b"y".to_vec(), None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(kv.get("ns", "fresh").await.unwrap().is_some(), "not yet expired");
        assert_eq!(kv.get("ns", "gone").await.unwrap(), None);
        assert_eq!(kv.list_keys("ns", "", None, 10).await.unwrap(), ["forever", "fresh"]);
        assert!(!kv.delete("ns", "gone").await.unwrap(), "an expired entry was not live");
        kv.set("ns", "gone2", b"x".to_vec(), Some(Duration::from_millis(1))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(kv.purge_expired().await.unwrap(), 1);
        assert!(kv.get("ns", "forever").await.unwrap().is_some());
        assert!(kv.get("ns", "fresh").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path()).set("ns", "k", b"kept".to_vec(), None).await.unwrap();
        assert_eq!(open(dir.path()).get("ns", "k").await.unwrap().as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn an_unusable_data_dir_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let store = KvStore::new(&file.join("sub"));
        let err = store.backend().err().expect("cannot open under a file");
        assert!(err.0.contains("data directory"), "{err}");
    }
}
