//! aikefu, the bundled AI customer-service addon, end to end: real clients, the real
//! component, the real kv store, and a fake language model on loopback
//! ([`crate::fake_llm`]). Token verification and restarts, which need the server's
//! environment and process, are in [`crate::aikefu_process`].

use serde_json::{Value, json};

use crate::fake_llm::{FakeLlm, LONG_REPLY, REPLY};
use crate::support::*;

/// A server with aikefu whose manifest points at `llm` (dev tokens: the token is the user).
async fn server_with_llm(llm: &FakeLlm, extra: &str) -> TestServer {
    server_with_llm_config(llm, extra, "").await
}

/// [`server_with_llm`] with more `[config]` lines.
async fn server_with_llm_config(llm: &FakeLlm, extra: &str, config: &str) -> TestServer {
    let manifest = format!(
        r#"
kv = true
messages_per_second = 0
outbound_hosts = ["{origin}"]
outbound_first_byte_timeout_ms = 1500
{extra}
[config]
dev_accept_any_token = true
base_url = "{origin}"
model = "test-model"
history_turns = 2
{config}
"#,
        origin = llm.origin()
    );
    let aikefu = bundled_addon("aikefu");
    TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await
}

/// The bundled server: aikefu with its shipped manifest (offline FAQ, dev tokens), but no
/// message rate limit, since these tests send faster than a person types.
async fn bundled_server() -> TestServer {
    let aikefu = bundled_addon("aikefu");
    let shipped = std::fs::read_to_string(repo_root().join("addons/aikefu.toml")).unwrap();
    let manifest = shipped.replace("messages_per_second = 2\n", "messages_per_second = 0\n");
    assert_ne!(manifest, shipped, "the shipped manifest sets a rate; update this test's override");
    TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await
}

pub(crate) fn chat(message: &str, token: &str, session: &str) -> String {
    json!({"message": message, "token": token, "session_id": session, "action": "chat"}).to_string()
}

/// Connects and reads the greeting.
async fn open(server: &TestServer) -> Client {
    let mut client = server.connect("/ws/aikefu").await;
    let greeting = client.recv_json().await;
    assert_eq!(greeting["type"], "system", "{greeting}");
    assert!(!greeting["message"].as_str().unwrap().is_empty());
    client
}

/// Reads chat chunks until `complete:true`; returns the text, and fails on an error frame.
pub(crate) async fn read_reply(client: &mut Client, session: &str) -> String {
    let mut text = String::new();
    loop {
        let frame = client.recv_json().await;
        assert_eq!(frame["type"], "chat", "expected a chat chunk: {frame}");
        assert_eq!(frame["session_id"], session, "{frame}");
        text.push_str(frame["message"].as_str().unwrap());
        if frame["complete"] == true {
            return text;
        }
    }
}

/// Reads frames until an error frame; returns it. Chat chunks before it are allowed
/// (a stream that broke off), but never a `complete:true` one.
async fn read_error(client: &mut Client) -> Value {
    loop {
        let frame = client.recv_json().await;
        if frame["type"] == "error" {
            return frame;
        }
        assert_eq!(frame["type"], "chat", "{frame}");
        assert_eq!(frame["complete"], false, "a failed reply must not complete: {frame}");
    }
}

#[tokio::test]
async fn chunks_stream_in_order_each_before_the_upstream_has_finished() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut client = open(&server).await;
    client.send_text(&chat("gated question", "alice", "s1")).await;
    // The fake holds every delta after the first until released, so each chunk seen here
    // was forwarded while the upstream was still streaming.
    let mut reply_id = Value::Null;
    for (index, delta) in REPLY.iter().enumerate() {
        let frame = client.recv_json().await;
        if index == 0 {
            reply_id = frame["reply_id"].clone();
            assert!(reply_id.as_str().is_some_and(|id| id.len() == 32), "{frame}");
        }
        // The seed's chunk, numbered for a resume: one reply id, seq from 1.
        let seq = index + 1;
        assert_eq!(
            frame,
            json!({"type": "chat", "message": delta, "session_id": "s1", "complete": false,
                   "reply_id": reply_id, "seq": seq})
        );
        if index + 1 < REPLY.len() {
            llm.release(1);
        }
    }
    let last = client.recv_json().await;
    assert_eq!(
        last,
        json!({"type": "chat", "message": "", "session_id": "s1", "complete": true,
               "reply_id": reply_id, "seq": REPLY.len() + 1})
    );

    let request = &llm.requests()[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.body["stream"], true);
    assert_eq!(request.body["model"], "test-model");
    assert_eq!(request.header("accept"), Some("text/event-stream"));
}

