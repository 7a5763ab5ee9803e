//! Limits enforced inside one instance's store: linear memory and guest CPU time.
//!
//! - **Memory**: the store's [`ResourceLimiter`] refuses to grow a memory past the addon's
//!   `memory_limit`. The guest sees `memory.grow` fail (Rust's allocator then aborts,
//!   which is a trap); the limiter remembers that it refused, so the host can name the
//!   failure `addon_oom` instead of a bare trap.
//! - **CPU**: a callback is charged the time the guest actually ran, in wasm or in host
//!   code it called synchronously; time it spent waiting (an `await` in a host call: a
//!   slow client, a sleep, I/O; or the scheduler's queue after a yield) is not charged.
//!   The connection task polls each callback through a [`CpuMeter`]. Every poll resumes
//!   the guest's fiber and every `Pending` suspends it, so the meter adds up the time
//!   between the two; the engine's epoch ticks every [`EPOCH_TICK`](crate::engine::EPOCH_TICK), and at each tick
//!   the running guest adds the time since it resumed, yields to the scheduler (so other
//!   connections on its worker thread go on) and is interrupted past `cpu_limit`
//!   (`addon_timeout`). Since the measure is time, not whole ticks, no pattern of bursts
//!   and pauses escapes it.
//!   Costs: one clock read when a callback that had to wait resumes and one when it
//!   suspends, one per tick of guest execution; a callback that runs to its end in one
//!   go (most do) reads no clock here, since the connection task already knows when it
//!   started. The clock is the monotonic wall clock (a vDSO read), not the thread's CPU
//!   clock (a system call): time the OS takes the worker thread away from a running
//!   guest is charged to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTableError;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi_http::FieldMapError;

use crate::error::FailureKind;
use crate::host::{HostState, NoOutboundGrant};
use crate::policy::AddonPolicy;

/// Names why entering an instance (a callback, or creating it) failed: a limit the store
/// saw hit, else a trap. Returns the kind and a one-line cause for logs and error frames.
///
/// A full resource table (`max_host_resources`) or a wasi:http header set past
/// [`crate::host::FIELD_SIZE_LIMIT`] is host-side memory the instance asked for, so it
/// counts as `addon_oom` too. It is recognised by the error (the host call
/// that could not add an entry) or, when a host call turned that into an error the guest
/// then trapped on, by the table being full.
pub(crate) fn classify(
    store: &mut Store<HostState>,
    policy: &AddonPolicy,
    err: &wasmtime::Error,
) -> (FailureKind, String) {
    let table_full = err
        .chain()
        .any(|cause| matches!(cause.downcast_ref::<ResourceTableError>(), Some(ResourceTableError::Full)));
    if let Some(denied) = err.chain().find_map(|cause| cause.downcast_ref::<NoOutboundGrant>()) {
        return (FailureKind::AddonTrap, denied.to_string());
    }
    let fields_full = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<FieldMapError>(),
            Some(FieldMapError::TotalSizeTooBig | FieldMapError::TooManyFields)
        )
    });
    if fields_full {
        // wasmtime-wasi-http traps rather than answer the guest with an error.
        return (
            FailureKind::AddonOom,
            format!(
                "exceeded the host's limit of {} KiB for one wasi:http header set (fields)",
                crate::host::FIELD_SIZE_LIMIT >> 10
            ),
        );
    }
    // wasmtime's message is the only sign of its handle limit.
    if err.chain().any(|cause| cause.to_string().contains("store handle limit exceeded")) {
        return (
            FailureKind::AddonOom,
            format!(
                "exceeded its limit of {} component handles (twice max_host_resources)",
                store.max_component_handles()
            ),
        );
    }
    if table_full || (store.data().limits.hit().is_none() && store.data_mut().host_resources_full()) {
        return (
            FailureKind::AddonOom,
            format!(
                "exceeded its limit of {} host resources (max_host_resources)",
                policy.max_host_resources
            ),
        );
    }
    match store.data().limits.hit() {
        Some(LimitHit::Cpu) => (
            FailureKind::AddonTimeout,
            format!("exceeded its CPU limit of {} ms", policy.cpu_limit.as_millis()),
        ),
        Some(LimitHit::Memory) => {
            (FailureKind::AddonOom, format!("exceeded its memory limit of {} bytes", policy.memory_limit))
        }
        None => (FailureKind::AddonTrap, format!("crashed: {}", describe(err))),
    }
}

/// Most handles the instance's component-model tables may hold at once
/// (`Store::set_max_component_handles`, 100,000 by default): twice `max_host_resources`,
/// so every host resource can be held while resources the guest makes itself (each a
/// slot of a few bytes in wasmtime's tables) stay bounded too.
pub(crate) fn max_component_handles(policy: &AddonPolicy) -> usize {
    policy.max_host_resources * 2
}

