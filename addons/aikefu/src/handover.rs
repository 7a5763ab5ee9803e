//! Hand-over to a human agent (转人工): a customer asks for a person, an agent claims the
//! conversation, they talk through the host's channels (so customer and agent may be on
//! different nodes), and the agent gives it back to the bot.
//!
//! - **Asking.** `{"action":"agent",...}`, or a chat message holding one of the
//!   `agent_keywords` (default 人工, 转人工, human), stores the conversation as waiting in
//!   kv (`handover/<conversation>`) and announces it on the channel `agents`, with its last
//!   messages. The customer is told it waits; the bot keeps answering until an agent
//!   claims it.
//! - **Agents** connect to `/ws/aikefu?role=agent&token=...`. The token must verify and
//!   its claim `agent_role_claim` (default `role`) must be, or list, `agent_role_value`
//!   (default `agent`); otherwise the connection gets an `unauthorized` error frame and
//!   is closed (1008). An agent's connection follows `agents` and gets the waiting queue
//!   at once, then every change to it.
//! - **Claiming** (`{"action":"claim","session_id":...,"user":...}`, `user` needed only
//!   when two customers wait with the same session id) swaps the record from waiting to
//!   held with kv's compare-and-swap, so the first claim wins on every node; the others
//!   get `already_claimed`. The winner gets the conversation's history.
//! - **Talking.** Both sides follow `handover:<conversation>`. A customer message goes to
//!   the agent (`from: customer`) and into the history; the model stays silent. An agent's
//!   `{"action":"reply","session_id":...,"message":...}` reaches the customer as a
//!   `complete` chat chunk with `"from":"agent"` and goes into the history as the
//!   assistant's turn, so the bot continues with the whole context after a release.
//! - **Releasing.** `{"action":"release","session_id":...}`, or the agent's connection
//!   closing: after `agent_release_grace_s` (default 30) a session its connection still
//!   holds goes back to the bot, unless the same agent claimed it again from a new
//!   connection meanwhile (a claim by the agent who holds it takes it over). Either way
//!   the customer is told. The closing connection notes when it left in the record, so if
//!   its wait is cut short (a shutdown drains it), the customer's next message after the
//!   grace gives the conversation back. A node killed outright notes nothing: its
//!   conversations stay held until the record's TTL (a day without a change).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sockhost_addon_sdk::protocol::{send_error, send_system};
use sockhost_addon_sdk::{ConnectionInfo, Message, auth, channels, kv, log, send_json};

use crate::codes;
use crate::history::{self, Turn};
use crate::settings::Settings;

/// The channel every agent connection follows: the waiting queue's changes.
pub const AGENTS_CHANNEL: &str = "agents";
/// How long a hand-over record lives without a change.
const RECORD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Messages of the conversation shown with a waiting session in the queue.
const QUEUE_MESSAGES: usize = 6;

const WAITING: &str = "正在为您转接人工客服，请稍候。 Connecting you to a human agent; please wait.";
const JOINED: &str = "人工客服已接入，请问有什么可以帮您？ An agent has joined the conversation.";
const BACK_TO_BOT: &str =
    "人工客服已结束服务，智能助手将继续为您服务。 The agent has left; the assistant is back.";
const ALREADY_WITH_AGENT: &str = "人工客服正在为您服务。 An agent is already with you.";

/// A conversation's id in channel names and keys: 16 hex digits of FNV-1a over its
/// history key (user ids and session ids may hold characters a channel name may not).
pub fn conversation_id(user: &str, session_id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in history::key(user, session_id).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn record_key(conversation: &str) -> String {
    format!("handover/{conversation}")
}

/// The channel a conversation's customer and agent share.
pub fn channel(conversation: &str) -> String {
    format!("handover:{conversation}")
}

/// The conversation a `handover:<id>` channel belongs to.
pub fn conversation_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("handover:")
}

/// A conversation handed over, as kept in kv.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub user: String,
    pub session_id: String,
    /// The agent holding it; `None` while it waits.
    #[serde(default)]
    pub agent: Option<String>,
    /// The holding connection's claim token: a connection that closes releases only what
    /// it still holds (the agent may have claimed it again from another connection).
    #[serde(default)]
    pub claim: Option<String>,
    /// When the holding agent's connection closed (ms since the Unix epoch). Past the
    /// grace, the customer's next message gives the conversation back to the bot even if
    /// the closed connection could not (a shutdown cuts its wait short).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_at_ms: Option<u64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Stores `record` in place of the stored `old` bytes; whether they were still there.
