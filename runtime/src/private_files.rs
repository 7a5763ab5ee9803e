//! Files the server keeps for itself: private to the user it runs as.
//!
//! Two kinds of file need it. The kv store (`<data_dir>/kv.redb`) holds what addons keep,
//! such as every conversation aikefu has had: with the usual umask (022) it would be
//! created 0644 in a 0755 directory, readable by every local user. The compiled-code
//! cache holds native code that wasmtime loads without being able to check it (an
//! `unsafe` call): whoever can write an entry, or the directory (and so rename one entry
//! over another), can make the server run their code.
//!
//! So directories made here are 0700 and files 0600, whatever the umask, and
//! [`untrusted`] says why a cache directory or entry must not be loaded: it is not owned
//! by the server's effective user, or group or others may write it. On systems other
//! than Unix there are no such modes and nothing is checked.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::path::Path;

/// Creates `dir` and any missing parents, each new one 0700.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Options that create a file 0600 (an existing file keeps its mode).
pub(crate) fn file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// Makes an open file 0600 if group or others had any access to it; whether it did.
pub(crate) fn restrict(file: &File) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
            return Ok(true);
        }
    }
    let _ = file;
    Ok(false)
}

/// Why group or others may reach `meta` (`mode 0755`), if they may at all.
pub(crate) fn open_to_others(meta: &Metadata) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Some(format!("mode {mode:04o}"));
        }
    }
    let _ = meta;
    None
}

/// Why a cache directory or entry with this metadata must not be trusted: another
/// owner than the server's effective user, or writable by group or others.
pub(crate) fn untrusted(meta: &Metadata) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let me = effective_uid();
        if meta.uid() != me {
            return Some(format!("owned by uid {}, not by this process's uid {me}", meta.uid()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o022 != 0 {
            return Some(format!("writable by group or others (mode {mode:04o})"));
        }
    }
    let _ = meta;
    None
}

#[cfg(unix)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn directories_and_files_made_here_are_private_whatever_the_umask() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b");
        create_dir(&dir).unwrap();
        assert_eq!((mode(&base.path().join("a")), mode(&dir)), (0o700, 0o700));
        let path = dir.join("f");
        let file = file_options().write(true).create(true).truncate(false).open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(!restrict(&file).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(restrict(&file).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn only_own_files_that_others_cannot_write_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry");
        std::fs::write(&path, b"x").unwrap();
        for (mode, trusted) in [(0o600, true), (0o644, true), (0o640, true), (0o660, false), (0o646, false)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(untrusted(&meta).is_none(), trusted, "{mode:o}: {:?}", untrusted(&meta));
        }
        // Ownership can only be given away by root.
        if effective_uid() == 0 {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let why = untrusted(&std::fs::metadata(&path).unwrap()).unwrap();
            assert!(why.contains("owned by uid 65534"), "{why}");
        }
    }
}
