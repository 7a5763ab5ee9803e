//! The channel benchmark's addon (`bench/run`'s fan-out scenarios), and the smallest
//! guest that uses channels:
//!
//! - `?sub=<channel>`: subscribes; every message published there is sent to the client
//!   unchanged;
//! - `?pub=<channel>`: every text message from the client is published there unchanged.

use sockhost_addon_sdk::{
    Addon, ConnectionInfo, Error, Message, Refusal, channels, export_addon, send_binary, send_text,
};

#[derive(Default)]
struct Fanout {
    publish_to: Option<String>,
}

impl Addon for Fanout {
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        if let Some(channel) = info.query_param("sub") {
            channels::subscribe(&channel).map_err(|err| Refusal::policy_violation(err.to_string()))?;
        }
        self.publish_to = info.query_param("pub");
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        if let Some(channel) = &self.publish_to {
            channels::publish(channel, &msg)?;
        }
        Ok(())
    }

    fn on_channel_message(&mut self, _channel: &str, msg: Message) {
        let _ = match msg {
            Message::Text(text) => send_text(&text),
            Message::Binary(data) => send_binary(&data),
        };
    }
}

export_addon!(Fanout);
