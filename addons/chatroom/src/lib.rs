//! chatroom: a chat room on channels, at `/ws/chatroom?room=lobby&name=alice`.
//!
//! - Every text message a member sends reaches every member of the room, on every node,
//!   the sender included, as `{"type":"chat","room":"lobby","from":"alice","message":"..."}`.
//! - Joins and leaves reach the members as `{"type":"system","message":"alice joined"}`.
//! - A bad room or name refuses the connection with an error frame
//!   (`{"type":"error","code":"invalid_room"|"invalid_name",...}`) and close 1008; a
//!   message that is binary, empty or too long gets an error frame and the connection
//!   stays open.
//!
//! The room is the channel `room:<room>`; the manifest (`addons/chatroom.toml`) grants
//! `room:*` for subscribing and publishing. The addon keeps no state beyond its own
//! connection: the bus knows the members.

use serde::{Deserialize, Serialize};
use sockhost_addon_sdk::protocol::{send_error, send_system};
use sockhost_addon_sdk::{Addon, ConnectionInfo, Error, Message, Refusal, channels, export_addon, send_text};

/// Longest room and member name, in characters.
const MAX_NAME_CHARS: usize = 32;
/// Longest chat message, in characters.
const MAX_MESSAGE_CHARS: usize = 2000;

/// Hibernates as `{"member":{"room":...,"name":...}}` (under 100 bytes): an idle member
/// costs no instance, and the room subscription is the host's, so it survives as is.
#[derive(Default, Serialize, Deserialize)]
#[serde(default)]
struct Chatroom {
    /// Set once the member has joined.
    member: Option<Member>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Member {
    room: String,
    name: String,
}

impl Member {
    fn channel(&self) -> String {
        format!("room:{}", self.room)
    }
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event<'a> {
    Chat { room: &'a str, from: &'a str, message: &'a str },
    System { message: &'a str },
}

impl Event<'_> {
    fn json(&self) -> String {
        serde_json::to_string(self).expect("events serialise")
    }
}

impl Addon for Chatroom {
    fn on_open(&mut self, info: &ConnectionInfo) -> Result<(), Refusal> {
        let room = info.query_param("room").unwrap_or_default();
        if let Err(problem) = check_room(&room) {
            let _ = send_error("invalid_room", &problem);
            return Err(Refusal::policy_violation("invalid room"));
        }
        let name = info.query_param("name").unwrap_or_default();
        if let Err(problem) = check_name(&name) {
            let _ = send_error("invalid_name", &problem);
            return Err(Refusal::policy_violation("invalid name"));
        }
        let member = Member { room, name };
        let channel = member.channel();
        if let Err(err) = channels::subscribe(&channel) {
            let _ = send_error("unavailable", &format!("cannot join room {}: {err}", member.room));
            return Err(Refusal::new(1011, "cannot join the room"));
        }
        // The joiner hears its own join too: proof that it is in the room.
        let joined = format!("{} joined", member.name);
        if let Err(err) = channels::publish_text(&channel, &Event::System { message: &joined }.json()) {
            // The cluster is down: the member is in, but nobody heard of it.
            let _ = send_system(&format!("joined {}, but the room could not be told: {err}", member.room));
        }
        self.member = Some(member);
        Ok(())
    }

    fn on_message(&mut self, msg: Message) -> Result<(), Error> {
        let Some(member) = &self.member else { return Ok(()) };
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => {
                send_error("bad_message", "binary messages are not supported; send text")?;
                return Ok(());
            }
        };
        if text.trim().is_empty() {
            send_error("bad_message", "the message is empty")?;
            return Ok(());
        }
        if text.chars().count() > MAX_MESSAGE_CHARS {
            send_error("bad_message", &format!("a message is at most {MAX_MESSAGE_CHARS} characters"))?;
            return Ok(());
        }
        let event = Event::Chat { room: &member.room, from: &member.name, message: &text }.json();
        if let Err(err) = channels::publish_text(&member.channel(), &event) {
            send_error("unavailable", &format!("the message was not delivered: {err}"))?;
        }
        Ok(())
    }

    fn on_channel_message(&mut self, _channel: &str, msg: Message) {
        // Room events are already the JSON the clients expect.
        if let Message::Text(event) = msg {
            let _ = send_text(&event);
        }
    }

    fn on_close(&mut self, _code: u16, _reason: &str) {
        if let Some(member) = self.member.take() {
            let channel = member.channel();
            // Leave first, so the member's own leave is not delivered to a closed socket.
            channels::unsubscribe(&channel);
            let left = format!("{} left", member.name);
            let _ = channels::publish_text(&channel, &Event::System { message: &left }.json());
        }
    }
}

/// Rooms become channel segments: ASCII letters, digits, `_`, `-`.
fn check_room(room: &str) -> Result<(), String> {
    let ok = !room.is_empty()
        && room.len() <= MAX_NAME_CHARS
        && room.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "query parameter `room` must be 1 to {MAX_NAME_CHARS} ASCII letters, digits, `_` or `-`, e.g. ?room=lobby&name=alice"
        ))
    }
}

/// Names are shown to people: any letters or digits (小明 too), spaces, `_ - .`.
fn check_name(name: &str) -> Result<(), String> {
    let chars = name.chars().count();
    let ok = (1..=MAX_NAME_CHARS).contains(&chars)
        && name.trim() == name
        && name.chars().all(|c| c.is_alphanumeric() || matches!(c, ' ' | '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "query parameter `name` must be 1 to {MAX_NAME_CHARS} letters, digits, spaces, `_`, `-` or `.`, \
             without spaces at either end, e.g. ?room=lobby&name=alice"
        ))
    }
}

export_addon!(Chatroom, hibernate);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_and_names_are_checked() {
        assert!(check_room("lobby").is_ok() && check_room("a-b_1").is_ok());
        for bad in ["", "a:b", "a b", "房间", &"x".repeat(33)] {
            assert!(check_room(bad).is_err(), "{bad}");
        }
        assert!(check_name("alice").is_ok() && check_name("小明").is_ok() && check_name("Mary Ann").is_ok());
        for bad in ["", " alice", "a<b>", "\u{7}", &"x".repeat(33)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_member_survives_a_hibernation() {
        let live = Chatroom { member: Some(Member { room: "lobby".into(), name: "小明".into() }) };
        let saved = serde_json::to_string(&live).unwrap();
        assert_eq!(saved, r#"{"member":{"room":"lobby","name":"小明"}}"#);
        let woken: Chatroom = serde_json::from_str(&saved).unwrap();
        assert_eq!(woken.member, live.member);
        assert_eq!(woken.member.unwrap().channel(), "room:lobby");
        // Not yet joined (or already left): nothing to restore.
        let saved = serde_json::to_string(&Chatroom::default()).unwrap();
        assert!(serde_json::from_str::<Chatroom>(&saved).unwrap().member.is_none());
    }

    #[test]
    fn events_are_the_documented_json() {
        let chat = Event::Chat { room: "lobby", from: "alice", message: "hi \"x\"" }.json();
        assert_eq!(chat, r#"{"type":"chat","room":"lobby","from":"alice","message":"hi \"x\""}"#);
        assert_eq!(
            Event::System { message: "alice joined" }.json(),
            r#"{"type":"system","message":"alice joined"}"#
        );
    }
}
