//! Write sockhost addons: WebAssembly components that each serve one WebSocket connection.
//!
//! An addon is a type that implements [`Addon`], exported with [`export_addon!`]:
//!
//! ```
//! use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_text};
//!
//! #[derive(Default)]
//! struct Shout { seen: u32 }
//!
//! impl Addon for Shout {
//!     fn on_message(&mut self, msg: Message) -> Result<(), Error> {
//!         self.seen += 1;
//!         if let Message::Text(text) = msg {
//!             send_text(&format!("{}: {}", self.seen, text.to_uppercase()))?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! export_addon!(Shout);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip2` (`scripts/build-addons` does this for the
//! addons in this repository) and drop `shout.wasm` into the server's addon directory: it is
//! served at `/ws/shout`.
//!
//! # The model
//!
//! - The server creates one instance of the component per connection, so the `Addon` value
//!   *is* the connection's state. It is created with [`Default`] when the connection opens
//!   and dropped after [`Addon::on_close`]. Two clients never share memory; state shared
//!   between connections must go through the host.
//! - Callbacks never overlap: [`Addon::on_open`] once, then [`Addon::on_message`] once per
//!   client message in arrival order, then [`Addon::on_close`] once.
//! - Replies are pushed with [`send_text`], [`send_binary`] or [`send_json`], any number of
//!   times from any callback: each frame reaches the client as soon as it is sent, which
//!   is how replies are streamed.
//! - Returning an [`Error`] from `on_message` sends the client an error frame
//!   (`"code":"addon_error"`) and keeps the connection open. A panic is a trap: the client
//!   gets `"code":"addon_trap"` and the connection is closed with 1011.
//! - [`log`] writes to the host's log, tagged with the addon and connection; so do
//!   `println!` (info) and `eprintln!` (warn).
//! - [`protocol`] has typed helpers for the JSON chat envelope that clients speak.
//! - With `export_addon!(MyAddon, hibernate)`, an idle connection's instance may be
//!   swapped out and back in; see [Hibernation](#hibernation).
//!
//! # Host capabilities
//!
//! Beyond the connection and the log, an addon reaches only what its manifest
//! (`addons/<name>.toml`) grants; every module says which key grants it:
//!
//! - [`kv`]: storage shared by the addon's connections and kept across restarts;
//! - [`config`]: the manifest's `[config]` settings, secrets read from the environment;
//! - [`auth`]: verification of the tokens clients send;
//! - [`channels`]: publish to and subscribe on channels shared by the addon's connections
//!   on every node, and receive server pushes from the shop's backend;
//! - [`http`]: outbound HTTP to the manifest's `outbound_hosts`, with a streaming body,
//!   and [`sse`] to parse event streams from it.
//!
//! # Hibernation
//!
//! A connection that is open but idle (a chat waiting for its user) holds a whole instance:
//! its memory and a slot of the server's pool. An addon exported with
//! `export_addon!(MyAddon, hibernate)` lets the host hibernate such a connection after the
//! manifest's `hibernate_after_ms` with no callback (default 30 s): the SDK saves the
//! addon value, the host drops the instance, and the next client message, channel message
//! or close creates a fresh instance into which the SDK restores the value before the
//! callback runs. `on_open` is not called again, and the client notices nothing.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sockhost_addon_sdk::{Addon, Error, Message, export_addon, send_text};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! #[serde(default)] // a field added in a later build wakes with its default
//! struct Tally {
//!     seen: u64,
//! }
//!
//! impl Addon for Tally {
//!     fn on_message(&mut self, _msg: Message) -> Result<(), Error> {
//!         self.seen += 1; // counts on across hibernations
//!         Ok(send_text(&self.seen.to_string())?)
//!     }
//! }
//!
//! export_addon!(Tally, hibernate);
//! ```
//!
//! - **What survives: the addon value**, written as JSON with serde, so its type must
//!   implement `Serialize` and `Deserialize` (derive them). The host keeps at most the
//!   manifest's `hibernate_max_state_bytes` of it (default 16 KiB); a larger state is not
//!   hibernated, and the instance stays live.
//! - **The host's things survive too**: the connection and its [`connection_info`], [`kv`],
//!   [`config`], and [`channels`] subscriptions (deliveries that arrive meanwhile wake the
//!   connection).
//! - **What does not survive**: anything the value does not hold (other globals and
//!   thread-locals, caches in `static`s), and host resources: an open [`http`] response,
//!   a pollable. Mark such fields `#[serde(skip)]` (they wake as their `Default`) and load
//!   them again when they are missing. Hibernation never happens during a callback, so a
//!   response read to its end within one callback is never cut.
//! - Fields that are cheap to recompute, or secrets that should not sit in the host's
//!   memory as bytes (an API key read from [`config`]), are better `#[serde(skip)]`ped too
//!   and read again after a wake.
//! - `#[serde(default)]` on the type lets a state saved by an older build of the addon
//!   wake in a newer one that added fields.
//! - A value that cannot be written as JSON (a map whose keys are not strings or numbers,
//!   a float that is NaN or infinite, which JSON cannot carry) panics in `hibernate`: the
//!   SDK reads the JSON back before handing it over, so a state that could not wake is
//!   never handed over. Bytes that are not this addon's state panic in `wake` with a
//!   message that names the addon type. A panic is a trap, as anywhere.
//! - Before `on_open` succeeded there is no value: `hibernate` returns no bytes and `wake`
//!   restores none, so the next callback starts from `Default`, as it would without
//!   hibernation.
//!
//! Without `hibernate`, `export_addon!(MyAddon)` does not export the `hibernation`
//! interface and the host never hibernates the addon, whatever its manifest says.

