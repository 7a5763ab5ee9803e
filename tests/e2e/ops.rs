//! Operations: `/healthz`, `/readyz` and `/metrics` on the WebSocket port, `/readyz`
//! during a drain, `sockhost check` and `--version`, the compiled-code cache recovering
//! from bad entries, JSON logs, and SIGHUP.

use std::io::Read;
use std::time::Duration;

use crate::process::{run_to_exit, spawn, work_dir};
use crate::support::*;

#[tokio::test]
async fn health_ready_and_metrics_answer_on_the_websocket_port() {
    let server =
        TestServer::start(&[("echo.wasm", &bundled_addon("echo")), ("bad.wasm", &hostile_component())]).await;
    let (status, body) = http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(server.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("2 addons mounted"), "{body}");

    let (status, before) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(before.contains("Content-Type: text/plain; version=0.0.4"), "{before}");
    assert!(before.contains("# TYPE sockhost_addon_callback_seconds histogram"), "{before}");
    assert_eq!(metric_value(&before, "sockhost_addons_mounted"), Some(2.0));
    assert!(metric_value(&before, "sockhost_addon_compile_seconds_count{addon=\"echo\"}") >= Some(1.0));
    assert_eq!(metric_value(&before, "sockhost_failures_total{kind=\"addon_trap\"}"), Some(0.0));
    let trap_count =
        |addon: &str| format!("sockhost_addon_failures_total{{addon=\"{addon}\",kind=\"addon_trap\"}}");
    assert_eq!(metric_value(&before, &trap_count("bad")), Some(0.0));

    let mut client = server.connect("/ws/echo").await;
    for text in ["one", "two", "three"] {
        client.send_text(text).await;
        assert_eq!(client.recv_text().await, text);
    }
    let series = |name: &str| format!("{name}{{addon=\"echo\"}}");
    assert_eq!(server.metric(&series("sockhost_addon_open_connections")).await, Some(1.0));
    assert_eq!(server.metric(&series("sockhost_addon_live_instances")).await, Some(1.0));
    assert_eq!(server.metric(&series("sockhost_addon_connections_total")).await, Some(1.0));
    assert_eq!(server.metric(&series("sockhost_addon_messages_in_total")).await, Some(3.0));
    assert_eq!(server.metric(&series("sockhost_addon_bytes_in_total")).await, Some(11.0));
    assert_eq!(server.metric(&series("sockhost_addon_messages_out_total")).await, Some(3.0));
    assert_eq!(server.metric(&series("sockhost_addon_bytes_out_total")).await, Some(11.0));
    assert_eq!(server.metric(&series("sockhost_addon_callback_seconds_count")).await, Some(3.0));
    client.close(1000, "").await;
    eventually("the closed connection leaves the gauges", || async {
        server.metric(&series("sockhost_addon_open_connections")).await == Some(0.0)
            && server.metric(&series("sockhost_addon_live_instances")).await == Some(0.0)
    })
    .await;

    // A trap is counted by kind, server-wide and for the addon that trapped.
    let mut hostile = server.connect("/ws/bad").await;
    hostile.send_text("u").await;
    assert_eq!(hostile.recv_json().await["code"], "addon_trap");
    assert_eq!(server.metric("sockhost_failures_total{kind=\"addon_trap\"}").await, Some(1.0));
    assert_eq!(server.metric(&trap_count("bad")).await, Some(1.0));
    assert_eq!(server.metric(&trap_count("echo")).await, Some(0.0));
}

#[tokio::test]
async fn readyz_turns_503_during_a_sigterm_drain_while_healthz_stays_200() {
    let work = work_dir(&[
        ("addons/testkit.wasm", &test_addon("testkit")),
        ("sockhost.toml", b"[limits]\ndrain_timeout_ms = 8000\n"),
    ]);
    let mut process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", process.port).parse().unwrap();
    assert_eq!(http_get(addr, "/readyz").await.0, 200);

    // A client that never answers the close frame keeps the drain going.
    let mut stuck = Client::connect(&format!("ws://{addr}/ws/testkit")).await;
    assert_eq!(stuck.recv_text().await, "open");
    process.signal("-TERM");
    eventually("/readyz answers 503", || async { http_get(addr, "/readyz").await.0 == 503 }).await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200, "still alive while draining");
    let (status, text) = http_request(
        addr,
        "GET /ws/testkit HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "no new WebSocket while draining: {text}");
    drop(stuck);
    assert!(process.wait_exit(), "{}", process.log_text());
}

