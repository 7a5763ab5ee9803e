//! Hot reload of the addons directory: new, changed and removed addons are picked up
//! while the server runs, without a restart.
//!
//! The watcher polls the directory every `server.reload_poll_ms` (250 ms by default) and
//! looks only at file metadata (size, modification time, inode) of each `<name>.wasm` and
//! its manifest `<name>.toml`. Polling rather than file-system events keeps it the same
//! on every platform and file system (network mounts, container volumes) and needs no
//! extra thread.
//!
//! Rules:
//! - **Debounce.** A file is acted on only when two consecutive looks see the same
//!   metadata, so a copy in progress is left alone until it stops changing.
//! - **Validate, then swap.** The new version is compiled and linked in full (exactly as
//!   at start-up) before anything changes; only a version that loads replaces the old
//!   one. A broken one (not wasm, wrong world, unknown import, invalid manifest, a file cut
//!   short) is logged with the reason and the old version keeps serving. The same broken
//!   files are not retried until they change again.
//! - **Versions.** Each connection holds an `Arc` of the version it started on, so open
//!   connections finish on it while new connections get the new one. An old version is
//!   freed when its last connection ends.
//! - **Removal.** When `<name>.wasm` has been gone for two looks, the addon is unmounted:
//!   new connections get 404. Open connections are not cut: they go on, on the version
//!   they have, until they end (as Durable Objects and Spin do on a deploy). Dropping them
//!   would lose in-flight replies for nothing; an operator who wants them gone restarts.
//! - Connection limits hold across versions: the count lives in the addon's shared
//!   [`crate::metrics::AddonStats`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::addons::{self, AddonSet, Fingerprint, LoadError, LoadedAddon, Loader};

/// The addons being served now. Readers take the current set once per connection; the
/// watcher replaces the whole set (copy on write), so a reader never sees half a change.
#[derive(Default)]
pub struct Mounted {
    current: RwLock<Arc<AddonSet>>,
}

impl Mounted {
    pub fn new(set: AddonSet) -> Mounted {
        Mounted { current: RwLock::new(Arc::new(set)) }
    }

    /// The current set.
    pub fn get(&self) -> Arc<AddonSet> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut AddonSet)) -> usize {
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = AddonSet::clone(&current);
        change(&mut next);
        let len = next.len();
        *current = Arc::new(next);
        len
    }
}

/// Everything the watcher needs.
pub(crate) struct Watcher {
    pub loader: Arc<Loader>,
    pub dir: PathBuf,
    pub mounted: Arc<Mounted>,
    pub interval: Duration,
    /// `ws://host:port`, for the URLs in log lines.
    pub base_url: String,
    /// Files that failed at start-up, with their state then: not retried until they change.
    pub rejected: Vec<(PathBuf, Option<Fingerprint>)>,
}

impl Watcher {
    /// Polls until `shutdown` is cancelled.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut failed: HashMap<PathBuf, Fingerprint> =
            self.rejected.iter().filter_map(|(path, fp)| fp.map(|fp| (path.clone(), fp))).collect();
        let mut previous = self.look();
        let mut dir_error_logged = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            let Some(now) = self.look() else {
                if !dir_error_logged {
                    tracing::warn!(dir = %self.dir.display(), "cannot read the addons directory; mounted addons keep serving");
                    dir_error_logged = true;
                }
                continue;
            };
            dir_error_logged = false;
            let set = self.mounted.get();
            let settled = |path: &PathBuf| previous.as_ref().and_then(|p| p.get(path).copied());

            let mut to_load = Vec::new();
            for (path, fingerprint) in &now {
                if settled(path) != Some(*fingerprint) {
                    continue; // new or still changing: wait for a second identical look
                }
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let loaded = set.get(&stem).filter(|addon| addon.path() == path.as_path());
                if loaded.is_some_and(|addon| addon.fingerprint == *fingerprint)
                    || failed.get(path) == Some(fingerprint)
                {
                    continue;
                }
                to_load.push(path.clone());
            }
            let gone: Vec<Arc<LoadedAddon>> = set
                .iter()
                .filter(|addon| {
                    let path = addon.path().to_owned();
                    !now.contains_key(&path) && previous.as_ref().is_some_and(|p| !p.contains_key(&path))
                })
                .cloned()
                .collect();
            failed.retain(|path, _| now.contains_key(path));
            previous = Some(now);

            for addon in gone {
                self.unmount(&addon);
            }
            for path in to_load {
                let loader = self.loader.clone();
                let file = path.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let fingerprint = Fingerprint::of(&file).ok();
                    (loader.load_file(&file), fingerprint)
                })
                .await;
                match result {
                    Ok((Ok(addon), _)) => {
                        failed.remove(&path);
                        self.mount(addon);
                    }
                    Ok((Err(error), fingerprint)) => {
                        self.refuse(&path, &error);
                        if let Some(fingerprint) = fingerprint {
                            failed.insert(path, fingerprint);
                        }
                    }
                    Err(panic) => tracing::error!(file = %path.display(), "addon loader panicked: {panic}"),
                }
            }
        }
    }

    /// The metadata of every `*.wasm` file now, or `None` when the directory cannot be read.
    fn look(&self) -> Option<HashMap<PathBuf, Fingerprint>> {
        let files = addons::wasm_files(&self.dir).ok()?;
        Some(files.into_iter().filter_map(|path| Fingerprint::of(&path).ok().map(|fp| (path, fp))).collect())
    }

    fn mount(&self, addon: LoadedAddon) {
        let addon = Arc::new(addon);
        let name = addon.name().to_owned();
        let version = addon.version();
        let metrics = self.loader.metrics().clone();
        let mut old = None;
        let mounted = self.mounted.update(|set| old = set.insert(addon.clone()));
        metrics.set_mounted(mounted);
        let url = format!("{}/ws/{name}", self.base_url);
        match old {
            Some(old) => {
                metrics.reloaded(&name, "ok");
                tracing::info!(
                    addon = %name,
                    version = %version,
                    old_version = %old.version(),
                    open = old.open_connections(),
                    "reloaded {url}: new connections get version {version}; open connections stay on the version they started on{}",
                    addon.grants_note()
                );
                addon.warn_missing_env();
            }
            None => {
                metrics.reloaded(&name, "ok");
                tracing::info!(addon = %name, version = %version, "mounted {url}{}", addon.grants_note());
                addon.warn_missing_env();
            }
        }
    }

    fn unmount(&self, addon: &LoadedAddon) {
        let name = addon.name().to_owned();
        let metrics = self.loader.metrics();
        let mounted = self.mounted.update(|set| {
            set.remove(&name);
        });
        metrics.set_mounted(mounted);
        metrics.reloaded(&name, "removed");
        tracing::info!(
            addon = %name,
            version = %addon.version(),
            open = addon.open_connections(),
            "unmounted /ws/{name}: {} was removed; new connections get 404, open connections continue until they end",
            addon.path().display()
        );
    }

    fn refuse(&self, path: &std::path::Path, error: &LoadError) {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        self.loader.metrics().reloaded(&stem, "failed");
        match self.mounted.get().get(&stem) {
            Some(serving) => tracing::error!(
                addon = %stem,
                file = %path.display(),
                version = %serving.version(),
                "addon not reloaded: {error}; version {} keeps serving",
                serving.version()
            ),
            None => tracing::error!(file = %path.display(), "addon not mounted: {error}"),
        }
    }
}
