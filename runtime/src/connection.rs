//! One client connection to an addon, from the upgraded socket to `on-close`.
//!
//! The data path is one straight line, run by one task per connection:
//!
//! ```text
//! socket ─► Reader ─► pending (bounded) ─► instance.on-message ─► session.send-* ─► socket
//! ```
//!
//! Callbacks on the instance never overlap and see messages in arrival order. While a
//! callback runs (for example while it streams a long reply), the task keeps reading the
//! socket so that pings are answered and a client's close is noticed; what it reads waits
//! in a small queue ([`MAX_PENDING`]). When that queue is full the task stops reading,
//! and TCP flow control slows the client down.
//!
//! Every way a connection ends goes through [`AddonConnection::serve`], so `on-close`
//! runs exactly once: with the client's close code, with the code the host sent after a
//! protocol error, or with 1006 when the peer vanished. It does not run after `on-open`
//! refused the connection or after the instance trapped (a trapped instance cannot be
//! entered again).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use wasmtime::{Store, Trap};

use crate::bindings::{Addon, Message};
use crate::error::{Envelope, FailureKind, close_code};
use crate::host::HostState;

/// Client messages read ahead while a callback runs, before reading pauses.
pub const MAX_PENDING: usize = 16;
/// How long the host waits for the client to answer a close frame it sent.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the reader produces.
#[derive(Debug)]
enum Inbound {
    Message(Message),
    /// The client closed (`code` from its close frame, 1005 if it had none) or vanished
    /// (1006).
    Closed {
        code: u16,
        reason: String,
    },
    /// The client broke the protocol; the host must close with this code.
    Broken {
        code: u16,
        reason: String,
    },
}

/// The read half of the socket, turned into [`Inbound`] events.
struct Reader {
    stream: SplitStream<WebSocketStream<TcpStream>>,
    finished: bool,
}

impl Reader {
    /// The next event. After a `Closed` or `Broken` event the reader is finished and
    /// reports the peer as gone.
    async fn next(&mut self) -> Inbound {
        if self.finished {
            return Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() };
        }
        loop {
            let event = match self.stream.next().await {
                Some(Ok(WsMessage::Text(text))) => Inbound::Message(Message::Text(text.as_str().to_owned())),
                Some(Ok(WsMessage::Binary(data))) => Inbound::Message(Message::Binary(data.to_vec())),
                // tungstenite queues the pong itself and flushes it with the next read or write.
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => continue,
                Some(Ok(WsMessage::Close(frame))) => match frame {
                    Some(frame) => {
                        Inbound::Closed { code: frame.code.into(), reason: frame.reason.as_str().to_owned() }
                    }
                    None => Inbound::Closed { code: close_code::NO_STATUS, reason: String::new() },
                },
                Some(Err(err)) => classify_read_error(err),
                None => Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() },
            };
            if !matches!(event, Inbound::Message(_)) {
                self.finished = true;
            }
            return event;
        }
    }
}

fn classify_read_error(err: WsError) -> Inbound {
    match err {
        WsError::Utf8(_) => Inbound::Broken {
            code: close_code::INVALID_DATA,
            reason: "text frame is not valid UTF-8".to_owned(),
        },
        WsError::Capacity(cap) => Inbound::Broken { code: close_code::TOO_BIG, reason: cap.to_string() },
        // EOF without a close frame: the peer vanished.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() }
        }
        WsError::Protocol(protocol) => {
            Inbound::Broken { code: close_code::PROTOCOL_ERROR, reason: protocol.to_string() }
        }
        other => {
            tracing::debug!(error = %other, "connection lost");
            Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() }
        }
    }
}

/// A connection served by its own addon instance.
pub(crate) struct AddonConnection {
    store: Store<HostState>,
    instance: Addon,
    reader: Reader,
    pending: VecDeque<Inbound>,
}

impl AddonConnection {
    /// Joins an instance (made before the upgrade) with the upgraded socket.
    pub(crate) fn new(mut store: Store<HostState>, instance: Addon, ws: WebSocketStream<TcpStream>) -> Self {
        let (sink, stream) = ws.split();
        store.data_mut().session.attach(sink);
        AddonConnection {
            store,
            instance,
            reader: Reader { stream, finished: false },
            pending: VecDeque::with_capacity(MAX_PENDING),
        }
    }