pub mod auth;
pub mod channels;
pub mod config;
pub mod http;
pub mod kv;
pub mod log;
pub mod protocol;
pub mod sse;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::__private::bindings::sockhost::addon::session;

/// One connection's addon. Every method has a default that does nothing, so an addon
/// implements only the callbacks it needs.
///
/// ```
/// use sockhost_addon_sdk::{Addon, ConnectionInfo, Refusal};
///
/// #[derive(Default)]
/// struct OnlyFromExample;
///
/// impl Addon for OnlyFromExample {
///     fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
///         match info.header("origin") {
///             Some("https://example.com") => Ok(()),
///             _ => Err(Refusal::policy_violation("origin not allowed")),
///         }
///     }
/// }
/// ```
pub trait Addon: Default + 'static {
    /// Called once, after the WebSocket handshake and before any message.
    ///
    /// Returning a [`Refusal`] closes the connection with its code and reason; frames sent
    /// before refusing are delivered first, and no other callback follows.
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        let _ = info;
        Ok(())
    }

    /// Called once for each message from the client, in arrival order.
    ///
    /// An error is reported to the client as
    /// `{"type":"error","message":<error>,"code":"addon_error"}`; the connection stays
    /// open.
    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let _ = msg;
        Ok(())
    }

    /// Called once for each message published on a channel this connection subscribed to
    /// (see [`channels`]), between the other callbacks, in publish order. The default
    /// ignores it.
    ///
    /// ```
    /// use sockhost_addon_sdk::{Addon, Message, send_text};
    ///
    /// #[derive(Default)]
    /// struct Forward;
    ///
    /// impl Addon for Forward {
    ///     fn on_channel_message(&mut self, channel: &str, msg: Message) {
    ///         if let Message::Text(text) = msg {
    ///             // The client left: nothing to do, the connection is ending.
    ///             let _ = send_text(&format!("[{channel}] {text}"));
    ///         }
    ///     }
    /// }
    /// ```
    fn on_channel_message(&mut self, channel: &str, msg: Message) {
        let _ = (channel, msg);
    }

    /// Called once when the connection ends, with the client's close code and reason (1006
    /// and `""` when the peer vanished). Nothing can be sent any more.
    fn on_close(&mut self, code: u16, reason: &str) {
        let _ = (code, reason);
    }
}

/// One WebSocket data message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text frame, already checked to be valid UTF-8 by the host.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

