//! Hardening (issue 13), against the real binary where a client could hold resources.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::{spawn, work_dir};
use crate::support::*;

/// A client frame as a browser sends it: final, masked (with a zero key, so the payload
/// stays readable), text.
fn masked_text(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// Upgrades a raw TCP connection to `path`, returning it after the 101.
async fn raw_upgrade(port: u16, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

/// After the server closes (here: the rate limit), a client that never answers the close
/// frame but keeps sending data is dropped at one deadline; its frames do not extend it.
#[tokio::test]
async fn a_closed_connection_is_dropped_at_its_deadline_however_the_client_trickles() {
    let manifest = "messages_per_second = 1\nmessage_burst = 1\n";
    let work = work_dir(&[
        ("addons/testkit.wasm", &test_addon("testkit")),
        ("addons/testkit.toml", manifest.as_bytes()),
    ]);
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    let tcp = raw_upgrade(process.port, "/ws/testkit").await;
    let (mut read, mut write) = tcp.into_split();
    // Two messages at once: the second is over the rate, so the server sends an error
    // frame and a close frame. This client never answers the close, and keeps sending a
    // frame every second, each well inside the 5 s the server gives a close.
    let trickle = tokio::spawn(async move {
        for n in 0.. {
            if write.write_all(&masked_text(&format!("count {n}"))).await.is_err() {
                return n;
            }
            tokio::time::sleep(if n < 2 { Duration::ZERO } else { Duration::from_secs(1) }).await;
        }
        unreachable!()
    });
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(ended.is_ok(), "the server kept the closed connection open; it sent: {text}");
    assert!(text.contains("rate_limited"), "{text}");
    // The close frame (opcode 0x88) with 1008 went out before the socket was dropped.
    assert!(received.windows(4).any(|w| w[0] == 0x88 && w[2..4] == 1008u16.to_be_bytes()), "{text}");
    trickle.abort();
}

/// An allowed `https://` upstream that accepts TCP and never answers the TLS handshake:
/// the request fails at the manifest's deadline (connect + first byte), it does not hang.
#[tokio::test]
async fn an_upstream_that_never_finishes_the_tls_handshake_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    // Accepts, keeps every socket, says nothing.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let manifest = format!(
        "outbound_hosts = [\"https://{upstream}\"]\noutbound_connect_timeout_ms = 300\noutbound_first_byte_timeout_ms = 700\n"
    );
    let work = work_dir(&[
        ("addons/testkit.wasm", &test_addon("testkit")),
        ("addons/testkit.toml", manifest.as_bytes()),
    ]);
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text(&format!("get https://{upstream}/")).await;
    let answer = client.recv_text().await;
    assert!(answer.starts_with("error Timeout"), "{answer}");
    process.wait_for_log("no response within 1000 ms");
    silent.abort();
}

