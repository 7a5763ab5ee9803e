//! Noticing that a file changed without reading it. Hot reload watches addons with it and
//! TLS watches its certificate files; it lives apart from both so that neither module
//! depends on the other.

use std::path::Path;
use std::time::SystemTime;

/// The size, modification time and (on Unix) inode of one file: enough to see that it
/// changed, or was replaced by a rename, without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> std::io::Result<FileStamp> {
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp { len: meta.len(), modified: meta.modified().ok(), inode })
    }
}
