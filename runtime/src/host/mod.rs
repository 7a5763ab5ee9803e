//! Host capabilities: what an addon instance can reach outside its sandbox.
//!
//! Each capability lives in one module that owns its part of the WIT world, its
//! per-instance state and its limits:
//!
//! | module      | WIT import                | per-instance state     |
//! |-------------|---------------------------|------------------------|
//! | [`session`] | `sockhost:addon/session`  | [`session::Session`]   |
//! | [`log`]     | `sockhost:addon/log`, guest stdout/stderr | [`log::LogContext`] |
//! | [`kv`]      | `sockhost:addon/kv`       | [`kv::KvAccess`]: the server's store if granted |
//! | [`config`]  | `sockhost:addon/config`   | the addon's [`config::AddonConfig`] |
//! | [`auth`]    | `sockhost:addon/auth`     | the addon's [`auth::JwtVerifier`], if any |
//! | [`channels`]| `sockhost:addon/channels` | [`channels::ChannelAccess`]: grants, subscriptions, the inbox |
//! | [`outbound`]| `wasi:http/outgoing-handler` | `WasiHttpCtx` + [`outbound::OutboundHooks`] |
//! | WASI        | `wasi:*@0.2` (p2)         | `WasiCtx` + table      |
//!
//! [`HostState`] is the store's data: one field per capability, as in wasmtime's own
//! hosts. [`linker`] adds every capability to one linker, once per engine.
//!
//! WASI is granted with nothing in it (deny by default): no preopened directories, no
//! environment variables or arguments, an empty stdin, and every socket address refused.
//! Clocks and randomness work, since Rust's standard library relies on them. The other
//! capabilities are granted per addon by its manifest (see [`crate::policy`]); what
//! every instance holds of them is a few shared pointers, so an idle connection stays
//! small.

pub mod auth;
pub mod channels;
pub mod config;
pub mod kv;
pub mod kv_redis;
pub mod log;
pub mod outbound;
pub mod session;

use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::bindings::ConnectionInfo;
use crate::bindings::sockhost::addon as iface;
use crate::policy::AddonPolicy;
use crate::sandbox::InstanceLimits;

/// The data of one addon instance's store: everything host calls may touch.
pub struct HostState {
    pub(crate) session: session::Session,
    pub(crate) log: log::LogContext,
    pub(crate) limits: InstanceLimits,
    kv: kv::KvAccess,
    config: config::ConfigHandle,
    auth: Option<Arc<auth::JwtVerifier>>,
    pub(crate) channels: channels::ChannelAccess,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    outbound: outbound::OutboundHooks,
    table: ResourceTable,
}

/// What the server shares with every instance it creates.
#[derive(Clone)]
pub struct HostServices {
    /// The kv store, handed to instances whose manifest grants `kv`.
    pub kv: Arc<kv::KvStore>,
    /// The channel bus; what an instance may do on it is its manifest's `[channels]`.
    pub channels: Arc<crate::channels::Channels>,
}

impl HostState {
    /// State for a new connection's instance. The socket is attached after the upgrade,
    /// with [`session::Session::attach`].
    pub(crate) fn new(info: ConnectionInfo, policy: &AddonPolicy, services: &HostServices) -> HostState {
        let addon: Arc<str> = Arc::from(info.addon.as_str());
        let conn = info.id;
        let log = log::LogContext::new(addon.clone(), conn);
        let outbound = outbound::OutboundHooks {
            policy: policy.outbound.clone(),
            addon: addon.clone(),
            conn: info.id,
            open: Arc::default(),
        };
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
            limits: InstanceLimits::new(policy),
            kv: kv::KvAccess {
                store: policy.kv.then(|| services.kv.clone()),
                namespace: addon.clone(),
                quota: policy.kv_quota,
            },
            config: policy.config.clone(),
            auth: policy.auth.clone(),
            channels: channels::ChannelAccess::new(
                services.channels.clone(),
                addon.clone(),
                conn,
                policy.channels.clone(),
            ),
            wasi,
            http: WasiHttpCtx::new(),
            outbound,
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// The linker every addon is instantiated with: the `addon` world's imports plus WASI p2.
/// A component that imports anything else fails to link, and the loader reports which
/// import is missing.
pub fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    fn this(state: &mut HostState) -> &mut HostState {
        state
    }
    iface::types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::session::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::log::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::kv::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::config::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::auth::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::channels::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    Ok(linker)
}

impl iface::types::Host for HostState {}