/// What the host knows about the connection. It never changes during the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// Unique within one server process; the host's log lines call it `conn`.
    pub id: u64,
    /// The addon's name, e.g. `echo` for `echo.wasm`.
    pub addon: String,
    /// The request path without the query string, e.g. `/ws/echo`.
    pub path: String,
    /// The raw query string without the `?` (not percent-decoded); empty when absent.
    pub query: String,
    /// The peer as `ip:port`; behind a reverse proxy, the proxy.
    pub remote_address: String,
    /// A selection of the request headers (`origin`, `user-agent`, `x-forwarded-for`,
    /// `x-real-ip`, `accept-language`, `sec-websocket-protocol`), names in lowercase, in
    /// request order.
    pub headers: Vec<(String, String)>,
}

impl ConnectionInfo {
    /// The first value of the header `name`, compared case-insensitively.
    ///
    /// ```
    /// # use sockhost_addon_sdk::ConnectionInfo;
    /// let info = ConnectionInfo {
    ///     headers: vec![("origin".into(), "https://example.com".into())],
    ///     ..Default::default()
    /// };
    /// assert_eq!(info.header("Origin"), Some("https://example.com"));
    /// assert_eq!(info.header("user-agent"), None);
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The first value of the query parameter `name`, percent-decoded (`+` is a space).
    /// Bytes that do not decode to UTF-8 become U+FFFD.
    ///
    /// ```
    /// # use sockhost_addon_sdk::ConnectionInfo;
    /// let info = ConnectionInfo { query: "room=lobby&name=%E5%B0%8F%E6%98%8E+W".into(), ..Default::default() };
    /// assert_eq!(info.query_param("room").as_deref(), Some("lobby"));
    /// assert_eq!(info.query_param("name").as_deref(), Some("小明 W"));
    /// assert_eq!(info.query_param("missing"), None);
    /// let odd = ConnectionInfo { query: "a=100%&b=%zz&c=%4".into(), ..Default::default() };
    /// assert_eq!(odd.query_param("a").as_deref(), Some("100%"));
    /// assert_eq!(odd.query_param("b").as_deref(), Some("%zz"));
    /// assert_eq!(odd.query_param("c").as_deref(), Some("%4"));
    /// ```
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
    }
}

/// Decodes `%XX` escapes and `+` (a space) in a query component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses a connection from [`Addon::on_open`]: the host closes it with this code and
/// reason.
///
/// The code should be one a server may send (1000, 1001, 1003, 1007, 1008, 1009, 1011, or
/// 3000–4999); the host replaces any other with 1008. The reason is cut to 123 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: String,
}

impl Refusal {
    /// A refusal with any close code, e.g. an application code like 4003.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }

    /// A refusal with 1008 (policy violation), the generic "not allowed".
    pub fn policy_violation(reason: impl Into<String>) -> Self {
        Self::new(1008, reason)
    }
}

/// Why [`Addon::on_message`] failed: a message for the client.
///
/// Any [`std::error::Error`] converts into it, so `?` works on most results:
///
/// ```
/// use sockhost_addon_sdk::Error;
///
/// fn double(text: &str) -> Result<String, Error> {
///     let n: i64 = text.trim().parse()?;
///     if n.abs() > 1_000_000 {
///         return Err(Error::msg(format!("{n} is too big")));
///     }
///     Ok((n * 2).to_string())
/// }
///
/// assert_eq!(double("21").unwrap(), "42");
/// assert_eq!(double("x").unwrap_err().to_string(), "invalid digit found in string");
/// ```
// Like `anyhow::Error`, it does not implement `std::error::Error` itself: that is what lets
// the blanket `From` below coexist with `From<T> for T`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with the given message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Self(message.to_string())
    }

    /// The message the client will see.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Error {
    fn from(error: E) -> Self {
        Self::msg(error)
    }
}

/// Why a frame could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SendError {
    /// The connection is closed or closing: nothing more can be sent, the addon should
    /// return.
    Closed,
    /// The frame is larger than the host accepts for one message (16 MiB); nothing was
    /// sent.
    TooLarge,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::Closed => "the connection is closed",
            SendError::TooLarge => "the frame is too large to send",
        })
    }
}

impl std::error::Error for SendError {}

impl From<session::SendError> for SendError {
    fn from(error: session::SendError) -> Self {
        match error {
            session::SendError::Closed => SendError::Closed,
            session::SendError::TooLarge => SendError::TooLarge,
        }
    }
}

