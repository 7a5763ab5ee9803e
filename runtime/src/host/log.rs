//! `sockhost:addon/log` and the guest's stdout/stderr: everything an addon says ends up
//! in the host's `tracing` log, as events with target `addon` and the fields `addon` and
//! `conn`, so `RUST_LOG=addon=debug` selects addon output and every line can be traced
//! back to its connection.
//!
//! Limits: one line is cut to [`MAX_LINE`] bytes, so a guest cannot make the host buffer
//! without bound by printing without newlines.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use super::HostState;
use crate::bindings::sockhost::addon::log::{Host, Level};
use crate::error::truncate_utf8;

/// Longest log line kept, in bytes; the rest is cut.
pub const MAX_LINE: usize = 4096;

/// Who is speaking: the addon and connection every guest log line is attributed to.
#[derive(Clone)]
pub struct LogContext {
    addon: Arc<str>,
    conn: u64,
}

impl LogContext {
    pub(crate) fn new(addon: Arc<str>, conn: u64) -> LogContext {
        LogContext { addon, conn }
    }

    fn emit(&self, level: Level, line: &str) {
        let (addon, conn) = (&*self.addon, self.conn);
        let line = truncate_utf8(line, MAX_LINE);
        match level {
            Level::Trace => tracing::trace!(target: "addon", addon, conn, "{line}"),
            Level::Debug => tracing::debug!(target: "addon", addon, conn, "{line}"),
            Level::Info => tracing::info!(target: "addon", addon, conn, "{line}"),
            Level::Warn => tracing::warn!(target: "addon", addon, conn, "{line}"),
            Level::Error => tracing::error!(target: "addon", addon, conn, "{line}"),
        }
    }

    /// The guest's stdout: each line becomes an `info` event.
    pub(crate) fn guest_stdout(&self) -> GuestOutput {
        GuestOutput { context: self.clone(), level: Level::Info }
    }

    /// The guest's stderr: each line becomes a `warn` event (a Rust panic message lands here).
    pub(crate) fn guest_stderr(&self) -> GuestOutput {
        GuestOutput { context: self.clone(), level: Level::Warn }
    }
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        self.log.emit(level, &message);
    }
}

/// A WASI output stream that turns what the guest writes into log lines.
pub struct GuestOutput {
    context: LogContext,
    level: Level,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter { context: self.context.clone(), level: self.level, pending: Vec::new() })
    }
}

/// Splits written bytes into lines and emits each one.
struct LineWriter {
    context: LogContext,
    level: Level,
    pending: Vec<u8>,
}

impl LineWriter {
    fn emit_pending(&mut self) {
        let text = String::from_utf8_lossy(&self.pending);
        self.context.emit(self.level, text.trim_end_matches(['\r', '\n']));
        self.pending.clear();
    }

    fn write_bytes(&mut self, mut buf: &[u8]) {
        while let Some(newline) = buf.iter().position(|&b| b == b'\n') {
            self.take(&buf[..newline]);
            self.emit_pending();
            buf = &buf[newline + 1..];
        }
        self.take(buf);
    }

    /// Buffers part of a line, dropping what goes past [`MAX_LINE`].
    fn take(&mut self, part: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.pending.len());
        self.pending.extend_from_slice(&part[..part.len().min(room)]);
    }
}

impl AsyncWrite for LineWriter {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            self.emit_pending();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit_pending();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_cut() {
        let mut writer = LineWriter {
            context: LogContext::new(Arc::from("t"), 1),
            level: Level::Info,
            pending: Vec::new(),
        };
        writer.write_bytes(b"one\ntw");
        assert_eq!(writer.pending, b"tw");
        writer.write_bytes(b"o\n");
        assert!(writer.pending.is_empty());
        writer.write_bytes(&vec![b'x'; MAX_LINE * 3]);
        assert_eq!(writer.pending.len(), MAX_LINE);
    }
}
