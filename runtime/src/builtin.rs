//! The built-in `/ws` endpoint: a `system` greeting naming the mounted addons, then an
//! echo of every message. It needs no addon, so an operator can check a deployment (TLS,
//! proxies, load balancer) before any addon works.
//!
//! It is a public endpoint like any addon's, so it has the same limits, in
//! `sockhost.toml`'s `[builtin]` section with the manifest keys' names and defaults
//! ([`BuiltinConfig`]): connections, message size, message rate, idle timeout and ping.
//! Its connections count against `limits.max_connections` and
//! `limits.max_connections_per_ip` too. `[builtin] enabled = false` turns it off (404).
//! Without these, idle `/ws` connections could hold every file descriptor of the process.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::client_stream::ClientStream;
use crate::error::{Envelope, close_code};
use crate::sandbox::TokenBucket;
use crate::shutdown::ShutdownListener;

/// `[builtin]` in `sockhost.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileBuiltin {
    enabled: Option<bool>,
    max_connections: Option<u32>,
    max_message_bytes: Option<u32>,
    messages_per_second: Option<f64>,
    message_burst: Option<u32>,
    idle_timeout_s: Option<u64>,
    ping_interval_s: Option<u64>,
}

/// The limits of `/ws`: an addon manifest's keys, with the same defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinConfig {
    /// `enabled`; default true.
    pub enabled: bool,
    /// `max_connections`: open `/ws` connections; default 1,000.
    pub max_connections: u32,
    /// `max_message_bytes`: one message; default 64 KiB, at most 16 MiB.
    pub max_message_bytes: usize,
    /// `messages_per_second` (`0` = no limit) and `message_burst`; default 20 and 40.
    pub message_rate: Option<(f64, u32)>,
    /// `idle_timeout_s`: no message for this long closes with 1000; default 600.
    pub idle_timeout: Duration,
    /// `ping_interval_s`: silence before a ping; no answer for as long again drops the
    /// socket; default 30.
    pub ping_interval: Duration,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        BuiltinConfig {
            enabled: true,
            max_connections: 1000,
            max_message_bytes: 64 << 10,
            message_rate: Some((20.0, 40)),
            idle_timeout: Duration::from_secs(600),
            ping_interval: Duration::from_secs(30),
        }
    }
}

impl BuiltinConfig {
    /// Validates `[builtin]`; errors name the key.
    pub(crate) fn from_file(file: FileBuiltin) -> Result<BuiltinConfig, String> {
        let mut config = BuiltinConfig::default();
        let bad = |key: &str, problem: String| format!("invalid value for builtin.{key}: {problem}");
        config.enabled = file.enabled.unwrap_or(true);
        if let Some(max) = file.max_connections {
            if max == 0 {
                return Err(bad(
                    "max_connections",
                    "must be at least 1 (use enabled = false to turn /ws off)".into(),
                ));
            }
            config.max_connections = max;
        }
        if let Some(bytes) = file.max_message_bytes {
            if !(1..=(16 << 20)).contains(&bytes) {
                return Err(bad("max_message_bytes", format!("{bytes} is outside 1..=16777216")));
            }
            config.max_message_bytes = bytes as usize;
        }
        match file.messages_per_second {
            Some(rate) if !rate.is_finite() || rate < 0.0 => {
                return Err(bad("messages_per_second", format!("{rate} is not a rate (0 = no limit)")));
            }
            Some(0.0) => config.message_rate = None,
            Some(rate) => config.message_rate = Some((rate, (rate * 2.0).ceil().max(1.0) as u32)),
            None => {}
        }
        if let Some(burst) = file.message_burst {
            if burst == 0 {
                return Err(bad("message_burst", "must be at least 1".into()));
            }
            if let Some((_, b)) = config.message_rate.as_mut() {
                *b = burst;
            }
        }
        for (key, value, target) in [
            ("idle_timeout_s", file.idle_timeout_s, &mut config.idle_timeout),
            ("ping_interval_s", file.ping_interval_s, &mut config.ping_interval),
        ] {
            if let Some(seconds) = value {
                if !(1..=86_400).contains(&seconds) {
                    return Err(bad(key, format!("{seconds} is outside 1..=86400")));
                }
                *target = Duration::from_secs(seconds);
            }
        }
        Ok(config)
    }
}

/// `/ws` connections open now, against [`BuiltinConfig::max_connections`].
#[derive(Default)]
pub(crate) struct BuiltinSlots(AtomicU32);

/// One of them, given back on drop.
pub(crate) struct BuiltinSlot<'a>(&'a AtomicU32);

impl BuiltinSlots {
    pub(crate) fn reserve(&self, max: u32) -> Option<BuiltinSlot<'_>> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| BuiltinSlot(&self.0))
    }
}

