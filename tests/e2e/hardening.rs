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
