//! Several real `sockhost` processes on one real Redis (`redis-server`, started by the
//! test on a free loopback port): a room that spans the nodes, server push from any
//! node, a conversation that follows its client to another node, Redis dying and coming
//! back, and a node killed with SIGKILL.

use std::collections::HashMap;

use serde_json::{Value, json};
use sockhost::testing::RedisServer;

use crate::aikefu::{chat, read_numbered, read_reply, resume};
use crate::fake_llm::{FakeLlm, LONG_REPLY};
use crate::process::{Process, spawn, work_dir};
use crate::support::*;

const KEY: &str = "cluster-test-key";
/// The shop's token secret for the hand-over test's nodes (`[auth]`).
const SECRET: &str = "cluster-secret-cluster-secret-0123456789";

/// A node's working directory: chatroom as shipped, aikefu with dev tokens and the fake
/// model (so the test can see which turns a reply was given), kv and channels on Redis.
fn node_dir(llm: &FakeLlm) -> tempfile::TempDir {
    let aikefu_manifest = format!(
        r#"
kv = true
messages_per_second = 0
outbound_hosts = ["{origin}"]
orphan_callback_grace_ms = 60000
[channels]
subscribe = ["user:*", "reply:*"]
publish = ["reply:*"]
[config]
dev_accept_any_token = true
base_url = "{origin}"
model = "test-model"
history_turns = 4
reply_ttl_s = 3
"#,
        origin = llm.origin()
    );
    work_dir(&[
        ("addons/chatroom.wasm", &bundled_addon("chatroom")),
        ("addons/chatroom.toml", &std::fs::read(repo_root().join("addons/chatroom.toml")).unwrap()),
        ("addons/aikefu.wasm", &bundled_addon("aikefu")),
        ("addons/aikefu.toml", aikefu_manifest.as_bytes()),
    ])
}

struct Node {
    process: Process,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(redis: &RedisServer, llm: &FakeLlm) -> Node {
        Node::start_in(redis, node_dir(llm))
    }

    fn start_in(redis: &RedisServer, dir: tempfile::TempDir) -> Node {
        let url = redis.url();
        let process = spawn(
            dir.path(),
            &["--listen", "127.0.0.1", "--admin-listen", "127.0.0.1:0", "--redis-url", &url],
            &[("SOCKHOST_PORT", "0"), ("SOCKHOST_API_KEY", KEY), ("SHOP_JWT_SECRET", SECRET)],
        );
        Node { process, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.process.port)
    }

    fn admin(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.process.admin_port().expect("an admin listener")).parse().unwrap()
    }

    fn public(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.process.port).parse().unwrap()
    }

    async fn join(&self, room: &str, name: &str) -> Client {
        let mut client = Client::connect(&self.url(&format!("/ws/chatroom?room={room}&name={name}"))).await;
        // Its own join is the proof that it is subscribed.
        assert_eq!(client.recv_json().await, json!({"type": "system", "message": format!("{name} joined")}));
        client
    }
}

/// Reads chat events until `count` have arrived, skipping joins and leaves.
async fn chats(client: &mut Client, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let event = client.recv_json().await;
        if event["type"] == "chat" {
            got.push(event);
        }
    }
    got
}

#[tokio::test]
async fn a_room_spans_three_nodes_and_every_member_gets_every_message_once_in_order() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let nodes = [Node::start(&redis, &llm), Node::start(&redis, &llm), Node::start(&redis, &llm)];
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        members.push(node.join("span", &format!("m{i}")).await);
    }
    // Every member hears the later joins, whatever node they came through.
    for (i, member) in members.iter_mut().enumerate() {
        for later in i + 1..3 {
            assert_eq!(member.recv_json().await["message"], format!("m{later} joined"));
        }
    }
    // Each member sends 20 messages at once, all three concurrently.
    const EACH: usize = 20;
    for (i, member) in members.iter_mut().enumerate() {
        for n in 0..EACH {
            member.send_text(&format!("m{i}-{n}")).await;
        }
    }
    let mut orders = Vec::new();
    for member in &mut members {
        let events = chats(member, 3 * EACH).await;
        // Exactly once each, and each sender's messages in the order they were sent.
        let mut next: HashMap<String, usize> = HashMap::new();
        for event in &events {
            let from = event["from"].as_str().unwrap().to_owned();
            let n = next.entry(from.clone()).or_default();
            assert_eq!(event["message"], format!("{from}-{n}"), "{events:?}");
            *n += 1;
        }
        assert!(next.values().all(|n| *n == EACH), "{next:?}");
        orders.push(events);
    }
    // Through Redis, every node sees the one order Redis gave the room.
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
}

