//! Finding, checking and compiling addons, and making one instance per connection.
//!
//! An addon is `<dir>/<name>.wasm`: a WebAssembly component targeting the
//! `sockhost:addon/addon` world, with an optional manifest `<dir>/<name>.toml` that sets
//! its policy (see [`crate::policy`]). Loading is all-or-nothing per file and never fatal
//! for the server: a file that fails is reported with its path and the exact reason
//! ([`LoadError`]) and skipped, and the rest still mount.
//!
//! Each file is compiled once (or its native code taken from the [`crate::cache`]), on
//! its own thread, then linked into an `InstancePre`: imports
//! are resolved at load time, so creating the per-connection instance later is only a
//! copy-on-write memory image and a few pointers from the pooling allocator. The
//! [`Loader`] does this for start-up, for hot reload ([`crate::reload`]) and for
//! `sockhost check` alike. The `handler` export is required; `channel-handler` is looked
//! up too, and its absence only means the addon's instances cannot subscribe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre};
use wasmtime::{Engine, Store};

use crate::bindings::{
    ChannelHandler, ChannelHandlerIndices, Handler, HandlerIndices, Hibernation, HibernationIndices,
};
use crate::cache::CompileCache;
use crate::error::FailureKind;
use crate::file_stamp::FileStamp;
use crate::host::{HostLinkers, HostState};
use crate::metrics::{AddonStats, Metrics};
use crate::policy::{AddonPolicy, ManifestError};
use crate::sandbox;

/// Why an addon file was not mounted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "invalid addon name {0:?}: use lowercase letters, digits, '-' and '_' (the name becomes the URL path /ws/<name>)"
    )]
    InvalidName(String),
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a WebAssembly file (it does not start with the \\0asm magic bytes)")]
    NotWasm,
    #[error(
        "this is a core WebAssembly module, not a component; build the addon for wasm32-wasip2 (cargo build --target wasm32-wasip2) or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    #[error("invalid component: {0:#}")]
    Compile(anyhow::Error),
    #[error("{0:#}")]
    Link(anyhow::Error),
    #[error("does not export the sockhost:addon/handler@0.1.x interface: {0:#}")]
    WrongWorld(anyhow::Error),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "its memory_limit of {limit} is more than this server reserves per instance, {reservation} \
         (limits.memory_reservation, fixed at start-up): lower memory_limit, or raise limits.memory_reservation and \
         restart"
    )]
    OverReservation { limit: String, reservation: String },
}

/// A compiled, linked addon, ready to instantiate once per connection. One value is one
/// version of the addon: a reload makes a new one, and each connection keeps an `Arc` of
/// the version it started on.
pub struct LoadedAddon {
    name: String,
    path: PathBuf,
    pre: InstancePre<HostState>,
    /// Where the required `handler` export's functions are.
    handler: HandlerIndices,
    /// Where `channel-handler`'s function is, when the component exports it.
    channel_handler: Option<ChannelHandlerIndices>,
    /// Where `hibernation`'s functions are, when the component exports them.
    hibernation: Option<HibernationIndices>,
    /// Shared with every connection of this version, so a connection costs no copy of it.
    policy: Arc<AddonPolicy>,
    /// SHA-256 of the wasm bytes: names the version in logs.
    sha256: [u8; 32],
    /// The files as they were when this version was read; the watcher compares against it.
    pub(crate) fingerprint: Fingerprint,
    /// Connection count and metric handles, shared by every version of this addon.
    stats: Arc<AddonStats>,
}

impl LoadedAddon {
    /// The name the addon is mounted under (`/ws/<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For the mount log line: `" (grants: kv; outbound HTTP to ...)"`, or `""` when the
    /// manifest grants nothing. Never contains a secret.
    /// Config values are left to `sockhost check`: a FAQ would fill the line.
    pub fn grants_note(&self) -> String {
        let mut grants = self.policy.capabilities();
        let keys: Vec<&str> = self.policy.config.keys().collect();
        if !keys.is_empty() {
            grants.push(format!("config keys {}", keys.join(", ")));
        }
        if grants.is_empty() { String::new() } else { format!(" (grants: {})", grants.join("; ")) }
    }

    /// Logs one warning per `[config]` value whose environment variable is not set.
    pub fn warn_missing_env(&self) {
        for (key, var) in &self.policy.config.missing_env {
            tracing::warn!(
                addon = self.name(),
                "config key `{key}` names ${var}, which is not set; the key is absent"
            );
        }
    }

    /// The policy from the addon's manifest (or the defaults).
    pub fn policy(&self) -> &Arc<AddonPolicy> {
        &self.policy
    }

    /// The first 12 hex digits of the wasm's SHA-256: which build this is.
    pub fn version(&self) -> String {
        crate::cache::hex(&self.sha256[..6])
    }

