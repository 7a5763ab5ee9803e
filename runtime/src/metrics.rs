//! Prometheus metrics: what `/metrics` exposes, and the handles the hot path updates.
//!
//! prometheus-client owns the names, help texts and the text exposition format; this
//! module owns which metrics exist and keeps them cheap to update. Per-addon handles are
//! looked up once per addon name ([`Metrics::addon`]) and kept in [`AddonStats`], which
//! every version of that addon shares across reloads. A message then costs a few relaxed
//! atomic adds: no lock, no label lookup. The callback-duration histogram is this
//! module's own [`AtomicHistogram`], because prometheus-client's histogram takes a mutex
//! on every observation. Failures stay in [`FailureCounts`] (atomics the connection code
//! already bumps; one set server-wide, one per addon in [`AddonStats`]) and are read only
//! when `/metrics` is scraped.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `sockhost_addon_open_connections` | gauge | `addon` |
//! | `sockhost_addon_connections_total` | counter | `addon` |
//! | `sockhost_addon_live_instances` | gauge | `addon` |
//! | `sockhost_addon_hibernated_connections` | gauge | `addon`: connections whose instance is hibernated now |
//! | `sockhost_addon_hibernations_total`, `_wakes_total` | counter | `addon` |
//! | `sockhost_addon_messages_in_total`, `_out_total` | counter | `addon` |
//! | `sockhost_addon_bytes_in_total`, `_out_total` | counter | `addon` |
//! | `sockhost_addon_callback_seconds` | histogram | `addon` |
//! | `sockhost_addon_compile_seconds` | histogram | `addon` |
//! | `sockhost_addon_reloads_total` | counter | `addon`, `result` (`ok`, `failed`, `removed`) |
//! | `sockhost_compile_cache_total` | counter | `result` (`hit`, `miss`, `corrupt`, `untrusted`, `write_failed`) |
//! | `sockhost_addons_mounted` | gauge | |
//! | `sockhost_instance_slots` | gauge | the instance pool's slots (`limits.max_live_instances`): what the sum of `sockhost_addon_live_instances` can reach |
//! | `sockhost_channel_published_total` | counter | `addon`: messages published on its channels (by instances and `/api/publish`) |
//! | `sockhost_channel_deliveries_total` | counter | `addon`: `on-channel-message` calls made |
//! | `sockhost_channel_subscriptions` | gauge | `addon`: subscriptions held by this node's connections now |
//! | `sockhost_cluster_up` | gauge | 1 while Redis answers, 0 while not; absent without `redis_url` |
//! | `sockhost_socket_writes_total` | counter | writes to client sockets (corked frames leave in one) |
//! | `sockhost_failures_total` | counter | `kind` (the [`FailureKind`] codes) |
//! | `sockhost_addon_failures_total` | counter | `addon`, `kind`: the same failures, for the addon whose connection (or upgrade) failed |

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

use crate::error::{FailureCounts, FailureKind};
use crate::log_limits::LogLimiter;

/// The `Content-Type` of `/metrics`: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AddonLabel {
    addon: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    addon: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

type OpenGauge = Gauge<u32, AtomicU32>;
type CompileHistogram = Family<AddonLabel, Histogram, fn() -> Histogram>;

