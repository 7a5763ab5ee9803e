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
//! Hibernation: a connection of an addon that exports `hibernation` and has had no
//! callback running for `hibernate_after_ms` gives up its instance. The task calls
//! `hibernate`, keeps the bytes with the host's part of the store ([`ParkedHost`]: the
//! session, subscriptions, limits) and drops the instance, whose pool slot goes back. The
//! next client message, channel delivery or close makes a fresh instance of the same
//! version, calls `wake(state)` and then delivers the event. The socket, its reader, the
//! inbox and the timers stay with the task the whole time.
//!
//! Each failure is counted, and logged unless this addon already logged its share of that
//! kind for now: a client can fail connections in a loop (`crate::log_limits`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use wasmtime::Store;

use crate::addons::{AddonInstance, InstantiateError, LoadedAddon};
use crate::bindings::Message;
use crate::channels::{Delivery, Inbox};
use crate::client_stream::ClientStream;
use crate::error::{Envelope, FailureKind, close_code};
use crate::host::session::{Outbox, Session};
use crate::host::{HostState, ParkedHost};
use crate::log_limits::client_text;
use crate::metrics::{AddonStats, LiveInstance};
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
                Some(Ok(WsMessage::Close(frame))) => {
                    let event = match frame {
                        Some(frame) => Inbound::Closed {
                            code: frame.code.into(),
                            reason: frame.reason.as_str().to_owned(),
                        },
                        None => Inbound::Closed { code: close_code::NO_STATUS, reason: String::new() },
                    };
                    self.send_close_reply().await;
                    event
                }
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

impl Reader {
    /// Answers the client's close frame now. tungstenite queues the reply and writes it
    /// with the next read or write; a callback that runs on (aikefu finishing a reply for
    /// a resume) writes nothing once its client has gone, so without this read the client
    /// would wait for the end of the closing handshake, and a browser fires its `close`
    /// event only then. The read ends the stream once the reply is out; a client that does
    /// not take it within [`CLOSE_REPLY_WAIT`] is left to the host's close deadline.
    async fn send_close_reply(&mut self) {
        // Boxed: once per connection, and every read's future would carry its timer.
        let _ = Box::pin(tokio::time::timeout(CLOSE_REPLY_WAIT, self.stream.next())).await;
    }
}

/// How long the reader waits to hand the reply to a client's close frame to the socket.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);

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
    /// Another connection needs an instance slot, and this one is the least recently
    /// active that can hibernate.
    MakeRoom,
    Shutdown,
}

/// A connection's addon instance, while it is live.
pub(crate) struct Live {
    pub(crate) store: Store<HostState>,
    pub(crate) exports: AddonInstance,
    /// Its slot of the instance pool.
    pub(crate) lease: InstanceLease,
}

/// A hibernated connection: its instance's state in bytes and the host's part of its store.
struct Asleep {
    state: Vec<u8>,
    host: ParkedHost,
}

/// The connection's instance: live or hibernated. `Gone` stands in only while one turns
/// into the other.
enum Guest {
    Live(Live),
    // Boxed: a live connection would otherwise carry the parked state's room.
    Asleep(Box<Asleep>),
    Gone,
}

/// How `on-open` went.
enum Opened {
    Ready,
    /// The addon refused the client; the connection is closed.
    Refused,
    Ended(End),
}

/// How [`AddonConnection::run`] handed the connection back.
enum Run {
    /// The instance hibernated: nothing runs until the next event.
    Asleep,
    /// The client closed (or broke the protocol): `on-close` is next.
    Closed(u16, String),
    Ended(End),
}

