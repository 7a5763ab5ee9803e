//! The channel bus: who is subscribed to what, and carrying a published message to them,
//! in this process or across nodes through Redis.
//!
//! The WIT capability (`sockhost:addon/channels`, grants and limits) is
//! [`crate::host::channels`]; the shop backend's `POST /api/publish` is
//! [`crate::admin`]. Both publish through one [`Channels`] per server.
//!
//! ```text
//! publish ─► [in-process]  registry ─► each subscriber's inbox (try_send, never waits)
//!         └► [clustered]   PUBLISH sockhost:ch:<addon>:<channel> ─► Redis
//!                          ─► every node's one SUBSCRIBE connection ─► its registry ─► inboxes
//! inbox (bounded, per connection) ─► connection task ─► instance.on-channel-message
//! ```
//!
//! - **One path per mode.** In a cluster even local subscribers get a message through
//!   Redis, so every node sees one channel's messages in the one order Redis gives them;
//!   without `redis_url` the registry delivers at once.
//! - **Shared payloads.** A message is one `Arc<Delivery>`; each inbox holds a pointer,
//!   so fanning out to 10,000 subscribers copies nothing on the host side. The only copy
//!   per subscriber is into its instance's memory, which the sandbox requires.
//! - **Publishers never wait for subscribers.** Each connection's inbox is bounded
//!   ([`crate::host::channels::ChannelLimits::inbox`]); a full inbox marks the connection
//!   overflowed instead of blocking or growing. Its connection task then closes it (error
//!   frame `slow_subscriber`, close 1008). Dropping messages silently would break the
//!   promise that no frame is lost without a word, and a client that cannot keep up is
//!   better reconnected (and resynced) than fed a stream with holes.
//! - **Redis subscriptions follow local ones.** The node subscribes to a Redis channel
//!   when its first local subscriber arrives and unsubscribes when the last leaves. One
//!   task owns the pub/sub connection; after Redis comes back it reconnects with backoff
//!   and subscribes again to every channel that has local subscribers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::{MAX_RECONNECT_DELAY, RedisLink};
use crate::metrics::Metrics;

/// One published message, shared by every inbox it is delivered to.
#[derive(Debug)]
pub struct Delivery {
    pub channel: Box<str>,
    pub payload: Payload,
}

/// A published message's content: the WIT `message` itself, so each subscriber's
/// `on-channel-message` is called with a reference to the one shared copy.
pub type Payload = crate::bindings::Message;

/// The size of a payload, in bytes.
pub fn payload_len(payload: &Payload) -> usize {
    match payload {
        Payload::Text(text) => text.len(),
        Payload::Binary(data) => data.len(),
    }
}

/// The wire form inside Redis: a kind byte, then the bytes.
fn encode(payload: &Payload) -> Vec<u8> {
    let (kind, bytes) = match payload {
        Payload::Text(text) => (b't', text.as_bytes()),
        Payload::Binary(data) => (b'b', data.as_slice()),
    };
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(kind);
    out.extend_from_slice(bytes);
    out
}

fn decode(bytes: &[u8]) -> Option<Payload> {
    match bytes.split_first()? {
        (b't', rest) => String::from_utf8(rest.to_vec()).ok().map(Payload::Text),
        (b'b', rest) => Some(Payload::Binary(rest.to_vec())),
        _ => None,
    }
}

/// Why the bus could not publish or subscribe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The cluster is unreachable.
    #[error("{0}")]
    Unavailable(String),
}

/// The sending side of one connection's inbox, held by the registry.
#[derive(Clone)]
pub struct InboxSender {
    conn: u64,
    tx: mpsc::Sender<Arc<Delivery>>,
    overflowed: Arc<AtomicBool>,
}

/// One connection's inbox: deliveries waiting for their `on-channel-message` call.
pub struct Inbox {
    rx: mpsc::Receiver<Arc<Delivery>>,
    overflowed: Arc<AtomicBool>,
}

/// Makes a connection's inbox, holding at most `capacity` deliveries.
pub fn inbox(conn: u64, capacity: usize) -> (InboxSender, Inbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    (InboxSender { conn, tx, overflowed: overflowed.clone() }, Inbox { rx, overflowed })
}

impl Inbox {
    /// The next delivery. `None` means the inbox overflowed: the connection cannot keep up
    /// and must be closed. (The registry holds a sender as long as the connection is
    /// subscribed, so the channel never simply ends while it is polled.)
    pub async fn next(&mut self) -> Option<Arc<Delivery>> {
        if self.overflowed.load(Ordering::Relaxed) {
            return None;
        }
        let delivery = self.rx.recv().await?;
        // Checked after receiving too: the publisher marks overflow when the queue is full,
        // which is exactly when this side still has deliveries to take.
        if self.overflowed.load(Ordering::Relaxed) { None } else { Some(delivery) }
    }
}

