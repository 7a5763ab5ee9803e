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
//! hosts. [`linker`] builds the engine's two linkers once: one with `wasi:http` for
//! addons whose manifest grants outbound hosts, one without it for the others (see
//! [`HostLinkers`]).
//!
//! Host-side memory of an instance (what lives outside its linear memory, see
//! [`HOST_BYTES_PER_RESOURCE`]): every WASI and `wasi:http` resource an instance holds
//! (a `fields`, a request, a body, a stream, a pollable) is an entry in its
//! `ResourceTable`, which holds at most `max_host_resources` entries; a guest that asks
//! for one more traps, and the failure is counted as `addon_oom`. What one entry can hold
//! is bounded too: a `fields` at most [`FIELD_SIZE_LIMIT`] (wasmtime-wasi-http's own
//! accounting of names and values), an outgoing body at most two chunks of
//! [`OUTGOING_BODY_CHUNK`] waiting to be sent. The manifest refuses a
//! `max_host_resources` whose worst case, at [`HOST_BYTES_PER_RESOURCE`] each, is over
//! `memory_limit` (or 2 MiB when `memory_limit` is smaller), so an instance's linear
//! memory and host-side buffers together stay within about twice its `memory_limit`.
//! Not counted: the responses of granted requests (bounded by `outbound_max_requests`
//! and hyper's limits on a response head), and the wasmtime bookkeeping of the instance
//! itself (its pool slot).
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
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable, ResourceType};
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

/// A hibernated connection's host-side state: [`HostState`] without what belongs to
/// the instance. The session (socket, counters), channel subscriptions and limits stay.
pub(crate) struct ParkedHost {
    pub(crate) session: session::Session,
    log: log::LogContext,
    limits: InstanceLimits,
    kv: kv::KvAccess,
    config: config::ConfigHandle,
    auth: Option<Arc<auth::JwtVerifier>>,
    channels: channels::ChannelAccess,
    outbound: outbound::OutboundHooks,
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
        let parked = ParkedHost {
            session: session::Session::new(info, policy.send_timeout),
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
            outbound,
            log,
        };
        HostState::unpark(parked, policy)
    }

    /// What outlives the instance when its connection hibernates: everything but WASI's
    /// context, wasi:http's and the resource table, which belong to the instance (their
    /// handles mean nothing to a new one).
    pub(crate) fn park(self) -> ParkedHost {
        let HostState { session, log, limits, kv, config, auth, channels, outbound, .. } = self;
        ParkedHost { session, log, limits, kv, config, auth, channels, outbound }
    }

    /// State for a fresh instance of a hibernated connection (or a new one): what was
    /// parked, with a new WASI context and an empty resource table.
    pub(crate) fn unpark(parked: ParkedHost, policy: &AddonPolicy) -> HostState {
        let ParkedHost { session, log, limits, kv, config, auth, channels, outbound } = parked;
        // These go with the instance, so they are allocated with it (instance_heap.rs).
        let (wasi, http, table) = crate::instance_heap::in_instance_scope(|| {
            let wasi = WasiCtx::builder()
                .stdout(log.guest_stdout())
                .stderr(log.guest_stderr())
                .allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false)
                .build();
            let mut table = ResourceTable::new();
            table.set_max_capacity(policy.max_host_resources);
            let mut http = WasiHttpCtx::new();
            http.set_field_size_limit(FIELD_SIZE_LIMIT);
            (wasi, http, table)
        });
        HostState { session, log, limits, kv, config, auth, channels, wasi, http, outbound, table }
    }

    /// Whether the instance holds `max_host_resources` resources: one more fails.
    pub(crate) fn host_resources_full(&mut self) -> bool {
        let max = self.table.max_capacity();
        self.table.iter_mut().take(max).count() >= max
    }
}

/// Largest `fields` (a header or trailer set) an instance may build, in
/// wasmtime-wasi-http's accounting: each name's and value's bytes plus the size of its
/// in-memory representation (about 70 bytes per header). 16 KiB holds request heads far
/// larger than proxies accept (nginx: 8 KiB); wasmtime's default is 128 KiB.
pub const FIELD_SIZE_LIMIT: usize = 16 << 10;

/// What one `check-write` of an outgoing request body may grant. The host buffers at
/// most two chunks per body that the upstream has not taken yet (wasmtime's default is
/// 1 MiB a chunk).
pub const OUTGOING_BODY_CHUNK: usize = 8 << 10;

