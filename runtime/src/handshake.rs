//! The HTTP side of a connection: reading the request head, answering plain HTTP, and
//! accepting a WebSocket upgrade.
//!
//! The server reads the request head itself (instead of letting tungstenite do the whole
//! handshake) so that it can route before upgrading: an unknown path gets 404, a plain
//! HTTP request to a WebSocket path gets a 426 that says what to do, and an addon that
//! cannot get an instance gets 503, all as ordinary HTTP responses a browser or `curl`
//! shows. Only then is `101 Switching Protocols` written and the socket handed to
//! tungstenite, together with any bytes the client sent after the head.

use std::borrow::Cow;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest request head accepted. Browsers send well under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 64;

/// Request headers passed on to addons in `connection-info.headers`.
pub const FORWARDED_HEADERS: [&str; 6] =
    ["origin", "user-agent", "x-forwarded-for", "x-real-ip", "accept-language", "sec-websocket-protocol"];

/// A parsed HTTP request head.
#[derive(Debug)]
pub struct RequestHead {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Header names lowercased, in request order.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first value of a header, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether the request asks for a WebSocket (`Upgrade: websocket`).
    pub fn wants_websocket(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The headers addons may see.
    pub fn forwarded_headers(&self) -> Vec<(String, String)> {
        self.headers.iter().filter(|(n, _)| FORWARDED_HEADERS.contains(&n.as_str())).cloned().collect()
    }
}

/// Why a request head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed before the request head was complete")]
    Eof,
    #[error("request head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads one request head. Returns it and the bytes that followed it, which belong to
/// the WebSocket stream.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(RequestHead, Vec<u8>), HeadError> {
    let mut head = HeadBuffer::default();
    loop {
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeadError::Eof);
        }
        if let Some(done) = head.feed(&chunk[..n])? {
            return Ok(done);
        }
    }
}

/// How much a head may grow between two parses while its end has not arrived: garbage
/// is still refused early, and a client dripping a head a byte at a time costs a parse
/// per KiB, not one per byte (which made a 16 KiB head cost 16 K parses of up to 16 KiB).
const REPARSE_EVERY: usize = 1024;

/// A request head arriving in pieces. Each piece is scanned once for the blank line that
/// ends a head; the whole head is parsed only on the first piece (to refuse garbage at
/// once), when the end has arrived, and at every [`REPARSE_EVERY`] bytes of growth.
#[derive(Default)]
pub(crate) struct HeadBuffer {
    buf: Vec<u8>,
    /// Length of `buf` when it was last parsed.
    parsed_at: usize,
    /// How many times the head was parsed (for the test that bounds it).
    parses: usize,
}

impl HeadBuffer {
    /// Adds `piece`; returns the head and the bytes after it once it is complete.
    pub(crate) fn feed(&mut self, piece: &[u8]) -> Result<Option<(RequestHead, Vec<u8>)>, HeadError> {
        // The end marker may straddle pieces: look back 3 bytes.
        let scan_from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(piece);
        let ended = has_blank_line(&self.buf[scan_from..]);
        let first = self.parses == 0;
        let grown = self.buf.len() - self.parsed_at >= REPARSE_EVERY || self.buf.len() >= MAX_HEAD_BYTES;
        if !(ended || first || grown) {
            return Ok(None);
        }
        self.parsed_at = self.buf.len();
        self.parses += 1;
        match parse_head(&self.buf)? {
            Some((head, len)) => Ok(Some((head, self.buf.split_off(len)))),
            None => Ok(None),
        }
    }
}

/// Whether `bytes` hold the blank line that ends a head (`\r\n\r\n`, or `\n\n`, which
/// httparse accepts too).
fn has_blank_line(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && bytes.get(i + 2) == Some(&b'\n')))
}

/// Parses a request head from the start of `buf`: `None` while it is incomplete, else the
/// head and its length in bytes. Never panics, whatever the bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((to_head(&request)?, len))),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(err) => Err(HeadError::Malformed(err.to_string())),
    }
}

