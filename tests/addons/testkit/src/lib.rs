//! The addon the end-to-end tests drive: each text command exercises one part of the host.
//! Commands: count, stream, error, trap, info, close, print, log, flood, `get <url>`,
//! `hold <n> <url>`, `kv-set <key> <value>`, `kv-get <key>`, `sub <channel>`,
//! `unsub <channel>`, `pub <channel> <text>`, `sleep <ms>` (then `slept`, ignoring a
//! failed send), `burn <busy_ms> <sleep_ms> <rounds>` (busy, then asleep, that many times;
//! then `burned`), `burst <n>` (n frames `1`..`n` in one go), `numbered <n> <bytes>` (n frames of
//! that size, each starting with its index and a space, then `numbered done`), `spin <ms>` (`spinning`,
//! then that long busy, then `spun`), `pub-bin <channel> <bytes>` (that many zero
//! bytes), `fields <n>` (creates `n` wasi:http `fields` resources and holds them: `fields
//! <n> held`), `headers <n> <bytes>` (appends up to `n` headers of `bytes` bytes each to one
//! `fields`: `headers <accepted>`, or `headers <accepted> stopped: <error>`), `body-budget`
//! (what `check-write` grants on a new outgoing request body: `body budget <bytes>`);
//! `?refuse=1` in the query refuses the connection, `?slow=<ms>` makes every
//! channel delivery take that long, `?tag=<text>` tags the on-close log line. Deliveries reach the client as
//! `chan <channel> <text>` (or `chan <channel> <n> bytes`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use sockhost_addon_sdk::__private::bindings::wasi::http::types::{Fields, OutgoingRequest};
use sockhost_addon_sdk::http::{Request, Response};
use sockhost_addon_sdk::{
    Addon, ConnectionInfo, Error, Message, Refusal, channels, close, connection_info, export_addon, kv, log,
    send_json, send_text,
};

/// Hibernates whole: `count` is what the host's tests watch to prove that the state
/// survives a hibernation, and `slow_ms` and `tag` come from the query, which `on_open`
/// (not called again on wake) read.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Testkit {
    count: u64,
    /// `?slow=<ms>`: how long each channel delivery takes.
    slow_ms: u64,
    /// `?tag=<text>`: added to the on-close log line, so a test can find its own among
    /// the lines of every server in the test process.
    tag: String,
}

