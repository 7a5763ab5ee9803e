//! Host-side bindings generated from `wit/addon.wit` (world `sockhost:addon/addon`).
//!
//! Only the session calls that touch the socket are async; `info` and `log` are plain
//! calls, which are cheaper to enter.

wasmtime::component::bindgen!({
    world: "addon",
    path: "../wit",
    imports: {
        "sockhost:addon/session.send-text": async,
        "sockhost:addon/session.send-binary": async,
        "sockhost:addon/session.close": async,
    },
    exports: { default: async },
});

pub use self::sockhost::addon::types::{CloseFrame, ConnectionInfo, Message};