/// A one-line description of a failed call: the trap if there is one, else the error chain.
pub(crate) fn describe(err: &wasmtime::Error) -> String {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{err:#}"),
    }
}

/// Most elements a table may grow to. Rust components use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Per-instance limit state, kept in the store's data.
pub struct InstanceLimits {
    memory_limit: usize,
    memory_refused: bool,
    cpu_limit: Duration,
    cpu_exhausted: bool,
    clock: Arc<CpuClock>,
}

/// The running time of the current callback, shared by the store (the epoch callback)
/// and the [`CpuMeter`] the connection task polls the callback through. Times are
/// nanoseconds since `origin`; only the task running the callback touches them.
#[derive(Debug)]
struct CpuClock {
    origin: Instant,
    /// When the guest last started or resumed running.
    running_since: AtomicU64,
    /// Running time before `running_since`, in this callback.
    used: AtomicU64,
}

impl CpuClock {
    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Running time so far, if the guest is running now.
    fn used_until(&self, now: Instant) -> Duration {
        let since = self.running_since.load(Ordering::Relaxed);
        let used = self.used.load(Ordering::Relaxed);
        Duration::from_nanos(used + self.nanos(now).saturating_sub(since))
    }
}

/// What a yielding guest waits on before it resumes.
type Pause = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Which limit ended a callback, if one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Memory,
    Cpu,
}

impl InstanceLimits {
    pub fn new(policy: &AddonPolicy) -> InstanceLimits {
        InstanceLimits {
            memory_limit: policy.memory_limit,
            memory_refused: false,
            cpu_limit: policy.cpu_limit,
            cpu_exhausted: false,
            clock: Arc::new(CpuClock {
                origin: Instant::now(),
                running_since: AtomicU64::new(0),
                used: AtomicU64::new(0),
            }),
        }
    }

    /// The meter to poll this instance's callbacks through.
    pub fn meter(&self) -> CpuMeter {
        CpuMeter(self.clock.clone())
    }

    /// Called when the running guest reaches an epoch tick, or the check a `send` whose
    /// frame was held asked for: interrupts it past its CPU limit, else lets it yield,
    /// on `pause` when there is one (the held frames' move into the socket).
    fn on_deadline(&mut self, now: Instant, pause: Option<Pause>) -> UpdateDeadline {
        if self.clock.used_until(now) > self.cpu_limit {
            self.cpu_exhausted = true;
            return UpdateDeadline::Interrupt;
        }
        // The fiber suspends here: the meter books the time when the poll returns.
        UpdateDeadline::YieldCustom(1, pause.unwrap_or_else(|| Box::pin(tokio::task::yield_now())))
    }

    /// The limit that explains a failed call: a CPU interrupt, or a trap after a refused
    /// memory growth.
    pub fn hit(&self) -> Option<LimitHit> {
        if self.cpu_exhausted {
            Some(LimitHit::Cpu)
        } else if self.memory_refused {
            Some(LimitHit::Memory)
        } else {
            None
        }
    }
}