#[tokio::test]
async fn a_push_on_one_node_reaches_the_users_chat_on_another_and_a_conversation_follows_its_client() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let (b, c) = (Node::start(&redis, &llm), Node::start(&redis, &llm));
    let mut chat_c = Client::connect(&c.url("/ws/aikefu")).await;
    assert_eq!(chat_c.recv_json().await["type"], "system");
    chat_c.send_text(&chat("remember the blue one", "42", "s1")).await;
    read_reply(&mut chat_c, "s1").await;

    let push = json!({"addon": "aikefu", "channel": "user:42", "data": "您的订单已发货"}).to_string();
    assert_eq!(http_post(b.admin(), "/api/publish", Some("wrong"), &push).await.0, 401);
    let (status, response) = http_post(b.admin(), "/api/publish", Some(KEY), &push).await;
    // Node B has no subscriber of its own; node C's chat gets the push.
    assert_eq!((status, json_body(&response)), (202, json!({"delivered": 0})), "{response}");
    assert_eq!(chat_c.recv_json().await, json!({"type": "system", "message": "您的订单已发货"}));

    // The client drops and reconnects to node B: its conversation is in Redis.
    drop(chat_c);
    let mut chat_b = Client::connect(&b.url("/ws/aikefu")).await;
    assert_eq!(chat_b.recv_json().await["type"], "system");
    chat_b.send_text(&chat("which one?", "42", "s1")).await;
    read_reply(&mut chat_b, "s1").await;
    let turns = llm.requests().last().unwrap().messages();
    assert!(turns.iter().any(|(_, text)| text == "remember the blue one"), "{turns:?}");
}

/// Issue 16, on three nodes: the client drops on node A in the middle of a streamed reply
/// and resumes on node B while the model is still streaming. Node B reads the kept chunks
/// from Redis and follows the rest through it: every chunk once, in order, then
/// `complete`. Node C has the finished reply from storage, until its TTL (`reply_ttl_s`,
/// 3 s here) has passed: then `reply_expired`.
#[tokio::test]
async fn a_reply_dropped_on_one_node_resumes_on_another_while_it_streams() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let (a, b, c) = (Node::start(&redis, &llm), Node::start(&redis, &llm), Node::start(&redis, &llm));
    let mut on_a = Client::connect(&a.url("/ws/aikefu")).await;
    assert_eq!(on_a.recv_json().await["type"], "system");
    on_a.send_text(&chat("gated long question", "42", "s1")).await;
    let first = on_a.recv_json().await;
    let reply_id = first["reply_id"].as_str().unwrap().to_owned();
    llm.release(4);
    for seq in 2..=5u64 {
        assert_eq!(on_a.recv_json().await["seq"], seq);
    }
    drop(on_a);
    llm.release(2);
    let mut on_b = Client::connect(&b.url("/ws/aikefu")).await;
    assert_eq!(on_b.recv_json().await["type"], "system");
    on_b.send_text(&resume("42", "s1", &reply_id, 5)).await;
    // Chunks 6 and 7 are in Redis or, if node A had not stored them yet, come with its
    // next chunk: one more is released, and four stay held by the model.
    llm.release(1);
    let sixth = on_b.recv_json().await;
    assert_eq!((sixth["seq"].as_u64(), sixth["message"].as_str()), (Some(6), Some(LONG_REPLY[5])), "{sixth}");
    llm.release(LONG_REPLY.len());
    let rest = read_numbered(&mut on_b, &reply_id, 7).await;
    assert_eq!(rest, LONG_REPLY[6..].concat());
    // Another user cannot have it.
    on_b.send_text(&resume("7", "s1", &reply_id, 0)).await;
    assert_eq!(on_b.recv_json().await["code"], "unauthorized");

    // A third node serves the whole finished reply from storage, until it expires.
    let mut on_c = Client::connect(&c.url("/ws/aikefu")).await;
    assert_eq!(on_c.recv_json().await["type"], "system");
    on_c.send_text(&resume("42", "s1", &reply_id, 0)).await;
    assert_eq!(read_numbered(&mut on_c, &reply_id, 1).await, LONG_REPLY.concat());
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    on_c.send_text(&resume("42", "s1", &reply_id, 0)).await;
    assert_eq!(on_c.recv_json().await["code"], "reply_expired");
}

