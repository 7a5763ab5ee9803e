//! Log lines that clients can cause: bounded in size and in number.
//!
//! Every refused request and every failed connection is logged, and a client chooses how
//! many it causes and much of what they say: one refused `Origin` used to put the whole
//! header (up to 16 KiB) into a warning, so a loop of requests could write megabytes a
//! second to the log, fill the disk or bury what matters. Two bounds:
//!
//! - **Size.** Text that comes from a client (a header, a path, a request head, a close
//!   reason) is logged through [`client_text`]: at most [`MAX_CLIENT_TEXT`] bytes, cut at a
//!   character boundary and marked with how much was left out, control characters escaped
//!   so a client cannot forge line breaks.
//! - **Number.** A [`LogLimiter`] lets through at most [`LINES_PER_INTERVAL`] lines of one
//!   failure kind per [`INTERVAL`], per scope (each addon has its own, so a flood on one
//!   does not hide another's failures; the server has one for what fails before an addon
//!   is known). The lines past that are counted, and when the interval is over one line
//!   says how many were left out. A full instance pool (`instance_capacity`) gets one line
//!   per interval, not ten: when it is full every new client hits it, and the line that
//!   matters is how many (the issue that named it saw 8,638 identical lines). Counting is exact: the metrics (`sockhost_failures_total`)
//!   still count every failure; only the log is thinned.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::FailureKind;

/// Longest client-provided text put into a log line, in bytes (before escaping).
pub const MAX_CLIENT_TEXT: usize = 256;
/// Lines of one kind, in one scope, logged per [`INTERVAL`].
pub const LINES_PER_INTERVAL: u32 = 10;
/// Lines of `instance_capacity` per [`INTERVAL`], in one scope.
pub const CAPACITY_LINES_PER_INTERVAL: u32 = 1;
/// The window [`LINES_PER_INTERVAL`] applies to.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Client text as it goes into a log line: see the module doc.
pub(crate) fn client_text(text: &str) -> ClientText<'_> {
    ClientText(text)
}

/// Displays at most [`MAX_CLIENT_TEXT`] bytes of the text, escaped; see [`client_text`].
pub(crate) struct ClientText<'a>(&'a str);

impl fmt::Display for ClientText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = crate::error::truncate_utf8(self.0, MAX_CLIENT_TEXT);
        for c in kept.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        if kept.len() < self.0.len() {
            write!(f, "…[{} more bytes]", self.0.len() - kept.len())?;
        }
        Ok(())
    }
}

/// At most [`LINES_PER_INTERVAL`] lines per failure kind per [`INTERVAL`]; see the module
/// doc.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    /// One per failure kind, and a last one for connections an addon refused in
    /// `on-open` (not a failure, but a client with a bad token can cause them in a loop).
    windows: [Mutex<Window>; KINDS],
}

const KINDS: usize = FailureKind::ALL.len() + 1;
const REFUSED: usize = FailureKind::ALL.len();

/// How many lines of the kind in `slot` each window lets through.
fn budget(slot: usize) -> u32 {
    if slot == FailureKind::InstanceCapacity as usize {
        CAPACITY_LINES_PER_INTERVAL
    } else {
        LINES_PER_INTERVAL
    }
}

fn kind_name(slot: usize) -> &'static str {
    FailureKind::ALL.get(slot).map_or("refused", |kind| kind.code())
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window began; `None` before the first line.
    started: Option<Instant>,
    logged: u32,
    left_out: u64,
}

impl LogLimiter {
    /// Whether a line of `kind` may be logged now. When an earlier window ended with
    /// lines left out, this first says how many, on a line of its own, naming `scope`
    /// (the addon, or `server`).
    pub(crate) fn admit(&self, kind: FailureKind, scope: &str) -> bool {
        self.admit_at(kind as usize, scope, Instant::now())
    }

    /// [`LogLimiter::admit`] for a connection the addon refused (`refused` lines).
    pub(crate) fn admit_refused(&self, scope: &str) -> bool {
        self.admit_at(REFUSED, scope, Instant::now())
    }

