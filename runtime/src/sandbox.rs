//! Limits enforced inside one instance's store: linear memory and guest CPU time.
//!
//! - **Memory**: the store's [`ResourceLimiter`] refuses to grow a memory past the addon's
//!   `memory_limit`. The guest sees `memory.grow` fail (Rust's allocator then aborts,
//!   which is a trap); the limiter remembers that it refused, so the host can name the
//!   failure `addon_oom` instead of a bare trap.
//! - **CPU**: the engine's epoch ticks every [`EPOCH_TICK`]. Each time a running guest
//!   reaches a tick it yields to the scheduler (so other connections on the same worker
//!   thread go on) and one tick is charged to the current callback. Past `cpu_limit` the
//!   guest is interrupted (`addon_timeout`). Time spent waiting in host calls (sending
//!   to a slow client, sleeping, waiting on I/O) is not charged: returning from a host
//!   call restarts the tick count-down, so only uninterrupted guest execution reaches a
//!   tick. The measure is coarse (one tick, 10 ms) by design: it is cheap on the hot path.

use std::time::Instant;

use wasmtime::{CallHook, ResourceLimiter, Store, UpdateDeadline};

use crate::engine::EPOCH_TICK;
use crate::host::HostState;
use crate::policy::AddonPolicy;

/// Most elements a table may grow to. Rust components use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Per-instance limit state, kept in the store's data.
pub struct InstanceLimits {
    memory_limit: usize,
    memory_refused: bool,
    cpu_ticks_allowed: u32,
    cpu_ticks_used: u32,
    cpu_exhausted: bool,
}

/// Which limit ended a callback, if one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Memory,
    Cpu,
}

impl InstanceLimits {
    pub fn new(policy: &AddonPolicy) -> InstanceLimits {
        let tick_ms = EPOCH_TICK.as_millis().max(1);
        InstanceLimits {
            memory_limit: policy.memory_limit,
            memory_refused: false,
            cpu_ticks_allowed: policy.cpu_limit.as_millis().div_ceil(tick_ms).max(1) as u32,
            cpu_ticks_used: 0,
            cpu_exhausted: false,
        }
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

/// Installs the limiter, the epoch callback and the call hook on a new store.
pub fn install(store: &mut Store<HostState>) {
    store.limiter(|state| &mut state.limits);
    store.epoch_deadline_callback(|mut ctx| {
        let limits = &mut ctx.data_mut().limits;
        limits.cpu_ticks_used += 1;
        if limits.cpu_ticks_used > limits.cpu_ticks_allowed {
            limits.cpu_exhausted = true;
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.call_hook(|mut ctx, hook| {
        if let CallHook::ReturningFromHost = hook {
            // The guest was waiting, not running: restart the count-down to the next tick.
            ctx.set_epoch_deadline(1);
        }
        Ok(())
    });
}

/// Resets the per-callback budget; call before entering the guest.
pub fn start_callback(store: &mut Store<HostState>) {
    let limits = &mut store.data_mut().limits;
    limits.cpu_ticks_used = 0;
    limits.memory_refused = false;
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
    fn memory_growth_past_the_limit_is_refused_and_remembered() {
        let policy = AddonPolicy { memory_limit: 1 << 20, ..AddonPolicy::default() };
        let mut limits = InstanceLimits::new(&policy);
        assert!(limits.memory_growing(0, 1 << 20, None).unwrap());
        assert_eq!(limits.hit(), None);
        assert!(!limits.memory_growing(1 << 20, 2 << 20, None).unwrap());
        assert_eq!(limits.hit(), Some(LimitHit::Memory));
    }
}