#[tokio::test]
async fn when_redis_dies_errors_are_clear_and_delivery_resumes_without_a_restart() {
    let mut redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let (a, b) = (Node::start(&redis, &llm), Node::start(&redis, &llm));
    let mut alice = a.join("outage", "alice").await;
    let mut bob = b.join("outage", "bob").await;
    assert_eq!(alice.recv_json().await["message"], "bob joined");
    alice.send_text("before").await;
    assert_eq!(chats(&mut bob, 1).await[0]["message"], "before");
    assert_eq!(chats(&mut alice, 1).await[0]["message"], "before");

    redis.kill();
    // Publishing fails with a clear error frame; the connection stays.
    alice.send_text("during").await;
    let error = alice.recv_json().await;
    assert_eq!(error["code"], "unavailable", "{error}");
    assert!(error["message"].as_str().unwrap().contains("redis"), "{error}");
    // The backend's push answers 503, and the node says what is wrong.
    let push = json!({"addon": "chatroom", "channel": "room:outage", "data": "x"}).to_string();
    let (status, response) = http_post(a.admin(), "/api/publish", Some(KEY), &push).await;
    assert_eq!(status, 503, "{response}");
    let (status, ready) = http_get(a.public(), "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("DOWN"), "{ready}");
    let (_, metrics) = http_get(a.admin(), "/metrics").await;
    assert_eq!(metric_value(&metrics, "sockhost_cluster_up"), Some(0.0), "{metrics}");
    // kv fails as `backend`, which aikefu answers `storage_error`.
    let mut chat_a = Client::connect(&a.url("/ws/aikefu")).await;
    chat_a.recv_json().await;
    chat_a.send_text(&chat("hello", "7", "s")).await;
    assert_eq!(chat_a.recv_json().await["code"], "storage_error");

    redis.start_again();
    // Each node reconnects and subscribes again by itself. Until its subscription is
    // back, what is published is not delivered to it (at most once, as documented), so
    // alice tries until one of her messages comes back to her.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut attempt = 0;
    let first_heard = 'resumed: loop {
        assert!(tokio::time::Instant::now() < deadline, "delivery did not resume");
        attempt += 1;
        alice.send_text(&format!("after-{attempt}")).await;
        let wait = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
        while let Ok(event) = tokio::time::timeout_at(wait, alice.recv_json()).await {
            match event["type"].as_str() {
                Some("chat") => break 'resumed event["message"].as_str().unwrap().to_owned(),
                Some("error") => assert_eq!(event["code"], "unavailable", "{event}"),
                _ => {}
            }
        }
    };
    // bob, on the other node, gets it too: its node subscribed again by itself.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while chats(&mut bob, 1).await[0]["message"] != first_heard.as_str() {
        assert!(tokio::time::Instant::now() < deadline, "bob never heard {first_heard}");
    }
    let (status, _) = http_post(a.admin(), "/api/publish", Some(KEY), &push).await;
    assert_eq!(status, 202);
    let (_, ready) = http_get(a.public(), "/readyz").await;
    assert!(ready.contains("cluster: redis") && !ready.contains("DOWN"), "{ready}");
    let (_, metrics) = http_get(b.admin(), "/metrics").await;
    assert_eq!(metric_value(&metrics, "sockhost_cluster_up"), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn a_node_killed_with_sigkill_loses_only_its_own_sockets() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let nodes = [Node::start(&redis, &llm), Node::start(&redis, &llm), Node::start(&redis, &llm)];
    let mut a = nodes[0].join("kill", "a").await;
    let mut b = nodes[1].join("kill", "b").await;
    let mut c = nodes[2].join("kill", "c").await;
    assert_eq!(a.recv_json().await["message"], "b joined");
    assert_eq!(a.recv_json().await["message"], "c joined");
    assert_eq!(b.recv_json().await["message"], "c joined");

    // A conversation on the node about to die.
    let mut chat = Client::connect(&nodes[2].url("/ws/aikefu")).await;
    assert_eq!(chat.recv_json().await["type"], "system");
    chat.send_text(&crate::aikefu::chat("remember order 77", "9", "k")).await;
    read_reply(&mut chat, "k").await;
    // A turn is stored after its reply's last chunk; the next message's reply starts only
    // once the callback that stores it has returned.
    chat.send_text(&crate::aikefu::chat("thanks", "9", "k")).await;
    read_reply(&mut chat, "k").await;

    let [first, second, mut third] = nodes;
    third.process.child.kill().unwrap(); // SIGKILL
    third.process.child.wait().unwrap();
    // Its client sees the socket go; nobody else does.
    let lost =
        tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut c.ws)).await.expect("c notices");
    assert!(!matches!(lost, Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_)))), "{lost:?}");
    a.send_text("still here").await;
    assert_eq!(chats(&mut b, 1).await[0]["message"], "still here");
    // c reconnects to a surviving node and carries on.
    let mut c = second.join("kill", "c").await;
    c.send_text("back").await;
    let heard: Vec<Value> = chats(&mut a, 2).await;
    assert_eq!(heard[1]["message"], "back", "{heard:?}");
    assert_eq!(chats(&mut c, 1).await[0]["message"], "back");
    // The conversation goes on from another node: its turns are in Redis.
    let mut chat = Client::connect(&first.url("/ws/aikefu")).await;
    assert_eq!(chat.recv_json().await["type"], "system");
    chat.send_text(&crate::aikefu::chat("which order?", "9", "k")).await;
    read_reply(&mut chat, "k").await;
    let turns = llm.requests().last().unwrap().messages();
    assert!(turns.iter().any(|(_, text)| text == "remember order 77"), "{turns:?}");
}