/// Sends one text frame to the client right away. While the client is slow to read, the
/// addon waits for it (the host pauses it just after the call until the frame has room)
/// rather than the host buffering without bound.
///
/// ```no_run
/// use sockhost_addon_sdk::{SendError, send_text};
///
/// for i in 1..=3 {
///     match send_text(&format!("tick {i}")) {
///         Ok(()) => {}
///         // The client left: stop streaming quietly.
///         Err(SendError::Closed) => break,
///         Err(e) => panic!("{e}"),
///     }
/// }
/// ```
pub fn send_text(text: &str) -> Result<(), SendError> {
    session::send_text(text).map_err(SendError::from)
}

/// Sends one binary frame to the client. Same behaviour as [`send_text`].
pub fn send_binary(data: &[u8]) -> Result<(), SendError> {
    session::send_binary(data).map_err(SendError::from)
}

/// Sends `value` as JSON in one text frame.
///
/// ```no_run
/// use sockhost_addon_sdk::send_json;
///
/// #[derive(serde::Serialize)]
/// struct Score { player: String, points: u32 }
///
/// send_json(&Score { player: "ada".into(), points: 3 })?;
/// # Ok::<(), sockhost_addon_sdk::SendError>(())
/// ```
///
/// # Panics
///
/// If `value` cannot be represented as JSON (a map whose keys are not strings or numbers,
/// or a `Serialize` impl that fails): that is a bug in the addon, not a runtime condition.
pub fn send_json<T: Serialize + ?Sized>(value: &T) -> Result<(), SendError> {
    let json = serde_json::to_string(value).expect("value cannot be serialized as JSON");
    send_text(&json)
}

/// Starts closing the connection with `code` and `reason` (same rules as [`Refusal`]).
///
/// Later sends fail with [`SendError::Closed`]; the current callback runs to its end and
/// [`Addon::on_close`] follows once the close handshake is over.
pub fn close(code: u16, reason: &str) {
    session::close(&session::CloseFrame { code, reason: reason.to_owned() });
}

/// The same information [`Addon::on_open`] received, available in any callback.
pub fn connection_info() -> ConnectionInfo {
    session::info().into()
}

impl From<session::ConnectionInfo> for ConnectionInfo {
    fn from(info: session::ConnectionInfo) -> Self {
        Self {
            id: info.id,
            addon: info.addon,
            path: info.path,
            query: info.query,
            remote_address: info.remote_address,
            headers: info.headers,
        }
    }
}

/// Generates the component's exports for an [`Addon`] type. Use it once per crate.
///
/// ```
/// #[derive(Default)]
/// struct Silent;
///
/// impl sockhost_addon_sdk::Addon for Silent {}
///
/// sockhost_addon_sdk::export_addon!(Silent);
/// ```
///
/// `export_addon!(MyAddon, hibernate)` also exports `sockhost:addon/hibernation`, so the
/// host may hibernate the connection while it is idle (see [Hibernation](crate#hibernation)):
/// the addon value is saved as JSON with serde and restored into a fresh instance, so
/// `MyAddon` must implement [`Serialize`] and [`Deserialize`](serde::Deserialize) (derive
/// them; `#[serde(skip)]` the fields that must not be saved). Without `hibernate` the
/// component has no such export and the host never hibernates it.
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// #[serde(default)]
/// struct Counter {
///     count: u64,
/// }
///
/// impl sockhost_addon_sdk::Addon for Counter {}
///
/// sockhost_addon_sdk::export_addon!(Counter, hibernate);
/// ```
///
/// A type without serde's traits does not compile with `hibernate` (the error names
/// `Serialize` or `Deserialize`):
///
/// ```compile_fail
/// #[derive(Default)]
/// struct Unsaved;
///
/// impl sockhost_addon_sdk::Addon for Unsaved {}
///
/// sockhost_addon_sdk::export_addon!(Unsaved, hibernate);
/// ```
#[macro_export]
macro_rules! export_addon {
    ($addon:ty) => {
        $crate::__export_addon_with!($addon, {});
    };
    ($addon:ty, hibernate) => {
        $crate::__export_addon_with!($addon, {
            impl $crate::__private::hibernation_bindings::exports::sockhost::addon::hibernation::Guest
                for __SockhostAddonExport
            {
                fn hibernate() -> ::std::vec::Vec<u8> {
                    $crate::__private::hibernate(&__SOCKHOST_ADDON_STATE)
                }

                fn wake(state: ::std::vec::Vec<u8>) {
                    $crate::__private::wake(&__SOCKHOST_ADDON_STATE, state)
                }
            }

            $crate::__private::hibernation_bindings::export_hibernation!(
                __SockhostAddonExport with_types_in $crate::__private::hibernation_bindings
            );
        });
    };
}

