//! Key-value storage shared by every connection of this addon, kept across restarts.
//!
//! Needs `kv = true` in the addon's manifest; without it every call returns
//! [`KvError::Denied`]. Keys are 1 to 512 bytes, values at most 1 MiB. Each addon has
//! its own namespace, so keys need no addon prefix.
//!
//! ```no_run
//! use sockhost_addon_sdk::kv;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), kv::KvError> {
//! kv::set("greeting", b"hello")?;
//! kv::set_with_ttl("otp/alice", b"123456", Duration::from_secs(300))?;
//! assert_eq!(kv::get("greeting")?.as_deref(), Some(&b"hello"[..]));
//! kv::set_json("user/alice", &vec!["turn 1", "turn 2"])?;
//! let turns: Option<Vec<String>> = kv::get_json("user/alice")?;
//! for key in kv::list_keys("user/")? {
//!     kv::delete(&key)?;
//! }
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__private::bindings::sockhost::addon::kv as host;

/// Why a kv call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The manifest does not grant `kv = true`.
    Denied,
    /// A key or value breaks a limit; the text says which.
    Invalid(String),
    /// The store failed; the text says why (the host logs it too).
    Backend(String),
    /// A stored value is not the JSON [`get_json`] expected.
    Decode(String),
    /// [`update_json`] found the value changed by someone else on every one of its
    /// attempts ([`MAX_UPDATE_ATTEMPTS`]).
    Contended,
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::Denied => {
                f.write_str("kv is not granted to this addon (its manifest needs `kv = true`)")
            }
            KvError::Invalid(why) => write!(f, "invalid kv call: {why}"),
            KvError::Backend(why) => write!(f, "kv store failed: {why}"),
            KvError::Decode(why) => write!(f, "stored value is not the expected JSON: {why}"),
            KvError::Contended => {
                write!(f, "the value kept changing under {MAX_UPDATE_ATTEMPTS} attempts to update it")
            }
        }
    }
}

impl std::error::Error for KvError {}

impl From<host::KvError> for KvError {
    fn from(err: host::KvError) -> Self {
        match err {
            host::KvError::Denied => KvError::Denied,
            host::KvError::Invalid(why) => KvError::Invalid(why),
            host::KvError::Backend(why) => KvError::Backend(why),
        }
    }
}

/// The value of `key`, or `None` when absent or expired.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    Ok(host::get(key)?)
}

/// Stores `value` under `key`, with no expiry.
pub fn set(key: &str, value: &[u8]) -> Result<(), KvError> {
    Ok(host::set(key, value, None)?)
}

/// Stores `value` under `key`; it expires `ttl` from now (at least 1 ms).
pub fn set_with_ttl(key: &str, value: &[u8], ttl: Duration) -> Result<(), KvError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    Ok(host::set(key, value, Some(ms))?)
}

/// Stores `value` under `key` only if its current value is `expected` (`None`: only if
/// absent), atomically, even across nodes; whether it stored. With `ttl`, the value
/// expires that long from now. [`update_json`] wraps the usual read-change-swap loop.
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<bool, KvError> {
    let ttl_ms = ttl.map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
    Ok(host::compare_and_swap(key, expected, value, ttl_ms)?)
}

/// How many times [`update_json`] reads and tries again before giving up.
pub const MAX_UPDATE_ATTEMPTS: usize = 16;

/// Changes the JSON value of `key` with `change` (given the current value, or `None`)
/// without losing a change another connection makes meanwhile: it reads, changes and
/// swaps in, and starts again from the new value when someone else wrote first. Returns
/// what it stored.
///
/// ```no_run
/// use sockhost_addon_sdk::kv;
///
/// // Two connections adding at once both count.
/// let visits: u64 = kv::update_json("visits", None, |n: Option<u64>| n.unwrap_or(0) + 1)?;
/// # Ok::<(), kv::KvError>(())
/// ```
///
/// # Panics
///
/// If `T`'s `Serialize` implementation fails, which is a bug in the addon.
pub fn update_json<T, F>(key: &str, ttl: Option<Duration>, mut change: F) -> Result<T, KvError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> T,
{
    for _ in 0..MAX_UPDATE_ATTEMPTS {
        let current = get(key)?;
        let decoded = match &current {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(bytes).map_err(|e| KvError::Decode(e.to_string()))?),
        };
        let next = change(decoded);
        let bytes = serde_json::to_vec(&next).expect("value serializes to JSON");
        if compare_and_swap(key, current.as_deref(), &bytes, ttl)? {
            return Ok(next);
        }
    }
    Err(KvError::Contended)
}

/// Removes `key`; whether it was there.
pub fn delete(key: &str) -> Result<bool, KvError> {
    Ok(host::delete(key)?)
}

/// Removes `key` only if its current value is `expected`, atomically, even across nodes;
/// whether it removed it. Use it to give up what this connection holds (a claim, a lock)
/// without removing what another connection stored there since: a [`get`] followed by a
/// [`delete`] would.
pub fn compare_and_delete(key: &str, expected: &[u8]) -> Result<bool, KvError> {
    Ok(host::compare_and_delete(key, expected)?)
}

/// Every live key that starts with `prefix`, in byte order (fetched in pages of 1000).
pub fn list_keys(prefix: &str) -> Result<Vec<String>, KvError> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let page = host::list_keys(prefix, keys.last().map(String::as_str), 1000)?;
        let done = page.len() < 1000;
        keys.extend(page);
        if done {
            return Ok(keys);
        }
    }
}

/// The value of `key` decoded from JSON.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| KvError::Decode(e.to_string())),
    }
}

/// Stores `value` as JSON under `key`.
///
/// # Panics
///
/// If `T`'s `Serialize` implementation fails, which is a bug in the addon.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), KvError> {
    set(key, &serde_json::to_vec(value).expect("value serializes to JSON"))
}