/// Why a connection ends without `on-close`: its instance can no longer be used.
enum End {
    /// A callback outlived its client by more than the grace period.
    Orphaned(&'static str),
    /// A callback trapped or ran past a limit.
    Failed(&'static str, wasmtime::Error),
    /// A call that may have trapped or been orphaned ([`CallFailed`]).
    CallFailed(&'static str, CallFailed),
    /// A hibernated connection could not be woken.
    NotWoken(Unwoken),
}

/// Why a hibernated connection could not be woken.
enum Unwoken {
    /// Every slot of the instance pool is taken.
    NoSlot,
    /// No instance could be made (see [`InstantiateError`]).
    NotMade(InstantiateError),
    /// `wake` failed.
    Failed(CallFailed),
}

/// How a call into the instance ended that leaves it unusable.
enum CallFailed {
    /// It trapped or ran past a limit.
    Trapped(wasmtime::Error),
    /// The client left while it ran, and it ran past the grace period.
    Orphaned,
}

/// The instance pool's slots (`limits.max_live_instances`): a live instance holds one, a
/// hibernated connection none. When every slot is taken, the least recently active
/// connection that can hibernate is asked to, to make room (as Durable Objects evict
/// idle objects); only when none can is a new connection refused.
#[derive(Debug)]
pub(crate) struct InstanceSlots {
    live: AtomicU32,
    max: u32,
    /// Live connections that can hibernate, by connection id.
    sleepers: std::sync::Mutex<HashMap<u64, Arc<Sleeper>>>,
    /// One permit per slot given back, for whoever waits for one.
    freed: Notify,
    /// Where [`Sleeper::last_active`] counts milliseconds from.
    origin: std::time::Instant,
}

/// A live connection that can hibernate, as the slots see it.
#[derive(Debug)]
struct Sleeper {
    /// When it last did something, in ms since [`InstanceSlots::origin`]. Written at the
    /// end of each callback: one relaxed store.
    last_active: AtomicU64,
    /// Set once it was asked to make room, so the next ask picks another.
    asked: AtomicBool,
    /// The ask itself, taken by its task; with the waker below it replaces a `Notify`,
    /// whose waiter list would take a lock on every event the connection waits for.
    make_room_now: AtomicBool,
    waker: AtomicWaker,
}

/// Instances dropped by hibernation since the allocator was last asked to give freed
/// memory back ([`give_back_freed_memory`]).
static HIBERNATED_SINCE_TRIM: AtomicU64 = AtomicU64::new(0);

/// How often the freed memory of hibernated instances is given back to the system.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Gives the memory of hibernated connections' instances back to the system, once a
/// second while connections hibernate. An instance's host side (its store, WASI
/// context, tables: 10-20 KB) goes back to the allocator when it hibernates, which
/// would otherwise keep the pages for reuse (mimalloc purges them only on later
/// activity past its delay); a burst of connections that all hibernate would leave the
/// process at its high-water mark. The collection (a few ms at worst) runs on the
/// blocking pool, never on a connection's path; instance_heap.rs says why the pages
/// are whole to give back.
pub(crate) async fn give_back_freed_memory(stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if HIBERNATED_SINCE_TRIM.swap(0, Ordering::Relaxed) > 0 {
            let _ = tokio::task::spawn_blocking(crate::instance_heap::give_back_freed_memory).await;
        }
    }
}

/// How long a connection that needs a slot waits for the one it asked to hibernate.
const MAKE_ROOM_WAIT: Duration = Duration::from_secs(2);

impl InstanceSlots {
    pub(crate) fn new(max: u32) -> InstanceSlots {
        InstanceSlots {
            live: AtomicU32::new(0),
            max,
            sleepers: Default::default(),
            freed: Notify::new(),
            origin: std::time::Instant::now(),
        }
    }

    /// A slot, hibernating the least recently active hibernatable connection to free
    /// one when none is free. `None` when every slot is held by a connection that
    /// cannot hibernate (or none gave its slot up in time).
    pub(crate) async fn lease_or_make_room(
        self: &Arc<Self>,
        stats: &Arc<AddonStats>,
    ) -> Option<InstanceLease> {
        loop {
            if let Some(lease) = self.lease(stats) {
                return Some(lease);
            }
            if !self.ask_least_recent() {
                return None;
            }
            // A slot given back meanwhile left a permit, so none is missed.
            if tokio::time::timeout(MAKE_ROOM_WAIT, self.freed.notified()).await.is_err() {
                // It did not (its state was too large, or it got busy): try the next one.
                continue;
            }
        }
    }

    /// Asks the least recently active live connection that can hibernate, and was not
    /// asked yet, to hibernate now. False when there is none.
    fn ask_least_recent(&self) -> bool {
        let sleepers = self.sleepers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let victim = sleepers
            .values()
            .filter(|sleeper| !sleeper.asked.load(Ordering::Relaxed))
            .min_by_key(|sleeper| sleeper.last_active.load(Ordering::Relaxed));
        match victim {
            Some(victim) => {
                victim.asked.store(true, Ordering::Relaxed);
                victim.make_room_now.store(true, Ordering::Release);
                victim.waker.wake();
                true
            }
            None => false,
        }
    }

    /// Lists a live connection that can hibernate; it leaves the list when the
    /// registration drops (it hibernated or ended).
    fn register(self: &Arc<Self>, id: u64) -> SleeperRegistration {
        let sleeper = Arc::new(Sleeper {
            last_active: AtomicU64::new(self.origin.elapsed().as_millis() as u64),
            asked: AtomicBool::new(false),
            make_room_now: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        let mut sleepers = self.sleepers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sleepers.insert(id, sleeper.clone());
        SleeperRegistration { slots: self.clone(), id, sleeper }
    }

    /// The pool's size.
    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    /// A slot for an instance of the addon `stats` counts, if one is free.
    pub(crate) fn lease(self: &Arc<Self>, stats: &Arc<AddonStats>) -> Option<InstanceLease> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()?;
        Some(InstanceLease { slots: self.clone(), _live: LiveInstance::new(stats.clone()) })
    }
}

/// One slot of the instance pool, held while an instance is live; counted in
/// `sockhost_addon_live_instances`.
pub(crate) struct InstanceLease {
    slots: Arc<InstanceSlots>,
    _live: LiveInstance,
}

impl Drop for InstanceLease {
    fn drop(&mut self) {
        self.slots.live.fetch_sub(1, Ordering::AcqRel);
        self.slots.freed.notify_one();
    }
}

/// A live connection's place in [`InstanceSlots`]'s list of connections that can
/// hibernate.
struct SleeperRegistration {
    slots: Arc<InstanceSlots>,
    id: u64,
    sleeper: Arc<Sleeper>,
}

impl SleeperRegistration {
    /// The connection just did something.
    fn touch(&self, at: Instant) {
        let ms = at.into_std().saturating_duration_since(self.slots.origin).as_millis() as u64;
        self.sleeper.last_active.store(ms, Ordering::Relaxed);
    }
}

impl Drop for SleeperRegistration {
    fn drop(&mut self) {
        let mut sleepers = self.slots.sleepers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        sleepers.remove(&self.id);
    }
}

/// A connection served by its own addon instance.
pub(crate) struct AddonConnection {
    /// The instance, live or hibernated.
    guest: Guest,
    /// `conn{addon, conn}`: entered only around this task's log lines, not on every
    /// poll, which would cost a subscriber call per message.
    span: tracing::Span,
    /// The version this connection started on: a hibernated connection wakes on it.
    addon: Arc<LoadedAddon>,
    /// Where a waking connection takes its instance slot from.
    slots: Arc<InstanceSlots>,
    /// How long the connection idles before it hibernates; `None`: never.
    hibernate_after: Option<Duration>,
    /// While live and able to hibernate: its entry in the slots' list, through which a
    /// connection that needs a slot can ask it to hibernate.
    sleeper: Option<SleeperRegistration>,
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
    /// How long a callback may run on once its client is gone: the manifest's
    /// `orphan_callback_grace_ms`, else the server's `limits.orphan_callback_grace_ms`.
    orphan_grace: Duration,
    /// Fires at or before the next keep-alive deadline. Activity only moves deadlines
    /// later, so the timer is not re-armed per message: when it fires early,
    /// [`Self::keep_alive`] re-arms it for the real deadline.
    keep_alive_timer: Pin<Box<Sleep>>,
}

impl AddonConnection {
    /// Joins an instance (made before the upgrade) with the upgraded socket.
    pub(crate) fn new(
        mut live: Live,
        span: tracing::Span,
        ws: WebSocketStream<ClientStream>,
        addon: Arc<LoadedAddon>,
        slots: Arc<InstanceSlots>,
        shutdown: ShutdownListener,
        orphan_grace: Duration,
    ) -> Self {
        let (sink, stream) = ws.split();
        let stats = addon.stats().clone();
        let policy = addon.policy().clone();
        let policy_grace = policy.orphan_callback_grace;
        let outbox = live.store.data_mut().session.attach(sink, stats.clone());
        let now = Instant::now();
        let hibernate_after = addon.hibernate_after();
        let mut first_deadline = now + policy.ping_interval.min(policy.idle_timeout);
        if let Some(after) = hibernate_after {
            first_deadline = first_deadline.min(now + after);
        }
        let sleeper = hibernate_after.map(|_| slots.register(live.store.data().session.info().id));
        AddonConnection {
            meter: live.store.data().limits.meter(),
            outbox,
            guest: Guest::Live(live),
            span,
            addon,
            slots,
            hibernate_after,
            sleeper,
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
            orphan_grace: policy_grace.unwrap_or(orphan_grace),
            keep_alive_timer: Box::pin(tokio::time::sleep_until(first_deadline)),
        }
    }

    /// Whether the instance is hibernated (checked before each event, so inline: most
    /// connections are live).
    #[inline]
    fn asleep(&self) -> bool {
        matches!(self.guest, Guest::Asleep(_))
    }

    /// The session (socket, close state), live or hibernated.
    fn session(&mut self) -> &mut Session {
        match &mut self.guest {
            Guest::Live(live) => &mut live.store.data_mut().session,
            Guest::Asleep(asleep) => &mut asleep.host.session,
            Guest::Gone => unreachable!("the guest is only gone inside a transition"),
        }
    }

    /// Runs the connection to its end: the connection's task. Every open connection,
    /// hibernated or not, holds this future for its whole life, at the size of its
    /// largest await point. So everything that calls into the instance is boxed where it
    /// is awaited: `on-open` and `on-close` once, and [`Self::run`] (the per-message
    /// path, with wasmtime's call futures pinned inside) once per live period. A
    /// hibernated connection holds only this loop, waiting in [`Self::wake`], and the
    /// room of the per-message path goes with its instance
    /// (`tests::the_connection_task_stays_small`).
    pub(crate) async fn serve(&mut self) {
        match Box::pin(self.open()).await {
            Opened::Ready => {}
            Opened::Refused => return,
            Opened::Ended(end) => return Box::pin(self.end(end)).await,
        }
        let (code, reason) = loop {
            let first = if self.asleep() { Some(self.wake().await) } else { None };
            match Box::pin(self.run(first)).await {
                Run::Asleep => continue,
                Run::Closed(code, reason) => break (code, reason),
                Run::Ended(end) => return Box::pin(self.end(end)).await,
            }
        };
        Box::pin(self.on_close(code, reason)).await
    }

    /// Calls `on-open`; a refusal closes the connection here.
    async fn open(&mut self) -> Opened {
        let Guest::Live(live) = &mut self.guest else { unreachable!("a connection starts live") };
        let info = live.store.data().session.info().clone();
        sandbox::start_callback(&mut live.store, None);
        let handler = &live.exports.handler;
        let opened = {
            let guest_call = std::pin::pin!(handler.call_on_open(&mut live.store, &info));
            let call = guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, guest_call);
            read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
        };
        let Ok(opened) = opened else {
            return Opened::Ended(End::Orphaned("on-open"));
        };
        self.pick_up_inbox();
        match opened {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                // Clients can be refused in a loop (a bad token on every try): bounded too.
                if self.stats.log_limits.admit_refused(self.addon.name()) {
                    self.span.in_scope(|| tracing::info!(code = refusal.code, reason = %refusal.reason, "addon refused the connection"));
                }
                self.session().close(refusal.code, &refusal.reason).await;
                self.finish_close().await;
                return Opened::Refused;
            }
            Err(err) => return Opened::Ended(End::Failed("on-open", err)),
        }
        Opened::Ready
    }

    /// Handles events while the instance is live: client messages, channel deliveries,
    /// timers, shutdown. Begins with `first` when a hibernated connection woke for it;
    /// hands back once the instance hibernates or the connection ends.
    async fn run(&mut self, mut first: Option<Wake>) -> Run {
        loop {
            let wake = match first.take() {
                Some(wake) => wake,
                // Hibernated, with nothing to do: hand back, so this future's room goes.
                None if self.asleep() => return Run::Asleep,
                None => self.wake().await,
            };
            let event = match wake {
                Wake::Event(event) => event,
                Wake::Delivery(delivery) => {
                    if self.asleep()
                        && let Err(unwoken) = Box::pin(self.awaken()).await
                    {
                        return Run::Ended(End::NotWoken(unwoken));
                    }
                    match self.deliver(&delivery).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => return Run::Ended(End::Failed("on-channel-message", err)),
                        Err(Orphaned) => return Run::Ended(End::Orphaned("on-channel-message")),
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
                wake @ (Wake::Timer | Wake::MakeRoom) => {
                    let asked = matches!(wake, Wake::MakeRoom);
                    if !asked {
                        self.keep_alive().await;
                    }
                    let due =
                        if asked { self.session().close_sent().is_none() } else { self.hibernate_due() };
                    if due && let Err(ended) = Box::pin(self.hibernate()).await {
                        return Run::Ended(End::CallFailed("hibernate", ended));
                    }
                    continue;
                }
                Wake::Shutdown => {
                    self.session().close(close_code::GOING_AWAY, "server shutting down").await;
                    continue;
                }
            };
            match event {
                Inbound::Message(message) => {
                    if self.session().closing() {
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
                    if self.asleep()
                        && let Err(unwoken) = Box::pin(self.awaken()).await
                    {
                        return Run::Ended(End::NotWoken(unwoken));
                    }
                    let Guest::Live(live) = &mut self.guest else { unreachable!("woken above") };
                    // The callback starts now, as far as the clock can tell.
                    let started = self.last_message.max(self.last_callback_end);
                    sandbox::start_callback(&mut live.store, Some(started.into_std()));
                    let handler = &live.exports.handler;
                    let outcome = {
                        let guest_call = std::pin::pin!(handler.call_on_message(&mut live.store, &message));
                        let call =
                            guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, guest_call);
                        read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
                    };
                    let Ok(outcome) = outcome else {
                        return Run::Ended(End::Orphaned("on-message"));
                    };
                    self.pick_up_inbox();
                    self.callback_ended();
                    self.stats.callback_seconds.observe(self.last_callback_end - started);
                    match outcome {
                        Ok(Ok(())) => {}
                        Ok(Err(reason)) => {
                            self.stats.failure(FailureKind::AddonError);
                            if self.may_log(FailureKind::AddonError) {
                                self.span.in_scope(|| tracing::warn!(kind = FailureKind::AddonError.code(), cause = %reason, "on-message returned an error"));
                            }
                            self.send_error(FailureKind::AddonError, &reason).await;
                        }
                        Err(err) => return Run::Ended(End::Failed("on-message", err)),
                    }
                }
                Inbound::Closed { code, reason } => return Run::Closed(code, reason),
                Inbound::Broken { kind, code, reason } => {
                    self.fail_client(kind, code, &reason).await;
                    return Run::Closed(code, reason);
                }
            }
        }
    }

    /// After the client's close: wakes a hibernated instance (so `on-close` sees its
    /// state) and calls `on-close`.
    async fn on_close(&mut self, code: u16, reason: String) {
        // Flushes tungstenite's reply to the client's close frame before running on-close.
        self.session().shutdown().await;
        self.span.in_scope(|| tracing::debug!(code, reason = %client_text(&reason), "connection closed"));
        // A hibernated connection wakes for its close too, so on-close sees its state.
        if self.asleep()
            && let Err(unwoken) = Box::pin(self.awaken()).await
        {
            let (kind, cause) = match unwoken {
                Unwoken::NoSlot => (FailureKind::InstanceCapacity, "no free instance slot".to_owned()),
                Unwoken::NotMade(err) => (err.kind, err.cause),
                Unwoken::Failed(CallFailed::Trapped(err)) => self.classify(&err),
                Unwoken::Failed(CallFailed::Orphaned) => {
                    (FailureKind::OrphanedCallback, "wake outlived the grace period".to_owned())
                }
            };
            self.stats.failure(kind);
            if self.may_log(kind) {
                self.span.in_scope(|| tracing::warn!(stage = "wake for on-close", kind = kind.code(), cause = %cause, "on-close skipped"));
            }
            return;
        }
        let Guest::Live(live) = &mut self.guest else { unreachable!("woken above") };
        sandbox::start_callback(&mut live.store, None);
        let handler = &live.exports.handler;
        let closed = {
            let call = std::pin::pin!(handler.call_on_close(&mut live.store, code, &reason));
            guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, call).await
        };
        if let Err(err) = closed {
            let (kind, cause) = self.classify(&err);
            self.stats.failure(kind);
            if self.may_log(kind) {
                self.span.in_scope(|| tracing::error!(stage = "on-close", kind = kind.code(), cause = %cause, "addon failed"));
            }
        }
    }

    /// Ends a connection whose instance can no longer be used.
    async fn end(&mut self, end: End) {
        match end {
            End::Orphaned(stage) => self.orphaned(stage).await,
            End::Failed(stage, err) => self.failed(stage, err).await,
            End::CallFailed(stage, ended) => self.call_failed(stage, ended).await,
            End::NotWoken(unwoken) => self.not_woken(unwoken).await,
        }
    }

    /// Waits for the next thing to do: a client event (from the read-ahead queue first),
    /// a keep-alive deadline, or shutdown. Once the host sent a close frame, the client
    /// gets [`CLOSE_HANDSHAKE_TIMEOUT`] in all to answer it.
    async fn wake(&mut self) -> Wake {
        if let Some(event) = self.pending.pop_front() {
            return Wake::Event(event);
        }
        let session = self.session();
        if session.closing()
            && let Some((code, reason)) = session.close_sent()
        {
            let gone = Inbound::Closed { code: *code, reason: reason.clone() };
            if session.stalled() {
                self.stats.failure(FailureKind::SlowClient);
                if self.may_log(FailureKind::SlowClient) {
                    self.span.in_scope(|| {
                        tracing::warn!(
                            kind = FailureKind::SlowClient.code(),
                            timeout_s = self.policy.send_timeout.as_secs(),
                            "client stopped reading; socket dropped"
                        )
                    });
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
                    self.span.in_scope(|| {
                        tracing::debug!("no close frame from the client in time; socket dropped")
                    });
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
            _ = asked_to_make_room(&self.sleeper) => Wake::MakeRoom,
        }
    }

    /// After a callback: the first `subscribe` made the inbox, which this task polls from
    /// now on. (Made lazily, so connections that never subscribe carry none.)
    fn pick_up_inbox(&mut self) {
        if self.inbox.is_none()
            && let Guest::Live(live) = &mut self.guest
        {
            self.inbox = live.store.data_mut().channels.take_inbox();
        }
    }

    /// Runs `on-channel-message` for one delivery, reading the socket meanwhile.
    async fn deliver(&mut self, delivery: &Delivery) -> Result<wasmtime::Result<()>, Orphaned> {
        let Guest::Live(live) = &mut self.guest else { unreachable!("woken before a delivery") };
        let Some(channel_handler) = &live.exports.channel_handler else {
            // Unreachable in practice: such an instance's subscribe answers `denied`.
            return Ok(Ok(()));
        };
        self.stats.channel_delivery();
        sandbox::start_callback(&mut live.store, None);
        let outcome = {
            let guest_call = std::pin::pin!(channel_handler.call_on_channel_message(
                &mut live.store,
                &delivery.channel,
                &delivery.payload
            ));
            let call = guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, guest_call);
            read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
        };
        self.callback_ended();
        outcome
    }

    /// A callback outlived its client by more than the grace period: abandon it. The
    /// instance was left mid-call, so it is never entered again (`on-close` is skipped);
    /// dropping the store gives its memory and slot back.
    async fn orphaned(&mut self, stage: &'static str) {
        self.stats.failure(FailureKind::OrphanedCallback);
        self.span.in_scope(|| {
            tracing::warn!(
                stage,
                kind = FailureKind::OrphanedCallback.code(),
                grace_ms = self.orphan_grace.as_millis() as u64,
                "the client is gone and the callback was still running after the grace period \
             (the manifest's orphan_callback_grace_ms, else limits.orphan_callback_grace_ms); abandoned it and dropped the instance; on-close skipped"
            )
        });
        self.session().shutdown().await;
    }

    /// The next keep-alive deadline: idle timeout, ping due, or pong overdue.
    fn next_deadline(&self) -> Instant {
        let idle = self.last_message + self.policy.idle_timeout;
        let ping = match self.ping_sent {
            Some(sent) => sent + self.policy.ping_interval,
            None => self.reader.last_frame + self.policy.ping_interval,
        };
        let deadline = idle.min(ping);
        match (self.hibernate_after, &self.guest) {
            (Some(after), Guest::Live(_)) => deadline.min(self.last_activity() + after),
            _ => deadline,
        }
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
                    self.span.in_scope(|| {
                        tracing::info!(
                            kind = FailureKind::Unresponsive.code(),
                            "ping unanswered; dropping the connection"
                        )
                    });
                }
                self.pending.push_back(Inbound::Closed { code: close_code::ABNORMAL, reason: String::new() });
                self.reader.finished = true;
                return;
            }
        }
        if self.ping_sent.is_none() && now >= self.reader.last_frame + self.policy.ping_interval {
            self.session().ping().await;
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
            self.span.in_scope(|| tracing::info!(kind = kind.code(), code, cause = %client_text(reason), "closing the connection"));
        }
        self.session().close(code, reason).await;
    }

    async fn send_error(&mut self, kind: FailureKind, message: &str) {
        let frame = Envelope::Error { message, code: kind.code() }.to_json();
        // A failed send means the client is gone; the reader will report it.
        let _ = self.session().send(WsMessage::text(frame)).await;
    }

    /// Whether a failure line of `kind` may be logged now: clients decide how many
    /// connections fail, so each addon logs a bounded number per kind
    /// (`crate::log_limits`). The failure is counted either way.
    fn may_log(&self, kind: FailureKind) -> bool {
        self.stats.log_limits.admit(kind, self.addon.name())
    }

    /// Names why a call into the live instance failed.
    fn classify(&mut self, err: &wasmtime::Error) -> (FailureKind, String) {
        match &mut self.guest {
            Guest::Live(live) => sandbox::classify(&mut live.store, &self.policy, err),
            _ => (FailureKind::AddonTrap, format!("crashed: {}", sandbox::describe(err))),
        }
    }

    /// The instance failed (trap, CPU or memory limit): tell the client, close with
    /// 1011, never enter the instance again.
    async fn failed(&mut self, stage: &'static str, err: wasmtime::Error) {
        let (kind, cause) = self.classify(&err);
        self.stats.failure(kind);
        if self.may_log(kind) {
            self.span.in_scope(|| tracing::error!(stage, kind = kind.code(), cause = %cause, detail = %sandbox::describe(&err), "addon failed; closing with 1011"));
        }
        let addon = self.addon.clone();
        self.send_error(kind, &format!("addon '{}' {cause}", addon.name())).await;
        self.session().close(close_code::INTERNAL_ERROR, kind.code()).await;
        self.finish_close().await;
    }

    /// Makes a hibernated connection's instance live again: a slot, a fresh instance of
    /// the version the connection started on, then `wake(state)`. Nothing to do when the
    /// instance is live.
    async fn awaken(&mut self) -> Result<(), Unwoken> {
        if !matches!(self.guest, Guest::Asleep(_)) {
            return Ok(());
        }
        let Guest::Asleep(asleep) = std::mem::replace(&mut self.guest, Guest::Gone) else { unreachable!() };
        let Some(lease) = self.slots.lease_or_make_room(&self.stats).await else {
            self.guest = Guest::Asleep(asleep);
            return Err(Unwoken::NoSlot);
        };
        let Asleep { state, host } = *asleep;
        let host = HostState::unpark(host, &self.policy);
        let (store, exports) = match self.addon.instantiate_keeping(host).await {
            Ok(made) => made,
            Err((err, host)) => {
                self.guest = Guest::Asleep(Box::new(Asleep { state, host: host.park() }));
                return Err(Unwoken::NotMade(err));
            }
        };
        self.stats.hibernated.dec();
        self.stats.wakes.inc();
        let id = store.data().session.info().id;
        self.guest = Guest::Live(Live { store, exports, lease });
        self.sleeper = Some(self.slots.register(id));
        // The hibernation deadline is back, and may come before the armed one.
        let next = self.next_deadline();
        self.keep_alive_timer.as_mut().reset(next);
        let Guest::Live(live) = &mut self.guest else { unreachable!() };
        let hibernation =
            live.exports.hibernation.as_ref().expect("only a version that exports hibernation hibernates");
        sandbox::start_callback(&mut live.store, None);
        let outcome = {
            let guest_call = std::pin::pin!(hibernation.call_wake(&mut live.store, &state));
            let call = guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, guest_call);
            read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
        };
        self.pick_up_inbox();
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(Unwoken::Failed(CallFailed::Trapped(err))),
            Err(Orphaned) => Err(Unwoken::Failed(CallFailed::Orphaned)),
        }
    }

    /// Ends the connection after a call that left the instance unusable.
    async fn call_failed(&mut self, stage: &'static str, ended: CallFailed) {
        match ended {
            CallFailed::Trapped(err) => self.failed(stage, err).await,
            CallFailed::Orphaned => self.orphaned(stage).await,
        }
    }

    /// The connection could not be woken: the client is told, and the connection closes.
    async fn not_woken(&mut self, unwoken: Unwoken) {
        let (kind, cause, code) = match unwoken {
            Unwoken::Failed(ended) => return self.call_failed("wake", ended).await,
            Unwoken::NoSlot => (
                FailureKind::InstanceCapacity,
                format!(
                    "cannot wake this connection: every one of the {} instance slots is taken \
                     (limits.max_live_instances); reconnect later",
                    self.slots.max()
                ),
                close_code::TRY_AGAIN_LATER,
            ),
            Unwoken::NotMade(InstantiateError { kind, cause }) => {
                let code = match kind {
                    FailureKind::InstanceCapacity => close_code::TRY_AGAIN_LATER,
                    _ => close_code::INTERNAL_ERROR,
                };
                (kind, format!("addon '{}' cannot wake this connection: it {cause}", self.addon.name()), code)
            }
        };
        self.stats.failure(kind);
        if self.may_log(kind) {
            self.span.in_scope(|| tracing::error!(stage = "wake", kind = kind.code(), cause = %cause, "cannot wake a hibernated connection; closing"));
        }
        self.send_error(kind, &cause).await;
        self.session().close(code, kind.code()).await;
        self.finish_close().await;
    }

    /// Whether the live instance has idled for `hibernate_after` with nothing waiting.
    fn hibernate_due(&mut self) -> bool {
        let Some(after) = self.hibernate_after else { return false };
        matches!(self.guest, Guest::Live(_))
            && self.pending.is_empty()
            && Instant::now() >= self.last_activity() + after
            && self.session().close_sent().is_none()
    }

    /// Stamps the end of a callback: callback timing, the idle deadline, and the
    /// connection's place in the least-recently-active order.
    fn callback_ended(&mut self) {
        self.last_callback_end = Instant::now();
        if let Some(sleeper) = &self.sleeper {
            sleeper.touch(self.last_callback_end);
        }
    }

    /// When the connection last did something: a client message or a callback's end.
    fn last_activity(&self) -> Instant {
        self.last_message.max(self.last_callback_end)
    }

    /// Hibernates the idle instance: `hibernate()`, keep the bytes, drop the instance so
    /// its memory and slot go back. A state over `hibernate_max_state_bytes` keeps it
    /// live (`hibernate_failed`); a trap ends the connection, as in any callback, since
    /// a trapped instance cannot be entered again.
    async fn hibernate(&mut self) -> Result<(), CallFailed> {
        let Guest::Live(live) = &mut self.guest else { return Ok(()) };
        let Some(hibernation) = live.exports.hibernation.as_ref() else { return Ok(()) };
        sandbox::start_callback(&mut live.store, None);
        let outcome = {
            let guest_call = std::pin::pin!(hibernation.call_hibernate(&mut live.store));
            let call = guest_turn(&self.meter, &self.outbox, self.policy.send_timeout, guest_call);
            read_while(call, &mut self.reader, &mut self.pending, self.orphan_grace).await
        };
        self.callback_ended();
        self.pick_up_inbox();
        let state = match outcome {
            Ok(Ok(state)) => state,
            Ok(Err(err)) => return Err(CallFailed::Trapped(err)),
            Err(Orphaned) => return Err(CallFailed::Orphaned),
        };
        let max = self.policy.hibernate_max_state_bytes;
        if state.len() > max {
            let kind = FailureKind::HibernateFailed;
            self.stats.failure(kind);
            if self.may_log(kind) {
                self.span.in_scope(|| {
                    tracing::warn!(
                        kind = kind.code(),
                        bytes = state.len(),
                        max,
                        "hibernate returned more than hibernate_max_state_bytes; the instance stays live"
                    )
                });
            }
            return Ok(());
        }
        if !self.pending.is_empty() {
            // The client spoke while the state was taken: it would wake at once.
            return Ok(());
        }
        let Guest::Live(Live { store, exports: _, lease }) = std::mem::replace(&mut self.guest, Guest::Gone)
        else {
            unreachable!()
        };
        // Dropping the store drops the instance; the lease gives its slot back.
        let host = store.into_data().park();
        drop(lease);
        // A fresh copy, made outside the instance scope: the lifted bytes sit among the
        // instance's allocations, and would keep one of its pages for as long as this
        // connection sleeps (instance_heap.rs).
        let state = state.as_slice().to_vec();
        self.guest = Guest::Asleep(Box::new(Asleep { state, host }));
        self.sleeper = None;
        HIBERNATED_SINCE_TRIM.fetch_add(1, Ordering::Relaxed);
        self.stats.hibernated.inc();
        self.stats.hibernations.inc();
        let next = self.next_deadline();
        self.keep_alive_timer.as_mut().reset(next);
        self.span.in_scope(|| tracing::debug!("hibernated"));
        Ok(())
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
        self.session().shutdown().await;
    }
}

