//! Addons in JavaScript and Python, against the same WIT: the example addons `echo-js` and
//! `echo-py` answer exactly as the Rust `echo` does (the Rust one is the oracle, so no
//! expected answer is written here twice), and `testkit-js` / `testkit-py` hit the limits:
//! an error frame, a trap, a busy loop, memory, hibernation.
//!
//! Their components are 12 to 19 MB and take seconds each to compile, so the first test to
//! start compiles them into one compiled-code cache shared by every server in this test
//! binary; later servers load from it (and a test checks that they do).

use std::path::PathBuf;
use std::time::Duration;

use sockhost::FailureKind;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// The components every polyglot server mounts, by file name.
fn components() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for name in ["echo", "echo-js", "echo-py"] {
        files.push((format!("{name}.wasm"), bundled_addon(name)));
    }
    for name in ["testkit-js", "testkit-py"] {
        files.push((format!("{name}.wasm"), test_addon(name)));
    }
    files
}

/// The compiled-code cache shared by the servers of this test binary.
fn shared_cache() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path().to_owned()
}

/// Compiles every component into the shared cache, once: the first caller starts a server
/// (which compiles and stores them), the others wait for it. A plain OnceCell would not
/// do: each test has its own runtime, and tokio's OnceCell waits across runtimes.
async fn warm_cache() {
    static WARM: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    WARM.get_or_init(|| async {
        let files = components();
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let cache = shared_cache();
        let server = TestServer::start_with(&files, |config| config.cache_dir = Some(cache)).await;
        drop(server);
    })
    .await;
}

/// A server with every polyglot component and `manifests` (file name, text), loading the
/// compiled code from the shared cache. Manifests change limits only, never the engine's
/// settings (`memory_limit` would: it sizes the pool), so every server can share the cache.
async fn server(manifests: &[(&str, &str)]) -> TestServer {
    warm_cache().await;
    let files = components();
    let mut all: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    all.extend(manifests.iter().map(|(n, text)| (*n, text.as_bytes())));
    let cache = shared_cache();
    TestServer::start_with(&all, |config| config.cache_dir = Some(cache)).await
}

const ECHOES: [&str; 3] = ["echo", "echo-js", "echo-py"];
const TESTKITS: [&str; 2] = ["testkit-js", "testkit-py"];

#[tokio::test]
async fn every_server_after_the_first_loads_the_big_components_from_the_cache() {
    let server = server(&[]).await;
    let count = components().len() as f64;
    assert_eq!(server.metric("sockhost_compile_cache_total{result=\"hit\"}").await, Some(count));
    assert_eq!(server.metric("sockhost_compile_cache_total{result=\"miss\"}").await, None);
}

#[tokio::test]
async fn echo_in_every_language_echoes_text_and_binary() {
    let server = server(&[]).await;
    let text: String = (0..20 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let binary: Vec<u8> = (0..30 * 1024).map(|i| (i % 251) as u8).collect();
    for addon in ECHOES {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        client.send_text("hello, 你好 🌏").await;
        assert_eq!(client.recv_text().await, "hello, 你好 🌏", "{addon}");
        client.send_binary(b"\x00\xffbytes").await;
        assert_eq!(client.recv().await, Message::binary(b"\x00\xffbytes".to_vec()), "{addon}");
        client.send_binary(&[]).await;
        assert_eq!(client.recv().await, Message::binary(Vec::new()), "{addon}");
        client.send_text(&text).await;
        client.send_binary(&binary).await;
        assert_eq!(client.recv_text().await, text, "{addon}");
        assert_eq!(client.recv().await, Message::binary(binary.clone()), "{addon}");
        client.close(1000, "done").await;
    }
}

/// Everything `addon` sends in answer to `input`: the frames before the echo of a
/// sentinel sent right after it.
async fn answer(client: &mut Client, input: &str, n: usize) -> Vec<String> {
    let sentinel = format!("sentinel {n}");
    client.send_text(input).await;
    client.send_text(&sentinel).await;
    let mut frames = Vec::new();
    loop {
        let frame = client.recv_text().await;
        if frame == sentinel {
            return frames;
        }
        frames.push(frame);
    }
}

#[tokio::test]
async fn echo_in_every_language_streams_the_same_chat_reply() {
    let server = server(&[]).await;
    let chat = r#"{"message":"你好，我的订单到哪了","token":"user_token_here","session_id":"session_123","action":"chat"}"#;
    let mut replies = Vec::new();
    for addon in ECHOES {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        let frames = answer(&mut client, chat, 0).await;
        let chunks: Vec<serde_json::Value> =
            frames.iter().map(|f| serde_json::from_str(f).unwrap()).collect();
        assert!(chunks.len() >= 4, "{addon}: a streamed reply comes in several chunks: {frames:?}");
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk["type"], "chat", "{addon}: {chunk}");
            assert_eq!(chunk["session_id"], "session_123", "{addon}: {chunk}");
            assert_eq!(
                chunk["complete"],
                i == chunks.len() - 1,
                "{addon}: only the last is complete: {chunk}"
            );
        }
        let reply: String = chunks.iter().map(|c| c["message"].as_str().unwrap()).collect();
        assert_eq!(reply, "Echo: 你好，我的订单到哪了", "{addon}");
        replies.push(frames);
    }
    // Byte for byte the same frames: chunk boundaries, field order, escaping.
    assert_eq!(replies[1], replies[0], "echo-js differs from echo");
    assert_eq!(replies[2], replies[0], "echo-py differs from echo");
}

