//! Hibernation: an idle connection of an addon that exports `hibernation` gives up its
//! instance, and the next event wakes it on a fresh one with its state. testkit opts in
//! (`export_addon!(Testkit, hibernate)`); mirror does not.

use std::path::Path;

use sockhost::FailureKind;

use crate::support::*;

/// The hibernation metrics of addon `addon`: (hibernated now, hibernations, wakes, live instances).
async fn hibernation_metrics(server: &TestServer, addon: &str) -> (f64, f64, f64, f64) {
    let get = |name: &str| format!("sockhost_addon_{name}{{addon=\"{addon}\"}}");
    (
        server.metric(&get("hibernated_connections")).await.unwrap_or(0.0),
        server.metric(&get("hibernations_total")).await.unwrap_or(0.0),
        server.metric(&get("wakes_total")).await.unwrap_or(0.0),
        server.metric(&get("live_instances")).await.unwrap_or(0.0),
    )
}

/// Waits until `addon` has `n` hibernated connections.
async fn until_hibernated(server: &TestServer, addon: &str, n: f64) {
    eventually(&format!("{n} connection(s) of {addon} hibernate"), || async {
        hibernation_metrics(server, addon).await.0 == n
    })
    .await;
}

fn testkit_with(manifest: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![("testkit.wasm", test_addon("testkit")), ("testkit.toml", manifest.as_bytes().to_vec())]
}

async fn start(files: &[(&'static str, Vec<u8>)]) -> TestServer {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(name, bytes)| (*name, bytes.as_slice())).collect();
    TestServer::start(&files).await
}

#[tokio::test]
async fn state_survives_hibernation_and_both_are_counted() {
    let server = start(&testkit_with("hibernate_after_ms = 300")).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1");
    assert_eq!(hibernation_metrics(&server, "testkit").await, (0.0, 0.0, 0.0, 1.0));

    until_hibernated(&server, "testkit", 1.0).await;
    assert_eq!(
        hibernation_metrics(&server, "testkit").await,
        (1.0, 1.0, 0.0, 0.0),
        "no live instance while asleep"
    );

    // The next message wakes it on a fresh instance that has the counter.
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "2");
    assert_eq!(hibernation_metrics(&server, "testkit").await, (0.0, 1.0, 1.0, 1.0));

    // And again: each idle period hibernates it once more.
    until_hibernated(&server, "testkit", 1.0).await;
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "3");
    assert_eq!(hibernation_metrics(&server, "testkit").await, (0.0, 2.0, 2.0, 1.0));
}

#[tokio::test]
async fn a_channel_message_wakes_a_hibernated_subscriber() {
    let manifest = "hibernate_after_ms = 100\n[channels]\nsubscribe = [\"room:*\"]\npublish = [\"room:*\"]\n";
    let server = start(&testkit_with(manifest)).await;
    let mut sleeper = server.connect("/ws/testkit").await;
    assert_eq!(sleeper.recv_text().await, "open");
    sleeper.send_text("sub room:1").await;
    assert_eq!(sleeper.recv_text().await, "subscribed room:1");
    sleeper.send_text("count").await;
    assert_eq!(sleeper.recv_text().await, "1");
    until_hibernated(&server, "testkit", 1.0).await;

    // The subscription is the host's: it held while the instance was gone.
    let mut publisher = server.connect("/ws/testkit").await;
    assert_eq!(publisher.recv_text().await, "open");
    publisher.send_text("pub room:1 wake up").await;
    assert_eq!(publisher.recv_text().await, "published");
    assert_eq!(sleeper.recv_text().await, "chan room:1 wake up");
    sleeper.send_text("count").await;
    assert_eq!(sleeper.recv_text().await, "2", "woken with its state");
    assert_eq!(server.metric("sockhost_addon_wakes_total{addon=\"testkit\"}").await, Some(1.0));
}

#[tokio::test]
async fn a_close_wakes_a_hibernated_connection_for_on_close() {
    let server = start(&testkit_with("hibernate_after_ms = 100")).await;
    let mut client = server.connect("/ws/testkit?tag=closing-asleep").await;
    assert_eq!(client.recv_text().await, "open");
    until_hibernated(&server, "testkit", 1.0).await;
    client.close(4001, "bye").await;
    // on-close sees the state restored by wake: the tag came from the query at on-open.
    wait_for_log(&["testkit on-close code=4001", "tag=closing-asleep"]).await;
    assert_eq!(hibernation_metrics(&server, "testkit").await.0, 0.0);
}