/// addon → channel → subscribers.
type Registry = HashMap<Arc<str>, HashMap<Box<str>, Vec<InboxSender>>>;

/// The server's channel bus.
pub struct Channels {
    registry: RwLock<Registry>,
    redis: Option<RedisBus>,
    metrics: Arc<Metrics>,
}

impl Channels {
    /// A bus inside this process only.
    pub fn in_process(metrics: Arc<Metrics>) -> Arc<Channels> {
        Arc::new(Channels { registry: RwLock::default(), redis: None, metrics })
    }

    /// A bus spanning every node that uses the same Redis. Starts the task that owns the
    /// pub/sub connection; it runs until the returned value and its clones are dropped.
    pub fn clustered(link: Arc<RedisLink>, metrics: Arc<Metrics>) -> Arc<Channels> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let redis = Some(RedisBus { link, commands });
        let channels = Arc::new(Channels { registry: RwLock::default(), redis, metrics });
        tokio::spawn(subscriber_task(Arc::downgrade(&channels), receiver));
        channels
    }

    /// The Redis link, when clustered.
    pub fn cluster(&self) -> Option<&Arc<RedisLink>> {
        self.redis.as_ref().map(|bus| &bus.link)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds `inbox` to the subscribers of `addon`'s `channel`. In a cluster the first local
    /// subscriber makes the node subscribe in Redis; this waits for Redis to confirm, so a
    /// message published after it returns is received. When Redis is down it returns at
    /// once: the subscription is kept and made in Redis when it is back.
    pub async fn subscribe(&self, addon: &Arc<str>, channel: &str, inbox: &InboxSender) {
        let first = {
            let mut registry = self.write();
            let subscribers = registry.entry(addon.clone()).or_default().entry(channel.into()).or_default();
            if subscribers.iter().any(|s| s.conn == inbox.conn) {
                return;
            }
            subscribers.push(inbox.clone());
            subscribers.len() == 1
        };
        self.metrics.addon(addon).channel_subscriptions.inc();
        if let (true, Some(bus)) = (first, &self.redis) {
            let (done, confirmed) = oneshot::channel();
            let _ = bus.commands.send(Command::Sync { name: redis_name(addon, channel), done: Some(done) });
            // Bounded: a Redis that is down answers at once (the task knows), a slow one
            // does not hold the addon for longer than a command may take.
            let _ = tokio::time::timeout(crate::cluster::COMMAND_TIMEOUT, confirmed).await;
        }
    }

    /// Removes connection `conn` from the subscribers of `addon`'s `channel`.
    pub fn unsubscribe(&self, addon: &str, channel: &str, conn: u64) {
        let last = {
            let mut registry = self.write();
            let Some(by_channel) = registry.get_mut(addon) else { return };
            let Some(subscribers) = by_channel.get_mut(channel) else { return };
            let before = subscribers.len();
            subscribers.retain(|s| s.conn != conn);
            if subscribers.len() < before {
                self.metrics.addon(addon).channel_subscriptions.dec();
            }
            let last = subscribers.is_empty();
            if last {
                by_channel.remove(channel);
            }
            last
        };
        if let (true, Some(bus)) = (last, &self.redis) {
            let _ = bus.commands.send(Command::Sync { name: redis_name(addon, channel), done: None });
        }
    }

    /// Local subscribers of `addon`'s `channel` now.
    pub fn local_subscribers(&self, addon: &str, channel: &str) -> usize {
        self.read().get(addon).and_then(|c| c.get(channel)).map_or(0, Vec::len)
    }

    /// Publishes `payload` on `addon`'s `channel`. Returns the local subscribers it
    /// reaches (in a cluster, those subscribed when it was handed to Redis; other nodes
    /// count their own).
    pub async fn publish(&self, addon: &str, channel: &str, payload: Payload) -> Result<usize, BusError> {
        let reached = match &self.redis {
            None => self.fan_out(addon, Arc::new(Delivery { channel: channel.into(), payload })),
            Some(bus) => {
                let local = self.local_subscribers(addon, channel);
                let mut conn = bus.link.connection();
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(redis_name(addon, channel)).arg(encode(&payload));
                bus.link
                    .run(cmd.query_async::<i64>(&mut conn))
                    .await
                    .map_err(|err| BusError::Unavailable(err.to_string()))?;
                local
            }
        };
        self.metrics.addon(addon).channel_published.inc();
        Ok(reached)
    }

    /// Hands `delivery` to every local subscriber of its channel without waiting for any.
    fn fan_out(&self, addon: &str, delivery: Arc<Delivery>) -> usize {
        let registry = self.read();
        let Some(subscribers) = registry.get(addon).and_then(|c| c.get(&*delivery.channel)) else {
            return 0;
        };
        let mut delivered = 0;
        for subscriber in subscribers {
            match subscriber.tx.try_send(delivery.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // The connection task sees this on its next look at the inbox (which
                    // is full, so soon) and closes the connection.
                    subscriber.overflowed.store(true, Ordering::Relaxed);
                }
                // The connection is ending; its unsubscribe is on the way.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// Every (addon, channel) with local subscribers, as Redis channel names.
    fn redis_names(&self) -> Vec<String> {
        let registry = self.read();
        registry
            .iter()
            .flat_map(|(addon, channels)| channels.keys().map(move |channel| redis_name(addon, channel)))
            .collect()
    }
}

/// The Redis side of a clustered bus.
struct RedisBus {
    link: Arc<RedisLink>,
    commands: mpsc::UnboundedSender<Command>,
}

/// What the subscriber task is asked to do.
enum Command {
    /// Make Redis's subscription to `name` match the registry: subscribe when it has local
    /// subscribers, unsubscribe when not. `done` is answered once that is so (or Redis is
    /// down). Reconciling instead of counting makes racing subscribes and unsubscribes
    /// come out right whatever their order.
    Sync { name: String, done: Option<oneshot::Sender<()>> },
}

/// Redis channels are global; each addon's channels live under its own prefix.
const REDIS_PREFIX: &str = "sockhost:ch:";

fn redis_name(addon: &str, channel: &str) -> String {
    format!("{REDIS_PREFIX}{addon}:{channel}")
}

/// `sockhost:ch:<addon>:<channel>` → (addon, channel). Addon names have no `:`.
fn parse_redis_name(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(REDIS_PREFIX)?.split_once(':')
}

/// Owns the node's one pub/sub connection: connects (with backoff), subscribes to every
/// channel that has local subscribers, applies [`Command`]s, and fans incoming messages
/// out. Ends when the bus is dropped.
async fn subscriber_task(bus: std::sync::Weak<Channels>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(channels) = bus.upgrade() else { return };
        let link = channels.cluster().expect("a clustered bus has a link").clone();
        drop(channels);
        let connected =
            tokio::time::timeout(crate::cluster::COMMAND_TIMEOUT, link.client().get_async_pubsub()).await;
        let failed = match connected {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("no answer in time".to_owned()),
        };
        let pubsub = match failed {
            Ok(pubsub) => pubsub,
            Err(cause) => {
                tracing::debug!(cause, "redis pub/sub connection failed");
                if !back_off(&link, &mut commands, &mut delay).await {
                    return;
                }
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Restore every subscription that has local subscribers.
        let Some(channels) = bus.upgrade() else { return };
        let names = channels.redis_names();
        drop(channels);
        let mut subscribed: std::collections::HashSet<String> = std::collections::HashSet::new();
        if !names.is_empty() {
            if let Err(err) = sink.subscribe(&names).await {
                tracing::debug!(error = %err, "redis resubscribe failed");
                if !back_off(&link, &mut commands, &mut delay).await {
                    return;
                }
                continue;
            }
            tracing::info!(channels = names.len(), "redis subscriptions restored");
            subscribed.extend(names);
        }
        link.set_up(true);
        delay = Duration::from_millis(100);

        let lost = loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break "connection closed" };
                    let Some(channels) = bus.upgrade() else { return };
                    let Some((addon, channel)) = parse_redis_name(message.get_channel_name()) else { continue };
                    let Some(payload) = decode(message.get_payload_bytes()) else {
                        tracing::warn!(channel = message.get_channel_name(), "malformed message on a sockhost channel; ignored");
                        continue;
                    };
                    channels.fan_out(addon, Arc::new(Delivery { channel: channel.into(), payload }));
                }
                command = commands.recv() => {
                    let Some(Command::Sync { name, done }) = command else { return };
                    let Some(channels) = bus.upgrade() else { return };
                    let wanted = parse_redis_name(&name).is_some_and(|(a, c)| channels.local_subscribers(a, c) > 0);
                    drop(channels);
                    let result = match (wanted, subscribed.contains(&name)) {
                        (true, false) => sink.subscribe(&name).await.map(|()| { subscribed.insert(name); }),
                        (false, true) => sink.unsubscribe(&name).await.map(|()| { subscribed.remove(&name); }),
                        _ => Ok(()),
                    };
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    if let Err(err) = result {
                        tracing::debug!(error = %err, "redis subscribe failed");
                        break "subscribe failed";
                    }
                }
            }
        };
        tracing::warn!(redis = %link.url(), "redis pub/sub connection lost ({lost}); reconnecting");
        link.set_up(false);
    }
}

