//! `sockhost:addon/auth`: verifies the tokens clients send, so an addon keys data by the
//! real user rather than by whatever a client claims.
//!
//! The host verifies HS256 JSON Web Tokens with a secret from the server's environment
//! (the manifest's `[auth]` section names the variable; a secret written in the file is
//! refused). Why in the host and not in each addon: the secret never enters a sandbox,
//! and every addon gets the same careful checks:
//!
//! - the header's `alg` must be exactly `HS256` (no `none`, no algorithm confusion);
//! - the signature is compared in constant time (RustCrypto's `hmac`);
//! - `exp` is required and checked, `nbf` when present, both with `leeway_s` of skew;
//! - `iss` and `aud` are checked when the manifest sets them;
//! - the user is the `user_claim` claim (default `sub`), a string or an integer.
//!
//! Tokens longer than [`MAX_TOKEN_BYTES`] are refused before any decoding. Errors never
//! echo the token. A shop with opaque tokens verifies them in the addon instead, with an
//! introspection request over outbound HTTP (the SDK's `auth` module shows how).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::HostState;
use super::config::{EnvLookup, env_reference};
use crate::bindings::sockhost::addon::auth::{AuthError, Host, VerifiedUser};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Shortest HS256 secret accepted: RFC 7518 asks for a key as long as the hash (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// The manifest's `[auth]` section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSection {
    jwt_hs256_secret: toml::Value,
    user_claim: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_s: Option<u64>,
}

/// A configured HS256 verifier.
#[derive(Clone, PartialEq)]
pub struct JwtVerifier {
    secret: Vec<u8>,
    /// Variable the secret came from, for operators.
    secret_env: String,
    user_claim: String,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl JwtVerifier {
    pub(crate) fn from_manifest(section: AuthSection, env: EnvLookup<'_>) -> Result<JwtVerifier, String> {
        let bad = |problem: String| format!("key `auth.jwt_hs256_secret`: {problem}");
        let var = match env_reference(&section.jwt_hs256_secret) {
            Some(Ok(var)) => var.to_owned(),
            Some(Err(problem)) => return Err(bad(problem)),
            None => {
                return Err(bad(
                    "a secret must not be written in the manifest; name an environment variable: { env = \"NAME\" }"
                        .into(),
                ));
            }
        };
        let secret = env(&var).ok_or_else(|| bad(format!("environment variable ${var} is not set")))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(bad(format!(
                "${var} holds {} bytes; an HS256 secret needs at least {MIN_SECRET_BYTES}",
                secret.len()
            )));
        }
        let leeway = section.leeway_s.unwrap_or(30);
        if leeway > 3600 {
            return Err(format!("key `auth.leeway_s`: {leeway} is outside 0..=3600"));
        }
        Ok(JwtVerifier {
            secret: secret.into_bytes(),
            secret_env: var,
            user_claim: section.user_claim.unwrap_or_else(|| "sub".to_owned()),
            issuer: section.issuer,
            audience: section.audience,
            leeway,
        })
    }

    /// For operators: what is checked, without the secret.
    pub fn describe(&self) -> String {
        let mut text =
            format!("JWT HS256, secret from ${}, user = claim `{}`", self.secret_env, self.user_claim);
        if let Some(iss) = &self.issuer {
            text += &format!(", iss = {iss:?}");
        }
        if let Some(aud) = &self.audience {
            text += &format!(", aud = {aud:?}");
        }
        text + &format!(", leeway {} s", self.leeway)
    }

