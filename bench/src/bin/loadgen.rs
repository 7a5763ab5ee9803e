//! `loadgen`: the benchmark suite's load generator. It drives one WebSocket server and
//! prints one JSON line of figures.
//!
//! What it measures, and why this way (see `bench/run` and `BENCHMARKS.md`):
//! - **Server CPU per message**: utime + stime of the server process (`--pid`), read from
//!   `/proc/PID/stat` before and after the measured window, divided by the messages
//!   completed in it. On the benchmark machines the two vCPUs share about one physical
//!   core, so absolute rates drift from run to run; the CPU a server spends per message,
//!   and its ratio to a peer measured in the same run, does not. The server and this
//!   client are pinned to the same CPU by the caller (`taskset -c 0`).
//! - **Latency** (p50 / p99 / p99.9, ms) from a histogram (hdrhistogram, 3 significant
//!   digits): round trip in `closed` mode; time to the first and to the last frame of a
//!   streamed reply in `paced` mode, where the offered load is fixed and well under
//!   saturation, so the figure is the server's added delay rather than queueing.
//! - **Memory per idle connection**: the server's VmRSS (and its private part RssAnon,
//!   and PSS) before and after opening N connections, divided by N.
//! - **Connections per second**: open + close cycles, and the server CPU per connection,
//!   whose inverse is what one core could accept.
//!
//! The client is a single-threaded tokio runtime (it shares one CPU with the server, so
//! more threads would only add switches) with a 1 KiB read buffer: tungstenite's 128 KiB
//! default is zero-filled on every read and would make the client the bottleneck.
//!
//! Modes:
//! - `closed`: N connections, one message in flight on each, for D seconds after a warm-up;
//!   a reply is `--frames R` frames (or, with `--until-complete`, frames up to one with
//!   `"complete":true`, the chat envelope's last chunk).
//! - `paced`: a fixed total rate of messages per second spread evenly over N connections,
//!   each sent on schedule whether or not earlier replies arrived (open loop); records
//!   time to first and last frame of each R-frame reply, measured from the moment the
//!   message was handed to the socket.
//! - `idle`: opens N connections (each sends one message and reads the reply first, so a
//!   sockhost addon instance has run, unless `--no-touch`), holds them, and reports the
//!   server's RSS growth per connection.
//! - `storm`: opens and closes connections (HTTP upgrade, WebSocket close handshake) as
//!   fast as `--concurrency` loops can for D seconds; or, with `--count N`, opens N
//!   connections, reports the rate, then closes them.
//! - `fanout`: channels. N subscriber connections (`--url`, e.g. `…/ws/fanout?sub=bench`;
//!   repeated, the subscribers are spread over the URLs round robin, e.g. three nodes) and
//!   one publisher (`--pub-url`, by default the first URL with `sub=` turned into `pub=`).
//!   Once every subscriber has received a probe, it publishes messages one at a time, each
//!   carrying its sequence number and send time, and waits (at most `--timeout`) until
//!   every subscriber has it: delivery latency is from handing the message to the
//!   publisher's socket to the last subscriber's receipt (and to each receipt); what has
//!   not arrived by the time-out is lost. CPU is per delivered message, summed over every
//!   `--pid`.
//!
//! - `soak` (issue 17): opens N connections (from several loopback source addresses, so
//!   the ephemeral ports of one address are not the limit) and holds them, each read by a
//!   small task that answers the server's pings; reports the time to open them, the
//!   server's RSS, the kernel's socket memory (`/proc/net/sockstat`) and the client's own
//!   memory per connection; then the echo round trip on 100 of them while the rest are
//!   held; `/healthz` is polled throughout. It stops opening early, and says why, at the
//!   first limit it meets: MemAvailable below a margin (so the machine never swaps or
//!   OOM-kills other work), the client's or the server's open-file limit, EMFILE / ENFILE /
//!   EADDRNOTAVAIL, or repeated failures (HTTP 503, time-outs).
//!
//! The built-in `/ws` endpoint of sockhost greets every connection with one frame before
//! echoing: it is skipped (`--skip`, default 1 on a `/ws` path, else 0).
//!
//! ```text
//! loadgen --url ws://127.0.0.1:9001/ws/echo --pid 1234 --tag server=native closed --conns 100 --duration 5
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::stream::{self, FuturesUnordered, StreamExt};
use futures_util::{SinkExt, Stream};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use sockhost_bench::{
    ProcSample, TcpSockstat, fd_count, map_count, meminfo_kb, open_files_limit, page_size, payload, pss_kb,
    raise_open_files_limit, sample, soak_ws_config, source_addrs, ws_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{MissedTickBehavior, interval_at, sleep};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Parser)]
