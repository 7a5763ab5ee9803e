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
//! The built-in `/ws` endpoint of sockhost greets every connection with one frame before
//! echoing: it is skipped (`--skip`, default 1 on a `/ws` path, else 0).
//!
//! ```text
//! loadgen --url ws://127.0.0.1:9001/ws/echo --pid 1234 --tag server=native closed --conns 100 --duration 5
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::stream::{self, StreamExt};
use futures_util::{SinkExt, Stream};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use sockhost_bench::{ProcSample, payload, pss_kb, sample, ws_config};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{MissedTickBehavior, interval_at, sleep};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
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
        tcp.set_nodelay(true)?;
        let request = self.url.as_str().into_client_request()?;
        let (mut ws, _) =
            client_async_with_config(request, tcp, Some(ws_config())).await.context("WebSocket upgrade")?;
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
        Mode::Storm { duration, warmup, concurrency, count: None } => {
            storm(&target, pids, concurrency, secs(warmup), secs(duration)).await
        }
        Mode::Storm { concurrency, count: Some(count), .. } => {
            storm_count(&target, pids, concurrency, count).await
        }
        Mode::Fanout { .. } => unreachable!("handled above"),
    }
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
    let per_conn = |b: u64, a: u64| {
        if n == 0 { Value::Null } else { json!(round((a as f64 - b as f64) / n as f64, 2)) }
    };
    if let (Some(b), Some(a)) = (before.server, after.server) {
        out.insert("rss_before_kb".into(), b.rss_kb.into());
        out.insert("rss_after_kb".into(), a.rss_kb.into());
        out.insert("rss_kb_per_conn".into(), per_conn(b.rss_kb, a.rss_kb));
        out.insert("rss_anon_kb_per_conn".into(), per_conn(b.rss_anon_kb, a.rss_anon_kb));
        out.insert("rss_shared_kb_per_conn".into(), per_conn(b.rss_shared_kb, a.rss_shared_kb));
    }
    if let (Some(b), Some(a)) = (pss_before, pss_after) {
        out.insert("pss_kb_per_conn".into(), per_conn(b, a));
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
