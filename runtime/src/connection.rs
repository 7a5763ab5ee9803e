//! One client connection to an addon, from the upgraded socket to `on-close`.
//!
//! The data path is one straight line, run by one task per connection:
//!
//! ```text
//! socket ─► Reader ─► limits ─► pending (bounded) ─► instance.on-message ─► session.send-* ─► socket
//! channel bus ─► inbox (bounded) ─────────────────► instance.on-channel-message ─┘
//! ```
//!
//! Callbacks on the instance never overlap and see messages in arrival order. While a
//! callback runs (for example while it streams a long reply), the task keeps reading the
//! socket so that pings are answered and a client's close is noticed; what it reads waits
//! in a small queue ([`MAX_PENDING`]). When that queue is full the task stops reading,
//! and TCP flow control slows the client down.
//!
//! Deliveries from subscribed channels ([`crate::channels`]) wait in the connection's
//! inbox and take turns with client messages: one callback at a time, each stream in its
//! own order. While a callback runs the inbox fills; a connection whose inbox overflows
//! cannot keep up, and is closed with a `slow_subscriber` error frame and 1008.
//!
//! Between callbacks the task also keeps the connection honest: it pings a silent client
//! and drops one that does not answer, closes an idle one, enforces the message rate, and
//! closes with 1001 when the server shuts down.
//!
//! Every way a connection ends goes through [`AddonConnection::serve`], so `on-close`
//! runs exactly once: with the client's close code, with the code the host sent, or with
//! 1006 when the peer vanished. It does not run after `on-open` refused the connection or
//! after the instance failed (a trapped instance cannot be entered again).
//!
//! Each failure is counted, and logged unless this addon already logged its share of that
//! kind for now: a client can fail connections in a loop (`crate::log_limits`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use wasmtime::Store;

use crate::addons::AddonInstance;
use crate::bindings::Message;
use crate::channels::{Delivery, Inbox};
use crate::client_stream::ClientStream;
use crate::error::{Envelope, FailureKind, close_code};
use crate::host::HostState;
use crate::host::session::Outbox;
use crate::log_limits::client_text;
use crate::metrics::AddonStats;
use crate::policy::AddonPolicy;
use crate::sandbox::{self, CpuMeter, TokenBucket};
use crate::shutdown::ShutdownListener;

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
        kind: FailureKind,
        code: u16,
        reason: String,
    },
}

/// The read half of the socket, turned into [`Inbound`] events.
struct Reader {
    stream: SplitStream<WebSocketStream<ClientStream>>,
    finished: bool,
    /// When the last frame of any kind (pongs included) arrived.
    last_frame: Instant,
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
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                    self.last_frame = Instant::now();
                    continue;
                }
                Some(Ok(WsMessage::Close(frame))) => match frame {
                    Some(frame) => {
                        Inbound::Closed { code: frame.code.into(), reason: frame.reason.as_str().to_owned() }
                    }
                    None => Inbound::Closed { code: close_code::NO_STATUS, reason: String::new() },
                },
                Some(Err(err)) => classify_read_error(err),
                None => Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() },
            };
            self.last_frame = Instant::now();
            if !matches!(event, Inbound::Message(_)) {
                self.finished = true;
            }
            return event;
        }
    }
}

fn classify_read_error(err: WsError) -> Inbound {
    let broken = |kind, code, reason: String| Inbound::Broken { kind, code, reason };
    match err {
        WsError::Utf8(_) => {
            broken(FailureKind::InvalidUtf8, close_code::INVALID_DATA, "text frame is not valid UTF-8".into())
        }
        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => broken(
            FailureKind::Oversize,
            close_code::TOO_BIG,
            format!("message of {size} bytes exceeds the limit of {max_size}"),
        ),
        WsError::Capacity(cap) => broken(FailureKind::Oversize, close_code::TOO_BIG, cap.to_string()),
        // EOF without a close frame: the peer vanished.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() }
        }
        WsError::Protocol(protocol) => {
            broken(FailureKind::Protocol, close_code::PROTOCOL_ERROR, protocol.to_string())
        }
        other => {
            tracing::debug!(error = %other, "connection lost");
            Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() }
        }
    }
}

/// What the connection task woke up for.
enum Wake {
    Event(Inbound),
    /// A message from a subscribed channel.
    Delivery(Arc<Delivery>),
    /// The inbox overflowed: this connection cannot keep up with its channels.
    InboxOverflow,
    /// A keep-alive deadline (idle, ping, pong) passed.
    Timer,
    Shutdown,
}

