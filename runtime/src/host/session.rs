//! `sockhost:addon/session`: the connection an instance serves.
//!
//! The host owns the socket. The write half of the WebSocket sits in an [`Outbox`] shared
//! by the instance's [`Session`] and the connection task. `send-text` / `send-binary`
//! queue a frame and return; the frames leave in one write (corked, as uWebSockets does)
//! as soon as the guest stops running for any reason:
//! - its callback returns;
//! - it waits: a host call that has to wait (kv, outbound HTTP, channels, a full socket),
//!   a WASI clock or poll;
//! - an epoch tick makes it yield, so a frame never waits behind guest computation for
//!   longer than one tick ([`crate::engine::EPOCH_TICK`]);
//! - the queue passes [`CORK_BYTES`] (tungstenite writes it out then).
//!
//! The connection task does the flushing: it polls each callback through
//! `connection::guest_turn`, which flushes the outbox whenever the callback's future
//! returns `Pending` and once more when it completes. Replies still stream: a streamed
//! chunk followed by a wait for the next one leaves at the wait.
//!
//! When the client reads slowly the queue cannot drain, and the next `send` waits for
//! room: the backpressure reaches the addon instead of growing a buffer. So the outbound
//! queue of a connection is bounded by the socket's own buffers plus [`CORK_BYTES`] and
//! one frame. A client that does not read for the addon's `send_timeout_s` is cut off:
//! the socket is dropped (a close frame could not get through a full buffer) and `send`
//! fails with `closed`. The read half stays with the connection task, which keeps
//! reading (and answering pings) during callbacks.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{Sink, SinkExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::HostState;
use crate::bindings::sockhost::addon::session::{Host, SendError};
use crate::bindings::{CloseFrame, ConnectionInfo};
use crate::client_stream::ClientStream;
use crate::error::{close_code, truncate_close_reason};
use crate::metrics::AddonStats;

/// The write half of a client's WebSocket.
pub type WsSink = SplitSink<WebSocketStream<ClientStream>, WsMessage>;

/// Largest frame an addon may send in one call.
pub const MAX_OUTBOUND_FRAME: usize = 16 << 20;

/// How long the host waits to flush its last frames when shutting a socket down.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Queued frames past this many bytes are written out without waiting for the guest to
/// stop (tungstenite's `write_buffer_size`, set from this in the server's WebSocket
/// config).
pub const CORK_BYTES: usize = 64 * 1024;

/// The socket's write half, shared by the instance's session (which queues frames) and
/// the connection task (which flushes them whenever the guest stops running). The lock
/// is only ever taken inside one poll, never across an `await`, and only by the one
/// task that owns the connection, so it is never contended. What is checked on every
/// message (anything queued? socket lost?) sits beside it in atomics, so an echo takes
/// the lock twice: to queue its frame and to flush it.
pub struct Outbox {
    sink: Mutex<Option<WsSink>>,
    /// Frames were queued since the last completed flush.
    corked: AtomicBool,
    /// Why the socket can take no more frames, once it cannot: [`Lost`] as a `u8`.
    lost: AtomicU8,
}

/// How the write side was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Lost {
    /// A write failed: the connection is gone.
    Broken = 1,
    /// The client did not read for `send_timeout`; the socket was dropped.
    Stalled = 2,
}

impl Outbox {
    fn new() -> Outbox {
        Outbox { sink: Mutex::new(None), corked: AtomicBool::new(false), lost: AtomicU8::new(0) }
    }