/// A callback still running when its client leaves gets `limits.orphan_callback_grace_ms`,
/// then it is abandoned: the instance is dropped (its slot comes back) and `on-close` is
/// skipped, with a log line saying so.
#[tokio::test]
async fn a_callback_that_outlives_its_client_is_abandoned_after_the_grace() {
    let testkit = test_addon("testkit");
    let server = TestServer::start_with(&[("testkit.wasm", &testkit)], |config| {
        config.limits.orphan_callback_grace = Duration::from_millis(300);
    })
    .await;
    let live = r#"sockhost_addon_live_instances{addon="testkit"}"#;
    let mut client = server.connect("/ws/testkit?tag=orphan").await;
    assert_eq!(client.recv_text().await, "open");
    // A minute of waiting (not charged as CPU), far beyond the test's patience.
    client.send_text("sleep 60000").await;
    assert_eq!(server.metric(live).await, Some(1.0));
    drop(client);
    eventually("the orphaned instance is dropped", || async { server.metric(live).await == Some(0.0) }).await;
    let line = wait_for_log(&["abandoned it and dropped the instance", "orphaned_callback"]).await;
    assert!(line.contains("stage=\"on-message\""), "{line}");
    assert!(log_lines(&["testkit on-close", "tag=orphan"]).is_empty(), "on-close must not run");
    assert_eq!(
        server.metric(r#"sockhost_addon_failures_total{addon="testkit",kind="orphaned_callback"}"#).await,
        Some(1.0)
    );
}

/// `/ws` has limits like an addon's and counts against the server's; one address cannot
/// take every connection; `/healthz` still answers at every limit; and the process
/// raises its open-file limit to what the operator allowed.
#[tokio::test]
async fn the_test_endpoint_and_every_address_have_limits_and_health_still_answers() {
    let config = "[limits]\nmax_connections_per_ip = 4\n[builtin]\nmax_connections = 3\nidle_timeout_s = 2\n";
    let work =
        work_dir(&[("addons/echo.wasm", &bundled_addon("echo")), ("sockhost.toml", config.as_bytes())]);
    let process = crate::process::spawn_adjusted(
        work.path(),
        &["--listen", "127.0.0.1"],
        &[("SOCKHOST_PORT", "0")],
        |command| {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = 256.min(limit.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    Ok(())
                });
            }
        },
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", process.port).parse().unwrap();
    let line = process.log_text().lines().find(|l| l.contains("open-file limit")).map(str::to_owned);
    let line = line.expect("the start-up log names the open-file limit");
    assert!(line.contains("was=256"), "{line}");
    assert!(!line.contains("now=256") || line.contains("hard=256"), "raised to the hard limit: {line}");

    let ws = |path: &str| format!("ws://{addr}{path}");
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(&ws("/ws")).await;
        assert_eq!(client.recv_json().await["type"], "system");
        held.push(client);
    }
    let (status, response) = http_request(addr, &upgrade_request("/ws")).await;
    assert_eq!(status, 503, "{response}");
    assert!(response.contains("[builtin] max_connections"), "{response}");
    // The fourth connection from this address is allowed (to an addon); the fifth is not.
    held.push(Client::connect(&ws("/ws/echo")).await);
    let (status, response) = http_request(addr, &upgrade_request("/ws/echo")).await;
    assert_eq!(status, 503, "{response}");
    assert!(response.contains("limits.max_connections_per_ip"), "{response}");
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    // Idle /ws connections are closed like an addon's.
    let (code, reason) = held[0].recv_close().await;
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.contains("idle timeout"), "{reason}");
}

#[tokio::test]
async fn the_test_endpoint_can_be_turned_off() {
    let echo = bundled_addon("echo");
    let server =
        TestServer::start_with(&[("echo.wasm", &echo)], |config| config.builtin.enabled = false).await;
    let (status, response) = http_request(server.addr, &upgrade_request("/ws")).await;
    assert_eq!(status, 404, "{response}");
    assert!(response.contains("[builtin] enabled = false"), "{response}");
}

/// A valid WebSocket upgrade request for `path`, as raw HTTP.
fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A manifest's `orphan_callback_grace_ms` overrides the server's, both ways: an addon
/// whose work must finish without its client (aikefu keeps its replies for a resume)
/// lets it run on, and on-close follows as for any callback that ends.
#[tokio::test]
async fn a_manifests_orphan_grace_overrides_the_servers() {
    let testkit = test_addon("testkit");
    let manifest = b"orphan_callback_grace_ms = 30000\n";
    let server =
        TestServer::start_with(&[("testkit.wasm", &testkit), ("testkit.toml", manifest)], |config| {
            config.limits.orphan_callback_grace = Duration::from_millis(100);
        })
        .await;
    let mut client = server.connect("/ws/testkit?tag=long-grace").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("sleep 1500").await;
    drop(client);
    // Far past the server's 100 ms: the callback ended on its own, so on-close ran.
    wait_for_log(&["testkit on-close code=1006", "tag=long-grace"]).await;
    let orphaned = r#"sockhost_addon_failures_total{addon="testkit",kind="orphaned_callback"}"#;
    assert_eq!(server.metric(orphaned).await.unwrap_or(0.0), 0.0);
}

/// A client that closes while a callback runs on (here a minute of sleep, within the
/// addon's orphan grace) gets the server's answer to its close frame at once, not when
/// the callback ends: a browser fires its `close` event only once the handshake is done.
#[tokio::test]
async fn a_close_during_a_long_callback_is_answered_at_once() {
    let testkit = test_addon("testkit");
    let manifest = b"orphan_callback_grace_ms = 120000\n";
    let server = TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", manifest)]).await;
    let mut client = server.connect("/ws/testkit?tag=close-reply").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("sleep 60000").await;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let frame = CloseFrame { code: 4001.into(), reason: "bye".into() };
    client.ws.close(Some(frame)).await.expect("close");
    // Read with the client's patience (well under the sleep): the answer echoes the code.
    assert_eq!(client.recv_close().await.0, 4001);
}
