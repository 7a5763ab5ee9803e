//! aikefu (AI 客服): the shop's customer-service chat, at `/ws/aikefu`.
//!
//! It speaks the seed server's protocol exactly:
//!
//! - client → `{"message": "...", "token": "...", "session_id": "...", "action": "chat"}`;
//! - a `{"type":"system","message":...}` greeting when the connection opens;
//! - a reply as `{"type":"chat","message":<chunk>,"session_id":...,"complete":false}`
//!   chunks, streamed as they are produced, then an empty chunk with `"complete":true`.
//!   Each chunk also carries `"reply_id"` and `"seq"` (from 1), which clients that do not
//!   resume ignore;
//! - `{"action":"resume","token":...,"session_id":...,"reply_id":...,"after_seq":17}`
//!   after a dropped connection, on any node: chunks 18 onwards, then the live rest, then
//!   `complete` (see [`reply`]). A reply goes on when its client drops;
//! - `{"action":"agent",...}` (or a message with an `agent_keywords` word) hands the
//!   conversation to a human agent, who connects with `?role=agent` (see [`handover`]);
//! - `{"type":"error","message":...,"code":...}` when something is wrong, with the codes
//!   listed in [`codes`].
//!
//! Replies come from an OpenAI-compatible model when `[config]` sets `base_url` and
//! `model` (see [`llm`]), or else from the FAQ in `[config]` (see [`faq`]). Each
//! conversation's last turns are kept in kv per (verified user, session id) (see
//! [`history`]), so a client that reconnects with its session id continues where it
//! was, and nobody else can.
//!
//! Server push: once a connection's token is verified, it subscribes to the channel
//! `user:<id>`, so the shop's backend can reach every open chat of that user with
//! `POST /api/publish` (`{"addon":"aikefu","channel":"user:42","data":"您的订单已发货"}`);
//! each gets the text as `{"type":"system","message":...}`. (With
//! `dev_accept_any_token`, the user id is the token itself.)
//!
//! Each user keeps at most `max_sessions_per_user` conversations (default 20): starting
//! one more forgets the least recently used, so free-text session ids cannot fill the
//! addon's kv quota.
//!
//! Host grants it needs (`addons/aikefu.toml`): `kv = true`; `outbound_hosts` for the
//! model's origin; `[auth]` for real token verification; `[channels] subscribe =
//! ["user:*", "reply:*"]` and `publish = ["reply:*"]` for server push and resumes;
//! `orphan_callback_grace_ms` long enough for a reply to finish without its client.

mod faq;
mod handover;
mod history;
mod llm;
mod reply;
mod settings;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sockhost_addon_sdk::auth::{self, AuthError};
use sockhost_addon_sdk::protocol::{send_error, send_system};
use sockhost_addon_sdk::{Addon, ConnectionInfo, Error, Message, Refusal, channels, export_addon, log};

use crate::settings::Settings;

/// The `code` of every error frame aikefu sends.
pub mod codes {
    /// The frame is not a JSON object, or a field has the wrong type.
    pub const BAD_JSON: &str = "bad_json";
    /// `message`, `token` or `session_id` is absent or empty.
    pub const MISSING_FIELD: &str = "missing_field";
    /// `session_id` is longer than 128 bytes (UTF-8) or holds control characters, or the
    /// conversation's key (user and session) is over kv's 512-byte limit.
    pub const INVALID_FIELD: &str = "invalid_field";
    /// `action` is something other than `chat` or `resume`.
    pub const UNSUPPORTED_ACTION: &str = "unsupported_action";
    /// A resume named a reply that is unknown or past its TTL (`reply_ttl_s`).
    pub const REPLY_EXPIRED: &str = "reply_expired";
    /// An agent claimed a conversation another agent holds.
    pub const ALREADY_CLAIMED: &str = "already_claimed";
    /// An agent claimed a conversation that does not wait for one.
    pub const NOT_WAITING: &str = "not_waiting";
    /// An agent replied in or released a conversation it does not hold.
    pub const NOT_CLAIMED: &str = "not_claimed";
    /// The token is not valid (bad signature, expired, wrong issuer...), or a resume
    /// named another user's reply.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// The language model failed: refused, timed out, HTTP error, malformed or cut stream.
    pub const UPSTREAM_ERROR: &str = "upstream_error";
    /// Conversation memory could not be read or written.
    pub const STORAGE_ERROR: &str = "storage_error";
}

/// Longest accepted session id, in bytes of UTF-8: counted in bytes, like kv's key limit
/// the conversation key must fit (42 CJK characters, 128 ASCII ones).
const MAX_SESSION_ID_BYTES: usize = 128;
/// kv's key limit, which the conversation key (`history::key`) must fit.
const MAX_KV_KEY_BYTES: usize = 512;
/// Characters per chunk when streaming an offline answer.
const OFFLINE_CHUNK_CHARS: usize = 6;

