//! A bounded stress run against the real `sockhost` process: healthy echo traffic on many
//! connections, first alone, then while every fault kind is injected over and over on
//! other connections. It asserts what must hold (the process never crashes, no healthy
//! message is lost or reordered) and reports latency, which is a figure for people to
//! read, never a pass/fail threshold. The report goes to stdout and to
//! target/stress-report.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::process::{Process, spawn};
use crate::support::*;

const HEALTHY_CONNECTIONS: usize = 24;
const HEALTHY_INTERVAL: Duration = Duration::from_millis(20);
const QUIET_PHASE: Duration = Duration::from_secs(4);
const FAULT_PHASE: Duration = Duration::from_secs(10);
const FAULT_INJECTORS: usize = 6;

/// Healthy traffic: each connection sends numbered messages and checks every echo comes
/// back, in order. Returns the round-trip times and the count of lost or reordered ones.
async fn healthy_traffic(url: String, id: usize, stop: Arc<AtomicBool>) -> (Vec<Duration>, u64) {
    let mut client = Client::connect(&url).await;
    let mut latencies = Vec::new();
    let mut broken = 0;
    let mut seq = 0u64;
    let mut ticker = tokio::time::interval(HEALTHY_INTERVAL);
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        let text = format!("healthy-{id}-{seq}");
        let sent = Instant::now();
        client.send_text(&text).await;
        let reply = client.recv_text().await;
        latencies.push(sent.elapsed());
        if reply != text {
            broken += 1;
        }
        seq += 1;
    }
    (latencies, broken)
}

fn percentile(latencies: &mut [Duration], p: f64) -> Duration {
    latencies.sort();
    latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)]
}

/// Runs healthy traffic for `phase`, with `faults` injectors alongside when non-zero.
async fn phase(
    process: &Process,
    phase: Duration,
    faults: usize,
    injected: Arc<AtomicU64>,
) -> (Vec<Duration>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let base = format!("ws://127.0.0.1:{}", process.port);
    let healthy: Vec<_> = (0..HEALTHY_CONNECTIONS)
        .map(|id| tokio::spawn(healthy_traffic(format!("{base}/ws/echo"), id, stop.clone())))
        .collect();
    let injectors: Vec<_> = (0..faults)
        .map(|n| tokio::spawn(inject_faults(base.clone(), n as u64, stop.clone(), injected.clone())))
        .collect();
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    for injector in injectors {
        injector.await.unwrap();
    }
    let mut latencies = Vec::new();
    let mut broken = 0;
    for task in healthy {
        let (l, b) = task.await.unwrap();
        latencies.extend(l);
        broken += b;
    }
    (latencies, broken)
}

