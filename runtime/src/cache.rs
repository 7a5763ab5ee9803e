//! The compiled-code cache: native code for each addon, kept on disk so a restart with
//! many addons does not compile them all again.
//!
//! An entry is keyed by the SHA-256 of the wasm bytes and of the engine's compatibility
//! hash (wasmtime's version and every compiler and engine setting that changes the
//! code), so a new wasmtime, another CPU feature set or another pool size simply misses.
//!
//! Loading compiled code means trusting it to be what wasmtime wrote: wasmtime checks that
//! an artifact matches its version and settings, but not that it is whole. So each entry
//! carries a header written here (magic, payload length, SHA-256 of the payload), and an
//! entry is used only if the whole file checks out. Anything else (a truncated write from
//! a crash, a flipped bit, a file of another format, an artifact wasmtime refuses) is
//! logged, deleted and recompiled, never trusted and never fatal. The bytes are checked
//! in memory and handed to wasmtime from that same buffer, so the file cannot change
//! between the check and the load. Entries are written to a temporary file and renamed,
//! so readers see a whole entry or none.
//!
//! The checksum guards against accidents, not attackers: it is not keyed, and whoever can
//! write the cache directory can make the server run their native code. So who could have
//! written it is checked before anything is read (`crate::private_files`): the directory
//! and each entry must be owned by the server's effective user and not writable by group
//! or others. A directory that fails is not used at all (nothing is loaded from it or
//! written to it; every addon is compiled) and is warned about once; an entry that fails
//! is not loaded, but compiled again and replaced by a sound one. The directory is made
//! 0700 and entries 0600, whatever the umask. An entry is opened without following a
//! symbolic link and checked on the open file, which is then the one read. Deleting the
//! directory is always safe; entries are never cleaned up by the server (one per addon
//! build).

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::metrics::Metrics;
use crate::private_files;

/// First bytes of every entry; the digit is this module's format version.
const MAGIC: &[u8; 16] = b"sockhost-cwasm1\n";
const HEADER_LEN: usize = MAGIC.len() + 8 + 32;

/// A cache directory for one engine configuration.
pub struct CompileCache {
    dir: PathBuf,
    /// SHA-256 of the engine's compatibility hash.
    engine_key: [u8; 32],
    /// Whether the directory was found untrusted and said so (once per cache).
    warned_dir: AtomicBool,
}

/// Feeds `Hash` output into SHA-256, so the engine's compatibility hash becomes a digest
/// that is the same in every process (std's `DefaultHasher` promises no such thing).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

impl CompileCache {
    /// The cache in `dir` for `engine`. The directory is made with the first entry, so a
    /// server without addons leaves nothing behind.
    /// A directory that cannot be written only costs compiles: each failed write is
    /// logged and counted (`write_failed`), and loading carries on.
    pub fn open(dir: &Path, engine: &Engine) -> CompileCache {
        let mut hasher = ShaHasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache {
            dir: dir.to_owned(),
            engine_key: hasher.0.finalize().into(),
            warned_dir: AtomicBool::new(false),
        }
    }

    /// The file an entry for wasm with digest `wasm_sha256` lives in.
    pub fn entry_path(&self, wasm_sha256: &[u8; 32]) -> PathBuf {
        let key = Sha256::new().chain_update(self.engine_key).chain_update(wasm_sha256).finalize();
        self.dir.join(format!("{}.cwasm", hex(&key)))
    }

    /// The component for `bytes` (whose digest is `wasm_sha256`): from the cache when a
    /// sound entry exists, else compiled and stored. Only compiling can fail.
    pub fn component(
        &self,
        engine: &Engine,
        name: &str,
        bytes: &[u8],
        wasm_sha256: &[u8; 32],
        metrics: &Metrics,
    ) -> wasmtime::Result<Component> {
        if !self.usable_dir() {
            metrics.cache("untrusted");
            return Component::from_binary(engine, bytes);
        }
        let path = self.entry_path(wasm_sha256);
        match read_entry(&path) {
            Ok(entry) => match payload(&entry) {
                Ok(code) => {
                    // SAFETY: the payload is byte for byte what `Component::serialize`
                    // wrote for this engine configuration (checked against the digest in
                    // our header, in this same buffer); wasmtime checks its own version
                    // and settings again. See the module doc for who may write the dir.
                    match unsafe { Component::deserialize(engine, code) } {
                        Ok(component) => {
                            metrics.cache("hit");
                            tracing::debug!(addon = name, entry = %path.display(), "compiled code loaded from the cache");
                            return Ok(component);
                        }
                        Err(err) => {
                            self.discard(&path, name, &format!("wasmtime refused it: {err:#}"), metrics)
                        }
                    }
                }
                Err(why) => self.discard(&path, name, why, metrics),
            },
            Err(EntryError::Missing) => metrics.cache("miss"),
            Err(EntryError::Untrusted(why)) => {
                metrics.cache("untrusted");
                tracing::warn!(addon = name, entry = %path.display(), "compiled-code cache entry is not trusted ({why}); not loaded: recompiling and replacing it");
            }
            Err(EntryError::Io(err)) => {
                tracing::warn!(addon = name, entry = %path.display(), "cannot read the compiled-code cache entry ({err}); recompiling");
                metrics.cache("miss");
            }
        }
        let component = Component::from_binary(engine, bytes)?;
        match component.serialize() {
            Ok(code) => {
                if let Err(err) = write_atomically(&path, &code) {
                    metrics.cache("write_failed");
                    tracing::warn!(addon = name, entry = %path.display(), "cannot write the compiled-code cache entry: {err}");
                }
            }
            Err(err) => tracing::warn!(addon = name, "cannot serialise compiled code for the cache: {err:#}"),
        }
        Ok(component)
    }