    /// Verifies `token` at time `now` (seconds since the Unix epoch).
    pub fn verify(&self, token: &str, now: u64) -> Result<VerifiedUser, AuthError> {
        let invalid = |why: &str| AuthError::Invalid(why.to_owned());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("token longer than 8 KiB"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a JWT (expected three dot-separated parts)"));
        };
        let decode = |part: &str, what: &str| {
            URL_SAFE_NO_PAD.decode(part).map_err(|_| invalid(&format!("{what} is not base64url")))
        };

        #[derive(Deserialize)]
        struct Header {
            alg: String,
        }
        let header_json: Header = serde_json::from_slice(&decode(header, "header")?)
            .map_err(|_| invalid("header is not a JWT header"))?;
        if header_json.alg != "HS256" {
            return Err(invalid(&format!(
                "algorithm {:?} is not accepted; only HS256",
                truncate(&header_json.alg)
            )));
        }
        let signature = decode(signature, "signature")?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac.verify_slice(&signature).map_err(|_| invalid("bad signature"))?;

        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&decode(payload, "payload")?)
                .map_err(|_| invalid("payload is not a JSON object"))?;
        let time_claim = |name: &str| -> Result<Option<u64>, AuthError> {
            match claims.get(name) {
                None => Ok(None),
                Some(value) => value
                    .as_u64()
                    .or_else(|| value.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .map(Some)
                    .ok_or_else(|| invalid(&format!("claim `{name}` is not a number of seconds"))),
            }
        };
        let expires_at = time_claim("exp")?.ok_or_else(|| invalid("claim `exp` is missing"))?;
        if now > expires_at.saturating_add(self.leeway) {
            return Err(AuthError::Expired);
        }
        if let Some(not_before) = time_claim("nbf")?
            && now.saturating_add(self.leeway) < not_before
        {
            return Err(invalid("token is not valid yet (`nbf`)"));
        }
        if let Some(issuer) = &self.issuer
            && claims.get("iss").and_then(|v| v.as_str()) != Some(issuer)
        {
            return Err(invalid("wrong issuer (`iss`)"));
        }
        if let Some(audience) = &self.audience {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(aud)) => aud == audience,
                Some(serde_json::Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !ok {
                return Err(invalid("wrong audience (`aud`)"));
            }
        }
        let id = match claims.get(&self.user_claim) {
            Some(serde_json::Value::String(id)) if !id.is_empty() => id.clone(),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => {
                return Err(invalid(&format!(
                    "claim `{}` (the user) is missing or not a string",
                    self.user_claim
                )));
            }
        };
        Ok(VerifiedUser { id, claims: serde_json::Value::Object(claims).to_string(), expires_at })
    }
}

