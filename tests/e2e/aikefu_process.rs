//! aikefu in the real `sockhost` process: token verification with a secret from the
//! environment, conversation memory that survives a restart, and the seed's own
//! JavaScript client example run unchanged in Node.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::aikefu::{chat, read_reply};
use crate::fake_llm::{FakeLlm, REPLY};
use crate::process::{Process, spawn, work_dir};
use crate::support::*;

const SECRET: &str = "test-secret-test-secret-test-secret-0123";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn token(claims: serde_json::Value) -> String {
    sockhost::host::auth::sign_hs256(SECRET.as_bytes(), r#"{"alg":"HS256","typ":"JWT"}"#, &claims.to_string())
}

fn user_token(user: &str) -> String {
    token(json!({"sub": user, "exp": now() + 3600, "iss": "shop"}))
}

/// A working directory with aikefu and a production-style manifest: JWT auth, the fake
/// model, the API key from the environment.
fn workdir(llm: &FakeLlm) -> tempfile::TempDir {
    let work = work_dir(&[("addons/aikefu.wasm", &bundled_addon("aikefu"))]);
    let manifest = format!(
        r#"
kv = true
messages_per_second = 0
outbound_hosts = ["{origin}"]

[auth]
jwt_hs256_secret = {{ env = "SHOP_JWT_SECRET" }}
issuer = "shop"

[config]
base_url = "{origin}"
model = "test-model"
api_key = {{ env = "AIKEFU_API_KEY" }}
"#,
        origin = llm.origin()
    );
    std::fs::write(work.path().join("addons/aikefu.toml"), manifest).unwrap();
    work
}

fn start(work: &tempfile::TempDir) -> Process {
    spawn(
        work.path(),
        &["--listen", "127.0.0.1"],
        &[("SOCKHOST_PORT", "0"), ("SHOP_JWT_SECRET", SECRET), ("AIKEFU_API_KEY", "sk-test-key")],
    )
}

async fn open(process: &Process) -> Client {
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/aikefu", process.port)).await;
    assert_eq!(client.recv_json().await["type"], "system");
    client
}

#[tokio::test]
async fn verified_users_get_answers_keyed_by_their_id_and_bad_tokens_are_refused() {
    let llm = FakeLlm::start().await;
    let work = workdir(&llm);
    let process = start(&work);
    let log = process.log_text();
    assert!(log.contains("JWT HS256, secret from $SHOP_JWT_SECRET"), "the grants are logged: {log}");
    assert!(!log.contains(SECRET) && !log.contains("sk-test-key"), "secrets never reach the log");

    let mut client = open(&process).await;
    let bad_tokens = [
        ("user_token_here".to_owned(), "not a JWT"),
        (token(json!({"sub": "u1", "exp": now() - 3600, "iss": "shop"})), "expired"),
        (token(json!({"sub": "u1", "exp": now() + 3600, "iss": "evil"})), "issuer"),
        (token(json!({"sub": "u1", "iss": "shop"})), "exp"),
        (
            sockhost::host::auth::sign_hs256(
                b"some-other-secret-some-other-secret",
                r#"{"alg":"HS256"}"#,
                &json!({"sub": "u1", "exp": now() + 3600, "iss": "shop"}).to_string(),
            ),
            "signature",
        ),
    ];
    for (bad, reason) in &bad_tokens {
        client.send_text(&chat("hi", bad, "s1")).await;
        let frame = client.recv_json().await;
        assert_eq!(frame["code"], "unauthorized", "{reason}: {frame}");
        assert!(frame["message"].as_str().unwrap().contains(reason), "{reason}: {frame}");
    }
    assert!(llm.requests().is_empty(), "no refused message reached the model");

    // Two users, the same session id: each sees only their own conversation.
    let (alice, bob) = (user_token("alice"), user_token("bob"));
    client.send_text(&chat("alice's secret order 1234", &alice, "same")).await;
    assert_eq!(read_reply(&mut client, "same").await, REPLY.concat());
    let mut other = open(&process).await;
    other.send_text(&chat("bob asks", &bob, "same")).await;
    read_reply(&mut other, "same").await;
    let bobs = llm.requests().last().unwrap().clone();
    assert!(!bobs.body.to_string().contains("1234"), "bob's request carried alice's history: {}", bobs.body);
    client.send_text(&chat("alice again", &alice, "same")).await;
    read_reply(&mut client, "same").await;
    let alices = llm.requests().last().unwrap().clone();
    assert!(alices.body.to_string().contains("1234"), "{}", alices.body);
    assert!(!alices.body.to_string().contains("bob asks"));
    // The API key came from the environment to the upstream, and only there.
    assert_eq!(alices.header("authorization"), Some("Bearer sk-test-key"));
}

#[tokio::test]
async fn conversation_memory_survives_a_restart() {
    let llm = FakeLlm::start().await;
    let work = workdir(&llm);
    let alice = user_token("alice");
    {
        let mut process = start(&work);
        let mut client = open(&process).await;
        client.send_text(&chat("before the restart", &alice, "s-restart")).await;
        read_reply(&mut client, "s-restart").await;
        drop(client);
        process.signal("-TERM");
        assert!(process.wait_exit(), "clean exit on SIGTERM");
    }
    assert!(work.path().join("data/kv.redb").exists(), "the store is a file under ./data");
    let process = start(&work);
    let mut client = open(&process).await;
    client.send_text(&chat("after the restart", &alice, "s-restart")).await;
    read_reply(&mut client, "s-restart").await;
    let messages = llm.requests().last().unwrap().messages();
    let users: Vec<&str> = messages.iter().filter(|(r, _)| r == "user").map(|(_, c)| c.as_str()).collect();
    assert_eq!(users, ["before the restart", "after the restart"]);
}

/// The seed README's section 7.1, byte for byte: `tests/js/seed-client.js`. Node runs it
/// with `tests/js/run-seed-client.js` preloaded, which only points `localhost:8080` at the
/// test server and ends the process once the reply is complete.
#[tokio::test]
async fn the_seed_javascript_client_runs_unchanged_against_aikefu() {
    let work = work_dir(&[("addons/aikefu.wasm", &bundled_addon("aikefu"))]);
    std::fs::copy(repo_root().join("addons/aikefu.toml"), work.path().join("addons/aikefu.toml")).unwrap();
    let process = spawn(work.path(), &["--listen", "127.0.0.1"], &[("SOCKHOST_PORT", "0")]);

    let js = repo_root().join("tests/js");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("--experimental-websocket")
            .arg("--require")
            .arg(js.join("run-seed-client.js"))
            .arg(js.join("seed-client.js"))
            .env("SOCKHOST_TEST_PORT", process.port.to_string())
            .output()
    })
    .await
    .unwrap()
    .expect("node runs (Node.js 20 or later is needed for this test)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "node failed: {stdout}\n{stderr}");
    for needle in ["WebSocket连接已打开", "收到消息", "客服回复", "对话完成"] {
        assert!(stdout.contains(needle), "the example did not print {needle}: {stdout}");
    }
    assert!(!stdout.contains("错误"), "{stdout}");
}