/// Inputs on the edges of the chat envelope, where a JSON parser other than serde_json
/// could decide otherwise: each language's echo must answer each one as the Rust echo does.
fn tricky_inputs() -> Vec<String> {
    let mut inputs: Vec<String> = [
        "plain text",
        "",
        "   ",
        r#"{"message":"hi"}"#,
        r#"{"message":"","session_id":"s"}"#,
        r#"  {"message":"leading whitespace"}  "#,
        "\u{a0}{\"message\":\"after a no-break space\"}",
        r#"{"action":"chat","session_id":"s"}"#,
        r#"{"message":null,"session_id":"s"}"#,
        r#"{"message":5}"#,
        r#"{"message":"x","session_id":7}"#,
        r#"{"message":"x","token":false}"#,
        r#"{"message":"x","action":null}"#,
        r#"{"message":"x","action":"dance"}"#,
        r#"{"message":"x","action":""}"#,
        r#"{"message":"x","action":"Chat"}"#,
        r#"{"action":"dance"}"#,
        r#"{"message":"one","message":"two"}"#,
        r#"{"message":"x","other":1,"other":2}"#,
        r#"{"mess\u0061ge":"escaped key"}"#,
        r#"{"message":"\ud800 lone surrogate"}"#,
        r#"{"message":"\ud83c\udf0f pair"}"#,
        r#"{"message":"x","n":1e999}"#,
        r#"{"message":"x","n":-1e999}"#,
        r#"{"message":"x","n":1e-999}"#,
        r#"{"message":"x","n":123456789012345678901234567890}"#,
        r#"{"message":"x","n":NaN}"#,
        r#"{"message":"x","n":Infinity}"#,
        r#"{"message":"x",}"#,
        r#"{"message":"x"} trailing"#,
        r#"{'message':'single quotes'}"#,
        r#"["message","in an array"]"#,
        "null",
        "42",
        r#""a JSON string""#,
        r#"{"message":"tab\tand\u0001control","session_id":"\"quoted\" \\ back"}"#,
        "{\"message\":\"raw\u{1}control\"}",
        r#"{"message":"emoji 👍🏽 and 中文 and é"}"#,
        r#"{"message":"a\u2028b\u007f"}"#,
        r#"{"message":"x","extra":{"message":5,"nested":[1,{"a":null}]}}"#,
        r#"{"message":"x","extra":"\ud800 ignored"}"#,
        r#"{"message":"x","extra":{"\udc00":1}}"#,
        r#"{"\ud800":1,"message":"x"}"#,
        r#"{"message":"x","session_id":"\udc00"}"#,
        r#"{"message":"x","n":1e999999999999}"#,
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    // Nesting: serde_json limits the depth of what it parses (128), not of what it skips.
    for depth in [126, 127, 128, 300] {
        let inner = depth - 1;
        inputs.push(format!(r#"{{"message":"deep","x":{}{}}}"#, "[".repeat(inner), "]".repeat(inner)));
    }
    inputs
}

#[tokio::test]
async fn echo_in_every_language_answers_bad_and_odd_input_as_the_rust_echo_does() {
    // Two messages per input, many inputs: past the default rate limit.
    let unlimited = "messages_per_second = 0";
    let server =
        server(&[("echo.toml", unlimited), ("echo-js.toml", unlimited), ("echo-py.toml", unlimited)]).await;
    let inputs = tricky_inputs();
    let mut clients = Vec::new();
    for addon in ECHOES {
        clients.push((addon, server.connect(&format!("/ws/{addon}")).await));
    }
    let mut codes = std::collections::BTreeSet::new();
    for (n, input) in inputs.iter().enumerate() {
        let mut answers = Vec::new();
        for (addon, client) in &mut clients {
            answers.push((*addon, answer(client, input, n).await));
        }
        let (_, oracle) = &answers[0];
        assert!(!oracle.is_empty(), "the Rust echo answers {input:?}");
        for (addon, frames) in &answers[1..] {
            assert_eq!(frames, oracle, "{addon} answers {input:?} differently from echo");
        }
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&oracle[0])
            && value["type"] == "error"
        {
            codes.insert(value["code"].as_str().unwrap().to_owned());
        }
    }
    // The table reaches both error frames the envelope has, so the comparison covers them.
    assert_eq!(codes.into_iter().collect::<Vec<_>>(), ["missing_field", "unsupported_action"]);
}

/// The one known difference: componentize-js 0.23 hands a JavaScript addon its text with
/// `new TextDecoder()`, which takes a leading U+FEFF for a byte order mark and drops it, so
/// the addon never sees it (README, JavaScript). Python and Rust keep it. When this test
/// fails, componentize-js has fixed it: move the input into `tricky_inputs`.
#[tokio::test]
async fn a_leading_byte_order_mark_is_lost_only_in_javascript() {
    let server = server(&[]).await;
    for (addon, expected) in
        [("echo", "\u{feff}hi \u{feff}"), ("echo-py", "\u{feff}hi \u{feff}"), ("echo-js", "hi \u{feff}")]
    {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        client.send_text("\u{feff}hi \u{feff}").await;
        assert_eq!(client.recv_text().await, expected, "{addon}");
    }
}

#[tokio::test]
async fn an_exception_is_an_addon_error_frame_and_the_connection_lives_on() {
    let server = server(&[]).await;
    for addon in TESTKITS {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        assert_eq!(client.recv_text().await, "open");
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "1");
        client.send_text("error").await;
        let error = client.recv_json().await;
        assert_eq!(
            error,
            serde_json::json!({"type": "error", "message": format!("{addon}: asked to fail"), "code": "addon_error"})
        );
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "2", "{addon}: the same instance goes on");
    }
    assert_eq!(server.failures.get(FailureKind::AddonError), 2);
}

