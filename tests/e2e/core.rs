//! The core runtime over real sockets: routing, the built-in endpoint, the echo addon,
//! streaming, isolation, error frames, refusal and the connection life cycle.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn echo_and_testkit() -> (Vec<u8>, Vec<u8>) {
    (bundled_addon("echo"), test_addon("testkit"))
}

async fn server() -> TestServer {
    let (echo, testkit) = echo_and_testkit();
    TestServer::start(&[("echo.wasm", &echo), ("testkit.wasm", &testkit)]).await
}

#[tokio::test]
async fn builtin_endpoint_greets_with_the_mounted_addons_then_echoes() {
    let server = server().await;
    let mut client = server.connect("/ws").await;
    let greeting = client.recv_json().await;
    assert_eq!(greeting["type"], "system");
    let message = greeting["message"].as_str().unwrap();
    assert!(message.contains("echo") && message.contains("testkit"), "{message}");

    client.send_text("你好, sockhost").await;
    assert_eq!(client.recv_text().await, "你好, sockhost");
    client.send_binary(&[0, 1, 2, 255]).await;
    assert_eq!(client.recv().await, Message::binary(vec![0, 1, 2, 255]));
}

#[tokio::test]
async fn echo_addon_echoes_text_and_binary() {
    let server = server().await;
    let mut client = server.connect("/ws/echo").await;
    client.send_text("hello").await;
    assert_eq!(client.recv_text().await, "hello");
    client.send_binary(b"\x00\xffbytes").await;
    assert_eq!(client.recv().await, Message::binary(b"\x00\xffbytes".to_vec()));
    client.close(1000, "done").await;
}

