//! `wss://` with rustls: a round trip with a client that trusts a certificate made in the
//! test, and the certificate replaced (or broken) under the running server.

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// A self-signed certificate for `localhost`: (certificate DER, certificate PEM, key PEM).
fn certificate() -> (CertificateDer<'static>, String, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    (made.cert.der().clone(), made.cert.pem(), made.signing_key.serialize_pem())
}

fn install(dir: &Path, cert_pem: &str, key_pem: &str) {
    for (file, text) in [("cert.pem", cert_pem), ("key.pem", key_pem)] {
        let tmp = dir.join(format!(".{file}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }
}

/// Connects with TLS, trusting only `trusted`, and echoes one message through `/ws/echo`.
async fn wss_echo(server: &TestServer, trusted: &CertificateDer<'static>) -> Result<String, String> {
    let mut roots = RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{}/ws/echo", server.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.map_err(|e| e.to_string())?;
    ws.send(Message::text("over tls")).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, ws.next()).await.expect("reply in time").unwrap().unwrap();
    Ok(reply.into_text().unwrap().as_str().to_owned())
}

#[tokio::test]
async fn wss_round_trip_and_the_certificate_is_reloaded_when_its_files_change() {
    let certs = tempfile::tempdir().unwrap();
    let (first, cert_pem, key_pem) = certificate();
    install(certs.path(), &cert_pem, &key_pem);
    let files = sockhost::TlsFiles { cert: certs.path().join("cert.pem"), key: certs.path().join("key.pem") };
    let tls = files.clone();
    let server = TestServer::start_with(&[("echo.wasm", &bundled_addon("echo"))], move |config| {
        config.tls = Some(tls);
    })
    .await;

    assert_eq!(wss_echo(&server, &first).await.unwrap(), "over tls");
    // Plain ws:// to a TLS port gets no WebSocket.
    assert!(tokio_tungstenite::connect_async(server.url("/ws/echo")).await.is_err());

    // A broken certificate file: logged, and the first certificate keeps serving.
    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        .unwrap();
    wait_for_log(&["TLS certificate not reloaded", &files.cert.display().to_string()]).await;
    assert_eq!(wss_echo(&server, &first).await.unwrap(), "over tls");

    // A renewed certificate is picked up for new connections.
    let (second, cert_pem, key_pem) = certificate();
    install(certs.path(), &cert_pem, &key_pem);
    wait_for_log(&["TLS certificate reloaded", &files.cert.display().to_string()]).await;
    assert_eq!(wss_echo(&server, &second).await.unwrap(), "over tls");
    let refused = wss_echo(&server, &first).await.unwrap_err();
    assert!(refused.contains("certificate") || refused.contains("Unknown"), "{refused}");
}

#[tokio::test]
async fn a_certificate_that_does_not_load_stops_start_up_naming_the_file() {
    capture_logs();
    let certs = tempfile::tempdir().unwrap();
    let (_, cert_pem, _) = certificate();
    let (_, _, other_key) = certificate();
    install(certs.path(), &cert_pem, &other_key);
    let files = sockhost::TlsFiles { cert: certs.path().join("cert.pem"), key: certs.path().join("key.pem") };
    let start = |tls: sockhost::TlsFiles| {
        sockhost::Server::start(sockhost::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            addons_dir: certs.path().join("no-addons"),
            limits: sockhost::ServerLimits { max_connections: 4, ..Default::default() },
            cache_dir: None,
            tls: Some(tls),
            ..Default::default()
        })
    };
    let err = format!("{:#}", start(files.clone()).await.err().expect("a mismatched key is refused"));
    assert!(err.contains("does not fit") && err.contains("key.pem"), "{err}");
    let missing = sockhost::TlsFiles { cert: certs.path().join("missing.pem"), key: files.key.clone() };
    let err = format!("{:#}", start(missing).await.err().expect("a missing file is refused"));
    assert!(err.contains("missing.pem"), "{err}");
}