/// Hibernates as `{"push_channel":"user:<id>"}` or `{"push_channel":null}` (well under
/// 200 bytes), so an idle chat costs the server no instance.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Aikefu {
    /// Not saved: it is read again from the manifest on the first message after a wake
    /// (`on_message` loads it when absent). Saving it would put the model's `api_key`, a
    /// secret, into the host's hibernation bytes, and a long FAQ could push the state
    /// past the host's size limit, which would keep the connection from hibernating.
    #[serde(skip)]
    settings: Option<Settings>,
    /// The push channel this connection is subscribed to (`user:<id>`), once a token
    /// was verified. Saved: the subscription itself is the host's and survives a
    /// hibernation, and this is how the connection knows to leave it when the client
    /// signs in as someone else.
    push_channel: Option<String>,
    /// A reply this connection resumed and is still following (`reply::Follower`), with
    /// the user it was verified for. Saved: the subscription to the reply's channel is
    /// the host's and survives a hibernation.
    #[serde(skip_serializing_if = "Option::is_none")]
    following: Option<(reply::Follower, String)>,
    /// The conversations this customer connection follows while handed over to an agent.
    customer: handover::Customer,
    /// Set on an agent's connection (`?role=agent`), which speaks the agents' protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<handover::Agent>,
}

impl Addon for Aikefu {
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        let settings = Settings::load();
        if handover::wants_agent(info) {
            match handover::verify_agent(info, &settings) {
                Ok(id) => self.agent = Some(handover::Agent::open(id)),
                Err(why) => {
                    handover::refuse(&why);
                    return Err(Refusal::policy_violation("unauthorized: not an agent"));
                }
            }
            self.settings = Some(settings);
            return Ok(());
        }
        // The client may already be gone; on_close follows either way.
        let _ = send_system(&settings.greeting);
        self.settings = Some(settings);
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let settings = self.settings.get_or_insert_with(Settings::load);
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                send_error(codes::BAD_JSON, "binary frames are not supported; send a JSON text frame")?;
                return Ok(());
            }
        };
        if let Some(agent) = self.agent.as_mut() {
            if let Err((code, message)) = agent.on_message(&text, settings) {
                send_error(code, &message)?;
            }
            return Ok(());
        }
        let request = match Request::parse(&text, settings) {
            Ok(request) => request,
            Err((code, message)) => {
                send_error(code, &message)?;
                return Ok(());
            }
        };
        match request {
            Request::Chat(chat) => {
                follow_user(&mut self.push_channel, &chat.who.push_id);
                let who = &chat.who;
                if handover::asks_for_agent(&chat.question, settings) {
                    if let Err((code, message)) = self.customer.ask(&who.user, &who.session_id) {
                        send_error(code, &message)?;
                    }
                    return Ok(());
                }
                match self.customer.route(&who.user, &who.session_id, &chat.question, settings) {
                    handover::Route::Bot => chat.answer(settings),
                    handover::Route::Agent => {}
                }
            }
            Request::Agent { who } => {
                follow_user(&mut self.push_channel, &who.push_id);
                if let Err((code, message)) = self.customer.ask(&who.user, &who.session_id) {
                    send_error(code, &message)?;
                }
            }
            Request::Resume { who, reply_id, after_seq } => {
                follow_user(&mut self.push_channel, &who.push_id);
                self.stop_following();
                match reply::resume(&reply_id, &who.user, after_seq) {
                    Ok(Some(follower)) => self.following = Some((follower, who.user)),
                    Ok(None) => {}
                    Err((code, message)) => send_error(code, &message)?,
                }
            }
        }
        Ok(())
    }

    fn on_channel_message(&mut self, channel: &str, msg: Message) {
        if let Some(agent) = self.agent.as_mut() {
            agent.on_channel_message(channel, msg);
            return;
        }
        if let Some(conversation) = handover::conversation_of_channel(channel) {
            self.customer.on_event(conversation, msg);
            return;
        }
        if let Some(reply_id) = reply::reply_of_channel(channel) {
            if let Some((follower, user)) = self.following.as_mut().filter(|(f, _)| f.reply_id == reply_id)
                && follower.on_live(msg, user)
            {
                self.stop_following();
            }
            return;
        }
        // The backend's push: shown as the seed protocol's system notice.
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(data) => String::from_utf8_lossy(&data).into_owned(),
        };
        let _ = send_system(&text);
    }

    fn on_close(&mut self, _code: u16, _reason: &str) {
        if let Some(agent) = self.agent.as_mut() {
            let settings = self.settings.get_or_insert_with(Settings::load);
            agent.on_close(settings);
        }
    }
}