#[tokio::test]
async fn the_second_turn_sends_the_history_and_only_complete_turns_are_kept() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut client = open(&server).await;
    let full = REPLY.concat();

    client.send_text(&chat("first question", "alice", "s1")).await;
    assert_eq!(read_reply(&mut client, "s1").await, full);
    // A failed turn: its question and half answer must not enter the history.
    client.send_text(&chat("cutoff please", "alice", "s1")).await;
    let error = read_error(&mut client).await;
    assert_eq!(error["code"], "upstream_error", "{error}");
    client.send_text(&chat("second question", "alice", "s1")).await;
    assert_eq!(read_reply(&mut client, "s1").await, full);

    let requests = llm.requests();
    let second = requests.last().unwrap().messages();
    let roles: Vec<&str> = second.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"], "{second:?}");
    assert_eq!(second[1].1, "first question");
    assert_eq!(second[2].1, full);
    assert_eq!(second[3].1, "second question");

    // history_turns = 2: after a third exchange the first one is dropped.
    client.send_text(&chat("third question", "alice", "s1")).await;
    read_reply(&mut client, "s1").await;
    client.send_text(&chat("fourth question", "alice", "s1")).await;
    read_reply(&mut client, "s1").await;
    let fourth = llm.requests().last().unwrap().messages();
    let users: Vec<&str> = fourth.iter().filter(|(r, _)| r == "user").map(|(_, c)| c.as_str()).collect();
    assert_eq!(users, ["second question", "third question", "fourth question"]);
}

#[tokio::test]
async fn a_reconnecting_client_continues_its_session_and_other_users_cannot() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut first = open(&server).await;
    first.send_text(&chat("remember the blue one", "alice", "shared-id")).await;
    read_reply(&mut first, "shared-id").await;
    first.close(1000, "bye").await;

    // Same user, same session, new connection: the history comes along.
    let mut again = open(&server).await;
    again.send_text(&chat("which one?", "alice", "shared-id")).await;
    read_reply(&mut again, "shared-id").await;
    let continued = llm.requests().last().unwrap().messages();
    assert!(continued.iter().any(|(_, c)| c == "remember the blue one"), "{continued:?}");

    // Another user with the same session id starts afresh: they cannot read alice's turns.
    let mut mallory = open(&server).await;
    mallory.send_text(&chat("what did alice say?", "mallory", "shared-id")).await;
    read_reply(&mut mallory, "shared-id").await;
    let isolated = llm.requests().last().unwrap().messages();
    let roles: Vec<&str> = isolated.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["system", "user"], "{isolated:?}");
}

/// Two connections on one session (two phones, or a retry on another node) answer at
/// the same time: both exchanges are remembered. The slower reply used to overwrite the
/// history with what it had read before the faster one saved.
#[tokio::test]
async fn concurrent_replies_on_one_session_both_land_in_its_memory() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut slow = open(&server).await;
    slow.send_text(&chat("slow question", "alice", "shared")).await;
    // The slow reply has read the (empty) history and is waiting on the model.
    assert_eq!(slow.recv_json().await["message"], REPLY[0]);
    let mut fast = open(&server).await;
    fast.send_text(&chat("fast question", "alice", "shared")).await;
    read_reply(&mut fast, "shared").await;
    llm.release(1);
    read_reply(&mut slow, "shared").await;

    // Asked on the slow connection: its callbacks run one at a time, so this one starts
    // only after the slow reply was stored.
    slow.send_text(&chat("what did I ask?", "alice", "shared")).await;
    read_reply(&mut slow, "shared").await;
    let asked: Vec<String> =
        llm.requests().last().unwrap().messages().into_iter().map(|(_, text)| text).collect();
    assert!(asked.iter().any(|t| t == "fast question"), "{asked:?}");
    assert!(asked.iter().any(|t| t == "slow question"), "{asked:?}");
}

