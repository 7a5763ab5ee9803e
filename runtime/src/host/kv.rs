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
//!   crash-safe redb file, `<data_dir>/kv.redb`, which survives restarts, private to the
//!   server's user (file 0600, a new directory 0700; see [`RedbBackend::open`]). With
//!   `[cluster] redis_url`, [`super::kv_redis::RedisKvBackend`] keeps the data in Redis
//!   instead, shared by every node, with the same semantics. The file
//!   opens on first use, so a server whose addons use no kv never touches the disk. One
//!   process at a time can open it: while another holds it (the process a restart with
//!   `server.reuse_port` replaces), a call waits for it up to [`IN_USE_WAIT`], then fails
//!   with a `backend` error saying so; the next call tries again.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

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

/// How much one namespace may hold: manifest keys `kv_max_keys` and `kv_max_bytes`. An
/// entry's bytes are its key's plus its value's. Entries count until they are deleted or
/// purged, expired or not (the purge runs every few minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Quota { max_keys: 100_000, max_bytes: 256 << 20 }
    }
}

/// A write was refused because it would take its namespace past a [`Quota`] limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaFull {
    Keys,
    Bytes,
}

impl QuotaFull {
    /// The message the guest gets, as `invalid`.
    pub fn message(self, quota: Quota) -> String {
        match self {
            QuotaFull::Keys => format!(
                "kv quota full: this addon already stores its limit of {} keys (kv_max_keys); \
                 delete keys or let them expire",
                quota.max_keys
            ),
            QuotaFull::Bytes => format!(
                "kv quota full: this write would take the addon past its limit of {} bytes (kv_max_bytes); \
                 delete keys or let them expire",
                quota.max_bytes
            ),
        }
    }
}

/// A boxed future, so backends are object-safe and can be async (a network store) or
/// blocking work moved off the runtime (an embedded file).
pub type KvFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Where kv data lives. `namespace` is the addon's name; implementations keep
/// namespaces apart. Keys and values have already passed the limits above.
pub trait KvBackend: Send + Sync + 'static {
    /// The live value of `key`.
    fn get<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, Option<Vec<u8>>>;
    /// Stores `value`; with `ttl`, it expires that long from now. Refused, with nothing
    /// written, when it would take the namespace past `quota`.
    fn set<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
        quota: Quota,
    ) -> KvFuture<'a, Result<(), QuotaFull>>;
    /// Stores `value` only if the live value is `expected` (`None`: absent or expired),
    /// atomically; whether it stored.
    fn compare_and_swap<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
        quota: Quota,
    ) -> KvFuture<'a, Result<bool, QuotaFull>>;
    /// Removes `key`; whether a live value was there.
    fn delete<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, bool>;
    /// Removes `key` only if its live value is `expected`, atomically; whether it did.
    fn compare_and_delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        expected: Vec<u8>,
    ) -> KvFuture<'a, bool>;
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
    /// The outcome of opening the file, once there is one that will not change.
    backend: OnceLock<Result<Arc<dyn KvBackend>, BackendError>>,
    /// Held while opening, so concurrent first calls open the file once. An async lock:
    /// the calls that wait for the first one's open must not block their worker threads.
    opening: tokio::sync::Mutex<()>,
    /// Whether the "in use by another process" warning was logged (once is enough).
    warned_in_use: AtomicBool,
    /// How long a call waits for a file another process holds ([`IN_USE_WAIT`]).
    in_use_wait: Duration,
}

/// How long a kv call waits for the file while another process holds it: the process a
/// restart with `server.reuse_port` replaces keeps it until its connections have drained,
/// which takes a moment when clients answer the close frame promptly. Like SQLite's busy
/// timeout, a short wait turns most of that window into a delay instead of an error.
pub const IN_USE_WAIT: Duration = Duration::from_secs(5);
/// How often a waiting call tries the file again.
const IN_USE_RETRY: Duration = Duration::from_millis(50);

impl KvStore {
    /// A store whose default backend is the redb file `<data_dir>/kv.redb`.
    pub fn new(data_dir: &Path) -> KvStore {
        KvStore::at(data_dir.join("kv.redb"))
    }

    fn at(path: PathBuf) -> KvStore {
        KvStore {
            path,
            backend: OnceLock::new(),
            opening: tokio::sync::Mutex::new(()),
            warned_in_use: AtomicBool::new(false),
            in_use_wait: IN_USE_WAIT,
        }
    }

    /// A store over a given backend.
    pub fn with_backend(backend: Arc<dyn KvBackend>) -> KvStore {
        let store = KvStore::at(PathBuf::new());
        let _ = store.backend.set(Ok(backend));
        store
    }

    /// The backend, opening the file the first time. A failure to open is kept: every
    /// later call reports the same cause rather than retrying a broken disk per message.
    ///
    /// The one exception is a file held by another process. redb lets one process at a
    /// time open it, and during a restart with `server.reuse_port` the process being
    /// replaced holds it until its connections have drained. A call then waits up to
    /// [`IN_USE_WAIT`] for it; after that it fails with a `backend` error that says why,
    /// and the next call tries again.
    pub async fn backend(&self) -> Result<&Arc<dyn KvBackend>, BackendError> {
        let mut deadline = None;
        loop {
            match self.try_open().await {
                Ok(backend) => return Ok(backend),
                Err(OpenError::Failed(err)) => return Err(err),
                Err(OpenError::InUse) => {
                    let err = BackendError(format!(
                        "kv store {} is in use by another process, most likely the sockhost this one \
                         replaces (server.reuse_port); it becomes available when that process exits",
                        self.path.display()
                    ));
                    if !self.warned_in_use.swap(true, Ordering::Relaxed) {
                        tracing::warn!("{err}; kv calls wait for it, up to {:?} each", self.in_use_wait);
                    }
                    let now = tokio::time::Instant::now();
                    if now >= *deadline.get_or_insert(now + self.in_use_wait) {
                        return Err(err);
                    }
                    tokio::time::sleep(IN_USE_RETRY).await;
                }
            }
        }
    }