impl Aikefu {
    /// Stops following a resumed reply (it ended, or the client resumes another).
    fn stop_following(&mut self) {
        if let Some((follower, _)) = self.following.take() {
            channels::unsubscribe(&reply::channel(&follower.reply_id));
        }
    }
}

/// Subscribes to the verified user's push channel (and leaves a previous user's, if the
/// client signed in as someone else). Push is a convenience: when it cannot be set up the
/// chat still works, and the log says why.
fn follow_user(push_channel: &mut Option<String>, push_id: &str) {
    let channel = format!("user:{push_id}");
    if push_channel.as_deref() == Some(channel.as_str()) {
        return;
    }
    if let Some(old) = push_channel.take() {
        channels::unsubscribe(&old);
    }
    // Denied or invalid (an id that is not a channel segment) will not change: it is
    // remembered as tried either way, so the log gets one line, not one per message.
    if let Err(err) = channels::subscribe(&channel) {
        log::warn(&format!("no server push for this connection ({channel}): {err}"));
    }
    *push_channel = Some(channel);
}

/// A verified user and the conversation a message belongs to.
struct Identity {
    user: String,
    /// The user's id as the backend knows it, for the push channel `user:<id>`.
    push_id: String,
    session_id: String,
}

/// A validated chat message.
struct ChatRequest {
    who: Identity,
    question: String,
}

/// What a client may ask for.
enum Request {
    Chat(ChatRequest),
    /// Chunks of `reply_id` after `after_seq`, then the live rest (`reply`).
    Resume {
        who: Identity,
        reply_id: String,
        after_seq: u64,
    },
    /// A person, please (`handover`).
    Agent {
        who: Identity,
    },
}

impl Request {
    fn parse(text: &str, settings: &Settings) -> Result<Request, (&'static str, String)> {
        #[derive(Deserialize)]
        struct Wire {
            message: Option<String>,
            token: Option<String>,
            session_id: Option<String>,
            action: Option<String>,
            reply_id: Option<String>,
            after_seq: Option<u64>,
        }
        // Only a JSON object is an envelope (an array would pass as a struct written
        // positionally).
        if !text.trim_start().starts_with('{') {
            return Err((codes::BAD_JSON, "not a JSON object".into()));
        }
        let wire: Wire = serde_json::from_str(text).map_err(|err| (codes::BAD_JSON, err.to_string()))?;
        match wire.action.as_deref() {
            None | Some("chat") => {
                let Some(question) = wire.message else {
                    return Err((codes::MISSING_FIELD, "missing field `message`".into()));
                };
                if question.trim().is_empty() {
                    return Err((codes::MISSING_FIELD, "field `message` is empty".into()));
                }
                let who = Identity::verify(wire.token, wire.session_id, settings)?;
                Ok(Request::Chat(ChatRequest { who, question }))
            }
            Some("agent") => {
                let who = Identity::verify(wire.token, wire.session_id, settings)?;
                Ok(Request::Agent { who })
            }
            Some("resume") => {
                let reply_id = match wire.reply_id {
                    Some(id) if !id.is_empty() => id,
                    _ => return Err((codes::MISSING_FIELD, "missing field `reply_id`".into())),
                };
                let who = Identity::verify(wire.token, wire.session_id, settings)?;
                Ok(Request::Resume { who, reply_id, after_seq: wire.after_seq.unwrap_or(0) })
            }
            Some(action) => {
                let shown: String = action.chars().take(40).collect();
                Err((
                    codes::UNSUPPORTED_ACTION,
                    format!(
                        "unsupported action {shown:?}; the actions are \"chat\", \"resume\" and \"agent\""
                    ),
                ))
            }
        }
    }
}

impl Identity {
    fn verify(
        token: Option<String>,
        session_id: Option<String>,
        settings: &Settings,
    ) -> Result<Identity, (&'static str, String)> {
        let session_id = match session_id {
            Some(id) if !id.is_empty() => id,
            _ => return Err((codes::MISSING_FIELD, "missing field `session_id`".into())),
        };
        if session_id.len() > MAX_SESSION_ID_BYTES || session_id.chars().any(char::is_control) {
            return Err((
                codes::INVALID_FIELD,
                format!(
                    "`session_id` must be 1 to {MAX_SESSION_ID_BYTES} bytes of UTF-8 (42 Chinese characters) \
                     without control characters"
                ),
            ));
        }
        let token = match token {
            Some(token) if !token.is_empty() => token,
            _ => return Err((codes::UNAUTHORIZED, "missing `token`: sign in first".into())),
        };
        let (user, push_id) = match auth::verify_token(&token) {
            Ok(user) => (user.id.clone(), user.id),
            // Development only: no verifier configured, and the manifest opted in.
            Err(AuthError::NotConfigured) if settings.dev_accept_any_token => (format!("dev:{token}"), token),
            Err(AuthError::NotConfigured) => {
                log::error(
                    "no [auth] verifier is configured and dev_accept_any_token is off; refusing every token",
                );
                return Err((
                    codes::UNAUTHORIZED,
                    "token verification is not configured on this server".into(),
                ));
            }
            Err(err) => return Err((codes::UNAUTHORIZED, err.to_string())),
        };
        if history::key(&user, &session_id).len() > MAX_KV_KEY_BYTES {
            // Only a very long user id gets here: the session id alone always fits.
            return Err((
                codes::INVALID_FIELD,
                format!(
                    "user id and `session_id` together are over the {MAX_KV_KEY_BYTES}-byte key limit of conversation memory; use a shorter `session_id`"
                ),
            ));
        }
        Ok(Identity { user, push_id, session_id })
    }
}