/// The server reads a client in `limits.read_buffer_bytes` pieces (1 KiB by default): a
/// message many times that size, split across reads and frames, arrives whole and in order.
#[tokio::test]
async fn messages_larger_than_the_read_buffer_arrive_whole() {
    let server = server().await;
    let mut client = server.connect("/ws/echo").await;
    let text: String = (0..40 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let binary: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
    client.send_text(&text).await;
    client.send_binary(&binary).await;
    client.send_text("after").await;
    assert_eq!(client.recv_text().await, text);
    assert_eq!(client.recv().await, Message::binary(binary));
    assert_eq!(client.recv_text().await, "after");

    let (echo, testkit) = echo_and_testkit();
    let files = [("echo.wasm", &echo[..]), ("testkit.wasm", &testkit[..])];
    let server = TestServer::start_with(&files, |config| config.limits.read_buffer_bytes = 256).await;
    let mut client = server.connect("/ws/echo").await;
    client.send_text(&text).await;
    assert_eq!(client.recv_text().await, text);
}

#[tokio::test]
async fn echo_addon_streams_a_seed_format_chat_reply() {
    let server = server().await;
    let mut client = server.connect("/ws/echo").await;
    client
        .send_text(r#"{"message":"你好，我的订单到哪了","token":"user_token_here","session_id":"session_123","action":"chat"}"#)
        .await;
    let mut chunks = Vec::new();
    loop {
        let chunk = client.recv_json().await;
        assert_eq!(chunk["type"], "chat", "{chunk}");
        assert_eq!(chunk["session_id"], "session_123", "{chunk}");
        let complete = chunk["complete"].as_bool().expect("complete is a bool");
        chunks.push(chunk["message"].as_str().unwrap().to_owned());
        if complete {
            break;
        }
    }
    assert!(chunks.len() >= 3, "a streamed reply comes in several chunks: {chunks:?}");
    let reply: String = chunks.concat();
    assert!(reply.contains("你好，我的订单到哪了"), "{reply}");
}

#[tokio::test]
async fn echo_addon_names_bad_chat_messages() {
    let server = server().await;
    let mut client = server.connect("/ws/echo").await;
    client.send_text(r#"{"action":"chat","session_id":"s"}"#).await;
    let error = client.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "missing_field");
    client.send_text(r#"{"action":"dance","message":"hi"}"#).await;
    let error = client.recv_json().await;
    assert_eq!(error["code"], "unsupported_action");
    // The connection survives bad input.
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");
}

#[tokio::test]
async fn unknown_paths_answer_404_without_upgrading() {
    let server = server().await;
    for path in ["/", "/chat", "/ws/", "/ws/nope", "/ws/echo/extra", "/ws/Echo"] {
        let (status, text) = http_request(
            server.addr,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status, 404, "{path}: {text}");
        assert!(!text.contains("101"), "{text}");
    }
    let (_, text) = http_get(server.addr, "/ws/nope").await;
    assert!(text.contains("no addon named 'nope'") && text.contains("echo"), "{text}");

    // `/` is the chat page (tests/e2e/web.rs), but never a WebSocket endpoint: the
    // upgrade above got 404. With web pages off, a plain GET of it is a 404 too.
    let (echo, testkit) = echo_and_testkit();
    let files = [("echo.wasm", &echo[..]), ("testkit.wasm", &testkit[..])];
    let server = TestServer::start_with(&files, |config| config.web_enabled = false).await;
    for path in ["/", "/chat"] {
        let (status, text) = http_get(server.addr, path).await;
        assert_eq!(status, 404, "{path}: {text}");
    }
}

#[tokio::test]
async fn plain_http_to_a_websocket_path_gets_a_clear_4xx() {
    let server = server().await;
    for path in ["/ws", "/ws/echo"] {
        let (status, text) = http_get(server.addr, path).await;
        assert_eq!(status, 426, "{text}");
        assert!(text.contains("WebSocket endpoint"), "{text}");
    }
    let (status, _) = http_request(server.addr, "this is not http\r\n\r\n").await;
    assert_eq!(status, 400);
    let (status, _) = http_request(
        server.addr,
        "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: a2V5\r\n\r\n",
    )
    .await;
    assert_eq!(status, 426);
}

#[tokio::test]
async fn send_streams_frames_while_the_addon_is_still_running() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("stream").await;
    assert_eq!(client.recv_text().await, "first");
    let first_at = Instant::now();
    assert_eq!(client.recv_text().await, "second");
    let gap = first_at.elapsed();
    // The addon sleeps 200 ms on the WASI monotonic clock between the two sends. Had the
    // host collected frames until the callback returned, both would arrive together.
    assert!(gap >= Duration::from_millis(150), "frames were not streamed: gap {gap:?}");
}

#[tokio::test]
async fn frames_sent_in_one_go_leave_in_one_write() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let writes = "sockhost_socket_writes_total";
    // What one scrape adds (its own answer), measured by the next one.
    let before = server.metric(writes).await.unwrap();
    let after_scrape = server.metric(writes).await.unwrap();
    let per_scrape = after_scrape - before;

    client.send_text("burst 10").await;
    for i in 1..=10 {
        assert_eq!(client.recv_text().await, i.to_string());
    }
    let after_burst = server.metric(writes).await.unwrap();
    assert_eq!(after_burst - after_scrape - per_scrape, 1.0, "ten frames from one callback, one write");
    // Corked frames are still counted one by one as messages.
    assert_eq!(server.metric("sockhost_addon_messages_out_total{addon=\"testkit\"}").await, Some(11.0));
}

#[tokio::test]
async fn a_frame_does_not_wait_behind_guest_computation() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("spin 400").await;
    assert_eq!(client.recv_text().await, "spinning");
    let first_at = Instant::now();
    assert_eq!(client.recv_text().await, "spun");
    let gap = first_at.elapsed();
    // The guest computes for 400 ms after queueing "spinning" without waiting on
    // anything: the epoch tick that makes it yield flushes the frame. Had it waited for
    // the callback's end, both would arrive together.
    assert!(gap >= Duration::from_millis(250), "the frame waited for the computation: gap {gap:?}");
}

#[tokio::test]
async fn connections_are_isolated_and_a_trap_stays_in_its_connection() {
    let server = server().await;
    let mut a = server.connect("/ws/testkit").await;
    let mut b = server.connect("/ws/testkit").await;
    assert_eq!(a.recv_text().await, "open");
    assert_eq!(b.recv_text().await, "open");
    for expected in ["1", "2", "3"] {
        a.send_text("count").await;
        assert_eq!(a.recv_text().await, expected);
    }
    b.send_text("count").await;
    assert_eq!(b.recv_text().await, "1", "b has its own instance");

    a.send_text("trap").await;
    let error = a.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "addon_trap");
    assert!(error["message"].as_str().unwrap().contains("testkit"), "{error}");
    assert_eq!(a.recv_close().await.0, 1011);

    b.send_text("count").await;
    assert_eq!(b.recv_text().await, "2", "the other connection is untouched");
    let mut c = server.connect("/ws/testkit").await;
    assert_eq!(c.recv_text().await, "open");
    c.send_text("count").await;
    assert_eq!(c.recv_text().await, "1", "a new connection gets a fresh instance");
}

#[tokio::test]
async fn an_addon_error_becomes_an_error_frame_and_the_connection_lives_on() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("error").await;
    let error = client.recv_json().await;
    assert_eq!(
        error,
        serde_json::json!({"type": "error", "message": "testkit: asked to fail", "code": "addon_error"})
    );
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1");
}