/// A node directory for the hand-over test: aikefu as shipped (its channels and grace),
/// with real token verification, the fake model, and a one-second grace for an agent
/// whose connection drops.
fn handover_node_dir(llm: &FakeLlm) -> tempfile::TempDir {
    let shipped = std::fs::read_to_string(repo_root().join("addons/aikefu.toml")).unwrap();
    let mut manifest = shipped
        .replace("messages_per_second = 2\n", "messages_per_second = 0\n")
        .replace("dev_accept_any_token = true\n", "dev_accept_any_token = false\n")
        .replace("agent_release_grace_s = 30\n", "agent_release_grace_s = 1\n");
    assert!(manifest.contains("agent_release_grace_s = 1\n"), "update this test's overrides");
    let origin = llm.origin();
    manifest = manifest.replacen("kv = true\n", &format!("kv = true\noutbound_hosts = [\"{origin}\"]\n"), 1);
    manifest = manifest.replacen(
        "[config]\n",
        &format!(
            "[auth]\njwt_hs256_secret = {{ env = \"SHOP_JWT_SECRET\" }}\n\n[config]\nbase_url = \"{origin}\"\nmodel = \"test-model\"\n"
        ),
        1,
    );
    work_dir(&[("addons/aikefu.wasm", &bundled_addon("aikefu")), ("addons/aikefu.toml", manifest.as_bytes())])
}

fn jwt(claims: Value) -> String {
    sockhost::host::auth::sign_hs256(SECRET.as_bytes(), r#"{"alg":"HS256","typ":"JWT"}"#, &claims.to_string())
}

fn customer_token(user: &str) -> String {
    jwt(json!({"sub": user, "exp": 4_000_000_000u64}))
}

fn agent_token(agent: &str) -> String {
    jwt(json!({"sub": agent, "exp": 4_000_000_000u64, "role": "agent"}))
}

/// Reads frames until one whose `type` is `kind`.
async fn next_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let frame = client.recv_json().await;
        if frame["type"] == kind {
            return frame;
        }
    }
}

