//! The benchmark's smallest guest (`bench/run`): sends every message back unchanged and
//! does nothing else. Beside the `echo` addon (which first tries to read each text message
//! as the chat envelope) it separates what the host costs per message from what an
//! addon's own work costs.

use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_binary, send_text};

#[derive(Default)]
struct Mirror;

impl Addon for Mirror {
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        match msg {
            Message::Text(text) => send_text(&text)?,
            Message::Binary(data) => send_binary(&data)?,
        }
        Ok(())
    }
}

export_addon!(Mirror);