fn swap(conversation: &str, old: &[u8], record: &Record) -> Result<bool, kv::KvError> {
    let new = serde_json::to_vec(record).expect("a record serializes");
    kv::compare_and_swap(&record_key(conversation), Some(old), &new, Some(RECORD_TTL))
}

/// Gives a conversation back to the bot, if its record is still `old`: deletes the record
/// and tells its customer and the agents. The comparison and the removal are one step, so
/// a claim that lands between this connection's read and its give-back stays.
fn give_back(conversation: &str, old: &[u8], record: &Record) {
    match kv::compare_and_delete(&record_key(conversation), old) {
        Ok(true) => {}
        Ok(false) => return, // changed meanwhile: someone else released or claimed it
        Err(err) => {
            log::error(&format!("hand-over {conversation} was not released: {err}"));
            return;
        }
    }
    publish(conversation, &Event::Released);
    QueueFrame::new("released", record, Vec::new()).announce();
}

fn load(conversation: &str) -> Result<Option<(Record, Vec<u8>)>, kv::KvError> {
    match kv::get(&record_key(conversation))? {
        None => Ok(None),
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(record) => Ok(Some((record, bytes))),
            Err(err) => Err(kv::KvError::Decode(err.to_string())),
        },
    }
}

/// What goes between a conversation's customer and agent connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Customer { message: String },
    Agent { message: String },
    Claimed,
    Released,
}

/// A change to the queue, on [`AGENTS_CHANNEL`] and as the agent's `queue` frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QueueFrame {
    r#type: String,
    /// `waiting`, `claimed` or `released`.
    event: String,
    session_id: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent: Option<String>,
    /// The last messages, for a waiting conversation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    messages: Vec<Turn>,
}

impl QueueFrame {
    fn new(event: &str, record: &Record, messages: Vec<Turn>) -> QueueFrame {
        QueueFrame {
            r#type: "queue".into(),
            event: event.into(),
            session_id: record.session_id.clone(),
            user: record.user.clone(),
            agent: record.agent.clone(),
            messages,
        }
    }

    fn announce(&self) {
        if let Err(err) = channels::publish_json(AGENTS_CHANNEL, self) {
            log::warn(&format!("the agents were not told of a hand-over change: {err}"));
        }
    }
}

fn publish(conversation: &str, event: &Event) {
    if let Err(err) = channels::publish_json(&channel(conversation), event) {
        log::warn(&format!("hand-over {conversation}: not delivered: {err}"));
    }
}

fn last_messages(user: &str, session_id: &str) -> Vec<Turn> {
    let mut turns = history::load(&history::key(user, session_id)).unwrap_or_default();
    let skip = turns.len().saturating_sub(QUEUE_MESSAGES);
    turns.drain(..skip);
    turns
}

fn storage_error(err: kv::KvError) -> (&'static str, String) {
    log::error(&format!("hand-over state unavailable: {err}"));
    (codes::STORAGE_ERROR, "the hand-over to an agent is unavailable; please try again".into())
}

/// Whether `message` asks for a person.
pub fn asks_for_agent(message: &str, settings: &Settings) -> bool {
    let lower = message.to_lowercase();
    settings.agent_keywords.iter().any(|k| !k.is_empty() && lower.contains(&k.to_lowercase()))
}

/// The customer's side of one connection: the conversations it follows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Customer {
    /// Conversations whose `handover:` channel this connection follows, with their
    /// session ids.
    following: Vec<(String, String)>,
}

/// What a customer's chat message becomes while its conversation is handed over.
pub enum Route {
    /// No agent holds it: the bot answers.
    Bot,
    /// Sent to the agent holding it; the bot stays silent.
    Agent,
}

impl Customer {
    fn follow(&mut self, conversation: &str, session_id: &str) {
        if self.following.iter().any(|(c, _)| c == conversation) {
            return;
        }
        match channels::subscribe(&channel(conversation)) {
            Ok(()) => self.following.push((conversation.to_owned(), session_id.to_owned())),
            Err(err) => log::warn(&format!("hand-over {conversation}: cannot follow it: {err}")),
        }
    }

    fn unfollow(&mut self, conversation: &str) {
        if let Some(at) = self.following.iter().position(|(c, _)| c == conversation) {
            self.following.remove(at);
            channels::unsubscribe(&channel(conversation));
        }
    }