#[tokio::test]
async fn messages_reach_the_addon_in_order_one_callback_at_a_time() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    // A slow callback first, then many messages queued behind it without waiting.
    client.send_text("stream").await;
    for _ in 0..40 {
        client.ws.feed(Message::text("count")).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    assert_eq!(client.recv_text().await, "first");
    assert_eq!(client.recv_text().await, "second");
    for n in 1..=40 {
        assert_eq!(client.recv_text().await, n.to_string());
    }
}

#[tokio::test]
async fn on_open_can_refuse_with_a_close_code() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit?refuse=1").await;
    assert_eq!(client.recv_close().await, (4003, "refused by testkit".to_owned()));
}

#[tokio::test]
async fn the_addon_can_close_the_connection() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("close").await;
    assert_eq!(client.recv_close().await, (4000, "bye".to_owned()));
}

#[tokio::test]
async fn the_addon_sees_connection_info() {
    let server = server().await;
    let url = server.url("/ws/testkit?shop=42&lang=zh");
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request.headers_mut().insert("Origin", "https://shop.example".parse().unwrap());
    request.headers_mut().insert("Cookie", "secret=1".parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut client = Client { ws };
    assert_eq!(client.recv_text().await, "open");
    client.send_text("info").await;
    let info = client.recv_json().await;
    assert_eq!(info["addon"], "testkit");
    assert_eq!(info["path"], "/ws/testkit");
    assert_eq!(info["query"], "shop=42&lang=zh");
    assert!(info["remote_address"].as_str().unwrap().starts_with("127.0.0.1:"), "{info}");
    let headers = info["headers"].to_string();
    assert!(headers.contains("https://shop.example"), "{headers}");
    assert!(!headers.contains("secret"), "cookies are not passed on: {headers}");
    assert!(info["id"].as_u64().unwrap() > 0);
}

/// The connection id the server gave a testkit connection.
#[tokio::test]
async fn on_close_runs_once_for_a_clean_close_and_once_for_a_dropped_socket() {
    let server = server().await;

    // Every test's servers log into one capture and number connections from 1, so the
    // lines are told apart by a tag of this test's own.
    let mut clean = server.connect("/ws/testkit?tag=on-close-clean").await;
    assert_eq!(clean.recv_text().await, "open");
    clean.close(4321, "see you").await;
    wait_for_log(&["testkit on-close code=4321 reason=see you tag=on-close-clean"]).await;

    let mut dropped = server.connect("/ws/testkit?tag=on-close-dropped").await;
    assert_eq!(dropped.recv_text().await, "open");
    drop(dropped); // no close frame: the TCP connection just goes away
    wait_for_log(&["testkit on-close code=1006", "tag=on-close-dropped"]).await;

    // Give a duplicate call time to show up before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(log_lines(&["testkit on-close", "tag=on-close-clean"]).len(), 1);
    assert_eq!(log_lines(&["testkit on-close", "tag=on-close-dropped"]).len(), 1);
}

#[tokio::test]
async fn guest_stdout_and_stderr_land_in_the_log_with_addon_and_connection() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    let id = connection_id(&mut client).await;
    client.send_text("print").await;
    assert_eq!(client.recv_text().await, "printed");
    client.send_text("log").await;
    assert_eq!(client.recv_text().await, "logged");
    let conn = format!("conn={id}");
    let stdout = wait_for_log(&["testkit stdout line", &conn]).await;
    assert!(stdout.contains("INFO") && stdout.contains("testkit"), "{stdout}");
    let stderr = wait_for_log(&["testkit stderr line", &conn]).await;
    assert!(stderr.contains("WARN"), "{stderr}");
    wait_for_log(&["testkit log line", &conn]).await;
}

#[tokio::test]
async fn the_host_answers_pings_even_while_a_callback_runs() {
    let server = server().await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.ws.send(Message::Ping(b"idle".to_vec().into())).await.unwrap();
    assert_eq!(next_pong(&mut client).await, b"idle");

    // "stream" keeps the addon busy for 200 ms between two frames; the ping sent in
    // between is answered before the callback ends.
    client.send_text("stream").await;
    assert_eq!(client.recv_text().await, "first");
    client.ws.send(Message::Ping(b"busy".to_vec().into())).await.unwrap();
    assert_eq!(next_pong(&mut client).await, b"busy");
    assert_eq!(client.recv_text().await, "second");
}

/// Reads until a pong arrives; fails on any data frame first.
async fn next_pong(client: &mut Client) -> Vec<u8> {
    loop {
        let message = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut client.ws))
            .await
            .expect("no pong in time")
            .unwrap()
            .unwrap();
        match message {
            Message::Pong(payload) => return payload.to_vec(),
            Message::Ping(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}
