//! The benchmark's streaming addon (`bench/run`, the 10-chunk scenario): answers each text
//! message with [`CHUNKS`] text frames, `"<index>:<message>"` for index 0..9, sent one by
//! one the way a chat backend streams a reply, then nothing else. Binary messages are
//! ignored. The peers in `bench/peers/` and `native-echo --stream 10` answer the same way.

use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_text};

/// Frames per reply.
const CHUNKS: usize = 10;

#[derive(Default)]
struct Streamer;

impl Addon for Streamer {
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        if let Message::Text(text) = msg {
            for index in 0..CHUNKS {
                send_text(&format!("{index}:{text}"))?;
            }
        }
        Ok(())
    }
}

export_addon!(Streamer);
