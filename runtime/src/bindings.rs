//! Host-side bindings generated from `wit/addon.wit` (world `sockhost:addon/hibernating`,
//! the one with every export).
//!
//! The world's exports are bound apart: `handler` is required, `channel-handler` and
//! `hibernation` optional ([`crate::addons`] looks each up in the component; a component built against
//! 0.1.0 or 0.1.1 has only `handler`). So this module uses the per-interface
//! `GuestIndices`, not the world's `AddonPre`, which would require both.
//!
//! Calls that wait on something outside the instance (the kv store, the cluster, a
//! close handshake) are async, so a waiting instance parks its fiber instead of a
//! runtime thread; `info`, `log`, `config`, `auth` and `unsubscribe` are plain calls,
//! which are cheaper to enter. So are `send-text` and `send-binary`, the calls a
//! streamed reply makes most; [`crate::host::session::add_to_linker`] wraps them so
//! that a frame the socket has no room for makes the guest pause just after the call.
//!
//! The WASI interfaces the world imports (`wasi:http`, and `wasi:io`/`wasi:clocks`
//! beneath it) are not generated here: they map to wasmtime-wasi's and
//! wasmtime-wasi-http's own bindings, which [`crate::host::linker`] adds.

wasmtime::component::bindgen!({
    world: "hibernating",
    path: "../wit",
    imports: {
        "sockhost:addon/session.send-text": trappable,
        "sockhost:addon/session.send-binary": trappable,
        "sockhost:addon/session.close": async,
        "sockhost:addon/kv.get": async,
        "sockhost:addon/kv.set": async,
        "sockhost:addon/kv.delete": async,
        "sockhost:addon/kv.list-keys": async,
        "sockhost:addon/kv.compare-and-swap": async,
        "sockhost:addon/kv.compare-and-delete": async,
        "sockhost:addon/channels.subscribe": async,
        "sockhost:addon/channels.publish": async,
    },
    exports: { default: async },
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi": wasmtime_wasi::p2::bindings,
    },
});

pub use self::exports::sockhost::addon::channel_handler::{
    Guest as ChannelHandler, GuestIndices as ChannelHandlerIndices,
};
pub use self::exports::sockhost::addon::handler::{Guest as Handler, GuestIndices as HandlerIndices};
pub use self::exports::sockhost::addon::hibernation::{
    Guest as Hibernation, GuestIndices as HibernationIndices,
};
pub use self::sockhost::addon::types::{CloseFrame, ConnectionInfo, Message};

/// The version of the `sockhost:addon` package in `wit/addon.wit` (`0.1.4`): the name
/// the generated bindings define their interfaces under, for the ones the host
/// defines again by hand.
pub fn wit_version() -> &'static str {
    static VERSION: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        include_str!("../../wit/addon.wit")
            .lines()
            .find_map(|line| line.trim().strip_prefix("package sockhost:addon@"))
            .and_then(|rest| rest.strip_suffix(';'))
            .expect("wit/addon.wit names its package version")
    })
}