/// After a failed attempt: marks the link down, waits `delay` (see [`wait_for_retry`])
/// and doubles it for next time, up to [`MAX_RECONNECT_DELAY`]. False when the bus is gone.
async fn back_off(
    link: &RedisLink,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    delay: &mut Duration,
) -> bool {
    link.set_up(false);
    let go_on = wait_for_retry(commands, *delay).await;
    *delay = (*delay * 2).min(MAX_RECONNECT_DELAY);
    go_on
}

/// Waits `delay` before the next connection attempt, answering subscribe requests at
/// once meanwhile (Redis is down: they stay local until it is back). False when the bus
/// is gone.
async fn wait_for_retry(commands: &mut mpsc::UnboundedReceiver<Command>, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            command = commands.recv() => match command {
                Some(Command::Sync { done, .. }) => {
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                None => return false,
            },
        }
    }
}

/// Why a channel name is not valid: a message that says what is allowed.
pub fn check_name(channel: &str) -> Result<(), String> {
    const RULE: &str = "a channel name is 1 to 128 bytes of ASCII letters, digits and `_ - . @ =`, \
                        in segments separated by `:`, e.g. `room:lobby`";
    let valid = !channel.is_empty()
        && channel.len() <= MAX_NAME_BYTES
        && channel.split(':').all(|segment| !segment.is_empty() && segment.bytes().all(is_name_byte));
    if valid {
        Ok(())
    } else {
        Err(format!("invalid channel {:?}: {RULE}", crate::error::truncate_utf8(channel, 64)))
    }
}