fn to_head(request: &httparse::Request<'_, '_>) -> Result<RequestHead, HeadError> {
    let method = request.method.unwrap_or_default().to_owned();
    let target = request.path.unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = Vec::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HeadError::Malformed(format!("header {} is not UTF-8", header.name)))?;
        headers.push((header.name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(RequestHead { method, path: path.to_owned(), query: query.to_owned(), headers })
}

/// A plain HTTP answer instead of an upgrade.
#[derive(Debug)]
pub struct Rejection {
    pub status: u16,
    pub message: String,
    /// Extra response headers, e.g. `Upgrade: websocket` on 426.
    pub headers: Vec<(&'static str, &'static str)>,
}

impl Rejection {
    pub fn new(status: u16, message: impl Into<String>) -> Rejection {
        Rejection { status, message: message.into(), headers: Vec::new() }
    }
}

/// Checks that `head` is a valid WebSocket upgrade (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Key`.
pub fn check_upgrade(head: &RequestHead) -> Result<&str, Rejection> {
    if !head.wants_websocket() {
        let mut rejection = Rejection::new(
            426,
            format!(
                "{} is a WebSocket endpoint. Connect with a WebSocket client, e.g. new WebSocket('ws://<host>{}').",
                head.path, head.path
            ),
        );
        rejection.headers.push(("Upgrade", "websocket"));
        return Err(rejection);
    }
    if head.method != "GET" {
        let mut rejection =
            Rejection::new(405, format!("a WebSocket upgrade must use GET, not {}", head.method));
        rejection.headers.push(("Allow", "GET"));
        return Err(rejection);
    }
    if !head.header_has_token("connection", "upgrade") {
        return Err(Rejection::new(400, "the upgrade request lacks `Connection: Upgrade`"));
    }
    if head.header("sec-websocket-version") != Some("13") {
        let mut rejection =
            Rejection::new(426, "unsupported WebSocket version; this server speaks version 13");
        rejection.headers.push(("Sec-WebSocket-Version", "13"));
        return Err(rejection);
    }
    match head.header("sec-websocket-key") {
        Some(key) if !key.is_empty() => Ok(key),
        _ => Err(Rejection::new(400, "the upgrade request lacks Sec-WebSocket-Key")),
    }
}

/// Writes a plain-text HTTP response and closes the write side.
pub async fn write_rejection<S: AsyncWrite + Unpin>(stream: &mut S, rejection: &Rejection) -> io::Result<()> {
    let body = format!("{}\n", rejection.message);
    write_response(stream, rejection.status, "text/plain; charset=utf-8", &rejection.headers, &body).await
}

/// Writes a complete HTTP response with `body`, then closes the write side: the server
/// answers one request per connection outside WebSocket upgrades.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<()> {
    write_http(stream, status, content_type, headers, body, true).await
}

/// [`write_response`], with the body left out when `send_body` is false (the answer to
/// `HEAD`, whose `Content-Length` is still the body's).
async fn write_http<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &str,
    send_body: bool,
) -> io::Result<()> {
    let mut response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        status,
        reason_phrase(status),
        body.len()
    );
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    if send_body {
        response.push_str(body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// A complete plain-HTTP answer, built before it is written: what the admin listener and
/// the web pages ([`crate::web`]) return from their routing.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: &'static str,
    pub(crate) headers: Vec<(&'static str, &'static str)>,
    /// Embedded pages are `'static` and never copied; JSON is built per request.
    pub(crate) body: Cow<'static, str>,
    /// `false` answers `HEAD`: the head only.
    pub(crate) send_body: bool,
}

impl Answer {
    pub(crate) fn new(status: u16, content_type: &'static str, body: impl Into<Cow<'static, str>>) -> Answer {
        Answer { status, content_type, headers: Vec::new(), body: body.into(), send_body: true }
    }

    /// `value` as the body, `application/json`.
    pub(crate) fn json(status: u16, value: serde_json::Value) -> Answer {
        Answer::new(status, "application/json", format!("{value}\n"))
    }

    /// `{"error": message}`.
    pub(crate) fn error(status: u16, message: &str) -> Answer {
        Answer::json(status, serde_json::json!({ "error": message }))
    }

    /// A line of plain text, as the public port's other refusals are.
    pub(crate) fn text(status: u16, message: impl std::fmt::Display) -> Answer {
        Answer::new(status, "text/plain; charset=utf-8", format!("{message}\n"))
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: &'static str) -> Answer {
        self.headers.push((name, value));
        self
    }

    /// Writes the answer and closes the write side.
    pub(crate) async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S) -> io::Result<()> {
        write_http(stream, self.status, self.content_type, &self.headers, &self.body, self.send_body).await
    }
}

