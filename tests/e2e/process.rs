//! The real `sockhost` binary: defaults, start-up log, configuration errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_sockhost");

/// The binary, with none of the caller's `SOCKHOST_*` settings leaking into the test.
fn sockhost_command() -> Command {
    let mut command = Command::new(BIN);
    for key in [
        "SOCKHOST_CONFIG",
        "SOCKHOST_LISTEN",
        "SOCKHOST_PORT",
        "SOCKHOST_PUBLIC_HOST",
        "SOCKHOST_ADDONS_DIR",
        "SOCKHOST_DATA_DIR",
        "SOCKHOST_CACHE_DIR",
        "SOCKHOST_LOG_FORMAT",
        "SOCKHOST_TLS_CERT",
        "SOCKHOST_TLS_KEY",
        "SOCKHOST_REUSE_PORT",
        "SOCKHOST_REDIS_URL",
        "SOCKHOST_ADMIN_LISTEN",
        "SOCKHOST_API_KEY",
        "SOCKHOST_NO_WEB",
        "NO_COLOR",
    ] {
        command.env_remove(key);
    }
    command
}

/// A running `sockhost` process, killed on drop.
pub struct Process {
    pub child: Child,
    /// Lines the process logged up to and including the "listening" line.
    startup: Vec<String>,
    /// Every line the process logged so far.
    log: Arc<Mutex<Vec<String>>>,
    /// The thread that fills `log`: it ends when the process's stderr closes, with every
    /// line in `log`.
    log_reader: std::thread::JoinHandle<()>,
    pub port: u16,
}

