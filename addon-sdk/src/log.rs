//! Lines in the host's log, tagged with the addon name and connection id by the host.
//!
//! The host's log filter (e.g. `RUST_LOG=info`) decides which levels are kept; messages
//! longer than 4 KiB are cut.
//!
//! ```no_run
//! use sockhost_addon_sdk::log;
//!
//! log::info("client said hello");
//! log::warn(&format!("slow reply: {} ms", 1200));
//! ```

use crate::__private::bindings::sockhost::addon::log::{Level, log};

/// Logs at `trace`, the most verbose level.
pub fn trace(message: &str) {
    log(Level::Trace, message);
}

/// Logs at `debug`.
pub fn debug(message: &str) {
    log(Level::Debug, message);
}

/// Logs at `info`.
pub fn info(message: &str) {
    log(Level::Info, message);
}

/// Logs at `warn`.
pub fn warn(message: &str) {
    log(Level::Warn, message);
}

/// Logs at `error`.
pub fn error(message: &str) {
    log(Level::Error, message);
}
