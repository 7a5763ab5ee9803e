//! Replies that outlive their socket: numbered chunks, kept and published while they are
//! produced, so a client whose connection dropped mid-answer resumes where it was, on any
//! node.
//!
//! - **Numbering.** Every `chat` chunk of a reply carries `"reply_id"` (the same for all its
//!   chunks) and `"seq"`, counting from 1; the closing `complete:true` chunk has the next
//!   `seq`. Clients that ignore both fields work as before.
//! - **Keeping** ([`ReplyWriter`]). The connection producing a reply goes on when its client
//!   has gone (the manifest's `orphan_callback_grace_ms` lets the callback finish). It keeps
//!   the chunks in kv under `reply/<id>`, one record naming the user and session it belongs
//!   to, with a TTL (`reply_ttl_s`, default 600: ten minutes). The record is written in batches, at
//!   most every [`FLUSH_CHUNKS`] chunks or [`FLUSH_INTERVAL`], not one durable commit per
//!   chunk. Each chunk is also published on the channel `reply:<id>` for resumed clients.
//! - **Resuming** ([`Follower`]). `{"action":"resume","token":..,"session_id":..,
//!   "reply_id":..,"after_seq":17}` subscribes to `reply:<id>` first, then reads the record:
//!   chunks 18 onwards from storage, then the live rest from the channel, then `complete`.
//!   Each message on the channel carries every chunk the record does not hold yet (at
//!   most one batch), so whatever a follower misses between the record it read and the
//!   first live message is in that message, or in the record when the producer stored a
//!   batch meanwhile (it stores before it publishes). Nothing is duplicated, nothing is
//!   missing, and the order holds. Chunks produced before the follower subscribed and not
//!   yet stored reach it with the producer's next chunk, or with `complete`; the producer
//!   also stores at once, chunk by chunk, once its client has gone.
//!
//! The record is keyed by the reply alone, not by the conversation, so that a resume of
//! another user's reply is told `unauthorized` rather than `reply_expired`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sockhost_addon_sdk::protocol::send_error;
use sockhost_addon_sdk::{Message, channels, kv, log, send_json};

use crate::codes;

/// A batch is stored once it holds this many chunks...
pub const FLUSH_CHUNKS: usize = 16;
/// ...or once this long has passed since the last store, whichever comes first.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Longest `reply_id` a resume may name (those aikefu makes are 32 hex digits).
const MAX_REPLY_ID_BYTES: usize = 64;

/// The kv key of a kept reply.
fn key(reply_id: &str) -> String {
    format!("reply/{reply_id}")
}

/// The channel a reply's chunks are published on.
pub fn channel(reply_id: &str) -> String {
    format!("reply:{reply_id}")
}

/// The reply id a `reply:<id>` channel belongs to.
pub fn reply_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("reply:")
}

/// Whether `reply_id` can name a reply: what [`new_reply_id`] makes, or at least something
/// that fits a kv key and a channel name.
pub fn valid_reply_id(reply_id: &str) -> bool {
    !reply_id.is_empty()
        && reply_id.len() <= MAX_REPLY_ID_BYTES
        && reply_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `halves` × 64 bits from the standard library's randomly keyed hasher (seeded from
/// `wasi:random`), as hex: reply ids (two halves) and the hand-over's claim tokens (one).
/// Only the owner check guards a reply; an id need only not collide.
pub fn random_hex(halves: usize) -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (0..halves)
        .map(|_| {
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u128(nanos.as_nanos());
            format!("{:016x}", hasher.finish())
        })
        .collect()
}

/// A new reply id: 32 hex digits.
fn new_reply_id() -> String {
    random_hex(2)
}

/// A kept reply, as stored in kv.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Kept {
    /// The verified user it was produced for: only they may resume it.
    pub user: String,
    pub session_id: String,
    /// Chunk `seq` is `chunks[seq - 1]`.
    pub chunks: Vec<String>,
    /// The reply is over: `complete` (or `error`) follows the last chunk.
    pub done: bool,
    /// When the reply ended with an error frame instead: its code and message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<(String, String)>,
}

/// A chat frame of a numbered reply: the seed's chat chunk with `reply_id` and `seq`.
#[derive(Serialize)]
struct ChatFrame<'a> {
    r#type: &'static str,
    message: &'a str,
    session_id: &'a str,
    complete: bool,
    reply_id: &'a str,
    seq: u64,
}