/// Issue 16, part 2: a customer on node A asks for a human; agents on node B and on
/// node A both see the queue, the first claim wins, messages flow both ways through
/// Redis while the model is silent, and after the release the bot answers with the
/// whole conversation as context. A dropped agent gives its conversation back after
/// the grace. A token without the agent role cannot open the agent console.
#[tokio::test]
async fn a_customer_is_handed_to_an_agent_on_another_node_and_back_to_the_bot() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let (a, b) =
        (Node::start_in(&redis, handover_node_dir(&llm)), Node::start_in(&redis, handover_node_dir(&llm)));

    // Without the role claim, the agent console is refused.
    let mut impostor =
        Client::connect(&b.url(&format!("/ws/aikefu?role=agent&token={}", customer_token("mallory")))).await;
    let refused = impostor.recv_json().await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{refused}"
    );
    assert_eq!(impostor.recv_close().await.0, 1008);

    let mut agent1 =
        Client::connect(&b.url(&format!("/ws/aikefu?role=agent&token={}", agent_token("agent1")))).await;
    assert_eq!(next_of(&mut agent1, "system").await["message"], "agent console: signed in as agent1");
    let mut agent2 =
        Client::connect(&a.url(&format!("/ws/aikefu?role=agent&token={}", agent_token("agent2")))).await;
    next_of(&mut agent2, "system").await;

    let alice = customer_token("alice");
    let mut customer = Client::connect(&a.url("/ws/aikefu")).await;
    next_of(&mut customer, "system").await;
    customer.send_text(&chat("my parcel is late", &alice, "s1")).await;
    read_reply(&mut customer, "s1").await;
    customer.send_text(&chat("转人工", &alice, "s1")).await;
    assert!(next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("human agent"));

    // Both agents see it waiting, with its last messages.
    for agent in [&mut agent1, &mut agent2] {
        let waiting = next_of(agent, "queue").await;
        assert_eq!(
            (waiting["event"].as_str(), waiting["session_id"].as_str(), waiting["user"].as_str()),
            (Some("waiting"), Some("s1"), Some("alice")),
            "{waiting}"
        );
        assert_eq!(waiting["messages"][0]["content"], "my parcel is late", "{waiting}");
    }
    // The first claim wins; the second is told.
    agent1.send_text(&json!({"action": "claim", "session_id": "s1"}).to_string()).await;
    let history = next_of(&mut agent1, "history").await;
    assert_eq!(history["messages"][0]["content"], "my parcel is late", "{history}");
    agent2.send_text(&json!({"action": "claim", "session_id": "s1"}).to_string()).await;
    assert_eq!(next_of(&mut agent2, "error").await["code"], "already_claimed");
    assert!(next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("agent has joined"));

    // Both ways, through Redis; the model is silent meanwhile.
    let asked = llm.requests().len();
    customer.send_text(&chat("where is order 77?", &alice, "s1")).await;
    let heard = next_of(&mut agent1, "chat").await;
    assert_eq!(
        (heard["message"].as_str(), heard["from"].as_str(), heard["user"].as_str()),
        (Some("where is order 77?"), Some("customer"), Some("alice")),
        "{heard}"
    );
    agent1
        .send_text(&json!({"action": "reply", "session_id": "s1", "message": "it ships today"}).to_string())
        .await;
    let answer = next_of(&mut customer, "chat").await;
    assert_eq!(
        answer,
        json!({"type": "chat", "message": "it ships today", "session_id": "s1", "complete": true, "from": "agent"})
    );
    // agent2 does not hold it.
    agent2.send_text(&json!({"action": "reply", "session_id": "s1", "message": "me too"}).to_string()).await;
    assert_eq!(next_of(&mut agent2, "error").await["code"], "not_claimed");
    assert_eq!(llm.requests().len(), asked, "the model stays silent while an agent holds the session");

    // Released: the customer is told, and the bot answers with the whole context.
    agent1.send_text(&json!({"action": "release", "session_id": "s1"}).to_string()).await;
    assert!(
        next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("assistant is back")
    );
    customer.send_text(&chat("thanks", &alice, "s1")).await;
    read_reply(&mut customer, "s1").await;
    let context: Vec<String> =
        llm.requests().last().unwrap().messages().into_iter().map(|(_, text)| text).collect();
    for said in ["my parcel is late", "where is order 77?", "it ships today"] {
        assert!(context.iter().any(|t| t == said), "{said} missing from {context:?}");
    }

    // An agent whose connection drops gives the conversation back after the grace.
    customer.send_text(&json!({"action": "agent", "token": alice, "session_id": "s1"}).to_string()).await;
    next_of(&mut customer, "system").await;
    next_of(&mut agent2, "queue").await;
    agent2.send_text(&json!({"action": "claim", "session_id": "s1", "user": "alice"}).to_string()).await;
    next_of(&mut agent2, "history").await;
    assert!(next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("agent has joined"));
    drop(agent2);
    assert!(
        next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("assistant is back")
    );

    // An agent back on a new connection within the grace takes the conversation over: it
    // is not given back to the bot, then or after the grace.
    customer.send_text(&json!({"action": "agent", "token": alice, "session_id": "s1"}).to_string()).await;
    next_of(&mut customer, "system").await;
    next_of(&mut agent1, "queue").await;
    agent1.send_text(&json!({"action": "claim", "session_id": "s1"}).to_string()).await;
    next_of(&mut agent1, "history").await;
    next_of(&mut customer, "system").await;
    drop(agent1);
    let mut agent1 =
        Client::connect(&a.url(&format!("/ws/aikefu?role=agent&token={}", agent_token("agent1")))).await;
    next_of(&mut agent1, "system").await;
    agent1.send_text(&json!({"action": "claim", "session_id": "s1", "user": "alice"}).to_string()).await;
    next_of(&mut agent1, "history").await;
    assert!(next_of(&mut customer, "system").await["message"].as_str().unwrap().contains("agent has joined"));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    customer.send_text(&chat("still there?", &alice, "s1")).await;
    assert_eq!(next_of(&mut agent1, "chat").await["message"], "still there?");
    agent1.send_text(&json!({"action": "reply", "session_id": "s1", "message": "yes"}).to_string()).await;
    // The customer's next frame is the agent's answer: no "the assistant is back" first.
    assert_eq!(customer.recv_json().await["from"], "agent");
}