/// A user who keeps starting new sessions keeps only the last `max_sessions_per_user`:
/// the least recently used conversation is forgotten, the others go on.
#[tokio::test]
async fn a_user_keeps_at_most_max_sessions_per_user_conversations() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let manifest = std::fs::read_to_string(server.addons_path().join("aikefu.toml")).unwrap();
    drop(server);
    let manifest = manifest.replace("[config]", "[config]\nmax_sessions_per_user = 2");
    let aikefu = bundled_addon("aikefu");
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await;
    let mut client = open(&server).await;
    for session in ["s1", "s2", "s1", "s3"] {
        client.send_text(&chat(&format!("hello from {session}"), "bob", session)).await;
        read_reply(&mut client, session).await;
    }
    // s2 was the least recently used when s3 began: forgotten. s1 goes on. (Asked on the
    // same connection: its callbacks run one at a time, so each starts after the previous
    // one stored its turn and forgot what it had to.)
    let mut asked = async |session: &str| -> Vec<String> {
        client.send_text(&chat("again", "bob", session)).await;
        read_reply(&mut client, session).await;
        llm.requests().last().unwrap().messages().into_iter().map(|(_, text)| text).collect()
    };
    let s1 = asked("s1").await;
    assert!(s1.iter().any(|t| t == "hello from s1"), "{s1:?}");
    let s2 = asked("s2").await;
    assert!(!s2.iter().any(|t| t == "hello from s2"), "{s2:?}");
}

#[tokio::test]
async fn one_slow_upstream_reply_never_delays_another_users_reply() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut slow = open(&server).await;
    slow.send_text(&chat("slow question", "alice", "a")).await;
    let first = slow.recv_json().await;
    assert_eq!(first["message"], REPLY[0]);
    // alice's upstream is now stalled until released. bob's whole reply must arrive
    // meanwhile: if the two shared anything that waits, this would hang and fail.
    let mut fast = open(&server).await;
    fast.send_text(&chat("fast question", "bob", "b")).await;
    assert_eq!(read_reply(&mut fast, "b").await, REPLY.concat());
    llm.release(1);
    let rest = read_reply(&mut slow, "a").await;
    assert_eq!(format!("{}{rest}", REPLY[0]), REPLY.concat());
}

#[tokio::test]
async fn every_upstream_failure_is_an_upstream_error_naming_the_cause() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, "").await;
    let mut client = open(&server).await;
    let cases = [
        ("http500 please", "HTTP 500"),
        ("http401 please", "invalid api key"),
        ("malformed please", "malformed"),
        ("cutoff please", "broke off"),
        ("noanswer please", "did not answer in time"),
    ];
    for (message, needle) in cases {
        client.send_text(&chat(message, "carol", "s")).await;
        let error = read_error(&mut client).await;
        assert_eq!(error["code"], "upstream_error", "{message}: {error}");
        let text = error["message"].as_str().unwrap();
        assert!(text.contains(needle), "{message}: {text}");
    }
    // Still serving, and none of the failed turns were remembered.
    client.send_text(&chat("fine now", "carol", "s")).await;
    assert_eq!(read_reply(&mut client, "s").await, REPLY.concat());
    let last = llm.requests().last().unwrap().messages();
    assert_eq!(last.len(), 2, "{last:?}");
}

#[tokio::test]
async fn a_refused_connection_is_an_upstream_error() {
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let manifest = format!(
        "kv = true\noutbound_hosts = [\"http://{closed}\"]\n[config]\ndev_accept_any_token = true\nbase_url = \"http://{closed}\"\nmodel = \"m\"\n"
    );
    let aikefu = bundled_addon("aikefu");
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await;
    let mut client = open(&server).await;
    client.send_text(&chat("hello", "dave", "s")).await;
    let error = read_error(&mut client).await;
    assert_eq!(error["code"], "upstream_error");
    assert!(error["message"].as_str().unwrap().contains("cannot reach"), "{error}");
}

#[tokio::test]
async fn calls_to_a_host_not_in_outbound_hosts_are_denied_and_logged() {
    let allowed = FakeLlm::start().await;
    let other = FakeLlm::start().await;
    // base_url names `other`, but only `allowed` is granted.
    let manifest = format!(
        "kv = true\noutbound_hosts = [\"{}\"]\n[config]\ndev_accept_any_token = true\nbase_url = \"{}\"\nmodel = \"m\"\n",
        allowed.origin(),
        other.origin()
    );
    let aikefu = bundled_addon("aikefu");
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await;
    let mut client = open(&server).await;
    client.send_text(&chat("hello", "erin", "s")).await;
    let error = read_error(&mut client).await;
    assert_eq!(error["code"], "upstream_error");
    assert!(error["message"].as_str().unwrap().contains("outbound_hosts"), "{error}");
    let line = wait_for_log(&["denied", &format!("{}", other.addr), "outbound_hosts"]).await;
    assert!(line.contains("aikefu"), "{line}");
    assert!(other.requests().is_empty(), "the denied host received a request");
    assert!(allowed.requests().is_empty());
}

