//! The admin listener (`[admin] listen`): what the shop's backend and the operator's
//! monitoring reach, on an address apart from the public port.
//!
//! - `POST /api/publish`: server push. The backend publishes on an addon's channel and
//!   every subscribed connection, on every node, gets it (see [`crate::channels`]):
//!   `{"addon": "aikefu", "channel": "user:42", "data": <a JSON value or a string>}`. A
//!   string is sent as a text message as it is, any other JSON value as its
//!   serialisation. Answers `202 {"delivered": N}` (N: subscribers reached on this
//!   node), `400` naming the field on a bad body or an unknown addon, `401` without the
//!   right key, `413` over the addon's `channels.max_message_bytes`, `503` while the
//!   cluster is down.
//! - `/metrics`: moves here from the public port when the admin listener is set, so the
//!   internet never sees it; `/healthz` and `/readyz` stay public for load balancers.
//! - `/dashboard` (with `/dashboard.json`, `/dashboard.js`, `/style.css`): the operators'
//!   dashboard ([`crate::web`]) moves here too, for the same reason, whatever `[web]`
//!   says about the public port.
//!
//! The key is `Authorization: Bearer <key>`, read at start-up from the environment
//! variable `admin.api_key_env` names (default `SOCKHOST_API_KEY`). Without a key the
//! API does not exist (404), and the start-up log says so: an open publish endpoint would
//! let anyone who reaches the port message every user. Keys are compared as SHA-256
//! digests in constant time, so neither the content nor the length leaks through timing.
//!
//! One request per connection (`Connection: close`), as on the public port. Refused
//! requests are logged with their answer cut to 256 bytes, at most 10 lines per 10 s
//! (`crate::log_limits`): the answer can quote what the client sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::channels::{BusError, Channels, check_name, payload_len};
use crate::config::AdminConfig;
use crate::error::FailureKind;
use crate::handshake::{self, Answer, HeadError, RequestHead};
use crate::log_limits::{LogLimiter, client_text};
use crate::metrics::Metrics;
use crate::reload::Mounted;
use crate::web;

/// How long a client has to send its whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest body read: the largest channel message a manifest allows (1 MiB), with
/// room for the JSON around it. A body's own limit is its addon's `max_message_bytes`.
const MAX_BODY_BYTES: usize = (1 << 20) + (64 << 10);

/// What the admin listener serves from.
pub(crate) struct Admin {
    pub(crate) addons: Arc<Mounted>,
    pub(crate) channels: Arc<Channels>,
    pub(crate) metrics: Arc<Metrics>,
    /// SHA-256 of the API key; `None`: no key, no API.
    api_key: Option<[u8; 32]>,
    /// Bounds the lines about refused requests.
    log_limits: LogLimiter,
}

impl Admin {
    /// Logs whether the API is on (it is when `settings` has a key).
    pub(crate) fn new(
        addons: Arc<Mounted>,
        channels: Arc<Channels>,
        metrics: Arc<Metrics>,
        settings: &AdminConfig,
    ) -> Admin {
        let key_env = &settings.api_key_env;
        let api_key = settings.api_key.as_ref().map(|key| key.0.as_str());
        match api_key {
            Some(_) => tracing::info!("admin listener: POST /api/publish (key from ${key_env}) and /metrics"),
            None => tracing::warn!(
                "admin listener: /metrics only; POST /api/publish is off because ${key_env} is not set \
                 (admin.api_key_env names the variable)"
            ),
        }
        let api_key = api_key.map(|key| Sha256::digest(key.as_bytes()).into());
        Admin { addons, channels, metrics, api_key, log_limits: LogLimiter::default() }
    }

