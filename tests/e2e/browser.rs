//! The chat page and the dashboard in a real browser: Debian's Chromium, headless,
//! driven by puppeteer-core (`tests/browser/pages.mjs`, which lists what it checks)
//! against a real server with the bundled aikefu, its model played by the fake on
//! loopback ([`crate::fake_llm`]), and echo.
//!
//! The fake holds each delta of the reply until the script says the page shows the
//! previous one (`LOCKSTEP`): the page is proven to render chunks as they arrive.
//!
//! Needs `node`, the `chromium` package and `npm ci` in `tests/browser`. When one is
//! missing the test fails naming what to install if `SOCKHOST_BROWSER_TESTS=1` (CI sets
//! it), and otherwise prints a loud note and passes without running; `=0` skips it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::fake_llm::{FakeLlm, REPLY};
use crate::support::*;

/// The whole browser run's limit (the script's steps have their own, shorter ones).
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// What the browser test needs, or why it cannot run here.
struct Browser {
    chromium: PathBuf,
    script: PathBuf,
}

fn browser_or_skip() -> Option<Browser> {
    let setting = std::env::var("SOCKHOST_BROWSER_TESTS").unwrap_or_default();
    if setting == "0" {
        eprintln!("browser test skipped: SOCKHOST_BROWSER_TESTS=0");
        return None;
    }
    let dir = repo_root().join("tests/browser");
    let chromium =
        std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into());
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {} (Debian: apt-get install --no-install-recommends chromium fonts-noto-cjk; \
             or point CHROMIUM at another build)",
            chromium.display()
        ));
    }
    if Command::new("node").arg("--version").output().map(|out| !out.status.success()).unwrap_or(true) {
        missing.push("node, 18 or later (Debian: apt-get install nodejs npm)".to_owned());
    }
    if !dir.join("node_modules/puppeteer-core/package.json").is_file() {
        missing.push(format!("puppeteer-core (cd {} && PUPPETEER_SKIP_DOWNLOAD=1 npm ci)", dir.display()));
    }
    if missing.is_empty() {
        return Some(Browser { chromium, script: dir.join("pages.mjs") });
    }
    let list = missing.join("\n  - ");
    if setting == "1" {
        panic!("the browser test cannot run (SOCKHOST_BROWSER_TESTS=1 requires it); install:\n  - {list}");
    }
    eprintln!(
        "\n!!!! BROWSER TEST NOT RUN: missing\n  - {list}\n!!!! Install them, or set SOCKHOST_BROWSER_TESTS=1 to \
         make this a failure (CI does), or =0 to silence this note.\n"
    );
    None
}

/// The target directory, where the run's screenshots go.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => repo_root().join("target"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_streams_aikefus_reply_and_the_dashboard_counts_the_connection() {
    let Some(browser) = browser_or_skip() else { return };
    let llm = FakeLlm::start().await;
    llm.gate_every_reply();
    let manifest = format!(
        r#"
kv = true
messages_per_second = 0
outbound_hosts = ["{origin}"]
orphan_callback_grace_ms = 60000
[channels]
subscribe = ["reply:*"]
publish = ["reply:*"]
[config]
dev_accept_any_token = true
base_url = "{origin}"
model = "test-model"
"#,
        origin = llm.origin()
    );
    let (aikefu, echo) = (bundled_addon("aikefu"), bundled_addon("echo"));
    let server = TestServer::start(&[
        ("aikefu.wasm", &aikefu),
        ("aikefu.toml", manifest.as_bytes()),
        ("echo.wasm", &echo),
    ])
    .await;
    let screenshots = target_dir().join("browser");

    let mut node = Command::new("node")
        .arg(&browser.script)
        .current_dir(browser.script.parent().unwrap())
        .env("SOCKHOST_URL", format!("http://{}", server.addr))
        .env("CHROMIUM", &browser.chromium)
        .env("SCREENSHOT_DIR", &screenshots)
        .env("LOCKSTEP", "1")
        .env("PUPPETEER_SKIP_DOWNLOAD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let mut stderr = node.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // A hung browser must not hang the suite: past the limit, this one child is killed.
    let (finished, watchdog) = mpsc::channel::<()>();
    let pid = node.id();
    std::thread::spawn(move || {
        if watchdog.recv_timeout(RUN_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });

    // Each `chunk` line: the page shows that many chunks, so the fake may send the next.
    // Read on this thread (the server and the fake run on the runtime's workers).
    let stdout = node.stdout.take().unwrap();
    let (lines, status) = tokio::task::block_in_place(|| {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("browser: {line}");
            if line.starts_with("chunk ") {
                llm.release(1);
            }
            lines.push(line);
        }
        (lines, node.wait().expect("node exits"))
    });
    let _ = finished.send(());
    let stderr = stderr.join().unwrap();
    let transcript = format!("stdout:\n{}\nstderr:\n{stderr}", lines.join("\n"));
    assert!(status.success(), "the browser test failed ({status}):\n{transcript}");

    // The page showed each of the model's deltas alone before the next was sent, and the
    // whole reply, in order.
    let chunk_lines = lines.iter().filter(|line| line.starts_with("chunk ")).count();
    assert!(chunk_lines >= REPLY.len() - 1, "{transcript}");
    let reply = serde_json::to_string(&REPLY.concat()).unwrap();
    assert!(
        lines.iter().any(|line| line == &format!("reply: {} chunks: {reply}", REPLY.len())),
        "{transcript}"
    );
    // The second reply was cut off by a dropped connection and resumed in its bubble.
    assert!(
        lines.iter().any(|line| line == &format!("resumed reply: {} chunks: {reply}", REPLY.len())),
        "{transcript}"
    );
    assert!(lines.iter().any(|line| line == "browser test passed"), "{transcript}");
    for shot in ["chat.png", "dashboard.png"] {
        let path = screenshots.join(shot);
        let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(bytes.starts_with(b"\x89PNG"), "{} is not a PNG", path.display());
    }
    eprintln!("browser test: screenshots in {}", screenshots.display());
    // The model saw the page's question, as the seed's client would send it.
    let asked = llm.requests();
    assert_eq!(asked.len(), 2, "two chats (the second resumed), two model requests; a resume asks nothing");
    assert_eq!(asked[0].messages().last().map(|(_, text)| text.as_str()), Some("什么时候发货？"));
}