    /// The backend, or why there is none: [`OpenError::InUse`] is worth trying again,
    /// [`OpenError::Failed`] is kept.
    ///
    /// Opening creates the file and commits a transaction, so it waits on the disk (fsync),
    /// which on a busy disk takes long. It runs on a blocking thread: inside a guest's
    /// host call it would stall every connection on the worker thread, and the wait would
    /// be charged to the guest's CPU limit as if it had computed.
    async fn try_open(&self) -> Result<&Arc<dyn KvBackend>, OpenError> {
        if let Some(outcome) = self.backend.get() {
            return kept(outcome);
        }
        let _opening = self.opening.lock().await;
        if let Some(outcome) = self.backend.get() {
            return kept(outcome);
        }
        let path = self.path.clone();
        let opened = tokio::task::spawn_blocking(move || RedbBackend::open(&path))
            .await
            .unwrap_or_else(|err| Err(BackendError(format!("opening the kv store failed: {err}")).into()));
        let outcome = match opened {
            Ok(db) => {
                tracing::info!("kv store opened at {}", self.path.display());
                let backend = Arc::new(db) as Arc<dyn KvBackend>;
                // Entries that expired while no server had the file open still count
                // against their namespace's quota until they are purged; the periodic
                // purge is minutes away, and a restarted server would refuse writes
                // meanwhile. So purge once now, beside the calls.
                let purging = backend.clone();
                tokio::spawn(async move {
                    match purging.purge_expired().await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!("kv: purged {n} entries that expired while the store was closed")
                        }
                        Err(err) => tracing::warn!("kv: purging expired entries failed: {err}"),
                    }
                });
                Ok(backend)
            }
            Err(OpenError::InUse) => return Err(OpenError::InUse),
            Err(OpenError::Failed(err)) => {
                tracing::error!("kv store {} cannot be opened: {err}", self.path.display());
                Err(err)
            }
        };
        kept(self.backend.get_or_init(|| outcome))
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
/// What each namespace holds, kept in the same transactions as `TABLE`:
/// namespace → keys (u64 LE) ++ bytes (u64 LE). Files from before quotas get it built
/// once, when they are opened.
const USAGE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv-usage");

/// A write's answer when it would pass the namespace's key or byte quota.
const QUOTA_KEYS: u64 = u64::MAX - 1;
const QUOTA_BYTES: u64 = u64::MAX - 2;

impl QuotaFull {
    fn code(self) -> u64 {
        match self {
            QuotaFull::Keys => QUOTA_KEYS,
            QuotaFull::Bytes => QUOTA_BYTES,
        }
    }

    fn from_code(code: u64) -> Option<QuotaFull> {
        match code {
            QUOTA_KEYS => Some(QuotaFull::Keys),
            QUOTA_BYTES => Some(QuotaFull::Bytes),
            _ => None,
        }
    }
}

/// The namespace part of a full key (`namespace \0 key`).
fn namespace_of(full_key: &[u8]) -> &[u8] {
    full_key.split(|b| *b == 0).next().unwrap_or_default()
}

/// What an entry counts against its quota: its key's and its value's bytes.
fn entry_bytes(full_key: &[u8], stored: &[u8]) -> u64 {
    let key = full_key.len().saturating_sub(namespace_of(full_key).len() + 1);
    (key + stored.len().saturating_sub(8)) as u64
}

/// Every namespace's usage, read at the start of a write transaction (one row per addon)
/// and written back before it commits.
struct Usage {
    totals: std::collections::HashMap<Vec<u8>, (u64, u64)>,
    changed: bool,
}

impl Usage {
    fn read(table: &impl ReadableTable<&'static [u8], &'static [u8]>) -> Result<Usage, redb::Error> {
        let mut totals = std::collections::HashMap::new();
        for entry in table.iter()? {
            let (namespace, value) = entry?;
            let value = value.value();
            let number = |range: std::ops::Range<usize>| {
                value.get(range).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes)
            };
            totals.insert(namespace.value().to_vec(), (number(0..8), number(8..16)));
        }
        Ok(Usage { totals, changed: false })
    }

    /// The usage of `full_key`'s namespace.
    fn of(&self, full_key: &[u8]) -> (u64, u64) {
        self.totals.get(namespace_of(full_key)).copied().unwrap_or_default()
    }

    fn add(&mut self, full_key: &[u8], keys: i64, bytes: i64) {
        let total = self.totals.entry(namespace_of(full_key).to_vec()).or_default();
        total.0 = total.0.saturating_add_signed(keys);
        total.1 = total.1.saturating_add_signed(bytes);
        self.changed = true;
    }

    fn save(&self, table: &mut redb::Table<&[u8], &[u8]>) -> Result<(), redb::Error> {
        if self.changed {
            for (namespace, (keys, bytes)) in &self.totals {
                let mut row = [0u8; 16];
                row[..8].copy_from_slice(&keys.to_le_bytes());
                row[8..].copy_from_slice(&bytes.to_le_bytes());
                table.insert(namespace.as_slice(), row.as_slice())?;
            }
        }
        Ok(())
    }
}

/// Inserts `stored` at `key` unless that takes the namespace past `quota`.
fn put(
    table: &mut redb::Table<&[u8], &[u8]>,
    usage: &mut Usage,
    key: &[u8],
    stored: &[u8],
    quota: Quota,
) -> Result<Option<QuotaFull>, redb::Error> {
    let old = table.get(key)?.map(|old| entry_bytes(key, old.value()));
    let new = entry_bytes(key, stored);
    let (keys, bytes) = usage.of(key);
    let old_bytes = old.unwrap_or(0);
    if old.is_none() && keys >= quota.max_keys {
        return Ok(Some(QuotaFull::Keys));
    }
    // Shrinking or keeping a value's size is always allowed, even over the quota.
    if new > old_bytes && bytes.saturating_sub(old_bytes) + new > quota.max_bytes {
        return Ok(Some(QuotaFull::Bytes));
    }
    table.insert(key, stored)?;
    usage.add(key, i64::from(old.is_none()), new as i64 - old_bytes as i64);
    Ok(None)
}

