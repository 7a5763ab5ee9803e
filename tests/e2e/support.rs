//! Shared helpers for the end-to-end tests: servers on loopback (in-process or the real
//! binary), WebSocket clients, raw HTTP, addon files, and a capture of the server's log.

#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen promptly before it fails.
/// This guards against hangs; it is never a performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// A bundled addon, as built by scripts/build-addons into addons/<name>.wasm.
pub fn bundled_addon(name: &str) -> Vec<u8> {
    read_built(&repo_root().join("addons").join(format!("{name}.wasm")))
}

/// A test addon from tests/addons, as built by scripts/build-addons.
pub fn test_addon(name: &str) -> Vec<u8> {
    let dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => repo_root().join("target"),
    };
    read_built(&dir.join("test-addons").join(format!("{name}.wasm")))
}

fn read_built(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| {
        panic!("cannot read {}: {err}. Build the addons first: scripts/build-addons", path.display())
    })
}

/// Writes addon files into a fresh directory.
pub fn addons_dir(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in files {
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    dir
}

/// A server running in this process on 127.0.0.1 with a free port.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin listener, when the test configured one.
    pub admin: Option<SocketAddr>,
    pub addon_names: Vec<String>,
    pub failures: std::sync::Arc<sockhost::FailureCounts>,
    pub handle: sockhost::ServerHandle,
    dir: tempfile::TempDir,
    /// The server's data directory (kv store), private to this server.
    _data: tempfile::TempDir,
    /// The compiled-code cache, apart from the addons directory.
    cache: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts a server whose addons directory holds `files` (file name, bytes).
    pub async fn start(files: &[(&str, &[u8])]) -> TestServer {
        TestServer::start_with(files, |_| {}).await
    }

    /// Like [`TestServer::start`], with a chance to change the configuration.
    pub async fn start_with(
        files: &[(&str, &[u8])],
        adjust: impl FnOnce(&mut sockhost::Config),
    ) -> TestServer {
        capture_logs();
        let dir = addons_dir(files);
        let data = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let mut config = sockhost::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            addons_dir: dir.path().to_owned(),
            data_dir: data.path().to_owned(),
            limits: sockhost::ServerLimits { max_connections: 64, ..Default::default() },
            cache_dir: Some(cache.path().to_owned()),
            ..Default::default()
        };
        adjust(&mut config);
        let server = sockhost::Server::start(config).await.expect("server starts");
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let addon_names = server.addon_names();
        let failures = server.failures();
        let handle = server.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server.run_until(async {
            let _ = stopped.await;
        }));
        TestServer { addr, admin, addon_names, failures, handle, dir, cache, _data: data, stop: Some(stop) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn addons_path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache_path(&self) -> &Path {
        self.cache.path()
    }

    /// One sample's value from `/metrics`, scraped over HTTP: `series` is the metric name
    /// with its labels as exposed, e.g. `sockhost_addon_messages_in_total{addon="echo"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (status, text) = http_get(self.addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        metric_value(&text, series)
    }

    /// Like [`TestServer::metric`], scraped from the admin listener.
    pub async fn metric_admin(&self, series: &str) -> Option<f64> {
        let (status, text) = http_get(self.admin.expect("an admin listener"), "/metrics").await;
        assert_eq!(status, 200, "{text}");
        metric_value(&text, series)
    }

    pub async fn connect(&self, path: &str) -> Client {
        Client::connect(&self.url(path)).await
    }

    /// A client whose socket's receive buffer is fixed at 64 KiB (no autotuning), so a
    /// server that sends to it while it does not read runs out of room after a few
    /// hundred KiB, whatever the machine's `tcp_rmem`.
    pub async fn connect_with_small_receive_buffer(&self, path: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        let stream = socket.connect(self.addr).await.expect("tcp connect");
        let stream = MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(self.url(path), stream))
            .await
            .expect("connect timed out")
            .expect("upgrade");
        Client { ws }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A WebSocket client whose reads fail the test instead of hanging.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        Client { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws.send(Message::binary(data.to_vec())).await.expect("send");
    }

    /// The next data or close message.
    pub async fn recv(&mut self) -> Message {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("no message from the server in time")
                .expect("the stream ended")
                .expect("read failed");
            match message {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn recv_text(&mut self) -> String {
        match self.recv().await {
            Message::Text(text) => text.as_str().to_owned(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
    }

    /// Reads until the server's close frame and returns its code and reason.
    pub async fn recv_close(&mut self) -> (u16, String) {
        match self.recv().await {
            Message::Close(Some(frame)) => (frame.code.into(), frame.reason.as_str().to_owned()),
            Message::Close(None) => (1005, String::new()),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    pub async fn close(mut self, code: u16, reason: &str) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        let frame = CloseFrame { code: code.into(), reason: reason.into() };
        self.ws.close(Some(frame)).await.expect("close");
        // Read until the server answers the close.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }
}

/// Sends a raw HTTP request and returns the status code and the whole response text.
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("no HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

/// `POST path` with a JSON body and, when given, `Authorization: Bearer <key>`.
pub async fn http_post(addr: SocketAddr, path: &str, key: Option<&str>, body: &str) -> (u16, String) {
    let auth = key.map(|key| format!("Authorization: Bearer {key}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_request(addr, &request).await
}

/// The body of an HTTP response as JSON.
pub fn json_body(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|err| panic!("not a JSON body ({err}): {response}"))
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")).await
}

/// The value of one series in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `check` passes, failing the test after [`PATIENCE`]. For changes the
/// server makes on its own time (a reload, a drain), never to assert speed.
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- log capture ---------------------------------------------------------------------

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the server's log (all tests in this process) into a buffer that
/// [`log_lines`] reads. Installed once.
pub fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Debug for the server and the addons' own output; info for everything else:
        // Cranelift logs several debug lines per function and pass, which would make the
        // buffer huge and every scan of it slow, starving the compiles the tests wait for.
        let filter = tracing_subscriber::EnvFilter::new("info,sockhost=debug,addon=debug");
        tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(|| LogWriter).init();
    });
}

/// Captured log lines that contain every one of `needles`. A needle `conn=N` matches
/// that connection id exactly (not `conn=N0`).
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    let log = LOG.lock().unwrap();
    String::from_utf8_lossy(&log)
        .lines()
        .filter(|line| needles.iter().all(|n| contains_field(line, n)))
        .map(str::to_owned)
        .collect()
}

fn contains_field(line: &str, needle: &str) -> bool {
    if !needle.starts_with("conn=") {
        return line.contains(needle);
    }
    line.match_indices(needle)
        .any(|(at, _)| !line[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// The connection's id, asked of the testkit addon (`info`).
pub async fn connection_id(client: &mut Client) -> u64 {
    client.send_text("info").await;
    client.recv_json().await["id"].as_u64().unwrap()
}

/// Waits until a log line containing every needle appears, and returns it.
pub async fn wait_for_log(needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(line) = log_lines(needles).into_iter().next() {
            return line;
        }
        if tokio::time::Instant::now() >= deadline {
            // What the log does say about the most specific needle, to tell why.
            let related = log_lines(&needles[needles.len() - 1..]);
            let tail = &related[related.len().saturating_sub(20)..];
            panic!("no log line with {needles:?}; lines with {:?}:\n{}", needles.last(), tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- hostile components --------------------------------------------------------------

/// A component of the `base` world (no `channel-handler`), written in WAT, whose `on-message` misbehaves on
/// command (the first byte of a text message):
/// `l` loops forever, `m` grows memory until refused then traps (as Rust's allocator
/// does), `s` overflows the stack, `u` hits `unreachable`, `d` divides by zero,
/// `e` echoes the message, anything else answers "ok". No wasm toolchain involved.
pub fn hostile_component() -> Vec<u8> {
    const CORE: &str = r#"
    (module
      (import "sockhost:addon/session@0.1.4" "send-text" (func $send (param i32 i32 i32)))
      (memory (export "memory") 1)
      (global $heap (mut i32) (i32.const 1024))
      (data (i32.const 32) "ok")

      (func $realloc (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
        (local $ret i32)
        (local.set $ret
          (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                   (i32.sub (i32.const 0) (local.get 2))))
        (global.set $heap (i32.add (local.get $ret) (local.get 3)))
        (block $done
          (loop $grow
            (br_if $done (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
            (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
            (br $grow)))
        (local.get $ret))

      (func $recurse (param i64) (result i64)
        (i64.add (call $recurse (i64.add (local.get 0) (i64.const 1))) (i64.const 1)))

      (func (export "sockhost:addon/handler@0.1.4#on-open")
        (param i64 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
        (global.set $heap (i32.const 1024))
        (i32.const 16))

      (func (export "sockhost:addon/handler@0.1.4#on-message") (param $kind i32) (param $ptr i32) (param $len i32) (result i32)
        (local $command i32)
        (if (i32.gt_u (local.get $len) (i32.const 0))
          (then (local.set $command (i32.load8_u (local.get $ptr)))))
        (block $out
          ;; l: spin forever
          (if (i32.eq (local.get $command) (i32.const 108)) (then (loop $spin (br $spin))))
          ;; m: grow until the host refuses, then trap like an allocator would
          (if (i32.eq (local.get $command) (i32.const 109))
            (then
              (loop $more (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
              unreachable))
          ;; s: unbounded recursion
          (if (i32.eq (local.get $command) (i32.const 115)) (then (drop (call $recurse (i64.const 0)))))
          ;; u: unreachable
          (if (i32.eq (local.get $command) (i32.const 117)) (then unreachable))
          ;; d: integer division by zero
          (if (i32.eq (local.get $command) (i32.const 100))
            (then (drop (i32.div_u (i32.const 1) (i32.sub (local.get $command) (i32.const 100))))))
          ;; e: echo
          (if (i32.eq (local.get $command) (i32.const 101))
            (then (call $send (local.get $ptr) (local.get $len) (i32.const 48)) (br $out)))
          (call $send (i32.const 32) (i32.const 2) (i32.const 48)))
        (global.set $heap (i32.const 1024))
        ;; A zeroed result area: ok.
        (i32.const 16))

      (func (export "sockhost:addon/handler@0.1.4#on-close") (param i32 i32 i32))
    )"#;
    let mut module = wat::parse_str(CORE).expect("hostile core module parses");
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_path(repo_root().join("wit")).expect("wit parses");
    let world = resolve.select_world(&[package], Some("base")).expect("base world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("metadata embeds");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("module accepted")
        .validate(true)
        .encode()
        .expect("component encodes")
}

/// A component of the `base` world that also exports a resource type of its own
/// (`test:hoard/things.thing`), written in WAT. On any message it makes `thing` handles
/// with `resource.new` until the host refuses one: handles that live in the store's
/// component-model tables, not in the host's resource table.
pub fn handle_hoarder_component() -> Vec<u8> {
    const WIT: &str = r#"
    package test:hoard;
    interface things {
      resource thing;
    }
    world hoarder {
      include sockhost:addon/base@0.1.4;
      export things;
    }
    "#;
    const CORE: &str = r#"
    (module
      (import "[export]test:hoard/things" "[resource-new]thing" (func $new (param i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (i32.const 4096))
      (func (export "sockhost:addon/handler@0.1.4#on-open")
        (param i64 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
        (i32.const 16))
      (func (export "sockhost:addon/handler@0.1.4#on-message") (param i32 i32 i32) (result i32)
        (loop $more (drop (call $new (i32.const 1))) (br $more))
        (i32.const 16))
      (func (export "sockhost:addon/handler@0.1.4#on-close") (param i32 i32 i32))
    )"#;
    let mut module = wat::parse_str(CORE).expect("hoarder core module parses");
    let mut resolve = wit_parser::Resolve::default();
    resolve.push_path(repo_root().join("wit")).expect("wit parses");
    let package = resolve.push_str("hoard.wit", WIT).expect("hoarder wit parses");
    let world = resolve.select_world(&[package], Some("hoarder")).expect("hoarder world");
    wit_component::embed_component_metadata(
        &mut module,
        &resolve,
        world,
        wit_component::StringEncoding::UTF8,
    )
    .expect("metadata embeds");
    wit_component::ComponentEncoder::default()
        .module(&module)
        .expect("module accepted")
        .validate(true)
        .encode()
        .expect("component encodes")
}

// ---- hand-made upgrade requests --------------------------------------------------------

/// Sends an upgrade request by hand and returns the status and the response text
/// (only the head for a 101, whose connection stays open).
pub async fn upgrade_status(addr: SocketAddr, path: &str, origin: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{origin}\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n =
            tokio::time::timeout(PATIENCE, stream.read(&mut chunk)).await.expect("response in time").unwrap();
        assert!(n > 0, "connection closed before a response head");
        response.extend_from_slice(&chunk[..n]);
    }
    if !response.starts_with(b"HTTP/1.1 101") {
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    (text[9..12].parse().unwrap(), text)
}
