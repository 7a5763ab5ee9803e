//! Test support shared by the unit tests and the end-to-end tests (`tests/e2e`): not part
//! of the server.
//!
//! [`RedisServer`] runs a real `redis-server` for one test. Every test gets its own, on a
//! free loopback port with a temporary directory, so tests run in parallel without
//! sharing data, and none depends on (or disturbs) a Redis the machine may run as a
//! service. A test can kill it and start it again on the same port, to see what the
//! server does while Redis is down and after it is back.
//!
//! Only `std` and the `redis` client are used: dev-dependencies are not available here,
//! since the module is compiled into the library for the end-to-end tests to reach.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a started `redis-server` may take to answer `PING`. It takes milliseconds; a
/// loaded CI machine may be slow, and a server that never answers must fail the test
/// rather than hang it.
const READY_WAIT: Duration = Duration::from_secs(15);
/// How many ports [`RedisServer::start`] tries: a free port can be taken by another
/// process between finding it and `redis-server` binding it.
const START_ATTEMPTS: usize = 5;

/// A `redis-server` of one test: killed, and its directory removed, on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port of 127.0.0.1, persisting nothing, and waits
    /// until it answers `PING`.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed, or does not start.
    pub fn start() -> RedisServer {
        let dir = unique_temp_dir();
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            match spawn(port, &dir) {
                Ok(child) => return RedisServer { port, dir, child: Some(child) },
                Err(failure) => failures.push(format!("port {port}: {failure}")),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-server did not start in {START_ATTEMPTS} attempts:\n{}", failures.join("\n"));
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port it listens on, the same after [`RedisServer::start_again`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (SIGKILL: no goodbye to its clients) and waits until it is gone. Its data
    /// is gone too: it persists nothing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty, after [`RedisServer::kill`], and waits
    /// until it answers; clients that knew the old one reconnect to this one.
    ///
    /// # Panics
    ///
    /// When it is still running, or does not start.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server on port {} is still running", self.port);
        // Its port was free a moment ago; a few tries ride out a slow release.
        let mut failure = String::new();
        for _ in 0..START_ATTEMPTS {
            match spawn(self.port, &self.dir) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(err) => failure = err,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("redis-server did not start again on port {}: {failure}", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Spawns `redis-server` on `port`, keeping nothing on disk but its log in `dir`, and
/// waits until it answers `PING`; if it does not, kills it and says why.
fn spawn(port: u16, dir: &Path) -> Result<Child, String> {
    let log_path = dir.join("redis.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|err| format!("cannot create {}: {err}", log_path.display()))?;
    let stderr = log.try_clone().map_err(|err| format!("cannot share {}: {err}", log_path.display()))?;
    let spawned = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--protected-mode", "no"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server not found: install Debian's redis-server (.ci/run does)")
        }
        Err(err) => return Err(format!("cannot run redis-server: {err}")),
    };
    let deadline = Instant::now() + READY_WAIT;
    let failure = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break format!("redis-server exited ({status})");
        }
        if answers_ping(port) {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            break format!("redis-server did not answer PING within {READY_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(format!("{failure}; its log: {}", read_log(&log_path)))
}

/// A port of 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("the bound address").port()
}

/// A new, empty directory under the system's temporary directory.
fn unique_temp_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        // A directory left by an earlier process with the same id is skipped.
        let name = format!("sockhost-redis-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => panic!("cannot create {}: {err}", dir.display()),
        }
    }
}

/// Whether a Redis on `port` answers `PING`, asked with the `redis` client.
fn answers_ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return false };
    let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_secs(1)) else {
        return false;
    };
    redis::cmd("PING").query::<String>(&mut connection).is_ok_and(|pong| pong == "PONG")
}

/// The end of redis-server's log, to say why it did not start.
fn read_log(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