#[command(about = "WebSocket load generator: prints one JSON line of figures")]
struct Args {
    /// Server URL, e.g. ws://127.0.0.1:8080/ws/echo. Only `fanout` takes it more than once:
    /// its subscribers are spread over the URLs round robin (several nodes).
    #[arg(long, required = true)]
    url: Vec<String>,
    /// PID of the server process, for its CPU time and memory (no server figures without
    /// it). Repeated, the figures are sums over the processes (several nodes).
    #[arg(long)]
    pid: Vec<u32>,
    /// Frames the server sends on its own after the upgrade, skipped before measuring
    /// [default: 1 for a /ws path (sockhost's greeting), else 0].
    #[arg(long)]
    skip: Option<usize>,
    /// Size in bytes of the text message sent.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Send this text instead of the generated payload (e.g. a chat envelope).
    #[arg(long)]
    message: Option<String>,
    /// KEY=VALUE copied into the JSON output (repeatable), e.g. scenario=echo.
    #[arg(long = "tag", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// N connections, one message in flight on each.
    Closed {
        #[arg(long, default_value_t = 100)]
        conns: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        /// Seconds of load before measuring.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[command(flatten)]
        reply: ReplyArgs,
    },
    /// A fixed total message rate over N connections; time to first and last frame.
    Paced {
        #[arg(long, default_value_t = 100)]
        conns: usize,
        /// Messages per second, in total.
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[command(flatten)]
        reply: ReplyArgs,
    },
    /// Open N connections, hold them, report the server's RSS per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds to wait after the last one opened before sampling memory.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Seconds to keep them open after sampling.
        #[arg(long, default_value_t = 0.0)]
        hold: f64,
        /// Do not exchange one message on each connection after opening it.
        #[arg(long)]
        no_touch: bool,
        #[command(flatten)]
        reply: ReplyArgs,
    },
    /// Issue 17: hold N connections (from several loopback source addresses), report the
    /// memory they take and the echo round trip on a few while the rest are held; poll
    /// /healthz throughout; stop opening at the first limit met, and name it.
    Soak {
        /// Connections to open (fewer if a limit is met first; the output says which).
        #[arg(long, default_value_t = 20_000)]
        conns: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Loopback source addresses, 127.0.0.2 upwards, used round robin (about 28,000
        /// ephemeral ports each); 0: the kernel chooses (127.0.0.1).
        #[arg(long, default_value_t = 0)]
        sources: u32,
        /// Or these source addresses (comma-separated, in 127.0.0.0/8).
        #[arg(long, value_delimiter = ',')]
        source_addrs: Vec<Ipv4Addr>,
        /// Do not exchange one message on each connection after opening it (no instance is
        /// made until the first message, for an addon).
        #[arg(long)]
        no_touch: bool,
        /// Seconds to wait after the last one opened before sampling memory (past the
        /// addon's hibernate_after_ms, to measure hibernated connections).
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Held connections that then echo, while the others stay idle.
        #[arg(long, default_value_t = 100)]
        active: usize,
        /// Their messages per second, in total (open loop, like `paced`).
        #[arg(long, default_value_t = 1000.0)]
        active_rate: f64,
        /// Seconds of echo measured.
        #[arg(long, default_value_t = 10.0)]
        active_secs: f64,
        /// Seconds of echo before measuring (the first message may wake a hibernated
        /// connection).
        #[arg(long, default_value_t = 2.0)]
        active_warmup: f64,
        /// Health check polled throughout [default: http://<host>:<port>/healthz of --url].
        #[arg(long)]
        healthz_url: Option<String>,
        /// Milliseconds between two health checks.
        #[arg(long, default_value_t = 500.0)]
        healthz_every_ms: f64,
        /// sockhost's /metrics, read once the connections are held (live instances and
        /// hibernated connections) [default: http://<host>:<port>/metrics of --url].
        #[arg(long)]
        metrics_url: Option<String>,
        /// Stop opening when the machine's MemAvailable falls below this (MiB); the hold
        /// ends early if it falls below half of it.
        #[arg(long, default_value_t = 1536)]
        min_available_mib: u64,
        /// Seconds one connection (TCP, upgrade, first message) may take.
        #[arg(long, default_value_t = 15.0)]
        connect_timeout: f64,
        /// Stop opening after this many failed connections (HTTP 503, time-outs, resets).
        #[arg(long, default_value_t = 100)]
        max_failures: usize,
        #[command(flatten)]
        reply: ReplyArgs,
    },
    /// Issue 16, aikefu's resume: each loop sends the chat --message, reads the reply to
    /// `"complete":true`, then opens a new connection and resumes that reply after half of
    /// its chunks. Measures the time from starting the reconnect (TCP, upgrade, greeting,
    /// the resume request) to the first resumed chunk.
    Resume {
        /// Loops running at once, each with its own asking connection.
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// Connections per second: open + close cycles.
    Storm {
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Open/close loops running at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Instead of cycling for --duration: open this many, report the rate, close them.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Channels: one publisher, N subscribers; time from each publish to every receipt.
    Fanout {
        /// Subscriber connections, spread round robin over the --url servers.
        #[arg(long, default_value_t = 1000)]
        subs: usize,
        /// The publisher's URL [default: the first --url with `sub=` turned into `pub=`].
        #[arg(long)]
        pub_url: Option<String>,
        /// Messages measured, published one at a time.
        #[arg(long, default_value_t = 100)]
        messages: u64,
        /// Messages published the same way before measuring (not recorded).
        #[arg(long, default_value_t = 5)]
        warmup: u64,
        /// Seconds to wait for every subscriber to receive a message; deliveries still
        /// missing then count as lost.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        /// Milliseconds of pause after a message reached everyone before the next publish.
        #[arg(long, default_value_t = 10.0)]
        gap_ms: f64,
        /// Seconds to wait, after opening, until every subscriber has received a probe.
        #[arg(long, default_value_t = 30.0)]
        ready_timeout: f64,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

/// How a reply ends.
#[derive(Debug, Clone, Copy, clap::Args)]
struct ReplyArgs {
    /// Frames in each reply (1: echo; 10: the 10-chunk streamed reply).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    frames: u32,
    /// The reply ends with a frame containing "complete":true (chat envelope), not after
    /// --frames frames.
    #[arg(long)]
    until_complete: bool,
}

impl ReplyArgs {
    fn is_last(&self, index: usize, frame: &Message) -> bool {
        if self.until_complete {
            match frame {
                Message::Text(text) => text.contains("\"complete\":true"),
                _ => false,
            }
        } else {
            index + 1 >= self.frames as usize
        }
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Where to connect.
struct Target {
    url: String,
    host: String,
    port: u16,
    skip: usize,
}

impl Target {
    fn new(url: &str, skip: Option<usize>) -> anyhow::Result<Target> {
        let request = url.into_client_request().with_context(|| format!("bad URL {url}"))?;
        let uri = request.uri();
        if uri.scheme_str() != Some("ws") {
            bail!("only ws:// URLs are supported: {url}");
        }
        let host = uri.host().context("URL without a host")?.to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let skip = skip.unwrap_or(if uri.path() == "/ws" { 1 } else { 0 });
        Ok(Target { url: url.to_owned(), host, port, skip })
    }

    /// Connects, upgrades and skips the greeting frames.
    async fn connect(&self) -> anyhow::Result<Ws> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.context("TCP connect")?;
        self.upgrade(tcp, ws_config()).await
    }

    /// Connects to `server` from `source` (any port), upgrades with `config` and skips the
    /// greeting frames. The port is picked at connect time (IP_BIND_ADDRESS_NO_PORT), so
    /// each source address has the whole ephemeral range for this destination.
    async fn connect_from(
        &self,
        server: SocketAddr,
        source: Option<Ipv4Addr>,
        config: WebSocketConfig,
    ) -> anyhow::Result<Ws> {
        let socket = TcpSocket::new_v4().context("socket")?;
        if let Some(source) = source {
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, an int option of the right size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&on as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("IP_BIND_ADDRESS_NO_PORT");
            }
            socket.bind(SocketAddr::from((source, 0))).with_context(|| format!("bind to {source}"))?;
        }
        let tcp = socket.connect(server).await.context("TCP connect")?;
        self.upgrade(tcp, config).await
    }

    async fn upgrade(&self, tcp: TcpStream, config: WebSocketConfig) -> anyhow::Result<Ws> {
        tcp.set_nodelay(true)?;
        let request = self.url.as_str().into_client_request()?;
        let (mut ws, _) =
            client_async_with_config(request, tcp, Some(config)).await.context("WebSocket upgrade")?;
        for _ in 0..self.skip {
            next_data(&mut ws).await.context("reading the greeting")?;
        }
        Ok(ws)
    }
}

/// The next text or binary frame; control frames are skipped, a close is an error.
async fn next_data<S>(ws: &mut S) -> anyhow::Result<Message>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => return Ok(message),
            Some(Ok(Message::Close(frame))) => bail!("server closed the connection: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("server closed the connection"),
        }
    }
}

/// Reads one reply; returns its frame count.
async fn read_reply<S>(ws: &mut S, reply: ReplyArgs) -> anyhow::Result<usize>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut index = 0;
    loop {
        let frame = next_data(ws).await?;
        if reply.is_last(index, &frame) {
            return Ok(index + 1);
        }
        index += 1;
    }
}

/// Closes politely (close frame, wait for the server's, then EOF), within a second.
async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Run state shared with every connection task.
#[derive(Default)]
struct Flags {
    measuring: AtomicBool,
    stop: AtomicBool,
}

impl Flags {
    fn measuring(&self) -> bool {
        self.measuring.load(Ordering::Relaxed)
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    hist.saturating_record(elapsed.as_nanos().min(u64::MAX as u128) as u64);
}

/// p50 / p99 / p99.9 / max of a histogram, in ms, under `prefix`.
fn percentiles(out: &mut Map<String, Value>, prefix: &str, hist: &Histogram<u64>) {
    let ms = |ns: u64| Value::from(round(ns as f64 / 1e6, 4));
    if hist.is_empty() {
        for p in ["p50", "p99", "p999", "max"] {
            out.insert(format!("{prefix}{p}_ms"), Value::Null);
        }
        return;
    }
    out.insert(format!("{prefix}p50_ms"), ms(hist.value_at_quantile(0.50)));
    out.insert(format!("{prefix}p99_ms"), ms(hist.value_at_quantile(0.99)));
    out.insert(format!("{prefix}p999_ms"), ms(hist.value_at_quantile(0.999)));
    out.insert(format!("{prefix}max_ms"), ms(hist.max()));
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// CPU time of this process (the load generator), in microseconds.
fn own_cpu_us() -> u64 {
    // SAFETY: getrusage writes into the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// Server and client counters at one instant.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    server: Option<ProcSample>,
    client_cpu_us: u64,
}

impl Snapshot {
    /// Samples the server processes (their sum; `None` without any) and this process.
    fn take(pids: &[u32]) -> anyhow::Result<Snapshot> {
        let mut server: Option<ProcSample> = None;
        for &pid in pids {
            let s = sample(pid)?;
            let sum = server.get_or_insert_with(ProcSample::default);
            sum.cpu_us += s.cpu_us;
            sum.rss_kb += s.rss_kb;
            sum.rss_anon_kb += s.rss_anon_kb;
            sum.rss_shared_kb += s.rss_shared_kb;
        }
        Ok(Snapshot { at: Instant::now(), server, client_cpu_us: own_cpu_us() })
    }
}

/// PSS of the server processes, summed; `None` without any or when one is unreadable.
fn pss_sum_kb(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| pss_kb(pid)).sum()
}

/// Inserts the elapsed time and CPU per `unit` between two snapshots.
fn cpu_figures(out: &mut Map<String, Value>, before: &Snapshot, after: &Snapshot, count: u64, unit: &str) {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("elapsed_s".into(), json!(round(secs, 3)));
    let per = |us: u64| if count == 0 { Value::Null } else { json!(round(us as f64 / count as f64, 3)) };
    match (before.server, after.server) {
        (Some(b), Some(a)) => {
            let us = a.cpu_us.saturating_sub(b.cpu_us);
            out.insert("server_cpu_s".into(), json!(round(us as f64 / 1e6, 3)));
            out.insert(format!("server_cpu_us_per_{unit}"), per(us));
            out.insert("server_cpu_share".into(), json!(round(us as f64 / 1e6 / secs, 3)));
        }
        _ => {
            out.insert(format!("server_cpu_us_per_{unit}"), Value::Null);
        }
    }
    out.insert(format!("client_cpu_us_per_{unit}"), per(after.client_cpu_us - before.client_cpu_us));
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut out = runtime.block_on(run(&args))?;
    let mut line = Map::new();
    for (k, v) in &args.tags {
        line.insert(k.clone(), Value::from(v.as_str()));
    }
    let url = match args.url.as_slice() {
        [one] => Value::from(one.as_str()),
        many => Value::from(many.to_vec()),
    };
    line.insert("url".into(), url);
    line.append(&mut out);
    println!("{}", Value::Object(line));
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<Map<String, Value>> {
    let pids = args.pid.as_slice();
    if let Mode::Fanout { subs, ref pub_url, messages, warmup, timeout, gap_ms, ready_timeout, concurrency } =
        args.mode
    {
        let targets = args
            .url
            .iter()
            .map(|url| Target::new(url, args.skip).map(Arc::new))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let pub_url = match pub_url {
            Some(url) => url.clone(),
            None => publisher_url(&args.url[0])
                .with_context(|| format!("no sub= in {} to turn into pub=: give --pub-url", args.url[0]))?,
        };
        let publisher = Target::new(&pub_url, args.skip)?;
        let plan = FanoutPlan {
            subs,
            size: args.size,
            messages,
            warmup,
            timeout: secs(timeout),
            gap: secs(gap_ms / 1e3),
            ready_timeout: secs(ready_timeout),
            concurrency,
        };
        return fanout(&targets, &publisher, pids, plan).await;
    }
    let [url] = args.url.as_slice() else { bail!("--url is given once, except in fanout mode") };
    let target = Arc::new(Target::new(url, args.skip)?);
    let text = args.message.clone().unwrap_or_else(|| payload(args.size));
    let message = Utf8Bytes::from(text);
    match args.mode {
        Mode::Closed { conns, duration, warmup, reply } => {
            closed(&target, pids, message, conns, secs(warmup), secs(duration), reply).await
        }
        Mode::Paced { conns, rate, duration, warmup, reply } => {
            paced(&target, pids, message, conns, rate, secs(warmup), secs(duration), reply).await
        }
        Mode::Idle { conns, concurrency, settle, hold, no_touch, reply } => {
            let touch = (!no_touch).then_some((message, reply));
            idle(&target, pids, conns, concurrency, secs(settle), secs(hold), touch).await
        }
        Mode::Soak {
            conns,
            concurrency,
            sources,
            ref source_addrs,
            no_touch,
            settle,
            active,
            active_rate,
            active_secs,
            active_warmup,
            ref healthz_url,
            healthz_every_ms,
            ref metrics_url,
            min_available_mib,
            connect_timeout,
            max_failures,
            reply,
        } => {
            let base = format!("http://{}:{}", target.host, target.port);
            let plan = SoakPlan {
                conns,
                concurrency: concurrency.max(1),
                sources: self::source_addrs(sources, source_addrs)?,
                touch: !no_touch,
                message,
                reply,
                settle: secs(settle),
                active,
                active_rate,
                active_secs: secs(active_secs),
                active_warmup: secs(active_warmup),
                healthz: HttpTarget::parse(healthz_url.as_deref().unwrap_or(&format!("{base}/healthz")))?,
                healthz_every: secs(healthz_every_ms / 1e3),
                metrics: HttpTarget::parse(metrics_url.as_deref().unwrap_or(&format!("{base}/metrics")))?,
                min_available_kb: min_available_mib * 1024,
                connect_timeout: secs(connect_timeout),
                max_failures: max_failures.max(1),
            };
            soak(&target, pids, plan).await
        }
        Mode::Resume { conns, duration, warmup } => {
            resume(&target, pids, message, conns, secs(warmup), secs(duration)).await
        }
        Mode::Storm { duration, warmup, concurrency, count: None } => {
            storm(&target, pids, concurrency, secs(warmup), secs(duration)).await
        }
        Mode::Storm { concurrency, count: Some(count), .. } => {
            storm_count(&target, pids, concurrency, count).await
        }
        Mode::Fanout { .. } => unreachable!("handled above"),
    }
}

/// Growth from `before` to `after` per connection, rounded; null without connections.
fn per_conn_figure(before: u64, after: u64, conns: usize) -> Value {
    if conns == 0 { Value::Null } else { json!(round((after as f64 - before as f64) / conns as f64, 2)) }
}

/// The server's RSS before and after, and its growth per connection (all, anonymous,
/// shared), when the server was sampled.
fn server_memory_per_conn(
    out: &mut Map<String, Value>,
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    conns: usize,
) {
    let (Some(b), Some(a)) = (before, after) else { return };
    out.insert("rss_before_kb".into(), b.rss_kb.into());
    out.insert("rss_after_kb".into(), a.rss_kb.into());
    out.insert("rss_kb_per_conn".into(), per_conn_figure(b.rss_kb, a.rss_kb, conns));
    out.insert("rss_anon_kb_per_conn".into(), per_conn_figure(b.rss_anon_kb, a.rss_anon_kb, conns));
    out.insert("rss_shared_kb_per_conn".into(), per_conn_figure(b.rss_shared_kb, a.rss_shared_kb, conns));
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Opens `n` connections, `concurrency` at a time.
async fn open_all(target: &Arc<Target>, n: usize, concurrency: usize) -> anyhow::Result<Vec<Ws>> {
    stream::iter(0..n)
        .map(|_| target.connect())
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// What one connection task counted.
struct Tally {
    hist: Histogram<u64>,
    /// Second histogram: time to the last frame (paced mode).
    last: Histogram<u64>,
    messages: u64,
    frames: u64,
    /// Messages sent in the measured window (paced mode).
    sent: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally { hist: histogram(), last: histogram(), messages: 0, frames: 0, sent: 0 }
    }
    fn add(&mut self, other: &Tally) {
        self.hist.add(&other.hist).expect("same histogram bounds");
        self.last.add(&other.last).expect("same histogram bounds");
        self.messages += other.messages;
        self.frames += other.frames;
        self.sent += other.sent;
    }
}

/// Runs warm-up then the measured window while the connection tasks work; returns the
/// snapshots around the window. Stops the tasks afterwards.
async fn window(
    pids: &[u32],
    flags: &Flags,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(Snapshot, Snapshot)> {
    sleep(warmup).await;
    let before = Snapshot::take(pids)?;
    flags.measuring.store(true, Ordering::Relaxed);
    sleep(duration).await;
    flags.measuring.store(false, Ordering::Relaxed);
    let after = Snapshot::take(pids)?;
    flags.stop.store(true, Ordering::Relaxed);
    Ok((before, after))
}

/// Collects the connection tasks' tallies, waiting at most `grace` after the stop.
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Tally>>>,
    grace: Duration,
) -> (Tally, usize, Option<String>) {
    let mut total = Tally::new();
    let mut errors = 0;
    let mut first_error = None;
    let deadline = Instant::now() + grace;
    for task in tasks {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(deadline.into(), task).await {
            Ok(Ok(Ok(tally))) => total.add(&tally),
            Ok(Ok(Err(err))) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{err:#}"));
            }
            Ok(Err(join)) => {
                errors += 1;
                first_error.get_or_insert_with(|| join.to_string());
            }
            Err(_) => {
                abort.abort();
                errors += 1;
                first_error.get_or_insert_with(|| "no answer within the grace period".to_owned());
            }
        }
    }
    (total, errors, first_error)
}

#[allow(clippy::too_many_arguments)]
async fn closed(
    target: &Arc<Target>,
    pids: &[u32],
    message: Utf8Bytes,
    conns: usize,
    warmup: Duration,
    duration: Duration,
    reply: ReplyArgs,
) -> anyhow::Result<Map<String, Value>> {
    let sockets = open_all(target, conns, 64).await?;
    let flags = Arc::new(Flags::default());
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|ws| tokio::spawn(closed_conn(ws, message.clone(), reply, flags.clone())))
        .collect();
    let (before, after) = window(pids, &flags, warmup, duration).await?;
    let (tally, errors, first_error) = gather(tasks, Duration::from_secs(5)).await;

    let mut out = Map::new();
    out.insert("mode".into(), "closed".into());
    out.insert("conns".into(), conns.into());
    out.insert("frames_per_reply".into(), reply.frames.into());
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("messages".into(), tally.messages.into());
    out.insert("frames".into(), tally.frames.into());
    out.insert("throughput_msg_s".into(), json!(round(tally.messages as f64 / secs, 1)));
    out.insert("throughput_frames_s".into(), json!(round(tally.frames as f64 / secs, 1)));
    cpu_figures(&mut out, &before, &after, tally.messages, "msg");
    if let (Some(b), Some(a)) = (before.server, after.server)
        && tally.frames > 0
    {
        let us = a.cpu_us.saturating_sub(b.cpu_us) as f64;
        out.insert("server_cpu_us_per_frame".into(), json!(round(us / tally.frames as f64, 3)));
    }
    percentiles(&mut out, "", &tally.hist);
    errors_out(&mut out, errors, first_error);
    Ok(out)
}

fn errors_out(out: &mut Map<String, Value>, errors: usize, first_error: Option<String>) {
    out.insert("errors".into(), errors.into());
    if let Some(err) = first_error {
        out.insert("first_error".into(), err.into());
    }
}

async fn closed_conn(
    mut ws: Ws,
    message: Utf8Bytes,
    reply: ReplyArgs,
    flags: Arc<Flags>,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new();
    while !flags.stopped() {
        let sent_at = Instant::now();
        ws.send(Message::Text(message.clone())).await?;
        let frames = read_reply(&mut ws, reply).await?;
        if flags.measuring() {
            record(&mut tally.hist, sent_at.elapsed());
            tally.messages += 1;
            tally.frames += frames as u64;
        }
    }
    close(ws).await;
    Ok(tally)
}

#[allow(clippy::too_many_arguments)]
async fn paced(
    target: &Arc<Target>,
    pids: &[u32],
    message: Utf8Bytes,
    conns: usize,
    rate: f64,
    warmup: Duration,
    duration: Duration,
    reply: ReplyArgs,
) -> anyhow::Result<Map<String, Value>> {
    if rate <= 0.0 || conns == 0 {
        bail!("paced mode needs a positive --rate and --conns");
    }
    let sockets = open_all(target, conns, 64).await?;
    let flags = Arc::new(Flags::default());
    // Each connection sends every `period`; their schedules are staggered evenly so the
    // total is a steady `rate`.
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(10);
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let first = start + period.mul_f64(i as f64 / conns as f64);
            tokio::spawn(paced_conn(ws, message.clone(), reply, period, first, flags.clone()))
        })
        .collect();
    let (before, after) = window(pids, &flags, warmup, duration).await?;
    let (tally, errors, first_error) = gather(tasks, Duration::from_secs(5)).await;

    let mut out = Map::new();
    out.insert("mode".into(), "paced".into());
    out.insert("conns".into(), conns.into());
    out.insert("rate_target".into(), json!(rate));
    out.insert("frames_per_reply".into(), reply.frames.into());
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("sent".into(), tally.sent.into());
    out.insert("messages".into(), tally.messages.into());
    out.insert("missing".into(), tally.sent.saturating_sub(tally.messages).into());
    out.insert("throughput_msg_s".into(), json!(round(tally.sent as f64 / secs, 1)));
    cpu_figures(&mut out, &before, &after, tally.sent, "msg");
    percentiles(&mut out, "first_", &tally.hist);
    percentiles(&mut out, "last_", &tally.last);
    errors_out(&mut out, errors, first_error);
    Ok(out)
}

async fn paced_conn(
    ws: Ws,
    message: Utf8Bytes,
    reply: ReplyArgs,
    period: Duration,
    first: Instant,
    flags: Arc<Flags>,
) -> anyhow::Result<Tally> {
    let (mut sink, mut stream) = ws.split();
    // The writer queues (send time, measured?) before each send; the reader takes one per
    // reply. It ends when the writer has stopped and every reply has arrived.
    let (queue, mut sent_times) = mpsc::unbounded_channel::<(Instant, bool)>();
    let writer = {
        let flags = flags.clone();
        async move {
            let mut ticker = interval_at(first.into(), period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut sent = 0u64;
            loop {
                ticker.tick().await;
                if flags.stopped() {
                    break;
                }
                let measured = flags.measuring();
                queue.send((Instant::now(), measured)).expect("the reader outlives the writer");
                sink.send(Message::Text(message.clone())).await?;
                sent += measured as u64;
            }
            drop(queue);
            anyhow::Ok((sink, sent))
        }
    };
    let reader = async move {
        let mut tally = Tally::new();
        while let Some((sent_at, measured)) = sent_times.recv().await {
            let mut index = 0;
            loop {
                let frame = next_data(&mut stream).await?;
                let elapsed = sent_at.elapsed();
                if index == 0 && measured {
                    record(&mut tally.hist, elapsed);
                }
                if reply.is_last(index, &frame) {
                    if measured {
                        record(&mut tally.last, elapsed);
                        tally.messages += 1;
                        tally.frames += index as u64 + 1;
                    }
                    break;
                }
                index += 1;
            }
        }
        anyhow::Ok((stream, tally))
    };
    let ((sink, sent), (stream, mut tally)) = tokio::try_join!(writer, reader)?;
    tally.sent = sent;
    close(sink.reunite(stream).expect("halves of one socket")).await;
    Ok(tally)
}

async fn idle(
    target: &Arc<Target>,
    pids: &[u32],
    conns: usize,
    concurrency: usize,
    settle: Duration,
    hold: Duration,
    touch: Option<(Utf8Bytes, ReplyArgs)>,
) -> anyhow::Result<Map<String, Value>> {
    let open = |n: usize| {
        let touch = touch.clone();
        stream::iter(0..n)
            .map(move |_| {
                let touch = touch.clone();
                async move {
                    let mut ws = target.connect().await?;
                    if let Some((message, reply)) = touch {
                        ws.send(Message::Text(message)).await?;
                        read_reply(&mut ws, reply).await?;
                    }
                    anyhow::Ok(ws)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect::<Vec<_>>()
    };
    // Warm-up: one-time costs (first allocations, thread start-up) are not per connection.
    for ws in open(conns.min(100)).await.into_iter().collect::<anyhow::Result<Vec<_>>>()? {
        close(ws).await;
    }
    sleep(Duration::from_millis(500)).await;

    let pss_before = pss_sum_kb(pids);
    let before = Snapshot::take(pids)?;
    let opened = open(conns).await;
    let opened_at = Snapshot::take(pids)?;
    let (sockets, failures): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
    let sockets: Vec<Ws> = sockets.into_iter().map(Result::unwrap).collect();
    sleep(settle).await;
    let after = Snapshot::take(pids)?;
    let pss_after = pss_sum_kb(pids);

    let n = sockets.len();
    let mut out = Map::new();
    out.insert("mode".into(), "idle".into());
    out.insert("conns".into(), n.into());
    out.insert("touched".into(), touch.is_some().into());
    let open_secs = opened_at.at.duration_since(before.at).as_secs_f64();
    out.insert("open_s".into(), json!(round(open_secs, 3)));
    out.insert("conns_per_s".into(), json!(round(n as f64 / open_secs, 1)));
    cpu_figures(&mut out, &before, &opened_at, n as u64, "conn");
    out.remove("elapsed_s");
    server_memory_per_conn(&mut out, before.server, after.server, n);
    if let (Some(b), Some(a)) = (pss_before, pss_after) {
        out.insert("pss_kb_per_conn".into(), per_conn_figure(b, a, n));
    }
    let first_error = failures.into_iter().map(|f| f.err().map(|e| format!("{e:#}"))).next().flatten();
    errors_out(&mut out, conns - n, first_error);

    sleep(hold).await;
    // Dropping the sockets resets them all at once; a polite close of 10,000 would take
    // longer than the measurement.
    drop(sockets);
    Ok(out)
}

async fn storm(
    target: &Arc<Target>,
    pids: &[u32],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Map<String, Value>> {
    let flags = Arc::new(Flags::default());
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let (target, flags) = (target.clone(), flags.clone());
            tokio::spawn(async move {
                let mut tally = Tally::new();
                let mut errors = 0u64;
                let mut last_error = None;
                while !flags.stopped() {
                    let started = Instant::now();
                    match cycle(&target).await {
                        Ok(()) if flags.measuring() => {
                            record(&mut tally.hist, started.elapsed());
                            tally.messages += 1;
                        }
                        Ok(()) => {}
                        Err(err) => {
                            errors += 1;
                            last_error = Some(format!("{err:#}"));
                            // Out of ports or descriptors: let the system recover.
                            sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                match last_error {
                    Some(err) if tally.messages == 0 => Err(anyhow::anyhow!("{errors} failures: {err}")),
                    _ => Ok(tally),
                }
            })
        })
        .collect();
    let (before, after) = window(pids, &flags, warmup, duration).await?;
    let (tally, errors, first_error) = gather(tasks, Duration::from_secs(5)).await;

    let mut out = Map::new();
    out.insert("mode".into(), "storm".into());
    out.insert("concurrency".into(), concurrency.into());
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("connections".into(), tally.messages.into());
    out.insert("conns_per_s".into(), json!(round(tally.messages as f64 / secs, 1)));
    cpu_figures(&mut out, &before, &after, tally.messages, "conn");
    capacity(&mut out);
    percentiles(&mut out, "cycle_", &tally.hist);
    errors_out(&mut out, errors, first_error);
    Ok(out)
}

/// Issue 16: see [`Mode::Resume`].
async fn resume(
    target: &Arc<Target>,
    pids: &[u32],
    message: Utf8Bytes,
    conns: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Map<String, Value>> {
    let chat: Value =
        serde_json::from_str(message.as_str()).context("--message must be aikefu's chat JSON")?;
    let askers = open_all(target, conns, 16).await?;
    let flags = Arc::new(Flags::default());
    let tasks: Vec<_> = askers
        .into_iter()
        .map(|asker| {
            let (target, flags, chat, message) =
                (target.clone(), flags.clone(), chat.clone(), message.clone());
            tokio::spawn(async move {
                let mut asker = asker;
                let mut tally = Tally::new();
                while !flags.stopped() {
                    asker.send(Message::Text(message.clone())).await?;
                    let (reply_id, chunks) = read_numbered_reply(&mut asker).await?;
                    let after = chunks / 2;
                    let mut request = chat.clone();
                    request["action"] = "resume".into();
                    request["reply_id"] = reply_id.into();
                    request["after_seq"] = after.into();
                    let started = Instant::now();
                    let mut ws = target.connect().await?;
                    ws.send(Message::Text(request.to_string().into())).await?;
                    // The greeting, then the first resumed chunk.
                    let first = loop {
                        let frame: Value = match next_data(&mut ws).await? {
                            Message::Text(text) => serde_json::from_str(text.as_str())?,
                            _ => bail!("a binary frame from aikefu"),
                        };
                        match frame["type"].as_str() {
                            Some("chat") => break frame,
                            Some("error") => bail!("the resume failed: {frame}"),
                            _ => continue,
                        }
                    };
                    let elapsed = started.elapsed();
                    if first["seq"].as_u64() != Some(after + 1) {
                        bail!("the resume began at {first}, not chunk {}", after + 1);
                    }
                    let mut resumed = 1;
                    if first["complete"] != true {
                        loop {
                            match next_data(&mut ws).await? {
                                Message::Text(text) if text.contains("\"complete\":true") => break,
                                _ => resumed += 1,
                            }
                        }
                    }
                    close(ws).await;
                    if flags.measuring() {
                        record(&mut tally.hist, elapsed);
                        tally.messages += 1;
                        tally.frames += chunks + resumed;
                    }
                }
                close(asker).await;
                Ok(tally)
            })
        })
        .collect();
    let (before, after) = window(pids, &flags, warmup, duration).await?;
    let (tally, errors, first_error) = gather(tasks, Duration::from_secs(5)).await;

    let mut out = Map::new();
    out.insert("mode".into(), "resume".into());
    out.insert("conns".into(), conns.into());
    out.insert("resumes".into(), tally.messages.into());
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("resumes_per_s".into(), json!(round(tally.messages as f64 / secs, 1)));
    // Per loop: the reply, a connection, and the resumed half of the reply.
    cpu_figures(&mut out, &before, &after, tally.messages, "loop");
    percentiles(&mut out, "first_chunk_", &tally.hist);
    errors_out(&mut out, errors, first_error);
    Ok(out)
}

/// Reads an aikefu reply to its `complete` chunk (skipping other frames); its reply id and
/// how many chunks came before `complete`.
async fn read_numbered_reply(ws: &mut Ws) -> anyhow::Result<(String, u64)> {
    let mut reply_id = None;
    loop {
        let frame: Value = match next_data(ws).await? {
            Message::Text(text) => serde_json::from_str(text.as_str())?,
            _ => continue,
        };
        if frame["type"] == "error" {
            bail!("aikefu answered an error: {frame}");
        }
        if frame["type"] != "chat" {
            continue;
        }
        reply_id = reply_id.or_else(|| frame["reply_id"].as_str().map(str::to_owned));
        if frame["complete"] == true {
            let seq =
                frame["seq"].as_u64().context("a chat chunk without seq: is aikefu older than issue 16?")?;
            return Ok((reply_id.context("a reply without reply_id")?, seq - 1));
        }
    }
}

/// Connections per second one core could take at the measured server CPU per connection.
fn capacity(out: &mut Map<String, Value>) {
    let cap = out
        .get("server_cpu_us_per_conn")
        .and_then(Value::as_f64)
        .filter(|us| *us > 0.0)
        .map(|us| json!(round(1e6 / us, 0)))
        .unwrap_or(Value::Null);
    out.insert("server_conns_per_core_s".into(), cap);
}

/// One connection's life: TCP connect, upgrade, greeting, close handshake, EOF.
async fn cycle(target: &Target) -> anyhow::Result<()> {
    let mut ws = target.connect().await?;
    ws.close(None).await?;
    while let Some(frame) = ws.next().await {
        if frame.is_err() {
            break;
        }
    }
    Ok(())
}

async fn storm_count(
    target: &Arc<Target>,
    pids: &[u32],
    concurrency: usize,
    count: usize,
) -> anyhow::Result<Map<String, Value>> {
    let before = Snapshot::take(pids)?;
    let opened = stream::iter(0..count)
        .map(|_| target.connect())
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let after = Snapshot::take(pids)?;
    let (sockets, failures): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
    let n = sockets.len();
    let mut out = Map::new();
    out.insert("mode".into(), "storm-count".into());
    out.insert("concurrency".into(), concurrency.into());
    out.insert("connections".into(), n.into());
    let secs = after.at.duration_since(before.at).as_secs_f64();
    out.insert("conns_per_s".into(), json!(round(n as f64 / secs, 1)));
    cpu_figures(&mut out, &before, &after, n as u64, "conn");
    capacity(&mut out);
    let first_error = failures.into_iter().map(|f| f.err().map(|e| format!("{e:#}"))).next().flatten();
    errors_out(&mut out, count - n, first_error);
    stream::iter(sockets.into_iter().map(Result::unwrap))
        .for_each_concurrent(concurrency.max(1), close)
        .await;
    Ok(out)
}

/// The publisher's URL from a subscriber's: its `sub=` query parameter becomes `pub=`.
fn publisher_url(sub_url: &str) -> Option<String> {
    let (base, query) = sub_url.split_once('?')?;
    let mut changed = false;
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.strip_prefix("sub=") {
            Some(channel) if !changed => {
                changed = true;
                format!("pub={channel}")
            }
            _ => param.to_owned(),
        })
        .collect();
    changed.then(|| format!("{base}?{}", params.join("&")))
}

/// What a `fanout` run does.
struct FanoutPlan {
    subs: usize,
    /// Length of each published text (at least its header).
    size: usize,
    messages: u64,
    warmup: u64,
    timeout: Duration,
    gap: Duration,
    ready_timeout: Duration,
    concurrency: usize,
}

/// A published text: `m<seq>:<ns>:` (a measured or warm-up message) or `r<seq>:<ns>:` (a
/// readiness probe), `<ns>` being the send time in nanoseconds since the run's epoch,
/// padded to `size` bytes.
fn fanout_text(kind: char, seq: u64, sent_ns: u64, size: usize) -> Utf8Bytes {
    let mut text = format!("{kind}{seq}:{sent_ns}:");
    if text.len() < size {
        text.push_str(&payload(size - text.len()));
    }
    Utf8Bytes::from(text)
}

/// The kind, sequence number and send time of a published text.
fn parse_fanout(text: &str) -> Option<(u8, u64, u64)> {
    let kind = *text.as_bytes().first()?;
    let mut fields = text[1..].splitn(3, ':');
    let seq = fields.next()?.parse().ok()?;
    let sent_ns = fields.next()?.parse().ok()?;
    Some((kind, seq, sent_ns))
}

/// What the subscribers' merged stream yields: the subscriber's index and its next frame,
/// or `None` once its connection has ended.
type SubEvent = (usize, Option<Result<Message, WsError>>);

/// Counts kept while receiving.
#[derive(Default)]
struct FanoutCounts {
    /// Subscribers whose connection ended or failed.
    closed: usize,
    /// Measured messages received after their wait had ended (already counted lost).
    late: u64,
    /// The same message received twice by one subscriber.
    duplicates: u64,
    /// Frames that are not one of ours.
    unexpected: u64,
    first_error: Option<String>,
}

impl FanoutCounts {
    /// Takes a frame that is not the one being waited for.
    fn other(&mut self, event: SubEvent, current: u64) {
        match event {
            (_, Some(Ok(Message::Text(text)))) => match parse_fanout(&text) {
                Some((b'm', seq, _)) if seq < current => self.late += 1,
                Some((b'r', _, _)) => {}
                _ => self.unexpected += 1,
            },
            (_, Some(Ok(Message::Binary(_)))) => self.unexpected += 1,
            (_, Some(Ok(_))) => {}
            (i, Some(Err(err))) => {
                self.first_error.get_or_insert_with(|| format!("subscriber {i}: {err}"));
            }
            (i, None) => {
                self.closed += 1;
                self.first_error.get_or_insert_with(|| format!("subscriber {i}: connection closed"));
            }
        }
    }
}

async fn fanout(
    targets: &[Arc<Target>],
    publisher: &Target,
    pids: &[u32],
    plan: FanoutPlan,
) -> anyhow::Result<Map<String, Value>> {
    if targets.is_empty() || plan.subs == 0 {
        bail!("fanout needs at least one --url and one subscriber");
    }
    // Subscribers, round robin over the servers; those that fail to open are errors.
    let opening = Instant::now();
    let opened = stream::iter(0..plan.subs)
        .map(|i| {
            let target = targets[i % targets.len()].clone();
            async move { (i % targets.len(), target.connect().await) }
        })
        .buffer_unordered(plan.concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut open_errors = 0;
    let mut first_error = None;
    let mut sockets = Vec::with_capacity(plan.subs);
    for (server, result) in opened {
        match result {
            Ok(ws) => sockets.push((server, ws)),
            Err(err) => {
                open_errors += 1;
                first_error.get_or_insert_with(|| format!("opening a subscriber: {err:#}"));
            }
        }
    }
    let n = sockets.len();
    if n == 0 {
        bail!("no subscriber connection opened: {}", first_error.unwrap_or_default());
    }
    let (mut pub_sink, pub_stream) = publisher.connect().await.context("opening the publisher")?.split();
    let open_s = opening.elapsed().as_secs_f64();
    // Whatever the server sends the publisher (its own messages, if it subscribed too) is
    // read and dropped, so that it never blocks the server.
    let pub_drain = tokio::spawn(pub_stream.for_each(|_| async {}));

    // Receipts at a subscriber of another server than the publisher's (across nodes).
    let remote: Vec<bool> = sockets
        .iter()
        .map(|(server, _)| {
            let t = &targets[*server];
            (t.host.as_str(), t.port) != (publisher.host.as_str(), publisher.port)
        })
        .collect();
    let any_remote = remote.iter().any(|&r| r);
    let any_local = remote.iter().any(|&r| !r);
    let mut subscribers = stream::select_all(sockets.into_iter().enumerate().map(|(i, (_, ws))| {
        ws.map(move |frame| (i, Some(frame))).chain(stream::once(std::future::ready((i, None))))
    }));

    let epoch = Instant::now();
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    let mut counts = FanoutCounts::default();

    // Ready: every subscriber has received a probe, i.e. its subscription is in place. A
    // new probe goes out whenever nothing arrived for 200 ms.
    let ready_deadline = Instant::now() + plan.ready_timeout;
    let mut seen = vec![false; n];
    let mut ready = 0;
    let mut probe = 0u64;
    while ready < n - counts.closed {
        if Instant::now() >= ready_deadline {
            bail!(
                "after {:.1} s only {ready} of {n} subscribers had received a probe (not subscribed?); \
                 {} closed{}",
                plan.ready_timeout.as_secs_f64(),
                counts.closed,
                counts.first_error.map(|e| format!(", first: {e}")).unwrap_or_default()
            );
        }
        pub_sink.send(Message::Text(fanout_text('r', probe, now_ns(), plan.size))).await?;
        probe += 1;
        while ready < n - counts.closed {
            let quiet = (Instant::now() + Duration::from_millis(200)).min(ready_deadline);
            let Ok(Some(event)) = tokio::time::timeout_at(quiet.into(), subscribers.next()).await else {
                break;
            };
            match event {
                (i, Some(Ok(Message::Text(text)))) if text.starts_with('r') => {
                    if !seen[i] {
                        seen[i] = true;
                        ready += 1;
                    }
                }
                other => counts.other(other, 0),
            }
        }
    }
    let ready_s = epoch.elapsed().as_secs_f64();

    // Warm-up, then measured messages, one at a time.
    let mut last = histogram();
    let mut receipt = histogram();
    let mut remote_receipt = histogram();
    let mut local_receipt = histogram();
    // Per subscriber: 1 + the last sequence number it received.
    let mut got_seq = vec![0u64; n];
    let (mut delivered, mut incomplete) = (0u64, 0u64);
    let mut before = None;
    let total = plan.warmup + plan.messages;
    for seq in 0..total {
        let measured = seq >= plan.warmup;
        if seq > 0 {
            sleep(plan.gap).await;
        }
        if seq == plan.warmup {
            counts.late = 0;
            counts.duplicates = 0;
            before = Some(Snapshot::take(pids)?);
        }
        let sent_ns = now_ns();
        pub_sink.send(Message::Text(fanout_text('m', seq, sent_ns, plan.size))).await?;
        let deadline = Instant::now() + plan.timeout;
        let mut got = 0usize;
        let mut last_ns = 0;
        while got < n - counts.closed {
            let Ok(Some(event)) = tokio::time::timeout_at(deadline.into(), subscribers.next()).await else {
                break;
            };
            let (i, Some(Ok(Message::Text(text)))) = &event else {
                counts.other(event, seq);
                continue;
            };
            match parse_fanout(text) {
                Some((b'm', s, at_ns)) if s == seq => {
                    let i = *i;
                    if got_seq[i] == seq + 1 {
                        counts.duplicates += 1;
                        continue;
                    }
                    got_seq[i] = seq + 1;
                    got += 1;
                    last_ns = now_ns();
                    if measured {
                        let latency = Duration::from_nanos(last_ns.saturating_sub(at_ns));
                        record(&mut receipt, latency);
                        record(if remote[i] { &mut remote_receipt } else { &mut local_receipt }, latency);
                    }
                }
                _ => counts.other(event, seq),
            }
        }
        if measured {
            delivered += got as u64;
            if got == n {
                record(&mut last, Duration::from_nanos(last_ns.saturating_sub(sent_ns)));
            } else {
                incomplete += 1;
            }
        } else if got < n - counts.closed {
            eprintln!("loadgen fanout: warm-up message {seq} reached {got} of {n} subscribers");
        }
    }
    let after = Snapshot::take(pids)?;
    let before = before.unwrap_or(after);

    let mut out = Map::new();
    out.insert("mode".into(), "fanout".into());
    out.insert("subscribers".into(), n.into());
    out.insert("servers".into(), targets.len().into());
    out.insert("messages".into(), plan.messages.into());
    out.insert("message_bytes".into(), fanout_text('m', total, now_ns(), plan.size).len().into());
    out.insert("delivered".into(), delivered.into());
    out.insert("lost".into(), (plan.messages * n as u64).saturating_sub(delivered).into());
    out.insert("incomplete_messages".into(), incomplete.into());
    out.insert("late".into(), counts.late.into());
    out.insert("duplicates".into(), counts.duplicates.into());
    out.insert("unexpected".into(), counts.unexpected.into());
    out.insert("closed_subscribers".into(), counts.closed.into());
    out.insert("open_s".into(), json!(round(open_s, 3)));
    out.insert("ready_s".into(), json!(round(ready_s, 3)));
    out.insert("probes".into(), probe.into());
    cpu_figures(&mut out, &before, &after, delivered, "delivery");
    if let (Some(b), Some(a)) = (before.server, after.server)
        && plan.messages > 0
    {
        let us = a.cpu_us.saturating_sub(b.cpu_us) as f64;
        out.insert("server_cpu_us_per_publish".into(), json!(round(us / plan.messages as f64, 1)));
    }
    percentiles(&mut out, "last_", &last);
    percentiles(&mut out, "receipt_", &receipt);
    if any_remote {
        percentiles(&mut out, "remote_receipt_", &remote_receipt);
        if any_local {
            percentiles(&mut out, "local_receipt_", &local_receipt);
        }
    }
    let errors = open_errors + counts.closed;
    errors_out(&mut out, errors, first_error.or(counts.first_error));

    // Reset every connection at once (a polite close of 10,000 takes longer than the
    // measurement), then let the servers finish tearing them down, so that the next run on
    // this core does not pay for it.
    drop(subscribers);
    drop(pub_sink);
    pub_drain.abort();
    out.insert("settle_s".into(), json!(round(settle(pids, Duration::from_secs(10)).await?, 2)));
    Ok(out)
}

/// Waits (at most `max`) until the server processes are idle: at most one clock tick
/// (usually 10 ms) of CPU over 200 ms. Returns the seconds waited.
async fn settle(pids: &[u32], max: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let tick_us = 1_000_000 / sockhost_bench::clock_ticks_per_second();
    let mut prev = Snapshot::take(pids)?;
    while start.elapsed() < max {
        sleep(Duration::from_millis(200)).await;
        let now = Snapshot::take(pids)?;
        let (Some(a), Some(b)) = (now.server, prev.server) else { break };
        if a.cpu_us.saturating_sub(b.cpu_us) <= tick_us {
            break;
        }
        prev = now;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// What a `soak` run does.
struct SoakPlan {
    conns: usize,
    concurrency: usize,
    /// Loopback source addresses, round robin; empty: the kernel chooses.
    sources: Vec<Ipv4Addr>,
    /// Exchange one message on each connection once it is open.
    touch: bool,
    message: Utf8Bytes,
    reply: ReplyArgs,
    settle: Duration,
    active: usize,
    active_rate: f64,
    active_secs: Duration,
    active_warmup: Duration,
    healthz: HttpTarget,
    healthz_every: Duration,
    metrics: HttpTarget,
    min_available_kb: u64,
    connect_timeout: Duration,
    max_failures: usize,
}

/// File descriptors kept free below an open-file limit, on the client and on the server:
/// health checks, the metrics read, the server's own files (logs, kv, the addons' cache).
const FD_RESERVE: u64 = 64;

/// An `http://host:port/path` to GET.
#[derive(Clone)]
struct HttpTarget {
    host: String,
    port: u16,
    path: String,
}

impl HttpTarget {
    fn parse(url: &str) -> anyhow::Result<HttpTarget> {
        let rest = url.strip_prefix("http://").with_context(|| format!("not an http:// URL: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().with_context(|| format!("bad port in {url}"))?),
            None => (authority, 80),
        };
        Ok(HttpTarget { host: host.to_owned(), port, path: path.to_owned() })
    }

    /// GET with `Connection: close`; the status code and, with `body`, the whole response.
    async fn get(&self, body: bool) -> anyhow::Result<(u16, String)> {
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
            self.path, self.host, self.port
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 4096];
        loop {
            let n = tcp.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            // A health check needs the status line only.
            if n == 0 || (!body && buf.windows(2).any(|w| w == b"\r\n")) {
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status =
            text.split_whitespace().nth(1).and_then(|code| code.parse().ok()).with_context(|| {
                format!("no HTTP status line in {:?}", text.chars().take(80).collect::<String>())
            })?;
        Ok((status, text))
    }
}

/// The sum over every label set of a Prometheus metric, e.g.
/// `sockhost_addon_live_instances{addon="echo"} 5`.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// What the health-check task saw, and the low-memory alarm it raises.
#[derive(Default)]
struct Health {
    stop: AtomicBool,
    /// MemAvailable fell below half the margin: end the run now.
    low_memory: AtomicBool,
    probes: AtomicU64,
    failures: AtomicU64,
    worst_us: AtomicU64,
    lowest_available_kb: AtomicU64,
    first_failure: Mutex<Option<String>>,
}

/// Polls `/healthz` every `every` (2 s time-out: a load balancer would give up by then) and
/// watches MemAvailable, until told to stop.
async fn watch_health(target: HttpTarget, every: Duration, min_available_kb: u64, health: Arc<Health>) {
    health.lowest_available_kb.store(u64::MAX, Ordering::Relaxed);
    while !health.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(2), target.get(false)).await;
        let failure = match result {
            Ok(Ok((200, _))) => None,
            Ok(Ok((status, _))) => Some(format!("HTTP {status}")),
            Ok(Err(err)) => Some(format!("{err:#}")),
            Err(_) => Some("no answer within 2 s".to_owned()),
        };
        health.probes.fetch_add(1, Ordering::Relaxed);
        health.worst_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Some(failure) = failure {
            health.failures.fetch_add(1, Ordering::Relaxed);
            health.first_failure.lock().unwrap().get_or_insert(failure);
        }
        if let Some(available) = meminfo_kb("MemAvailable:") {
            health.lowest_available_kb.fetch_min(available, Ordering::Relaxed);
            if available < min_available_kb / 2 {
                health.low_memory.store(true, Ordering::Relaxed);
            }
        }
        sleep(every.saturating_sub(started.elapsed())).await;
    }
}

/// Held connections that ended while held (the server closed or reset them).
#[derive(Default)]
struct Dropped {
    count: AtomicUsize,
    first: Mutex<Option<String>>,
}

/// Holds one connection: reads (so that the server's pings are answered) until the server
/// ends it, or, for an active one, until `start` changes, when the socket is handed back.
async fn keep(mut ws: Ws, mut start: Option<watch::Receiver<bool>>, dropped: Arc<Dropped>) -> Option<Ws> {
    loop {
        let frame = match start.as_mut() {
            Some(start) => tokio::select! {
                frame = ws.next() => frame,
                _ = start.changed() => return Some(ws),
            },
            None => ws.next().await,
        };
        let why = match frame {
            Some(Ok(Message::Close(frame))) => format!("server closed it: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => format!("{err}"),
            None => "EOF".to_owned(),
        };
        dropped.count.fetch_add(1, Ordering::Relaxed);
        dropped.first.lock().unwrap().get_or_insert(why);
        return None;
    }
}

/// The errno of an I/O error anywhere in a failed open's chain.
fn os_error(err: &anyhow::Error) -> Option<i32> {
    err.chain().find_map(|cause| {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        match cause.downcast_ref::<WsError>() {
            Some(WsError::Io(io)) => io.raw_os_error(),
            _ => None,
        }
    })
}

/// A failed open that means no more can be opened here: the client out of descriptors or
/// of ports, the system out of files.
fn fatal_open_error(err: &anyhow::Error) -> Option<&'static str> {
    match os_error(err)? {
        libc::EMFILE => Some("EMFILE in the client (its open-file limit)"),
        libc::ENFILE => Some("ENFILE (the system's open-file table, fs.file-max)"),
        libc::EADDRNOTAVAIL => Some("EADDRNOTAVAIL (out of ephemeral ports: add --sources)"),
        libc::ENOBUFS | libc::ENOMEM => Some("ENOBUFS/ENOMEM from the kernel"),
        _ => None,
    }
}

/// Memory and descriptor figures at one instant.
struct SoakSample {
    server: Option<ProcSample>,
    pss_kb: Option<u64>,
    client_rss_kb: u64,
    tcp: Option<TcpSockstat>,
    slab_kb: Option<u64>,
    available_kb: Option<u64>,
}

impl SoakSample {
    fn take(pid: Option<u32>) -> SoakSample {
        SoakSample {
            server: pid.and_then(|pid| sample(pid).ok()),
            pss_kb: pid.and_then(pss_kb),
            client_rss_kb: sample(std::process::id()).map(|s| s.rss_kb).unwrap_or(0),
            tcp: TcpSockstat::read(),
            slab_kb: meminfo_kb("Slab:"),
            available_kb: meminfo_kb("MemAvailable:"),
        }
    }
}

async fn soak(target: &Arc<Target>, pids: &[u32], plan: SoakPlan) -> anyhow::Result<Map<String, Value>> {
    let pid = pids.first().copied();
    let server_addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .find(SocketAddr::is_ipv4)
        .context("the server's host has no IPv4 address")?;
    let config = soak_ws_config();
    let (client_nofile, client_nofile_hard) = raise_open_files_limit();
    let client_fds_base = fd_count(std::process::id()).unwrap_or(16);
    let server_nofile = pid.and_then(open_files_limit);
    let server_fds_base = pid.and_then(fd_count).unwrap_or(0);

    let health = Arc::new(Health::default());
    let watcher = tokio::spawn(watch_health(
        plan.healthz.clone(),
        plan.healthz_every,
        plan.min_available_kb,
        health.clone(),
    ));
    let open_one = |i: usize| {
        let source = (!plan.sources.is_empty()).then(|| plan.sources[i % plan.sources.len()]);
        let message = plan.touch.then(|| plan.message.clone());
        let (reply, timeout) = (plan.reply, plan.connect_timeout);
        async move {
            let opening = async {
                let mut ws = target.connect_from(server_addr, source, config).await?;
                if let Some(message) = message {
                    ws.send(Message::Text(message)).await?;
                    read_reply(&mut ws, reply).await?;
                }
                anyhow::Ok(ws)
            };
            match tokio::time::timeout(timeout, opening).await {
                Ok(result) => result,
                Err(_) => {
                    Err(anyhow::anyhow!("no upgrade (and reply) within {:.0} s", timeout.as_secs_f64()))
                }
            }
        }
    };
    // Warm-up: one-time costs (first allocations, thread start-up) are not per connection.
    let warm: Vec<_> =
        stream::iter(0..plan.conns.min(100)).map(open_one).buffer_unordered(plan.concurrency).collect().await;
    for ws in warm.into_iter().flatten() {
        close(ws).await;
    }
    sleep(Duration::from_millis(500)).await;

    let before = SoakSample::take(pid);
    let opening = Instant::now();
    let server_cpu_before = before.server.map(|s| s.cpu_us);
    let dropped = Arc::new(Dropped::default());
    let (start_tx, start_rx) = watch::channel(false);
    let mut keepers = Vec::with_capacity(plan.conns);
    let mut active = Vec::with_capacity(plan.active);
    let mut in_flight = FuturesUnordered::new();
    let (mut launched, mut failures) = (0usize, 0usize);
    let mut first_failure: Option<String> = None;
    let mut stopped_by: Option<String> = None;
    let mut last_progress = Instant::now();
    loop {
        // Launch while there is room, unless a limit says stop.
        while stopped_by.is_none() && launched < plan.conns && in_flight.len() < plan.concurrency {
            let open = (keepers.len() + active.len() + in_flight.len()) as u64;
            // Each connection takes one descriptor at each end: stop at the lower of the two
            // limits, and name both when they are about equal (the other one is next).
            let client_room = client_nofile.saturating_sub(client_fds_base + FD_RESERVE);
            let server_room = server_nofile.map(|limit| limit.saturating_sub(server_fds_base + FD_RESERVE));
            let client_says = || {
                format!(
                    "the client's open-file limit (RLIMIT_NOFILE {client_nofile}, hard {client_nofile_hard})"
                )
            };
            let server_says = |limit: u64| {
                format!(
                    "the server's open-file limit (RLIMIT_NOFILE {limit}; it had {server_fds_base} files open \
                     before): one more would make accept fail and /healthz wait"
                )
            };
            let room = server_room.map_or(client_room, |s| s.min(client_room));
            if open >= room {
                stopped_by = Some(match (server_nofile, server_room) {
                    (Some(limit), Some(s)) if s <= client_room && client_room - s < 1000 => {
                        format!("{}, and {}", server_says(limit), client_says())
                    }
                    (Some(limit), Some(s)) if s <= client_room => server_says(limit),
                    (Some(limit), Some(s)) if s - client_room < 1000 => {
                        format!("{}, and {}", client_says(), server_says(limit))
                    }
                    _ => client_says(),
                });
            } else if launched % 64 == 0
                && let Some(available) = meminfo_kb("MemAvailable:")
                && available < plan.min_available_kb
            {
                stopped_by = Some(format!(
                    "MemAvailable {} MiB, below the {} MiB margin",
                    available / 1024,
                    plan.min_available_kb / 1024
                ));
            } else if health.low_memory.load(Ordering::Relaxed) {
                stopped_by = Some("MemAvailable below half the margin".to_owned());
            } else {
                in_flight.push(open_one(launched));
                launched += 1;
            }
        }
        let Some(result) = in_flight.next().await else { break };
        match result {
            Ok(ws) => {
                let held = keepers.len() + active.len();
                if held < plan.active {
                    active.push(tokio::spawn(keep(ws, Some(start_rx.clone()), dropped.clone())));
                } else {
                    keepers.push(tokio::spawn(keep(ws, None, dropped.clone())));
                }
            }
            Err(err) => {
                failures += 1;
                if stopped_by.is_none() {
                    if let Some(fatal) = fatal_open_error(&err) {
                        stopped_by = Some(format!("{fatal}: {err:#}"));
                    } else if failures >= plan.max_failures {
                        stopped_by = Some(format!("{failures} connections failed to open; the first: {}", {
                            first_failure.as_deref().unwrap_or("?")
                        }));
                    }
                }
                first_failure.get_or_insert_with(|| format!("{err:#}"));
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            eprintln!(
                "loadgen soak: {} open after {:.0} s, {failures} failed, MemAvailable {} MiB",
                keepers.len() + active.len(),
                opening.elapsed().as_secs_f64(),
                meminfo_kb("MemAvailable:").unwrap_or(0) / 1024
            );
        }
    }
    let open_s = opening.elapsed().as_secs_f64();
    let server_cpu_opened = pid.and_then(|pid| sample(pid).ok()).map(|s| s.cpu_us);
    let held = keepers.len() + active.len();
    eprintln!(
        "loadgen soak: {held} open in {open_s:.1} s; stopped by: {}",
        stopped_by.as_deref().unwrap_or("nothing (all asked for)")
    );

    // Settle (hibernation happens after the addon's hibernate_after_ms), watching memory.
    let settle_end = Instant::now() + plan.settle;
    while Instant::now() < settle_end && !health.low_memory.load(Ordering::Relaxed) {
        sleep(Duration::from_millis(100).min(settle_end - Instant::now())).await;
    }
    let after = SoakSample::take(pid);
    let metrics = match tokio::time::timeout(Duration::from_secs(10), plan.metrics.get(true)).await {
        Ok(Ok((200, text))) => Some(text),
        _ => None,
    };
    let server_maps = pid.and_then(map_count);
    let server_fds = pid.and_then(fd_count);

    let mut out = Map::new();
    out.insert("mode".into(), "soak".into());
    out.insert("conns_asked".into(), plan.conns.into());
    out.insert("conns".into(), held.into());
    out.insert(
        "stopped_by".into(),
        stopped_by.clone().unwrap_or_else(|| "nothing: all opened".to_owned()).into(),
    );
    out.insert("limited".into(), stopped_by.is_some().into());
    out.insert("touched".into(), plan.touch.into());
    out.insert("sources".into(), plan.sources.len().into());
    out.insert("concurrency".into(), plan.concurrency.into());
    out.insert("open_s".into(), json!(round(open_s, 2)));
    out.insert("conns_per_s".into(), json!(round(held as f64 / open_s.max(1e-9), 1)));
    if let (Some(b), Some(a)) = (server_cpu_before, server_cpu_opened)
        && held > 0
    {
        out.insert(
            "server_cpu_us_per_conn".into(),
            json!(round(a.saturating_sub(b) as f64 / held as f64, 1)),
        );
    }
    out.insert("open_failures".into(), failures.into());
    if let Some(first) = &first_failure {
        out.insert("first_open_failure".into(), first.clone().into());
    }
    let per_conn = |b: u64, a: u64| per_conn_figure(b, a, held);
    server_memory_per_conn(&mut out, before.server, after.server, held);
    if let (Some(b), Some(a)) = (before.pss_kb, after.pss_kb) {
        out.insert("pss_kb_per_conn".into(), per_conn(b, a));
    }
    out.insert("client_rss_kb_per_conn".into(), per_conn(before.client_rss_kb, after.client_rss_kb));
    if let (Some(b), Some(a)) = (before.tcp, after.tcp) {
        let page = page_size();
        out.insert("tcp_inuse_added".into(), json!(a.inuse as i64 - b.inuse as i64));
        out.insert("tcp_mem_pages_before".into(), b.mem_pages.into());
        out.insert("tcp_mem_pages_after".into(), a.mem_pages.into());
        out.insert("sock_mem_bytes_per_conn".into(), per_conn(b.mem_pages * page, a.mem_pages * page));
    }
    if let (Some(b), Some(a)) = (before.slab_kb, after.slab_kb) {
        out.insert("slab_kb_per_conn".into(), per_conn(b, a));
    }
    if let (Some(b), Some(a)) = (before.available_kb, after.available_kb) {
        out.insert("mem_available_before_mib".into(), (b / 1024).into());
        out.insert("mem_available_after_mib".into(), (a / 1024).into());
        // What the machine as a whole gave per connection (server, client and kernel);
        // other work on the machine moves it too.
        out.insert("mem_available_kb_per_conn".into(), per_conn(a, b));
    }
    out.insert("min_available_mib".into(), (plan.min_available_kb / 1024).into());
    out.insert("client_nofile".into(), client_nofile.into());
    if let Some(limit) = server_nofile {
        out.insert("server_nofile".into(), limit.into());
    }
    if let Some(fds) = server_fds {
        out.insert("server_fds".into(), fds.into());
    }
    if let Some(maps) = server_maps {
        out.insert("server_maps".into(), maps.into());
    }
    if let Ok(max) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        && let Ok(max) = max.trim().parse::<u64>()
    {
        out.insert("max_map_count".into(), max.into());
    }
    if let Some(text) = &metrics {
        for (key, name) in [
            ("live_instances", "sockhost_addon_live_instances"),
            ("hibernated_connections", "sockhost_addon_hibernated_connections"),
            ("instance_slots", "sockhost_instance_slots"),
        ] {
            if let Some(v) = metric_sum(text, name) {
                out.insert(key.into(), json!(v));
            }
        }
    }

    // The echo round trip on `active` of the held connections (open loop at a fixed rate,
    // as `paced`), while the others stay held.
    let _ = start_tx.send(true);
    let mut active_ws = Vec::with_capacity(active.len());
    for task in active {
        if let Ok(Some(ws)) = task.await {
            active_ws.push(ws);
        }
    }
    let n_active = active_ws.len();
    out.insert("active_conns".into(), n_active.into());
    out.insert("active_rate".into(), json!(plan.active_rate));
    if n_active > 0 && plan.active_rate > 0.0 && !health.low_memory.load(Ordering::Relaxed) {
        let flags = Arc::new(Flags::default());
        let period = Duration::from_secs_f64(n_active as f64 / plan.active_rate);
        let start = Instant::now() + Duration::from_millis(10);
        let tasks: Vec<_> = active_ws
            .into_iter()
            .enumerate()
            .map(|(i, ws)| {
                let first = start + period.mul_f64(i as f64 / n_active as f64);
                tokio::spawn(paced_conn(ws, plan.message.clone(), plan.reply, period, first, flags.clone()))
            })
            .collect();
        let (before, after) = window(pids, &flags, plan.active_warmup, plan.active_secs).await?;
        let (tally, errors, first_error) = gather(tasks, Duration::from_secs(5)).await;
        out.insert("active_sent".into(), tally.sent.into());
        out.insert("active_missing".into(), tally.sent.saturating_sub(tally.messages).into());
        out.insert("active_errors".into(), errors.into());
        if let Some(err) = first_error {
            out.insert("active_first_error".into(), err.into());
        }
        if let (Some(b), Some(a)) = (before.server, after.server)
            && tally.sent > 0
        {
            let us = a.cpu_us.saturating_sub(b.cpu_us) as f64;
            out.insert("server_cpu_us_per_msg".into(), json!(round(us / tally.sent as f64, 2)));
        }
        percentiles(&mut out, "echo_", &tally.hist);
    } else {
        percentiles(&mut out, "echo_", &histogram());
    }

    health.stop.store(true, Ordering::Relaxed);
    let _ = watcher.await;
    out.insert("held_dropped".into(), dropped.count.load(Ordering::Relaxed).into());
    if let Some(first) = dropped.first.lock().unwrap().clone() {
        out.insert("held_first_drop".into(), first.into());
    }
    out.insert("healthz_probes".into(), health.probes.load(Ordering::Relaxed).into());
    out.insert("healthz_failures".into(), health.failures.load(Ordering::Relaxed).into());
    out.insert(
        "healthz_worst_ms".into(),
        json!(round(health.worst_us.load(Ordering::Relaxed) as f64 / 1e3, 1)),
    );
    if let Some(first) = health.first_failure.lock().unwrap().clone() {
        out.insert("healthz_first_failure".into(), first.into());
    }
    let lowest = health.lowest_available_kb.load(Ordering::Relaxed);
    if lowest != u64::MAX {
        out.insert("mem_available_lowest_mib".into(), (lowest / 1024).into());
    }
    out.insert("ended_early_low_memory".into(), health.low_memory.load(Ordering::Relaxed).into());
    errors_out(
        &mut out,
        failures + dropped.count.load(Ordering::Relaxed),
        first_failure.or_else(|| dropped.first.lock().unwrap().clone()),
    );

    // Resets every held connection at once (a polite close of 100,000 would take minutes).
    for task in &keepers {
        task.abort();
    }
    for task in keepers {
        let _ = task.await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publisher_url_turns_sub_into_pub() {
        assert_eq!(
            publisher_url("ws://127.0.0.1:1/ws/fanout?sub=bench").as_deref(),
            Some("ws://127.0.0.1:1/ws/fanout?pub=bench")
        );
        assert_eq!(
            publisher_url("ws://h:1/x?a=1&sub=c&sub=d").as_deref(),
            Some("ws://h:1/x?a=1&pub=c&sub=d")
        );
        assert_eq!(publisher_url("ws://h:1/x?pub=c"), None);
        assert_eq!(publisher_url("ws://h:1/x"), None);
    }

    #[test]
    fn http_targets_and_metric_sums() {
        let t = HttpTarget::parse("http://127.0.0.1:9000/healthz").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("127.0.0.1", 9000, "/healthz"));
        let t = HttpTarget::parse("http://localhost").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        assert!(HttpTarget::parse("https://x/").is_err());
        let text = "# TYPE sockhost_addon_live_instances gauge\n\
                    sockhost_addon_live_instances{addon=\"echo\"} 5\n\
                    sockhost_addon_live_instances{addon=\"mirror\"} 2\n\
                    sockhost_addon_live_instances_other 9\n\
                    sockhost_instance_slots 12000\n";
        assert_eq!(metric_sum(text, "sockhost_addon_live_instances"), Some(7.0));
        assert_eq!(metric_sum(text, "sockhost_instance_slots"), Some(12000.0));
        assert_eq!(metric_sum(text, "sockhost_nothing"), None);
    }

    #[test]
    fn fatal_open_errors_are_named() {
        let emfile =
            anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EMFILE)).context("TCP connect");
        assert!(fatal_open_error(&emfile).unwrap().starts_with("EMFILE"));
        let ws = anyhow::Error::from(WsError::Io(std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL)));
        assert!(fatal_open_error(&ws).unwrap().starts_with("EADDRNOTAVAIL"));
        let refused = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(fatal_open_error(&refused), None);
    }

    #[test]
    fn fanout_texts_round_trip() {
        let text = fanout_text('m', 17, 123_456_789, 32);
        assert_eq!(text.len(), 32);
        assert!(text.starts_with("m17:123456789:"));
        assert_eq!(parse_fanout(&text), Some((b'm', 17, 123_456_789)));
        // Longer than --size: the header is never cut.
        let text = fanout_text('r', 3, u64::MAX, 8);
        assert_eq!(parse_fanout(&text), Some((b'r', 3, u64::MAX)));
        assert_eq!(parse_fanout("hello"), None);
        assert_eq!(parse_fanout(""), None);
    }
}
