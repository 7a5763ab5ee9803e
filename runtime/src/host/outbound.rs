//! Outbound HTTP: `wasi:http/outgoing-handler`, gated by the manifest's `outbound_hosts`.
//!
//! wasmtime-wasi-http implements the interface; this module owns the policy around it,
//! through the one hook every request passes ([`WasiHttpHooks::send_request`]):
//!
//! - **Allow-list.** A request leaves only when its scheme, host and port match an entry
//!   of `outbound_hosts`. Deny by default: no entry, no request. A denied request fails
//!   in the guest with `HTTP-request-denied` and leaves one `warn` line naming the
//!   destination, so an operator sees at once which grant is missing.
//! - **Timeouts.** Connect, first byte and between bytes: the smaller of what the
//!   request asks for and the manifest's limit, so an addon cannot wait on an upstream
//!   longer than its operator allows, but may ask for less. Connect, the TLS handshake
//!   and the response head share one deadline (connect + first byte), because the
//!   default sender has none on the handshake.
//! - **Open requests.** One instance may have `outbound_max_requests` (default 4) open at
//!   once, from sending to the end of the response; one more fails at once with
//!   `connection-limit-reached` and a `warn` line, so a runaway addon cannot open sockets
//!   without bound.
//!
//! Addresses are checked by name before resolution; `outbound_hosts` is the operator's
//! statement of which upstreams an addon talks to, not a defence against DNS that lies.
//! The body streams: wasmtime-wasi-http hands the guest each part of the response body
//! as it arrives, and the guest's reads park its fiber, never a runtime thread.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::uri::Scheme;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// The manifest's outbound HTTP grant: where an addon may send requests, and how long it
/// may wait for them.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundPolicy {
    hosts: Vec<AllowedHost>,
    /// `outbound_connect_timeout_ms`; default 5 s.
    pub connect_timeout: Duration,
    /// `outbound_first_byte_timeout_ms`: from sending the request to the response head;
    /// default 60 s (a language model may think a while before it answers).
    pub first_byte_timeout: Duration,
    /// `outbound_between_bytes_timeout_ms`: silence allowed inside a streamed body;
    /// default 60 s.
    pub between_bytes_timeout: Duration,
    /// `outbound_max_requests`: requests one instance may have open at once; default 4.
    pub max_requests: u32,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        OutboundPolicy {
            hosts: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(60),
            between_bytes_timeout: Duration::from_secs(60),
            max_requests: 4,
        }
    }
}

/// One `outbound_hosts` entry: `scheme://host[:port]`, where host may start with `*.`
/// to match any subdomain (not the bare domain).
#[derive(Debug, Clone, PartialEq)]
struct AllowedHost {
    https: bool,
    host: String,
    wildcard: bool,
    port: u16,
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<AllowedHost, String> {
        let example = "like \"https://api.example.com\" or \"http://127.0.0.1:8081\"";
        let (scheme, rest) =
            entry.split_once("://").ok_or_else(|| format!("{entry:?} has no scheme; write it {example}"))?;
        let https = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => false,
            other => return Err(format!("{entry:?}: scheme {other:?} is not http or https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("{entry:?} is not a bare origin; write it {example}"));
        }
        let authority: http::uri::Authority =
            rest.parse().map_err(|_| format!("{entry:?} is not a valid host[:port]; write it {example}"))?;
        let host = authority.host().to_ascii_lowercase();
        let (wildcard, host) = match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => (true, domain.to_owned()),
            _ if host.contains('*') => {
                return Err(format!("{entry:?}: a wildcard may only be a leading `*.`"));
            }
            _ => (false, host),
        };
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(AllowedHost { https, host, wildcard, port })
    }

