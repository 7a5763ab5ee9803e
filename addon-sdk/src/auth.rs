//! Verifying the token a client sends, to key data by the real user.
//!
//! The host checks the token with the secret the operator configured in the manifest's
//! `[auth]` section (HS256 JSON Web Tokens; the secret never enters the addon):
//!
//! ```no_run
//! use sockhost_addon_sdk::auth::{self, AuthError};
//!
//! match auth::verify_token("eyJhbGciOi...") {
//!     Ok(user) => { /* key data by user.id */ }
//!     Err(AuthError::NotConfigured) => { /* no [auth]: development mode */ }
//!     Err(err) => { /* refuse: err says why, without the token */ }
//! }
//! ```
//!
//! # Opaque tokens: introspection
//!
//! A shop whose tokens are opaque strings (a session id its PHP backend issued) verifies
//! them against that backend instead, over outbound HTTP. Grant the backend in the
//! manifest (`outbound_hosts = ["https://shop.example.com"]`) and ask it who the token
//! belongs to, in the style of OAuth token introspection (RFC 7662):
//!
//! ```no_run
//! use sockhost_addon_sdk::http::Request;
//!
//! fn introspect(token: &str) -> Option<String> {
//!     let response = Request::post("https://shop.example.com/api/token/introspect")
//!         .header("content-type", "application/x-www-form-urlencoded")
//!         .body(format!("token={token}"))
//!         .send()
//!         .ok()?;
//!     if response.status() != 200 {
//!         return None;
//!     }
//!     let body: serde_json::Value = serde_json::from_slice(&response.into_bytes(64 * 1024).ok()?).ok()?;
//!     // {"active": true, "sub": "user-42", ...}
//!     if body["active"] != true {
//!         return None;
//!     }
//!     body["sub"].as_str().map(str::to_owned)
//! }
//! ```
//!
//! Cache the answer in [`crate::kv`] with a short TTL (`kv::set_with_ttl`) keyed by a hash
//! of the token, so each message does not cost a round trip.

use std::fmt;

use crate::__private::bindings::sockhost::addon::auth as host;

/// A user whose token the host verified.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    /// The user's id: the claim the manifest names (`user_claim`, default `sub`).
    pub id: String,
    /// Every claim of the token.
    pub claims: serde_json::Value,
    /// When the token expires, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The manifest has no `[auth]` section, so the host verifies nothing.
    NotConfigured,
    /// The token's signature is good but it has expired.
    Expired,
    /// The token is not acceptable; the text says why (never containing the token).
    Invalid(String),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::NotConfigured => f.write_str("token verification is not configured for this addon"),
            AuthError::Expired => f.write_str("token expired"),
            AuthError::Invalid(why) => write!(f, "invalid token: {why}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Verifies `token` with the verifier the manifest configures.
pub fn verify_token(token: &str) -> Result<User, AuthError> {
    match host::verify_token(token) {
        Ok(user) => Ok(User {
            id: user.id,
            claims: serde_json::from_str(&user.claims).unwrap_or(serde_json::Value::Null),
            expires_at: user.expires_at,
        }),
        Err(host::AuthError::NotConfigured) => Err(AuthError::NotConfigured),
        Err(host::AuthError::Expired) => Err(AuthError::Expired),
        Err(host::AuthError::Invalid(why)) => Err(AuthError::Invalid(why)),
    }
}
