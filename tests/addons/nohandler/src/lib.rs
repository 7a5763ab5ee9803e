//! A component of the `base` world: it imports `channels` but does not export
//! `channel-handler`, like an addon built before channels existed that a later build
//! linked against the new imports. The host must mount it and answer its `subscribe`
//! with `denied` (it could never receive anything), while `publish` works as granted.
//! Each text message is a command, `sub <channel>` or `pub <channel> <text>`, answered
//! with the outcome.

wit_bindgen::generate!({ world: "base", path: "../../../wit", generate_all });

use exports::sockhost::addon::handler::{CloseFrame, ConnectionInfo, Guest, Message};
use sockhost::addon::{channels, session};

struct NoHandler;

impl Guest for NoHandler {
    fn on_open(_info: ConnectionInfo) -> Result<(), CloseFrame> {
        Ok(())
    }

    fn on_message(msg: Message) -> Result<(), String> {
        let Message::Text(command) = msg else { return Err("commands are text".into()) };
        let outcome = match command.split_once(' ') {
            Some(("sub", channel)) => channels::subscribe(channel),
            Some(("pub", args)) => {
                let (channel, text) = args.split_once(' ').unwrap_or((args, ""));
                channels::publish(channel, &Message::Text(text.into()))
            }
            _ => return Err(format!("unknown command {command:?}")),
        };
        let _ = session::send_text(&format!("{outcome:?}"));
        Ok(())
    }

    fn on_close(_code: u16, _reason: String) {}
}

export!(NoHandler);
