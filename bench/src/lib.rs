//! Shared pieces of the benchmark binaries (`loadgen`, `native-echo`, `report`): the
//! WebSocket settings both ends use, the payload, the streamed-reply format, and sampling
//! a server process from `/proc`.
//!
//! The suite is driven by `bench/run`, which writes `BENCHMARKS.md`. Read
//! `../shared/benchmarking.md` (outside the repository, on the benchmark machines) for why
//! figures are quoted as server CPU per message and ratios rather than bare rates.

use std::fs;
use std::net::Ipv4Addr;

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

/// Read buffer of each soak client connection. A soak holds hundreds of thousands of client
/// sockets beside the server on one machine, so the client's per-connection memory is what
/// fits beside it: an echo of 32 bytes needs far less than the 1 KiB of the other scenarios.
pub const SOAK_READ_BUFFER_BYTES: usize = 256;

/// The WebSocket settings of `loadgen soak`: a 256-byte read buffer, and no write buffer
/// (each frame is written at once, so the out buffer never grows past one small frame).
pub fn soak_ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(SOAK_READ_BUFFER_BYTES).write_buffer_size(0)
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

/// A `/proc/meminfo` field in KiB (`MemAvailable:`, `Slab:`, ...).
pub fn meminfo_kb(key: &str) -> Option<u64> {
    status_kb(&fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// The TCP line of `/proc/net/sockstat`. `mem` is in pages and counts the buffers of every
/// TCP socket in the kernel (global, not per network namespace); `inuse` counts this
/// namespace's sockets. On loopback a connection has two sockets, the client's and the
/// server's, so both ends are in these figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpSockstat {
    pub inuse: u64,
    pub orphan: u64,
    pub tw: u64,
    pub alloc: u64,
    pub mem_pages: u64,
}

impl TcpSockstat {
    pub fn read() -> Option<TcpSockstat> {
        parse_sockstat(&fs::read_to_string("/proc/net/sockstat").ok()?)
    }
}

fn parse_sockstat(text: &str) -> Option<TcpSockstat> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let field = |name: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1)?.parse().ok()
    };
    Some(TcpSockstat {
        inuse: field("inuse")?,
        orphan: field("orphan").unwrap_or(0),
        tw: field("tw").unwrap_or(0),
        alloc: field("alloc").unwrap_or(0),
        mem_pages: field("mem")?,
    })
}

/// The page size, for sockstat's `mem`.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// The soft "Max open files" of process `pid` (`None` when unlimited or unreadable).
pub fn open_files_limit(pid: u32) -> Option<u64> {
    parse_open_files_limit(&fs::read_to_string(format!("/proc/{pid}/limits")).ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// Open file descriptors of process `pid` (one directory listing: cheap once, not per
/// connection at 500,000).
pub fn fd_count(pid: u32) -> Option<u64> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

/// Memory mappings of process `pid` (lines of `/proc/PID/maps`), against `vm.max_map_count`.
pub fn map_count(pid: u32) -> Option<u64> {
    Some(fs::read_to_string(format!("/proc/{pid}/maps")).ok()?.lines().count() as u64)
}

/// Raises this process's soft open-file limit to its hard limit; returns (soft, hard).
pub fn raise_open_files_limit() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        (lim.rlim_cur, lim.rlim_max)
    }
}

/// The loopback source addresses of a soak client: `list` when given, else `n` addresses
/// from 127.0.0.2 up (127.0.0.1 is left to everything else on the machine); none means the
/// kernel chooses (127.0.0.1, one range of ephemeral ports).
pub fn source_addrs(n: u32, list: &[Ipv4Addr]) -> anyhow::Result<Vec<Ipv4Addr>> {
    if !list.is_empty() {
        if let Some(bad) = list.iter().find(|a| !a.is_loopback()) {
            bail!("source address {bad} is not in 127.0.0.0/8");
        }
        return Ok(list.to_vec());
    }
    if n > (1 << 24) - 2 {
        bail!("at most {} loopback source addresses", (1 << 24) - 2);
    }
    Ok((0..n).map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i)).collect())
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
    fn sockstat_tcp_line() {
        let text = "sockets: used 20\nTCP: inuse 5 orphan 1 tw 2 alloc 7 mem 244\nUDP: inuse 0 mem 0\n";
        let tcp = parse_sockstat(text).unwrap();
        assert_eq!(tcp, TcpSockstat { inuse: 5, orphan: 1, tw: 2, alloc: 7, mem_pages: 244 });
        assert_eq!(parse_sockstat("UDP: inuse 0 mem 0\n"), None);
    }

    #[test]
    fn open_files_line_of_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
        let unlimited = "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files_limit(unlimited), None);
    }

    #[test]
    fn loopback_sources() {
        let three = source_addrs(3, &[]).unwrap();
        assert_eq!(
            three,
            [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3), Ipv4Addr::new(127, 0, 0, 4)]
        );
        assert_eq!(source_addrs(300, &[]).unwrap()[299], Ipv4Addr::new(127, 0, 1, 45));
        assert!(source_addrs(0, &[]).unwrap().is_empty());
        assert!(source_addrs(0, &[Ipv4Addr::new(10, 0, 0, 1)]).is_err());
    }

    #[test]
    fn payload_and_chunks() {
        assert_eq!(payload(32), "bench-payload-0123456789abcdefgh");
        assert_eq!(payload(40).len(), 40);
        assert_eq!(chunk(3, "hi"), "3:hi");
    }
}
