//! Shared pieces of the benchmark binaries (`loadgen`, `native-echo`, `report`): the
//! WebSocket settings both ends use, the payload, the streamed-reply format, and sampling
//! a server process from `/proc`.
//!
//! The suite is driven by `bench/run`, which writes `BENCHMARKS.md`. Read
//! `../shared/benchmarking.md` (outside the repository, on the benchmark machines) for why
//! figures are quoted as server CPU per message and ratios rather than bare rates.

use std::fs;

use anyhow::{Context, bail};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Read buffer of every WebSocket in the suite, client and native server alike: the same
/// 1 KiB as sockhost's default `limits.read_buffer_bytes`, so the native upper bound gets
/// every saving sockhost's setting brings. tungstenite zero-fills the whole buffer before
/// each read; its 128 KiB default would dominate the figures.
pub const READ_BUFFER_BYTES: usize = 1024;

/// The WebSocket settings of the load generator and of `native-echo`.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES)
}

/// A text payload of `len` ASCII bytes. It is not JSON, so sockhost's echo addon echoes it
/// unchanged after one failed parse (as it would any plain-text message).
pub fn payload(len: usize) -> String {
    const PATTERN: &[u8] = b"bench-payload-0123456789abcdefgh";
    (0..len).map(|i| PATTERN[i % PATTERN.len()] as char).collect()
}

/// Frame `index` of a streamed reply to `message`, as every streaming server in the suite
/// sends it (the streamer addon, `native-echo --stream`, the peers).
pub fn chunk(index: usize, message: &str) -> String {
    format!("{index}:{message}")
}

/// One sample of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// utime + stime of every thread, in microseconds (resolution: one clock tick).
    pub cpu_us: u64,
    /// VmRSS in KiB.
    pub rss_kb: u64,
    /// RssAnon in KiB: private memory (heap, stacks, wasm linear memories).
    pub rss_anon_kb: u64,
    /// RssFile + RssShmem in KiB: mapped files and shared memory. A page mapped at several
    /// addresses (wasmtime's copy-on-write memory images) counts once per mapping.
    pub rss_shared_kb: u64,
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Reads the CPU time and resident memory of process `pid`.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat (is the server running?)"))?;
    let cpu_ticks = parse_stat_cpu_ticks(&stat)?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = |key: &str| status_kb(&status, key).unwrap_or(0);
    Ok(ProcSample {
        cpu_us: cpu_ticks * 1_000_000 / clock_ticks_per_second(),
        rss_kb: kb("VmRSS:"),
        rss_anon_kb: kb("RssAnon:"),
        rss_shared_kb: kb("RssFile:") + kb("RssShmem:"),
    })
}

/// Proportional set size of `pid` in KiB (shared pages divided among their mappers), from
/// `/proc/PID/smaps_rollup`; `None` when the kernel does not provide it.
pub fn pss_kb(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    status_kb(&rollup, "Pss:")
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
fn parse_stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may contain spaces: count fields
    // after its closing parenthesis, where field 3 (the state) is the first.
    let Some((_, rest)) = stat.rsplit_once(')') else { bail!("unexpected /proc/PID/stat: {stat}") };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("field {n} missing in /proc/PID/stat"))
    };
    Ok(field(14)? + field(15)?)
}

/// The value of a `Key:   123 kB` line.
fn status_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 1000 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat).unwrap(), 281);
    }

    #[test]
    fn status_lines() {
        let status = "Name:\tx\nVmRSS:\t   1234 kB\nRssAnon:\t  1000 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(1234));
        assert_eq!(status_kb(status, "RssAnon:"), Some(1000));
        assert_eq!(status_kb(status, "RssFile:"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss_kb > 0);
    }

    #[test]
    fn payload_and_chunks() {
        assert_eq!(payload(32), "bench-payload-0123456789abcdefgh");
        assert_eq!(payload(40).len(), 40);
        assert_eq!(chunk(3, "hi"), "3:hi");
    }
}
