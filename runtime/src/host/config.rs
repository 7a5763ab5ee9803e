//! `sockhost:addon/config`: an addon's settings, the `[config]` table of its manifest.
//!
//! Values are resolved once, when the addon loads: a value written `{ env = "NAME" }`
//! is read from the server's environment then, so secrets (API keys) live in the
//! environment or a secret store, never in the manifest or the log. A variable that is
//! not set leaves the key absent, and the loader logs the variable's name; addons treat
//! a missing key as "not configured" (aikefu falls back to its offline FAQ, say).
//!
//! An addon reads only its own table. It never sees the environment itself: naming a
//! variable in a manifest is the operator's grant.
//!
//! Values reach the guest as strings: TOML strings as they are, anything else as JSON,
//! so structured settings (a FAQ as an array of tables) need no second format.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::HostState;
use crate::bindings::sockhost::addon::config::Host;

/// The resolved `[config]` table of one addon.
#[derive(Clone, Default, PartialEq)]
pub struct AddonConfig {
    values: BTreeMap<String, ConfigValue>,
    /// `(key, variable)` for each `{ env = ... }` value whose variable was not set.
    pub missing_env: Vec<(String, String)>,
}

#[derive(Clone, PartialEq)]
struct ConfigValue {
    text: String,
    /// The variable it came from; such values are secrets and never printed.
    env: Option<String>,
}

/// Reads an environment variable; a parameter so tests need not touch the process's
/// environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// If `value` is an environment reference `{ env = "NAME" }`, the variable's name.
pub(crate) fn env_reference(value: &toml::Value) -> Option<Result<&str, String>> {
    let table = value.as_table()?;
    let name = table.get("env")?;
    if table.len() != 1 {
        return Some(Err(
            "an environment reference is written `{ env = \"NAME\" }`, with no other key".into()
        ));
    }
    let Some(name) = name.as_str() else {
        return Some(Err("`env` must name a variable as a string".into()));
    };
    let valid = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Some(Err(format!("{name:?} is not an environment variable name")));
    }
    Some(Ok(name))
}

impl AddonConfig {
    /// Resolves the manifest's `[config]` table.
    pub(crate) fn from_manifest(table: toml::Table, env: EnvLookup<'_>) -> Result<AddonConfig, String> {
        let mut config = AddonConfig::default();
        for (key, value) in table {
            let resolved = match env_reference(&value) {
                Some(Ok(name)) => match env(name) {
                    Some(text) => Some(ConfigValue { text, env: Some(name.to_owned()) }),
                    None => {
                        config.missing_env.push((key.clone(), name.to_owned()));
                        None
                    }
                },
                Some(Err(problem)) => return Err(format!("key `config.{key}`: {problem}")),
                None => Some(ConfigValue { text: to_text(&value), env: None }),
            };
            if let Some(value) = resolved {
                config.values.insert(key, value);
            }
        }
        Ok(config)
    }

    /// The value of `key` as the guest sees it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|v| v.text.as_str())
    }

    /// Every key, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// One line per key for operators: values from the environment show the variable's
    /// name, never the value.
    pub fn describe(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(key, value)| match &value.env {
                Some(var) => format!("{key} = <from ${var}>"),
                None => format!("{key} = {}", value.text),
            })
            .chain(self.missing_env.iter().map(|(key, var)| format!("{key} = <unset: ${var} is not set>")))
            .collect()
    }
}

impl fmt::Debug for AddonConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

/// A TOML value as the guest receives it: strings verbatim, the rest as JSON.
fn to_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => to_json(other).to_string(),
    }
}

fn to_json(value: &toml::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
        toml::Value::Table(table) => J::Object(table.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
    }
}

/// The per-instance view: a shared handle to the addon's resolved table.
pub(crate) type ConfigHandle = Arc<AddonConfig>;

impl Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).map(str::to_owned)
    }

    fn keys(&mut self) -> Vec<String> {
        self.config.keys().map(str::to_owned).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: EnvLookup<'_>) -> Result<AddonConfig, String> {
        AddonConfig::from_manifest(toml::from_str(text).unwrap(), env)
    }

    #[test]
    fn strings_stay_strings_and_the_rest_becomes_json() {
        let config = parse(
            r#"
            model = "gpt"
            turns = 10
            on = true
            faq = [{ keywords = ["ship"], answer = "3 days" }]
            "#,
            &|_| None,
        )
        .unwrap();
        assert_eq!(config.get("model"), Some("gpt"));
        assert_eq!(config.get("turns"), Some("10"));
        assert_eq!(config.get("on"), Some("true"));
        assert_eq!(config.get("faq"), Some(r#"[{"answer":"3 days","keywords":["ship"]}]"#));
        assert_eq!(config.get("absent"), None);
        assert_eq!(config.keys().collect::<Vec<_>>(), ["faq", "model", "on", "turns"]);
    }

    #[test]
    fn env_references_resolve_and_never_print() {
        let env = |name: &str| (name == "API_KEY").then(|| "sk-secret".to_owned());
        let config = parse(
            r#"api_key = { env = "API_KEY" }
                              other = { env = "UNSET_VAR" }"#,
            &env,
        )
        .unwrap();
        assert_eq!(config.get("api_key"), Some("sk-secret"));
        assert_eq!(config.get("other"), None);
        assert_eq!(config.missing_env, [("other".to_owned(), "UNSET_VAR".to_owned())]);
        let shown = format!("{config:?} {}", config.describe().join(" "));
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("$API_KEY") && shown.contains("$UNSET_VAR"), "{shown}");
    }

    #[test]
    fn malformed_env_references_name_the_key() {
        for text in [
            r#"k = { env = 5 }"#,
            r#"k = { env = "A", x = 1 }"#,
            r#"k = { env = "9X" }"#,
            r#"k = { env = "A-B" }"#,
        ] {
            let err = parse(text, &|_| None).unwrap_err();
            assert!(err.contains("config.k"), "{text}: {err}");
        }
    }
}
