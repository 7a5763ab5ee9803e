//! Limits enforced inside one instance's store: linear memory and guest CPU time.
//!
//! - **Memory**: the store's [`ResourceLimiter`] refuses to grow a memory past the addon's
//!   `memory_limit`. The guest sees `memory.grow` fail (Rust's allocator then aborts,
//!   which is a trap); the limiter remembers that it refused, so the host can name the
//!   failure `addon_oom` instead of a bare trap.
//! - **CPU**: the engine's epoch ticks every [`EPOCH_TICK`]. Each time a running guest
//!   reaches a tick it yields to the scheduler (so other connections on the same worker
//!   thread go on), and the tick is charged to the current callback if the guest ran
//!   through all of it. Past `cpu_limit` the guest is interrupted (`addon_timeout`).
//!   Time spent waiting in host calls (sending to a slow client, sleeping, waiting on
//!   I/O) or waiting for the scheduler after a yield is not charged: the deadline is one
//!   tick past the tick at which the guest last (re)started, so reaching it later than
//!   that tick means the guest was not running for part of the interval. Nothing of this
//!   runs per message or per host call; it costs a little once per tick of guest
//!   execution. The measure is coarse (10 ms) by design; a guest that alternates short
//!   bursts of work with short waits inside one tick can be charged up to the whole tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use wasmtime::component::ResourceTableError;
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi_http::FieldMapError;

use crate::engine::{EPOCH_TICK, EpochCounter};
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
    cpu_ticks_allowed: u32,
    cpu_ticks_used: u32,
    cpu_exhausted: bool,
    epoch: EpochCounter,
    /// The tick at which the guest reaches its deadline if it runs without a pause.
    /// Shared with the future that resumes a yielded guest, which moves it.
    deadline_tick: Arc<AtomicU64>,
}

/// Which limit ended a callback, if one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Memory,
    Cpu,
}

impl InstanceLimits {
    pub fn new(policy: &AddonPolicy, epoch: EpochCounter) -> InstanceLimits {
        let tick_ms = EPOCH_TICK.as_millis().max(1);
        InstanceLimits {
            memory_limit: policy.memory_limit,
            memory_refused: false,
            cpu_ticks_allowed: policy.cpu_limit.as_millis().div_ceil(tick_ms).max(1) as u32,
            cpu_ticks_used: 0,
            cpu_exhausted: false,
            deadline_tick: Arc::new(AtomicU64::new(epoch.now() + 1)),
            epoch,
        }
    }

    /// Called when the guest reaches its epoch deadline: charges the tick if the guest
    /// ran through it, and says what to do next.
    fn on_deadline(&mut self) -> UpdateDeadline {
        let now = self.epoch.now();
        if now > self.deadline_tick.load(Ordering::Acquire) {
            // The guest was paused (in a host call, or queued after a yield) for part of
            // the interval: nothing to charge, and it has just had a pause, so go on.
            self.deadline_tick.store(now + 1, Ordering::Release);
            return UpdateDeadline::Continue(1);
        }
        self.cpu_ticks_used += 1;
        if self.cpu_ticks_used > self.cpu_ticks_allowed {
            self.cpu_exhausted = true;
            return UpdateDeadline::Interrupt;
        }
        let deadline_tick = self.deadline_tick.clone();
        let epoch = self.epoch.clone();
        UpdateDeadline::YieldCustom(
            1,
            Box::pin(async move {
                tokio::task::yield_now().await;
                // wasmtime sets the new deadline one tick past the epoch it resumes at.
                deadline_tick.store(epoch.now() + 1, Ordering::Release);
            }),
        )
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
    store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().limits.on_deadline()));
}

/// Resets the per-callback budget; call before entering the guest.
pub fn start_callback(store: &mut Store<HostState>) {
    let limits = &mut store.data_mut().limits;
    limits.cpu_ticks_used = 0;
    limits.memory_refused = false;
    limits.deadline_tick.store(limits.epoch.now() + 1, Ordering::Release);
    store.set_epoch_deadline(1);
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
    fn only_ticks_the_guest_ran_through_are_charged() {
        let policy =
            AddonPolicy { cpu_limit: std::time::Duration::from_millis(20), ..AddonPolicy::default() };
        let epoch = EpochCounter::default();
        let mut limits = InstanceLimits::new(&policy, epoch.clone());
        let tick = |epoch: &EpochCounter| epoch.0.fetch_add(1, Ordering::AcqRel);

        // Deadline at tick 1; the guest reaches it running: charged.
        tick(&epoch);
        assert!(matches!(limits.on_deadline(), UpdateDeadline::YieldCustom(1, _)));
        assert_eq!(limits.cpu_ticks_used, 1);
        // It resumed at tick 1 (deadline 2), then waited in the host until tick 5.
        limits.deadline_tick.store(2, Ordering::Release);
        for _ in 0..4 {
            tick(&epoch);
        }
        assert!(matches!(limits.on_deadline(), UpdateDeadline::Continue(1)));
        assert_eq!(limits.cpu_ticks_used, 1, "waiting is not charged");
        // Then it runs through ticks 6 and 7: charged, and the third one is over 20 ms.
        tick(&epoch);
        assert!(matches!(limits.on_deadline(), UpdateDeadline::YieldCustom(1, _)));
        limits.deadline_tick.store(7, Ordering::Release);
        tick(&epoch);
        assert!(matches!(limits.on_deadline(), UpdateDeadline::Interrupt));
        assert_eq!(limits.hit(), Some(LimitHit::Cpu));
    }

    #[test]
    fn memory_growth_past_the_limit_is_refused_and_remembered() {
        let policy = AddonPolicy { memory_limit: 1 << 20, ..AddonPolicy::default() };
        let mut limits = InstanceLimits::new(&policy, EpochCounter::default());
        assert!(limits.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(limits.hit(), None);
        assert!(!limits.memory_growing(1 << 20, 2 << 20, None).unwrap());
        assert_eq!(limits.hit(), Some(LimitHit::Memory));
    }
}
