//! Channels in one process: grants and denials, ordering, components without the
//! export, slow subscribers beside fast ones, subscriptions ending with the connection,
//! payload limits, namespaces, the admin API, and the chatroom and aikefu examples.
//! Real servers on loopback, real clients, real components.

use serde_json::json;

use crate::support::*;

/// The testkit's manifest for channel tests: `room:*` both ways, `user:*` to subscribe.
const GRANTS: &str = r#"
messages_per_second = 0
[channels]
subscribe = ["room:*", "user:*"]
publish = ["room:*"]
max_message_bytes = "1KiB"
"#;

const KEY: &str = "test-admin-key";

/// A server with testkit (granted as above) and an admin listener with [`KEY`].
async fn server_with(files: &[(&str, &[u8])]) -> TestServer {
    TestServer::start_with(files, |config| {
        config.admin = Some(sockhost::AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key_env: "UNUSED_IN_TESTS".into(),
            api_key: Some(sockhost::ApiKey(KEY.into())),
        });
    })
    .await
}

async fn testkit_server() -> TestServer {
    let testkit = test_addon("testkit");
    server_with(&[("testkit.wasm", &testkit), ("testkit.toml", GRANTS.as_bytes())]).await
}

/// A testkit client that has read its `open` greeting.
async fn testkit(server: &TestServer, query: &str) -> Client {
    let mut client = server.connect(&format!("/ws/testkit{query}")).await;
    assert_eq!(client.recv_text().await, "open");
    client
}

/// Sends a testkit command and returns its one-line answer.
async fn ask(client: &mut Client, command: &str) -> String {
    client.send_text(command).await;
    client.recv_text().await
}

async fn publish(server: &TestServer, body: serde_json::Value) -> (u16, String) {
    http_post(server.admin.expect("admin listener"), "/api/publish", Some(KEY), &body.to_string()).await
}

#[tokio::test]
async fn grants_decide_what_a_connection_may_do() {
    let server = testkit_server().await;
    let mut client = testkit(&server, "").await;
    assert_eq!(ask(&mut client, "sub room:lobby").await, "subscribed room:lobby");
    assert_eq!(ask(&mut client, "sub user:42").await, "subscribed user:42");
    // Not granted: another prefix, another depth, publishing where only subscribing is.
    assert_eq!(ask(&mut client, "sub news:today").await, "channel error: Denied");
    assert_eq!(ask(&mut client, "sub room:a:b").await, "channel error: Denied");
    assert_eq!(ask(&mut client, "pub user:42 hi").await, "channel error: Denied");
    let line = wait_for_log(&["publish denied", "user:42"]).await;
    assert!(line.contains("no pattern"), "{line}");
    // Malformed names say what is allowed.
    let invalid = ask(&mut client, "sub room::x").await;
    assert!(
        invalid.starts_with("channel error: Invalid(") && invalid.contains("1 to 128 bytes"),
        "{invalid}"
    );
    let invalid = ask(&mut client, "pub room:a\u{7} x").await;
    assert!(invalid.contains("Invalid("), "{invalid}");

    // Without a [channels] section nothing is granted.
    let bare = test_addon("testkit");
    let server = server_with(&[("testkit.wasm", &bare)]).await;
    let mut client = testkit(&server, "").await;
    assert_eq!(ask(&mut client, "sub room:lobby").await, "channel error: Denied");
    assert_eq!(ask(&mut client, "pub room:lobby x").await, "channel error: Denied");
}

#[tokio::test]
async fn deliveries_keep_publish_order_and_reach_the_publisher_too() {
    let server = testkit_server().await;
    let mut a = testkit(&server, "").await;
    let mut b = testkit(&server, "").await;
    assert_eq!(ask(&mut a, "sub room:order").await, "subscribed room:order");
    assert_eq!(ask(&mut b, "sub room:order").await, "subscribed room:order");
    for i in 0..50 {
        b.send_text(&format!("pub room:order {i}")).await;
    }
    // a gets the deliveries in publish order; b interleaves them with its own answers
    // (one callback at a time), each stream in its own order.
    for i in 0..50 {
        assert_eq!(a.recv_text().await, format!("chan room:order {i}"));
    }
    let (mut published, mut delivered) = (0, 0);
    while published < 50 || delivered < 50 {
        let text = b.recv_text().await;
        if text == "published" {
            published += 1;
        } else {
            assert_eq!(text, format!("chan room:order {delivered}"));
            delivered += 1;
        }
    }
    // Client messages and deliveries take turns: the instance still answers.
    assert_eq!(ask(&mut a, "count").await, "1");
}