/// Longest channel name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

pub(crate) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_the_error_says_what_is_allowed() {
        for ok in ["room:lobby", "user:42", "a", "x.y-z_w@q=1:2"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ":", "room:", ":x", "a::b", "room lobby", "中文", "a/b", &"x".repeat(129)] {
            let err = check_name(bad).unwrap_err();
            assert!(err.contains("1 to 128 bytes"), "{err}");
        }
    }

    #[test]
    fn payloads_survive_the_redis_encoding() {
        assert!(
            matches!(decode(&encode(&Payload::Text("héllo".into()))), Some(Payload::Text(t)) if t == "héllo")
        );
        assert!(
            matches!(decode(&encode(&Payload::Text(String::new()))), Some(Payload::Text(t)) if t.is_empty())
        );
        assert!(
            matches!(decode(&encode(&Payload::Binary(vec![0, 255]))), Some(Payload::Binary(b)) if b == [0, 255])
        );
        assert!(decode(b"").is_none());
        assert!(decode(b"x123").is_none());
        assert!(decode(b"t\xff").is_none());
    }

    #[test]
    fn redis_names_keep_addons_apart() {
        assert_eq!(parse_redis_name(&redis_name("chat", "room:lobby")), Some(("chat", "room:lobby")));
        assert_eq!(parse_redis_name("other:x"), None);
    }

    #[tokio::test]
    async fn fan_out_reaches_every_subscriber_once_and_never_waits() {
        let bus = Channels::in_process(Arc::new(Metrics::new(Arc::default())));
        let addon: Arc<str> = Arc::from("chat");
        let (fast_tx, mut fast) = inbox(1, 4);
        let (slow_tx, mut slow) = inbox(2, 2);
        bus.subscribe(&addon, "room:a", &fast_tx).await;
        bus.subscribe(&addon, "room:a", &fast_tx).await; // twice is once
        bus.subscribe(&addon, "room:a", &slow_tx).await;
        assert_eq!(bus.local_subscribers("chat", "room:a"), 2);
        // Another addon's channel of the same name is another channel.
        assert_eq!(bus.publish("other", "room:a", Payload::Text("x".into())).await.unwrap(), 0);
        for i in 0..3 {
            let reached = bus.publish("chat", "room:a", Payload::Text(i.to_string())).await.unwrap();
            // The fast one reads each message before the next; the slow one never reads.
            let got = fast.next().await.unwrap();
            assert!(matches!(&got.payload, Payload::Text(t) if *t == i.to_string()));
            assert_eq!(reached, if i < 2 { 2 } else { 1 });
        }
        // The slow one overflowed on the third message: it is told, not fed a gap.
        assert!(slow.next().await.is_none());
        bus.unsubscribe("chat", "room:a", 1);
        bus.unsubscribe("chat", "room:a", 2);
        assert_eq!(bus.local_subscribers("chat", "room:a"), 0);
        assert!(bus.read().get("chat").unwrap().is_empty());
    }
}