    fn matches(&self, https: bool, host: &str, port: u16) -> bool {
        if self.https != https || self.port != port {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

impl OutboundPolicy {
    /// Builds the policy from the manifest's `outbound_hosts` and timeouts (milliseconds).
    pub(crate) fn from_manifest(
        hosts: Option<Vec<String>>,
        connect_ms: Option<u64>,
        first_byte_ms: Option<u64>,
        between_bytes_ms: Option<u64>,
    ) -> Result<OutboundPolicy, String> {
        let mut policy = OutboundPolicy::default();
        for entry in hosts.unwrap_or_default() {
            let allowed =
                AllowedHost::parse(&entry).map_err(|problem| format!("key `outbound_hosts`: {problem}"))?;
            policy.hosts.push(allowed);
        }
        for (key, value, target) in [
            ("outbound_connect_timeout_ms", connect_ms, &mut policy.connect_timeout),
            ("outbound_first_byte_timeout_ms", first_byte_ms, &mut policy.first_byte_timeout),
            ("outbound_between_bytes_timeout_ms", between_bytes_ms, &mut policy.between_bytes_timeout),
        ] {
            if let Some(ms) = value {
                if !(1..=3_600_000).contains(&ms) {
                    return Err(format!("key `{key}`: {ms} is outside 1..=3600000"));
                }
                *target = Duration::from_millis(ms);
            }
        }
        Ok(policy)
    }

    /// Sets `outbound_max_requests`.
    pub(crate) fn with_max_requests(mut self, max: Option<u32>) -> Result<OutboundPolicy, String> {
        if let Some(max) = max {
            if !(1..=100).contains(&max) {
                return Err(format!("key `outbound_max_requests`: {max} is outside 1..=100"));
            }
            self.max_requests = max;
        }
        Ok(self)
    }

    /// Whether any outbound request is allowed at all.
    pub fn is_granted(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// The allow-list as written back: `https://api.example.com:443`, one per entry.
    pub fn hosts(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| {
                let scheme = if h.https { "https" } else { "http" };
                let star = if h.wildcard { "*." } else { "" };
                format!("{scheme}://{star}{}:{}", h.host, h.port)
            })
            .collect()
    }

    /// Whether a request to `uri` may leave.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let https = match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            _ => return false,
        };
        let Some(authority) = uri.authority() else { return false };
        let host = authority.host().to_ascii_lowercase();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        self.hosts.iter().any(|allowed| allowed.matches(https, &host, port))
    }

    /// The request's timeouts, capped by the manifest's.
    fn cap(&self, asked: Option<RequestOptions>) -> RequestOptions {
        let asked = asked.unwrap_or_default();
        let min = |asked: Option<Duration>, limit: Duration| Some(asked.map_or(limit, |a| a.min(limit)));
        RequestOptions {
            connect_timeout: min(asked.connect_timeout, self.connect_timeout),
            first_byte_timeout: min(asked.first_byte_timeout, self.first_byte_timeout),
            between_bytes_timeout: min(asked.between_bytes_timeout, self.between_bytes_timeout),
        }
    }
}

/// The per-instance hook wasmtime-wasi-http calls for every outgoing request.
pub(crate) struct OutboundHooks {
    pub(crate) policy: Arc<OutboundPolicy>,
    pub(crate) addon: Arc<str>,
    pub(crate) conn: u64,
    /// Requests of this instance open now, against `policy.max_requests`.
    pub(crate) open: Arc<AtomicU32>,
}

/// One open request's place in its instance's count; given back on drop, whether the
/// request finished, failed or was abandoned.
struct OpenRequest(Arc<AtomicU32>);

impl OpenRequest {
    fn acquire(open: &Arc<AtomicU32>, max: u32) -> Option<OpenRequest> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| OpenRequest(open.clone()))
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type ResponseFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHooks {
    /// Small chunks, so a body the upstream is slow to take (or one never sent) holds
    /// little on the host: see [`super::OUTGOING_BODY_CHUNK`].
    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        super::OUTGOING_BODY_CHUNK
    }

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> ResponseFuture {
        let uri = request.uri();
        let destination =
            format!("{}://{}", uri.scheme_str().unwrap_or("?"), uri.authority().map_or("?", |a| a.as_str()));
        if !self.policy.allows(uri) {
            let granted = if self.policy.is_granted() {
                format!("allowed: {}", self.policy.hosts().join(", "))
            } else {
                "the manifest grants none".to_owned()
            };
            tracing::warn!(
                addon = &*self.addon,
                conn = self.conn,
                "outbound HTTP request to {destination} denied: not in the manifest's outbound_hosts ({granted})"
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        tracing::debug!(
            addon = &*self.addon,
            conn = self.conn,
            "outbound HTTP {} {destination}{}",
            request.method(),
            request.uri().path()
        );
        let Some(slot) = OpenRequest::acquire(&self.open, self.policy.max_requests) else {
            tracing::warn!(
                addon = &*self.addon,
                conn = self.conn,
                "outbound HTTP request to {destination} refused: {} requests already open (outbound_max_requests)",
                self.policy.max_requests
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::ConnectionLimitReached) });
        };
        let options = self.policy.cap(options);
        // One deadline over connecting, the TLS handshake and the response head: the
        // default sender bounds TCP connect and the first byte, but not the handshake,
        // so an upstream that accepts and then says nothing would hold the guest forever.
        let deadline = options.connect_timeout.unwrap_or(self.policy.connect_timeout)
            + options.first_byte_timeout.unwrap_or(self.policy.first_byte_timeout);
        let defaults = wasmtime_wasi_http::default_hooks();
        let sent = Box::into_pin(defaults.send_request(request, Some(options), fut));
        let (addon, conn) = (self.addon.clone(), self.conn);
        Box::new(async move {
            let Ok(sent) = tokio::time::timeout(deadline, sent).await else {
                tracing::warn!(
                    addon = &*addon,
                    conn,
                    "outbound HTTP request to {destination}: no response within {} ms \
                     (outbound_connect_timeout_ms + outbound_first_byte_timeout_ms)",
                    deadline.as_millis()
                );
                return Err(wasmtime_wasi_http::Error::ConnectionTimeout);
            };
            let (response, connection) = sent?;
            // The connection task runs until the response body is over: the slot goes
            // back with it.
            let connection: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
                Box::new(async move {
                    let _slot = slot;
                    Box::into_pin(connection).await
                });
            Ok((response, connection))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> OutboundPolicy {
        OutboundPolicy::from_manifest(Some(hosts.iter().map(|s| s.to_string()).collect()), None, None, None)
            .unwrap()
    }

    fn allows(policy: &OutboundPolicy, uri: &str) -> bool {
        policy.allows(&uri.parse().unwrap())
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let none = OutboundPolicy::default();
        assert!(!none.is_granted());
        assert!(!allows(&none, "https://api.openai.com/v1/chat/completions"));
    }

    #[test]
    fn scheme_host_and_port_must_all_match() {
        let p = policy(&["https://api.example.com", "http://127.0.0.1:8081"]);
        assert!(allows(&p, "https://api.example.com/v1/x"));
        assert!(allows(&p, "https://API.example.com:443/"));
        assert!(!allows(&p, "http://api.example.com/"), "scheme");
        assert!(!allows(&p, "https://api.example.com:8443/"), "port");
        assert!(!allows(&p, "https://evil.example.com/"), "host");
        assert!(!allows(&p, "https://api.example.com.evil.net/"), "suffix trick");
        assert!(allows(&p, "http://127.0.0.1:8081/v1"));
        assert!(!allows(&p, "http://127.0.0.1:8082/v1"));
        assert!(!allows(&p, "http://localhost:8081/v1"));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = policy(&["https://*.example.com"]);
        assert!(allows(&p, "https://a.example.com/"));
        assert!(allows(&p, "https://a.b.example.com/"));
        assert!(!allows(&p, "https://example.com/"));
        assert!(!allows(&p, "https://badexample.com/"));
    }

    #[test]
    fn bad_entries_are_refused_with_the_key() {
        for bad in [
            "api.example.com",
            "ftp://x.example",
            "https://",
            "https://a.example/path",
            "https://a*.example",
            "https://u@a.example",
        ] {
            let err =
                OutboundPolicy::from_manifest(Some(vec![bad.to_owned()]), None, None, None).unwrap_err();
            assert!(err.contains("outbound_hosts"), "{bad}: {err}");
        }
        let err = OutboundPolicy::from_manifest(None, Some(0), None, None).unwrap_err();
        assert!(err.contains("outbound_connect_timeout_ms"), "{err}");
    }

    #[test]
    fn open_requests_are_counted_up_to_the_limit_and_given_back() {
        let open = Arc::new(AtomicU32::new(0));
        let first = OpenRequest::acquire(&open, 2).expect("one");
        let second = OpenRequest::acquire(&open, 2).expect("two");
        assert!(OpenRequest::acquire(&open, 2).is_none(), "a third is refused");
        drop(first);
        let third = OpenRequest::acquire(&open, 2).expect("a slot came back");
        drop((second, third));
        assert_eq!(open.load(Ordering::Acquire), 0);
        let err = OutboundPolicy::default().with_max_requests(Some(0)).unwrap_err();
        assert!(err.contains("outbound_max_requests"), "{err}");
    }

    #[test]
    fn timeouts_are_capped_by_the_manifest() {
        let p = OutboundPolicy::from_manifest(None, Some(100), Some(2000), None).unwrap();
        let capped = p.cap(Some(RequestOptions {
            connect_timeout: Some(Duration::from_secs(9)),
            first_byte_timeout: Some(Duration::from_millis(50)),
            between_bytes_timeout: None,
        }));
        assert_eq!(capped.connect_timeout, Some(Duration::from_millis(100)));
        assert_eq!(capped.first_byte_timeout, Some(Duration::from_millis(50)));
        assert_eq!(capped.between_bytes_timeout, Some(Duration::from_secs(60)));
    }
}