    /// The interfaces the component imports, sorted: what it asks of the host.
    pub fn imports(&self) -> Vec<String> {
        let component = self.pre.component();
        let mut names: Vec<String> =
            component.component_type().imports(self.pre.engine()).map(|(name, _)| name.to_owned()).collect();
        names.sort();
        names
    }

    /// Connections open to this addon now, on every version of it.
    pub fn open_connections(&self) -> u32 {
        self.stats.open_connections()
    }

    pub(crate) fn stats(&self) -> &Arc<AddonStats> {
        &self.stats
    }

    /// Reserves one of the addon's `max_connections`; released when the guard drops.
    /// The count is shared with the addon's other versions, so the limit holds across
    /// reloads.
    pub(crate) fn reserve_connection(&self) -> Option<AddonSlot> {
        self.stats.try_open(self.policy.max_connections).then(|| AddonSlot(self.stats.clone()))
    }

    /// How long its connections idle before they are hibernated; `None` when never (the
    /// component does not export `hibernation`, or the manifest says 0).
    pub fn hibernate_after(&self) -> Option<std::time::Duration> {
        self.policy.hibernate_after(self.hibernation.is_some())
    }

    /// Whether the component exports `hibernation`.
    pub fn exports_hibernation(&self) -> bool {
        self.hibernation.is_some()
    }

    /// Whether the component exports `channel-handler`, so it can receive channel messages.
    pub fn receives_channel_messages(&self) -> bool {
        self.channel_handler.is_some()
    }

    /// A fresh instance of the addon with its own store and limits, for one connection.
    pub async fn instantiate(
        &self,
        state: HostState,
    ) -> Result<(Store<HostState>, AddonInstance), InstantiateError> {
        self.instantiate_keeping(state).await.map_err(|(err, _)| err)
    }

    /// [`LoadedAddon::instantiate`], giving the state back on failure: a hibernated
    /// connection that cannot wake still has its socket to say so on.
    pub(crate) async fn instantiate_keeping(
        &self,
        mut state: HostState,
    ) -> Result<(Store<HostState>, AddonInstance), (InstantiateError, HostState)> {
        state.channels.can_receive = self.channel_handler.is_some();
        let mut store = crate::instance_heap::in_instance_scope(|| {
            let mut store = Store::new(self.pre.engine(), state);
            // The guest's own handle tables (handles to host resources, and to resources it
            // makes itself with `resource.new`), beside the host's table.
            store.set_max_component_handles(sandbox::max_component_handles(&self.policy));
            sandbox::install(&mut store);
            store
        });
        sandbox::start_callback(&mut store, None);
        let meter = store.data().limits.meter();
        let made = meter
            .run(async {
                let instance = self.pre.instantiate_async(&mut store).await?;
                let handler = self.handler.load(&mut store, &instance)?;
                let channel_handler = match &self.channel_handler {
                    Some(indices) => Some(indices.load(&mut store, &instance)?),
                    None => None,
                };
                let hibernation = match &self.hibernation {
                    Some(indices) => Some(indices.load(&mut store, &instance)?),
                    None => None,
                };
                wasmtime::Result::Ok(AddonInstance { handler, channel_handler, hibernation })
            })
            .await;
        match made {
            Ok(instance) => Ok((store, instance)),
            Err(err) => {
                let (kind, cause) = match capacity_cause(&err) {
                    Some(cause) => (FailureKind::InstanceCapacity, cause),
                    None => sandbox::classify(&mut store, &self.policy, &err),
                };
                Err((InstantiateError { kind, cause }, store.into_data()))
            }
        }
    }
}

/// An optional export's indices: `None` when the component does not export the interface,
/// an error when it exports it with the wrong shape (refused, rather than treated as
/// absent).
fn optional_export<T>(
    component: &Component,
    engine: &wasmtime::Engine,
    interface: &str,
    found: wasmtime::Result<T>,
) -> Result<Option<T>, LoadError> {
    match found {
        Ok(indices) => Ok(Some(indices)),
        Err(err) => {
            let name = format!("sockhost:addon/{interface}");
            let exported =
                component.component_type().exports(engine).any(|(export, _)| export.starts_with(&name));
            if exported {
                return Err(LoadError::WrongWorld(
                    anyhow::Error::from(err).context(format!("its {name} export")),
                ));
            }
            Ok(None)
        }
    }
}