#[tokio::test]
async fn the_offline_faq_answers_chinese_and_english_questions_in_chunks() {
    let server = bundled_server().await;
    let mut client = open(&server).await;
    let cases = [
        ("你们什么时候发货？", "48 小时"),
        ("How long does shipping take?", "within 48 hours"),
        ("我想退货", "7 天"),
        ("Can I get a refund?", "7 days"),
        ("我的订单到哪了", "我的订单"),
        ("支持支付宝吗", "支付宝"),
        // ("human" alone asks for a person: the hand-over, `cluster.rs`.)
        ("how do I contact support?", "9:00"),
    ];
    for (question, needle) in cases {
        client.send_text(&chat(question, "user_token_here", "session_123")).await;
        let mut chunks = 0;
        let mut text = String::new();
        loop {
            let frame = client.recv_json().await;
            assert_eq!(frame["type"], "chat", "{frame}");
            assert_eq!(frame["session_id"], "session_123");
            text.push_str(frame["message"].as_str().unwrap());
            chunks += 1;
            if frame["complete"] == true {
                break;
            }
        }
        assert!(text.contains(needle), "{question}: {text}");
        assert!(chunks > 3, "{question}: an answer streams in several chunks, got {chunks}");
    }
    client.send_text(&chat("量子物理", "user_token_here", "session_123")).await;
    assert!(read_reply(&mut client, "session_123").await.contains("人工客服"));
}

#[tokio::test]
async fn a_chinese_session_id_at_the_limit_keeps_its_conversation() {
    let server = bundled_server().await;
    let mut client = open(&server).await;
    let session = "会".repeat(42); // 126 bytes, the longest that fits in 128
    client.send_text(&chat("发货", "t", &session)).await;
    assert!(!read_reply(&mut client, &session).await.is_empty());
}

