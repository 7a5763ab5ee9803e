//! A fake OpenAI-compatible chat-completions server on loopback, for aikefu's tests.
//!
//! It speaks real HTTP/1.1 over a real socket and streams Server-Sent Events with
//! chunked transfer encoding, as the real APIs do. What it does is chosen by the last
//! user message of each request, so one server can play every scenario:
//!
//! | the last user message contains | the fake |
//! |---|---|
//! | `gated` | streams one delta, then each further delta only when the test calls [`FakeLlm::release`] |
//! | `long` | streams [`LONG_REPLY`] (12 deltas) instead of [`REPLY`]; with `gated`, gated as above |
//! | `slow` | streams one delta, then waits until [`FakeLlm::release`] before the rest |
//! | `http500` | answers HTTP 500 with an OpenAI-style error body |
//! | `http401` | answers HTTP 401 with an OpenAI-style error body |
//! | `malformed` | streams an event whose data is not JSON |
//! | `cutoff` | streams one delta, then drops the connection mid-stream |
//! | `noanswer` | reads the request and never answers |
//! | anything else | streams [`REPLY`] in four deltas, then `[DONE]` |
//!
//! [`FakeLlm::gate_every_reply`] makes every reply behave as `gated`, whatever its text:
//! for a client (the browser test's) whose question is fixed.
//!
//! Every request is recorded (path, headers, JSON body) for the test to inspect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The deltas of the default reply.
pub const REPLY: [&str; 4] = ["Hello", ", this is", " the fake", " model."];

/// The deltas of a `long` reply: enough chunks to drop a client in the middle of.
pub const LONG_REPLY: [&str; 12] =
    ["c01 ", "c02 ", "c03 ", "c04 ", "c05 ", "c06 ", "c07 ", "c08 ", "c09 ", "c10 ", "c11 ", "c12."];

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `messages` of the request as (role, content) pairs.
    pub fn messages(&self) -> Vec<(String, String)> {
        self.body["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap_or("").to_owned(),
                            m["content"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub struct FakeLlm {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    gate: Arc<Semaphore>,
    gate_all: Arc<AtomicBool>,
}

impl FakeLlm {
    pub async fn start() -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let gate_all = Arc::new(AtomicBool::new(false));
        let (recorded, gates, all) = (requests.clone(), gate.clone(), gate_all.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let gated = all.load(Ordering::Relaxed);
                tokio::spawn(serve(stream, recorded.clone(), gates.clone(), gated));
            }
        });
        FakeLlm { addr, requests, gate, gate_all }
    }

    /// From now on every reply streams as a `gated` one does: one delta, then each
    /// further one only on [`FakeLlm::release`].
    pub fn gate_every_reply(&self) {
        self.gate_all.store(true, Ordering::Relaxed);
    }

    /// `http://127.0.0.1:<port>`, for `base_url` and `outbound_hosts`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets a `gated` or `slow` reply go one step further.
    pub fn release(&self, steps: usize) {
        self.gate.add_permits(steps);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    requests: Arc<Mutex<Vec<Recorded>>>,
    gate: Arc<Semaphore>,
    gate_all: bool,
) {
    let Some(request) = read_request(&mut stream).await else { return };
    let last_user = request
        .messages()
        .iter()
        .rev()
        .find(|(role, _)| role == "user")
        .map(|(_, content)| content.clone())
        .unwrap_or_default();
    requests.lock().unwrap().push(request);

    let error_response = |status: &str, message: &str| {
        let body = json!({"error": {"message": message, "type": "test"}}).to_string();
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if last_user.contains("http500") {
        let _ = stream
            .write_all(error_response("500 Internal Server Error", "the model is overloaded").as_bytes())
            .await;
        return;
    }
    if last_user.contains("http401") {
        let _ = stream.write_all(error_response("401 Unauthorized", "invalid api key").as_bytes()).await;
        return;
    }
    if last_user.contains("noanswer") {
        // Hold the connection open without a byte of response.
        let mut sink = [0u8; 1024];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        return;
    }

    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    if last_user.contains("malformed") {
        let _ = send_event(&mut stream, "{\"choices\": [ this is not json").await;
        let _ = stream.write_all(b"0\r\n\r\n").await;
        return;
    }
    let deltas: &[&str] = if last_user.contains("long") { &LONG_REPLY } else { &REPLY };
    for (index, delta) in deltas.iter().enumerate() {
        if index > 0 {
            if gate_all || last_user.contains("gated") || (index == 1 && last_user.contains("slow")) {
                gate.acquire().await.unwrap().forget();
            }
            if last_user.contains("cutoff") {
                // Half a chunk, then the socket goes away: a stream cut mid-way.
                let _ = stream.write_all(b"40\r\ndata: {\"choi").await;
                return;
            }
        }
        let data = json!({"choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": null}]})
            .to_string();
        if send_event(&mut stream, &data).await.is_err() {
            return;
        }
    }
    let last = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).to_string();
    let _ = send_event(&mut stream, &last).await;
    let _ = send_event(&mut stream, "[DONE]").await;
    let _ = stream.write_all(b"0\r\n\r\n").await;
}

/// Writes one SSE event as one HTTP chunk, and flushes it to the socket.
async fn send_event(stream: &mut TcpStream, data: &str) -> std::io::Result<()> {
    let event = format!("data: {data}\n\n");
    stream.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes()).await?;
    stream.flush().await
}

async fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split_whitespace().nth(1)?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers.iter().find(|(n, _)| n == "content-length")?.1.parse().ok()?;
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buffer[head_end..head_end + length]).unwrap_or(Value::Null);
    Some(Recorded { path, headers, body })
}