#[tokio::test]
async fn a_trap_closes_with_1011_and_touches_no_other_connection() {
    let server = server(&[]).await;
    for addon in TESTKITS {
        let path = format!("/ws/{addon}");
        let mut a = server.connect(&path).await;
        let mut b = server.connect(&path).await;
        assert_eq!(a.recv_text().await, "open");
        assert_eq!(b.recv_text().await, "open");
        a.send_text("count").await;
        assert_eq!(a.recv_text().await, "1");

        a.send_text("trap").await;
        let error = a.recv_json().await;
        assert_eq!(error["type"], "error", "{addon}: {error}");
        assert_eq!(error["code"], "addon_trap", "{addon}: {error}");
        assert_eq!(a.recv_close().await.0, 1011, "{addon}");
        wait_for_log(&["trap: ", &format!("{addon}: asked to trap")]).await;

        b.send_text("count").await;
        assert_eq!(b.recv_text().await, "1", "{addon}: the other connection is untouched");
        let mut c = server.connect(&path).await;
        assert_eq!(c.recv_text().await, "open");
        c.send_text("count").await;
        assert_eq!(c.recv_text().await, "1", "{addon}: a new connection gets a fresh instance");
    }
    assert_eq!(server.failures.get(FailureKind::AddonTrap), 2);
}

