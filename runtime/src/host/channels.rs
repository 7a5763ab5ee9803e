//! `sockhost:addon/channels`: subscribing and publishing, with the manifest's grants and
//! limits. The bus that carries messages is [`crate::channels`]; this module decides what
//! one instance may do with it.
//!
//! - **Grants.** Deny by default. `[channels] subscribe` and `publish` list patterns;
//!   `*` matches the rest of one `:`-separated segment, so `room:*` grants `room:lobby`
//!   but not `room:a:b`, and `user:*` grants every user's channel. A call on a channel no
//!   pattern matches answers `denied`, and the host logs it once per channel.
//! - **Receiving needs the export.** A component without `channel-handler` (built for
//!   0.1.0 or 0.1.1) could never be told of a message, so its `subscribe` answers `denied`
//!   and the log says why.
//! - **Limits** ([`ChannelLimits`], manifest keys in `[channels]`): the size of one
//!   published message, the subscriptions one connection holds, and its inbox (see
//!   [`crate::channels`] for what happens when it overflows).
//! - **Namespaces.** The bus is keyed by addon name, which the guest neither sees nor
//!   chooses: two addons' channels never meet.
//! - **Lifetime.** Subscriptions belong to the connection's store: dropping it (the
//!   connection ended, whatever the way) unsubscribes from everything.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Deserialize;

use super::HostState;
use crate::bindings::Message;
use crate::bindings::sockhost::addon::channels::{ChannelError, Host};
use crate::channels::{Channels, Inbox, InboxSender, check_name, is_name_byte, payload_len};
use crate::policy::ByteSize;

/// The manifest's `[channels]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsSection {
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    max_message_bytes: Option<ByteSize>,
    max_subscriptions: Option<u32>,
    inbox: Option<u32>,
}

/// What an addon may do with channels, and how much.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChannelGrants {
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    pub limits: ChannelLimits,
}

/// Channel limits of one addon. Every one has a default and a manifest key in `[channels]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    /// Largest message `publish` takes, and `POST /api/publish` for this addon.
    /// `max_message_bytes`, default 64 KiB, at most 1 MiB.
    pub max_message_bytes: usize,
    /// Most channels one connection is subscribed to at once. `max_subscriptions`,
    /// default 64, 1 to 10,000.
    pub max_subscriptions: usize,
    /// Deliveries waiting for their callback before the connection counts as too slow
    /// and is closed. `inbox`, default 256, 1 to 65,536.
    pub inbox: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits { max_message_bytes: 64 << 10, max_subscriptions: 64, inbox: 256 }
    }
}

/// A grant pattern: a channel name whose segments may end in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(String);

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let valid = !text.is_empty()
            && text.len() <= crate::channels::MAX_NAME_BYTES
            && text.split(':').all(|segment| {
                let literal = segment.strip_suffix('*').unwrap_or(segment);
                (!literal.is_empty() || segment == "*") && literal.bytes().all(is_name_byte)
            });
        if valid {
            Ok(Pattern(text.to_owned()))
        } else {
            Err(format!(
                "{text:?} is not a channel pattern: segments of letters, digits and `_ - . @ =` separated by `:`, \
                 each may end in `*` (e.g. \"room:*\")"
            ))
        }
    }

    /// Whether `channel` (already a valid name) matches: the same number of segments,
    /// each equal, or starting with the part before a trailing `*`.
    fn matches(&self, channel: &str) -> bool {
        let mut names = channel.split(':');
        for pattern in self.0.split(':') {
            let Some(name) = names.next() else { return false };
            let ok = match pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == pattern,
            };
            if !ok {
                return false;
            }
        }
        names.next().is_none()
    }
}