    /// Runs the connection to its end.
    pub(crate) async fn serve(mut self) {
        let info = self.store.data().session.info().clone();
        self.store.set_epoch_deadline(1);
        let handler = self.instance.sockhost_addon_handler();
        let opened =
            read_while(handler.call_on_open(&mut self.store, &info), &mut self.reader, &mut self.pending)
                .await;
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                tracing::info!(code = refusal.code, reason = %refusal.reason, "addon refused the connection");
                self.store.data_mut().session.close(refusal.code, &refusal.reason).await;
                self.finish_close().await;
                return;
            }
            Err(err) => return self.trapped("on-open", err).await,
        }

        let (code, reason) = loop {
            match self.next_event().await {
                Inbound::Message(message) => {
                    if self.store.data().session.close_sent().is_some() {
                        // After a close frame went out, data from the client is discarded (RFC 6455 §5.5.1).
                        continue;
                    }
                    self.store.set_epoch_deadline(1);
                    let handler = self.instance.sockhost_addon_handler();
                    let call = handler.call_on_message(&mut self.store, &message);
                    match read_while(call, &mut self.reader, &mut self.pending).await {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            tracing::warn!(code = FailureKind::AddonError.code(), cause = %reason, "on-message returned an error");
                            self.send_error(FailureKind::AddonError, &reason).await;
                        }
                        Err(err) => return self.trapped("on-message", err).await,
                    }
                }
                Inbound::Closed { code, reason } => break (code, reason),
                Inbound::Broken { code, reason } => {
                    tracing::info!(code, cause = %reason, "client broke the protocol; closing");
                    self.store.data_mut().session.close(code, &reason).await;
                    break (code, reason);
                }
            }
        };

        // Flushes tungstenite's reply to the client's close frame before running on-close.
        self.store.data_mut().session.shutdown().await;
        tracing::debug!(code, reason = %reason, "connection closed");
        self.store.set_epoch_deadline(1);
        let handler = self.instance.sockhost_addon_handler();
        if let Err(err) = handler.call_on_close(&mut self.store, code, &reason).await {
            tracing::error!(stage = "on-close", cause = %describe(&err), "addon trapped");
        }
    }

    /// The next client event, from the read-ahead queue first. Once the host sent a
    /// close frame, waits at most [`CLOSE_HANDSHAKE_TIMEOUT`] for the client's answer.
    async fn next_event(&mut self) -> Inbound {
        if let Some(event) = self.pending.pop_front() {
            return event;
        }
        match self.store.data().session.close_sent() {
            None => self.reader.next().await,
            Some((code, reason)) => {
                let (code, reason) = (*code, reason.clone());
                tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, self.reader.next())
                    .await
                    .unwrap_or(Inbound::Closed { code, reason })
            }
        }
    }

    async fn send_error(&mut self, kind: FailureKind, message: &str) {
        let frame = Envelope::Error { message, code: kind.code() }.to_json();
        // A failed send means the client is gone; the reader will report it.
        let _ = self.store.data_mut().session.send(WsMessage::text(frame)).await;
    }

    /// The instance trapped: tell the client, close with 1011, never enter it again.
    async fn trapped(mut self, stage: &'static str, err: wasmtime::Error) {
        let cause = describe(&err);
        tracing::error!(stage, code = FailureKind::AddonTrap.code(), cause = %cause, "addon trapped; closing with 1011");
        let addon = self.store.data().session.info().addon.clone();
        self.send_error(FailureKind::AddonTrap, &format!("addon '{addon}' crashed: {cause}")).await;
        self.store.data_mut().session.close(close_code::INTERNAL_ERROR, "addon crashed").await;
        self.finish_close().await;
    }

    /// After the host sent a close frame: waits for the client's close (bounded) so the
    /// frames before it are not lost to a reset, then shuts the socket.
    async fn finish_close(&mut self) {
        while !matches!(self.next_event().await, Inbound::Closed { .. } | Inbound::Broken { .. }) {}
        self.store.data_mut().session.shutdown().await;
    }
}

/// Polls `call` to completion while reading client events into `pending`, so a long
/// callback does not stop the connection from answering pings or seeing a close.
async fn read_while<T>(
    call: impl Future<Output = T>,
    reader: &mut Reader,
    pending: &mut VecDeque<Inbound>,
) -> T {
    tokio::pin!(call);
    loop {
        let can_read = !reader.finished && pending.len() < MAX_PENDING;
        tokio::select! {
            biased;
            out = &mut call => return out,
            event = reader.next(), if can_read => pending.push_back(event),
        }
    }
}

/// A one-line description of a failed call: the trap if there is one, else the error chain.
pub(crate) fn describe(err: &wasmtime::Error) -> String {
    match err.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{err:#}"),
    }
}