    /// The customer asks for a person: the conversation waits for an agent.
    pub fn ask(&mut self, user: &str, session_id: &str) -> Result<(), (&'static str, String)> {
        let conversation = conversation_id(user, session_id);
        let waiting = Record {
            user: user.into(),
            session_id: session_id.into(),
            agent: None,
            claim: None,
            left_at_ms: None,
        };
        let bytes = serde_json::to_vec(&waiting).expect("a record serializes");
        self.follow(&conversation, session_id);
        match kv::compare_and_swap(&record_key(&conversation), None, &bytes, Some(RECORD_TTL)) {
            Ok(true) => {
                let _ = send_system(WAITING);
                QueueFrame::new("waiting", &waiting, last_messages(user, session_id)).announce();
                Ok(())
            }
            // Asked before: waiting still, or an agent has it.
            Ok(false) => {
                let held =
                    load(&conversation).map_err(storage_error)?.is_some_and(|(r, _)| r.agent.is_some());
                let _ = send_system(if held { ALREADY_WITH_AGENT } else { WAITING });
                Ok(())
            }
            Err(err) => Err(storage_error(err)),
        }
    }

    /// Where a chat message of `user`'s `session_id` goes. A message for an agent is sent
    /// and kept in the history here.
    pub fn route(&mut self, user: &str, session_id: &str, message: &str, settings: &Settings) -> Route {
        let conversation = conversation_id(user, session_id);
        let (record, bytes) = match load(&conversation) {
            Ok(Some(found)) => found,
            Ok(None) => return Route::Bot,
            Err(err) => {
                log::warn(&format!("hand-over state unreadable, the bot answers: {err}"));
                return Route::Bot;
            }
        };
        // A client that reconnected follows its conversation again.
        self.follow(&conversation, session_id);
        if record.agent.is_none() {
            return Route::Bot;
        }
        let grace_ms = settings.agent_release_grace_s * 1000;
        if record.left_at_ms.is_some_and(|left| now_ms().saturating_sub(left) >= grace_ms) {
            // Its agent left and did not come back: the bot takes over, and says so.
            give_back(&conversation, &bytes, &record);
            return Route::Bot;
        }
        publish(&conversation, &Event::Customer { message: message.to_owned() });
        keep(user, session_id, "user", message, settings);
        Route::Agent
    }

    /// A message on a conversation's channel, for the customer.
    pub fn on_event(&mut self, conversation: &str, msg: Message) {
        let Some((_, session_id)) = self.following.iter().find(|(c, _)| c == conversation) else { return };
        let session_id = session_id.clone();
        match decode(msg) {
            Some(Event::Agent { message }) => {
                let _ = send_json(&serde_json::json!({
                    "type": "chat", "message": message, "session_id": session_id,
                    "complete": true, "from": "agent",
                }));
            }
            Some(Event::Claimed) => {
                let _ = send_system(JOINED);
            }
            Some(Event::Released) => {
                let _ = send_system(BACK_TO_BOT);
                self.unfollow(conversation);
            }
            Some(Event::Customer { .. }) | None => {}
        }
    }
}

/// Adds one message to the conversation's history (the hand-over's turns are kept one by
/// one: the customer's as `user`, the agent's as `assistant`).
fn keep(user: &str, session_id: &str, role: &str, content: &str, settings: &Settings) {
    let ttl = Duration::from_secs(settings.history_ttl_hours * 3600);
    let kept = history::append_turn(
        &history::key(user, session_id),
        Turn { role: role.into(), content: content.into() },
        settings.history_turns,
        ttl,
    );
    if let Err(err) = kept {
        log::error(&format!("a hand-over message was not remembered: {err}"));
    }
}

fn decode(msg: Message) -> Option<Event> {
    let Message::Text(text) = msg else { return None };
    serde_json::from_str(&text).ok()
}

/// An agent's connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Agent {
    /// The verified agent id.
    pub id: String,
    /// This connection's claim token.
    claim: String,
    /// Conversations this connection holds.
    holding: Vec<String>,
}

/// An agent's request.
#[derive(Deserialize)]
struct AgentRequest {
    action: Option<String>,
    session_id: Option<String>,
    user: Option<String>,
    message: Option<String>,
}

/// Whether this connection asks to be an agent's (`?role=agent`).
pub fn wants_agent(info: &ConnectionInfo) -> bool {
    info.query_param("role").as_deref() == Some("agent")
}

/// Verifies an agent's token (`?token=`) and its role claim.
pub fn verify_agent(info: &ConnectionInfo, settings: &Settings) -> Result<String, String> {
    let token = info.query_param("token").filter(|t| !t.is_empty()).ok_or("missing `token` in the URL")?;
    let user = auth::verify_token(&token).map_err(|err| err.to_string())?;
    let role = &user.claims[&settings.agent_role_claim];
    let has_role = role.as_str() == Some(settings.agent_role_value.as_str())
        || role
            .as_array()
            .is_some_and(|roles| roles.iter().any(|r| r.as_str() == Some(&settings.agent_role_value)));
    if !has_role {
        return Err(format!(
            "the token's claim `{}` does not grant the role `{}`",
            settings.agent_role_claim, settings.agent_role_value
        ));
    }
    Ok(user.id)
}