/// Whether making an instance failed for want of room rather than by the addon's doing:
/// the pool had no free slot of some kind, or the system refused memory or a mapping
/// (`ENOMEM`, e.g. past `vm.max_map_count`). Returns the cause for the log and the answer.
fn capacity_cause(err: &wasmtime::Error) -> Option<String> {
    for cause in err.chain() {
        if let Some(limit) = cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
            return Some(format!("has no free instance slot: {limit} (limits.max_live_instances)"));
        }
        // wasmtime's own mmap errors may carry the errno in their text only.
        let enomem =
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::ENOMEM))
                || cause.to_string().ends_with("(os error 12)");
        if enomem {
            return Some(format!(
                "could not get memory or a memory mapping from the system ({cause}); see `sockhost check` \
                 for vm.max_map_count and limits.max_live_instances"
            ));
        }
    }
    None
}

/// One connection's instance: its exports, ready to call.
pub struct AddonInstance {
    pub(crate) handler: Handler,
    pub(crate) channel_handler: Option<ChannelHandler>,
    pub(crate) hibernation: Option<Hibernation>,
}

/// Why a new instance could not be made: its initial memory is over `memory_limit`, its
/// start-up code trapped or ran past `cpu_limit_ms`, or the instance pool is exhausted.
#[derive(Debug)]
pub struct InstantiateError {
    /// How it is counted (`instance_capacity`, `addon_oom`, `addon_timeout` or `addon_trap`).
    pub kind: FailureKind,
    /// One line for the log and the HTTP answer.
    pub cause: String,
}

/// One of an addon's connection slots, held for the life of a connection.
pub(crate) struct AddonSlot(Arc<AddonStats>);

impl Drop for AddonSlot {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The addons mounted by this server, by name. The server swaps in a new set on every
/// reload; a set itself never changes.
#[derive(Default, Clone)]
pub struct AddonSet {
    by_name: BTreeMap<String, Arc<LoadedAddon>>,
}

impl AddonSet {
    pub fn get(&self, name: &str) -> Option<&Arc<LoadedAddon>> {
        self.by_name.get(name)
    }

    /// Mounted addon names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Mounted addons, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LoadedAddon>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Mounts `addon`, returning the version it replaces.
    pub(crate) fn insert(&mut self, addon: Arc<LoadedAddon>) -> Option<Arc<LoadedAddon>> {
        self.by_name.insert(addon.name.clone(), addon)
    }

    pub(crate) fn remove(&mut self, name: &str) -> Option<Arc<LoadedAddon>> {
        self.by_name.remove(name)
    }
}

/// A file that could not be mounted, and why.
#[derive(Debug)]
pub struct Rejected {
    pub path: PathBuf,
    pub error: LoadError,
    /// The files' state before they were read, so the watcher retries only after a change.
    pub(crate) fingerprint: Option<Fingerprint>,
}

/// What scanning a directory produced.
pub struct ScanOutcome {
    pub addons: AddonSet,
    pub rejected: Vec<Rejected>,
}

/// The state of an addon's files: its `.wasm` and its optional manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    wasm: FileStamp,
    manifest: Option<FileStamp>,
}

impl Fingerprint {
    /// Fails when the `.wasm` cannot be read (for example, it is gone).
    pub(crate) fn of(wasm: &Path) -> std::io::Result<Fingerprint> {
        let wasm_stamp = FileStamp::of(wasm)?;
        let manifest = FileStamp::of(&wasm.with_extension("toml")).ok();
        Ok(Fingerprint { wasm: wasm_stamp, manifest })
    }
}

/// `*.wasm` files directly in `dir`, sorted.
pub(crate) fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// Compiles and links addon files for one engine: the one place where a file becomes a
/// [`LoadedAddon`], at start-up, on reload and in `sockhost check`.
pub struct Loader {
    engine: Engine,
    /// The engine's linear-memory reservation: the largest `memory_limit` it can hold.
    memory_reservation: u64,
    linkers: HostLinkers,
    cache: Option<CompileCache>,
    metrics: Arc<Metrics>,
}

