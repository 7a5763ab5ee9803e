//! Finding, checking and compiling addons, and making one instance per connection.
//!
//! An addon is `<dir>/<name>.wasm`: a WebAssembly component targeting the
//! `sockhost:addon/addon` world, with an optional manifest `<dir>/<name>.toml` that sets
//! its policy (see [`crate::policy`]). Loading is all-or-nothing per file and never fatal
//! for the server: a file that fails is reported with its path and the exact reason
//! ([`LoadError`]) and skipped, and the rest still mount.
//!
//! Each file is compiled once, on its own thread, then linked into an [`AddonPre`]
//! (wasmtime's `InstancePre`): imports are resolved at load time, so creating the
//! per-connection instance later is only a copy-on-write memory image and a few
//! pointers from the pooling allocator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use crate::bindings::{Addon, AddonPre};
use crate::host::HostState;
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
    #[error("does not export the sockhost:addon/handler@0.1.1 interface: {0:#}")]
    WrongWorld(anyhow::Error),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// A compiled, linked addon, ready to instantiate once per connection.
pub struct LoadedAddon {
    name: String,
    path: PathBuf,
    pre: AddonPre<HostState>,
    policy: AddonPolicy,
    /// Connections open to this addon now.
    open_connections: AtomicU32,
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

    /// The policy from the addon's manifest (or the defaults).
    pub fn policy(&self) -> &AddonPolicy {
        &self.policy
    }

    /// Connections open to this addon now.
    pub fn open_connections(&self) -> u32 {
        self.open_connections.load(Ordering::Relaxed)
    }

    /// Reserves one of the addon's `max_connections`; released when the guard drops.
    pub(crate) fn reserve_connection(self: &Arc<Self>) -> Option<AddonSlot> {
        let max = self.policy.max_connections;
        self.open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .ok()
            .map(|_| AddonSlot(self.clone()))
    }

    /// A fresh instance of the addon with its own store and limits, for one connection.
    pub async fn instantiate(&self, state: HostState) -> wasmtime::Result<(Store<HostState>, Addon)> {
        let mut store = Store::new(self.pre.engine(), state);
        sandbox::install(&mut store);
        sandbox::start_callback(&mut store);
        let instance = self.pre.instantiate_async(&mut store).await?;
        Ok((store, instance))
    }
}

/// One of an addon's connection slots, held for the life of a connection.
pub(crate) struct AddonSlot(Arc<LoadedAddon>);

impl Drop for AddonSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The addons mounted by this server, by name.
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

    /// Mounted addons, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<LoadedAddon>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// A file that could not be mounted, and why.
#[derive(Debug)]
pub struct Rejected {
    pub path: PathBuf,
    pub error: LoadError,
}

/// What scanning a directory produced.
pub struct ScanOutcome {
    pub addons: AddonSet,
    pub rejected: Vec<Rejected>,
}

/// Loads every `*.wasm` in `dir`, compiling them in parallel. Files that fail are
/// returned in [`ScanOutcome::rejected`]; a missing directory yields no addons.
pub fn load_dir(engine: &Engine, linker: &Linker<HostState>, dir: &Path) -> std::io::Result<ScanOutcome> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wasm") && path.is_file())
        .collect();
    files.sort();

    let results: Vec<(PathBuf, Result<LoadedAddon, LoadError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .into_iter()
            .map(|path| {
                scope.spawn(move || {
                    let result = load_file(engine, linker, &path);
                    (path, result)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("addon loader thread panicked")).collect()
    });

    let mut outcome = ScanOutcome { addons: AddonSet::default(), rejected: Vec::new() };
    for (path, result) in results {
        match result {
            Ok(addon) => {
                outcome.addons.by_name.insert(addon.name.clone(), Arc::new(addon));
            }
            Err(error) => outcome.rejected.push(Rejected { path, error }),
        }
    }
    Ok(outcome)
}

/// Loads one addon file: checks its name and kind, compiles it and links it.
pub fn load_file(engine: &Engine, linker: &Linker<HostState>, path: &Path) -> Result<LoadedAddon, LoadError> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if !is_valid_name(&stem) {
        return Err(LoadError::InvalidName(stem));
    }
    let bytes = std::fs::read(path)?;
    check_header(&bytes)?;
    let policy = AddonPolicy::for_addon(path)?;

    let started = Instant::now();
    let component = Component::from_binary(engine, &bytes).map_err(|e| LoadError::Compile(e.into()))?;
    let instance_pre = linker.instantiate_pre(&component).map_err(|e| LoadError::Link(e.into()))?;
    let pre = AddonPre::new(instance_pre).map_err(|e| LoadError::WrongWorld(e.into()))?;
    tracing::debug!(addon = %stem, elapsed_ms = started.elapsed().as_millis() as u64, "compiled");
    Ok(LoadedAddon { name: stem, path: path.to_owned(), pre, policy, open_connections: AtomicU32::new(0) })
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
    fn headers_are_classified() {
        assert!(matches!(check_header(b"hello world"), Err(LoadError::NotWasm)));
        assert!(matches!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule)));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
    }
}
