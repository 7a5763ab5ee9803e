//! Streamed replies from an OpenAI-compatible `/v1/chat/completions` endpoint.
//!
//! The request asks for `stream: true`; the response is Server-Sent Events, one JSON
//! chunk per event, ending with `data: [DONE]`. Each delta is handed to `on_delta` the
//! moment its event is parsed, so the client sees text while the model still writes.
//!
//! Every way the upstream can fail ends in an [`UpstreamError`] with a message fit for
//! the client: refused, timed out, an HTTP error status, a malformed event, or a stream
//! that ends before `[DONE]`.

use std::fmt;

use serde_json::{Value, json};
use sockhost_addon_sdk::http::{HttpErrorKind, Request};
use sockhost_addon_sdk::sse::SseParser;

use crate::history::Turn;
use crate::settings::LlmSettings;

/// Why a reply could not be completed.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamError(pub String);

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Asks the model for the next reply in `history` + `question`, streaming deltas; the
/// full text once the model has finished. It never stops early: a reply whose client
/// has gone is still kept for a resume (`crate::reply`).
pub fn stream_reply(
    llm: &LlmSettings,
    history: &[Turn],
    question: &str,
    mut on_delta: impl FnMut(&str),
) -> Result<String, UpstreamError> {
    let mut messages = vec![json!({"role": "system", "content": llm.system_prompt})];
    messages.extend(history.iter().map(|t| json!({"role": t.role, "content": t.content})));
    messages.push(json!({"role": "user", "content": question}));
    let mut body = json!({"model": llm.model, "messages": messages, "stream": true});
    if let Some(temperature) = llm.temperature {
        body["temperature"] = json!(temperature);
    }

    let mut request = Request::post(&llm.completions_url()).header("accept", "text/event-stream").json(&body);
    if let Some(key) = &llm.api_key {
        request = request.header("authorization", &format!("Bearer {key}"));
    }
    let mut response = request.send().map_err(|err| {
        let what = match err.kind {
            HttpErrorKind::Denied => "the language model's host is not in this addon's outbound_hosts",
            HttpErrorKind::Timeout => "the language model did not answer in time",
            HttpErrorKind::Connect => "cannot reach the language model",
            _ => "the request to the language model failed",
        };
        UpstreamError(format!("{what} ({err})"))
    })?;

    if response.status() != 200 {
        let status = response.status();
        let body = response.into_bytes(16 * 1024).unwrap_or_default();
        return Err(UpstreamError(format!(
            "the language model answered HTTP {status}: {}",
            error_detail(&body)
        )));
    }

    let mut parser = SseParser::new();
    let mut full = String::new();
    let mut finished = false;
    while let Some(chunk) = response.next_chunk() {
        let chunk =
            chunk.map_err(|err| UpstreamError(format!("the language model's stream broke off: {err}")))?;
        let events = parser
            .feed(&chunk)
            .map_err(|err| UpstreamError(format!("malformed stream from the language model: {err}")))?;
        for event in events {
            if event.data.trim() == "[DONE]" {
                return Ok(full);
            }
            let (delta, done) = parse_chunk(&event.data)?;
            if !delta.is_empty() {
                full.push_str(&delta);
                on_delta(&delta);
            }
            finished |= done;
        }
    }
    // Some servers end with a finish_reason and no [DONE]; a stream with neither was cut.
    if finished && !parser.has_partial_event() {
        Ok(full)
    } else {
        Err(UpstreamError("the language model's stream ended before the reply was complete".into()))
    }
}

/// The text delta of one streamed chunk, and whether it carries a finish reason.
fn parse_chunk(data: &str) -> Result<(String, bool), UpstreamError> {
    let value: Value = serde_json::from_str(data)
        .map_err(|err| UpstreamError(format!("malformed event from the language model: {err}")))?;
    if let Some(error) = value.get("error") {
        return Err(UpstreamError(format!("the language model reported an error: {}", error_message(error))));
    }
    let Some(choice) = value.get("choices").and_then(|c| c.get(0)) else {
        // Usage-only or keep-alive chunks carry no choice.
        return Ok((String::new(), false));
    };
    let delta = choice.pointer("/delta/content").and_then(Value::as_str).unwrap_or_default().to_owned();
    let done = choice.get("finish_reason").is_some_and(|r| !r.is_null());
    Ok((delta, done))
}

fn error_message(error: &Value) -> String {
    let text = error.get("message").and_then(Value::as_str).map_or_else(|| error.to_string(), str::to_owned);
    text.chars().take(200).collect()
}

/// A short reason from an error response body: the OpenAI `error.message` when there is
/// one, else the start of the body.
fn error_detail(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body)
        && let Some(error) = value.get("error")
    {
        return error_message(error);
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.trim().chars().take(200).collect();
    if text.is_empty() { "(no details)".into() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_and_finish_reasons_are_read_from_chunks() {
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"你好"},"finish_reason":null}]}"#;
        assert_eq!(parse_chunk(chunk).unwrap(), ("你好".to_owned(), false));
        let last = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert_eq!(parse_chunk(last).unwrap(), (String::new(), true));
        assert_eq!(
            parse_chunk(r#"{"usage":{"total_tokens":3},"choices":[]}"#).unwrap(),
            (String::new(), false)
        );
    }

    #[test]
    fn malformed_and_error_chunks_are_upstream_errors() {
        assert!(parse_chunk("{not json").unwrap_err().0.contains("malformed"));
        let err = parse_chunk(r#"{"error":{"message":"overloaded"}}"#).unwrap_err();
        assert!(err.0.contains("overloaded"), "{err}");
    }

    #[test]
    fn error_bodies_give_a_short_reason() {
        assert_eq!(
            error_detail(br#"{"error":{"message":"invalid api key","type":"auth"}}"#),
            "invalid api key"
        );
        assert_eq!(error_detail(b"  Bad Gateway \n"), "Bad Gateway");
        assert_eq!(error_detail(b""), "(no details)");
    }
}
