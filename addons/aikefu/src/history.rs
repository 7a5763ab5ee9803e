//! Conversation memory: the last turns of each (user, session) in kv.
//!
//! The key holds the verified user, so a client that knows another user's session id
//! still cannot read or continue that conversation: its own user names a different key.
//! A reply is stored only once it is complete; a failed or cut reply leaves the history
//! as it was, so the next turn never builds on half an answer. Turns are added with a
//! compare-and-swap ([`record`]), so concurrent replies on one session all land.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use sockhost_addon_sdk::kv::{self, KvError};

/// One message of a conversation, in the chat-completions shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// The kv key of a conversation. Both parts are escaped, so `/` in an id cannot make two
/// different (user, session) pairs share a key.
pub fn key(user: &str, session_id: &str) -> String {
    format!("history/{}/{}", escape(user), escape(session_id))
}

fn escape(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The stored conversation; empty when there is none.
pub fn load(key: &str) -> Result<Vec<Turn>, KvError> {
    Ok(kv::get_json(key)?.unwrap_or_default())
}

/// Appends a completed exchange and keeps the last `max_turns` exchanges.
pub fn append(mut turns: Vec<Turn>, question: &str, answer: &str, max_turns: usize) -> Vec<Turn> {
    turns.push(Turn { role: "user".into(), content: question.into() });
    turns.push(Turn { role: "assistant".into(), content: answer.into() });
    let keep = max_turns * 2;
    if turns.len() > keep {
        turns.drain(..turns.len() - keep);
    }
    turns
}

/// The kv key of a user's list of sessions, least recently used first.
pub fn sessions_key(user: &str) -> String {
    format!("sessions/{}", escape(user))
}

/// Notes that `user` used `session_id` now, and forgets the user's least recently used
/// conversations beyond `max`. Returns the sessions it forgot.
pub fn touch_session(
    user: &str,
    session_id: &str,
    max: usize,
    ttl: Duration,
) -> Result<Vec<String>, KvError> {
    let mut forgotten = Vec::new();
    kv::update_json(&sessions_key(user), Some(ttl), |sessions: Option<Vec<String>>| {
        let mut sessions = sessions.unwrap_or_default();
        sessions.retain(|s| s != session_id);
        sessions.push(session_id.to_owned());
        let over = sessions.len().saturating_sub(max);
        forgotten = sessions.drain(..over).collect();
        sessions
    })?;
    for session in &forgotten {
        kv::delete(&key(user, session))?;
    }
    Ok(forgotten)
}

/// Adds a completed exchange to the stored conversation, keeping the last `max_turns`
/// exchanges; it expires after `ttl` without a new turn. The exchange is added to what
/// is stored *now*, with a compare-and-swap: two connections on one session (two
/// phones, or a retry on another node) each keep their turns instead of the later
/// write dropping the other's.
pub fn record(
    key: &str,
    question: &str,
    answer: &str,
    max_turns: usize,
    ttl: Duration,
) -> Result<(), KvError> {
    kv::update_json(key, Some(ttl), |stored: Option<Vec<Turn>>| {
        append(stored.unwrap_or_default(), question, answer, max_turns)
    })
    .map(drop)
}

/// Adds one message to the stored conversation (a hand-over's turns come one at a time),
/// keeping the last `max_turns` exchanges' worth of messages.
pub fn append_turn(key: &str, turn: Turn, max_turns: usize, ttl: Duration) -> Result<(), KvError> {
    kv::update_json(key, Some(ttl), |stored: Option<Vec<Turn>>| {
        let mut turns = stored.unwrap_or_default();
        turns.push(turn.clone());
        let keep = max_turns * 2;
        if turns.len() > keep {
            turns.drain(..turns.len() - keep);
        }
        turns
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_collide_through_slashes() {
        assert_ne!(key("a/b", "c"), key("a", "b/c"));
        assert_ne!(key("a%2Fb", "c"), key("a/b", "c"));
        assert_eq!(key("u1", "session_123"), "history/u1/session_123");
    }

    #[test]
    fn only_the_last_turns_are_kept() {
        let mut turns = Vec::new();
        for i in 0..5 {
            turns = append(turns, &format!("q{i}"), &format!("a{i}"), 2);
        }
        let contents: Vec<_> = turns.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(contents, ["q3", "a3", "q4", "a4"]);
        assert_eq!(turns[0].role, "user");
    }
}
