//! What the instance pool reserves and maps, and whether this machine allows it.
//!
//! The pooling allocator takes everything up front: for each of `limits.max_live_instances`
//! slots, a linear-memory reservation (`limits.memory_reservation`) and its guard, an
//! async stack (`limits.async_stack_bytes`) and its guard page, and table space; and the
//! kernel counts the pieces as memory mappings. Each live instance then maps a few more
//! (its memory's accessible part, the copy-on-write image of its data). When any of this
//! does not fit, the server used to fail late and misleadingly: `mmap failed` at
//! start-up, or `Cannot allocate memory` (as if the addon had trapped) at the 6,363rd
//! connection. [`Plan::assess`] does the arithmetic before the engine exists and names
//! the setting to lower or the sysctl to raise, and to what; `sockhost check` prints the
//! same lines.
//!
//! The mapping counts are measured: the end-to-end test `pool_mappings_per_slot_and_instance`
//! reads `/proc/<pid>/maps` of a real server before and after opening connections.

use std::path::Path;

use crate::config::ServerLimits;
use crate::policy::{AddonPolicy, format_size};

/// The guard after each linear memory. Small, so a slot costs its reservation and little
/// more; accesses past the reservation are caught by explicit bounds checks, which
/// wasmtime emits whenever the reservation plus guard cannot cover every 32-bit address.
pub const MEMORY_GUARD_BYTES: u64 = 64 << 10;
/// Elements each pooled table may hold (wasmtime's default), 8 bytes each.
pub const TABLE_ELEMENTS: u64 = 20_000;
/// Tables per slot the pool is sized for (see [`crate::engine`]).
pub const TABLES_PER_SLOT: u64 = 4;
/// Mappings the pool makes per slot at start-up: each async stack and its guard page.
pub const MAPS_PER_SLOT: u64 = 2;
/// Mappings one live instance adds: its memory's accessible part split out of the
/// reservation, and its copy-on-write data image.
pub const MAPS_PER_INSTANCE: u64 = 4;
/// Mappings kept for the rest of the process: libraries, thread stacks, compiled addons.
pub const MAPS_FOR_THE_PROCESS: u64 = 2_000;
/// File descriptors kept for the process beside its sockets: listeners, kv, the cache,
/// addon files, Redis, outbound requests.
pub const FILES_FOR_THE_PROCESS: u64 = 256;
/// Virtual address space for user space on x86-64 and aarch64 with 4-level page tables.
pub const USER_ADDRESS_SPACE: u64 = 1 << 47;
/// Share of the address space the pool may take; the rest is for the heap, code, stacks.
const POOL_SHARE_OF_ADDRESS_SPACE: u64 = 2; // one half
/// The derived `memory_reservation`'s floor and ceiling.
const MIN_DERIVED_RESERVATION: u64 = 64 << 20;
const MAX_RESERVATION: u64 = 4 << 30;
const PAGE: u64 = 4096;

/// The pool a configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// `limits.max_live_instances`.
    pub slots: u64,
    /// `limits.max_connections`.
    pub connections: u64,
    /// Linear-memory reservation per slot, in bytes (explicit or derived).
    pub memory_reservation: u64,
    /// Whether `memory_reservation` was derived from the addons.
    pub derived: bool,
    /// `limits.async_stack_bytes`.
    pub stack_bytes: u64,
}

/// What the machine allows, read from `/proc` and `getrlimit`; `None` where unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Machine {
    /// `vm.overcommit_memory`: 0 heuristic, 1 always, 2 strict.
    pub overcommit_memory: Option<u8>,
    /// `CommitLimit` minus `Committed_AS` from `/proc/meminfo`, for mode 2.
    pub commit_available: Option<u64>,
    /// `vm.max_map_count`.
    pub max_map_count: Option<u64>,
    /// `RLIMIT_AS`; `None` when unlimited.
    pub address_space_limit: Option<u64>,
    /// `RLIMIT_NOFILE`'s hard limit (the server raises its soft limit to it).
    pub open_files: Option<u64>,
}

/// The arithmetic, what cannot fit, and what merely deserves a warning.
#[derive(Debug, Default)]
pub struct Assessment {
    /// One line per resource: what the configuration needs against what is allowed.
    pub lines: Vec<String>,
    /// Each a reason start-up is refused, naming what to change.
    pub problems: Vec<String>,
    /// Limits that cap the server below its settings without breaking it.
    pub warnings: Vec<String>,
}