/// The body of [`export_addon!`]: the addon's state, the exports of the world `addon`
/// (`handler`, `channel-handler`), and `$extra` items that may use both. Not a public API.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_addon_with {
    ($addon:ty, { $($extra:tt)* }) => {
        const _: () = {
            use $crate::__private::bindings::exports::sockhost::addon::channel_handler as __channel_handler;
            use $crate::__private::bindings::exports::sockhost::addon::handler as __handler;

            ::std::thread_local! {
                static __SOCKHOST_ADDON_STATE: $crate::__private::State<$addon> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct __SockhostAddonExport;

            impl __handler::Guest for __SockhostAddonExport {
                fn on_open(
                    info: __handler::ConnectionInfo,
                ) -> ::core::result::Result<(), __handler::CloseFrame> {
                    $crate::__private::on_open(&__SOCKHOST_ADDON_STATE, info)
                }

                fn on_message(msg: __handler::Message) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__private::on_message(&__SOCKHOST_ADDON_STATE, msg)
                }

                fn on_close(code: u16, reason: ::std::string::String) {
                    $crate::__private::on_close(&__SOCKHOST_ADDON_STATE, code, reason)
                }
            }

            impl __channel_handler::Guest for __SockhostAddonExport {
                fn on_channel_message(channel: ::std::string::String, msg: __channel_handler::Message) {
                    $crate::__private::on_channel_message(&__SOCKHOST_ADDON_STATE, channel, msg)
                }
            }

            $($extra)*

            $crate::__private::bindings::export!(
                __SockhostAddonExport with_types_in $crate::__private::bindings
            );
        };
    };
}

/// What [`export_addon!`] expands to calls into; not a public API.
#[doc(hidden)]
pub mod __private {
    use std::cell::RefCell;
    use std::thread::LocalKey;

    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use crate::Addon;
    use bindings::exports::sockhost::addon::handler;

    pub mod bindings {
        wit_bindgen::generate!({
            world: "addon",
            path: "../wit",
            pub_export_macro: true,
            export_macro_name: "export",
            generate_all,
        });
    }

    /// The `hibernation` export alone, for `export_addon!(T, hibernate)`, which uses it
    /// beside [`bindings`]: the component then exports what the world `hibernating` has
    /// (`addon` plus `hibernation`), as `wit-component` unions the worlds of the two.
    ///
    /// Why not `world: "hibernating"` with `with` mapping its imports onto [`bindings`]:
    /// wit-bindgen 0.61 cannot remap exports, so it would generate `handler` and
    /// `channel-handler` again, and their `#[macro_export]` export macros have fixed names
    /// that clash with the ones of [`bindings`] at the crate root. This world has no
    /// imports at all, so it duplicates nothing. With `pub_export_macro`, the exports'
    /// type information is emitted by `export_hibernation!` in the addon's crate, not by
    /// this crate, so a component built with plain `export_addon!(T)` does not export
    /// `hibernation`.
    pub mod hibernation_bindings {
        wit_bindgen::generate!({
            inline: "
                package sockhost:addon-sdk;

                world hibernation-export {
                    export sockhost:addon/hibernation@0.1.4;
                }
            ",
            path: "../wit",
            world: "sockhost:addon-sdk/hibernation-export",
            pub_export_macro: true,
            export_macro_name: "export_hibernation",
        });
    }

    /// The connection's addon value. It lives in a thread-local because each export is a
    /// free function called by the host; wasm is single-threaded and callbacks never
    /// overlap, so the `RefCell` is never contended.
    pub type State<T> = RefCell<Option<T>>;