impl Drop for BuiltinSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Greets, then echoes until the client leaves or breaks a limit, or the server stops.
pub(crate) async fn serve(
    mut ws: WebSocketStream<ClientStream>,
    config: &BuiltinConfig,
    greeting: &str,
    mut shutdown: ShutdownListener,
) {
    let greeting = Envelope::System { message: greeting }.to_json();
    if ws.send(WsMessage::text(greeting)).await.is_err() {
        return;
    }
    let mut rate = config.message_rate.map(|(per_second, burst)| TokenBucket::new(per_second, burst));
    let mut last_message = Instant::now();
    let mut last_frame = last_message;
    let mut ping_sent: Option<Instant> = None;
    // One timer for the connection, not one per message: activity only moves the
    // deadlines later, so when it fires early it is re-armed for the real one.
    let keep_alive = tokio::time::sleep(config.idle_timeout.min(config.ping_interval));
    tokio::pin!(keep_alive);
    let close = loop {
        let message = tokio::select! {
            _ = &mut shutdown => break Some((close_code::GOING_AWAY, "server shutting down".to_owned())),
            _ = keep_alive.as_mut() => {
                let now = Instant::now();
                let idle_at = last_message + config.idle_timeout;
                if now >= idle_at {
                    let idle = config.idle_timeout.as_secs();
                    break Some((close_code::NORMAL, format!("idle timeout: no message for {idle} s")));
                }
                match ping_sent {
                    Some(sent) if last_frame >= sent => ping_sent = None,
                    // No answer to the ping for a whole interval: the peer is gone.
                    Some(sent) if now >= sent + config.ping_interval => return,
                    Some(_) => {}
                    None if now >= last_frame + config.ping_interval => {
                        if ws.send(WsMessage::Ping(Default::default())).await.is_err() {
                            return;
                        }
                        ping_sent = Some(now);
                    }
                    None => {}
                }
                let ping_at = ping_sent.unwrap_or(last_frame) + config.ping_interval;
                keep_alive.as_mut().reset(idle_at.min(ping_at));
                continue;
            }
            message = ws.next() => message,
        };
        last_frame = Instant::now();
        let reply = match message {
            Some(Ok(message @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => message,
            Some(Ok(WsMessage::Close(_))) | None => return,
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(err))) => {
                break Some((close_code::TOO_BIG, err.to_string()));
            }
            Some(Err(_)) => return,
            Some(Ok(_)) => continue,
        };
        last_message = last_frame;
        if let Some(rate) = rate.as_mut()
            && !rate.try_take_at(last_message.into_std())
        {
            let limit = config.message_rate.map(|(r, _)| r).unwrap_or_default();
            let reason = format!("rate limit: more than {limit} messages per second");
            let frame = Envelope::Error { message: &reason, code: "rate_limited" }.to_json();
            let _ = ws.send(WsMessage::text(frame)).await;
            break Some((close_code::POLICY, reason));
        }
        if ws.send(reply).await.is_err() {
            return;
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: crate::error::truncate_close_reason(&reason).into(),
        };
        let _ = ws.close(Some(frame)).await;
        // One deadline for the client's answer; what it sends meanwhile is dropped.
        let _ = tokio::time::timeout(crate::connection::CLOSE_HANDSHAKE_TIMEOUT, async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BuiltinConfig, String> {
        BuiltinConfig::from_file(toml::from_str(text).map_err(|e| e.to_string())?)
    }

    #[test]
    fn the_defaults_are_an_addons() {
        assert_eq!(parse("").unwrap(), BuiltinConfig::default());
        let config = parse("enabled = false\nmax_connections = 5\nmessages_per_second = 0").unwrap();
        assert!(!config.enabled && config.max_connections == 5 && config.message_rate.is_none());
        assert_eq!(parse("messages_per_second = 3").unwrap().message_rate, Some((3.0, 6)));
        assert_eq!(parse("message_burst = 9").unwrap().message_rate, Some((20.0, 9)));
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("max_connections = 0", "builtin.max_connections"),
            ("max_message_bytes = 0", "builtin.max_message_bytes"),
            ("messages_per_second = -1.0", "builtin.messages_per_second"),
            ("message_burst = 0", "builtin.message_burst"),
            ("idle_timeout_s = 0", "builtin.idle_timeout_s"),
            ("ping_interval_s = 100000", "builtin.ping_interval_s"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(parse("enable = true").is_err());
    }

    #[test]
    fn slots_are_bounded_and_come_back() {
        let slots = BuiltinSlots::default();
        let a = slots.reserve(2).unwrap();
        let _b = slots.reserve(2).unwrap();
        assert!(slots.reserve(2).is_none());
        drop(a);
        assert!(slots.reserve(2).is_some());
    }
}