/// Every metric the server exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    open_connections: Family<AddonLabel, OpenGauge>,
    connections: Family<AddonLabel, Counter>,
    live_instances: Family<AddonLabel, Gauge>,
    messages_in: Family<AddonLabel, Counter>,
    messages_out: Family<AddonLabel, Counter>,
    bytes_in: Family<AddonLabel, Counter>,
    bytes_out: Family<AddonLabel, Counter>,
    callback_seconds: Family<AddonLabel, AtomicHistogram>,
    compile_seconds: CompileHistogram,
    reloads: Family<ReloadLabels, Counter>,
    compile_cache: Family<ResultLabel, Counter>,
    addons_mounted: Gauge,
    instance_slots: Gauge,
    channel_published: Family<AddonLabel, Counter>,
    channel_deliveries: Family<AddonLabel, Counter>,
    channel_subscriptions: Family<AddonLabel, Gauge>,
    hibernated: Family<AddonLabel, Gauge>,
    hibernations: Family<AddonLabel, Counter>,
    wakes: Family<AddonLabel, Counter>,
    /// Registered only in a cluster.
    cluster_up: Gauge,
    /// Writes to client sockets (system calls, or TLS records handed to rustls).
    socket_writes: Counter,
    /// The server-wide failure counts, which every addon's also feed.
    failures: Arc<FailureCounts>,
    /// One entry per addon name ever loaded: versions of an addon share it.
    stats: Arc<Mutex<AddonStatsByName>>,
    /// When the server started, so a reader of two snapshots can turn counters into rates
    /// (the dashboard, [`crate::web`]) on the server's clock.
    started: Instant,
}

type AddonStatsByName = HashMap<String, Arc<AddonStats>>;

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Registers `metric` as `sockhost_<name>` and returns it (metrics are handles: the
/// clone in the registry and the returned one count together).
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(format!("sockhost_{name}"), help, metric.clone());
    metric
}

/// [`register`] for a metric that starts from its default.
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    register(registry, name, help, M::default())
}

