//! The benchmark's streaming addon (`bench/run`, the 10-chunk scenario): answers each text
//! message with [`CHUNKS`] text frames, `"<index>:<message>"` for index 0..9, sent one by
//! one the way a chat backend streams a reply, then nothing else. Binary messages are
//! ignored. The peers in `bench/peers/` and `native-echo --stream 10` answer the same way.
//!
//! Each chunk is built in one buffer by appending, as the peers' string concatenation
//! does: `format!` costs about 2,000 instructions per chunk in wasm (`core::fmt` plus an
//! allocation), which the 10-chunk benchmark would otherwise count as the host's.

use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_text};

/// Frames per reply.
const CHUNKS: usize = 10;

#[derive(Default)]
struct Streamer;

impl Addon for Streamer {
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        if let Message::Text(text) = msg {
            let mut chunk = String::with_capacity(text.len() + 4);
            for index in 0..CHUNKS {
                chunk.clear();
                chunk.push_str(itoa(index, &mut [0; 20]));
                chunk.push(':');
                chunk.push_str(&text);
                send_text(&chunk)?;
            }
        }
        Ok(())
    }
}

/// `n` in decimal, written into `buf`.
fn itoa(mut n: usize, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).expect("ASCII digits")
}

export_addon!(Streamer);