#[tokio::test]
async fn each_kind_of_bad_input_gets_its_own_error_code_and_the_connection_stays_usable() {
    let server = bundled_server().await;
    let mut client = open(&server).await;
    let cases: Vec<(String, &str)> = vec![
        ("hello".into(), "bad_json"),
        ("[1,2]".into(), "bad_json"),
        (r#"{"message": 5, "token": "t", "session_id": "s"}"#.into(), "bad_json"),
        (r#"{"token": "t", "session_id": "s", "action": "chat"}"#.into(), "missing_field"),
        (json!({"message": "  ", "token": "t", "session_id": "s"}).to_string(), "missing_field"),
        (json!({"message": "hi", "token": "t", "action": "chat"}).to_string(), "missing_field"),
        (json!({"message": "hi", "token": "t", "session_id": "x".repeat(129)}).to_string(), "invalid_field"),
        // Counted in bytes: 128 Chinese characters are 384 bytes, and used to reach kv's
        // key limit (storage_error) instead of being refused here.
        (json!({"message": "hi", "token": "t", "session_id": "会".repeat(128)}).to_string(), "invalid_field"),
        (json!({"message": "hi", "token": "t", "session_id": "会".repeat(43)}).to_string(), "invalid_field"),
        (json!({"message": "hi", "token": "u".repeat(500), "session_id": "s"}).to_string(), "invalid_field"),
        (json!({"message": "hi", "token": "t", "session_id": "a\u{0}b"}).to_string(), "invalid_field"),
        (
            json!({"message": "hi", "token": "t", "session_id": "s", "action": "delete_all"}).to_string(),
            "unsupported_action",
        ),
        (json!({"message": "hi", "session_id": "s", "action": "chat"}).to_string(), "unauthorized"),
        (
            json!({"message": "hi", "token": "", "session_id": "s", "action": "chat"}).to_string(),
            "unauthorized",
        ),
    ];
    for (text, code) in &cases {
        client.send_text(text).await;
        let frame = client.recv_json().await;
        assert_eq!(frame["type"], "error", "{text}: {frame}");
        assert_eq!(frame["code"], *code, "{text}: {frame}");
        assert!(!frame["message"].as_str().unwrap().is_empty());
    }
    client.send_binary(b"\x00\x01").await;
    let frame = client.recv_json().await;
    assert_eq!(frame["code"], "bad_json", "{frame}");
    // None of that broke the conversation.
    client.send_text(&chat("shipping?", "t", "s")).await;
    assert!(read_reply(&mut client, "s").await.contains("48"));
}

#[tokio::test]
async fn without_a_verifier_or_the_dev_switch_every_token_is_refused() {
    let aikefu = bundled_addon("aikefu");
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", b"kv = true\n")]).await;
    let mut client = open(&server).await;
    client.send_text(&chat("hi", "user_token_here", "s")).await;
    let frame = client.recv_json().await;
    assert_eq!(frame["code"], "unauthorized", "{frame}");
    assert!(frame["message"].as_str().unwrap().contains("not configured"), "{frame}");
}

#[tokio::test]
async fn without_the_kv_grant_memory_fails_with_a_named_error_not_a_crash() {
    let aikefu = bundled_addon("aikefu");
    let manifest = "[config]\ndev_accept_any_token = true\n";
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", manifest.as_bytes())]).await;
    let mut client = open(&server).await;
    client.send_text(&chat("shipping?", "t", "s")).await;
    let frame = client.recv_json().await;
    assert_eq!(frame["code"], "storage_error", "{frame}");
    wait_for_log(&["aikefu", "kv is not granted"]).await;
}

#[tokio::test]
async fn a_client_flooding_the_shipped_aikefu_gets_rate_limited() {
    // The shipped manifest as it is: 2 messages per second, a burst of 5.
    let aikefu = bundled_addon("aikefu");
    let manifest = std::fs::read(repo_root().join("addons/aikefu.toml")).unwrap();
    let server = TestServer::start(&[("aikefu.wasm", &aikefu), ("aikefu.toml", &manifest)]).await;
    let mut client = open(&server).await;
    for _ in 0..8 {
        client.send_text(&chat("shipping?", "user_token_here", "s")).await;
    }
    let mut replies = 0;
    let error = loop {
        let frame = client.recv_json().await;
        match frame["type"].as_str() {
            Some("chat") => replies += usize::from(frame["complete"] == true),
            Some("error") => break frame,
            _ => panic!("unexpected frame {frame}"),
        }
    };
    assert_eq!(error["code"], "rate_limited", "{error}");
    // The burst is answered; tokens refilled while replies were written may let one more
    // through on a slow machine, but never all eight.
    assert!((5..8).contains(&replies), "{replies} replies before the rate limit");
    let (code, _) = client.recv_close().await;
    assert_eq!(code, 1008);
}

/// The grants and grace a resumable reply needs, as the shipped manifest sets them.
pub(crate) const RESUMABLE: &str = "orphan_callback_grace_ms = 60000\n[channels]\nsubscribe = [\"user:*\", \"reply:*\"]\npublish = [\"reply:*\"]\n";

pub(crate) fn resume(token: &str, session: &str, reply_id: &str, after_seq: u64) -> String {
    json!({"action": "resume", "token": token, "session_id": session, "reply_id": reply_id, "after_seq": after_seq})
        .to_string()
}

/// Reads the numbered chunks of `reply_id` up to `complete`, checking that each `seq`
/// follows the last (nothing missing, nothing twice, in order) from `first_seq` on;
/// returns the text.
pub(crate) async fn read_numbered(client: &mut Client, reply_id: &str, first_seq: u64) -> String {
    let mut text = String::new();
    let mut seq = first_seq;
    loop {
        let frame = client.recv_json().await;
        assert_eq!(frame["type"], "chat", "{frame}");
        assert_eq!(frame["reply_id"], reply_id, "{frame}");
        assert_eq!(frame["seq"], seq, "chunk {seq} expected: {frame}");
        text.push_str(frame["message"].as_str().unwrap());
        if frame["complete"] == true {
            return text;
        }
        seq += 1;
    }
}

/// Issue 16: a client drops after chunk 5 while the model is still streaming; the reply
/// goes on without it, and a resume on a new connection gets 6 onwards exactly once, in
/// order, then `complete`. The finished reply is in the conversation's history.
#[tokio::test]
async fn a_dropped_client_resumes_its_reply_and_gets_every_chunk_once_in_order() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, RESUMABLE).await;
    let mut client = open(&server).await;
    client.send_text(&chat("gated long question", "alice", "s1")).await;
    let first = client.recv_json().await;
    let reply_id = first["reply_id"].as_str().unwrap().to_owned();
    assert_eq!((first["seq"].as_u64(), first["message"].as_str()), (Some(1), Some(LONG_REPLY[0])));
    llm.release(4);
    for seq in 2..=5 {
        let frame = client.recv_json().await;
        assert_eq!(
            (frame["seq"].as_u64(), frame["message"].as_str()),
            (Some(seq), Some(LONG_REPLY[seq as usize - 1]))
        );
    }
    drop(client);
    // Three more chunks while nobody is connected, the rest after the resume.
    llm.release(3);
    let mut resumed = open(&server).await;
    resumed.send_text(&resume("alice", "s1", &reply_id, 5)).await;
    llm.release(LONG_REPLY.len());
    let rest = read_numbered(&mut resumed, &reply_id, 6).await;
    assert_eq!(rest, LONG_REPLY[5..].concat());

    // The reply was finished and remembered although its client had gone.
    resumed.send_text(&chat("and then?", "alice", "s1")).await;
    read_reply(&mut resumed, "s1").await;
    let messages = llm.requests().last().unwrap().messages();
    assert!(
        messages.iter().any(|(role, text)| role == "assistant" && *text == LONG_REPLY.concat()),
        "{messages:?}"
    );
}

