//! TOML errors described without the file's text.
//!
//! `sockhost.toml` and addon manifests sit beside secrets, and a typo is enough to put
//! one in an error: `toml`'s `Display` quotes the whole offending line (`api_key =
//! sk-live-…` is invalid TOML; `jwt_hs256_secert = "…"` is an unknown key), and serde's
//! messages quote the value itself (`invalid type: string "sk-live-…", expected u64`).
//! Those errors reach the start-up log, the hot-reload log and `sockhost check`, whose
//! output ends up in log collectors and CI logs. So an error is described here by what
//! locates it (line, column, key) and by the message with every quoted value replaced
//! by `"…"`; the text of the file is never copied. Names from our own schema stay: the
//! unknown or missing *field* (a key, which is what the operator needs to fix) and what
//! was *expected*.

use std::fmt::Write as _;

/// `line L, column C, key `a.b`: message`, with no text taken from the file except the
/// key's name. `text` is what was parsed; the span in `err` points into it.
pub(crate) fn describe(err: &toml::de::Error, text: &str) -> String {
    let mut out = String::new();
    let mut key = error_key(err);
    if let Some(span) = err.span() {
        let at = floor_char_boundary(text, span.start);
        let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
        let line = text[..line_start].matches('\n').count() + 1;
        let column = text[line_start..at].chars().count() + 1;
        let _ = write!(out, "line {line}, column {column}");
        if key.is_none() {
            key = statement_key(text, line_start);
        }
    }
    if let Some(key) = key {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "key `{key}`");
    }
    if !out.is_empty() {
        out.push_str(": ");
    }
    let values = err.span().map(|span| span_values(text, span)).unwrap_or_default();
    out.push_str(&without_values(err.message().trim(), &values));
    out
}

/// The dotted path `toml` keeps for errors found while deserialising. It has no getter:
/// without the input, its `Display` is the message and then `in `a.b``.
fn error_key(err: &toml::de::Error) -> Option<String> {
    let mut bare = err.clone();
    bare.set_input(None);
    let shown = bare.to_string();
    let rest = shown.strip_prefix(err.message())?;
    let table = rest.trim().strip_prefix("in `")?.strip_suffix('`')?;
    // For an unknown field the path is the table's; the field is in the message.
    let field = err.message().strip_prefix("unknown field `").and_then(|rest| rest.split_once('`'));
    match field {
        Some((field, _)) if table.is_empty() => Some(field.to_owned()),
        Some((field, _)) => Some(format!("{table}.{field}")),
        None => (!table.is_empty()).then(|| table.to_owned()),
    }
}

/// For a syntax error on a `key = value` line: the key, with the table it is in. Only a
/// line that starts a statement counts (the text before it parses on its own, so it is
/// not inside a multi-line string or array, whose text would be a value), and only a bare
/// key (letters, digits, `_`, `-`, dotted).
fn statement_key(text: &str, line_start: usize) -> Option<String> {
    let line_end = text[line_start..].find('\n').map_or(text.len(), |n| line_start + n);
    let (key, _) = text[line_start..line_end].split_once('=')?;
    let parts: Vec<&str> = key.split('.').map(str::trim).collect();
    let bare = |part: &&str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !parts.iter().all(bare) {
        return None;
    }
    // Where a statement on this line would land: a probe key put there, found again.
    const PROBE: &str = "__sockhost_probe__";
    let probe = format!("{}\n{PROBE} = 0\n", &text[..line_start]);
    let table: toml::Table = toml::from_str(&probe).ok()?;
    let mut path = find_key(&table, PROBE)?;
    path.pop();
    path.extend(parts.iter().map(|part| (*part).to_owned()));
    Some(path.join("."))
}

/// The path to `wanted` in `table`, looking into tables and into the last table of
/// arrays of tables (where a statement after `[[x]]` lands).
fn find_key(table: &toml::Table, wanted: &str) -> Option<Vec<String>> {
    for (key, value) in table {
        if key == wanted {
            return Some(vec![key.clone()]);
        }
        let inner = match value {
            toml::Value::Table(inner) => Some(inner),
            toml::Value::Array(items) => items.last().and_then(toml::Value::as_table),
            _ => None,
        };
        if let Some(mut path) = inner.and_then(|inner| find_key(inner, wanted)) {
            path.insert(0, key.clone());
            return Some(path);
        }
    }
    None
}