/// The embedded backend: a redb file.
///
/// Reads run on tokio's blocking pool, each in its own read transaction (redb readers
/// never wait for the writer). Writes go to one writer thread that **commits them in
/// groups**: while one commit is being made durable (fsync), the writes that arrive
/// queue up, and the next commit takes all of them (up to [`MAX_GROUP_WRITES`] writes or
/// [`MAX_GROUP_BYTES`]). Every write still returns only after the commit that holds it is
/// durable, so a `set` that returned `ok` survives a crash; what changes is that many
/// conversations saving at once share one fsync instead of queueing for one each. A
/// single writer on a quiet server commits at once, as before.
pub struct RedbBackend {
    db: Arc<redb::Database>,
    writes: mpsc::Sender<WriteOp>,
    /// Joined on drop, so the file is closed when the backend is gone.
    writer: Option<std::thread::JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl Drop for RedbBackend {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what it holds.
        drop(std::mem::replace(&mut self.writes, mpsc::channel().0));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Most writes one group commit takes.
pub const MAX_GROUP_WRITES: usize = 512;
/// A group commit stops taking writes once it holds this many bytes of keys and values.
pub const MAX_GROUP_BYTES: usize = 8 << 20;

/// A write for the writer thread, and where its answer goes.
struct WriteOp {
    write: Write,
    done: oneshot::Sender<Result<u64, BackendError>>,
}

enum Write {
    /// Answers 0, or a `QUOTA_*` code when it would pass `quota` (nothing written).
    Set { key: Vec<u8>, stored: Vec<u8>, quota: Quota },
    /// Answers 1 if the live value was `expected` and `stored` replaced it, else 0.
    CompareAndSwap { key: Vec<u8>, expected: Option<Vec<u8>>, stored: Vec<u8>, quota: Quota },
    /// Answers 1 if a live value (with `expected`: that value) was removed, else 0.
    Delete { key: Vec<u8>, expected: Option<Vec<u8>> },
    /// Looks at up to [`PURGE_BATCH`] entries after `after` and removes the expired ones.
    /// Answers how many it removed, with [`PURGE_MORE`] set while entries are left to look at.
    /// The last key it looked at goes into `reached`, where the next batch starts.
    Purge { after: Option<Vec<u8>>, reached: Arc<Mutex<Option<Vec<u8>>>> },
}

impl Write {
    fn bytes(&self) -> usize {
        match self {
            Write::Set { key, stored, .. } => key.len() + stored.len(),
            Write::CompareAndSwap { key, expected, stored, .. } => {
                key.len() + stored.len() + expected.as_ref().map_or(0, Vec::len)
            }
            Write::Delete { key, expected } => key.len() + expected.as_ref().map_or(0, Vec::len),
            Write::Purge { .. } => 0,
        }
    }
}

/// The bytes redb keeps for a value: its expiry (ms since the epoch; 0 = never), then it.
fn stored_value(value: Vec<u8>, ttl: Option<Duration>) -> Vec<u8> {
    let expiry = ttl.map_or(0, |ttl| now_ms().saturating_add(ttl.as_millis() as u64).max(1));
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&expiry.to_le_bytes());
    stored.extend_from_slice(&value);
    stored
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

/// A kept outcome of opening the file, as [`KvStore::try_open`] answers it.
fn kept(outcome: &Result<Arc<dyn KvBackend>, BackendError>) -> Result<&Arc<dyn KvBackend>, OpenError> {
    outcome.as_ref().map_err(|err| OpenError::Failed(err.clone()))
}

/// Why [`RedbBackend::open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process has the file open (redb allows one at a time). It may let go.
    #[error("the file is in use by another process")]
    InUse,
    /// Anything else: a missing directory, a corrupt file, no permission.
    #[error(transparent)]
    Failed(#[from] BackendError),
}

impl RedbBackend {
    /// Opens (or creates) the file, creating its directory, and starts the writer thread
    /// (it ends when the backend is dropped).
    ///
    /// The file holds what every addon keeps (conversations, for aikefu), so it is made
    /// private (`crate::private_files`): a new data directory is 0700 and the file is
    /// 0600, and a file left readable by others (by an older sockhost, or a copy) is made
    /// 0600 again, with a warning. An existing directory keeps its mode: the operator
    /// named it and it may hold more than our file (the working directory, a volume), so
    /// a mode that lets others in is only warned about.
    pub fn open(path: &Path) -> Result<RedbBackend, OpenError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            match std::fs::metadata(dir) {
                Ok(meta) => {
                    if let Some(mode) = crate::private_files::open_to_others(&meta) {
                        tracing::warn!(
                            "data directory {} is open to other users ({mode}); kv.redb is kept 0600, \
                             but run `chmod 700 {}` so they cannot list or replace it",
                            dir.display(),
                            dir.display()
                        );
                    }
                }
                Err(_) => crate::private_files::create_dir(dir).map_err(|err| {
                    BackendError(format!("cannot create data directory {}: {err}", dir.display()))
                })?,
            }
        }
        // Made (or opened) here with mode 0600, before redb opens it by its path.
        let file = crate::private_files::file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|err| BackendError(format!("kv store {}: {err}", path.display())))?;
        match crate::private_files::restrict(&file) {
            Ok(true) => {
                tracing::warn!("kv store {} was readable by other users; made it 0600", path.display())
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(
                "kv store {} is readable by other users and cannot be made 0600: {err}",
                path.display()
            ),
        }
        drop(file);
        let db = match redb::Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(OpenError::InUse),
            Err(err) => return Err(backend_error(err).into()),
        };
        // Create the tables up front, so readers never meet a missing table; a file from
        // before quotas gets its usage counted once.
        let txn = db.begin_write().map_err(backend_error)?;
        {
            let table = txn.open_table(TABLE).map_err(backend_error)?;
            let mut usage_table = txn.open_table(USAGE).map_err(backend_error)?;
            if usage_table.is_empty().map_err(backend_error)? && !table.is_empty().map_err(backend_error)? {
                let mut usage = Usage { totals: Default::default(), changed: false };
                for entry in table.iter().map_err(backend_error)? {
                    let (key, value) = entry.map_err(backend_error)?;
                    usage.add(key.value(), 1, entry_bytes(key.value(), value.value()) as i64);
                }
                usage.save(&mut usage_table).map_err(backend_error)?;
            }
        }
        txn.commit().map_err(backend_error)?;
        let db = Arc::new(db);
        let commits = Arc::new(AtomicU64::new(0));
        let (writes, queue) = mpsc::channel();
        let writer = Writer { db: db.clone(), commits: commits.clone() };
        let writer = std::thread::Builder::new()
            .name("sockhost-kv-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|err| BackendError(format!("cannot start the kv writer thread: {err}")))?;
        Ok(RedbBackend { db, writes, writer: Some(writer), commits })
    }

    /// Write transactions committed so far (each holds one or more writes).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
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

    /// Hands `write` to the writer thread; resolves once its group is committed.
    fn write(&self, write: Write) -> KvFuture<'static, u64> {
        let (done, answer) = oneshot::channel();
        let sent = self.writes.send(WriteOp { write, done });
        Box::pin(async move {
            let stopped = || BackendError("kv store: the writer thread stopped".into());
            sent.map_err(|_| stopped())?;
            answer.await.map_err(|_| stopped())?
        })
    }
}

/// The writer thread: takes what is queued, commits it as one transaction, answers each.
struct Writer {
    db: Arc<redb::Database>,
    commits: Arc<AtomicU64>,
}

/// Entries one purge batch looks at: a transaction small enough that writes queued
/// behind it wait milliseconds, not a scan of the whole table.
pub const PURGE_BATCH: usize = 1000;
/// Set in a purge batch's answer while entries are left to look at.
const PURGE_MORE: u64 = 1 << 63;