/// Compile times range from milliseconds (a small Rust addon) to seconds (an 18 MB
/// Python component).
fn compile_histogram() -> Histogram {
    Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Metrics {
    /// Registers every metric; `failures` is read at each scrape.
    pub fn new(failures: Arc<FailureCounts>) -> Metrics {
        let mut registry = Registry::default();
        let r = &mut registry;
        let metrics = Metrics {
            open_connections: registered(
                r,
                "addon_open_connections",
                "WebSocket connections open to the addon now",
            ),
            connections: registered(r, "addon_connections", "WebSocket connections accepted by the addon"),
            live_instances: registered(
                r,
                "addon_live_instances",
                "Instances of the addon alive now (one per connection)",
            ),
            messages_in: registered(r, "addon_messages_in", "Client messages received"),
            messages_out: registered(r, "addon_messages_out", "Messages sent to clients"),
            bytes_in: registered(r, "addon_bytes_in", "Payload bytes of client messages received"),
            bytes_out: registered(r, "addon_bytes_out", "Payload bytes of messages sent to clients"),
            callback_seconds: registered(
                r,
                "addon_callback_seconds",
                "Wall time of on-message callbacks, including time waiting on the client",
            ),
            compile_seconds: register(
                r,
                "addon_compile_seconds",
                "Time to compile (or load from the cache) and link an addon",
                Family::new_with_constructor(compile_histogram),
            ),
            reloads: registered(r, "addon_reloads", "Addon changes picked up while running, by result"),
            compile_cache: registered(
                r,
                "compile_cache",
                "Compiled-code cache look-ups and writes, by result",
            ),
            addons_mounted: registered(r, "addons_mounted", "Addons mounted now"),
            instance_slots: registered(
                r,
                "instance_slots",
                "Slots of the instance pool (limits.max_live_instances): the most addon instances alive at once",
            ),
            channel_published: registered(
                r,
                "channel_published",
                "Messages published on the addon's channels",
            ),
            channel_deliveries: registered(
                r,
                "channel_deliveries",
                "Channel messages delivered to the addon's instances (on-channel-message calls)",
            ),
            channel_subscriptions: registered(
                r,
                "channel_subscriptions",
                "Channel subscriptions held by this node's connections to the addon now",
            ),
            hibernated: registered(
                r,
                "addon_hibernated_connections",
                "Connections to the addon whose instance is hibernated now (no live instance)",
            ),
            hibernations: registered(
                r,
                "addon_hibernations",
                "Idle connections whose instance was hibernated",
            ),
            wakes: registered(
                r,
                "addon_wakes",
                "Hibernated connections woken by a message, a delivery or a close",
            ),
            cluster_up: Gauge::default(),
            socket_writes: registered(
                r,
                "socket_writes",
                "Writes to client sockets; fewer than messages out when frames are corked",
            ),
            stats: Arc::default(),
            started: Instant::now(),
            registry: Registry::default(),
            failures: failures.clone(),
        };
        registry.register_collector(Box::new(FailureCollector {
            server: failures,
            addons: metrics.stats.clone(),
        }));
        Metrics { registry, ..metrics }
    }

    /// The counter every client socket adds its writes to.
    pub fn socket_writes(&self) -> Counter {
        self.socket_writes.clone()
    }

    /// The handles for addon `name`, made on first use and shared by all its versions.
    pub fn addon(&self, name: &str) -> Arc<AddonStats> {
        let mut stats = self.stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stats
            .entry(name.to_owned())
            .or_insert_with(|| {
                let label = AddonLabel { addon: name.to_owned() };
                Arc::new(AddonStats {
                    open_connections: self.open_connections.get_or_create(&label).clone(),
                    connections: self.connections.get_or_create(&label).clone(),
                    live_instances: self.live_instances.get_or_create(&label).clone(),
                    messages_in: self.messages_in.get_or_create(&label).clone(),
                    messages_out: self.messages_out.get_or_create(&label).clone(),
                    bytes_in: self.bytes_in.get_or_create(&label).clone(),
                    bytes_out: self.bytes_out.get_or_create(&label).clone(),
                    callback_seconds: self.callback_seconds.get_or_create(&label).clone(),
                    channel_published: self.channel_published.get_or_create(&label).clone(),
                    channel_deliveries: self.channel_deliveries.get_or_create(&label).clone(),
                    channel_subscriptions: self.channel_subscriptions.get_or_create(&label).clone(),
                    hibernated: self.hibernated.get_or_create(&label).clone(),
                    hibernations: self.hibernations.get_or_create(&label).clone(),
                    wakes: self.wakes.get_or_create(&label).clone(),
                    failures: FailureCounts::default(),
                    server_failures: self.failures.clone(),
                    log_limits: LogLimiter::default(),
                })
            })
            .clone()
    }

    /// Reports, for every addon, the failure lines left out of the log in windows that are
    /// over (see `crate::log_limits`).
    pub(crate) fn flush_log_limits(&self) {
        for (name, stats) in self.addon_stats() {
            stats.log_limits.flush(&name);
        }
    }

    /// Every addon name ever loaded with its handles, sorted by name: a copy, so the
    /// lock is not held while they are read.
    pub(crate) fn addon_stats(&self) -> Vec<(String, Arc<AddonStats>)> {
        sorted_stats(&self.stats)
    }

    /// The server-wide failure counts (`sockhost_failures_total`).
    pub(crate) fn failures(&self) -> &FailureCounts {
        &self.failures
    }

    /// The instance pool's slots (`sockhost_instance_slots`).
    pub(crate) fn instance_slots(&self) -> i64 {
        self.instance_slots.get()
    }

    /// Time since the server started.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Records how long loading addon `name` took.
    pub fn compiled(&self, name: &str, elapsed: Duration) {
        self.compile_seconds
            .get_or_create(&AddonLabel { addon: name.to_owned() })
            .observe(elapsed.as_secs_f64());
    }

    /// Records a reload of addon `name`: `ok`, `failed` or `removed`.
    pub fn reloaded(&self, name: &str, result: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { addon: name.to_owned(), result }).inc();
    }

    /// Records a compiled-code cache event: `hit`, `miss`, `corrupt`, `untrusted` (the
    /// directory or entry could have been written by another user, so it was not read)
    /// or `write_failed`.
    pub fn cache(&self, result: &'static str) {
        self.compile_cache.get_or_create(&ResultLabel { result }).inc();
    }

    /// Shows `sockhost_cluster_up`: called once, by a server with `redis_url`.
    pub fn register_cluster(&mut self) {
        self.registry.register(
            "sockhost_cluster_up",
            "Whether this node reaches Redis (cluster.redis_url): 1 yes, 0 no",
            self.cluster_up.clone(),
        );
    }

    /// Records whether Redis answers (read at each scrape).
    pub fn set_cluster_up(&self, up: bool) {
        self.cluster_up.set(up as i64);
    }

    /// Sets the size of the instance pool.
    pub fn set_instance_slots(&self, slots: u64) {
        self.instance_slots.set(i64::try_from(slots).unwrap_or(i64::MAX));
    }

    /// Sets the number of mounted addons.
    pub fn set_mounted(&self, count: usize) {
        self.addons_mounted.set(count as i64);
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("encoding metrics into a String");
        out
    }
}