impl Addon for Testkit {
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        if info.query.split('&').any(|pair| pair == "refuse=1") {
            return Err(Refusal::new(4003, "refused by testkit"));
        }
        self.slow_ms = info.query_param("slow").and_then(|ms| ms.parse().ok()).unwrap_or(0);
        self.tag = info.query_param("tag").unwrap_or_default();
        // A client that left during the handshake is not a reason to refuse.
        let _ = send_text("open");
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let Message::Text(command) = msg else {
            return Err(Error::msg("testkit: binary frames are not commands"));
        };
        match command.as_str() {
            "count" => {
                self.count += 1;
                send_text(&self.count.to_string())?;
            }
            "stream" => {
                send_text("first")?;
                // On wasip2 this waits on the WASI monotonic clock: the host must not block
                // a thread for it.
                std::thread::sleep(Duration::from_millis(200));
                send_text("second")?;
            }
            "error" => return Err(Error::msg("testkit: asked to fail")),
            "trap" => panic!("testkit: asked to trap"),
            "info" => send_json(&connection_info())?,
            "close" => close(4000, "bye"),
            "print" => {
                println!("testkit stdout line");
                eprintln!("testkit stderr line");
                send_text("printed")?;
            }
            "log" => {
                log::info("testkit log line");
                send_text("logged")?;
            }
            "flood" => {
                // Sends until the host cuts off a client that does not read.
                let frame = "x".repeat(16 * 1024);
                let mut sent = 0u64;
                while send_text(&frame).is_ok() {
                    sent += 1;
                }
                log::info(&format!("testkit flood stopped after {sent} frames"));
            }
            other => match other.split_once(' ') {
                Some(("hold", args)) => hold_requests(args)?,
                Some(("kv-set", args)) => {
                    let (key, value) = args.split_once(' ').unwrap_or((args, ""));
                    match kv::set(key, value.as_bytes()) {
                        Ok(()) => send_text("kv ok")?,
                        Err(err) => send_text(&format!("kv error: {err}"))?,
                    }
                }
                Some(("kv-get", key)) => match kv::get(key) {
                    Ok(Some(value)) => send_text(&format!("kv value {}", String::from_utf8_lossy(&value)))?,
                    Ok(None) => send_text("kv none")?,
                    Err(err) => send_text(&format!("kv error: {err}"))?,
                },
                Some(("sleep", ms)) => {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                    let _ = send_text("slept");
                }
                Some(("burn", args)) => {
                    let numbers: Vec<u64> = args.split(' ').filter_map(|n| n.parse().ok()).collect();
                    let [busy_ms, sleep_ms, rounds] = numbers[..] else {
                        return Err(Error::msg("usage: burn <busy_ms> <sleep_ms> <rounds>"));
                    };
                    for _ in 0..rounds {
                        let start = std::time::Instant::now();
                        while start.elapsed() < Duration::from_millis(busy_ms) {
                            std::hint::spin_loop();
                        }
                        std::thread::sleep(Duration::from_millis(sleep_ms));
                    }
                    send_text("burned")?;
                }
                Some(("burst", n)) => {
                    for i in 1..=n.parse::<u32>().unwrap_or(0) {
                        send_text(&i.to_string())?;
                    }
                }
                Some(("numbered", args)) => {
                    // n frames of `bytes` bytes each, the first word of each its index.
                    let (n, bytes) = args.split_once(' ').unwrap_or((args, "0"));
                    let bytes = bytes.parse::<usize>().unwrap_or(0);
                    for i in 1..=n.parse::<u32>().unwrap_or(0) {
                        let mut frame = format!("{i} ");
                        frame.extend(std::iter::repeat_n('x', bytes.saturating_sub(frame.len())));
                        send_text(&frame)?;
                    }
                    send_text("numbered done")?;
                }
                Some(("spin", ms)) => {
                    send_text("spinning")?;
                    let start = std::time::Instant::now();
                    while start.elapsed() < Duration::from_millis(ms.parse().unwrap_or(0)) {
                        std::hint::spin_loop();
                    }
                    send_text("spun")?;
                }
                Some(("sub", channel)) => match channels::subscribe(channel) {
                    Ok(()) => send_text(&format!("subscribed {channel}"))?,
                    Err(err) => send_text(&format!("channel error: {err:?}"))?,
                },
                Some(("unsub", channel)) => {
                    channels::unsubscribe(channel);
                    send_text(&format!("unsubscribed {channel}"))?;
                }
                Some(("pub", args)) => {
                    let (channel, text) = args.split_once(' ').unwrap_or((args, ""));
                    match channels::publish_text(channel, text) {
                        Ok(()) => send_text("published")?,
                        Err(err) => send_text(&format!("channel error: {err:?}"))?,
                    }
                }
                Some(("pub-bin", args)) => {
                    let (channel, size) = args.split_once(' ').unwrap_or((args, "0"));
                    let data = vec![0u8; size.parse().unwrap_or(0)];
                    match channels::publish(channel, &Message::Binary(data)) {
                        Ok(()) => send_text("published")?,
                        Err(err) => send_text(&format!("channel error: {err:?}"))?,
                    }
                }
                Some(("fields", n)) => {
                    let n: usize = n.parse().map_err(|_| Error::msg("fields: <n> is not a number"))?;
                    let held: Vec<Fields> = (0..n).map(|_| Fields::new()).collect();
                    send_text(&format!("fields {} held", held.len()))?;
                }
                Some(("headers", args)) => {
                    let (n, bytes) = args.split_once(' ').unwrap_or((args, "0"));
                    let n: usize = n.parse().map_err(|_| Error::msg("headers: <n> is not a number"))?;
                    let value = vec![b'a'; bytes.parse().unwrap_or(0)];
                    let fields = Fields::new();
                    let mut accepted = 0;
                    let mut stopped = None;
                    for i in 0..n {
                        match fields.append(&format!("x-h{i}"), &value) {
                            Ok(()) => accepted += 1,
                            Err(err) => {
                                stopped = Some(format!("{err:?}"));
                                break;
                            }
                        }
                    }
                    match stopped {
                        Some(err) => send_text(&format!("headers {accepted} stopped: {err}"))?,
                        None => send_text(&format!("headers {accepted}"))?,
                    }
                }
                Some(("get", url)) => match Request::get(url).send() {
                    Ok(response) => send_text(&format!("status {}", response.status()))?,
                    Err(err) => send_text(&format!("error {:?}: {err}", err.kind))?,
                },
                _ if other == "body-budget" => {
                    let request = OutgoingRequest::new(Fields::new());
                    let body = request.body().map_err(|()| Error::msg("body-budget: no body"))?;
                    let stream = body.write().map_err(|()| Error::msg("body-budget: no stream"))?;
                    let budget = stream.check_write().map_err(|err| Error::msg(format!("{err:?}")))?;
                    send_text(&format!("body budget {budget}"))?;
                }
                _ => send_text(&format!("unknown: {other}"))?,
            },
        }
        Ok(())
    }

    fn on_channel_message(&mut self, channel: &str, msg: Message) {
        if self.slow_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.slow_ms));
        }
        let _ = match msg {
            Message::Text(text) => send_text(&format!("chan {channel} {text}")),
            Message::Binary(data) => send_text(&format!("chan {channel} {} bytes", data.len())),
        };
    }

    fn on_close(&mut self, code: u16, reason: &str) {
        log::info(&format!("testkit on-close code={code} reason={reason} tag={}", self.tag));
    }
}

/// `hold <n> <url>`: opens `n` streamed requests to `url` one after another, keeping every
/// response open (a frame per request: `open <i>` or `refused <i>: <error>`), then drops
/// them all and opens one more (`open after release`, or `refused after release: ...`
/// if no slot came back within two seconds).
fn hold_requests(args: &str) -> Result<(), Error> {
    let (n, url) = args.split_once(' ').ok_or_else(|| Error::msg("usage: hold <n> <url>"))?;
    let n: usize = n.parse().map_err(|_| Error::msg("hold: <n> is not a number"))?;
    // A chat request the test's fake model answers with one chunk, then holds open.
    const BODY: &str = r#"{"stream":true,"messages":[{"role":"user","content":"gated"}]}"#;
    let request = || Request::post(url).header("content-type", "application/json").body(BODY);
    let mut open: Vec<Response> = Vec::new();
    for i in 0..n {
        match request().send() {
            Ok(response) => {
                open.push(response);
                send_text(&format!("open {i}"))?;
            }
            Err(err) => send_text(&format!("refused {i}: {err}"))?,
        }
    }
    drop(open);
    // A slot comes back when the host's side of the dropped response has wound down,
    // which may take a moment after the guest lets go of it.
    let mut last = None;
    for _ in 0..40 {
        match request().send() {
            Ok(_response) => return Ok(send_text("open after release")?),
            Err(err) => last = Some(err),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = last.map(|err| err.to_string()).unwrap_or_default();
    Ok(send_text(&format!("refused after release: {err}"))?)
}

export_addon!(Testkit, hibernate);
