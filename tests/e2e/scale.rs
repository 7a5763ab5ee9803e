//! Connection scale (issue 17): the pool sized from what addons may use, sockets and
//! live instances counted apart, a full pool named `instance_capacity`, and the start-up
//! check of what the pool reserves and maps against what the machine allows.

use std::time::Duration;

use sockhost::FailureKind;
use sockhost::capacity::{MAPS_FOR_THE_PROCESS, MAPS_PER_INSTANCE, MAPS_PER_SLOT};

use crate::process::{run_to_exit, spawn, work_dir};
use crate::support::*;

fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap().trim().parse().unwrap()
}

fn mappings(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().count() as u64
}

/// 200,000 sockets and 10,000 live instances start on this machine's defaults (with the
/// old pool, one 4 GiB reservation per connection, 200,000 needed 800 TiB); 50,000 live
/// instances start where `vm.max_map_count` allows their mappings, and are otherwise
/// refused naming the sysctl, the value it needs and the setting to lower.
#[tokio::test]
async fn two_hundred_thousand_connections_start_and_live_instances_are_held_to_the_maps_the_machine_allows() {
    let echo = bundled_addon("echo");
    let config = "[limits]\nmax_connections = 200000\nmax_live_instances = 10000\n";
    let work = work_dir(&[("addons/echo.wasm", &echo), ("sockhost.toml", config.as_bytes())]);
    let process = spawn(work.path(), &["--port", "0", "--listen", "127.0.0.1"], &[]);
    let (status, _) = http_get(([127, 0, 0, 1], process.port).into(), "/healthz").await;
    assert_eq!(status, 200);
    let mut client = Client::connect(&format!("ws://127.0.0.1:{}/ws/echo", process.port)).await;
    client.send_text("at scale").await;
    assert_eq!(client.recv_text().await, "at scale");
    let log = process.log_text();
    assert!(log.contains("capacity: memory mappings: 10000 slots"), "{log}");
    drop(process);

    let config = "[limits]\nmax_connections = 200000\nmax_live_instances = 50000\n";
    let work = work_dir(&[("addons/echo.wasm", &echo), ("sockhost.toml", config.as_bytes())]);
    let needed = 50_000 * (MAPS_PER_SLOT + MAPS_PER_INSTANCE) + MAPS_FOR_THE_PROCESS;
    if max_map_count() >= needed {
        let process = spawn(work.path(), &["--port", "0", "--listen", "127.0.0.1"], &[]);
        let (status, _) = http_get(([127, 0, 0, 1], process.port).into(), "/healthz").await;
        assert_eq!(status, 200);
    } else {
        let (code, text) = run_to_exit(work.path(), &["--port", "0", "--listen", "127.0.0.1"], &[]);
        assert_ne!(code, 0, "{text}");
        let fit = (max_map_count() - MAPS_FOR_THE_PROCESS) / (MAPS_PER_SLOT + MAPS_PER_INSTANCE);
        for needle in [
            "does not fit this machine".to_owned(),
            format!("sysctl -w vm.max_map_count={needed}"),
            format!("lower limits.max_live_instances to {fit} or less"),
        ] {
            assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
        }
    }
}