impl Writer {
    fn run(self, queue: mpsc::Receiver<WriteOp>) {
        while let Ok(first) = queue.recv() {
            let mut bytes = first.write.bytes();
            let mut group = vec![first];
            while group.len() < MAX_GROUP_WRITES && bytes < MAX_GROUP_BYTES {
                match queue.try_recv() {
                    Ok(op) => {
                        bytes += op.write.bytes();
                        group.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
    }

    fn commit_group(&self, group: Vec<WriteOp>) {
        let writes: Vec<&Write> = group.iter().map(|op| &op.write).collect();
        match self.commit(&writes) {
            Ok(answers) => {
                for (op, answer) in group.into_iter().zip(answers) {
                    let _ = op.done.send(Ok(answer));
                }
            }
            // One failing write must not fail the others that happened to share its
            // commit: each is tried again in a transaction of its own.
            Err(_) if group.len() > 1 => {
                for op in group {
                    let answer = self.commit(&[&op.write]).map(|answers| answers[0]).map_err(backend_error);
                    let _ = op.done.send(answer);
                }
            }
            Err(err) => {
                if let Some(op) = group.into_iter().next() {
                    let _ = op.done.send(Err(backend_error(err)));
                }
            }
        }
    }

    /// Applies `writes` in order in one write transaction and commits it.
    fn commit(&self, writes: &[&Write]) -> Result<Vec<u64>, redb::Error> {
        let now = now_ms();
        let txn = self.db.begin_write()?;
        let mut answers = Vec::with_capacity(writes.len());
        {
            let mut table = txn.open_table(TABLE)?;
            let mut usage_table = txn.open_table(USAGE)?;
            let mut usage = Usage::read(&usage_table)?;
            for write in writes {
                answers.push(match write {
                    Write::Set { key, stored, quota } => {
                        put(&mut table, &mut usage, key, stored, *quota)?.map_or(0, QuotaFull::code)
                    }
                    Write::CompareAndSwap { key, expected, stored, quota } => {
                        // Inside the transaction, after the writes before it in this
                        // group: nothing can come between the comparison and the write.
                        let current = table
                            .get(key.as_slice())?
                            .and_then(|old| live(old.value(), now).map(<[u8]>::to_vec));
                        if current != *expected {
                            0
                        } else {
                            put(&mut table, &mut usage, key, stored, *quota)?.map_or(1, QuotaFull::code)
                        }
                    }
                    Write::Delete { key, expected } => {
                        if let Some(expected) = expected {
                            // As for compare-and-swap: inside the transaction, so nothing
                            // comes between the comparison and the removal.
                            let current = table.get(key.as_slice())?.and_then(|old| {
                                live(old.value(), now).map(|value| value == expected.as_slice())
                            });
                            if current != Some(true) {
                                answers.push(0);
                                continue;
                            }
                        }
                        let removed = table.remove(key.as_slice())?;
                        if let Some(old) = &removed {
                            usage.add(key, -1, -(entry_bytes(key, old.value()) as i64));
                        }
                        u64::from(removed.is_some_and(|old| live(old.value(), now).is_some()))
                    }
                    Write::Purge { after, reached } => {
                        // One batch per transaction: the writes queued meanwhile go in the
                        // next group, instead of waiting for a scan of the whole table.
                        let start = match after {
                            Some(after) => Bound::Excluded(after.as_slice()),
                            None => Bound::Unbounded,
                        };
                        let mut expired: Vec<Vec<u8>> = Vec::new();
                        let mut seen = 0;
                        let mut last: Option<Vec<u8>> = None;
                        for entry in table.range::<&[u8]>((start, Bound::Unbounded))?.take(PURGE_BATCH) {
                            let (key, value) = entry?;
                            seen += 1;
                            if live(value.value(), now).is_none() {
                                expired.push(key.value().to_vec());
                            }
                            last = Some(key.value().to_vec());
                        }
                        for key in &expired {
                            if let Some(old) = table.remove(key.as_slice())? {
                                usage.add(key, -1, -(entry_bytes(key, old.value()) as i64));
                            }
                        }
                        *reached.lock().unwrap_or_else(|p| p.into_inner()) = last;
                        expired.len() as u64 | if seen == PURGE_BATCH { PURGE_MORE } else { 0 }
                    }
                });
            }
            usage.save(&mut usage_table)?;
        }
        txn.commit()?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(answers)
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
        quota: Quota,
    ) -> KvFuture<'a, Result<(), QuotaFull>> {
        let stored = stored_value(value, ttl);
        let written = self.write(Write::Set { key: full_key(namespace, key), stored, quota });
        Box::pin(async move { written.await.map(|code| QuotaFull::from_code(code).map_or(Ok(()), Err)) })
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
        let stored = stored_value(value, ttl);
        let write = Write::CompareAndSwap { key: full_key(namespace, key), expected, stored, quota };
        let written = self.write(write);
        Box::pin(
            async move { written.await.map(|code| QuotaFull::from_code(code).map_or(Ok(code == 1), Err)) },
        )
    }

    fn delete<'a>(&'a self, namespace: &'a str, key: &'a str) -> KvFuture<'a, bool> {
        let written = self.write(Write::Delete { key: full_key(namespace, key), expected: None });
        Box::pin(async move { written.await.map(|removed| removed == 1) })
    }

    fn compare_and_delete<'a>(
        &'a self,
        namespace: &'a str,
        key: &'a str,
        expected: Vec<u8>,
    ) -> KvFuture<'a, bool> {
        let written = self.write(Write::Delete { key: full_key(namespace, key), expected: Some(expected) });
        Box::pin(async move { written.await.map(|removed| removed == 1) })
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
        Box::pin(async move {
            let mut purged = 0;
            let mut after = None;
            let reached = Arc::new(Mutex::new(None));
            loop {
                let answer = self.write(Write::Purge { after, reached: reached.clone() }).await?;
                purged += answer & !PURGE_MORE;
                if answer & PURGE_MORE == 0 {
                    return Ok(purged);
                }
                after = reached.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
        })
    }
}

/// One instance's access: the server's store when the manifest grants kv, and the
/// addon's namespace.
pub(crate) struct KvAccess {
    pub(crate) store: Option<Arc<KvStore>>,
    pub(crate) namespace: Arc<str>,
    /// The addon's `kv_max_keys` and `kv_max_bytes`.
    pub(crate) quota: Quota,
}

impl KvAccess {
    async fn backend(&self) -> Result<&Arc<dyn KvBackend>, KvError> {
        let store = self.store.as_ref().ok_or(KvError::Denied)?;
        store.backend().await.map_err(|err| KvError::Backend(err.0))
    }

    /// A backend's answer as the guest gets it; a failure is also logged.
    fn answer<T>(&self, result: Result<T, BackendError>) -> Result<T, KvError> {
        result.map_err(|err| {
            tracing::warn!(addon = &*self.namespace, "kv call failed: {err}");
            KvError::Backend(err.0)
        })
    }

    // The guest's calls: the grant and the limits are checked here, before any backend.

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        check_key(key)?;
        let backend = self.backend().await?;
        self.answer(backend.get(&self.namespace, key).await)
    }

    pub(crate) async fn set(&self, key: &str, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        check_write(key, &value, ttl_ms)?;
        let backend = self.backend().await?;
        let ttl = ttl_ms.map(Duration::from_millis);
        let written = self.answer(backend.set(&self.namespace, key, value, ttl, self.quota).await)?;
        written.map_err(|full| KvError::Invalid(full.message(self.quota)))
    }

    pub(crate) async fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        check_write(key, &value, ttl_ms)?;
        let backend = self.backend().await?;
        let ttl = ttl_ms.map(Duration::from_millis);
        let swapped = self
            .answer(backend.compare_and_swap(&self.namespace, key, expected, value, ttl, self.quota).await)?;
        swapped.map_err(|full| KvError::Invalid(full.message(self.quota)))
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        let backend = self.backend().await?;
        self.answer(backend.delete(&self.namespace, key).await)
    }

    pub(crate) async fn compare_and_delete(&self, key: &str, expected: Vec<u8>) -> Result<bool, KvError> {
        check_key(key)?;
        check_value(&expected, "an expected value")?;
        let backend = self.backend().await?;
        self.answer(backend.compare_and_delete(&self.namespace, key, expected).await)
    }

    pub(crate) async fn list_keys(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, KvError> {
        if prefix.len() > MAX_KEY_BYTES {
            return Err(KvError::Invalid(format!("a prefix is at most {MAX_KEY_BYTES} bytes")));
        }
        let backend = self.backend().await?;
        self.answer(backend.list_keys(&self.namespace, prefix, start_after, limit.min(MAX_LIST)).await)
    }
}

