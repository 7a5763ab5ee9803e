//! The {{name}} addon: echoes plain text, and answers chat messages
//! (`{"message":"...","session_id":"..."}`) with a reply streamed word by word.

use sockhost_addon_sdk::protocol::{ChatStream, ClientMessage, ProtocolError, send_error};
use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_binary, send_text};

/// One connection's state: one instance of the component serves one connection.
#[derive(Default)]
struct App;

impl Addon for App {
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let text = match msg {
            Message::Binary(data) => return Ok(send_binary(&data)?),
            Message::Text(text) => text,
        };
        match ClientMessage::parse(&text) {
            Err(ProtocolError::BadJson(_)) => send_text(&text)?,
            Err(e) => send_error(e.code(), &e.to_string())?,
            Ok(msg) => {
                let chat = ChatStream::new(msg.session_id.unwrap_or_default());
                for chunk in reply_chunks(&msg.message) {
                    chat.send(&chunk)?;
                }
                chat.finish()?;
            }
        }
        Ok(())
    }
}

/// The reply to `message`, in the chunks it is streamed in: one per word.
fn reply_chunks(message: &str) -> Vec<String> {
    format!("You said: {message}").split_inclusive(' ').map(str::to_owned).collect()
}

export_addon!(App);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_streams_word_by_word_and_adds_up() {
        let chunks = reply_chunks("where is my order");
        assert_eq!(chunks.len(), 6);
        assert_eq!(chunks.concat(), "You said: where is my order");
    }
}
