//! Host-side bindings generated from `wit/addon.wit` (world `sockhost:addon/addon`).
//!
//! Calls that wait on something outside the instance (the socket, the kv store's disk)
//! are async, so a waiting instance parks its fiber instead of a runtime thread; `info`,
//! `log`, `config` and `auth` are plain calls, which are cheaper to enter.
//!
//! The WASI interfaces the world imports (`wasi:http`, and `wasi:io`/`wasi:clocks`
//! beneath it) are not generated here: they map to wasmtime-wasi's and
//! wasmtime-wasi-http's own bindings, which [`crate::host::linker`] adds.

wasmtime::component::bindgen!({
    world: "addon",
    path: "../wit",
    imports: {
        "sockhost:addon/session.send-text": async,
        "sockhost:addon/session.send-binary": async,
        "sockhost:addon/session.close": async,
        "sockhost:addon/kv.get": async,
        "sockhost:addon/kv.set": async,
        "sockhost:addon/kv.delete": async,
        "sockhost:addon/kv.list-keys": async,
    },
    exports: { default: async },
    with: {
        "wasi:http": wasmtime_wasi_http::p2::bindings::http,
        "wasi": wasmtime_wasi::p2::bindings,
    },
});

pub use self::sockhost::addon::types::{CloseFrame, ConnectionInfo, Message};