/// Writes `101 Switching Protocols` for a checked upgrade request.
pub async fn write_switching_protocols<S: AsyncWrite + Unpin>(stream: &mut S, key: &str) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    stream.write_all(response.as_bytes()).await
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever arrives before the upgrade, parsing and checking it never panics.
        #[test]
        fn any_bytes_are_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((head, len))) = parse_head(&bytes) {
                prop_assert!(len <= bytes.len());
                let _ = check_upgrade(&head);
            }
        }

        /// Valid-looking requests with arbitrary paths and header values.
        #[test]
        fn arbitrary_paths_and_headers_never_panic(path in "/[ -~]{0,40}", value in "[ -~]{0,40}") {
            let request = format!("GET {path} HTTP/1.1\r\nUpgrade: {value}\r\nConnection: {value}\r\nSec-WebSocket-Key: {value}\r\n\r\n");
            if let Ok(Some((head, _))) = parse_head(request.as_bytes()) {
                let _ = check_upgrade(&head);
            }
        }
    }

    #[test]
    fn a_head_dripped_a_byte_at_a_time_is_parsed_a_few_times_not_once_per_byte() {
        let mut request = b"GET /ws/echo HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..30 {
            request.extend_from_slice(format!("X-Pad-{i}: {}\r\n", "y".repeat(280)).as_bytes());
        }
        request.extend_from_slice(b"\r");
        assert!(request.len() > 8_000 && request.len() < MAX_HEAD_BYTES);
        let mut head = HeadBuffer::default();
        for byte in &request {
            assert!(head.feed(std::slice::from_ref(byte)).unwrap().is_none(), "complete before its end");
        }
        // The last byte of the head arrives with the first bytes of the WebSocket stream.
        let (parsed, rest) = head.feed(b"\nafter").unwrap().expect("complete at its end");
        assert_eq!((parsed.path.as_str(), rest.as_slice()), ("/ws/echo", &b"after"[..]));
        assert!(head.parses <= request.len() / REPARSE_EVERY + 2, "{} parses", head.parses);
    }

    #[test]
    fn garbage_is_refused_on_the_first_piece_and_a_bare_newline_head_ends() {
        assert!(matches!(HeadBuffer::default().feed(b"\x16\x03\x01 hello"), Err(HeadError::Malformed(_))));
        let mut head = HeadBuffer::default();
        assert!(head.feed(b"GET / HTTP/1.1\n").unwrap().is_none());
        assert!(head.feed(b"Host: x\n\n").unwrap().is_some());
        // The end marker split across pieces is still found.
        let mut head = HeadBuffer::default();
        assert!(head.feed(b"GET / HTTP/1.1\r\nHost: x\r").unwrap().is_none());
        assert!(head.feed(b"\n\r").unwrap().is_none());
        assert!(head.feed(b"\n").unwrap().is_some());
    }

    fn head(method: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: method.into(),
            path: "/ws/echo".into(),
            query: String::new(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        }
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_browser_upgrade_passes() {
        assert_eq!(check_upgrade(&head("GET", &GOOD)).unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn plain_http_gets_426() {
        assert_eq!(check_upgrade(&head("GET", &[])).unwrap_err().status, 426);
    }

    #[test]
    fn each_bad_upgrade_is_named() {
        assert_eq!(check_upgrade(&head("POST", &GOOD)).unwrap_err().status, 405);
        let mut h = head("GET", &GOOD);
        h.headers.retain(|(n, _)| n != "connection");
        assert_eq!(check_upgrade(&h).unwrap_err().status, 400);
        let mut h = head("GET", &GOOD);
        h.headers.retain(|(n, _)| n != "sec-websocket-key");
        assert_eq!(check_upgrade(&h).unwrap_err().status, 400);
        let mut h = head("GET", &GOOD);
        h.headers[2].1 = "8".into();
        assert_eq!(check_upgrade(&h).unwrap_err().status, 426);
    }
}