/// One addon's metric handles, shared by every version of it. `open_connections` is also
/// the count the addon's `max_connections` is checked against, so the limit holds across
/// reloads: connections still open on an old version count against the new one.
#[derive(Debug)]
pub struct AddonStats {
    pub(crate) open_connections: OpenGauge,
    pub(crate) connections: Counter,
    pub(crate) live_instances: Gauge,
    pub(crate) messages_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) callback_seconds: AtomicHistogram,
    pub(crate) channel_published: Counter,
    pub(crate) channel_deliveries: Counter,
    pub(crate) channel_subscriptions: Gauge,
    /// Connections hibernated now (no live instance), and hibernations and wakes so far.
    pub(crate) hibernated: Gauge,
    pub(crate) hibernations: Counter,
    pub(crate) wakes: Counter,
    /// This addon's share of the server-wide failure counts.
    pub(crate) failures: FailureCounts,
    server_failures: Arc<FailureCounts>,
    /// How many failure lines of each kind this addon may still log now: a client that
    /// causes failures in a loop must not flood the log (see `crate::log_limits`).
    pub(crate) log_limits: LogLimiter,
}

impl AddonStats {
    /// Connections open to this addon now, all versions together.
    pub fn open_connections(&self) -> u32 {
        self.open_connections.get()
    }

    /// Takes one of `max` connection slots; `false` when all are taken.
    pub(crate) fn try_open(&self, max: u32) -> bool {
        self.open_connections
            .inner()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| (open < max).then_some(open + 1))
            .is_ok()
    }

    /// Gives back a slot taken with [`AddonStats::try_open`].
    pub(crate) fn close(&self) {
        self.open_connections.dec();
    }

    /// Counts a failure of one of this addon's connections (or upgrades), for the addon
    /// and server-wide.
    pub(crate) fn failure(&self, kind: FailureKind) {
        self.failures.record(kind);
        self.server_failures.record(kind);
    }

    /// Counts one inbound client message of `bytes` payload bytes.
    #[inline]
    pub(crate) fn message_in(&self, bytes: usize) {
        self.messages_in.inc();
        self.bytes_in.inc_by(bytes as u64);
    }

    /// Counts one `on-channel-message` call.
    #[inline]
    pub(crate) fn channel_delivery(&self) {
        self.channel_deliveries.inc();
    }

    /// Counts one message sent to a client.
    #[inline]
    pub(crate) fn message_out(&self, bytes: usize) {
        self.messages_out.inc();
        self.bytes_out.inc_by(bytes as u64);
    }
}

/// A sorted copy of `stats`, taken under its lock.
fn sorted_stats(stats: &Mutex<AddonStatsByName>) -> Vec<(String, Arc<AddonStats>)> {
    let mut addons: Vec<(String, Arc<AddonStats>)> = {
        let stats = stats.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stats.iter().map(|(name, stats)| (name.clone(), stats.clone())).collect()
    };
    addons.sort_by(|a, b| a.0.cmp(&b.0));
    addons
}

/// An instance of an addon that is alive, counted in `sockhost_addon_live_instances`
/// from its creation to the end of its connection.
pub(crate) struct LiveInstance(Arc<AddonStats>);

impl LiveInstance {
    pub(crate) fn new(stats: Arc<AddonStats>) -> LiveInstance {
        stats.live_instances.inc();
        LiveInstance(stats)
    }
}