#[test]
fn check_validates_addons_and_exits_non_zero_on_a_problem() {
    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::write(good.join("echo.wasm"), bundled_addon("echo")).unwrap();
    std::fs::write(
        good.join("echo.toml"),
        "memory_limit = \"16MiB\"\nallowed_origins = [\"https://shop.example\"]\n",
    )
    .unwrap();
    let (code, output) = run_to_exit(work.path(), &["check", "good"], &[]);
    assert_eq!(code, 0, "{output}");
    for needle in [
        "ok    good/echo.wasm → /ws/echo",
        "sockhost:addon/session@0.1.4",
        "manifest: good/echo.toml",
        "grants: none",
        "memory_limit         16MiB",
        "cpu_limit_ms         1000",
        "allowed_origins      https://shop.example",
        "exports: handler, channel-handler, hibernation (idle connections hibernate after 30000 ms)",
        "hibernate_max_state_bytes 16KiB",
        "1 checked: 1 ok, 0 failed",
    ] {
        assert!(output.contains(needle), "missing {needle:?} in:\n{output}");
    }

    // A manifest with grants: each one listed, secrets shown by variable name only.
    let granted = work.path().join("granted");
    std::fs::create_dir(&granted).unwrap();
    std::fs::write(granted.join("aikefu.wasm"), bundled_addon("aikefu")).unwrap();
    std::fs::write(
        granted.join("aikefu.toml"),
        "kv = true\noutbound_hosts = [\"https://api.example.com\"]\n[auth]\njwt_hs256_secret = { env = \"CHECK_JWT\" }\n[channels]\nsubscribe = [\"user:*\"]\ninbox = 32\n[config]\nmodel = \"m\"\napi_key = { env = \"CHECK_KEY\" }\n",
    )
    .unwrap();
    let secret = "check-secret-check-secret-check-secret";
    let (code, output) =
        run_to_exit(work.path(), &["check", "granted"], &[("CHECK_JWT", secret), ("CHECK_KEY", "sk-check")]);
    assert_eq!(code, 0, "{output}");
    for needle in [
        "grant: kv",
        "grant: outbound HTTP to https://api.example.com:443",
        "grant: auth: JWT HS256, secret from $CHECK_JWT",
        "grant: config model = m",
        "grant: config api_key = <from $CHECK_KEY>",
        "grant: channels: subscribe user:*; publish none",
        "channels.inbox       32",
        "exports: handler, channel-handler, hibernation",
        "wasi:http/outgoing-handler",
    ] {
        assert!(output.contains(needle), "missing {needle:?} in:\n{output}");
    }
    assert!(!output.contains(secret) && !output.contains("sk-check"), "{output}");

    let bad = work.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("core.wasm"), wat::parse_str("(module)").unwrap()).unwrap();
    std::fs::write(bad.join("mirror.wasm"), test_addon("mirror")).unwrap();
    std::fs::write(bad.join("mirror.toml"), "cpu_limit_ms = 0\n").unwrap();
    std::fs::write(bad.join("rooms.wasm"), test_addon("fanout")).unwrap();
    std::fs::write(bad.join("rooms.toml"), "[channels]\nsubscribe = [\"room:*x\"]\n").unwrap();
    let (code, output) = run_to_exit(work.path(), &["check", "bad", "good/echo.wasm"], &[]);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("FAIL  bad/core.wasm: this is a core WebAssembly module"), "{output}");
    assert!(
        output.contains("FAIL  bad/mirror.wasm: invalid manifest") && output.contains("cpu_limit_ms"),
        "{output}"
    );
    assert!(
        output.contains("FAIL  bad/rooms.wasm: invalid manifest")
            && output.contains("key `channels.subscribe`"),
        "{output}"
    );
    assert!(output.contains("4 checked: 1 ok, 3 failed"), "{output}");

    let (code, output) = run_to_exit(work.path(), &["check", "missing.wasm"], &[]);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("missing.wasm: no such file"), "{output}");
}

#[test]
fn version_prints_the_name_and_version() {
    let work = tempfile::tempdir().unwrap();
    let (code, output) = run_to_exit(work.path(), &["--version"], &[]);
    assert_eq!(code, 0);
    assert_eq!(output.trim(), format!("sockhost {}", env!("CARGO_PKG_VERSION")));
}