impl Agent {
    /// A verified agent's connection: follows the queue and gets what waits now.
    pub fn open(id: String) -> Agent {
        if let Err(err) = channels::subscribe(AGENTS_CHANNEL) {
            log::error(&format!("agent {id} cannot follow the queue: {err}"));
        }
        let _ = send_system(&format!("agent console: signed in as {id}"));
        match kv::list_keys("handover/") {
            Ok(keys) => {
                for key in keys {
                    let Some(conversation) = key.strip_prefix("handover/") else { continue };
                    if let Ok(Some((record, _))) = load(conversation)
                        && record.agent.is_none()
                    {
                        let messages = last_messages(&record.user, &record.session_id);
                        let _ = send_json(&QueueFrame::new("waiting", &record, messages));
                    }
                }
            }
            Err(err) => log::error(&format!("the waiting queue cannot be read: {err}")),
        }
        Agent { id, claim: crate::reply::random_hex(1), holding: Vec::new() }
    }

    /// One message from the agent.
    pub fn on_message(&mut self, text: &str, settings: &Settings) -> Result<(), (&'static str, String)> {
        let request: AgentRequest = serde_json::from_str(text)
            .map_err(|err| (codes::BAD_JSON, format!("not an agent request: {err}")))?;
        let session_id = request
            .session_id
            .filter(|s| !s.is_empty())
            .ok_or((codes::MISSING_FIELD, "missing field `session_id`".to_owned()))?;
        match request.action.as_deref() {
            Some("claim") => self.claim(&session_id, request.user.as_deref()),
            Some("reply") => {
                let message = request
                    .message
                    .filter(|m| !m.trim().is_empty())
                    .ok_or((codes::MISSING_FIELD, "missing field `message`".to_owned()))?;
                let (conversation, record, _) = self.held(&session_id, request.user.as_deref())?;
                publish(&conversation, &Event::Agent { message: message.clone() });
                keep(&record.user, &record.session_id, "assistant", &message, settings);
                Ok(())
            }
            Some("release") => {
                let (conversation, record, bytes) = self.held(&session_id, request.user.as_deref())?;
                self.release(&conversation, &record, &bytes);
                Ok(())
            }
            other => Err((
                codes::UNSUPPORTED_ACTION,
                format!(
                    "unsupported agent action {:?}; the actions are \"claim\", \"reply\" and \"release\"",
                    other.unwrap_or("")
                ),
            )),
        }
    }

    /// The waiting conversation with this session id (and user, if given).
    fn find(&self, session_id: &str, user: Option<&str>) -> Result<String, (&'static str, String)> {
        if let Some(user) = user {
            return Ok(conversation_id(user, session_id));
        }
        let keys = kv::list_keys("handover/").map_err(storage_error)?;
        let mut found = Vec::new();
        for key in keys {
            let Some(conversation) = key.strip_prefix("handover/") else { continue };
            if let Ok(Some((record, _))) = load(conversation)
                && record.session_id == session_id
            {
                found.push(conversation.to_owned());
            }
        }
        match found.len() {
            0 => Err((codes::NOT_WAITING, format!("no conversation {session_id:?} waits for an agent"))),
            1 => Ok(found.remove(0)),
            _ => Err((
                codes::INVALID_FIELD,
                format!("several customers wait with session {session_id:?}; name the `user` too"),
            )),
        }
    }

    fn claim(&mut self, session_id: &str, user: Option<&str>) -> Result<(), (&'static str, String)> {
        let conversation = self.find(session_id, user)?;
        let Some((record, bytes)) = load(&conversation).map_err(storage_error)? else {
            return Err((codes::NOT_WAITING, format!("no conversation {session_id:?} waits for an agent")));
        };
        // The same agent may take a conversation over from another connection of theirs
        // (a reloaded console, a dropped network).
        if record.agent.as_ref().is_some_and(|agent| *agent != self.id) {
            return Err((
                codes::ALREADY_CLAIMED,
                format!("conversation {session_id:?} has an agent already"),
            ));
        }
        let held = Record {
            agent: Some(self.id.clone()),
            claim: Some(self.claim.clone()),
            left_at_ms: None,
            ..record
        };
        match swap(&conversation, &bytes, &held) {
            Ok(true) => {}
            Ok(false) => {
                return Err((
                    codes::ALREADY_CLAIMED,
                    format!("conversation {session_id:?} has an agent already"),
                ));
            }
            Err(err) => return Err(storage_error(err)),
        }
        if let Err(err) = channels::subscribe(&channel(&conversation)) {
            log::error(&format!("agent {} cannot follow conversation {conversation}: {err}", self.id));
        }
        self.holding.push(conversation.clone());
        let messages = history::load(&history::key(&held.user, &held.session_id)).unwrap_or_default();
        let _ = send_json(&serde_json::json!({
            "type": "history", "session_id": held.session_id, "user": held.user, "messages": messages,
        }));
        publish(&conversation, &Event::Claimed);
        QueueFrame::new("claimed", &held, Vec::new()).announce();
        Ok(())
    }

