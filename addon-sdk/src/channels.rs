//! Channels: reach the other connections of this addon, on every node, and receive what
//! the shop's backend pushes (`POST /api/publish`).
//!
//! A connection [`subscribe`]s to channels; a message [`publish`]ed on a channel reaches
//! every connection subscribed to it as a call of [`Addon::on_channel_message`], between
//! client messages (never during a callback). One publisher's messages on one channel
//! arrive in the order they were published. Subscriptions end with the connection.
//!
//! Needs grants in the addon's manifest, or every call returns [`ChannelError::Denied`]:
//!
//! ```toml
//! [channels]
//! subscribe = ["room:*", "user:*"]   # `*` matches the rest of one `:`-separated segment
//! publish = ["room:*"]
//! ```
//!
//! Names are 1 to 128 bytes of ASCII letters, digits and `_ - . @ =`, in segments
//! separated by `:` (`room:lobby`, `user:42`). Channels are this addon's own: another
//! addon's `room:lobby` is another channel.
//!
//! A chat room in a few lines:
//!
//! ```no_run
//! use sockhost_addon_sdk::{Addon, ConnectionInfo, Error, Message, Refusal, channels, export_addon, send_text};
//!
//! #[derive(Default)]
//! struct Room;
//!
//! impl Addon for Room {
//!     fn on_open(&mut self, _info: &ConnectionInfo) -> Result<(), Refusal> {
//!         channels::subscribe("room:lobby").map_err(|e| Refusal::policy_violation(e.to_string()))
//!     }
//!
//!     fn on_message(&mut self, msg: Message) -> Result<(), Error> {
//!         // Everyone in the room gets it, this connection included.
//!         channels::publish("room:lobby", &msg)?;
//!         Ok(())
//!     }
//!
//!     fn on_channel_message(&mut self, _channel: &str, msg: Message) {
//!         if let Message::Text(text) = msg {
//!             let _ = send_text(&text);
//!         }
//!     }
//! }
//!
//! export_addon!(Room);
//! ```
//!
//! [`Addon::on_channel_message`]: crate::Addon::on_channel_message

use std::fmt;

use crate::__private::bindings::sockhost::addon::channels as host;
use crate::__private::bindings::sockhost::addon::types;
use crate::Message;

/// Why a channel call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// The manifest's `[channels]` does not grant this channel for this operation. (A
    /// component built with an SDK older than channels cannot subscribe either.) The
    /// host's log says which.
    Denied,
    /// The channel name is malformed or a limit (`max_subscriptions`) is reached; the
    /// text says what is allowed.
    Invalid(String),
    /// The message is over the addon's `channels.max_message_bytes` (default 64 KiB).
    TooLarge,
    /// The cluster (Redis) is unreachable; nothing was published. Later calls may work.
    Unavailable(String),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::Denied => {
                f.write_str("channel not granted to this addon (see [channels] in its manifest)")
            }
            ChannelError::Invalid(why) => write!(f, "invalid channel call: {why}"),
            ChannelError::TooLarge => {
                f.write_str("message too large for a channel (channels.max_message_bytes)")
            }
            ChannelError::Unavailable(why) => write!(f, "channels unavailable: {why}"),
        }
    }
}

impl std::error::Error for ChannelError {}

impl From<host::ChannelError> for ChannelError {
    fn from(error: host::ChannelError) -> Self {
        match error {
            host::ChannelError::Denied => ChannelError::Denied,
            host::ChannelError::Invalid(why) => ChannelError::Invalid(why),
            host::ChannelError::TooLarge => ChannelError::TooLarge,
            host::ChannelError::Unavailable(why) => ChannelError::Unavailable(why),
        }
    }
}

/// Subscribes this connection to `channel`. Once it returns `Ok`, every message
/// published there afterwards reaches [`Addon::on_channel_message`](crate::Addon::on_channel_message).
/// Subscribing twice is the same as once.
pub fn subscribe(channel: &str) -> Result<(), ChannelError> {
    host::subscribe(channel).map_err(ChannelError::from)
}

/// Ends this connection's subscription to `channel` (nothing happens if there was none).
pub fn unsubscribe(channel: &str) {
    host::unsubscribe(channel)
}

/// Publishes `msg` to every connection of this addon subscribed to `channel`, on every
/// node, this one included if it is subscribed.
pub fn publish(channel: &str, msg: &Message) -> Result<(), ChannelError> {
    let msg = match msg {
        Message::Text(text) => types::Message::Text(text.clone()),
        Message::Binary(data) => types::Message::Binary(data.clone()),
    };
    host::publish(channel, &msg).map_err(ChannelError::from)
}

/// Publishes one text message on `channel`. See [`publish`].
pub fn publish_text(channel: &str, text: &str) -> Result<(), ChannelError> {
    host::publish(channel, &types::Message::Text(text.to_owned())).map_err(ChannelError::from)
}

/// Publishes `value` as JSON text on `channel`. See [`publish`].
///
/// # Panics
///
/// If `value` cannot be represented as JSON, as [`send_json`](crate::send_json) does.
pub fn publish_json<T: serde::Serialize + ?Sized>(channel: &str, value: &T) -> Result<(), ChannelError> {
    let json = serde_json::to_string(value).expect("value cannot be serialized as JSON");
    host::publish(channel, &types::Message::Text(json)).map_err(ChannelError::from)
}
