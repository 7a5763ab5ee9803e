//! Start-up with broken addon files next to good ones: each bad file is skipped with a
//! log line naming it and the cause; the good ones mount and serve.

use crate::support::*;

/// A component that exports nothing: a valid component of another world.
fn component_of_another_world() -> Vec<u8> {
    wat::parse_str("(component (core module $m) (core instance (instantiate $m)))").unwrap()
}

/// A component that imports an interface the host does not provide.
fn component_with_unknown_import() -> Vec<u8> {
    wat::parse_str(r#"(component (import "acme:billing/charge@1.0.0" (instance (export "charge" (func)))))"#)
        .unwrap()
}

/// A wasip1-style core module, not a component.
fn core_module() -> Vec<u8> {
    wat::parse_str(r#"(module (func (export "_start")))"#).unwrap()
}

/// Bytes from a fixed-seed generator: deterministic garbage.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A component that starts like wasm but is cut short, as a half-copied file would be.
fn truncated_component() -> Vec<u8> {
    let mut bytes = test_addon("testkit");
    bytes.truncate(bytes.len() / 2);
    bytes
}

#[tokio::test]
async fn bad_files_are_skipped_with_their_cause_and_good_ones_mount() {
    let echo = bundled_addon("echo");
    let server = TestServer::start(&[
        ("echo.wasm", &echo),
        ("noise.wasm", &random_bytes(4096)),
        ("core.wasm", &core_module()),
        ("otherworld.wasm", &component_of_another_world()),
        ("billing.wasm", &component_with_unknown_import()),
        ("half.wasm", &truncated_component()),
        ("Bad Name.wasm", &echo),
        ("notes.txt", b"not an addon"),
    ])
    .await;
    assert_eq!(server.addon_names, vec!["echo"]);

    let dir = server.addons_path().display().to_string();
    let expect = |file: &str, cause: &str| {
        let path = format!("{dir}/{file}");
        let lines = log_lines(&["addon not mounted", &path, cause]);
        assert_eq!(
            lines.len(),
            1,
            "expected one log line for {file} with {cause:?}; log has: {:?}",
            log_lines(&[&path])
        );
    };
    expect("noise.wasm", "not a WebAssembly file");
    expect("core.wasm", "core WebAssembly module, not a component");
    expect("otherworld.wasm", "does not export the sockhost:addon/handler@0.1.x interface");
    expect("billing.wasm", "acme:billing/charge@1.0.0");
    expect("half.wasm", "invalid component");
    expect("Bad Name.wasm", "invalid addon name");
    assert!(log_lines(&["notes.txt"]).is_empty(), "only *.wasm files are considered");

    // The good addon serves; the bad ones are not mounted.
    let mut client = server.connect("/ws/echo").await;
    client.send_text("ok").await;
    assert_eq!(client.recv_text().await, "ok");
    let (status, _) = http_get(server.addr, "/ws/core").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_missing_addons_directory_still_serves_the_test_endpoint() {
    capture_logs();
    let config = sockhost::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        addons_dir: "/nonexistent/sockhost-addons".into(),
        limits: sockhost::ServerLimits { max_connections: 8, ..Default::default() },
        cache_dir: None,
        ..Default::default()
    };
    let server = sockhost::Server::start(config).await.unwrap();
    let addr = server.local_addr();
    tokio::spawn(server.run_until(std::future::pending()));
    let mut client = Client::connect(&format!("ws://{addr}/ws")).await;
    let greeting = client.recv_json().await;
    assert!(greeting["message"].as_str().unwrap().contains("none"), "{greeting}");
    assert_eq!(log_lines(&["cannot read the addons directory", "/nonexistent/sockhost-addons"]).len(), 1);
}

/// Components built against the previous minor version of the WIT package keep working:
/// `tests/fixtures/echo-wit-0.1.0.wasm` is the echo addon as built for
/// `sockhost:addon@0.1.0`, before kv, config, auth and outbound HTTP were added.
#[tokio::test]
async fn a_component_built_against_wit_0_1_0_still_loads_and_serves() {
    let old = std::fs::read(repo_root().join("tests/fixtures/echo-wit-0.1.0.wasm")).unwrap();
    let server = TestServer::start(&[("old.wasm", &old)]).await;
    assert_eq!(server.addon_names, ["old"]);
    let mut client = server.connect("/ws/old").await;
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");
}

/// `tests/fixtures/echo-wit-0.1.3.wasm` is the echo addon as built for
/// `sockhost:addon@0.1.3` (before `kv.compare-and-delete`): its `handler` and
/// `hibernation` exports bind on the 0.1.4 host, so it serves, hibernates and wakes.
#[tokio::test]
async fn a_component_built_against_wit_0_1_3_still_loads_hibernates_and_wakes() {
    let old = std::fs::read(repo_root().join("tests/fixtures/echo-wit-0.1.3.wasm")).unwrap();
    let server = TestServer::start(&[("old.wasm", &old), ("old.toml", b"hibernate_after_ms = 100")]).await;
    assert_eq!(server.addon_names, ["old"]);
    let mut client = server.connect("/ws/old").await;
    client.send_text("before").await;
    assert_eq!(client.recv_text().await, "before");
    let metric = |name: &str| format!("sockhost_addon_{name}{{addon=\"old\"}}");
    eventually("the 0.1.3 echo hibernates", || async {
        server.metric(&metric("hibernated_connections")).await == Some(1.0)
    })
    .await;
    client.send_text("after").await;
    assert_eq!(client.recv_text().await, "after");
    assert_eq!(server.metric(&metric("wakes_total")).await, Some(1.0));
}

/// `tests/fixtures/echo-wit-0.1.2.wasm` is the echo addon as built for
/// `sockhost:addon@0.1.2` (channels, no hibernation): it mounts, serves and streams.
#[tokio::test]
async fn a_component_built_against_wit_0_1_2_still_loads_and_serves() {
    let old = std::fs::read(repo_root().join("tests/fixtures/echo-wit-0.1.2.wasm")).unwrap();
    let server = TestServer::start(&[("old.wasm", &old)]).await;
    assert_eq!(server.addon_names, ["old"]);
    let mut client = server.connect("/ws/old").await;
    client.send_text("still here").await;
    assert_eq!(client.recv_text().await, "still here");
}