fn truncate(text: &str) -> &str {
    crate::error::truncate_utf8(text, 16)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Host for HostState {
    fn verify_token(&mut self, token: String) -> Result<VerifiedUser, AuthError> {
        match &self.auth {
            Some(verifier) => verifier.verify(&token, unix_now()),
            None => Err(AuthError::NotConfigured),
        }
    }
}

/// Mints a token; for tests of this module and of the server.
#[doc(hidden)]
pub fn sign_hs256(secret: &[u8], header_json: &str, claims_json: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(header_json);
    let payload = URL_SAFE_NO_PAD.encode(claims_json);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("{header}.{payload}").as_bytes());
    format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;
    const NOW: u64 = 1_800_000_000;

    fn verifier(extra: &str) -> JwtVerifier {
        let text = format!("jwt_hs256_secret = {{ env = \"SECRET\" }}\n{extra}");
        let section: AuthSection = toml::from_str(&text).unwrap();
        JwtVerifier::from_manifest(section, &|name| (name == "SECRET").then(|| SECRET.to_owned())).unwrap()
    }

    fn token(claims: &str) -> String {
        sign_hs256(SECRET.as_bytes(), HS256, claims)
    }

    fn invalid(result: Result<VerifiedUser, AuthError>) -> String {
        match result {
            Err(AuthError::Invalid(why)) => why,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_good_token_names_its_user() {
        let user = verifier("").verify(&token(r#"{"sub":"u42","exp":1800000060,"name":"Li"}"#), NOW).unwrap();
        assert_eq!(user.id, "u42");
        assert_eq!(user.expires_at, 1_800_000_060);
        assert!(user.claims.contains(r#""name":"Li""#));
        let numeric =
            verifier("user_claim = \"uid\"").verify(&token(r#"{"uid":7,"exp":1800000060}"#), NOW).unwrap();
        assert_eq!(numeric.id, "7");
    }

    #[test]
    fn tokens_are_unpadded_base64url_like_every_jwt_library_writes() {
        // The standard header's encoding, as any JWT library prints it.
        assert!(token("{}").starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."));
    }

    #[test]
    fn every_bad_token_is_refused_with_a_reason() {
        let v = verifier("issuer = \"shop\"\naudience = \"aikefu\"");
        let good = r#"{"sub":"u","exp":1800000060,"iss":"shop","aud":["x","aikefu"]}"#;
        assert!(v.verify(&token(good), NOW).is_ok());
        assert!(invalid(v.verify("garbage", NOW)).contains("three"));
        assert!(invalid(v.verify("a.b.c.d", NOW)).contains("three"));
        assert!(invalid(v.verify("!!.e30.e30", NOW)).contains("base64url"));
        let none = sign_hs256(SECRET.as_bytes(), r#"{"alg":"none"}"#, good);
        assert!(invalid(v.verify(&none, NOW)).contains("HS256"));
        let forged = sign_hs256(b"another-secret-another-secret-123", HS256, good);
        assert!(invalid(v.verify(&forged, NOW)).contains("signature"));
        let mut tampered = token(good);
        tampered.insert(tampered.find('.').unwrap() + 2, 'x');
        assert!(v.verify(&tampered, NOW).is_err());
        assert!(invalid(v.verify(&token(r#"{"sub":"u","iss":"shop","aud":"aikefu"}"#), NOW)).contains("exp"));
        assert!(
            invalid(v.verify(&token(r#"{"sub":"u","exp":"soon","iss":"shop","aud":"aikefu"}"#), NOW))
                .contains("exp")
        );
        assert!(
            invalid(v.verify(&token(r#"{"exp":1800000060,"iss":"shop","aud":"aikefu"}"#), NOW))
                .contains("sub")
        );
        assert!(
            invalid(v.verify(&token(r#"{"sub":"u","exp":1800000060,"iss":"evil","aud":"aikefu"}"#), NOW))
                .contains("iss")
        );
        assert!(
            invalid(v.verify(&token(r#"{"sub":"u","exp":1800000060,"iss":"shop","aud":"other"}"#), NOW))
                .contains("aud")
        );
        let future = r#"{"sub":"u","exp":1900000000,"nbf":1800001000,"iss":"shop","aud":"aikefu"}"#;
        assert!(invalid(v.verify(&token(future), NOW)).contains("nbf"));
        assert!(invalid(v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1), NOW)).contains("8 KiB"));
    }

    #[test]
    fn expiry_allows_the_leeway_and_no_more() {
        let v = verifier("leeway_s = 10");
        let t = token(r#"{"sub":"u","exp":1800000000}"#);
        assert!(v.verify(&t, NOW + 10).is_ok());
        assert!(matches!(v.verify(&t, NOW + 11), Err(AuthError::Expired)));
    }

    #[test]
    fn secrets_come_from_the_environment_only() {
        let parse = |text: &str, env: EnvLookup<'_>| {
            JwtVerifier::from_manifest(toml::from_str::<AuthSection>(text).unwrap(), env).map(|_| ())
        };
        let err = parse(&format!("jwt_hs256_secret = \"{SECRET}\""), &|_| None).unwrap_err();
        assert!(err.contains("must not be written"), "{err}");
        let err = parse("jwt_hs256_secret = { env = \"NOPE\" }", &|_| None).unwrap_err();
        assert!(err.contains("$NOPE is not set"), "{err}");
        let err = parse("jwt_hs256_secret = { env = \"S\" }", &|_| Some("short".into())).unwrap_err();
        assert!(err.contains("at least 32"), "{err}");
        let shown = format!("{:?}", verifier(""));
        assert!(!shown.contains(SECRET) && shown.contains("$SECRET"), "{shown}");
    }
}
