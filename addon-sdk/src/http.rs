//! Outbound HTTP from an addon, with a streaming response body.
//!
//! Requests go through the host's `wasi:http/outgoing-handler`, and only to origins the
//! addon's manifest lists in `outbound_hosts`; any other destination fails with
//! [`HttpErrorKind::Denied`] (and a line in the server's log). An addon whose manifest
//! lists no `outbound_hosts` at all does not get `wasi:http`: it loads and runs, but
//! [`Request::send`] traps (the connection closes with 1011, and the error names the
//! missing grant), so call it only when the addon is configured to. While the addon waits
//! for the upstream, only its own connection waits: other connections run on.
//!
//! ```no_run
//! use sockhost_addon_sdk::http::Request;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), sockhost_addon_sdk::http::HttpError> {
//! let response = Request::post("https://api.example.com/v1/chat/completions")
//!     .header("authorization", "Bearer sk-...")
//!     .json(&serde_json::json!({"stream": true}))
//!     .first_byte_timeout(Duration::from_secs(30))
//!     .send()?;
//! let status = response.status();
//! for chunk in response.into_chunks() {
//!     let chunk = chunk?; // bytes as they arrive
//! #   let _ = chunk;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Timeouts: connect, first byte (until the response head) and between bytes (silence
//! inside the body). Each is the smaller of what the request asks and what the manifest
//! allows (defaults 5 s, 60 s, 60 s).

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::__private::bindings::wasi::http::outgoing_handler;
use crate::__private::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions,
    Scheme,
};
use crate::__private::bindings::wasi::io::streams::{InputStream, StreamError};

/// What kind of failure an [`HttpError`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// The destination is not in the manifest's `outbound_hosts`.
    Denied,
    /// The URL or a header is malformed.
    InvalidRequest,
    /// No connection: refused, unreachable, DNS failure, TLS failure.
    Connect,
    /// A connect, first-byte or between-bytes timeout passed.
    Timeout,
    /// The connection broke or the upstream spoke broken HTTP, possibly mid-body.
    Protocol,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// What kind of failure.
    pub kind: HttpErrorKind,
    /// Details for logs and error frames.
    pub message: String,
}

impl HttpError {
    fn new(kind: HttpErrorKind, message: impl Into<String>) -> HttpError {
        HttpError { kind, message: message.into() }
    }

    fn from_code(code: ErrorCode) -> HttpError {
        use HttpErrorKind::*;
        let kind = match &code {
            ErrorCode::HttpRequestDenied => Denied,
            ErrorCode::DnsTimeout
            | ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::HttpResponseTimeout => Timeout,
            ErrorCode::DnsError(_)
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationUnavailable
            | ErrorCode::DestinationIpProhibited
            | ErrorCode::DestinationIpUnroutable
            | ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionLimitReached
            | ErrorCode::TlsProtocolError
            | ErrorCode::TlsCertificateError
            | ErrorCode::TlsAlertReceived(_) => Connect,
            ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestMethodInvalid => InvalidRequest,
            _ => Protocol,
        };
        let message = match code {
            ErrorCode::HttpRequestDenied => {
                "destination not allowed by the manifest's outbound_hosts".to_owned()
            }
            ErrorCode::ConnectionRefused => "connection refused".to_owned(),
            ErrorCode::ConnectionLimitReached => {
                "too many outbound requests open at once (the manifest's outbound_max_requests)".to_owned()
            }
            ErrorCode::ConnectionTimeout => "connect timeout".to_owned(),
            ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
                "timed out waiting for the response".to_owned()
            }
            ErrorCode::InternalError(Some(text)) => text,
            other => format!("{other:?}"),
        };
        HttpError { kind, message }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

/// An outgoing request, built step by step and sent with [`Request::send`].
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    connect_timeout: Option<Duration>,
    first_byte_timeout: Option<Duration>,
    between_bytes_timeout: Option<Duration>,
}

impl Request {
    /// A request with the given method and absolute `http://` or `https://` URL.
    pub fn new(method: &str, url: &str) -> Request {
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        Request {
            method,
            url: url.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
            connect_timeout: None,
            first_byte_timeout: None,
            between_bytes_timeout: None,
        }
    }

    /// A GET request.
    pub fn get(url: &str) -> Request {
        Request::new("GET", url)
    }