    pub fn on_open<T: Addon>(
        state: &'static LocalKey<State<T>>,
        info: handler::ConnectionInfo,
    ) -> Result<(), handler::CloseFrame> {
        let mut addon = T::default();
        match addon.on_open(&info.into()) {
            Ok(()) => {
                state.set(Some(addon));
                Ok(())
            }
            Err(refusal) => Err(handler::CloseFrame { code: refusal.code, reason: refusal.reason }),
        }
    }

    fn message(msg: handler::Message) -> crate::Message {
        match msg {
            handler::Message::Text(text) => crate::Message::Text(text),
            handler::Message::Binary(data) => crate::Message::Binary(data),
        }
    }

    pub fn on_channel_message<T: Addon>(
        state: &'static LocalKey<State<T>>,
        channel: String,
        msg: handler::Message,
    ) {
        let msg = message(msg);
        state.with_borrow_mut(|addon| addon.get_or_insert_with(T::default).on_channel_message(&channel, msg))
    }

    pub fn on_message<T: Addon>(
        state: &'static LocalKey<State<T>>,
        msg: handler::Message,
    ) -> Result<(), String> {
        let msg = message(msg);
        // The host always calls on-open first; falling back to a default value rather than
        // panicking keeps a misbehaving host from turning into a trap.
        state.with_borrow_mut(|addon| addon.get_or_insert_with(T::default).on_message(msg).map_err(|e| e.0))
    }

    /// `hibernation.hibernate`: the addon value as JSON, or no bytes when there is no value
    /// (before `on-open` succeeded, after `on-close`), which [`wake`] restores as no value.
    ///
    /// The JSON is parsed back before it is returned, so a state that could not wake (a
    /// NaN or infinite float, which JSON writes as `null`; a `Serialize` and a
    /// `Deserialize` that disagree) fails here, while the host still has the live
    /// instance, rather than in `wake`, where it would cost the connection.
    ///
    /// # Panics
    ///
    /// (a trap, which keeps the instance live) If the value cannot be written as JSON or
    /// read back.
    pub fn hibernate<T: Addon + Serialize + DeserializeOwned>(state: &'static LocalKey<State<T>>) -> Vec<u8> {
        state.with_borrow(|addon| match addon {
            None => Vec::new(),
            Some(addon) => save(addon).unwrap_or_else(|err| panic!("{err}")),
        })
    }

    /// `hibernation.wake`: restores what [`hibernate`] returned into this (fresh) instance.
    ///
    /// # Panics
    ///
    /// (a trap, which closes the connection) If `bytes` is not this addon's state.
    pub fn wake<T: Addon + Serialize + DeserializeOwned>(state: &'static LocalKey<State<T>>, bytes: Vec<u8>) {
        let addon = restore::<T>(&bytes).unwrap_or_else(|err| panic!("{err}"));
        state.set(addon);
    }

    /// The addon value as hibernation bytes: its JSON, checked to read back as a `T`.
    pub fn save<T: Serialize + DeserializeOwned>(addon: &T) -> Result<Vec<u8>, String> {
        let name = std::any::type_name::<T>();
        let bytes = serde_json::to_vec(addon).map_err(|err| {
            format!("hibernate: the state of addon `{name}` cannot be serialised as JSON: {err}")
        })?;
        if let Err(err) = serde_json::from_slice::<T>(&bytes) {
            return Err(format!(
                "hibernate: the state of addon `{name}` would not wake: its JSON does not deserialise back ({err}); \
                 a NaN or infinite float is written as null, for one"
            ));
        }
        Ok(bytes)
    }

    /// Hibernation bytes back as the addon value: no bytes are no value.
    pub fn restore<T: DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, String> {
        if bytes.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(bytes).map(Some).map_err(|err| {
            let name = std::any::type_name::<T>();
            let start = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
            format!(
                "wake: {} bytes are not a state of addon `{name}` ({err}); they start with {start:?}. \
                 Were they hibernated by another build of the addon?",
                bytes.len()
            )
        })
    }