fn send_chunk(session_id: &str, reply_id: &str, seq: u64, text: &str, complete: bool) -> bool {
    send_json(&ChatFrame { r#type: "chat", message: text, session_id, complete, reply_id, seq }).is_ok()
}

/// What the producer publishes on `reply:<id>` with each chunk, and once at the end: the
/// chunks from `from` on that the stored record may not hold yet (the newest last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveChunks {
    /// The `seq` of `chunks[0]`; for the end, the `seq` of the `complete` chunk.
    pub from: u64,
    #[serde(default)]
    pub chunks: Vec<String>,
    /// The reply is over: `complete` follows the chunks.
    #[serde(default)]
    pub complete: bool,
    /// The reply ended with this error (code, message) instead of `complete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<(String, String)>,
}

impl LiveChunks {
    fn ends(&self) -> bool {
        self.complete || self.error.is_some()
    }
}

/// Streams one reply to the client while keeping and publishing it.
pub struct ReplyWriter {
    id: String,
    ttl: Duration,
    kept: Kept,
    /// Chunks already in the stored record.
    stored: usize,
    last_store: Instant,
    /// The client stopped taking frames: the reply goes on for a later resume.
    client_gone: bool,
    /// Storing or publishing failed once: logged, then not tried again for this reply.
    store_failed: bool,
    publish_failed: bool,
}

impl ReplyWriter {
    /// Starts a reply for `user`'s `session_id` and stores its empty record, so a client
    /// that drops before the first batch can already resume it. With `keep` off
    /// (`keep_replies = false`) the chunks are still numbered but neither stored nor
    /// published: a resume then gets `reply_expired`.
    pub fn start(user: &str, session_id: &str, ttl: Duration, keep: bool) -> ReplyWriter {
        let mut writer = ReplyWriter {
            id: new_reply_id(),
            ttl,
            kept: Kept { user: user.to_owned(), session_id: session_id.to_owned(), ..Kept::default() },
            stored: 0,
            last_store: Instant::now(),
            client_gone: false,
            store_failed: !keep,
            publish_failed: !keep,
        };
        writer.store();
        writer
    }

    /// Sends, keeps and publishes the next chunk.
    pub fn chunk(&mut self, text: &str) {
        self.kept.chunks.push(text.to_owned());
        let seq = self.kept.chunks.len() as u64;
        if !self.client_gone {
            self.client_gone = !send_chunk(&self.kept.session_id, &self.id, seq, text, false);
        }
        // Stored before it is published, so what the record lacks is in the message (see
        // the module doc). Without a client, every chunk is stored: a resume is coming.
        if self.client_gone
            || self.kept.chunks.len() - self.stored >= FLUSH_CHUNKS
            || self.last_store.elapsed() >= FLUSH_INTERVAL
        {
            self.store();
        }
        // At most a batch: a record that cannot be stored does not grow every message.
        let len = self.kept.chunks.len();
        let from = self.stored.max(len.saturating_sub(FLUSH_CHUNKS)).min(len - 1);
        self.publish(&LiveChunks {
            from: from as u64 + 1,
            chunks: self.kept.chunks[from..].to_vec(),
            complete: false,
            error: None,
        });
    }

    /// Ends the reply with the `complete` chunk.
    pub fn finish(mut self) {
        self.kept.done = true;
        self.store();
        let seq = self.kept.chunks.len() as u64 + 1;
        if !self.client_gone {
            self.client_gone = !send_chunk(&self.kept.session_id, &self.id, seq, "", true);
        }
        self.publish(&LiveChunks { from: seq, chunks: Vec::new(), complete: true, error: None });
    }

    /// Ends the reply with an error frame instead of `complete`.
    pub fn fail(mut self, code: &str, message: &str) {
        self.kept.done = true;
        self.kept.error = Some((code.to_owned(), message.to_owned()));
        self.store();
        if !self.client_gone {
            self.client_gone = send_error(code, message).is_err();
        }
        let seq = self.kept.chunks.len() as u64 + 1;
        let error = Some((code.to_owned(), message.to_owned()));
        self.publish(&LiveChunks { from: seq, chunks: Vec::new(), complete: false, error });
    }

    fn store(&mut self) {
        self.last_store = Instant::now();
        if self.store_failed {
            return;
        }
        let bytes = serde_json::to_vec(&self.kept).expect("a kept reply serializes");
        match kv::set_with_ttl(&key(&self.id), &bytes, self.ttl) {
            Ok(()) => self.stored = self.kept.chunks.len(),
            Err(err) => {
                self.store_failed = true;
                log::warn(&format!("reply {} cannot be kept for a resume: {err}", self.id));
            }
        }
    }

    fn publish(&mut self, chunk: &LiveChunks) {
        if self.publish_failed {
            return;
        }
        if let Err(err) = channels::publish_json(&channel(&self.id), chunk) {
            self.publish_failed = true;
            log::warn(&format!("reply {} is not published for resumed clients: {err}", self.id));
        }
    }
}

/// Why a resume was refused: an error frame's code and message.
pub type Refused = (&'static str, String);

/// Reads a kept reply for `user`: [`codes::REPLY_EXPIRED`] when there is none (never
/// made, or past its TTL), [`codes::UNAUTHORIZED`] when it is another user's.
pub fn load(reply_id: &str, user: &str) -> Result<Kept, Refused> {
    let expired =
        || (codes::REPLY_EXPIRED, format!("reply {reply_id} is unknown or expired; send the question again"));
    if !valid_reply_id(reply_id) {
        return Err(expired());
    }
    let kept: Kept = match kv::get_json(&key(reply_id)) {
        Ok(Some(kept)) => kept,
        Ok(None) => return Err(expired()),
        Err(err) => {
            log::error(&format!("reading kept reply {reply_id} failed: {err}"));
            return Err((codes::STORAGE_ERROR, "kept replies are unavailable; please try again".into()));
        }
    };
    if kept.user != user {
        return Err((codes::UNAUTHORIZED, format!("reply {reply_id} belongs to another user")));
    }
    Ok(kept)
}

/// A connection resuming a reply that is still being produced: it forwards the live
/// chunks in order. Saved with the connection's state when it hibernates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Follower {
    pub reply_id: String,
    pub session_id: String,
    /// The `seq` the client gets next.
    pub next_seq: u64,
}

/// Starts a resume of `reply_id` for `user` after `after_seq`: sends what is kept, and
/// returns a follower when the reply is still being produced. Subscribes before it reads
/// the record, so no chunk falls between the two.
pub fn resume(reply_id: &str, user: &str, after_seq: u64) -> Result<Option<Follower>, Refused> {
    let kept = load(reply_id, user)?;
    let following = !kept.done;
    let kept = if following {
        if let Err(err) = channels::subscribe(&channel(reply_id)) {
            log::error(&format!("resuming reply {reply_id}: cannot follow its channel: {err}"));
            return Err((
                codes::STORAGE_ERROR,
                format!("the live rest of reply {reply_id} cannot be followed: {err}"),
            ));
        }
        // Read again now that the channel is followed: what was stored meanwhile is here.
        match load(reply_id, user) {
            Ok(kept) => kept,
            Err(refused) => {
                channels::unsubscribe(&channel(reply_id));
                return Err(refused);
            }
        }
    } else {
        kept
    };
    let mut follower = Follower {
        reply_id: reply_id.to_owned(),
        session_id: kept.session_id.clone(),
        next_seq: after_seq.saturating_add(1),
    };
    if follower.send_kept(&kept) {
        if following {
            channels::unsubscribe(&channel(reply_id));
        }
        return Ok(None);
    }
    Ok(Some(follower))
}

impl Follower {
    /// Sends the kept chunks from `next_seq` on, and the end if the record has it;
    /// whether the reply is over for this client.
    fn send_kept(&mut self, kept: &Kept) -> bool {
        while let Some(text) = kept.chunks.get((self.next_seq - 1) as usize) {
            send_chunk(&self.session_id, &self.reply_id, self.next_seq, text, false);
            self.next_seq += 1;
        }
        if kept.done && self.next_seq > kept.chunks.len() as u64 {
            self.send_end(kept.chunks.len() as u64 + 1, kept.error.as_ref());
            return true;
        }
        false
    }

    fn send_end(&self, seq: u64, error: Option<&(String, String)>) {
        match error {
            Some((code, message)) => {
                let _ = send_error(code, message);
            }
            None => {
                send_chunk(&self.session_id, &self.reply_id, seq, "", true);
            }
        }
    }

    /// A message on the reply's channel; whether the reply is over for this client (the
    /// caller then unsubscribes and drops the follower).
    pub fn on_live(&mut self, msg: Message, user: &str) -> bool {
        let Message::Text(text) = msg else { return false };
        let live: LiveChunks = match serde_json::from_str(&text) {
            Ok(live) => live,
            Err(err) => {
                log::warn(&format!("reply {}: a live message that is not one: {err}", self.reply_id));
                return false;
            }
        };
        if live.from > self.next_seq {
            // The producer stored the chunks in between before it published this.
            match load(&self.reply_id, user) {
                Ok(kept) => {
                    if self.send_kept(&kept) {
                        return true;
                    }
                }
                Err((_, why)) => log::warn(&format!("resuming reply {}: {why}", self.reply_id)),
            }
        }
        for (seq, text) in (live.from..).zip(&live.chunks) {
            if seq == self.next_seq {
                send_chunk(&self.session_id, &self.reply_id, seq, text, false);
                self.next_seq += 1;
            }
        }
        if live.ends() && self.next_seq >= live.from {
            self.send_end(live.from, live.error.as_ref());
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_ids_are_32_hex_digits_and_differ() {
        let (a, b) = (new_reply_id(), new_reply_id());
        assert_eq!(a.len(), 32);
        assert!(valid_reply_id(&a) && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn only_ids_that_fit_a_key_and_a_channel_are_valid() {
        assert!(valid_reply_id("0123abcdef"));
        for bad in ["", "a/b", "a:b", "a b", "回复", &"a".repeat(65)] {
            assert!(!valid_reply_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn live_chunks_round_trip_and_the_end_is_marked() {
        let live =
            LiveChunks { from: 3, chunks: vec!["你".into(), "好".into()], complete: false, error: None };
        let text = serde_json::to_string(&live).unwrap();
        assert_eq!(serde_json::from_str::<LiveChunks>(&text).unwrap(), live);
        assert!(!live.ends());
        let done: LiveChunks = serde_json::from_str(r#"{"from":5,"complete":true}"#).unwrap();
        assert!(done.ends());
        assert_eq!(channel("ab12"), "reply:ab12");
        assert_eq!(reply_of_channel("reply:ab12"), Some("ab12"));
        assert_eq!(reply_of_channel("user:42"), None);
    }
}