impl Machine {
    /// Reads this machine's limits.
    pub fn read() -> Machine {
        let proc_number =
            |path: &str| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let meminfo_kib = |key: &str| -> Option<u64> {
            let line = meminfo.lines().find(|line| line.starts_with(key))?;
            line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib * 1024)
        };
        let commit_available = match (meminfo_kib("CommitLimit:"), meminfo_kib("Committed_AS:")) {
            (Some(limit), Some(committed)) => Some(limit.saturating_sub(committed)),
            _ => None,
        };
        Machine {
            overcommit_memory: proc_number("/proc/sys/vm/overcommit_memory")
                .and_then(|n| u8::try_from(n).ok()),
            commit_available,
            max_map_count: proc_number("/proc/sys/vm/max_map_count"),
            address_space_limit: rlimit(RLimit::AddressSpace).and_then(|(soft, _)| soft),
            open_files: rlimit(RLimit::OpenFiles).and_then(|(_, hard)| hard),
        }
    }
}

enum RLimit {
    AddressSpace,
    OpenFiles,
}

/// `(soft, hard)`, each `None` when unlimited.
fn rlimit(which: RLimit) -> Option<(Option<u64>, Option<u64>)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    let resource = match which {
        RLimit::AddressSpace => libc::RLIMIT_AS,
        RLimit::OpenFiles => libc::RLIMIT_NOFILE,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return None;
    }
    let finite = |value: libc::rlim_t| (value != libc::RLIM_INFINITY).then_some(value);
    Some((finite(limit.rlim_cur), finite(limit.rlim_max)))
}

/// The reservation derived from the addons in `dir` when `limits.memory_reservation` is
/// not set: twice the largest `memory_limit` (headroom for a reload that raises it), at
/// least 64 MiB, at most 4 GiB. Unreadable manifests count as the default limit: the
/// loader reports them. Only regular files are read here: a manifest that is a pipe is
/// the loader's to read, once.
pub fn derive_reservation<'a>(wasm_files: impl IntoIterator<Item = &'a Path>) -> u64 {
    let largest = wasm_files
        .into_iter()
        .filter(|path| path.with_extension("toml").metadata().is_ok_and(|meta| meta.is_file()))
        .map(|path| AddonPolicy::for_addon(path).map(|p| p.memory_limit as u64).unwrap_or_default())
        .max()
        .unwrap_or(0)
        .max(AddonPolicy::default().memory_limit as u64);
    largest.saturating_mul(2).clamp(MIN_DERIVED_RESERVATION, MAX_RESERVATION).next_multiple_of(64 << 10)
}