/// `message` with the values it quotes replaced by `…`. First every string among
/// `values` (what the error's span covers in the file, so whatever the message quotes
/// from it) wherever it occurs; then, as a second net, every `"…"` (serde quotes strings
/// with `{:?}`, so `\"` may occur inside) and every `` `…` `` before "expected" (serde's
/// `integer `5``, `unknown variant `x``), except a field's name. After "expected" come
/// names from our schema or the TOML grammar, in backticks, which stay.
pub(crate) fn without_values(message: &str, values: &[String]) -> String {
    let mut message = message.to_owned();
    for value in values.iter().filter(|value| value.chars().count() >= 3) {
        message = message.replace(value.as_str(), "…");
    }
    let mut out = String::with_capacity(message.len());
    let mut after_expected = false;
    let mut rest = message.as_str();
    while let Some(c) = rest.chars().next() {
        let done = out.len();
        match c {
            '"' => {
                out.push_str("\"…\"");
                let mut escaped = false;
                let mut end = rest.len();
                for (i, c) in rest.char_indices().skip(1) {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        _ => {}
                    }
                }
                rest = &rest[end..];
            }
            '`' => {
                let end = rest[1..].find('`').map_or(rest.len(), |n| n + 2);
                if after_expected || out.ends_with("field ") {
                    out.push_str(&rest[..end]);
                } else {
                    out.push_str("`…`");
                }
                rest = &rest[end..];
            }
            _ => {
                if rest.starts_with("expected") {
                    after_expected = true;
                }
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        debug_assert!(out.len() > done);
    }
    out
}

/// The strings in the value that `span` covers in `text`, if it covers a value (for an
/// unknown field it covers the key, whose name the message should keep).
fn span_values(text: &str, span: std::ops::Range<usize>) -> Vec<String> {
    fn collect(value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(items) => items.iter().for_each(|item| collect(item, out)),
            toml::Value::Table(table) => table.values().for_each(|item| collect(item, out)),
            _ => {}
        }
    }
    let Some(raw) = text.get(span) else { return Vec::new() };
    let mut values = Vec::new();
    if let Ok(table) = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        && let Some(value) = table.get("v")
    {
        collect(value, &mut values);
    }
    values
}

fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        port: Option<u16>,
        name: Option<String>,
        format: Option<Format>,
        auth: Option<Auth>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Format {
        Text,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Auth {
        secret_env: Option<String>,
        leeway_s: Option<u64>,
    }

    fn error(text: &str) -> String {
        let err = toml::from_str::<File>(text).unwrap_err();
        describe(&err, text)
    }

    const SECRET: &str = "sk-live-SECRET";

    #[test]
    fn an_unknown_key_is_located_and_named_without_its_value() {
        let text = format!("port = 1\n[auth]\nsecret_evn = \"{SECRET}\"\n");
        let err = error(&text);
        assert!(
            err.starts_with("line 3, column 1, key `auth.secret_evn`: unknown field `secret_evn`"),
            "{err}"
        );
        assert!(err.contains("expected `secret_env`"), "{err}");
        assert!(!err.contains(SECRET), "{err}");
    }

    #[test]
    fn invalid_toml_is_located_and_named_without_the_line() {
        let text = format!("port = 1\n\n[auth]\nleeway_s = 3\nsecret_env = {SECRET}\n");
        let err = error(&text);
        assert!(err.starts_with("line 5, column 14, key `auth.secret_env`: "), "{err}");
        assert!(!err.contains("SECRET") && !err.contains("sk-live"), "{err}");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_not_quoted() {
        let err = error(&format!("port = \"{SECRET}\""));
        assert!(err.starts_with("line 1, column 8, key `port`: invalid type: string"), "{err}");
        assert!(err.contains("expected u16"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let err = error(&format!("format = \"{SECRET}\""));
        assert!(err.contains("key `format`") && err.contains("expected `text`"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        // Values that would fool a scan of the message alone: found in the file and cut.
        for value in ["a`SECRET, expected `SECRET", "SECRET expected SECRET", "x\\\"SECRET"] {
            let text = format!("format = \"{value}\"\nport = \"{value}\"");
            let err = error(&text);
            assert!(!err.contains("SECRET"), "{text}: {err}");
            let text = format!("port = \"{value}\"");
            let err = error(&text);
            assert!(!err.contains("SECRET"), "{text}: {err}");
        }
    }

    #[test]
    fn quoted_values_are_replaced_wherever_they_are() {
        assert_eq!(
            without_values(r#"invalid type: string "a \"b\" c", expected u64"#, &[]),
            r#"invalid type: string "…", expected u64"#
        );
        assert_eq!(
            without_values("invalid value: integer `70000`, expected u16", &[]),
            "invalid value: integer `…`, expected u16"
        );
        assert_eq!(
            without_values("unknown variant `sk-live`, expected `text` or `json`", &[]),
            "unknown variant `…`, expected `text` or `json`"
        );
        assert_eq!(without_values("missing field `key`", &[]), "missing field `key`");
        assert_eq!(without_values("\"unterminated secret", &[]), "\"…\"");
        assert_eq!(without_values("`unterminated secret", &[]), "`…`");
        assert_eq!(without_values("expected \"x\"", &[]), "expected \"…\"");
    }

    #[test]
    fn a_line_inside_a_multi_line_string_names_no_key() {
        // The error is inside the string's text, which looks like `key = value`.
        let text = "name = \"\"\"\nsecret = abc \\q\n\"\"\"\n";
        let err = error(text);
        assert!(err.starts_with("line 2, column "), "{err}");
        assert!(!err.contains("key `"), "{err}");
    }

    #[test]
    fn keys_in_arrays_of_tables_and_dotted_keys_are_named() {
        let text = "[[jobs]]\nx = 1\n[[jobs]]\na.b = bare\n";
        let err = toml::from_str::<toml::Table>(text).unwrap_err();
        assert!(
            describe(&err, text).starts_with("line 4, column 7, key `jobs.a.b`"),
            "{}",
            describe(&err, text)
        );
    }
}