impl ChannelGrants {
    /// Validates the manifest's `[channels]` section; errors name the key.
    pub fn from_manifest(section: ChannelsSection) -> Result<ChannelGrants, String> {
        let patterns = |key: &str, list: Vec<String>| -> Result<Vec<Pattern>, String> {
            list.iter().map(|p| Pattern::parse(p).map_err(|e| format!("key `channels.{key}`: {e}"))).collect()
        };
        let mut limits = ChannelLimits::default();
        if let Some(ByteSize(bytes)) = section.max_message_bytes {
            if !(1..=(1 << 20)).contains(&bytes) {
                return Err(format!("key `channels.max_message_bytes`: {bytes} bytes is outside 1..=1MiB"));
            }
            limits.max_message_bytes = bytes as usize;
        }
        if let Some(n) = section.max_subscriptions {
            if !(1..=10_000).contains(&n) {
                return Err(format!("key `channels.max_subscriptions`: {n} is outside 1..=10000"));
            }
            limits.max_subscriptions = n as usize;
        }
        if let Some(n) = section.inbox {
            if !(1..=65_536).contains(&n) {
                return Err(format!("key `channels.inbox`: {n} is outside 1..=65536"));
            }
            limits.inbox = n as usize;
        }
        Ok(ChannelGrants {
            subscribe: patterns("subscribe", section.subscribe)?,
            publish: patterns("publish", section.publish)?,
            limits,
        })
    }

    /// Whether anything is granted.
    pub fn is_granted(&self) -> bool {
        !self.subscribe.is_empty() || !self.publish.is_empty()
    }

    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(channel))
    }

    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish.iter().any(|p| p.matches(channel))
    }

    /// For the mount log line and `sockhost check`.
    pub fn describe(&self) -> String {
        let list = |patterns: &[Pattern]| {
            if patterns.is_empty() {
                "none".to_owned()
            } else {
                patterns.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(", ")
            }
        };
        format!("channels: subscribe {}; publish {}", list(&self.subscribe), list(&self.publish))
    }
}

/// One instance's use of channels.
pub struct ChannelAccess {
    bus: Arc<Channels>,
    addon: Arc<str>,
    conn: u64,
    grants: Arc<ChannelGrants>,
    /// Whether the component exports `channel-handler` (set at instantiation).
    pub(crate) can_receive: bool,
    subscribed: HashSet<Box<str>>,
    /// Made with the first subscription; the connection task takes the receiving half.
    sender: Option<InboxSender>,
    receiver: Option<Inbox>,
    /// Channels already named in a denial log line, so a retrying addon cannot flood the log.
    denials_logged: HashSet<Box<str>>,
}

impl ChannelAccess {
    pub(crate) fn new(bus: Arc<Channels>, addon: Arc<str>, conn: u64, grants: Arc<ChannelGrants>) -> Self {
        ChannelAccess {
            bus,
            addon,
            conn,
            grants,
            can_receive: false,
            subscribed: HashSet::new(),
            sender: None,
            receiver: None,
            denials_logged: HashSet::new(),
        }
    }

    /// The inbox, once the first subscription made it; the connection task polls it.
    pub(crate) fn take_inbox(&mut self) -> Option<Inbox> {
        self.receiver.take()
    }

    fn deny(&mut self, op: &str, channel: &str, why: &str) -> ChannelError {
        if self.denials_logged.len() < 64 && self.denials_logged.insert(channel.into()) {
            tracing::warn!(addon = &*self.addon, conn = self.conn, channel, "{op} denied: {why}");
        }
        ChannelError::Denied
    }

    async fn subscribe(&mut self, channel: String) -> Result<(), ChannelError> {
        check_name(&channel).map_err(ChannelError::Invalid)?;
        if !self.can_receive {
            return Err(self.deny(
                "subscribe",
                &channel,
                "the component does not export sockhost:addon/channel-handler, so it could not receive \
                 anything; rebuild it with the current SDK",
            ));
        }
        if !self.grants.may_subscribe(&channel) {
            return Err(self.deny(
                "subscribe",
                &channel,
                "no pattern in the manifest's [channels] subscribe matches",
            ));
        }
        if self.subscribed.contains(channel.as_str()) {
            return Ok(());
        }
        let max = self.grants.limits.max_subscriptions;
        if self.subscribed.len() >= max {
            return Err(ChannelError::Invalid(format!(
                "this connection already holds {max} subscriptions, the addon's limit (channels.max_subscriptions)"
            )));
        }
        let sender = match &self.sender {
            Some(sender) => sender.clone(),
            None => {
                let (sender, receiver) = crate::channels::inbox(self.conn, self.grants.limits.inbox);
                self.receiver = Some(receiver);
                self.sender = Some(sender.clone());
                sender
            }
        };
        self.bus.subscribe(&self.addon, &channel, &sender).await;
        self.subscribed.insert(channel.into());
        Ok(())
    }