    /// Serves until `stop` is cancelled.
    pub(crate) async fn run(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(self.clone().handle(stream, peer));
                    }
                    Err(err) => {
                        tracing::warn!("admin accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    async fn handle(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let request = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await;
        let answer = match request {
            Err(_) => Answer::error(408, "the request did not arrive in time"),
            Ok(Err(answer)) => answer,
            Ok(Ok((head, body))) => self.route(&head, &body).await,
        };
        // The answer can quote the request (a JSON error on the body, an addon name), and
        // anyone who reaches the port can send requests in a loop: bounded in size and in
        // number (`crate::log_limits`).
        if answer.status >= 400
            && answer.status != 404
            && self.log_limits.admit(FailureKind::BadRequest, "admin")
        {
            let answer_text = client_text(answer.body.trim_end());
            tracing::info!(%peer, status = answer.status, "admin request refused: {answer_text}");
        }
        let _ = answer.write(&mut stream).await;
    }

    async fn route(&self, head: &RequestHead, body: &[u8]) -> Answer {
        if let Some(resource) = web::Resource::from_path(&head.path)
            && resource.audience() != web::Audience::Chat
        {
            let sources =
                web::Sources { mounted: &self.addons, metrics: &self.metrics, dashboard_here: true };
            return web::answer(&head.method, resource, &sources);
        }
        match (head.method.as_str(), head.path.as_str()) {
            ("GET", "/metrics") => {
                if let Some(link) = self.channels.cluster() {
                    self.metrics.set_cluster_up(link.is_up());
                }
                Answer::new(200, crate::metrics::CONTENT_TYPE, self.metrics.encode())
            }
            (_, "/api/publish") if self.api_key.is_none() => Answer::error(
                404,
                "the admin API is off: no API key is configured (admin.api_key_env, default SOCKHOST_API_KEY)",
            ),
            ("POST", "/api/publish") => match self.authorized(head) {
                true => self.publish(body).await,
                false => Answer::error(401, "missing or wrong API key: send Authorization: Bearer <key>")
                    .with_header("WWW-Authenticate", "Bearer"),
            },
            (_, "/api/publish" | "/metrics") => Answer::error(405, "method not allowed"),
            (_, path) => Answer::error(
                404,
                &format!(
                    "nothing at {path}; the admin listener has POST /api/publish, /metrics and /dashboard"
                ),
            ),
        }
    }

    fn authorized(&self, head: &RequestHead) -> bool {
        let (Some(expected), Some(given)) = (&self.api_key, head.header("authorization")) else {
            return false;
        };
        let Some(token) = given.strip_prefix("Bearer ").or_else(|| given.strip_prefix("bearer ")) else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        bool::from(given.ct_eq(expected))
    }

    async fn publish(&self, body: &[u8]) -> Answer {
        let request: PublishRequest = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(err) => {
                return Answer::error(
                    400,
                    &format!(
                        "bad body: {err}; expected {{\"addon\": \"<name>\", \"channel\": \"<channel>\", \"data\": <JSON or string>}}"
                    ),
                );
            }
        };
        let Some(addon) = self.addons.get().get(&request.addon).cloned() else {
            let mounted: Vec<String> = self.addons.get().names().map(str::to_owned).collect();
            return Answer::error(
                400,
                &format!(
                    "field `addon`: no addon named {:?} is mounted; mounted: {}",
                    request.addon,
                    mounted.join(", ")
                ),
            );
        };
        if let Err(problem) = check_name(&request.channel) {
            return Answer::error(400, &format!("field `channel`: {problem}"));
        }
        let payload = match request.data {
            serde_json::Value::String(text) => crate::channels::Payload::Text(text),
            value => crate::channels::Payload::Text(value.to_string()),
        };
        let max = addon.policy().channels.limits.max_message_bytes;
        if payload_len(&payload) > max {
            return Answer::error(
                413,
                &format!(
                    "field `data`: {} bytes is over addon '{}'s limit of {max} (channels.max_message_bytes)",
                    payload_len(&payload),
                    request.addon
                ),
            );
        }
        match self.channels.publish(&request.addon, &request.channel, payload).await {
            Ok(delivered) => Answer::json(202, json!({ "delivered": delivered })),
            Err(BusError::Unavailable(cause)) => Answer::error(503, &cause),
        }
    }
}

/// The body of `POST /api/publish`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    addon: String,
    channel: String,
    data: serde_json::Value,
}

/// Reads the request head and its body (by `Content-Length`).
async fn read_request(stream: &mut TcpStream) -> Result<(RequestHead, Vec<u8>), Answer> {
    let (head, mut body) = handshake::read_head(stream).await.map_err(|err| match err {
        HeadError::TooLarge => Answer::error(431, &err.to_string()),
        other => Answer::error(400, &other.to_string()),
    })?;
    if head.method != "POST" {
        return Ok((head, Vec::new()));
    }
    if head.header("transfer-encoding").is_some() {
        return Err(Answer::error(411, "send the body with a Content-Length, not chunked"));
    }
    let length: usize = match head.header("content-length").map(|v| v.trim().parse()) {
        Some(Ok(length)) => length,
        Some(Err(_)) => return Err(Answer::error(400, "Content-Length is not a number")),
        None => return Err(Answer::error(411, "a POST needs a Content-Length")),
    };
    if length > MAX_BODY_BYTES {
        return Err(Answer::error(
            413,
            &format!("the body of {length} bytes is over the limit of {MAX_BODY_BYTES}"),
        ));
    }
    if body.len() < length {
        let have = body.len();
        body.resize(length, 0);
        stream.read_exact(&mut body[have..]).await.map_err(|_| Answer::error(400, "the body ended early"))?;
    }
    body.truncate(length);
    Ok((head, body))
}