#[tokio::test]
async fn a_busy_loop_is_stopped_at_the_cpu_limit_while_others_are_served() {
    let server =
        server(&[("testkit-js.toml", "cpu_limit_ms = 700"), ("testkit-py.toml", "cpu_limit_ms = 700")]).await;
    for (n, addon) in TESTKITS.into_iter().enumerate() {
        let mut looping = server.connect(&format!("/ws/{addon}")).await;
        assert_eq!(looping.recv_text().await, "open");
        looping.send_text("spin").await;
        // #[tokio::test] runs the server and the clients on this one thread: the echo
        // replies can only come while the guest loops if it yields.
        let mut echo = server.connect(&format!("/ws/{}", ECHOES[n + 1])).await;
        for i in 0..10 {
            echo.send_text(&format!("still served {i}")).await;
            assert_eq!(echo.recv_text().await, format!("still served {i}"));
        }
        let error = looping.recv_json().await;
        assert_eq!(error["code"], "addon_timeout", "{addon}: {error}");
        assert!(error["message"].as_str().unwrap().contains("CPU limit of 700 ms"), "{addon}: {error}");
        assert_eq!(looping.recv_close().await.0, 1011, "{addon}");
    }
    assert_eq!(server.failures.get(FailureKind::AddonTimeout), 2);
}

#[tokio::test]
async fn memory_past_the_limit_is_addon_oom() {
    let server = server(&[]).await;
    for addon in TESTKITS {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        assert_eq!(client.recv_text().await, "open");
        client.send_text("memory").await;
        let error = client.recv_json().await;
        assert_eq!(error["code"], "addon_oom", "{addon}: {error}");
        assert_eq!(client.recv_close().await.0, 1011, "{addon}");
    }
    assert_eq!(server.failures.get(FailureKind::AddonOom), 2);
}

#[tokio::test]
async fn open_refusal_close_and_on_close_work_from_the_sdks() {
    let server = server(&[]).await;
    for addon in TESTKITS {
        let mut refused = server.connect(&format!("/ws/{addon}?refuse=1")).await;
        assert_eq!(refused.recv_close().await, (4003, format!("refused by {addon}")));

        let mut client = server.connect(&format!("/ws/{addon}?a=%E4%BD%A0+b")).await;
        assert_eq!(client.recv_text().await, "open");
        client.send_text("info").await;
        let info = client.recv_json().await;
        assert_eq!(info["addon"], addon);
        assert_eq!(info["path"], format!("/ws/{addon}"));
        assert_eq!(info["query"], "a=%E4%BD%A0+b");
        let conn = format!("conn={}", info["id"]);
        client.send_text("log").await;
        assert_eq!(client.recv_text().await, "logged");
        wait_for_log(&[&format!("{addon} log line"), &conn]).await;
        client.send_text("close").await;
        assert_eq!(client.recv_close().await, (4000, "bye".to_owned()));
        wait_for_log(&[&format!("{addon} on-close code=4000"), &conn]).await;
    }
}

#[tokio::test]
async fn state_survives_hibernation_in_javascript_and_python() {
    let manifest = "hibernate_after_ms = 300";
    let server = server(&[("testkit-js.toml", manifest), ("testkit-py.toml", manifest)]).await;
    for addon in TESTKITS {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        assert_eq!(client.recv_text().await, "open");
        for expected in ["1", "2"] {
            client.send_text("count").await;
            assert_eq!(client.recv_text().await, expected);
        }
        let hibernations = format!("sockhost_addon_hibernations_total{{addon=\"{addon}\"}}");
        eventually(&format!("{addon} hibernates"), || async {
            server.metric(&hibernations).await == Some(1.0)
        })
        .await;
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "3", "{addon}: the count woke with the connection");
        let wakes = format!("sockhost_addon_wakes_total{{addon=\"{addon}\"}}");
        assert_eq!(server.metric(&wakes).await, Some(1.0), "{addon}");
    }
    // The example addons hibernate too (stateless), and still echo afterwards.
    let echo_manifest = [("echo-js.toml", manifest), ("echo-py.toml", manifest)];
    let server = self::server(&echo_manifest).await;
    for addon in ["echo-js", "echo-py"] {
        let mut client = server.connect(&format!("/ws/{addon}")).await;
        client.send_text("before").await;
        assert_eq!(client.recv_text().await, "before");
        let hibernations = format!("sockhost_addon_hibernations_total{{addon=\"{addon}\"}}");
        eventually(&format!("{addon} hibernates"), || async {
            server.metric(&hibernations).await == Some(1.0)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        client.send_text("after").await;
        assert_eq!(client.recv_text().await, "after");
    }
}