    fn unsubscribe(&mut self, channel: &str) {
        if self.subscribed.remove(channel) {
            self.bus.unsubscribe(&self.addon, channel, self.conn);
        }
    }

    async fn publish(&mut self, channel: String, msg: Message) -> Result<(), ChannelError> {
        check_name(&channel).map_err(ChannelError::Invalid)?;
        if !self.grants.may_publish(&channel) {
            return Err(self.deny(
                "publish",
                &channel,
                "no pattern in the manifest's [channels] publish matches",
            ));
        }
        if payload_len(&msg) > self.grants.limits.max_message_bytes {
            return Err(ChannelError::TooLarge);
        }
        match self.bus.publish(&self.addon, &channel, msg).await {
            Ok(_) => Ok(()),
            Err(err) => {
                tracing::warn!(addon = &*self.addon, conn = self.conn, channel, "publish failed: {err}");
                Err(ChannelError::Unavailable(err.to_string()))
            }
        }
    }
}

impl Drop for ChannelAccess {
    /// Subscriptions end with the connection, however it ends.
    fn drop(&mut self) {
        for channel in self.subscribed.drain() {
            self.bus.unsubscribe(&self.addon, &channel, self.conn);
        }
    }
}

impl Host for HostState {
    async fn subscribe(&mut self, channel: String) -> Result<(), ChannelError> {
        self.channels.subscribe(channel).await
    }

    fn unsubscribe(&mut self, channel: String) {
        self.channels.unsubscribe(&channel)
    }

    async fn publish(&mut self, channel: String, msg: Message) -> Result<(), ChannelError> {
        self.channels.publish(channel, msg).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(toml_text: &str) -> Result<ChannelGrants, String> {
        let section: ChannelsSection = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        ChannelGrants::from_manifest(section)
    }

    #[test]
    fn a_star_matches_the_rest_of_one_segment() {
        let g = grants(r#"subscribe = ["room:*", "user:4*", "news"]"#).unwrap();
        for ok in ["room:lobby", "room:a-b", "user:42", "user:4", "news"] {
            assert!(g.may_subscribe(ok), "{ok}");
        }
        for no in ["room", "room:a:b", "user:5", "rooms:x", "news:x", "other"] {
            assert!(!g.may_subscribe(no), "{no}");
        }
        assert!(!g.may_publish("room:lobby"), "publish is granted apart");
        let any = grants(r#"publish = ["*"]"#).unwrap();
        assert!(any.may_publish("x") && !any.may_publish("x:y"));
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let g = ChannelGrants::default();
        assert!(!g.is_granted() && !g.may_subscribe("room:a") && !g.may_publish("room:a"));
        assert_eq!(g.limits, ChannelLimits::default());
    }

    #[test]
    fn bad_patterns_and_limits_name_the_key() {
        for (text, key) in [
            (r#"subscribe = ["room:*x"]"#, "channels.subscribe"),
            (r#"publish = ["a::b"]"#, "channels.publish"),
            (r#"publish = [""]"#, "channels.publish"),
            (r#"subscribe = ["room lobby"]"#, "channels.subscribe"),
            ("inbox = 0", "channels.inbox"),
            ("max_subscriptions = 0", "channels.max_subscriptions"),
            (r#"max_message_bytes = "2MiB""#, "channels.max_message_bytes"),
        ] {
            let err = grants(text).unwrap_err();
            assert!(err.contains(key), "{text}: {err}");
        }
        assert!(grants("subscribes = []").is_err(), "unknown keys are refused");
    }
}