impl Process {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and returns whether it exited with success. Then
    /// [`Process::log_text`] holds every line it logged.
    pub fn wait_exit(&mut self) -> bool {
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "the process did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        while !self.log_reader.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the process exited but its stderr stayed open");
            std::thread::sleep(Duration::from_millis(5));
        }
        status.success()
    }

    /// The admin listener's port, from the "listening on" line.
    pub fn admin_port(&self) -> Option<u16> {
        let line = self.startup.last()?;
        let addr = line.split("admin listener http://").nth(1)?;
        addr.trim().rsplit(':').next()?.parse().ok()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until the process has logged a line containing `needle`, and fails the test
    /// with the whole log if it does not within [`PATIENCE`]. A line the process wrote is
    /// in [`Process::log_text`] only once the reader thread has taken it from the pipe,
    /// which can be after the client saw what followed it (or after the process exited).
    pub fn wait_for_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !self.log_text().contains(needle) {
            assert!(std::time::Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A working directory for the binary, with an `addons/` folder and `files` written at
/// their paths relative to it (`addons/testkit.wasm`, `sockhost.toml`).
pub fn work_dir(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("addons")).unwrap();
    for (path, bytes) in files {
        std::fs::write(work.path().join(path), bytes).unwrap();
    }
    work
}

/// Starts the binary in `cwd` with `args` and `env`, and reads its log until it listens.
pub fn spawn(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Process {
    spawn_adjusted(cwd, args, env, |_| {})
}

/// [`spawn`], with a last change to the command (for example, its resource limits).
pub fn spawn_adjusted(
    cwd: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    adjust: impl FnOnce(&mut Command),
) -> Process {
    let mut command = sockhost_command();
    command.current_dir(cwd).args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    command.env("RUST_LOG", "info");
    for (key, value) in env {
        command.env(key, value);
    }
    adjust(&mut command);
    let mut child = command.spawn().expect("spawn sockhost");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut startup = Vec::new();
    loop {
        let Ok(line) = lines_rx.recv_timeout(PATIENCE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sockhost did not start; log: {startup:#?}");
        };
        let listening = line.contains("listening on");
        startup.push(line);
        if listening {
            break;
        }
    }
    // Keep draining the pipe so the process never blocks on a full stderr.
    let log = Arc::new(Mutex::new(startup.clone()));
    let sink = log.clone();
    let log_reader = std::thread::spawn(move || {
        while let Ok(line) = lines_rx.recv() {
            sink.lock().unwrap().push(line);
        }
    });
    let port = startup
        .last()
        .and_then(|line| line.split("listening on ").nth(1))
        .and_then(|rest| rest.split(';').next())
        .and_then(|addr| addr.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .expect("port in the listening line");
    // The mounted lines come right after the listening line: give them a moment.
    std::thread::sleep(Duration::from_millis(100));
    Process { child, startup, log, log_reader, port }
}

/// Runs the binary to completion and returns its exit status and stderr.
pub fn run_to_exit(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = sockhost_command();
    command.current_dir(cwd).args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run sockhost");
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn the_binary_serves_addons_from_the_working_directory_and_logs_their_urls() {
    let work = work_dir(&[("addons/echo.wasm", &bundled_addon("echo"))]);
    // No flags, no config file: the defaults, except the port (8080 may be taken here).
    let process = spawn(work.path(), &[], &[("SOCKHOST_PORT", "0")]);
    let log = process.startup.join("\n");
    assert!(log.contains("listening on 0.0.0.0:"), "default listen address is 0.0.0.0: {log}");
    std::thread::sleep(Duration::from_millis(200));

    let url = format!("ws://localhost:{}/ws/echo", process.port);
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/echo", process.port)).await;
    client.send_text("from the binary").await;
    assert_eq!(client.recv_text().await, "from the binary");
    drop(process);
    let _ = url;
}

/// A log that goes to a pipe (or a file, or journald) is plain text: no colour codes
/// between a field's name and its value, so an operator's grep for `addon="testkit"`
/// finds the line. (A terminal still gets colours unless `NO_COLOR` is set.)
#[tokio::test]
async fn a_log_that_is_not_a_terminal_is_plain_text_without_colour_codes() {
    let work = work_dir(&[("addons/testkit.wasm", &test_addon("testkit"))]);
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("error").await;
    assert_eq!(client.recv_json().await["code"], "addon_error");
    process.wait_for_log("on-message returned an error");
    let log = process.log_text();
    let line = log.lines().find(|line| line.contains("on-message returned an error")).unwrap();
    assert!(line.contains(r#"addon="testkit""#), "the connection's fields, plain: {line}");
    assert!(!log.contains('\u{1b}'), "escape codes in a piped log:\n{log}");
}

#[tokio::test]
async fn the_binary_logs_each_mounted_addon_with_its_url() {
    let work = work_dir(&[
        ("addons/echo.wasm", &bundled_addon("echo")),
        ("sockhost.toml", b"[server]\nport = 0\npublic_host = \"shop.example\"\n"),
    ]);
    let mut command = sockhost_command();
    command.current_dir(work.path()).stderr(Stdio::piped()).stdout(Stdio::null()).env("RUST_LOG", "info");
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mounted = loop {
        let line = lines.next().expect("log line").unwrap();
        seen.push(line.clone());
        if line.contains("mounted ws://") {
            break line;
        }
        assert!(seen.len() < 50, "no mounted line: {seen:#?}");
    };
    let _ = child.kill();
    let _ = child.wait();
    let port = seen
        .iter()
        .find_map(|l| l.split("listening on ").nth(1))
        .and_then(|rest| rest.split(';').next())
        .and_then(|addr| addr.rsplit(':').next())
        .unwrap()
        .to_owned();
    assert!(mounted.contains(&format!("ws://shop.example:{port}/ws/echo")), "{mounted}");
}

#[test]
fn a_port_in_use_stops_start_up_with_one_line_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let work = tempfile::tempdir().unwrap();
    let (code, output) = run_to_exit(work.path(), &["--listen", "127.0.0.1", "--port", &port], &[]);
    assert_ne!(code, 0);
    let line = output.lines().find(|l| l.contains("error")).unwrap_or_else(|| panic!("{output}"));
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(line.contains("already in use") && line.contains("--port"), "{line}");
}

#[test]
fn bad_config_values_stop_start_up_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 3] = [
        ("[server]\nport = \"http\"\n", "port"),
        ("[server]\nlisten_addr = \"0.0.0.0\"\n", "listen_addr"),
        ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
    ];
    for (text, key) in cases {
        std::fs::write(work.path().join("sockhost.toml"), text).unwrap();
        let (code, output) = run_to_exit(work.path(), &[], &[]);
        assert_ne!(code, 0, "{text}");
        assert!(output.contains(key) && output.contains("sockhost.toml"), "{text}: {output}");
    }
    std::fs::remove_file(work.path().join("sockhost.toml")).unwrap();

    let (code, output) = run_to_exit(work.path(), &[], &[("SOCKHOST_PORT", "eighty")]);
    assert_ne!(code, 0);
    assert!(output.contains("--port") && output.contains("eighty"), "{output}");
    let (code, output) = run_to_exit(work.path(), &["--config", "missing.toml"], &[]);
    assert_ne!(code, 0);
    assert!(output.contains("missing.toml"), "{output}");
}

#[test]
fn help_explains_every_setting() {
    let work = tempfile::tempdir().unwrap();
    let (code, output) = run_to_exit(work.path(), &["--help"], &[]);
    assert_eq!(code, 0);
    for needle in [
        "--listen",
        "--port",
        "--public-host",
        "--addons-dir",
        "--config",
        "--cache-dir",
        "--no-compile-cache",
        "--log-format",
        "--tls-cert",
        "--tls-key",
        "--reuse-port",
        "check",
        "SOCKHOST_PORT",
        "8080",
        "0.0.0.0",
    ] {
        assert!(output.contains(needle), "--help lacks {needle}: {output}");
    }
}

#[tokio::test]
async fn sigterm_and_sigint_close_every_connection_with_1001_run_on_close_and_exit() {
    for signal in ["-TERM", "-INT"] {
        let work = work_dir(&[("addons/testkit.wasm", &test_addon("testkit"))]);
        let mut process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
        let base = format!("ws://127.0.0.1:{}", process.port);
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut client = Client::connect(&format!("{base}/ws/testkit")).await;
            assert_eq!(client.recv_text().await, "open");
            clients.push(client);
        }
        let mut builtin = Client::connect(&format!("{base}/ws")).await;
        builtin.recv_json().await;

        process.signal(signal);
        for client in &mut clients {
            let (code, reason) = client.recv_close().await;
            assert_eq!(code, 1001, "{signal}");
            assert!(reason.contains("shutting down"), "{reason}");
        }
        assert_eq!(builtin.recv_close().await.0, 1001);
        assert!(process.wait_exit(), "{signal}: exit status; log:\n{}", process.log_text());
        let log = process.log_text();
        assert_eq!(
            log.matches("testkit on-close code=1001").count(),
            3,
            "{signal}: every on-close ran once:\n{log}"
        );
        assert!(log.contains("all connections closed"), "{log}");
        // Nothing accepts connections any more.
        assert!(std::net::TcpStream::connect(("127.0.0.1", process.port)).is_err());
    }
}

#[tokio::test]
async fn the_drain_timeout_bounds_shutdown() {
    let work = work_dir(&[
        ("addons/testkit.wasm", &test_addon("testkit")),
        ("sockhost.toml", b"[limits]\ndrain_timeout_ms = 500\n"),
    ]);
    let mut process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);
    // A client that never answers the close frame holds its connection open.
    let mut stuck = Client::connect(&format!("ws://127.0.0.1:{}/ws/testkit", process.port)).await;
    assert_eq!(stuck.recv_text().await, "open");
    process.signal("-TERM");
    assert!(process.wait_exit());
    assert!(process.log_text().contains("drain timeout passed"), "{}", process.log_text());
}

#[tokio::test]
async fn with_reuse_port_a_new_process_takes_over_the_port_and_then_the_kv_store_while_the_old_one_drains() {
    let work = work_dir(&[
        ("addons/testkit.wasm", &test_addon("testkit")),
        ("addons/testkit.toml", b"kv = true\n"),
        ("sockhost.toml", b"[server]\nreuse_port = true\n[limits]\ndrain_timeout_ms = 60000\nhandshake_timeout_ms = 60000\n"),
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port_arg = port.to_string();
    let args = ["--listen", "127.0.0.1", "--port", &port_arg];
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let url = format!("ws://{addr}/ws/testkit");

    let mut old = spawn(work.path(), &args, &[]);
    let mut writer = Client::connect(&url).await;
    assert_eq!(writer.recv_text().await, "open");
    writer.send_text("kv-set handover kept").await;
    assert_eq!(writer.recv_text().await, "kv ok");
    // A client still sending its request head keeps the old process draining (up to the
    // handshake timeout), so the checks below run while both processes are up.
    let mut half_open = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half_open, b"GET /ws/testkit HTTP/1.1\r\n").await.unwrap();

    // The new process starts on the same port while the old one still serves it.
    let new = spawn(work.path(), &args, &[]);
    old.signal("-TERM");
    assert_eq!(writer.recv_close().await.0, 1001);
    drop(writer);
    old.wait_for_log("listener closed");

    // Every new connection reaches the new process: the draining one would answer 503.
    for i in 0..20 {
        let mut client = Client::connect(&url).await;
        assert_eq!(client.recv_text().await, "open", "connection {i}");
        assert_eq!(http_get(addr, "/readyz").await.0, 200, "probe {i}");
    }

    // The old process still holds the kv file: a kv call in the new one waits for it.
    let mut reader = Client::connect(&url).await;
    assert_eq!(reader.recv_text().await, "open");
    reader.send_text("kv-get handover").await;
    new.wait_for_log("in use by another process");
    assert!(old.child.try_wait().unwrap().is_none(), "the old process exited before the checks ended");

    // When its last client goes, the old process exits, and the waiting call gets the
    // value the old process wrote.
    drop(half_open);
    assert_eq!(reader.recv_text().await, "kv value kept");
    assert!(old.wait_exit(), "{}", old.log_text());
    assert!(old.log_text().contains("all connections closed"), "{}", old.log_text());
    new.wait_for_log("kv store opened");
}

#[test]
fn reuse_port_cannot_share_a_port_held_without_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let work = tempfile::tempdir().unwrap();
    let (code, output) =
        run_to_exit(work.path(), &["--listen", "127.0.0.1", "--port", &port, "--reuse-port"], &[]);
    assert_ne!(code, 0);
    let line = output.lines().find(|l| l.contains("error")).unwrap_or_else(|| panic!("{output}"));
    assert!(line.contains(&format!("127.0.0.1:{port}")) && line.contains("reuse_port"), "{line}");
}

#[tokio::test]
async fn with_reuse_port_a_starting_process_takes_no_connections_until_its_addons_are_loaded() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port_arg = port.to_string();
    let args = ["--listen", "127.0.0.1", "--port", &port_arg];
    let base = format!("ws://127.0.0.1:{port}");
    let work = |addon: &str| {
        let wasm = format!("addons/{addon}.wasm");
        work_dir(&[(&wasm, &test_addon(addon)), ("sockhost.toml", b"[server]\nreuse_port = true\n")])
    };
    let old_dir = work("testkit");
    let mut old = spawn(old_dir.path(), &args, &[]);

    // The new process serves mirror only. Its manifest is a FIFO, so loading it waits
    // until the test writes the manifest: a start-up that takes as long as the test wants.
    let new_dir = work("mirror");
    let fifo = new_dir.path().join("addons/mirror.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (path, args_owned) = (new_dir.path().to_owned(), args.map(str::to_owned));
    let starting = std::thread::spawn(move || {
        let args: Vec<&str> = args_owned.iter().map(String::as_str).collect();
        spawn(&path, &args, &[])
    });
    // Opening a FIFO for writing returns once a reader has it open: the new process is
    // past binding the port and inside loading its addons.
    let opened = tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo));
    let mut manifest = tokio::time::timeout(PATIENCE, opened)
        .await
        .expect("the new process never read its manifest")
        .unwrap()
        .unwrap();

    // Meanwhile every connection is the old process's: one queued for the new process
    // would wait for its start-up, and get 404 for testkit after it.
    for i in 0..20 {
        let connect = tokio_tungstenite::connect_async(format!("{base}/ws/testkit"));
        let (mut ws, _) = tokio::time::timeout(Duration::from_secs(3), connect)
            .await
            .unwrap_or_else(|_| {
                panic!("connection {i} was not answered: it went to the process still loading")
            })
            .unwrap_or_else(|err| panic!("connection {i}: {err}"));
        let first = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(first.into_text().unwrap().as_str(), "open", "connection {i}");
    }

    // Its start-up finishes; once the old process has stopped, the new one serves.
    std::io::Write::write_all(&mut manifest, b"max_connections = 10\n").unwrap();
    drop(manifest);
    let _new = starting.join().unwrap();
    old.signal("-TERM");
    assert!(old.wait_exit(), "{}", old.log_text());
    let mut client = Client::connect(&format!("{base}/ws/mirror")).await;
    client.send_text("hi").await;
    assert_eq!(client.recv_text().await, "hi");
}
