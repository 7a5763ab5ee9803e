//! `sockhost:addon/session`: the connection an instance serves.
//!
//! The host owns the socket. The instance's store holds the write half of the WebSocket
//! ([`Session::attach`]); `send-text` / `send-binary` write one frame and flush it before
//! returning to the guest, so a reply streams to the client while the addon is still
//! running. When the client reads slowly the write waits, which pauses the addon: the
//! backpressure reaches the producer instead of growing a buffer. So the outbound queue of
//! a connection is bounded by the socket's own buffers plus the one frame being written.
//! A client that does not read for the addon's `send_timeout_s` is cut off: the socket is
//! dropped (a close frame could not get through a full buffer) and `send` fails with
//! `closed`. The read half stays with the connection task, which keeps reading (and
//! answering pings) during callbacks.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
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

/// Per-instance session state.
pub struct Session {
    info: ConnectionInfo,
    sink: Option<WsSink>,
    /// Counts messages and bytes sent; set with the sink.
    stats: Option<Arc<AddonStats>>,
    send_timeout: Duration,
    /// Set once a close frame went out (from the addon or the host). Later sends fail.
    close_sent: Option<(u16, String)>,
    /// Set when the client stopped reading for longer than `send_timeout`.
    stalled: bool,
}

impl Session {
    pub(crate) fn new(info: ConnectionInfo, send_timeout: Duration) -> Session {
        Session { info, sink: None, stats: None, send_timeout, close_sent: None, stalled: false }
    }

    /// Whether the connection was cut off because the client stopped reading.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled
    }

    /// Gives the session the socket's write half, once the upgrade has succeeded.
    pub(crate) fn attach(&mut self, sink: WsSink, stats: Arc<AddonStats>) {
        self.sink = Some(sink);
        self.stats = Some(stats);
    }

    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// The close frame already sent on this connection, if any.
    pub(crate) fn close_sent(&self) -> Option<&(u16, String)> {
        self.close_sent.as_ref()
    }

    /// Writes and flushes one frame. Fails with `closed` once a close frame went out or
    /// the socket broke.
    pub(crate) async fn send(&mut self, message: WsMessage) -> Result<(), SendError> {
        if self.close_sent.is_some() {
            return Err(SendError::Closed);
        }
        let Some(sink) = self.sink.as_mut() else {
            return Err(SendError::Closed);
        };
        let data_bytes = match &message {
            WsMessage::Text(text) => Some(text.len()),
            WsMessage::Binary(data) => Some(data.len()),
            _ => None,
        };
        // Most sends complete on the first poll (the socket has room): only a send that
        // has to wait pays for a timer.
        let mut send = std::pin::pin!(sink.send(message));
        let first = std::future::poll_fn(|cx| Poll::Ready(send.as_mut().poll(cx))).await;
        let outcome = match first {
            Poll::Ready(result) => Ok(result),
            Poll::Pending => tokio::time::timeout(self.send_timeout, send).await,
        };
        match outcome {
            Ok(Ok(())) => {
                if let (Some(bytes), Some(stats)) = (data_bytes, &self.stats) {
                    stats.message_out(bytes);
                }
                Ok(())
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "send failed; the connection is gone");
                self.close_sent = Some((close_code::ABNORMAL, String::new()));
                Err(SendError::Closed)
            }
            Err(_) => {
                // The client has not read for send_timeout: its buffers are full. Dropping
                // the socket is the only way out; a close frame would not get through.
                self.stalled = true;
                self.sink = None;
                self.close_sent = Some((close_code::POLICY, "client too slow to read".to_owned()));
                Err(SendError::Closed)
            }
        }
    }

    /// Sends a ping; the connection task uses it to find dead peers.
    pub(crate) async fn ping(&mut self) {
        if self.close_sent.is_none() {
            let _ = self.send(WsMessage::Ping(Default::default())).await;
        }
    }

    /// Sends a close frame once; later calls do nothing. Codes a server may not send are
    /// replaced with 1008, and the replacement is logged.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) {
        if self.close_sent.is_some() {
            return;
        }
        let code = if close_code::is_sendable(code) {
            code
        } else {
            tracing::warn!(code, "addon asked for a close code a server may not send; using 1008");
            close_code::POLICY
        };
        let reason = truncate_close_reason(reason).to_owned();
        self.close_sent = Some((code, reason.clone()));
        if let Some(sink) = self.sink.as_mut() {
            let frame = WsCloseFrame { code: CloseCode::from(code), reason: reason.into() };
            match tokio::time::timeout(self.send_timeout, sink.send(WsMessage::Close(Some(frame)))).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(error = %err, "close frame not sent; the connection is gone"),
                Err(_) => {
                    self.stalled = true;
                    self.sink = None;
                }
            }
        }
    }

    /// Flushes what is buffered (briefly) and shuts the write side down.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(mut sink) = self.sink.take() {
            let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, sink.close()).await;
        }
    }
}

impl Host for HostState {
    async fn send_text(&mut self, text: String) -> Result<(), SendError> {
        if text.len() > MAX_OUTBOUND_FRAME {
            return Err(SendError::TooLarge);
        }
        self.session.send(WsMessage::text(text)).await
    }

    async fn send_binary(&mut self, data: Vec<u8>) -> Result<(), SendError> {
        if data.len() > MAX_OUTBOUND_FRAME {
            return Err(SendError::TooLarge);
        }
        self.session.send(WsMessage::binary(data)).await
    }

    async fn close(&mut self, frame: CloseFrame) {
        self.session.close(frame.code, &frame.reason).await;
    }

    fn info(&mut self) -> ConnectionInfo {
        self.session.info.clone()
    }
}