/// A connection served by its own addon instance.
pub(crate) struct AddonConnection {
    store: Store<HostState>,
    instance: AddonInstance,
    /// Books the instance's running time; every callback is polled through it.
    meter: CpuMeter,
    /// The socket's write half, which the instance's sends queue into; flushed whenever
    /// the guest stops running.
    outbox: Arc<Outbox>,
    /// Deliveries from subscribed channels; made by the first `subscribe`.
    inbox: Option<Inbox>,
    reader: Reader,
    pending: VecDeque<Inbound>,
    policy: Arc<AddonPolicy>,
    /// This addon's counters: messages in, callback durations.
    stats: Arc<AddonStats>,
    /// When the last callback returned. A message's callback starts at its arrival or at
    /// this, whichever is later (callbacks never overlap), so timing it needs one clock
    /// read per message, not two.
    last_callback_end: Instant,
    /// Resolves when the server shuts down. Registered once per connection; a poll is
    /// an atomic load (see [`crate::shutdown`]).
    shutdown: ShutdownListener,
    rate: Option<TokenBucket>,
    last_message: Instant,
    ping_sent: Option<Instant>,
    /// When the client's answer to the host's close frame is due; set once.
    close_deadline: Option<Instant>,
    /// How long a callback may run on once its client is gone (`limits.orphan_callback_grace_ms`).
    orphan_grace: Duration,
    /// Fires at or before the next keep-alive deadline. Activity only moves deadlines
    /// later, so the timer is not re-armed per message: when it fires early,
    /// [`Self::keep_alive`] re-arms it for the real deadline.
    keep_alive_timer: Pin<Box<Sleep>>,
}

impl AddonConnection {
    /// Joins an instance (made before the upgrade) with the upgraded socket.
    pub(crate) fn new(
        mut store: Store<HostState>,
        instance: AddonInstance,
        ws: WebSocketStream<ClientStream>,
        policy: Arc<AddonPolicy>,
        stats: Arc<AddonStats>,
        shutdown: ShutdownListener,
        orphan_grace: Duration,
    ) -> Self {
        let (sink, stream) = ws.split();
        let outbox = store.data_mut().session.attach(sink, stats.clone());
        let now = Instant::now();
        let first_deadline = now + policy.ping_interval.min(policy.idle_timeout);
        AddonConnection {
            meter: store.data().limits.meter(),
            outbox,
            store,
            instance,
            inbox: None,
            reader: Reader { stream, finished: false, last_frame: now },
            // Empty until a message arrives while a callback runs: most connections,
            // chat clients waiting for a reply, never queue one, and a full queue's room
            // (about 1 KB) would stay with every idle connection.
            pending: VecDeque::new(),
            rate: policy.message_rate.map(|rate| TokenBucket::new(rate.per_second, rate.burst)),
            policy,
            stats,
            last_callback_end: now,
            shutdown,
            last_message: now,
            ping_sent: None,
            close_deadline: None,
            orphan_grace,
            keep_alive_timer: Box::pin(tokio::time::sleep_until(first_deadline)),
        }
    }