/// One callback as the connection task runs it; `call` is pinned where it is made (the
/// call sites `pin!` it), so the layers here and in [`read_while`] move a pointer, not
/// wasmtime's call future (about a kilobyte, copied once per layer otherwise). Every
/// poll resumes the guest (the meter
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

/// Resolves when the slots ask this connection to hibernate; never when it is not listed.
async fn asked_to_make_room(sleeper: &Option<SleeperRegistration>) {
    let Some(registration) = sleeper else { return std::future::pending().await };
    let sleeper = &registration.sleeper;
    std::future::poll_fn(|cx| {
        // Registered before the flag is read, so an ask between the two still wakes us.
        sleeper.waker.register(cx.waker());
        if sleeper.make_room_now.swap(false, Ordering::Acquire) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an `fn(A) -> F` returns, without calling it.
    fn future_size<A, F: Future>(_: fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every open connection, hibernated or not, holds its task's future and the
    /// connection itself for as long as it is open; an async fn's future is as large as
    /// its largest await point. So `serve` keeps only the wait for the next event inline
    /// and boxes everything that calls into the instance ([`AddonConnection::run`] per
    /// live period; `on-open`, `on-close` and the failure paths once). Before that split
    /// the task was 3.2 KB, hibernated or not; waking inline had made it 6.4 KB.
    #[test]
    fn the_connection_task_stays_small() {
        let serve = future_size::<&'static mut AddonConnection, _>(AddonConnection::serve);
        assert!(serve <= 768, "the connection task's future is {serve} bytes: box the path that grew it");
        let connection = std::mem::size_of::<AddonConnection>();
        assert!(connection <= 640, "a connection is {connection} bytes: box what it holds only sometimes");
    }
}