    /// Whether the directory may be read and written: it is missing (the first entry
    /// makes it, 0700) or owned by this user and writable by no one else. Looked at on
    /// every look-up, as an operator may fix (or break) it while the server runs.
    fn usable_dir(&self) -> bool {
        let Ok(meta) = std::fs::metadata(&self.dir) else {
            return true;
        };
        let why =
            if meta.is_dir() { private_files::untrusted(&meta) } else { Some("not a directory".to_owned()) };
        let Some(why) = why else {
            return true;
        };
        if !self.warned_dir.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.dir.display(),
                "compiled-code cache directory is not trusted ({why}): nothing is loaded from it or written \
                 to it, every addon is compiled; make it this user's with mode 0700, or delete it"
            );
        }
        false
    }

    fn discard(&self, path: &Path, name: &str, why: &str, metrics: &Metrics) {
        metrics.cache("corrupt");
        tracing::warn!(addon = name, entry = %path.display(), "compiled-code cache entry is corrupt ({why}); recompiling");
        let _ = std::fs::remove_file(path);
    }
}

/// Why an entry was not read.
enum EntryError {
    Missing,
    /// Someone other than this user could have written it.
    Untrusted(String),
    Io(std::io::Error),
}

/// Reads an entry, if it is a regular file that only this user can have written. The
/// checks are made on the open file, which is then the one read; a symbolic link is
/// refused by the open itself.
fn read_entry(path: &Path) -> Result<Vec<u8>, EntryError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(EntryError::Missing),
        #[cfg(unix)]
        Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
            return Err(EntryError::Untrusted("a symbolic link".to_owned()));
        }
        Err(err) => return Err(EntryError::Io(err)),
    };
    let meta = file.metadata().map_err(EntryError::Io)?;
    if !meta.is_file() {
        return Err(EntryError::Untrusted("not a regular file".to_owned()));
    }
    if let Some(why) = private_files::untrusted(&meta) {
        return Err(EntryError::Untrusted(why));
    }
    let mut entry = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut entry).map_err(EntryError::Io)?;
    Ok(entry)
}

/// The compiled code inside a cache entry, if the entry is whole and unaltered.
fn payload(entry: &[u8]) -> Result<&[u8], &'static str> {
    if entry.len() < HEADER_LEN || &entry[..MAGIC.len()] != MAGIC {
        return Err("not a sockhost cache entry");
    }
    let len_bytes: [u8; 8] = entry[MAGIC.len()..MAGIC.len() + 8].try_into().expect("8 bytes");
    let digest = &entry[MAGIC.len() + 8..HEADER_LEN];
    let code = &entry[HEADER_LEN..];
    if u64::from_le_bytes(len_bytes) != code.len() as u64 {
        return Err("length does not match its header: truncated or appended to");
    }
    if Sha256::digest(code).as_slice() != digest {
        return Err("checksum mismatch");
    }
    Ok(code)
}

/// Writes header + `code` to a temporary file beside `path` (mode 0600) and renames it
/// into place, so readers never see a partly written entry, and an untrusted entry there
/// is replaced. There is no fsync: after a power loss the
/// renamed file may be empty or torn, which the checksum catches (the entry is
/// recompiled), and an fsync per compile can stall start-up for seconds on a busy disk.
fn write_atomically(path: &Path, code: &[u8]) -> std::io::Result<()> {
    // Unique per process and write: two identical addons compiled at once write the
    // same entry, each through its own temporary file.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    private_files::create_dir(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed),
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let result = (|| {
        // 0600, and never an existing file (or a link someone left under this name).
        let mut file = private_files::file_options().write(true).create_new(true).open(&tmp)?;
        file.write_all(MAGIC)?;
        file.write_all(&(code.len() as u64).to_le_bytes())?;
        file.write_all(&Sha256::digest(code))?;
        file.write_all(code)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(code: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(code.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(code));
        out.extend_from_slice(code);
        out
    }

    #[test]
    fn only_whole_unaltered_entries_pass() {
        let good = entry(b"native code");
        assert_eq!(payload(&good).unwrap(), b"native code");
        let truncated = &good[..good.len() - 3];
        assert!(payload(truncated).unwrap_err().contains("truncated"));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(payload(&flipped).unwrap_err(), "checksum mismatch");
        assert!(payload(b"\x7fELF whatever").is_err());
        assert!(payload(b"").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn entries_others_could_have_written_are_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cwasm");
        assert!(matches!(read_entry(&path), Err(EntryError::Missing)));
        write_atomically(&path, b"code").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(payload(&read_entry(&path).ok().unwrap()).unwrap(), b"code");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(read_entry(&path), Err(EntryError::Untrusted(why)) if why.contains("writable")));
        // Written again: replaced by a private, trusted entry.
        write_atomically(&path, b"code").unwrap();
        assert!(read_entry(&path).is_ok());
        let link = dir.path().join("link.cwasm");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(read_entry(&link), Err(EntryError::Untrusted(why)) if why.contains("link")));
    }
}