    /// Runs the connection to its end.
    pub(crate) async fn serve(mut self) {
        let info = self.store.data().session.info().clone();
        sandbox::start_callback(&mut self.store, None);
        let handler = &self.instance.handler;
        let call = guest_turn(
            &self.meter,
            &self.outbox,
            self.policy.send_timeout,
            handler.call_on_open(&mut self.store, &info),
        );
        let Ok(opened) = read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
        else {
            return self.orphaned("on-open").await;
        };
        self.pick_up_inbox();
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                // Clients can be refused in a loop (a bad token on every try): bounded too.
                let addon = &self.store.data().session.info().addon;
                if self.stats.log_limits.admit_refused(addon) {
                    tracing::info!(code = refusal.code, reason = %refusal.reason, "addon refused the connection");
                }
                self.store.data_mut().session.close(refusal.code, &refusal.reason).await;
                self.finish_close().await;
                return;
            }
            Err(err) => return self.failed("on-open", err).await,
        }

        let (code, reason) = loop {
            let event = match self.wake().await {
                Wake::Event(event) => event,
                Wake::Delivery(delivery) => {
                    match self.deliver(&delivery).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => return self.failed("on-channel-message", err).await,
                        Err(Orphaned) => return self.orphaned("on-channel-message").await,
                    }
                    continue;
                }
                Wake::InboxOverflow => {
                    let inbox = self.policy.channels.limits.inbox;
                    let reason = format!(
                        "slow subscriber: more than {inbox} channel messages waited for this connection \
                         (channels.inbox); reconnect to resume"
                    );
                    self.send_error(FailureKind::SlowSubscriber, &reason).await;
                    self.fail_client(FailureKind::SlowSubscriber, close_code::POLICY, &reason).await;
                    continue;
                }
                Wake::Timer => {
                    self.keep_alive().await;
                    continue;
                }
                Wake::Shutdown => {
                    self.store.data_mut().session.close(close_code::GOING_AWAY, "server shutting down").await;
                    continue;
                }
            };
            match event {
                Inbound::Message(message) => {
                    if self.store.data_mut().session.close_sent().is_some() {
                        // After a close frame went out, data from the client is discarded (RFC 6455 §5.5.1).
                        continue;
                    }
                    // The reader stamped the time when it read; reading the clock again per
                    // message would cost more than everything else here.
                    self.last_message = self.reader.last_frame;
                    self.stats.message_in(match &message {
                        Message::Text(text) => text.len(),
                        Message::Binary(data) => data.len(),
                    });
                    if let Some(rate) = self.rate.as_mut()
                        && !rate.try_take_at(self.last_message.into_std())
                    {
                        let limit = self.policy.message_rate.map(|r| r.per_second).unwrap_or_default();
                        let reason = format!("rate limit: more than {limit} messages per second");
                        // Chat clients act on error frames (`code` = "rate_limited"), not on
                        // close reasons, so they get one before the close.
                        self.send_error(FailureKind::RateLimited, &reason).await;
                        self.fail_client(FailureKind::RateLimited, close_code::POLICY, &reason).await;
                        continue;
                    }
                    // The callback starts now, as far as the clock can tell.
                    let started = self.last_message.max(self.last_callback_end);
                    sandbox::start_callback(&mut self.store, Some(started.into_std()));
                    let handler = &self.instance.handler;
                    let call = guest_turn(
                        &self.meter,
                        &self.outbox,
                        self.policy.send_timeout,
                        handler.call_on_message(&mut self.store, &message),
                    );
                    let outcome =
                        read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await;
                    let Ok(outcome) = outcome else {
                        return self.orphaned("on-message").await;
                    };
                    self.pick_up_inbox();
                    self.last_callback_end = Instant::now();
                    self.stats.callback_seconds.observe(self.last_callback_end - started);
                    match outcome {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            self.stats.failure(FailureKind::AddonError);
                            if self.may_log(FailureKind::AddonError) {
                                tracing::warn!(kind = FailureKind::AddonError.code(), cause = %reason, "on-message returned an error");
                            }
                            self.send_error(FailureKind::AddonError, &reason).await;
                        }
                        Err(err) => return self.failed("on-message", err).await,
                    }
                }
                Inbound::Closed { code, reason } => break (code, reason),
                Inbound::Broken { kind, code, reason } => {
                    self.fail_client(kind, code, &reason).await;
                    break (code, reason);
                }
            }
        };

        // Flushes tungstenite's reply to the client's close frame before running on-close.
        self.store.data_mut().session.shutdown().await;
        tracing::debug!(code, reason = %client_text(&reason), "connection closed");
        sandbox::start_callback(&mut self.store, None);
        let handler = &self.instance.handler;
        if let Err(err) = guest_turn(
            &self.meter,
            &self.outbox,
            self.policy.send_timeout,
            handler.call_on_close(&mut self.store, code, &reason),
        )
        .await
        {
            let (kind, cause) = self.classify(&err);
            self.stats.failure(kind);
            if self.may_log(kind) {
                tracing::error!(stage = "on-close", kind = kind.code(), cause = %cause, "addon failed");
            }
        }
    }

    /// Waits for the next thing to do: a client event (from the read-ahead queue first),
    /// a keep-alive deadline, or shutdown. Once the host sent a close frame, the client
    /// gets [`CLOSE_HANDSHAKE_TIMEOUT`] in all to answer it.
    async fn wake(&mut self) -> Wake {
        if let Some(event) = self.pending.pop_front() {
            return Wake::Event(event);
        }
        let session = &mut self.store.data_mut().session;
        if let Some((code, reason)) = session.close_sent() {
            let gone = Inbound::Closed { code: *code, reason: reason.clone() };
            if session.stalled() {
                self.stats.failure(FailureKind::SlowClient);
                if self.may_log(FailureKind::SlowClient) {
                    tracing::warn!(
                        kind = FailureKind::SlowClient.code(),
                        timeout_s = self.policy.send_timeout.as_secs(),
                        "client stopped reading; socket dropped"
                    );
                }
                return Wake::Event(gone);
            }
            // One deadline from the first look after the close frame went out: frames the
            // client keeps sending are read and dropped, but never buy it more time, so a
            // closed connection cannot hold its slot and instance by trickling data.
            let deadline =
                *self.close_deadline.get_or_insert_with(|| Instant::now() + CLOSE_HANDSHAKE_TIMEOUT);
            return match tokio::time::timeout_at(deadline, self.reader.next()).await {
                Ok(event) => Wake::Event(event),
                Err(_) => {
                    tracing::debug!("no close frame from the client in time; socket dropped");
                    self.reader.finished = true;
                    Wake::Event(gone)
                }
            };
        }
        tokio::select! {
            biased;
            _ = &mut self.shutdown => Wake::Shutdown,
            event = self.reader.next() => Wake::Event(event),
            delivery = next_delivery(&mut self.inbox) => match delivery {
                Some(delivery) => Wake::Delivery(delivery),
                None => Wake::InboxOverflow,
            },
            _ = self.keep_alive_timer.as_mut() => Wake::Timer,
        }
    }

    /// After a callback: the first `subscribe` made the inbox, which this task polls from
    /// now on. (Made lazily, so connections that never subscribe carry none.)
    fn pick_up_inbox(&mut self) {
        if self.inbox.is_none() {
            self.inbox = self.store.data_mut().channels.take_inbox();
        }
    }

    /// Runs `on-channel-message` for one delivery, reading the socket meanwhile.
    async fn deliver(&mut self, delivery: &Delivery) -> Result<wasmtime::Result<()>, Orphaned> {
        let Some(channel_handler) = &self.instance.channel_handler else {
            // Unreachable in practice: such an instance's subscribe answers `denied`.
            return Ok(Ok(()));
        };
        self.stats.channel_delivery();
        sandbox::start_callback(&mut self.store, None);
        let call = guest_turn(
            &self.meter,
            &self.outbox,
            self.policy.send_timeout,
            channel_handler.call_on_channel_message(&mut self.store, &delivery.channel, &delivery.payload),
        );
        let outcome = read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await;
        self.last_callback_end = Instant::now();
        outcome
    }

    /// A callback outlived its client by more than the grace period: abandon it. The
    /// instance was left mid-call, so it is never entered again (`on-close` is skipped);
    /// dropping the store gives its memory and slot back.
    async fn orphaned(mut self, stage: &'static str) {
        self.stats.failure(FailureKind::OrphanedCallback);
        tracing::warn!(
            stage,
            kind = FailureKind::OrphanedCallback.code(),
            grace_ms = self.orphan_grace.as_millis() as u64,
            "the client is gone and the callback was still running after the grace period \
             (limits.orphan_callback_grace_ms); abandoned it and dropped the instance; on-close skipped"
        );
        self.store.data_mut().session.shutdown().await;
    }

    /// The next keep-alive deadline: idle timeout, ping due, or pong overdue.
    fn next_deadline(&self) -> Instant {
        let idle = self.last_message + self.policy.idle_timeout;
        let ping = match self.ping_sent {
            Some(sent) => sent + self.policy.ping_interval,
            None => self.reader.last_frame + self.policy.ping_interval,
        };
        idle.min(ping)
    }

    /// Handles a keep-alive timer: closes an idle connection, drops one whose ping went
    /// unanswered, pings a silent one, and re-arms the timer for the next deadline.
    async fn keep_alive(&mut self) {
        let now = Instant::now();
        if now >= self.last_message + self.policy.idle_timeout {
            let idle = self.policy.idle_timeout.as_secs();
            self.fail_client(
                FailureKind::Idle,
                close_code::NORMAL,
                &format!("idle timeout: no message for {idle} s"),
            )
            .await;
            return;
        }
        if let Some(sent) = self.ping_sent {
            if self.reader.last_frame >= sent {
                self.ping_sent = None;
            } else if now >= sent + self.policy.ping_interval {
                self.stats.failure(FailureKind::Unresponsive);
                if self.may_log(FailureKind::Unresponsive) {
                    tracing::info!(
                        kind = FailureKind::Unresponsive.code(),
                        "ping unanswered; dropping the connection"
                    );
                }
                self.pending.push_back(Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() });
                self.reader.finished = true;
                return;
            }
        }
        if self.ping_sent.is_none() && now >= self.reader.last_frame + self.policy.ping_interval {
            self.store.data_mut().session.ping().await;
            self.ping_sent = Some(now);
        }
        let next = self.next_deadline();
        self.keep_alive_timer.as_mut().reset(next);
    }

    /// The client broke a rule: count it, log it, close with `code`.
    async fn fail_client(&mut self, kind: FailureKind, code: u16, reason: &str) {
        self.stats.failure(kind);
        if self.may_log(kind) {
            // The cause may carry what the client sent (a protocol error's text).
            tracing::info!(kind = kind.code(), code, cause = %client_text(reason), "closing the connection");
        }
        self.store.data_mut().session.close(code, reason).await;
    }

    async fn send_error(&mut self, kind: FailureKind, message: &str) {
        let frame = Envelope::Error { message, code: kind.code() }.to_json();
        // A failed send means the client is gone; the reader will report it.
        let _ = self.store.data_mut().session.send(WsMessage::text(frame)).await;
    }

    /// Whether a failure line of `kind` may be logged now: clients decide how many
    /// connections fail, so each addon logs a bounded number per kind
    /// (`crate::log_limits`). The failure is counted either way.
    fn may_log(&self, kind: FailureKind) -> bool {
        self.stats.log_limits.admit(kind, &self.store.data().session.info().addon)
    }

    /// Names why a call into the instance failed.
    fn classify(&mut self, err: &wasmtime::Error) -> (FailureKind, String) {
        sandbox::classify(&mut self.store, &self.policy, err)
    }

    /// The instance failed (trap, CPU or memory limit): tell the client, close with
    /// 1011, never enter the instance again.
    async fn failed(mut self, stage: &'static str, err: wasmtime::Error) {
        let (kind, cause) = self.classify(&err);
        self.stats.failure(kind);
        if self.may_log(kind) {
            tracing::error!(stage, kind = kind.code(), cause = %cause, detail = %sandbox::describe(&err), "addon failed; closing with 1011");
        }
        let addon = self.store.data().session.info().addon.clone();
        self.send_error(kind, &format!("addon '{addon}' {cause}")).await;
        self.store.data_mut().session.close(close_code::INTERNAL_ERROR, kind.code()).await;
        self.finish_close().await;
    }

    /// After the host sent a close frame: waits for the client's close (bounded) so the
    /// frames before it are not lost to a reset, then shuts the socket.
    async fn finish_close(&mut self) {
        loop {
            match self.wake().await {
                Wake::Event(Inbound::Closed { .. } | Inbound::Broken { .. }) => break,
                _ => continue,
            }
        }
        self.store.data_mut().session.shutdown().await;
    }
}

