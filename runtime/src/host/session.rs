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
//! `send-text` and `send-binary` are plain (synchronous) host calls: they queue the frame
//! and return, which costs about 450 fewer instructions per frame than a host call that
//! may wait (no boxed future, no blocking context; `bench/instructions`). When the client
//! reads slowly the queue cannot drain: the frame that finds no room is held, and the
//! guest pauses at its next epoch check (the next function it enters or loop it goes
//! round) until the frame has room ([`add_to_linker`]). So backpressure still reaches the addon instead of growing a
//! buffer, and the outbound queue of a connection is bounded by the socket's own buffers
//! plus [`CORK_BYTES`] and one frame. A client that does not read for the addon's
//! `send_timeout_s` is cut off: the socket is dropped (a close frame could not get
//! through a full buffer) and the next `send` fails with `closed`. The read half stays
//! with the connection task, which keeps
//! reading (and answering pings) during callbacks.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{Sink, SinkExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as WsCloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use wasmtime::StoreContextMut;
use wasmtime::component::{HasSelf, Linker};

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
    writer: Mutex<Writer>,
    /// Frames were queued (or held) since the last completed flush.
    corked: AtomicBool,
    /// Why the socket can take no more frames, once it cannot: [`Lost`] as a `u8`.
    lost: AtomicU8,
}

/// What sits behind the outbox's lock: the sink, and the frames `send` accepted while the
/// sink had no room ([`Outbox::queue_now`]), in order, until it has.
struct Writer {
    sink: Option<WsSink>,
    held: VecDeque<WsMessage>,
    held_bytes: usize,
}

impl Writer {
    /// Moves held frames into the sink while it has room; `Ready(Ok)` once none is held.
    fn poll_release_held(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        while !self.held.is_empty() {
            let Some(open) = self.sink.as_mut() else { return Poll::Ready(Ok(())) };
            match open.poll_ready_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Ready(Ok(())) => {}
            }
            let message = self.held.pop_front().expect("not empty");
            self.held_bytes -= frame_bytes(&message);
            std::pin::Pin::new(open).start_send(message)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Bytes a frame holds, for the held-frame bound.
fn frame_bytes(message: &WsMessage) -> usize {
    match message {
        WsMessage::Text(text) => text.len(),
        WsMessage::Binary(data) => data.len(),
        _ => 0,
    }
}

/// What [`Outbox::queue_now`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueuedNow {
    /// In the sink: it leaves with the next flush.
    Queued,
    /// The sink had no room: the frame is held in order (with this many bytes held in
    /// all), and the guest must pause until it has room (the epoch callback waits for
    /// that at the guest's next check).
    Held(usize),
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
        Outbox {
            writer: Mutex::new(Writer { sink: None, held: VecDeque::new(), held_bytes: 0 }),
            corked: AtomicBool::new(false),
            lost: AtomicU8::new(0),
        }
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding it leaves at worst a held frame unsent on a connection
        // that is failing anyway.
        self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lost(&self) -> Option<Lost> {
        match self.lost.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(Lost::Broken),
            _ => Some(Lost::Stalled),
        }
    }