/// A finished reply resumes from storage alone: from any `seq`, and from the start.
/// Resuming names its errors: another user's reply, an unknown one, a missing field.
#[tokio::test]
async fn a_finished_reply_resumes_from_storage_and_bad_resumes_are_named() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm(&llm, RESUMABLE).await;
    let mut client = open(&server).await;
    client.send_text(&chat("long question", "alice", "s1")).await;
    let first = client.recv_json().await;
    let reply_id = first["reply_id"].as_str().unwrap().to_owned();
    read_numbered(&mut client, &reply_id, 2).await;

    for after in [0u64, 7, 12] {
        client.send_text(&resume("alice", "s1", &reply_id, after)).await;
        let text = read_numbered(&mut client, &reply_id, after + 1).await;
        assert_eq!(text, LONG_REPLY[after as usize..].concat());
    }
    let cases = [
        (resume("bob", "s1", &reply_id, 0), "unauthorized"),
        (resume("alice", "s1", "0123456789abcdef0123456789abcdef", 0), "reply_expired"),
        (resume("alice", "s1", "../history", 0), "reply_expired"),
        (json!({"action": "resume", "token": "alice", "session_id": "s1"}).to_string(), "missing_field"),
        (json!({"action": "resume", "token": "alice", "session_id": "s1", "reply_id": reply_id, "after_seq": -1}).to_string(), "bad_json"),
        (json!({"action": "resume", "session_id": "s1", "reply_id": reply_id}).to_string(), "unauthorized"),
    ];
    for (text, code) in &cases {
        client.send_text(text).await;
        let frame = client.recv_json().await;
        assert_eq!(
            (frame["type"].as_str(), frame["code"].as_str()),
            (Some("error"), Some(*code)),
            "{text}: {frame}"
        );
    }
    // None of that broke the connection.
    client.send_text(&chat("still there?", "alice", "s1")).await;
    read_reply(&mut client, "s1").await;
}

/// A reply is kept for `reply_ttl_s`; after that a resume is told `reply_expired`.
#[tokio::test]
async fn a_resume_after_the_ttl_is_told_the_reply_expired() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm_config(&llm, RESUMABLE, "reply_ttl_s = 1").await;
    let mut client = open(&server).await;
    client.send_text(&chat("long question", "alice", "s1")).await;
    let first = client.recv_json().await;
    let reply_id = first["reply_id"].as_str().unwrap().to_owned();
    read_numbered(&mut client, &reply_id, 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    client.send_text(&resume("alice", "s1", &reply_id, 0)).await;
    let frame = client.recv_json().await;
    assert_eq!(
        (frame["type"].as_str(), frame["code"].as_str()),
        (Some("error"), Some("reply_expired")),
        "{frame}"
    );
}

/// With `keep_replies = false` a reply is numbered but neither kept nor published: it
/// cannot be resumed, and says so.
#[tokio::test]
async fn without_keep_replies_a_resume_is_told_the_reply_expired() {
    let llm = FakeLlm::start().await;
    let server = server_with_llm_config(&llm, RESUMABLE, "keep_replies = false").await;
    let mut client = open(&server).await;
    client.send_text(&chat("long question", "alice", "s1")).await;
    let first = client.recv_json().await;
    let reply_id = first["reply_id"].as_str().unwrap().to_owned();
    read_numbered(&mut client, &reply_id, 2).await;
    client.send_text(&resume("alice", "s1", &reply_id, 0)).await;
    assert_eq!(client.recv_json().await["code"], "reply_expired");
}