    fn admit_at(&self, slot: usize, scope: &str, now: Instant) -> bool {
        let (admitted, ended) = {
            let mut window = self.windows[slot].lock().unwrap_or_else(|p| p.into_inner());
            let ended = match window.started {
                Some(started) if now.duration_since(started) < INTERVAL => 0,
                _ => {
                    let left_out = std::mem::take(&mut window.left_out);
                    *window = Window { started: Some(now), logged: 0, left_out: 0 };
                    left_out
                }
            };
            let admitted = window.logged < budget(slot);
            if admitted {
                window.logged += 1;
            } else {
                window.left_out += 1;
            }
            (admitted, ended)
        };
        if ended > 0 {
            report(slot, scope, ended);
        }
        admitted
    }

    /// Says how many lines were left out in windows that are over. Called by the server
    /// every second, so the count shows even when the flood has stopped.
    pub(crate) fn flush(&self, scope: &str) {
        self.flush_at(scope, Instant::now());
    }

    fn flush_at(&self, scope: &str, now: Instant) {
        for slot in 0..KINDS {
            let ended = {
                let mut window = self.windows[slot].lock().unwrap_or_else(|p| p.into_inner());
                match window.started {
                    Some(started) if window.left_out > 0 && now.duration_since(started) >= INTERVAL => {
                        std::mem::take(&mut *window).left_out
                    }
                    _ => 0,
                }
            };
            if ended > 0 {
                report(slot, scope, ended);
            }
        }
    }
}

fn report(slot: usize, scope: &str, left_out: u64) {
    let kind = kind_name(slot);
    tracing::warn!(
        scope,
        kind,
        left_out,
        "{left_out} more `{kind}` lines ({scope}) were left out of the log in {} s (at most {} \
         are logged per {} s; the metrics count every failure)",
        INTERVAL.as_secs(),
        budget(slot),
        INTERVAL.as_secs(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_cut_at_a_character_and_escaped() {
        assert_eq!(client_text("https://shop.example").to_string(), "https://shop.example");
        let long = "é".repeat(10_000);
        let shown = client_text(&long).to_string();
        assert!(shown.starts_with("éé") && shown.ends_with("…[19744 more bytes]"), "{shown}");
        assert!(shown.len() < MAX_CLIENT_TEXT + 32, "{}", shown.len());
        assert_eq!(client_text("a\nb\r\u{1b}[31m").to_string(), "a\\nb\\r\\u{1b}[31m");
    }

    #[test]
    fn lines_past_the_limit_are_counted_and_reported_once_the_window_is_over() {
        let limiter = LogLimiter::default();
        let start = Instant::now();
        let origin = FailureKind::Origin as usize;
        let admitted = (0..25).filter(|_| limiter.admit_at(origin, "echo", start)).count();
        assert_eq!(admitted, LINES_PER_INTERVAL as usize);
        // Each kind has its own budget.
        assert!(limiter.admit_at(FailureKind::Capacity as usize, "echo", start));
        assert!(limiter.admit_at(REFUSED, "echo", start));
        assert_eq!(kind_name(REFUSED), "refused");
        let window = |kind: FailureKind| limiter.windows[kind as usize].lock().unwrap().left_out;
        assert_eq!(window(FailureKind::Origin), 15);
        // Not over yet: nothing to report.
        limiter.flush_at("echo", start + INTERVAL / 2);
        assert_eq!(window(FailureKind::Origin), 15);
        // Over: reported (and so reset) by the flush, or by the next line.
        limiter.flush_at("echo", start + INTERVAL);
        assert_eq!(window(FailureKind::Origin), 0);
        for _ in 0..12 {
            limiter.admit_at(origin, "echo", start + INTERVAL);
        }
        assert_eq!(window(FailureKind::Origin), 2);
        assert!(limiter.admit_at(origin, "echo", start + INTERVAL * 2));
        assert_eq!(window(FailureKind::Origin), 0);
    }

    #[test]
    fn a_full_pool_is_logged_once_per_interval_then_counted() {
        let limiter = LogLimiter::default();
        let start = Instant::now();
        let slot = FailureKind::InstanceCapacity as usize;
        let admitted = (0..100).filter(|_| limiter.admit_at(slot, "echo", start)).count();
        assert_eq!(admitted, 1);
        assert_eq!(limiter.windows[slot].lock().unwrap().left_out, 99);
        assert!(limiter.admit_at(slot, "echo", start + INTERVAL));
        assert_eq!(limiter.windows[slot].lock().unwrap().left_out, 0);
    }
}