    fn sink(&self) -> MutexGuard<'_, Option<WsSink>> {
        // A panic while holding it cannot leave anything torn: the sink is one value.
        self.sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lost(&self) -> Option<Lost> {
        match self.lost.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Lost::Broken),
            _ => Some(Lost::Stalled),
        }
    }

    /// Records the first way the socket was lost; a stalled one is dropped.
    fn lose(&self, how: Lost, sink: &mut Option<WsSink>) {
        let _ = self.lost.compare_exchange(0, how as u8, Ordering::Relaxed, Ordering::Relaxed);
        self.corked.store(false, Ordering::Relaxed);
        if how == Lost::Stalled {
            *sink = None;
        }
    }

    /// Starts writing what is queued, without waiting: for the moments the guest is not
    /// running. A write error marks the outbox broken; the next `send` reports it.
    pub(crate) fn poll_flush_queued(&self, cx: &mut Context<'_>) {
        if self.corked.load(Ordering::Relaxed) {
            let _ = self.poll_flush(cx);
        }
    }

    /// Writes out everything queued, waiting up to `timeout` for a slow client; past it
    /// the socket is dropped.
    pub(crate) async fn flush(&self, timeout: Duration) {
        if !self.corked.load(Ordering::Relaxed) {
            return;
        }
        let mut flush = std::pin::pin!(std::future::poll_fn(|cx| self.poll_flush(cx)));
        // Most flushes complete at once: only one that has to wait pays for a timer.
        if std::future::poll_fn(|cx| Poll::Ready(flush.as_mut().poll(cx))).await.is_pending()
            && tokio::time::timeout(timeout, flush).await.is_err()
        {
            self.stall();
        }
    }

    /// Polls the sink's flush; `Ready` once nothing is queued or the socket is lost.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut sink = self.sink();
        let Some(open) = sink.as_mut() else {
            self.corked.store(false, Ordering::Relaxed);
            return Poll::Ready(());
        };
        match open.poll_flush_unpin(cx) {
            Poll::Ready(Ok(())) => {
                self.corked.store(false, Ordering::Relaxed);
                Poll::Ready(())
            }
            Poll::Ready(Err(err)) => {
                tracing::debug!(error = %err, "flush failed; the connection is gone");
                self.lose(Lost::Broken, &mut sink);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Queues `message` if the socket has room now; `Pending` (with `message` back)
    /// when it must wait for the client to read. Errors mean the socket is lost.
    fn try_queue(&self, cx: &mut Context<'_>, message: &mut Option<WsMessage>) -> Poll<Result<(), ()>> {
        if self.lost().is_some() {
            return Poll::Ready(Err(()));
        }
        let mut sink = self.sink();
        let Some(open) = sink.as_mut() else { return Poll::Ready(Err(())) };
        let outcome = match open.poll_ready_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let message = message.take().expect("queued once");
                std::pin::Pin::new(open).start_send(message)
            }
            Poll::Ready(Err(err)) => Err(err),
        };
        match outcome {
            Ok(()) => {
                self.corked.store(true, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Err(err) => {
                tracing::debug!(error = %err, "send failed; the connection is gone");
                self.lose(Lost::Broken, &mut sink);
                Poll::Ready(Err(()))
            }
        }
    }

    /// The client has not read for `send_timeout`: its buffers are full. Dropping the
    /// socket is the only way out; a close frame would not get through.
    fn stall(&self) {
        let mut sink = self.sink();
        self.lose(Lost::Stalled, &mut sink);
    }
}

/// Per-instance session state.
pub struct Session {
    info: ConnectionInfo,
    outbox: Arc<Outbox>,
    /// Counts messages and bytes sent; set with the sink.
    stats: Option<Arc<AddonStats>>,
    send_timeout: Duration,
    /// Set once a close frame went out (from the addon or the host), or the socket was
    /// lost. Later sends fail.
    close_sent: Option<(u16, String)>,
    /// Set when the client stopped reading for longer than `send_timeout`.
    stalled: bool,
}

impl Session {
    pub(crate) fn new(info: ConnectionInfo, send_timeout: Duration) -> Session {
        Session {
            info,
            outbox: Arc::new(Outbox::new()),
            stats: None,
            send_timeout,
            close_sent: None,
            stalled: false,
        }
    }

    /// Whether the connection was cut off because the client stopped reading.
    pub(crate) fn stalled(&mut self) -> bool {
        self.absorb_lost();
        self.stalled
    }

    /// Gives the session the socket's write half, once the upgrade has succeeded, and
    /// returns the outbox the connection task flushes.
    pub(crate) fn attach(&mut self, sink: WsSink, stats: Arc<AddonStats>) -> Arc<Outbox> {
        *self.outbox.sink() = Some(sink);
        self.stats = Some(stats);
        self.outbox.clone()
    }

    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The close frame already sent on this connection (or the loss of its socket), if any.
    pub(crate) fn close_sent(&mut self) -> Option<&(u16, String)> {
        self.absorb_lost();
        self.close_sent.as_ref()
    }

    /// Whether a close frame went out or the socket was lost: sending is over.
    #[inline]
    pub(crate) fn closing(&self) -> bool {
        self.close_sent.is_some() || self.outbox.lost.load(Ordering::Relaxed) != 0
    }

    /// Takes over what the connection task's flushes learnt about the socket.
    fn absorb_lost(&mut self) {
        if self.close_sent.is_some() {
            return;
        }
        match self.outbox.lost() {
            None => {}
            Some(Lost::Broken) => self.close_sent = Some((close_code::ABNORMAL, String::new())),
            Some(Lost::Stalled) => {
                self.stalled = true;
                self.close_sent = Some((close_code::POLICY, "client too slow to read".to_owned()));
            }
        }
    }

    /// Queues one frame to leave with the next flush. Waits only while the socket has no
    /// room (a client that reads slowly). Fails with `closed` once a close frame went
    /// out or the socket broke.
    pub(crate) async fn queue(&mut self, message: WsMessage) -> Result<(), SendError> {
        if self.closing() {
            self.absorb_lost();
            return Err(SendError::Closed);
        }
        let data_bytes = match &message {
            WsMessage::Text(text) => Some(text.len()),
            WsMessage::Binary(data) => Some(data.len()),
            _ => None,
        };
        let outbox = &*self.outbox;
        let mut message = Some(message);
        // Most sends find room at once (the socket is not backed up): only one that has to
        // wait pays for a timer.
        let mut queue = std::pin::pin!(std::future::poll_fn(|cx| outbox.try_queue(cx, &mut message)));
        let queued = match std::future::poll_fn(|cx| Poll::Ready(queue.as_mut().poll(cx))).await {
            Poll::Ready(queued) => queued,
            Poll::Pending => match tokio::time::timeout(self.send_timeout, queue).await {
                Ok(queued) => queued,
                Err(_) => {
                    outbox.stall();
                    Err(())
                }
            },
        };
        if queued.is_err() {
            self.absorb_lost();
            return Err(SendError::Closed);
        }
        if let (Some(bytes), Some(stats)) = (data_bytes, &self.stats) {
            stats.message_out(bytes);
        }
        Ok(())
    }

    /// Writes one frame and everything queued before it, now: for the host's own frames
    /// (errors, pings), sent outside any callback.
    pub(crate) async fn send(&mut self, message: WsMessage) -> Result<(), SendError> {
        self.queue(message).await?;
        self.outbox.flush(self.send_timeout).await;
        match self.close_sent() {
            Some(_) => Err(SendError::Closed),
            None => Ok(()),
        }
    }

    /// Sends a ping; the connection task uses it to find dead peers.
    pub(crate) async fn ping(&mut self) {
        if self.close_sent().is_none() {
            let _ = self.send(WsMessage::Ping(Default::default())).await;
        }
    }

    /// Sends a close frame once; later calls do nothing. Codes a server may not send are
    /// replaced with 1008, and the replacement is logged.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        if self.close_sent().is_some() {
            return;
        }
        let code = if close_code::is_sendable(code) {
            code
        } else {
            let (addon, conn) = (&*self.info.addon, self.info.id);
            tracing::warn!(
                addon,
                conn,
                code,
                "addon asked for a close code a server may not send; using 1008"
            );
            close_code::POLICY
        };
        let reason = truncate_close_reason(reason).to_owned();
        let frame = WsCloseFrame { code: CloseCode::from(code), reason: reason.clone().into() };
        // Frames queued before the close go first, in the same write.
        let sent = self.queue(WsMessage::Close(Some(frame))).await;
        if sent.is_ok() {
            self.outbox.flush(self.send_timeout).await;
        }
        self.absorb_lost();
        self.close_sent.get_or_insert((code, reason));
    }

    /// Flushes what is queued (briefly) and shuts the write side down.
    pub(crate) async fn shutdown(&mut self) {
        let sink = self.outbox.sink().take();
        if let Some(mut sink) = sink {
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, sink.close()).await;
        }
    }
}

impl Host for HostState {
    async fn send_text(&mut self, text: String) -> Result<(), SendError> {
        if text.len() > MAX_OUTBOUND_FRAME {
            return Err(SendError::TooLarge);
        }
        self.session.queue(WsMessage::text(text)).await
    }

    async fn send_binary(&mut self, data: Vec<u8>) -> Result<(), SendError> {
        if data.len() > MAX_OUTBOUND_FRAME {
            return Err(SendError::TooLarge);
        }
        self.session.queue(WsMessage::binary(data)).await
    }

    async fn close(&mut self, frame: CloseFrame) {
        self.session.close(frame.code, &frame.reason).await;
    }

    fn info(&mut self) -> ConnectionInfo {
        self.session.info.clone()
    }
}