/// The limits of a write: the key's, the value's size, a TTL of at least 1 ms.
fn check_write(key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), KvError> {
    check_key(key)?;
    check_value(value, "a value")?;
    if ttl_ms == Some(0) {
        return Err(KvError::Invalid("ttl-ms must be at least 1; leave it out for no expiry".into()));
    }
    Ok(())
}

/// `what` (a value, or the expected value of a comparison) is at most 1 MiB.
fn check_value(value: &[u8], what: &str) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::Invalid(format!("{what} is at most 1 MiB; this one is {} bytes", value.len())));
    }
    Ok(())
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
        self.kv.get(&key).await
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: Option<u64>) -> Result<(), KvError> {
        self.kv.set(&key, value, ttl_ms).await
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, KvError> {
        self.kv.compare_and_swap(&key, expected, value, ttl_ms).await
    }

    async fn delete(&mut self, key: String) -> Result<bool, KvError> {
        self.kv.delete(&key).await
    }

    async fn compare_and_delete(&mut self, key: String, expected: Vec<u8>) -> Result<bool, KvError> {
        self.kv.compare_and_delete(&key, expected).await
    }

    async fn list_keys(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<Vec<String>, KvError> {
        self.kv.list_keys(&prefix, start_after.as_deref(), limit).await
    }
}

/// For tests: writes under the default quota, with a quota refusal as a test failure.
#[cfg(test)]
pub(crate) trait Unlimited: KvBackend {
    fn put<'a>(
        &'a self,
        ns: &'a str,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> KvFuture<'a, ()> {
        let written = self.set(ns, key, value, ttl, Quota::default());
        Box::pin(async move {
            written.await?.expect("within the default quota");
            Ok(())
        })
    }

    fn cas<'a>(
        &'a self,
        ns: &'a str,
        key: &'a str,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> KvFuture<'a, bool> {
        let swapped = self.compare_and_swap(ns, key, expected, value, ttl, Quota::default());
        Box::pin(async move { Ok(swapped.await?.expect("within the default quota")) })
    }
}

#[cfg(test)]
impl<T: KvBackend + ?Sized> Unlimited for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> RedbBackend {
        RedbBackend::open(&dir.join("kv.redb")).unwrap()
    }

    // The suite every backend passes: each `async fn` below taking a `Subject` runs once
    // per backend, as `on_redb::<name>` and `on_redis::<name>`. What only one backend has
    // (redb's file, Redis going away) is tested after it, and in `kv_redis`.

    /// A backend under test, and what it lives on (a temporary directory, a redis-server),
    /// dropped after it.
    struct Subject {
        kv: Arc<dyn KvBackend>,
        _home: Box<dyn std::any::Any + Send>,
    }

    impl Subject {
        /// The guest's view of the backend: the grant and the limits in front of it.
        fn access(&self, namespace: &str) -> KvAccess {
            KvAccess {
                store: Some(Arc::new(KvStore::with_backend(self.kv.clone()))),
                namespace: namespace.into(),
                quota: Quota::default(),
            }
        }
    }

    fn redb() -> Subject {
        let dir = tempfile::tempdir().unwrap();
        Subject { kv: Arc::new(open(dir.path())), _home: Box::new(dir) }
    }

    /// A Redis backend on a redis-server of its own.
    fn redis() -> Subject {
        let server = crate::testing::RedisServer::start();
        let link = crate::cluster::RedisLink::new(&server.url()).unwrap();
        let kv = super::super::kv_redis::RedisKvBackend::new(Arc::new(link));
        Subject { kv: Arc::new(kv), _home: Box::new(server) }
    }

    macro_rules! on_every_backend {
        ($($test:ident),* $(,)?) => {
            mod on_redb {
                $(#[tokio::test]
                async fn $test() {
                    super::$test(super::redb()).await
                })*
            }
            mod on_redis {
                $(#[tokio::test]
                async fn $test() {
                    super::$test(super::redis()).await
                })*
            }
        };
    }

    on_every_backend!(
        values_round_trip_per_namespace,
        a_namespace_cannot_reach_into_another_by_key_tricks,
        listing_pages_by_prefix_in_order,
        listing_skips_what_is_gone,
        entries_expire,
        a_later_set_replaces_the_expiry,
        limits_are_checked_before_the_backend,
        concurrent_writes_all_land,
        compare_and_swap_stores_only_over_the_expected_value,
        concurrent_compare_and_swaps_lose_no_update,
        compare_and_delete_removes_only_the_expected_value,
        writes_past_the_quota_are_refused_and_deletes_and_purges_make_room,
    );

    async fn compare_and_swap_stores_only_over_the_expected_value(subject: Subject) {
        let kv = &subject.kv;
        // Absent: only `None` matches.
        assert!(!kv.cas("a", "k", Some(b"x".to_vec()), b"1".to_vec(), None).await.unwrap());
        assert!(kv.cas("a", "k", None, b"1".to_vec(), None).await.unwrap());
        assert!(!kv.cas("a", "k", None, b"2".to_vec(), None).await.unwrap());
        assert!(!kv.cas("a", "k", Some(b"0".to_vec()), b"2".to_vec(), None).await.unwrap());
        assert!(kv.cas("a", "k", Some(b"1".to_vec()), b"2".to_vec(), None).await.unwrap());
        assert_eq!(kv.get("a", "k").await.unwrap().as_deref(), Some(&b"2"[..]));
        // Another namespace's key of the same name is another key.
        assert!(kv.cas("b", "k", None, b"b".to_vec(), None).await.unwrap());
        // An expired value counts as absent, and a swap sets the new TTL and lists the key.
        assert!(kv.cas("a", "t", None, b"old".to_vec(), Some(SHORT_TTL)).await.unwrap());
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert!(!kv.cas("a", "t", Some(b"old".to_vec()), b"x".to_vec(), None).await.unwrap());
        assert!(kv.cas("a", "t", None, b"new".to_vec(), None).await.unwrap());
        assert_eq!(kv.list_keys("a", "", None, 10).await.unwrap(), ["k", "t"]);
        // The empty value is a value, not absence.
        assert!(kv.cas("a", "e", None, Vec::new(), None).await.unwrap());
        assert!(!kv.cas("a", "e", None, b"x".to_vec(), None).await.unwrap());
        assert!(kv.cas("a", "e", Some(Vec::new()), b"x".to_vec(), None).await.unwrap());
    }

    async fn compare_and_delete_removes_only_the_expected_value(subject: Subject) {
        let kv = &subject.kv;
        // Absent: nothing to remove, whatever is expected.
        assert!(!kv.compare_and_delete("a", "k", b"1".to_vec()).await.unwrap());
        assert!(!kv.compare_and_delete("a", "k", Vec::new()).await.unwrap());
        kv.put("a", "k", b"1".to_vec(), None).await.unwrap();
        // Another value stays.
        assert!(!kv.compare_and_delete("a", "k", b"0".to_vec()).await.unwrap());
        assert!(!kv.compare_and_delete("a", "k", b"10".to_vec()).await.unwrap());
        assert_eq!(kv.get("a", "k").await.unwrap().as_deref(), Some(&b"1"[..]));
        // The expected one goes, from the listing too, and only in its namespace.
        kv.put("b", "k", b"1".to_vec(), None).await.unwrap();
        assert!(kv.compare_and_delete("a", "k", b"1".to_vec()).await.unwrap());
        assert_eq!(kv.get("a", "k").await.unwrap(), None);
        assert_eq!(kv.list_keys("a", "", None, 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(kv.get("b", "k").await.unwrap().as_deref(), Some(&b"1"[..]));
        assert!(!kv.compare_and_delete("a", "k", b"1".to_vec()).await.unwrap(), "removed once");
        // The empty value is a value.
        kv.put("a", "e", Vec::new(), None).await.unwrap();
        assert!(kv.compare_and_delete("a", "e", Vec::new()).await.unwrap());
        // An expired value is absent: not removed by a comparison with what it was.
        kv.put("a", "t", b"old".to_vec(), Some(SHORT_TTL)).await.unwrap();
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert!(!kv.compare_and_delete("a", "t", b"old".to_vec()).await.unwrap());
        // A removal gives the key back to the quota.
        let quota = Quota { max_keys: 1, max_bytes: 100 };
        assert_eq!(kv.set("q", "x", b"1".to_vec(), None, quota).await.unwrap(), Ok(()));
        assert_eq!(kv.set("q", "y", b"1".to_vec(), None, quota).await.unwrap(), Err(QuotaFull::Keys));
        assert!(kv.compare_and_delete("q", "x", b"1".to_vec()).await.unwrap());
        assert_eq!(kv.set("q", "y", b"1".to_vec(), None, quota).await.unwrap(), Ok(()));
    }

    async fn writes_past_the_quota_are_refused_and_deletes_and_purges_make_room(subject: Subject) {
        let kv = &subject.kv;
        let quota = Quota { max_keys: 2, max_bytes: 20 };
        let set = |key: &'static str, value: &[u8], ttl: Option<Duration>| {
            kv.set("q", key, value.to_vec(), ttl, quota)
        };
        assert_eq!(set("a", b"12345", None).await.unwrap(), Ok(())); // 6 bytes: key + value
        assert_eq!(set("b", b"12345", None).await.unwrap(), Ok(())); // 12
        assert_eq!(set("c", b"1", None).await.unwrap(), Err(QuotaFull::Keys));
        assert_eq!(
            kv.compare_and_swap("q", "c", None, b"1".to_vec(), None, quota).await.unwrap(),
            Err(QuotaFull::Keys)
        );
        // Replacing is not a new key; growing is bounded by bytes, shrinking always passes.
        assert_eq!(set("a", b"1234567890123", None).await.unwrap(), Ok(())); // 14: 20 in all
        assert_eq!(set("b", b"123456", None).await.unwrap(), Err(QuotaFull::Bytes));
        assert_eq!(
            kv.get("q", "b").await.unwrap().as_deref(),
            Some(&b"12345"[..]),
            "a refused write wrote nothing"
        );
        assert_eq!(set("a", b"1", None).await.unwrap(), Ok(()));
        // Another namespace has its own.
        assert_eq!(kv.set("other", "c", b"1".to_vec(), None, quota).await.unwrap(), Ok(()));
        // A delete gives its key and bytes back.
        assert!(kv.delete("q", "b").await.unwrap());
        assert_eq!(set("t", b"1", Some(SHORT_TTL)).await.unwrap(), Ok(()));
        // An expired entry counts until it is purged.
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(set("u", b"1", None).await.unwrap(), Err(QuotaFull::Keys));
        kv.purge_expired().await.unwrap();
        assert_eq!(set("u", b"1", None).await.unwrap(), Ok(()));
    }

    /// Forty read-increment-swap loops at once on one counter: each increment lands once.
    async fn concurrent_compare_and_swaps_lose_no_update(subject: Subject) {
        let kv = subject.kv.clone();
        let tasks: Vec<_> = (0..40)
            .map(|_| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    loop {
                        let current = kv.get("n", "counter").await.unwrap();
                        let n: u64 = current
                            .as_deref()
                            .map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap());
                        let next = (n + 1).to_string().into_bytes();
                        if kv.cas("n", "counter", current, next, None).await.unwrap() {
                            return;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(kv.get("n", "counter").await.unwrap().as_deref(), Some(&b"40"[..]));
    }

    /// A short TTL, and a wait well past it: the tests assert what expired, never how fast.
    const SHORT_TTL: Duration = Duration::from_millis(50);
    const PAST_SHORT_TTL: Duration = Duration::from_millis(250);

    async fn values_round_trip_per_namespace(subject: Subject) {
        let kv = &subject.kv;
        kv.put("a", "k", b"one".to_vec(), None).await.unwrap();
        kv.put("b", "k", b"two".to_vec(), None).await.unwrap();
        assert_eq!(kv.get("a", "k").await.unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get("b", "k").await.unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(kv.get("c", "k").await.unwrap(), None);
        assert!(kv.delete("a", "k").await.unwrap());
        assert!(!kv.delete("a", "k").await.unwrap());
        assert_eq!(kv.get("a", "k").await.unwrap(), None);
        assert_eq!(kv.get("b", "k").await.unwrap().as_deref(), Some(&b"two"[..]));

        // Values are bytes, any bytes, empty included; a set replaces.
        let binary: Vec<u8> = (0..=255).collect();
        kv.put("a", "bin", binary.clone(), None).await.unwrap();
        assert_eq!(kv.get("a", "bin").await.unwrap(), Some(binary));
        kv.put("a", "bin", Vec::new(), None).await.unwrap();
        assert_eq!(kv.get("a", "bin").await.unwrap(), Some(Vec::new()));
        assert!(!kv.delete("c", "never-set").await.unwrap());
    }

    async fn a_namespace_cannot_reach_into_another_by_key_tricks(subject: Subject) {
        let kv = &subject.kv;
        kv.put("ab", "x", b"secret".to_vec(), None).await.unwrap();
        // redb: "a" + "\0" + "b\0x" is not "ab" + "\0" + "x". Redis: "a" + ":" + "b:x" is
        // not "ab" + ":" + "x" (and no namespace contains ':').
        assert_eq!(kv.get("a", "b\0x").await.unwrap(), None);
        assert_eq!(kv.get("a", "b:x").await.unwrap(), None);
        assert_eq!(kv.get("a", "bx").await.unwrap(), None);
        assert_eq!(kv.list_keys("a", "", None, 100).await.unwrap(), Vec::<String>::new());
        assert!(!kv.delete("a", "b\0x").await.unwrap());
        assert_eq!(kv.get("ab", "x").await.unwrap().as_deref(), Some(&b"secret"[..]));
    }

    async fn listing_pages_by_prefix_in_order(subject: Subject) {
        let kv = &subject.kv;
        for key in ["h/2", "h/1", "h/3", "i/1", "g/9", "h", "h/10"] {
            kv.put("ns", key, vec![1], None).await.unwrap();
        }
        kv.put("other", "h/0", vec![1], None).await.unwrap();
        assert_eq!(kv.list_keys("ns", "h/", None, 100).await.unwrap(), ["h/1", "h/10", "h/2", "h/3"]);
        assert_eq!(kv.list_keys("ns", "h/", None, 2).await.unwrap(), ["h/1", "h/10"]);
        assert_eq!(kv.list_keys("ns", "h/", Some("h/10"), 2).await.unwrap(), ["h/2", "h/3"]);
        assert_eq!(kv.list_keys("ns", "h/", Some("h/3"), 2).await.unwrap(), Vec::<String>::new());
        // A cursor before the prefix starts at the prefix; one past it finds nothing.
        assert_eq!(kv.list_keys("ns", "h/", Some("a"), 1).await.unwrap(), ["h/1"]);
        assert_eq!(kv.list_keys("ns", "h/", Some("i"), 10).await.unwrap(), Vec::<String>::new());
        assert_eq!(kv.list_keys("ns", "h", None, 100).await.unwrap(), ["h", "h/1", "h/10", "h/2", "h/3"]);
        assert_eq!(kv.list_keys("ns", "", None, 100).await.unwrap().len(), 7);
        assert_eq!(kv.list_keys("ns", "", None, 0).await.unwrap(), Vec::<String>::new());
        assert_eq!(kv.list_keys("ns", "", Some("h/3"), 100).await.unwrap(), ["i/1"]);
        assert_eq!(kv.list_keys("ns", "z", None, 100).await.unwrap(), Vec::<String>::new());

        // Paging through everything, a page at a time, sees every key once, in order.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = kv.list_keys("ns", "", after.as_deref(), 3).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.clone());
            seen.extend(page);
        }
        assert_eq!(seen, ["g/9", "h", "h/1", "h/10", "h/2", "h/3", "i/1"]);
    }

    async fn listing_skips_what_is_gone(subject: Subject) {
        let kv = &subject.kv;
        for key in ["k1", "k2", "k3", "k4", "k5"] {
            kv.put("ns", key, vec![1], None).await.unwrap();
        }
        assert!(kv.delete("ns", "k2").await.unwrap());
        kv.put("ns", "k3", vec![1], Some(SHORT_TTL)).await.unwrap();
        tokio::time::sleep(PAST_SHORT_TTL).await;
        // A page holds `limit` live keys, however many gone ones lie between them.
        assert_eq!(kv.list_keys("ns", "k", None, 2).await.unwrap(), ["k1", "k4"]);
        assert_eq!(kv.list_keys("ns", "k", Some("k1"), 2).await.unwrap(), ["k4", "k5"]);
        assert_eq!(kv.list_keys("ns", "", None, 100).await.unwrap(), ["k1", "k4", "k5"]);
    }

    async fn entries_expire(subject: Subject) {
        let kv = &subject.kv;
        kv.put("ns", "fresh", b"x".to_vec(), Some(Duration::from_secs(60))).await.unwrap();
        kv.put("ns", "gone", b"x".to_vec(), Some(SHORT_TTL)).await.unwrap();
        kv.put("ns", "forever", b"y".to_vec(), None).await.unwrap();
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert!(kv.get("ns", "fresh").await.unwrap().is_some(), "not yet expired");
        assert_eq!(kv.get("ns", "gone").await.unwrap(), None);
        assert_eq!(kv.list_keys("ns", "", None, 10).await.unwrap(), ["forever", "fresh"]);
        assert!(!kv.delete("ns", "gone").await.unwrap(), "an expired entry was not live");
        // A TTL past any clock is as good as none.
        kv.put("ns", "far", b"z".to_vec(), Some(Duration::from_millis(u64::MAX))).await.unwrap();
        assert!(kv.get("ns", "far").await.unwrap().is_some());
        assert!(kv.delete("ns", "far").await.unwrap());
        kv.put("ns", "gone2", b"x".to_vec(), Some(SHORT_TTL)).await.unwrap();
        kv.put("other", "gone3", b"x".to_vec(), Some(SHORT_TTL)).await.unwrap();
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(kv.purge_expired().await.unwrap(), 2, "one per namespace");
        assert_eq!(kv.purge_expired().await.unwrap(), 0, "nothing left to purge");
        assert!(kv.get("ns", "forever").await.unwrap().is_some());
        assert!(kv.get("ns", "fresh").await.unwrap().is_some());
        assert_eq!(kv.list_keys("ns", "", None, 10).await.unwrap(), ["forever", "fresh"]);

        // The store runs the same purge, once its backend exists.
        KvStore::with_backend(kv.clone()).purge_expired().await;
    }

    async fn a_later_set_replaces_the_expiry(subject: Subject) {
        let kv = &subject.kv;
        kv.put("ns", "kept", b"1".to_vec(), Some(SHORT_TTL)).await.unwrap();
        kv.put("ns", "kept", b"2".to_vec(), None).await.unwrap();
        kv.put("ns", "dropped", b"1".to_vec(), None).await.unwrap();
        kv.put("ns", "dropped", b"2".to_vec(), Some(SHORT_TTL)).await.unwrap();
        tokio::time::sleep(PAST_SHORT_TTL).await;
        assert_eq!(kv.get("ns", "kept").await.unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(kv.get("ns", "dropped").await.unwrap(), None);
        assert_eq!(kv.list_keys("ns", "", None, 10).await.unwrap(), ["kept"]);
    }

    async fn limits_are_checked_before_the_backend(subject: Subject) {
        let kv = subject.access("ns");
        let invalid = |result: Result<_, KvError>, what: &str| match result {
            Err(KvError::Invalid(text)) => assert!(text.contains(what), "{text}"),
            other => panic!("expected invalid ({what}), got {other:?}"),
        };
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        invalid(kv.set(&long_key, vec![1], None).await, "a key is 1 to 512 bytes");
        invalid(kv.set("", vec![1], None).await, "a key is 1 to 512 bytes");
        invalid(kv.get(&long_key).await.map(drop), "a key");
        invalid(kv.delete(&long_key).await.map(drop), "a key");
        invalid(kv.compare_and_delete(&long_key, vec![1]).await.map(drop), "a key");
        invalid(
            kv.compare_and_delete("k", vec![0; MAX_VALUE_BYTES + 1]).await.map(drop),
            "an expected value is at most 1 MiB",
        );
        invalid(kv.set("k", vec![0; MAX_VALUE_BYTES + 1], None).await, "at most 1 MiB");
        invalid(kv.set("k", vec![1], Some(0)).await, "ttl-ms must be at least 1");
        invalid(kv.list_keys(&long_key, None, 1).await.map(drop), "a prefix is at most");
        // Nothing of that reached the backend.
        assert_eq!(subject.kv.list_keys("ns", "", None, 10).await.unwrap(), Vec::<String>::new());

        // The largest key and value pass and round-trip.
        let key = "k".repeat(MAX_KEY_BYTES);
        let value: Vec<u8> = (0..MAX_VALUE_BYTES).map(|i| i as u8).collect();
        kv.set(&key, value.clone(), Some(60_000)).await.unwrap();
        assert_eq!(kv.get(&key).await.unwrap(), Some(value));

        // A listing returns at most MAX_LIST keys, whatever the guest asks.
        let keys: Vec<String> = (0..=MAX_LIST).map(|i| format!("{i:05}")).collect();
        let writes = keys.iter().map(|key| subject.kv.put("many", key, Vec::new(), None));
        futures_util::future::try_join_all(writes).await.unwrap();
        let keys = subject.access("many").list_keys("", None, u32::MAX).await.unwrap();
        assert_eq!(keys.len(), MAX_LIST as usize);

        // Without the grant, nothing reaches the store.
        let denied = KvAccess { store: None, namespace: "ns".into(), quota: Quota::default() };
        assert!(matches!(denied.get("k").await, Err(KvError::Denied)));
    }

    async fn concurrent_writes_all_land(subject: Subject) {
        let writes: u64 = 100;
        let tasks: Vec<_> = (0..writes)
            .map(|i| {
                let kv = subject.kv.clone();
                tokio::spawn(async move {
                    kv.put("ns", &format!("k{i:03}"), i.to_le_bytes().to_vec(), None).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        for i in 0..writes {
            let value = subject.kv.get("ns", &format!("k{i:03}")).await.unwrap();
            assert_eq!(value, Some(i.to_le_bytes().to_vec()), "k{i:03}");
        }
        assert_eq!(subject.kv.list_keys("ns", "", None, 1000).await.unwrap().len(), writes as usize);
    }

    #[tokio::test]
    async fn data_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path()).put("ns", "k", b"kept".to_vec(), None).await.unwrap();
        assert_eq!(open(dir.path()).get("ns", "k").await.unwrap().as_deref(), Some(&b"kept"[..]));
    }

    /// Entries that expired while the file was closed (the server stopped) are purged
    /// when the store opens it, so they stop counting against a quota without waiting
    /// for the periodic purge.
    #[tokio::test]
    async fn opening_the_store_purges_what_expired_while_it_was_closed() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Quota { max_keys: 2, max_bytes: 1 << 20 };
        {
            let kv = open(dir.path());
            for key in ["a", "b"] {
                kv.set("q", key, b"x".to_vec(), Some(SHORT_TTL), quota).await.unwrap().unwrap();
            }
        }
        tokio::time::sleep(PAST_SHORT_TTL).await;
        let store = KvStore::new(dir.path());
        let backend = store.backend().await.unwrap().clone();
        let mut outcome = Err(QuotaFull::Keys);
        for _ in 0..100 {
            outcome = backend.set("q", "c", b"x".to_vec(), None, quota).await.unwrap();
            if outcome.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(outcome, Ok(()), "the expired entries still count against the quota");
        assert_eq!(backend.purge_expired().await.unwrap(), 0, "purged already");
    }

    /// Purging a big table goes in batches of [`PURGE_BATCH`] entries, one commit each, so
    /// writes queued meanwhile wait for one batch, not for the whole scan.
    #[tokio::test]
    async fn purging_goes_in_small_batches_and_keeps_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path());
        let ttl = Some(Duration::from_millis(50));
        let keys: Vec<(String, Option<Duration>)> = (0..2500)
            .map(|i| (format!("old/{i:05}"), ttl))
            .chain((0..600).map(|i| (format!("new/{i:05}"), None)))
            .collect();
        // Queued together, so they share a few commits.
        let writes: Vec<_> = keys.iter().map(|(key, ttl)| kv.put("ns", key, b"x".to_vec(), *ttl)).collect();
        for write in writes {
            write.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = kv.commits();
        assert_eq!(kv.purge_expired().await.unwrap(), 2500);
        let batches = kv.commits() - before;
        assert!(batches >= 3100_u64.div_ceil(PURGE_BATCH as u64), "{batches} commits");
        assert_eq!(kv.list_keys("ns", "new/", None, 1000).await.unwrap().len(), 600);
        assert_eq!(kv.purge_expired().await.unwrap(), 0);
    }

    /// Writes that arrive while a commit is being made durable share the next commit, and
    /// every one of them is there, in its own key, after the file is reopened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(open(dir.path()));
        let before = kv.commits();
        let writes: u64 = 200;
        let tasks: Vec<_> = (0..writes)
            .map(|i| {
                let kv = kv.clone();
                tokio::spawn(async move {
                    kv.put("ns", &format!("k{i:03}"), i.to_le_bytes().to_vec(), None).await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let commits = kv.commits() - before;
        assert!(commits < writes, "{commits} commits for {writes} concurrent writes: none were grouped");
        // A delete in the same stream of writes still answers for its own key.
        assert!(kv.delete("ns", "k000").await.unwrap());
        drop(Arc::into_inner(kv).expect("the tasks are done"));

        let kv = open(dir.path());
        assert_eq!(kv.get("ns", "k000").await.unwrap(), None);
        for i in 1..writes {
            let value = kv.get("ns", &format!("k{i:03}")).await.unwrap();
            assert_eq!(value, Some(i.to_le_bytes().to_vec()), "k{i:03}");
        }
    }

    #[tokio::test]
    async fn a_file_held_by_another_opener_is_waited_for_then_named() {
        let dir = tempfile::tempdir().unwrap();
        // The process being replaced, holding the file.
        let old = open(dir.path());
        old.put("ns", "k", b"from the old process".to_vec(), None).await.unwrap();

        // Held for longer than a call waits: a named error, and each call tries again.
        let mut store = KvStore::new(dir.path());
        store.in_use_wait = Duration::from_millis(200);
        for _ in 0..2 {
            let err = store.backend().await.err().expect("the file is held");
            assert!(err.0.contains("in use by another process") && err.0.contains("kv.redb"), "{err}");
        }

        // Let go while a call waits: that call gets the file.
        store.in_use_wait = Duration::from_secs(30);
        let store = Arc::new(store);
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.backend().await.cloned() }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the call waits while the file is held");
        drop(old);
        let backend = waiting.await.unwrap().expect("free again");
        assert_eq!(backend.get("ns", "k").await.unwrap(), Some(b"from the old process".to_vec()));
    }

    #[tokio::test]
    async fn an_unusable_data_dir_is_a_named_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let store = KvStore::new(&file.join("sub"));
        let err = store.backend().await.err().expect("cannot open under a file");
        assert!(err.0.contains("data directory"), "{err}");
    }
}
