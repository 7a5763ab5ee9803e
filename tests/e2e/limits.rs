//! Sandbox limits, fault containment and hostile input: each limit is hit for real and
//! the test checks what the client sees, that the failure is logged and counted, and that
//! nothing else is touched.

use std::time::Duration;

use futures_util::SinkExt;
use sockhost::FailureKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::*;

/// The hostile addon with a tight policy, next to the echo addon.
async fn hostile_server(manifest: &str) -> TestServer {
    let hostile = hostile_component();
    let echo = bundled_addon("echo");
    TestServer::start(&[
        ("hostile.wasm", &hostile),
        ("hostile.toml", manifest.as_bytes()),
        ("echo.wasm", &echo),
        ("echo.toml", b"messages_per_second = 0"),
    ])
    .await
}

/// Sends `command` and expects the error frame `code`, then close 1011.
async fn expect_failure(client: &mut Client, command: &str, code: &str) -> String {
    client.send_text(command).await;
    let error = client.recv_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(client.recv_close().await.0, 1011);
    error["message"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_looping_addon_is_stopped_at_its_cpu_limit_while_others_are_served_on_the_same_thread() {
    // #[tokio::test] runs the server and both clients on this one thread: the echo replies
    // below can only happen if the looping guest yields.
    let server = hostile_server("cpu_limit_ms = 700").await;
    let mut looping = server.connect("/ws/hostile").await;
    looping.send_text("loop").await;

    let mut echo = server.connect("/ws/echo").await;
    for n in 0..20 {
        echo.send_text(&format!("still served {n}")).await;
        assert_eq!(echo.recv_text().await, format!("still served {n}"));
    }

    let error = looping.recv_json().await;
    assert_eq!(error["code"], "addon_timeout", "{error}");
    assert!(error["message"].as_str().unwrap().contains("CPU limit of 700 ms"), "{error}");
    assert_eq!(looping.recv_close().await.0, 1011);
    assert_eq!(server.failures.get(FailureKind::AddonTimeout), 1);
    wait_for_log(&["addon failed", "kind=\"addon_timeout\"", "addon=\"hostile\""]).await;
}

#[tokio::test]
async fn time_waiting_on_the_host_is_not_charged_to_the_cpu_limit() {
    // testkit's "stream" sleeps 200 ms (a host wait) between two sends; with a 50 ms CPU
    // limit it must still finish, many times over.
    let testkit = test_addon("testkit");
    let server =
        TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", b"cpu_limit_ms = 50")]).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    for _ in 0..3 {
        client.send_text("stream").await;
        assert_eq!(client.recv_text().await, "first");
        assert_eq!(client.recv_text().await, "second");
    }
}

#[tokio::test]
async fn bursts_between_short_sleeps_are_charged_to_the_cpu_limit() {
    // 9 ms of work, then 11 ms asleep, 300 times: 2.7 s of CPU in 6 s. Every tick holds a
    // pause, so an accounting that forgives a tick with a pause in it never charges this;
    // charging running time stops it at 300 ms of CPU, well before the rounds are done.
    let testkit = test_addon("testkit");
    let server =
        TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", b"cpu_limit_ms = 300")]).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let message = expect_failure(&mut client, "burn 9 11 300", "addon_timeout").await;
    assert!(message.contains("CPU limit of 300 ms"), "{message}");
    assert_eq!(server.failures.get(FailureKind::AddonTimeout), 1);
}

#[tokio::test]
async fn a_guest_that_mostly_waits_is_not_charged_for_the_waits() {
    // 100 sleeps of 15 ms with a moment of work after each: 1.5 s of waiting, almost no
    // running. Charging whole ticks would charge the tick a sleep ended in about every
    // other round (10 ms each), past 300 ms; charging running time leaves it far below.
    let testkit = test_addon("testkit");
    let server =
        TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", b"cpu_limit_ms = 300")]).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("burn 0 15 100").await;
    assert_eq!(client.recv_text().await, "burned");
    assert_eq!(server.failures.get(FailureKind::AddonTimeout), 0);
}

#[tokio::test]
async fn memory_past_the_limit_fails_inside_the_instance_as_addon_oom() {
    let server = hostile_server("memory_limit = \"2MiB\"").await;
    let mut client = server.connect("/ws/hostile").await;
    let message = expect_failure(&mut client, "memory", "addon_oom").await;
    assert!(message.contains("memory limit of 2097152 bytes"), "{message}");
    assert_eq!(server.failures.get(FailureKind::AddonOom), 1);

    // The next connection gets a fresh instance that works.
    let mut next = server.connect("/ws/hostile").await;
    next.send_text("ok?").await;
    assert_eq!(next.recv_text().await, "ok");
}

#[tokio::test]
async fn traps_close_with_1011_and_the_next_connection_works() {
    let server = hostile_server("").await;
    for (command, cause) in
        [("stack", "call stack exhausted"), ("unreachable", "unreachable"), ("div", "divide by zero")]
    {
        let mut client = server.connect("/ws/hostile").await;
        client.send_text("echo me").await;
        assert_eq!(client.recv_text().await, "echo me");
        let message = expect_failure(&mut client, command, "addon_trap").await;
        assert!(message.contains(cause), "{command}: {message}");

        let mut next = server.connect("/ws/hostile").await;
        next.send_text("fine").await;
        assert_eq!(next.recv_text().await, "ok", "after {command}");
    }
    assert_eq!(server.failures.get(FailureKind::AddonTrap), 3);
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_off_and_the_sender_stops() {
    let testkit = test_addon("testkit");
    let server =
        TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", b"send_timeout_s = 1")]).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let id = connection_id(&mut client).await;
    client.send_text("flood").await;
    // Never read again: the server's writes fill the socket buffers and stall.
    let conn = format!("conn={id}");
    let line = wait_for_log(&["testkit flood stopped after", &conn]).await;
    let frames: u64 = line.split("after ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    // 16 KiB frames: what got through is what the socket buffers hold, not an unbounded queue.
    assert!(frames < 2048, "{frames} frames of 16 KiB were accepted: the outbound queue is not bounded");
    wait_for_log(&["kind=\"slow_client\"", &conn]).await;
    wait_for_log(&["testkit on-close code=1008", &conn]).await;
    assert_eq!(server.failures.get(FailureKind::SlowClient), 1);
}

/// A client that stops reading for a while, then reads: every frame of a long streamed
/// reply arrives, in order. While its socket had no room the addon was paused (after
/// the send whose frame did not fit), not buffered without bound, and it went on
/// once the client read.
#[tokio::test]
async fn a_client_that_reads_late_gets_every_frame_in_order() {
    let server = testkit_server("").await;
    let mut client = server.connect_with_small_receive_buffer("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    // 600 frames of 64 KiB: about 39 MiB, far more than the socket buffers hold.
    client.send_text("numbered 600 65536").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for i in 1..=600 {
        let frame = client.recv_text().await;
        assert_eq!(frame.len(), 65536);
        assert_eq!(frame.split(' ').next(), Some(i.to_string().as_str()), "frame {i} out of order");
    }
    assert_eq!(client.recv_text().await, "numbered done");
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1");
    assert_eq!(server.failures.get(FailureKind::SlowClient), 0);
}

async fn testkit_server(manifest: &str) -> TestServer {
    let testkit = test_addon("testkit");
    TestServer::start(&[("testkit.wasm", &testkit), ("testkit.toml", manifest.as_bytes())]).await
}

/// `outbound_max_requests`: an instance holding that many streamed responses open gets
/// `connection-limit-reached` for one more (a clear message in the guest, a warn line in
/// the log), and a slot comes back once a response is dropped.
#[tokio::test]
async fn an_addon_over_outbound_max_requests_is_refused_until_a_response_is_dropped() {
    let model = crate::fake_llm::FakeLlm::start().await;
    let manifest = format!("outbound_hosts = [\"{}\"]\noutbound_max_requests = 2", model.origin());
    let server = testkit_server(&manifest).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let conn = format!("conn={}", connection_id(&mut client).await);

    client.send_text(&format!("hold 3 {}/v1/chat/completions", model.origin())).await;
    assert_eq!(client.recv_text().await, "open 0");
    assert_eq!(client.recv_text().await, "open 1");
    let refused = client.recv_text().await;
    assert!(
        refused.starts_with("refused 2: too many outbound requests open at once")
            && refused.contains("outbound_max_requests"),
        "{refused}"
    );
    assert_eq!(client.recv_text().await, "open after release");
    wait_for_log(&["refused: 2 requests already open (outbound_max_requests)", &conn]).await;
    // Three requests reached the model: the refused one never left the host.
    assert_eq!(model.requests().len(), 3);
}

/// `outbound_connect_timeout_ms`: an upstream that never completes the TCP handshake (its
/// accept queue is full, so the kernel drops the SYNs) fails the request as a timeout
/// after the manifest's limit, not the 5 s default.
#[tokio::test]
async fn an_upstream_that_never_accepts_fails_at_the_manifests_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let upstream = listener.local_addr().unwrap();
    // Never accepted: these fill the accept queue, after which new SYNs go unanswered.
    let mut queued = Vec::new();
    for _ in 0..8 {
        let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(upstream)).await
        else {
            break;
        };
        queued.push(stream);
    }

    let manifest = format!("outbound_hosts = [\"http://{upstream}\"]\noutbound_connect_timeout_ms = 300");
    let server = testkit_server(&manifest).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let asked = std::time::Instant::now();
    client.send_text(&format!("get http://{upstream}/")).await;
    assert_eq!(client.recv_text().await, "error Timeout: connect timeout");
    // Not a measurement: the manifest's 300 ms applied, not the 5 s default.
    assert!(asked.elapsed() < Duration::from_secs(4), "took {:?}", asked.elapsed());
    drop((queued, listener));
}

#[tokio::test]
async fn a_message_over_max_message_bytes_closes_with_1009() {
    let server = testkit_server("max_message_bytes = 1024").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text(&"x".repeat(1000)).await;
    assert!(client.recv_text().await.starts_with("unknown: "));
    client.send_text(&"x".repeat(2000)).await;
    assert_eq!(client.recv_close().await.0, 1009);
    assert_eq!(server.failures.get(FailureKind::Oversize), 1);
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = testkit_server("").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let frame = Frame::message(vec![b'o', 0xff, 0xfe, b'k'], OpCode::Data(Data::Text), true);
    client.ws.send(Message::Frame(frame)).await.unwrap();
    assert_eq!(client.recv_close().await.0, 1007);
    assert_eq!(server.failures.get(FailureKind::InvalidUtf8), 1);
}

#[tokio::test]
async fn a_client_over_its_message_rate_gets_a_rate_limited_error_then_close_1008() {
    let server = testkit_server("messages_per_second = 2\nmessage_burst = 5").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    for _ in 0..20 {
        client.ws.feed(Message::text("count")).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    for n in 1..=5 {
        assert_eq!(client.recv_text().await, n.to_string(), "the burst is served");
    }
    let error = client.recv_json().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert!(error["message"].as_str().unwrap().contains("2 messages per second"), "{error}");
    let (code, reason) = client.recv_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("rate limit"), "{reason}");
    assert_eq!(server.failures.get(FailureKind::RateLimited), 1);
}

#[tokio::test]
async fn an_idle_client_is_closed_after_the_idle_timeout() {
    let server = testkit_server("idle_timeout_s = 1").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let (code, reason) = client.recv_close().await;
    assert_eq!(code, 1000);
    assert!(reason.contains("idle timeout"), "{reason}");
    assert_eq!(server.failures.get(FailureKind::Idle), 1);
}

#[tokio::test]
async fn a_peer_that_does_not_answer_pings_is_dropped() {
    let server = testkit_server("ping_interval_s = 1").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let id = connection_id(&mut client).await;
    // A client that never reads never answers the server's pings (a half-open socket).
    let conn = format!("conn={id}");
    wait_for_log(&["ping unanswered", &conn]).await;
    wait_for_log(&["testkit on-close code=1006", &conn]).await;
    assert_eq!(server.failures.get(FailureKind::Unresponsive), 1);
    drop(client);
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let server = testkit_server("ping_interval_s = 1").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    // Reading answers pings; keep reading for three ping intervals.
    let reading = tokio::time::timeout(Duration::from_millis(3500), client.recv()).await;
    assert!(reading.is_err(), "nothing but pings should arrive: {reading:?}");
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1");
}

#[tokio::test]
async fn a_slow_or_silent_handshake_is_dropped() {
    let testkit = test_addon("testkit");
    let server = TestServer::start_with(&[("testkit.wasm", &testkit)], |config| {
        config.limits.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // Half a request head, then nothing.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /ws/testkit HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut response)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&response).starts_with("HTTP/1.1 408"), "{response:?}");
    // Nothing at all.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, silent.read_to_end(&mut response)).await.unwrap().unwrap();
    assert_eq!(server.failures.get(FailureKind::HandshakeTimeout), 2);
}

/// An instance that cannot be made (here: the echo addon's initial linear memory, 17
/// pages, is over a 1 MiB `memory_limit`) is an HTTP 503 naming the cause before any
/// upgrade, counted as `addon_oom` for that addon; the server's other addons go on.
#[tokio::test]
async fn an_instance_over_its_memory_limit_at_start_is_a_503_counted_as_addon_oom() {
    let echo = bundled_addon("echo");
    let testkit = test_addon("testkit");
    let server = TestServer::start(&[
        ("echo.wasm", &echo),
        ("echo.toml", b"memory_limit = \"1MiB\""),
        ("testkit.wasm", &testkit),
    ])
    .await;
    let (status, text) = upgrade_status(server.addr, "/ws/echo", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("cannot take a connection now: it exceeded its memory limit of 1048576 bytes"),
        "{text}"
    );
    wait_for_log(&["cannot create an addon instance", "kind=\"addon_oom\"", "addon=\"echo\""]).await;
    assert_eq!(server.failures.get(FailureKind::AddonOom), 1);
    let series = "sockhost_addon_failures_total{addon=\"echo\",kind=\"addon_oom\"}";
    assert_eq!(server.metric(series).await, Some(1.0));

    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
}

#[tokio::test]
async fn an_addon_over_max_connections_answers_503_before_upgrading() {
    let server = testkit_server("max_connections = 2").await;
    let mut a = server.connect("/ws/testkit").await;
    let mut b = server.connect("/ws/testkit").await;
    assert_eq!(a.recv_text().await, "open");
    assert_eq!(b.recv_text().await, "open");
    let (status, text) = upgrade_status(server.addr, "/ws/testkit", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("limit of 2 connections"), "{text}");
    wait_for_log(&["addon connection limit reached", "addon=\"testkit\""]).await;
    a.close(1000, "bye").await;
    // The slot is free again once the connection is gone.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut c = Client::connect(&server.url("/ws/testkit")).await;
        if let Message::Text(text) = c.recv().await
            && text.as_str() == "open"
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
}

#[tokio::test]
async fn the_server_wide_connection_limit_answers_503() {
    let testkit = test_addon("testkit");
    let echo = bundled_addon("echo");
    let server = TestServer::start_with(&[("testkit.wasm", &testkit), ("echo.wasm", &echo)], |config| {
        config.limits.max_connections = 1;
    })
    .await;
    let mut first = server.connect("/ws/testkit").await;
    assert_eq!(first.recv_text().await, "open");
    let (status, text) = upgrade_status(server.addr, "/ws/echo", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("server is at its limit of 1"), "{text}");
    assert_eq!(server.failures.get(FailureKind::Capacity), 1);
}

#[tokio::test]
async fn a_disallowed_origin_gets_403() {
    let server = testkit_server("allowed_origins = [\"https://shop.example.com\"]").await;
    let (status, text) = upgrade_status(server.addr, "/ws/testkit", Some("https://evil.example")).await;
    assert_eq!(status, 403, "{text}");
    let (status, _) = upgrade_status(server.addr, "/ws/testkit", Some("https://shop.example.com")).await;
    assert_eq!(status, 101);
    let (status, _) = upgrade_status(server.addr, "/ws/testkit", None).await;
    assert_eq!(status, 101, "clients without an Origin (native, mini-programs) are not browsers");
    assert_eq!(server.failures.get(FailureKind::Origin), 1);
}

#[tokio::test]
async fn an_invalid_manifest_keeps_the_addon_unmounted_and_names_file_and_key() {
    let testkit = test_addon("testkit");
    let echo = bundled_addon("echo");
    let server = TestServer::start(&[
        ("testkit.wasm", &testkit),
        ("testkit.toml", b"cpu_limit_ms = \"lots\""),
        ("echo.wasm", &echo),
        ("echo.toml", b"max_conections = 5"),
    ])
    .await;
    assert!(server.addon_names.is_empty(), "{:?}", server.addon_names);
    let dir = server.addons_path().display().to_string();
    wait_for_log(&["addon not mounted", &format!("{dir}/testkit.toml"), "cpu_limit_ms"]).await;
    wait_for_log(&["addon not mounted", &format!("{dir}/echo.toml"), "max_conections"]).await;
}

/// A fixed-seed generator for garbage.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % max;
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Text that is almost the chat envelope: the interesting kind of malformed JSON.
    fn json_ish(&mut self) -> String {
        const PARTS: [&str; 14] = [
            "{",
            "}",
            "\"message\"",
            ":",
            ",",
            "\"action\"",
            "\"chat\"",
            "\"session_id\"",
            "null",
            "[1,2",
            "\"你好\"",
            "\\u0000",
            "1e999",
            "\"",
        ];
        let len = 1 + (self.next() as usize) % 12;
        (0..len).map(|_| PARTS[(self.next() as usize) % PARTS.len()]).collect()
    }
}

#[tokio::test]
async fn garbage_into_every_example_addon_crashes_nothing() {
    let echo = bundled_addon("echo");
    // /ws has an addon's limits too ([builtin]); like echo's, its rate limit is lifted here.
    let server = TestServer::start_with(
        &[("echo.wasm", &echo), ("echo.toml", b"messages_per_second = 0")],
        |config| {
            config.builtin.message_rate = None;
        },
    )
    .await;
    let mut garbage = Garbage(0x5eed);
    for path in ["/ws/echo", "/ws"] {
        let mut client = server.connect(path).await;
        if path == "/ws" {
            client.recv_json().await;
        }
        for _ in 0..300 {
            let message = match garbage.next() % 3 {
                0 => Message::binary(garbage.bytes(2048)),
                1 => Message::text(String::from_utf8_lossy(&garbage.bytes(512)).into_owned()),
                _ => Message::text(garbage.json_ish()),
            };
            client.ws.send(message).await.unwrap();
            // Every message gets at least one answer (an echo, a chat reply, or an error frame).
            let reply = client.recv().await;
            assert!(matches!(reply, Message::Text(_) | Message::Binary(_)), "{reply:?}");
            while let Ok(Some(Ok(_))) =
                tokio::time::timeout(Duration::from_millis(1), futures_util::StreamExt::next(&mut client.ws))
                    .await
            {}
        }
        client.send_text("still fine").await;
        loop {
            if let Message::Text(text) = client.recv().await
                && text.as_str() == "still fine"
            {
                break;
            }
        }
    }
    for kind in [FailureKind::AddonTrap, FailureKind::AddonTimeout, FailureKind::AddonOom] {
        assert_eq!(server.failures.get(kind), 0, "{kind:?}");
    }
}

#[tokio::test]
async fn garbage_bytes_instead_of_frames_are_refused_and_the_server_goes_on() {
    let testkit = test_addon("testkit");
    let server = TestServer::start(&[("testkit.wasm", &testkit)]).await;
    let mut garbage = Garbage(0xbad);
    for _ in 0..50 {
        let mut client = server.connect("/ws/testkit").await;
        assert_eq!(client.recv_text().await, "open");
        // Raw bytes straight onto the socket, below the WebSocket framing.
        let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.ws.get_mut() else {
            panic!("tests use plain TCP");
        };
        let _ = stream.write_all(&garbage.bytes(256)).await;
        let _ =
            tokio::time::timeout(Duration::from_millis(200), futures_util::StreamExt::next(&mut client.ws))
                .await;
    }
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1");
}

/// `kv_max_keys` / `kv_max_bytes`: a write past the addon's kv quota gets `invalid` naming
/// the key, and nothing is written.
#[tokio::test]
async fn a_write_past_the_kv_quota_is_refused_naming_the_limit() {
    let server = testkit_server("kv = true\nkv_max_keys = 2\nkv_max_bytes = \"1KiB\"").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    for key in ["a", "b"] {
        client.send_text(&format!("kv-set {key} v")).await;
        assert_eq!(client.recv_text().await, "kv ok");
    }
    client.send_text("kv-set c v").await;
    let refused = client.recv_text().await;
    assert!(refused.contains("kv quota full") && refused.contains("kv_max_keys"), "{refused}");
    client.send_text("kv-get c").await;
    assert_eq!(client.recv_text().await, "kv none");
    client.send_text(&format!("kv-set a {}", "x".repeat(1100))).await;
    let refused = client.recv_text().await;
    assert!(refused.contains("kv quota full") && refused.contains("kv_max_bytes"), "{refused}");
}

/// `max_host_resources`: every WASI and wasi:http handle an instance holds is an entry in
/// its host-side table. A guest that makes them in a loop (here empty `fields`, 1024 by
/// default with a 32 MiB `memory_limit`) fails as `addon_oom` naming the key, instead of
/// filling the host's memory; another connection of the same addon goes on.
#[tokio::test]
async fn a_guest_that_makes_host_resources_in_a_loop_fails_at_max_host_resources() {
    // The grant links wasi:http; the host is never called.
    let server = testkit_server("outbound_hosts = [\"http://127.0.0.1:9\"]").await;
    let mut other = server.connect("/ws/testkit").await;
    assert_eq!(other.recv_text().await, "open");
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let conn = format!("conn={}", connection_id(&mut client).await);

    client.send_text("fields 100").await;
    assert_eq!(client.recv_text().await, "fields 100 held");
    let message = expect_failure(&mut client, "fields 1000000", "addon_oom").await;
    assert!(message.contains("limit of 1024 host resources (max_host_resources)"), "{message}");
    assert_eq!(server.failures.get(FailureKind::AddonOom), 1);
    wait_for_log(&["addon failed", "kind=\"addon_oom\"", "max_host_resources", &conn]).await;

    other.send_text("count").await;
    assert_eq!(other.recv_text().await, "1");
    // The manifest sets the limit, within what memory_limit allows.
    let server = testkit_server("outbound_hosts = [\"http://127.0.0.1:9\"]\nmax_host_resources = 40").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let message = expect_failure(&mut client, "fields 100", "addon_oom").await;
    assert!(message.contains("limit of 40 host resources"), "{message}");
}

/// What one wasi:http resource can hold on the host is small: a `fields` takes headers up
/// to 16 KiB (wasmtime's default is 128 KiB; past it wasmtime-wasi-http traps, counted as
/// `addon_oom`), an outgoing body is written 8 KiB at a time (1 MiB by default), so
/// `max_host_resources` of them stay within `memory_limit`.
#[tokio::test]
async fn wasi_http_headers_and_bodies_hold_little_on_the_host() {
    let server = testkit_server("outbound_hosts = [\"http://127.0.0.1:9\"]").await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("body-budget").await;
    assert_eq!(client.recv_text().await, "body budget 8192");
    // Eight headers of 1 KiB: a large request head, accepted.
    client.send_text("headers 8 1024").await;
    assert_eq!(client.recv_text().await, "headers 8");
    // Sixty-four are 64 KiB and more.
    let message = expect_failure(&mut client, "headers 64 1024", "addon_oom").await;
    assert!(message.contains("limit of 16 KiB for one wasi:http header set"), "{message}");
    assert_eq!(server.failures.get(FailureKind::AddonOom), 1);
}

/// wasi:http is linked only for an addon whose manifest grants outbound hosts. Without the
/// grant, a component that imports it still loads and runs; its first wasi:http call
/// (here making the `fields` that every request starts with) traps naming the
/// missing grant, before anything is made on the host.
#[tokio::test]
async fn without_an_outbound_grant_wasi_http_calls_fail_naming_the_grant() {
    let server = testkit_server("").await;
    for command in ["get http://127.0.0.1:9/", "fields 1"] {
        let mut client = server.connect("/ws/testkit").await;
        assert_eq!(client.recv_text().await, "open");
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "1");
        let conn = format!("conn={}", connection_id(&mut client).await);
        let message = expect_failure(&mut client, command, "addon_trap").await;
        assert!(
            message.contains("wasi:http/types")
                && message.contains("fields")
                && message.contains("manifest grants no outbound hosts (outbound_hosts)"),
            "{command}: {message}"
        );
        wait_for_log(&["addon failed", "grants no outbound hosts", &conn]).await;
    }
    assert_eq!(server.failures.get(FailureKind::AddonTrap), 2);
}

/// A guest's own resources (`resource.new`) take no entry in the host's resource table,
/// but each is a handle in the store's component-model tables: those are capped at twice
/// `max_host_resources` (wasmtime's default is 100,000), and one more is `addon_oom`.
#[tokio::test]
async fn a_guest_that_makes_its_own_resource_handles_in_a_loop_fails_at_the_handle_limit() {
    let hoarder = handle_hoarder_component();
    let echo = bundled_addon("echo");
    let server = TestServer::start(&[
        ("hoarder.wasm", &hoarder),
        ("hoarder.toml", b"max_host_resources = 64"),
        ("echo.wasm", &echo),
    ])
    .await;
    let mut client = server.connect("/ws/hoarder").await;
    let message = expect_failure(&mut client, "hoard", "addon_oom").await;
    assert!(message.contains("limit of 128 component handles (twice max_host_resources)"), "{message}");
    let mut echo = server.connect("/ws/echo").await;
    echo.send_text("still here").await;
    assert_eq!(echo.recv_text().await, "still here");
}