/// Each way an agent's input can be bad gets its own error code, and the console goes on.
#[tokio::test]
async fn an_agents_bad_requests_are_named_and_the_console_stays_usable() {
    let redis = RedisServer::start();
    let llm = FakeLlm::start().await;
    let node = Node::start_in(&redis, handover_node_dir(&llm));
    let mut agent =
        Client::connect(&node.url(&format!("/ws/aikefu?role=agent&token={}", agent_token("a1")))).await;
    next_of(&mut agent, "system").await;
    let cases = [
        ("not json".to_owned(), "bad_json"),
        (json!({"action": "claim"}).to_string(), "missing_field"),
        (json!({"action": "claim", "session_id": ""}).to_string(), "missing_field"),
        (json!({"action": "fire", "session_id": "s1"}).to_string(), "unsupported_action"),
        (json!({"session_id": "s1"}).to_string(), "unsupported_action"),
        (json!({"action": "claim", "session_id": "nobody-waits"}).to_string(), "not_waiting"),
        (json!({"action": "reply", "session_id": "s1"}).to_string(), "missing_field"),
        (json!({"action": "reply", "session_id": "s1", "message": "hi"}).to_string(), "not_claimed"),
        (json!({"action": "release", "session_id": "s1"}).to_string(), "not_claimed"),
    ];
    for (text, code) in &cases {
        agent.send_text(text).await;
        let frame = next_of(&mut agent, "error").await;
        assert_eq!(frame["code"], *code, "{text}: {frame}");
    }
    agent.send_binary(b"\x01").await;
    assert_eq!(next_of(&mut agent, "error").await["code"], "bad_json");
    // Missing or malformed tokens never open the console.
    for query in ["role=agent", "role=agent&token=", "role=agent&token=garbage"] {
        let mut refused = Client::connect(&node.url(&format!("/ws/aikefu?{query}"))).await;
        assert_eq!(refused.recv_json().await["code"], "unauthorized", "{query}");
        assert_eq!(refused.recv_close().await.0, 1008, "{query}");
    }
    // The console still works: a customer's request reaches it.
    let mut customer = Client::connect(&node.url("/ws/aikefu")).await;
    next_of(&mut customer, "system").await;
    customer
        .send_text(&json!({"action": "agent", "token": customer_token("c1"), "session_id": "s9"}).to_string())
        .await;
    assert_eq!(next_of(&mut agent, "queue").await["session_id"], "s9");
}