impl Loader {
    /// `memory_reservation` is the one the engine was built with ([`crate::capacity::Plan`]).
    pub fn new(
        engine: Engine,
        memory_reservation: u64,
        linkers: HostLinkers,
        cache: Option<CompileCache>,
        metrics: Arc<Metrics>,
    ) -> Loader {
        Loader { engine, memory_reservation, linkers, cache, metrics }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Loads every `*.wasm` in `dir`, compiling them in parallel. Files that fail are
    /// returned in [`ScanOutcome::rejected`]; a missing directory is an error.
    pub fn load_dir(&self, dir: &Path) -> std::io::Result<ScanOutcome> {
        let files = wasm_files(dir)?;
        type Loaded = (PathBuf, Option<Fingerprint>, Result<LoadedAddon, LoadError>);
        let results: Vec<Loaded> = std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .into_iter()
                .map(|path| {
                    scope.spawn(move || {
                        let fingerprint = Fingerprint::of(&path).ok();
                        let result = self.load_file(&path);
                        (path, fingerprint, result)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("addon loader thread panicked")).collect()
        });

        let mut outcome = ScanOutcome { addons: AddonSet::default(), rejected: Vec::new() };
        for (path, fingerprint, result) in results {
            match result {
                Ok(addon) => {
                    outcome.addons.insert(Arc::new(addon));
                }
                Err(error) => outcome.rejected.push(Rejected { path, error, fingerprint }),
            }
        }
        Ok(outcome)
    }

    /// Loads one addon file: checks its name and kind, reads its manifest, compiles it
    /// (or takes it from the cache) and links it. Nothing is mounted here; a caller swaps
    /// the result in only when this succeeded, so a broken file never replaces a good one.
    pub fn load_file(&self, path: &Path) -> Result<LoadedAddon, LoadError> {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if !is_valid_name(&stem) {
            return Err(LoadError::InvalidName(stem));
        }
        // Stamped before reading: a write that lands after this shows up as a change on
        // the watcher's next look, so it is never missed.
        let fingerprint = Fingerprint::of(path)?;
        let bytes = std::fs::read(path)?;
        check_header(&bytes)?;
        let policy = AddonPolicy::for_addon(path)?;
        if policy.memory_limit as u64 > self.memory_reservation {
            return Err(LoadError::OverReservation {
                limit: crate::policy::format_size(policy.memory_limit as u64),
                reservation: crate::policy::format_size(self.memory_reservation),
            });
        }

        let started = Instant::now();
        let sha256: [u8; 32] = Sha256::digest(&bytes).into();
        let component = match &self.cache {
            Some(cache) => cache.component(&self.engine, &stem, &bytes, &sha256, &self.metrics),
            None => Component::from_binary(&self.engine, &bytes),
        }
        .map_err(|e| LoadError::Compile(e.into()))?;
        // wasi:http is linked only for an addon whose manifest grants outbound hosts.
        let linker = self
            .linkers
            .for_component(&component, policy.outbound.is_granted())
            .map_err(|e| LoadError::Link(e.into()))?;
        let pre = linker.instantiate_pre(&component).map_err(|e| LoadError::Link(e.into()))?;
        let handler = HandlerIndices::new(&pre).map_err(|e| LoadError::WrongWorld(e.into()))?;
        // Optional: components built against 0.1.0 and 0.1.1 do not have it. One that has
        // it with the wrong shape is refused rather than treated as not subscribing.
        let channel_handler =
            optional_export(&component, &self.engine, "channel-handler", ChannelHandlerIndices::new(&pre))?;
        let hibernation =
            optional_export(&component, &self.engine, "hibernation", HibernationIndices::new(&pre))?;
        if hibernation.is_none() && policy.hibernate_after_ms.is_some_and(|ms| ms > 0) {
            tracing::warn!(
                addon = %stem,
                "hibernate_after_ms is set but the component does not export sockhost:addon/hibernation \
                 (the SDK's `export_addon!(T, hibernate)`): its connections stay live"
            );
        }
        let elapsed = started.elapsed();
        self.metrics.compiled(&stem, elapsed);
        tracing::debug!(addon = %stem, elapsed_ms = elapsed.as_millis() as u64, "compiled");
        let stats = self.metrics.addon(&stem);
        Ok(LoadedAddon {
            name: stem,
            path: path.to_owned(),
            pre,
            handler,
            channel_handler,
            hibernation,
            policy: Arc::new(policy),
            sha256,
            fingerprint,
            stats,
        })
    }
}

/// Addon names become URL path segments: keep them to a safe, unambiguous alphabet.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Tells a component from a core module or a non-wasm file before compiling, so the
/// error names the real problem instead of a parser offset.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // The 4 bytes after the magic are a version (u16) and a layer (u16): layer 0 is a core
    // module, layer 1 a component.
    if bytes[6..8] == [0, 0] {
        return Err(LoadError::CoreModule);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_url_safe() {
        for ok in ["echo", "aikefu", "a-b_c", "v2"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        for bad in ["", "Echo", "a b", "a.b", "中文", "a/b", "../x"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn running_out_of_memory_or_mappings_is_capacity_not_a_trap() {
        let enomem = wasmtime::Error::from(std::io::Error::from_raw_os_error(libc::ENOMEM))
            .context("failed to create memory pool mapping");
        let cause = capacity_cause(&enomem).expect("ENOMEM is capacity");
        assert!(cause.contains("vm.max_map_count") && cause.contains("limits.max_live_instances"), "{cause}");
        let trap = wasmtime::Error::from(wasmtime::Trap::UnreachableCodeReached);
        assert_eq!(capacity_cause(&trap), None);
    }

    #[test]
    fn headers_are_classified() {
        assert!(matches!(check_header(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