/// The one entry in a cache directory.
fn cache_entry(dir: &std::path::Path) -> std::path::PathBuf {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_corrupt_or_stale_cache_entry_is_recompiled_never_trusted() {
    let cache = tempfile::tempdir().unwrap();
    let echo = bundled_addon("echo");
    let files: [(&str, &[u8]); 1] = [("echo.wasm", &echo)];
    let start = || {
        let dir = cache.path().to_owned();
        TestServer::start_with(&files, move |config| config.cache_dir = Some(dir))
    };
    let serves = |server: &TestServer| {
        let url = server.url("/ws/echo");
        async move {
            let mut client = Client::connect(&url).await;
            client.send_text("cached?").await;
            assert_eq!(client.recv_text().await, "cached?");
        }
    };
    let cache_result = |result: &str| format!("sockhost_compile_cache_total{{result=\"{result}\"}}");

    let cold = start().await;
    assert_eq!(cold.metric(&cache_result("miss")).await, Some(1.0));
    serves(&cold).await;
    let entry = cache_entry(cache.path());

    let warm = start().await;
    assert_eq!(warm.metric(&cache_result("hit")).await, Some(1.0));
    serves(&warm).await;

    // Cut short, as a crash during a write without the rename would leave it.
    let whole = std::fs::read(&entry).unwrap();
    std::fs::write(&entry, &whole[..whole.len() / 2]).unwrap();
    let server = start().await;
    assert_eq!(server.metric(&cache_result("corrupt")).await, Some(1.0));
    let line = wait_for_log(&["cache entry is corrupt", &entry.display().to_string(), "truncated"]).await;
    assert!(line.contains("recompiling"), "{line}");
    serves(&server).await;
    assert_eq!(std::fs::read(&entry).unwrap(), whole, "the entry was written again");

    // One flipped bit in the code.
    let mut flipped = whole.clone();
    let last = flipped.len() - 100;
    flipped[last] ^= 0x10;
    std::fs::write(&entry, &flipped).unwrap();
    let server = start().await;
    wait_for_log(&["cache entry is corrupt", &entry.display().to_string(), "checksum mismatch"]).await;
    serves(&server).await;

    // A sound header over bytes wasmtime does not accept (a stale or foreign artifact).
    let junk = b"not native code at all".to_vec();
    let mut forged = b"sockhost-cwasm1\n".to_vec();
    forged.extend_from_slice(&(junk.len() as u64).to_le_bytes());
    forged.extend_from_slice(&sha256(&junk));
    forged.extend_from_slice(&junk);
    std::fs::write(&entry, &forged).unwrap();
    let server = start().await;
    wait_for_log(&["cache entry is corrupt", &entry.display().to_string(), "wasmtime refused it"]).await;
    serves(&server).await;
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[tokio::test]
async fn json_logs_carry_the_addon_and_connection_id_on_every_connection_line() {
    let work = work_dir(&[("addons/testkit.wasm", &test_addon("testkit"))]);
    let process =
        spawn(work.path(), &["--listen", "127.0.0.1", "--log-format", "json"], &[("SOCKHOST_PORT", "0")]);
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("error").await;
    assert_eq!(client.recv_json().await["code"], "addon_error");
    client.send_text("log").await;
    assert_eq!(client.recv_text().await, "logged");

    let mut host_line = None;
    let mut addon_line = None;
    let deadline = std::time::Instant::now() + PATIENCE;
    while (host_line.is_none() || addon_line.is_none()) && std::time::Instant::now() < deadline {
        for line in process.log_text().lines() {
            let json: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
            let message = json["fields"]["message"].as_str().unwrap_or_default();
            if message.contains("on-message returned an error") {
                host_line = Some(json.clone());
            }
            if message.contains("testkit log line") {
                addon_line = Some(json);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let host_line = host_line.expect("the host's line about the failed message");
    assert_eq!(host_line["span"]["addon"], "testkit", "{host_line}");
    assert!(host_line["span"]["conn"].as_u64().is_some(), "{host_line}");
    assert_eq!(host_line["fields"]["kind"], "addon_error", "{host_line}");
    let addon_line = addon_line.expect("the addon's own log line");
    assert_eq!(addon_line["fields"]["addon"], "testkit", "{addon_line}");
    assert_eq!(addon_line["fields"]["conn"], host_line["span"]["conn"], "{addon_line}");
}

#[tokio::test]
async fn sighup_applies_what_it_can_and_names_what_needs_a_restart() {
    let work = work_dir(&[]);
    let config = work.path().join("sockhost.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1\"\nport = 0\n[limits]\nhandshake_timeout_ms = 600000\n",
    )
    .unwrap();
    let process = spawn(work.path(), &[], &[]);

    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1\"\nport = 1\n[limits]\nhandshake_timeout_ms = 200\n",
    )
    .unwrap();
    process.signal("-HUP");
    process.wait_for_log("need a restart");
    let log = process.log_text();
    assert!(log.contains("configuration reloaded") && log.contains("handshake_timeout_ms=200"), "{log}");
    assert!(log.contains("not applied: server.listen / server.port"), "{log}");

    // The new handshake timeout is in force: a silent client gets 408 (after 200 ms, not
    // ten minutes), still on the port the server started with.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", process.port)).unwrap();
    silent.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut response = String::new();
    silent.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");

    // A file that no longer parses changes nothing, and says why.
    std::fs::write(&config, "[limits]\nhandshake_timeout_ms = \"soon\"\n").unwrap();
    process.signal("-HUP");
    process.wait_for_log("configuration not reloaded");
    assert!(process.log_text().contains("handshake_timeout_ms"), "{}", process.log_text());
}
