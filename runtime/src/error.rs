//! Failures the client can see, and how they are reported.
//!
//! Every failure on a connection ends in exactly one of these kinds. The kind decides the
//! `code` of the error frame the client receives (`{"type":"error","message":...,"code":...}`,
//! the seed protocol's error envelope) and whether the connection survives it. Keeping the
//! mapping here means the connection task branches on a type, never on strings.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Every way a connection can fail, on either side. Each one is logged with the addon
/// and connection id and counted in [`FailureCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// `on-message` returned `err(reason)`. Error frame; the connection stays open.
    AddonError,
    /// The instance trapped (a panic, `unreachable`, an out-of-bounds access, stack
    /// overflow...). Error frame, then close 1011: the instance is unusable.
    AddonTrap,
    /// A callback ran past the addon's `cpu_limit_ms`. Error frame, then close 1011.
    AddonTimeout,
    /// The instance needed more memory than the addon's `memory_limit`. Error frame,
    /// then close 1011.
    AddonOom,
    /// The client sent faster than `messages_per_second`. Close 1008.
    RateLimited,
    /// A client message was larger than `max_message_bytes`. Close 1009.
    Oversize,
    /// A text frame was not valid UTF-8. Close 1007.
    InvalidUtf8,
    /// The client broke the WebSocket protocol otherwise. Close 1002.
    Protocol,
    /// No client message for `idle_timeout_s`. Close 1000.
    Idle,
    /// A ping went unanswered for `ping_interval_s`: the peer is gone. Socket dropped.
    Unresponsive,
    /// The client did not read for `send_timeout_s` while the addon sent. Socket dropped.
    SlowClient,
    /// More channel messages waited for the connection than its inbox holds
    /// (`channels.inbox`): error frame, then close 1008.
    SlowSubscriber,
    /// A callback still ran `limits.orphan_callback_grace_ms` after its client had gone: it
    /// was abandoned and the instance dropped, without `on-close`.
    OrphanedCallback,
    /// `hibernate` returned more than the manifest's `hibernate_max_state_bytes`: the
    /// instance stays live, and the host tries again after the next idle period.
    HibernateFailed,
    /// `Origin` not in the addon's `allowed_origins`. HTTP 403 before the upgrade.
    Origin,
    /// The addon's or the server's connection limit was reached. HTTP 503.
    Capacity,
    /// No instance could be made for a new connection: every slot of the instance pool
    /// (`limits.max_live_instances`) is taken, or the system refused the memory or the
    /// mappings it needed. HTTP 503; never counted as `addon_trap`.
    InstanceCapacity,
    /// The request head did not arrive within the handshake timeout. HTTP 408.
    HandshakeTimeout,
    /// The request was not HTTP, or not a valid upgrade. HTTP 4xx.
    BadRequest,
}

impl FailureKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FailureKind; 19] = [
        FailureKind::AddonError,
        FailureKind::AddonTrap,
        FailureKind::AddonTimeout,
        FailureKind::AddonOom,
        FailureKind::RateLimited,
        FailureKind::Oversize,
        FailureKind::InvalidUtf8,
        FailureKind::Protocol,
        FailureKind::Idle,
        FailureKind::Unresponsive,
        FailureKind::SlowClient,
        FailureKind::SlowSubscriber,
        FailureKind::OrphanedCallback,
        FailureKind::HibernateFailed,
        FailureKind::Origin,
        FailureKind::Capacity,
        FailureKind::InstanceCapacity,
        FailureKind::HandshakeTimeout,
        FailureKind::BadRequest,
    ];

    /// The kind's name: the `code` of error frames, and the `kind` field of log lines.
    pub fn code(self) -> &'static str {
        match self {
            FailureKind::AddonError => "addon_error",
            FailureKind::AddonTrap => "addon_trap",
            FailureKind::AddonTimeout => "addon_timeout",
            FailureKind::AddonOom => "addon_oom",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Oversize => "oversize",
            FailureKind::InvalidUtf8 => "invalid_utf8",
            FailureKind::Protocol => "protocol",
            FailureKind::Idle => "idle",
            FailureKind::Unresponsive => "unresponsive",
            FailureKind::SlowClient => "slow_client",
            FailureKind::SlowSubscriber => "slow_subscriber",
            FailureKind::OrphanedCallback => "orphaned_callback",
            FailureKind::HibernateFailed => "hibernate_failed",
            FailureKind::Origin => "origin",
            FailureKind::Capacity => "capacity",
            FailureKind::InstanceCapacity => "instance_capacity",
            FailureKind::HandshakeTimeout => "handshake_timeout",
            FailureKind::BadRequest => "bad_request",
        }
    }
}

/// Failures counted by kind since the server started.
#[derive(Debug, Default)]
pub struct FailureCounts {
    counts: [AtomicU64; FailureKind::ALL.len()],
}

impl FailureCounts {
    pub fn record(&self, kind: FailureKind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, kind: FailureKind) -> u64 {
        self.counts[kind as usize].load(Ordering::Relaxed)
    }
}

/// The seed protocol's server → client envelope for errors and system notices.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum Envelope<'a> {
    Error { message: &'a str, code: &'a str },
    System { message: &'a str },
}

impl Envelope<'_> {
    pub(crate) fn to_json(&self) -> String {
        // Serialising a struct of strings cannot fail.
        serde_json::to_string(self).expect("envelope serialises")
    }
}

/// WebSocket close codes the host sends.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// No close code was present in the peer's close frame (never sent on the wire).
    pub const NO_STATUS: u16 = 1005;
    /// The peer vanished without a close frame (never sent on the wire).
    pub const ABNORMAL: u16 = 1006;
    /// A text frame was not valid UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation; also used in place of an invalid code an addon asked for.
    pub const POLICY: u16 = 1008;
    /// A message was larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// The addon failed in a way that ends the connection.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The server cannot serve the connection now; the client should reconnect later.
    pub const TRY_AGAIN_LATER: u16 = 1013;

    /// Whether a server may put `code` in a close frame (RFC 6455 §7.4).
    pub fn is_sendable(code: u16) -> bool {
        matches!(code, 1000 | 1001 | 1002 | 1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Cuts `reason` to the 123 bytes a close frame can carry, at a character boundary.
pub(crate) fn truncate_close_reason(reason: &str) -> &str {
    truncate_utf8(reason, 123)
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope_matches_the_seed_format() {
        let json = Envelope::Error { message: "boom", code: FailureKind::AddonError.code() }.to_json();
        assert_eq!(json, r#"{"type":"error","message":"boom","code":"addon_error"}"#);
        let json = Envelope::System { message: "hi" }.to_json();
        assert_eq!(json, r#"{"type":"system","message":"hi"}"#);
    }

    #[test]
    fn kinds_index_their_own_counter() {
        for (index, kind) in FailureKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, index);
        }
        let counts = FailureCounts::default();
        counts.record(FailureKind::AddonOom);
        assert_eq!(counts.get(FailureKind::AddonOom), 1);
        assert_eq!(counts.get(FailureKind::AddonTrap), 0);
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let long = "好".repeat(60); // 180 bytes
        let cut = truncate_close_reason(&long);
        assert!(cut.len() <= 123);
        assert_eq!(cut.chars().count(), 41);
    }

    #[test]
    fn only_sendable_close_codes_pass() {
        for ok in [1000, 1001, 1008, 1011, 1013, 3000, 4999] {
            assert!(close_code::is_sendable(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert!(!close_code::is_sendable(bad), "{bad}");
        }
    }
}
