//! The JSON envelope that chat clients speak.
//!
//! Client → server: `{"message": "...", "token": "...", "session_id": "...", "action": "chat"}`
//! ([`ClientMessage`]). Server → client ([`ServerMessage`]):
//!
//! - `{"type":"chat","message":"...","session_id":"...","complete":false}`: one chunk of a
//!   reply; the last chunk of a reply has `"complete":true`;
//! - `{"type":"error","message":"...","code":"..."}`;
//! - `{"type":"system","message":"..."}`.
//!
//! ```no_run
//! use sockhost_addon_sdk::protocol::{ChatStream, ClientMessage, send_error};
//! use sockhost_addon_sdk::Error;
//!
//! fn handle(text: &str) -> Result<(), Error> {
//!     let msg = match ClientMessage::parse(text) {
//!         Ok(msg) => msg,
//!         Err(e) => {
//!             send_error(e.code(), &e.to_string())?;
//!             return Ok(());
//!         }
//!     };
//!     let chat = ChatStream::new(msg.session_id.unwrap_or_default());
//!     for word in msg.message.split_inclusive(' ') {
//!         chat.send(word)?;
//!     }
//!     chat.finish()?;
//!     Ok(())
//! }
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{SendError, send_json};

/// A message from a chat client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientMessage {
    /// What the user typed.
    pub message: String,
    /// The user's credential, when the client sends one. Checking it is up to the addon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The conversation this message belongs to; replies carry it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// What the client asks for; clients send `"chat"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

impl ClientMessage {
    /// Parses one text frame.
    ///
    /// ```
    /// use sockhost_addon_sdk::protocol::{ClientMessage, ProtocolError};
    ///
    /// let msg = ClientMessage::parse(r#"{"message":"你好","session_id":"s1","action":"chat"}"#)?;
    /// assert_eq!(msg.message, "你好");
    /// assert!(msg.is_chat());
    ///
    /// let err = ClientMessage::parse("hello").unwrap_err();
    /// assert_eq!(err.code(), "bad_json");
    /// let err = ClientMessage::parse(r#"{"action":"chat"}"#).unwrap_err();
    /// assert_eq!(err, ProtocolError::MissingField("message"));
    /// assert_eq!(err.code(), "missing_field");
    /// # Ok::<(), ProtocolError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`ProtocolError::BadJson`] when `text` is not a JSON object or a known field has the
    /// wrong type; [`ProtocolError::MissingField`] when `message` is absent or `null`.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        #[derive(Deserialize)]
        struct Wire {
            message: Option<String>,
            token: Option<String>,
            session_id: Option<String>,
            action: Option<String>,
        }
        // Only a JSON object can be the envelope. Checking the first byte keeps plain text
        // (the common case for an echo) off the JSON parser, and rejects arrays, which
        // serde would otherwise accept as a struct written positionally.
        if !text.trim_start().starts_with('{') {
            return Err(ProtocolError::BadJson("not a JSON object".to_owned()));
        }
        let wire: Wire = serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
        Ok(Self {
            message: wire.message.ok_or(ProtocolError::MissingField("message"))?,
            token: wire.token,
            session_id: wire.session_id,
            action: wire.action,
        })
    }

    /// Whether the client asks for a chat reply: `action` is `"chat"` or absent (chat is
    /// the only action clients know).
    pub fn is_chat(&self) -> bool {
        self.action.as_deref().is_none_or(|action| action == "chat")
    }
}

/// Why a text frame is not a valid [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Not a JSON object, or a field of the wrong type. Holds the parser's explanation.
    BadJson(String),
    /// A required field is absent.
    MissingField(&'static str),
}

impl ProtocolError {
    /// The `code` of the error frame to answer with: `"bad_json"` or `"missing_field"`.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::BadJson(_) => "bad_json",
            ProtocolError::MissingField(_) => "missing_field",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadJson(reason) => write!(f, "invalid JSON message: {reason}"),
            ProtocolError::MissingField(field) => write!(f, "missing field `{field}`"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A message to a chat client; serializes with a `"type"` tag.
///
/// ```
/// use sockhost_addon_sdk::protocol::ServerMessage;
///
/// let msg = ServerMessage::System { message: "maintenance at 22:00".into() };
/// assert_eq!(
///     serde_json::to_string(&msg).unwrap(),
///     r#"{"type":"system","message":"maintenance at 22:00"}"#,
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// One chunk of a reply; `complete` is true on the reply's last chunk.
    Chat { message: String, session_id: String, complete: bool },
    /// Something went wrong; `code` is machine-readable, e.g. `"bad_json"`.
    Error { message: String, code: String },
    /// A notice from the server, not part of a conversation.
    System { message: String },
}

impl ServerMessage {
    /// Sends this message as one text frame.
    pub fn send(&self) -> Result<(), SendError> {
        send_json(self)
    }
}

/// Sends one chunk of a chat reply (`complete` marks the reply's last chunk).
pub fn send_chat_chunk(session_id: &str, text: &str, complete: bool) -> Result<(), SendError> {
    ServerMessage::Chat { message: text.to_owned(), session_id: session_id.to_owned(), complete }.send()
}

/// Sends an error frame, e.g. `send_error("unsupported_action", "unknown action: ping")`.
pub fn send_error(code: &str, message: &str) -> Result<(), SendError> {
    ServerMessage::Error { message: message.to_owned(), code: code.to_owned() }.send()
}

/// Sends a system notice.
pub fn send_system(message: &str) -> Result<(), SendError> {
    ServerMessage::System { message: message.to_owned() }.send()
}

/// A chat reply streamed in chunks for one session: [`send`](Self::send) each piece as it
/// is ready, then [`finish`](Self::finish), which sends the empty `complete:true` chunk that
/// tells the client the reply is over.
///
/// ```no_run
/// use sockhost_addon_sdk::protocol::ChatStream;
///
/// let reply = ChatStream::new("session_123");
/// reply.send("Hello, ")?;
/// reply.send("world")?;
/// reply.finish()?;
/// # Ok::<(), sockhost_addon_sdk::SendError>(())
/// ```
#[derive(Debug)]
#[must_use = "a chat reply ends with `finish()`"]
pub struct ChatStream {
    session_id: String,
}

impl ChatStream {
    /// Starts a reply for `session_id`. Nothing is sent yet.
    pub fn new(session_id: impl Into<String>) -> Self {
        Self { session_id: session_id.into() }
    }

    /// The session the chunks are sent for.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Sends one chunk with `complete:false`.
    pub fn send(&self, text: &str) -> Result<(), SendError> {
        send_chat_chunk(&self.session_id, text, false)
    }

    /// Ends the reply: sends an empty chunk with `complete:true`.
    pub fn finish(self) -> Result<(), SendError> {
        send_chat_chunk(&self.session_id, "", true)
    }
}