impl Plan {
    /// The pool for `limits`, with the reservation set there or derived from `addons`.
    pub fn new<'a>(limits: &ServerLimits, addons: impl IntoIterator<Item = &'a Path>) -> Plan {
        let (memory_reservation, derived) = match limits.memory_reservation {
            Some(bytes) => (bytes, false),
            None => (derive_reservation(addons), true),
        };
        Plan {
            // More slots than sockets could never be used.
            slots: limits.max_live_instances.min(limits.max_connections).into(),
            connections: limits.max_connections.into(),
            memory_reservation,
            derived,
            stack_bytes: limits.async_stack_bytes as u64,
        }
    }

    /// Address space one slot takes: memory and guard, stack and guard page, tables.
    pub fn bytes_per_slot(&self) -> u64 {
        self.memory_reservation
            + MEMORY_GUARD_BYTES
            + self.stack_bytes.next_multiple_of(PAGE)
            + PAGE
            + TABLES_PER_SLOT * (TABLE_ELEMENTS * 8).next_multiple_of(PAGE)
    }

    /// Address space the pool reserves at start-up.
    pub fn reserved_bytes(&self) -> u64 {
        self.slots.saturating_mul(self.bytes_per_slot())
    }

    /// Bytes the pool maps writable at start-up (stacks and tables): what strict
    /// overcommit (`vm.overcommit_memory = 2`) charges even before use.
    pub fn writable_bytes(&self) -> u64 {
        self.slots.saturating_mul(
            self.stack_bytes.next_multiple_of(PAGE)
                + TABLES_PER_SLOT * (TABLE_ELEMENTS * 8).next_multiple_of(PAGE),
        )
    }

    /// Memory mappings with every slot live.
    pub fn mappings(&self) -> u64 {
        self.slots * (MAPS_PER_SLOT + MAPS_PER_INSTANCE) + MAPS_FOR_THE_PROCESS
    }

    /// File descriptors with every connection open.
    pub fn open_files(&self) -> u64 {
        self.connections + FILES_FOR_THE_PROCESS
    }

    /// Compares the plan with `machine`; see [`Assessment`].
    pub fn assess(&self, machine: &Machine) -> Assessment {
        let mut out = Assessment::default();
        let reservation = if self.derived {
            format!(
                "{} (limits.memory_reservation, derived: twice the largest memory_limit, 64MiB to 4GiB)",
                format_size(self.memory_reservation)
            )
        } else {
            format!("{} (limits.memory_reservation)", format_size(self.memory_reservation))
        };
        out.lines.push(format!(
            "pool: {} slots (limits.max_live_instances) for {} connections (limits.max_connections); per slot \
             {reservation} + {} guard of linear memory, a {} async stack (limits.async_stack_bytes) + 4KiB guard, \
             {} of tables",
            self.slots,
            self.connections,
            format_size(MEMORY_GUARD_BYTES),
            format_size(self.stack_bytes),
            gib(TABLES_PER_SLOT * (TABLE_ELEMENTS * 8).next_multiple_of(PAGE)),
        ));

        // Address space.
        let user_space = USER_ADDRESS_SPACE;
        let (limit, limit_name) = match machine.address_space_limit {
            Some(rlimit) if rlimit < user_space => (rlimit, format!("RLIMIT_AS ({})", gib(rlimit))),
            _ => (user_space, "the 47-bit user address space (128TiB)".to_owned()),
        };
        let budget = limit / POOL_SHARE_OF_ADDRESS_SPACE;
        let reserved = self.reserved_bytes();
        out.lines.push(format!(
            "address space: {} slots × {} = {} reserved; allowed {} (half of {limit_name})",
            self.slots,
            gib(self.bytes_per_slot()),
            gib(reserved),
            gib(budget)
        ));
        if reserved > budget {
            let fit = budget / self.bytes_per_slot();
            let fit_reservation = (budget / self.slots.max(1))
                .saturating_sub(self.bytes_per_slot() - self.memory_reservation)
                / (1 << 20)
                * (1 << 20);
            let raise = if machine.address_space_limit.is_some_and(|rlimit| rlimit < user_space) {
                ", or raise RLIMIT_AS (ulimit -v)"
            } else {
                ""
            };
            out.problems.push(format!(
                "the pool needs {} of address space and {} is allowed: lower limits.max_live_instances to {fit} or \
                 less, or limits.memory_reservation to {} or less{raise}",
                gib(reserved),
                gib(budget),
                format_size(fit_reservation.max(1 << 20)),
            ));
        }

        // Commit (strict overcommit only).
        match machine.overcommit_memory {
            Some(2) => {
                let writable = self.writable_bytes();
                let available = machine.commit_available;
                out.lines.push(format!(
                    "commit: vm.overcommit_memory = 2 (strict): stacks and tables charge {} at start-up, and each \
                     live instance its memory; available {}",
                    gib(writable),
                    available.map_or("unknown".to_owned(), gib)
                ));
                if let Some(available) = available
                    && writable > available
                {
                    let per_slot = writable / self.slots.max(1);
                    out.problems.push(format!(
                        "with vm.overcommit_memory = 2 the pool's stacks and tables charge {} and {} can be committed: \
                         lower limits.max_live_instances to {} or less or limits.async_stack_bytes, or set \
                         vm.overcommit_memory = 0 (sysctl -w vm.overcommit_memory=0)",
                        gib(writable),
                        gib(available),
                        available / per_slot.max(1)
                    ));
                }
            }
            Some(mode) => out.lines.push(format!(
                "commit: vm.overcommit_memory = {mode} ({}): reservations are not charged; live instances use \
                 what they touch",
                if mode == 1 { "always" } else { "heuristic" }
            )),
            None => out.lines.push("commit: vm.overcommit_memory unknown".to_owned()),
        }

        // Memory mappings.
        let mappings = self.mappings();
        out.lines.push(format!(
            "memory mappings: {} slots × ({MAPS_PER_SLOT} per slot + {MAPS_PER_INSTANCE} per live instance) + \
             {MAPS_FOR_THE_PROCESS} for the process = {mappings}; vm.max_map_count {}",
            self.slots,
            machine.max_map_count.map_or("unknown".to_owned(), |n| n.to_string())
        ));
        if let Some(max) = machine.max_map_count
            && mappings > max
        {
            let fit = max.saturating_sub(MAPS_FOR_THE_PROCESS) / (MAPS_PER_SLOT + MAPS_PER_INSTANCE);
            out.problems.push(format!(
                "{} live instances need {mappings} memory mappings and vm.max_map_count is {max}: raise it to at \
                 least {mappings} (sysctl -w vm.max_map_count={mappings}; keep it in /etc/sysctl.d/), or lower \
                 limits.max_live_instances to {fit} or less",
                self.slots
            ));
        }

        // Open files: a warning, as nothing is reserved for them and accept() backs off.
        let files = self.open_files();
        out.lines.push(format!(
            "open files: {} connections (limits.max_connections) + {FILES_FOR_THE_PROCESS} for the process = {files}; \
             RLIMIT_NOFILE {}",
            self.connections,
            machine.open_files.map_or("unlimited".to_owned(), |n| n.to_string())
        ));
        if let Some(max) = machine.open_files
            && files > max
        {
            out.warnings.push(format!(
                "limits.max_connections is {} but RLIMIT_NOFILE allows {max} open files, so about {} connections \
                 can be open (more are refused at accept): raise the limit to at least {files} (LimitNOFILE= in \
                 the systemd unit, or ulimit -n), or lower limits.max_connections to {}",
                self.connections,
                max.saturating_sub(FILES_FOR_THE_PROCESS),
                max.saturating_sub(FILES_FOR_THE_PROCESS)
            ));
        }
        out
    }
}

