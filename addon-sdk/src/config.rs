//! The addon's settings: the `[config]` table of its manifest (`addons/<name>.toml`).
//!
//! Strings come back as they are written; other values (numbers, booleans, arrays,
//! tables) as JSON, which [`get_json`] decodes. A value the operator wrote as
//! `{ env = "NAME" }` comes from the server's environment, so secrets stay out of files;
//! when that variable is not set, the key is absent.
//!
//! ```no_run
//! use sockhost_addon_sdk::config;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct FaqEntry { keywords: Vec<String>, answer: String }
//!
//! let model = config::get("model").unwrap_or_else(|| "gpt-4o-mini".to_owned());
//! let turns: u32 = config::get_json("history_turns").ok().flatten().unwrap_or(10);
//! let faq: Vec<FaqEntry> = config::get_json("faq").ok().flatten().unwrap_or_default();
//! ```

use serde::de::DeserializeOwned;

use crate::__private::bindings::sockhost::addon::config as host;

/// The value of `key`, or `None` when the manifest does not set it.
pub fn get(key: &str) -> Option<String> {
    host::get(key)
}

/// The value of `key` decoded from JSON; `Ok(None)` when absent. A string value is
/// decoded as a JSON string first, so `get_json::<String>` works on strings too.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, String> {
    let Some(text) = host::get(key) else { return Ok(None) };
    match serde_json::from_str(&text) {
        Ok(value) => Ok(Some(value)),
        Err(err) => serde_json::from_value(serde_json::Value::String(text))
            .map(Some)
            .map_err(|_| format!("config key `{key}` is not what the addon expects: {err}")),
    }
}

/// Every key of the `[config]` table, sorted.
pub fn keys() -> Vec<String> {
    host::keys()
}