    pub fn on_close<T: Addon>(state: &'static LocalKey<State<T>>, code: u16, reason: String) {
        // Taken out, so the value is dropped when the connection is over even if the host
        // keeps the instance around a little longer.
        let mut addon = state.take().unwrap_or_default();
        addon.on_close(code, &reason);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde::{Deserialize, Serialize};

    use crate::__private::{State, hibernate, restore, save, wake};
    use crate::Addon;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct Counter {
        count: u64,
        name: String,
        #[serde(skip)]
        cache: Option<String>,
    }

    impl Addon for Counter {}

    thread_local! {
        static STATE: State<Counter> = const { std::cell::RefCell::new(None) };
    }

    #[test]
    fn the_addon_value_survives_a_hibernation() {
        STATE.set(Some(Counter { count: 7, name: "小明".into(), cache: Some("derived".into()) }));
        let bytes = hibernate(&STATE);
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), r#"{"count":7,"name":"小明"}"#);
        // Hibernating keeps the value: the host may keep the instance live after all.
        assert_eq!(STATE.with_borrow(|s| s.as_ref().map(|c| c.count)), Some(7));

        // A fresh instance: nothing in the thread-local until wake.
        STATE.set(None);
        wake(&STATE, bytes);
        let woken = STATE.take().unwrap();
        // Skipped fields wake as their default.
        assert_eq!(woken, Counter { count: 7, name: "小明".into(), cache: None });
    }

    #[test]
    fn no_value_hibernates_as_no_bytes_and_wakes_as_no_value() {
        STATE.set(None);
        let bytes = hibernate(&STATE);
        assert!(bytes.is_empty());
        STATE.set(Some(Counter::default()));
        wake(&STATE, bytes);
        assert!(STATE.with_borrow(Option::is_none));
    }

    #[test]
    fn a_unit_state_round_trips() {
        #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
        struct Stateless;
        let bytes = save(&Stateless).unwrap();
        // `null`: not empty, so it is not mistaken for "no value".
        assert_eq!(bytes, b"null");
        assert_eq!(restore::<Stateless>(&bytes).unwrap(), Some(Stateless));
    }

    #[test]
    fn state_from_an_older_build_wakes_with_defaults() {
        let woken = restore::<Counter>(br#"{"count":3,"gone":true}"#).unwrap().unwrap();
        assert_eq!(woken, Counter { count: 3, ..Counter::default() });
    }

    #[test]
    fn bytes_that_are_not_the_state_are_refused_naming_the_addon() {
        let err = restore::<Counter>(b"{\"count\":\"many\"").unwrap_err();
        assert!(err.contains("addon `sockhost_addon_sdk::tests::Counter`"), "{err}");
        assert!(err.contains("wake: 15 bytes"), "{err}");
    }

    #[test]
    #[should_panic(expected = "wake: 3 bytes are not a state of addon `sockhost_addon_sdk::tests::Counter`")]
    fn wake_with_bad_bytes_panics() {
        wake(&STATE, b"\"x\"".to_vec());
    }

    #[test]
    fn a_state_that_json_cannot_carry_fails_at_hibernate() {
        #[derive(Default, Serialize, Deserialize)]
        struct Keyed {
            by_pair: HashMap<(u8, u8), u8>,
        }
        let err = save(&Keyed { by_pair: HashMap::from([((1, 2), 3)]) }).err().unwrap();
        assert!(err.contains("cannot be serialised as JSON"), "{err}");
        assert!(err.contains("Keyed"), "{err}");

        #[derive(Default, Serialize, Deserialize)]
        struct Ratio {
            value: f64,
        }
        // JSON writes NaN as null, which would not read back: caught before it is handed over.
        let err = save(&Ratio { value: f64::NAN }).err().unwrap();
        assert!(err.contains("would not wake"), "{err}");
        assert!(save(&Ratio { value: 0.5 }).is_ok());
    }

    #[test]
    #[should_panic(expected = "hibernate: the state of addon")]
    fn hibernate_panics_on_a_state_that_cannot_be_saved() {
        #[derive(Default, Serialize, Deserialize)]
        struct Ratio {
            value: f64,
        }
        impl Addon for Ratio {}
        thread_local! {
            static RATIO: State<Ratio> = const { std::cell::RefCell::new(None) };
        }
        RATIO.set(Some(Ratio { value: f64::INFINITY }));
        hibernate(&RATIO);
    }
}