#[tokio::test]
async fn a_component_without_the_export_mounts_but_cannot_subscribe() {
    let nohandler = test_addon("nohandler");
    let server = server_with(&[("nohandler.wasm", &nohandler), ("nohandler.toml", GRANTS.as_bytes())]).await;
    assert!(server.addon_names.contains(&"nohandler".to_owned()), "{:?}", server.addon_names);
    let mut client = server.connect("/ws/nohandler").await;
    client.send_text("sub room:lobby").await;
    assert_eq!(client.recv_text().await, "Err(ChannelError::Denied)");
    let line = wait_for_log(&["subscribe denied", "channel-handler"]).await;
    assert!(line.contains("does not export"), "{line}");
    // Publishing needs no export.
    client.send_text("pub room:lobby hello").await;
    assert_eq!(client.recv_text().await, "Ok(())");
}

#[tokio::test]
async fn a_slow_subscriber_is_closed_and_never_holds_back_the_others() {
    let testkit_wasm = test_addon("testkit");
    let manifest = format!("{GRANTS}inbox = 4\n");
    let server = server_with(&[("testkit.wasm", &testkit_wasm), ("testkit.toml", manifest.as_bytes())]).await;
    // Each delivery takes the slow one 100 ms; 30 messages arrive at once.
    let mut slow = testkit(&server, "?slow=100").await;
    let mut fast = Vec::new();
    for _ in 0..3 {
        let mut client = testkit(&server, "").await;
        assert_eq!(ask(&mut client, "sub room:busy").await, "subscribed room:busy");
        fast.push(client);
    }
    assert_eq!(ask(&mut slow, "sub room:busy").await, "subscribed room:busy");
    for i in 0..30 {
        let (status, body) =
            publish(&server, json!({"addon": "testkit", "channel": "room:busy", "data": i.to_string()}))
                .await;
        assert_eq!(status, 202, "{body}");
    }
    for client in &mut fast {
        for i in 0..30 {
            assert_eq!(client.recv_text().await, format!("chan room:busy {i}"));
        }
    }
    // The slow one got what it could, then an error frame and 1008: never a silent gap.
    let mut got = 0;
    let error = loop {
        let text = slow.recv_text().await;
        if text.starts_with('{') {
            break serde_json::from_str::<serde_json::Value>(&text).unwrap();
        }
        assert_eq!(text, format!("chan room:busy {got}"), "deliveries before the close stay in order");
        got += 1;
    };
    assert!(got < 30, "the slow subscriber cannot have kept up");
    assert_eq!(error["code"], "slow_subscriber", "{error}");
    assert!(error["message"].as_str().unwrap().contains("channels.inbox"), "{error}");
    assert_eq!(slow.recv_close().await.0, 1008);
    eventually("the failure is counted", || async {
        server.metric_admin(r#"sockhost_addon_failures_total{addon="testkit",kind="slow_subscriber"}"#).await
            == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn subscriptions_end_with_unsubscribe_and_with_the_connection() {
    let server = testkit_server().await;
    let body = json!({"addon": "testkit", "channel": "room:leave", "data": "x"});
    let mut a = testkit(&server, "").await;
    let mut b = testkit(&server, "").await;
    assert_eq!(ask(&mut a, "sub room:leave").await, "subscribed room:leave");
    assert_eq!(ask(&mut b, "sub room:leave").await, "subscribed room:leave");
    let (status, response) = publish(&server, body.clone()).await;
    assert_eq!((status, json_body(&response)["delivered"].clone()), (202, json!(2)));
    assert_eq!(a.recv_text().await, "chan room:leave x");
    assert_eq!(b.recv_text().await, "chan room:leave x");

    assert_eq!(ask(&mut a, "unsub room:leave").await, "unsubscribed room:leave");
    let (_, response) = publish(&server, body.clone()).await;
    assert_eq!(json_body(&response)["delivered"], 1);
    assert_eq!(b.recv_text().await, "chan room:leave x");

    let held = r#"sockhost_channel_subscriptions{addon="testkit"}"#;
    assert_eq!(server.metric_admin(held).await, Some(1.0));
    b.close(1000, "bye").await;
    eventually("the closed connection's subscription is gone", || async {
        server.metric_admin(held).await == Some(0.0)
    })
    .await;
    assert_eq!(json_body(&publish(&server, body.clone()).await.1)["delivered"], 0);
    // a, unsubscribed, got nothing more: its next frame is the answer to a command.
    assert_eq!(ask(&mut a, "count").await, "1");
}

#[tokio::test]
async fn published_messages_are_bounded_by_the_manifest() {
    let server = testkit_server().await;
    let mut client = testkit(&server, "").await;
    assert_eq!(ask(&mut client, "sub room:big").await, "subscribed room:big");
    assert_eq!(ask(&mut client, "pub-bin room:big 1025").await, "channel error: TooLarge");
    assert_eq!(ask(&mut client, "pub-bin room:big 1024").await, "published");
    assert_eq!(client.recv_text().await, "chan room:big 1024 bytes");
    // The admin API has the same bound, answered 413.
    let big = "x".repeat(1025);
    let (status, response) =
        publish(&server, json!({"addon": "testkit", "channel": "room:big", "data": big})).await;
    assert_eq!(status, 413, "{response}");
    assert!(response.contains("channels.max_message_bytes"), "{response}");
}

#[tokio::test]
async fn a_connection_holds_at_most_max_subscriptions() {
    let testkit_wasm = test_addon("testkit");
    let manifest = format!("{GRANTS}max_subscriptions = 2\n");
    let server = server_with(&[("testkit.wasm", &testkit_wasm), ("testkit.toml", manifest.as_bytes())]).await;
    let mut client = testkit(&server, "").await;
    assert_eq!(ask(&mut client, "sub room:1").await, "subscribed room:1");
    assert_eq!(ask(&mut client, "sub room:2").await, "subscribed room:2");
    assert_eq!(ask(&mut client, "sub room:2").await, "subscribed room:2", "again is not more");
    let refused = ask(&mut client, "sub room:3").await;
    assert!(
        refused.starts_with("channel error: Invalid(") && refused.contains("channels.max_subscriptions"),
        "{refused}"
    );
    // Leaving one makes room.
    assert_eq!(ask(&mut client, "unsub room:1").await, "unsubscribed room:1");
    assert_eq!(ask(&mut client, "sub room:3").await, "subscribed room:3");
}

#[tokio::test]
async fn channels_belong_to_their_addon() {
    let testkit_wasm = test_addon("testkit");
    let server = server_with(&[
        ("testkit.wasm", &testkit_wasm),
        ("testkit.toml", GRANTS.as_bytes()),
        ("other.wasm", &testkit_wasm),
        ("other.toml", GRANTS.as_bytes()),
    ])
    .await;
    let mut mine = testkit(&server, "").await;
    let mut theirs = server.connect("/ws/other").await;
    assert_eq!(theirs.recv_text().await, "open");
    assert_eq!(ask(&mut mine, "sub room:lobby").await, "subscribed room:lobby");
    assert_eq!(ask(&mut theirs, "sub room:lobby").await, "subscribed room:lobby");
    assert_eq!(ask(&mut theirs, "pub room:lobby theirs").await, "published");
    assert_eq!(theirs.recv_text().await, "chan room:lobby theirs");
    assert_eq!(ask(&mut mine, "pub room:lobby mine").await, "published");
    // mine's first delivery is its own message: the other addon's never reached it.
    assert_eq!(mine.recv_text().await, "chan room:lobby mine");
}

#[tokio::test]
async fn the_admin_api_checks_its_key_and_its_body() {
    let server = testkit_server().await;
    let admin = server.admin.unwrap();
    let good = json!({"addon": "testkit", "channel": "room:a", "data": {"order": 42}}).to_string();
    let (status, response) = http_post(admin, "/api/publish", None, &good).await;
    assert_eq!(status, 401, "{response}");
    assert!(response.contains("WWW-Authenticate: Bearer"), "{response}");
    assert_eq!(http_post(admin, "/api/publish", Some("wrong"), &good).await.0, 401);
    assert_eq!(http_post(admin, "/api/publish", Some(&format!("{KEY}x")), &good).await.0, 401);

    // A JSON value is sent as its serialisation, a string as it is.
    let mut client = testkit(&server, "").await;
    assert_eq!(ask(&mut client, "sub room:a").await, "subscribed room:a");
    let (status, response) = http_post(admin, "/api/publish", Some(KEY), &good).await;
    assert_eq!((status, json_body(&response)), (202, json!({"delivered": 1})), "{response}");
    assert_eq!(client.recv_text().await, r#"chan room:a {"order":42}"#);
    let (status, _) =
        publish(&server, json!({"addon": "testkit", "channel": "room:a", "data": "您的订单已发货"})).await;
    assert_eq!(status, 202);
    assert_eq!(client.recv_text().await, "chan room:a 您的订单已发货");

    for (body, needle) in [
        ("not json".to_owned(), "bad body"),
        (json!({"channel": "room:a", "data": 1}).to_string(), "addon"),
        (json!({"addon": "testkit", "data": 1}).to_string(), "channel"),
        (json!({"addon": "testkit", "channel": "room:a"}).to_string(), "data"),
        (json!({"addon": 7, "channel": "room:a", "data": 1}).to_string(), "addon"),
        (json!({"addon": "testkit", "channel": "room:a", "data": 1, "extra": 1}).to_string(), "extra"),
        (json!({"addon": "nope", "channel": "room:a", "data": 1}).to_string(), "field `addon`"),
        (json!({"addon": "testkit", "channel": "room a", "data": 1}).to_string(), "field `channel`"),
    ] {
        let (status, response) = http_post(admin, "/api/publish", Some(KEY), &body).await;
        assert_eq!(status, 400, "{body}: {response}");
        assert!(json_body(&response)["error"].as_str().unwrap().contains(needle), "{body}: {response}");
    }
    let no_length = format!("POST /api/publish HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    assert_eq!(http_request(admin, &no_length).await.0, 411);
    assert_eq!(http_get(admin, "/api/publish").await.0, 405);
    assert_eq!(http_get(admin, "/nothing").await.0, 404);
    // /metrics moved to the admin listener; the public port says where it went.
    let (status, response) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 404, "{response}");
    assert!(response.contains("admin listener"), "{response}");
    assert!(
        server.metric_admin(r#"sockhost_channel_published_total{addon="testkit"}"#).await.unwrap() >= 2.0
    );
    assert_eq!(http_get(server.addr, "/healthz").await.0, 200);
}

#[tokio::test]
async fn without_a_key_the_admin_api_does_not_exist() {
    let testkit_wasm = test_addon("testkit");
    let server = TestServer::start_with(&[("testkit.wasm", &testkit_wasm)], |config| {
        config.admin = Some(sockhost::AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key_env: "SOCKHOST_TEST_NO_SUCH_KEY".into(),
            api_key: None,
        });
    })
    .await;
    let admin = server.admin.unwrap();
    let body = json!({"addon": "testkit", "channel": "room:a", "data": 1}).to_string();
    let (status, response) = http_post(admin, "/api/publish", Some("anything"), &body).await;
    assert_eq!(status, 404, "{response}");
    assert!(response.contains("no API key is configured"), "{response}");
    wait_for_log(&["POST /api/publish is off", "SOCKHOST_TEST_NO_SUCH_KEY"]).await;
    // /metrics is there all the same.
    assert_eq!(http_get(admin, "/metrics").await.0, 200);
}

#[tokio::test]
async fn chatroom_members_hear_each_other_and_bad_rooms_are_named() {
    let chatroom = bundled_addon("chatroom");
    let manifest = std::fs::read(repo_root().join("addons/chatroom.toml")).unwrap();
    let server = server_with(&[("chatroom.wasm", &chatroom), ("chatroom.toml", &manifest)]).await;
    let mut alice = server.connect("/ws/chatroom?room=lobby&name=alice").await;
    assert_eq!(alice.recv_json().await, json!({"type": "system", "message": "alice joined"}));
    let mut bob = server.connect("/ws/chatroom?room=lobby&name=%E5%B0%8F%E6%98%8E").await;
    assert_eq!(bob.recv_json().await, json!({"type": "system", "message": "小明 joined"}));
    assert_eq!(alice.recv_json().await, json!({"type": "system", "message": "小明 joined"}));
    let mut elsewhere = server.connect("/ws/chatroom?room=kitchen&name=carol").await;
    assert_eq!(elsewhere.recv_json().await["message"], "carol joined");

    alice.send_text("hello 你好").await;
    let expected = json!({"type": "chat", "room": "lobby", "from": "alice", "message": "hello 你好"});
    assert_eq!(alice.recv_json().await, expected);
    assert_eq!(bob.recv_json().await, expected);
    // Bad messages get an error frame and the connection stays.
    alice.send_binary(b"\x00").await;
    assert_eq!(alice.recv_json().await["code"], "bad_message");
    alice.send_text("   ").await;
    assert_eq!(alice.recv_json().await["code"], "bad_message");
    alice.send_text(&"x".repeat(2001)).await;
    assert_eq!(alice.recv_json().await["code"], "bad_message");

    bob.close(1000, "bye").await;
    assert_eq!(alice.recv_json().await, json!({"type": "system", "message": "小明 left"}));
    // carol, in another room, heard none of it: her next frame answers her own message.
    elsewhere.send_text("anyone?").await;
    assert_eq!(elsewhere.recv_json().await["from"], "carol");

    for (query, code) in [
        ("?name=alice", "invalid_room"),
        ("?room=a:b&name=alice", "invalid_room"),
        ("?room=lobby", "invalid_name"),
        ("?room=lobby&name=%20alice", "invalid_name"),
        ("?room=lobby&name=a%3Cb%3E", "invalid_name"),
    ] {
        let mut client = server.connect(&format!("/ws/chatroom{query}")).await;
        let error = client.recv_json().await;
        assert_eq!(error["code"], code, "{query}: {error}");
        assert!(error["message"].as_str().unwrap().contains("e.g. ?room=lobby&name=alice"), "{error}");
        assert_eq!(client.recv_close().await.0, 1008, "{query}");
    }
}

#[tokio::test]
async fn the_backend_pushes_to_a_users_aikefu_chats() {
    let aikefu = bundled_addon("aikefu");
    let manifest = std::fs::read(repo_root().join("addons/aikefu.toml")).unwrap();
    let server = server_with(&[("aikefu.wasm", &aikefu), ("aikefu.toml", &manifest)]).await;
    let mut chats = Vec::new();
    for session in ["s1", "s2"] {
        let mut chat = server.connect("/ws/aikefu").await;
        assert_eq!(chat.recv_json().await["type"], "system");
        // The shipped manifest accepts any token in development: the token is the user.
        let hello = json!({"message": "发货", "token": "42", "session_id": session, "action": "chat"});
        chat.send_text(&hello.to_string()).await;
        while !chat.recv_json().await["complete"].as_bool().unwrap_or(false) {}
        chats.push(chat);
    }
    let mut stranger = server.connect("/ws/aikefu").await;
    stranger.recv_json().await;
    let hello = json!({"message": "hi", "token": "7", "session_id": "s9", "action": "chat"});
    stranger.send_text(&hello.to_string()).await;
    while !stranger.recv_json().await["complete"].as_bool().unwrap_or(false) {}

    let push =
        json!({"addon": "aikefu", "channel": "user:42", "data": "您的订单已发货 Your order has shipped"});
    let (status, response) = publish(&server, push).await;
    assert_eq!((status, json_body(&response)), (202, json!({"delivered": 2})), "{response}");
    for chat in &mut chats {
        assert_eq!(
            chat.recv_json().await,
            json!({"type": "system", "message": "您的订单已发货 Your order has shipped"})
        );
    }
    // User 7 got nothing: its next frame is the reply to its next message.
    stranger.send_text(&hello.to_string()).await;
    assert_eq!(stranger.recv_json().await["type"], "chat");
}
