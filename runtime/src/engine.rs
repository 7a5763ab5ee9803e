//! The one wasmtime [`Engine`] every addon is compiled for and instantiated in, and the
//! thread that advances its epoch.
//!
//! Settings and why:
//! - **Pooling allocator**: memories, tables and fiber stacks come from slots reserved at
//!   start-up, so a new connection's instance costs about a microsecond and no `mmap`.
//!   The pool has one slot per live instance (`limits.max_live_instances`), sized by a
//!   [`Plan`] (see [`crate::capacity`] for what it reserves and maps, checked against the
//!   machine before the engine is built).
//! - **Linear memory**: each slot reserves `limits.memory_reservation` (by default twice
//!   the largest addon `memory_limit`, 64 MiB to 4 GiB) plus a 64 KiB guard, instead of
//!   wasmtime's 4 GiB + 32 MiB guard. Below 4 GiB compiled code checks each access's
//!   bounds explicitly (wasmtime decides where: accesses whose offset the guard covers
//!   need no check); this is what lets 50,000 slots fit in the address space where
//!   30,000 did not. Memory mappings are the next limit (2 per slot, about 4 per live
//!   instance, against `vm.max_map_count`): see [`crate::capacity`].
//! - **Async stacks**: one per live instance, `limits.async_stack_bytes` (default 2 MiB),
//!   of which guest code may use 512 KiB (`max_wasm_stack`); the rest is for host calls.
//!   A stack is reset when its instance goes (`async_stack_zeroing`), which gives its
//!   pages back to the system.
//! - **Async**: host calls such as `session.send-*` await the socket without blocking a
//!   worker thread; guest code runs on a fiber.
//! - **Epoch interruption**: a ticker bumps the epoch every [`EPOCH_TICK`]; a guest that
//!   is still running at a tick yields to the scheduler, so a looping addon cannot
//!   monopolise a worker thread and starve other connections; the CPU accounting in
//!   [`crate::sandbox`] compares the guest's running time with its limit at each tick.

use std::thread;
use std::time::Duration;

use anyhow::Context;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::capacity::{MEMORY_GUARD_BYTES, Plan, TABLE_ELEMENTS};

/// How often the epoch advances: the longest a guest runs before yielding.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Core instances and tables per component that the pool is sized for. A Rust
/// `wasm32-wasip2` component uses one memory, two tables and about four core instances;
/// the headroom covers other toolchains.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
const TABLES_PER_COMPONENT: u32 = 4;
/// The pool holds one linear memory per live instance: a second would double the
/// reservation. Components with several memories still load; they just use more than
/// one slot.
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// What guest code may use of its async stack (wasmtime's default).
const MAX_WASM_STACK: usize = 512 << 10;

/// Builds the engine shared by all addons and starts its epoch ticker.
pub fn build(plan: &Plan) -> anyhow::Result<Engine> {
    let slots = u32::try_from(plan.slots).unwrap_or(u32::MAX);
    let reservation = plan.memory_reservation;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(slots)
        .total_tables(slots.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(slots)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT * 4)
        .table_elements(TABLE_ELEMENTS as usize)
        .max_memory_size(usize::try_from(reservation).unwrap_or(usize::MAX));

    let mut config = Config::new();
    config
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .epoch_interruption(true)
        .wasm_component_model(true)
        .memory_reservation(reservation)
        .memory_guard_size(MEMORY_GUARD_BYTES)
        // Pooled memories never move, so there is nothing to grow into.
        .memory_reservation_for_growth(0)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(usize::try_from(plan.stack_bytes).unwrap_or(usize::MAX))
        // A freed stack is reset (madvise), so its pages leave the resident set: without
        // it every slot an instance ever ran in keeps its touched stack pages, and idle or
        // hibernated connections cost the high-water mark. It also means no guest can read
        // what another left on a reused stack.
        .async_stack_zeroing(true);

    let engine = Engine::new(&config).map_err(anyhow::Error::from).with_context(|| {
        format!(
            "cannot create the wasm engine for {slots} live instances (limits.max_live_instances); \
             `sockhost check` shows what it needs against what this machine allows"
        )
    })?;
    start_epoch_ticker(&engine);
    Ok(engine)
}

/// Advances the epoch every [`EPOCH_TICK`] on a plain thread, so ticks keep coming even
/// when every runtime worker is busy. The thread ends when the engine is dropped.
fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    thread::Builder::new()
        .name("sockhost-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}