/// One callback as the connection task runs it. Every poll resumes the guest (the meter
/// books its running time); every `Pending` is a moment the guest is not running, so the
/// frames it queued start on their way then; when it returns, the rest are flushed. So
/// frames an addon sends in one go leave in one write, and none waits behind guest
/// work for longer than an epoch tick.
async fn guest_turn<F: Future>(
    meter: &CpuMeter,
    outbox: &Outbox,
    send_timeout: Duration,
    call: F,
) -> F::Output {
    let out = meter.run_with(call, |cx| outbox.poll_flush_queued(cx)).await;
    outbox.flush(send_timeout).await;
    out
}

/// The next delivery from `inbox`, or never when there is none. `None` means it overflowed.
async fn next_delivery(inbox: &mut Option<Inbox>) -> Option<Arc<Delivery>> {
    match inbox {
        Some(inbox) => inbox.next().await,
        None => std::future::pending().await,
    }
}

/// Polls `call` to completion while reading client events into `pending`, so a long
/// callback does not stop the connection from answering pings or seeing a close.
///
/// Once the client is gone (its close, a broken frame, or TCP gone), the callback gets
/// `grace` more to finish; past it the call is abandoned ([`Orphaned`]): nobody is
/// listening, and a callback that ignores failed sends (or waits on a slow upstream)
/// must not hold its instance, slot and memory for as long as it likes.
async fn read_while<T>(
    call: impl Future<Output = T>,
    reader: &mut Reader,
    pending: &mut VecDeque<Inbound>,
    grace: Duration,
) -> Result<T, Orphaned> {
    tokio::pin!(call);
    let mut orphaned_at = reader.finished.then(|| Instant::now() + grace);
    loop {
        let can_read = !reader.finished && pending.len() < MAX_PENDING;
        let deadline = orphaned_at;
        tokio::select! {
            biased;
            out = &mut call => return Ok(out),
            event = reader.next(), if can_read => {
                pending.push_back(event);
                if reader.finished && orphaned_at.is_none() {
                    orphaned_at = Some(Instant::now() + grace);
                }
            }
            _ = sleep_until_some(deadline) => return Err(Orphaned),
        }
    }
}

/// The callback was abandoned: its client had gone for longer than the grace period.
#[derive(Debug)]
struct Orphaned;

/// Sleeps until `deadline`; never without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