impl Drop for LiveInstance {
    fn drop(&mut self) {
        self.0.live_instances.dec();
    }
}

/// Upper bounds of the callback-duration buckets, in microseconds: 100 µs to 10 s.
const CALLBACK_BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// A histogram with fixed buckets, updated with two relaxed atomic adds and no lock.
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    /// One count per bucket of [`CALLBACK_BOUNDS_US`], then the overflow (`+Inf`) bucket.
    buckets: [AtomicU64; CALLBACK_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index =
            CALLBACK_BOUNDS_US.iter().position(|&bound| us <= bound).unwrap_or(CALLBACK_BOUNDS_US.len());
        self.0.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.0.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per-bucket counts; the encoder makes them cumulative.
        let bounds = CALLBACK_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> =
            bounds.zip(self.0.buckets.iter().map(|cell| cell.load(Ordering::Relaxed))).collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Exposes [`FailureCounts`] at scrape time: the server's as `sockhost_failures_total{kind}`,
/// each addon's as `sockhost_addon_failures_total{addon,kind}`. Every kind is listed, zeros
/// included, so a dashboard's series exist before the first failure.
#[derive(Debug)]
struct FailureCollector {
    server: Arc<FailureCounts>,
    addons: Arc<Mutex<AddonStatsByName>>,
}

impl Collector for FailureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "sockhost_failures",
            "Connection failures by kind (the error frame's code)",
            None,
            MetricType::Counter,
        )?;
        for kind in FailureKind::ALL {
            let labels = [("kind", kind.code())];
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(self.server.get(kind)).encode(metric)?;
        }

        let addons = sorted_stats(&self.addons);
        let mut family = encoder.encode_descriptor(
            "sockhost_addon_failures",
            "Connection failures by addon and kind (the error frame's code)",
            None,
            MetricType::Counter,
        )?;
        for (name, stats) in &addons {
            for kind in FailureKind::ALL {
                let labels = [("addon", name.as_str()), ("kind", kind.code())];
                let metric = family.encode_family(&labels)?;
                ConstCounter::new(stats.failures.get(kind)).encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_family_and_counts_by_addon() {
        let failures = Arc::new(FailureCounts::default());
        failures.record(FailureKind::AddonTrap);
        let metrics = Metrics::new(failures);
        let echo = metrics.addon("echo");
        assert!(Arc::ptr_eq(&echo, &metrics.addon("echo")), "one set of handles per name");
        assert!(echo.try_open(1));
        assert!(!echo.try_open(1), "the limit holds");
        echo.message_in(5);
        echo.failures.record(FailureKind::AddonTrap);
        metrics.addon("chat").failures.record(FailureKind::RateLimited);
        echo.callback_seconds.observe(Duration::from_micros(300));
        echo.callback_seconds.observe(Duration::from_secs(60));
        let text = metrics.encode();
        for line in [
            "sockhost_addon_open_connections{addon=\"echo\"} 1",
            "sockhost_addon_messages_in_total{addon=\"echo\"} 1",
            "sockhost_addon_bytes_in_total{addon=\"echo\"} 5",
            "sockhost_addon_callback_seconds_bucket{addon=\"echo\",le=\"0.0001\"} 0",
            "sockhost_addon_callback_seconds_bucket{addon=\"echo\",le=\"0.0005\"} 1",
            "sockhost_addon_callback_seconds_bucket{addon=\"echo\",le=\"+Inf\"} 2",
            "sockhost_addon_callback_seconds_count{addon=\"echo\"} 2",
            "sockhost_failures_total{kind=\"addon_trap\"} 1",
            "sockhost_failures_total{kind=\"addon_oom\"} 0",
            "sockhost_addon_failures_total{addon=\"echo\",kind=\"addon_trap\"} 1",
            "sockhost_addon_failures_total{addon=\"echo\",kind=\"rate_limited\"} 0",
            "sockhost_addon_failures_total{addon=\"chat\",kind=\"rate_limited\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        echo.close();
        assert_eq!(echo.open_connections(), 0);
    }
}