    /// A POST request.
    pub fn post(url: &str) -> Request {
        Request::new("POST", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and its content type.
    ///
    /// # Panics
    ///
    /// If `T`'s `Serialize` implementation fails, which is a bug in the addon.
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Request {
        let body = serde_json::to_vec(value).expect("value serializes to JSON");
        self.header("content-type", "application/json").body(body)
    }

    /// Caps the time to connect.
    pub fn connect_timeout(mut self, timeout: Duration) -> Request {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Caps the time from sending to the response head.
    pub fn first_byte_timeout(mut self, timeout: Duration) -> Request {
        self.first_byte_timeout = Some(timeout);
        self
    }

    /// Caps the silence allowed between parts of the response body.
    pub fn between_bytes_timeout(mut self, timeout: Duration) -> Request {
        self.between_bytes_timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the response head. The body is read afterwards,
    /// from the [`Response`], as it arrives.
    pub fn send(self) -> Result<Response, HttpError> {
        let url = Url::parse(&self.url)?;
        let mut headers = self.headers;
        if !self.body.is_empty() || matches!(self.method, Method::Post | Method::Put | Method::Patch) {
            headers.push(("content-length".to_owned(), self.body.len().to_string().into_bytes()));
        }
        let fields = Fields::from_list(&headers)
            .map_err(|err| HttpError::new(HttpErrorKind::InvalidRequest, format!("bad header: {err:?}")))?;
        let request = OutgoingRequest::new(fields);
        let invalid = |what: &str| {
            HttpError::new(HttpErrorKind::InvalidRequest, format!("invalid {what} in {:?}", self.url))
        };
        request.set_method(&self.method).map_err(|()| invalid("method"))?;
        request
            .set_scheme(Some(&if url.https { Scheme::Https } else { Scheme::Http }))
            .map_err(|()| invalid("scheme"))?;
        request.set_authority(Some(&url.authority)).map_err(|()| invalid("host"))?;
        request.set_path_with_query(Some(&url.path)).map_err(|()| invalid("path"))?;

        let options = RequestOptions::new();
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The host caps each of these by the manifest; setting one can only shorten it.
        if let Some(t) = self.connect_timeout {
            let _ = options.set_connect_timeout(Some(nanos(t)));
        }
        if let Some(t) = self.first_byte_timeout {
            let _ = options.set_first_byte_timeout(Some(nanos(t)));
        }
        if let Some(t) = self.between_bytes_timeout {
            let _ = options.set_between_bytes_timeout(Some(nanos(t)));
        }

        let outgoing_body = request.body().map_err(|()| invalid("body"))?;
        let future = outgoing_handler::handle(request, Some(options)).map_err(HttpError::from_code)?;
        // Writing the body fails when the request itself failed (denied, refused); the
        // response future then holds the real cause, so it is consulted first.
        let written = (|| {
            let stream = outgoing_body.write().map_err(|()| invalid("body"))?;
            for chunk in self.body.chunks(4096) {
                stream.blocking_write_and_flush(chunk).map_err(stream_error)?;
            }
            drop(stream);
            OutgoingBody::finish(outgoing_body, None).map_err(HttpError::from_code)
        })();

        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(HttpError::from_code(code)),
            Some(Err(())) | None => {
                return Err(HttpError::new(HttpErrorKind::Protocol, "response already taken"));
            }
        };
        written?;
        Response::new(response)
    }
}

/// A response whose head has arrived; the body streams.
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    // Field order matters: the stream is a child of the body, the body of the response,
    // and children must be dropped first.
    stream: Option<InputStream>,
    body: Option<IncomingBody>,
    _response: IncomingResponse,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response").field("status", &self.status).field("headers", &self.headers).finish()
    }
}

impl Response {
    fn new(response: IncomingResponse) -> Result<Response, HttpError> {
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
            .collect();
        let body =
            response.consume().map_err(|()| HttpError::new(HttpErrorKind::Protocol, "body already taken"))?;
        let stream =
            body.stream().map_err(|()| HttpError::new(HttpErrorKind::Protocol, "body already taken"))?;
        Ok(Response { status, headers, stream: Some(stream), body: Some(body), _response: response })
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of header `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The next part of the body as it arrives, `None` at its end.
    pub fn next_chunk(&mut self) -> Option<Result<Vec<u8>, HttpError>> {
        let stream = self.stream.as_ref()?;
        match stream.blocking_read(16 * 1024) {
            Ok(bytes) => Some(Ok(bytes)),
            Err(StreamError::Closed) => {
                self.stream = None;
                self.body = None;
                None
            }
            Err(err) => {
                self.stream = None;
                Some(Err(stream_error(err)))
            }
        }
    }

    /// The body as an iterator of parts, each as soon as it arrives.
    pub fn into_chunks(mut self) -> impl Iterator<Item = Result<Vec<u8>, HttpError>> {
        std::iter::from_fn(move || self.next_chunk())
    }

    /// Reads the whole body, failing if it is longer than `limit` bytes.
    pub fn into_bytes(mut self, limit: usize) -> Result<Vec<u8>, HttpError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk() {
            all.extend_from_slice(&chunk?);
            if all.len() > limit {
                return Err(HttpError::new(
                    HttpErrorKind::Protocol,
                    format!("response body longer than {limit} bytes"),
                ));
            }
        }
        Ok(all)
    }
}

fn stream_error(err: StreamError) -> HttpError {
    match err {
        StreamError::Closed => HttpError::new(HttpErrorKind::Protocol, "stream closed"),
        StreamError::LastOperationFailed(err) => {
            match crate::__private::bindings::wasi::http::types::http_error_code(&err) {
                Some(code) => HttpError::from_code(code),
                None => HttpError::new(HttpErrorKind::Protocol, err.to_debug_string()),
            }
        }
    }
}

/// The parts of an absolute URL the request needs.
#[derive(Debug, PartialEq)]
struct Url {
    https: bool,
    authority: String,
    path: String,
}

impl Url {
    fn parse(url: &str) -> Result<Url, HttpError> {
        let bad =
            |why: &str| HttpError::new(HttpErrorKind::InvalidRequest, format!("invalid URL {url:?}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(bad("the scheme is not http or https")),
        };
        let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("no host, or user info in the host"));
        }
        let path = path.split('#').next().unwrap_or("");
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Ok(Url { https, authority: authority.to_owned(), path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let url = Url::parse("https://api.example.com/v1/chat?x=1#frag").unwrap();
        assert_eq!(
            url,
            Url { https: true, authority: "api.example.com".into(), path: "/v1/chat?x=1".into() }
        );
        let url = Url::parse("http://127.0.0.1:8081").unwrap();
        assert_eq!(url, Url { https: false, authority: "127.0.0.1:8081".into(), path: "/".into() });
        assert_eq!(Url::parse("http://h?q").unwrap().path, "/?q");
        for bad in ["api.example.com/x", "ftp://h/x", "http:///x", "http://user@h/"] {
            assert_eq!(Url::parse(bad).unwrap_err().kind, HttpErrorKind::InvalidRequest, "{bad}");
        }
    }
}