/// Injects one fault after another, each on a fresh connection, and checks the server
/// answers each the documented way.
async fn inject_faults(base: String, seed: u64, stop: Arc<AtomicBool>, injected: Arc<AtomicU64>) {
    let mut n = seed;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        match n % 9 {
            kind @ 0..=4 => {
                let (command, code) = [
                    ("loop", "addon_timeout"),
                    ("memory", "addon_oom"),
                    ("stack", "addon_trap"),
                    ("unreachable", "addon_trap"),
                    ("div", "addon_trap"),
                ][kind as usize];
                let mut client = Client::connect(&format!("{base}/ws/hostile")).await;
                client.send_text(command).await;
                assert_eq!(client.recv_json().await["code"], code, "{command}");
                assert_eq!(client.recv_close().await.0, 1011);
            }
            5 => {
                let mut client = Client::connect(&format!("{base}/ws/echo")).await;
                client.send_text(&"x".repeat(128 * 1024)).await;
                assert_eq!(client.recv_close().await.0, 1009);
            }
            6 => {
                let mut client = Client::connect(&format!("{base}/ws/echo")).await;
                let frame = Frame::message(vec![0xff, 0xfe], OpCode::Data(Data::Text), true);
                client.ws.send(Message::Frame(frame)).await.unwrap();
                assert_eq!(client.recv_close().await.0, 1007);
            }
            7 => {
                // Rate: the limited addon allows a burst of 5.
                let mut client = Client::connect(&format!("{base}/ws/limited")).await;
                for _ in 0..30 {
                    let _ = client.ws.feed(Message::text("x")).await;
                }
                let _ = client.ws.flush().await;
                loop {
                    match client.recv().await {
                        Message::Close(frame) => {
                            assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
                            break;
                        }
                        _ => continue,
                    }
                }
            }
            _ => {
                // Garbage below the framing, then a vanished peer; and a garbage request.
                let mut client = Client::connect(&format!("{base}/ws/echo")).await;
                if let tokio_tungstenite::MaybeTlsStream::Plain(stream) = client.ws.get_mut() {
                    let _ = stream.write_all(&[0x82, 0xff, 0x13, 0x37, 0, 1, 2, 3]).await;
                }
                drop(client);
                let addr = base.trim_start_matches("ws://").to_owned();
                let _ = http_request(addr.parse().unwrap(), "\x16\x03\x01 not http\r\n\r\n").await;
            }
        }
        injected.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_faults_alongside_healthy_traffic() {
    let work = tempfile::tempdir().unwrap();
    let addons = work.path().join("addons");
    std::fs::create_dir(&addons).unwrap();
    std::fs::write(addons.join("echo.wasm"), bundled_addon("echo")).unwrap();
    std::fs::write(addons.join("echo.toml"), "messages_per_second = 0\n").unwrap();
    std::fs::write(addons.join("limited.wasm"), bundled_addon("echo")).unwrap();
    std::fs::write(addons.join("limited.toml"), "messages_per_second = 1\nmessage_burst = 5\n").unwrap();
    std::fs::write(addons.join("hostile.wasm"), hostile_component()).unwrap();
    std::fs::write(addons.join("hostile.toml"), "cpu_limit_ms = 100\nmemory_limit = \"2MiB\"\n").unwrap();
    let mut process = spawn(
        work.path(),
        &["--listen", "127.0.0.1"],
        &[("SOCKHOST_PORT", "0"), ("RUST_LOG", "warn,sockhost::server=info")],
    );

    let injected = Arc::new(AtomicU64::new(0));
    let (mut quiet, quiet_broken) = phase(&process, QUIET_PHASE, 0, injected.clone()).await;
    let (mut loud, loud_broken) = phase(&process, FAULT_PHASE, FAULT_INJECTORS, injected.clone()).await;

    let crashed = process.child.try_wait().unwrap().is_some();
    let log = process.log_text();
    let panics = log.matches("panicked").count();
    let faults = injected.load(Ordering::Relaxed);
    let report = format!(
        "# Stress run\n\n\
         | figure | value |\n|---|---|\n\
         | faults injected (9 kinds, {FAULT_INJECTORS} injectors, {} s) | {faults} |\n\
         | runtime crashes (process exits + panics) | {} |\n\
         | healthy messages lost or reordered | {} of {} |\n\
         | healthy p50 / p99, quiet | {:.2} / {:.2} ms |\n\
         | healthy p50 / p99, during faults | {:.2} / {:.2} ms |\n\n\
         {HEALTHY_CONNECTIONS} healthy echo connections, one message each per {} ms. \
         Latency is wall-clock round trip on a shared 2-core machine: read it as a comparison \
         between the two phases, not as an absolute figure.\n",
        FAULT_PHASE.as_secs(),
        usize::from(crashed) + panics,
        quiet_broken + loud_broken,
        quiet.len() + loud.len(),
        percentile(&mut quiet, 0.50).as_secs_f64() * 1e3,
        percentile(&mut quiet, 0.99).as_secs_f64() * 1e3,
        percentile(&mut loud, 0.50).as_secs_f64() * 1e3,
        percentile(&mut loud, 0.99).as_secs_f64() * 1e3,
        HEALTHY_INTERVAL.as_millis(),
    );
    println!("{report}");
    let _ = std::fs::write(repo_root().join("target/stress-report.md"), &report);

    assert!(!crashed, "the server process died:\n{log}");
    assert_eq!(panics, 0, "the server panicked:\n{log}");
    assert_eq!(quiet_broken + loud_broken, 0, "healthy messages were lost or reordered");
    assert!(faults >= 50, "too few faults injected to mean anything: {faults}");
}
