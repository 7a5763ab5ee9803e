//! Hardening (issue 13, items 6, 8 and 9) against the real binary: what the process
//! writes about its files and its clients. Errors in config files never quote the file;
//! the data and cache directories are private and a cache that others could have written
//! is never loaded; log lines with client text are short and few.

use std::time::Duration;

use crate::process::{Process, run_to_exit, spawn, work_dir};
use crate::support::*;

/// Waits until the process's log has a line containing every needle; returns that line.
fn wait_for_process_log(process: &Process, needles: &[&str]) -> String {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let log = process.log_text();
        if let Some(line) = log.lines().find(|line| needles.iter().all(|n| line.contains(n))) {
            return line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "no log line with {needles:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Secrets that a typo puts into a config file, each in a different way.
const TYPO_SECRET: &str = "SUPERSECRET-typo-5f2a9c";
const UNQUOTED_SECRET: &str = "sk-live-unquoted-81d3e0";
const WRONG_TYPE_SECRET: &str = "sk-live-SECRET-wrongtype-c47";
const RELOAD_SECRET: &str = "sk-live-reload-0b6e1d";
const CONFIG_SECRET: &str = "sk-live-config-7e5a42";

fn assert_no_secret(output: &str) {
    for secret in [TYPO_SECRET, UNQUOTED_SECRET, WRONG_TYPE_SECRET, RELOAD_SECRET, CONFIG_SECRET] {
        // Not even a part of one: the test secrets share no prefix longer than "sk-live-".
        assert!(!output.contains(secret), "{secret} was printed:\n{output}");
        assert!(!output.contains(&secret[secret.len() - 6..]), "part of {secret} was printed:\n{output}");
    }
}

/// A manifest with a secret under a misspelt key, one with a secret left unquoted
/// (invalid TOML), and one with a secret under a numeric key: at start-up, on hot reload
/// and in `sockhost check`, the error names the file, line, column and key, never the
/// value. The same for `sockhost.toml`, at start-up and on SIGHUP.
#[tokio::test]
async fn a_typo_in_a_manifest_or_the_config_names_where_it_is_but_never_prints_the_value() {
    let echo = bundled_addon("echo");
    let typo = format!("kv = true\n[auth]\njwt_hs256_secert = \"{TYPO_SECRET}\"\n");
    let unquoted = format!("[config]\nmodel = \"m\"\napi_key = {UNQUOTED_SECRET}\n");
    let wrong_type = format!("cpu_limit_ms = \"{WRONG_TYPE_SECRET}\"\n");
    let work = work_dir(&[
        ("addons/typo.wasm", &echo),
        ("addons/typo.toml", typo.as_bytes()),
        ("addons/unquoted.wasm", &echo),
        ("addons/unquoted.toml", unquoted.as_bytes()),
        ("addons/wrongtype.wasm", &echo),
        ("addons/wrongtype.toml", wrong_type.as_bytes()),
        ("addons/good.wasm", &echo),
        ("sockhost.toml", b"[server]\nreload_poll_ms = 50\n"),
    ]);
    let expected = [
        (
            "addons/typo.toml",
            "line 3, column 1, key `auth.jwt_hs256_secert`: unknown field `jwt_hs256_secert`",
        ),
        ("addons/unquoted.toml", "line 3, column 11, key `config.api_key`: "),
        (
            "addons/wrongtype.toml",
            "line 1, column 16, key `cpu_limit_ms`: invalid type: string \"…\", expected u64",
        ),
    ];

    // Start-up.
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    for (file, problem) in expected {
        let line = wait_for_process_log(&process, &["addon not mounted", file]);
        assert!(line.contains(problem), "{line}");
    }

    // Hot reload of a manifest.
    std::fs::write(
        work.path().join("addons/good.toml"),
        format!("max_connections = 5\nsecret = {RELOAD_SECRET}\n"),
    )
    .unwrap();
    let line = wait_for_process_log(&process, &["addon not reloaded", "addons/good.toml"]);
    assert!(line.contains("line 2, column 10, key `secret`"), "{line}");

    // SIGHUP with a config file that holds a secret under a wrong key.
    std::fs::write(work.path().join("sockhost.toml"), format!("[admin]\napi_key = \"{CONFIG_SECRET}\"\n"))
        .unwrap();
    process.signal("-HUP");
    let line = wait_for_process_log(&process, &["configuration not reloaded"]);
    assert!(
        line.contains("sockhost.toml: line 2, column 1, key `admin.api_key`: unknown field `api_key`"),
        "{line}"
    );
    let log = process.log_text();
    drop(process);
    assert_no_secret(&log);

    // `sockhost check`.
    let (code, output) = run_to_exit(work.path(), &["check", "addons"], &[]);
    assert_ne!(code, 0, "{output}");
    for (file, problem) in expected {
        let line =
            output.lines().find(|line| line.contains(file)).unwrap_or_else(|| panic!("{file}: {output}"));
        assert!(line.contains(problem), "{line}");
    }
    assert_no_secret(&output);

    // Start-up with a bad config file: unquoted (invalid TOML) and a wrong type.
    for (text, problem) in [
        (
            format!("[cluster]\nredis_url = redis://:{CONFIG_SECRET}@cache:6379\n"),
            "sockhost.toml: line 2, column 13, key `cluster.redis_url`: ",
        ),
        (
            format!("[server]\nport = \"{CONFIG_SECRET}\"\n"),
            "sockhost.toml: line 2, column 8, key `server.port`: ",
        ),
        (
            format!("[log]\nformat = \"{CONFIG_SECRET}\"\n"),
            "sockhost.toml: line 2, column 10, key `log.format`: ",
        ),
    ] {
        std::fs::write(work.path().join("sockhost.toml"), &text).unwrap();
        let (code, output) = run_to_exit(work.path(), &[], &[]);
        assert_ne!(code, 0, "{output}");
        assert!(output.contains(problem), "{text}: {output}");
        assert_no_secret(&output);
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap_or_else(|err| panic!("{}: {err}", path.display())).permissions().mode()
        & 0o777
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The `.cwasm` entries in a cache directory.
fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

fn spawn_local(work: &std::path::Path) -> Process {
    spawn(work, &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")])
}

async fn cache_metric(process: &Process, result: &str) -> Option<f64> {
    let (_, body) = http_get(([127, 0, 0, 1], process.port).into(), "/metrics").await;
    metric_value(&body, &format!("sockhost_compile_cache_total{{result=\"{result}\"}}"))
}

/// kv.redb (every conversation aikefu keeps) and the compiled-code cache, in their
/// default places under the working directory: directories 0700, files 0600, although
/// the umask lets other users read what is created with default modes. A data directory
/// that already exists keeps its mode, with a warning; a kv.redb readable by others is
/// made 0600 again.
#[tokio::test]
async fn the_data_and_cache_directories_and_their_files_are_private() {
    let work =
        work_dir(&[("addons/testkit.wasm", &test_addon("testkit")), ("addons/testkit.toml", b"kv = true\n")]);
    // What the umask gives a file made with default modes: without the server's care, its
    // files would be like this one (0644 under the usual umask 022).
    let plain = work.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let umask_lets_others_read = mode(&plain) & 0o044 != 0;

    let process = spawn_local(work.path());
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("kv-set order 42").await;
    assert_eq!(client.recv_text().await, "kv ok");
    drop(client);
    drop(process);

    let data = work.path().join("data");
    let cache = work.path().join(".sockhost-cache");
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&data.join("kv.redb")), 0o600, "kv.redb");
    assert_eq!(mode(&cache), 0o700, "cache directory");
    assert_eq!(mode(&entries[0]), 0o600, "cache entry");
    assert!(umask_lets_others_read || mode(&plain) & 0o044 == 0, "the umask changed under the test");

    // As an older sockhost left them: readable by everyone.
    set_mode(&data, 0o755);
    set_mode(&data.join("kv.redb"), 0o644);
    let process = spawn_local(work.path());
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("kv-get order").await;
    assert_eq!(client.recv_text().await, "kv value 42");
    wait_for_process_log(
        &process,
        &["data directory data is open to other users (mode 0755)", "chmod 700 data"],
    );
    wait_for_process_log(&process, &["kv.redb", "was readable by other users; made it 0600"]);
    assert_eq!(mode(&data.join("kv.redb")), 0o600, "kv.redb made private again");
    assert_eq!(mode(&data), 0o755, "an existing data directory keeps its mode (warned about)");
}

/// Native code is loaded from the cache only if no one but this user could have written
/// it: an entry writable by others, an entry of another owner, a directory writable by
/// others or of another owner are each ignored with a warning and the addon compiled;
/// an untrusted entry is replaced, an untrusted directory is not written to.
#[tokio::test]
async fn a_cache_entry_or_directory_another_user_could_write_is_never_loaded() {
    let work = work_dir(&[("addons/echo.wasm", &bundled_addon("echo"))]);
    let cache = work.path().join(".sockhost-cache");
    let serves = |process: &Process| {
        let url = format!("ws://127.0.0.1:{}/ws/echo", process.port);
        async move {
            let mut client = Client::connect(&url).await;
            client.send_text("compiled?").await;
            assert_eq!(client.recv_text().await, "compiled?");
        }
    };
    let root = work.path().join("probe");
    std::fs::write(&root, b"").unwrap();
    // Only root can give a file away to another user.
    let can_chown = std::os::unix::fs::chown(&root, Some(65534), None).is_ok();

    let cold = spawn_local(work.path());
    assert_eq!(cache_metric(&cold, "miss").await, Some(1.0));
    drop(cold);
    let entry = cache_entries(&cache).pop().unwrap();
    let warm = spawn_local(work.path());
    assert_eq!(cache_metric(&warm, "hit").await, Some(1.0), "a private entry is loaded");
    drop(warm);

    // An entry that group or others may write.
    set_mode(&entry, 0o666);
    let process = spawn_local(work.path());
    assert_eq!(cache_metric(&process, "hit").await, None, "{}", process.log_text());
    assert_eq!(cache_metric(&process, "untrusted").await, Some(1.0));
    let line = wait_for_process_log(&process, &["cache entry is not trusted", "writable by group or others"]);
    assert!(line.contains("recompiling and replacing it"), "{line}");
    serves(&process).await;
    drop(process);
    assert_eq!(mode(&entry), 0o600, "the entry was replaced by a private one");

    if can_chown {
        // An entry of another user.
        std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).unwrap();
        let process = spawn_local(work.path());
        assert_eq!(cache_metric(&process, "hit").await, None, "{}", process.log_text());
        wait_for_process_log(&process, &["cache entry is not trusted", "owned by uid 65534"]);
        serves(&process).await;
        drop(process);
    }

    // A directory that others may write: nothing read from it, nothing written to it.
    let warm = spawn_local(work.path());
    assert_eq!(cache_metric(&warm, "hit").await, Some(1.0), "the entry is sound again");
    drop(warm);
    set_mode(&cache, 0o777);
    let process = spawn_local(work.path());
    assert_eq!(cache_metric(&process, "hit").await, None, "{}", process.log_text());
    assert_eq!(cache_metric(&process, "untrusted").await, Some(1.0));
    wait_for_process_log(&process, &["cache directory is not trusted", "writable by group or others"]);
    serves(&process).await;
    drop(process);
    std::fs::remove_file(&entry).unwrap();
    let process = spawn_local(work.path());
    serves(&process).await;
    drop(process);
    assert!(cache_entries(&cache).is_empty(), "nothing is written to an untrusted directory");

    if can_chown {
        // A private directory of another user.
        set_mode(&cache, 0o700);
        std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
        let process = spawn_local(work.path());
        assert_eq!(cache_metric(&process, "untrusted").await, Some(1.0), "{}", process.log_text());
        wait_for_process_log(&process, &["cache directory is not trusted", "owned by uid 65534"]);
        drop(process);
    }
}

/// A client that is refused again and again, each time with a 15 KB `Origin`, and one
/// that opens connections and never sends a request head: the log gets at most 10 lines
/// of each kind per 10 s (per addon; the server's own for what fails before an addon is
/// known), none longer than about 256 bytes of client text, then one line with the count
/// of those left out. The metrics count every failure.
#[tokio::test]
async fn a_client_that_is_refused_in_a_loop_gets_few_short_log_lines() {
    let work = work_dir(&[
        ("addons/echo.wasm", &bundled_addon("echo")),
        ("addons/echo.toml", b"allowed_origins = [\"https://shop.example\"]\n"),
        ("sockhost.toml", b"[limits]\nhandshake_timeout_ms = 200\n"),
    ]);
    let process = spawn_local(work.path());
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], process.port).into();
    let origin = format!("https://{}.evil.example", "a".repeat(15_000));
    let refused = 40;
    for _ in 0..refused {
        let request = format!(
            "GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\r\n"
        );
        let (status, _) = http_request(addr, &request).await;
        assert_eq!(status, 403);
    }
    // Silent connections, each dropped when its 200 ms for the head have passed.
    let silent: Vec<_> =
        futures_util::future::join_all((0..20).map(|_| tokio::net::TcpStream::connect(addr))).await;
    let (_, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(metric_value(&metrics, "sockhost_failures_total{kind=\"origin\"}"), Some(refused as f64));

    // The counts of what was left out come once the 10 s windows are over.
    let summary = wait_for_process_log(&process, &["30 more `origin` lines (echo) were left out of the log"]);
    assert!(summary.contains("WARN"), "{summary}");
    wait_for_process_log(&process, &["10 more `handshake_timeout` lines (server) were left out of the log"]);
    drop(silent);
    let log = process.log_text();
    let origin_lines: Vec<&str> = log.lines().filter(|line| line.contains("origin not allowed")).collect();
    assert_eq!(origin_lines.len(), 10, "{log}");
    for line in origin_lines {
        assert!(line.len() < 700, "{} bytes: {line}", line.len());
        assert!(line.contains(&format!("…[{} more bytes]", origin.len() - 256)), "{line}");
    }
    let timeouts = log.lines().filter(|line| line.contains("request head not received in time")).count();
    assert_eq!(timeouts, 10, "{log}");
    assert!(log.len() < 20_000, "the log grew by {} bytes", log.len());
}