/// What the manifest reckons one host resource may hold outside linear memory at worst:
/// twice [`FIELD_SIZE_LIMIT`] (a header map's tables can take up to twice what
/// wasmtime-wasi-http counts), which also covers an outgoing body's two chunks.
pub const HOST_BYTES_PER_RESOURCE: usize = 32 << 10;

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

/// The engine's linkers, built once: addons are instantiated with the `addon` world's
/// imports plus WASI p2, and `wasi:http` only when their manifest grants outbound hosts.
/// A component that imports anything else fails to link, and the loader reports which
/// import is missing.
#[derive(Clone)]
pub struct HostLinkers {
    with_http: Linker<HostState>,
    without_http: Linker<HostState>,
}

impl HostLinkers {
    /// The linker for `component` under a manifest that does (`outbound`) or does not
    /// grant outbound hosts.
    ///
    /// Without the grant, `wasi:http` is not linked at all: a component that imports it
    /// (the Rust SDK's `http` module does) still loads, with each of its `wasi:http`
    /// functions defined as a trap that names the missing grant ([`NoOutboundGrant`]),
    /// and each of its resource types as a type no value is ever made of. So the addon
    /// runs until it calls `wasi:http`, and that call allocates nothing on the host. The
    /// stubs are made here, once per load of the component, never per connection.
    pub fn for_component(
        &self,
        component: &Component,
        outbound: bool,
    ) -> wasmtime::Result<std::borrow::Cow<'_, Linker<HostState>>> {
        if outbound {
            return Ok(std::borrow::Cow::Borrowed(&self.with_http));
        }
        let engine = component.engine();
        let imports: Vec<(String, ComponentItem)> = component
            .component_type()
            .imports(engine)
            .map(|(name, item)| (name.to_owned(), item.ty))
            .collect();
        if !imports.iter().any(|(name, _)| is_wasi_http(name)) {
            return Ok(std::borrow::Cow::Borrowed(&self.without_http));
        }
        let mut linker = self.without_http.clone();
        // Resource types already known (WASI's streams and pollables, and wasi:http's own
        // when another wasi:http interface refers to them) are `(eq ...)` imports: they
        // must not be defined again.
        let mut known: Vec<ResourceType> = Vec::new();
        for (name, item) in &imports {
            let ComponentItem::ComponentInstance(instance) = item else { continue };
            let stub = is_wasi_http(name);
            let mut exports = if stub { Some(linker.instance(name)?) } else { None };
            for (export, item) in instance.exports(engine) {
                match item.ty {
                    ComponentItem::Resource(ty) => {
                        if known.contains(&ty) {
                            continue;
                        }
                        known.push(ty);
                        if let Some(exports) = exports.as_mut() {
                            exports
                                .resource(export, ResourceType::host::<NoOutboundGrant>(), |_, _| Ok(()))?;
                        }
                    }
                    ComponentItem::ComponentFunc(_) => {
                        if let Some(exports) = exports.as_mut() {
                            let function: Arc<str> = Arc::from(format!("{name}#{export}"));
                            exports.func_new(export, move |_, _, _, _| {
                                Err(wasmtime::Error::new(NoOutboundGrant { function: function.clone() }))
                            })?;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(std::borrow::Cow::Owned(linker))
    }
}

fn is_wasi_http(import: &str) -> bool {
    import.starts_with("wasi:http/")
}

/// The trap of a `wasi:http` call by an addon whose manifest grants no outbound hosts.
#[derive(Debug, thiserror::Error)]
#[error(
    "called `{function}`, but its manifest grants no outbound hosts (outbound_hosts), so wasi:http is not linked"
)]
pub struct NoOutboundGrant {
    /// The function called, as `interface#name`.
    pub function: Arc<str>,
}

/// Builds the engine's [`HostLinkers`].
pub fn linker(engine: &Engine) -> wasmtime::Result<HostLinkers> {
    let without_http = base_linker(engine)?;
    let mut with_http = without_http.clone();
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut with_http)?;
    Ok(HostLinkers { with_http, without_http })
}

/// The `addon` world's imports plus WASI p2, without `wasi:http`.
fn base_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    fn this(state: &mut HostState) -> &mut HostState {
        state
    }
    iface::types::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    session::add_to_linker(&mut linker)?;
    iface::log::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::kv::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::config::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::auth::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    iface::channels::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, this)?;
    Ok(linker)
}

impl iface::types::Host for HostState {}
