//! Hot reload of the addons directory against an in-process server: new files mount,
//! changed files serve new connections while open ones keep their version, broken
//! updates leave the old version serving, removed addons answer 404.

use std::path::Path;

use crate::support::*;

/// Replaces `dir/file` the way a deploy does: write beside it, then rename over it.
fn deploy(dir: &Path, file: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{file}.partial"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// How the server's log names an addon's URL (with its public host name, not the IP).
fn logged_url(server: &TestServer, path: &str) -> String {
    format!("ws://localhost:{}{path}", server.addr.port())
}

/// A component of another world: valid wasm the host cannot serve.
fn component_of_another_world() -> Vec<u8> {
    wat::parse_str("(component (core module $m) (core instance (instantiate $m)))").unwrap()
}

#[tokio::test]
async fn a_changed_addon_serves_new_connections_while_open_ones_finish_on_their_version() {
    let server = TestServer::start(&[("app.wasm", &test_addon("testkit"))]).await;
    let mut old = server.connect("/ws/app").await;
    assert_eq!(old.recv_text().await, "open", "version 1 is testkit");
    old.send_text("count").await;
    assert_eq!(old.recv_text().await, "1");

    deploy(server.addons_path(), "app.wasm", &test_addon("mirror"));
    wait_for_log(&["reloaded", &logged_url(&server, "/ws/app")]).await;

    let mut new = server.connect("/ws/app").await;
    new.send_text("count").await;
    assert_eq!(new.recv_text().await, "count", "a new connection gets version 2 (mirror)");
    old.send_text("count").await;
    assert_eq!(old.recv_text().await, "2", "the open connection keeps its testkit instance and state");

    // Both versions' connections count as the addon's.
    assert_eq!(server.metric("sockhost_addon_open_connections{addon=\"app\"}").await, Some(2.0));
    assert_eq!(server.metric("sockhost_addon_reloads_total{addon=\"app\",result=\"ok\"}").await, Some(1.0));
}

#[tokio::test]
async fn a_manifest_change_applies_to_new_connections_and_limits_count_every_version() {
    let server = TestServer::start(&[("app.wasm", &test_addon("mirror"))]).await;
    let mut first = server.connect("/ws/app").await;
    first.send_text("hi").await;
    assert_eq!(first.recv_text().await, "hi");

    std::fs::write(server.addons_path().join("app.toml"), "max_connections = 1\n").unwrap();
    wait_for_log(&["reloaded", &logged_url(&server, "/ws/app")]).await;

    // The connection on the old version holds the one slot the new manifest allows.
    let (status, text) = http_request(
        server.addr,
        "GET /ws/app HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(status, 503, "{text}");
    first.close(1000, "").await;
    eventually("the slot is free again", || async {
        server.metric("sockhost_addon_open_connections{addon=\"app\"}").await == Some(0.0)
    })
    .await;
    let mut second = server.connect("/ws/app").await;
    second.send_text("again").await;
    assert_eq!(second.recv_text().await, "again");
}

#[tokio::test]
async fn a_broken_update_keeps_the_old_version_serving_and_the_log_says_why() {
    let server = TestServer::start(&[("app.wasm", &test_addon("mirror"))]).await;
    let dir = server.addons_path();
    let file = dir.join("app.wasm").display().to_string();
    let still_serves = || async {
        let mut client = server.connect("/ws/app").await;
        client.send_text("still here").await;
        assert_eq!(client.recv_text().await, "still here");
    };

    // A file cut short, as a copy that stopped half-way would leave it.
    let mut half = test_addon("testkit");
    half.truncate(half.len() / 2);
    deploy(dir, "app.wasm", &half);
    let line = wait_for_log(&["addon not reloaded", &file]).await;
    assert!(line.contains("invalid component") && line.contains("keeps serving"), "{line}");
    still_serves().await;

    deploy(dir, "app.wasm", &component_of_another_world());
    wait_for_log(&["addon not reloaded", &file, "does not export the sockhost:addon/handler"]).await;
    still_serves().await;

    // A good wasm with a manifest that does not parse: still the old version.
    std::fs::write(dir.join("app.toml"), "memory_limit = \"lots\"\n").unwrap();
    deploy(dir, "app.wasm", &test_addon("testkit"));
    wait_for_log(&["addon not reloaded", &file, "memory_limit"]).await;
    still_serves().await;
    assert!(
        server.metric("sockhost_addon_reloads_total{addon=\"app\",result=\"failed\"}").await >= Some(3.0)
    );

    // Fixing the manifest lets the new version in.
    std::fs::remove_file(dir.join("app.toml")).unwrap();
    wait_for_log(&["reloaded", &logged_url(&server, "/ws/app")]).await;
    let mut client = server.connect("/ws/app").await;
    assert_eq!(client.recv_text().await, "open", "now testkit");
}

#[tokio::test]
async fn a_new_file_is_mounted_without_a_restart() {
    let server = TestServer::start(&[]).await;
    assert_eq!(http_get(server.addr, "/ws/late").await.0, 404);
    deploy(server.addons_path(), "late.wasm", &test_addon("mirror"));
    wait_for_log(&["mounted", &logged_url(&server, "/ws/late")]).await;
    let mut client = server.connect("/ws/late").await;
    client.send_text("hello").await;
    assert_eq!(client.recv_text().await, "hello");
    assert_eq!(server.metric("sockhost_addons_mounted").await, Some(1.0));
}

#[tokio::test]
async fn a_removed_addon_answers_404_while_its_open_connections_continue() {
    let server = TestServer::start(&[("gone.wasm", &test_addon("testkit"))]).await;
    let mut open = server.connect("/ws/gone").await;
    assert_eq!(open.recv_text().await, "open");

    let file = server.addons_path().join("gone.wasm");
    std::fs::remove_file(&file).unwrap();
    wait_for_log(&["unmounted /ws/gone", &file.display().to_string()]).await;

    let (status, text) = http_get(server.addr, "/ws/gone").await;
    assert_eq!(status, 404, "{text}");
    // The open connection goes on, on its version, until it ends.
    open.send_text("count").await;
    assert_eq!(open.recv_text().await, "1");
    open.close(1000, "").await;
    eventually("the connection is counted closed", || async {
        server.metric("sockhost_addon_open_connections{addon=\"gone\"}").await == Some(0.0)
    })
    .await;
}

#[tokio::test]
async fn a_copy_in_progress_is_not_loaded_until_it_stops_changing() {
    let server = TestServer::start(&[]).await;
    let path = server.addons_path().join("slow.wasm");
    let bytes = test_addon("testkit");
    // A slow copy: a chunk every 60 ms, for longer than several 250 ms looks. The watcher
    // and this writer share the test's one thread, and the writer's timer is always the
    // shorter, so no two looks pass without a write between them.
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in bytes.chunks(bytes.len() / 25 + 1) {
        std::io::Write::write_all(&mut file, chunk).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
    drop(file);
    wait_for_log(&["mounted", &logged_url(&server, "/ws/slow")]).await;
    let file = path.display().to_string();
    assert!(
        log_lines(&["not mounted", &file]).is_empty(),
        "a partial file was loaded: {:?}",
        log_lines(&[&file])
    );
    let mut client = server.connect("/ws/slow").await;
    assert_eq!(client.recv_text().await, "open");
}
