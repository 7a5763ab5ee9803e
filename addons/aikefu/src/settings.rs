//! aikefu's settings, read once per connection from the manifest's `[config]` table.

use serde::Deserialize;
use sockhost_addon_sdk::config;

/// Where replies come from.
pub struct Settings {
    /// The `system` notice sent when a connection opens.
    pub greeting: String,
    /// Conversation turns (a question and its answer) kept per session.
    pub history_turns: usize,
    /// How long an idle conversation is kept, in hours.
    pub history_ttl_hours: u64,
    /// Conversations kept per user (`max_sessions_per_user`, default 20): a user who
    /// starts one more loses the least recently used, so free-text session ids cannot
    /// fill the addon's kv quota.
    pub max_sessions_per_user: usize,
    /// Development only: accept any non-empty token when no `[auth]` verifier is
    /// configured, and treat the token itself as the user.
    pub dev_accept_any_token: bool,
    /// The language model, when `base_url` and `model` are set.
    pub llm: Option<LlmSettings>,
    /// The offline FAQ.
    pub faq: Vec<FaqEntry>,
    /// The offline answer when no FAQ entry matches.
    pub fallback: String,
    /// How long a reply's chunks are kept for a resume, in seconds (`reply_ttl_s`,
    /// default 600: ten minutes).
    pub reply_ttl_s: u64,
    /// Whether replies are kept and published for a resume (`keep_replies`, default
    /// true); off, a reply costs no kv writes or channel messages, and cannot be resumed.
    pub keep_replies: bool,
    /// Words in a chat message that ask for a person (`agent_keywords`).
    pub agent_keywords: Vec<String>,
    /// The token claim that must carry `agent_role_value` for `?role=agent`.
    pub agent_role_claim: String,
    pub agent_role_value: String,
    /// How long an agent's dropped connection keeps its sessions (`agent_release_grace_s`).
    pub agent_release_grace_s: u64,
}

/// An OpenAI-compatible chat-completions endpoint.
pub struct LlmSettings {
    /// `https://api.example.com` (the path `/v1/chat/completions` is added) or a URL
    /// that already ends in `/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer`; from the environment (`{ env = "..." }`).
    pub api_key: Option<String>,
    pub system_prompt: String,
    pub temperature: Option<f64>,
}

/// One offline answer and the words that select it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FaqEntry {
    pub keywords: Vec<String>,
    pub answer: String,
}

const DEFAULT_GREETING: &str = "您好，我是智能客服，请问有什么可以帮您？ Hello! How can I help you today?";
const DEFAULT_FALLBACK: &str = "抱歉，我暂时无法回答这个问题，请联系人工客服。 Sorry, I can't answer that yet; please contact our support team.";
const DEFAULT_AGENT_KEYWORDS: &[&str] = &["转人工", "人工", "human"];
const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful customer-service assistant for an online shop. Answer briefly, in the customer's language.";

impl Settings {
    /// Reads the settings; a malformed value falls back to its default with a log line,
    /// so one typo does not take the chat down.
    pub fn load() -> Settings {
        fn json<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
            config::get_json(key).unwrap_or_else(|err| {
                sockhost_addon_sdk::log::warn(&err);
                None
            })
        }
        let llm = match (config::get("base_url"), config::get("model")) {
            (Some(base_url), Some(model)) if !base_url.is_empty() && !model.is_empty() => Some(LlmSettings {
                base_url,
                model,
                api_key: config::get("api_key").filter(|k| !k.is_empty()),
                system_prompt: config::get("system_prompt")
                    .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_owned()),
                temperature: json("temperature"),
            }),
            _ => None,
        };
        Settings {
            greeting: config::get("greeting").unwrap_or_else(|| DEFAULT_GREETING.to_owned()),
            history_turns: json::<usize>("history_turns").unwrap_or(10).clamp(1, 100),
            history_ttl_hours: json::<u64>("history_ttl_hours").unwrap_or(168).max(1),
            max_sessions_per_user: json::<usize>("max_sessions_per_user").unwrap_or(20).clamp(1, 1000),
            dev_accept_any_token: json("dev_accept_any_token").unwrap_or(false),
            llm,
            faq: json("faq").unwrap_or_default(),
            fallback: config::get("fallback").unwrap_or_else(|| DEFAULT_FALLBACK.to_owned()),
            reply_ttl_s: json::<u64>("reply_ttl_s").unwrap_or(600).clamp(1, 24 * 3600),
            keep_replies: json("keep_replies").unwrap_or(true),
            agent_keywords: json("agent_keywords")
                .unwrap_or_else(|| DEFAULT_AGENT_KEYWORDS.iter().map(|k| (*k).to_owned()).collect()),
            agent_role_claim: config::get("agent_role_claim").unwrap_or_else(|| "role".to_owned()),
            agent_role_value: config::get("agent_role_value").unwrap_or_else(|| "agent".to_owned()),
            agent_release_grace_s: json::<u64>("agent_release_grace_s").unwrap_or(30).min(3600),
        }
    }

    /// How long a reply is kept for a resume.
    pub fn reply_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reply_ttl_s)
    }
}

impl LlmSettings {
    /// The chat-completions URL.
    pub fn completions_url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llm(base_url: &str) -> LlmSettings {
        LlmSettings {
            base_url: base_url.into(),
            model: "m".into(),
            api_key: None,
            system_prompt: String::new(),
            temperature: None,
        }
    }

    #[test]
    fn the_completions_path_is_added_once() {
        assert_eq!(
            llm("https://api.example.com").completions_url(),
            "https://api.example.com/v1/chat/completions"
        );
        assert_eq!(llm("http://127.0.0.1:9/v1/").completions_url(), "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(
            llm("https://gw.example.com/openai/v1").completions_url(),
            "https://gw.example.com/openai/v1/chat/completions"
        );
    }
}
