//! The addon the end-to-end tests drive: each text command exercises one part of the host.
//! Commands: count, stream, error, trap, info, close, print, log, flood; `?refuse=1` in the
//! query refuses the connection.

use std::time::Duration;

use sockhost_addon_sdk::{
    Addon, ConnectionInfo, Error, Message, Refusal, close, connection_info, export_addon, log, send_json,
    send_text,
};

#[derive(Default)]
struct Testkit {
    count: u64,
}

impl Addon for Testkit {
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        if info.query.split('&').any(|pair| pair == "refuse=1") {
            return Err(Refusal::new(4003, "refused by testkit"));
        }
        // A client that left during the handshake is not a reason to refuse.
        let _ = send_text("open");
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let Message::Text(command) = msg else {
            return Err(Error::msg("testkit: binary frames are not commands"));
        };
        match command.as_str() {
            "count" => {
                self.count += 1;
                send_text(&self.count.to_string())?;
            }
            "stream" => {
                send_text("first")?;
                // On wasip2 this waits on the WASI monotonic clock: the host must not block
                // a thread for it.
                std::thread::sleep(Duration::from_millis(200));
                send_text("second")?;
            }
            "error" => return Err(Error::msg("testkit: asked to fail")),
            "trap" => panic!("testkit: asked to trap"),
            "info" => send_json(&connection_info())?,
            "close" => close(4000, "bye"),
            "print" => {
                println!("testkit stdout line");
                eprintln!("testkit stderr line");
                send_text("printed")?;
            }
            "log" => {
                log::info("testkit log line");
                send_text("logged")?;
            }
            "flood" => {
                // Sends until the host cuts off a client that does not read.
                let frame = "x".repeat(16 * 1024);
                let mut sent = 0u64;
                while send_text(&frame).is_ok() {
                    sent += 1;
                }
                log::info(&format!("testkit flood stopped after {sent} frames"));
            }
            other => send_text(&format!("unknown: {other}"))?,
        }
        Ok(())
    }

    fn on_close(&mut self, code: u16, reason: &str) {
        log::info(&format!("testkit on-close code={code} reason={reason}"));
    }
}

export_addon!(Testkit);