/// A configuration whose pool cannot fit the address space is refused at start-up with
/// the settings to lower and the values that would fit, before any `mmap` fails.
#[test]
fn a_pool_larger_than_the_address_space_is_refused_at_start_up_naming_the_settings() {
    let config =
        "[limits]\nmax_connections = 1000000\nmax_live_instances = 1000000\nmemory_reservation = \"4GiB\"\n";
    let work = work_dir(&[("sockhost.toml", config.as_bytes())]);
    let (code, text) = run_to_exit(work.path(), &["--port", "0", "--listen", "127.0.0.1"], &[]);
    assert_ne!(code, 0, "{text}");
    for needle in [
        "does not fit this machine",
        "of address space and 64.0TiB is allowed: lower limits.max_live_instances to 16373 or less, or \
         limits.memory_reservation to",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(!text.contains("mmap failed"), "refused before reserving: {text}");
}

/// With every slot of a 3-instance pool taken, the 4th addon connection gets 503 named
/// `instance_capacity` in the log and `/metrics`, never `addon_trap`; `/healthz` and the
/// built-in `/ws` (a socket without an instance) still answer, and a closed connection
/// gives its slot back.
#[tokio::test]
async fn a_full_pool_answers_503_named_instance_capacity_while_healthz_and_ws_work() {
    let testkit = test_addon("testkit");
    // testkit can hibernate; with hibernation off, nothing can make room.
    let files: &[(&str, &[u8])] = &[("testkit.wasm", &testkit), ("testkit.toml", b"hibernate_after_ms = 0")];
    let server = TestServer::start_with(files, |config| {
        config.limits.max_live_instances = 3;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = server.connect("/ws/testkit").await;
        assert_eq!(client.recv_text().await, "open");
        held.push(client);
    }
    let (status, text) = upgrade_status(server.addr, "/ws/testkit", None).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("limit of 3 live addon instances"), "{text}");
    wait_for_log(&["every instance slot is taken", "kind=\"instance_capacity\"", "addon=\"testkit\""]).await;
    // Every new client is refused while the pool is full: one line per interval (then a
    // count of the rest), every refusal counted.
    for _ in 0..4 {
        assert_eq!(upgrade_status(server.addr, "/ws/testkit", None).await.0, 503);
    }
    assert_eq!(log_lines(&["every instance slot is taken", "addon=\"testkit\""]).len(), 1);
    assert_eq!(server.failures.get(FailureKind::InstanceCapacity), 5);
    assert_eq!(server.failures.get(FailureKind::AddonTrap), 0);
    assert_eq!(server.metric("sockhost_failures_total{kind=\"instance_capacity\"}").await, Some(5.0));
    let series = "sockhost_addon_failures_total{addon=\"testkit\",kind=\"instance_capacity\"}";
    assert_eq!(server.metric(series).await, Some(5.0));
    assert_eq!(server.metric("sockhost_instance_slots").await, Some(3.0));
    assert_eq!(server.metric("sockhost_addon_live_instances{addon=\"testkit\"}").await, Some(3.0));

    let (status, _) = http_get(server.addr, "/healthz").await;
    assert_eq!(status, 200);
    let mut builtin = server.connect("/ws").await;
    assert!(builtin.recv_text().await.contains("test endpoint"));
    builtin.send_text("still here").await;
    assert_eq!(builtin.recv_text().await, "still here");

    held.pop().unwrap().close(1000, "bye").await;
    eventually("a slot is free again", || async {
        let (status, _) = upgrade_status(server.addr, "/ws/testkit", None).await;
        status == 101
    })
    .await;
}

/// What the start-up check assumes about mappings, measured on the real process: the
/// pool maps at most `MAPS_PER_SLOT` per slot, and a live instance adds at most
/// `MAPS_PER_INSTANCE`.
#[tokio::test]
async fn pool_mappings_per_slot_and_instance_are_what_the_check_assumes() {
    let echo = bundled_addon("echo");
    let start = |slots: u32| {
        let config = format!("[limits]\nmax_live_instances = {slots}\n");
        let work = work_dir(&[("addons/echo.wasm", &echo), ("sockhost.toml", config.as_bytes())]);
        let process = spawn(work.path(), &["--port", "0", "--listen", "127.0.0.1"], &[]);
        (work, process)
    };
    let (_small_dir, small) = start(1000);
    let (_large_dir, large) = start(3000);
    // Let both finish start-up work (threads, compiled code) before counting.
    std::thread::sleep(Duration::from_millis(300));
    let per_slot = (mappings(large.child.id()) as f64 - mappings(small.child.id()) as f64) / 2000.0;
    // Within a few mappings of other work (a thread started in one process, not the other).
    assert!(per_slot <= MAPS_PER_SLOT as f64 + 0.01, "{per_slot} mappings per slot");

    let url = format!("ws://127.0.0.1:{}/ws/echo", large.port);
    let mut warm = Client::connect(&url).await;
    warm.send_text("warm").await;
    assert_eq!(warm.recv_text().await, "warm");
    let before = mappings(large.child.id());
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut client = Client::connect(&url).await;
        client.send_text(&i.to_string()).await;
        assert_eq!(client.recv_text().await, i.to_string());
        clients.push(client);
    }
    let per_instance = (mappings(large.child.id()) as f64 - before as f64) / 100.0;
    eprintln!("measured: {per_slot} mappings per slot, {per_instance} per live instance");
    assert!(per_instance <= MAPS_PER_INSTANCE as f64 + 0.05, "{per_instance} mappings per live instance");
}

/// `sockhost check` prints the pool's arithmetic for the server's settings, and refuses
/// an addon whose `memory_limit` is over `limits.memory_reservation`.
#[test]
fn check_prints_the_capacity_arithmetic_and_refuses_an_addon_over_the_reservation() {
    let echo = bundled_addon("echo");
    let config =
        "[limits]\nmax_connections = 200000\nmax_live_instances = 5000\nmemory_reservation = \"64MiB\"\n";
    let work = work_dir(&[
        ("addons/echo.wasm", &echo),
        ("addons/big.wasm", &echo),
        ("addons/big.toml", b"memory_limit = \"128MiB\""),
        ("sockhost.toml", config.as_bytes()),
    ]);
    let (code, text) = run_to_exit(work.path(), &["check", "addons"], &[]);
    assert_ne!(code, 0, "{text}");
    for needle in [
        "ok    addons/echo.wasm",
        "FAIL  addons/big.wasm: its memory_limit of 128MiB is more than this server reserves per instance, 64MiB \
         (limits.memory_reservation",
        "capacity (the server's limits on this machine):",
        "pool: 5000 slots (limits.max_live_instances) for 200000 connections (limits.max_connections)",
        "address space: 5000 slots ×",
        "memory mappings: 5000 slots × (2 per slot + 4 per live instance) + 2000 for the process = 32000; \
         vm.max_map_count",
        "open files: 200000 connections (limits.max_connections) + 256 for the process = 200256; RLIMIT_NOFILE",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}
