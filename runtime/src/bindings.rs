//! Host-side bindings generated from `wit/addon.wit` (world `sockhost:addon/hibernating`,
//! the one with every export).
//!
//! The world's exports are bound apart: `handler` is required, `channel-handler` and
//! `hibernation` optional ([`crate::addons`] looks each up in the component; a component built against
//! 0.1.0 or 0.1.1 has only `handler`). So this module uses the per-interface
//! `GuestIndices`, not the world's `AddonPre`, which would require both.
//!
//! Calls that wait on something outside the instance (the socket, the kv store, the
//! cluster) are async, so a waiting instance parks its fiber instead of a runtime
//! thread; `info`, `log`, `config`, `auth` and `unsubscribe` are plain calls, which are
//! cheaper to enter.
//!
//! The WASI interfaces the world imports (`wasi:http`, and `wasi:io`/`wasi:clocks`
//! beneath it) are not generated here: they map to wasmtime-wasi's and
//! wasmtime-wasi-http's own bindings, which [`crate::host::linker`] adds.

wasmtime::component::bindgen!({
    world: "hibernating",
    path: "../wit",
    imports: {
        "sockhost:addon/session.send-text": async,
        "sockhost:addon/session.send-binary": async,
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
