//! The example addon: echoes every frame back, and answers chat messages with a reply
//! streamed in chunks, the way a chat backend would.

use serde::{Deserialize, Serialize};
use sockhost_addon_sdk::protocol::{ChatStream, ClientMessage, ProtocolError, send_error};
use sockhost_addon_sdk::{Addon, Error, Message, SendError, export_addon, send_binary, send_text};

/// Echo keeps no state: it hibernates as `null`, and an idle echo connection costs the
/// server no instance.
#[derive(Default, Serialize, Deserialize)]
struct Echo;

impl Addon for Echo {
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let text = match msg {
            Message::Binary(data) => return Ok(send_binary(&data)?),
            Message::Text(text) => text,
        };
        match ClientMessage::parse(&text) {
            // Not the chat envelope at all: plain text is echoed unchanged.
            Err(ProtocolError::BadJson(_)) => send_text(&text)?,
            Err(e) => send_error(e.code(), &e.to_string())?,
            Ok(msg) if !msg.is_chat() => {
                let action = msg.action.unwrap_or_default();
                send_error("unsupported_action", &format!("unsupported action `{action}`"))?;
            }
            Ok(msg) => reply(msg)?,
        }
        Ok(())
    }
}

/// Streams "Echo: <message>" back in about four chunks, then the closing chunk.
fn reply(msg: ClientMessage) -> Result<(), SendError> {
    let chat = ChatStream::new(msg.session_id.unwrap_or_default());
    // Split by characters, not bytes: every chunk must be valid UTF-8 on its own.
    let chars: Vec<char> = format!("Echo: {}", msg.message).chars().collect();
    for piece in chars.chunks(chars.len().div_ceil(4)) {
        chat.send(&piece.iter().collect::<String>())?;
    }
    chat.finish()
}

export_addon!(Echo, hibernate);