    /// Records the first way the socket was lost; a stalled one is dropped. Held frames
    /// can no longer reach the client and go.
    fn lose(&self, how: Lost, writer: &mut Writer) {
        let _ = self.lost.compare_exchange(0, how as u8, Ordering::Relaxed, Ordering::Relaxed);
        self.corked.store(false, Ordering::Relaxed);
        writer.held = VecDeque::new();
        writer.held_bytes = 0;
        if how == Lost::Stalled {
            writer.sink = None;
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

    /// Polls the sink's flush (held frames first); `Ready` once nothing is queued or
    /// held, or the socket is lost.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut writer = self.writer();
        if writer.sink.is_none() {
            self.corked.store(false, Ordering::Relaxed);
            return Poll::Ready(());
        }
        let flushed = match writer.poll_release_held(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(())) => {
                let open = writer.sink.as_mut().expect("checked above");
                open.poll_flush_unpin(cx)
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        };
        match flushed {
            Poll::Ready(Ok(())) => {
                self.corked.store(false, Ordering::Relaxed);
                Poll::Ready(())
            }
            Poll::Ready(Err(err)) => {
                tracing::debug!(error = %err, "flush failed; the connection is gone");
                self.lose(Lost::Broken, &mut writer);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waits until every held frame is in the sink, up to `timeout` for a slow client
    /// (past it the socket is dropped, as for a `send` that waited that long). What
    /// the epoch callback pauses the guest on after [`QueuedNow::Held`].
    pub(crate) async fn release_held(self: Arc<Self>, timeout: Duration) {
        let release = std::future::poll_fn(|cx| {
            let mut writer = self.writer();
            match writer.poll_release_held(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(()),
                Poll::Ready(Err(err)) => {
                    tracing::debug!(error = %err, "send failed; the connection is gone");
                    self.lose(Lost::Broken, &mut writer);
                    Poll::Ready(())
                }
            }
        });
        if tokio::time::timeout(timeout, release).await.is_err() {
            self.stall();
        }
    }

    /// Whether frames wait for room in the sink.
    pub(crate) fn holds_frames(&self) -> bool {
        self.corked.load(Ordering::Relaxed) && !self.writer().held.is_empty()
    }

    /// Queues `message` without waiting, for `send` called from inside the guest: into
    /// the sink if it has room, else held (in order) until it has. Errors mean the
    /// socket is lost.
    fn queue_now(&self, message: WsMessage) -> Result<QueuedNow, ()> {
        if self.lost().is_some() {
            return Err(());
        }
        let mut writer = self.writer();
        let writer = &mut *writer;
        let Some(open) = writer.sink.as_mut() else { return Err(()) };
        if writer.held.is_empty() {
            // No waker to register: a frame that finds no room is held, and whoever waits
            // for it (the epoch callback's pause, the flush after the callback) polls
            // again with its own.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(ready) = open.poll_ready_unpin(&mut cx) {
                return match ready.and_then(|()| std::pin::Pin::new(open).start_send(message)) {
                    Ok(()) => {
                        self.corked.store(true, Ordering::Relaxed);
                        Ok(QueuedNow::Queued)
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "send failed; the connection is gone");
                        self.lose(Lost::Broken, writer);
                        Err(())
                    }
                };
            }
        }
        writer.held_bytes += frame_bytes(&message);
        writer.held.push_back(message);
        self.corked.store(true, Ordering::Relaxed);
        Ok(QueuedNow::Held(writer.held_bytes))
    }

    /// Queues `message` if the socket has room now; `Pending` (with `message` back)
    /// when it must wait for the client to read. Errors mean the socket is lost.
    fn try_queue(&self, cx: &mut Context<'_>, message: &mut Option<WsMessage>) -> Poll<Result<(), ()>> {
        if self.lost().is_some() {
            return Poll::Ready(Err(()));
        }
        let mut writer = self.writer();
        if writer.sink.is_none() {
            return Poll::Ready(Err(()));
        }
        // Frames the guest sent before this one go first.
        let outcome = match writer.poll_release_held(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(err)) => Err(err),
            Poll::Ready(Ok(())) => {
                let open = writer.sink.as_mut().expect("checked above");
                match open.poll_ready_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        let message = message.take().expect("queued once");
                        std::pin::Pin::new(open).start_send(message)
                    }
                    Poll::Ready(Err(err)) => Err(err),
                }
            }
        };
        match outcome {
            Ok(()) => {
                self.corked.store(true, Ordering::Relaxed);
                Poll::Ready(Ok(()))
            }
            Err(err) => {
                tracing::debug!(error = %err, "send failed; the connection is gone");
                self.lose(Lost::Broken, &mut writer);
                Poll::Ready(Err(()))
            }
        }
    }

    /// The client has not read for `send_timeout`: its buffers are full. Dropping the
    /// socket is the only way out; a close frame would not get through.
    fn stall(&self) {
        let mut writer = self.writer();
        self.lose(Lost::Stalled, &mut writer);
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
    /// A frame the guest sent was held since its last pause: it must pause at its next
    /// check ([`add_to_linker`]).
    held_since_pause: bool,
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
            held_since_pause: false,
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
        self.outbox.writer().sink = Some(sink);
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

    /// Queues one frame the guest sends, without waiting ([`add_to_linker`] says why):
    /// into the sink if it has room, else held, and `held_since_pause` set so the guest
    /// pauses at its next check. Fails with `closed` once a close frame went out or the
    /// socket broke; traps past [`MAX_HELD_BYTES`] held.
    fn send_now(&mut self, message: WsMessage) -> wasmtime::Result<Result<(), SendError>> {
        if self.closing() {
            self.absorb_lost();
            return Ok(Err(SendError::Closed));
        }
        let bytes = frame_bytes(&message);
        match self.outbox.queue_now(message) {
            Ok(queued) => {
                if let Some(stats) = &self.stats {
                    stats.message_out(bytes);
                }
                if let QueuedNow::Held(held) = queued {
                    if held > MAX_HELD_BYTES {
                        wasmtime::bail!(
                            "the addon sent {held} bytes while the client was not reading, without \
                             pausing between sends (the host holds at most {MAX_HELD_BYTES})"
                        );
                    }
                    self.held_since_pause = true;
                }
                Ok(Ok(()))
            }
            Err(()) => {
                self.absorb_lost();
                Ok(Err(SendError::Closed))
            }
        }
    }

    /// What the epoch callback pauses the guest on when frames it sent are held: their
    /// move into the sink, for at most `send_timeout` (then the client is cut off, as a
    /// `send` that waited that long would have been).
    pub(crate) fn pause_for_held(&self) -> Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> {
        self.outbox.holds_frames().then(|| Box::pin(self.outbox.clone().release_held(self.send_timeout)) as _)
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
        let sink = self.outbox.writer().sink.take();
        if let Some(mut sink) = sink {
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, sink.close()).await;
        }
    }
}