impl ResourceLimiter for InstanceLimits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_limit;
        if !allowed {
            self.memory_refused = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Installs the limiter and the epoch callback on a new store.
pub fn install(store: &mut Store<HostState>) {
    store.limiter(|state| &mut state.limits);
    store.epoch_deadline_callback(|mut ctx| {
        let state = ctx.data_mut();
        let pause = state.session.pause_for_held();
        Ok(state.limits.on_deadline(Instant::now(), pause))
    });
}

/// Resets the per-callback budget; call just before entering the guest, giving when the
/// callback started if the caller already read the clock, and poll the call through the
/// instance's [`CpuMeter`].
pub fn start_callback(store: &mut Store<HostState>, started: Option<Instant>) {
    let limits = &mut store.data_mut().limits;
    limits.memory_refused = false;
    let clock = &limits.clock;
    clock.used.store(0, Ordering::Relaxed);
    clock.running_since.store(clock.nanos(started.unwrap_or_else(Instant::now)), Ordering::Relaxed);
    store.set_epoch_deadline(1);
}

/// Books the guest's running time: the connection task polls every callback through
/// [`CpuMeter::run`], since each poll resumes the guest's fiber and each `Pending`
/// suspends it.
pub struct CpuMeter(Arc<CpuClock>);

impl CpuMeter {
    /// Runs `call`, charging the time inside its polls to the current callback.
    pub async fn run<F: Future>(&self, call: F) -> F::Output {
        self.run_with(call, |_| {}).await
    }

    /// Runs `call` as [`CpuMeter::run`] does, calling `paused` each time the guest
    /// stops running before its end (after its time is booked).
    pub async fn run_with<F: Future>(&self, call: F, mut paused: impl FnMut(&mut Context<'_>)) -> F::Output {
        let clock = &*self.0;
        let mut call = std::pin::pin!(call);
        // `start_callback` stamped the start of the first poll.
        let mut first = true;
        std::future::poll_fn(|cx| {
            if !first {
                clock.running_since.store(clock.nanos(Instant::now()), Ordering::Relaxed);
            }
            first = false;
            // What wasmtime and the host calls allocate while the guest runs belongs with
            // the instance, and leaves with it (instance_heap.rs).
            let polled = crate::instance_heap::in_instance_scope(|| call.as_mut().poll(cx));
            if polled.is_pending() {
                let ran = clock.used_until(Instant::now());
                clock.used.store(ran.as_nanos() as u64, Ordering::Relaxed);
                clock.running_since.store(u64::MAX, Ordering::Relaxed);
                paused(cx);
            }
            polled
        })
        .await
    }
}

/// A token bucket: `per_second` sustained, up to `burst` at once.
#[derive(Debug)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(per_second: f64, burst: u32) -> TokenBucket {
        TokenBucket { per_second, burst: burst as f64, tokens: burst as f64, updated: Instant::now() }
    }

    /// Takes one token if there is one, at time `now`.
    pub fn try_take_at(&mut self, now: Instant) -> bool {
        let refill = now.duration_since(self.updated).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2.0, 3);
        let start = bucket.updated;
        assert!((0..3).all(|_| bucket.try_take_at(start)));
        assert!(!bucket.try_take_at(start));
        let later = start + std::time::Duration::from_millis(500);
        assert!(bucket.try_take_at(later));
        assert!(!bucket.try_take_at(later));
    }

    #[test]
    fn running_time_is_charged_and_waiting_is_not() {
        let policy = AddonPolicy { cpu_limit: Duration::from_millis(30), ..AddonPolicy::default() };
        let mut limits = InstanceLimits::new(&policy);
        let clock = limits.clock.clone();
        let at = |ms: u64| clock.origin + Duration::from_millis(ms);
        let run = |from: u64, to: u64| {
            // One poll: the guest resumes at `from` and suspends at `to`.
            clock.running_since.store(clock.nanos(at(from)), Ordering::Relaxed);
            let ran = clock.used_until(at(to));
            clock.used.store(ran.as_nanos() as u64, Ordering::Relaxed);
            clock.running_since.store(u64::MAX, Ordering::Relaxed);
        };

        // 9 ms bursts with 11 ms waits between them, none reaching a tick while running:
        // the bursts add up whatever the phase of the ticks.
        run(0, 9);
        run(20, 29);
        clock.running_since.store(clock.nanos(at(40)), Ordering::Relaxed);
        assert!(matches!(limits.on_deadline(at(49), None), UpdateDeadline::YieldCustom(1, _)));
        assert_eq!(clock.used_until(at(49)), Duration::from_millis(27));
        // The next tick in the same burst finds it past 30 ms.
        assert!(matches!(limits.on_deadline(at(44 + 9), None), UpdateDeadline::Interrupt));
        assert_eq!(limits.hit(), Some(LimitHit::Cpu));
    }

    #[test]
    fn a_guest_that_only_waits_is_never_interrupted() {
        let policy = AddonPolicy { cpu_limit: Duration::from_millis(20), ..AddonPolicy::default() };
        let mut limits = InstanceLimits::new(&policy);
        let clock = limits.clock.clone();
        // Resumed for 1 ms in every 100, for ten seconds of waiting.
        for n in 0..100u64 {
            clock
                .running_since
                .store(clock.nanos(clock.origin + Duration::from_millis(n * 100)), Ordering::Relaxed);
            assert!(matches!(
                limits.on_deadline(clock.origin + Duration::from_millis(n * 100), None),
                UpdateDeadline::YieldCustom(1, _)
            ));
            let ran = clock.used_until(clock.origin + Duration::from_micros(n * 100_000 + 150));
            clock.used.store(ran.as_nanos() as u64, Ordering::Relaxed);
        }
        assert_eq!(limits.hit(), None);
        assert_eq!(clock.used_until(clock.origin), Duration::from_millis(15));
    }

    #[test]
    fn memory_growth_past_the_limit_is_refused_and_remembered() {
        let policy = AddonPolicy { memory_limit: 1 << 20, ..AddonPolicy::default() };
        let mut limits = InstanceLimits::new(&policy);
        assert!(limits.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(limits.hit(), None);
        assert!(!limits.memory_growing(1 << 20, 2 << 20, None).unwrap());
        assert_eq!(limits.hit(), Some(LimitHit::Memory));
    }
}