    /// The conversation this connection holds with this session id, with its stored bytes.
    fn held(
        &self,
        session_id: &str,
        user: Option<&str>,
    ) -> Result<(String, Record, Vec<u8>), (&'static str, String)> {
        let not_held =
            || (codes::NOT_CLAIMED, format!("you do not hold conversation {session_id:?}; claim it first"));
        for conversation in &self.holding {
            if let Some((record, bytes)) = load(conversation).map_err(storage_error)?
                && record.session_id == session_id
                && user.is_none_or(|u| u == record.user)
            {
                if record.claim.as_deref() != Some(self.claim.as_str()) {
                    return Err(not_held());
                }
                return Ok((conversation.clone(), record, bytes));
            }
        }
        Err(not_held())
    }

    /// Gives a conversation back to the bot and stops following it.
    fn release(&mut self, conversation: &str, record: &Record, bytes: &[u8]) {
        give_back(conversation, bytes, record);
        self.holding.retain(|c| c != conversation);
        channels::unsubscribe(&channel(conversation));
    }

    /// The agent's connection closed. It notes when in each conversation it still holds,
    /// then after the grace gives back what it still holds (unless the agent claimed it
    /// again from another connection meanwhile). If the wait is cut short (a shutdown
    /// drains connections), the customer's next message after the grace does it
    /// (`Customer::route`).
    pub fn on_close(&mut self, settings: &Settings) {
        if self.holding.is_empty() {
            return;
        }
        for conversation in &self.holding {
            if let Ok(Some((record, bytes))) = load(conversation)
                && record.claim.as_deref() == Some(self.claim.as_str())
            {
                let left = Record { left_at_ms: Some(now_ms()), ..record };
                if let Err(err) = swap(conversation, &bytes, &left) {
                    log::warn(&format!("hand-over {conversation}: the agent's leaving was not noted: {err}"));
                }
            }
        }
        std::thread::sleep(Duration::from_secs(settings.agent_release_grace_s));
        for conversation in self.holding.clone() {
            if let Ok(Some((record, bytes))) = load(&conversation)
                && record.claim.as_deref() == Some(self.claim.as_str())
            {
                self.release(&conversation, &record, &bytes);
            }
        }
    }

    /// A message on the queue or on a held conversation's channel, for the agent.
    pub fn on_channel_message(&mut self, channel: &str, msg: Message) {
        if channel == AGENTS_CHANNEL {
            if let Message::Text(text) = msg {
                let _ = sockhost_addon_sdk::send_text(&text);
            }
            return;
        }
        let Some(conversation) = conversation_of_channel(channel) else { return };
        if let Some(Event::Customer { message }) = decode(msg)
            && let Ok(Some((record, _))) = load(conversation)
        {
            let _ = send_json(&serde_json::json!({
                "type": "chat", "message": message, "session_id": record.session_id,
                "user": record.user, "from": "customer",
            }));
        }
    }
}

/// Refuses an agent connection: the error frame, then the close.
pub fn refuse(why: &str) {
    let _ = send_error(codes::UNAUTHORIZED, &format!("not an agent: {why}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_are_stable_hex_and_tell_users_apart() {
        let a = conversation_id("alice", "s1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, conversation_id("alice", "s1"));
        assert_ne!(a, conversation_id("bob", "s1"));
        assert_ne!(a, conversation_id("alice", "s2"));
        assert_eq!(channel(&a), format!("handover:{a}"));
        assert_eq!(conversation_of_channel(&channel(&a)), Some(a.as_str()));
    }

    #[test]
    fn events_are_tagged_json() {
        let text = serde_json::to_string(&Event::Agent { message: "你好".into() }).unwrap();
        assert_eq!(text, r#"{"event":"agent","message":"你好"}"#);
        assert_eq!(decode(Message::Text(text)), Some(Event::Agent { message: "你好".into() }));
        assert_eq!(decode(Message::Text(r#"{"event":"released"}"#.into())), Some(Event::Released));
        assert_eq!(decode(Message::Text("nonsense".into())), None);
    }
}
