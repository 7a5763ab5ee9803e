//! Host capabilities: what an addon instance can reach outside its sandbox.
//!
//! Each capability lives in one module that owns its part of the WIT world, its
//! per-instance state and its limits:
//!
//! | module      | WIT import                | per-instance state     |
//! |-------------|---------------------------|------------------------|
//! | [`session`] | `sockhost:addon/session`  | [`session::Session`]   |
//! | [`log`]     | `sockhost:addon/log`, guest stdout/stderr | [`log::LogContext`] |
//! | WASI        | `wasi:*@0.2` (p2)         | `WasiCtx` + table      |
//!
//! [`HostState`] is the store's data: one field per capability, as in wasmtime's own
//! hosts. [`linker`] adds every capability to one linker, once per engine.
//!
//! WASI is granted with nothing in it (deny by default): no preopened directories, no
//! environment variables or arguments, an empty stdin, and every socket address refused.
//! Clocks and randomness work, since Rust's standard library relies on them.

pub mod log;
pub mod session;

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{Addon, ConnectionInfo};
use crate::engine::EpochCounter;
use crate::policy::AddonPolicy;
use crate::sandbox::InstanceLimits;

/// The data of one addon instance's store: everything host calls may touch.
pub struct HostState {
    pub(crate) session: session::Session,
    pub(crate) log: log::LogContext,
    pub(crate) limits: InstanceLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

impl HostState {
    /// State for a new connection's instance. The socket is attached after the upgrade,
    /// with [`session::Session::attach`].
    pub(crate) fn new(info: ConnectionInfo, policy: &AddonPolicy, epoch: EpochCounter) -> HostState {
        let log = log::LogContext::new(&info.addon, info.id);
        let wasi = WasiCtx::builder()
            .stdout(log.guest_stdout())
            .stderr(log.guest_stderr())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            session: session::Session::new(info, policy.send_timeout),
            log,
            limits: InstanceLimits::new(policy, epoch),
            wasi,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// The linker every addon is instantiated with: the `addon` world's imports plus WASI p2.
/// A component that imports anything else fails to link, and the loader reports which
/// import is missing.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    Addon::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)?;
    Ok(linker)
}

impl crate::bindings::sockhost::addon::types::Host for HostState {}