impl ChatRequest {
    /// Streams the answer as a numbered reply that is kept for a resume (`reply`), then
    /// records the exchange. The client may go at any point: the reply is produced to
    /// its end either way, so a resume gets all of it and the history holds it.
    fn answer(self, settings: &Settings) {
        let who = &self.who;
        let key = history::key(&who.user, &who.session_id);
        let turns = match history::load(&key) {
            Ok(turns) => turns,
            Err(err) => {
                log::error(&format!("loading conversation history failed: {err}"));
                let _ =
                    send_error(codes::STORAGE_ERROR, "conversation memory is unavailable; please try again");
                return;
            }
        };
        let mut reply = reply::ReplyWriter::start(
            &who.user,
            &who.session_id,
            settings.reply_ttl(),
            settings.keep_replies,
        );
        let answer = match &settings.llm {
            Some(llm) => match llm::stream_reply(llm, &turns, &self.question, |delta| reply.chunk(delta)) {
                Ok(answer) => answer,
                Err(err) => {
                    log::warn(&format!("reply failed: {err}"));
                    reply.fail(codes::UPSTREAM_ERROR, &err.0);
                    return;
                }
            },
            None => {
                let answer = faq::answer(&settings.faq, &self.question).unwrap_or(&settings.fallback);
                for chunk in faq::chunks(answer, OFFLINE_CHUNK_CHARS) {
                    reply.chunk(chunk);
                }
                answer.to_owned()
            }
        };
        // Remembered before `complete` goes out: a client that sends its next question
        // the moment the reply completes (here or after a resume) gets it as context.
        let ttl = Duration::from_secs(settings.history_ttl_hours * 3600);
        let recorded =
            history::record(&key, &self.question, &answer, settings.history_turns, ttl).and_then(|()| {
                history::touch_session(&who.user, &who.session_id, settings.max_sessions_per_user, ttl)
            });
        reply.finish();
        if let Err(err) = recorded {
            log::error(&format!("saving conversation history failed: {err}"));
            let _ = send_error(
                codes::STORAGE_ERROR,
                "the reply was not remembered; the next message starts afresh",
            );
        }
    }
}

export_addon!(Aikefu, hibernate);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            greeting: "hi".into(),
            history_turns: 10,
            history_ttl_hours: 1,
            max_sessions_per_user: 20,
            dev_accept_any_token: false,
            llm: Some(settings::LlmSettings {
                base_url: "https://api.example.com".into(),
                model: "m".into(),
                api_key: Some("sk-secret".into()),
                system_prompt: String::new(),
                temperature: None,
            }),
            faq: Vec::new(),
            fallback: "?".into(),
            reply_ttl_s: 600,
            keep_replies: true,
            agent_keywords: vec!["人工".into()],
            agent_role_claim: "role".into(),
            agent_role_value: "agent".into(),
            agent_release_grace_s: 30,
        }
    }

    #[test]
    fn hibernation_keeps_the_push_channel_and_never_the_settings() {
        let live = Aikefu {
            settings: Some(settings()),
            push_channel: Some("user:42".into()),
            following: None,
            customer: Default::default(),
            agent: None,
        };
        let saved = serde_json::to_string(&live).unwrap();
        assert_eq!(saved, r#"{"push_channel":"user:42","customer":{"following":[]}}"#);
        assert!(!saved.contains("sk-secret"));
        let woken: Aikefu = serde_json::from_str(&saved).unwrap();
        assert_eq!(woken.push_channel.as_deref(), Some("user:42"));
        // Loaded again from the manifest by the next on_message.
        assert!(woken.settings.is_none());

        let fresh = serde_json::to_string(&Aikefu::default()).unwrap();
        assert_eq!(fresh, r#"{"push_channel":null,"customer":{"following":[]}}"#);
        assert!(serde_json::from_str::<Aikefu>(&fresh).unwrap().push_channel.is_none());
    }
}
