//! `wss://`: TLS on the listening port with rustls (ring provider), and the certificate
//! kept current without a restart.
//!
//! With `[tls] cert` and `key` set, every accepted connection does a TLS handshake before
//! its HTTP request head is read (both within `limits.handshake_timeout_ms`); everything
//! after that (routing, `/healthz`, `/metrics`, upgrades) is the same as over plain TCP.
//! [`ClientStream`] is the one type the rest of the server sees for either.
//!
//! Certificates are renewed under a running server (Let's Encrypt every 60–90 days): the
//! files are polled every [`POLL`], and when both have stopped changing (two identical
//! looks, so a half-written pair is not read) a new configuration is built and swapped
//! in for new connections. A pair that does not load (unreadable, not PEM, key does not
//! match the certificate) is logged and the previous certificate keeps serving.
//! Established connections keep the session they negotiated.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;
use crate::file_stamp::FileStamp;

pub use crate::client_stream::ClientStream;

/// How often the certificate files are checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// The TLS configuration new connections get, and the files it came from.
pub struct Tls {
    current: RwLock<Loaded>,
}

#[derive(Clone)]
struct Loaded {
    files: TlsFiles,
    stamps: Option<(FileStamp, FileStamp)>,
    acceptor: TlsAcceptor,
}

impl Tls {
    /// Loads the certificate and key; an error names the file and the problem.
    pub fn load(files: &TlsFiles) -> anyhow::Result<Tls> {
        let stamps = stamps(files);
        let acceptor = acceptor(files)?;
        Ok(Tls { current: RwLock::new(Loaded { files: files.clone(), stamps, acceptor }) })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.read().acceptor.clone()
    }

    /// Points at other files (a config reload); the watcher loads them on its next look.
    pub fn set_files(&self, files: TlsFiles) {
        let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.files != files {
            current.files = files;
            current.stamps = None;
        }
    }

    fn read(&self) -> Loaded {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Reloads the certificate when its files change, until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut previous = None;
        let mut failed = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let loaded = self.read();
            let now = stamps(&loaded.files);
            let settled = now.is_some() && now == previous;
            previous = now;
            if !settled || now == loaded.stamps || now == failed {
                continue;
            }
            let files = loaded.files.clone();
            let result = tokio::task::spawn_blocking(move || acceptor(&files)).await;
            match result {
                Ok(Ok(acceptor)) => {
                    let mut current = self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                    if current.files == loaded.files {
                        current.acceptor = acceptor;
                        current.stamps = now;
                        failed = None;
                        tracing::info!(cert = %loaded.files.cert.display(), "TLS certificate reloaded; new connections use it");
                    }
                }
                Ok(Err(err)) => {
                    failed = now;
                    tracing::error!(cert = %loaded.files.cert.display(), "TLS certificate not reloaded: {err:#}; the previous certificate keeps serving");
                }
                Err(panic) => tracing::error!("TLS loader panicked: {panic}"),
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Option<(FileStamp, FileStamp)> {
    Some((FileStamp::of(&files.cert).ok()?, FileStamp::of(&files.key).ok()?))
}

/// Builds a TLS acceptor from PEM files: the certificate chain (leaf first) and its key.
fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!("TLS key {} does not fit certificate {}", files.key.display(), files.cert.display())
        })?;
    // WebSocket upgrades are HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem =
        std::fs::read(path).with_context(|| format!("cannot read TLS certificate {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow::anyhow!("TLS certificate {} is not valid PEM: {err}", path.display()))?;
    if certs.is_empty() {
        bail!("TLS certificate {} holds no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read TLS key {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|err| anyhow::anyhow!("TLS key {} holds no usable private key: {err}", path.display()))
}