/// Held frames past this many bytes mean the guest sends without ever reaching a point
/// where it can pause (see [`add_to_linker`]); the call traps.
pub const MAX_HELD_BYTES: usize = MAX_OUTBOUND_FRAME;

/// Adds the session interface to `linker`: the generated bindings, with `send-text` and
/// `send-binary` wrapped. They queue the frame without waiting (plain host calls cost
/// less to enter than ones that may wait, and these are the calls a streamed reply
/// makes most). When the socket has no room the frame is held, and the wrapper sets the
/// epoch deadline to now: the guest's next check (the next function it enters or loop it
/// goes round) runs the epoch callback, which pauses it until the held frames are in the
/// sink ([`Session::pause_for_held`]). So the addon still waits for a slow client, just
/// after the call instead of inside it. A component encoded by wit-component (what
/// cargo, componentize-js and componentize-py all use) reaches `send-*` through a small
/// wasm function that lowers the string, so it meets a check before every send and at
/// most one frame is held; hand-written core wasm could send again without one, and
/// traps once [`MAX_HELD_BYTES`] are held.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    fn this(state: &mut HostState) -> &mut HostState {
        state
    }
    crate::bindings::sockhost::addon::session::add_to_linker::<HostState, HasSelf<HostState>>(linker, this)?;
    // Defined again under the same name, over the generated ones.
    linker.allow_shadowing(true);
    let mut session =
        linker.instance(&format!("sockhost:addon/session@{}", crate::bindings::wit_version()))?;
    session.func_wrap("send-text", |mut store: StoreContextMut<'_, HostState>, (text,): (String,)| {
        let sent = Host::send_text(store.data_mut(), text)?;
        pause_if_held(&mut store);
        Ok((sent,))
    })?;
    session.func_wrap("send-binary", |mut store: StoreContextMut<'_, HostState>, (data,): (Vec<u8>,)| {
        let sent = Host::send_binary(store.data_mut(), data)?;
        pause_if_held(&mut store);
        Ok((sent,))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Makes the guest's next epoch check pause it, when the frame it just sent was held.
fn pause_if_held(store: &mut StoreContextMut<'_, HostState>) {
    if std::mem::take(&mut store.data_mut().session.held_since_pause) {
        store.set_epoch_deadline(0);
    }
}

impl Host for HostState {
    fn send_text(&mut self, text: String) -> wasmtime::Result<Result<(), SendError>> {
        if text.len() > MAX_OUTBOUND_FRAME {
            return Ok(Err(SendError::TooLarge));
        }
        self.session.send_now(WsMessage::text(text))
    }

    fn send_binary(&mut self, data: Vec<u8>) -> wasmtime::Result<Result<(), SendError>> {
        if data.len() > MAX_OUTBOUND_FRAME {
            return Ok(Err(SendError::TooLarge));
        }
        self.session.send_now(WsMessage::binary(data))
    }

    async fn close(&mut self, frame: CloseFrame) {
        self.session.close(frame.code, &frame.reason).await;
    }

    fn info(&mut self) -> ConnectionInfo {
        self.session.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use tokio::net::{TcpListener, TcpSocket};
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::error::FailureCounts;
    use crate::metrics::Metrics;

    /// A session attached to a real loopback WebSocket whose client never reads (its
    /// receive buffer fixed small), and that client's socket, kept open.
    async fn session_to_a_client_that_does_not_read() -> (Session, tokio::net::TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 << 10).unwrap();
        let client = socket.connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let metrics = Metrics::new(Arc::new(FailureCounts::default()));
        let stream = ClientStream::plain(server, metrics.socket_writes());
        let ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
        let (sink, _read) = ws.split();
        let info = ConnectionInfo {
            id: 1,
            addon: "test".into(),
            path: "/ws/test".into(),
            query: String::new(),
            remote_address: "127.0.0.1:1".into(),
            headers: Vec::new(),
        };
        let mut session = Session::new(info, Duration::from_secs(10));
        session.attach(sink, metrics.addon("test"));
        (session, client)
    }

    /// Compiled guests reach an epoch check before every send (the component's
    /// lowering shims are wasm functions), so they pause after one held frame. One that
    /// did not would be stopped here: frames are held up to `MAX_HELD_BYTES`, in
    /// order, and the send past it fails the call naming why.
    #[tokio::test]
    async fn sends_past_a_full_socket_are_held_up_to_a_bound_then_trap() {
        let (mut session, _client) = session_to_a_client_that_does_not_read().await;
        let frame = "x".repeat(1 << 20);
        let mut queued = 0;
        let mut held = 0;
        let err = loop {
            match session.send_now(WsMessage::text(frame.clone())) {
                Ok(Ok(())) if session.held_since_pause => held += 1,
                Ok(Ok(())) => queued += 1,
                Ok(Err(err)) => panic!("send failed with {err:?} after {queued} queued, {held} held"),
                Err(err) => break err,
            }
        };
        assert!(queued > 0 && held > 0, "{queued} queued, {held} held");
        assert_eq!(held, MAX_HELD_BYTES / frame.len(), "frames held before the bound");
        let message = err.to_string();
        assert!(message.contains("without pausing between sends"), "{message}");
        assert!(message.contains(&MAX_HELD_BYTES.to_string()), "{message}");
        assert!(session.pause_for_held().is_some());
    }

    /// Held frames leave in order, before any frame the host sends after them, once the
    /// client reads.
    #[tokio::test]
    async fn held_frames_leave_first_and_in_order_once_the_client_reads() {
        let (mut session, client) = session_to_a_client_that_does_not_read().await;
        let mut sent = 0u32;
        while !session.held_since_pause {
            assert!(matches!(
                session.send_now(WsMessage::text(format!("{sent:08}").repeat(8192))),
                Ok(Ok(()))
            ));
            sent += 1;
        }
        for _ in 0..3 {
            assert!(matches!(
                session.send_now(WsMessage::text(format!("{sent:08}").repeat(8192))),
                Ok(Ok(()))
            ));
            sent += 1;
        }
        // Now the client reads: every frame, in the order sent, then the host's own.
        let reader = tokio::spawn(async move {
            let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let mut seen = Vec::new();
            while let Some(Ok(message)) = ws.next().await {
                let text = message.into_text().unwrap();
                if text == "after" {
                    break;
                }
                seen.push(text[..8].parse::<u32>().unwrap());
            }
            seen
        });
        session.pause_for_held().expect("frames are held").await;
        assert!(session.pause_for_held().is_none(), "the pause ends once nothing is held");
        session.send(WsMessage::text("after")).await.unwrap();
        assert_eq!(reader.await.unwrap(), (0..sent).collect::<Vec<_>>());
    }
}