/// A byte count for people: GiB or TiB with a decimal, or KiB/MiB when small.
fn gib(bytes: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if bytes >= 1 << 40 {
        format!("{:.1}TiB", bytes as f64 / GIB / 1024.0)
    } else if bytes >= 1 << 30 {
        format!("{:.1}GiB", bytes as f64 / GIB)
    } else if bytes >= 1 << 20 {
        format!("{:.1}MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{}KiB", bytes.div_ceil(1024))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(slots: u64, connections: u64) -> Plan {
        Plan { slots, connections, memory_reservation: 64 << 20, derived: true, stack_bytes: 2 << 20 }
    }

    const DEFAULTS: Machine = Machine {
        overcommit_memory: Some(0),
        commit_available: Some(20 << 30),
        max_map_count: Some(65_530),
        address_space_limit: None,
        open_files: Some(20_000),
    };

    #[test]
    fn todays_default_fits_and_the_4gib_pool_did_not() {
        let fits = plan(10_000, 10_000).assess(&DEFAULTS);
        assert!(fits.problems.is_empty(), "{:?}", fits.problems);
        let old = Plan { memory_reservation: 4 << 30, derived: false, ..plan(30_000, 30_000) };
        let refused = old.assess(&Machine { max_map_count: Some(1 << 30), ..DEFAULTS });
        assert_eq!(refused.problems.len(), 1, "{:?}", refused.problems);
        assert!(
            refused.problems[0].contains(
                "limits.max_live_instances to 16373 or less, or limits.memory_reservation to 2234MiB"
            ),
            "{}",
            refused.problems[0]
        );
    }

    #[test]
    fn too_many_mappings_name_the_sysctl_and_the_setting() {
        let out = plan(50_000, 200_000).assess(&DEFAULTS);
        let problem = out.problems.join("\n");
        assert!(problem.contains("sysctl -w vm.max_map_count=302000"), "{problem}");
        assert!(problem.contains("limits.max_live_instances to 10588 or less"), "{problem}");
        assert!(out.warnings.join("\n").contains("RLIMIT_NOFILE allows 20000"), "{:?}", out.warnings);
    }

    #[test]
    fn strict_overcommit_counts_the_stacks() {
        let strict = Machine { overcommit_memory: Some(2), commit_available: Some(8 << 30), ..DEFAULTS };
        let out = plan(10_000, 10_000).assess(&strict);
        assert!(out.problems.join("\n").contains("vm.overcommit_memory=0"), "{:?}", out.problems);
    }

    #[test]
    fn the_derived_reservation_doubles_the_largest_limit_within_bounds() {
        assert_eq!(derive_reservation([]), 64 << 20);
    }
}