/// Replaces `dir/file` the way a deploy does: write beside it, then rename over it.
fn deploy(dir: &Path, file: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

#[tokio::test]
async fn a_reload_while_hibernated_wakes_the_connection_on_its_own_version() {
    let server =
        start(&[("app.wasm", test_addon("testkit")), ("app.toml", b"hibernate_after_ms = 100".to_vec())])
            .await;
    let mut old = server.connect("/ws/app").await;
    assert_eq!(old.recv_text().await, "open");
    old.send_text("count").await;
    assert_eq!(old.recv_text().await, "1");
    until_hibernated(&server, "app", 1.0).await;

    deploy(server.addons_path(), "app.wasm", &test_addon("mirror"));
    wait_for_log(&["reloaded", &format!("ws://localhost:{}/ws/app", server.addr.port())]).await;
    let mut new = server.connect("/ws/app").await;
    new.send_text("count").await;
    assert_eq!(new.recv_text().await, "count", "new connections get version 2 (mirror)");

    old.send_text("count").await;
    assert_eq!(old.recv_text().await, "2", "the hibernated connection wakes on testkit, with its state");
}

#[tokio::test]
async fn a_state_over_the_limit_keeps_the_instance_live() {
    // testkit's state (a counter, a delay, a tag) is a few dozen bytes of JSON.
    let server = start(&testkit_with("hibernate_after_ms = 100\nhibernate_max_state_bytes = 8")).await;
    let mut client = server.connect("/ws/testkit").await;
    assert_eq!(client.recv_text().await, "open");
    eventually("hibernate is refused for its size", || async {
        server.failures.get(FailureKind::HibernateFailed) >= 1
    })
    .await;
    wait_for_log(&["hibernate returned more than hibernate_max_state_bytes", "max=8"]).await;
    assert_eq!(hibernation_metrics(&server, "testkit").await, (0.0, 0.0, 0.0, 1.0));
    client.send_text("count").await;
    assert_eq!(client.recv_text().await, "1", "still the live instance");
}

#[tokio::test]
async fn an_addon_without_the_export_is_never_hibernated() {
    let server =
        start(&[("mirror.wasm", test_addon("mirror")), ("mirror.toml", b"hibernate_after_ms = 50".to_vec())])
            .await;
    wait_for_log(&["hibernate_after_ms is set but the component does not export", "addon=mirror"]).await;
    let mut client = server.connect("/ws/mirror").await;
    client.send_text("hi").await;
    assert_eq!(client.recv_text().await, "hi");
    // Several idle periods later it still has its instance.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(hibernation_metrics(&server, "mirror").await, (0.0, 0.0, 0.0, 1.0));
}

#[tokio::test]
async fn hibernated_connections_give_their_slots_to_new_ones_and_one_that_cannot_wake_is_told() {
    let server = TestServer::start_with(
        &[("testkit.wasm", &test_addon("testkit")), ("testkit.toml", b"hibernate_after_ms = 100")],
        |config| config.limits.max_live_instances = 1,
    )
    .await;
    let mut first = server.connect("/ws/testkit").await;
    assert_eq!(first.recv_text().await, "open");
    until_hibernated(&server, "testkit", 1.0).await;

    // The one slot is free again: a second connection gets it.
    let mut second = server.connect("/ws/testkit").await;
    assert_eq!(second.recv_text().await, "open");
    second.send_text("count").await;
    assert_eq!(second.recv_text().await, "1");
    // Busy for a while, so it holds its instance and slot instead of hibernating too.
    second.send_text("sleep 3000").await;

    // The first cannot wake while the second holds the slot: a named error, and 1013.
    first.send_text("count").await;
    let error = first.recv_json().await;
    assert_eq!(error["code"], "instance_capacity", "{error}");
    assert!(error["message"].as_str().unwrap().contains("limits.max_live_instances"), "{error}");
    assert_eq!(first.recv_close().await.0, 1013);
    assert_eq!(server.failures.get(FailureKind::InstanceCapacity), 1);
}

#[tokio::test]
async fn with_every_slot_taken_the_least_recently_active_connection_hibernates_to_make_room() {
    // Three slots, ten connections that would not hibernate on their own for a minute.
    let server = TestServer::start_with(
        &[("testkit.wasm", &test_addon("testkit")), ("testkit.toml", b"hibernate_after_ms = 60000")],
        |config| config.limits.max_live_instances = 3,
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut client = server.connect("/ws/testkit").await;
        assert_eq!(client.recv_text().await, "open");
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "1");
        clients.push(client);
    }
    let (hibernated, hibernations, _, live) = hibernation_metrics(&server, "testkit").await;
    assert_eq!((hibernated, live), (7.0, 3.0), "three live, the seven least recent asleep");
    assert_eq!(hibernations, 7.0);
    // Every one still answers, with its own state: each wake puts the least recently
    // active live one to sleep.
    for client in &mut clients {
        client.send_text("count").await;
        assert_eq!(client.recv_text().await, "2");
    }
    let (hibernated, _, wakes, live) = hibernation_metrics(&server, "testkit").await;
    assert_eq!((hibernated, live), (7.0, 3.0));
    assert_eq!(wakes, 10.0, "every connection was asleep when its turn came");
    assert_eq!(server.failures.get(FailureKind::InstanceCapacity), 0);
}

#[tokio::test]
async fn with_nothing_that_can_hibernate_a_full_pool_still_answers_503() {
    let server = TestServer::start_with(&[("mirror.wasm", &test_addon("mirror"))], |config| {
        config.limits.max_live_instances = 2
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = server.connect("/ws/mirror").await;
        client.send_text("hi").await;
        assert_eq!(client.recv_text().await, "hi");
        held.push(client);
    }
    let (status, text) = upgrade_status(server.addr, "/ws/mirror", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("live addon instances"), "{text}");
    assert_eq!(server.failures.get(FailureKind::InstanceCapacity), 1);
}
